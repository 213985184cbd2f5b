"""The final CLIP image embedding: the tower run to its end equals open_clip's own `encode_image`, live and as
stored in the index; feature prototypes equal their definition recomputed from the stored tables."""

from __future__ import annotations

import json
import logging

import duckdb
import numpy as np
import open_clip
import pytest
import torch

from clipscope_explorer.precompute.demo.scenes import save_tiny_clip, tiny_clip_config
from clipscope_explorer.precompute.model.checkpoints import load_sae
from clipscope_explorer.precompute.model.encode import encode_pixels
from clipscope_explorer.precompute.model.vision import load_tower
from tests.conftest import TINY_LAYERS, precompute_config

POOLING = {  # vision_cfg changes: each a different path through open_clip's VisionTransformer._pool
    "tok": {"pool_type": "tok"},
    "avg": {"pool_type": "avg"},
    "avg, ln after pool": {"pool_type": "avg", "final_ln_after_pool": True},
    "attentional pool": {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 4},
}


def open_clip_model(spec: str):
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    return model.eval(), preprocess


@pytest.mark.parametrize("pooling", list(POOLING))
def test_capture_embedding_equals_open_clip_encode_image(tmp_path, pooling):
    config = tiny_clip_config()
    config["vision_cfg"].update(POOLING[pooling])
    spec = f"local-dir:{save_tiny_clip(tmp_path / 'model', config, seed=3)}"
    tower = load_tower(spec, device="cpu")
    model, _ = open_clip_model(spec)
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    acts, embedding = tower.capture(pixels, [1], "fp32", embed=True)
    with torch.no_grad():
        expected = model.encode_image(pixels, normalize=True)
    assert embedding.dtype == torch.float32 and embedding.shape == (3, tower.embedding_dim)
    torch.testing.assert_close(embedding, expected)
    torch.testing.assert_close(acts[1], tower.capture(pixels, [1], "fp32")[1], rtol=0, atol=0)


def test_encode_pixels_with_the_embedding_gives_the_same_codes(tiny_tower, tiny_sae_repo):
    saes = {layer: load_sae(str(tiny_sae_repo), layer) for layer in TINY_LAYERS}
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    plain = encode_pixels(tiny_tower, saes, pixels, "fp32")
    codes, embedding = encode_pixels(tiny_tower, saes, pixels, "fp32", embed=True)
    for layer in TINY_LAYERS:
        assert codes[layer].code.indices.equal(plain[layer].code.indices)
        assert codes[layer].code.values.equal(plain[layer].code.values)
    torch.testing.assert_close(embedding, tiny_tower.capture(pixels, TINY_LAYERS, "fp32", embed=True)[1])


def test_blocks_after_the_deepest_layer_run_only_for_the_embedding(tiny_tower):
    calls = []
    hook = tiny_tower.visual.transformer.resblocks[-1].register_forward_hook(lambda *_: calls.append(1))
    try:
        tiny_tower.capture(torch.zeros(1, 3, 224, 224), [1])
        assert calls == []
        tiny_tower.capture(torch.zeros(1, 3, 224, 224), [1], embed=True)
        assert calls == [1]
    finally:
        hook.remove()


def decoded(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, "<f2")


def assert_float16_of(stored: np.ndarray, reference: np.ndarray) -> None:
    """`stored` is float16 rounding of `reference`, bit for bit. The one exception is unavoidable: the same
    model computes an image's float32 embedding to within ~1e-7 depending on the batch it is in (open_clip
    itself does), so a value within that of a float16 rounding midpoint may round either way; there the
    stored value must be one of the two float16 neighbours of the midpoint."""
    exact = reference.astype("<f2")
    off = stored.view(np.int16) != exact.view(np.int16)
    assert np.all(np.abs(stored.view(np.int16)[off].astype(int) - exact.view(np.int16)[off]) == 1)  # neighbours
    midpoints = (stored[off].astype(np.float64) + exact[off].astype(np.float64)) / 2
    np.testing.assert_allclose(reference[off], midpoints, rtol=0, atol=1e-6)
    assert off.mean() < 0.01


