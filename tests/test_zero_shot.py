"""Zero-shot labels and their vocabulary against independent expectations: planted directions, a brute-force
per-feature reference, hand-computed excesses, and brute-force caption counts."""

from collections import Counter

import numpy as np
import pytest

from clipscope_explorer.precompute.labels import STOPWORDS, WORD, caption_terms
from clipscope_explorer.precompute.zero_shot import (
    FALSE_LABEL_RATE,
    SD_FLOOR,
    CaptionTermCounter,
    NullBaseline,
    caption_vocabulary,
    null_baseline,
    read_user_vocabulary,
    zero_shot_labels,
)

# ---- labels ----


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class World:
    """Random unit term vectors; null prototypes are random mixtures of all terms."""

    def __init__(self, seed=0, d=64, n_terms=300, n_null=400):
        self.rng = np.random.default_rng(seed)
        self.terms = [f"t{i}" for i in range(n_terms)]
        self.vectors = unit(self.rng.standard_normal((n_terms, d))).astype(np.float32)
        self.nulls = self.mixtures(n_null)

    def mixtures(self, n):
        weights = self.rng.dirichlet(np.full(len(self.terms), 0.5), n)
        noise = 0.05 * self.rng.standard_normal((n, self.vectors.shape[1]))
        return unit(weights @ self.vectors + noise).astype(np.float32)

    def near(self, *term_indices, noise=0.5):
        direction = self.vectors[list(term_indices)].sum(axis=0)
        return unit(direction + noise * unit(self.rng.standard_normal(direction.shape))).astype(np.float32)


def reference_labels(prototypes, vectors, terms, nulls, max_labels, rate):
    """The rule written out per feature in float64: rank terms by excess over their null; the threshold is the
    smallest null maximum that at most `rate` of the null prototypes' best excesses lie above; the labels are
    the best `max_labels` terms above it."""
    vectors = unit(vectors.astype(np.float64))
    nulls = unit(nulls.astype(np.float64))
    null_scores = nulls @ vectors.T
    mean = null_scores.mean(axis=0)
    sd = np.maximum(null_scores.std(axis=0, ddof=1), SD_FLOOR)
    null_best = sorted(((null_scores - mean) / sd).max(axis=1))
    threshold = next(t for t in null_best if sum(b > t for b in null_best) <= rate * len(null_best))
    out = []
    for prototype in prototypes.astype(np.float64):
        if not np.isfinite(prototype).all() or not prototype.any():
            out.append([])
            continue
        score = vectors @ (prototype / np.linalg.norm(prototype))
        excess = (score - mean) / sd
        order = sorted(range(len(terms)), key=lambda v: (-excess[v], v))[:max_labels]
        out.append([(terms[v], score[v], excess[v] - threshold) for v in order if excess[v] > threshold])
    return out


def assert_same_labels(got, expected):
    assert [[t for t, _, _ in row] for row in got] == [[t for t, _, _ in row] for row in expected]
    for got_row, expected_row in zip(got, expected):
        for (_, score, margin), (_, ref_score, ref_margin) in zip(got_row, expected_row):
            assert score == pytest.approx(ref_score, abs=1e-4)
            assert margin == pytest.approx(ref_margin, abs=1e-3)


def test_planted_terms_are_labelled_and_random_features_are_not():
    world = World()
    singles = [world.near(i) for i in range(30)]
    pairs = [world.near(i, i + 1, noise=0.3) for i in range(30, 60, 2)]
    labels = zero_shot_labels(np.stack(singles + pairs), world.vectors, world.terms, world.nulls, 5)
    assert [row[0][0] if row else None for row in labels[:30]] == world.terms[:30]
    assert [sorted(t for t, _, _ in row[:2]) for row in labels[30:]] == [
        [f"t{i}", f"t{i + 1}"] for i in range(30, 60, 2)
    ]
    for row in labels:
        assert all(margin > 0 for _, _, margin in row)
    # features drawn like the null prototypes get any label about as often as the rate says: 400 null
    # prototypes set the threshold, so the rate of 2,000 fresh ones lies within a few binomial sd of it
    random_features = zero_shot_labels(world.mixtures(2000), world.vectors, world.terms, world.nulls, 5)
    rate = np.mean([bool(row) for row in random_features])
    assert FALSE_LABEL_RATE - 0.03 <= rate <= FALSE_LABEL_RATE + 0.03, rate


