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


def model_embeddings(spec, images, ids: list[int], device: str = "auto", batch: int = 64, progress: bool = True):
    """Unit image embeddings [len(ids), d] (float16) of the sample images `ids` (pixels from `images`, a
    SampleImages) by another open_clip model (`spec`: a ModelSpec), with its own preprocessing."""
    import open_clip
    import torch
    from tqdm import tqdm

    from clipscope_explorer.precompute.model.vision import ModelLoadError, resolve_device

    target = resolve_device(device)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.name, pretrained=spec.pretrained, require_pretrained=True
        )
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as error:
        raise ModelLoadError(f"could not load the judge model {spec.describe()}: {error}") from error
    model = model.eval().to(target)
    out = []
    with (
        torch.inference_mode(),
        tqdm(total=len(ids), unit="image", desc="judge embeddings", disable=not progress) as bar,
    ):
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            pixels = torch.stack([preprocess(image) for image in images.images(chunk)]).to(target)
            out.append(model.encode_image(pixels, normalize=True).float().cpu().numpy().astype(np.float16))
            bar.update(len(chunk))
    return np.concatenate(out) if out else np.zeros((0, 1), np.float16)


class RemappedJudge:
    """The embedding judge over embeddings of only the images the trials show: rows found by image id."""

    name = "embedding"

    def __init__(self, ids: np.ndarray, embeddings: np.ndarray, model: str):
        self.ids, self.judge, self.model = np.asarray(ids, np.int64), EmbeddingJudge(embeddings, model), model

    def _row(self, image_id: int) -> int:
        return int(np.searchsorted(self.ids, image_id))

    def answer(self, trials: Sequence[Trial]) -> list[int | None]:
        rows = [
            Trial(tuple(map(self._row, t.grid1)), tuple(map(self._row, t.grid2)), self._row(t.query)) for t in trials
        ]
        return self.judge.answer(rows)

    def report(self) -> dict[str, int]:
        return {**self.judge.report(), "images_embedded": len(self.ids)}
