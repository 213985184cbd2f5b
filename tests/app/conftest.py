"""Fixtures for the web app: a small, self-consistent index written with the real writer.

`build_index(path)` is the one function to replace when an index from the real
precompute job is used instead; everything else only needs the file it returns
to follow docs/schema.md. It writes 2 layers (11 and 20, so the model-card
comparison shows) x 64 features with 16 x 16 patch heatmaps, 40 JPEG
thumbnails, captions, dead features, short band lists and null captions/URLs.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from clipscope_explorer.precompute.index.store import IndexWriter, blob_column

LAYERS = (11, 20)
N_FEATURES = 64
GRID = (16, 16)
N_TOKENS = 1 + GRID[0] * GRID[1]
N_SAMPLE = 120          # images encoded
STORED = 40             # images that examples may reference
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
    y, x = np.mgrid[0:GRID[0], 0:GRID[1]] + 0.5
    sigma = r / patch * rng.uniform(0.5, 0.9)
    heat = np.exp(-((y - cy / patch) ** 2 + (x - cx / patch) ** 2) / (2 * sigma ** 2))
    heat[heat < 0.1] = 0.0
    return (heat / heat.max() * peak).reshape(-1).astype(np.float32)


def _label_terms(captions: list[str | None]) -> list[str]:
    words = Counter(w for c in captions if c for w in re.findall(r"[a-z]+", c.lower()) if w not in STOPWORDS)
    return [w for w, _ in words.most_common(4)]


def build_index(path: Path) -> Path:
    """Write the test index at `path` with the project's writer and return the path."""
    rng = np.random.default_rng(1234)
    stored_ids = np.sort(rng.choice(N_SAMPLE, STORED, replace=False)).astype(np.int64)
    theme_of = {int(i): int(k % len(THEMES)) for k, i in enumerate(stored_ids)}
    captions = {i: (None if k % 13 == 5 else f"{THEMES[theme_of[i]][2]} #{k}") for k, i in enumerate(stored_ids.tolist())}
    edges = np.logspace(-2, 2, 25)
    referenced: set[int] = set()
    with IndexWriter(path) as writer:
        writer.put_meta(
            model={"name": "ViT-L-14", "pretrained": "laion2b_s32b_b82k"},
            sae={"source": "lewington/CLIP-ViT-L-scope", "checkpoint": 1200013184}, released_suite=True,
            layers=list(LAYERS), n_tokens=N_TOKENS, grid=list(GRID), d_model=1024, image_size=224,
            normalisation="none",
            sample={"sources": ["shards/00000.tar", "shards/00001.tar"], "n_images": N_SAMPLE, "n_skipped": 1,
                    "skipped": [{"source": "shards/00001.tar", "key": "000001234", "reason": "cannot decode"}]},
            top_n=TOP_N, band_count=BAND_COUNT, band_size=BAND_SIZE, active_threshold=0.01,
            timings={"encode": 12.5, "neighbours": 0.4, "labels": 0.2, "write": 0.3, "total": 13.4},
            versions={"clipscope_explorer": "0.1.0", "torch": "2.14.1", "open_clip": "3.3.0", "duckdb": "2.0.1"},
            demo=False)
        for layer in LAYERS:
            n_tokens = N_SAMPLE * N_TOKENS
            centre = np.hypot(*(np.mgrid[0:GRID[0], 0:GRID[1]] - 7.5)).reshape(-1)
            writer.add_layer(dict(
                layer=layer, sae_file=f"{layer}_resid/1200013184.pt", checkpoint=1200013184, d_in=1024,
                n_features=N_FEATURES, k=32, n_images=N_SAMPLE, n_tokens=n_tokens, mse=300.0 + layer,
                explained_variance=0.7, mse_raw=300.0 + layer, explained_variance_raw=0.7, l0=31.5,
                dead_fraction=len(DEAD) / N_FEATURES, active_fraction=0.5, nonpositive_kept_fraction=0.002,
                mse_by_position=[250.0] + (400.0 - 10 * centre).tolist(), histogram_edges=edges.tolist()))
            feature_cols: dict[str, list] = {name: [] for name in (
                "n_fired_tokens", "n_fired_images", "n_fired_cls", "mean_activation", "max_activation", "histogram",
                "position_mean", "label_terms", "similar_features", "similar_cosines")}
            ex: dict[str, list] = {name: [] for name in (
                "feature", "kind", "band", "rank", "image_id", "activation", "cls_activation", "heatmap_scale")}
            heatmaps = []
            for feature in range(N_FEATURES):
                others = rng.choice([f for f in range(N_FEATURES) if f != feature], 10, replace=False)
                feature_cols["similar_features"].append(others.astype(np.int32).tolist())
                feature_cols["similar_cosines"].append(np.sort(rng.uniform(0.1, 0.9, 10))[::-1].astype(np.float32).tolist())
                if feature in DEAD:
                    for name, value in (("n_fired_tokens", 0), ("n_fired_images", 0), ("n_fired_cls", 0),
                                        ("mean_activation", None), ("max_activation", None),
                                        ("histogram", [0] * 24), ("position_mean", [0.0] * N_TOKENS),
                                        ("label_terms", [])):
                        feature_cols[name].append(value)
                    continue
                theme = (feature + layer) % len(THEMES)
                firing = [i for i in stored_ids.tolist() if theme_of[i] == theme or rng.random() < 0.15]
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
                n_patches_fired = 0
                for kind, band, rank, image_id, act in rows:
                    heat = _heatmap(rng, image_id, act)
                    cls = float(act * rng.uniform(0.2, 0.9)) if rng.random() < 0.5 else 0.0
                    scale = float(heat.max()) / 255
                    heatmaps.append(np.round(heat / scale).astype(np.uint8))
                    n_patches_fired += int((heat > 0).sum())
                    for name, value in (("feature", feature), ("kind", kind), ("band", band), ("rank", rank),
                                        ("image_id", image_id), ("activation", max(float(heat.max()), cls)),
                                        ("cls_activation", cls), ("heatmap_scale", scale)):
                        ex[name].append(value)
                    referenced.add(image_id)
                n_images = len(firing) + int(rng.integers(0, 30))
                n_tokens_fired = n_patches_fired + int(rng.integers(n_images, 4 * n_images + 1))
                feature_cols["n_fired_tokens"].append(n_tokens_fired)
                feature_cols["n_fired_images"].append(n_images)
                feature_cols["n_fired_cls"].append(int(rng.integers(0, n_images + 1)))
                feature_cols["mean_activation"].append(peak * 0.3)
                feature_cols["max_activation"].append(peak)
                centres = np.log10(np.sqrt(edges[:-1] * edges[1:]))
                weights = np.exp(-((centres - np.log10(peak * 0.3)) ** 2) / 0.3)
                feature_cols["histogram"].append(rng.multinomial(n_tokens_fired, weights / weights.sum()).tolist())
                feature_cols["position_mean"].append((rng.random(N_TOKENS) * peak * 0.05).astype(np.float32).tolist())
                feature_cols["label_terms"].append(_label_terms([captions.get(r[3]) for r in rows if r[0] == "top"]))
            fired = np.array(feature_cols["n_fired_tokens"], dtype=np.int64)
            images_fired = np.array(feature_cols["n_fired_images"], dtype=np.int64)
            writer.add_rows("features", {
                "layer": np.full(N_FEATURES, layer, dtype=np.int32),
                "feature": np.arange(N_FEATURES, dtype=np.int32),
                "n_fired_tokens": fired, "n_fired_images": images_fired,
                "n_fired_cls": np.array(feature_cols["n_fired_cls"], dtype=np.int64),
                "frequency": fired / n_tokens, "image_frequency": images_fired / N_SAMPLE,
                "cls_frequency": np.array(feature_cols["n_fired_cls"]) / N_SAMPLE,
                "mean_activation": pa.array(feature_cols["mean_activation"], pa.float64()),
                "max_activation": pa.array(feature_cols["max_activation"], pa.float64()),
                "histogram": pa.array(feature_cols["histogram"], pa.list_(pa.int32())),
                "position_mean": pa.array(feature_cols["position_mean"], pa.list_(pa.float32())),
                "label_terms": pa.array(feature_cols["label_terms"], pa.list_(pa.string())),
                "label": pa.array([" ".join(t) for t in feature_cols["label_terms"]], pa.string()),
                "similar_features": pa.array(feature_cols["similar_features"], pa.list_(pa.int32())),
                "similar_cosines": pa.array(feature_cols["similar_cosines"], pa.list_(pa.float32())),
            })
            n = len(ex["feature"])
            writer.add_rows("examples", {
                "layer": np.full(n, layer, dtype=np.int32), "feature": np.array(ex["feature"], dtype=np.int32),
                "kind": pa.array(ex["kind"], pa.string()), "band": np.array(ex["band"], dtype=np.int8),
                "rank": np.array(ex["rank"], dtype=np.int32), "image_id": np.array(ex["image_id"], dtype=np.int32),
                "activation": np.array(ex["activation"], dtype=np.float32),
                "cls_activation": np.array(ex["cls_activation"], dtype=np.float32),
                "heatmap_scale": np.array(ex["heatmap_scale"], dtype=np.float32),
                "heatmap": blob_column(np.stack(heatmaps)),
            })
        ids = sorted(referenced)
        writer.add_rows("images", {
            "image_id": np.array(ids, dtype=np.int32),
            "source": pa.array([f"shards/0000{i % 2}.tar" for i in ids]),
            "key": pa.array([f"{i:09d}" for i in ids]),
            "url": pa.array([None if i % 7 == 0 else f"https://example.org/img/{i}.jpg" for i in ids], pa.string()),
            "caption": pa.array([captions[i] for i in ids], pa.string()),
            "width": np.full(len(ids), 640, dtype=np.int32), "height": np.full(len(ids), 480, dtype=np.int32),
            "thumbnail": pa.array([_thumbnail(theme_of[i], i) for i in ids], pa.binary()),
        })
        return writer.finish()


@pytest.fixture(scope="session")
def index_path(tmp_path_factory) -> Path:
    return build_index(tmp_path_factory.mktemp("app_index") / "index.duckdb")


@pytest.fixture(scope="session")
def settings(index_path, tmp_path_factory):
    """The synthetic index names the real ViT-L/14 release, which cannot load offline: live encoding off."""
    from clipscope_explorer.app.settings import Settings

    return Settings(index=index_path, live=False, upload_store=tmp_path_factory.mktemp("uploads"))


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
    from one client address, so the per-client upload rate limit is off unless `overrides` set it."""
    from clipscope_explorer.app.main import create_app
    from clipscope_explorer.app.settings import Settings

    options = dict(index=tiny_index, upload_store=store, store_uploads=store is not None, upload_rate_limit=0)
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
