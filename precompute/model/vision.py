"""The CLIP vision tower, loaded with open_clip, and residual-stream capture.

`load_tower` accepts the same model identifiers as open_clip:
``hf-hub:org/repo``, ``local-dir:/path`` (a folder laid out like the hub repo),
or a built-in architecture name with a pretrained tag or a weights file.
Weights that fail to load are an error here, never a silent random model.

`VisionTower.capture` returns the residual stream at the output of block N
(0-based), which is HF ``hidden_states[N + 1]``; blocks after the deepest
requested one never run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from clipscope_explorer.precompute.model.precision import autocast, effective
from clipscope_explorer.precompute.model.release import DEFAULT_MODEL


log = logging.getLogger(__name__)


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
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(device)


class VisionTower(nn.Module):
    """The vision half of an open_clip CLIP model, with residual-stream capture."""

    def __init__(self, visual: nn.Module, preprocess: Callable, spec: ModelSpec):
        super().__init__()
        if not hasattr(visual, "transformer") or not hasattr(visual.transformer, "resblocks"):
            raise ModelLoadError(
                f"{spec.describe()}: only open_clip ViT towers are supported "
                f"(got {type(visual).__name__})"
            )
        self.visual = visual.eval().requires_grad_(False)
        self.weights_precision = "fp32"
        _sequence_first(self.visual.transformer)
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

    def keep_weights_in(self, precision: str) -> None:
        """bf16: store the weights of the matrix products (linear, convolution, attention projections) in
        bf16, the operands autocast would cast them to on every call; results stay the same, the tower
        takes half the memory and no time casting. `capture` must then run in bf16."""
        if precision != "bf16":
            return
        for module in self.visual.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)):
                for name, weight in module.named_parameters(recurse=False):
                    if name in ("weight", "bias", "in_proj_weight", "in_proj_bias"):
                        setattr(module, name, nn.Parameter(weight.data.to(torch.bfloat16), requires_grad=False))
        self.weights_precision = "bf16"

    def check_layers(self, layers: Iterable[int]) -> list[int]:
        layers = sorted(set(int(n) for n in layers))
        if not layers:
            raise ValueError("no layers requested")
        bad = [n for n in layers if not 0 <= n < self.n_blocks]
        if bad:
            raise ValueError(
                f"layers {bad} do not exist in {self.spec.describe()}: blocks are 0..{self.n_blocks - 1}"
            )
        return layers

    @torch.inference_mode()
    def capture(self, pixels_bchw: torch.Tensor, layers: Iterable[int],
                precision: str | None = None) -> dict[int, torch.Tensor]:
        """Residual stream after each requested block, one forward pass.

        pixels_bchw: preprocessed images [B, 3, H, W]; precision: `fp32` or
        `bf16` (default: bf16 on CUDA, fp32 on CPU; see precompute/model/precision.py).
        Returns {layer: [B, n_tokens, width]} in float32, CLS at token 0 and
        patches row-major after it. Blocks after max(layers) are not run.
        """
        layers = self.check_layers(layers)
        wanted = set(layers)
        pixels = pixels_bchw.to(self.device, non_blocking=True)
        if self.weights_precision == "bf16" and effective(precision, pixels.device) != "bf16":
            raise ValueError("this tower's weights are stored in bf16: capture in bf16")
        out: dict[int, torch.Tensor] = {}
        with autocast(pixels.device, precision):
            x = self.visual._embeds(pixels)
            batch_first = getattr(self.visual.transformer, "batch_first", True)
            if not batch_first:
                x = x.transpose(0, 1).contiguous()
            for index, block in enumerate(self.visual.transformer.resblocks[: layers[-1] + 1]):
                x = block(x)
                if index in wanted:
                    tokens = x if batch_first else x.transpose(0, 1)
                    out[index] = tokens.float().contiguous()
        return out


def _sequence_first(transformer: nn.Module) -> None:
    """Run the blocks on contiguous [tokens, batch, width] tensors. In the batch-first layout
    nn.MultiheadAttention projects a transposed view of its input, and under bf16 autocast torch's
    matmul then copies the projection weight once per token (257 times: 2 s per ViT-L block at batch 4
    on CPU, against 25 ms). fp32 results are the same up to rounding (4e-6 at layer 20 of ViT-L/14)."""
    attentions = [block.attn for block in transformer.resblocks]
    if getattr(transformer, "batch_first", False) and all(isinstance(a, nn.MultiheadAttention) for a in attentions):
        transformer.batch_first = False
        for attention in attentions:
            attention.batch_first = False


def _open_clip_create(spec: ModelSpec, require_weights: bool):
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.name, pretrained=spec.pretrained, require_pretrained=require_weights
        )
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as error:
        raise ModelLoadError(f"could not load model {spec.describe()}: {error}") from error
    return model, preprocess


def load_tower(
    spec: ModelSpec | str = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    random_weights: bool = False,
) -> VisionTower:
    """Load the vision tower; raise ModelLoadError unless real weights were loaded.

    random_weights=True builds the architecture without weights (benchmarks only).
    """
    if isinstance(spec, str):
        spec = ModelSpec(spec)
    if random_weights:
        spec = ModelSpec(spec.name, None)
    model, preprocess = _open_clip_create(spec, require_weights=not random_weights)
    visual = model.visual
    del model  # drop the text tower
    tower = VisionTower(visual, preprocess, spec)
    target = resolve_device(device) if isinstance(device, str) else device
    return tower.to(target)
