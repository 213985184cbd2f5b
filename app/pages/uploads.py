"""`/upload` (the form), `POST /api/encode`, and `/uploads/{id}` (a stored result, shareable).

Inference runs in the live encoder's worker thread (`app/live/encoder.py`); decoding
runs in a small thread pool; the event loop only moves bytes. Refusals are
`UploadRejected` (one line, a 4xx or 503 status), rendered as JSON under
`/api` and as HTML elsewhere; nothing here answers 500 for bad input.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

import anyio
from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from clipscope_explorer.app import htmx
from clipscope_explorer.app.caching import immutable
from clipscope_explorer.app.deps import JsonTwin
from clipscope_explorer.app.errors import NotFound
from clipscope_explorer.app.images import upload_preview_jpeg
from clipscope_explorer.app.live.admission import check_rate, upload_slot
from clipscope_explorer.app.live.input import (
    DEFAULT_TOP,
    MAX_TOP,
    UploadRejected,
    decode,
    parse_layers,
    parse_options,
    read_form,
    view_jpeg,
)
from clipscope_explorer.app.live.result import UploadResult, upload_result
from clipscope_explorer.app.live.service import HOW_TO_ENABLE, LiveService
from clipscope_explorer.app.live.store import UPLOAD_ID, VIEW_SIZE, StoredUpload
from clipscope_explorer.app.pages.twins import page
from clipscope_explorer.app.templating import render_page
from clipscope_explorer.app.urls import PAGES, urls_for

if TYPE_CHECKING:
    from clipscope_explorer.app.live.encoder import LiveEncoder

log = logging.getLogger(__name__)
router = APIRouter()
UploadId = Annotated[
    str, Path(pattern=f"^{UPLOAD_ID.pattern}$", max_length=32, description="an upload id (32 hex digits)")
]


class LiveInfo(BaseModel):
    """Whether uploads work here, and with which model, SAEs and layers."""

    state: Literal["off", "loading", "ready", "failed"]
    message: str
    how_to_enable: str | None
    model: str | None
    sae: str | None
    layers: list[int]
    index_layers: list[int]
    precision: str | None  # fp32 or bf16 once the encoder is loaded
    max_upload_bytes: int
    store_uploads: bool
    interventions: bool  # whether POST /api/intervene works here (the encoder keeps the SAE decoders)
    in_progress: int
    batches: int
    largest_batch: int


class UploadFormPage(BaseModel):
    live: LiveInfo
    result: UploadResult | None = None
    error: str | None = None


def live_info(request: Request) -> LiveInfo:
    service: LiveService = request.app.state.live
    settings = request.app.state.settings
    spec, encoder = service.spec, service.encoder
    layers = encoder.layers if encoder else list(spec.layers if spec else [])
    names = request.app.state.index.names
    return LiveInfo(
        state=service.state,
        message=names.text(service.message),
        how_to_enable=HOW_TO_ENABLE if service.state in ("off", "failed") else None,
        model=names.name(spec.model) if spec else None,
        sae=names.name(spec.sae) if spec else None,
        layers=layers,
        index_layers=list(spec.index_layers if spec else []),
        precision=encoder.precision if encoder else None,
        max_upload_bytes=settings.max_upload_bytes,
        store_uploads=request.app.state.uploads is not None,
        interventions=bool(encoder and encoder.interventions),
        in_progress=encoder.batcher.in_progress if encoder else 0,
        batches=encoder.batcher.batches if encoder else 0,
        largest_batch=encoder.batcher.largest_batch if encoder else 0,
    )


def ready_encoder(request: Request) -> LiveEncoder:
    service: LiveService = request.app.state.live
    if service.state == "loading":
        raise UploadRejected(503, "the model is still loading; try again in a moment", {"Retry-After": "5"})
    if service.encoder is None:
        message = request.app.state.index.names.text(service.message)
        raise UploadRejected(503, f"{message or 'Live encoding is not available.'} {HOW_TO_ENABLE}")
    return service.encoder


class PhaseTimes:
    """Wall time per phase of one upload, for the `Server-Timing` header (browser devtools show it)."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now

    def header(self) -> str:
        return ", ".join(f"{phase};dur={seconds * 1e3:.1f}" for phase, seconds in self.phases.items())


