"""Bad and awkward uploads: each refused with a one-line reason and the right status, or decoded
as the precompute job decodes it. Never a 500, never a traceback."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from clipscope_explorer.app.live.input import whole_number
from tests import image_cases as cases

JPEG = cases.encode(cases.noisy((120, 90)), "JPEG")


def post(client, data: bytes, path: str = "/api/encode", **fields):
    return client.post(path, files={"file": ("../../etc/passwd", data, "image/jpeg")}, data=fields)


def check_refusal(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail
    return detail


@pytest.mark.parametrize(
    "make, status, words",
    [
        (lambda: b"", 400, "empty"),
        (lambda: b"hello, this is a text file and not an image at all", 415, "not an image"),
        (cases.svg, 415, "SVG"),
        (cases.truncated_jpeg, 400, "truncated"),
        (cases.corrupt_png, 400, "corrupt"),
        (cases.bomb_png, 413, "pixel"),
    ],
    ids=["empty", "text", "svg", "truncated", "corrupt", "bomb"],
)
def test_bad_images_are_refused(live_client, make, status, words):
    detail = check_refusal(post(live_client, make()), status)
    assert words.lower() in detail.lower()


@pytest.mark.parametrize(
    "make",
    [
        cases.cmyk_jpeg,
        cases.palette_png,
        cases.palette_transparent_png,
        cases.grey_png,
        cases.grey_alpha_png,
        cases.rgba_png,
        cases.sixteen_bit_png,
        cases.animated_gif,
    ],
    ids=["cmyk", "palette", "palette-alpha", "grey", "grey-alpha", "rgba", "16-bit", "animated"],
)
def test_awkward_modes_are_encoded(live_client, make):
    response = post(live_client, make(), layers="2")
    assert response.status_code == 200, response.text
    assert response.json()["layers"]["2"]["n_firing"] > 0


def test_animation_is_encoded_as_its_first_frame(live_client):
    animated = post(live_client, cases.animated_gif(), top="1000").json()
    first_frame = post(live_client, cases.red_png(), top="1000").json()
    assert animated["upload_id"] != first_frame["upload_id"]
    assert animated["layers"] == first_frame["layers"]


def test_exif_orientation_is_applied(live_client):
    rotated = post(live_client, cases.exif_rotated_jpeg(6)).json()
    assert (rotated["width"], rotated["height"]) == (30, 60)


@pytest.mark.parametrize("size", list(cases.TINY.values()), ids=list(cases.TINY))
def test_tiny_and_thin_images_work(live_client, size):
    response = post(live_client, cases.encode(Image.new("RGB", size, (200, 30, 30)), "PNG"))
    assert response.status_code == 200, response.text
    assert (response.json()["width"], response.json()["height"]) == size


@pytest.mark.parametrize(
    "layers", ["abc", "99", "1;DROP TABLE features", "-1", "1,x", "9" * 40, "\u00b2", "\u0661", "9" * 5000]
)
def test_bad_layers_are_422(live_client, layers):
    check_refusal(post(live_client, JPEG, layers=layers), 422)


@pytest.mark.parametrize(
    "fields", [{"sort": "evil"}, {"top": "0"}, {"top": "many"}, {"top": "\u00b2"}, {"top": "9" * 5000}]
)
def test_bad_options_are_422(live_client, fields):
    check_refusal(post(live_client, JPEG, **fields), 422)


@pytest.mark.parametrize(
    "text, number",
    [
        ("0", 0),
        ("20", 20),
        (" 7", None),
        ("-1", None),
        ("\u00b2", None),
        ("\u0661", None),
        ("1e3", None),
        ("", None),
        ("9" * 13, None),
    ],
)
def test_whole_numbers_are_ascii_digits_only(text, number):
    assert whole_number(text) == number


def test_layers_may_repeat_or_be_comma_separated(live_client):
    both = post(live_client, JPEG, layers="1,2").json()
    assert sorted(both["layers"]) == ["1", "2"]
    repeated = live_client.post(
        "/api/encode", files={"file": ("x.jpg", JPEG, "image/jpeg")}, data={"layers": ["2", "1"]}
    ).json()
    assert repeated["layers"] == both["layers"]
    assert list(post(live_client, JPEG, layers="2").json()["layers"]) == ["2"]


def test_too_large_a_body_is_413_with_or_without_content_length(live_client):
    limit = live_client.app.state.settings.max_upload_bytes
    check_refusal(post(live_client, b"\xff\xd8" + b"0" * (limit + 1)), 413)
    boundary = "x" * 16
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()

    def chunks():  # no Content-Length: the limit must hold while reading
        yield head
        for _ in range(limit // 65536 + 10):
            yield b"0" * 65536

    response = live_client.post(
        "/api/encode", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    check_refusal(response, 413)


@pytest.mark.parametrize(
    "kwargs, status",
    [
        ({"content": b"raw bytes", "headers": {"content-type": "image/jpeg"}}, 415),
        ({"content": b"--b\r\nnonsense", "headers": {"content-type": "multipart/form-data; boundary=b"}}, 400),
        ({"data": {"layers": "1"}, "files": {"other": ("a.txt", b"x", "text/plain")}}, 400),
    ],
    ids=["not-multipart", "malformed-multipart", "no-file-field"],
)
def test_malformed_requests(live_client, kwargs, status):
    check_refusal(live_client.post("/api/encode", **kwargs), status)


def test_html_form_errors_are_pages_and_fragments(live_client):
    page = live_client.post("/upload", files={"file": ("a.svg", cases.svg(), "image/svg+xml")})
    assert page.status_code == 415 and "<html" in page.text and "SVG is a vector format" in page.text
    fragment = live_client.post(
        "/upload",
        files={"file": ("a", b"", "image/jpeg")},
        headers={"HX-Request": "true", "HX-Target": "upload-result"},
    )
    assert fragment.status_code == 400 and "<html" not in fragment.text and "the file is empty" in fragment.text
    assert "Traceback" not in page.text + fragment.text


def test_client_file_names_are_never_used(live_client):
    store = live_client.app.state.uploads.root
    data = post(live_client, cases.encode(cases.noisy((64, 64), seed=7), "PNG")).json()
    names = {p.name for p in store.rglob("*")}
    assert "passwd" not in names and data["upload_id"] in names
    assert not any(".." in p.parts for p in store.rglob("*"))


def test_stored_image_is_reencoded_without_metadata(live_client):
    data = post(live_client, cases.exif_with_gps_jpeg()).json()
    image = live_client.get(data["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert b"SecretCam" not in image.content and b"secret" not in image.content
    with Image.open(io.BytesIO(image.content)) as stored:
        assert stored.getexif() == {} and stored.size == (448, 448)
