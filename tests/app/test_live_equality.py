"""An uploaded image that is also in the index gets the features, activations and heatmaps the
index holds for it: the server runs the precompute job's own decoding, model and SAE code. Both
precisions: fp32 (the session's index), and an index built in bf16 autocast served in bf16."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pytest

from clipscope_explorer.app.queries import dequantise


def shard_images(shard_dir) -> dict[str, bytes]:
    """JPEG bytes of every sample of the tiny shards, by key."""
    found = {}
    for path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    found[member.name.split(".")[0]] = tar.extractfile(member).read()
    return found


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def served(request, tmp_path_factory, shard_dir, tiny_model_spec, tiny_sae_repo):
    """(index path, live client encoding uploads in the index's precision)."""
    if request.param == "fp32":
        yield request.getfixturevalue("tiny_index"), request.getfixturevalue("live_client")
        return
    import shutil

    from clipscope_explorer.precompute.job import run
    from tests.app.conftest import live_app_client, wait_live
    from tests.conftest import precompute_config

    folder = tmp_path_factory.mktemp("bf16")
    index = run(precompute_config(shard_dir, tiny_model_spec, tiny_sae_repo, folder / "tiny.duckdb", precision="bf16"))
    served_copy = Path(shutil.copy(index, folder / "served.duckdb"))
    with live_app_client(served_copy, None, live_precision="bf16") as client:
        wait_live(client)
        assert client.get("/api/upload").json()["live"]["precision"] == "bf16"
        yield index, client


@pytest.fixture(scope="module")
def index_rows(served):
    con = duckdb.connect(str(served[0]), read_only=True)  # the app serves a copy
    try:
        examples = con.execute(
            "SELECT e.layer, e.feature, e.kind, i.key, e.activation, e.cls_activation, e.heatmap_scale, e.heatmap "
            "FROM examples e JOIN images i USING (image_id)"
        ).fetchall()
        floors = dict(
            ((layer, feature), low)
            for layer, feature, low, n in con.execute(
                "SELECT layer, feature, min(activation), count(*) FROM examples WHERE kind = 'top' "
                "GROUP BY layer, feature"
            ).fetchall()
            if n == 6
        )  # top_n of the tiny index: full lists only
        top_n = con.execute("SELECT value FROM meta WHERE key = 'top_n'").fetchone()[0]
        precision = con.execute("SELECT value FROM meta WHERE key = 'precision'").fetchone()[0]
    finally:
        con.close()
    assert int(top_n) == 6
    assert json.loads(precision) == served[1].get("/api/upload").json()["live"]["precision"]
    return examples, floors


@pytest.fixture(scope="module")
def uploads(served, shard_dir, index_rows):
    """The live result (all firing features) of every indexed image, by key."""
    examples, _ = index_rows
    images = shard_images(shard_dir)
    keys = sorted({row[3] for row in examples})
    results = {}
    for key in keys:
        response = served[1].post(
            "/api/encode", files={"file": (f"{key}.jpg", images[key], "image/jpeg")}, data={"top": "1000"}
        )
        assert response.status_code == 200, response.text
        results[key] = {
            int(layer): {f["feature"]: f for f in data["features"]} for layer, data in response.json()["layers"].items()
        }
    return results


def test_every_index_example_is_reproduced_by_upload(uploads, index_rows):
    examples, _ = index_rows
    assert len(examples) > 500
    for layer, feature, _kind, key, activation, cls_activation, scale, heatmap in examples:
        live = uploads[key][layer].get(feature)
        assert live is not None, f"feature {feature} of layer {layer} does not fire on {key} when uploaded"
        np.testing.assert_allclose(live["activation"], activation, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(live["cls_activation"], cls_activation, rtol=1e-4, atol=1e-5)
        stored = dequantise(scale, heatmap)
        assert np.abs(np.asarray(live["heatmap"]) - stored).max() <= scale / 2 + 1e-4 * max(activation, 1), (
            layer,
            feature,
            key,
        )
        assert max(max(live["heatmap"]), live["cls_activation"]) == pytest.approx(live["activation"])


def test_uploads_that_beat_a_full_top_list_are_in_it(uploads, index_rows):
    """The converse: an image whose live activation beats a feature's full top list must be in that list."""
    examples, floors = index_rows
    in_top = {(layer, feature, key) for layer, feature, kind, key, *_ in examples if kind == "top"}
    checked = 0
    for key, layers in uploads.items():
        for layer, features in layers.items():
            for feature, live in features.items():
                floor = floors.get((layer, feature))
                if floor is not None and live["activation"] > floor * (1 + 1e-4) + 1e-5:
                    checked += 1
                    assert (layer, feature, key) in in_top, (layer, feature, key)
    assert checked > 50


def test_features_are_ordered_by_activation(uploads):
    for layers in uploads.values():
        for features in layers.values():
            activations = [f["activation"] for f in features.values()]
            assert activations == sorted(activations, reverse=True)
            assert all(a > 0 for a in activations)
