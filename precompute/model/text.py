"""CLIP's text tower: the model's own tokenizer and text encoder, into the joint embedding space.

Search by meaning and zero-shot labels embed text with it; image embeddings come from the vision tower
(`VisionTower.capture(..., embed=True)`). `load_text_tower` loads the same open_clip identifier as the
vision side (`hf-hub:`, `local-dir:`, a built-in name with a tag) and keeps only the text half. A text
longer than the model's context is truncated to it, and `TextEmbedding.truncated` says which were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clipscope_explorer.precompute.model.precision import autocast, effective
from clipscope_explorer.precompute.model.vision import (
    ModelLoadError,
    ModelSpec,
    matrix_weights_in_bf16,
    resolve_device,
)

MAX_TEXT_CHARS = 2000  # longer texts are cut before tokenising: no context holds that many characters
TOKENIZER_CACHE_LIMIT = 100_000  # open_clip's BPE memoises every word it sees; bounded on a public server


@dataclass(frozen=True)
class TextEmbedding:
    """vectors: [n, d] float32, L2-normalised; truncated[i]: text i did not fit the context."""

    vectors: np.ndarray
    truncated: list[bool]


class TextTower:
    """The text half of an open_clip CLIP model and its tokenizer (the vision half is dropped).

    In bf16 the weights of the matrix products are stored in bf16, as `VisionTower` does: the operands
    autocast would make on every call, at half the memory (about 170 MB less for ViT-L/14's text tower).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, spec: ModelSpec, device: torch.device, precision: str):
        self.precision = effective(precision, device)
        model.eval().requires_grad_(False)
        if self.precision == "bf16":
            matrix_weights_in_bf16(model)
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = device
        self.context_length = int(getattr(tokenizer, "context_length", 77))

    @property
    def dim(self) -> int:
        projection = getattr(self.model, "text_projection", None)
        if isinstance(projection, torch.Tensor):
            return int(projection.shape[1])
        return int(self.encode(["a"]).vectors.shape[1])

    def _fits(self, text: str) -> bool:
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:  # a tokenizer without a plain encode: only the character cut is known
            return True
        return len(encode(text)) + 2 <= self.context_length  # + start and end of text

    def _bound_cache(self) -> None:
        cache = getattr(self.tokenizer, "cache", None)
        if isinstance(cache, dict) and len(cache) > TOKENIZER_CACHE_LIMIT:
            cache.clear()

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> TextEmbedding:
        cut = [text[:MAX_TEXT_CHARS] for text in texts]
        truncated = [len(text) > MAX_TEXT_CHARS or not self._fits(short) for text, short in zip(texts, cut)]
        parts = []
        for start in range(0, len(cut), batch_size):
            tokens = self.tokenizer(cut[start : start + batch_size]).to(self.device)
            with autocast(self.device, self.precision):
                parts.append(self.model.encode_text(tokens, normalize=True).float())
        self._bound_cache()
        if not parts:
            return TextEmbedding(np.zeros((0, self.dim), np.float32), [])
        vectors = torch.nn.functional.normalize(torch.cat(parts), dim=-1).cpu().numpy()
        return TextEmbedding(vectors, truncated)


def load_text_tower(spec: ModelSpec | str, device: str | torch.device = "auto", precision: str = "fp32") -> TextTower:
    """Load the text tower of `spec` (ModelLoadError when the weights cannot be loaded, or the model has no
    text tower)."""
    import open_clip

    if isinstance(spec, str):
        spec = ModelSpec(spec)
    target = resolve_device(device) if isinstance(device, str) else device
    try:
        model = open_clip.create_model(spec.name, pretrained=spec.pretrained, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(spec.name)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as error:
        raise ModelLoadError(f"could not load the text tower of {spec.describe()}: {error}") from error
    if not hasattr(model, "encode_text"):
        raise ModelLoadError(f"{spec.describe()} has no text tower")
    model.visual = torch.nn.Identity()  # the vision half is not needed here: free its memory
    return TextTower(model, tokenizer, spec, target, precision)
