"""`clipscope-explorer evaluate --faithfulness`: does a feature's heatmap point at what makes it fire?

Each evaluated feature's top images (`--top`, default 4) are encoded again (the index's model and SAEs,
`index_model.py`), as they are, with their hot patches occluded (the fewest patches, hottest first in the
index's heatmap, that hold `--mass` of its total), with as many random patches occluded (`--draws`
draws), and with only the hot patches kept (occlusion.py says how). All variants of many images go
through the tower in batches, on the device, as the precompute job encodes. A feature's faithfulness is the
mean relative drop of its activation under hot occlusion minus that under random occlusion.

Resumable: each finished feature is appended to ``<out>.faithfulness-partial.jsonl`` (flushed per batch of
features), which a rerun with the same settings reads and skips; the results go into the index atomically
(IndexUpdater) at the end, and the partial file is removed. The original images are read from the index's
recorded sources (`SampleImages(originals=True)`, their thumbnails where the sources are gone).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from clipscope_explorer.precompute.evaluate import occlusion
from clipscope_explorer.precompute.evaluate.run import EvaluateError, chosen_layers, open_index
from clipscope_explorer.precompute.evaluate.sample_images import SampleImageError, SampleImages
from clipscope_explorer.precompute.index.check import IndexCheckError, check_index_file

log = logging.getLogger(__name__)

TABLES = ("faithfulness", "faithfulness_examples")
FEATURES_PER_FLUSH = 64
MEASURES = ("before", "hot", "random", "insertion", "n_hot")
FEATURE_COLUMNS = ("layer", "feature", "examples", "hot_drop", "random_drop", "kept", "score")
EXAMPLE_COLUMNS = ("layer", "feature", "rank", "image_id", *MEASURES)


@dataclass(frozen=True)
class FaithfulnessOptions:
    index: Path
    out: Path | None = None
    layers: list[int] | None = None
    feature_range: tuple[int, int] | None = None  # FIRST-LAST of each layer (default: every feature)
    sample: int | None = None  # only this many features per layer, drawn at random (seeded) among those
    top: int = 4
    mass: float = 0.5
    draws: int = 8
    seed: int = 0
    device: str = "auto"
    batch_size: int = 32
    sae: str | None = None
    images_root: Path | None = None
    progress: bool = True


@dataclass(frozen=True)
class Example:
    layer: int
    feature: int
    rank: int
    image_id: int
    heatmap: np.ndarray  # [grid_h * grid_w] activation units


def _examples(con, layers: list[int], options: FaithfulnessOptions) -> list[Example]:
    low, high = options.feature_range or (0, 2**31 - 1)
    rows = con.execute(
        "SELECT layer, feature, rank, image_id, heatmap_scale, heatmap FROM examples WHERE kind = 'top' "
        "AND rank <= ? AND layer IN (SELECT unnest(?)) AND feature BETWEEN ? AND ? ORDER BY layer, feature, rank",
        [options.top, layers, low, high],
    ).fetchall()
    examples = [Example(ly, f, r, i, np.frombuffer(h, np.uint8) * float(s)) for ly, f, r, i, s, h in rows]
    if options.sample is None:
        return examples
    chosen = set()
    for layer in layers:
        features = sorted({e.feature for e in examples if e.layer == layer})
        rng = np.random.default_rng([options.seed, layer])
        picked = rng.choice(features, size=min(options.sample, len(features)), replace=False) if features else []
        chosen |= {(layer, int(f)) for f in picked}
    return [e for e in examples if (e.layer, e.feature) in chosen]


def _variants(pixels: torch.Tensor, example: Example, grid, options, rng) -> tuple[list[torch.Tensor], int]:
    """The image as it is, hot patches occluded, each random draw, only the hot patches kept."""
    hot = occlusion.hot_patches(example.heatmap, options.mass)
    size = tuple(pixels.shape[1:])
    n_patches = grid[0] * grid[1]
    hot_mask = occlusion.patch_mask(hot, grid, size)
    draws = occlusion.random_patches(rng, n_patches, len(hot), options.draws) if len(hot) else []
    variants = [pixels, occlusion.occluded(pixels, hot_mask)]
    variants += [occlusion.occluded(pixels, occlusion.patch_mask(d, grid, size)) for d in draws]
    variants.append(occlusion.occluded(pixels, ~hot_mask))
    return variants, len(hot)


def _result(values: np.ndarray, n_hot: int) -> occlusion.ExampleResult:
    before, hot, insertion = float(values[0]), float(values[1]), float(values[-1])
    random = float(values[2:-1].mean()) if len(values) > 3 else before
    return occlusion.ExampleResult(before, hot, random, insertion, n_hot)


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".faithfulness-partial.jsonl")


def _settings(options: FaithfulnessOptions) -> dict:
    """What a feature's result depends on: a partial file written with other settings is started afresh."""
    return {"top": options.top, "mass": options.mass, "draws": options.draws, "seed": options.seed}


