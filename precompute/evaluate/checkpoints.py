"""`clipscope-explorer checkpoints`: every training checkpoint of each layer's SAE, measured on a sample of the
index's images and written into the index (`checkpoints`, `checkpoint_matches`; docs/schema.md).

The sample's pixels are the originals read from the index's recorded sources (`SampleImages(originals=True)`),
decoded and preprocessed as the precompute job did, so the index's own checkpoint reproduces its `layers` row
when the sample is every image; an image whose source is gone falls back to its thumbnail (the model's input
square, JPEG-compressed), and one with neither is left out. Every checkpoint reads the same residuals: the
vision tower runs once per image batch to the deepest layer asked for, its residuals kept in a scratch file
beside the output (n_images x tokens x width float32 per layer), and each checkpoint is then loaded alone and
run over them, with the index's normalisation and precision. Matches compare each feature of the index's SAE
with every earlier checkpoint (`checkpoint_measures.best_matches`).

A layer whose source holds one checkpoint gets its row alone; a checkpoint file that cannot be read is named
in `Measured.problems` and left out, the rest still done. The results replace the index's earlier ones of the
same layers; the file is rewritten atomically (IndexUpdater), in place or into `out`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from clipscope_explorer.precompute.evaluate.checkpoint_measures import CheckpointTotals, best_matches, unit_rows
from clipscope_explorer.precompute.evaluate.run import chosen_layers, open_index
from clipscope_explorer.precompute.evaluate.sample_images import SampleImageError, SampleImages
from clipscope_explorer.precompute.index.check import IndexCheckError, check_index_file
from clipscope_explorer.precompute.model.checkpoints import find_checkpoint, list_checkpoints, load_checkpoint_file
from clipscope_explorer.precompute.model.precision import resolve_precision
from clipscope_explorer.precompute.model.sae import SAELoadError, Standardisation, explained_variance, squared_error

log = logging.getLogger(__name__)

TABLES = ("checkpoints", "checkpoint_matches")
SAMPLE = 2_000


class CheckpointsError(ValueError):
    """The checkpoints cannot be measured on this index as asked (one line naming what and what to do)."""


@dataclass(frozen=True)
class CheckpointOptions:
    index: Path
    out: Path | None = None
    layers: list[int] | None = None  # default: every layer of the index
    sample: int = SAMPLE  # images, drawn at random (seed 0) from the index's samples
    sae: str | None = None  # a copy of the index's SAE source (default: the source it records)
    device: str = "auto"
    batch_size: int = 32
    images_root: Path | None = None
    progress: bool = True
    only_if_several: bool = False  # write nothing unless some layer's source has several checkpoints


@dataclass
class Measured:
    """What a run wrote: the file, its rows by table, and the checkpoints or layers it had to leave out."""

    written: Path | None
    rows: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def measure_checkpoints(options: CheckpointOptions) -> Measured:
    """Measure every checkpoint of the chosen layers and write them into the index (or `options.out`)."""
    index = Path(options.index)
    con = open_index(index)
    try:
        meta, layers = check_index_file(con, str(index))
        ids = _sample_ids(con, options.sample)
    except IndexCheckError as error:
        raise CheckpointsError(str(error)) from error
    finally:
        con.close()
    chosen = chosen_layers(index, options.layers, layers, CheckpointsError)
    source = options.sae or str((meta.get("sae") or {}).get("source") or "")
    plan = {layer: _listed(index, source, layer, layers[layer], options.sae is not None) for layer in chosen}
    measured = Measured(None)
    for layer, listed in plan.items():
        if len(listed) == 1:
            measured.problems.append(
                f"layer {layer}: the SAE source {source} holds a single checkpoint ({listed[0]:,} tokens): "
                "its row alone is written, with no matches"
            )
    if options.only_if_several and all(len(listed) < 2 for listed in plan.values()):
        return measured
    from clipscope_explorer.precompute.model.vision import ModelSpec, load_tower, resolve_device

    device = resolve_device(options.device)
    precision = resolve_precision("auto", device, meta.get("precision"))
    model = meta.get("model") or {}
    tower = load_tower(ModelSpec(model.get("name"), model.get("pretrained")), device=device)
    stats = (meta.get("normalisation_stats") or {}) if meta.get("normalisation") == "sample" else {}
    normalisation = {
        layer: Standardisation(torch.tensor(stats[str(layer)]["mean"]), torch.tensor(stats[str(layer)]["std"]))
        for layer in chosen
        if str(layer) in stats
    }
    out = Path(options.out or index)
    rows: dict[str, list[dict]] = {"checkpoints": [], "checkpoint_matches": []}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.residuals-") as scratch:
        residuals, used = _capture(tower, index, ids, chosen, Path(scratch), options, precision, measured)
        for layer in chosen:
            found = _measure_layer(
                layer, source, plan[layer], layers[layer], residuals[layer], tower.width, normalisation.get(layer),
                device, precision, options, measured,
            )  # fmt: skip
            for table in TABLES:
                rows[table] += found[table]
    if not rows["checkpoints"]:
        raise CheckpointsError(f"{index}: no checkpoint could be measured: {'; '.join(measured.problems)}")
    log.info("%d of %d sample images measured", used, len(ids))
    measured.written = write_results(index, out, rows)
    measured.rows = {
        "checkpoints": len(rows["checkpoints"]),
        "checkpoint_matches": sum(len(part["feature"]) for part in rows["checkpoint_matches"]),
    }
    return measured


def _sample_ids(con, n: int) -> list[int]:
    tables = {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    table = "samples" if "samples" in tables else "images"
    ids = np.array([row[0] for row in con.execute(f"SELECT image_id FROM {table} ORDER BY image_id").fetchall()])
    if n < len(ids):
        ids = np.sort(np.random.default_rng(0).choice(ids, n, replace=False))
    return [int(i) for i in ids]


def _listed(index: Path, source: str, layer: int, row: dict, given: bool) -> list[int]:
    """The token counts of the layer's checkpoints, in training order (one for a single file)."""
    if not source:
        raise CheckpointsError(
            f"{index} records no SAE source: pass --sae with the folder or hub repo it was built from"
        )
    if Path(source).expanduser().is_file():
        return [int(row.get("checkpoint") or 0)]
    try:
        listed = list_checkpoints(source, layer)
    except SAELoadError as error:
        layout = "a folder of {layer}_resid/{tokens}.pt files, or a hub repo id"
        if given:
            raise CheckpointsError(
                f"--sae {source} cannot be read for layer {layer} ({error}): give {layout}"
            ) from error
        raise CheckpointsError(
            f"the SAE source the index records, {source}, cannot be read for layer {layer} ({error}): "
            f"pass --sae with a local copy of it ({layout})"
        ) from error
    if not listed:
        raise CheckpointsError(f"{source} holds no checkpoint of layer {layer} ({layer}_resid/{{tokens}}.pt)")
    return listed


