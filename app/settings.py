"""Server configuration: environment variables prefixed ``CLIPSCOPE_`` (pydantic-settings).

`get_settings()` is cached and is what `app.main` and `clipscope-explorer serve`
use; tests build a `Settings(...)` themselves and pass it to `create_app`.
Every field is documented in docs/API.md (a test checks it).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """What the server reads from the environment (``CLIPSCOPE_<NAME>``)."""

    model_config = SettingsConfigDict(env_prefix="CLIPSCOPE_", frozen=True)

    index: Path = Field(description="the index file (.duckdb) written by `precompute`")
    page_size: int = Field(50, ge=1, le=1000, description="rows per page of a layer's feature table by default")
    max_page_size: int = Field(200, ge=1, le=5000, description="largest page_size / limit a request may ask for")
    duckdb_threads: int = Field(1, ge=1, le=256, description="DuckDB threads per server process (point lookups gain nothing from more)")
    duckdb_memory_limit: str | None = Field(None, description="DuckDB memory_limit per process, e.g. '2GB' (DuckDB's default when unset)")
    image_cache_size: int = Field(100_000, ge=0, description="image captions/keys kept in memory per process (0 disables)")
    public_url: str | None = Field(None, description="absolute base URL for OpenGraph links, e.g. https://explorer.example.org (the request's own base URL when unset)")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
