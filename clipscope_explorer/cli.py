"""The `clipscope-explorer` command: precompute, fit, demo, serve, export, evaluate, lineage, checkpoints.

Every flag is checked as it is parsed (clipscope_explorer.flags): a bad one is
one line naming it and its value, exit code 2, before torch, a model or an
index is loaded. Each command then builds the typed options of its entry
point (`PrecomputeConfig` for `precompute.job.run`, `ServeOptions` for
`serve`, `ExportOptions` for `export`) and calls it; the heavy modules are
imported only then.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from clipscope_explorer import flags
from clipscope_explorer.flags import CommandParser, DeprecatedAlias, whole
from clipscope_explorer.precompute.model.precision import PRECISIONS
from clipscope_explorer.precompute.model.release import DEFAULT_MODEL, DEFAULT_SAE_REPO
from clipscope_explorer.precompute.shard_patterns import SourceError, check_patterns

PROG = "clipscope-explorer"


def options_from(cls, args: argparse.Namespace):
    """An instance of the dataclass `cls` from the parsed flags whose names are its fields."""
    names = [field.name for field in dataclasses.fields(cls)]
    return cls(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def _fail(command: str, error: Exception) -> int:
    print(f"{PROG} {command}: error: {error}", file=sys.stderr)
    return 2


def _add_images_and_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images",
        nargs="+",
        required=True,
        metavar="SRC",
        help="tar shards (paths, globs, {00000..00099} ranges, http(s):// or s3:// URLs) or image folders",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="open_clip model: hf-hub:..., local-dir:..., or a built-in name with --pretrained",
    )
    parser.add_argument("--pretrained", default=None, help="pretrained tag or weights file for a built-in name")


def _check_images(args: argparse.Namespace) -> str | None:
    try:
        check_patterns(args.images)
    except SourceError as error:
        return str(error)
    if getattr(args, "evaluate", False) and not args.embeddings:
        return "--evaluate judges with the images' embeddings: drop --no-embeddings"
    return None


def _add_precompute(parser: argparse.ArgumentParser) -> None:
    _add_images_and_model(parser)
    parser.add_argument(
        "--out", required=True, type=flags.file_to_write, metavar="INDEX", help="the index file to write (.duckdb)"
    )
    parser.add_argument("--sae", default=DEFAULT_SAE_REPO, help="hub repo, local folder in the hub layout, or one file")
    parser.add_argument("--layers", type=flags.layer_list, default=[20], help="comma-separated blocks (default 20)")
    tokens = whole(1, 10**15)
    parser.add_argument(
        "--sae-checkpoint",
        dest="checkpoint",
        type=tokens,
        default=None,
        metavar="TOKENS",
        help="which SAE checkpoint: its training token count (default: the final one)",
    )
    parser.add_argument("--checkpoint", dest="checkpoint", type=tokens, action=DeprecatedAlias, new="--sae-checkpoint")
    parser.add_argument("--top-n", type=whole(1, 256), default=32, help="top images kept per feature (1-256)")
    parser.add_argument("--band-size", type=whole(1, 64), default=4, help="examples per lower activation band")
    parser.add_argument("--max-images", type=whole(1, 10**12), default=None)
    parser.add_argument("--batch-size", type=whole(1, 16384), default=64)
    parser.add_argument("--device", type=flags.device, default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=whole(0, 256), default=2, help="data-loading worker processes (0-256)")
    parser.add_argument(
        "--normalise",
        choices=("none", "sample"),
        default="none",
        help="raw activations (released default) or standardised with sample statistics",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="forward pass in fp32 or bf16 autocast (auto: bf16 on CUDA, fp32 on CPU)",
    )
    every = whole(1, 10**12)
    parser.add_argument(
        "--save-state-every",
        dest="checkpoint_every",
        type=every,
        default=20_000,
        metavar="N",
        help="images between saves of the run state, which a rerun resumes from",
    )
    parser.add_argument(
        "--checkpoint-every", dest="checkpoint_every", type=every, action=DeprecatedAlias, new="--save-state-every"
    )
    parser.add_argument("--fresh", action="store_true", help="discard an unfinished run instead of resuming it")
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="do nothing when --out already holds an index (for unattended pipelines)",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster (no address: start or join a local one)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    meaning = parser.add_argument_group("search by meaning")
    meaning.add_argument(
        "--no-embeddings",
        dest="embeddings",
        action="store_false",
        help="do not store each image's final CLIP embedding (the blocks after the deepest layer then never run); "
        "no feature prototypes or zero-shot labels",
    )
    meaning.add_argument(
        "--evaluate",
        action="store_true",
        help="once the index is written: its sort evaluation (embedding judge), lineage, checkpoints and the "
        "faithfulness of a sample of features (see the evaluate, lineage and checkpoints commands)",
    )
    meaning.add_argument(
        "--vocabulary",
        type=flags.vocabulary_file,
        default=None,
        metavar="FILE",
        help="extra zero-shot label terms, one a line (beside the words and phrases of the captions)",
    )
    meaning.add_argument(
        "--zero-shot-min-count",
        type=whole(1, 10**9),
        default=5,
        metavar="N",
        help="captions a word or two-word phrase must occur in to be a zero-shot label term (default 5)",
    )


def run_precompute(args: argparse.Namespace) -> int:
    if args.skip_existing and args.out.is_file():
        print(f"index exists, nothing to do: {args.out}")
        return 0
    from clipscope_explorer.precompute.index.store import IndexWriteError
    from clipscope_explorer.precompute.job import PrecomputeConfig, run
    from clipscope_explorer.precompute.model.sae import SAELoadError
    from clipscope_explorer.precompute.model.vision import ModelLoadError
    from clipscope_explorer.precompute.workdir import WorkDirError

    try:
        out = run(options_from(PrecomputeConfig, args))
    except (SAELoadError, SourceError, ModelLoadError, WorkDirError, IndexWriteError, ValueError) as error:
        return _fail("precompute", error)
    print(f"index written: {out}")
    return 0


def _add_fit(parser: argparse.ArgumentParser) -> None:
    _add_images_and_model(parser)
    parser.add_argument("--layers", type=flags.layer_list, required=True, help="comma-separated blocks")
    parser.add_argument(
        "--out",
        type=flags.folder_to_write,
        required=True,
        metavar="FOLDER",
        help="folder to write {layer}_resid/{tokens}.pt into",
    )
    parser.add_argument("--features", type=whole(1, 2**20), default=512)
    parser.add_argument("--k", type=whole(1, 4096), default=8, help="features kept per token (at most --features)")
    parser.add_argument("--steps", type=whole(1, 10**7), default=1500)
    parser.add_argument("--batch-tokens", type=whole(1, 2**20), default=4096)
    parser.add_argument("--lr", type=flags.positive(1.0), default=1e-3, help="Adam learning rate")
    parser.add_argument("--max-images", type=whole(1, 10**7), default=1000, help="images whose tokens are trained on")
    parser.add_argument("--device", type=flags.device, default="auto", help="auto, cpu, cuda or cuda:N")


def _check_fit(args: argparse.Namespace) -> str | None:
    if args.k > args.features:
        return f"argument --k: {args.k} is more than --features ({args.features})"
    return _check_images(args)


def run_fit(args: argparse.Namespace) -> int:
    from clipscope_explorer.precompute.demo.fit import FitSettings, collect_tokens, fit_topk_sae, save_fitted
    from clipscope_explorer.precompute.model.vision import ModelLoadError, ModelSpec, load_tower
    from clipscope_explorer.precompute.sources import resolve_sources

    try:
        shards = resolve_sources(args.images)
        tower = load_tower(ModelSpec(args.model, args.pretrained), device=args.device)
        layers = tower.check_layers(args.layers)
    except (SourceError, ModelLoadError, ValueError) as error:
        return _fail("fit", error)
    settings = FitSettings(
        n_features=args.features, k=args.k, steps=args.steps, batch_tokens=args.batch_tokens, lr=args.lr
    )
    tokens = collect_tokens(tower, shards, layers, args.max_images)
    for layer in layers:
        path = save_fitted(fit_topk_sae(tokens[layer].to(tower.device), settings), args.out, layer, args.k)
        print(f"SAE written: {path}")
    return 0


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", type=flags.host, default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=flags.PORT, default=8000, help="port to listen on (1-65535)")


def _add_demo(parser: argparse.ArgumentParser) -> None:
    _add_address(parser)
    parser.add_argument("--images", type=whole(1, 100_000), default=2000, help="procedural images to generate")
    parser.add_argument(
        "--data",
        type=flags.folder_to_write,
        default="data/demo",
        metavar="FOLDER",
        help="where everything is cached (default data/demo)",
    )
    parser.add_argument("--fresh", action="store_true", help="rebuild everything instead of reusing the cache")
    parser.add_argument("--build-only", action="store_true", help="build the demo index, do not serve it")


def run_demo(args: argparse.Namespace) -> int:
    from clipscope_explorer.app.serving.server import ServeOptions, serve
    from clipscope_explorer.precompute.demo.build import build_demo

    index = build_demo(args.data, args.images, fresh=args.fresh)
    print(f"demo index: {index} (data cached in {args.data})")
    if args.build_only:
        return 0
    return serve(ServeOptions(index=index, host=args.host, port=args.port, verbose=args.verbose))


def _add_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", type=flags.path, help="the index file (.duckdb) written by `precompute`")
    _add_address(parser)
    parser.add_argument("--workers", type=whole(1, 64), default=1, help="server processes (1-64)")
    parser.add_argument(
        "--root-path",
        type=flags.root_path,
        metavar="PREFIX",
        help="path prefix behind a reverse proxy, e.g. /explorer (CLIPSCOPE_ROOT_PATH)",
    )
    live = parser.add_argument_group("live encoding of uploaded images")
    live.add_argument("--no-live", dest="live", action="store_false", help="do not load a model: uploads are off")
    live.add_argument(
        "--no-text",
        dest="text",
        action="store_false",
        help="do not load CLIP's text tower: search by words only (it loads with or without --no-live)",
    )
    live.add_argument(
        "--no-interventions",
        dest="interventions",
        action="store_false",
        help="keep no SAE decoders: uploads only, no feature interventions (a leaner worker)",
    )
    live.add_argument(
        "--live-model",
        metavar="MODEL",
        help="open_clip model for uploads (default: the index's): hf-hub:..., local-dir:..., or a built-in name",
    )
    live.add_argument("--live-pretrained", metavar="TAG", help="pretrained tag or file for a built-in --live-model")
    live.add_argument("--live-sae", metavar="SAE", help="SAE hub repo, folder or file (default: the index's SAEs)")
    live.add_argument(
        "--live-layers", type=flags.layer_list, metavar="LAYERS", help="comma-separated layers (default: the index's)"
    )
    live.add_argument(
        "--live-device", type=flags.device, metavar="DEVICE", help="device for uploads: auto, cpu, cuda or cuda:N"
    )
    live.add_argument(
        "--live-precision",
        choices=PRECISIONS,
        default=None,
        help="fp32 or bf16 autocast (default auto: as the index was built, fp32 on a CPU without native bfloat16)",
    )
    live.add_argument(
        "--upload-store",
        type=flags.folder_to_write,
        metavar="DIR",
        help="writable folder for stored uploads (default: ~/.cache/clipscope-explorer/uploads)",
    )
    live.add_argument(
        "--no-store-uploads",
        dest="store_uploads",
        action="store_false",
        help="keep nothing: results have no share link",
    )
    live.add_argument(
        "--max-upload-mb",
        type=flags.positive(1000),
        metavar="MB",
        help="largest upload accepted (default 20, at most 1000)",
    )


def run_serve(args: argparse.Namespace) -> int:
    from clipscope_explorer.app.serving.server import ServeOptions, serve

    return serve(options_from(ServeOptions, args))


def feature_range(text: str) -> tuple[int, int]:
    """`--features`: FIRST-LAST (both included) or one feature number: ``0-999``, ``42``."""
    first, dash, last = text.partition("-")
    parts = (first, last) if dash else (first, first)
    if not all(flags.WHOLE.fullmatch(part.strip()) and len(part.strip()) <= 10 for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a feature range such as 0-999 (or one feature number)")
    low, high = (int(part) for part in parts)
    if low > high:
        raise argparse.ArgumentTypeError(f"{text!r} is an empty range: {low} comes after {high}")
    return low, high


def _add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", type=flags.path, help="the index file (.duckdb) to export")
    parser.add_argument(
        "--out", required=True, type=flags.folder_to_write, metavar="DIR", help="folder to write the files into"
    )
    parser.add_argument(
        "--format", choices=("parquet", "jsonl"), default="parquet", help="file format (default parquet)"
    )
    parser.add_argument("--layers", type=flags.layer_list, help="comma-separated layers (default: every layer)")
    parser.add_argument(
        "--features", type=feature_range, metavar="RANGE", help="features FIRST-LAST of each layer, e.g. 0-999"
    )
    parser.add_argument(
        "--with-heatmaps", action="store_true", help="add each example's per-patch heatmap (activation units)"
    )
    parser.add_argument("--with-images", action="store_true", help="add each image's thumbnail (JPEG bytes)")
    parser.add_argument("--overwrite", action="store_true", help="replace an export in a folder that is not empty")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run_export(args: argparse.Namespace) -> int:
    from clipscope_explorer.app.index_file import IndexOpenError
    from clipscope_explorer.export import ExportError, ExportOptions, export

    try:
        info = export(options_from(ExportOptions, args))
    except (ExportError, IndexOpenError) as error:
        return _fail("export", error)
    print(f"export written: {info.parent} (described in {info.name})")
    return 0


def _add_index_step(parser: argparse.ArgumentParser, what: str, layers: str = "every layer") -> None:
    """The flags every step that adds to a built index takes: the index, --out, --layers, --no-progress."""
    parser.add_argument("index", type=flags.path, help=f"the index file (.duckdb) {what}")
    parser.add_argument(
        "--out", type=flags.file_to_write, metavar="COPY", help="write the results into a copy (default: in place)"
    )
    parser.add_argument("--layers", type=flags.layer_list, help=f"comma-separated layers (default: {layers})")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    _add_index_step(parser, "to evaluate")
    parser.add_argument(
        "--token",
        choices=("cls", "image"),
        default="cls",
        help="cls: activation on the CLS token (the release's); image: max over all tokens (queries re-encoded)",
    )
    parser.add_argument("--judge", choices=("embedding", "openai"), default="embedding", help="who sorts the queries")
    parser.add_argument("--pairs", type=whole(1, 1_000_000), default=450, help="trials per seed (default 450)")
    parser.add_argument("--seeds", type=whole(1, 1000), default=4, help="seeds (default 4)")
    parser.add_argument(
        "--features",
        type=whole(0, 10**7),
        default=650,
        metavar="N",
        help="draw the pairs among the first N live features (default 650, the release's; 0: all)",
    )
    parser.add_argument(
        "--per-feature", type=whole(0, 1000), default=0, metavar="N", help="N trials for every live feature"
    )
    parser.add_argument("--seed", type=whole(0, 2**31), default=0, help="base seed (default 0)")
    occlusion = parser.add_argument_group("faithfulness (occlusion of the heatmaps' hot patches)")
    occlusion.add_argument(
        "--faithfulness", action="store_true", help="run the faithfulness check instead of the sort evaluation"
    )
    occlusion.add_argument("--top", type=whole(1, 256), default=4, help="top images per feature (default 4)")
    occlusion.add_argument(
        "--mass", type=flags.positive(1.0), default=0.5, help="share of the heatmap the hot patches hold (0.5)"
    )
    occlusion.add_argument("--draws", type=whole(1, 100), default=8, help="random occlusions per image (8)")
    occlusion.add_argument(
        "--sample", type=whole(1, 10**7), metavar="N", help="only N features per layer, drawn at random (default all)"
    )
    occlusion.add_argument("--sae", help="a local copy of the index's SAE source, when the recorded one is gone")
    judge = parser.add_argument_group("judges (openai: any OpenAI-compatible chat-completions endpoint with images)")
    judge.add_argument("--judge-url", metavar="URL", help="the API base, e.g. http://127.0.0.1:8000/v1")
    judge.add_argument(
        "--judge-model",
        metavar="NAME",
        help="openai: the model name the endpoint serves; embedding: another open_clip model (hf-hub:..., "
        "local-dir:..., or a built-in name with --judge-pretrained) to embed the images with, instead of the "
        "index's stored embeddings",
    )
    judge.add_argument("--judge-pretrained", metavar="TAG", help="embedding judge: the built-in model's weights")
    judge.add_argument("--device", type=flags.device, default="auto", help="embedding judge's model: auto, cpu, cuda")
    judge.add_argument(
        "--judge-key-env", default="OPENAI_API_KEY", metavar="VAR", help="environment variable holding the key"
    )
    judge.add_argument("--judge-concurrency", type=whole(1, 256), default=8, help="requests at once (default 8)")
    judge.add_argument(
        "--judge-timeout", type=flags.positive(3600), default=60.0, metavar="S", help="seconds a request may take"
    )
    judge.add_argument(
        "--judge-retries", type=whole(0, 20), default=4, help="retries of a failed request, with backoff (default 4)"
    )
    judge.add_argument("--judge-cache", type=flags.folder_to_write, metavar="DIR", help="answers kept here")
    judge.add_argument(
        "--images-root", type=flags.path, metavar="DIR", help="where the sample's image folders or shards are now"
    )


def _check_evaluate(args: argparse.Namespace) -> str | None:
    if args.judge == "openai" and not (args.judge_url and args.judge_model):
        return "--judge openai needs --judge-url and --judge-model"
    return None


def run_evaluate(args: argparse.Namespace) -> int:
    from clipscope_explorer.precompute.evaluate.openai_judge import JudgeError
    from clipscope_explorer.precompute.evaluate.run import EvaluateError, SortEvalOptions, evaluate
    from clipscope_explorer.precompute.index.store import IndexWriteError

    try:
        if args.faithfulness:
            from clipscope_explorer.precompute.evaluate.faithfulness import FaithfulnessOptions, run_faithfulness

            written = run_faithfulness(options_from(FaithfulnessOptions, args))
        else:
            written = evaluate(options_from(SortEvalOptions, args))
    except (EvaluateError, IndexWriteError, JudgeError, ValueError) as error:
        return _fail("evaluate", error)
    print(f"{'faithfulness' if args.faithfulness else 'sort evaluation'} written into {written}")
    return 0


def _add_lineage(parser: argparse.ArgumentParser) -> None:
    _add_index_step(parser, "to relate the layers of", layers="all; two or more")
    parser.add_argument(
        "--links", type=whole(1, 100), default=5, metavar="N", help="links kept per feature, other layer and source"
    )
    parser.add_argument(
        "--min-support", type=whole(1, 10**9), default=3, metavar="N", help="CLS: images both must fire on (default 3)"
    )
    parser.add_argument(
        "--min-shared", type=whole(1, 10**6), default=2, metavar="N", help="top images both must have (default 2)"
    )
    parser.add_argument(
        "--processes", type=whole(1, 64), default=2, metavar="N", help="layer pairs computed at once (default 2)"
    )


def run_lineage(args: argparse.Namespace) -> int:
    from clipscope_explorer.precompute.evaluate.lineage_run import LineageOptions, lineage
    from clipscope_explorer.precompute.evaluate.run import EvaluateError
    from clipscope_explorer.precompute.index.store import IndexWriteError

    try:
        written = lineage(options_from(LineageOptions, args))
    except (EvaluateError, IndexWriteError) as error:
        return _fail("lineage", error)
    print(f"lineage written into {written}")
    return 0


def _add_checkpoints(parser: argparse.ArgumentParser) -> None:
    _add_index_step(parser, "whose SAEs' checkpoints to measure")
    parser.add_argument(
        "--sample", type=whole(1, 10**7), default=2000, metavar="N", help="images of the index measured (default 2000)"
    )
    parser.add_argument(
        "--sae", metavar="SOURCE", help="a local copy of the index's SAE source (folder of {layer}_resid/{tokens}.pt)"
    )
    parser.add_argument("--device", type=flags.device, default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=whole(1, 16384), default=32, help="images per forward pass (default 32)")
    parser.add_argument(
        "--images-root", type=flags.path, metavar="DIR", help="where the sample's image folders or shards are now"
    )


def run_checkpoints(args: argparse.Namespace) -> int:
    from clipscope_explorer.precompute.evaluate.checkpoints import (
        CheckpointOptions,
        CheckpointsError,
        measure_checkpoints,
    )
    from clipscope_explorer.precompute.evaluate.run import EvaluateError
    from clipscope_explorer.precompute.index.store import IndexWriteError
    from clipscope_explorer.precompute.model.sae import SAELoadError
    from clipscope_explorer.precompute.model.vision import ModelLoadError

    try:
        measured = measure_checkpoints(options_from(CheckpointOptions, args))
    except (CheckpointsError, EvaluateError, IndexWriteError, SAELoadError, ModelLoadError, ValueError) as error:
        return _fail("checkpoints", error)
    for problem in measured.problems:
        print(f"{PROG} checkpoints: warning: {problem}", file=sys.stderr)
    print(f"checkpoints written into {measured.written}: {measured.rows['checkpoints']} checkpoint rows")
    return 0


COMMANDS = {  # name: (help, flags, check across flags, run)
    "precompute": ("run the model and SAEs over images into an index", _add_precompute, _check_images, run_precompute),
    "fit": ("fit small TopK SAEs (released checkpoint format) on a model's activations", _add_fit, _check_fit, run_fit),
    "demo": ("build the offline demo index (procedural images, tiny model) and serve it", _add_demo, None, run_demo),
    "serve": ("serve an index in the browser and as JSON", _add_serve, None, run_serve),
    "export": (
        "write an index's layers, features, examples and images as Parquet or JSONL files, with dataset_info.json",
        _add_export,
        None,
        run_export,
    ),
    "evaluate": (
        "sort-evaluate an index's features (the release's protocol) and write the results into it",
        _add_evaluate,
        _check_evaluate,
        run_evaluate,
    ),
    "lineage": (
        "relate every feature to its best matches at the index's other layers and write them into it",
        _add_lineage,
        None,
        run_lineage,
    ),
    "checkpoints": (
        "measure every training checkpoint of an index's SAEs on a sample of its images, into the index",
        _add_checkpoints,
        None,
        run_checkpoints,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=PROG, description=__doc__.split("\n", 1)[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_flags, check, run) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text, description=help_text, check=check)
        add_flags(command)
        command.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
