"""`--normalise sample`: the statistics are data passed to each encode, so they survive a resume, and live
encoding standardises an upload with the index's statistics exactly as the job standardised its images."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import duckdb
import pytest
import torch

import clipscope_explorer.precompute.job as job
from clipscope_explorer.precompute.job import run
from tests.conftest import TINY_LAYERS, precompute_config
from tests.fixtures import index_contents
from tests.test_precompute import read_shards


@pytest.fixture(scope="module")
def normalised_index(tmp_path_factory, shard_dir, tiny_model_spec, tiny_sae_repo):
    out = tmp_path_factory.mktemp("normalised") / "n.duckdb"
    return run(precompute_config(shard_dir, tiny_model_spec, tiny_sae_repo, out, normalise="sample", precision="fp32"))


class Interrupted(Exception):
    pass


def test_an_interrupted_normalised_run_resumes_to_the_same_index(
    tmp_path, monkeypatch, normalised_index, shard_dir, tiny_model_spec, tiny_sae_repo
):
    config = precompute_config(
        shard_dir,
        tiny_model_spec,
        tiny_sae_repo,
        tmp_path / "r.duckdb",
        normalise="sample",
        precision="fp32",
        checkpoint_every=8,
    )
    encode_batch, calls = job.encode_batch, []

    def failing_on_the_third_batch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted
        return encode_batch(*args)

    monkeypatch.setattr(job, "encode_batch", failing_on_the_third_batch)
    with pytest.raises(Interrupted):
        run(config)
    saved = torch.load(tmp_path / "r.duckdb.work" / "state.pt", weights_only=False)
    assert sorted(saved["normalisation"]) == list(TINY_LAYERS)  # checkpointed with the first batches
    monkeypatch.setattr(job, "encode_batch", encode_batch)
    estimated = []
    monkeypatch.setattr(job, "estimate_normalisation", lambda *args: estimated.append(1))
    assert index_contents(run(config)) == index_contents(normalised_index)
    assert estimated == []  # the resumed run read its statistics from the checkpoint


def test_live_encoding_standardises_with_the_index_statistics(
    normalised_index, shard_dir, tiny_tower, tiny_sae_repo, tmp_path
):
    from clipscope_explorer.app.live.encoder import load_encoder
    from clipscope_explorer.app.live.spec import LiveSpec
    from clipscope_explorer.app.queries import open_index
    from clipscope_explorer.app.settings import Settings

    index = open_index(normalised_index)
    try:
        spec = LiveSpec.from_index(index.meta, index.layers, Settings(index=normalised_index, live_device="cpu"))
    finally:
        index.close()
    assert sorted(spec.normalisation) == list(TINY_LAYERS)
    with duckdb.connect(str(normalised_index), read_only=True) as con:
        stats = json.loads(con.execute("SELECT value FROM meta WHERE key = 'normalisation_stats'").fetchone()[0])
    *_, image = read_shards(shard_dir)[0]
    encoder = load_encoder(spec, batch_size=1, queue_size=1)
    try:
        pixels = encoder.preprocess(image)
        with ThreadPoolExecutor(1) as thread:  # a loop of its own: the browser tests keep one running here
            codes = thread.submit(asyncio.run, encoder.encode(pixels, TINY_LAYERS)).result()
    finally:
        encoder.close()
    acts = tiny_tower.capture(pixels[None], TINY_LAYERS, "fp32")
    for layer in TINY_LAYERS:
        blob = torch.load(tiny_sae_repo / f"{layer}_resid" / "2000.pt", weights_only=True)["model_state_dict"]
        mean, std = torch.tensor(stats[str(layer)]["mean"]), torch.tensor(stats[str(layer)]["std"])
        z = (acts[layer][0] - mean) / std.clamp_min(1e-6)
        top = torch.topk((z - blob["pre_b"]) @ blob["enc"], encoder.saes[layer].k, dim=-1)
        values, indices = codes[layer]
        assert torch.equal(torch.from_numpy(indices).long(), top.indices)
        torch.testing.assert_close(torch.from_numpy(values), top.values, atol=1e-5, rtol=1e-5)
        raw = torch.topk((acts[layer][0] - blob["pre_b"]) @ blob["enc"], encoder.saes[layer].k, dim=-1)
        assert not torch.equal(raw.indices, top.indices)  # the statistics really changed the codes
