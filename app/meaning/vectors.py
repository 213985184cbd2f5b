"""Unit vectors of the index (sample image embeddings, feature prototypes) and exact top-k search over them.

The index stores each vector as a little-endian float16 blob. Searching reads them as one [n, d] float16
matrix: exported once per index id into a cache file (`.npy`, written under another name and renamed when
complete, under a lock so that one worker writes it while the others wait) and memory-mapped, so every
worker of a server shares one copy in the page cache instead of holding its own.

A query is ranked exactly in two passes. A fast pass (`Scorer.coarse`: torch's float16 matrix-vector
product once the text tower has loaded torch, `torch_scan.py`; else numpy in float32) scores every row
within a known error bound e of the exact score. Every row that could be among the k best (coarse score at
least the k-th best coarse score less 2e) is then scored exactly (float64 sums of the stored float16 values)
and ranked, ties going to the smaller id (features: layer, then feature).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

CHUNK_ROWS = 1024  # rows converted to float32 at once: 3 MB at 768 dims
EXACT_ROWS = 16_384  # candidate rows scored exactly at once
VectorBatches = Iterable[tuple[np.ndarray, np.ndarray]]  # (ids [b, ...] int32, float16 matrix [b, d])


class Scorer(Protocol):
    def coarse(self, matrix: np.ndarray, query: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, float]:
        """(scores [stop - start] float32 of rows [start, stop) against `query`, a bound on their error for
        rows of norm 1 and `query` of norm 1)."""


class NumpyScorer:
    """Products and sums in float32, a chunk of rows at a time. numpy's own float16 -> float32 conversion is
    slow; widening the bits is exact for every finite float16 and three times faster (still several times
    slower than torch_scan.py)."""

    bound = 1e-4  # float32 sums of 768 products of at most 1: under 768 * 2**-24 * 1 with room

    def coarse(self, matrix: np.ndarray, query: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, float]:
        query = np.ascontiguousarray(query, dtype=np.float32)
        out = np.empty(stop - start, dtype=np.float32)
        bits = np.empty((CHUNK_ROWS, matrix.shape[1]), dtype=np.uint32)
        sign = np.empty_like(bits)
        for begin in range(start, stop, CHUNK_ROWS):
            end = min(begin + CHUNK_ROWS, stop)
            block = float16_to_float32(matrix[begin:end], bits[: end - begin], sign[: end - begin])
            np.matmul(block, query, out=out[begin - start : end - start])
        return out, self.bound


def float16_to_float32(half: np.ndarray, bits: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """`half` as float32 in `bits` (uint32 scratch of its shape; `sign` another): sign to bit 31, exponent
    and mantissa 13 bits up, then times 2**112 to move the exponent bias from 15 to 127 (which also
    makes subnormals right)."""
    np.copyto(bits, half.view(np.uint16))
    np.bitwise_and(bits, 0x8000, out=sign)
    np.left_shift(sign, 16, out=sign)
    np.bitwise_and(bits, 0x7FFF, out=bits)
    np.left_shift(bits, 13, out=bits)
    np.bitwise_or(bits, sign, out=bits)
    floats = bits.view(np.float32)
    np.multiply(floats, np.float32(2.0**112), out=floats)
    return floats


def exact_scores(matrix: np.ndarray, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """row . query in float64 for `rows` (ascending), each summed alike, so equal rows score equal."""
    query = np.asarray(query, dtype=np.float64)
    out = np.empty(len(rows), dtype=np.float64)
    for begin in range(0, len(rows), EXACT_ROWS):
        chosen = rows[begin : begin + EXACT_ROWS]
        out[begin : begin + len(chosen)] = (matrix[chosen].astype(np.float64) * query).sum(axis=1)
    return out


def scorer_is_within_bound(scorer: Scorer, matrix: np.ndarray, queries: int = 3, rows: int = 4096) -> bool:
    """Whether `scorer` keeps to its bound on the first `rows` rows of `matrix` for a few unit queries (a
    guard against a library whose product loses more precision than assumed)."""
    rng = np.random.default_rng(0)
    stop = min(rows, len(matrix))
    for _ in range(queries):
        query = rng.normal(size=matrix.shape[1])
        query /= np.linalg.norm(query)
        query = (query + np.asarray(matrix[rng.integers(stop)], dtype=np.float64)) if stop else query
        query = (query / np.linalg.norm(query)).astype(np.float32)
        coarse, bound = scorer.coarse(matrix, query, 0, stop)
        if np.abs(coarse - exact_scores(matrix, np.arange(stop), query)).max(initial=0) > bound / 2:
            return False
    return True


class VectorsError(RuntimeError):
    """The index's vectors cannot be read (a blob of the wrong size); the message is one line."""


def blob_matrix(blobs, dim: int, what: str) -> np.ndarray:
    """An Arrow binary column of float16 blobs of `dim` values as a [n, dim] float16 array (a view)."""
    offsets = np.frombuffer(blobs.buffers()[1], dtype=np.int32)[blobs.offset : blobs.offset + len(blobs) + 1]
    sizes = np.diff(offsets)
    if len(sizes) and (sizes.min() != 2 * dim or sizes.max() != 2 * dim):
        bad = int(sizes[sizes != 2 * dim][0])
        raise VectorsError(f"{what} holds a {bad}-byte vector; meta.embeddings says {dim} float16 values")
    data = np.frombuffer(blobs.buffers()[2], dtype="<f2", count=len(blobs) * dim, offset=int(offsets[0]))
    return data.reshape(len(blobs), dim)