def test_missing_prototypes_get_no_labels():
    world = World(seed=1)
    prototypes = np.stack([world.near(3), np.zeros(64, np.float32), np.full(64, np.nan, np.float32), world.near(4)])
    labels = zero_shot_labels(prototypes, world.vectors, world.terms, world.nulls, 3)
    assert labels[1] == [] and labels[2] == []
    assert labels[0][0][0] == "t3" and labels[3][0][0] == "t4"


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, None])
def test_chunked_vectorised_labels_equal_the_per_feature_reference(chunk_rows):
    world = World(seed=2, d=32, n_terms=80, n_null=200)
    rng = np.random.default_rng(3)
    prototypes = np.concatenate(
        [
            np.stack([world.near(*rng.choice(80, rng.integers(1, 4), replace=False)) for _ in range(60)]),
            world.mixtures(30),
            np.zeros((2, 32), np.float32),
        ]
    )
    prototypes[5, 3] = np.nan
    for max_labels, rate in [(5, FALSE_LABEL_RATE), (1, 0.01), (3, 0.2)]:
        got = zero_shot_labels(
            prototypes.astype(np.float16),  # stored prototypes are float16; scoring converts per chunk
            world.vectors,
            world.terms,
            world.nulls,
            max_labels,
            false_label_rate=rate,
            chunk_rows=chunk_rows,
        )
        expected = reference_labels(
            prototypes.astype(np.float16), world.vectors, world.terms, world.nulls, max_labels, rate
        )
        assert_same_labels(got, expected)
        assert sum(map(bool, got)) >= 20  # the comparison is not vacuous


def hand_baseline(threshold):
    """Orthonormal term vectors with null mean 0 and sd 0.05: a feature's excess is 20 x its coordinate."""
    return NullBaseline(np.zeros(4, np.float32), np.full(4, 0.05, np.float32), threshold, 0.05, 100)


@pytest.mark.parametrize(
    "coordinates, max_labels, expected",
    [
        # excesses 10, 2, 1, 0 against a threshold of 2.5: one term, 7.5 above it
        ([0.5, 0.1, 0.05, 0.0], 3, [("a", 0.5, 7.5)]),
        # 10, 9.6, 2, 1: near-synonyms labelled together
        ([0.5, 0.48, 0.1, 0.05], 3, [("a", 0.5, 7.5), ("b", 0.48, 7.1)]),
        # 10, 9.4, 8.8, 8.2: all pass; at most max_labels, best first
        ([0.5, 0.47, 0.44, 0.41], 3, [("a", 0.5, 7.5), ("b", 0.47, 6.9), ("c", 0.44, 6.3)]),
        ([0.5, 0.47, 0.44, 0.41], 1, [("a", 0.5, 7.5)]),
        # 2.4: below the threshold
        ([0.12, 0.02, 0.0, 0.0], 3, []),
        # ranked by excess, not by term order
        ([0.1, 0.3, 0.0, 0.2], 3, [("b", 0.3, 3.5), ("d", 0.2, 1.5)]),
    ],
)
def test_labels_are_the_best_terms_above_the_threshold(coordinates, max_labels, expected):
    terms = ["a", "b", "c", "d"]
    prototype = np.array([[*coordinates, np.sqrt(1 - np.sum(np.square(coordinates)))]], np.float32)
    vectors = np.eye(5, dtype=np.float32)[:4]
    labels = zero_shot_labels(prototype, vectors, terms, None, max_labels, baseline=hand_baseline(2.5))[0]
    assert [t for t, _, _ in labels] == [t for t, _, _ in expected]
    for (_, score, margin), (_, want_score, want_margin) in zip(labels, expected):
        assert score == pytest.approx(want_score, abs=1e-5)
        assert margin == pytest.approx(want_margin, abs=1e-4)


