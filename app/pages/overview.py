"""`/` (what this index is, per-layer metrics beside the model card) and `/layers`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from clipscope_explorer.app.deps import IndexDep
from clipscope_explorer.app.models import LayerInfo, layer_info
from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.templating import render_page

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
    meta = index.meta
    sample = meta.get("sample") or {}
    return IndexInfo(
        index_id=index.index_id, schema_version=meta["schema_version"], created_at=meta.get("created_at"),
        model=meta.get("model") or {}, sae=meta.get("sae") or {}, released_suite=bool(meta.get("released_suite")),
        demo=bool(meta.get("demo")), layers=sorted(index.layers), n_tokens=meta.get("n_tokens"),
        grid=list(index.grid), d_model=meta.get("d_model"), image_size=meta.get("image_size"),
        normalisation=meta.get("normalisation"),
        sample=SampleInfo(sources=[str(s) for s in sample.get("sources") or []], n_images=sample.get("n_images"),
                          n_skipped=sample.get("n_skipped"), skipped=list(sample.get("skipped") or [])),
        top_n=meta.get("top_n"), band_count=meta.get("band_count"), band_size=meta.get("band_size"),
        active_threshold=meta.get("active_threshold"), timings=meta.get("timings") or {},
        versions=meta.get("versions") or {})


def overview_page(index: Index) -> OverviewPage:
    return OverviewPage(index=index_info(index), layers=[layer_info(index, n) for n in sorted(index.layers)])


def layers_page(index: Index) -> LayersPage:
    return LayersPage(layers=[layer_info(index, n) for n in sorted(index.layers)])


@router.get("/api", response_model=OverviewPage, tags=["pages"], summary="Overview: run metadata and per-layer metrics")
def overview_json(index: IndexDep) -> OverviewPage:
    return overview_page(index)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def overview_html(request: Request, index: IndexDep):
    return render_page(request, "overview.html", overview_page(index))


@router.get("/api/layers", response_model=LayersPage, tags=["pages"], summary="Every layer with its metrics")
def layers_json(index: IndexDep) -> LayersPage:
    return layers_page(index)


@router.get("/layers", response_class=HTMLResponse, include_in_schema=False)
def layers_html(request: Request, index: IndexDep):
    return render_page(request, "layers.html", layers_page(index))
