"""Numeric precision of the forward pass: `fp32`, or `bf16` (autocast: matrix products in bfloat16, fp32 elsewhere).

The index records the precision it was built in (`meta.precision`). `auto`
means bf16 on CUDA (throughput) and fp32 on CPU for the precompute job; the
server's live encoder follows the index it serves, so an upload is encoded as
the index's images were. bf16 on a CPU is only fast with native bfloat16
instructions (AMX or AVX512-BF16; figures in bench/RESULTS.md); without them
`auto` stays fp32.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with the model: the CLI and --no-live servers read PRECISIONS without it
    import torch

PRECISIONS = ("auto", "fp32", "bf16")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(requested: str, device: torch.device, index_precision: str | None = None) -> str:
    """`fp32` or `bf16` for `requested` (one of PRECISIONS) on `device`; `auto` follows `index_precision` when given."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested != "auto":
        return requested
    wanted = index_precision or ("bf16" if device.type == "cuda" else "fp32")
    if wanted == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        return "fp32"
    return wanted


def effective(precision: str | None, device: torch.device) -> str:
    """`precision`, or for None the default (`auto`) on `device`."""
    return precision or resolve_precision("auto", device)


def autocast(device: torch.device, precision: str | None):
    """The context the forward pass runs in; `precision=None` is `auto` on `device`."""
    if effective(precision, device) == "fp32":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16)
