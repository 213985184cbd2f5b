"""`clipscope-explorer serve`: check the index, then run uvicorn on `clipscope_explorer.app.main:app` (`--workers N > 1`: under
`clipscope_explorer.app.serving.supervisor`, one listening socket per worker).

Settings travel to the (possibly several) worker processes through the
environment (`CLIPSCOPE_INDEX`, and `CLIPSCOPE_LIVE_*` etc. for the live-encoding
options), so the command and a plain
`uvicorn clipscope_explorer.app.main:app` take one path. A bad index is refused here, before any
worker starts, with one line and exit code 2.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from clipscope_explorer.app.index_file import IndexOpenError, check_index
from clipscope_explorer.app.settings import get_settings


def _fail(message: str) -> int:
    sys.stderr.write(f"clipscope-explorer: error: {message}\n")
    return 2


def live_environment(args) -> dict[str, str]:
    """The `CLIPSCOPE_*` variables for the live-encoding options given on the command line."""
    env = {}
    if getattr(args, "no_live", False):
        env["CLIPSCOPE_LIVE"] = "false"
    for option in ("live_model", "live_pretrained", "live_sae", "live_layers", "live_device", "live_precision"):
        value = getattr(args, option, None)
        if value is not None:
            env[f"CLIPSCOPE_{option.upper()}"] = str(value)
    if getattr(args, "upload_store", None):
        env["CLIPSCOPE_UPLOAD_STORE"] = str(Path(args.upload_store).expanduser().resolve())
    if getattr(args, "no_store_uploads", False):
        env["CLIPSCOPE_STORE_UPLOADS"] = "false"
    if getattr(args, "max_upload_mb", None) is not None:
        env["CLIPSCOPE_MAX_UPLOAD_BYTES"] = str(int(args.max_upload_mb * 1_000_000))
    return env


def log_config(verbose: bool) -> dict:
    """uvicorn's logging plus the app's own loggers (`clipscope_explorer.*`): with `--workers N` each worker is a
    fresh process that applies this dict, so its warnings read like the parent's. Quiet by default:
    warnings and errors (every unexpected 500 with its traceback), uvicorn's start/stop lines; `-v` adds
    the app's info lines and uvicorn's access log."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["named"] = {"()": "uvicorn.logging.DefaultFormatter",
                                     "fmt": "%(levelprefix)s %(name)s: %(message)s", "use_colors": None}
    config["handlers"]["named"] = {"formatter": "named", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
    config["loggers"]["clipscope_explorer"] = {"handlers": ["named"], "level": "INFO" if verbose else "WARNING",
                                               "propagate": False}
    return config


def serve(args) -> int:
    if args.workers < 1:
        return _fail("--workers must be at least 1")
    os.environ["CLIPSCOPE_INDEX"] = str(Path(args.index).expanduser().resolve())
    os.environ.update(live_environment(args))
    get_settings.cache_clear()
    try:
        settings = get_settings()
        check_index(settings.index)
    except ValidationError as error:
        return _fail("bad settings: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()))
    except IndexOpenError as error:
        return _fail(str(error))

    import uvicorn

    verbose = bool(getattr(args, "verbose", False))
    options = dict(host=args.host, port=args.port, workers=args.workers, http="clipscope_explorer.app.serving.transport:NoDelayHTTPProtocol",
                   log_level="debug" if verbose else "info", access_log=verbose, server_header=False,
                   log_config=log_config(verbose))
    if args.workers == 1:
        uvicorn.run("clipscope_explorer.app.main:app", **options)
        return 0
    from clipscope_explorer.app.serving.supervisor import Supervisor, listening_sockets

    config = uvicorn.Config("clipscope_explorer.app.main:app", **options)
    try:
        sockets = listening_sockets(args.host, args.port, args.workers, config.backlog)
    except OSError as error:
        return _fail(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}")
    return Supervisor(config, sockets).run()
