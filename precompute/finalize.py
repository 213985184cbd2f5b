"""Final step of the job: neighbours, labels, prototypes, zero-shot labels, image ids, and the index file.

Image ids: an encoded image's id is the rank of its ordinal among the ordinals of every encoded image, so
`samples` (every encoded image) and `images` (the ones some feature shows, with thumbnails) share ids.
Every per-image table streams from the work folder in chunks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipscope_explorer.precompute.index.rows import (
    ACTIVE_THRESHOLD,
    images_columns,
    sample_codes_columns,
    samples_columns,
    vocabulary_columns,
)
from clipscope_explorer.precompute.index.store import IndexWriter
from clipscope_explorer.precompute.model.release import DEFAULT_MODEL, DEFAULT_SAE_REPO
from clipscope_explorer.precompute.neighbours import cached_neighbours
from clipscope_explorer.precompute.prototypes import feature_prototypes, null_prototypes, pool_ordinals
from clipscope_explorer.precompute.tables import chosen_examples, examples_columns, image_ids, layer_columns

log = logging.getLogger(__name__)

IMAGE_CHUNK = 2000
SAMPLE_CHUNK = 20_000
MAX_CAPTION_TERMS = 10_000  # the text tower embeds each term once: ~13 GFLOP a term for ViT-L/14
MAX_ZERO_SHOT_LABELS = 5
NULL_SEED = 0


def _labels(chosen: dict, n_features: int, captions: dict[int, str | None], frequency) -> list[list[str]]:
    """Label terms per feature from the captions of its top images."""
    per_feature: list[list[str | None]] = [[] for _ in range(n_features)]
    for feature, kind, ordinal in zip(chosen["feature"], chosen["kind"], chosen["ordinal"]):
        if kind == "top":
            per_feature[feature].append(captions.get(int(ordinal)))
    return [frequency.label_terms(caps) if caps else [] for caps in per_feature]


@dataclass
class Meaning:
    """What the index holds in CLIP's embedding space: the embeddings of the images examples show
    (float16, rows in `shown` order) and of the null pool, and the zero-shot vocabulary when labels are made."""

    shown: np.ndarray  # ordinals, ascending
    embeddings: np.ndarray  # [len(shown), d] float16
    pool: np.ndarray  # [P, d] float16
    terms: list[tuple[str, str, int]]  # (term, origin, n_captions)
    term_vectors: np.ndarray | None  # [V, d] float32; None: no zero-shot labels
    zero_shot_meta: dict | None

    def prototypes(self, chosen: dict, n_features: int) -> np.ndarray:
        rows = np.searchsorted(self.shown, np.asarray(chosen["ordinal"], dtype=np.int64))
        return feature_prototypes(self.embeddings, rows, chosen["feature"], chosen["activation"], n_features)

    def labels(self, prototypes: np.ndarray, chosen: dict, layer: int) -> tuple[list | None, int]:
        """(zero-shot labels per feature of the layer, the number of null prototypes behind them): the null
        prototypes take the layer's own activation weights (no labels, None, without terms or with fewer
        than two features that show images)."""
        if self.term_vectors is None:
            return None, 0
        from clipscope_explorer.precompute.zero_shot import zero_shot_labels

        rng = np.random.default_rng([NULL_SEED, layer])
        null = null_prototypes(self.pool, chosen["feature"], chosen["activation"], rng)
        if len(null) < 2 or len(self.terms) < 2:
            return None, 0
        terms = [t for t, _, _ in self.terms]
        return zero_shot_labels(prototypes, self.term_vectors, terms, null, MAX_ZERO_SHOT_LABELS), len(null)


def _vocabulary(components, config, workdir) -> list[tuple[str, str, int]]:
    """The zero-shot terms (term, origin, n_captions): the words and two-word phrases of the sample's
    captions, then the user's terms (a user term replaces the caption term it spells, ignoring case)."""
    from clipscope_explorer.precompute.zero_shot import CaptionTermCounter

    counter = CaptionTermCounter()
    for caption in workdir.captions_of_samples():
        counter.add(caption)
    user = components.user_terms or []
    listed = {term.casefold() for term in user}
    found = counter.terms(config.zero_shot_min_count, MAX_CAPTION_TERMS)
    return [(t, "captions", n) for t, n in found if t.casefold() not in listed] + [
        (t, "user", counter.count(t.lower())) for t in user
    ]


