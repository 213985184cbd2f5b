"""Interventions (`precompute/model/intervene.py`) on the tiny CLIP and SAEs: scale 1 is the unedited run
bit for bit; an edit changes only its tokens at its layer, by the formula written out densely; nothing
at or before the edited layer moves otherwise; the decoder rows are the checkpoint's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipscope_explorer.precompute.model.checkpoints import DecoderRows, load_sae
from clipscope_explorer.precompute.model.encode import encode_pixels
from clipscope_explorer.precompute.model.intervene import FeatureEdit, encode_edited, firing_values
from clipscope_explorer.precompute.model.sae import SAELoadError, Standardisation
from tests.conftest import TINY_FEATURES, TINY_LAYERS, TINY_WIDTH, random_sae_tensors
from tests.fixtures import shape_image

EDITED = TINY_LAYERS[0]


@pytest.fixture(scope="module")
def saes(tiny_sae_repo):
    return {layer: load_sae(str(tiny_sae_repo), layer) for layer in TINY_LAYERS}


@pytest.fixture(scope="module")
def pixels(tiny_tower):
    images = [shape_image(seed)[0] for seed in (3, 4)]
    return torch.stack([tiny_tower.preprocess(image.convert("RGB")) for image in images])


def dense_firing(sae, x_td: torch.Tensor, feature: int, normalisation=None) -> torch.Tensor:
    """[T] the feature's firing value by the released forward pass written out densely."""
    if normalisation is not None:
        x_td = normalisation.apply(x_td)
    pre = (x_td - sae.pre_b) @ sae.enc
    top = torch.topk(pre, sae.k, dim=-1)
    kept = torch.zeros_like(pre).scatter(-1, top.indices, top.values)[:, feature]
    return kept.clamp(min=0)


def a_firing_feature(saes, tiny_tower, pixels, row: int = 0) -> int:
    """A feature that fires on several but not all patches of image `row` at the edited layer."""
    codes = encode_pixels(tiny_tower, {EDITED: saes[EDITED]}, pixels[row : row + 1])[EDITED].code
    counts = torch.stack([(firing_values(codes, f)[0] > 0).sum() for f in range(TINY_FEATURES)])
    return int(torch.argmin(torch.where(counts >= 3, counts, 10**6)))


@pytest.mark.parametrize("embed", [False, True])
def test_scale_one_is_the_unedited_run_exactly(tiny_tower, saes, pixels, embed):
    plain = encode_pixels(tiny_tower, saes, pixels, embed=embed)
    plain_codes, plain_embedding = plain if embed else (plain, None)
    feature = a_firing_feature(saes, tiny_tower, pixels)
    run = encode_edited(
        tiny_tower, saes, saes[EDITED].dec[feature], pixels, FeatureEdit(EDITED, feature, 1.0), embed=embed
    )
    for layer in TINY_LAYERS:
        assert torch.equal(run.codes[layer].acts, plain_codes[layer].acts)
        assert torch.equal(run.codes[layer].code.values, plain_codes[layer].code.values)
        assert torch.equal(run.codes[layer].code.indices, plain_codes[layer].code.indices)
    if embed:
        assert torch.equal(run.embedding, plain_embedding)
    assert (run.firing[0] > 0).sum() >= 3  # the feature does fire: the identity is not a no-op's


@pytest.mark.parametrize("scale", [0.0, 2.0, -3.5])
def test_an_edit_changes_only_its_tokens_by_the_formula(tiny_tower, saes, pixels, scale):
    feature = a_firing_feature(saes, tiny_tower, pixels)
    plain = encode_pixels(tiny_tower, saes, pixels)
    x = plain[EDITED].acts
    fires = dense_firing(saes[EDITED], x[0], feature)
    firing_patches = [t for t in range(1, x.shape[1]) if fires[t] > 0]
    chosen = (firing_patches[0], firing_patches[-1], 0)  # two where it fires and CLS (fires or not)
    edit = FeatureEdit(EDITED, feature, scale, tokens=chosen)
    run = encode_edited(tiny_tower, saes, saes[EDITED].dec[feature], pixels, edit)
    torch.testing.assert_close(run.firing[0], fires, rtol=1e-5, atol=1e-5)
    edited = run.codes[EDITED].acts
    expected = x.clone()
    for t in chosen:
        expected[0, t] = x[0, t] + (scale - 1) * fires[t] * saes[EDITED].dec[feature]
    untouched = [t for t in range(x.shape[1]) if t not in chosen]
    assert torch.equal(edited[0, untouched], x[0, untouched])  # exactly: other tokens keep their values
    assert torch.equal(edited[1], x[1])  # every token of the other image: it fires there on other tokens
    torch.testing.assert_close(edited, expected, rtol=0, atol=1e-5)
    assert not torch.equal(run.codes[TINY_LAYERS[1]].acts[0], plain[TINY_LAYERS[1]].acts[0])  # deeper layers move