@pytest.fixture(scope="module")
def db(tiny_index):
    con = duckdb.connect(str(tiny_index), read_only=True)
    yield con
    con.close()


def test_stored_embeddings_are_open_clips_own_in_float16(db, shard_dir, tiny_model_spec):
    from tests.test_precompute import read_shards

    model, preprocess = open_clip_model(tiny_model_spec)
    images = {key: image for _, key, _, image in read_shards(shard_dir)}
    stored = db.execute("SELECT key, embedding FROM samples ORDER BY image_id").fetchall()
    assert [key for key, _ in stored] == list(images)  # every decodable image, in sample order
    with torch.no_grad():
        expected = model.encode_image(torch.stack([preprocess(image) for image in images.values()]), normalize=True)
    assert_float16_of(np.stack([decoded(blob) for _, blob in stored]), expected.numpy())
    assert json.loads(db.execute("SELECT value FROM meta WHERE key = 'embeddings'").fetchone()[0]) == {
        "dim": expected.shape[1],
        "dtype": "float16",
    }


@pytest.mark.parametrize("layer", TINY_LAYERS)
def test_prototypes_are_the_activation_weighted_mean_of_shown_embeddings(db, layer):
    embeddings = {
        i: decoded(b).astype(np.float64) for i, b in db.execute("SELECT image_id, embedding FROM samples").fetchall()
    }
    examples = db.execute("SELECT feature, image_id, activation FROM examples WHERE layer = ?", [layer]).fetchall()
    sums: dict[int, np.ndarray] = {}
    for feature, image_id, activation in examples:
        sums[feature] = sums.get(feature, 0) + activation * embeddings[image_id]
    rows = db.execute("SELECT feature, prototype FROM features WHERE layer = ? ORDER BY feature", [layer]).fetchall()
    for feature, blob in rows:
        if feature not in sums:
            assert blob is None, feature
            continue
        expected = sums[feature] / np.linalg.norm(sums[feature])
        np.testing.assert_allclose(decoded(blob), expected, atol=5e-4)  # float16 rounding: at most 2.4e-4
    assert sums, "some features must show images"


def test_without_embeddings_no_vectors_and_no_extra_blocks(
    tmp_path, shard_dir, tiny_model_spec, tiny_sae_repo, monkeypatch
):
    from clipscope_explorer.precompute import job

    calls = []
    loaded = job.load_tower

    def counting_tower(*args, **kwargs):
        tower = loaded(*args, **kwargs)
        tower.visual.transformer.resblocks[-1].register_forward_hook(lambda *_: calls.append(1))
        return tower

    monkeypatch.setattr(job, "load_tower", counting_tower)
    config = precompute_config(
        shard_dir, tiny_model_spec, tiny_sae_repo, tmp_path / "plain.duckdb", embeddings=False, max_images=12
    )
    job.run(config)
    assert calls == []  # layers 1 and 2 of 4 blocks: block 3 never ran
    con = duckdb.connect(str(config.out), read_only=True)
    meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta").fetchall()}
    assert meta["embeddings"] is None and meta["zero_shot"] is None
    assert con.execute("SELECT count(*), count(embedding) FROM samples").fetchone() == (11, 0)  # one corrupt
    assert con.execute("SELECT count(prototype) FROM features").fetchone() == (0,)
    assert con.execute("SELECT count(*) FROM vocabulary").fetchone() == (0,)
    assert con.execute("SELECT count(*) FROM sample_codes").fetchone() == (11 * len(TINY_LAYERS),)


def test_the_embedding_in_bf16_is_close_to_fp32(tiny_model_spec):
    """bf16 autocast, and a tower whose matrix weights are stored in bf16 (the live encoder's), embed too."""
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    exact = load_tower(tiny_model_spec, device="cpu").capture(pixels, [1], "fp32", embed=True)[1]
    for weights in ("fp32", "bf16"):
        tower = load_tower(tiny_model_spec, device="cpu", weights_precision=weights)
        embedding = tower.capture(pixels, [1], "bf16", embed=True)[1]
        assert embedding.dtype == torch.float32
        torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(2))
        assert (embedding * exact).sum(-1).min() > 0.99, weights


