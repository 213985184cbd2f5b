"""The SQL that reads the occlusion faithfulness of the heatmaps (schema 1.4: `faithfulness`,
`faithfulness_examples`, written by `clipscope-explorer evaluate --faithfulness`; docs/schema.md). Part of `Index`
(app/queries.py).

Either table may be missing from an older index, or hold no rows for a layer: every method then answers "none".
"""

from __future__ import annotations

from clipscope_explorer.precompute.index.schema import select_list

FEATURE_COLUMNS = select_list("faithfulness", "examples", "hot_drop", "random_drop", "kept", "score")
EXAMPLE_COLUMNS = select_list(
    "faithfulness_examples", "rank", "image_id", "n_hot", "before", "hot", "random", "insertion"
)


class FaithfulnessQueries:
    """Mixed into `Index`, whose `has`, `_dicts`, `_cursor` and `_cached` it uses."""

    def faithfulness_layers(self) -> frozenset[int]:
        """The layers with evaluated features; cached."""
        if not self.has("faithfulness"):
            return frozenset()
        return self._cached(
            ("faithfulness_layers",),
            lambda: frozenset(
                row[0] for row in self._cursor().execute("SELECT DISTINCT layer FROM faithfulness").fetchall()
            ),
        )

    def feature_faithfulness(self, layer: int, feature: int) -> dict | None:
        """The feature's `faithfulness` row (FEATURE_COLUMNS), or None when it was not evaluated."""
        if layer not in self.faithfulness_layers():
            return None
        rows = self._dicts(
            f"SELECT {FEATURE_COLUMNS} FROM faithfulness WHERE layer = ? AND feature = ?", [layer, feature]
        )
        return rows[0] if rows else None

    def faithfulness_examples(self, layer: int, feature: int) -> list[dict]:
        """The feature's evaluated examples (EXAMPLE_COLUMNS) by rank."""
        if not self.has("faithfulness_examples"):
            return []
        return self._dicts(
            f"SELECT {EXAMPLE_COLUMNS} FROM faithfulness_examples WHERE layer = ? AND feature = ? ORDER BY rank",
            [layer, feature],
        )

    def layer_faithfulness(self, layer: int) -> list[dict]:
        """`hot_drop`, `random_drop` and `score` of every evaluated feature of the layer, by feature; cached."""
        if layer not in self.faithfulness_layers():
            return []
        return self._cached(
            ("layer_faithfulness", layer),
            lambda: self._dicts(
                "SELECT hot_drop, random_drop, score FROM faithfulness WHERE layer = ? ORDER BY feature", [layer]
            ),
        )

    def layer_faithfulness_means(self, layer: int) -> dict | None:
        """How many features of the layer were evaluated (`features`) and their `mean_score`, `mean_hot_drop`
        and `mean_random_drop`, or None when none was; cached."""
        if layer not in self.faithfulness_layers():
            return None
        return self._cached(
            ("layer_faithfulness_means", layer),
            lambda: self._dicts(
                "SELECT COUNT(*) AS features, AVG(score) AS mean_score, AVG(hot_drop) AS mean_hot_drop, "
                "AVG(random_drop) AS mean_random_drop FROM faithfulness WHERE layer = ?",
                [layer],
            )[0],
        )

    def with_faithfulness(self, layer: int, source: str) -> str:
        """The FROM clause `source` (the layer's features) with each one's score as `faithfulness` (NULL when it
        was not evaluated); it uses the query's `$layer`."""
        if layer not in self.faithfulness_layers():
            return f"(SELECT *, NULL::DOUBLE AS faithfulness FROM {source})"
        return (
            f"{source} LEFT JOIN (SELECT feature, score AS faithfulness FROM faithfulness WHERE layer = $layer) "
            "AS faithful USING (feature)"
        )
