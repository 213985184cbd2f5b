"""What an upload's CLIP image embedding finds in the index (torch-free): the nearest sample images (cosine
with their stored embeddings, exact, through `app/meaning/`) and its best zero-shot labels (cosine with
the text embeddings of the index's zero-shot vocabulary). Both are empty when the upload has no
embedding (the live model is not the index's) or the index has none to compare with."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from clipscope_explorer.app.meaning.service import MeaningService
from clipscope_explorer.app.models import ImageHit, image_hits, round_sig
from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.urls import Urls

NEAREST = 12  # sample images listed
ZERO_SHOT = 5  # labels listed
CHUNK_ROWS = 2048  # vocabulary rows converted to float64 at once


class ZeroShotScore(BaseModel):
    """A vocabulary term and its cosine with the upload's embedding (the term's text embedding under the
    index's zero-shot template)."""

    text: str
    score: float


def nearest_images(
    index: Index, urls: Urls, meaning: MeaningService | None, embedding: np.ndarray | None
) -> list[ImageHit]:
    """The NEAREST sample images, best first (ties: the smaller image id)."""
    if embedding is None or meaning is None or meaning.dim != len(embedding):
        return []
    if not meaning.status("images", needs_text=False).ready:
        return []
    return image_hits(index, urls, meaning.nearest_images(embedding, NEAREST))


def zero_shot_labels(index: Index, embedding: np.ndarray | None) -> list[ZeroShotScore]:
    """The ZERO_SHOT vocabulary terms nearest the upload, best first (ties: the term first in sort order)."""
    terms, matrix = index.vocabulary()
    if embedding is None or not terms or matrix.shape[1] != len(embedding):
        return []
    query = np.asarray(embedding, dtype=np.float64)
    scores = np.concatenate(  # in float64, every row summed alike (equal rows score equal)
        [(matrix[i : i + CHUNK_ROWS].astype(np.float64) * query).sum(axis=1) for i in range(0, len(terms), CHUNK_ROWS)]
    )
    best = np.lexsort((np.arange(len(terms)), -scores))[:ZERO_SHOT]  # rows are sorted by term
    return [ZeroShotScore(text=terms[i], score=round_sig(float(scores[i]))) for i in best]
