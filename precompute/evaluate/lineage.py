"""Lineage across layers: for every feature, its most related features at another layer, by co-occurrence
over the sample's images.

Two kinds of occurrence, each a binary image x feature matrix per layer: `cls` (the feature fires on the
image's CLS token: its kept value in `sample_codes` is > 0) and `top_images` (the image is among the
feature's top images in `examples`; many features never fire on CLS, and this covers them). For a feature
a at one layer and b at another, with n_a and n_b the images where each occurs, c those where both do and
N the sample's images, the score is the normalised pointwise mutual information

    npmi(a, b) = ln(c N / (n_a n_b)) / -ln(c / N)

in [-1, 1]: 1 when the two always occur together (c = n_a = n_b), 0 when independent. Raw co-occurrence
counts favour frequent features (a feature firing everywhere co-occurs with everything), and plain PMI
favours rare ones (one shared image between two rare features scores highest); npmi is bounded, does not
grow with frequency, and together with a minimum support c (default 3 images for `cls`, 2 shared top
images) discards what a handful of images could produce by chance. A hypergeometric p-value ranks by
evidence rather than closeness, so at a million images every frequent pair would be "significant". Only
pairs that occur together more often than by chance (npmi > 0) are links.

The counts are sparse matrix products X_a^T X_b, computed in blocks of a's features whose work (and so the
product's size) is bounded, keeping per block only each row's and each column's best links, chosen in
linear time: memory is the layers' occurrences plus one block, whatever the number of features.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import sparse

BLOCK_WORK = 16_000_000  # co-occurrence increments per block (about 8 bytes each while the block lives)


@dataclass(frozen=True)
class Occurrences:
    """Which features occur on which images at one layer, as CSR rows over the sample's images."""

    indptr: np.ndarray  # [n_images + 1] int32 (int64 beyond 2**31 entries)
    features: np.ndarray  # [nnz], same dtype as indptr; distinct within an image
    n_features: int

    @property
    def n_images(self) -> int:
        return len(self.indptr) - 1

    def counts(self) -> np.ndarray:
        """Images each feature occurs on."""
        return np.bincount(self.features, minlength=self.n_features).astype(np.int64)

    def matrix(self) -> sparse.csr_matrix:
        """The image x feature matrix of ones (int32, so that products count exactly)."""
        ones = np.ones(len(self.features), np.int32)
        return sparse.csr_matrix((ones, self.features, self.indptr), shape=(self.n_images, self.n_features))


