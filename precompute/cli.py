"""Command-line options of `clipscope-explorer precompute` (also `python -m precompute`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from precompute.sae import DEFAULT_SAE_REPO
from precompute.vision import DEFAULT_MODEL


def layer_list(text: str) -> list[int]:
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated block numbers, not {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("--layers is empty")
    return layers


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", nargs="+", required=True, metavar="SRC",
                        help="tar shards (paths, globs, {00000..00099} ranges, http(s):// or s3:// URLs) "
                             "or image folders")
    parser.add_argument("--out", required=True, type=Path, help="the index file to write (.duckdb)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model: hf-hub:..., local-dir:..., "
                                                                "or a built-in name with --pretrained")
    parser.add_argument("--pretrained", default=None, help="pretrained tag or weights file for a built-in name")
    parser.add_argument("--sae", default=DEFAULT_SAE_REPO, help="hub repo, local folder in the hub layout, or one file")
    parser.add_argument("--layers", type=layer_list, default=[20], help="comma-separated blocks (default 20)")
    parser.add_argument("--checkpoint", type=int, default=None, help="SAE token count (default: the final one)")
    parser.add_argument("--top-n", type=positive, default=32)
    parser.add_argument("--band-size", type=positive, default=4, help="examples per lower activation band")
    parser.add_argument("--max-images", type=positive, default=None)
    parser.add_argument("--batch-size", type=positive, default=64)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    parser.add_argument("--normalise", choices=("none", "sample"), default="none",
                        help="raw activations (released default) or standardised with sample statistics")
    parser.add_argument("--checkpoint-every", type=positive, default=20_000, help="images between checkpoints")
    parser.add_argument("--fresh", action="store_true", help="discard an unfinished run instead of resuming it")
    parser.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                        help="run on a Ray cluster (no address: start or join a local one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from(args: argparse.Namespace):
    from precompute.job import PrecomputeConfig

    return PrecomputeConfig(
        images=args.images, out=args.out, model=args.model, pretrained=args.pretrained, sae=args.sae,
        layers=args.layers, checkpoint=args.checkpoint, top_n=args.top_n, band_size=args.band_size,
        max_images=args.max_images, batch_size=args.batch_size, device=args.device, workers=args.workers,
        normalise=args.normalise, checkpoint_every=args.checkpoint_every, fresh=args.fresh, ray=args.ray,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from precompute.job import run as run_job
    from precompute.sae import SAELoadError
    from precompute.sources import SourceError
    from precompute.store import IndexWriteError
    from precompute.vision import ModelLoadError
    from precompute.workdir import WorkDirError

    try:
        out = run_job(config_from(args))
    except (SAELoadError, SourceError, ModelLoadError, WorkDirError, IndexWriteError, ValueError) as error:
        print(f"clipscope-explorer precompute: error: {error}", file=sys.stderr)
        return 2
    print(f"index written: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m precompute", description="Build a feature index.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
