"""Zero-shot labels: a feature's prototype against CLIP text embeddings of a vocabulary, kept when significant.

The vocabulary is the words and two-word phrases of the sample's captions (same tokenisation and stopwords as
the caption-word labels of precompute/labels.py) plus an optional user list. A term labels a feature when the
feature's prototype scores it further above what prototypes of random images score it (the shuffled baseline)
than all but 5 % of those random prototypes score their own best term. Torch-free: the text embeddings come in
as arrays.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipscope_explorer.precompute.labels import STOPWORDS, WORD

TEMPLATE = "a photo of {}"
MAX_TRACKED_TERMS = 1_000_000  # distinct terms counted at once: about 150-200 MB of Python dict
MAX_USER_TERM_CHARS = 100
FALSE_LABEL_RATE = 0.05  # at most this share of random-image prototypes gets any label
SD_FLOOR = 1e-4  # cosine units: a term whose null scores barely vary is not thereby infinitely significant
CHUNK_BYTES = 128 * 2**20  # one chunk's feature x term float32 scores


# ---- vocabulary from captions ----


def caption_vocabulary_terms(caption: str | None) -> set[str]:
    """The vocabulary terms a caption holds: its words, exactly labels.caption_terms's, and its two-word
    phrases: two of those words with only whitespace between them (so punctuation, digits and short words such
    as "a" or "in" break a phrase), neither a stopword."""
    if not caption:
        return set()
    text = caption.lower()
    terms, previous, previous_end = set(), None, 0
    for match in WORD.finditer(text):
        raw = match.group()
        word = raw.strip("'-")
        if raw in STOPWORDS or word in STOPWORDS:
            if raw not in STOPWORDS:
                terms.add(word)  # as caption_terms does: it checks the word before stripping
            previous = None
            continue
        terms.add(word)
        if previous is not None and text[previous_end : match.start()].isspace():
            terms.add(f"{previous} {word}")
        previous, previous_end = word, match.end()
    return terms


class CaptionTermCounter:
    """In how many captions each word and two-word phrase occurs, in bounded memory.

    At most `max_tracked` distinct terms are counted at once. Counting is exact until that many distinct terms
    have been seen. Then the rarest are dropped: every term whose count could be at most some floor t (the
    smallest t that halves the table) is forgotten, and the floor rises to t. A forgotten term seen again starts
    over with a slack of the floor then in force (it may have had up to that many earlier captions). So each
    count is a lower bound, exact for a term never forgotten and short by at most its slack otherwise, and a
    term missing from the table occurs in at most `floor` captions. The cost in exactness: `terms()` may miss a
    term whose true count lies in [min_count, min_count + floor); it never reports one below min_count. Memory
    is about 150-200 bytes a tracked term (Python dict entries), so the default 1,000,000 stays near 200 MB.
    """

    def __init__(self, max_tracked: int = MAX_TRACKED_TERMS):
        if max_tracked < 2:
            raise ValueError("max_tracked must be at least 2")
        self.max_tracked = max_tracked
        self.counts: dict[str, int] = {}
        self.slack: dict[str, int] = {}  # only terms (re)inserted after a pruning
        self.floor = 0
        self.captions = 0

    def add(self, caption: str | None) -> None:
        self.captions += 1
        counts, floor = self.counts, self.floor
        for term in caption_vocabulary_terms(caption):
            count = counts.get(term)
            if count is None:
                counts[term] = 1
                if floor:
                    self.slack[term] = floor
            else:
                counts[term] = count + 1
        if len(counts) > self.max_tracked:
            self._prune()

    def _prune(self) -> None:
        terms = list(self.counts)
        upper = np.fromiter((self.counts[t] + self.slack.get(t, 0) for t in terms), np.int64, len(terms))
        keep = self.max_tracked // 2
        # the smallest floor t above the current one that leaves at most `keep` terms with upper bound > t
        floor = max(self.floor + 1, int(np.partition(upper, len(upper) - keep - 1)[len(upper) - keep - 1]))
        self.counts = {t: self.counts[t] for t, u in zip(terms, upper.tolist()) if u > floor}
        self.slack = {t: s for t, s in self.slack.items() if t in self.counts}
        self.floor = floor

    def count(self, term: str) -> int:
        """Captions counted for `term` (a lower bound once pruning has happened; 0 when not tracked)."""
        return self.counts.get(term, 0)

    def terms(self, min_count: int, max_terms: int) -> list[tuple[str, int]]:
        """(term, n_captions) with n_captions >= min_count, most captions first, then by term; at most max_terms."""
        found = [(term, n) for term, n in self.counts.items() if n >= min_count]
        found.sort(key=lambda item: (-item[1], item[0]))
        return found[: max(0, max_terms)]


def caption_vocabulary(
    captions: Iterable[str | None], min_count: int, max_terms: int, *, max_tracked: int = MAX_TRACKED_TERMS
) -> list[tuple[str, int]]:
    """Words and two-word phrases that occur in at least `min_count` distinct captions, as (term, n_captions),
    most captions first then alphabetically, at most `max_terms`.

    Words are labels.caption_terms's (lower-cased, labels.WORD, no stopwords); a phrase is two such words with
    only whitespace between them in the caption. One pass over the captions in bounded memory: exact while
    fewer than `max_tracked` distinct terms are seen (about 200 MB at the default); beyond, see
    CaptionTermCounter for the bound on what is missed.
    """
    counter = CaptionTermCounter(max_tracked)
    for caption in captions:
        counter.add(caption)
    return counter.terms(min_count, max_terms)


# ---- user vocabulary ----


def read_user_vocabulary(path: str | Path) -> list[str]:
    """Terms of a user vocabulary file: one per line, UTF-8; blank lines and lines starting with `#` are
    ignored; inner whitespace is collapsed; duplicates (ignoring case) keep their first spelling. Raises
    ValueError with one line naming the file when it cannot be read, is not UTF-8, holds a term longer than
    MAX_USER_TERM_CHARS or with control characters, or holds no terms."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such vocabulary file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a vocabulary file") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot read the vocabulary file ({error.strerror or error})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: the vocabulary file is not UTF-8 text (bad byte at offset {error.start})") from None
    terms, seen = [], set()
    for number, line in enumerate(text.splitlines(), start=1):
        term = " ".join(line.split())
        if not term or term.startswith("#"):
            continue
        if len(term) > MAX_USER_TERM_CHARS:
            raise ValueError(f"{path}: line {number}: a term is longer than {MAX_USER_TERM_CHARS} characters")
        if any(unicodedata.category(c).startswith("C") for c in term):
            raise ValueError(f"{path}: line {number}: a term holds a control or unassigned character")
        if term.casefold() not in seen:
            seen.add(term.casefold())
            terms.append(term)
    if not terms:
        raise ValueError(f"{path}: the vocabulary file holds no terms (only blank lines and # comments)")
    return terms