def _index_dtype(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


def occurrences_from_rows(rows: np.ndarray, features: np.ndarray, n_images: int, n_features: int) -> Occurrences:
    """Occurrences from (image row, feature) pairs in any order; a repeated pair counts once."""
    rows, features = np.asarray(rows, np.int64), np.asarray(features, np.int64)
    keys = np.unique(rows * n_features + features)
    rows, features = keys // n_features, keys % n_features
    dtype = _index_dtype(len(keys))
    indptr = np.zeros(n_images + 1, dtype)
    np.cumsum(np.bincount(rows, minlength=n_images), out=indptr[1:])
    return Occurrences(indptr, features.astype(dtype), n_features)


def occurrences_from_codes(
    rows: np.ndarray, offsets: np.ndarray, indices: np.ndarray, values: np.ndarray, n_images: int, n_features: int
) -> Occurrences:
    """CLS occurrences from stored codes: image `rows[i]` kept `indices[offsets[i]:offsets[i + 1]]` with
    `values[...]`, `rows` ascending; a kept latent fires when its value is > 0."""
    fires = np.asarray(values) > 0
    lengths = np.diff(np.asarray(offsets, np.int64))
    per_row = np.bincount(np.repeat(np.asarray(rows, np.int64), lengths)[fires], minlength=n_images)
    dtype = _index_dtype(int(fires.sum()))
    indptr = np.zeros(n_images + 1, dtype)
    np.cumsum(per_row, out=indptr[1:])
    return Occurrences(indptr, np.asarray(indices)[fires].astype(dtype), n_features)


@dataclass(frozen=True)
class Links:
    """Links from features of one layer to those of another."""

    feature: np.ndarray  # int64
    other: np.ndarray  # int64
    score: np.ndarray  # float64
    support: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.feature)

    def take(self, positions: np.ndarray) -> Links:
        return Links(*(getattr(self, name)[positions] for name in LINK_FIELDS))

    @staticmethod
    def concat(parts: list[Links]) -> Links:
        if not parts:
            return Links(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
        return Links(*(np.concatenate([getattr(p, name) for p in parts]) for name in LINK_FIELDS))


LINK_FIELDS = ("feature", "other", "score", "support")


def npmi(both: np.ndarray, count_a: np.ndarray, count_b: np.ndarray, n_images: int) -> np.ndarray:
    """Normalised PMI of co-occurrence counts (`both` > 0); 1 where the pair occurs on every image."""
    both = np.asarray(both, np.float64)
    joint = both / n_images
    pmi = np.log(both * n_images) - np.log(np.asarray(count_a, np.float64) * np.asarray(count_b, np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        score = pmi / -np.log(joint)
    return np.where(joint >= 1.0, 1.0, np.clip(score, -1.0, 1.0))


def grouping(keys: np.ndarray, n_keys: int) -> np.ndarray:
    """The stable order that sorts `keys` (integers in [0, n_keys)): a counting sort, O(len + n_keys)."""
    marks = sparse.csr_matrix((np.arange(len(keys)), keys, [0, len(keys)]), shape=(1, n_keys))
    return marks.tocsc().data


def _top_in_groups(starts: np.ndarray, score: np.ndarray, other: np.ndarray, n: int) -> np.ndarray:
    """Positions of each group's `n` best entries (groups: contiguous runs beginning at `starts`), by group
    then rank: n passes that each take every group's highest score, ties to the lower `other`. Linear in
    the entries, where a sort would not be."""
    group = np.repeat(np.arange(len(starts), dtype=np.int32), np.diff(np.r_[starts, len(score)]))
    remaining = np.array(score, np.float64)
    picks = []
    for _ in range(n):
        tied = remaining == np.maximum.reduceat(remaining, starts)[group]
        lowest = np.minimum.reduceat(np.where(tied, other, np.iinfo(np.int64).max), starts)
        pick = np.flatnonzero(tied & (other == lowest[group]) & (remaining > -np.inf))
        remaining[pick] = -np.inf
        picks.append(pick)
    positions = np.concatenate(picks)
    rank = np.repeat(np.arange(n), [len(p) for p in picks])
    return positions[np.lexsort((rank, group[positions]))]


def best(links: Links, n: int, n_features: int) -> Links:
    """Each feature's `n` best links, by feature then score descending (ties: the lower other feature);
    `n_features` bounds the features."""
    if not len(links):
        return links
    if np.any(links.feature[1:] < links.feature[:-1]):
        links = links.take(grouping(links.feature, n_features))
    starts = np.flatnonzero(np.r_[True, links.feature[1:] != links.feature[:-1]])
    return links.take(_top_in_groups(starts, links.score, links.other, n))


def _blocks(work: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive row ranges whose summed work stays near `budget` (a single row may exceed it)."""
    total = np.concatenate([[0], np.cumsum(work, dtype=np.int64)])
    start = 0
    while start < len(work):
        stop = int(np.searchsorted(total, total[start] + budget, side="right")) - 1
        stop = min(max(stop, start + 1), len(work))
        yield start, stop
        start = stop


def pair_links(
    a: Occurrences, b: Occurrences, n: int, min_support: int, block_work: int = BLOCK_WORK
) -> tuple[Links, Links]:
    """The `n` best links of each feature of `a` among `b`'s features, and of each of `b`'s among `a`'s:
    pairs with support (images where both occur) at least `min_support` and npmi > 0."""
    if a.n_images != b.n_images:
        raise ValueError(f"occurrences over {a.n_images} and {b.n_images} images cannot be paired")
    by_feature = a.matrix().T.tocsr()  # features of a x images
    by_image = b.matrix()
    count_a, count_b = a.counts(), b.counts()

    def block_links(bounds: tuple[int, int]) -> tuple[Links, Links]:
        start, stop = bounds
        product = by_feature[start:stop] @ by_image
        kept = np.flatnonzero(product.data >= min_support)
        rows = np.searchsorted(product.indptr, kept, side="right") - 1 + start
        cols = product.indices[kept].astype(np.int64)
        both = product.data[kept].astype(np.int64)
        del product
        score = npmi(both, count_a[rows], count_b[cols], a.n_images)
        related = score > 0
        block = Links(rows[related], cols[related], score[related], both[related])
        reverse = Links(block.other, block.feature, block.score, block.support)
        return best(block, n, a.n_features), best(reverse, n, b.n_features)

    per_image_b = max(1, -(-len(b.features) // max(1, b.n_images)))
    blocks = _blocks(np.diff(by_feature.indptr).astype(np.int64) * per_image_b, block_work)
    forward, backward = [], []
    for ahead, behind in map(block_links, blocks):  # one block at a time (scipy's product holds the GIL)
        forward.append(ahead)
        backward.append(behind)
        if sum(map(len, backward)) > 4 * n * b.n_features:  # merged now and then: memory stays O(features)
            backward = [best(Links.concat(backward), n, b.n_features)]
    return Links.concat(forward), best(Links.concat(backward), n, b.n_features)
