"""Inputs of bench/gpu.py, made on the fly and kept in a work folder between runs.

- a CLIP in the hub layout with random weights (ViT-L-14 as bench/precompute.py makes it, or a tiny one
  with 23 blocks so the released layers exist), loaded back through open_clip's `local-dir:` path;
- one random SAE in the released file format, linked as every released layer (a real suite's shapes and
  layout; the job reads the same file eight times);
- webdataset shards as img2dataset writes them (KEY.jpg at quality 95, KEY.txt, KEY.json, and a
  NNNNN_stats.json beside), of the demo's procedural 224 px scenes.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from clipscope_explorer.precompute.model.release import RELEASED_LAYERS

LAYER = 20  # the layer of the single-layer runs, and the one real SAE file


def make_model(folder: Path, architecture: str) -> Path:
    """`architecture` "ViT-L-14", or "tiny" (23 blocks of width 32)."""
    import open_clip

    from clipscope_explorer.precompute.demo.scenes import save_tiny_clip, tiny_clip_config

    if not (folder / "open_clip_pytorch_model.bin").is_file():
        config = (
            open_clip.get_model_config(architecture)
            if architecture != "tiny"
            else tiny_clip_config(width=32, layers=23, heads=2)
        )
        save_tiny_clip(folder, config)
    return folder


def make_saes(folder: Path, width: int, n_features: int, k: int) -> Path:
    from clipscope_explorer.precompute.model.checkpoints import save_checkpoint

    real = folder / f"{LAYER}_resid" / "1000.pt"
    if not real.is_file():
        enc = torch.randn(width, n_features, generator=torch.Generator().manual_seed(0)) / width**0.5
        save_checkpoint(real, torch.zeros(width), enc, enc.T.contiguous(), k, 1000)
    for layer in RELEASED_LAYERS:
        link = folder / f"{layer}_resid" / "1000.pt"
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(real)
    return folder


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, first: int, count: int) -> Path:
    """Scenes first .. first + count - 1 as one shard (written once; a partial file never takes its name)."""
    from clipscope_explorer.precompute.demo.scenes import render_scene

    if not path.is_file():
        partial = path.with_suffix(".partial")
        with tarfile.open(partial, "w") as tar:
            for n in range(first, first + count):
                image, caption, _ = render_scene(n)
                data = io.BytesIO()
                image.save(data, "JPEG", quality=95)
                key = f"{n:09d}"
                _member(tar, f"{key}.jpg", data.getvalue())
                _member(tar, f"{key}.txt", caption.encode())
                meta = {
                    "key": key,
                    "caption": caption,
                    "url": None,
                    "width": image.width,
                    "height": image.height,
                    "status": "success",
                }
                _member(tar, f"{key}.json", json.dumps(meta).encode())
        path.with_name(f"{path.stem}_stats.json").write_text(json.dumps({"successes": count}))
        partial.replace(path)
    return path


def make_inputs(work: Path, architecture: str, n_features: int, k: int, shards: int, shard_size: int) -> dict:
    """{"model": a `local-dir:` spec, "sae": the folder, "shards": [paths]}, under `work`."""
    folder = work / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{n:05d}.tar" for n in range(shards)]
    with ProcessPoolExecutor(min(shards, os.cpu_count() or 1)) as pool:
        list(pool.map(write_shard, paths, [n * shard_size for n in range(shards)], [shard_size] * shards))
    model = make_model(work / "model", architecture)
    width = json.loads((model / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]["width"]
    return {
        "model": f"local-dir:{model}",
        "sae": str(make_saes(work / "sae", width, n_features, k)),
        "shards": [str(p) for p in paths],
        "shard_size": shard_size,
    }


def shard_list(inputs: dict, images: float) -> list[str]:
    """The distinct shards listed in turn until they hold `images` samples (each listing is a shard of its own
    to the job: its own ordinals, so the same image may show up as several samples)."""
    needed = max(1, math.ceil(images / inputs["shard_size"]))
    return [inputs["shards"][n % len(inputs["shards"])] for n in range(needed)]
