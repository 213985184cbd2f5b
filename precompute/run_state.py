"""What a precompute run has done so far, in a form that can be checkpointed and merged: the per-layer
accumulators, which shards are done (and how far each partial one got), caption statistics, skipped
images and failed shards. A resumed run loads it from its checkpoint; a distributed run merges its
workers' states into one (`merge`), in a deterministic order."""

from __future__ import annotations

from dataclasses import dataclass, field

from clipscope_explorer.precompute.accumulate import LayerAccumulator
from clipscope_explorer.precompute.labels import DocumentFrequency
from clipscope_explorer.precompute.model.sae import Standardisation
from clipscope_explorer.precompute.sources import Batch

MAX_SKIPPED_LISTED = 1000  # skipped images listed by name in the index (all are counted)


@dataclass
class RunState:
    accumulators: dict[int, LayerAccumulator]
    progress: dict[int, int] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    captions: DocumentFrequency = field(default_factory=DocumentFrequency)
    skipped: list[dict] = field(default_factory=list)
    n_skipped: int = 0
    failed_shards: list[dict] = field(default_factory=list)
    normalisation: dict[int, Standardisation] = field(default_factory=dict)
    encode_seconds: float = 0.0

    @property
    def n_images(self) -> int:
        return int(next(iter(self.accumulators.values())).counts["images"])

    def state_dict(self) -> dict:
        return {
            "accumulators": {layer: acc.state_dict() for layer, acc in self.accumulators.items()},
            "progress": self.progress,
            "done": sorted(self.done),
            "captions": self.captions.state_dict(),
            "skipped": self.skipped,
            "n_skipped": self.n_skipped,
            "failed_shards": self.failed_shards,
            "encode_seconds": self.encode_seconds,
            "normalisation": {layer: (stats.mean, stats.std) for layer, stats in self.normalisation.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict, device) -> RunState:
        return cls(
            accumulators={
                int(layer): LayerAccumulator.from_state_dict(acc, device)
                for layer, acc in state["accumulators"].items()
            },
            progress=dict(state["progress"]),
            done=set(state["done"]),
            captions=DocumentFrequency.from_state_dict(state["captions"]),
            skipped=list(state["skipped"]),
            n_skipped=state["n_skipped"],
            failed_shards=state["failed_shards"],
            normalisation={int(layer): Standardisation(*stats) for layer, stats in state["normalisation"].items()},
            encode_seconds=state["encode_seconds"],
        )

    def record(self, batch: Batch) -> None:
        """A batch's bookkeeping, before its images are encoded: how far its shard got, whether the shard is
        done or failed, its skipped images and its captions."""
        self.progress[batch.shard] = batch.end
        if batch.shard_done:
            self.done.add(batch.shard)
        if batch.failure:
            self.failed_shards.append({"shard": batch.shard, "reason": batch.failure})
        self.n_skipped += len(batch.skipped)
        room = max(MAX_SKIPPED_LISTED - len(self.skipped), 0)
        self.skipped += [{"source": s.source, "key": s.key, "reason": s.error} for s in batch.skipped[:room]]
        if batch.pixels is not None:
            self.captions.add(s.caption for s in batch.samples)

    def merge(self, other: RunState) -> None:
        for layer, acc in self.accumulators.items():
            acc.merge(other.accumulators[layer])
        self.progress.update(other.progress)
        self.done |= other.done
        self.captions.merge(other.captions)
        self.skipped = sorted(self.skipped + other.skipped, key=lambda s: (s["source"], s["key"]))
        self.skipped = self.skipped[:MAX_SKIPPED_LISTED]
        self.n_skipped += other.n_skipped
        self.failed_shards = sorted(self.failed_shards + other.failed_shards, key=lambda f: f["shard"])
        self.encode_seconds += other.encode_seconds
