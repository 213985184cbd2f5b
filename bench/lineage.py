"""Lineage across layers at full scale: `clipscope-explorer lineage` over 8 layers x 65,536 features and a
1,000,000-image sample (k = 32 CLS latents per image and layer, 32 top images per feature), on this
machine's cores. Target: <= 900 s for all 8 layers (28 layer pairs, both sources, both ways).

Why 900 s: the step runs once per index, after a precompute that takes hours on a GPU for a million images;
a quarter of an hour on two cores keeps it a small part of building an index. The work is fixed by the
sample: each of the 28 layer pairs counts 32 x 32 co-firings per image, about a billion, in scipy's sparse
product (one core per process: `--processes 2`, the default, runs two pairs at once).

The index is bench/search.py's (1,000,000 samples, 8 x 65,536 features), given every layer's CLS codes and
every feature's top images through the project's own `IndexUpdater` (cached in bench/.cache/lineage). Codes
as bench/sort_eval.py's (feature = block * K + slot, blocks of Zipf-like popularity), related across layers:
each of an image's blocks at a layer is, with probability PLANTED, its block at the layer before under a
fixed permutation, so every feature has one planted partner at the next layer. Top images: the feature's
TOP_N highest CLS values. The measured run is `lineage(...)` itself, in a process of its own, writing into
a copy of the index: time and peak RSS, its phases from the log, and (a check of what it found) the share
of live features whose best `cls` link at the next layer is their planted partner.

BENCH_LINEAGE_IMAGES, BENCH_LINEAGE_FEATURES and BENCH_LINEAGE_LAYERS shrink it (passed on to bench/search.py's
index); BENCH_LINEAGE_PROCESSES sets `--processes` (default 2). Run from the repo root: python bench/lineage.py
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("BENCH_SEARCH_IMAGES", os.environ.get("BENCH_LINEAGE_IMAGES", "1000000"))
os.environ.setdefault("BENCH_SEARCH_FEATURES", os.environ.get("BENCH_LINEAGE_FEATURES", "65536"))
os.environ.setdefault("BENCH_SEARCH_LAYERS", os.environ.get("BENCH_LINEAGE_LAYERS", "8"))

import numpy as np  # noqa: E402
import search  # noqa: E402  (bench/search.py: its synthetic index)
from _procs import child_figures, copy_seconds
from _timing import REPO_ROOT, result_line  # noqa: E402

K, TOP_N, PLANTED, TARGET_S = 32, 32, 0.7, 900.0
PROCESSES = int(os.environ.get("BENCH_LINEAGE_PROCESSES", 2))  # the command's default
CACHE = REPO_ROOT / "bench" / ".cache" / "lineage"
INDEX = CACHE / f"codes-{search.N_IMAGES}-{search.N_LAYERS}x{search.N_FEATURES}.duckdb"
BLOCKS = search.N_FEATURES // K


def permutation(layer: int) -> np.ndarray:
    """Block b at the layer before `layer` is planted as block permutation(layer)[b] at `layer`."""
    return np.random.default_rng([99, layer]).permutation(BLOCKS)


def synthetic_blocks() -> dict[int, np.ndarray]:
    """Every layer's blocks [n_images, K] (int16 when they fit): related across layers as the docstring says."""
    rng = np.random.default_rng(7)
    popularity = 1.0 / np.arange(1, BLOCKS + 1) ** 0.8
    p = popularity / popularity.sum()
    dtype = np.int16 if BLOCKS < 2**15 else np.int32
    blocks, previous = {}, None
    for layer in search.LAYERS:
        fresh = rng.choice(BLOCKS, size=(search.N_IMAGES, K), p=p).astype(dtype)
        if previous is not None:
            keep = rng.random((search.N_IMAGES, K)) < PLANTED
            fresh = np.where(keep, permutation(layer)[previous].astype(dtype), fresh)
        blocks[layer] = previous = fresh
    return blocks


