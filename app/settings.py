"""Server configuration: environment variables prefixed ``CLIPSCOPE_`` (pydantic-settings).

`get_settings()` is cached and is what `clipscope_explorer.app.main` and `clipscope-explorer serve`
use; tests build a `Settings(...)` themselves and pass it to `create_app`.
Every field is documented in docs/API.md (a test checks it).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ORIGIN = re.compile(r"https?://[a-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9a-f:.]+\](:[0-9]{1,5})?")
ROOT_PATH = re.compile(r"(/[A-Za-z0-9._~-]+)+")


def default_upload_store() -> Path:
    """``$XDG_CACHE_HOME/clipscope-explorer/uploads`` (``~/.cache/...`` when unset)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "clipscope-explorer" / "uploads"


def default_search_cache() -> Path:
    """``$XDG_CACHE_HOME/clipscope-explorer/search`` (``~/.cache/...`` when unset)."""
    return default_upload_store().parent / "search"


class Settings(BaseSettings):
    """What the server reads from the environment (``CLIPSCOPE_<NAME>``)."""

    model_config = SettingsConfigDict(env_prefix="CLIPSCOPE_", frozen=True)

    index: Path = Field(description="the index file (.duckdb) written by `precompute`")
    page_size: int = Field(50, ge=1, le=1000, description="rows per page of a layer's feature table by default")
    max_page_size: int = Field(200, ge=1, le=5000, description="largest page_size / limit a request may ask for")
    duckdb_threads: int = Field(
        1, ge=1, le=256, description="DuckDB threads per server process (point lookups gain nothing from more)"
    )
    duckdb_memory_limit: str | None = Field(
        None, description="DuckDB memory_limit per process, e.g. '2GB' (DuckDB's default when unset)"
    )
    image_cache_size: int = Field(
        100_000, ge=0, description="image captions/keys kept in memory per process (0 disables)"
    )
    public_url: str | None = Field(
        None,
        description="this server's public origin for absolute links (OpenGraph, copy-link), e.g. https://explorer.example.org, without a path (the request's own origin when unset)",
    )
    show_local_paths: bool = Field(
        False,
        description="show the absolute local paths the index records (model folder, SAE files, image sources) and those in live-encoding errors; off: pages name them by folder and file name only",
    )
    root_path: str = Field(
        "",
        description="path prefix the app is served under behind a reverse proxy, e.g. /explorer: every link, redirect and image URL starts with it, and requests are accepted with or without it",
    )
    # live encoding of uploaded images
    live: bool = Field(
        True, description="load the model and SAEs at start so images can be uploaded (false: uploads off)"
    )
    live_model: str | None = Field(None, description="open_clip model for uploads (default: the index's model)")
    live_pretrained: str | None = Field(None, description="pretrained tag or file for a built-in live_model name")
    live_sae: str | None = Field(
        None, description="SAE hub repo, folder or file for uploads (default: the index's SAEs)"
    )
    live_layers: Annotated[list[int] | None, NoDecode] = Field(
        None, description="layers encoded for uploads, e.g. 20,22 (default: the index's)"
    )
    live_device: str = Field(
        "auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$", description="device for live encoding: auto, cpu or cuda"
    )
    live_precision: str = Field(
        "auto",
        pattern="^(auto|fp32|bf16)$",
        description="fp32 or bf16 autocast for uploads; auto: the precision the index was built in (meta.precision), fp32 on a CPU without native bfloat16 (AMX or AVX512-BF16)",
    )
    interventions: bool = Field(
        True,
        description="keep each live layer's SAE decoder (memory-mapped from its file) so POST /api/intervene can edit a feature and run the rest of the model (false: a leaner worker, interventions answered 503)",
    )
    live_batch_size: int = Field(8, ge=1, le=256, description="most uploads encoded together in one micro-batch")
    live_queue_size: int = Field(
        16, ge=1, le=10_000, description="uploads in progress at once; more are answered 503 with Retry-After"
    )
    max_upload_bytes: int = Field(
        20_000_000, ge=1, description="largest upload accepted (bytes); larger bodies get 413 while being read"
    )
    store_uploads: bool = Field(
        True, description="keep uploads (downscaled, re-encoded) so /uploads/{id} can show them again"
    )
    upload_store: Path = Field(
        default_factory=default_upload_store, description="writable folder for stored uploads, apart from the index"
    )
    upload_store_max_bytes: int = Field(
        1_000_000_000,
        ge=0,
        description="size cap of the upload store; least recently used uploads are evicted beyond it",
    )
    upload_rate_limit: int = Field(
        30,
        ge=0,
        description="uploads per client address per minute, per server process (0: no limit); more are answered 429 with Retry-After",
    )
    upload_rate_burst: int = Field(
        10, ge=1, description="uploads a client may start at once before upload_rate_limit applies"
    )
    upload_slots_per_client: int = Field(
        4,
        ge=0,
        description="uploads one client address (IPv6: one /64) may have in progress at once, per server process (0: no limit); more are answered 429 with Retry-After",
    )
    upload_min_rate: int = Field(
        50_000,
        ge=1,
        description="bytes per second an upload's body must average once read_timeout has passed; a slower upload is answered 408 and frees its slot",
    )
    # search by meaning (CLIP's text tower and the index's embeddings)
    text: bool = Field(
        True,
        description="load CLIP's text tower at start for search by meaning (false: search by words only; image neighbours still work)",
    )
    search_cache: Path = Field(
        default_factory=default_search_cache,
        description="writable folder where the index's embeddings are exported once per index, as memory-mapped files that every worker shares",
    )
    query_cache_size: int = Field(
        1000,
        ge=0,
        le=1_000_000,
        description="queries whose text embedding and best results are kept per process (0 disables)",
    )
    # connections
    read_timeout: float = Field(
        10.0,
        gt=0,
        le=300,
        description="seconds a connection may take to send a request's headers (counted from when it opens, or from the previous response), and the longest pause in an upload's body; slower connections are closed",
    )
    max_connections: int = Field(
        1000,
        ge=16,
        le=1_000_000,
        description="open connections per server process; at the cap the longest-waiting idle connection is closed to make room (never more than the open-file limit less 128)",
    )
    # cross-origin requests (browsers): GET /api/... is open to every origin; POSTs only to these
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origins allowed to POST /api/encode and /api/intervene from a browser on another site, comma-separated, e.g. https://notebook.example.org ('*': any)",
    )
    # framing: the embeddable feature card only (every other page refuses to be framed)
    embed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"],
        description="origins whose pages may frame /layers/{layer}/features/{feature}/embed, comma-separated ('*': any; empty: none)",
    )

    @field_validator("cors_origins", "embed_origins", mode="before")
    @classmethod
    def _origin_list(cls, value):
        if isinstance(value, str):
            value = value.split(",")
        origins = []
        for item in value or []:
            origin = str(item).strip().rstrip("/").lower()
            if not origin:
                continue
            if origin != "*" and not ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], or *)")
            origins.append(origin)
        return origins

    @field_validator("public_url")
    @classmethod
    def _public_origin(cls, value):
        if value is None:
            return None
        origin = value.strip().rstrip("/").lower()
        if not ORIGIN.fullmatch(origin):
            raise ValueError(
                f"{value!r} is not an origin (scheme://host[:port]; a path prefix goes in CLIPSCOPE_ROOT_PATH)"
            )
        return origin

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, value):
        root = value.strip().rstrip("/")
        if root and not ROOT_PATH.fullmatch(root):
            raise ValueError(f"{value!r} is not a path prefix such as /explorer (segments of letters, digits, . _ ~ -)")
        return root

    @field_validator("live_layers", mode="before")
    @classmethod
    def _layer_list(cls, value):
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",") if part.strip()]
            return parts or None
        return value


def settings_error(error: ValidationError) -> str:
    """One line naming each bad setting by its environment variable."""
    problems = "; ".join(f"CLIPSCOPE_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in error.errors())
    return f"bad settings: {problems}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
