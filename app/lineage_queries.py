"""The SQL that reads lineage across layers (schema 1.4: `lineage`, written by `clipscope-explorer lineage`;
docs/schema.md). Part of `Index` (app/queries.py).

The table may be missing from an older index, or empty: every method then answers "none". A feature's best
link at a layer is its highest-scoring one there, of either source; ties go to `cls`, then the lower feature.
"""

from __future__ import annotations

from clipscope_explorer.precompute.index.schema import select_list

LINK_COLUMNS = select_list("lineage", "other_layer", "other_feature", "source", "score", "support")
LINK_ORDER = "other_layer, score DESC, source, other_feature"


class LineageQueries:
    """Mixed into `Index`, whose `has`, `_dicts`, `_cursor` and `_cached` it uses."""

    def lineage_layers(self) -> frozenset[int]:
        """The layers whose features have lineage rows; cached."""
        if not self.has("lineage"):
            return frozenset()
        return self._cached(
            ("lineage_layers",),
            lambda: frozenset(
                row[0] for row in self._cursor().execute("SELECT DISTINCT layer FROM lineage").fetchall()
            ),
        )

    def lineage_links(self, layer: int, feature: int) -> list[dict]:
        """The feature's links (LINK_COLUMNS), by other layer, then score descending."""
        if layer not in self.lineage_layers():
            return []
        return self._dicts(
            f"SELECT {LINK_COLUMNS} FROM lineage WHERE layer = ? AND feature = ? ORDER BY {LINK_ORDER}",
            [layer, feature],
        )

    def best_lineage_link(self, layer: int, feature: int, other_layer: int) -> dict | None:
        """The feature's best link at `other_layer`, or None."""
        if layer not in self.lineage_layers():
            return None
        rows = self._dicts(
            f"SELECT {LINK_COLUMNS} FROM lineage WHERE layer = ? AND feature = ? AND other_layer = ? "
            f"ORDER BY {LINK_ORDER} LIMIT 1",
            [layer, feature, other_layer],
        )
        return rows[0] if rows else None
