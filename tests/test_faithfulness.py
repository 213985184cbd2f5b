"""The occlusion faithfulness check (precompute/evaluate/occlusion.py, faithfulness.py) against independent
expectations: brute-force hot sets, masks drawn pixel by pixel, the index's own activations reproduced by the
re-encoding, an occluded input built by hand, and a run killed half-way that resumes to the same result."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from clipscope_explorer.cli import main
from clipscope_explorer.precompute.evaluate import faithfulness as faith
from clipscope_explorer.precompute.evaluate import occlusion
from clipscope_explorer.precompute.evaluate.faithfulness import FaithfulnessOptions, run_faithfulness


@pytest.mark.parametrize("seed", range(6))
def test_hot_patches_are_the_fewest_holding_the_mass(seed):
    rng = np.random.default_rng(seed)
    heatmap = rng.exponential(1.0, 16) * (rng.random(16) < 0.6)
    heatmap[3] = heatmap[7]  # a tie, broken by the lower index
    for mass in (0.1, 0.5, 0.9, 1.0):
        got = occlusion.hot_patches(heatmap, mass)
        order = sorted(range(16), key=lambda i: (-heatmap[i], i))
        count = next(n for n in range(1, 17) if sum(heatmap[order[:n]]) >= mass * heatmap.sum() * (1 - 1e-12))
        assert got.tolist() == sorted(order[:count])
    assert occlusion.hot_patches(np.zeros(16), 0.5).tolist() == []


def test_masks_and_occlusion_pixel_by_pixel():
    mask = occlusion.patch_mask(np.array([0, 5]), (2, 3), (4, 6))  # 2 x 3 patches of 2 x 2 pixels
    expected = np.zeros((4, 6), bool)
    expected[0:2, 0:2] = True  # patch 0: row 0, column 0
    expected[2:4, 4:6] = True  # patch 5: row 1, column 2
    assert np.array_equal(mask.numpy(), expected)
    pixels = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    out = occlusion.occluded(pixels, mask)
    for channel in range(3):
        mean = pixels[channel].mean()
        assert torch.all(out[channel][mask] == mean) and torch.equal(out[channel][~mask], pixels[channel][~mask])
    draws = occlusion.random_patches(np.random.default_rng(0), 16, 5, 3)
    assert draws.shape == (3, 5) and all(len(set(row)) == 5 for row in draws.tolist())


def test_the_scores_are_the_mean_relative_drops():
    results = [
        occlusion.ExampleResult(4.0, 1.0, 3.0, 2.0, 3),  # hot drop 0.75, random 0.25, kept 0.5
        occlusion.ExampleResult(2.0, 2.0, 2.0, 2.0, 2),  # 0, 0, 1
        occlusion.ExampleResult(0.0, 0.0, 0.0, 0.0, 0),  # does not fire again: left out
    ]
    got = occlusion.summarise(results)
    assert (got.examples, got.hot_drop, got.random_drop, got.kept) == (2, 0.375, 0.125, 0.75)
    assert got.score == pytest.approx(0.25)
    assert occlusion.summarise(results[2:]) is None


@pytest.fixture(scope="module")
def faithful(tiny_index, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faithfulness") / "tiny.duckdb"
    options = FaithfulnessOptions(index=tiny_index, out=out, top=2, draws=3, sample=24, device="cpu", progress=False)
    return run_faithfulness(options)


def rows(index: Path, sql: str) -> list[dict]:
    with duckdb.connect(str(index), read_only=True) as con:
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def test_the_re_encoding_reproduces_the_index_and_the_summary_its_examples(faithful):
    examples = rows(
        faithful,
        "SELECT f.*, e.activation FROM faithfulness_examples f JOIN examples e USING (layer, feature, rank) "
        "WHERE e.kind = 'top'",
    )
    assert len(examples) > 20
    for row in examples:  # the originals, read and preprocessed as the job did: the index's own activations
        assert row["before"] == pytest.approx(row["activation"], rel=1e-5, abs=1e-6)
        assert row["n_hot"] >= 1
    features = rows(faithful, "SELECT * FROM faithfulness")
    for feature in features:
        mine = [r for r in examples if (r["layer"], r["feature"]) == (feature["layer"], feature["feature"])]
        fired = [r for r in mine if r["before"] > 0]
        assert feature["examples"] == len(fired)
        hot = np.mean([(r["before"] - r["hot"]) / r["before"] for r in fired])
        random = np.mean([(r["before"] - r["random"]) / r["before"] for r in fired])
        assert feature["score"] == pytest.approx(hot - random)


def test_an_occluded_input_built_by_hand_gives_the_stored_activation(faithful, tiny_index):
    """Example 1 of one feature, its hot patches (from its stored heatmap) painted by hand with the mean
    colour of the preprocessed input, through the index's own model and SAE."""
    from clipscope_explorer.precompute.evaluate.index_model import IndexModel
    from clipscope_explorer.precompute.evaluate.sample_images import SampleImages
    from clipscope_explorer.precompute.index.check import check_index_file

    stored = rows(faithful, "SELECT * FROM faithfulness_examples WHERE rank = 1 ORDER BY before DESC LIMIT 1")[0]
    layer, feature, image_id = stored["layer"], stored["feature"], stored["image_id"]
    with duckdb.connect(str(tiny_index), read_only=True) as con:
        meta, layer_rows = check_index_file(con, str(tiny_index))
        scale, heat = con.execute(
            "SELECT heatmap_scale, heatmap FROM examples WHERE kind = 'top' AND rank = 1 AND layer = ? AND feature = ?",
            [layer, feature],
        ).fetchall()[0]
    heatmap = np.frombuffer(heat, np.uint8) * scale
    order = sorted(range(len(heatmap)), key=lambda i: (-heatmap[i], i))
    hot = [i for n, i in enumerate(order) if sum(heatmap[order[:n]]) < 0.5 * heatmap.sum()]
    model = IndexModel.load(meta, layer_rows, [layer], "cpu")
    pixels = model.tower.preprocess(SampleImages(tiny_index, originals=True).image(image_id))
    grid_h, grid_w = meta["grid"]
    cell = pixels.shape[1] // grid_h
    painted = pixels.clone()
    means = pixels.mean(dim=(1, 2))
    for patch in hot:
        row, column = divmod(patch, grid_w)
        for channel in range(3):
            painted[channel, row * cell : (row + 1) * cell, column * cell : (column + 1) * cell] = means[channel]
    values = model.activations(torch.stack([pixels, painted]), [(layer, feature)] * 2)
    assert stored["n_hot"] == len(hot)
    assert (values[0], values[1]) == pytest.approx((stored["before"], stored["hot"]), rel=1e-5, abs=1e-6)


