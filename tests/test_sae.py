import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from clipscope_explorer.precompute.model.checkpoints import load_sae, load_saes, save_checkpoint
from clipscope_explorer.precompute.model.sae import (
    SAEEncoder,
    SAELoadError,
    SparseCode,
    Standardisation,
    TopKSAE,
    explained_variance,
    squared_error,
)
from tests.conftest import TINY_K, random_sae_tensors, write_sae_repo


def released_forward(x, pre_b, enc, dec, k):
    """The released algorithm written out plainly: dense latent, dense decode."""
    pre = (x - pre_b) @ enc
    top = torch.topk(pre, k, dim=-1)
    latent = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    return top, latent @ dec + pre_b


def test_default_checkpoint_is_largest(tiny_sae_repo):
    sae = load_sae(str(tiny_sae_repo), layer=1)
    assert sae.origin.checkpoint == 2000 and sae.origin.file.endswith("1_resid/2000.pt")
    assert load_sae(str(tiny_sae_repo), layer=1, checkpoint=1000).origin.checkpoint == 1000


def test_encode_decode_equal_released_algorithm(tiny_sae_repo):
    sae = load_sae(str(tiny_sae_repo), layer=2)
    blob = torch.load(tiny_sae_repo / "2_resid" / "2000.pt", weights_only=True)["model_state_dict"]
    x = torch.randn(3, 257, 64, generator=torch.Generator().manual_seed(0)) * 3
    top, reference = released_forward(x, blob["pre_b"], blob["enc"], blob["dec"], TINY_K)
    code = sae.encode(x, chunk_tokens=100)  # several chunks, one ragged
    assert isinstance(code, SparseCode) and code.values.shape == (3, 257, TINY_K)
    assert torch.equal(code.indices, top.indices)
    torch.testing.assert_close(code.values, top.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(sae.decode(code), reference, atol=1e-5, rtol=0)


def test_no_relu_negative_values_kept(tmp_path):
    pre_b, enc, dec = random_sae_tensors(64, 256, seed=3)
    save_checkpoint(tmp_path / "s.pt", pre_b, enc.abs(), dec, 8, 1)
    sae = load_sae(str(tmp_path / "s.pt"))
    code = sae.encode((pre_b - 1.0)[None])  # every pre-activation is negative
    assert (code.values < 0).all()
    top = torch.topk((-torch.ones(64)) @ enc.abs(), 8)
    torch.testing.assert_close(code.values[0], top.values)


def test_standardisation_is_an_argument_of_encode(tiny_sae_repo):
    sae = load_sae(str(tiny_sae_repo), layer=1)
    blob = torch.load(tiny_sae_repo / "1_resid" / "2000.pt", weights_only=True)["model_state_dict"]
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(2)) * 3
    mean, std = torch.randn(64), torch.rand(64) + 0.5
    std[3] = 0.0  # a constant dimension: floored at 1e-6, never a division by zero
    z = (x - mean) / std.clamp_min(1e-6)
    top, reference = released_forward(z, blob["pre_b"], blob["enc"], blob["dec"], TINY_K)
    code = sae.encode(x, normalisation=Standardisation(mean, std))
    assert torch.equal(code.indices, top.indices)
    torch.testing.assert_close(code.values, top.values)
    torch.testing.assert_close(sae.decode(code), reference, atol=1e-4, rtol=1e-5)  # reconstructs what it read
    raw_top, _ = released_forward(x, blob["pre_b"], blob["enc"], blob["dec"], TINY_K)
    assert torch.equal(sae.encode(x).indices, raw_top.indices)  # nothing stays set on the SAE


def test_sae_objects_are_made_whole_and_checked():
    pre_b, enc, dec = random_sae_tensors(64, 256, seed=1)
    sae = TopKSAE(pre_b, enc, dec, 8)
    assert (sae.d_in, sae.n_features, sae.k, sae.weights_precision) == (64, 256, 8, "fp32")
    encoder = SAEEncoder(pre_b, enc, 8, weights_precision="bf16")
    assert encoder.enc.dtype == torch.bfloat16 and encoder.pre_b.dtype == torch.float32
    assert enc.dtype == torch.float32  # the caller's tensor is not converted in place
    with pytest.raises(ValueError, match=r"k=300 is not in 1..256"):
        SAEEncoder(pre_b, enc, 300)
    with pytest.raises(ValueError, match=r"dec must be \[n_features, d_in\]"):
        TopKSAE(pre_b, enc, dec[:100], 8)
    with pytest.raises(ValueError, match=r"enc must be \[d_in, n_features\] and pre_b \[d_in\]"):
        SAEEncoder(pre_b[:10], enc, 8)


def test_metrics_follow_model_card_conventions():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    x_hat = torch.tensor([[1.0, 2.0, 5.0]])
    assert squared_error(x, x_hat).item() == pytest.approx(4.0)
    # ||x - mean(x)||^2 = 1 + 0 + 1 = 2
    assert explained_variance(x, x_hat).item() == pytest.approx(1 - 4.0 / 2.0)


