"""Fixtures for the web app: a small, self-consistent index written with the real writer.

`build_index(path)` is the one function to replace when an index from the real
precompute job is used instead; everything else only needs the file it returns
to follow docs/schema.md. It writes 2 layers (11 and 20, so the model-card
comparison shows) x 64 features with 16 x 16 patch heatmaps, 40 JPEG
thumbnails, captions, dead features, short band lists and null captions/URLs;
and of schema 1.2, all 120 sample images with CLIP embeddings (EMBED_DIM, the tiny
CLIP's; a few exact duplicates, so rankings meet ties), the CLS codes, feature
prototypes (one shared across layers and one within a layer), zero-shot labels and
a vocabulary with its text embeddings.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from clipscope_explorer.precompute.index.rows import (
    ACTIVE_THRESHOLD,
    LayerTotals,
    examples_columns,
    feature_columns,
    images_columns,
    layer_row,
    sample_codes_columns,
    samples_columns,
    vocabulary_columns,
)
from clipscope_explorer.precompute.index.store import IndexWriter

LAYERS = (11, 20)
N_FEATURES = 64
GRID = (16, 16)
N_TOKENS = 1 + GRID[0] * GRID[1]
N_SAMPLE = 120  # images encoded
STORED = 40  # images that examples may reference
TOP_N, BAND_COUNT, BAND_SIZE = 8, 2, 3
DEAD = {5, 17, 40}
THEMES = [
    ("dog", (200, 150, 90), "a brown dog running on the beach"),
    ("car", (200, 40, 40), "red car parked on a city street"),
    ("pasta", (230, 200, 120), "a plate of pasta with tomato sauce"),
    ("mountain", (90, 120, 170), "snowy mountain landscape at sunrise"),
    ("cat", (120, 120, 120), "a grey cat sleeping on a sofa"),
    ("flower", (220, 80, 160), "pink flowers in a garden"),
    ("text", (245, 245, 245), "poster with bold black text"),
    ("boat", (40, 90, 160), "small boat on a calm lake"),
]
STOPWORDS = {"a", "an", "on", "of", "in", "at", "with", "the", "and"}
EMBED_DIM = 32  # the joint embedding space of tiny_clip_config (tests/conftest.py's tiny model)
K = 32
DUPLICATE_IMAGES = {70: 7, 71: 7, 90: 33}  # sample image -> the image whose embedding it repeats
SHARED_PROTOTYPES = {(20, 9): (11, 9), (20, 12): (20, 10)}  # feature -> the feature whose prototype it repeats
MODEL = {"name": "ViT-L-14", "pretrained": "laion2b_s32b_b82k"}


def _object(image_id: int) -> tuple[int, int, int]:
    """Centre x, y and radius (pixels) of the object drawn in an image."""
    rng = np.random.default_rng(image_id)
    cx, cy, r = (int(v) for v in rng.integers([40, 40, 25], [184, 184, 70]))
    return cx, cy, r


def _thumbnail(theme: int, image_id: int) -> bytes:
    _, colour, _ = THEMES[theme]
    y, x = np.mgrid[0:224, 0:224]
    base = np.stack([(x * 0.3 + y * 0.2 + c * 0.7) % 256 for c in colour], axis=-1)
    image = Image.fromarray((base * 0.6 + 40).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    cx, cy, r = _object(image_id)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=(20, 20, 20), width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def _heatmap(rng, image_id: int, peak: float) -> np.ndarray:
    """A blob over the image's object whose largest patch value is exactly `peak`."""
    cx, cy, r = _object(image_id)
    patch = 224 / GRID[0]
    y, x = np.mgrid[0 : GRID[0], 0 : GRID[1]] + 0.5
    sigma = r / patch * rng.uniform(0.5, 0.9)
    heat = np.exp(-((y - cy / patch) ** 2 + (x - cx / patch) ** 2) / (2 * sigma**2))
    heat[heat < 0.1] = 0.0
    return (heat / heat.max() * peak).reshape(-1).astype(np.float32)


