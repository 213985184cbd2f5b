"""The TopK sparse autoencoder of the CLIP-Scope release, and its loaders.

Forward pass, exactly as released (no ReLU anywhere, no encoder bias):
    pre    = (x - pre_b) @ enc                    # [T, F]
    top    = topk(pre, k)                         # kept values may be negative
    x_hat  = sum_j top.values_j * dec[top.idx_j] + pre_b

Codes stay sparse: `encode` returns k (value, index) pairs per token and
`decode` gathers k decoder rows with embedding_bag.

Checkpoints are read and written by `clipscope_explorer.precompute.model.checkpoints`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from clipscope_explorer.precompute.model.precision import effective

# Tokens per encode chunk: peak extra memory is chunk x n_features x 4 bytes.
DEFAULT_CHUNK_TOKENS = 1024


class SAELoadError(RuntimeError):
    """An SAE checkpoint is missing, malformed, or does not fit the model."""


class SparseCode(NamedTuple):
    """TopK codes of a batch of tokens.

    values:  [..., k] float, the kept pre-activations (may be <= 0: no ReLU)
    indices: [..., k] int64, the feature index of each kept value
    """

    values: torch.Tensor
    indices: torch.Tensor


@dataclass(frozen=True)
class SAESource:
    """Where one layer's SAE came from, as recorded in the index."""

    source: str
    layer: int | None
    checkpoint: int | None
    file: str


class TopKSAE(nn.Module):
    """TopK SAE with the released parameters: pre_b [d], enc [d, F], dec [F, d]."""

    def __init__(
        self,
        pre_b: torch.Tensor,
        enc: torch.Tensor,
        dec: torch.Tensor,
        k: int,
        origin: SAESource | None = None,
    ):
        super().__init__()
        self.pre_b = nn.Parameter(pre_b.float(), requires_grad=False)
        self.enc = nn.Parameter(enc.float(), requires_grad=False)
        self.dec = nn.Parameter(dec.float(), requires_grad=False)
        self.k = int(k)
        self.origin = origin
        self.register_buffer("norm_mean", None)
        self.register_buffer("norm_std", None)

    @property
    def d_in(self) -> int:
        return self.enc.shape[0]

    @property
    def n_features(self) -> int:
        return self.enc.shape[1]

    @property
    def normalised(self) -> bool:
        return self.norm_mean is not None

    def set_normalisation(self, mean: torch.Tensor | None, std: torch.Tensor | None) -> None:
        """Standardise inputs per dimension before encoding; None restores raw input."""
        if mean is None:
            self.norm_mean = self.norm_std = None
            return
        device = self.enc.device
        self.norm_mean = mean.float().to(device)
        self.norm_std = std.float().clamp_min(1e-6).to(device)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Input as the SAE sees it: raw, or standardised when normalisation is set."""
        x = x.to(self.enc.device, torch.float32)
        if self.norm_mean is None:
            return x
        return (x - self.norm_mean) / self.norm_std

    @torch.inference_mode()
    def encode(self, x: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
               precision: str | None = None) -> SparseCode:
        """Sparse codes of raw x [..., d_in] -> SparseCode([..., k], [..., k]).

        x is standardised here when normalisation is set (see `prepare`); `decode`
        then reconstructs `prepare(x)`, the input as the SAE saw it.

        Tokens are encoded in chunks, so the dense pre-activations never exceed
        chunk_tokens x n_features floats (256 MiB at the defaults, full size).
        precision: `fp32` or `bf16` (None: bf16 on CUDA, fp32 on CPU).
        """
        lead = x.shape[:-1]
        flat = self.prepare(x).reshape(-1, self.d_in)
        values = torch.empty(flat.shape[0], self.k, device=flat.device)
        indices = torch.empty(flat.shape[0], self.k, device=flat.device, dtype=torch.long)
        # bf16 as autocast computes it (bf16 operands and product), with the encoder cast once per call
        wanted = torch.bfloat16 if effective(precision, flat.device) == "bf16" else torch.float32
        if self.enc.dtype == torch.bfloat16 and wanted != torch.bfloat16:
            raise ValueError("this SAE's encoder is stored in bf16: encode it in bf16")
        enc = self.enc.to(wanted)
        for start in range(0, flat.shape[0], chunk_tokens):
            chunk = flat[start : start + chunk_tokens] - self.pre_b
            pre = chunk.to(enc.dtype) @ enc
            top = torch.topk(pre, self.k, dim=-1)  # in pre's dtype: a float copy of it costs a third of the SAE
            values[start : start + chunk_tokens] = top.values
            indices[start : start + chunk_tokens] = top.indices
        return SparseCode(values.reshape(*lead, self.k), indices.reshape(*lead, self.k))

    def keep_for_encoding(self, precision: str) -> None:
        """Serving only encodes: free the decoder (half the SAE), and store the encoder in `precision` (bf16:
        the operand `encode` would cast it to on every call, so codes stay the same; half again)."""
        self.dec = None
        if precision == "bf16":
            self.enc = nn.Parameter(self.enc.data.to(torch.bfloat16), requires_grad=False)

    @torch.inference_mode()
    def decode(self, code: SparseCode) -> torch.Tensor:
        """Reconstruction [..., d_in] from k decoder rows per token (no dense latent)."""
        if self.dec is None:
            raise RuntimeError("this SAE was kept for encoding only: it has no decoder")
        lead = code.indices.shape[:-1]
        rows = F.embedding_bag(
            code.indices.reshape(-1, self.k),
            self.dec,
            per_sample_weights=code.values.reshape(-1, self.k).to(self.dec.dtype),
            mode="sum",
        )
        return (rows + self.pre_b).reshape(*lead, self.d_in)

    def forward(self, x: torch.Tensor) -> tuple[SparseCode, torch.Tensor]:
        code = self.encode(x)
        return code, self.decode(code)

    def check_fits(self, width: int) -> None:
        if self.d_in != width:
            where = self.origin.file if self.origin else "SAE"
            raise SAELoadError(
                f"{where}: d_in is {self.d_in} but the model's residual width is {width}"
            )


def squared_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-token squared error summed over dims [...]; its mean is the model card's MSE."""
    return (x - x_hat).pow(2).sum(-1)


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-token 1 - ||x - x_hat||^2 / ||x - mean_over_dims(x)||^2 [...]; average over tokens."""
    centred = (x - x.mean(-1, keepdim=True)).pow(2).sum(-1)
    return 1 - squared_error(x, x_hat) / centred.clamp_min(1e-12)