@torch.inference_mode()
def _capture(tower, index, ids, layers, scratch, options, precision, measured) -> tuple[dict, int]:
    """Each layer's residuals of the sample's images, in a scratch float32 file [n, tokens, width]."""
    images = SampleImages(index, options.images_root, originals=True)
    shape = (len(ids), tower.n_tokens, tower.width)
    stores = {layer: np.lib.format.open_memmap(scratch / f"{layer}.npy", "w+", np.float32, shape) for layer in layers}
    used, missing = 0, []
    bar = tqdm(total=len(ids), unit="img", desc="residuals", disable=not options.progress)
    try:
        for start in range(0, len(ids), options.batch_size):
            pixels = [
                tower.preprocess(image) for image in _read(images, ids[start : start + options.batch_size], missing)
            ]
            if pixels:
                captured = tower.capture(torch.stack(pixels), layers, precision)
                for layer, acts in captured.items():
                    stores[layer][used : used + len(pixels)] = acts.cpu().numpy()
                used += len(pixels)
            bar.update(min(options.batch_size, len(ids) - start))
        fallbacks = images.thumbnails_used
    finally:
        bar.close()
        images.close()
    if missing:
        measured.problems.append(
            f"{len(missing)} sample image(s) could not be read and are left out; first: {missing[0]}"
        )
    if fallbacks:
        measured.problems.append(f"{fallbacks} sample image(s) read from their thumbnails: their sources are gone")
    if not used:
        raise CheckpointsError(f"{index}: none of the {len(ids)} sample images could be read; give --images-root")
    return {layer: store[:used] for layer, store in stores.items()}, used


def _read(images: SampleImages, ids: list[int], missing: list[str]) -> list:
    """The images of `ids` that can be read (one index query for all of them), naming the others in `missing`."""
    try:
        return images.images(ids)
    except SampleImageError:
        found = []
        for image_id in ids:
            try:
                found.append(images.image(image_id))
            except SampleImageError as error:
                missing.append(str(error))
        return found


