"""The offline demo: procedural images, a tiny CLIP trained on them, fitted SAEs, and the normal precompute.

Every step is cached in the data folder, so a second run only serves. Nothing
here is special-cased downstream: the model loads through open_clip's
``local-dir:`` path, the SAEs are written in the released checkpoint layout
and read by the same loader as the real ones.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from clipscope_explorer.precompute.demo.fit import FitSettings, collect_tokens, fit_topk_sae, save_fitted
from clipscope_explorer.precompute.demo.scenes import write_scenes
from clipscope_explorer.precompute.demo.train_clip import train_demo_clip
from clipscope_explorer.precompute.job import PrecomputeConfig, run
from clipscope_explorer.precompute.model.checkpoints import CHECKPOINT_NAME
from clipscope_explorer.precompute.model.vision import load_tower
from clipscope_explorer.precompute.sources import resolve_sources

log = logging.getLogger(__name__)
DEMO_LAYERS = (1, 3)
DEMO_FIT = FitSettings(n_features=512, k=8, steps=600, batch_tokens=4096, lr=2e-3, checkpoints=4)
FIT_IMAGES = 600


def _has_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and any(CHECKPOINT_NAME.match(p.name) for p in folder.iterdir())


def build_demo(data: Path, n_images: int = 2000, fresh: bool = False, progress: bool = True) -> Path:
    """Make (or reuse) everything under `data` and return the demo index path."""
    data = Path(data).resolve()  # the index records model and SAE paths: absolute, so any cwd can serve it
    index = data / f"demo-{n_images}.duckdb"
    if index.is_file() and not fresh:
        return index
    started = time.perf_counter()
    images = write_scenes(data / "images", n_images)
    model_dir = data / "model"
    if fresh or not (model_dir / "open_clip_pytorch_model.bin").is_file():
        train_demo_clip(model_dir, images, n_images, progress=progress)
    model = f"local-dir:{model_dir}"
    sae_dir = data / "sae"
    todo = [layer for layer in DEMO_LAYERS if fresh or not _has_checkpoint(sae_dir / f"{layer}_resid")]
    if todo:
        tower = load_tower(model, device="cpu")
        shards = resolve_sources([str(images)])
        tokens = collect_tokens(tower, shards, todo, min(FIT_IMAGES, n_images), progress=progress)
        for layer in todo:
            save_fitted(fit_topk_sae(tokens[layer], DEMO_FIT, progress=progress), sae_dir, layer, DEMO_FIT.k)
    config = PrecomputeConfig(
        images=[str(images)],
        out=index,
        model=model,
        sae=str(sae_dir),
        layers=list(DEMO_LAYERS),
        top_n=16,
        batch_size=64,
        device="cpu",
        workers=2,
        demo=True,
        progress=progress,
        fresh=fresh,
        evaluate=True,
    )
    run(config)
    log.warning("demo index built in %.0f s: %s", time.perf_counter() - started, index)
    return index
