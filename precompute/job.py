"""The precompute job: sources -> vision tower -> SAEs -> accumulators -> index.

`run(config)` checks every input before any compute, resumes from
``<out>.work/`` when a previous run of the same command was interrupted,
checkpoints every `checkpoint_every` images, and writes the index atomically.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from clipscope_explorer.precompute.accumulate import LayerAccumulator
from clipscope_explorer.precompute.model.checkpoints import load_saes
from clipscope_explorer.precompute.model.encode import encode_pixels
from clipscope_explorer.precompute.model.precision import resolve_precision
from clipscope_explorer.precompute.model.release import DEFAULT_MODEL, DEFAULT_SAE_REPO
from clipscope_explorer.precompute.model.sae import Standardisation, TopKSAE, explained_variance, squared_error
from clipscope_explorer.precompute.model.vision import ModelSpec, VisionTower, load_tower, resolve_device
from clipscope_explorer.precompute.run_state import RunState
from clipscope_explorer.precompute.shard_reader import count_samples, known_size
from clipscope_explorer.precompute.sources import Batch, Shard, ShardBatches, resolve_sources
from clipscope_explorer.precompute.tables import ExampleSettings
from clipscope_explorer.precompute.workdir import WorkDir

log = logging.getLogger(__name__)
NORMALISE_IMAGES = 512


@dataclass
class PrecomputeConfig:
    images: list[str]
    out: Path
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    sae: str = DEFAULT_SAE_REPO
    layers: list[int] = field(default_factory=lambda: [20])
    checkpoint: int | None = None
    top_n: int = 32
    band_count: int = 4
    band_size: int = 4
    band_samples: int = 24
    max_images: int | None = None
    batch_size: int = 64
    device: str = "auto"
    workers: int = 2
    normalise: str = "none"
    precision: str = "auto"
    checkpoint_every: int = 20_000
    fresh: bool = False
    ray: str | None = None
    progress: bool = True
    demo: bool = False
    embeddings: bool = True  # the final CLIP image embedding of every image (runs the tower to its end)
    vocabulary: Path | None = None  # extra zero-shot label terms, one a line
    zero_shot_min_count: int = 5  # captions a word or phrase must occur in to be a zero-shot term
    evaluate: bool = False  # once the index is written, the steps that add to it (precompute/evaluate/steps.py)

    def identity(self) -> dict:
        """What makes two runs the same run (resume is refused across different ones). The vocabulary
        settings are not part of it: they act only when the index is written."""
        keep = (
            "images",
            "model",
            "pretrained",
            "sae",
            "layers",
            "checkpoint",
            "top_n",
            "band_count",
            "band_size",
            "band_samples",
            "max_images",
            "batch_size",
            "normalise",
            "precision",
            "demo",
            "embeddings",
        )
        return {k: v for k, v in asdict(self).items() if k in keep}

    @property
    def examples(self) -> ExampleSettings:
        return ExampleSettings(self.top_n, self.band_count, self.band_size, self.band_samples)


@dataclass
class Components:
    tower: VisionTower
    saes: dict[int, TopKSAE]
    shards: list[Shard]
    quota: dict[int, int]
    device: torch.device
    precision: str  # fp32 or bf16, resolved for the device
    embeddings: bool = True  # compute the final image embedding of every image
    user_terms: list[str] | None = None  # the --vocabulary file's terms


def prepare(config: PrecomputeConfig) -> Components:
    """Load and check everything before compute: sources, model, SAEs."""
    if config.normalise not in ("none", "sample"):
        raise ValueError(f"--normalise must be none or sample, not {config.normalise!r}")
    user_terms = None
    if config.vocabulary is not None:
        from clipscope_explorer.precompute.zero_shot import read_user_vocabulary

        user_terms = read_user_vocabulary(config.vocabulary)
    shards = resolve_sources(config.images)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    tower = load_tower(ModelSpec(config.model, config.pretrained), device=device)
    layers = tower.check_layers(config.layers)
    saes = load_saes(config.sae, layers, config.checkpoint, device=device)
    for sae in saes.values():
        sae.check_fits(tower.width)
    quota = {}
    if config.max_images is not None:
        left = config.max_images
        for shard in shards:
            quota[shard.index] = min(left, count_samples(shard)) if left > 0 else 0
            left -= quota[shard.index]
    return Components(tower, saes, shards, quota, device, precision, config.embeddings, user_terms)


def new_state(components: Components, config: PrecomputeConfig) -> RunState:
    accumulators = {
        layer: LayerAccumulator(
            sae.n_features,
            components.tower.n_tokens,
            config.top_n,
            config.band_samples,
            components.device,
            track_raw=config.normalise == "sample",
        )
        for layer, sae in components.saes.items()
    }
    return RunState(accumulators)


def loader(components: Components, config: PrecomputeConfig, state: RunState, shards=None, quota=None) -> DataLoader:
    dataset = ShardBatches(
        shards or components.shards,
        components.tower.preprocess,
        config.batch_size,
        components.tower.visual.image_size[0],
        progress=state.progress,
        done=state.done,
        quota=components.quota if quota is None else quota,
    )
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=config.workers,
        pin_memory=components.device.type == "cuda",
        prefetch_factor=4 if config.workers else None,
        persistent_workers=False,
    )


@torch.inference_mode()
def estimate_normalisation(components: Components, config: PrecomputeConfig, state: RunState) -> None:
    """Per-dimension mean/std of each layer on the first NORMALISE_IMAGES images of the sample."""
    sums, squares, count = {}, {}, 0
    quota, left = {}, NORMALISE_IMAGES
    for shard in components.shards:
        size = components.quota.get(shard.index)
        if size is None and left > 0:
            size = known_size(shard) or count_samples(shard)
        quota[shard.index] = max(0, min(left, size or 0))
        left -= quota[shard.index]
    probe = RunState(state.accumulators)
    for batch in loader(components, config, probe, quota=quota):
        if batch.pixels is None:
            continue
        acts = components.tower.capture(batch.pixels, components.saes, components.precision)
        for layer, x in acts.items():
            x = x.double().flatten(0, 1)
            sums[layer] = sums.get(layer, 0) + x.sum(0)
            squares[layer] = squares.get(layer, 0) + x.pow(2).sum(0)
        count += batch.pixels.shape[0] * components.tower.n_tokens
    for layer in components.saes:
        mean = sums[layer] / count
        std = (squares[layer] / count - mean.pow(2)).clamp_min(0).sqrt()
        state.normalisation[layer] = Standardisation(mean.float().cpu(), std.float().cpu())


@torch.inference_mode()
def raw_metrics(sae: TopKSAE, acts: torch.Tensor, precision: str):
    """Per-token squared error and explained variance of the SAE on raw (unstandardised) input."""
    raw_hat = sae.decode(sae.encode(acts, precision=precision))
    return squared_error(acts, raw_hat), explained_variance(acts, raw_hat)


@dataclass
class SampleRecords:
    """What the index keeps of every encoded image of a batch: its metadata, its final embedding
    ([n, d] float16, or None without embeddings) and per layer its CLS token's kept latents
    ({layer: (indices [n, k] int32, values [n, k] float32)})."""

    samples: list
    embeddings: np.ndarray | None
    cls_codes: dict[int, tuple[np.ndarray, np.ndarray]]


@torch.inference_mode()
def encode_batch(components: Components, state: RunState, batch: Batch) -> tuple[list, SampleRecords]:
    """Run one batch through tower and SAEs into the accumulators; return the images to keep (those that
    entered an example list) and the records of every encoded image."""
    if batch.failure:
        log.warning("shard skipped: %s", batch.failure)
    state.record(batch)
    if batch.pixels is None:
        return [], SampleRecords([], None, {})
    encoded = encode_pixels(
        components.tower,
        components.saes,
        batch.pixels,
        components.precision,
        state.normalisation,
        embed=components.embeddings,
    )
    codes, embedding = encoded if components.embeddings else (encoded, None)
    entered = torch.zeros(len(batch.samples), dtype=torch.bool)
    for layer, sae in components.saes.items():
        acts, code = codes[layer].acts, codes[layer].code
        stats = state.normalisation.get(layer)
        raw = None if stats is None else raw_metrics(sae, acts, components.precision)
        x, x_hat = (acts if stats is None else stats.apply(acts)), sae.decode(code)
        entered |= state.accumulators[layer].update(
            code, batch.ordinals, squared_error(x, x_hat), explained_variance(x, x_hat), raw
        )
    records = SampleRecords(
        batch.samples,
        None if embedding is None else embedding.to(torch.float16).cpu().numpy(),
        {
            layer: (
                c.code.indices[:, 0].to(torch.int32).cpu().numpy(),
                c.code.values[:, 0].to(torch.float32).cpu().numpy(),
            )
            for layer, c in codes.items()
        },
    )
    return [sample for sample, keep in zip(batch.samples, entered.tolist()) if keep], records


def total_images(components: Components) -> int | None:
    """Images to encode, when known: quotas, folder listings, or img2dataset's _stats.json."""
    if components.quota:
        return sum(components.quota.values())
    sizes = [known_size(shard) for shard in components.shards]
    return None if None in sizes else sum(sizes)


