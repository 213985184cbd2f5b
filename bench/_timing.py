"""Small timing helpers shared by the bench scripts.

`interleaved_medians` warms each candidate up once, then times them in turn,
round after round (rotating the start so no candidate always runs first), and
returns each candidate's median wall time. `result_line` formats the final
`RESULT <name> <measured> target <op><target> PASS|MISS` line.
"""

from __future__ import annotations

import operator
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python bench/x.py` without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

# Line-buffered stdout, so stderr warnings (e.g. open_clip's) cannot land after the RESULT line.
sys.stdout.reconfigure(line_buffering=True)

_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(median seconds per call of each fn, all per-round times); calls interleaved, start rotated each round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    busy0, own0, wall0 = _busy_seconds(), _own_seconds(), time.perf_counter()
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    busy1, own1, wall1 = _busy_seconds(), _own_seconds(), time.perf_counter()
    if busy0 is not None and busy1 is not None:
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
        note = "  WARNING: machine was shared, timings are suspect" if others > 0.1 else ""
        print(f"  other processes used {others:.2f} of {os.cpu_count()} cores while timing{note}")
    for name in names:
        print(
            f"  {name}: "
            + " ".join(f"{t:.3f}" for t in times[name])
            + f" s (median {statistics.median(times[name]):.3f})"
        )
    return {name: statistics.median(times[name]) for name in names}, times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of num/den within the same round: steadier when load comes and goes."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def passes(measured: float, op: str, target: float) -> bool:
    return _OPS[op](measured, target)


def result_line(name: str, measured: float, op: str, target: float, digits: int = 3) -> tuple[str, bool]:
    """('RESULT <name> <measured> target <op><target> PASS|MISS', passed); judged on the unrounded value."""
    ok = passes(measured, op, target)
    return f"RESULT {name} {measured:.{digits}f} target {op}{target:.2f} {'PASS' if ok else 'MISS'}", ok


def print_results(name: str, results: list[tuple[str, bool]]) -> None:
    """Print each RESULT line, then the summary line: PASS only if every target passed."""
    for line, _ in results:
        print(line)
    passed = sum(ok for _, ok in results)
    print(
        f"RESULT {name} {passed}/{len(results)} target =={len(results)}/{len(results)} "
        f"{'PASS' if passed == len(results) else 'MISS'}"
    )
