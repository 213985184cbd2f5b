"""Label terms: the caption words most distinctive of a feature's top images (TF-IDF)."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable

WORD = re.compile(r"[a-z][a-z'-]{2,}")
STOPWORDS = frozenset(
    """the and for with from this that these those are was were has have had not but you your our
    their its his her she him they them who what when where which while into onto over under about
    out all any can will just more most some such than then there here very also image images photo
    photos picture stock free png jpg jpeg vector illustration background download hd""".split()
)
MAX_TERMS = 8


def caption_terms(caption: str | None) -> set[str]:
    """Distinct words of a caption, lower-cased, without stopwords."""
    if not caption:
        return set()
    return {w.strip("'-") for w in WORD.findall(caption.lower()) if w not in STOPWORDS} - {""}


class DocumentFrequency:
    """How many captions of the whole sample contain each word (mergeable)."""

    def __init__(self, counts: Counter | None = None, documents: int = 0):
        self.counts = counts or Counter()
        self.documents = documents

    def add(self, captions: Iterable[str | None]) -> None:
        for caption in captions:
            self.documents += 1
            self.counts.update(caption_terms(caption))

    def merge(self, other: "DocumentFrequency") -> None:
        self.counts.update(other.counts)
        self.documents += other.documents

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "documents": self.documents}

    @classmethod
    def from_state_dict(cls, state: dict) -> "DocumentFrequency":
        return cls(Counter(state["counts"]), state["documents"])

    def label_terms(self, captions: list[str | None], min_count: int = 2) -> list[str]:
        """Up to MAX_TERMS words by tf-idf over the given captions; a word must occur in
        at least `min_count` of them (or in all, when fewer are given)."""
        term_counts = Counter()
        for caption in captions:
            term_counts.update(caption_terms(caption))
        need = min(min_count, max(1, len([c for c in captions if c])))
        scored = [
            (count * math.log((1 + self.documents) / (1 + self.counts.get(term, 0))), term)
            for term, count in term_counts.items() if count >= need
        ]
        scored.sort(key=lambda item: (-item[0], item[1]))
        return [term for score, term in scored[:MAX_TERMS] if score > 0]
