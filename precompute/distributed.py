"""`--ray [ADDRESS]`: split the shards among Ray actors and merge their states.

Each actor (one per GPU, or `workers` CPU actors on a cluster without GPUs)
loads the model and SAEs itself, encodes its shards exactly as the single
process does (same batches, same accumulators), and returns its mergeable
state plus the metadata and thumbnails of the images it references, and the
records of every image it encoded (metadata, embedding, CLS codes). The
driver merges the states, so the index equals a single-process run's.
Model, SAE and image paths must be readable from every node (hub ids, URLs,
or a shared file system). Shards go out in groups, about eight per actor, each to
whichever actor is free; the driver checkpoints after each group comes back.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections import deque
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from clipscope_explorer.precompute.model.precision import resolve_precision

log = logging.getLogger(__name__)

CALLS_PER_WORKER = 8


class ShardWorker:
    """Runs inside a Ray actor: encodes a group of shards into a fresh state."""

    def __init__(self, config, normalisation: dict):
        from clipscope_explorer.precompute.job import prepare

        self.config = replace(config, progress=False, ray=None, vocabulary=None)  # labels are the driver's
        self.components = prepare(self.config)
        self.normalisation = normalisation

    def encode(self, shard_indices: list[int]) -> tuple[dict, list[tuple], tuple[list[tuple], list[tuple]]]:
        from clipscope_explorer.precompute.job import encode_all, new_state
        from clipscope_explorer.precompute.workdir import WorkDir

        state = new_state(self.components, self.config)
        state.normalisation = self.normalisation
        shards = [s for s in self.components.shards if s.index in set(shard_indices)]
        with tempfile.TemporaryDirectory() as scratch:
            spill = WorkDir(Path(scratch) / "part", {})
            spill.path.mkdir()
            encode_all(self.components, self.config, state, spill, shards=shards)
            referenced = set().union(*(acc.referenced() for acc in state.accumulators.values()))
            rows = spill.image_rows(sorted(referenced))
            records = spill.spilled_samples()
            spill.close()
        return state.state_dict(), rows, records


def _cluster_workers(ray, fallback: int) -> tuple[int, dict]:
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return gpus, {"num_gpus": 1}
    return max(1, fallback), {"num_cpus": 1}


def _calls(todo: list[int], n_workers: int) -> deque[list[int]]:
    """The shards in groups of about an eighth of a worker's share: each reply (the part's state and its
    images' rows) stays a fraction of the whole, the driver checkpoints after each, and free actors take
    the next group, so a crash loses at most one group per actor."""
    size = max(1, math.ceil(len(todo) / (CALLS_PER_WORKER * max(1, n_workers))))
    return deque(todo[i : i + size] for i in range(0, len(todo), size))


def encode_on_ray(components, config, state, workdir) -> None:
    import ray

    from clipscope_explorer.precompute.job import checkpoint
    from clipscope_explorer.precompute.run_state import RunState

    if not ray.is_initialized():
        address = None if config.ray in (None, "auto", "local") else config.ray
        ray.init(
            address=address,
            num_cpus=None if address else max(2, config.workers),
            log_to_driver=False,
            include_dashboard=False,
        )
    n_workers, resources = _cluster_workers(ray, config.workers)
    todo = [s.index for s in components.shards if s.index not in state.done]
    calls = _calls(todo, n_workers)
    device = "cuda" if "num_gpus" in resources else "cpu"
    components.precision = resolve_precision(config.precision, torch.device(device))  # what meta.precision records
    worker_config = replace(config, workers=0, device=device, precision=components.precision)
    Actor = ray.remote(**resources)(ShardWorker)
    actors = [Actor.remote(worker_config, state.normalisation) for _ in range(min(n_workers, len(calls)))]
    pending = {actor.encode.remote(calls.popleft()): actor for actor in actors}
    with tqdm(total=len(todo), unit="shard", desc="ray", disable=not config.progress) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            part_state, rows, (samples, codes) = ray.get(ready[0])
            actor = pending.pop(ready[0])
            if calls:  # the next shards go to whichever actor is free
                pending[actor.encode.remote(calls.popleft())] = actor
            part = RunState.from_state_dict(part_state, components.device)
            state.merge(part)
            workdir.keep_rows(rows)
            workdir.keep_rows(samples, "samples")
            workdir.keep_rows(codes, "codes")
            checkpoint(workdir, state)
            bar.update(len(part.done))
    for actor in actors:
        ray.kill(actor)