def test_null_baseline_is_each_terms_mean_sd_and_the_null_maxima_quantile():
    world = World(seed=4, d=16, n_terms=20, n_null=50)
    baseline = null_baseline(world.vectors, np.concatenate([world.nulls, np.zeros((3, 16), np.float32)]), 0.1)
    scores = unit(world.nulls.astype(np.float64)) @ unit(world.vectors.astype(np.float64)).T
    assert baseline.n_null == 50
    np.testing.assert_allclose(baseline.mean, scores.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(baseline.sd, scores.std(axis=0, ddof=1), rtol=1e-4)
    best = np.sort(((scores - scores.mean(axis=0)) / scores.std(axis=0, ddof=1)).max(axis=1))
    assert baseline.threshold == pytest.approx(best[-6], rel=1e-4)  # 5 of 50 (10 %) lie above it
    assert (best > baseline.threshold + 1e-4).sum() == 5


def test_bad_label_inputs_are_refused_clearly():
    world = World(seed=5, d=8, n_terms=10, n_null=20)
    prototypes = world.mixtures(2)
    with pytest.raises(ValueError, match="two valid null prototypes"):
        zero_shot_labels(prototypes, world.vectors, world.terms, world.nulls[:1], 3)
    with pytest.raises(ValueError, match="one row per term"):
        zero_shot_labels(prototypes, world.vectors, world.terms[:-1], world.nulls, 3)
    vectors = world.vectors.copy()
    vectors[2] = 0
    with pytest.raises(ValueError, match="'t2' has no usable text embedding"):
        zero_shot_labels(prototypes, vectors, world.terms, world.nulls, 3)
    with pytest.raises(ValueError, match="false_label_rate"):
        zero_shot_labels(prototypes, world.vectors, world.terms, world.nulls, 3, false_label_rate=0.5)
    assert zero_shot_labels(prototypes, world.vectors, world.terms, world.nulls, 0) == [[], []]
    assert zero_shot_labels(np.zeros((0, 8), np.float32), world.vectors, world.terms, world.nulls, 3) == []


# ---- vocabulary from captions ----

CAPTIONS = [
    "A red circle on a blue square",
    "red circle, blue square!",
    "The red circle and the Red Circle",  # one caption: counts once
    "Stock photo of a red circle",  # "photo" is a stopword: no "stock photo", no "photo red"
    "a man in a hat",  # short words between: no "man hat"
    "man hat sale",
    "Man hat",
    "dog's toy -- dog's toy; dog's-toy",
    None,
    "",
    "blue square. red circle",  # the full stop breaks "square red"
    "#red circle 2024 blue square",
    "über red circle",
    "band the' red- circle",  # "the'" is a word (as in caption_terms) but a stopword once stripped
]


def brute_force_terms(caption):
    """Words per labels.caption_terms; phrases by splitting on whitespace: two neighbouring pieces that are
    each exactly one WORD match, neither a stopword."""
    if not caption:
        return set()
    pieces = caption.lower().split()
    phrases = set()
    for left, right in zip(pieces, pieces[1:]):
        left_words, right_words = WORD.findall(left), WORD.findall(right)
        if not left_words or not right_words or not left.endswith(left_words[-1]):
            continue
        if not right.startswith(right_words[0]):
            continue
        a, b = left_words[-1], right_words[0]
        if {a, b, a.strip("'-"), b.strip("'-")} & STOPWORDS:
            continue
        phrases.add(a.strip("'-") + " " + b.strip("'-"))
    return caption_terms(caption) | phrases


def brute_force_vocabulary(captions, min_count, max_terms):
    counts = Counter(term for caption in captions for term in brute_force_terms(caption))
    ranked = sorted(((t, n) for t, n in counts.items() if n >= min_count), key=lambda item: (-item[1], item[0]))
    return ranked[:max_terms]


def test_vocabulary_counts_distinct_captions_with_the_phrase_rules():
    vocabulary = dict(caption_vocabulary(CAPTIONS, 1, 1000))
    assert vocabulary["red circle"] == 8 and vocabulary["red"] == 8
    assert vocabulary["blue square"] == 4
    assert vocabulary["man hat"] == 2 and vocabulary["hat sale"] == 1
    assert vocabulary["dog's toy"] == 1 and vocabulary["dog's-toy"] == 1
    assert vocabulary["ber red"] == 1  # non-Latin letters split words exactly as labels.WORD does
    for absent in (
        "stock photo",
        "photo red",
        "square red",
        "circle blue",
        "the red",
        "circle and",
        "photo",
        "band the",
        "the red",
    ):
        assert absent not in vocabulary


@pytest.mark.parametrize("min_count, max_terms", [(1, 1000), (2, 1000), (2, 3), (4, 2), (9, 10), (1, 0)])
def test_vocabulary_equals_a_brute_force_count(min_count, max_terms):
    assert caption_vocabulary(CAPTIONS, min_count, max_terms) == brute_force_vocabulary(CAPTIONS, min_count, max_terms)


def random_captions(seed, n):
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "circle", "square", "the", "a", "of", "dog", "cat", "photo", "on", "big"]
    words += ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 5)) for _ in range(300)]
    weights = np.r_[np.full(13, 30.0), np.ones(300)]
    weights /= weights.sum()
    separators = [" ", " ", " ", ", ", ". ", " - "]
    captions = []
    for _ in range(n):
        tokens = rng.choice(words, rng.integers(0, 9), p=weights)
        captions.append("".join(t + separators[rng.integers(len(separators))] for t in tokens).strip())
    return captions


