"""Commands of the precompute half: `precompute` (also `python -m clipscope_explorer.precompute`), `fit`, `demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipscope_explorer.precompute.model.precision import PRECISIONS
from clipscope_explorer.precompute.model.release import DEFAULT_MODEL, DEFAULT_SAE_REPO


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
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="forward pass in fp32 or bf16 autocast (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--checkpoint-every", type=positive, default=20_000, help="images between checkpoints")
    parser.add_argument("--fresh", action="store_true", help="discard an unfinished run instead of resuming it")
    parser.add_argument("--skip-existing", action="store_true",
                        help="do nothing when --out already holds an index (for unattended pipelines)")
    parser.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                        help="run on a Ray cluster (no address: start or join a local one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from(args: argparse.Namespace):
    from clipscope_explorer.precompute.job import PrecomputeConfig

    return PrecomputeConfig(
        images=args.images, out=args.out, model=args.model, pretrained=args.pretrained, sae=args.sae,
        layers=args.layers, checkpoint=args.checkpoint, top_n=args.top_n, band_size=args.band_size,
        max_images=args.max_images, batch_size=args.batch_size, device=args.device, workers=args.workers,
        normalise=args.normalise, precision=args.precision, checkpoint_every=args.checkpoint_every, fresh=args.fresh, ray=args.ray,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from clipscope_explorer.precompute.job import run as run_job
    from clipscope_explorer.precompute.model.sae import SAELoadError
    from clipscope_explorer.precompute.sources import SourceError
    from clipscope_explorer.precompute.index.store import IndexWriteError
    from clipscope_explorer.precompute.model.vision import ModelLoadError
    from clipscope_explorer.precompute.workdir import WorkDirError

    if args.skip_existing and args.out.is_file():
        print(f"index exists, nothing to do: {args.out}")
        return 0
    try:
        out = run_job(config_from(args))
    except (SAELoadError, SourceError, ModelLoadError, WorkDirError, IndexWriteError, ValueError) as error:
        print(f"clipscope-explorer precompute: error: {error}", file=sys.stderr)
        return 2
    print(f"index written: {out}")
    return 0


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", nargs="+", required=True, metavar="SRC", help="as for precompute")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model, as for precompute")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--layers", type=layer_list, required=True, help="comma-separated blocks")
    parser.add_argument("--out", type=Path, required=True, help="folder to write {layer}_resid/{tokens}.pt into")
    parser.add_argument("--features", type=positive, default=512)
    parser.add_argument("--k", type=positive, default=8)
    parser.add_argument("--steps", type=positive, default=1500)
    parser.add_argument("--batch-tokens", type=positive, default=4096)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-images", type=positive, default=1000, help="images whose tokens are trained on")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")


def run_fit(args: argparse.Namespace) -> int:
    from clipscope_explorer.precompute.demo.fit import FitSettings, collect_tokens, fit_topk_sae, save_fitted
    from clipscope_explorer.precompute.sources import SourceError, resolve_sources
    from clipscope_explorer.precompute.model.vision import ModelLoadError, ModelSpec, load_tower

    try:
        shards = resolve_sources(args.images)
        tower = load_tower(ModelSpec(args.model, args.pretrained), device=args.device)
        layers = tower.check_layers(args.layers)
    except (SourceError, ModelLoadError, ValueError) as error:
        print(f"clipscope-explorer fit: error: {error}", file=sys.stderr)
        return 2
    settings = FitSettings(n_features=args.features, k=args.k, steps=args.steps, batch_tokens=args.batch_tokens,
                           lr=args.lr)
    tokens = collect_tokens(tower, shards, layers, args.max_images)
    for layer in layers:
        path = save_fitted(fit_topk_sae(tokens[layer].to(tower.device), settings), args.out, layer, args.k)
        print(f"SAE written: {path}")
    return 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--images", type=positive, default=2000, help="procedural images to generate")
    parser.add_argument("--data", type=Path, default=Path("data/demo"), help="where everything is cached")
    parser.add_argument("--fresh", action="store_true", help="rebuild everything instead of reusing the cache")
    parser.add_argument("--build-only", action="store_true", help="build the demo index, do not serve it")


def run_demo(args: argparse.Namespace) -> int:
    from clipscope_explorer.precompute.demo.build import build_demo

    index = build_demo(args.data, args.images, fresh=args.fresh)
    print(f"demo index: {index} (data cached in {args.data})")
    if args.build_only:
        return 0
    from clipscope_explorer.app.serving.server import serve

    return serve(argparse.Namespace(index=index, host=args.host, port=args.port, workers=1,
                                    verbose=getattr(args, "verbose", False)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipscope_explorer.precompute", description="Build a feature index.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