def _measure_layer(layer, source, listed, row, residuals, width, stats, device, precision, options, measured) -> dict:
    """The layer's `checkpoints` rows and its `checkpoint_matches` rows, the index's checkpoint first."""
    reference_tokens = row.get("checkpoint") if row.get("checkpoint") in listed else listed[-1]
    rows: dict[str, list[dict]] = {"checkpoints": [], "checkpoint_matches": []}
    reference = None
    order = [reference_tokens] + [t for t in listed if t != reference_tokens]
    for tokens in tqdm(order, desc=f"layer {layer} checkpoints", disable=not options.progress):
        try:
            sae = _load(source, layer, tokens, len(listed) == 1, device)
            sae.check_fits(width)
        except SAELoadError as error:
            measured.problems.append(f"layer {layer}, checkpoint {tokens:,}: {error}; left out")
            continue
        rows["checkpoints"].append(_run_over(sae, residuals, stats, precision, options.batch_size, layer, tokens))
        if tokens == reference_tokens:
            reference = unit_rows(sae.dec)
        elif reference is not None and tokens < reference_tokens:
            match, cosine = best_matches(reference, unit_rows(sae.dec))
            rows["checkpoint_matches"].append(_match_columns(layer, tokens, match, cosine))
        del sae
    if reference is None and len(listed) > 1:
        measured.problems.append(f"layer {layer}: its own checkpoint could not be read, so no matches are written")
    rows["checkpoints"].sort(key=lambda r: r["tokens"])
    rows["checkpoint_matches"].sort(key=lambda columns: columns["tokens"][0])
    return rows


def _match_columns(layer: int, tokens: int, match: np.ndarray, cosine: np.ndarray) -> dict[str, np.ndarray]:
    n = len(match)
    return {
        "layer": np.full(n, layer, dtype=np.int32),
        "feature": np.arange(n, dtype=np.int32),
        "tokens": np.full(n, tokens, dtype=np.int64),
        "match": match.astype(np.int32),
        "cosine": cosine.astype(np.float32),
    }


def _load(source: str, layer: int, tokens: int, single: bool, device):
    if single and Path(source).expanduser().is_file():
        return load_checkpoint_file(source, None, layer, device=device)
    path, recorded = find_checkpoint(source, layer, tokens)
    return load_checkpoint_file(path, recorded, layer, device=device)


@torch.inference_mode()
def _run_over(sae, residuals, stats, precision, batch_size, layer, tokens) -> dict:
    """One checkpoint over the residuals, measured as the precompute job measures the index's SAE."""
    from clipscope_explorer.precompute.job import raw_metrics

    n_tokens = residuals.shape[1]
    totals = CheckpointTotals(sae.n_features, n_tokens, sae.device, track_raw=stats is not None)
    for start in range(0, len(residuals), batch_size):
        acts = torch.from_numpy(np.ascontiguousarray(residuals[start : start + batch_size])).to(sae.device)
        code = sae.encode(acts, normalisation=stats, precision=precision)
        x, x_hat = (acts if stats is None else stats.apply(acts)), sae.decode(code)
        raw = None if stats is None else raw_metrics(sae, acts, precision)
        totals.update(code, squared_error(x, x_hat), explained_variance(x, x_hat), raw)
    return totals.row(layer, tokens, sae.d_in, sae.k)


def write_results(index: Path, out: Path, rows: dict[str, list[dict]]) -> Path:
    """Replace the rows of both tables of each layer measured, atomically (nothing changes when this fails); a
    layer none of whose checkpoints could be read keeps what an earlier run wrote."""
    from clipscope_explorer.precompute.index.schema import TABLES as SCHEMA
    from clipscope_explorer.precompute.index.store import IndexUpdater

    with IndexUpdater(index, out, TABLES) as writer:
        measured = sorted({row["layer"] for row in rows["checkpoints"]})
        for table in TABLES:
            for layer in measured:
                writer.delete_rows(table, "layer = ?", [layer])
        names = SCHEMA["checkpoints"].names
        writer.add_rows("checkpoints", {name: [row[name] for row in rows["checkpoints"]] for name in names})
        matches = rows["checkpoint_matches"]
        if matches:  # by layer, feature, then tokens: the order a feature page reads them in
            columns = {name: np.concatenate([part[name] for part in matches]) for name in matches[0]}
            order = np.lexsort((columns["tokens"], columns["feature"], columns["layer"]))
            writer.add_rows("checkpoint_matches", {name: values[order] for name, values in columns.items()})
        return writer.finish()