def encode_all(
    components: Components, config: PrecomputeConfig, state: RunState, workdir: WorkDir | None, shards=None
) -> None:
    """The main loop over every remaining batch, with progress and checkpoints."""
    total = total_images(components) if shards is None else None
    bar = tqdm(
        total=total,
        initial=state.n_images + state.n_skipped,
        unit="img",
        dynamic_ncols=True,
        disable=not config.progress,
        desc="encode",
        smoothing=0.1,
    )
    since_checkpoint = encoded = 0
    started = loop_start = time.perf_counter()
    for batch in loader(components, config, state, shards=shards):
        keep, records = encode_batch(components, state, batch)
        if workdir is not None:
            workdir.keep_samples(records.samples, records.embeddings, records.cls_codes)
            workdir.keep_images(keep)
        n = 0 if batch.pixels is None else batch.pixels.shape[0]
        bar.update(n + len(batch.skipped))
        encoded += n
        rate = encoded * components.tower.n_tokens / max(time.perf_counter() - loop_start, 1e-9)
        bar.set_postfix(tokens_s=f"{rate:,.0f}", skipped=state.n_skipped, refresh=False)
        since_checkpoint += n + len(batch.skipped)
        if workdir is not None and since_checkpoint >= config.checkpoint_every:
            state.encode_seconds += time.perf_counter() - started
            started = time.perf_counter()
            checkpoint(workdir, state)
            since_checkpoint = 0
    state.encode_seconds += time.perf_counter() - started
    bar.close()


