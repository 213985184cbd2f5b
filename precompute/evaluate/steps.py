"""`precompute --evaluate`: every step that adds to a built index, in turn, each rewriting it atomically: the
sort evaluation (embedding judge, with per-feature scores), lineage across layers (two layers or more), the
SAEs' training checkpoints (when a source holds several) and occlusion faithfulness (a random sample of
features per layer: every feature of a full-size SAE costs hours of GPU; `evaluate --faithfulness` without
`--sample` does them all)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

PER_FEATURE_TRIALS = 4
FAITHFULNESS = {"sample": 256, "top": 4, "draws": 8}
DEMO_FAITHFULNESS = {"sample": 48, "top": 2, "draws": 4}  # within the demo's time budget


def evaluate_index(index: Path, n_layers: int, device: str, demo: bool, progress: bool) -> None:
    from clipscope_explorer.precompute.evaluate.checkpoints import CheckpointOptions, measure_checkpoints
    from clipscope_explorer.precompute.evaluate.faithfulness import FaithfulnessOptions, run_faithfulness
    from clipscope_explorer.precompute.evaluate.lineage_run import LineageOptions, lineage
    from clipscope_explorer.precompute.evaluate.run import SortEvalOptions, evaluate

    evaluate(SortEvalOptions(index=index, per_feature=PER_FEATURE_TRIALS, progress=progress))
    if n_layers > 1:  # lineage relates two layers or more
        lineage(LineageOptions(index=index, progress=progress))
    measured = measure_checkpoints(
        CheckpointOptions(index=index, device=device, progress=progress, only_if_several=True)
    )
    for problem in measured.problems:
        log.warning("checkpoints: %s", problem)
    settings = DEMO_FAITHFULNESS if demo else FAITHFULNESS
    run_faithfulness(FaithfulnessOptions(index=index, device=device, progress=progress, **settings))