# ---- labels ----


@dataclass(frozen=True)
class NullBaseline:
    """How prototypes of random images (the null prototypes) score the vocabulary.

    `mean` and `sd` (floored at SD_FLOOR) are each term's cosine over the null prototypes; a prototype's excess
    for a term is (cosine - mean) / sd. `threshold` is the excess a label must exceed: the (1 -
    false_label_rate) quantile, over the null prototypes, of each one's best excess across the whole vocabulary.
    So at most that share of random-image prototypes would get any label, measured on them rather than assumed
    from a normal model with a correction for the vocabulary's size: CLIP's scores of related terms move
    together, which a per-term correction would count as independent tests and over-correct.
    """

    mean: np.ndarray  # [V] float32
    sd: np.ndarray  # [V] float32
    threshold: float
    false_label_rate: float
    n_null: int


def _unit_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows as float32 unit vectors with invalid rows zeroed, which rows are valid): a row with a NaN or
    infinity, or of zero norm, is invalid."""
    rows = np.asarray(rows, dtype=np.float32)
    finite = np.isfinite(rows).all(axis=1)
    rows = np.where(finite[:, None], rows, 0.0).astype(np.float32, copy=False)
    norms = np.linalg.norm(rows, axis=1)
    valid = finite & (norms > 0)
    return rows / np.where(valid, norms, 1.0)[:, None].astype(np.float32), valid


def _unit_terms(term_vectors: np.ndarray, terms: list[str]) -> np.ndarray:
    term_vectors = np.asarray(term_vectors)
    if term_vectors.ndim != 2 or len(term_vectors) != len(terms):
        raise ValueError(f"term_vectors must be [{len(terms)}, d], one row per term; got {term_vectors.shape}")
    units, valid = _unit_rows(term_vectors)
    if not valid.all():
        raise ValueError(f"term {terms[int(np.flatnonzero(~valid)[0])]!r} has no usable text embedding")
    return units


def null_baseline(
    term_vectors: np.ndarray,
    null_prototypes: np.ndarray,
    false_label_rate: float = FALSE_LABEL_RATE,
    *,
    chunk_rows: int | None = None,
) -> NullBaseline:
    """The per-term null distribution of cosines over `null_prototypes` (invalid rows dropped; at least two
    needed), and the label threshold that `false_label_rate` of them would exceed at most."""
    units = _unit_terms(term_vectors, [""] * len(term_vectors))
    nulls, valid = _unit_rows(null_prototypes)
    nulls = nulls[valid]
    if len(nulls) < 2:
        raise ValueError("at least two valid null prototypes are needed for the zero-shot baseline")
    if nulls.shape[1] != units.shape[1]:
        raise ValueError(f"null prototypes have {nulls.shape[1]} dims, term vectors {units.shape[1]}")
    if not 0.0 < false_label_rate < 0.5:
        raise ValueError(f"false_label_rate must lie in (0, 0.5); got {false_label_rate}")
    total = np.zeros(len(units))
    squares = np.zeros(len(units))
    rows = chunk_rows or max(1, CHUNK_BYTES // (16 * len(units)))  # float32 scores and their float64 copy
    for start in range(0, len(nulls), rows):
        scores = (nulls[start : start + rows] @ units.T).astype(np.float64)
        total += scores.sum(axis=0)
        scores *= scores
        squares += scores.sum(axis=0)
    n = len(nulls)
    mean = total / n
    sd = np.maximum(np.sqrt(np.maximum(squares - n * mean**2, 0.0) / (n - 1)), SD_FLOOR)
    mean, sd = mean.astype(np.float32), sd.astype(np.float32)
    best = np.concatenate([_excess(nulls[s : s + rows], units, mean, sd).max(axis=1) for s in range(0, n, rows)])
    above = int(np.floor(n * false_label_rate + 1e-9))  # null maxima allowed above the threshold
    threshold = float(np.partition(best, n - 1 - above)[n - 1 - above])
    return NullBaseline(mean, sd, threshold, float(false_label_rate), n)


def _excess(units: np.ndarray, terms_units: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    excess = units @ terms_units.T
    excess -= mean
    excess /= sd
    return excess


def _top_excess(excess: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest excesses per row, best first (ties: lower term index first); `excess` is overwritten."""
    rows = np.arange(len(excess))
    index = np.empty((len(excess), k), dtype=np.int64)
    value = np.empty((len(excess), k), dtype=np.float32)
    for j in range(k):
        index[:, j] = excess.argmax(axis=1)
        value[:, j] = excess[rows, index[:, j]]
        excess[rows, index[:, j]] = -np.inf
    return index, value


