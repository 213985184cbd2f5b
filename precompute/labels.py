"""Label terms: the caption words most distinctive of a feature's top images (significance, then TF-IDF)."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

WORD = re.compile(r"[a-z][a-z'-]{2,}")
STOPWORDS = frozenset(
    """the and for with from this that these those are was were has have had not but you your our
    their its his her she him they them who what when where which while into onto over under about
    out all any can will just more most some such than then there here very also image images photo
    photos picture stock free png jpg jpeg vector illustration background download hd""".split()
)
MAX_TERMS = 8
MIN_LIFT = 2.0  # a label word is at least this many times more common in the top captions than overall
MAX_P_VALUE = 1e-3  # ... and that many occurrences would be this unlikely by chance


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p)."""
    if successes <= 0:
        return 1.0
    return min(1.0, sum(math.comb(trials, i) * p**i * (1 - p) ** (trials - i) for i in range(successes, trials + 1)))


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

    def merge(self, other: DocumentFrequency) -> None:
        self.counts.update(other.counts)
        self.documents += other.documents

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "documents": self.documents}

    @classmethod
    def from_state_dict(cls, state: dict) -> DocumentFrequency:
        return cls(Counter(state["counts"]), state["documents"])

    def label_terms(self, captions: list[str | None], min_count: int = 2) -> list[str]:
        """Up to MAX_TERMS distinctive words of the given captions, best first.

        A word qualifies when it occurs in at least `min_count` of the captions (all
        of them, when fewer are given), is at least MIN_LIFT times more frequent there
        than in the whole sample, and that excess is significant (binomial tail below
        MAX_P_VALUE against the sample's rate). Qualifying words rank by that tail, the
        most significant first, then by tf-idf.
        """
        term_counts = Counter()
        for caption in captions:
            term_counts.update(caption_terms(caption))
        given = max(1, len(captions))
        need = min(min_count, max(1, len([c for c in captions if c])))
        scored = []
        for term, count in term_counts.items():
            base = self.counts.get(term, 0) / max(self.documents, 1)
            if count < need or (base and (count / given) / base < MIN_LIFT):
                continue
            surprise = binomial_tail(count, given, base) if base else 0.0
            if given >= 8 and surprise > MAX_P_VALUE:
                continue
            tf_idf = count * math.log((1 + self.documents) / (1 + self.counts.get(term, 0)))
            if tf_idf > 0:
                scored.append((surprise, -tf_idf, term))
        scored.sort()
        return [term for *_, term in scored[:MAX_TERMS]]
