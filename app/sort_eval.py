"""The sort evaluation as pages show it (docs/API.md): per layer beside the model card's published value, and
per feature its own score and the trials behind it. Read by `SortEvalQueries` (app/sort_eval_queries.py)."""

from __future__ import annotations

from pydantic import BaseModel

from clipscope_explorer.app.model_card import model_card_row
from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.urls import Urls

FEATURE_TRIALS = 20  # trials a feature page lists


class LayerSortEval(BaseModel):
    """One run kind's result on a layer: accuracy over the answered trials with its 95 % Wilson interval, and the
    controls (`answer_1_rate`: how often the judge answered "1", near 0.5; `null_accuracy`: accuracy with random
    grids, near 0.5). `model_card`: the release's published CLS accuracy of the layer, for a CLS run on an index
    of the released suite; else null."""

    token: str
    judge: str
    accuracy: float | None
    ci_low: float | None
    ci_high: float | None
    trials: int
    answer_1_rate: float | None
    null_accuracy: float | None
    model_card: float | None


class RunKind(BaseModel):
    """A run kind: which token's activations chose the images, and which judge answered."""

    token: str
    judge: str


class FeatureSortEval(RunKind):
    """A feature's own score in one run kind: its trials as the query's owner, `correct` of them right."""

    trials: int
    correct: int
    accuracy: float | None


class SortEvalTrial(RunKind):
    """One trial whose query image belongs to the feature, against the `partner` feature; `answer` is the
    judge's (1 or 2, null when unanswered), `correct` whether it names the feature's grid."""

    kind: str
    partner: int
    partner_url: str
    query_image: int
    query_url: str
    query_thumbnail_url: str | None
    answer: int | None
    correct: bool | None


def layer_sort_eval(index: Index, layer: int) -> list[LayerSortEval]:
    card = model_card_row(layer) if index.meta.get("released_suite") else None
    return [
        LayerSortEval(**row, model_card=card.sort_eval_cls if card and row["token"] == "cls" else None)
        for row in index.sort_eval_runs(layer)
    ]


def feature_sort_eval(index: Index, layer: int, feature: int) -> list[FeatureSortEval]:
    return [
        FeatureSortEval(**row, accuracy=row["correct"] / row["trials"] if row["trials"] else None)
        for row in index.feature_sort_eval(layer, feature)
    ]


def feature_sort_eval_trials(index: Index, urls: Urls, layer: int, feature: int) -> list[SortEvalTrial]:
    rows = index.feature_sort_eval_trials(layer, feature, FEATURE_TRIALS)
    shown = index.images([row["query_image"] for row in rows])  # the images with a thumbnail
    trials = []
    for row in rows:
        first = row["grid1_feature"] == feature
        partner = row["grid2_feature"] if first else row["grid1_feature"]
        answer = row["answer"]
        trials.append(
            SortEvalTrial(
                token=row["token"],
                judge=row["judge"],
                kind=row["kind"],
                partner=partner,
                partner_url=urls.feature(layer, partner),
                query_image=row["query_image"],
                query_url=urls.sample(row["query_image"]),
                query_thumbnail_url=urls.thumbnail(row["query_image"]) if row["query_image"] in shown else None,
                answer=answer,
                correct=None if answer is None else answer == (1 if first else 2),
            )
        )
    return trials
