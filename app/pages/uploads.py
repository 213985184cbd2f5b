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
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel

from clipscope_explorer.app import htmx
from clipscope_explorer.app.live.batcher import Busy
from clipscope_explorer.app.errors import NotFound
from clipscope_explorer.app.images import upload_preview_jpeg
from clipscope_explorer.app.live.encoder import HOW_TO_ENABLE, LiveEncoder, LiveService
from clipscope_explorer.app.templating import render_page
from clipscope_explorer.app.live.input import (DEFAULT_TOP, MAX_TOP, UploadRejected, decode, parse_layers, parse_options,
                               read_form, view_jpeg)
from clipscope_explorer.app.live.result import UploadResult, upload_result
from clipscope_explorer.app.live.store import UPLOAD_ID, VIEW_SIZE, StoredUpload

log = logging.getLogger(__name__)
router = APIRouter()
IMMUTABLE = "public, max-age=31536000, immutable"
UploadId = Annotated[str, Path(pattern=f"^{UPLOAD_ID.pattern}$", max_length=32, description="an upload id (32 hex digits)")]


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
    return LiveInfo(state=service.state, message=service.message,
                    how_to_enable=HOW_TO_ENABLE if service.state in ("off", "failed") else None,
                    model=spec.model if spec else None, sae=spec.sae if spec else None, layers=layers,
                    index_layers=list(spec.index_layers if spec else []),
                    precision=encoder.precision if encoder else None, max_upload_bytes=settings.max_upload_bytes,
                    store_uploads=request.app.state.uploads is not None,
                    in_progress=encoder.batcher.in_progress if encoder else 0,
                    batches=encoder.batcher.batches if encoder else 0,
                    largest_batch=encoder.batcher.largest_batch if encoder else 0)


def _encoder(request: Request) -> LiveEncoder:
    service: LiveService = request.app.state.live
    if service.state == "loading":
        raise UploadRejected(503, "the model is still loading; try again in a moment", {"Retry-After": "5"})
    if service.encoder is None:
        raise UploadRejected(503, f"{service.message or 'Live encoding is not available.'} {HOW_TO_ENABLE}")
    return service.encoder


def _check_rate(request: Request) -> None:
    """429 when this client has used up its uploads (`CLIPSCOPE_UPLOAD_RATE_LIMIT`), before the body is read."""
    limiter = request.app.state.upload_limiter
    if limiter is None:
        return
    wait = limiter.acquire(request.client.host if request.client else "unknown")
    if wait:
        per_minute = request.app.state.settings.upload_rate_limit
        raise UploadRejected(429, f"too many uploads from your address (at most {per_minute} a minute); "
                                  f"try again in {wait} s", {"Retry-After": str(wait)})


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


async def encode_upload(request: Request, patches: bool | None) -> tuple[UploadResult, bytes | None]:
    """Read, decode, encode (or find in the store) and describe one upload: (result, view JPEG if not stored).
    The phases' times are left in `request.state.upload_times`."""
    times = request.state.upload_times = PhaseTimes()
    encoder = _encoder(request)
    _check_rate(request)
    state = request.app.state
    store = state.uploads
    view_bytes = None
    try:
        with encoder.batcher.admit() as slot:
            data, fields = await read_form(request, state.settings.max_upload_bytes)
            options = parse_options(fields, encoder.layers)
            if patches is None:
                patches = (fields.get("patches") or [""])[-1].lower() in ("1", "true", "yes")
            upload_id = await run_in_threadpool(_upload_id, encoder.identity, data)  # 20 MB take ~30 ms
            stored = await run_in_threadpool(store.get, upload_id) if store else None
            codes = None
            if stored is not None and set(options.layers) <= set(stored.layers):
                try:
                    codes = await run_in_threadpool(stored.codes, options.layers)
                    width, height = stored.width, stored.height
                except OSError:  # evicted meanwhile: encode it again
                    stored = None
            times.lap("read")
            if codes is None:
                decoded = await anyio.to_thread.run_sync(decode, data, encoder.preprocess,
                                                         limiter=state.decode_limiter)
                times.lap("decode")
                view = asyncio.ensure_future(run_in_threadpool(view_jpeg, decoded.image, VIEW_SIZE))
                try:  # the stored view is made while the model runs
                    codes = await encoder.encode(decoded.pixels, options.layers, slot)
                finally:
                    view_bytes = await view
                times.lap("encode")
                width, height = decoded.image.width, decoded.image.height
                if store is not None:
                    stored = await run_in_threadpool(_save, store, upload_id, width, height, view_bytes, codes,
                                                     encoder.spec.index_layers)
                    times.lap("store")
    except Busy as busy:
        raise UploadRejected(503, "busy encoding other uploads; try again shortly",
                             {"Retry-After": str(busy.retry_after)}) from None
    result = await run_in_threadpool(
        upload_result, state.index, upload_id, width, height, encoder.grid, codes, encoder.spec.index_layers,
        stored is not None, options.sort, options.top, patches)
    times.lap("describe")
    return result, (None if stored is not None else view_bytes)


