"""Small timing helpers shared by the bench scripts.

`interleaved_medians` warms each candidate up once, then times them in turn,
round after round (rotating the start so no candidate always runs first), and
returns each candidate's median wall time. `result_line` formats the final
`RESULT <name> <measured> target <op><target> PASS|MISS` line.
"""

from __future__ import annotations

import operator
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python bench/x.py` without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn; calls interleaved, start rotated each round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    for name in names:
        print(f"  {name}: " + " ".join(f"{t:.3f}" for t in times[name]) + f" s (median {statistics.median(times[name]):.3f})")
    return {name: statistics.median(times[name]) for name in names}


def passes(measured: float, op: str, target: float) -> bool:
    return _OPS[op](measured, target)


def result_line(name: str, measured: float, op: str, target: float, digits: int = 3) -> tuple[str, bool]:
    """('RESULT <name> <measured> target <op><target> PASS|MISS', passed); judged on the unrounded value."""
    ok = passes(measured, op, target)
    return f"RESULT {name} {measured:.{digits}f} target {op}{target:.2f} {'PASS' if ok else 'MISS'}", ok
