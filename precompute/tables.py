"""Turns a finished LayerAccumulator into the rows of the index (docs/schema.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clipscope_explorer.precompute.accumulate import NO_ORDINAL, LayerAccumulator

ACTIVE_THRESHOLD = 0.01


@dataclass(frozen=True)
class ExampleSettings:
    top_n: int = 32
    band_count: int = 4
    band_size: int = 4
    band_samples: int = 24


def layer_row(acc: LayerAccumulator, layer: int, sae, fired_images: np.ndarray) -> dict:
    c, s = acc.counts, acc.sums
    n_images, n_tokens = int(c["images"]), int(c["tokens"])
    mse_by_position = (s["sq_error_by_position"] / max(n_images, 1)).cpu().numpy()
    mse = float(s["sq_error_by_position"].sum()) / max(n_tokens, 1)
    ev = float(s["explained_variance"]) / max(n_tokens, 1)
    raw_mse = float(s["sq_error_raw"]) / max(n_tokens, 1) if "sq_error_raw" in s else mse
    raw_ev = float(s["explained_variance_raw"]) / max(n_tokens, 1) if "explained_variance_raw" in s else ev
    kept = n_tokens * sae.k
    return {
        "layer": layer,
        "sae_file": sae.origin.file if sae.origin else None,
        "checkpoint": sae.origin.checkpoint if sae.origin else None,
        "d_in": sae.d_in, "n_features": sae.n_features, "k": sae.k,
        "n_images": n_images, "n_tokens": n_tokens,
        "mse": mse, "explained_variance": ev, "mse_raw": raw_mse, "explained_variance_raw": raw_ev,
        "l0": int(c["fired"]) / max(n_tokens, 1),
        "dead_fraction": float((c["fire_tokens"] == 0).float().mean()),
        "active_fraction": float((fired_images / max(n_images, 1) >= ACTIVE_THRESHOLD).mean()),
        "nonpositive_kept_fraction": int(c["nonpositive_kept"]) / max(kept, 1),
        "mse_by_position": mse_by_position.tolist(),
        "histogram_edges": acc.edges.cpu().tolist(),
    }


def feature_columns(acc: LayerAccumulator, layer: int, labels: list[list[str]],
                    neighbours: tuple[torch.Tensor, torch.Tensor]) -> dict:
    c, s = acc.counts, acc.sums
    n_images, n_tokens = max(int(c["images"]), 1), max(int(c["tokens"]), 1)
    fired = c["fire_tokens"].cpu().numpy()
    dead = fired == 0
    mean = (s["activation"].cpu().numpy() / np.maximum(fired, 1))
    maximum = acc.max_activation.cpu().numpy().astype(np.float64)
    n = acc.n_features
    return {
        "layer": np.full(n, layer, dtype=np.int32),
        "feature": np.arange(n, dtype=np.int32),
        "n_fired_tokens": fired,
        "n_fired_images": c["fire_images"].cpu().numpy(),
        "n_fired_cls": c["fire_cls"].cpu().numpy(),
        "frequency": fired / n_tokens,
        "image_frequency": c["fire_images"].cpu().numpy() / n_images,
        "cls_frequency": c["fire_cls"].cpu().numpy() / n_images,
        "mean_activation": [None if d else float(m) for d, m in zip(dead, mean)],
        "max_activation": [None if d else float(m) for d, m in zip(dead, maximum)],
        "histogram": c["histogram"].cpu().numpy().astype(np.int32),
        "position_mean": (s["position"] / n_images).float().cpu().numpy(),
        "label_terms": labels,
        "label": [" ".join(terms) for terms in labels],
        "similar_features": neighbours[0].numpy().astype(np.int32),
        "similar_cosines": neighbours[1].numpy().astype(np.float32),
    }


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


def examples_columns(layer: int, chosen: dict, image_id: dict[int, int]) -> dict:
    from clipscope_explorer.precompute.index.store import blob_column

    ids = np.array([image_id[int(o)] for o in chosen["ordinal"]], dtype=np.int32)
    order = np.lexsort((chosen["rank"], chosen["band"], chosen["feature"]))
    return {
        "layer": np.full(len(ids), layer, dtype=np.int32),
        "feature": chosen["feature"][order],
        "kind": chosen["kind"][order].tolist(),
        "band": chosen["band"][order],
        "rank": chosen["rank"][order],
        "image_id": ids[order],
        "activation": chosen["activation"][order].astype(np.float32),
        "cls_activation": chosen["cls"][order].astype(np.float32),
        "heatmap_scale": chosen["scale"][order].astype(np.float32),
        "heatmap": blob_column(chosen["heat"][order]),
    }