def _label_terms(captions: list[str | None]) -> list[str]:
    words = Counter(w for c in captions if c for w in re.findall(r"[a-z]+", c.lower()) if w not in STOPWORDS)
    return [w for w, _ in words.most_common(4)]


def _feature_examples(
    rng, feature: int, layer: int, stored: list[int], theme_of: dict[int, int]
) -> tuple[list, int, float]:
    """Example rows (kind, band, rank, ordinal, activation) of an alive feature, the number of images it
    fires on among those stored, and its peak activation."""
    theme = (feature + layer) % len(THEMES)
    firing = [i for i in stored if theme_of[i] == theme or rng.random() < 0.15]
    if feature % 11 == 3:  # a rare feature: a single image, no bands
        firing = firing[:1]
    acts = np.sort(rng.uniform(0.5, 12.0, len(firing)))[::-1]
    order = np.argsort(-acts, kind="stable")
    firing = [firing[j] for j in order]
    peak = float(acts[0])
    rows = [("top", 0, r + 1, firing[r], float(acts[r])) for r in range(min(TOP_N, len(firing)))]
    rest = list(zip(firing[TOP_N:], acts[TOP_N:].tolist()))
    for band in range(1, BAND_COUNT + 1):
        low, high = peak * (1 - band / BAND_COUNT), peak * (1 - (band - 1) / BAND_COUNT)
        chosen = [(i, a) for i, a in rest if low < a <= high][:BAND_SIZE]
        rows += [("band", band, r + 1, i, a) for r, (i, a) in enumerate(chosen)]
    return rows, len(firing), peak