def test_layers_before_the_edit_are_untouched_and_every_token_is_the_default(tiny_tower, pixels, tiny_sae_repo):
    saes = {layer: load_sae(str(tiny_sae_repo), layer % 2 + 1) for layer in (0, 1, 2, 3)}  # any SAE of width 64
    plain = encode_pixels(tiny_tower, saes, pixels)
    edited_layer = 2
    sae = saes[edited_layer]
    codes = plain[edited_layer].code
    counts = torch.stack([(firing_values(codes, f)[0] > 0).sum() for f in range(TINY_FEATURES)])
    feature = int(torch.argmax(counts))
    run = encode_edited(tiny_tower, saes, sae.dec[feature], pixels, FeatureEdit(edited_layer, feature, 0.0))
    for layer in (0, 1):
        assert torch.equal(run.codes[layer].acts, plain[layer].acts)
        assert torch.equal(run.codes[layer].code.values, plain[layer].code.values)
    x = plain[edited_layer].acts
    expected = x - run.firing[..., None] * sae.dec[feature]
    torch.testing.assert_close(run.codes[edited_layer].acts, expected, rtol=0, atol=1e-5)
    assert not torch.equal(run.codes[3].acts, plain[3].acts)


def test_a_standardised_layer_is_edited_in_the_units_its_sae_reads(tiny_tower, saes, pixels):
    generator = torch.Generator().manual_seed(7)
    norm = Standardisation(
        torch.randn(TINY_WIDTH, generator=generator), 0.5 + torch.rand(TINY_WIDTH, generator=generator)
    )
    normalisation = {EDITED: norm}
    plain = encode_pixels(tiny_tower, saes, pixels, normalisation=normalisation)
    codes = plain[EDITED].code
    counts = torch.stack([(firing_values(codes, f)[0] > 0).sum() for f in range(TINY_FEATURES)])
    feature = int(torch.argmax(counts))
    edit = FeatureEdit(EDITED, feature, 3.0)
    run = encode_edited(tiny_tower, saes, saes[EDITED].dec[feature], pixels, edit, normalisation=normalisation)
    x = plain[EDITED].acts
    fires = torch.stack([dense_firing(saes[EDITED], x[b], feature, norm) for b in range(len(x))])
    torch.testing.assert_close(run.firing, fires, rtol=1e-5, atol=1e-5)
    change_in_z = norm.apply(run.codes[EDITED].acts) - norm.apply(x)
    torch.testing.assert_close(change_in_z, 2.0 * fires[..., None] * saes[EDITED].dec[feature], rtol=1e-4, atol=1e-4)


def test_bad_edits_are_refused(tiny_tower, saes, pixels):
    row = saes[EDITED].dec[0]
    for edit, message in [
        (FeatureEdit(EDITED, TINY_FEATURES, 0.0), "feature 256 is not in"),
        (FeatureEdit(EDITED, 0, 10.5), "scale 10.5 is not in"),
        (FeatureEdit(EDITED, 0, float("nan")), "scale nan is not in"),
        (FeatureEdit(EDITED, 0, 0.0, tokens=()), "non-empty"),
        (FeatureEdit(EDITED, 0, 0.0, tokens=(tiny_tower.n_tokens,)), "non-empty list of indices"),
    ]:
        with pytest.raises(ValueError, match=message):
            encode_edited(tiny_tower, saes, row, pixels, edit)


def test_decoder_rows_are_the_checkpoints_mapped_or_read(tiny_sae_repo, tmp_path):
    path = tiny_sae_repo / f"{EDITED}_resid" / "2000.pt"
    sae = load_sae(str(path))
    rows = DecoderRows(path)
    assert (rows.n_features, rows.d_in) == (TINY_FEATURES, TINY_WIDTH)
    assert str(path) in Path("/proc/self/maps").read_text()  # memory-mapped, not read
    for feature in (0, 17, TINY_FEATURES - 1):
        assert torch.equal(rows.row(feature), sae.dec[feature])
    rows.check_fits(sae)
    with pytest.raises(IndexError):
        rows.row(TINY_FEATURES)

    pre_b, enc, dec = random_sae_tensors(TINY_WIDTH, TINY_FEATURES, seed=3)
    safetensors = tmp_path / "sae.safetensors"
    save_file({"pre_b": pre_b, "enc": enc, "dec": dec}, str(safetensors), metadata={"k": "8"})
    assert torch.equal(DecoderRows(safetensors).row(5), dec[5])

    legacy = tmp_path / "legacy.pt"  # not the zip layout: read whole
    blob = {"model_state_dict": {"pre_b": pre_b, "enc": enc, "dec": dec}, "d_in": 64, "n_features": 256, "k": 8}
    torch.save(blob, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(DecoderRows(legacy).row(9), dec[9])

    other = tmp_path / "other.safetensors"
    save_file({"dec": dec[:10]}, str(other))
    with pytest.raises(SAELoadError, match="other.safetensors: dec is 10 x 64"):
        DecoderRows(other).check_fits(sae)
    with pytest.raises(SAELoadError, match="missing.pt does not exist"):
        DecoderRows(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(SAELoadError, match="junk.pt"):
        DecoderRows(tmp_path / "junk.pt")


def test_an_images_codes_and_embedding_do_not_depend_on_its_batch(tiny_tower, saes, pixels):
    """The unedited side of an intervention is the upload as stored, which may have been encoded in a
    micro-batch; the edited run encodes the image alone. Scale 1 is exact only if batching changes nothing."""
    alone, alone_embedding = encode_pixels(tiny_tower, saes, pixels[:1], embed=True)
    batch = torch.cat([pixels, pixels.flip(-1), pixels])
    together, together_embedding = encode_pixels(tiny_tower, saes, batch, embed=True)
    for layer in TINY_LAYERS:
        assert torch.equal(alone[layer].acts[0], together[layer].acts[0])
        assert torch.equal(alone[layer].code.indices[0], together[layer].code.indices[0])
    assert torch.equal(alone_embedding[0], together_embedding[0])