@dataclass
class EncodedUpload:
    """One upload's codes on the layers asked for, and what else the request needs of it: its stored entry
    (None when not stored), its view JPEG when not stored, its model input when it was decoded here."""

    upload_id: str
    width: int
    height: int
    codes: dict
    embedding: object  # np.ndarray | None
    stored: StoredUpload | None
    view: bytes | None = None
    pixels: object = None  # torch.Tensor [3, H, W] | None


async def encode_bytes(request: Request, encoder: LiveEncoder, data: bytes, layers: list[int], slot) -> EncodedUpload:
    """Encode an uploaded image's bytes on `layers` (or find them in the store), storing what is new: the
    codes, embedding, view, and the model's input when interventions are on."""
    times, state = request.state.upload_times, request.app.state
    store = state.uploads
    upload_id = await run_in_threadpool(_upload_id, encoder.identity, data)  # hashing 20 MB is not free
    stored = await run_in_threadpool(store.get, upload_id) if store else None
    complete = (
        stored is not None
        and (stored.has_embedding or not encoder.embed)
        and (stored.has_pixels or not encoder.interventions)
    )
    if complete and set(layers) <= set(stored.layers):
        try:
            codes = await run_in_threadpool(stored.codes, layers)
            embedding = await run_in_threadpool(stored.embedding)
            times.lap("read")
            return EncodedUpload(upload_id, stored.width, stored.height, codes, embedding, stored)
        except OSError:  # evicted meanwhile: encode it again
            pass
    times.lap("read")
    decoded = await anyio.to_thread.run_sync(decode, data, encoder.preprocess, limiter=state.decode_limiter)
    times.lap("decode")
    view = asyncio.ensure_future(run_in_threadpool(view_jpeg, decoded.image, VIEW_SIZE))
    try:  # the stored view is made while the model runs
        encoded = await encoder.encode_image(decoded.pixels, layers, slot)
    finally:
        view_bytes = await view
    times.lap("encode")
    width, height = decoded.size
    saved = None
    if store is not None:
        pixels = decoded.pixels.numpy() if encoder.interventions else None
        saved = await run_in_threadpool(
            _save, store, upload_id, width, height, view_bytes, encoded, encoder.spec.index_layers, pixels
        )
        times.lap("store")
    return EncodedUpload(upload_id, width, height, encoded.codes, encoded.embedding, saved, view_bytes, decoded.pixels)


async def encode_upload(request: Request, patches: bool | None) -> tuple[UploadResult, bytes | None]:
    """Read, decode, encode (or find in the store) and describe one upload: (result, view JPEG if not stored).
    The phases' times are left in `request.state.upload_times`."""
    request.state.upload_times = PhaseTimes()
    encoder = ready_encoder(request)
    check_rate(request)
    state = request.app.state
    settings = state.settings
    with upload_slot(request, encoder.batcher) as slot:
        data, fields = await read_form(
            request, settings.max_upload_bytes, settings.read_timeout, settings.upload_min_rate
        )
        options = parse_options(fields, encoder.layers)
        if patches is None:
            patches = (fields.get("patches") or [""])[-1].lower() in ("1", "true", "yes")
        upload = await encode_bytes(request, encoder, data, options.layers, slot)
    result = await run_in_threadpool(
        upload_result,
        state.index,
        urls_for(request),
        upload.upload_id,
        upload.width,
        upload.height,
        encoder.grid,
        upload.codes,
        encoder.spec.index_layers,
        upload.stored is not None,
        options.sort,
        options.top,
        patches,
        upload.embedding,
        state.meaning,
    )
    request.state.upload_times.lap("describe")
    result.interventions = result.stored and encoder.interventions
    return result, (None if upload.stored is not None else upload.view)


