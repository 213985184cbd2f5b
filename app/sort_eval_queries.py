"""The SQL that reads the sort evaluation (schema 1.3: `sort_eval`, `sort_eval_features`, `sort_eval_trials`,
written by `clipscope-explorer evaluate`; docs/schema.md). Part of `Index` (app/queries.py).

The tables may be missing from an older index, or empty: every method then answers "none". A run kind is a
(token, judge) pair; a layer has at most one run of each kind.
"""

from __future__ import annotations

from clipscope_explorer.precompute.index.schema import select_list

RUN_COLUMNS = select_list(
    "sort_eval", "token", "judge", "accuracy", "ci_low", "ci_high", "trials", "answer_1_rate", "null_accuracy"
)
TRIAL_COLUMNS = select_list(
    "sort_eval_trials", "token", "judge", "kind", "seed", "trial", "grid1_feature", "grid2_feature", "query_image"
)


class SortEvalQueries:
    """Mixed into `Index`, whose `has`, `_dicts` and `_cached` it uses."""

    def sort_eval_runs(self, layer: int) -> list[dict]:
        """The layer's `sort_eval` rows (RUN_COLUMNS), by token then judge; cached."""
        if not self.has("sort_eval"):
            return []
        rows = self._cached(
            ("sort_eval",),
            lambda: self._dicts(f"SELECT layer, {RUN_COLUMNS} FROM sort_eval ORDER BY layer, token, judge", []),
        )
        return [{k: v for k, v in row.items() if k != "layer"} for row in rows if row["layer"] == layer]

    def scored_run(self, layer: int) -> tuple[str, str] | None:
        """The run kind (token, judge) whose per-feature scores the layer's feature table shows and sorts
        by: the first by token then judge among those with scores for this layer; None when there are none."""
        if not self.has("sort_eval_features"):
            return None
        return self._cached(("scored_runs",), self._scored_runs).get(layer)

    def _scored_runs(self) -> dict[int, tuple[str, str]]:
        first: dict[int, tuple[str, str]] = {}
        for layer, token, judge in (
            self._cursor()
            .execute("SELECT DISTINCT layer, token, judge FROM sort_eval_features ORDER BY ALL")
            .fetchall()
        ):
            first.setdefault(layer, (token, judge))
        return first

    def scores_source(self, layer: int) -> tuple[str, dict]:
        """A FROM clause of the layer's features with their score in the scored run (`sort_eval`: correct
        over trials, NULL without trials; `sort_eval_trials`), and its parameters."""
        run = self.scored_run(layer)
        if run is None:
            return "(SELECT *, NULL::DOUBLE AS sort_eval, NULL::INTEGER AS sort_eval_trials FROM features)", {}
        return (
            "features LEFT JOIN (SELECT feature, sum(correct)::DOUBLE / sum(trials) AS sort_eval, "
            "sum(trials)::INTEGER AS sort_eval_trials FROM sort_eval_features WHERE layer = $layer "
            "AND token = $eval_token AND judge = $eval_judge GROUP BY feature HAVING sum(trials) > 0) USING (feature)"
        ), {"eval_token": run[0], "eval_judge": run[1]}

    def feature_sort_eval(self, layer: int, feature: int) -> list[dict]:
        """The feature's own scores (token, judge, trials, correct), one per run kind, by token then judge."""
        if not self.has("sort_eval_features"):
            return []
        return self._dicts(
            "SELECT token, judge, sum(trials)::INTEGER AS trials, sum(correct)::INTEGER AS correct "
            "FROM sort_eval_features WHERE layer = ? AND feature = ? GROUP BY token, judge ORDER BY token, judge",
            [layer, feature],
        )

    def feature_sort_eval_trials(self, layer: int, feature: int, limit: int) -> list[dict]:
        """Up to `limit` trials whose query belongs to the feature (kinds `feature`, then `pairs`), by token and
        judge, the last seed and trial first; with `answer` (1, 2 or None)."""
        if not self.has("sort_eval_trials"):
            return []
        return self._dicts(
            f"SELECT {TRIAL_COLUMNS}, answer::INTEGER AS answer FROM sort_eval_trials "
            "WHERE layer = ? AND query_feature = ? AND kind IN ('feature', 'pairs') "
            "ORDER BY token, judge, kind = 'feature' DESC, seed DESC, trial DESC LIMIT ?",
            [layer, feature, limit],
        )
