"""The model and SAEs alone, loaded as the precompute job loads them (`job.prepare`): their throughput
without the job around them, and how far their codes move between precisions and devices."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
from _gpu_inputs import LAYER


def components_for(config, **changes):
    from clipscope_explorer.precompute.job import prepare

    return prepare(replace(config, **changes))


def first_pixels(components, count: int) -> torch.Tensor:
    """`count` preprocessed images from the first shard, repeated when it holds fewer."""
    from clipscope_explorer.precompute.sources import ShardBatches

    batches = ShardBatches(components.shards[:1], components.tower.preprocess, count, 32)
    pixels = torch.cat([b.pixels for b in batches if b.pixels is not None])
    return pixels.repeat(math.ceil(count / len(pixels)), 1, 1, 1)[:count]


def bare_images_s(components, pixels: torch.Tensor, seconds: float) -> float:
    """Images/s of the model and SAEs alone (capture, encode, decode) on pixels already on the device."""
    from clipscope_explorer.precompute.model.encode import encode_pixels

    def step():
        encoded = encode_pixels(components.tower, components.saes, pixels, components.precision)
        for layer, sae in components.saes.items():
            sae.decode(encoded[layer].code)
        if pixels.device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up
        step()
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps * len(pixels) / (time.perf_counter() - start)


def agreement(code: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Codes (values, indices) [N, T, k] against a reference: the share of tokens whose k kept indices are the
    same set, and per token the largest difference between the two sorted top-k value lists relative to the
    reference's largest |value| (max and median over tokens)."""
    same = (code[1].sort(-1).values == reference[1].sort(-1).values).all(-1)
    mine, theirs = (values.sort(-1, descending=True).values for values in (code[0], reference[0]))
    relative = (mine - theirs).abs().amax(-1) / theirs.abs().amax(-1).clamp_min(1e-12)
    return {
        "same_sets": round(float(same.float().mean()), 4),
        "max_rel_diff": float(relative.max()),
        "median_rel_diff": float(relative.median()),
    }


def layer_codes(components, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) at LAYER of the first `count` images, on the CPU, as the job's `encode_pixels` gives them."""
    from clipscope_explorer.precompute.model.encode import encode_pixels

    parts = [
        encode_pixels(components.tower, components.saes, part, components.precision)[LAYER].code
        for part in first_pixels(components, count).split(16)
    ]
    return torch.cat([p.values.float().cpu() for p in parts]), torch.cat([p.indices.cpu() for p in parts])


def fidelity(config, run_on: str, images: int, loaded=None) -> dict:
    """Codes of the first `images` images at LAYER in bf16 and fp32 on `run_on` and in fp32 on the CPU, compared
    (`loaded`: job components already loaded, used again where their device and precision fit)."""
    have = {} if loaded is None else {(loaded.device.type, loaded.precision): loaded}

    def codes(device: str, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        if (device, precision) not in have:
            have[device, precision] = components_for(config, device=device, precision=precision)
        return layer_codes(have[device, precision], images)

    bf16, fp32, cpu = codes(run_on, "bf16"), codes(run_on, "fp32"), codes("cpu", "fp32")
    return {
        "images": images,
        "bf16_vs_fp32": agreement(bf16, fp32),
        "fp32_vs_cpu_fp32": agreement(fp32, cpu),
        "bf16_vs_cpu_fp32": agreement(bf16, cpu),
    }
