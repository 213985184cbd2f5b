"""What every sort-evaluation judge answers: a trial shows two features' grids of top images and one query
image, and the judge says which feature the query belongs to.

A judge takes trials in bulk (`answer`), so that one that calls a service can run requests concurrently and
one that compares embeddings can vectorise; it answers 1 (the query belongs to grid 1), 2, or None when it
could not answer (a service that kept failing, an answer without `ANSWER: 1` or `ANSWER: 2`). `report()`
says what answering cost and what went wrong, for the run's record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Trial:
    """Sample image ids (`samples.image_id`): grid 1 and grid 2 (9 each: shown 3 x 3), and the query."""

    grid1: tuple[int, ...]
    grid2: tuple[int, ...]
    query: int


class Judge(Protocol):
    name: str  # recorded with the results: "embedding" or "openai"
    model: str | None  # what judged: the embedding model or the chat model's name

    def answer(self, trials: Sequence[Trial]) -> list[int | None]:
        """One answer per trial, in order: 1, 2, or None (unanswered)."""
        ...

    def report(self) -> dict[str, int]:
        """Counts so far, e.g. {"requests": 900, "prompt_tokens": ..., "unparseable": 2, "failed": 1}."""
        ...