def _layer(
    rng, layer: int, stored: list[int], theme_of: dict[int, int], captions: dict[int, str | None], edges: np.ndarray
) -> tuple[LayerTotals, list[list[str]], np.ndarray, np.ndarray, dict]:
    """One layer's totals, labels, neighbours and examples (image ordinals), as the job would count them."""
    fire = {name: np.zeros(N_FEATURES, np.int64) for name in ("tokens", "images", "cls")}
    activation_sum, max_activation = np.zeros(N_FEATURES), np.zeros(N_FEATURES)
    histogram = np.zeros((N_FEATURES, len(edges) - 1), np.int64)
    position_sum = np.zeros((N_FEATURES, N_TOKENS))
    similar = np.zeros((N_FEATURES, 10), np.int32), np.zeros((N_FEATURES, 10), np.float32)
    labels: list[list[str]] = [[] for _ in range(N_FEATURES)]
    examples: dict[str, list] = {
        name: [] for name in ("feature", "kind", "band", "rank", "ordinal", "activation", "cls", "scale", "heat")
    }
    for feature in range(N_FEATURES):
        similar[0][feature] = rng.choice([f for f in range(N_FEATURES) if f != feature], 10, replace=False)
        similar[1][feature] = np.sort(rng.uniform(0.1, 0.9, 10))[::-1]
        if feature in DEAD:
            continue
        rows, n_firing, peak = _feature_examples(rng, feature, layer, stored, theme_of)
        n_patches_fired = 0
        for kind, band, rank, ordinal, act in rows:
            heat = _heatmap(rng, ordinal, act)
            cls = float(act * rng.uniform(0.2, 0.9)) if rng.random() < 0.5 else 0.0
            scale = float(heat.max()) / 255
            n_patches_fired += int((heat > 0).sum())
            for name, value in (
                ("feature", feature),
                ("kind", kind),
                ("band", band),
                ("rank", rank),
                ("ordinal", ordinal),
                ("activation", max(float(heat.max()), cls)),
                ("cls", cls),
                ("scale", scale),
                ("heat", np.round(heat / scale).astype(np.uint8)),
            ):
                examples[name].append(value)
        n_images = n_firing + int(rng.integers(0, 30))
        fire["tokens"][feature] = n_patches_fired + int(rng.integers(n_images, 4 * n_images + 1))
        fire["images"][feature] = n_images
        fire["cls"][feature] = int(rng.integers(0, n_images + 1))
        activation_sum[feature] = peak * 0.3 * fire["tokens"][feature]
        max_activation[feature] = peak
        centres = np.log10(np.sqrt(edges[:-1] * edges[1:]))
        weights = np.exp(-((centres - np.log10(peak * 0.3)) ** 2) / 0.3)
        histogram[feature] = rng.multinomial(fire["tokens"][feature], weights / weights.sum())
        position_sum[feature] = (rng.random(N_TOKENS) * peak * 0.05).astype(np.float32) * N_SAMPLE
        labels[feature] = _label_terms([captions.get(r[3]) for r in rows if r[0] == "top"])
    n_tokens = N_SAMPLE * N_TOKENS
    centre = np.hypot(*(np.mgrid[0 : GRID[0], 0 : GRID[1]] - 7.5)).reshape(-1)
    totals = LayerTotals(
        n_images=N_SAMPLE,
        n_tokens=n_tokens,
        fired=int(31.5 * n_tokens),
        nonpositive_kept=2000,
        sq_error_by_position=np.array([250.0] + (400.0 - 10 * centre).tolist()) * N_SAMPLE,
        explained_variance=0.7 * n_tokens,
        fire_tokens=fire["tokens"],
        fire_images=fire["images"],
        fire_cls=fire["cls"],
        activation_sum=activation_sum,
        max_activation=max_activation,
        position_sum=position_sum,
        histogram=histogram,
        edges=edges,
    )
    return totals, labels, similar[0], similar[1], examples


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def _meaning(layers: dict, captions: dict[int, str | None]) -> dict:
    """Embeddings of every sample image (near its theme's direction; DUPLICATE_IMAGES repeat one exactly),
    feature prototypes (the activation-weighted mean of the top images' embeddings, normalised; none for
    dead features; SHARED_PROTOTYPES repeat one), zero-shot labels, CLS codes and the vocabulary."""
    rng = np.random.default_rng(77)  # its own generator: the older tables stay as they were
    themes = _unit(rng.normal(size=(len(THEMES), EMBED_DIM)))
    theme = np.arange(N_SAMPLE) % len(THEMES)
    embeddings = _unit(themes[theme] + 0.6 * rng.normal(size=(N_SAMPLE, EMBED_DIM)))
    for image, same in DUPLICATE_IMAGES.items():
        embeddings[image] = embeddings[same]
    stored = embeddings.astype("<f2").astype(np.float64)  # what the index will hold
    prototypes, zero_shot = {}, {}
    for layer, (*_, examples) in layers.items():
        table = np.full((N_FEATURES, EMBED_DIM), np.nan)
        labels: list[list[tuple[str, float, float]]] = [[] for _ in range(N_FEATURES)]
        top = [i for i, kind in enumerate(examples["kind"]) if kind == "top"]
        for feature in range(N_FEATURES):
            rows = [i for i in top if examples["feature"][i] == feature]
            if not rows:
                continue
            weights = np.array([examples["activation"][i] for i in rows])
            mean = weights @ stored[[examples["ordinal"][i] for i in rows]]
            table[feature] = mean / np.linalg.norm(mean)
            best = int(np.argmax(themes @ table[feature]))
            labels[feature] = [(THEMES[best][0], float(themes[best] @ table[feature]), 0.05)]
        prototypes[layer], zero_shot[layer] = table, labels
    for (layer, feature), (other_layer, other) in SHARED_PROTOTYPES.items():
        prototypes[layer][feature] = prototypes[other_layer][other]
    codes = {}
    for layer in layers:
        indices = np.stack([rng.choice(N_FEATURES, K, replace=False) for _ in range(N_SAMPLE)])
        codes[layer] = (indices, np.sort(rng.uniform(0.1, 9.0, (N_SAMPLE, K)), axis=1)[:, ::-1])
    terms = [(name, "captions", sum(1 for c in captions.values() if c and name in c)) for name, _, _ in THEMES]
    return {
        "embeddings": embeddings,
        "prototypes": prototypes,
        "zero_shot": zero_shot,
        "codes": codes,
        "vocabulary": ([*terms, ("zebra", "user", 0)], _unit(np.vstack([themes, rng.normal(size=EMBED_DIM)]))),
    }


