"""CLIP's text tower as the project loads it equals open_clip's own `encode_text`, and says which texts it cut."""

from __future__ import annotations

import open_clip
import pytest
import torch

from clipscope_explorer.precompute.model.text import MAX_TEXT_CHARS, load_text_tower
from clipscope_explorer.precompute.model.vision import ModelLoadError

TEXTS = ["a red circle", "a photo of a blue square", "", "ünïcödé 文字 テキスト", "dog " * 200]


@pytest.fixture(scope="module")
def text_tower(tiny_model_spec):
    return load_text_tower(tiny_model_spec, device="cpu")


def test_vectors_equal_open_clip_encode_text(text_tower, tiny_model_spec):
    model = open_clip.create_model(tiny_model_spec).eval()
    tokenizer = open_clip.get_tokenizer(tiny_model_spec)
    with torch.no_grad():
        expected = model.encode_text(tokenizer(TEXTS), normalize=True)
    got = text_tower.encode(TEXTS)
    assert got.vectors.dtype == "float32" and got.vectors.shape == (len(TEXTS), text_tower.dim)
    torch.testing.assert_close(torch.from_numpy(got.vectors), expected)


def test_a_text_over_the_context_is_reported_truncated(text_tower):
    assert text_tower.context_length == 77
    fits, over = "word " * 75, "word " * 76  # + start and end of text: 77 and 78 tokens
    long_characters = "a" * (MAX_TEXT_CHARS + 1)
    got = text_tower.encode(["a red circle", fits, over, long_characters])
    assert got.truncated == [False, False, True, True]
    assert text_tower.encode([]).vectors.shape == (0, text_tower.dim)


def test_batches_do_not_change_the_vectors(text_tower):
    whole = text_tower.encode(TEXTS).vectors
    torch.testing.assert_close(
        torch.from_numpy(text_tower.encode(TEXTS, batch_size=2).vectors), torch.from_numpy(whole)
    )


def test_a_model_that_cannot_be_loaded_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load the text tower"):
        load_text_tower(f"local-dir:{tmp_path / 'missing'}", device="cpu")


def test_in_bf16_the_matrix_weights_are_bf16_and_the_vectors_close_to_fp32(text_tower, tiny_model_spec):
    bf16 = load_text_tower(tiny_model_spec, device="cpu", precision="bf16")
    linear = next(m for m in bf16.model.modules() if isinstance(m, torch.nn.Linear))
    assert linear.weight.dtype == torch.bfloat16 and bf16.model.token_embedding.weight.dtype == torch.float32
    cosines = (bf16.encode(TEXTS).vectors * text_tower.encode(TEXTS).vectors).sum(1)
    assert cosines.min() > 0.98, cosines
