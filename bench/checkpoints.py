"""The cost of matching features across training checkpoints (`clipscope-explorer checkpoints`), for one layer.

One 65,536-feature layer with 12 earlier checkpoints: random decoders of the released shape (65,536 x 1,024,
float32), each earlier one made just before it is matched (as the command loads one checkpoint at a time), and
every feature of the reference matched against it in blocks (`checkpoint_measures.best_matches`). Reports the
matching's wall time (decoders' unit scaling included, their making excluded) and the process's peak resident
set size. Target: on a GPU, 12 checkpoints in <= 60 s; on a CPU (2 cores: about 8.8 TFLOP a pair), <= 3,600 s.
Eight layers cost eight times as much; the reconstruction metrics of each checkpoint (a forward pass of its SAE
over the sample) are not included.

For development, smaller sizes: BENCH_CHECKPOINTS_FEATURES (default 65536), BENCH_CHECKPOINTS_WIDTH (1024),
BENCH_CHECKPOINTS_COUNT (12 earlier checkpoints), BENCH_CHECKPOINTS_DEVICE (auto: cuda when there is one). The
target is judged at full scale.

Run from the repo root: python bench/checkpoints.py
"""

from __future__ import annotations

import os
import resource
import time

import torch
from _timing import result_line

from clipscope_explorer.precompute.evaluate.checkpoint_measures import best_matches, unit_rows

FEATURES = int(os.environ.get("BENCH_CHECKPOINTS_FEATURES", 65_536))
WIDTH = int(os.environ.get("BENCH_CHECKPOINTS_WIDTH", 1_024))
COUNT = int(os.environ.get("BENCH_CHECKPOINTS_COUNT", 12))
DEVICE = os.environ.get("BENCH_CHECKPOINTS_DEVICE", "auto")


def decoder(seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(FEATURES, WIDTH, generator=generator, device=device)


def main() -> None:
    device = torch.device("cuda" if DEVICE == "auto" and torch.cuda.is_available() else DEVICE.replace("auto", "cpu"))
    target = 60.0 if device.type == "cuda" else 3_600.0
    print(
        f"{FEATURES:,} features x {WIDTH:,} dims, {COUNT} earlier checkpoints, on {device}, "
        f"{torch.get_num_threads()} threads"
    )
    reference = unit_rows(decoder(0, device))
    spent = 0.0
    for checkpoint in range(1, COUNT + 1):
        other = decoder(checkpoint, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        match, cosine = best_matches(reference, unit_rows(other))
        if device.type == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - start
        spent += took
        print(f"  checkpoint {checkpoint}: {took:.2f} s (mean best cosine {cosine.mean():.3f})")
        del other, match, cosine
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"  peak RSS {peak_mb:,.0f} MB"
        + (f", GPU peak {torch.cuda.max_memory_allocated() / 2**20:,.0f} MB" if device.type == "cuda" else "")
    )
    full = (FEATURES, WIDTH, COUNT) == (65_536, 1_024, 12)
    if not full:
        print(f"  (not the full scale: the target {target:.0f} s is for 65,536 x 1,024 x 12)")
    print(result_line("checkpoint_matching_s", spent, "<=", target, digits=1)[0])


if __name__ == "__main__":
    main()
