"""An upload's nearest sample images and zero-shot labels equal a brute force over the index's stored
vectors, with the upload's embedding computed by open_clip itself (the tiny model, `local-dir:`); the
stored result keeps what finds them again."""

from __future__ import annotations

import io
import json
import re

import duckdb
import numpy as np
import pytest
from PIL import Image

from tests import image_cases as cases
from tests.app.test_live import upload
from tests.app.test_live_equality import shard_images

NEAREST, ZERO_SHOT = 12, 5


@pytest.fixture(scope="module")
def stored_vectors(tiny_index) -> dict:
    """The index's image and vocabulary embeddings as float64, read with DuckDB (the app serves a copy)."""
    with duckdb.connect(str(tiny_index), read_only=True) as con:
        images = con.execute("SELECT image_id, key, embedding FROM samples ORDER BY image_id").fetchall()
        terms = con.execute("SELECT term, embedding FROM vocabulary ORDER BY term").fetchall()
    return {
        "ids": np.array([row[0] for row in images]),
        "keys": [row[1] for row in images],
        "images": np.stack([np.frombuffer(row[2], dtype="<f2") for row in images]).astype(np.float64),
        "terms": [row[0] for row in terms],
        "term_vectors": np.stack([np.frombuffer(row[1], dtype="<f2") for row in terms]).astype(np.float64),
    }


@pytest.fixture(scope="module")
def open_clip_image(tiny_model_spec):
    """open_clip itself: the final image embedding of an image file's bytes, float64."""
    import open_clip
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms(tiny_model_spec)
    model.eval()

    def embed(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image, torch.inference_mode():
            pixels = preprocess(image.convert("RGB"))[None]
            return model.encode_image(pixels, normalize=True)[0].double().numpy()

    return embed


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows best first (ties: the first row), and their scores."""
    scores = vectors @ query
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return order, scores[order]


def check_against_brute_force(data: dict, query: np.ndarray, vectors: dict) -> None:
    rows, scores = brute_force(vectors["images"], query, NEAREST)
    nearest = data["nearest_images"]
    assert [image["image_id"] for image in nearest] == vectors["ids"][rows].tolist()
    np.testing.assert_allclose([image["score"] for image in nearest], scores, rtol=0, atol=1e-5)
    assert [image["key"] for image in nearest] == [vectors["keys"][i] for i in rows]
    rows, scores = brute_force(vectors["term_vectors"], query, ZERO_SHOT)
    labels = data["zero_shot_labels"]
    assert [label["text"] for label in labels] == [vectors["terms"][i] for i in rows]
    np.testing.assert_allclose([label["score"] for label in labels], scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_nearest_images_and_labels_equal_a_brute_force(live_client, stored_vectors, open_clip_image, seed):
    assert live_client.app.state.meaning.wait(60)
    assert len(stored_vectors["terms"]) >= ZERO_SHOT and len(stored_vectors["ids"]) > NEAREST  # preconditions
    data = cases.encode(cases.noisy((150, 110), seed=300 + seed), "JPEG")
    result = upload(live_client, data, layers="2").json()
    check_against_brute_force(result, open_clip_image(data), stored_vectors)
    assert all(image["page_url"] == f"/samples/{image['image_id']}" for image in result["nearest_images"])


def test_an_indexed_image_finds_itself_first(live_client, shard_dir, stored_vectors, open_clip_image):
    assert live_client.app.state.meaning.wait(60)
    images = shard_images(shard_dir)
    key = stored_vectors["keys"][5]
    result = upload(live_client, images[key], layers="1").json()
    first = result["nearest_images"][0]
    assert first["key"] == key and first["score"] == pytest.approx(1.0, abs=2e-3)  # its float16 copy
    check_against_brute_force(result, open_clip_image(images[key]), stored_vectors)


def test_the_stored_result_finds_them_again(live_client, open_clip_image, stored_vectors):
    assert live_client.app.state.meaning.wait(60)
    data = cases.encode(cases.noisy((120, 140), seed=311), "PNG")
    posted = upload(live_client, data).json()
    shown = live_client.get(f"/api/uploads/{posted['upload_id']}").json()
    assert shown["nearest_images"] == posted["nearest_images"] and posted["nearest_images"]
    assert shown["zero_shot_labels"] == posted["zero_shot_labels"] and posted["zero_shot_labels"]
    stored = live_client.app.state.uploads.get(posted["upload_id"])
    np.testing.assert_allclose(stored.embedding(), open_clip_image(data), rtol=0, atol=1e-5)
    text = live_client.get(posted["url"]).text
    for image in posted["nearest_images"]:
        assert f'href="{image["page_url"]}"' in text
    for label in posted["zero_shot_labels"]:
        assert f">{label['text']}</span>" in text


def test_an_upload_stored_without_its_embedding_is_encoded_again(live_client):
    assert live_client.app.state.meaning.wait(60)
    data = cases.encode(cases.noisy((90, 90), seed=312), "PNG")
    posted = upload(live_client, data).json()
    stored = live_client.app.state.uploads.get(posted["upload_id"])
    (stored.folder / "embedding.npy").unlink()  # as an upload stored before embeddings were kept
    meta = json.loads((stored.folder / "meta.json").read_text())
    (stored.folder / "meta.json").write_text(json.dumps({**meta, "embedding": False}))
    assert live_client.get(f"/api/uploads/{posted['upload_id']}").json()["nearest_images"] == []
    again = upload(live_client, data)
    assert "encode;dur=" in again.headers["server-timing"]
    assert again.json()["nearest_images"] == posted["nearest_images"]
    assert re.fullmatch(r"[0-9a-f]{32}", posted["upload_id"]) and (stored.folder / "embedding.npy").is_file()