def test_a_killed_run_resumes_where_it_stopped(tiny_index, faithful, tmp_path, monkeypatch):
    out = tmp_path / "resumed.duckdb"
    options = FaithfulnessOptions(index=tiny_index, out=out, top=2, draws=3, sample=24, device="cpu", progress=False)
    monkeypatch.setattr(faith, "FEATURES_PER_FLUSH", 4)
    real, calls = faith._encode_chunk, []

    def dies_on_the_third(*args):
        calls.append(len(args[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(faith, "_encode_chunk", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_faithfulness(options)
    partial = faith._partial_path(out)
    assert not out.exists() and len(partial.read_text().splitlines()) == 1 + 8  # settings, two chunks of 4
    monkeypatch.setattr(faith, "_encode_chunk", real)
    encoded = []
    monkeypatch.setattr(faith, "_encode_chunk", lambda *args: encoded.append(len(args[2])) or real(*args))
    run_faithfulness(options)
    total = 2 * 24  # features sampled: 24 of each layer
    assert sum(encoded) == total - 8 and not partial.exists()
    columns = "layer, feature, rank, image_id, n_hot, before, hot, random, insertion"
    order = " ORDER BY layer, feature, rank"
    assert rows(out, f"SELECT {columns} FROM faithfulness_examples{order}") == rows(
        faithful, f"SELECT {columns} FROM faithfulness_examples{order}"
    )


def test_the_cli_and_its_bad_input(tiny_index, tmp_path, capsys):
    out = tmp_path / "cli.duckdb"
    flags = ["--faithfulness", "--top", "1", "--draws", "2", "--sample", "3", "--layers", "1", "--no-progress"]
    assert main(["evaluate", str(tiny_index), "--out", str(out), *flags]) == 0
    assert "faithfulness written into" in capsys.readouterr().out
    features = rows(out, "SELECT DISTINCT layer, feature FROM faithfulness_examples")
    assert len(features) == 3 and {f["layer"] for f in features} == {1}
    assert (
        main(["evaluate", str(tiny_index), "--out", str(tmp_path / "x.duckdb"), "--faithfulness", "--layers", "9"]) == 2
    )
    assert "no layer 9" in capsys.readouterr().err
    missing = ["--sae", str(tmp_path / "gone"), "--out", str(tmp_path / "y.duckdb")]
    assert main(["evaluate", str(tiny_index), "--faithfulness", "--layers", "1", *missing]) == 2
    assert str(tmp_path / "gone") in capsys.readouterr().err
    assert not (tmp_path / "x.duckdb").exists() and not (tmp_path / "y.duckdb").exists()
    json.dumps(features)  # plain values
