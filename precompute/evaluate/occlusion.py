"""Occlusion, the geometry and arithmetic of the faithfulness check: which patches a heatmap calls hot, the
model inputs with patches occluded, and the scores.

Occlusion fills a patch with the image's mean colour, on the model's own input (the preprocessed tensor:
its normalisation is affine per channel, so that is the same as filling the resized, cropped image with its
mean colour before normalising). The mean colour removes what the patch shows while staying a colour of
this image; a blur was not chosen, because it keeps the patch's low frequencies (colour, coarse shape), which
are exactly what many features of a ViT read, and its effect depends on a kernel size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def hot_patches(heatmap: np.ndarray, mass: float) -> np.ndarray:
    """The fewest patches, hottest first (ties: lower index), whose values hold at least `mass` (0-1] of the
    heatmap's total; none when the heatmap is all zero."""
    values = np.asarray(heatmap, np.float64).ravel()
    total = values.sum()
    if total <= 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((np.arange(len(values)), -values))
    held = np.cumsum(values[order])
    count = int(np.searchsorted(held, mass * total * (1 - 1e-12)) + 1)
    return np.sort(order[: min(count, len(values))])


def random_patches(rng: np.random.Generator, n_patches: int, count: int, draws: int) -> np.ndarray:
    """`draws` sets of `count` distinct patches drawn uniformly from all `n_patches`: [draws, count]."""
    return np.stack([np.sort(rng.choice(n_patches, size=count, replace=False)) for _ in range(draws)])


def patch_mask(patches: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """A [H, W] boolean mask of the pixels the patches (row-major over `grid`) cover in an input of `size`."""
    grid_h, grid_w = grid
    height, width = size
    cell_h, cell_w = height // grid_h, width // grid_w
    mask = torch.zeros(height, width, dtype=torch.bool)
    for patch in np.asarray(patches).tolist():
        row, column = divmod(int(patch), grid_w)
        mask[row * cell_h : (row + 1) * cell_h, column * cell_w : (column + 1) * cell_w] = True
    return mask


def occluded(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A copy of one preprocessed image [3, H, W] with the masked pixels set to its mean colour."""
    mean = pixels.mean(dim=(1, 2), keepdim=True)
    return torch.where(mask.to(pixels.device), mean, pixels)


@dataclass(frozen=True)
class ExampleResult:
    """A feature's activation (max over tokens) on one image: as it is, with its hot patches occluded, with
    as many random patches occluded (the mean over the draws), and with only the hot patches kept."""

    before: float
    hot: float
    random: float
    insertion: float
    n_hot: int

    @property
    def hot_drop(self) -> float:
        return _drop(self.before, self.hot)

    @property
    def random_drop(self) -> float:
        return _drop(self.before, self.random)

    @property
    def kept(self) -> float:
        """The share of the activation that the hot patches alone keep."""
        return self.insertion / self.before if self.before > 0 else 0.0


def _drop(before: float, after: float) -> float:
    """The relative drop of the activation (1: gone; 0: unchanged; negative: it rose)."""
    return (before - after) / before if before > 0 else 0.0


@dataclass(frozen=True)
class FeatureFaithfulness:
    examples: int
    hot_drop: float  # mean over the examples
    random_drop: float
    kept: float
    score: float  # hot_drop - random_drop: the feature's faithfulness


def summarise(results: list[ExampleResult]) -> FeatureFaithfulness | None:
    """The feature's faithfulness over its evaluated examples (those it fires on: before > 0)."""
    fired = [r for r in results if r.before > 0]
    if not fired:
        return None
    hot = float(np.mean([r.hot_drop for r in fired]))
    random = float(np.mean([r.random_drop for r in fired]))
    return FeatureFaithfulness(len(fired), hot, random, float(np.mean([r.kept for r in fired])), hot - random)
