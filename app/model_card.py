"""The CLIP-Scope model card's published per-layer metrics (shown beside measured ones).

Shown on the overview only when the index says `released_suite` (model and
SAEs are the CLIP-Scope release). The model card's MSE is summed over the
1,024 model dimensions and is consistent with standardised inputs; an index
built on raw activations (`normalisation: none`) measures a different scale.
"""

from __future__ import annotations

from pydantic import BaseModel


class ModelCardRow(BaseModel):
    """One layer's row of the published table; `sort_eval_cls` is null where not published."""

    mse: float
    explained_variance: float
    dead_fraction: float
    active_fraction: float
    sort_eval_cls: float | None


_TABLE = {  # layer: (MSE, explained var., dead prop., active prop., sort-eval acc. on CLS)
    2: (267.95, 0.763, 0.000912, 0.001, None),
    5: (354.46, 0.665, 0.0, 0.0034, None),
    8: (357.58, 0.642, 0.0, 0.01074, None),
    11: (321.23, 0.674, 0.0, 0.0415, 0.7334),
    14: (319.64, 0.689, 0.0, 0.07866, 0.7427),
    17: (261.20, 0.731, 0.0, 0.1477, 0.8689),
    20: (278.06, 0.706, 0.0000763, 0.2036, 0.9149),
    22: (299.96, 0.684, 0.0, 0.1588, 0.8641),
}


def model_card_row(layer: int) -> ModelCardRow | None:
    """The published values for `layer`, or None for a layer the release has no SAE for."""
    values = _TABLE.get(layer)
    if values is None:
        return None
    mse, ev, dead, active, sort_eval = values
    return ModelCardRow(
        mse=mse, explained_variance=ev, dead_fraction=dead, active_fraction=active, sort_eval_cls=sort_eval
    )
