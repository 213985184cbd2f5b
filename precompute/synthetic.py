"""Small open_clip models saved in the hub layout, for the offline demo and tests.

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


def tiny_clip_config(width: int = 64, layers: int = 4, heads: int = 4, image_size: int = 224,
                     patch_size: int = 14) -> dict:
    """An open_clip model config with a small vision tower (257 tokens at the defaults)."""
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width,
                       "patch_size": patch_size, "head_width": width // heads},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def save_tiny_clip(folder: str | Path, model_cfg: dict | None = None, seed: int = 0,
                   state_dict: dict | None = None) -> Path:
    """Save a CLIP model in the hub layout; random weights from `seed` unless given."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = model_cfg or tiny_clip_config()
    if state_dict is None:
        torch.manual_seed(seed)
        state_dict = open_clip.model.CLIP(**model_cfg).state_dict()
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.save(state_dict, folder / "open_clip_pytorch_model.bin")
    return folder
