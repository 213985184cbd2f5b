"""Sort evaluation, the release's protocol: can a judge tell, from two features' top images, which of the two
a new image belongs to?

A trial takes two different live features A and B, each shown as a grid of its 9 top images. The query is
drawn at random from the images on which one of them (chosen at random, each with probability 1/2) fires,
excluding both grids' images and every image on which the other one fires; which feature is grid 1 is
random too. The judge answers which grid the query belongs to; accuracy over trials (chance 0.5) with a
95 % Wilson interval. A pair with no eligible query is replaced by another random pair and counted.

Token modes: `cls`, activation on the CLS token (the release's setting and the model card's column): the
top lists and who fires where come exactly from `sample_codes`, the CLS token's kept latents of every
sample image (a TopK SAE's activation is 0 wherever a feature is not kept, so the codes are complete).
`image`, activation as the index defines it (max over all tokens): see image_firing.py.

Controls, run with every evaluation: the rate of answer 1 (grid order is random, so near 0.5) and a null run
that repeats the trials with both grids replaced by random sample images (accuracy near 0.5).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from clipscope_explorer.precompute.evaluate.judging import Trial

GRID = 9
QUERY_DRAWS = 32  # random draws of a query before the eligible ones are listed exactly
PARTNER_DRAWS = 8  # per-feature trials: partners tried before a trial is given up
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Firing:
    """Per feature, the sample images it fires on, strongest first (ties: smaller image id), as CSR arrays;
    `by_id` holds each feature's images sorted by id, for membership."""

    offsets: np.ndarray  # [F + 1] int64
    images: np.ndarray  # [nnz] int64
    by_id: np.ndarray  # [nnz] int64

    @property
    def n_features(self) -> int:
        return len(self.offsets) - 1

    def count(self, feature: int) -> int:
        return int(self.offsets[feature + 1] - self.offsets[feature])

    def images_of(self, feature: int) -> np.ndarray:
        return self.images[self.offsets[feature] : self.offsets[feature + 1]]

    def top(self, feature: int) -> tuple[int, ...]:
        return tuple(int(i) for i in self.images_of(feature)[:GRID])

    def fires(self, feature: int, image: int) -> bool:
        ids = self.by_id[self.offsets[feature] : self.offsets[feature + 1]]
        at = int(np.searchsorted(ids, image))
        return at < len(ids) and ids[at] == image

    def live(self) -> np.ndarray:
        """Features that fire on at least one sample image, ascending."""
        return np.flatnonzero(np.diff(self.offsets) > 0)

    def eligible(self, owner: int, other: int) -> np.ndarray:
        """Every eligible query: `owner` fires on it, `other` does not, and neither grid shows it."""
        other_images = np.union1d(self.images_of(other), np.asarray(self.top(other), np.int64))
        return np.setdiff1d(self.images_of(owner)[GRID:], other_images)


def firing_from_codes(images: np.ndarray, features: np.ndarray, values: np.ndarray, n_features: int) -> Firing:
    """Firing from kept latents, one entry per (image, latent): a latent fires when its value is > 0."""
    images, features = np.asarray(images, np.int64), np.asarray(features, np.int64)
    values = np.asarray(values, np.float32)
    keep = values > 0
    images, features, values = images[keep], features[keep], values[keep]
    order = np.lexsort((images, -values, features))
    offsets = np.zeros(n_features + 1, np.int64)
    np.cumsum(np.bincount(features, minlength=n_features), out=offsets[1:])
    by_id = images[np.lexsort((images, features))]
    return Firing(offsets, images[order], by_id)


def cls_firing(con, layer: int, n_features: int) -> Firing:
    """The CLS token's firing at `layer`, from the index's `sample_codes`."""
    flat = con.execute(
        "SELECT image_id, unnest(indices) AS feature, unnest(activations) AS value FROM sample_codes WHERE layer = ?",
        [layer],
    ).fetchnumpy()
    return firing_from_codes(flat["image_id"], flat["feature"], flat["value"], n_features)


# ---- planning trials ----


@dataclass(frozen=True)
class PlannedTrial:
    kind: str  # "pairs", "null" or "feature"
    seed: int
    trial: int
    grid1_feature: int
    grid2_feature: int
    query_feature: int  # the feature the query belongs to: the right answer is its grid
    trial_images: Trial

    @property
    def right_answer(self) -> int:
        return 1 if self.query_feature == self.grid1_feature else 2


