"""The ASGI application: `create_app(settings)`, and `app` for `uvicorn app.main:app`.

Nothing is built at import time. `create_app` wires routers, error handlers,
cross-origin rules, security headers, HEAD for every GET route, the path prefix
(`CLIPSCOPE_ROOT_PATH`) and static files; the lifespan opens the index (read-only)
when the server starts and closes it when it stops. The module attribute
`app` is built on first access from `get_settings()` (environment variables
`CLIPSCOPE_*`), which is how both `uvicorn app.main:app` and
`clipscope-explorer serve` (which sets `CLIPSCOPE_INDEX`) start. The lifespan
also opens the upload store and starts loading the live encoder in the
background (`app/live/encoder.py`), and CLIP's text tower and the index's
embeddings for search by meaning (`app/meaning/`), so the index is served while
the models load.
"""

from __future__ import annotations

import logging
import sys
import threading
from contextlib import asynccontextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import duckdb
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from clipscope_explorer.app.errors import install_error_handlers
from clipscope_explorer.app.index_file import IndexOpenError, check_index
from clipscope_explorer.app.live.service import LiveService
from clipscope_explorer.app.live.spec import LiveSpec
from clipscope_explorer.app.live.store import UploadStore
from clipscope_explorer.app.meaning.service import MeaningService
from clipscope_explorer.app.pages import register
from clipscope_explorer.app.queries import Index, open_index
from clipscope_explorer.app.serving.cors import CrossOriginMiddleware
from clipscope_explorer.app.serving.head import HeadMiddleware
from clipscope_explorer.app.serving.prefix import RootPathMiddleware, check_root_path
from clipscope_explorer.app.serving.ratelimit import upload_limiter
from clipscope_explorer.app.serving.security import SecurityHeadersMiddleware
from clipscope_explorer.app.settings import Settings, get_settings, settings_error
from clipscope_explorer.app.templating import SiteInfo, make_templates

if TYPE_CHECKING:  # the encoder is the torch side: only app/live/service.py imports it, when asked to
    from clipscope_explorer.app.live.encoder import LiveEncoder
    from clipscope_explorer.precompute.model.text import TextTower

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
DECODE_THREADS = 2  # uploads decoded at once (each may be up to Pillow's pixel limit)


def app_version() -> str:
    try:
        return metadata.version("clipscope-explorer")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def _warm(index: Index) -> None:
    """Fill the per-layer caches in the background so first requests stay fast."""
    try:
        for layer in sorted(index.layers):
            index.top_images(layer)
            index.alive_features(layer)
            index.density(layer)
            index.summaries(layer, [])
        index.warm_images()
    except duckdb.Error as error:  # the index was closed under us (shutdown): nothing to warm
        log.debug("cache warm-up stopped: %s", error)


def _upload_store(settings: Settings) -> UploadStore | None:
    if not settings.store_uploads:
        return None
    try:
        return UploadStore(settings.upload_store, settings.upload_store_max_bytes)
    except OSError as error:
        log.warning("uploads will not be stored: %s is not writable (%s)", settings.upload_store, error)
        return None


def _live_service(app: FastAPI, index: Index) -> LiveService:
    settings: Settings = app.state.settings
    encoder = app.state.live_encoder
    if encoder is not None:
        return LiveService(encoder.spec, settings, encoder=encoder)
    if not settings.live:
        return LiveService(None, settings)
    return LiveService(LiveSpec.from_index(index.meta, index.layers, settings), settings)


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    index = open_index(
        settings.index,
        threads=settings.duckdb_threads,
        memory_limit=settings.duckdb_memory_limit,
        image_cache_size=settings.image_cache_size,
        show_local_paths=settings.show_local_paths,
    )
    model = index.meta.get("model") or {}
    app.state.index = index
    app.state.site = SiteInfo(
        index_id=index.index_id,
        layers=sorted(index.layers),
        model=index.names.name(str(model.get("name") or "unknown model")),
        public_url=settings.public_url,
        demo=bool(index.meta.get("demo")),
    )
    app.state.uploads = _upload_store(settings)
    app.state.decode_limiter = anyio.CapacityLimiter(DECODE_THREADS)
    app.state.live = _live_service(app, index)
    app.state.live.start()
    app.state.meaning = MeaningService(index, settings, tower=app.state.text_tower)
    app.state.meaning.start()
    warm = threading.Thread(target=_warm, args=(index,), name="clipscope-warm", daemon=True)
    warm.start()
    try:
        yield
    finally:
        warm.join(timeout=10)
        app.state.live.close()
        app.state.meaning.close()
        index.close()


def create_app(
    settings: Settings, live_encoder: LiveEncoder | None = None, text_tower: TextTower | None = None
) -> FastAPI:
    """The app for `settings`; `live_encoder` and `text_tower` supply an already loaded encoder and text
    tower (tests, benchmarks)."""
    application = FastAPI(
        title="CLIP-Scope Explorer",
        version=app_version(),
        lifespan=lifespan,
        description="Feature explorer for sparse autoencoders on CLIP ViT-L/14. Every page has a JSON twin "
        "under /api; see docs/API.md.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    application.state.settings = settings
    application.state.live_encoder = live_encoder
    application.state.text_tower = text_tower
    application.state.templates = make_templates()
    application.state.upload_limiter = upload_limiter(settings)
    install_error_handlers(application)
    application.add_middleware(
        CrossOriginMiddleware, allowed_origins=settings.cors_origins, public_url=settings.public_url
    )
    application.add_middleware(SecurityHeadersMiddleware, embed_origins=settings.embed_origins)  # on every response
    application.add_middleware(HeadMiddleware)
    application.add_middleware(RootPathMiddleware, root_path=settings.root_path)  # outermost: paths as routed
    application.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    register(application)
    check_root_path(settings.root_path, application.routes)
    return application


def app_from_environment() -> FastAPI:
    """The app configured by `CLIPSCOPE_*`; a bad configuration or index exits with one line (code 2)."""
    try:
        settings = get_settings()
        check_index(settings.index)
        return create_app(settings)
    except ValidationError as error:
        sys.stderr.write(f"clipscope-explorer: error: {settings_error(error)}\n")
        raise SystemExit(2) from None
    except (IndexOpenError, ValueError) as error:  # ValueError: a root path the app's own paths start with
        sys.stderr.write(f"clipscope-explorer: error: {error}\n")
        raise SystemExit(2) from None


def __getattr__(name: str):
    if name == "app":
        application = app_from_environment()
        globals()["app"] = application
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
