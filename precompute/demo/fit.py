"""A small TopK SAE trainer that writes checkpoints in the released format.

Same model as the release (sae.py): pre = (x - pre_b) @ enc, topk, no ReLU,
x_hat = sum of k decoder rows + pre_b. Same loss: mean over tokens of
||x - x_hat||^2 / ||x||. Adam; the decoder starts as the encoder's transpose.
Meant for the offline demo and small custom SAEs, not for the full suite.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from clipscope_explorer.precompute.model.checkpoints import save_checkpoint


@dataclass(frozen=True)
class FitSettings:
    n_features: int = 512
    k: int = 8
    steps: int = 1500
    batch_tokens: int = 4096
    lr: float = 1e-3
    seed: int = 0
    dead_after_tokens: int = 1_000_000
    checkpoints: int = 1  # checkpoints written, evenly spaced over the steps; the last is the final SAE


def release_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """mean(||x - x_hat||^2 / ||x||), the release's training loss."""
    return ((x - x_hat).pow(2).sum(-1) / x.norm(dim=-1).clamp_min(1e-6)).mean()


def fit_topk_sae(tokens_nd: torch.Tensor, settings: FitSettings, progress: bool = True) -> dict:
    """Train on activations [N, d]; returns pre_b, enc, dec, dead_latents and tokens seen."""
    generator = torch.Generator().manual_seed(settings.seed)
    d = tokens_nd.shape[1]
    enc = torch.randn(d, settings.n_features, generator=generator) / d**0.5
    dec = enc.T.clone().contiguous()
    pre_b = tokens_nd.mean(0).clone()
    params = [p.requires_grad_() for p in (pre_b, enc, dec)]
    optimiser = torch.optim.Adam(params, lr=settings.lr)
    since_fired = torch.zeros(settings.n_features, dtype=torch.long)
    seen = 0
    at = {settings.steps * (i + 1) // max(settings.checkpoints, 1) for i in range(max(settings.checkpoints, 1) - 1)}
    earlier = []
    bar = tqdm(range(settings.steps), desc="fit SAE", unit="step", disable=not progress)
    for step in bar:
        batch = tokens_nd[torch.randint(0, tokens_nd.shape[0], (settings.batch_tokens,), generator=generator)]
        top = torch.topk((batch - pre_b) @ enc, settings.k, dim=-1)
        x_hat = torch.einsum("tk,tkd->td", top.values, dec[top.indices]) + pre_b
        loss = release_loss(batch, x_hat)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        seen += batch.shape[0]
        fired = torch.zeros(settings.n_features, dtype=torch.bool)
        fired[top.indices[top.values > 0]] = True
        since_fired = torch.where(fired, 0, since_fired + batch.shape[0])
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step + 1 in at:
            earlier.append({"pre_b": pre_b.detach().clone(), "enc": enc.detach().clone(), "dec": dec.detach().clone()})
            earlier[-1].update(tokens=seen, steps=step + 1)
    return {
        "pre_b": pre_b.detach(),
        "enc": enc.detach(),
        "dec": dec.detach(),
        "tokens": seen,
        "dead_latents": (since_fired >= settings.dead_after_tokens).float(),
        "steps": settings.steps,
        "earlier": earlier,  # the earlier checkpoints: pre_b, enc, dec, tokens, steps
    }


def save_fitted(result: dict, folder: str | Path, layer: int, k: int) -> Path:
    """Write `{folder}/{layer}_resid/{tokens}.pt` in the released dict layout, for the final SAE and each
    earlier checkpoint; the final one's path."""
    for snapshot in result.get("earlier", []):
        where = Path(folder) / f"{layer}_resid" / f"{snapshot['tokens']}.pt"
        save_checkpoint(
            where, snapshot["pre_b"], snapshot["enc"], snapshot["dec"], k, snapshot["tokens"], snapshot["steps"]
        )
    path = Path(folder) / f"{layer}_resid" / f"{result['tokens']}.pt"
    return save_checkpoint(
        path,
        result["pre_b"],
        result["enc"],
        result["dec"],
        k,
        result["tokens"],
        n_iter=result["steps"],
        dead_latents=result["dead_latents"],
    )


@torch.inference_mode()
def collect_tokens(
    tower, shards, layers: list[int], max_images: int, batch_size: int = 64, progress: bool = True
) -> dict[int, torch.Tensor]:
    """Residual-stream tokens [N, d] per layer from the first `max_images` images of the shards."""
    from clipscope_explorer.precompute.shard_reader import known_size
    from clipscope_explorer.precompute.sources import ShardBatches

    quota, left = {}, max_images
    for shard in shards:
        quota[shard.index] = max(0, min(left, known_size(shard) or left))
        left -= quota[shard.index]
    dataset = ShardBatches(shards, tower.preprocess, batch_size, thumb_size=16, quota=quota)
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with tqdm(total=max_images, desc="collect activations", unit="img", disable=not progress) as bar:
        for batch in dataset:
            if batch.pixels is None:
                continue
            for layer, acts in tower.capture(batch.pixels, layers).items():
                parts[layer].append(acts.flatten(0, 1).cpu())
            bar.update(batch.pixels.shape[0])
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}
