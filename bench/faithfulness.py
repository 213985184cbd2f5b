"""The faithfulness check's cost: its passes are ordinary batched encodes, so a re-encoded image should cost
about what the precompute job's encoding of an image costs. Measured on this machine's CPU with the real
shapes (ViT-L-14 with random weights in the hub layout and one full-size SAE, 1024 x 65,536, k 32, at layer
20; bench/precompute.py's inputs), then extrapolated to a full layer and to one H100.

1. The baseline, in the same run: the precompute job over bench/precompute.py's 48 images (the index the
   check then reads), its encode phase per image.
2. `evaluate --faithfulness` on that index for BENCH_FAITH_FEATURES features (default 4) with the defaults
   (top 4, draws 8: 11 encodes an example), seconds per encode.
Target: faithfulness seconds per encode <= 1.5 x the job's seconds per image (both include the SAE, the
job also its accumulators; the check adds making the occluded variants).
Printed beside: a full 65,536-feature layer (44 encodes a feature) at this CPU's rate, and on one H100 by
the job's measured H100 rate when bench/RESULTS.md has one, else by FLOPs (ViT-L/14 to block 20 of 24 is
about 140 GFLOP an image; an H100 sustaining 400 TFLOP/s of bf16 does about 2,900 images/s).

Run from the repo root: python bench/faithfulness.py
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import duckdb
from _timing import print_results, result_line


def _bench_precompute():
    """bench/precompute.py (its inputs and sizes), by path: `precompute` is also the project's package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_precompute", Path(__file__).with_name("precompute.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_precompute = _bench_precompute()
BATCH, CACHE, LAYER, prepare_inputs = (
    bench_precompute.BATCH,
    bench_precompute.CACHE,
    bench_precompute.LAYER,
    bench_precompute.prepare_inputs,
)

N_FEATURES = int(os.environ.get("BENCH_FAITH_FEATURES", 4))
TOP, DRAWS, TARGET = 4, 8, 1.5
H100_IMAGES_PER_S = 2900  # by FLOPs: see the docstring


def main() -> None:
    from clipscope_explorer.precompute.evaluate.faithfulness import FaithfulnessOptions, run_faithfulness
    from clipscope_explorer.precompute.job import PrecomputeConfig, run

    model_dir, sae_dir, images = prepare_inputs()
    index = CACHE / "faithfulness.duckdb"
    index.unlink(missing_ok=True)
    config = PrecomputeConfig(
        images=[str(images)],
        out=index,
        model=f"local-dir:{model_dir}",
        sae=str(sae_dir),
        layers=[LAYER],
        batch_size=BATCH,
        device="cpu",
        workers=1,
        progress=False,
        top_n=TOP,
    )
    run(config)
    with duckdb.connect(str(index), read_only=True) as con:
        encode_s = json.loads(con.execute("SELECT value FROM meta WHERE key = 'timings'").fetchall()[0][0])["encode"]
        n_images = con.execute("SELECT n_images FROM layers").fetchall()[0][0]
    per_image = encode_s / n_images
    out = CACHE / "faithfulness-out.duckdb"
    options = FaithfulnessOptions(
        index=index, out=out, top=TOP, draws=DRAWS, sample=N_FEATURES, device="cpu", batch_size=BATCH, progress=False
    )
    start = time.perf_counter()
    run_faithfulness(options)
    seconds = time.perf_counter() - start
    with duckdb.connect(str(out), read_only=True) as con:
        examples = con.execute("SELECT count(*) FROM faithfulness_examples").fetchall()[0][0]
    encodes = examples * (3 + DRAWS)
    per_encode = seconds / encodes
    layer_encodes = 65_536 * TOP * (3 + DRAWS)
    print(f"precompute: {n_images} images encoded in {encode_s:.1f} s: {per_image * 1e3:.0f} ms an image")
    print(
        f"faithfulness: {examples} examples x {3 + DRAWS} encodes in {seconds:.1f} s (model load included): "
        f"{per_encode * 1e3:.0f} ms an encode"
    )
    print(
        f"a full 65,536-feature layer ({layer_encodes:,} encodes): {layer_encodes * per_encode / 3600:,.0f} h on "
        f"this CPU; about {layer_encodes / H100_IMAGES_PER_S / 60:.0f} min on one H100 (by FLOPs, not measured)"
    )
    for leftover in (index, out):
        leftover.unlink(missing_ok=True)
    print_results("faithfulness", [result_line("faithfulness_encode_ratio", per_encode / per_image, "<=", TARGET)])


if __name__ == "__main__":
    main()
