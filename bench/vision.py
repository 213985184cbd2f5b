"""Benchmark: residual-stream capture of the ViT-L-14 vision tower (CPU fp32).

Random weights (same architecture and FLOPs as the real model), batch 4 of
random 224x224 pixels, capturing layer 20 (the released SAE layer that is
deepest but one). Two comparisons, each measured in the same run, interleaved,
median of REPEATS after one warm-up:

(a) `tower.capture(pixels, [20])` against a full forward of all 24 blocks
    (`visual._embeds` then every resblock): stopping after block 20 should
    save about 3/24 of the work.  Target ratio <= 0.92.
(b) capture overhead: `tower.capture(pixels, [20])` against a plain forward
    through the same 21 blocks with no capture bookkeeping.  Target <= 1.03.

Run from the repo root: python bench/vision.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _timing (which adds the repo root)

import torch  # noqa: E402
from _timing import interleaved_medians, paired_ratio, print_results, result_line  # noqa: E402

from clipscope_explorer.precompute.model.vision import load_tower  # noqa: E402

BATCH, LAYER = 4, 20
REPEATS = 7
TARGETS = {"vision_capture_vs_full": ("<=", 0.92), "vision_capture_overhead": ("<=", 1.03)}


def plain_forward(visual, pixels, n_blocks):
    """Embeds then the first n_blocks resblocks, nothing else; returns the last output."""
    with torch.inference_mode():
        x = visual._embeds(pixels)
        batch_first = getattr(visual.transformer, "batch_first", True)
        if not batch_first:  # load_tower runs the blocks sequence-first (see precompute/model/vision.py)
            x = x.transpose(0, 1).contiguous()
        for block in visual.transformer.resblocks[:n_blocks]:
            x = block(x)
    return x if batch_first else x.transpose(0, 1)


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32")
    tower = load_tower("ViT-L-14", device="cpu", random_weights=True)
    visual = tower.visual
    n_blocks = tower.n_blocks
    print(
        f"ViT-L-14 (random weights): {n_blocks} blocks, width {tower.width}, {tower.n_tokens} tokens; "
        f"batch {BATCH}, capture layer {LAYER}; {REPEATS} interleaved repeats"
    )
    pixels = torch.randn(BATCH, 3, 224, 224)

    # Correctness: capture must return exactly the plain forward's block-20 output.
    captured = tower.capture(pixels, [LAYER])[LAYER]
    reference = plain_forward(visual, pixels, LAYER + 1)
    max_err = (captured - reference).abs().max().item()
    print(f"check: capture shape {tuple(captured.shape)}, max |diff| vs plain 21-block forward = {max_err:.2e}")
    assert captured.shape == (BATCH, tower.n_tokens, tower.width)
    assert torch.allclose(captured, reference, atol=1e-4, rtol=1e-4)

    medians, times = interleaved_medians(
        {
            "capture [20]": lambda: tower.capture(pixels, [LAYER]),
            f"full forward ({n_blocks} blocks)": lambda: plain_forward(visual, pixels, n_blocks),
            f"plain forward ({LAYER + 1} blocks)": lambda: plain_forward(visual, pixels, LAYER + 1),
        },
        repeats=REPEATS,
    )
    cap, full, plain = "capture [20]", f"full forward ({n_blocks} blocks)", f"plain forward ({LAYER + 1} blocks)"
    t_cap, t_full, t_plain = medians[cap], medians[full], medians[plain]
    print(
        f"capture {t_cap:.3f} s, full {t_full:.3f} s, plain-21 {t_plain:.3f} s "
        f"(ideal capture/full = {(LAYER + 1) / n_blocks:.3f}); capture {BATCH / t_cap:.2f} img/s"
    )
    print(
        f"(for reference, medians of per-round ratios: capture/full {paired_ratio(times, cap, full):.3f}, "
        f"capture/plain-21 {paired_ratio(times, cap, plain):.3f})"
    )

    print_results(
        "vision",
        [
            result_line(name, measured, *TARGETS[name])
            for name, measured in (
                ("vision_capture_vs_full", t_cap / t_full),
                ("vision_capture_overhead", t_cap / t_plain),
            )
        ],
    )


if __name__ == "__main__":
    main()
