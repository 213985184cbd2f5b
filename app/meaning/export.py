"""Reading the index's vectors into the search cache folder, in a process of its own.

`python -m clipscope_explorer.app.meaning.export INDEX FOLDER KIND...` writes the cache files of each
kind (`images`, `features`) that are not there yet. A server worker runs it before mapping the files:
DuckDB keeps what it reads in its buffer pool, and the blobs (1.5 GB per million images) would otherwise
stay in the worker's memory. The worker then maps the files; should this process fail, the worker reads
the vectors itself (`map_vectors`), so the outcome is the same, only its memory larger.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from clipscope_explorer.app.meaning.vectors import UnitVectors, blob_matrix, load_vectors
from clipscope_explorer.app.queries import VECTOR_COLUMNS, Index, RowsOutOfOrder, open_index

log = logging.getLogger(__name__)

ID_COLUMNS = {"images": 1, "features": 2}  # image_id; (layer, feature)
EXPORT_MEMORY = "256MB"  # DuckDB's buffer pool in the exporting process: it streams the blobs


def map_vectors(index: Index, folder: Path | None, kind: str, dim: int, in_memory: bool = True) -> UnitVectors:
    """The vectors of `kind`, memory-mapped from `folder` (written there first when missing; read into
    memory when the folder is not usable, unless `in_memory` is False)."""
    n = index.vector_count(kind)
    what = ".".join(VECTOR_COLUMNS[kind][:2])

    def batches(ordered: bool):
        for ids, blobs in index.vector_batches(kind, ordered):
            yield ids, blob_matrix(blobs, dim, what)

    def read(ordered: bool) -> UnitVectors:
        return load_vectors(folder, kind, n, dim, (ID_COLUMNS[kind],), lambda: batches(ordered), in_memory)

    try:
        return read(ordered=False)
    except RowsOutOfOrder:  # an index not written in id order: sort (every blob) while reading
        return read(ordered=True)


def export_in_child(index_path: Path, folder: Path, kinds: list[str]) -> None:
    """Run this module on `kinds` in a fresh process (its failure is logged; `map_vectors` covers it)."""
    command = [sys.executable, "-m", __name__, str(index_path), str(folder), *kinds]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        log.warning("exporting the search vectors in a child process failed: %s", lines[-1] if lines else "?")


def main(argv: list[str]) -> int:
    index_path, folder, *kinds = argv
    index = open_index(index_path, memory_limit=EXPORT_MEMORY)
    try:
        dim = int(index.meta["embeddings"]["dim"])
        for kind in kinds:
            map_vectors(index, Path(folder), kind, dim, in_memory=False)
    finally:
        index.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
