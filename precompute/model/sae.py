"""The TopK sparse autoencoder of the CLIP-Scope release.

Forward pass, exactly as released (no ReLU anywhere, no encoder bias):
    pre    = (x - pre_b) @ enc                    # [T, F]
    top    = topk(pre, k)                         # kept values may be negative
    x_hat  = sum_j top.values_j * dec[top.idx_j] + pre_b

Codes stay sparse: `encode` returns k (value, index) pairs per token and
`decode` gathers k decoder rows with embedding_bag.

What an SAE object can do is fixed when it is made: a `TopKSAE` encodes and
decodes (float32, as released); an `SAEEncoder` only encodes and never holds a
decoder, with its encoder stored in float32 or bfloat16. Standardising the
input is an argument of each `encode` call, never a setting of the object.
Checkpoints are read and written by `clipscope_explorer.precompute.model.checkpoints`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from clipscope_explorer.precompute.model.precision import effective

# Tokens per encode chunk: peak extra memory is chunk x n_features x 4 bytes.
DEFAULT_CHUNK_TOKENS = 1024
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class SAELoadError(RuntimeError):
    """An SAE checkpoint is missing, malformed, or does not fit the model."""


class SparseCode(NamedTuple):
    """TopK codes of a batch of tokens.

    values:  [..., k] float, the kept pre-activations (may be <= 0: no ReLU)
    indices: [..., k] int64, the feature index of each kept value
    """

    values: torch.Tensor
    indices: torch.Tensor


class Standardisation(NamedTuple):
    """Per-dimension statistics [d_in] of one layer's residual stream; `apply` z-scores with them."""

    mean: torch.Tensor
    std: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std in float32 on x's device (std floored at 1e-6)."""
        mean = self.mean.to(x.device, torch.float32)
        return (x.float() - mean) / self.std.to(x.device, torch.float32).clamp_min(1e-6)


@dataclass(frozen=True)
class SAESource:
    """Where one layer's SAE came from, as recorded in the index."""

    source: str
    layer: int | None
    checkpoint: int | None
    file: str


def weight_dtype(precision: str) -> torch.dtype:
    if precision not in WEIGHT_DTYPES:
        raise ValueError(f"weights precision must be one of {', '.join(WEIGHT_DTYPES)}, not {precision!r}")
    return WEIGHT_DTYPES[precision]


class SAEEncoder:
    """The encoding half of a TopK SAE: pre_b [d] float32, enc [d, F] in `weights_precision`, k.

    bf16 weights are the operand `encode` would cast the encoder to on every bf16 call, so the codes are the
    same and the encoder takes half the memory; such an encoder encodes only in bf16.
    """

    def __init__(
        self,
        pre_b: torch.Tensor,
        enc: torch.Tensor,
        k: int,
        origin: SAESource | None = None,
        *,
        weights_precision: str = "fp32",
        device: torch.device | str | None = None,
    ):
        device = enc.device if device is None else torch.device(device)
        if enc.ndim != 2 or tuple(pre_b.shape) != (enc.shape[0],):
            raise ValueError(
                f"enc must be [d_in, n_features] and pre_b [d_in], not {tuple(enc.shape)} and {tuple(pre_b.shape)}"
            )
        if not 0 < int(k) <= enc.shape[1]:
            raise ValueError(f"k={k} is not in 1..{enc.shape[1]}")
        self.pre_b = pre_b.detach().to(device, torch.float32)
        self.enc = enc.detach().to(device, weight_dtype(weights_precision))
        self.k = int(k)
        self.origin = origin

    @property
    def d_in(self) -> int:
        return self.enc.shape[0]

    @property
    def n_features(self) -> int:
        return self.enc.shape[1]

    @property
    def device(self) -> torch.device:
        return self.enc.device

    @property
    def weights_precision(self) -> str:
        return "bf16" if self.enc.dtype == torch.bfloat16 else "fp32"

    @torch.inference_mode()
    def encode(
        self,
        x: torch.Tensor,
        *,
        normalisation: Standardisation | None = None,
        precision: str | None = None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> SparseCode:
        """Sparse codes of raw x [..., d_in] -> SparseCode([..., k], [..., k]).

        normalisation: standardise x first (the SAE then reads `normalisation.apply(x)`, which is what
        `decode` reconstructs); None encodes x as it is, as the released package does.
        precision: `fp32` or `bf16` (None: bf16 on CUDA, fp32 on CPU).
        Tokens are encoded in chunks, so the dense pre-activations never exceed
        chunk_tokens x n_features floats (256 MiB at the defaults, full size).
        """
        lead = x.shape[:-1]
        x = x.to(self.device, torch.float32)
        if normalisation is not None:
            x = normalisation.apply(x)
        flat = x.reshape(-1, self.d_in)
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

    def check_fits(self, width: int) -> None:
        if self.d_in != width:
            where = self.origin.file if self.origin else "SAE"
            raise SAELoadError(f"{where}: d_in is {self.d_in} but the model's residual width is {width}")


class TopKSAE(SAEEncoder):
    """The whole SAE as released, in float32: an `SAEEncoder` plus the decoder dec [F, d]."""

    def __init__(
        self,
        pre_b: torch.Tensor,
        enc: torch.Tensor,
        dec: torch.Tensor,
        k: int,
        origin: SAESource | None = None,
        *,
        device: torch.device | str | None = None,
    ):
        super().__init__(pre_b, enc, k, origin, device=device)
        if tuple(dec.shape) != (self.n_features, self.d_in):
            raise ValueError(f"dec must be [n_features, d_in] = {(self.n_features, self.d_in)}, not {tuple(dec.shape)}")
        self.dec = dec.detach().to(self.device, torch.float32)

    @torch.inference_mode()
    def decode(self, code: SparseCode) -> torch.Tensor:
        """Reconstruction [..., d_in] of the input the SAE read, from k decoder rows per token (no dense latent)."""
        lead = code.indices.shape[:-1]
        rows = F.embedding_bag(
            code.indices.reshape(-1, self.k),
            self.dec,
            per_sample_weights=code.values.reshape(-1, self.k).to(self.dec.dtype),
            mode="sum",
        )
        return (rows + self.pre_b).reshape(*lead, self.d_in)


def squared_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-token squared error summed over dims [...]; its mean is the model card's MSE."""
    return (x - x_hat).pow(2).sum(-1)


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-token 1 - ||x - x_hat||^2 / ||x - mean_over_dims(x)||^2 [...]; average over tokens."""
    centred = (x - x.mean(-1, keepdim=True)).pow(2).sum(-1)
    return 1 - squared_error(x, x_hat) / centred.clamp_min(1e-12)