def checkpoint(workdir: WorkDir, state: RunState) -> None:
    workdir.save(state.state_dict())
    workdir.prune_images(set().union(*(acc.referenced() for acc in state.accumulators.values())))


def run(config: PrecomputeConfig) -> Path:
    """Build the index at config.out; resumable after a crash by rerunning the same config."""
    started = time.perf_counter()
    components = prepare(config)
    workdir = WorkDir(Path(config.out), config.identity())
    if config.fresh:
        workdir.remove()
    saved = workdir.open()
    if saved is not None:
        state = RunState.from_state_dict(saved, components.device)
        log.warning("resuming from %s: %d images done", workdir.path, state.n_images)
    else:
        state = new_state(components, config)
        if config.normalise == "sample":
            estimate_normalisation(components, config, state)
    if config.ray is not None:
        from clipscope_explorer.precompute.distributed import encode_on_ray

        encode_on_ray(components, config, state, workdir)
    else:
        encode_all(components, config, state, workdir)
    checkpoint(workdir, state)
    from clipscope_explorer.precompute.finalize import write_index

    out = write_index(components, config, state, workdir, time.perf_counter() - started)
    workdir.remove()
    if config.evaluate:
        from clipscope_explorer.precompute.evaluate.steps import evaluate_index

        evaluate_index(out, len(components.saes), config.device, config.demo, config.progress)
    if config.progress:
        elapsed = time.perf_counter() - started
        tqdm.write(
            f"done: {state.n_images:,} images encoded ({state.n_skipped:,} skipped) on layers "
            f"{', '.join(map(str, sorted(components.saes)))} in {elapsed:,.0f} s "
            f"({state.n_images / max(state.encode_seconds, 1e-9):,.1f} images/s while encoding)"
        )
    return out
