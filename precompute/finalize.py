"""Final step of the job: neighbours, labels, image ids, and the index file."""

from __future__ import annotations

import time
from pathlib import Path

from clipscope_explorer.precompute.index.rows import ACTIVE_THRESHOLD, images_columns
from clipscope_explorer.precompute.index.store import IndexWriter
from clipscope_explorer.precompute.model.release import DEFAULT_MODEL, DEFAULT_SAE_REPO
from clipscope_explorer.precompute.neighbours import cached_neighbours
from clipscope_explorer.precompute.tables import chosen_examples, examples_columns, layer_columns

IMAGE_CHUNK = 2000


def _labels(chosen: dict, n_features: int, captions: dict[int, str | None], frequency) -> list[list[str]]:
    """Label terms per feature from the captions of its top images."""
    per_feature: list[list[str | None]] = [[] for _ in range(n_features)]
    for feature, kind, ordinal in zip(chosen["feature"], chosen["kind"], chosen["ordinal"]):
        if kind == "top":
            per_feature[feature].append(captions.get(int(ordinal)))
    return [frequency.label_terms(caps) if caps else [] for caps in per_feature]


def write_index(components, config, state, workdir, elapsed_before: float) -> Path:
    timings = {"encode": round(state.encode_seconds, 3)}
    tick = time.perf_counter()
    neighbours = {
        layer: cached_neighbours(sae.dec.detach(), sae.origin.file if sae.origin else None)
        for layer, sae in components.saes.items()
    }
    timings["neighbours"] = round(time.perf_counter() - tick, 3)

    tick = time.perf_counter()
    chosen = {layer: chosen_examples(acc, config.examples) for layer, acc in state.accumulators.items()}
    ordinals = sorted({int(o) for c in chosen.values() for o in c["ordinal"]})
    captions = workdir.captions(ordinals)
    if len(captions) != len(ordinals):
        raise RuntimeError(
            f"{len(ordinals) - len(captions)} example images are missing from {workdir.path}; rerun with --fresh"
        )
    image_id = {ordinal: i for i, ordinal in enumerate(ordinals)}
    labels = {
        layer: _labels(c, components.saes[layer].n_features, captions, state.captions) for layer, c in chosen.items()
    }
    timings["labels"] = round(time.perf_counter() - tick, 3)

    tick = time.perf_counter()
    sae_any = next(iter(components.saes.values()))
    tower = components.tower
    with IndexWriter(config.out) as writer:
        for layer, acc in sorted(state.accumulators.items()):
            row, features = layer_columns(acc, layer, components.saes[layer], labels[layer], neighbours[layer])
            writer.add_layer(row)
            writer.add_rows("features", features)
            writer.add_rows("examples", examples_columns(layer, chosen[layer], image_id))
        for start in range(0, len(ordinals), IMAGE_CHUNK):  # thumbnails stream through in chunks
            writer.add_rows("images", images_columns(start, workdir.image_rows(ordinals[start : start + IMAGE_CHUNK])))
        timings["write"] = round(time.perf_counter() - tick, 3)
        timings["total"] = round(elapsed_before + timings["write"], 3)
        writer.put_meta(
            model={"name": config.model, "pretrained": config.pretrained},
            sae={"source": config.sae, "checkpoint": sae_any.origin.checkpoint if sae_any.origin else None},
            released_suite=config.model == DEFAULT_MODEL and config.sae == DEFAULT_SAE_REPO,
            layers=sorted(components.saes),
            n_tokens=tower.n_tokens,
            grid=list(tower.grid),
            d_model=tower.width,
            image_size=int(tower.visual.image_size[0]),
            normalisation=config.normalise,
            precision=components.precision,
            normalisation_stats={
                str(layer): {"mean": m.tolist(), "std": s.tolist()} for layer, (m, s) in state.normalisation.items()
            },
            sample={
                "sources": config.images,
                "n_images": state.n_images,
                "n_skipped": state.n_skipped,
                "skipped": state.skipped,
                "failed_shards": state.failed_shards,
                "max_images": config.max_images,
            },
            top_n=config.top_n,
            band_count=config.band_count,
            band_size=config.band_size,
            active_threshold=ACTIVE_THRESHOLD,
            timings=timings,
            demo=config.demo,
        )
        return writer.finish()
