import json

import pytest
import torch

from clipscope_explorer.precompute.model.vision import ModelLoadError, load_tower


def hooked_reference(model_spec, pixels, layers):
    """Independent capture: forward hooks on the blocks of open_clip's own model, as open_clip builds it
    (batch-first), full forward."""
    import open_clip

    visual = open_clip.create_model_and_transforms(model_spec)[0].visual.eval()
    seen = {}
    handles = [
        visual.transformer.resblocks[n].register_forward_hook(
            lambda _m, _i, out, n=n: seen.__setitem__(n, out.detach().clone())
        )
        for n in layers
    ]
    with torch.no_grad():
        visual(pixels)
    for handle in handles:
        handle.remove()
    return seen


def test_capture_equals_hooks_on_open_clip_blocks(tiny_tower, tiny_model_spec):
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    layers = [0, 2]
    ours = tiny_tower.capture(pixels, layers)
    reference = hooked_reference(tiny_model_spec, pixels, layers)
    assert sorted(ours) == layers
    for layer in layers:
        assert ours[layer].shape == (3, 257, 64)
        torch.testing.assert_close(ours[layer], reference[layer], atol=1e-6, rtol=0)


def test_blocks_after_deepest_requested_never_run(tiny_tower):
    calls = []
    handles = [
        block.register_forward_hook(lambda *_a, i=i: calls.append(i))
        for i, block in enumerate(tiny_tower.visual.transformer.resblocks)
    ]
    try:
        tiny_tower.capture(torch.zeros(1, 3, 224, 224), [1])
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0, 1]


def test_capture_has_no_autograd(tiny_tower):
    out = tiny_tower.capture(torch.zeros(1, 3, 224, 224), [0])
    assert not out[0].requires_grad


def test_preprocessing_comes_from_model_config(tiny_tower):
    from PIL import Image

    pixels = tiny_tower.preprocess(Image.new("RGB", (300, 200), (255, 0, 0)))
    assert pixels.shape == (3, 224, 224)
    # red channel of pure red, normalised with the CLIP mean/std
    assert pixels[0, 0, 0].item() == pytest.approx((1 - 0.48145466) / 0.26862954, abs=1e-4)


def test_layers_out_of_range_rejected(tiny_tower):
    with pytest.raises(ValueError, match="blocks are 0..3"):
        tiny_tower.capture(torch.zeros(1, 3, 224, 224), [4])


def test_missing_weights_refused_loudly(tmp_path, tiny_model_dir):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text((tiny_model_dir / "open_clip_config.json").read_text())
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        load_tower(f"local-dir:{folder}", device="cpu")


def test_missing_folder_and_bad_config_named(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_tower(f"local-dir:{tmp_path / 'nowhere'}", device="cpu")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"no": "model_cfg"}))
    with pytest.raises(ModelLoadError, match="model_cfg"):
        load_tower(f"local-dir:{tmp_path}", device="cpu")


def test_builtin_name_without_weights_refused():
    with pytest.raises(ModelLoadError):
        load_tower("ViT-B-32", device="cpu")


def test_random_weights_only_when_asked():
    tower = load_tower("ViT-B-32", device="cpu", random_weights=True)
    assert tower.n_tokens == 50 and tower.width == 768
