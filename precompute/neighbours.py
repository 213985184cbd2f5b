"""Nearest features by decoder cosine similarity, computed in chunks and cached per checkpoint.

At full size (65,536 x 1,024 decoder) this is about 9 TFLOP, so the result is
kept in a cache folder keyed by the checkpoint file (path, size, mtime) and
computed once per checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

N_NEIGHBOURS = 10
CHUNK_ROWS = 2048


def cache_dir() -> Path:
    base = os.environ.get("CLIPSCOPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "clipscope-explorer"
    )
    return Path(base) / "neighbours"


def _cache_key(sae_file: str, n: int) -> str:
    stat = os.stat(sae_file)
    ident = f"{os.path.abspath(sae_file)}|{stat.st_size}|{stat.st_mtime_ns}|{n}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


@torch.inference_mode()
def decoder_neighbours(dec: torch.Tensor, n: int = N_NEIGHBOURS) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [F, n], cosines [F, n]) of the most similar other decoder rows."""
    unit = torch.nn.functional.normalize(dec.float(), dim=1)
    n = min(n, unit.shape[0] - 1)
    indices = torch.empty(unit.shape[0], n, dtype=torch.long, device=unit.device)
    cosines = torch.empty(unit.shape[0], n, device=unit.device)
    for start in range(0, unit.shape[0], CHUNK_ROWS):
        sims = unit[start : start + CHUNK_ROWS] @ unit.T
        rows = torch.arange(sims.shape[0], device=unit.device)
        sims[rows, rows + start] = float("-inf")
        top = torch.topk(sims, n, dim=1)
        indices[start : start + CHUNK_ROWS] = top.indices
        cosines[start : start + CHUNK_ROWS] = top.values
    return indices.cpu(), cosines.cpu()


def cached_neighbours(dec: torch.Tensor, sae_file: str | None, n: int = N_NEIGHBOURS):
    """decoder_neighbours, read from or written to the per-checkpoint cache."""
    if not sae_file or not os.path.exists(sae_file):
        return decoder_neighbours(dec, n)
    path = cache_dir() / f"{_cache_key(sae_file, n)}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if cached["indices"].shape[0] == dec.shape[0]:
                return cached["indices"], cached["cosines"]
        except (OSError, RuntimeError, KeyError):
            pass
    indices, cosines = decoder_neighbours(dec, n)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save({"indices": indices, "cosines": cosines}, partial)
        partial.replace(path)
    except OSError:
        pass  # a read-only cache only costs recomputation
    return indices, cosines