@pytest.mark.parametrize("min_count, max_terms", [(3, 200), (2, 10**4)])
def test_vocabulary_of_random_captions_equals_a_brute_force_count(min_count, max_terms):
    captions = random_captions(6, 3000)
    expected = brute_force_vocabulary(captions, min_count, max_terms)
    assert caption_vocabulary(iter(captions), min_count, max_terms) == expected
    assert sum(" " in term for term, _ in expected) >= (1 if max_terms == 200 else 50)


@pytest.mark.parametrize("max_tracked", [150, 500])
def test_pruned_counting_stays_within_its_stated_bound(max_tracked):
    captions = random_captions(7, 4000)
    exact = Counter(term for caption in captions for term in brute_force_terms(caption))
    counter = CaptionTermCounter(max_tracked)
    for caption in captions:
        counter.add(caption)
        assert len(counter.counts) <= max_tracked
    assert counter.floor > 0  # pruning happened
    for term, true in exact.items():
        got = counter.count(term)
        assert got <= true
        if term in counter.counts:
            assert true <= got + counter.slack.get(term, 0)
        else:
            assert true <= counter.floor
    min_count = 5
    reported = dict(counter.terms(min_count, 10**6))
    assert all(n >= min_count and n <= exact[t] for t, n in reported.items())
    assert {t for t, n in exact.items() if n >= min_count + counter.floor} <= set(reported)


# ---- user vocabulary ----


def test_user_vocabulary_reads_terms(tmp_path):
    path = tmp_path / "terms.txt"
    path.write_text(
        "\ufeff# colours\nred circle\n\n  dog   ears \nRed Circle\n\t# indented comment\nc#\nrust on metal\n"
    )
    assert read_user_vocabulary(path) == ["red circle", "dog ears", "c#", "rust on metal"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such vocabulary file"),
        ("dir", "is a directory"),
        (b"red\n\xff\xfe circle\n", "not UTF-8 text"),
        (b"", "holds no terms"),
        (b"# only a comment\n\n   \n", "holds no terms"),
        ("ok\n" + "x" * 101 + "\n", "line 2: a term is longer than 100 characters"),
        ("ok\nbad\x07term\n", "line 2: a term holds a control"),
    ],
)
def test_user_vocabulary_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "vocabulary.txt"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as error:
        read_user_vocabulary(path)
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text
