"""CLIP-Scope Explorer: a feature explorer for vision sparse autoencoders.

`from clipscope_explorer import open_index` opens an index in Python (docs/python.md). It is imported on first
use, so `import clipscope_explorer` (the CLI's start) loads neither DuckDB nor the web framework.
"""

from __future__ import annotations

__all__ = ["open_index"]


def __getattr__(name: str):
    if name == "open_index":
        from clipscope_explorer.index_api import open_index

        return open_index
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
