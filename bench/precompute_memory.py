"""Memory of the precompute: its state costs what the accumulators predict, and nothing grows with the sample.

Runs the real job (tiny demo-sized ViT, a 512-feature SAE, 2 layers, top 32 and 24 band samples per
feature) in a fresh process on 2,000 and on 4,000 procedural images, and reads the resident set size of
the main process (data-loading workers excluded; freed heap memory handed back first, `malloc_trim`)
before and after the accumulators are made, and after the last batch. The accumulators allocate
their whole state up front (`predicted_state_bytes`), but the example lists fill for a while, and with
them the examples and images the final write holds: below about 2,000 images here, RSS growth is that
expected state, not a leak (peak RSS at 4,000 against 1,000 images, the earlier target, was 1.09-1.12
for that reason). So:
1. RSS the accumulators add when made against `predicted_state_bytes` for the run: ratio <= 1.10;
2. a leak: RSS after the last batch, per image between the two sizes (lists full at both; the fill is
   printed): <= 2 KiB per image.
Peak RSS (the final write included) is printed beside, per image as well.

Run from the repo root: python bench/precompute_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys

from _timing import REPO_ROOT, print_results, result_line

CACHE = REPO_ROOT / "bench" / ".cache" / "memory"
SIZES, LAYERS, N_FEATURES, TOP_N, BAND_SAMPLES = (2000, 4000), (1, 3), 512, 32, 24
STATE_TARGET, GROWTH_TARGET_KIB = 1.10, 2.0
FULL = 0.85  # share of live features whose lists are full, from which growth per image measures a leak

CHILD = """
import ctypes, gc, json, resource, sys
from pathlib import Path
from clipscope_explorer.precompute import job
from clipscope_explorer.precompute.accumulate import predicted_state_bytes

def rss():  # resident bytes of live objects: freed heap memory goes back to the system first
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()

cache, n, layers = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
top_n, band_samples = int(sys.argv[4]), int(sys.argv[5])
seen = {}
make_state, encode_all = job.new_state, job.encode_all

def new_state(components, config):
    seen["before_state"] = rss()
    state = make_state(components, config)
    seen["after_state"] = rss()
    seen["predicted"] = sum(predicted_state_bytes(acc.n_features, acc.n_tokens, top_n, band_samples)
                            for acc in state.accumulators.values())
    return state

def encode(components, config, state, *args, **kwargs):
    encode_all(components, config, state, *args, **kwargs)
    seen["after_encode"] = rss()
    full = []
    for acc in state.accumulators.values():
        alive = acc.counts["fire_images"] > 0
        for examples in (acc.top, acc.samples):
            full.append(float((examples.score[alive] > float("-inf")).all(1).float().mean()))
    seen["lists_full"] = min(full)

job.new_state, job.encode_all = new_state, encode
out = cache / f"mem-{n}.duckdb"
job.run(job.PrecomputeConfig(images=[str(cache / "images")], out=out, model=f"local-dir:{cache / 'model'}",
                             sae=str(cache / "sae"), layers=layers, max_images=n, batch_size=64, device="cpu",
                             workers=1, progress=False, fresh=True, top_n=top_n, band_samples=band_samples))
out.unlink()
seen["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(seen))
"""


def prepare() -> None:
    import torch

    from clipscope_explorer.precompute.demo.scenes import save_tiny_clip, tiny_clip_config, write_scenes
    from clipscope_explorer.precompute.demo.train_clip import DEMO_MODEL, DEMO_POSITION_SCALE
    from clipscope_explorer.precompute.model.checkpoints import save_checkpoint

    write_scenes(CACHE / "images", max(SIZES))
    if not (CACHE / "model" / "open_clip_pytorch_model.bin").is_file():
        save_tiny_clip(CACHE / "model", tiny_clip_config(**DEMO_MODEL), position_scale=DEMO_POSITION_SCALE)
    width = DEMO_MODEL["width"]
    for layer in LAYERS:
        path = CACHE / "sae" / f"{layer}_resid" / "1000.pt"
        if not path.is_file():
            enc = torch.randn(width, N_FEATURES, generator=torch.Generator().manual_seed(layer)) / width**0.5
            save_checkpoint(path, torch.zeros(width), enc, enc.T.contiguous(), 8, 1000)


def measure(n_images: int) -> dict:
    """Bytes of RSS at the points the child records, for one run on `n_images` images."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(CACHE), str(n_images), json.dumps(LAYERS), str(TOP_N), str(BAND_SAMPLES)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"the run on {n_images} images failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    from clipscope_explorer.precompute.accumulate import predicted_state_bytes

    prepare()
    runs = {n: measure(n) for n in SIZES}
    mib = 2**20
    for n, run in runs.items():
        print(
            f"{n} images: RSS {run['before_state'] / mib:.0f} MiB before the accumulators, "
            f"+{(run['after_state'] - run['before_state']) / mib:.1f} MiB when made (predicted "
            f"{run['predicted'] / mib:.1f} MiB), {run['after_encode'] / mib:.0f} MiB after the last batch, "
            f"peak {run['peak'] / mib:.0f} MiB; example lists full for {run['lists_full']:.0%} of the live "
            f"features (the least filled kind and layer)"
        )
    small, large = (runs[n] for n in SIZES)
    if small["lists_full"] < FULL:
        print(f"  WARNING: at {SIZES[0]:,} images the example lists are still filling: growth is not a leak measure")
    images = SIZES[1] - SIZES[0]
    ratio = max((run["after_state"] - run["before_state"]) / run["predicted"] for run in runs.values())
    growth = (large["after_encode"] - small["after_encode"]) / images / 1024
    peak_growth = (large["peak"] - small["peak"]) / images / 1024
    released = 8 * predicted_state_bytes(65_536, 257, TOP_N, BAND_SAMPLES) / 2**30
    print(
        f"  info: peak RSS grows {peak_growth:.2f} KiB per image; {SIZES[1]:,} / {SIZES[0]:,} images: "
        f"{large['peak'] / small['peak']:.3f}"
    )
    print(f"  info: the released suite (8 layers x 65,536 features, 257 tokens) predicts {released:.2f} GiB of state")
    print_results(
        "precompute_memory",
        [
            result_line("precompute_memory_state_ratio", ratio, "<=", STATE_TARGET),
            result_line("precompute_memory_growth_kib_per_image", growth, "<=", GROWTH_TARGET_KIB, 2),
        ],
    )


if __name__ == "__main__":
    main()