@dataclass(frozen=True)
class UnitVectors:
    """Vectors [n, d] float16 (memory-mapped) and their ids [n] or [n, 2] int32, rows sorted by id."""

    ids: np.ndarray
    matrix: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    def row_range(self, column: int, value: int) -> tuple[int, int]:
        """The rows whose id column `column` equals `value` (ids sorted: one contiguous range)."""
        keys = self.ids[:, column]
        return int(np.searchsorted(keys, value, "left")), int(np.searchsorted(keys, value, "right"))

    def top(
        self, query: np.ndarray, k: int, scorer: Scorer, rows: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best rows by score (descending; ties: the smaller id) as (row numbers, exact float64
        scores), among `rows` (start, stop) or all."""
        start, stop = rows or (0, len(self))
        if stop <= start or k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        coarse, bound = scorer.coarse(self.matrix, query, start, stop)
        error = bound * max(1.0, float(np.linalg.norm(query))) * 1.01  # rows: unit vectors rounded to float16
        if k < len(coarse):
            kth = np.partition(coarse, len(coarse) - k)[len(coarse) - k]
            candidates = np.flatnonzero(coarse >= kth - 2 * error) + start  # every row that may be among the k
        else:
            candidates = np.arange(start, stop)
        scores = exact_scores(self.matrix, candidates, query)
        order = np.lexsort((*self.ids[candidates].T[::-1], -scores))[:k]
        return candidates[order], scores[order]


def _fill(ids: np.ndarray, matrix: np.ndarray, batches: Callable[[], VectorBatches], name: str) -> None:
    """Copy every batch into `ids` and `matrix`, which must have exactly as many rows."""
    row = 0
    for batch_ids, batch in batches():
        if row + len(batch) > len(matrix):
            raise VectorsError(f"{name}: the index gave more than the {len(matrix)} vectors it counted")
        ids[row : row + len(batch)] = batch_ids.reshape(len(batch), *ids.shape[1:])
        matrix[row : row + len(batch)] = batch
        row += len(batch)
    if row != len(matrix):
        raise VectorsError(f"{name}: the index gave {row} vectors, not the {len(matrix)} it counted")


def _write_npy(path: Path, batches: Callable[[], VectorBatches], n: int, dim: int, id_shape: tuple) -> None:
    """Write `n` rows from `batches` as `<path>.ids.npy` and `<path>.npy`, each under a temporary name
    renamed when complete (the matrix last: its presence means both are whole)."""
    finals = (path.with_suffix(".ids.npy"), path.with_suffix(".npy"))
    temporary = [Path(f"{final}.tmp-{os.getpid()}") for final in finals]
    try:
        ids = np.lib.format.open_memmap(temporary[0], mode="w+", dtype=np.int32, shape=(n, *id_shape))
        matrix = np.lib.format.open_memmap(temporary[1], mode="w+", dtype="<f2", shape=(n, dim))
        _fill(ids, matrix, batches, path.name)
        for array, written, final in zip((ids, matrix), temporary, finals):
            array.flush()
            descriptor = os.open(written, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            os.replace(written, final)
    finally:
        for written in temporary:
            written.unlink(missing_ok=True)


def _open_npy(path: Path, n: int, dim: int, id_shape: tuple) -> UnitVectors | None:
    """The cache files at `path` when both exist with the expected shapes, else None."""
    try:
        matrix = np.load(path.with_suffix(".npy"), mmap_mode="r")
        ids = np.load(path.with_suffix(".ids.npy"), mmap_mode="r")
    except (OSError, ValueError):
        return None
    if matrix.shape != (n, dim) or matrix.dtype != np.dtype("<f2") or ids.shape != (n, *id_shape):
        return None
    return UnitVectors(np.asarray(ids), matrix)


def load_vectors(
    folder: Path | None,
    name: str,
    n: int,
    dim: int,
    id_shape: tuple,
    batches: Callable[[], VectorBatches],
    in_memory: bool = True,
) -> UnitVectors:
    """The vectors `batches` yields (n rows of dim values, ids of `id_shape` per row), memory-mapped from
    `folder/name.npy` (exported there first when missing). Without a usable folder they are read into
    this process's memory (float16) instead, or with `in_memory=False` the OSError is raised."""
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / ".lock", "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one worker exports; the others wait and map its file
                found = _open_npy(folder / name, n, dim, id_shape)
                if found is None:
                    for stale in folder.glob(f"{name}.*.tmp-*"):
                        stale.unlink(missing_ok=True)
                    _write_npy(folder / name, batches, n, dim, id_shape)
                    found = _open_npy(folder / name, n, dim, id_shape)
            if found is not None:
                return found
            log.warning("search cache %s/%s.npy could not be read back; keeping the vectors in memory", folder, name)
        except OSError as error:
            if not in_memory:
                raise
            log.warning("search cache folder %s is not usable (%s); keeping the vectors in memory", folder, error)
    ids, matrix = np.zeros((n, *id_shape), dtype=np.int32), np.zeros((n, dim), dtype="<f2")
    _fill(ids, matrix, batches, name)
    return UnitVectors(ids, matrix)
