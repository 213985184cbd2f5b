"""`dataset_info.json`: what an export holds (every column's name, type and meaning) and where it came from
(the index's provenance: schema version, model, SAEs, sample), local paths shortened as the pages show them."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import pyarrow as pa

from clipscope_explorer.app.public_names import PublicNames, public_name

TABLE_MEANINGS = {
    "layers": "One row per exported layer: its SAE and the reconstruction metrics measured on the index's sample.",
    "features": "One row per exported (layer, feature): firing statistics, labels and nearest features.",
    "examples": "The images each exported feature shows: its top images (kind top, band 0) then samples from lower "
    "activation bands (kind band, bands 1 to band_count), in the feature page's order.",
    "images": "The images the exported examples show (all images of the index when everything is exported).",
}
_ACTIVATION = "activation units of the SAE latent (in the space the SAE read, see index.normalisation)"
COLUMNS = {  # table -> column -> meaning; the types are those of the written files (dataset_info.json)
    "layers": {
        "layer": "the 0-based block whose output the SAE reads (HF hidden_states[layer + 1])",
        "sae_file": "the SAE checkpoint file read (a local path shortened to its folder and file)",
        "checkpoint": "the checkpoint's training token count (null for a single file)",
        "d_in": "SAE input width (the residual stream width)",
        "n_features": "SAE latents (features)",
        "k": "latents kept per token (TopK)",
        "n_images": "images encoded",
        "n_tokens": "tokens encoded (images x tokens per image)",
        "mse": "squared error summed over the model dimensions, mean over tokens (model card convention)",
        "explained_variance": "mean over tokens of 1 - ||x - x_hat||^2 / ||x - mean_dims(x)||^2",
        "mse_raw": "mse on raw activations (equal to mse when index.normalisation is none)",
        "explained_variance_raw": "explained_variance on raw activations",
        "l0": "mean number of firing features per token",
        "dead_fraction": "fraction of features that never fire on the sample",
        "active_fraction": "fraction of features whose image_frequency >= index.active_threshold",
        "nonpositive_kept_fraction": "fraction of kept (top-k) values that are <= 0 (not counted as firing)",
        "mse_by_position": "n_tokens values: the MSE at each token position, CLS first",
        "histogram_edges": "edges of the features' activation histograms (log-spaced; below the first edge counts "
        "in bin 0, above the last in the last bin)",
    },
    "features": {
        "layer": "the layer (see layers.layer)",
        "feature": "the SAE latent index",
        "n_fired_tokens": "tokens on which the feature fires (among the k kept latents and > 0)",
        "n_fired_images": "images with at least one firing token",
        "n_fired_cls": "images whose CLS token fires",
        "frequency": "n_fired_tokens / layers.n_tokens",
        "image_frequency": "n_fired_images / layers.n_images",
        "cls_frequency": "n_fired_cls / layers.n_images",
        "mean_activation": f"mean firing value over firing tokens, {_ACTIVATION} (null if dead)",
        "max_activation": "largest firing value (null if dead)",
        "histogram": "firing-token counts per bin of layers.histogram_edges",
        "position_mean": "n_tokens values: mean over all images of the firing value at each position, CLS first",
        "label_terms": "up to 8 words most distinctive of the captions of its top images (TF-IDF)",
        "label": "label_terms joined by spaces",
        "similar_features": "the 10 features of the layer whose decoder rows are closest (cosine)",
        "similar_cosines": "those decoder cosines",
        "zero_shot_terms": "zero-shot labels: vocabulary terms whose CLIP text embedding is close to the feature's "
        "prototype, best first (empty when none passes)",
        "zero_shot_scores": "each term's cosine with the prototype",
        "zero_shot_margins": "each term's lead over the next candidate, in null standard deviations",
    },
    "examples": {
        "layer": "the layer (layers.layer)",
        "feature": "the feature (features.feature)",
        "kind": "top (the feature's top images) or band (a sample from a lower activation band)",
        "rank": "1-based: by activation descending within the top list or within the band",
        "band": "0 for top; band b of band_count holds activations in (max * (1 - b / band_count), "
        "max * (1 - (b - 1) / band_count)] of features.max_activation",
        "image_id": "the image (images.image_id)",
        "key": "the image's webdataset sample key, or its path relative to the image folder",
        "caption": "the image's caption (null when unknown)",
        "activation": f"max over all tokens of the image (CLS included) of the feature's firing value, {_ACTIVATION}",
        "cls_activation": "the feature's firing value on the CLS token (0 if it does not fire there)",
        "heatmap": "grid_h x grid_w values, row-major (CLS excluded): the feature's firing value on each patch, "
        "dequantised from one byte per patch (error at most max(heatmap) / 510), as the feature page's JSON gives it",
    },
    "images": {
        "image_id": "the image's id in the index (examples.image_id)",
        "source": "the shard or folder it came from (a local path shortened to its last part)",
        "key": "webdataset sample key, or the path relative to the image folder",
        "url": "original URL when known",
        "caption": "caption when known",
        "width": "original width in pixels",
        "height": "original height in pixels",
        "thumbnail": "JPEG bytes of the exact square the model saw (a heatmap laid over it covers the right pixels)",
    },
}


def type_name(type_: pa.DataType) -> str:
    """An Arrow type as dataset_info.json names it: `int32`, `float64`, `string`, `list<float32>`, ..."""
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return f"list<{type_name(type_.value_type)}>"
    return {"double": "float64", "float": "float32", "halffloat": "float16", "large_string": "string"}.get(
        str(type_), str(type_)
    )


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def provenance(meta: dict) -> dict:
    """What the index records about its making, local paths shortened as the pages show them."""
    names = PublicNames()
    model, sae = meta.get("model") or {}, meta.get("sae") or {}
    sample = names.sample(meta.get("sample") or {})
    kept = ("index_id", "created_at", "released_suite", "layers", "n_tokens", "grid", "d_model", "image_size")
    kept += ("normalisation", "precision", "top_n", "band_count", "band_size", "active_threshold", "demo")
    return {
        "schema_version": f"{meta.get('schema_version')}.{meta.get('schema_minor', 0)}",
        **{key: meta[key] for key in kept if key in meta},
        "model": {**model, "name": public_name(model.get("name"))},
        "sae": {**sae, "source": public_name(sae.get("source"))},
        "sample": {key: sample[key] for key in ("sources", "n_images", "n_skipped", "max_images") if key in sample},
        **{key: meta[key] for key in ("embeddings", "zero_shot", "versions", "timings") if key in meta},
    }


def dataset_info(meta: dict, options, layers: list[int], written: dict) -> dict:
    """The contents of dataset_info.json: what was exported, from which index, and every column written."""
    tables = {
        table: {
            "file": item.file,
            "rows": item.rows,
            "description": TABLE_MEANINGS[table],
            "columns": [
                {"name": field.name, "type": type_name(field.type), "description": COLUMNS[table][field.name]}
                for field in item.schema
            ],
        }
        for table, item in written.items()
    }
    encoding = {
        "parquet": "Parquet (zstd), one file per table; load with pyarrow, pandas, DuckDB or Hugging Face datasets",
        "jsonl": "JSON Lines, one object per row; binary values are base64 strings, float32 values are written "
        "in their shortest decimal form (reading one back as float32 gives the stored value)",
    }[options.format]
    return {
        "description": "Features of sparse autoencoders on a CLIP vision model, exported from a CLIP-Scope "
        "Explorer index: per-layer metrics, per-feature statistics and labels, the images each feature shows "
        "(with per-patch heatmaps when exported), and those images.",
        "format": options.format,
        "encoding": encoding,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "exported_by": {name: _version(name) for name in ("clipscope-explorer", "pyarrow", "duckdb")},
        "selection": {
            "layers": layers,
            "features": list(options.features) if options.features else None,
            "heatmaps": options.with_heatmaps,
            "thumbnails": options.with_images,
        },
        "index": {"file": Path(options.index).name, **provenance(meta)},
        "tables": tables,
    }