def _upload_id(identity: str, data: bytes) -> str:
    """The content hash naming an upload: the same bytes through the same encoder are the same upload."""
    return hashlib.sha256(identity.encode() + b"\0" + data).hexdigest()[:32]


def _save(
    store, upload_id: str, width: int, height: int, view: bytes, encoded, index_layers, pixels
) -> StoredUpload | None:
    try:
        return store.save(upload_id, width, height, view, encoded.codes, list(index_layers), encoded.embedding, pixels)
    except OSError as error:  # a full or read-only disk loses the share link, not the result
        log.warning("upload store: could not save %s: %s", upload_id, error)
        return None


def _data_url(jpeg: bytes | None) -> str | None:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode() if jpeg else None


def json_error(error: UploadRejected) -> JSONResponse:
    return JSONResponse({"detail": error.message}, status_code=error.status, headers=error.headers)


def _html_error(request: Request, error: UploadRejected) -> HTMLResponse:
    page = UploadFormPage(live=live_info(request), error=error.message)
    response = render_page(
        request, "upload.html", page, fragments={"upload-result": "_upload_error.html"}, status_code=error.status
    )
    response.headers.update(error.headers)
    return response


def _stored_link(request: Request, result: UploadResult) -> str:
    """The stored result's page showing what was asked for: its layers (when not all), sort and top."""
    shown = sorted(int(layer) for layer in result.layers)
    query = [] if shown == sorted(request.app.state.live.encoder.layers) else [f"layers={','.join(map(str, shown))}"]
    query.append(f"sort={result.sort}")
    if result.top != DEFAULT_TOP:
        query.append(f"top={result.top}")
    return f"{result.url}?{'&'.join(query)}"


@page(
    router,
    "/upload",
    template="upload.html",
    tags=("uploads",),
    summary="Whether live encoding is available, with which model, SAEs and layers",
)
def upload_form(request: Request) -> UploadFormPage:
    return UploadFormPage(live=live_info(request))


@router.post(
    "/api/encode",
    response_model=UploadResult,
    tags=["uploads"],
    summary="Encode an uploaded image (multipart `file`, optional `layers=20,22`, `sort`, `top`, `patches`)",
    responses={
        400: {"description": "empty, truncated or corrupt image, or malformed body"},
        408: {"description": "the body arrived too slowly"},
        413: {"description": "body over the size limit, or too many pixels"},
        415: {"description": "not an image (SVG included), or not multipart"},
        422: {"description": "bad layers, sort or top"},
        429: {"description": "too many uploads from this client, or too many at once (Retry-After)"},
        503: {"description": "busy (Retry-After) or live encoding unavailable"},
    },
)
async def encode_json(request: Request, response: Response):
    try:
        result, _ = await encode_upload(request, patches=None)
    except UploadRejected as error:
        return json_error(error)
    response.headers["Server-Timing"] = request.state.upload_times.header()
    return result


@router.post("/upload", response_class=HTMLResponse, include_in_schema=False)
async def encode_html(request: Request):
    try:
        result, view = await encode_upload(request, patches=True)
    except UploadRejected as error:
        return _html_error(request, error)
    if result.stored and not htmx.fragment_target(request):
        return RedirectResponse(_stored_link(request, result), status_code=303)
    page = UploadFormPage(live=live_info(request), result=result)
    response = render_page(
        request,
        "upload.html",
        page,
        fragments={"upload-result": "_upload_result.html"},
        extra={"result": result, "image_src": result.image_url or _data_url(view)},
    )
    if result.stored:
        response.headers["HX-Push-Url"] = _stored_link(request, result)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Server-Timing"] = request.state.upload_times.header()
    return response


def stored_upload(request: Request, upload_id: str) -> StoredUpload:
    store = request.app.state.uploads
    stored = store.get(upload_id) if store is not None else None
    if stored is None:
        raise NotFound(
            "This upload is not stored here (uploads are kept while space allows, and not at all with "
            "--no-store-uploads). Upload the image again to see its features.",
            [(PAGES.upload(), "Upload")],
        )
    return stored