def test_without_a_text_tower_prototypes_stay_and_labels_are_skipped(
    tmp_path, shard_dir, tiny_model_spec, tiny_sae_repo, monkeypatch, caplog
):
    from clipscope_explorer.precompute import job
    from clipscope_explorer.precompute.model import text
    from clipscope_explorer.precompute.model.vision import ModelLoadError

    def no_text_tower(spec, *args, **kwargs):
        raise ModelLoadError(f"{spec.describe()} has no text tower")

    monkeypatch.setattr(text, "load_text_tower", no_text_tower)
    # a server started in-process earlier routes the package's logs to its own handler only
    monkeypatch.setattr(logging.getLogger("clipscope_explorer"), "propagate", True)
    config = precompute_config(shard_dir, tiny_model_spec, tiny_sae_repo, tmp_path / "x.duckdb", max_images=12)
    job.run(config)
    assert "no zero-shot labels:" in caplog.text and "has no text tower" in caplog.text
    con = duckdb.connect(str(config.out), read_only=True)
    assert json.loads(con.execute("SELECT value FROM meta WHERE key = 'zero_shot'").fetchone()[0]) is None
    assert con.execute("SELECT count(*) FROM vocabulary").fetchone() == (0,)
    assert con.execute("SELECT count(prototype) > 0, max(len(zero_shot_terms)) FROM features").fetchone() == (True, 0)


def test_zero_shot_labels_get_the_prototypes_terms_and_null_prototypes_and_are_stored(
    tmp_path, shard_dir, tiny_model_spec, tiny_sae_repo, monkeypatch
):
    from clipscope_explorer.precompute import job, zero_shot

    calls = []

    def spy(prototypes, term_vectors, terms, null_prototypes, max_labels):
        calls.append((prototypes, term_vectors, list(terms), null_prototypes, max_labels))
        return [[(terms[f % len(terms)], 0.5, 1.5)] if f % 3 == 0 else [] for f in range(len(prototypes))]

    monkeypatch.setattr(zero_shot, "zero_shot_labels", spy)
    config = precompute_config(shard_dir, tiny_model_spec, tiny_sae_repo, tmp_path / "z.duckdb", max_images=20)
    job.run(config)
    con = duckdb.connect(str(config.out), read_only=True)
    vocabulary = con.execute("SELECT term, embedding FROM vocabulary").fetchall()
    assert len(calls) == len(TINY_LAYERS)
    for layer, (prototypes, term_vectors, terms, null, max_labels) in zip(TINY_LAYERS, calls):
        assert sorted(terms) == sorted(term for term, _ in vocabulary) and max_labels >= 1
        stored_terms = dict(vocabulary)
        for term, vector in zip(terms, term_vectors):
            assert decoded(stored_terms[term]).tobytes() == vector.astype("<f2").tobytes()
        rows = con.execute(
            "SELECT feature, prototype, zero_shot_terms, zero_shot_scores, zero_shot_margins FROM features "
            "WHERE layer = ? ORDER BY feature",
            [layer],
        ).fetchall()
        shown = con.execute("SELECT count(DISTINCT feature) FROM examples WHERE layer = ?", [layer]).fetchone()[0]
        assert null.shape == (min(shown, 4096), prototypes.shape[1])
        np.testing.assert_allclose(np.linalg.norm(null, axis=1), 1, atol=1e-5)
        for feature, blob, labels, scores, margins in rows:
            if blob is None:
                assert np.isnan(prototypes[feature]).all()
            else:
                assert decoded(blob).tobytes() == prototypes[feature].astype("<f2").tobytes()
            expected = [terms[feature % len(terms)]] if feature % 3 == 0 else []
            assert (labels, scores, margins) == (expected, [0.5] * len(expected), [1.5] * len(expected))
