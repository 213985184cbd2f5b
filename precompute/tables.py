"""Turns a finished LayerAccumulator into the rows of the index: its totals as numpy
(`precompute/index/rows.py` derives the rows) and the examples each feature shows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clipscope_explorer.precompute.accumulate import NO_ORDINAL, LayerAccumulator
from clipscope_explorer.precompute.index.rows import LayerTotals, feature_columns, layer_row
from clipscope_explorer.precompute.index.rows import examples_columns as rows_examples_columns


@dataclass(frozen=True)
class ExampleSettings:
    top_n: int = 32
    band_count: int = 4
    band_size: int = 4
    band_samples: int = 24


def layer_totals(acc: LayerAccumulator) -> LayerTotals:
    """The accumulator's totals as numpy, the input of the layer's rows (`precompute/index/rows.py`)."""
    c, s = acc.counts, acc.sums

    def number(name: str) -> float | None:
        return float(s[name]) if name in s else None

    return LayerTotals(
        n_images=int(c["images"]),
        n_tokens=int(c["tokens"]),
        fired=int(c["fired"]),
        nonpositive_kept=int(c["nonpositive_kept"]),
        sq_error_by_position=s["sq_error_by_position"].cpu().numpy(),
        explained_variance=float(s["explained_variance"]),
        fire_tokens=c["fire_tokens"].cpu().numpy(),
        fire_images=c["fire_images"].cpu().numpy(),
        fire_cls=c["fire_cls"].cpu().numpy(),
        activation_sum=s["activation"].cpu().numpy(),
        max_activation=acc.max_activation.cpu().numpy(),
        position_sum=s["position"].cpu().numpy(),
        histogram=c["histogram"].cpu().numpy(),
        edges=acc.edges.cpu().numpy(),
        sq_error_raw=number("sq_error_raw"),
        explained_variance_raw=number("explained_variance_raw"),
    )


def layer_columns(
    acc: LayerAccumulator,
    layer: int,
    sae,
    labels: list[list[str]],
    neighbours: tuple[torch.Tensor, torch.Tensor],
    prototypes: np.ndarray | None = None,
    zero_shot: list | None = None,
) -> tuple[dict, dict]:
    """The layer's `layers` row and its `features` columns (prototypes and zero-shot labels: see
    `rows.feature_columns`)."""
    totals = layer_totals(acc)
    row = layer_row(
        layer,
        totals,
        d_in=sae.d_in,
        k=sae.k,
        sae_file=sae.origin.file if sae.origin else None,
        checkpoint=sae.origin.checkpoint if sae.origin else None,
    )
    similar, cosines = neighbours[0].numpy(), neighbours[1].numpy()
    return row, feature_columns(layer, totals, labels, similar, cosines, prototypes, zero_shot)


def _valid(examples) -> np.ndarray:
    return (examples.ordinal != NO_ORDINAL).cpu().numpy()


def chosen_examples(acc: LayerAccumulator, settings: ExampleSettings) -> dict:
    """The examples shown per feature, as flat numpy arrays with kind/band/rank set.

    Top list: all valid entries in order. Bands: from the weighted sample,
    images not in the top list, band by activation / max, first `band_size`
    per band in sample order, ranked by activation within the band.
    """
    top, smp = acc.top, acc.samples
    top_valid = _valid(top)
    f_top, slot_top = np.nonzero(top_valid)

    in_top = (smp.ordinal[:, :, None] == top.ordinal[:, None, :]).any(2).cpu().numpy()
    ok = _valid(smp) & ~in_top
    maximum = acc.max_activation.cpu().numpy()[:, None]
    ratio = smp.activation.cpu().numpy() / np.where(maximum > 0, maximum, 1)
    band = np.clip(np.floor((1 - ratio) * settings.band_count).astype(np.int64) + 1, 1, settings.band_count)
    f_s, slot_s = np.nonzero(ok)  # row-major: sample order within each feature
    group = f_s * (settings.band_count + 1) + band[f_s, slot_s]
    order = np.argsort(group, kind="stable")
    group_sorted = group[order]
    starts = np.r_[0, np.nonzero(np.diff(group_sorted))[0] + 1]
    position = np.arange(len(group_sorted)) - np.repeat(starts, np.diff(np.r_[starts, len(group_sorted)]))
    keep = order[position < settings.band_size]
    f_k, slot_k, band_k = f_s[keep], slot_s[keep], band[f_s[keep], slot_s[keep]]
    act_k = smp.activation.cpu().numpy()[f_k, slot_k]
    by_rank = np.lexsort((-act_k, f_k * (settings.band_count + 1) + band_k))
    f_k, slot_k, band_k = f_k[by_rank], slot_k[by_rank], band_k[by_rank]
    key_k = f_k * (settings.band_count + 1) + band_k
    starts = np.r_[0, np.nonzero(np.diff(key_k))[0] + 1] if len(key_k) else np.zeros(0, np.int64)
    rank_k = np.arange(len(key_k)) - np.repeat(starts, np.diff(np.r_[starts, len(key_k)])) + 1

    def gather(name, src_f, src_slot, holder):
        return getattr(holder, name).cpu().numpy()[src_f, src_slot]

    out = {
        "feature": np.r_[f_top, f_k].astype(np.int32),
        "kind": np.r_[np.full(len(f_top), "top", object), np.full(len(f_k), "band", object)],
        "band": np.r_[np.zeros(len(f_top), np.int8), band_k.astype(np.int8)],
        "rank": np.r_[slot_top + 1, rank_k].astype(np.int32),
    }
    for name in ("ordinal", "activation", "cls", "scale"):
        out[name] = np.r_[gather(name, f_top, slot_top, top), gather(name, f_k, slot_k, smp)]
    out["heat"] = np.concatenate([top.heat.cpu().numpy()[f_top, slot_top], smp.heat.cpu().numpy()[f_k, slot_k]])
    return out


def image_ids(sample_ordinals: np.ndarray, ordinals) -> np.ndarray:
    """The image id of each of `ordinals`: its rank among the ordinals of every encoded image
    (`sample_ordinals`, ascending)."""
    ordinals = np.asarray(ordinals, dtype=np.int64)
    ids = np.searchsorted(sample_ordinals, ordinals)
    if len(ids) and (ids.max() >= len(sample_ordinals) or (sample_ordinals[ids] != ordinals).any()):
        raise RuntimeError("an image to index is missing from the encoded samples; rerun with --fresh")
    return ids.astype(np.int32)


def examples_columns(layer: int, chosen: dict, sample_ordinals: np.ndarray) -> dict:
    """The `examples` rows of `chosen_examples`, their ordinals mapped to image ids."""
    return rows_examples_columns(layer, {**chosen, "image_id": image_ids(sample_ordinals, chosen["ordinal"])})
