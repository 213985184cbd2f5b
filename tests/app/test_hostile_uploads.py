"""Hostile uploads: malformed multipart bodies, polyglot files, and ids or names meant to make the upload
store write outside its folder. Refused with a 4xx, or stored as freshly encoded pixels, never a 500."""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from clipscope_explorer.app.live.store import UploadStore
from tests import image_cases as cases
from tests.app.route_walk import endpoints, fill
from tests.app.test_hostile import QUERY_VALUES, check_safe

JPEG = cases.encode(cases.noisy((96, 72), seed=31), "JPEG")
PAYLOAD = b"<html><script>alert(document.domain)</script></html>"
B = "bnd"


def part(name: str, body: bytes, filename: str | None = None, content_type: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    head = f"--{B}\r\nContent-Disposition: {disposition}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + body + b"\r\n"


END = f"--{B}--\r\n".encode()
MULTIPART = f"multipart/form-data; boundary={B}"
MALFORMED = {
    "no-content-type": (None, part("file", JPEG, "a.jpg") + END),
    "urlencoded": ("application/x-www-form-urlencoded", b"file=abc&layers=1"),
    "no-boundary": ("multipart/form-data", part("file", JPEG, "a.jpg") + END),
    "empty-boundary": ('multipart/form-data; boundary=""', part("file", JPEG, "a.jpg") + END),
    "other-boundary": ("multipart/form-data; boundary=zzz", part("file", JPEG, "a.jpg") + END),
    "no-closing-boundary": (MULTIPART, part("file", JPEG, "a.jpg")),
    "truncated-part": (MULTIPART, part("file", JPEG, "a.jpg")[:200]),
    "garbage": (MULTIPART, os.urandom(3000)),
    "empty-body": (MULTIPART, b""),
    "no-disposition": (MULTIPART, f"--{B}\r\nContent-Type: image/jpeg\r\n\r\n".encode() + JPEG + b"\r\n" + END),
    "nameless-part": (
        MULTIPART,
        f'--{B}\r\nContent-Disposition: form-data; filename="a.jpg"\r\n\r\n'.encode() + JPEG + b"\r\n" + END,
    ),
    "file-as-field": (MULTIPART, part("file", b"not a file upload") + END),
    "two-files": (MULTIPART, part("file", JPEG, "a.jpg") + part("file", JPEG, "b.jpg") + END),
    "many-fields": (MULTIPART, b"".join(part(f"f{n}", b"x") for n in range(200)) + part("file", JPEG, "a.jpg") + END),
    "huge-field": (MULTIPART, part("layers", b"1," * 40_000) + part("file", JPEG, "a.jpg") + END),
    "huge-part-header": (
        MULTIPART,
        f'--{B}\r\nContent-Disposition: form-data; name="file"; filename="{"a" * 100_000}"\r\n\r\n'.encode()
        + JPEG
        + b"\r\n"
        + END,
    ),
    "binary-field-value": (MULTIPART, part("layers", b"\xff\xfe\x00") + part("file", JPEG, "a.jpg") + END),
    "nested-multipart": (MULTIPART, part("file", part("inner", JPEG, "x.jpg") + END, "a", "multipart/mixed") + END),
}
TOLERATED = {  # odd but harmless: the image is encoded, the oddity ignored
    "binary-field-name": (MULTIPART, part("\xff\xfe", b"x") + part("file", JPEG, "a.jpg") + END),
    "bad-charset": (MULTIPART + "; charset=evil-8", part("file", JPEG, "a.jpg") + END),
    "unknown-fields": (MULTIPART, part("../../x", b"1") + part("sort'--", b"max") + part("file", JPEG, "a.jpg") + END),
}


@pytest.mark.parametrize("path", ["/api/encode", "/upload"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_multipart_is_4xx(live_client, case, path):
    content_type, body = MALFORMED[case]
    headers = {"content-type": content_type} if content_type else {}
    response = live_client.post(path, content=body, headers=headers)
    check_safe(response, case)
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text[:200])


@pytest.mark.parametrize("path", ["/api/encode", "/upload"])
@pytest.mark.parametrize("case", sorted(TOLERATED))
def test_odd_but_harmless_multipart_is_encoded(live_client, case, path):
    content_type, body = TOLERATED[case]
    response = live_client.post(path, content=body, headers={"content-type": content_type})
    check_safe(response, case)
    assert response.status_code in (200, 303), (case, response.status_code, response.text[:200])


def test_lying_content_length_is_413_before_reading(live_client):
    limit = live_client.app.state.settings.max_upload_bytes
    response = live_client.post(
        "/api/encode",
        content=part("file", JPEG, "a.jpg") + END,
        headers={"content-type": MULTIPART, "content-length": str(limit * 10)},
    )
    check_safe(response, "content-length")
    assert response.status_code == 413


@pytest.mark.parametrize(
    "filename",
    [
        "../../../../tmp/clipscope-pwned.jpg",
        "/etc/cron.d/x",
        "..\\..\\x.jpg",
        "a\x00.jpg",
        "%2e%2e%2fx.jpg",
        "x" * 2000,
    ],
)
def test_client_names_never_reach_the_file_system(live_client, filename, tmp_path):
    store = live_client.app.state.uploads.root
    data = cases.encode(cases.noisy((40, 30), seed=len(filename)), "PNG")
    response = live_client.post("/api/encode", files={"file": (filename, data, "image/png")}, data={"layers": "../1"})
    assert response.status_code == 422  # layers are numbers
    response = live_client.post("/api/encode", files={"file": (filename, data, "image/png")})
    check_safe(response, filename)
    assert response.status_code == 200
    assert not os.path.exists("/tmp/clipscope-pwned.jpg")
    for path in store.rglob("*"):
        relative = path.relative_to(store).parts
        assert relative[0] in (".write-test",) or len(relative[0]) == 2, path
        assert all(
            part in ("meta.json", "embedding.npy", "pixels.npz")
            or part.startswith((".tmp-", "L", "view"))
            or len(part) in (2, 32)
            or re.fullmatch(r"edit-[0-9a-f]{32}\.(json|npz)", part)
            for part in relative
        ), path


@pytest.mark.parametrize(
    "upload_id",
    [
        "../../etc",
        "..",
        "/tmp/x",
        "a" * 32 + "\n",
        "A" * 32,
        "a" * 31,
        "a" * 33,
        "aa/../../" + "a" * 23,
        "\x00" * 32,
        "ａ" * 32,
        "0" * 30 + "/.",
        ".",
    ],
)
def test_the_store_refuses_ids_that_are_not_32_hex_digits(tmp_path, upload_id):
    root = tmp_path / "store"
    store = UploadStore(root, max_bytes=10**9)
    codes = {1: (np.ones((5, 2), np.float32), np.ones((5, 2), np.int32))}
    with pytest.raises(ValueError):
        store.save(upload_id, 1, 1, b"\xff", codes, [1])
    assert store.get(upload_id) is None
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["store"]  # nothing written, inside or out


def test_store_paths_stay_inside_the_root(tmp_path):
    store = UploadStore(tmp_path / "store", max_bytes=10**9)
    codes = {3: (np.ones((5, 2), np.float32), np.ones((5, 2), np.int32))}
    saved = store.save("0123456789abcdef" * 2, 10, 10, b"\xff\xd8", codes, [3])
    root = (tmp_path / "store").resolve()
    assert all(p.resolve().is_relative_to(root) for p in saved.folder.iterdir())
    assert sorted(p.name for p in saved.folder.iterdir()) == ["L3.npz", "meta.json", "view.jpg"]


def _png_with_text(text: bytes) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", text.decode())
    return cases.encode(cases.noisy((64, 48), seed=5), "PNG", pnginfo=info)


@pytest.mark.parametrize(
    "make",
    [
        lambda: JPEG + PAYLOAD,
        lambda: _png_with_text(PAYLOAD),
        lambda: cases.encode(cases.noisy((50, 50), seed=8), "GIF", comment=PAYLOAD),
    ],
    ids=["jpeg-with-trailer", "png-text-chunk", "gif-comment"],
)
def test_stored_images_are_reencoded_never_the_uploaded_bytes(live_client, make):
    data = make()
    result = live_client.post("/api/encode", files={"file": ("x.html", data, "text/html")}).json()
    store = live_client.app.state.uploads
    stored = store.get(result["upload_id"])
    for url in (result["image_url"], f"/uploads/{result['upload_id']}/preview.jpg"):
        response = live_client.get(url)
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert PAYLOAD not in response.content and response.content != data
        with Image.open(io.BytesIO(response.content)) as image:
            assert image.format == "JPEG" and not image.info.get("comment")
    for path in stored.folder.iterdir():
        assert PAYLOAD not in path.read_bytes() and path.read_bytes() != data
    page = live_client.post(
        "/upload",
        files={"file": ("x.html", data, "text/html")},
        headers={"HX-Request": "true", "HX-Target": "upload-result"},
    )
    assert page.status_code == 200 and b"alert(document.domain)" not in page.content


def test_hostile_query_parameters_on_a_stored_upload(live_client):
    upload_id = live_client.post("/api/encode", files={"file": ("a.jpg", JPEG, "image/jpeg")}).json()["upload_id"]
    tried = 0
    for endpoint in endpoints(live_client.app):
        if "GET" not in endpoint.methods or endpoint.path_params != ("upload_id",):
            continue
        base = fill(endpoint.path, {"upload_id": upload_id})
        for name in endpoint.query_params:
            for value in QUERY_VALUES:
                check_safe(live_client.get(base, params={name: value}), f"{base}?{name}={value[:30]!r}")
                tried += 1
    assert tried > 100