def test_single_pt_and_safetensors_files(tiny_sae_repo, tmp_path):
    single = load_sae(str(tiny_sae_repo / "1_resid" / "1000.pt"))
    assert single.origin.checkpoint == 1000
    pre_b, enc, dec = random_sae_tensors(64, 256, seed=5)
    path = tmp_path / "sae.safetensors"
    save_file({"pre_b": pre_b, "enc": enc, "dec": dec}, str(path), metadata={"k": "4"})
    sae = load_sae(str(path))
    assert sae.k == 4 and torch.equal(sae.enc, enc)


def test_several_layers_from_one_folder(tiny_sae_repo):
    saes = load_saes(str(tiny_sae_repo), [1, 2])
    assert sorted(saes) == [1, 2] and not torch.equal(saes[1].enc, saes[2].enc)
    with pytest.raises(SAELoadError, match="one file"):
        load_saes(str(tiny_sae_repo / "1_resid" / "1000.pt"), [1, 2])


# ------------------------------------------------------------------ errors


def test_error_missing_layer_folder_lists_layers(tiny_sae_repo):
    with pytest.raises(SAELoadError, match=r"no folder 7_resid in .*; layers available: 1, 2"):
        load_sae(str(tiny_sae_repo), layer=7)


def test_error_missing_checkpoint_lists_available(tiny_sae_repo):
    with pytest.raises(SAELoadError, match=r"checkpoint 1500 does not exist .*available: 1000, 2000"):
        load_sae(str(tiny_sae_repo), layer=1, checkpoint=1500)


def test_error_missing_keys_named(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"model_state_dict": {}, "k": 8}, path)
    with pytest.raises(SAELoadError, match=r"bad.pt lacks key\(s\) \['d_in', 'n_features'\]"):
        load_sae(str(path))
    pre_b, enc, dec = random_sae_tensors(64, 256, seed=0)
    torch.save({"model_state_dict": {"pre_b": pre_b, "enc": enc}, "d_in": 64, "n_features": 256, "k": 8}, path)
    with pytest.raises(SAELoadError, match=r"bad.pt lacks tensor\(s\) \['dec'\]"):
        load_sae(str(path))


def test_error_wrong_shapes_named(tmp_path):
    pre_b, enc, dec = random_sae_tensors(64, 256, seed=0)
    path = tmp_path / "shapes.pt"
    torch.save(
        {"model_state_dict": {"pre_b": pre_b, "enc": enc, "dec": dec[:100]}, "d_in": 64, "n_features": 256, "k": 8},
        path,
    )
    with pytest.raises(SAELoadError, match=r"shapes.pt: dec has shape \(100, 64\), expected \(256, 64\)"):
        load_sae(str(path))


def test_error_d_in_does_not_fit_model(tiny_sae_repo, tiny_tower, tmp_path):
    write_sae_repo(tmp_path, layers=(1,), checkpoints=(5,), d_in=32)
    sae = load_sae(str(tmp_path), layer=1)
    with pytest.raises(SAELoadError, match=r"5.pt: d_in is 32 but the model's residual width is 64"):
        sae.check_fits(tiny_tower.width)


def test_error_corrupt_and_missing_files(tmp_path, tiny_sae_repo):
    corrupt = tmp_path / "1_resid"
    corrupt.mkdir()
    good = (tiny_sae_repo / "1_resid" / "1000.pt").read_bytes()
    (corrupt / "300.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(SAELoadError, match=r"300.pt is corrupt"):
        load_sae(str(tmp_path), layer=1)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(SAELoadError, match=r"junk.safetensors is corrupt"):
        load_sae(str(tmp_path / "junk.safetensors"))
    with pytest.raises(SAELoadError, match=r"nothere.pt does not exist"):
        load_sae(str(tmp_path / "nothere.pt"))


# ------------------------------------------------------------------ hub path, offline


def populate_hf_cache(cache: os.PathLike, repo: str, source) -> None:
    """Lay files out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/..."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(source, base / "snapshots" / commit)


def test_hub_repo_loads_offline_from_cache(tmp_path, tiny_sae_repo):
    cache = tmp_path / "hub"
    populate_hf_cache(cache, "lewington/CLIP-ViT-L-scope", tiny_sae_repo)
    code = (
        "from clipscope_explorer.precompute.model.checkpoints import load_sae\n"
        "from clipscope_explorer.precompute.model.sae import SAELoadError\n"
        "sae = load_sae('lewington/CLIP-ViT-L-scope', layer=2)\n"
        "print(sae.origin.checkpoint, sae.origin.source, sae.k)\n"
        "try:\n    load_sae('lewington/CLIP-ViT-L-scope', layer=3)\n"
        "except SAELoadError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "2000 lewington/CLIP-ViT-L-scope 8"
    assert lines[1].startswith("ERR no folder 3_resid in hub repo lewington/CLIP-ViT-L-scope; layers available: 1, 2")