def _upload_id(identity: str, data: bytes) -> str:
    """The content hash naming an upload: the same bytes through the same encoder are the same upload."""
    return hashlib.sha256(identity.encode() + b"\0" + data).hexdigest()[:32]


def _save(store, upload_id: str, width: int, height: int, view: bytes, codes, index_layers) -> StoredUpload | None:
    try:
        return store.save(upload_id, width, height, view, codes, list(index_layers))
    except OSError as error:  # a full or read-only disk loses the share link, not the result
        log.warning("upload store: could not save %s: %s", upload_id, error)
        return None


def _data_url(jpeg: bytes | None) -> str | None:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode() if jpeg else None


def _json_error(error: UploadRejected) -> JSONResponse:
    return JSONResponse({"detail": error.message}, status_code=error.status, headers=error.headers)


def _html_error(request: Request, error: UploadRejected) -> HTMLResponse:
    page = UploadFormPage(live=live_info(request), error=error.message)
    response = render_page(request, "upload.html", page, fragments={"upload-result": "_upload_error.html"},
                           status_code=error.status)
    response.headers.update(error.headers)
    return response


@router.get("/api/upload", response_model=UploadFormPage, tags=["uploads"],
            summary="Whether live encoding is available, with which model, SAEs and layers")
def upload_form_json(request: Request) -> UploadFormPage:
    return UploadFormPage(live=live_info(request))


@router.get("/upload", response_class=HTMLResponse, include_in_schema=False)
def upload_form_html(request: Request):
    return render_page(request, "upload.html", UploadFormPage(live=live_info(request)))


@router.post("/api/encode", response_model=UploadResult, tags=["uploads"],
             summary="Encode an uploaded image (multipart `file`, optional `layers=20,22`, `sort`, `top`, `patches`)",
             responses={400: {"description": "empty, truncated or corrupt image, or malformed body"},
                        413: {"description": "body over the size limit, or too many pixels"},
                        415: {"description": "not an image (SVG included), or not multipart"},
                        422: {"description": "bad layers, sort or top"},
                        429: {"description": "too many uploads from this client (Retry-After)"},
                        503: {"description": "busy (Retry-After) or live encoding unavailable"}})
async def encode_json(request: Request, response: Response):
    try:
        result, _ = await encode_upload(request, patches=None)
    except UploadRejected as error:
        return _json_error(error)
    response.headers["Server-Timing"] = request.state.upload_times.header()
    return result


@router.post("/upload", response_class=HTMLResponse, include_in_schema=False)
async def encode_html(request: Request):
    try:
        result, view = await encode_upload(request, patches=True)
    except UploadRejected as error:
        return _html_error(request, error)
    if result.stored and not htmx.fragment_target(request):
        return RedirectResponse(f"{result.url}?sort={result.sort}", status_code=303)
    page = UploadFormPage(live=live_info(request), result=result)
    response = render_page(request, "upload.html", page, fragments={"upload-result": "_upload_result.html"},
                           extra={"result": result, "image_src": result.image_url or _data_url(view)})
    if result.stored:
        response.headers["HX-Push-Url"] = f"{result.url}?sort={result.sort}"
    response.headers["Cache-Control"] = "no-store"
    response.headers["Server-Timing"] = request.state.upload_times.header()
    return response


