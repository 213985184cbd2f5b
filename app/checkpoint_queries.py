"""The SQL that reads the SAEs' training checkpoints (schema 1.4: `checkpoints` and `checkpoint_matches`, written
by `clipscope-explorer checkpoints`; docs/schema.md). Part of `Index` (app/queries.py).

Either table may be missing from an older index, or hold no rows for a layer: every method then answers "none".
"""

from __future__ import annotations

from clipscope_explorer.precompute.index.schema import select_list

FIRST_SEEN_COSINE = 0.9  # a feature "exists" at a checkpoint whose best match has a decoder cosine above this
CHECKPOINT_COLUMNS = select_list(
    "checkpoints",
    "tokens",
    "mse",
    "explained_variance",
    "mse_raw",
    "explained_variance_raw",
    "l0",
    "dead_fraction",
    "mse_by_position",
    "n_images",
)


class CheckpointQueries:
    """Mixed into `Index`, whose `has`, `_dicts`, `_cursor` and `_cached` it uses."""

    def checkpoints(self, layer: int) -> list[dict]:
        """The layer's `checkpoints` rows (CHECKPOINT_COLUMNS) in training order; cached."""
        if not self.has("checkpoints"):
            return []
        rows = self._cached(
            ("checkpoints",),
            lambda: self._dicts(f"SELECT layer, {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY layer, tokens", []),
        )
        return [{k: v for k, v in row.items() if k != "layer"} for row in rows if row["layer"] == layer]

    def first_seen(self, layer: int, feature: int) -> dict | None:
        """{"tokens", "cosine"}: the earliest checkpoint from which on the feature's best match has a cosine above
        FIRST_SEEN_COSINE at every later checkpoint (`cosine`: the match's at that checkpoint); None when its
        match at the last earlier checkpoint is below it, or there are no matches."""
        if not self.has("checkpoint_matches"):
            return None
        rows = (
            self._cursor()
            .execute(
                "SELECT tokens, cosine FROM checkpoint_matches WHERE layer = ? AND feature = ? ORDER BY tokens DESC",
                [layer, feature],
            )
            .fetchall()
        )
        found = None
        for tokens, cosine in rows:
            if cosine is None or cosine <= FIRST_SEEN_COSINE:
                break
            found = {"tokens": int(tokens), "cosine": float(cosine)}
        return found
