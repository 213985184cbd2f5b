"""`POST /api/intervene` (and the upload page's form), and `/uploads/{id}/interventions/{id}`, a stored
intervention's result (shareable).

An intervention edits one feature of an upload at one layer and runs the rest of the model in the live
encoder's worker (`precompute/model/intervene.py`); the unedited side is the upload's own result, stored
or encoded first. It is an upload for the limits: the same rate limit, per-client share and slots.
Refusals are `UploadRejected` (one line, 4xx or 503), never a 500.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated

import numpy as np
from fastapi import APIRouter, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse

from clipscope_explorer.app import htmx
from clipscope_explorer.app.errors import NotFound, error_response
from clipscope_explorer.app.live.admission import check_rate, upload_slot
from clipscope_explorer.app.live.input import UploadRejected, read_form
from clipscope_explorer.app.live.intervention import (
    InterventionRequest,
    InterventionResult,
    intervention_result,
    parse_intervention,
)
from clipscope_explorer.app.live.store import UPLOAD_ID, StoredUpload
from clipscope_explorer.app.pages.twins import page
from clipscope_explorer.app.pages.uploads import (
    PhaseTimes,
    UploadId,
    encode_bytes,
    json_error,
    ready_encoder,
    stored_upload,
)
from clipscope_explorer.app.templating import render_page
from clipscope_explorer.app.urls import urls_for

if TYPE_CHECKING:
    from clipscope_explorer.app.live.encoder import LiveEncoder

log = logging.getLogger(__name__)
router = APIRouter()
InterventionId = Annotated[
    str, Path(pattern=f"^{UPLOAD_ID.pattern}$", max_length=32, description="an intervention id (32 hex digits)")
]
FRAGMENTS = {"intervention": "_intervention.html"}
OFF = "Interventions are off on this server (started with --no-interventions)."


def _edit_arrays(edited) -> dict[str, np.ndarray]:
    arrays = {"firing": edited.firing}
    for layer, (values, indices) in edited.codes.items():
        arrays[f"values_{layer}"], arrays[f"indices_{layer}"] = values, indices
    if edited.embedding is not None:
        arrays["embedding"] = edited.embedding
    return arrays


def _edited_codes(arrays: dict[str, np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    layers = sorted(int(name.removeprefix("values_")) for name in arrays if name.startswith("values_"))
    return {layer: (arrays[f"values_{layer}"], arrays[f"indices_{layer}"]) for layer in layers}


async def _unedited(request: Request, encoder: LiveEncoder, fields, data: bytes, layers: list[int], slot):
    """(upload id, stored entry or None, model input, codes on `layers`, embedding) of the upload edited: a new
    image (`file`), or a stored upload (`upload_id`) whose missing layers are encoded now."""
    upload_id = ((fields.get("upload_id") or [""])[-1]).strip()
    if data and upload_id:
        raise UploadRejected(422, "give either upload_id (a stored upload) or file (a new image), not both")
    if data:
        upload = await encode_bytes(request, encoder, data, layers, slot)
        pixels = upload.pixels if upload.pixels is not None else await run_in_threadpool(upload.stored.pixels)
        return upload.upload_id, upload.stored, pixels, upload.codes, upload.embedding
    if not upload_id:
        raise UploadRejected(422, "give upload_id (a stored upload) or file (a new image) to edit")
    if not UPLOAD_ID.fullmatch(upload_id):
        raise UploadRejected(422, "upload_id must be the 32 hex digits of a stored upload")
    store = request.app.state.uploads
    stored = await run_in_threadpool(store.get, upload_id) if store is not None else None
    if stored is None:
        raise UploadRejected(
            404, "this upload is not stored here (evicted, or never uploaded): send the image as `file`"
        )
    if not stored.has_pixels:
        raise UploadRejected(409, "this upload was stored without its model input: send the image again as `file`")
    try:
        pixels = await run_in_threadpool(stored.pixels)
        codes = await run_in_threadpool(stored.codes, sorted(set(layers) & set(stored.layers)))
        embedding = await run_in_threadpool(stored.embedding)
    except OSError:
        raise UploadRejected(404, "this upload was just evicted from the store: send the image as `file`") from None
    missing = sorted(set(layers) - set(stored.layers))
    if missing:  # uploaded with fewer layers: encode the rest now, and keep them
        codes.update(await encoder.encode(pixels, missing, slot))
        index_layers = list(encoder.spec.index_layers)
        saved = {n: codes[n] for n in missing}
        try:
            await run_in_threadpool(store.save, upload_id, stored.width, stored.height, b"", saved, index_layers)
        except OSError as error:  # a full disk: this answer is whole, the upload page lacks the layers
            log.warning("upload store: could not add layers to %s: %s", upload_id, error)
    return upload_id, stored, pixels, codes, embedding


async def run_intervention(request: Request, html_form: bool = False) -> InterventionResult:
    """Read the form, find or encode the upload, run (or find) the edited pass, and describe the result.
    `html_form`: the page's form, whose empty patches box means every token (the API refuses an empty list)."""
    request.state.upload_times = PhaseTimes()
    encoder = ready_encoder(request)
    if not encoder.interventions:
        raise UploadRejected(503, OFF)
    check_rate(request)
    state, settings = request.app.state, request.app.state.settings
    with upload_slot(request, encoder.batcher) as slot:
        data, fields = await read_form(
            request, settings.max_upload_bytes, settings.read_timeout, settings.upload_min_rate, file_required=False
        )
        if html_form and not "".join(fields.get("patches", [])).strip():
            fields.pop("patches", None)
        n_features = {layer: encoder.saes[layer].n_features for layer in encoder.layers}
        ask = parse_intervention(fields, n_features, encoder.grid[0] * encoder.grid[1])
        layers = [n for n in encoder.layers if n > ask.layer]
        upload_id, stored, pixels, before, before_embedding = await _unedited(
            request, encoder, fields, data, [ask.layer, *layers], slot
        )
        intervention_id = ask.identity(upload_id)
        found = await run_in_threadpool(stored.edit, intervention_id) if stored is not None else None
        kept = found is not None
        if found is not None:
            arrays = found[1]
        else:
            edited = await encoder.intervene(pixels, ask, layers, slot)
            request.state.upload_times.lap("intervene")
            arrays = _edit_arrays(edited)
            if stored is not None:
                record = {"upload_id": upload_id, **asdict(ask)}
                kept = await run_in_threadpool(_save_edit, state.uploads, stored, intervention_id, record, arrays)
    return await run_in_threadpool(
        _describe, request, upload_id, intervention_id, kept, ask, before, before_embedding, arrays
    )


