"""`clipscope-explorer serve`: check the index and bind the address, then run uvicorn on
`clipscope_explorer.app.main:app` (`--workers N > 1`: under `clipscope_explorer.app.serving.supervisor`, one
listening socket per worker).

`serve` takes a `ServeOptions`. Settings travel to the (possibly several)
worker processes through the environment (`CLIPSCOPE_INDEX`, and
`CLIPSCOPE_LIVE_*` etc. for the live-encoding options), so the command and a
plain `uvicorn clipscope_explorer.app.main:app` take one path. A bad index, a
taken port or a host that cannot be bound is refused here, before any worker
starts or loads a model, with one line and exit code 2.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from clipscope_explorer.app.index_file import IndexOpenError, check_index
from clipscope_explorer.app.settings import get_settings, settings_error

APP = "clipscope_explorer.app.main:app"


@dataclass(frozen=True)
class ServeOptions:
    """What `clipscope-explorer serve` was asked for. None leaves a setting to its `CLIPSCOPE_*` variable or
    its default (docs/API.md)."""

    index: Path
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    verbose: bool = False
    live: bool = True
    text: bool = True
    live_model: str | None = None
    live_pretrained: str | None = None
    live_sae: str | None = None
    live_layers: Sequence[int] | None = None
    live_device: str | None = None
    live_precision: str | None = None
    upload_store: Path | None = None
    store_uploads: bool = True
    interventions: bool = True
    max_upload_mb: float | None = None
    root_path: str | None = None


def _fail(message: str) -> int:
    sys.stderr.write(f"clipscope-explorer: error: {message}\n")
    return 2


def live_environment(options: ServeOptions) -> dict[str, str]:
    """The `CLIPSCOPE_*` variables for the live-encoding (and text tower) options given."""
    env = {}
    if not options.live:
        env["CLIPSCOPE_LIVE"] = "false"
    if not options.text:
        env["CLIPSCOPE_TEXT"] = "false"
    if not options.interventions:
        env["CLIPSCOPE_INTERVENTIONS"] = "false"
    for name, value in (
        ("model", options.live_model),
        ("pretrained", options.live_pretrained),
        ("sae", options.live_sae),
        ("device", options.live_device),
        ("precision", options.live_precision),
    ):
        if value is not None:
            env[f"CLIPSCOPE_LIVE_{name.upper()}"] = value
    if options.live_layers is not None:
        env["CLIPSCOPE_LIVE_LAYERS"] = ",".join(map(str, options.live_layers))
    if options.upload_store is not None:
        env["CLIPSCOPE_UPLOAD_STORE"] = str(Path(options.upload_store).expanduser().resolve())
    if not options.store_uploads:
        env["CLIPSCOPE_STORE_UPLOADS"] = "false"
    if options.max_upload_mb is not None:
        env["CLIPSCOPE_MAX_UPLOAD_BYTES"] = str(max(1, round(options.max_upload_mb * 1_000_000)))
    return env


def log_config(verbose: bool) -> dict:
    """uvicorn's logging plus the app's own loggers (`clipscope_explorer.*`): with `--workers N` each worker is a
    fresh process that applies this dict, so its warnings read like the parent's. Quiet by default:
    warnings and errors (every unexpected 500 with its traceback), uvicorn's start/stop lines; `-v` adds
    the app's info lines and uvicorn's access log."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["named"] = {
        "()": "uvicorn.logging.DefaultFormatter",
        "fmt": "%(levelprefix)s %(name)s: %(message)s",
        "use_colors": None,
    }
    config["handlers"]["named"] = {"formatter": "named", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
    config["loggers"]["clipscope_explorer"] = {
        "handlers": ["named"],
        "level": "INFO" if verbose else "WARNING",
        "propagate": False,
    }
    return config


def serve(options: ServeOptions) -> int:
    """Check the index and the address, then serve until stopped; the exit code (2: refused in one line)."""
    os.environ["CLIPSCOPE_INDEX"] = str(Path(options.index).expanduser().resolve())
    os.environ.update(live_environment(options))
    if options.root_path is not None:
        os.environ["CLIPSCOPE_ROOT_PATH"] = options.root_path
    get_settings.cache_clear()
    try:
        settings = get_settings()
        meta = check_index(settings.index)
    except ValidationError as error:
        return _fail(settings_error(error))
    except IndexOpenError as error:
        return _fail(str(error))
    tower = start_text_tower(meta, settings)
    try:
        return _run(options, settings)
    finally:
        if tower is not None:
            tower.stop()
            for name in tower.environment():
                os.environ.pop(name, None)


def start_text_tower(meta: dict, settings):
    """The text-tower process every worker shares (None when search by meaning has no use for it: `--no-text`,
    or an index without CLIP embeddings); its address reaches the workers through the environment."""
    if not settings.text or not meta.get("embeddings"):
        return None
    from clipscope_explorer.app.meaning.service import TextSpec
    from clipscope_explorer.app.meaning.tower_process import TowerProcess

    tower = TowerProcess(TextSpec.from_index(meta, settings)).start()
    os.environ.update(tower.environment())
    return tower


def _run(options: ServeOptions, settings) -> int:

    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from clipscope_explorer.app.serving.supervisor import Supervisor, listening_sockets

    verbose = options.verbose
    uvicorn_options = dict(
        host=options.host,
        port=options.port,
        workers=options.workers,
        http="clipscope_explorer.app.serving.transport:ServerHTTPProtocol",
        log_level="debug" if verbose else "info",
        access_log=verbose,
        server_header=False,
        log_config=log_config(verbose),
        timeout_keep_alive=settings.read_timeout,
        limit_concurrency=settings.max_connections,
    )
    config = uvicorn.Config(APP, **uvicorn_options)
    try:  # before any worker loads the model: a taken port or an unknown host is refused at once
        sockets = listening_sockets(options.host, options.port, options.workers, config.backlog)
    except OSError as error:
        return _fail(f"cannot listen on {options.host}:{options.port}: {error.strerror or error}")
    if options.workers > 1:
        return Supervisor(config, sockets).run()
    server = uvicorn.Server(config)
    host, port = sockets[0].getsockname()[:2]
    logging.getLogger("uvicorn.error").info(f"Running on http://{host}:{port} (Press CTRL+C to quit)")
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, once it has shut down
        pass
    return 0 if server.started else STARTUP_FAILURE