def _stored(request: Request, upload_id: str) -> StoredUpload:
    store = request.app.state.uploads
    stored = store.get(upload_id) if store is not None else None
    if stored is None:
        raise NotFound("This upload is not stored here (uploads are kept while space allows, and not at all with "
                       "--no-store-uploads). Upload the image again to see its features.", [("/upload", "Upload")])
    return stored


Sort = Annotated[Literal["max", "patch", "cls", "mean"],
                 Query(description="rank features by max (all tokens), max over patches, CLS or mean activation")]
Top = Annotated[int, Query(ge=1, le=100_000, description=f"features per layer (capped at {MAX_TOP})")]
Layers = Annotated[str | None, Query(max_length=200, description="comma-separated layers (default: all stored)")]


def stored_result(request: Request, upload_id: str, layers: str | None, sort: str, top: int,
                  patches: bool) -> UploadResult:
    """A stored upload's result; its labels come from the index when its SAE was the index's."""
    stored = _stored(request, upload_id)
    try:
        chosen = parse_layers([layers or ""], stored.layers)
    except UploadRejected as error:
        raise HTTPException(error.status, error.message) from None
    try:
        codes = stored.codes(chosen)
    except OSError:  # evicted while we looked
        raise NotFound("This upload was just evicted from the store.", [("/upload", "Upload")]) from None
    index = request.app.state.index
    return upload_result(index, upload_id, stored.width, stored.height, index.grid, codes,
                         tuple(stored.index_layers), True, sort, min(top, MAX_TOP), patches)


@router.get("/api/uploads/{upload_id}", response_model=UploadResult, tags=["uploads"],
            summary="A stored upload's features, as returned by POST /api/encode")
def upload_json(request: Request, upload_id: UploadId, layers: Layers = None, sort: Sort = "max", top: Top = DEFAULT_TOP,
                patches: bool = False) -> UploadResult:
    return stored_result(request, upload_id, layers, sort, top, patches)


@router.get("/uploads/{upload_id}", response_class=HTMLResponse, include_in_schema=False)
def upload_html(request: Request, upload_id: UploadId, layers: Layers = None, sort: Sort = "max", top: Top = DEFAULT_TOP):
    result = stored_result(request, upload_id, layers, sort, top, True)
    return render_page(request, "upload_result.html", result, fragments={"upload-result": "_upload_result.html"},
                       extra={"result": result, "image_src": result.image_url})


def _immutable(request: Request, etag: str, media_type: str, produce) -> Response:
    """Upload ids are content hashes: what an id names never changes (it may only be evicted)."""
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
    if etag in {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    try:
        body = produce()
    except OSError:
        raise NotFound("This upload was just evicted from the store.") from None
    return Response(body, media_type=media_type, headers=headers)


@router.get("/uploads/{upload_id}/image.jpg", response_class=Response, tags=["uploads"],
            summary="A stored upload as the model saw it (centre square, re-encoded JPEG without metadata)",
            responses={200: {"content": {"image/jpeg": {}}}})
def upload_image(request: Request, upload_id: UploadId) -> Response:
    stored = _stored(request, upload_id)
    return _immutable(request, f'"{upload_id}-v"', "image/jpeg", stored.view_path.read_bytes)


@router.get("/uploads/{upload_id}/preview.jpg", response_class=Response, tags=["uploads"],
            summary="OpenGraph preview card of a stored upload: the image and its top features, 1200 x 630",
            responses={200: {"content": {"image/jpeg": {}}}})
def upload_preview(request: Request, upload_id: UploadId) -> Response:
    result = stored_result(request, upload_id, None, "max", 7, False)
    stored = _stored(request, upload_id)
    layer = result.layers[str(max(int(n) for n in result.layers))]
    tiles = [(f.heatmap, max(f.max_activation or 0.0, f.activation)) for f in layer.features]
    return _immutable(request, f'"{upload_id}-p1"', "image/jpeg",
                      lambda: upload_preview_jpeg(stored.view_path.read_bytes(), tiles, tuple(result.grid)))
