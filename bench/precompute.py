"""Whole precompute against model + SAE forward alone, ViT-L-14 (random weights), full-size SAE.

48 images, layer 20, one SAE of 65,536 features, CPU fp32. The baseline runs
the same batches (already preprocessed) through capture, encode and decode;
the precompute run adds decoding, accumulation, example lists, thumbnails,
labels and writing the index. Model and SAE loading are excluded from both
(printed on their own line), as is the one-time decoder-neighbour search,
which is cached per checkpoint and timed on its own line.

Target: precompute / baseline <= 1.15, the job run without embeddings (--no-embeddings), like for like
with the baseline, which stops after block 20.

Embeddings overhead: the same job with the final CLIP embedding of every image (the default) runs the
tower to its end (blocks 21 to 23, ln_post, the projection) and writes prototypes and zero-shot labels.
Its per-image cost is the encode phase (meta timings `encode`), measured with and without embeddings on the
same images, alternately, ROUNDS times each; the one-time finalize cost (the text tower's loading, the
vocabulary's embedding, prototypes and labels: timings `zero_shot`) is printed on its own line.

Target: encode with embeddings / encode without <= 1.20.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time

import duckdb
import torch
from _timing import REPO_ROOT, print_results, result_line

CACHE = REPO_ROOT / "bench" / ".cache" / "precompute"
N_IMAGES, BATCH, LAYER, TARGET = 48, 16, 20, 1.15
EMBEDDINGS_TARGET, ROUNDS = 1.20, 2


def prepare_inputs():
    """A ViT-L-14 CLIP with random weights in the hub layout, a full-size SAE, 48 images (cached)."""
    import open_clip

    from clipscope_explorer.precompute.demo.scenes import save_tiny_clip, write_scenes
    from clipscope_explorer.precompute.model.checkpoints import save_checkpoint

    model_dir = CACHE / "vit-l-14-random"
    if not (model_dir / "open_clip_pytorch_model.bin").is_file():
        torch.manual_seed(0)
        config = open_clip.get_model_config("ViT-L-14")
        save_tiny_clip(model_dir, config, state_dict=open_clip.model.CLIP(**config).state_dict())
    sae_dir = CACHE / "sae"
    if not (sae_dir / f"{LAYER}_resid" / "1000.pt").is_file():
        generator = torch.Generator().manual_seed(0)
        enc = torch.randn(1024, 65536, generator=generator) / 32
        save_checkpoint(sae_dir / f"{LAYER}_resid" / "1000.pt", torch.zeros(1024), enc, enc.T.contiguous(), 32, 1000)
    images = write_scenes(CACHE / "images", N_IMAGES)
    return model_dir, sae_dir, images


def baseline_seconds(model_dir, sae_dir, images) -> float:
    from clipscope_explorer.precompute.model.checkpoints import load_sae
    from clipscope_explorer.precompute.model.vision import load_tower
    from clipscope_explorer.precompute.sources import ShardBatches, resolve_sources

    tower = load_tower(f"local-dir:{model_dir}", device="cpu")
    sae = load_sae(str(sae_dir), LAYER)
    dataset = ShardBatches(resolve_sources([str(images)]), tower.preprocess, BATCH, 224)
    batches = [b.pixels for b in dataset if b.pixels is not None]
    start = time.perf_counter()
    for pixels in batches:
        acts = tower.capture(pixels, [LAYER])[LAYER]
        sae.decode(sae.encode(acts))
    return time.perf_counter() - start


def precompute_seconds(model_dir, sae_dir, images, embeddings: bool = False) -> dict:
    from clipscope_explorer.precompute.job import PrecomputeConfig, run

    out = CACHE / "bench.duckdb"
    for leftover in (out, out.with_name(out.name + ".work")):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    config = PrecomputeConfig(
        images=[str(images)],
        out=out,
        model=f"local-dir:{model_dir}",
        sae=str(sae_dir),
        layers=[LAYER],
        batch_size=BATCH,
        device="cpu",
        workers=1,
        progress=False,
        embeddings=embeddings,
    )
    start = time.perf_counter()
    run(config)
    wall = time.perf_counter() - start
    with duckdb.connect(str(out), read_only=True) as con:
        timings = json.loads(con.execute("SELECT value FROM meta WHERE key = 'timings'").fetchone()[0])
    return {"wall": wall, **timings}


def load_seconds(model_dir, sae_dir) -> float:
    from clipscope_explorer.precompute.model.checkpoints import load_sae
    from clipscope_explorer.precompute.model.vision import load_tower

    start = time.perf_counter()
    load_tower(f"local-dir:{model_dir}", device="cpu")
    load_sae(str(sae_dir), LAYER)
    return time.perf_counter() - start


def embeddings_ratio(model_dir, sae_dir, images, without: dict) -> float:
    """Median over rounds of encode seconds with embeddings / without (the first run without is `without`)."""
    ratios = []
    for round_ in range(ROUNDS):
        plain = without if round_ == 0 else precompute_seconds(model_dir, sae_dir, images)
        embedded = precompute_seconds(model_dir, sae_dir, images, embeddings=True)
        ratios.append(embedded["encode"] / plain["encode"])
        print(
            f"  round {round_ + 1}: encode {plain['encode']:.2f} s without embeddings, {embedded['encode']:.2f} s "
            f"with ({ratios[-1]:.3f}); once per index with embeddings: prototypes and zero-shot labels "
            f"{embedded['zero_shot']:.2f} s, wall {embedded['wall']:.2f} s against {plain['wall']:.2f} s"
        )
    return statistics.median(ratios)


def main() -> None:
    torch.set_grad_enabled(False)
    model_dir, sae_dir, images = prepare_inputs()
    print("warm-up run (fills the neighbour cache, page cache and allocator)")
    first = precompute_seconds(model_dir, sae_dir, images)
    print(f"  one-time decoder neighbours: {first['neighbours']:.1f} s (cached per checkpoint afterwards)")
    loading = load_seconds(model_dir, sae_dir)
    print(f"model + SAE loading: {loading:.1f} s (excluded from both sides)")
    base = baseline_seconds(model_dir, sae_dir, images)
    run = precompute_seconds(model_dir, sae_dir, images)
    work = run["wall"] - loading - run["neighbours"]
    print(f"baseline capture+encode+decode: {base:.2f} s ({N_IMAGES / base:.2f} img/s)")
    print(
        f"precompute without embeddings: wall {run['wall']:.2f} s, encode {run['encode']:.2f} s, neighbours "
        f"{run['neighbours']:.2f} s (cached), labels {run['labels']:.2f} s, write {run['write']:.2f} s"
    )
    print(f"precompute without loading and neighbours: {work:.2f} s")
    print(f"embeddings: encode phase with and without, {ROUNDS} rounds")
    ratio = embeddings_ratio(model_dir, sae_dir, images, run)
    print_results(
        "precompute",
        [
            result_line("precompute_overhead_ratio", work / base, "<=", TARGET),
            result_line("precompute_embeddings_ratio", ratio, "<=", EMBEDDINGS_TARGET),
        ],
    )


if __name__ == "__main__":
    main()
