"""The precompute command: options, errors named before compute, normalisation, --max-images."""

import json
import re

import duckdb
import numpy as np
import pytest
import torch

from clipscope_explorer.cli import main
from clipscope_explorer.precompute.job import run
from tests.conftest import precompute_config, write_sae_repo


def cli(shard_dir, model_spec, sae, out, *extra):
    return [
        "precompute",
        "--images",
        f"{shard_dir}/{{00000..00002}}.tar",
        "--out",
        str(out),
        "--model",
        model_spec,
        "--sae",
        str(sae),
        "--layers",
        "1",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
        *extra,
    ]


def test_cli_builds_an_index(tmp_path, shard_dir, tiny_model_spec, tiny_sae_repo, capsys):
    out = tmp_path / "cli.duckdb"
    assert main(cli(shard_dir, tiny_model_spec, tiny_sae_repo, out, "--max-images", "10", "--precision", "bf16")) == 0
    assert f"index written: {out}" in capsys.readouterr().out
    con = duckdb.connect(str(out), read_only=True)
    assert json.loads(con.execute("SELECT value FROM meta WHERE key = 'precision'").fetchone()[0]) == "bf16"
    assert con.execute("SELECT n_images FROM layers").fetchone()[0] == 9  # 10 samples, one corrupt
    keys = {k for (k,) in con.execute("SELECT key FROM images").fetchall()}
    assert keys <= {f"00000{i:04d}" for i in range(10)}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"images": "{dir}/missing.tar"}, "shard .*missing.tar does not exist"),
        ({"layers": "7"}, r"layers \[7\] do not exist"),
        ({"sae_layer_missing": True}, "no folder 2_resid"),
        ({"checkpoint": "999"}, "checkpoint 999 does not exist .* available: 1000, 2000"),
        ({"model": "local-dir:{dir}/nomodel"}, "nomodel"),
        ({"device": "cuda:999"}, "--device cuda:999 was asked for, but "),
    ],
)
def test_errors_name_the_bad_input_before_compute(
    tmp_path, shard_dir, tiny_model_spec, tiny_sae_repo, capsys, change, message
):
    out = tmp_path / "bad.duckdb"
    args = cli(shard_dir, tiny_model_spec, tiny_sae_repo, out)
    if "images" in change:
        args[args.index("--images") + 1] = change["images"].format(dir=tmp_path)
    if "layers" in change:
        args[args.index("--layers") + 1] = change["layers"]
    if "sae_layer_missing" in change:
        args[args.index("--layers") + 1] = "2"
        write_sae_repo(tmp_path / "one_layer", layers=(1,))
        args[args.index("--sae") + 1] = str(tmp_path / "one_layer")
    if "checkpoint" in change:
        args += ["--sae-checkpoint", change["checkpoint"]]
    if "model" in change:
        args[args.index("--model") + 1] = change["model"].format(dir=tmp_path)
    if "device" in change:
        args[args.index("--device") + 1] = change["device"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipscope-explorer precompute: error:") and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists() and not (tmp_path / "bad.duckdb.work").exists()


def test_sae_that_does_not_fit_the_model_is_refused(tmp_path, shard_dir, tiny_model_spec, capsys):
    write_sae_repo(tmp_path / "narrow", layers=(1,), d_in=32)
    assert main(cli(shard_dir, tiny_model_spec, tmp_path / "narrow", tmp_path / "o.duckdb")) == 2
    assert "2000.pt: d_in is 32 but the model's residual width is 64" in capsys.readouterr().err


def test_normalise_sample_reports_raw_and_standardised(
    tmp_path, shard_dir, tiny_model_spec, tiny_sae_repo, tiny_index, tiny_tower
):
    from clipscope_explorer.precompute.model.checkpoints import load_sae
    from tests.test_precompute import read_shards

    out = run(
        precompute_config(
            shard_dir, tiny_model_spec, tiny_sae_repo, tmp_path / "n.duckdb", normalise="sample", workers=2
        )
    )
    con = duckdb.connect(str(out), read_only=True)
    raw_con = duckdb.connect(str(tiny_index), read_only=True)
    stats = json.loads(con.execute("SELECT value FROM meta WHERE key = 'normalisation_stats'").fetchone()[0])
    for layer in (1, 2):
        mse, ev, mse_raw, ev_raw = con.execute(
            "SELECT mse, explained_variance, mse_raw, explained_variance_raw FROM layers WHERE layer = ?", [layer]
        ).fetchone()
        raw_mse, raw_ev = raw_con.execute(
            "SELECT mse, explained_variance FROM layers WHERE layer = ?", [layer]
        ).fetchone()
        assert mse_raw == pytest.approx(raw_mse, rel=1e-6) and ev_raw == pytest.approx(raw_ev, rel=1e-6)
        # standardised metrics against a brute-force recomputation
        pixels = torch.stack([tiny_tower.preprocess(img) for *_, img in read_shards(shard_dir)])
        x = tiny_tower.capture(pixels, [layer])[layer]
        mean, std = x.flatten(0, 1).double().mean(0), x.flatten(0, 1).double().std(0, unbiased=False)
        torch.testing.assert_close(torch.tensor(stats[str(layer)]["mean"]), mean.float(), atol=1e-5, rtol=1e-5)
        z = (x - mean.float()) / std.float().clamp_min(1e-6)
        sae = load_sae(str(tiny_sae_repo), layer)
        pre = (z - sae.pre_b) @ sae.enc
        top = torch.topk(pre, sae.k, dim=-1)
        recon = torch.zeros_like(pre).scatter(-1, top.indices, top.values) @ sae.dec + sae.pre_b
        assert mse == pytest.approx((z - recon).pow(2).sum(-1).mean().item(), rel=1e-4)


@pytest.mark.parametrize("kind", ["missing", "empty", "a folder"])
def test_a_bad_vocabulary_file_is_named_before_compute(tmp_path, shard_dir, tiny_sae_repo, capsys, kind):
    vocabulary = tmp_path / "terms.txt"
    if kind == "empty":
        vocabulary.write_text("\n  \n")
    elif kind == "a folder":
        vocabulary.mkdir()
    out = tmp_path / "bad.duckdb"
    args = cli(shard_dir, f"local-dir:{tmp_path / 'no-model'}", tiny_sae_repo, out, "--vocabulary", str(vocabulary))
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("clipscope-explorer precompute: error: argument --vocabulary:") and str(vocabulary) in err
    assert not out.exists() and not (tmp_path / "bad.duckdb.work").exists()


def test_the_vocabulary_holds_caption_and_user_terms_with_their_text_embeddings(
    tmp_path, shard_dir, tiny_model_spec, tiny_sae_repo
):
    from clipscope_explorer.precompute.model.text import load_text_tower
    from tests.test_precompute import read_shards

    vocabulary = tmp_path / "terms.txt"
    vocabulary.write_text("zebra crossing\nred\n")
    out = tmp_path / "vocabulary.duckdb"
    extra = ("--vocabulary", str(vocabulary), "--zero-shot-min-count", "3", "--max-images", "20")
    assert main(cli(shard_dir, tiny_model_spec, tiny_sae_repo, out, *extra)) == 0
    con = duckdb.connect(str(out), read_only=True)
    zero_shot = json.loads(con.execute("SELECT value FROM meta WHERE key = 'zero_shot'").fetchone()[0])
    assert zero_shot["template"] == "a photo of {}" and zero_shot["min_count"] == 3
    assert zero_shot["user_vocabulary"] == str(vocabulary)
    rows = con.execute("SELECT term, origin, n_captions, embedding FROM vocabulary ORDER BY term").fetchall()
    assert zero_shot["vocabulary_size"] == len(rows)
    terms = {term: (origin, count) for term, origin, count, _ in rows}
    captions = [caption for *_, caption, _ in read_shards(shard_dir)][:19]  # 20 samples, one corrupt
    assert terms["zebra crossing"] == ("user", 0)
    assert terms["red"] == ("user", sum("red" in caption.split() for caption in captions))
    assert {origin for origin, _ in terms.values()} == {"captions", "user"}
    for term, (origin, count) in terms.items():
        if origin == "captions":
            assert count >= 3 and count == sum(f" {term} " in f" {caption} " for caption in captions), term
    expected = load_text_tower(tiny_model_spec, device="cpu").encode([f"a photo of {t}" for t, *_ in rows]).vectors
    for (term, *_, blob), vector in zip(rows, expected):
        np.testing.assert_allclose(np.frombuffer(blob, "<f2"), vector, atol=1e-3, err_msg=term)
    labelled = con.execute(
        "SELECT f.zero_shot_terms, f.zero_shot_scores, f.prototype FROM features f WHERE len(zero_shot_terms) > 0"
    ).fetchall()
    vectors = {term: np.frombuffer(blob, "<f2").astype(np.float64) for term, *_, blob in rows}
    for labels, scores, prototype in labelled:
        for label, score in zip(labels, scores):
            cosine = vectors[label] @ np.frombuffer(prototype, "<f2").astype(np.float64)
            assert score == pytest.approx(cosine, abs=3e-3), label