def _meaning(components, config, workdir, chosen: dict, sample_ordinals: np.ndarray) -> Meaning | None:
    if not config.embeddings:
        return None
    from clipscope_explorer.precompute.model.text import load_text_tower
    from clipscope_explorer.precompute.model.vision import ModelLoadError, ModelSpec

    dim = components.tower.embedding_dim
    shown = np.unique(np.concatenate([np.asarray(c["ordinal"], dtype=np.int64) for c in chosen.values()]))
    pool = pool_ordinals(sample_ordinals, np.random.default_rng(NULL_SEED))
    meaning = Meaning(shown, workdir.embeddings(shown, dim), workdir.embeddings(pool, dim), [], None, None)
    try:
        text = load_text_tower(ModelSpec(config.model, config.pretrained), components.device, components.precision)
    except ModelLoadError as error:
        log.warning("no zero-shot labels: %s", error)
        return meaning
    meaning.terms = _vocabulary(components, config, workdir)
    if text.dim != dim:
        log.warning("no zero-shot labels: text embeddings have %d dimensions, image embeddings %d", text.dim, dim)
        return meaning
    from clipscope_explorer.precompute.zero_shot import FALSE_LABEL_RATE, TEMPLATE

    meaning.term_vectors = text.encode([TEMPLATE.format(t) for t, _, _ in meaning.terms]).vectors
    meaning.zero_shot_meta = {
        "template": TEMPLATE,
        "vocabulary_size": len(meaning.terms),
        "min_count": config.zero_shot_min_count,
        "user_vocabulary": None if config.vocabulary is None else str(config.vocabulary),
        "max_labels": MAX_ZERO_SHOT_LABELS,
        "false_label_rate": FALSE_LABEL_RATE,
    }
    return meaning


def _write_samples(writer: IndexWriter, workdir, layers: list[int], sample_ordinals: np.ndarray) -> None:
    """`samples` by image id, then `sample_codes` by (layer, image id), a chunk at a time."""
    for rows in workdir.sample_rows(SAMPLE_CHUNK):
        writer.add_rows("samples", samples_columns(image_ids(sample_ordinals, [r[0] for r in rows]), rows))
    for layer in layers:
        for rows in workdir.code_rows(layer, SAMPLE_CHUNK):
            ids = image_ids(sample_ordinals, [r[1] for r in rows])
            indices = np.stack([np.frombuffer(r[2], np.int32) for r in rows])
            values = np.stack([np.frombuffer(r[3], np.float32) for r in rows])
            writer.add_rows("sample_codes", sample_codes_columns(layer, ids, indices, values))


def write_index(components, config, state, workdir, elapsed_before: float) -> Path:
    timings = {"encode": round(state.encode_seconds, 3)}
    tick = time.perf_counter()
    neighbours = {
        layer: cached_neighbours(sae.dec.detach(), sae.origin.file if sae.origin else None)
        for layer, sae in components.saes.items()
    }
    timings["neighbours"] = round(time.perf_counter() - tick, 3)

    tick = time.perf_counter()
    sample_ordinals = workdir.sample_ordinals()
    if len(sample_ordinals) != state.n_images:
        raise RuntimeError(
            f"{workdir.path} holds {len(sample_ordinals)} encoded images, the run state {state.n_images}; "
            f"rerun with --fresh"
        )
    chosen = {layer: chosen_examples(acc, config.examples) for layer, acc in state.accumulators.items()}
    ordinals = sorted({int(o) for c in chosen.values() for o in c["ordinal"]})
    captions = workdir.captions(ordinals)
    if len(captions) != len(ordinals):
        raise RuntimeError(
            f"{len(ordinals) - len(captions)} example images are missing from {workdir.path}; rerun with --fresh"
        )
    labels = {
        layer: _labels(c, components.saes[layer].n_features, captions, state.captions) for layer, c in chosen.items()
    }
    timings["labels"] = round(time.perf_counter() - tick, 3)

    tick = time.perf_counter()
    meaning = _meaning(components, config, workdir, chosen, sample_ordinals)
    prototypes, zero_shot, n_null = {}, {}, []
    if meaning is not None:
        for layer in sorted(chosen):
            prototypes[layer] = meaning.prototypes(chosen[layer], components.saes[layer].n_features)
            zero_shot[layer], count = meaning.labels(prototypes[layer], chosen[layer], layer)
            n_null.append(count)
        if meaning.zero_shot_meta is not None:
            meaning.zero_shot_meta["n_null"] = min(n_null)  # the fewest behind any layer's labels
    timings["zero_shot"] = round(time.perf_counter() - tick, 3)

    tick = time.perf_counter()
    sae_any = next(iter(components.saes.values()))
    tower = components.tower
    with IndexWriter(config.out) as writer:
        for layer, acc in sorted(state.accumulators.items()):
            row, features = layer_columns(
                acc,
                layer,
                components.saes[layer],
                labels[layer],
                neighbours[layer],
                prototypes.get(layer),
                zero_shot.get(layer),
            )
            writer.add_layer(row)
            writer.add_rows("features", features)
            writer.add_rows("examples", examples_columns(layer, chosen[layer], sample_ordinals))
        for start in range(0, len(ordinals), IMAGE_CHUNK):  # thumbnails stream through in chunks
            rows = workdir.image_rows(ordinals[start : start + IMAGE_CHUNK])
            writer.add_rows("images", images_columns(0, rows, image_ids(sample_ordinals, [r[0] for r in rows])))
        _write_samples(writer, workdir, sorted(components.saes), sample_ordinals)
        if meaning is not None and meaning.term_vectors is not None:
            writer.add_rows("vocabulary", vocabulary_columns(meaning.terms, meaning.term_vectors))
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
            embeddings={"dim": tower.embedding_dim, "dtype": "float16"} if config.embeddings else None,
            zero_shot=None if meaning is None else meaning.zero_shot_meta,
        )
        return writer.finish()