def _sample_row(i: int, caption: str | None) -> tuple:
    return (
        i,
        f"shards/0000{i % 2}.tar",
        f"{i:09d}",
        None if i % 7 == 0 else f"https://example.org/img/{i}.jpg",
        caption,
        640,
        480,
    )


def build_index(path: Path, model: dict | None = None, embeddings: bool = True) -> Path:
    """Write the test index at `path` with the project's writer (precompute/index: `rows` derives the rows
    from small arrays of totals, `IndexWriter` checks and writes them) and return the path. `model` is
    what meta.model records (default: the released ViT-L/14); `embeddings=False` is an index built with
    --no-embeddings."""
    rng = np.random.default_rng(1234)
    stored = np.sort(rng.choice(N_SAMPLE, STORED, replace=False)).tolist()
    theme_of = {i: k % len(THEMES) for k, i in enumerate(stored)}
    captions = {i: (None if k % 13 == 5 else f"{THEMES[theme_of[i]][2]} #{k}") for k, i in enumerate(stored)}
    edges = np.logspace(-2, 2, 25)
    layers = {layer: _layer(rng, layer, stored, theme_of, captions, edges) for layer in LAYERS}
    shown = sorted({int(o) for *_, examples in layers.values() for o in examples["ordinal"]})
    all_captions = {i: captions.get(i, f"{THEMES[i % len(THEMES)][2]} (sample {i})") for i in range(N_SAMPLE)}
    meaning = _meaning(layers, all_captions)
    vectors = meaning["embeddings"] if embeddings else None
    with IndexWriter(path) as writer:
        for layer, (totals, labels, similar, cosines, examples) in layers.items():
            writer.add_layer(
                layer_row(layer, totals, d_in=1024, k=K, sae_file=f"{layer}_resid/1200013184.pt", checkpoint=1200013184)
            )
            writer.add_rows(
                "features",
                feature_columns(
                    layer,
                    totals,
                    labels,
                    similar,
                    cosines,
                    prototypes=meaning["prototypes"][layer] if embeddings else None,
                    zero_shot=meaning["zero_shot"][layer] if embeddings else None,
                ),
            )
            examples["image_id"] = examples["ordinal"]  # every sample is encoded: its id is its ordinal
            writer.add_rows("examples", examples_columns(layer, examples))
            writer.add_rows("sample_codes", sample_codes_columns(layer, range(N_SAMPLE), *meaning["codes"][layer]))
        writer.add_rows(
            "images",
            images_columns(
                0, [(*_sample_row(i, captions[i]), _thumbnail(theme_of[i], i)) for i in shown], image_ids=shown
            ),
        )
        writer.add_rows(
            "samples",
            samples_columns(
                range(N_SAMPLE),
                [
                    (*_sample_row(i, all_captions[i]), None if vectors is None else vectors[i].astype("<f2").tobytes())
                    for i in range(N_SAMPLE)
                ],
            ),
        )
        if embeddings:
            terms, term_vectors = meaning["vocabulary"]
            writer.add_rows("vocabulary", vocabulary_columns(terms, term_vectors))
        writer.put_meta(
            model=model or MODEL,
            sae={"source": "lewington/CLIP-ViT-L-scope", "checkpoint": 1200013184},
            released_suite=True,
            layers=list(LAYERS),
            n_tokens=N_TOKENS,
            grid=list(GRID),
            d_model=1024,
            image_size=224,
            normalisation="none",
            precision="fp32",
            normalisation_stats={},
            sample={
                "sources": ["shards/00000.tar", "shards/00001.tar"],
                "n_images": N_SAMPLE,
                "n_skipped": 1,
                "skipped": [{"source": "shards/00001.tar", "key": "000001234", "reason": "cannot decode"}],
                "failed_shards": [],
                "max_images": None,
            },
            top_n=TOP_N,
            band_count=BAND_COUNT,
            band_size=BAND_SIZE,
            active_threshold=ACTIVE_THRESHOLD,
            timings={"encode": 12.5, "neighbours": 0.4, "labels": 0.2, "write": 0.3, "total": 13.4},
            demo=False,
            embeddings={"dim": EMBED_DIM, "dtype": "float16"} if embeddings else None,
            zero_shot={
                "template": "a photo of {}",
                "vocabulary_size": len(meaning["vocabulary"][0]),
                "min_count": 2,
                "user_vocabulary": "vocabulary.txt",
                "max_labels": 3,
                "false_label_rate": 0.05,
                "n_null": 64,
            }
            if embeddings
            else None,
        )
        return writer.finish()


