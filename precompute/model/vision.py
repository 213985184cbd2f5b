"""The CLIP vision tower, loaded with open_clip, and residual-stream capture.

`load_tower` accepts the same model identifiers as open_clip:
``hf-hub:org/repo``, ``local-dir:/path`` (a folder laid out like the hub repo),
or a built-in architecture name with a pretrained tag or a weights file.
Weights that fail to load are an error here, never a silent random model.

`VisionTower.capture` returns the residual stream at the output of block N
(0-based), which is HF ``hidden_states[N + 1]``; blocks after the deepest
requested one never run, unless the final image embedding is asked for too
(`embed=True`), which runs the tower to its end as open_clip does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, overload

import torch
from torch import nn

from clipscope_explorer.precompute.model.precision import autocast, effective
from clipscope_explorer.precompute.model.release import DEFAULT_MODEL

log = logging.getLogger(__name__)


StreamEdit = tuple[int, Callable[[torch.Tensor], torch.Tensor]]  # (block, stream [B, T, width] -> edited)


class ModelLoadError(RuntimeError):
    """The vision model could not be loaded as asked."""


@dataclass(frozen=True)
class ModelSpec:
    """What to load: an open_clip identifier and, for built-in names, a tag or file."""

    name: str = DEFAULT_MODEL
    pretrained: str | None = None

    def describe(self) -> str:
        return self.name if not self.pretrained else f"{self.name} ({self.pretrained})"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} was asked for, but no CUDA device is available")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ModelLoadError(f"--device {device} was asked for, but there are {torch.cuda.device_count()} CUDA devices")
    return torch.device(device)


class VisionTower:
    """The vision half of an open_clip CLIP model, with residual-stream capture.

    Made on `device` with its matrix weights in `weights_precision`, fixed from then on. `bf16` stores the
    weights of the matrix products (linear, convolution, attention projections) in bf16, the operands
    autocast would cast them to on every call: captures are the same, the tower takes half the memory and
    no time casting, and it captures only in bf16. Norms and embeddings stay float32.
    """

    def __init__(
        self,
        visual: nn.Module,
        preprocess: Callable,
        spec: ModelSpec,
        device: torch.device | str = "cpu",
        weights_precision: str = "fp32",
    ):
        if not hasattr(visual, "transformer") or not hasattr(visual.transformer, "resblocks"):
            raise ModelLoadError(
                f"{spec.describe()}: only open_clip ViT towers are supported (got {type(visual).__name__})"
            )
        if weights_precision not in ("fp32", "bf16"):
            raise ValueError(f"weights precision must be fp32 or bf16, not {weights_precision!r}")
        visual.eval().requires_grad_(False)
        _sequence_first(visual.transformer)
        if weights_precision == "bf16":
            matrix_weights_in_bf16(visual)
        self.visual = visual.to(device)
        self.weights_precision = weights_precision
        self.preprocess = preprocess
        self.spec = spec

    @property
    def n_blocks(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        return int(self.visual.transformer.width)

    @property
    def n_tokens(self) -> int:
        """Tokens per image: the patch grid plus the CLS token."""
        return int(self.visual.positional_embedding.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.visual.grid_size)

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    def check_layers(self, layers: Iterable[int]) -> list[int]:
        layers = sorted(set(int(n) for n in layers))
        if not layers:
            raise ValueError("no layers requested")
        bad = [n for n in layers if not 0 <= n < self.n_blocks]
        if bad:
            raise ValueError(f"layers {bad} do not exist in {self.spec.describe()}: blocks are 0..{self.n_blocks - 1}")
        return layers

    @overload
    def capture(
        self,
        pixels_bchw: torch.Tensor,
        layers: Iterable[int],
        precision: str | None = None,
        embed: Literal[False] = False,
        edit: StreamEdit | None = None,
    ) -> dict[int, torch.Tensor]: ...

    @overload
    def capture(
        self,
        pixels_bchw: torch.Tensor,
        layers: Iterable[int],
        precision: str | None = None,
        *,
        embed: Literal[True],
        edit: StreamEdit | None = None,
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]: ...

    @torch.inference_mode()
    def capture(self, pixels_bchw, layers, precision=None, embed=False, edit=None):
        """Residual stream after each requested block, one forward pass.

        pixels_bchw: preprocessed images [B, 3, H, W]; precision: `fp32` or
        `bf16` (default: bf16 on CUDA, fp32 on CPU; see precompute/model/precision.py).
        Returns {layer: [B, n_tokens, width]} in float32, CLS at token 0 and
        patches row-major after it. Blocks after max(layers) are not run, unless
        `embed`: then every block runs and the result is ({layer: ...}, embedding),
        the embedding [B, output_dim] float32 and L2-normalised, as open_clip's
        `encode_image(pixels, normalize=True)` computes it.
        `edit` (block, function): the stream after that block is replaced by function(stream) ([B, T, width]
        float32 in, the same shape out) before the next block reads it, and captured as edited.
        """
        layers = self.check_layers(layers)
        wanted = set(layers)
        pixels = pixels_bchw.to(self.device, non_blocking=True)
        if self.weights_precision == "bf16" and effective(precision, pixels.device) != "bf16":
            raise ValueError("this tower's weights are stored in bf16: capture in bf16")
        last = self.n_blocks - 1 if embed else layers[-1]
        out: dict[int, torch.Tensor] = {}
        with autocast(pixels.device, precision):
            x = self.visual._embeds(pixels)
            batch_first = getattr(self.visual.transformer, "batch_first", True)
            if not batch_first:
                x = x.transpose(0, 1).contiguous()
            for index, block in enumerate(self.visual.transformer.resblocks[: last + 1]):
                x = block(x)
                if edit is not None and index == edit[0]:
                    edited = edit[1](x.float().contiguous() if batch_first else x.transpose(0, 1).float().contiguous())
                    x = (edited if batch_first else edited.transpose(0, 1)).to(x.dtype).contiguous()
                if index in wanted:
                    tokens = x if batch_first else x.transpose(0, 1)
                    out[index] = tokens.float().contiguous()
            if not embed:
                return out
            embedding = self._embedding(x if batch_first else x.transpose(0, 1))
        return out, embedding

    def _embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """The rest of open_clip's VisionTransformer.forward after the blocks (its own `_pool`: ln_post and
        pooling in the order its config says, attentional pooling included; then the projection),
        L2-normalised as CLIP.encode_image(normalize=True) does. tokens: [B, T, width], batch first."""
        pooled, _ = self.visual._pool(tokens)
        if self.visual.proj is not None:  # row by row: a batch's matrix product rounds unlike one row's, and an
            # image's embedding must not depend on what it was batched with (an intervention's identity)
            pooled = torch.stack([row @ self.visual.proj for row in pooled])
        return torch.nn.functional.normalize(pooled.float(), dim=-1)

    @property
    def embedding_dim(self) -> int:
        """Width of the final image embedding (open_clip's `output_dim`)."""
        return int(self.visual.output_dim)


def _sequence_first(transformer: nn.Module) -> None:
    """Run the blocks on contiguous [tokens, batch, width] tensors. In the batch-first layout
    nn.MultiheadAttention projects a transposed view of its input, and under bf16 autocast torch's
    matmul then copies the projection weight once per token (257 times; the cost is in the README's
    Decisions). fp32 results are the same up to rounding (tests/test_vision.py)."""
    attentions = [block.attn for block in transformer.resblocks]
    if getattr(transformer, "batch_first", False) and all(isinstance(a, nn.MultiheadAttention) for a in attentions):
        transformer.batch_first = False
        for attention in attentions:
            attention.batch_first = False


def matrix_weights_in_bf16(tower: nn.Module) -> None:
    """Store the weights and biases of the matrix products in bf16 (while the tower is being made)."""
    for module in tower.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)):
            module.to(torch.bfloat16)


def _open_clip_visual(spec: ModelSpec, require_weights: bool) -> tuple[nn.Module, Callable]:
    """The vision tower of the open_clip model and its preprocessing (the text tower is not kept)."""
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.name, pretrained=spec.pretrained, require_pretrained=require_weights
        )
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as error:
        raise ModelLoadError(f"could not load model {spec.describe()}: {error}") from error
    return model.visual, preprocess


def load_tower(
    spec: ModelSpec | str = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    random_weights: bool = False,
    weights_precision: str = "fp32",
) -> VisionTower:
    """Load the vision tower onto `device` with its matrix weights in `weights_precision` (see VisionTower);
    raise ModelLoadError unless real weights were loaded.

    random_weights=True builds the architecture without weights (benchmarks only).
    """
    if isinstance(spec, str):
        spec = ModelSpec(spec)
    if random_weights:
        spec = ModelSpec(spec.name, None)
    target = resolve_device(device) if isinstance(device, str) else device
    visual, preprocess = _open_clip_visual(spec, require_weights=not random_weights)
    return VisionTower(visual, preprocess, spec, target, weights_precision)
