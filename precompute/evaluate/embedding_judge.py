"""The offline judge: the query goes to the grid whose mean image embedding is closer (cosine), with the
index's own stored CLIP embeddings of the sample images. Cheap enough to score every feature."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from clipscope_explorer.precompute.evaluate.judging import Trial

CHUNK = 4096  # trials gathered at once: 4,096 x 19 x 768 float32 is about 240 MB


class EmbeddingsMissing(ValueError):
    """The index holds no image embeddings (built with --no-embeddings, or before schema 1.2)."""


def stored_embeddings(con) -> np.ndarray:
    """The sample images' stored embeddings [n, d] (float16, row = image_id: ids run 0..n-1)."""
    relation = con.sql("SELECT image_id, embedding FROM samples ORDER BY image_id")
    table = (getattr(relation, "to_arrow_table", None) or relation.arrow)()  # DuckDB 2 / 1
    column = table.column("embedding")
    if len(table) == 0 or column.null_count:
        raise EmbeddingsMissing(
            "this index holds no image embeddings: rebuild it with clipscope-explorer precompute without "
            "--no-embeddings for the embedding judge"
        )
    ids = table.column("image_id").to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise ValueError("samples.image_id does not run 0..n-1: not an index this version writes")
    blobs = pa.concat_arrays(column.chunks).cast(pa.large_binary())
    data = np.frombuffer(blobs.buffers()[2], np.uint8)
    offsets = np.frombuffer(blobs.buffers()[1], np.int64)[: len(ids) + 1]
    width = int(offsets[1] - offsets[0])
    if not np.all(np.diff(offsets) == width):
        raise ValueError("samples.embedding blobs differ in size")
    return data[offsets[0] : offsets[-1]].view("<f2").reshape(len(ids), width // 2)


class EmbeddingJudge:
    """Answers by cosine between the query's embedding and each grid's mean embedding."""

    name = "embedding"

    def __init__(self, embeddings: np.ndarray, model: str | None = None):
        self.embeddings = embeddings
        self.model = model
        self.answered = 0

    def answer(self, trials: Sequence[Trial]) -> list[int | None]:
        if not trials:
            return []
        width = max(max(len(t.grid1), len(t.grid2)) for t in trials)
        grids = np.full((2 * len(trials), width), -1, np.int64)  # -1: an empty cell of a short grid
        for row, grid in enumerate([t.grid1 for t in trials] + [t.grid2 for t in trials]):
            grids[row, : len(grid)] = grid
        unique, which = np.unique(grids, axis=0, return_inverse=True)  # a feature's grid recurs in its trials
        means = np.concatenate([self._grid_means(unique[s : s + CHUNK]) for s in range(0, len(unique), CHUNK)])
        queries = np.array([t.query for t in trials], np.int64)
        closer_first = np.empty(len(trials), bool)
        for start in range(0, len(trials), CHUNK):
            rows = slice(start, start + CHUNK)
            query = self.embeddings[queries[rows]].astype(np.float32)
            first, second = means[which[: len(trials)][rows]], means[which[len(trials) :][rows]]
            closer_first[rows] = np.einsum("nd,nd->n", query, first) >= np.einsum("nd,nd->n", query, second)
        self.answered += len(trials)
        return np.where(closer_first, 1, 2).tolist()

    def _grid_means(self, grids: np.ndarray) -> np.ndarray:
        """Unit mean embedding of each grid (rows of image ids, -1 for an empty cell)."""
        present = (grids >= 0).astype(np.float32)
        vectors = self.embeddings[np.maximum(grids, 0)].astype(np.float32)
        means = np.einsum("ng,ngd->nd", present, vectors)
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        return means / np.where(norms > 0, norms, 1.0)

    def report(self) -> dict[str, int]:
        return {"trials": self.answered}
