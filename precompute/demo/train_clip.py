"""Contrastive training of the demo's tiny CLIP on its own procedural images and captions.

The model is open_clip's own `CLIP` class, trained with open_clip's `ClipLoss` and tokenised
by the tokenizer that `open_clip.get_tokenizer` picks for the saved config, so a text query
reaches the same embedding space when the saved model is loaded back through `local-dir:`.

The vision tower's first blocks keep their random initialisation (DEMO_FROZEN_BLOCKS); the
block after them, the pooling and projection, and the whole text tower are trained. The frozen
blocks run once per image before training, so a step costs only the trained block.

Every batch holds one image for each colour + shape pair, preferably an image that shows only
that pair, and each image is paired with four texts: its caption ("two red circles on a striped
backdrop"), its pair ("a photo of a red circle"), its colour ("a photo of red") and its shape
("a photo of circles"). The pair texts of a batch are all different, and every colour comes with
several shapes, so colour alone never tells them apart: the image tower has to see shape. CPU
only, a fixed thread count and seed: the same images give the same weights.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from clipscope_explorer.precompute.demo.scenes import OPENAI_MEAN, OPENAI_STD, PLURALS, save_tiny_clip, tiny_clip_config

PROMPTS = ("a photo of {}", "{}", "an image of {}")
# Vision tower: 257 tokens of width 96 in 5 blocks, the class token pooled. Text: one block over
# 32 tokens, room for every caption and query the demo makes.
DEMO_MODEL = dict(width=96, layers=5, heads=4, pool_type="tok", text_width=64, text_heads=4, context_length=32)
# Blocks 0-3 keep their random weights and only block 4 is trained: the SAE layers (1 and 3) of
# a trained tower carry the image's content in every token, so their features stop localising.
DEMO_FROZEN_BLOCKS = 4
# The loss of each group of batch_texts: captions, pairs, colours, shapes. The colour and shape
# texts recur within a batch, which pulls each toward the mean of its images (measured: precision
# 0.949 -> 0.969 at seed 0, 0.963 -> 0.991 at seed 1).
TEXT_WEIGHTS = (0.5, 0.5, 0.25, 0.25)
# Random positional embeddings of full size make most SAE features positional; weaker ones
# leave the residual stream to the image content.
DEMO_POSITION_SCALE = 0.1


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1200
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    patch_dropout: float = 0.75  # training only: each step sees a quarter of the patches
    frozen_blocks: int = DEMO_FROZEN_BLOCKS
    max_images: int = 2000
    seed: int = 0
    threads: int = 2


def demo_clip_config() -> dict:
    return tiny_clip_config(**DEMO_MODEL)


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_scenes(folder: str | Path, n_images: int) -> tuple[torch.Tensor, list[str], list[dict]]:
    """The first `n_images` scenes of a `write_scenes` folder: uint8 pixels [N, 3, H, W], captions, truths."""
    import numpy as np
    from PIL import Image

    stems = [Path(folder) / f"{i:05d}" for i in range(n_images)]
    pixels = np.stack([np.asarray(Image.open(s.with_suffix(".jpg")).convert("RGB")) for s in stems])
    captions = [s.with_suffix(".txt").read_text() for s in stems]
    truths = [json.loads(s.with_suffix(".json").read_text()) for s in stems]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), captions, truths


def normalise(pixels_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] at the model's size -> its input, as open_clip's preprocessing makes it."""
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (pixels_u8.float() / 255 - mean) / std