def _save_edit(store, stored: StoredUpload, intervention_id: str, record: dict, arrays) -> bool:
    try:
        store.save_edit(stored, intervention_id, record, arrays)
    except OSError as error:  # a full or read-only disk loses the share link, not the result
        log.warning("upload store: could not save intervention %s: %s", intervention_id, error)
        return False
    return True


def _describe(request, upload_id, intervention_id, stored, ask, before, before_embedding, arrays):
    state = request.app.state
    return intervention_result(
        state.index,
        urls_for(request),
        state.meaning,
        upload_id,
        intervention_id,
        stored,
        tuple(state.index.grid),
        ask,
        before,
        before_embedding,
        _edited_codes(arrays),
        arrays.get("embedding"),
        arrays["firing"],
        tuple(state.live.spec.index_layers) if state.live.spec else (),
    )


RESPONSES = {
    400: {"description": "empty, truncated or corrupt image, or malformed body"},
    404: {"description": "upload_id names no stored upload"},
    408: {"description": "the body arrived too slowly"},
    409: {"description": "the stored upload has no model input (stored with interventions off): send the file"},
    413: {"description": "body over the size limit, or too many pixels"},
    415: {"description": "not an image, or not a form"},
    422: {
        "description": "bad layer, feature, scale, patches, prompts, template or top; "
        "both or neither of upload_id and file"
    },
    429: {"description": "too many uploads from this client, or too many at once (Retry-After)"},
    503: {"description": "busy (Retry-After), live encoding unavailable, or interventions off"},
}


@router.post(
    "/api/intervene",
    response_model=InterventionResult,
    tags=["uploads"],
    summary="Scale a feature of an upload at one layer and run the rest of the model (form: upload_id or file, "
    "layer, feature, scale, patches, prompts, template, top)",
    responses=RESPONSES,
)
async def intervene_json(request: Request, response: Response):
    try:
        result = await run_intervention(request)
    except UploadRejected as error:
        return json_error(error)
    response.headers["Server-Timing"] = request.state.upload_times.header()
    return result


@router.post("/intervene", response_class=HTMLResponse, include_in_schema=False)
async def intervene_html(request: Request):
    try:
        result = await run_intervention(request, html_form=True)
    except UploadRejected as error:
        if htmx.fragment_target(request):
            response = request.app.state.templates.TemplateResponse(
                request, "_intervention_error.html", {"error": error.message}, status_code=error.status
            )
        else:
            response = error_response(request, error.status, "Could not run this intervention", error.message)
        response.headers.update(error.headers)
        return htmx.add_vary(response)
    if result.url and not htmx.fragment_target(request):
        return RedirectResponse(result.url, status_code=303)
    response = render_page(request, "intervention.html", result, fragments=FRAGMENTS)
    if result.url:
        response.headers["HX-Push-Url"] = result.url
    response.headers["Cache-Control"] = "no-store"
    return response


@page(
    router,
    "/uploads/{upload_id}/interventions/{intervention_id}",
    template="intervention.html",
    fragments=FRAGMENTS,
    tags=("uploads",),
    summary="A stored intervention's result, as returned by POST /api/intervene",
)
def intervention_page(request: Request, upload_id: UploadId, intervention_id: InterventionId) -> InterventionResult:
    stored = stored_upload(request, upload_id)
    found = stored.edit(intervention_id)
    if found is None:
        raise NotFound("This intervention is not stored here: run it again from the upload's page.")
    record, arrays = found
    fields = {name: record[name] for name in InterventionRequest.__dataclass_fields__}
    ask = InterventionRequest(**{**fields, "patches": _tuple(fields["patches"]), "prompts": _tuple(fields["prompts"])})
    layers = sorted(n for n in _edited_codes(arrays) if n > ask.layer)
    try:
        before, embedding = stored.codes(layers), stored.embedding()
    except OSError:
        raise NotFound("This upload was just evicted from the store.") from None
    return _describe(request, upload_id, intervention_id, True, ask, before, embedding, arrays)


def _tuple(value):
    return None if value is None else tuple(value)