def draw_query(firing: Firing, owner: int, other: int, rng: np.random.Generator) -> int | None:
    """A query image at random among those on which `owner` fires, outside both grids, where `other` does
    not fire; None when there is none. Random draws first (accepting an eligible draw keeps the choice
    uniform over the eligible images), then the exact list."""
    candidates = firing.images_of(owner)[GRID:]
    if len(candidates) == 0:
        return None
    grid = set(firing.top(other))
    for _ in range(QUERY_DRAWS):
        image = int(candidates[rng.integers(len(candidates))])
        if image not in grid and not firing.fires(other, image):
            return image
    eligible = firing.eligible(owner, other)
    return int(eligible[rng.integers(len(eligible))]) if len(eligible) else None


def _trial(firing: Firing, kind: str, seed: int, number: int, owner: int, other: int, query: int, rng) -> PlannedTrial:
    first, second = (owner, other) if rng.integers(2) == 0 else (other, owner)
    images = Trial(firing.top(first), firing.top(second), query)
    return PlannedTrial(kind, seed, number, first, second, owner, images)


def plan_pairs(
    firing: Firing, features: np.ndarray, pairs: int, seed: int, run_seed: int
) -> tuple[list[PlannedTrial], int]:
    """`pairs` trials among `features` for one seed, and how many pairs were replaced for want of a query.
    Gives up (fewer trials) after 50 x `pairs` replacements: the features then rarely share no image."""
    rng = np.random.default_rng([run_seed, seed])
    trials: list[PlannedTrial] = []
    replaced = 0
    if len(features) < 2:
        return trials, replaced
    while len(trials) < pairs and replaced < 50 * pairs:
        a, b = (int(f) for f in rng.choice(features, 2, replace=False))
        owner, other = (a, b) if rng.integers(2) == 0 else (b, a)
        query = draw_query(firing, owner, other, rng)
        if query is None:
            replaced += 1
            continue
        trials.append(_trial(firing, "pairs", seed, len(trials), owner, other, query, rng))
    return trials, replaced


def plan_per_feature(
    firing: Firing, features: np.ndarray, per_feature: int, run_seed: int
) -> tuple[list[PlannedTrial], int]:
    """`per_feature` trials whose query belongs to each of `features`, against random partners among them;
    a trial whose partners (PARTNER_DRAWS tried) all leave no eligible query is given up and counted."""
    rng = np.random.default_rng([run_seed, 1_000_003])
    trials: list[PlannedTrial] = []
    given_up = 0
    if len(features) < 2:
        return trials, given_up
    for owner in features.tolist():
        for number in range(per_feature):
            for _ in range(PARTNER_DRAWS):
                other = int(features[rng.integers(len(features))])
                query = None if other == owner else draw_query(firing, owner, other, rng)
                if query is not None:
                    trials.append(_trial(firing, "feature", 0, number, owner, other, query, rng))
                    break
            else:
                given_up += 1
    return trials, given_up


def null_trials(trials: list[PlannedTrial], n_samples: int, run_seed: int) -> list[PlannedTrial]:
    """The same trials with both grids replaced by random sample images (other than the query)."""
    rng = np.random.default_rng([run_seed, 2_000_003])
    out = []
    for planned in trials:
        grids = []
        for _ in range(2):
            draw = rng.choice(n_samples - 1, size=min(GRID, n_samples - 1), replace=False)
            grids.append(tuple(int(i + (i >= planned.trial_images.query)) for i in draw))  # skip the query
        images = Trial(grids[0], grids[1], planned.trial_images.query)
        out.append(
            PlannedTrial(
                "null",
                planned.seed,
                planned.trial,
                planned.grid1_feature,
                planned.grid2_feature,
                planned.query_feature,
                images,
            )
        )
    return out


# ---- scoring ----


def wilson(correct: int, trials: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (0, 1 when there are no trials)."""
    if trials == 0:
        return 0.0, 1.0
    p = correct / trials
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = Z95 * np.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Score:
    trials: int  # answered
    correct: int
    unanswered: int
    answer_1: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.trials if self.trials else None

    @property
    def answer_1_rate(self) -> float | None:
        return self.answer_1 / self.trials if self.trials else None


def score(trials: list[PlannedTrial], answers: list[int | None]) -> Score:
    answered = [(t, a) for t, a in zip(trials, answers) if a in (1, 2)]
    return Score(
        trials=len(answered),
        correct=sum(a == t.right_answer for t, a in answered),
        unanswered=len(trials) - len(answered),
        answer_1=sum(a == 1 for _, a in answered),
    )


def per_feature_scores(trials: list[PlannedTrial], answers: list[int | None]) -> Iterator[tuple[int, int, int]]:
    """(feature, answered trials, correct) for each feature that owns a query of `trials`, by feature."""
    tally: dict[int, list[int]] = {}
    for planned, answer in zip(trials, answers):
        if answer in (1, 2):
            entry = tally.setdefault(planned.query_feature, [0, 0])
            entry[0] += 1
            entry[1] += answer == planned.right_answer
    for feature in sorted(tally):
        yield feature, tally[feature][0], tally[feature][1]
