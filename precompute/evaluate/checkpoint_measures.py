"""What `clipscope-explorer checkpoints` measures of one SAE checkpoint: its reconstruction totals over a sample
(the `checkpoints` row, derived by the same code as the `layers` row) and the best decoder match of each
feature of the index's SAE among its features (`checkpoint_matches`).

The totals keep only what that row needs (a few [F] and [T] sums), not the example lists of the precompute
job's accumulator, so a checkpoint costs one forward pass of its SAE and no more memory than its weights.
The matching compares unit decoder rows in blocks, so 65,536 x 65,536 cosines never exist at once.
"""

from __future__ import annotations

import numpy as np
import torch

from clipscope_explorer.precompute.index.rows import LayerTotals, layer_row
from clipscope_explorer.precompute.model.sae import SparseCode

ROW_COLUMNS = ("mse", "explained_variance", "mse_raw", "explained_variance_raw", "l0", "dead_fraction")
MATCH_BLOCK = (4096, 8192)  # reference rows x other rows per block: 128 MiB of float32 cosines


class CheckpointTotals:
    """Reconstruction sums of one checkpoint over a sample, batch by batch (as `LayerAccumulator` sums them)."""

    def __init__(self, n_features: int, n_tokens: int, device, track_raw: bool):
        self.n_images = self.n_tokens_seen = self.fired = self.nonpositive = 0
        self.n_tokens = n_tokens
        self.device = torch.device(device)
        self.sq_error_by_position = torch.zeros(n_tokens, dtype=torch.float64, device=self.device)
        self.explained = torch.zeros((), dtype=torch.float64, device=self.device)
        self.raw = torch.zeros(2, dtype=torch.float64, device=self.device) if track_raw else None
        self.fire_tokens = torch.zeros(n_features, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def update(
        self,
        code: SparseCode,
        sq_error: torch.Tensor,
        explained: torch.Tensor,
        raw: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """One batch: code [B, T, k], per-token squared error and explained variance [B, T] (and the same two
        on raw input for a normalised index)."""
        values, indices = code.values.to(self.device), code.indices.to(self.device)
        batch, tokens, _ = values.shape
        fires = values > 0
        self.n_images += batch
        self.n_tokens_seen += batch * tokens
        self.fired += int(fires.sum())
        self.nonpositive += int((~fires).sum())
        self.sq_error_by_position += sq_error.to(self.device, torch.float64).sum(0)
        self.explained += explained.to(self.device, torch.float64).sum()
        if self.raw is not None and raw is not None:
            self.raw[0] += raw[0].to(self.device, torch.float64).sum()
            self.raw[1] += raw[1].to(self.device, torch.float64).sum()
        self.fire_tokens += torch.bincount(indices[fires], minlength=len(self.fire_tokens))

    def row(self, layer: int, tokens: int, d_in: int, k: int) -> dict:
        """The `checkpoints` row: `layer_row`'s metrics of these totals (the same derivation as the layer table)."""
        n_features = len(self.fire_tokens)
        unused = np.zeros(0)  # what layer_row does not read (per-feature activations, histograms)
        totals = LayerTotals(
            n_images=self.n_images,
            n_tokens=self.n_tokens_seen,
            fired=self.fired,
            nonpositive_kept=self.nonpositive,
            sq_error_by_position=self.sq_error_by_position.cpu().numpy(),
            explained_variance=float(self.explained),
            fire_tokens=self.fire_tokens.cpu().numpy(),
            fire_images=np.zeros(n_features),
            fire_cls=np.zeros(n_features),
            activation_sum=unused,
            max_activation=unused,
            position_sum=unused,
            histogram=unused,
            edges=unused,
            sq_error_raw=None if self.raw is None else float(self.raw[0]),
            explained_variance_raw=None if self.raw is None else float(self.raw[1]),
        )
        full = layer_row(layer, totals, d_in=d_in, k=k, sae_file=None, checkpoint=tokens)
        return {
            "layer": layer,
            "tokens": int(tokens),
            **{name: full[name] for name in ROW_COLUMNS},
            "mse_by_position": full["mse_by_position"],
            "n_images": self.n_images,
        }


def unit_rows(dec: torch.Tensor) -> torch.Tensor:
    """Decoder rows [F, d] scaled to unit length, float32 (a zero row stays zero: its cosines are 0)."""
    return torch.nn.functional.normalize(dec.float(), dim=1, eps=1e-12)


@torch.inference_mode()
def best_matches(
    reference: torch.Tensor, other: torch.Tensor, block: tuple[int, int] = MATCH_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """For each unit row of `reference` [F, d], the index of the most similar unit row of `other` [G, d]
    (the lowest index among equals) and their cosine: (match int32 [F], cosine float32 [F]).

    Computed on `reference`'s device in blocks of block[0] x block[1] cosines."""
    rows, columns = block
    other = other.to(reference.device, torch.float32)
    match = torch.empty(len(reference), dtype=torch.long, device=reference.device)
    cosine = torch.empty(len(reference), dtype=torch.float32, device=reference.device)
    for start in range(0, len(reference), rows):
        chunk = reference[start : start + rows]
        best = torch.full((len(chunk),), float("-inf"), device=reference.device)
        where = torch.zeros(len(chunk), dtype=torch.long, device=reference.device)
        for first in range(0, len(other), columns):
            values, found = (chunk @ other[first : first + columns].T).max(dim=1)
            better = values > best
            best = torch.where(better, values, best)
            where = torch.where(better, found + first, where)
        match[start : start + rows], cosine[start : start + rows] = where, best
    return match.to(torch.int32).cpu().numpy(), cosine.cpu().numpy()
