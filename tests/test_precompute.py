"""The index against brute force: every code computed densely, every statistic recomputed."""

import io
import json
import tarfile

import duckdb
import numpy as np
import pytest
import torch
from PIL import Image

from clipscope_explorer.precompute.accumulate import histogram_edges
from clipscope_explorer.precompute.model.checkpoints import load_sae
from tests.conftest import TINY_LAYERS


def read_shards(shard_dir):
    """(ordinal, key, caption, PIL image) of every decodable sample, in order."""
    samples = []
    for shard in range(3):
        with tarfile.open(shard_dir / f"{shard:05d}.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.split(".")[0] for name in members})
        for position, key in enumerate(keys):
            try:
                image = Image.open(io.BytesIO(members[f"{key}.jpg"])).convert("RGB")
            except OSError:
                continue
            samples.append(((shard << 32) | position, key, members[f"{key}.txt"].decode(), image))
    return samples


@pytest.fixture(scope="module")
def brute(shard_dir, tiny_tower, tiny_sae_repo):
    """Dense latents [n, T, F] per layer, from the released algorithm written out plainly."""
    samples = read_shards(shard_dir)
    pixels = torch.stack([tiny_tower.preprocess(image) for *_, image in samples])
    acts = tiny_tower.capture(pixels, TINY_LAYERS)
    out = {"samples": samples}
    for layer in TINY_LAYERS:
        sae = load_sae(str(tiny_sae_repo), layer)
        x = acts[layer]
        pre = (x - sae.pre_b) @ sae.enc
        top = torch.topk(pre, sae.k, dim=-1)
        latent = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        out[layer] = {
            "x": x,
            "latent": latent,
            "recon": latent @ sae.dec + sae.pre_b,
            "k": sae.k,
            "dec": sae.dec.detach(),
        }
    return out


@pytest.fixture(scope="module")
def db(tiny_index):
    con = duckdb.connect(str(tiny_index), read_only=True)
    yield con
    con.close()


def meta(db, key):
    return json.loads(db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()[0])


def test_run_metadata(db, shard_dir):
    assert meta(db, "schema_version") == 1
    assert meta(db, "layers") == [1, 2]
    sample = meta(db, "sample")
    assert sample["n_images"] == 41 and sample["n_skipped"] == 1
    assert sample["skipped"][0]["key"] == "000000005" and "undecodable" in sample["skipped"][0]["reason"]
    assert meta(db, "grid") == [16, 16] and meta(db, "n_tokens") == 257
    assert meta(db, "normalisation") == "none"
    assert set(meta(db, "timings")) >= {"encode", "neighbours", "labels", "write", "total"}


@pytest.mark.parametrize("layer", TINY_LAYERS)
def test_layer_metrics(db, brute, layer):
    b = brute[layer]
    err = (b["x"] - b["recon"]).pow(2).sum(-1)
    centred = (b["x"] - b["x"].mean(-1, keepdim=True)).pow(2).sum(-1)
    fires = b["latent"] > 0
    row = db.execute(
        "SELECT n_images, n_tokens, mse, explained_variance, l0, dead_fraction, "
        "nonpositive_kept_fraction, mse_by_position, active_fraction FROM layers WHERE layer = ?",
        [layer],
    ).fetchone()
    n, t = b["x"].shape[:2]
    assert row[0] == n and row[1] == n * t
    assert row[2] == pytest.approx(err.mean().item(), rel=1e-5)
    assert row[3] == pytest.approx((1 - err / centred).mean().item(), rel=1e-5)
    assert row[4] == pytest.approx(fires.sum().item() / (n * t))
    assert row[5] == pytest.approx((fires.sum((0, 1)) == 0).float().mean().item())
    assert row[6] == pytest.approx(((b["latent"] < 0).sum().item()) / (n * t * b["k"]), abs=1e-9)
    np.testing.assert_allclose(row[7], err.mean(0).numpy(), rtol=1e-5)
    image_freq = fires.any(1).float().mean(0)
    assert row[8] == pytest.approx((image_freq >= 0.01).float().mean().item())


@pytest.mark.parametrize("layer", TINY_LAYERS)
def test_feature_statistics(db, brute, layer):
    latent = brute[layer]["latent"]
    fires = latent > 0
    n, t, f = latent.shape
    rows = db.execute(
        "SELECT feature, n_fired_tokens, n_fired_images, n_fired_cls, frequency, mean_activation, "
        "max_activation, histogram, position_mean FROM features WHERE layer = ? ORDER BY feature",
        [layer],
    ).fetchall()
    assert len(rows) == f
    firing = torch.where(fires, latent, 0)
    edges = histogram_edges()
    for feature, tokens, images, cls, freq, mean, maximum, hist, position in rows:
        values = latent[..., feature][fires[..., feature]]
        assert tokens == values.numel()
        assert images == fires[..., feature].any(1).sum().item()
        assert cls == fires[:, 0, feature].sum().item()
        assert freq == pytest.approx(tokens / (n * t))
        if tokens:
            assert mean == pytest.approx(values.mean().item(), rel=1e-5)
            assert maximum == pytest.approx(values.max().item(), rel=1e-6)
        else:
            assert mean is None and maximum is None
        bins = (torch.searchsorted(edges, values.double(), right=True) - 1).clamp(0, len(edges) - 2)
        assert hist == torch.bincount(bins, minlength=len(edges) - 1).tolist()
        np.testing.assert_allclose(position, firing[..., feature].mean(0).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", TINY_LAYERS)
def test_top_lists_exact_and_heatmaps_within_quantisation(db, brute, layer):
    latent = brute[layer]["latent"]
    samples = brute["samples"]
    firing = torch.where(latent > 0, latent, 0)
    image_act = firing.amax(1)  # [n, F]
    top_n = meta(db, "top_n")
    rows = db.execute(
        "SELECT e.feature, e.rank, i.key, e.activation, e.cls_activation, e.heatmap_scale, e.heatmap "
        "FROM examples e JOIN images i USING (image_id) WHERE e.layer = ? AND e.kind = 'top' "
        "ORDER BY e.feature, e.rank",
        [layer],
    ).fetchall()
    by_feature = {}
    for row in rows:
        by_feature.setdefault(row[0], []).append(row)
    for feature in range(latent.shape[2]):
        ranked = sorted(
            (-image_act[i, feature].item(), samples[i][0], i) for i in range(len(samples)) if image_act[i, feature] > 0
        )[:top_n]
        got = by_feature.get(feature, [])
        assert [samples[i][1] for *_, i in ranked] == [r[2] for r in got], feature
        for (neg_act, _, i), (_, _rank, _, act, cls, scale, heat) in zip(ranked, got):
            assert act == pytest.approx(-neg_act, rel=1e-6)
            assert cls == pytest.approx(firing[i, 0, feature].item(), abs=1e-6)
            dequantised = np.frombuffer(heat, np.uint8) * scale
            assert np.abs(dequantised - firing[i, 1:, feature].numpy()).max() <= scale / 2 + 1e-5


@pytest.mark.parametrize("layer", TINY_LAYERS)
def test_bands_hold_lower_examples_with_true_activations(db, brute, layer):
    latent = brute[layer]["latent"]
    image_act = torch.where(latent > 0, latent, 0).amax(1)
    key_index = {s[1]: i for i, s in enumerate(brute["samples"])}
    band_count = meta(db, "band_count")
    rows = db.execute(
        "SELECT e.feature, e.band, e.rank, i.key, e.activation, f.max_activation FROM examples e "
        "JOIN images i USING (image_id) JOIN features f USING (layer, feature) "
        "WHERE e.layer = ? AND e.kind = 'band' ORDER BY e.feature, e.band, e.rank",
        [layer],
    ).fetchall()
    assert rows, "some features must show band examples"
    tops = {
        (f, k)
        for f, k in db.execute(
            "SELECT e.feature, i.key FROM examples e JOIN images i USING (image_id) WHERE layer = ? AND kind = 'top'",
            [layer],
        ).fetchall()
    }
    previous = None
    for feature, band, rank, key, act, maximum in rows:
        assert act == pytest.approx(image_act[key_index[key], feature].item(), rel=1e-6)
        assert maximum * (1 - band / band_count) - 1e-6 < act <= maximum * (1 - (band - 1) / band_count) + 1e-6
        assert (feature, key) not in tops
        if previous and previous[:2] == (feature, band):
            assert rank == previous[2] + 1 and act <= previous[3]
        previous = (feature, band, rank, act)


@pytest.mark.parametrize("layer", TINY_LAYERS)
def test_similar_features_by_decoder_cosine(db, brute, layer):
    dec = torch.nn.functional.normalize(brute[layer]["dec"], dim=1)
    sims = dec @ dec.T
    sims.fill_diagonal_(-2)
    expected = torch.topk(sims, 10, dim=1)
    rows = db.execute(
        "SELECT similar_features, similar_cosines FROM features WHERE layer = ? ORDER BY feature", [layer]
    ).fetchall()
    for feature, (similar, cosines) in enumerate(rows):
        assert similar == expected.indices[feature].tolist()
        np.testing.assert_allclose(cosines, expected.values[feature].numpy(), atol=1e-5)


def test_label_terms_come_from_top_captions(db):
    rows = db.execute(
        "SELECT f.layer, f.feature, f.label_terms, list(i.caption) FROM features f "
        "JOIN examples e USING (layer, feature) JOIN images i USING (image_id) "
        "WHERE e.kind = 'top' GROUP BY ALL"
    ).fetchall()
    labelled = 0
    for layer, feature, terms, captions in rows:
        words = set(" ".join(captions).split())
        assert set(terms) <= words, (layer, feature)
        assert not {"the", "and", "on"} & set(terms)
        labelled += bool(terms)
    assert labelled > len(rows) // 2


def test_images_are_exactly_the_referenced_ones(db, shard_dir):
    referenced = {r[0] for r in db.execute("SELECT DISTINCT image_id FROM examples").fetchall()}
    stored = db.execute("SELECT image_id, key, url, caption, width, height, thumbnail, source FROM images").fetchall()
    assert {r[0] for r in stored} == referenced
    samples = dict(db.execute("SELECT image_id, key FROM samples").fetchall())
    assert all(samples[image_id] == key for image_id, key, *_ in stored)  # the ids of `samples`
    for _image_id, key, url, caption, width, height, thumbnail, source in stored:
        assert url == f"https://example.org/{key}.jpg" and caption.startswith("a ")
        assert (width, height) == (256, 224)
        assert source.endswith(f"{key[:5]}.tar")
        assert Image.open(io.BytesIO(thumbnail)).size == (224, 224)


def test_rows_sorted_by_layer_and_feature(db):
    pairs = [r for r in db.execute("SELECT layer, feature FROM examples").fetchall()]
    assert pairs == sorted(pairs)


def test_samples_are_every_encoded_image_in_sample_order(db, brute):
    rows = db.execute(
        "SELECT image_id, source, key, url, caption, width, height FROM samples ORDER BY image_id"
    ).fetchall()
    assert [(image_id, key, caption) for image_id, _, key, _, caption, *_ in rows] == [
        (i, key, caption) for i, (_, key, caption, _) in enumerate(brute["samples"])
    ]
    for _, source, key, url, _, width, height in rows:
        assert source.endswith(f"{key[:5]}.tar") and url == f"https://example.org/{key}.jpg"
        assert (width, height) == (256, 224)


@pytest.mark.parametrize("layer", TINY_LAYERS)
def test_sample_codes_are_the_cls_tokens_kept_latents(db, brute, tiny_sae_repo, layer):
    sae = load_sae(str(tiny_sae_repo), layer)
    top = torch.topk((brute[layer]["x"][:, 0] - sae.pre_b) @ sae.enc, sae.k, dim=-1)
    rows = db.execute(
        "SELECT image_id, indices, activations FROM sample_codes WHERE layer = ? ORDER BY image_id", [layer]
    ).fetchall()
    assert [r[0] for r in rows] == list(range(len(brute["samples"])))
    for (_, indices, values), expected_indices, expected_values in zip(rows, top.indices, top.values):
        assert indices == expected_indices.tolist()
        np.testing.assert_allclose(values, expected_values.numpy(), rtol=1e-5, atol=1e-6)
