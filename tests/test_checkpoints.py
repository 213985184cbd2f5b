"""`clipscope-explorer checkpoints` on the tiny index (issue 16, "across the release's checkpoints").

The SAE source is a copy of the tiny released-layout repo with planted checkpoints beside the index's own final
one (2000 tokens): 500 tokens with every weight zero (pre_b too, so its reconstruction is pre_b alone: 0), 1000
tokens unrelated, 1500 tokens the final one with its features permuted and perturbed; on layer 2 also a
truncated file and one of the wrong shape. Expected values come from the index's own `layers` rows, the tower
run directly, and the planted permutation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from clipscope_explorer.precompute.evaluate.checkpoints import CheckpointOptions, CheckpointsError, measure_checkpoints
from clipscope_explorer.precompute.model.checkpoints import save_checkpoint
from tests.conftest import TINY_LAYERS

FINAL, ZERO, UNRELATED, PERMUTED = 2000, 500, 1000, 1500
BAD_LAYER = 2
ROW_METRICS = ("mse", "explained_variance", "mse_raw", "explained_variance_raw", "l0", "dead_fraction", "n_images")


def _tensors(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model_state_dict"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_sae_repo) -> tuple[Path, dict[int, np.ndarray]]:
    """The planted repo, and per layer the permutation: feature i of the final SAE is feature perm[i] at 1500."""
    root = tmp_path_factory.mktemp("planted") / "sae"
    shutil.copytree(tiny_sae_repo, root)
    perms = {}
    for layer in TINY_LAYERS:
        folder = root / f"{layer}_resid"
        final = _tensors(folder / f"{FINAL}.pt")
        pre_b, enc, dec = final["pre_b"], final["enc"], final["dec"]
        k = torch.load(folder / f"{FINAL}.pt", weights_only=True)["k"]
        zeros = [torch.zeros_like(t) for t in (pre_b, enc, dec)]
        save_checkpoint(folder / f"{ZERO}.pt", *zeros, k, ZERO)
        generator = torch.Generator().manual_seed(layer)
        perm = torch.randperm(dec.shape[0], generator=generator)
        noise = torch.randn(dec.shape, generator=generator) * 0.05 * dec.norm(dim=1, keepdim=True) / dec.shape[1] ** 0.5
        moved_dec, moved_enc = torch.empty_like(dec), torch.empty_like(enc)
        moved_dec[perm], moved_enc[:, perm] = dec + noise, enc
        save_checkpoint(folder / f"{PERMUTED}.pt", pre_b, moved_enc, moved_dec, k, PERMUTED)
        perms[layer] = perm.numpy()
    bad = root / f"{BAD_LAYER}_resid"
    truncated = bad / "1200.pt"
    shutil.copy(bad / f"{FINAL}.pt", truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    final = _tensors(bad / f"{FINAL}.pt")
    save_checkpoint(bad / "1700.pt", final["pre_b"], final["enc"], final["dec"][:, :-1].contiguous(), 8, 1700)
    return root, perms


@pytest.fixture(scope="module")
def measured(planted, tiny_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoints") / "copy.duckdb"
    before = tiny_index.read_bytes()
    result = measure_checkpoints(
        CheckpointOptions(index=tiny_index, out=out, sae=str(planted[0]), device="cpu", batch_size=7, progress=False)
    )
    assert tiny_index.read_bytes() == before  # written into the copy only
    return result, out


def _rows(path: Path, sql: str) -> list[dict]:
    with duckdb.connect(str(path), read_only=True) as con:
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def test_every_readable_checkpoint_has_a_row_in_training_order(measured):
    result, out = measured
    rows = _rows(out, "SELECT layer, tokens FROM checkpoints")
    assert [(r["layer"], r["tokens"]) for r in rows] == [
        (layer, tokens) for layer in TINY_LAYERS for tokens in (ZERO, UNRELATED, PERMUTED, FINAL)
    ]
    assert result.written == out and result.rows["checkpoints"] == len(rows)
    assert result.rows["checkpoint_matches"] == _rows(out, "SELECT count(*) AS n FROM checkpoint_matches")[0]["n"] > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy.duckdb"]  # no scratch or partial file left


def test_final_checkpoint_row_equals_the_layer_table(measured, tiny_index):
    _, out = measured
    layers = {r["layer"]: r for r in _rows(tiny_index, "SELECT * FROM layers")}
    samples = _rows(tiny_index, "SELECT count(*) AS n FROM samples")[0]["n"]
    for row in _rows(out, f"SELECT * FROM checkpoints WHERE tokens = {FINAL}"):
        expected = layers[row["layer"]]
        assert row["n_images"] == expected["n_images"] == samples
        for name in ROW_METRICS:
            assert row[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-9), name
        assert row["mse_by_position"] == pytest.approx(expected["mse_by_position"], rel=1e-5)


def test_zero_checkpoint_reconstructs_pre_b_alone(measured, planted, tiny_index, tiny_tower):
    from clipscope_explorer.precompute.evaluate.sample_images import SampleImages

    root, _ = planted
    ids = [r["image_id"] for r in _rows(tiny_index, "SELECT image_id FROM samples ORDER BY image_id")]
    with SampleImages(tiny_index, originals=True) as images:
        pixels = torch.stack([tiny_tower.preprocess(images.image(i)) for i in ids])
    acts = tiny_tower.capture(pixels, TINY_LAYERS, "fp32")
    for row in _rows(measured[1], f"SELECT * FROM checkpoints WHERE tokens = {ZERO}"):
        pre_b = _tensors(root / f"{row['layer']}_resid" / f"{ZERO}.pt")["pre_b"]
        x = acts[row["layer"]]
        assert row["mse"] == pytest.approx(float((x - pre_b).pow(2).sum(-1).mean()), rel=1e-5)
        assert row["explained_variance"] <= 0
        assert row["l0"] == 0 and row["dead_fraction"] == 1


def test_matching_recovers_the_planted_permutation(measured, planted):
    _, perms = planted
    for layer in TINY_LAYERS:
        matches = _rows(measured[1], f"SELECT * FROM checkpoint_matches WHERE layer = {layer} ORDER BY feature, tokens")
        assert {r["tokens"] for r in matches} == {ZERO, UNRELATED, PERMUTED}
        moved = [r for r in matches if r["tokens"] == PERMUTED]
        assert [r["feature"] for r in moved] == list(range(len(perms[layer])))
        assert np.array_equal([r["match"] for r in moved], perms[layer])
        assert min(r["cosine"] for r in moved) > 0.95
        assert all(r["cosine"] == 0 for r in matches if r["tokens"] == ZERO)  # a zero decoder matches nothing
        assert max(r["cosine"] for r in matches if r["tokens"] == UNRELATED) < 0.9


def test_unreadable_files_are_named_and_the_rest_is_done(measured, planted):
    result, _ = measured
    bad = [p for p in result.problems if f"layer {BAD_LAYER}," in p]
    assert len(bad) == 2
    assert any("1200.pt" in p and "corrupt" in p for p in bad)
    assert any("1700.pt" in p and "shape" in p for p in bad)


def _served(index: Path, tmp_path: Path) -> TestClient:
    from clipscope_explorer.app.main import create_app
    from clipscope_explorer.app.settings import Settings

    settings = Settings(index=index, live=False, text=False, upload_store=tmp_path / "up", search_cache=tmp_path / "sc")
    return TestClient(create_app(settings), follow_redirects=False)


def test_pages_show_the_checkpoints_and_first_seen(measured, planted, tmp_path):
    _, out = measured
    table = _rows(out, "SELECT * FROM checkpoints WHERE layer = 1 ORDER BY tokens")
    with _served(out, tmp_path) as client:
        data = client.get("/api/layers/1/checkpoints").json()
        assert data["layer"] == 1
        assert [c["tokens"] for c in data["checkpoints"]] == [r["tokens"] for r in table]
        for got, row in zip(data["checkpoints"], table):
            for name in (*ROW_METRICS, "mse_by_position"):
                assert got[name] == pytest.approx(row[name]), name
            assert got["centre_border_ratio"] is None or got["centre_border_ratio"] > 0
            image = client.get(got["map_url"])
            assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        page = client.get("/layers/1/checkpoints")
        assert page.status_code == 200 and page.text.count('class="pixelated"') == len(table)
        assert "/layers/1/checkpoints" in client.get("/layers/1").text
        assert client.get("/api/layers/1").json()["training"].endswith("/layers/1/checkpoints")
        feature = client.get("/api/layers/1/features/3").json()
        assert feature["first_seen"]["tokens"] == PERMUTED and feature["first_seen"]["cosine"] > 0.9
        assert "Exists since 1,500 training tokens" in client.get("/layers/1/features/3").text


def test_an_unreachable_sae_source_is_one_line_naming_it(tiny_index, tmp_path, capsys):
    from clipscope_explorer.cli import main

    copy = tmp_path / "moved.duckdb"
    shutil.copy(tiny_index, copy)
    with duckdb.connect(str(copy)) as con:
        sae = json.loads(con.execute("SELECT value FROM meta WHERE key = 'sae'").fetchone()[0])
        con.execute("UPDATE meta SET value = ? WHERE key = 'sae'", [json.dumps({**sae, "source": "/gone/sae"})])
    before = copy.read_bytes()
    assert main(["checkpoints", str(copy), "--device", "cpu", "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "/gone/sae" in error and "--sae" in error
    assert copy.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["moved.duckdb"]


def test_a_single_checkpoint_gives_its_row_alone(tiny_index, tmp_path):
    from tests.conftest import write_sae_repo

    single = write_sae_repo(tmp_path / "single", checkpoints=(2000,))
    out = tmp_path / "single.duckdb"
    with pytest.raises(CheckpointsError, match="no layer 7"):
        measure_checkpoints(CheckpointOptions(index=tiny_index, out=out, layers=[7], sae=str(single), progress=False))
    result = measure_checkpoints(
        CheckpointOptions(index=tiny_index, out=out, layers=[1], sae=str(single), sample=10, progress=False)
    )
    assert any("single checkpoint" in p and "layer 1" in p for p in result.problems)
    assert _rows(out, "SELECT layer, tokens, n_images FROM checkpoints") == [
        {"layer": 1, "tokens": 2000, "n_images": 10}
    ]
    assert _rows(out, "SELECT count(*) AS n FROM checkpoint_matches") == [{"n": 0}]


def test_precompute_evaluate_measures_the_checkpoints(shard_dir, tiny_model_spec, tiny_sae_repo, tmp_path):
    from clipscope_explorer.precompute.job import run
    from tests.conftest import precompute_config

    out = run(precompute_config(shard_dir, tiny_model_spec, tiny_sae_repo, tmp_path / "built.duckdb", evaluate=True))
    rows = _rows(out, "SELECT layer, tokens FROM checkpoints")
    assert [(r["layer"], r["tokens"]) for r in rows] == [(layer, t) for layer in TINY_LAYERS for t in (1000, 2000)]
    assert _rows(out, "SELECT count(*) AS n FROM checkpoint_matches")[0]["n"] == 256 * len(TINY_LAYERS)


def test_a_normalised_index_reproduces_both_normalisations(shard_dir, tiny_model_spec, tiny_sae_repo, tmp_path):
    from clipscope_explorer.precompute.job import run
    from tests.conftest import precompute_config

    built = run(
        precompute_config(shard_dir, tiny_model_spec, tiny_sae_repo, tmp_path / "normalised.duckdb", normalise="sample")
    )
    out = tmp_path / "measured.duckdb"
    measure_checkpoints(CheckpointOptions(index=built, out=out, device="cpu", progress=False))
    layers = {r["layer"]: r for r in _rows(built, "SELECT * FROM layers")}
    for row in _rows(out, "SELECT * FROM checkpoints WHERE tokens = 2000"):
        expected = layers[row["layer"]]
        assert row["mse"] != pytest.approx(row["mse_raw"])  # two normalisations, two numbers
        for name in ROW_METRICS:
            assert row[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-9), name


def test_the_demo_fit_writes_evenly_spaced_checkpoints(tmp_path):
    from clipscope_explorer.precompute.demo.build import DEMO_FIT
    from clipscope_explorer.precompute.demo.fit import FitSettings, fit_topk_sae, save_fitted
    from clipscope_explorer.precompute.model.checkpoints import list_checkpoints, load_sae

    assert DEMO_FIT.checkpoints >= 3
    settings = FitSettings(n_features=32, k=4, steps=6, batch_tokens=16, checkpoints=3)
    result = fit_topk_sae(torch.randn(200, 8), settings, progress=False)
    save_fitted(result, tmp_path, layer=1, k=4)
    assert list_checkpoints(str(tmp_path), 1) == [32, 64, 96]
    assert [load_sae(str(tmp_path), 1, tokens).origin.checkpoint for tokens in (32, 64, 96)] == [32, 64, 96]
