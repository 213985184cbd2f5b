"""Who fires where in the `image` token mode (a feature's activation is its largest value over all tokens, the
index's definition), for the sort evaluation.

The index keeps, per feature, its top images and samples of the images it fires on in lower activation bands
(`examples`), not every image it fires on. So: a feature's grid is its 9 top images; its candidate queries
are its other examples (the rest of its top list and its band samples, which are drawn from the images it
fires on weighted by activation: queries lean towards strong activations more than a uniform draw would);
and whether the other feature fires on a candidate is known exactly by encoding that image again with the
index's model and SAE (`index_model.py`), once per image, when a draw needs it and its examples do not say.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from clipscope_explorer.precompute.evaluate.sort_eval import GRID


class ImageFiring:
    """The `Firing` interface over the index's examples, with exact firing by re-encoding (`fires_on`:
    image_id -> the layer's features with a positive value on some token, sorted)."""

    def __init__(self, con, layer: int, n_features: int, fires_on: Callable[[int], np.ndarray]):
        rows = con.execute(
            "SELECT feature, image_id FROM examples WHERE layer = ? "
            "ORDER BY feature, kind = 'band', band, rank, image_id",
            [layer],
        ).fetchnumpy()
        features = rows["feature"].astype(np.int64)
        self.images = rows["image_id"].astype(np.int64)
        self.offsets = np.zeros(n_features + 1, np.int64)
        np.cumsum(np.bincount(features, minlength=n_features), out=self.offsets[1:])
        self.known = {(int(f), int(i)) for f, i in zip(features, self.images)}
        self.fires_on = fires_on
        self.encoded: dict[int, np.ndarray] = {}

    def images_of(self, feature: int) -> np.ndarray:
        return self.images[self.offsets[feature] : self.offsets[feature + 1]]

    def top(self, feature: int) -> tuple[int, ...]:
        return tuple(int(i) for i in self.images_of(feature)[:GRID])

    def live(self) -> np.ndarray:
        return np.flatnonzero(np.diff(self.offsets) > 0)

    def fires(self, feature: int, image: int) -> bool:
        if (feature, image) in self.known:
            return True
        if image not in self.encoded:
            self.encoded[image] = self.fires_on(image)
        found = self.encoded[image]
        at = int(np.searchsorted(found, feature))
        return at < len(found) and found[at] == feature

    def eligible(self, owner: int, other: int) -> np.ndarray:
        grid = set(self.top(other))
        return np.array(
            [i for i in self.images_of(owner)[GRID:].tolist() if i not in grid and not self.fires(other, i)],
            np.int64,
        )
