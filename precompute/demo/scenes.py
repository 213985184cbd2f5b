"""Small open_clip models saved in the hub layout, and the offline demo's procedural images.

`save_tiny_clip` writes ``open_clip_config.json`` and
``open_clip_pytorch_model.bin`` exactly as a hub repo holds them, so the model
is loaded back through open_clip's real ``local-dir:`` path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_clip_config(
    width: int = 64,
    layers: int = 4,
    heads: int = 4,
    image_size: int = 224,
    patch_size: int = 14,
    pool_type: str = "tok",
    text_width: int = 32,
    text_heads: int = 2,
    context_length: int = 77,
) -> dict:
    """An open_clip model config with a small vision tower (257 tokens at the defaults) and a
    one-block text tower over open_clip's own vocabulary (its default tokenizer)."""
    return {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "patch_size": patch_size,
            "head_width": width // heads,
            "pool_type": pool_type,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": text_width,
            "heads": text_heads,
            "layers": 1,
        },
    }


def save_tiny_clip(
    folder: str | Path,
    model_cfg: dict | None = None,
    seed: int = 0,
    state_dict: dict | None = None,
    position_scale: float = 1.0,
) -> Path:
    """Save a CLIP model in the hub layout: the given weights (a trained model's state dict), or
    random ones from `seed`.

    position_scale scales the vision tower's random positional embedding (the demo
    weakens it so that content, not position, dominates the residual stream).
    """
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = model_cfg or tiny_clip_config()
    if state_dict is None:
        torch.manual_seed(seed)
        state_dict = open_clip.model.CLIP(**model_cfg).state_dict()
        state_dict["visual.positional_embedding"] *= position_scale
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "mean": list(OPENAI_MEAN),
            "std": list(OPENAI_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.save(state_dict, folder / "open_clip_pytorch_model.bin")
    return folder


# ---------------------------------------------------------------- the demo's procedural images

OBJECT_COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 70),
    "blue": (45, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 135, 30),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross")
BACKGROUNDS = ("plain", "striped", "checkered", "noisy")
PATCH_COVERAGE = 0.05
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "ring": "rings", "cross": "crosses"}


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    w = x1 - x0
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + w / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(3, w // 5))
    elif shape == "cross":
        t = max(3, w // 4)
        draw.rectangle((x0, y0 + w / 2 - t / 2, x1, y0 + w / 2 + t / 2), fill=fill)
        draw.rectangle((x0 + w / 2 - t / 2, y0, x0 + w / 2 + t / 2, y1), fill=fill)


def _background(rng, size: int, kind: str):
    import numpy as np
    from PIL import Image

    base = np.array([rng.randrange(40, 110)] * 3, dtype=np.float32) + np.array(
        [rng.randrange(-15, 15) for _ in range(3)]
    )
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.broadcast_to(base, (size, size, 3)).copy()
    if kind == "striped":
        period = rng.randrange(8, 20)
        pixels += ((xx + yy * (rng.random() < 0.5)) // period % 2)[..., None] * 22
    elif kind == "checkered":
        period = rng.randrange(10, 28)
        pixels += ((xx // period + yy // period) % 2)[..., None] * 22
    elif kind == "noisy":
        pixels += np.random.default_rng(rng.randrange(1 << 30)).normal(0, 18, (size, size, 1))
    return Image.fromarray(pixels.clip(0, 255).astype("uint8"))


def render_scene(seed: int, size: int = 224, grid: int = 16) -> tuple:
    """One procedural image: (PIL image, caption, ground truth).

    Ground truth: {"background", "objects": [{"shape", "colour", "box", "patches"}]}, where
    `patches` lists the row-major patch indices (of a grid x grid patching) that the visible
    part of the object covers by at least PATCH_COVERAGE of the patch's area.
    """
    import random

    import numpy as np
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    background = rng.choice(BACKGROUNDS)
    image = _background(rng, size, background)
    draw = ImageDraw.Draw(image)
    owner = Image.new("L", (size, size), 0)
    owner_draw = ImageDraw.Draw(owner)
    colour, shape = rng.choice(list(OBJECT_COLOURS)), rng.choice(SHAPES)
    count = rng.choice((1, 1, 2, 3))
    objects = []
    for n in range(count):
        if n and rng.random() < 0.5:
            colour, shape = rng.choice(list(OBJECT_COLOURS)), rng.choice(SHAPES)
        side = rng.randrange(size // 4, size // 2)
        x0, y0 = rng.randrange(0, size - side), rng.randrange(0, size - side)
        box = (x0, y0, x0 + side, y0 + side)
        _draw_shape(draw, shape, box, OBJECT_COLOURS[colour])
        _draw_shape(owner_draw, shape, box, n + 1)
        objects.append({"shape": shape, "colour": colour, "box": box})
    owners = np.asarray(owner)
    patch = size // grid
    for n, obj in enumerate(objects):
        mine = (owners[: grid * patch, : grid * patch] == n + 1).reshape(grid, patch, grid, patch).mean((1, 3))
        obj["patches"] = [int(i) for i in np.nonzero(mine.reshape(-1) >= PATCH_COVERAGE)[0]]
    caption = _caption(objects, background)
    return image, caption, {"background": background, "objects": objects}


def _caption(objects: list[dict], background: str) -> str:
    groups: dict[tuple[str, str], int] = {}
    for obj in objects:
        groups[(obj["colour"], obj["shape"])] = groups.get((obj["colour"], obj["shape"]), 0) + 1
    parts = [f"{COUNT_WORDS[n]} {colour} {PLURALS[shape] if n > 1 else shape}" for (colour, shape), n in groups.items()]
    things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    scene = {"plain": "a plain", "striped": "a striped", "checkered": "a checkered", "noisy": "a noisy"}[background]
    return f"{things} on {scene} backdrop"


def write_scenes(folder: str | Path, n_images: int, seed: int = 0) -> Path:
    """The demo dataset as an image folder: NNNNN.jpg, NNNNN.txt (caption), NNNNN.json (ground truth)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        stem = folder / f"{i:05d}"
        if stem.with_suffix(".json").exists():
            continue
        image, caption, truth = render_scene(seed * 1_000_003 + i)
        image.save(stem.with_suffix(".jpg"), "JPEG", quality=92)
        stem.with_suffix(".txt").write_text(caption)
        stem.with_suffix(".json").write_text(json.dumps(truth))  # written last: marks the scene complete
    return folder
