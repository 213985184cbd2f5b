"""Forward-pass precision: how `auto` resolves, and that bf16 really runs the matrix products in bfloat16."""

from __future__ import annotations

import pytest
import torch

from clipscope_explorer.app.live.spec import LiveSpec
from clipscope_explorer.app.settings import Settings
from clipscope_explorer.precompute.model import precision as precision_module
from clipscope_explorer.precompute.model.checkpoints import load_sae
from clipscope_explorer.precompute.model.precision import resolve_precision
from clipscope_explorer.precompute.model.sae import Standardisation

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_device_and_index(monkeypatch, native):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", CUDA) == "bf16"
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", CUDA, "fp32") == "fp32"
    assert resolve_precision("auto", CPU, "bf16") == ("bf16" if native else "fp32")  # slow without AMX/AVX512-BF16
    assert resolve_precision("bf16", CPU) == "bf16" and resolve_precision("fp32", CUDA) == "fp32"  # asked: honoured
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, not 'fp16'"):
        resolve_precision("fp16", CPU)


def test_live_spec_takes_the_index_precision(tmp_path):
    meta = {"model": {"name": "m", "pretrained": None}, "sae": {"source": "s"}, "precision": "bf16"}
    rows = {1: {"sae_file": "f", "checkpoint": None}}
    spec = LiveSpec.from_index(meta, rows, Settings(index=tmp_path / "x.duckdb"))
    assert (spec.precision, spec.index_precision) == ("auto", "bf16")
    forced = LiveSpec.from_index(meta, rows, Settings(index=tmp_path / "x.duckdb", live_precision="fp32"))
    assert forced.precision == "fp32"
    assert spec.identity("bf16") != spec.identity("fp32")  # an upload's id names the codes it got


def test_bf16_sae_encode_is_the_bfloat16_product(tiny_sae_repo):
    sae = load_sae(str(tiny_sae_repo), layer=2)
    x = torch.randn(2, 257, 64, generator=torch.Generator().manual_seed(1)) * 3
    code = sae.encode(x, chunk_tokens=100, precision="bf16")
    reference = torch.topk(((x - sae.pre_b).bfloat16() @ sae.enc.bfloat16()).float(), sae.k, dim=-1)
    torch.testing.assert_close(code.values, reference.values, rtol=0, atol=0)
    exact = sae.encode(x, precision="fp32")
    assert (code.values - exact.values).abs().max() > 0  # bf16 really ran
    torch.testing.assert_close(code.values, exact.values, rtol=3e-2, atol=3e-2)


def test_bf16_capture_is_close_to_fp32_and_not_equal(tiny_tower):
    tower = tiny_tower
    pixels = torch.randn(2, 3, *tower.visual.image_size, generator=torch.Generator().manual_seed(2))
    exact = tower.capture(pixels, [1, 3], precision="fp32")
    bf16 = tower.capture(pixels, [1, 3], precision="bf16")
    assert tower.capture(pixels, [3])[3].equal(exact[3])  # the CPU default is fp32
    for layer in (1, 3):
        assert bf16[layer].dtype == torch.float32 and not bf16[layer].equal(exact[layer])
        relative = (bf16[layer] - exact[layer]).norm() / exact[layer].norm()
        assert relative < 0.05, (layer, float(relative))


def test_weights_kept_in_bf16_give_the_same_capture(tiny_model_spec):
    from clipscope_explorer.precompute.model.vision import load_tower

    reference = load_tower(tiny_model_spec, device="cpu")
    kept = load_tower(tiny_model_spec, device="cpu", weights_precision="bf16")
    assert (reference.weights_precision, kept.weights_precision) == ("fp32", "bf16")
    attention = kept.visual.transformer.resblocks[0].attn
    assert attention.out_proj.weight.dtype == attention.in_proj_bias.dtype == torch.bfloat16
    assert kept.visual.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert reference.visual.conv1.weight.dtype == torch.float32
    assert attention.in_proj_weight.dtype == kept.visual.conv1.weight.dtype == torch.bfloat16
    assert kept.visual.transformer.resblocks[0].ln_1.weight.dtype == torch.float32  # norms stay fp32
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    expected, got = reference.capture(pixels, [1, 3], "bf16"), kept.capture(pixels, [1, 3], "bf16")
    for layer in (1, 3):
        assert torch.equal(got[layer], expected[layer]), layer
    with pytest.raises(ValueError, match="stored in bf16: capture in bf16"):
        kept.capture(pixels, [1], "fp32")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_sae_loaded_for_encoding_encodes_the_same(tiny_sae_repo, precision):
    reference = load_sae(str(tiny_sae_repo), layer=2)
    kept = load_sae(str(tiny_sae_repo), layer=2, purpose="encode", weights_precision=precision)
    assert not hasattr(kept, "dec") and not hasattr(kept, "decode")  # it never had a decoder
    assert kept.enc.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert kept.weights_precision == precision and kept.origin == reference.origin
    assert torch.equal(kept.enc.float(), reference.enc.to(kept.enc.dtype).float())
    x = torch.randn(2, 257, 64, generator=torch.Generator().manual_seed(4)) * 3
    stats = Standardisation(torch.randn(64), torch.rand(64) + 0.5)
    for normalisation in (None, stats):
        expected = reference.encode(x, normalisation=normalisation, precision=precision)
        got = kept.encode(x, normalisation=normalisation, precision=precision)
        assert torch.equal(got.values, expected.values) and torch.equal(got.indices, expected.indices)
    if precision == "bf16":
        with pytest.raises(ValueError, match="stored in bf16: encode it in bf16"):
            kept.encode(x, precision="fp32")


def test_load_time_choices_are_checked(tiny_sae_repo, tiny_model_spec):
    from clipscope_explorer.precompute.model.vision import load_tower

    with pytest.raises(ValueError, match="purpose must be one of full, encode, not 'decode'"):
        load_sae(str(tiny_sae_repo), layer=2, purpose="decode")
    with pytest.raises(ValueError, match="a full SAE keeps the released float32 weights"):
        load_sae(str(tiny_sae_repo), layer=2, weights_precision="bf16")
    with pytest.raises(ValueError, match="weights precision must be one of fp32, bf16, not 'fp16'"):
        load_sae(str(tiny_sae_repo), layer=2, purpose="encode", weights_precision="fp16")
    with pytest.raises(ValueError, match="weights precision must be fp32 or bf16, not 'fp16'"):
        load_tower(tiny_model_spec, device="cpu", weights_precision="fp16")