def _chunk_labels(
    units: np.ndarray, valid: np.ndarray, terms_units: np.ndarray, baseline: NullBaseline, max_labels: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """Per row of a chunk: (term indices, cosines, margins, number of labels)."""
    excess = _excess(units, terms_units, baseline.mean, baseline.sd)
    shown = min(max_labels, len(terms_units))
    index, value = _top_excess(excess, shown)
    count = (value > baseline.threshold).sum(axis=1)  # values are sorted: the passing ones come first
    count[~valid] = 0
    cosines = np.einsum("nd,nkd->nk", units, terms_units[index])
    for row in range(len(units)):
        n = int(count[row])
        yield index[row, :n], cosines[row, :n], value[row, :n] - baseline.threshold, n


def zero_shot_labels(
    prototypes: np.ndarray,
    term_vectors: np.ndarray,
    terms: list[str],
    null_prototypes: np.ndarray | None,
    max_labels: int,
    *,
    false_label_rate: float = FALSE_LABEL_RATE,
    baseline: NullBaseline | None = None,
    chunk_rows: int | None = None,
) -> list[list[tuple[str, float, float]]]:
    """Per prototype row, its zero-shot labels (text, score, margin), best first, at most `max_labels`.

    score: cosine between the prototype and the term's text embedding. Terms rank by excess, (score - mean) /
    sd of that term's scores over the null prototypes (NullBaseline); the labels are the best `max_labels`
    terms whose excess is above the baseline's threshold. margin: how far above it, in null standard
    deviations. Near-synonyms ("red", "red circle") can be labels together. A row that is all zeros or holds a
    NaN (no prototype) gets []. `baseline` (from null_baseline) replaces `null_prototypes` and
    `false_label_rate` when given. Features are scored `chunk_rows` at a time (default: CHUNK_BYTES of float32
    scores), so memory stays bounded whatever the number of features.
    """
    terms_units = _unit_terms(term_vectors, terms)
    if baseline is None:
        if null_prototypes is None:
            raise ValueError("zero_shot_labels needs null_prototypes or a baseline")
        baseline = null_baseline(terms_units, null_prototypes, false_label_rate)
    elif len(baseline.mean) != len(terms):
        raise ValueError(f"the baseline covers {len(baseline.mean)} terms, not {len(terms)}")
    prototypes = np.asarray(prototypes)
    if prototypes.ndim != 2 or (len(prototypes) and prototypes.shape[1] != terms_units.shape[1]):
        raise ValueError(f"prototypes must be [F, {terms_units.shape[1]}]; got {prototypes.shape}")
    if max_labels <= 0 or not terms:
        return [[] for _ in range(len(prototypes))]
    rows = chunk_rows or max(1, min(4096, CHUNK_BYTES // (4 * len(terms))))
    labels = []
    for start in range(0, len(prototypes), rows):
        units, valid = _unit_rows(prototypes[start : start + rows])
        for index, cosines, margins, n in _chunk_labels(units, valid, terms_units, baseline, max_labels):
            labels.append([(terms[int(index[j])], float(cosines[j]), float(margins[j])) for j in range(n)])
    return labels
