"""Crash safety: kill -9 the precompute at random points; the resumed index must equal an uninterrupted one.

Data: 600 procedural images, the demo's tiny ViT and two 512-feature SAEs,
checkpoints every 64 images. The baseline is one uninterrupted run of the
same command. Then, three times: start the command afresh, SIGKILL it at a
random moment of its run (uniform over 5-95 % of the baseline's duration),
rerun the same command to completion, and compare every table of the index
(top lists, heatmaps, statistics, images) with the baseline's.
Target: 3/3 identical.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

from _timing import REPO_ROOT

from tests.fixtures import index_contents

CACHE = REPO_ROOT / "bench" / ".cache" / "resume"
N_IMAGES, TRIALS = 600, 3


def prepare() -> None:
    import torch

    from clipscope_explorer.precompute.demo.scenes import save_tiny_clip, tiny_clip_config, write_scenes
    from clipscope_explorer.precompute.demo.train_clip import DEMO_MODEL, DEMO_POSITION_SCALE
    from clipscope_explorer.precompute.model.checkpoints import save_checkpoint

    write_scenes(CACHE / "images", N_IMAGES)
    if not (CACHE / "model" / "open_clip_pytorch_model.bin").is_file():
        save_tiny_clip(CACHE / "model", tiny_clip_config(**DEMO_MODEL), position_scale=DEMO_POSITION_SCALE)
    for layer in (1, 3):
        path = CACHE / "sae" / f"{layer}_resid" / "1000.pt"
        if not path.is_file():
            width = DEMO_MODEL["width"]
            enc = torch.randn(width, 512, generator=torch.Generator().manual_seed(layer)) / width**0.5
            save_checkpoint(path, torch.zeros(width), enc, enc.T.contiguous(), 8, 1000)


def command(out) -> list[str]:
    return [
        sys.executable,
        "-m",
        "precompute",
        "--images",
        str(CACHE / "images"),
        "--out",
        str(out),
        "--model",
        f"local-dir:{CACHE / 'model'}",
        "--sae",
        str(CACHE / "sae"),
        "--layers",
        "1,3",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--workers",
        "1",
        "--save-state-every",
        "64",
        "--no-progress",
    ]


def clean(out) -> None:
    out.unlink(missing_ok=True)
    shutil.rmtree(out.with_name(out.name + ".work"), ignore_errors=True)


def main() -> None:
    prepare()
    reference_out = CACHE / "reference.duckdb"
    clean(reference_out)
    start = time.perf_counter()
    subprocess.run(command(reference_out), cwd=REPO_ROOT, check=True, capture_output=True)
    duration = time.perf_counter() - start
    reference = index_contents(reference_out)
    print(f"uninterrupted run: {duration:.1f} s")
    rng = random.Random(int(time.time()))
    identical = 0
    for trial in range(TRIALS):
        out = CACHE / f"trial{trial}.duckdb"
        clean(out)
        delay = rng.uniform(0.05, 0.95) * duration
        process = subprocess.Popen(
            command(out), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        time.sleep(delay)
        finished = process.poll() is not None
        if not finished:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        had_checkpoint = (out.with_name(out.name + ".work") / "state.pt").exists()
        resumed = subprocess.run(command(out), cwd=REPO_ROOT, capture_output=True, text=True)
        same = resumed.returncode == 0 and index_contents(out) == reference
        identical += same
        print(
            f"trial {trial + 1}: killed after {delay:.1f} s ({'finished first' if finished else 'SIGKILL'}, "
            f"{'resumed from a checkpoint' if had_checkpoint else 'no checkpoint yet'}), "
            f"resumed: {'identical' if same else 'DIFFERENT'}"
        )
        clean(out)
    print(
        f"RESULT resume_identical {identical}/{TRIALS} target =={TRIALS}/{TRIALS} "
        f"{'PASS' if identical == TRIALS else 'MISS'}"
    )


if __name__ == "__main__":
    main()
