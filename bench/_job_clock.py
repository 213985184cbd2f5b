"""The precompute job, timed from outside: `timed_run(config, ...)` runs `precompute.job.run` as it is and
measures its steady state over a window after warm-up.

`BatchClock` wraps the job's `encode_batch` (a call returns once its batch is in the accumulators, which
waits for the device) and `checkpoint` while the run lasts; nothing else changes. The window opens at the
first batch done `warmup_s` after the first batch and closes at the first batch done `window_s` later;
a run with `stop` ends there (no index is written), the others run to their index.
"""

from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path

import torch


class EnoughMeasured(Exception):
    """Raised from inside the job's loop once a stopping run's window is complete."""


class BatchClock:
    def __init__(self, warmup_s: float, window_s: float, stop: bool):
        from clipscope_explorer.precompute import job

        self.job, self.warmup_s, self.window_s, self.stop = job, warmup_s, window_s, stop
        self.batches: list[tuple[float, float, int]] = []  # (start, end, images) of each encode_batch call
        self.checkpoints: list[tuple[float, float]] = []
        self.opened: float | None = None
        self.state = None  # the run's RunState, as the last batch left it

    def __enter__(self) -> BatchClock:
        missing = [name for name in ("encode_batch", "checkpoint") if not hasattr(self.job, name)]
        if missing:
            raise SystemExit(
                f"the job has no {', '.join(missing)} any more: bench/_job_clock.py times the job "
                f"through them, follow its new names"
            )
        self.saved = self.job.encode_batch, self.job.checkpoint
        self.job.encode_batch, self.job.checkpoint = self._encode_batch, self._checkpoint
        return self

    def __exit__(self, kind, *_) -> bool:
        self.job.encode_batch, self.job.checkpoint = self.saved
        return kind is EnoughMeasured

    def _encode_batch(self, components, state, batch):
        start = time.perf_counter()
        keep = self.saved[0](components, state, batch)
        end = time.perf_counter()
        self.state = state
        self.batches.append((start, end, 0 if batch.pixels is None else int(batch.pixels.shape[0])))
        if self.opened is None:
            if end >= self.batches[0][1] + self.warmup_s:
                self.opened = end
        elif self.stop and end >= self.opened + self.window_s:
            raise EnoughMeasured
        return keep

    def _checkpoint(self, *args, **kwargs):
        start = time.perf_counter()
        self.saved[1](*args, **kwargs)
        self.checkpoints.append((start, time.perf_counter()))

    def window(self) -> dict:
        """Images, seconds and images/s of the window; its share of time inside encode_batch; its checkpoints.
        A run that ended during its warm-up is measured from its first batch on."""
        opened = self.opened if self.opened is not None else self.batches[0][1]
        inside = []
        for start, end, images in self.batches:
            if end > opened:
                inside.append((start, end, images))
                if end >= opened + self.window_s:
                    break
        if not inside:
            raise SystemExit("a timed run ended at its first batch: give it more images")
        closed = inside[-1][1]
        seconds = closed - opened
        images = sum(n for _, _, n in inside)
        spans = [(s, e) for s, e in self.checkpoints if opened < s and e <= closed]
        return {
            "images": images,
            "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 1),
            "warmed_up": self.opened is not None,
            "encode_batch_share": round(sum(e - s for s, e, _ in inside) / seconds, 3),
            "checkpoints": len(spans),
            "checkpoint_s": round(sum(e - s for s, e in spans), 3),
        }


def timed_run(config, warmup_s: float, window_s: float, stop: bool, on_state=None) -> dict:
    """Run the job under a BatchClock; `on_state(state)` reads the run's state while it is still on the device.
    Returns the window's figures, the run's wall time and whether it wrote its index."""
    from clipscope_explorer.precompute.job import run

    out = Path(config.out)
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        with BatchClock(warmup_s, window_s, stop) as clock:
            run(config)
        figures = {
            "batch_size": config.batch_size,
            "layers": list(config.layers),
            **clock.window(),
            "wall_s": round(time.perf_counter() - started, 1),
            "index_written": out.is_file(),
        }
        if on_state is not None:
            figures.update(on_state(clock.state))
    finally:  # what a stopped or failed run leaves: its work folder, and its state on the device until collected
        shutil.rmtree(out.with_name(out.name + ".work"), ignore_errors=True)
        clock = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(
        f"  batch {config.batch_size}, layers {','.join(map(str, config.layers))}: "
        f"{figures['images_per_s']:,.0f} img/s over {figures['seconds']:.1f} s ({figures['images']:,} images, "
        f"{figures['encode_batch_share']:.0%} of the time in encode_batch, {figures['checkpoint_s']:.1f} s in "
        f"{figures['checkpoints']} checkpoints); the run took {figures['wall_s']:.0f} s"
    )
    return figures