def _done(path: Path, settings: dict) -> dict[tuple[int, int], list[dict]]:
    """Features finished by an earlier run with the same settings (another run's file is started afresh)."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    if not lines or json.loads(lines[0]) != {"settings": settings}:
        path.unlink()
        return {}
    done = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: that feature is done again
            continue
        done[(record["layer"], record["feature"])] = record["examples"]
    return done


def run_faithfulness(options: FaithfulnessOptions) -> Path:
    from clipscope_explorer.precompute.evaluate.index_model import IndexModel
    from clipscope_explorer.precompute.index.store import IndexUpdater
    from clipscope_explorer.precompute.model.sae import SAELoadError
    from clipscope_explorer.precompute.model.vision import ModelLoadError

    index = Path(options.index)
    out = Path(options.out or index)
    con = open_index(index)
    try:
        meta, layer_rows = check_index_file(con, str(index))
        layers = chosen_layers(index, options.layers, layer_rows)
        examples = _examples(con, layers, options)
    except IndexCheckError as error:
        raise EvaluateError(str(error)) from error
    finally:
        con.close()
    partial = _partial_path(out)
    settings = _settings(options)
    done = _done(partial, settings)
    todo = [e for e in examples if (e.layer, e.feature) not in done]
    if todo:
        try:
            model = IndexModel.load(meta, layer_rows, layers, options.device, options.sae)
        except (ModelLoadError, SAELoadError) as error:
            raise EvaluateError(f"{index}: {error}") from error
        done.update(_encode_all(model, index, todo, tuple(meta["grid"]), options, partial, settings))
    with IndexUpdater(index, out, TABLES) as writer:
        for layer in layers:
            for table in TABLES:
                writer.delete_rows(table, "layer = ?", [layer])
        features, rows = _rows(done, set(layers))
        writer.add_rows("faithfulness", features)
        writer.add_rows("faithfulness_examples", rows)
        written = writer.finish()
    partial.unlink(missing_ok=True)
    return written


def _by_feature(examples: list[Example]) -> Iterator[list[Example]]:
    start = 0
    for end in range(1, len(examples) + 1):
        if end == len(examples) or (examples[end].layer, examples[end].feature) != (
            examples[start].layer,
            examples[start].feature,
        ):
            yield examples[start:end]
            start = end


def _encode_all(model, index, todo, grid, options, partial: Path, settings) -> dict:
    images = SampleImages(index, options.images_root, originals=True)
    groups = list(_by_feature(todo))
    found: dict[tuple[int, int], list[dict]] = {}
    new_file = not partial.is_file()
    with (
        open(partial, "a") as handle,
        tqdm(total=len(groups), unit="feature", desc="faithfulness", disable=not options.progress) as bar,
    ):
        if new_file:
            handle.write(json.dumps({"settings": settings}) + "\n")
        for start in range(0, len(groups), FEATURES_PER_FLUSH):
            chunk = groups[start : start + FEATURES_PER_FLUSH]
            for group, results in zip(chunk, _encode_chunk(model, images, chunk, grid, options)):
                record = [{"rank": e.rank, "image_id": e.image_id, **asdict(r)} for e, r in zip(group, results) if r]
                found[(group[0].layer, group[0].feature)] = record
                handle.write(json.dumps({"layer": group[0].layer, "feature": group[0].feature, "examples": record}))
                handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(chunk))
    images.close()
    return found


def _encode_chunk(model, images, chunk, grid, options) -> list[list[occlusion.ExampleResult | None]]:
    """Every variant of every example of the chunk's features, through the tower in batches."""
    jobs, inputs, wanted = [], [], []  # per example: (group, position, start, count, n_hot)
    for g, group in enumerate(chunk):
        for p, example in enumerate(group):
            try:
                image = images.image(example.image_id)
            except SampleImageError as error:
                log.warning("faithfulness: %s", error)
                continue
            if not example.heatmap.any():  # it fires on the CLS token alone: no patch to occlude
                continue
            rng = np.random.default_rng([options.seed, example.layer, example.feature, example.rank])
            pixels = model.tower.preprocess(image).to(model.tower.device)  # variants are made on the device
            variants, n_hot = _variants(pixels, example, grid, options, rng)
            jobs.append((g, p, len(inputs), len(variants), n_hot))
            inputs += variants
            wanted += [(example.layer, example.feature)] * len(variants)
    values = np.zeros(len(inputs))
    for start in range(0, len(inputs), options.batch_size):
        batch = torch.stack(inputs[start : start + options.batch_size])  # on the tower's device already
        values[start : start + len(batch)] = model.activations(batch, wanted[start : start + len(batch)])
    out: list[list[occlusion.ExampleResult | None]] = [[None] * len(group) for group in chunk]
    for g, p, start, count, n_hot in jobs:
        out[g][p] = _result(values[start : start + count], n_hot)
    return out


def _rows(done: dict, layers: set[int]) -> tuple[dict, dict]:
    features = {name: [] for name in FEATURE_COLUMNS}
    rows = {name: [] for name in EXAMPLE_COLUMNS}
    for (layer, feature), records in sorted(done.items()):
        if layer not in layers:
            continue
        results = []
        for record in records:
            result = occlusion.ExampleResult(**{k: record[k] for k in MEASURES})
            results.append(result)
            for name in rows:
                rows[name].append(layer if name == "layer" else feature if name == "feature" else record[name])
        summary = occlusion.summarise(results)
        if summary is not None:
            for name, value in [("layer", layer), ("feature", feature), *asdict(summary).items()]:
                features[name].append(value)
    return features, rows