def object_phrase(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def batch_texts(batch: list[tuple[int, tuple[str, str]]], captions: list[str], rng: random.Random) -> list[str]:
    """Four texts per image of the batch, in four groups of len(batch): its caption, its pair
    ("a red circle"), its colour alone and its shape alone, each in one of PROMPTS."""
    prompts = [rng.choice(PROMPTS) for _ in batch]
    shapes = [rng.choice((shape, PLURALS[shape])) for _, (_, shape) in batch]
    return (
        [prompt.format(captions[i]) for prompt, (i, _) in zip(prompts, batch)]
        + [prompt.format(object_phrase(*pair)) for prompt, (_, pair) in zip(prompts, batch)]
        + [prompt.format(colour) for prompt, (_, (colour, _)) in zip(prompts, batch)]
        + [prompt.format(shape) for prompt, shape in zip(prompts, shapes)]
    )


def balanced_batches(truths: list[dict], rng: random.Random) -> Iterator[list[tuple[int, tuple[str, str]]]]:
    """Endless batches of (image, (colour, shape)): one image for each pair the scenes show.

    An image that shows other pairs as well would be a wrong negative for their short texts in
    the same batch, so a pair is drawn from the images that show only it, if there are any.
    """
    only, any_ = {}, {}
    for i, truth in enumerate(truths):
        pairs = {(o["colour"], o["shape"]) for o in truth["objects"]}
        for pair in pairs:
            any_.setdefault(pair, []).append(i)
            if len(pairs) == 1:
                only.setdefault(pair, []).append(i)
    holders = {pair: only.get(pair, images) for pair, images in sorted(any_.items())}
    queues: dict[tuple[str, str], list[int]] = {pair: [] for pair in holders}
    while True:
        batch = []
        for pair, queue in queues.items():
            if not queue:
                queue.extend(rng.sample(holders[pair], len(holders[pair])))
            batch.append((queue.pop(), pair))
        yield batch


def init_patch_embedding(model, pixels_u8: torch.Tensor) -> None:
    """Start the patch embedding as the whitened principal components of the images' patches:
    edge and colour detectors (a random projection leaves shape to be found slowly)."""
    conv = model.visual.conv1
    size = conv.kernel_size[0]
    patches = torch.nn.functional.unfold(normalise(pixels_u8), size, stride=size).transpose(1, 2).flatten(0, 1)
    patches = patches - patches.mean(0)
    variances, components = torch.linalg.eigh(patches.T @ patches / patches.shape[0])
    width = conv.weight.shape[0]
    top = components[:, -width:].flip(1) * variances[-width:].flip(0).clamp_min(1e-6).rsqrt()
    with torch.no_grad():
        conv.weight.copy_(0.5 * top.T.reshape(conv.weight.shape))


def freeze_early_blocks(visual, n_blocks: int) -> None:
    for module in (visual.conv1, visual.ln_pre, *visual.transformer.resblocks[:n_blocks]):
        module.requires_grad_(False)
    visual.class_embedding.requires_grad_(False)
    visual.positional_embedding.requires_grad_(False)


def _run_blocks(transformer, x: torch.Tensor, blocks) -> torch.Tensor:
    x = x if transformer.batch_first else x.transpose(0, 1)
    for block in blocks:
        x = block(x)
    return x if transformer.batch_first else x.transpose(0, 1)


@torch.no_grad()
def frozen_tokens(visual, pixels_u8: torch.Tensor, n_blocks: int, batch: int = 100) -> torch.Tensor:
    """Every image's residual stream after the first `n_blocks` blocks [N, tokens, width], all tokens kept."""
    was_training = visual.training
    visual.eval()
    blocks = visual.transformer.resblocks[:n_blocks]
    parts = [
        _run_blocks(visual.transformer, visual._embeds(normalise(pixels_u8[i : i + batch])), blocks)
        for i in range(0, len(pixels_u8), batch)
    ]
    visual.train(was_training)
    return torch.cat(parts)


def encode_frozen(visual, tokens: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """The rest of open_clip's `VisionTransformer.forward` after `frozen_tokens`: the later blocks,
    pooling and projection, L2-normalised as `encode_image(normalize=True)` gives them. In training,
    open_clip's patch dropout comes first, so only the trained blocks see fewer patches."""
    x = _run_blocks(visual.transformer, visual.patch_dropout(tokens), visual.transformer.resblocks[n_blocks:])
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return torch.nn.functional.normalize(pooled, dim=-1)


def _lr_at(step: int, total: int, settings: TrainSettings) -> float:
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, total - settings.warmup_steps)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_clip(
    model_cfg: dict,
    pixels_u8: torch.Tensor,
    captions: list[str],
    truths: list[dict],
    settings: TrainSettings = TrainSettings(),
    position_scale: float = DEMO_POSITION_SCALE,
    progress: bool = True,
):
    """Train `open_clip.model.CLIP(**model_cfg)` on the scenes; returns the model in eval mode."""
    import open_clip

    with _threads(settings.threads):
        torch.manual_seed(settings.seed)
        vision_cfg = {**model_cfg["vision_cfg"], "patch_dropout": settings.patch_dropout}
        model = open_clip.model.CLIP(**{**model_cfg, "vision_cfg": vision_cfg})
        visual, frozen = model.visual, settings.frozen_blocks
        with torch.no_grad():
            visual.positional_embedding.mul_(position_scale)
        init_patch_embedding(model, pixels_u8[:200])
        freeze_early_blocks(visual, frozen)
        tokens = frozen_tokens(visual, pixels_u8, frozen)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
        loss_fn = open_clip.loss.ClipLoss()
        trained = [p for p in model.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=settings.weight_decay)
        rng = random.Random(settings.seed)
        batches = balanced_batches(truths, rng)
        model.train()
        weights = torch.tensor(TEXT_WEIGHTS)
        bar = tqdm(range(settings.steps), desc="train CLIP", unit="step", disable=not progress)
        for step in bar:
            batch = next(batches)
            for group in optimiser.param_groups:
                group["lr"] = _lr_at(step, settings.steps, settings)
            image = encode_frozen(visual, tokens[[i for i, _ in batch]], frozen)
            texts = model.encode_text(tokenizer(batch_texts(batch, captions, rng)), normalize=True)
            scale = model.logit_scale.exp()
            losses = torch.stack([loss_fn(image, group, scale) for group in texts.split(len(batch))])
            loss = (weights * losses).sum()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def train_demo_clip(
    folder: str | Path,
    images: str | Path,
    n_images: int,
    settings: TrainSettings = TrainSettings(),
    progress: bool = True,
) -> Path:
    """Train the demo model on the first scenes of `images` and save it in the hub layout under `folder`."""
    config = demo_clip_config()
    pixels, captions, truths = load_scenes(images, min(n_images, settings.max_images))
    model = train_clip(config, pixels, captions, truths, settings, progress=progress)
    return save_tiny_clip(folder, config, state_dict=model.state_dict())
