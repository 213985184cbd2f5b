"""Reading an upload: the body under a size limit, the multipart form, its options, the image.

Every refusal is an `UploadRejected` with an HTTP status and a one-line reason
(the routes turn it into JSON or HTML); nothing here can produce a 500:
- the size limit is enforced while the body is read (413), before it is parsed, and so
  is its pace (408);
- a body that is not multipart/form-data is 415, a malformed one 400;
- the image goes through `clipscope_explorer.precompute.model.imageio.open_picture`, the decoder of the
  precompute job: empty, truncated or corrupt files are 400, SVG and other
  non-images 415, decompression bombs 413; what an upload keeps after decoding
  (model input, view) is sized by the model, not by the image;
- `layers`, `sort` and `top` are validated (422).
The client's file name is ignored.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request

from clipscope_explorer.app.live.store import VIEW_SIZE
from clipscope_explorer.precompute.model.imageio import ImageDecodeError, jpeg_bytes, open_picture, square_crop

URLENCODED = "application/x-www-form-urlencoded"
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, headers and small fields on top of the file
SORTS = ("max", "patch", "cls", "mean")
DEFAULT_TOP, MAX_TOP = 16, 1000
DECODE_STATUS = {"empty": 400, "truncated": 400, "corrupt": 400, "svg": 415, "not_image": 415, "too_large": 413}


class UploadRejected(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def whole_number(text: str, max_digits: int = 12) -> int | None:
    """`text` as a non-negative integer if it is one in ASCII digits (`"²".isdigit()` is true, yet `int`
    refuses it; so does `int` past 4,300 digits), else None."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= max_digits else None


def _megabytes(n: int) -> str:
    return f"{n / 1_000_000:.3g} MB"


async def read_form(
    request: Request, max_bytes: int, read_timeout: float, min_rate: int, file_required: bool = True
) -> tuple[bytes, dict[str, list[str]]]:
    """(file bytes, other fields) of a multipart upload, refusing bodies over the limit as they arrive, and
    bodies that pause longer than `read_timeout` seconds or arrive slower than `min_rate` bytes/s on average
    once `read_timeout` has passed (408), so a slow client holds its upload slot for a bounded time.
    Without `file_required`, a form without a file (multipart or url-encoded) gives empty bytes."""
    kind = request.headers.get("content-type", "").lower()
    if kind.startswith(URLENCODED) and not file_required:
        limit = FORM_OVERHEAD  # fields only
        too_large = UploadRejected(413, f"a form without a file may hold at most {FORM_OVERHEAD // 1024} kB")
    elif kind.startswith("multipart/form-data"):
        limit = max_bytes + FORM_OVERHEAD
        too_large = UploadRejected(413, f"the upload is larger than the {_megabytes(max_bytes)} limit")
    elif file_required:
        raise UploadRejected(415, "send the image as multipart/form-data in a field named `file`")
    else:
        raise UploadRejected(415, "send the form as multipart/form-data (with a `file`) or url-encoded")
    declared = whole_number(request.headers.get("content-length", ""), max_digits=20)
    if declared is not None and declared > limit:
        raise too_large
    body = bytearray()
    start = time.monotonic()
    chunks = request.stream()
    try:
        while True:
            pace = start + read_timeout + len(body) / min_rate - time.monotonic()
            try:
                chunk = await asyncio.wait_for(anext(chunks), max(0.0, min(read_timeout, pace)))
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise UploadRejected(
                    408,
                    f"the upload arrived too slowly (it may pause at most {read_timeout:g} s "
                    f"and must average {min_rate / 1000:g} kB/s)",
                    {"Connection": "close"},
                ) from None
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        raise UploadRejected(400, "the client disconnected during the upload") from None

    async def replay():
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=32, max_part_size=64 * 1024)
    except MultiPartException as error:
        raise UploadRejected(400, f"malformed multipart body: {error.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            if file_required or upload is not None:
                raise UploadRejected(400, "no file: send the image in the multipart field `file`")
            data = b""
        else:
            data = await upload.read()
        fields = {key: [v for v in form.getlist(key) if isinstance(v, str)] for key in form.keys() if key != "file"}
    finally:
        await form.close()
    if len(data) > max_bytes:
        raise too_large
    return data, fields


@dataclass(frozen=True)
class Options:
    layers: list[int]
    sort: str
    top: int


def parse_layers(values: list[str], available: list[int]) -> list[int]:
    """`20,22` or repeated `layers` fields; empty means every available layer."""
    parts = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not parts:
        return list(available)
    layers = []
    for part in parts:
        layer = whole_number(part, max_digits=6)
        if layer is None:
            raise UploadRejected(422, f"layers: {part[:20]!r} is not a layer number (use e.g. layers=20,22)")
        layers.append(layer)
    missing = sorted(set(layers) - set(available))
    if missing:
        raise UploadRejected(
            422, f"layers: {', '.join(map(str, missing))} not encoded here; available: {', '.join(map(str, available))}"
        )
    return sorted(set(layers))


def parse_options(fields: dict[str, list[str]], available: list[int]) -> Options:
    layers = parse_layers(fields.get("layers", []), available)
    sort = (fields.get("sort") or ["max"])[-1] or "max"
    if sort not in SORTS:
        raise UploadRejected(422, f"sort must be one of {', '.join(SORTS)}")
    top = whole_number(((fields.get("top") or [""])[-1] or str(DEFAULT_TOP)).strip(), max_digits=9)
    if top is None or top < 1:
        raise UploadRejected(422, "top must be a whole number of at least 1 (at most 9 digits)")
    return Options(layers, sort, min(top, MAX_TOP))


@dataclass(frozen=True)
class Decoded:
    image: object  # PIL.Image.Image, RGB: the model's view (centre square) at the stored view's size
    pixels: object  # torch.Tensor [3, H, W], the model's preprocessing
    size: tuple[int, int]  # the uploaded image's width and height


def decode(data: bytes, preprocess, view_size: int = VIEW_SIZE) -> Decoded:
    """Decode exactly as the precompute job does (`open_picture` + the model's preprocess); runs in a thread.
    The decoded image is dropped here: an upload waiting for the model holds only what its answer needs."""
    try:
        picture = open_picture(data)
    except ImageDecodeError as error:
        raise UploadRejected(DECODE_STATUS.get(error.kind, 400), str(error)) from None
    return Decoded(square_crop(picture.image, view_size), preprocess(picture.image), picture.size)


def view_jpeg(image, size: int) -> bytes:
    """The model's view of an upload (centre square) at `size`, re-encoded without metadata."""
    return jpeg_bytes(square_crop(image, size))