class UploadQuery(BaseModel):
    """A stored result's query parameters."""

    layers: str | None = Field(None, max_length=200, description="comma-separated layers (default: all stored)")
    sort: Literal["max", "patch", "cls", "mean"] = Field(
        "max", description="rank features by max (all tokens), max over patches, CLS or mean activation"
    )
    top: int = Field(DEFAULT_TOP, ge=1, le=100_000, description=f"features per layer (capped at {MAX_TOP})")
    patches: bool = Field(False, description="each patch's firing features (the HTML page always has them)")


def stored_result(
    request: Request, upload_id: str, layers: str | None, sort: str, top: int, patches: bool
) -> UploadResult:
    """A stored upload's result; its labels come from the index when its SAE was the index's."""
    stored = stored_upload(request, upload_id)
    try:
        chosen = parse_layers([layers or ""], stored.layers)
    except UploadRejected as error:
        raise HTTPException(error.status, error.message) from None
    try:
        codes, embedding = stored.codes(chosen), stored.embedding()
    except OSError:  # evicted while we looked
        raise NotFound("This upload was just evicted from the store.", [(PAGES.upload(), "Upload")]) from None
    index = request.app.state.index
    result = upload_result(
        index,
        urls_for(request),
        upload_id,
        stored.width,
        stored.height,
        index.grid,
        codes,
        tuple(stored.index_layers),
        True,
        sort,
        min(top, MAX_TOP),
        patches,
        embedding,
        request.app.state.meaning,
    )
    encoder = request.app.state.live.encoder
    result.interventions = encoder is not None and encoder.interventions and stored.has_pixels
    return result


@page(
    router,
    "/uploads/{upload_id}",
    template="upload_result.html",
    fragments={"upload-result": "_upload_result.html"},
    tags=("uploads",),
    summary="A stored upload's features, as returned by POST /api/encode",
)
def upload_page(
    request: Request, upload_id: UploadId, query: Annotated[UploadQuery, Query()], as_json: JsonTwin
) -> UploadResult:
    return stored_result(request, upload_id, query.layers, query.sort, query.top, query.patches or not as_json)


def _immutable(request: Request, etag: str, media_type: str, produce) -> Response:
    """Upload ids are content hashes: what an id names never changes (it may only be evicted)."""
    try:
        return immutable(request, etag, media_type, produce)
    except OSError:
        raise NotFound("This upload was just evicted from the store.") from None


@router.get(
    "/uploads/{upload_id}/image.jpg",
    response_class=Response,
    tags=["uploads"],
    summary="A stored upload as the model saw it (centre square, re-encoded JPEG without metadata)",
    responses={200: {"content": {"image/jpeg": {}}}},
)
def upload_image(request: Request, upload_id: UploadId) -> Response:
    stored = stored_upload(request, upload_id)
    return _immutable(request, f'"{upload_id}-v"', "image/jpeg", stored.view_path.read_bytes)


@router.get(
    "/uploads/{upload_id}/preview.jpg",
    response_class=Response,
    tags=["uploads"],
    summary="OpenGraph preview card of a stored upload: the image and its top features, 1200 x 630",
    responses={200: {"content": {"image/jpeg": {}}}},
)
def upload_preview(request: Request, upload_id: UploadId) -> Response:
    result = stored_result(request, upload_id, None, "max", 7, False)
    stored = stored_upload(request, upload_id)
    layer = result.layers[str(max(int(n) for n in result.layers))]
    tiles = [(f.heatmap, max(f.max_activation or 0.0, f.activation)) for f in layer.features]
    return _immutable(
        request,
        f'"{upload_id}-p1"',
        "image/jpeg",
        lambda: upload_preview_jpeg(stored.view_path.read_bytes(), tiles, tuple(result.grid)),
    )