@pytest.fixture(scope="session")
def index_path(tmp_path_factory) -> Path:
    return build_index(tmp_path_factory.mktemp("app_index") / "index.duckdb")


@pytest.fixture(scope="session")
def settings(index_path, tmp_path_factory):
    """The synthetic index names the real ViT-L/14 release, which cannot load offline: live encoding and the
    text tower off (search by meaning's tests load a tiny one: tests/app/test_meaning*.py)."""
    from clipscope_explorer.app.settings import Settings

    return Settings(
        index=index_path,
        live=False,
        text=False,
        upload_store=tmp_path_factory.mktemp("uploads"),
        search_cache=tmp_path_factory.mktemp("search_cache"),
    )


@pytest.fixture(scope="session")
def client(settings):
    from clipscope_explorer.app.main import create_app

    with TestClient(create_app(settings), follow_redirects=False) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def index(client):
    """The app's open `Index` (for choosing URLs in tests)."""
    return client.app.state.index


# ---------------------------------------------------------------- live encoding (a real precompute index)


def live_app_client(tiny_index: Path, store: Path | None, **overrides):
    """A TestClient context over `tiny_index` with live encoding loaded (waits for it). Every request comes
    from one client address, so the per-client upload limits (rate, slots) are off unless `overrides` set them."""
    from clipscope_explorer.app.main import create_app
    from clipscope_explorer.app.settings import Settings

    options = dict(
        index=tiny_index,
        upload_store=store,
        store_uploads=store is not None,
        upload_rate_limit=0,
        upload_slots_per_client=0,
    )
    if store is None:
        options.pop("upload_store")
    settings = Settings(**{**options, **overrides})
    return TestClient(create_app(settings), follow_redirects=False)


def wait_live(client: TestClient, state: str = "ready") -> None:
    assert client.app.state.live.wait(120), "live encoder did not finish loading"
    assert client.app.state.live.state == state, client.app.state.live.message


@pytest.fixture(scope="session")
def live_index(tiny_index, tmp_path_factory) -> Path:
    """A copy of the precompute job's tiny index for the app (DuckDB refuses a second connection to one
    file with another configuration, and the precompute tests read `tiny_index` directly)."""
    import shutil

    return Path(shutil.copy(tiny_index, tmp_path_factory.mktemp("live_index") / "tiny.duckdb"))


@pytest.fixture(scope="session")
def live_client(live_index, tmp_path_factory):
    """Live encoding with the index's own model and SAEs, uploads stored."""
    with live_app_client(live_index, tmp_path_factory.mktemp("live_store"), max_upload_bytes=3_000_000) as client:
        wait_live(client)
        yield client


@pytest.fixture(scope="session")
def meaning_index(tmp_path_factory, tiny_model_spec) -> Path:
    """The page tests' index, its meta.model the tiny CLIP, whose text tower embeds in its EMBED_DIM."""
    folder = tmp_path_factory.mktemp("meaning_index")
    return build_index(folder / "index.duckdb", model={"name": tiny_model_spec, "pretrained": None})


@pytest.fixture(scope="session")
def meaning_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("search_cache")
