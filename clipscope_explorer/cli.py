"""The `clipscope-explorer` command: precompute, serve, demo, fit."""

from __future__ import annotations

import argparse
import logging
import sys

from clipscope_explorer.precompute.model.precision import PRECISIONS


def _add_serve(sub) -> None:
    parser = sub.add_parser("serve", help="serve an index in the browser and as JSON")
    parser.add_argument("index", help="the index file (.duckdb) written by `precompute`")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    live = parser.add_argument_group("live encoding of uploaded images")
    live.add_argument("--no-live", action="store_true", help="do not load a model: uploads are off")
    live.add_argument("--live-model", metavar="MODEL", help="open_clip model for uploads (default: the index's): "
                                                            "hf-hub:..., local-dir:..., or a built-in name")
    live.add_argument("--live-pretrained", metavar="TAG", help="pretrained tag or file for a built-in --live-model")
    live.add_argument("--live-sae", metavar="SAE", help="SAE hub repo, folder or file (default: the index's SAEs)")
    live.add_argument("--live-layers", metavar="LAYERS", help="comma-separated layers (default: the index's)")
    live.add_argument("--live-device", choices=("auto", "cpu", "cuda"), default=None, help="device for uploads")
    live.add_argument("--live-precision", choices=PRECISIONS, default=None,
                      help="fp32 or bf16 autocast (default auto: as the index was built, fp32 on a CPU without "
                           "native bfloat16)")
    live.add_argument("--upload-store", metavar="DIR", help="writable folder for stored uploads "
                                                             "(default: ~/.cache/clipscope-explorer/uploads)")
    live.add_argument("--no-store-uploads", action="store_true", help="keep nothing: results have no share link")
    live.add_argument("--max-upload-mb", type=float, metavar="MB", help="largest upload accepted (default 20)")
    parser.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    from clipscope_explorer.app.serving.server import serve

    return serve(args)


def _add_precompute(sub) -> None:
    from clipscope_explorer.precompute import cli

    parser = sub.add_parser("precompute", help="run the model and SAEs over images into an index")
    cli.add_arguments(parser)
    parser.set_defaults(run=cli.run)
    parser = sub.add_parser("fit", help="fit small TopK SAEs (released checkpoint format) on a model's activations")
    cli.add_fit_arguments(parser)
    parser.set_defaults(run=cli.run_fit)
    parser = sub.add_parser("demo", help="build the offline demo index (procedural images, tiny model) and serve it")
    cli.add_demo_arguments(parser)
    parser.set_defaults(run=cli.run_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipscope-explorer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_precompute(sub)
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