def layer_rows(layer: int, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """A layer's codes (indices, values [n_images, K]) and its top-image `examples` rows."""
    from clipscope_explorer.precompute.index.rows import examples_columns

    rng = np.random.default_rng([8, layer])
    indices = (blocks.astype(np.int32) * K + np.arange(K, dtype=np.int32)).astype(np.int32)
    values = -np.sort(-rng.gamma(2.0, 1.0, indices.shape), axis=1).astype(np.float32)
    flat_features, flat_values = indices.reshape(-1), values.reshape(-1)
    order = np.lexsort((-flat_values, flat_features))
    features = flat_features[order]
    starts = np.searchsorted(features, np.arange(search.N_FEATURES))
    rank = np.arange(len(order)) - starts[features]
    top = order[rank < TOP_N]
    n = len(top)
    examples = {
        "feature": flat_features[top],
        "kind": np.full(n, "top", dtype=object),
        "band": np.zeros(n, np.int8),
        "rank": (rank[rank < TOP_N] + 1).astype(np.int32),
        "image_id": (top // K).astype(np.int32),
        "activation": flat_values[top],
        "cls": flat_values[top],
        "scale": flat_values[top] / 255,
        "heat": np.full((n, 1), 255, np.uint8),  # bench/search.py's index has one patch
    }
    return indices, values, examples_columns(layer, examples)


def build() -> None:
    from clipscope_explorer.precompute.index.rows import images_columns, sample_codes_columns
    from clipscope_explorer.precompute.index.store import IndexUpdater

    if not search.INDEX.exists():
        print(f"building {search.INDEX.name} (bench/search.py's index) ...")
        search.CACHE.mkdir(parents=True, exist_ok=True)
        search.build_index(search.INDEX)
    print(f"adding CLS codes and top images of {search.N_LAYERS} layers -> {INDEX.name} ...")
    CACHE.mkdir(parents=True, exist_ok=True)
    blocks = synthetic_blocks()
    shown = np.zeros(search.N_IMAGES, bool)
    with IndexUpdater(search.INDEX, INDEX, ("sample_codes", "examples", "images")) as writer:
        for layer in search.LAYERS:
            indices, values, examples = layer_rows(layer, blocks.pop(layer))
            for start in range(0, search.N_IMAGES, search.CHUNK):
                stop = min(start + search.CHUNK, search.N_IMAGES)
                writer.add_rows(
                    "sample_codes",
                    sample_codes_columns(layer, range(start, stop), indices[start:stop], values[start:stop]),
                )
            writer.add_rows("examples", examples)
            shown[examples["image_id"]] = True
        ids = np.flatnonzero(shown)
        for at in range(0, len(ids), search.CHUNK):
            chunk = ids[at : at + search.CHUNK].tolist()
            rows = [(i, "synthetic", f"{i:09d}", None, None, 224, 224, b"\xff\xd8") for i in chunk]
            writer.add_rows("images", images_columns(0, rows, image_ids=chunk))
        writer.finish()


def measure(out: str) -> None:
    """In a process of its own: one lineage run, its phases from the log, its peak memory."""
    from clipscope_explorer.precompute.evaluate.lineage_run import LineageOptions, lineage

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    start = time.perf_counter()
    lineage(LineageOptions(index=INDEX, out=Path(out), processes=PROCESSES, progress=False))
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest worker's
    print("RESULT-JSON " + json.dumps({"seconds": seconds, "peak_mb": peak_mb, "worker_mb": worker_mb}))


def planted_recovered(con, first: int, second: int) -> tuple[int, float]:
    """Live features of `first` with a `cls` link at `second`, and the share whose best one is the planted partner."""
    rows = con.execute(
        "SELECT feature, arg_max(other_feature, score) FROM lineage WHERE layer = ? AND other_layer = ? "
        "AND source = 'cls' GROUP BY feature",
        [first, second],
    ).fetchnumpy()
    features = rows["feature"].astype(np.int64)
    planted = permutation(second)[features // K] * K + features % K
    best = rows[list(rows)[1]].astype(np.int64)
    return len(features), float(np.mean(best == planted)) if len(features) else 0.0


def main() -> None:
    import duckdb

    if not INDEX.exists():
        started = time.perf_counter()
        build()
        print(f"  built in {time.perf_counter() - started:.0f} s")
    out = CACHE / "lineage.duckdb"
    copy_s = copy_seconds(INDEX, CACHE / "copy-probe.duckdb")
    figures, stderr = child_figures([sys.executable, __file__, "--measure", str(out)], "lineage")
    with duckdb.connect(str(out), read_only=True) as con:
        by_source = dict(con.execute("SELECT source, count(*) FROM lineage GROUP BY source ORDER BY source").fetchall())
        linked, share = planted_recovered(con, search.LAYERS[0], search.LAYERS[1])
    out.unlink()
    pairs = search.N_LAYERS * (search.N_LAYERS - 1) // 2
    print(
        f"{search.N_IMAGES:,} samples, {search.N_LAYERS} layers x {search.N_FEATURES:,} features ({pairs} layer pairs)"
    )
    print(f"  links written: {', '.join(f'{source} {count:,}' for source, count in by_source.items())}")
    print(
        f"  layer {search.LAYERS[0]} -> {search.LAYERS[1]}: {linked:,} features with a cls link, "
        f"{share:.1%} of them matched to their planted partner"
    )
    print(
        "  phases (from the log):\n    "
        + "\n    ".join(line for line in stderr.splitlines() if line.startswith(("layer", "results")))
    )
    print(
        f"  copying the index once (the atomic rewrite's copy, counted in the time): {copy_s:.1f} s; "
        f"peak RSS {figures['peak_mb']:,.0f} MB, of the largest worker {figures['worker_mb']:,.0f} MB "
        f"({PROCESSES} workers; their copy of the occurrences is shared with the first)"
    )
    print(result_line("lineage_seconds", figures["seconds"], "<=", TARGET_S, 1)[0])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        measure(sys.argv[2])
    else:
        main()
