"""`/` (what this index is, per-layer metrics beside the model card) and `/layers`."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from clipscope_explorer.app.deps import IndexDep, UrlsDep
from clipscope_explorer.app.models import LayerInfo, layer_info
from clipscope_explorer.app.pages.twins import page
from clipscope_explorer.app.queries import Index

router = APIRouter()


class SampleInfo(BaseModel):
    sources: list[str]
    n_images: int | None
    n_skipped: int | None
    skipped: list[dict]


class IndexInfo(BaseModel):
    """The run metadata of the index (`meta` table, docs/schema.md)."""

    index_id: str
    schema_version: int
    created_at: str | None
    model: dict
    sae: dict
    released_suite: bool
    demo: bool
    layers: list[int]
    n_tokens: int | None
    grid: list[int]
    d_model: int | None
    image_size: int | None
    normalisation: str | None
    sample: SampleInfo
    top_n: int | None
    band_count: int | None
    band_size: int | None
    active_threshold: float | None
    timings: dict
    versions: dict


class OverviewPage(BaseModel):
    index: IndexInfo
    layers: list[LayerInfo]


class LayersPage(BaseModel):
    layers: list[LayerInfo]


def index_info(index: Index) -> IndexInfo:
    meta, names = index.meta, index.names
    sample = names.sample(meta.get("sample") or {})
    model, sae = meta.get("model") or {}, meta.get("sae") or {}
    return IndexInfo(
        index_id=index.index_id,
        schema_version=meta["schema_version"],
        created_at=meta.get("created_at"),
        model={**model, "name": names.name(model.get("name"))},
        sae={**sae, "source": names.name(sae.get("source"))},
        released_suite=bool(meta.get("released_suite")),
        demo=bool(meta.get("demo")),
        layers=sorted(index.layers),
        n_tokens=meta.get("n_tokens"),
        grid=list(index.grid),
        d_model=meta.get("d_model"),
        image_size=meta.get("image_size"),
        normalisation=meta.get("normalisation"),
        sample=SampleInfo(
            sources=[str(s) for s in sample.get("sources") or []],
            n_images=sample.get("n_images"),
            n_skipped=sample.get("n_skipped"),
            skipped=list(sample.get("skipped") or []),
        ),
        top_n=meta.get("top_n"),
        band_count=meta.get("band_count"),
        band_size=meta.get("band_size"),
        active_threshold=meta.get("active_threshold"),
        timings=meta.get("timings") or {},
        versions=meta.get("versions") or {},
    )


@page(router, "/", template="overview.html", summary="Overview: run metadata and per-layer metrics")
def overview_page(index: IndexDep, urls: UrlsDep) -> OverviewPage:
    return OverviewPage(index=index_info(index), layers=[layer_info(index, urls, n) for n in sorted(index.layers)])


@page(router, "/layers", template="layers.html", summary="Every layer with its metrics")
def layers_page(index: IndexDep, urls: UrlsDep) -> LayersPage:
    return LayersPage(layers=[layer_info(index, urls, n) for n in sorted(index.layers)])
