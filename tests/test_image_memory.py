"""What decoding one image costs in memory, measured in a fresh process (`tests/memory_probe.py`), on the
server's upload path and on the precompute job's folder path: bounded by the model's input whatever the
aspect ratio, and by `decode_cost` (at most `BYTES_PER_PIXEL` times the pixel limit) for large images
within the limit. docs/OPERATIONS.md quotes these bounds."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from clipscope_explorer.precompute.model.imageio import BYTES_PER_PIXEL, decode_cost
from tests import image_cases as cases

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
STRIP_BUDGET = 32 * MB  # a 1 x 20,000 strip once took 16 GB
OUTPUT_BUDGET = 48 * MB  # model input, stored view or thumbnail, one band of the RGB copy, resize buffers
LARGE = (4000, 4000)
AT_THE_LIMIT = (9400, 9400)  # 88.4 megapixels, under Pillow's 89.5-megapixel limit


def probe(kind: str, files: list[Path], at_once: int = 1) -> dict[Path, int]:
    """{file: bytes the peak RSS rose by while `kind` (upload or precompute) decoded it}."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.memory_probe", kind, str(at_once), *map(str, files)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {Path(name): peak for name, peak in json.loads(result.stdout.splitlines()[-1]).items()}


def write(folder: Path, name: str, data: bytes, extension: str) -> Path:
    """Each file alone in a folder of its own: the precompute path reads a folder."""
    path = folder / name / f"image.{extension}"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


STRIPS = {  # name: (bytes, extension); every one is many thousand times longer than wide
    "png-1x100000": (lambda: cases.encode(Image.new("RGB", (1, 100_000), (200, 30, 30)), "PNG"), "png"),
    "png-100000x1": (lambda: cases.encode(Image.new("RGB", (100_000, 1), (200, 30, 30)), "PNG"), "png"),
    "png-1x4000": (lambda: cases.encode(cases.noisy((1, 4000)), "PNG"), "png"),
    "png-rgba-2x100000": (lambda: cases.encode(Image.new("RGBA", (2, 100_000), (9, 9, 9, 99)), "PNG"), "png"),
    "jpeg-65000x8": (lambda: cases.encode(Image.new("RGB", (65_000, 8), (30, 200, 30)), "JPEG"), "jpg"),
    "gif-animated-1x65000": (lambda: cases.animated((1, 65_000)), "gif"),
    "webp-16383x1": (lambda: cases.encode(Image.new("RGB", (16_383, 1), (1, 2, 3)), "WEBP", lossless=True), "webp"),
    "tiff-float-1x100000": (
        lambda: cases.encode(Image.new("F", (1, 100_000), 3.5), "TIFF", compression="tiff_deflate"),
        "tif",
    ),
    "bmp-100000x1": (lambda: cases.encode(Image.new("RGB", (100_000, 1), (4, 5, 6)), "BMP"), "bmp"),
}


@pytest.fixture(scope="module")
def strips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("strips")
    return {name: write(folder, name, make(), extension) for name, (make, extension) in STRIPS.items()}


def test_an_upload_of_any_aspect_ratio_costs_what_the_model_needs(strips, tmp_path):
    icon = write(tmp_path, "ico-hiding-1x100000", cases.icon_around(STRIPS["png-1x100000"][0]()), "ico")
    peaks = probe("upload", [*strips.values(), icon])
    over = {path.parent.name: f"{peak / MB:.0f} MB" for path, peak in peaks.items() if peak > STRIP_BUDGET}
    assert not over, f"more than {STRIP_BUDGET / MB:.0f} MB: {over}"


def test_precompute_of_any_aspect_ratio_costs_what_the_model_needs(strips):
    peaks = probe("precompute", list(strips.values()))
    over = {path.parent.name: f"{peak / MB:.0f} MB" for path, peak in peaks.items() if peak > STRIP_BUDGET}
    assert not over, f"more than {STRIP_BUDGET / MB:.0f} MB: {over}"


@pytest.mark.slow
def test_large_images_of_every_format_cost_at_most_their_decode_cost(tmp_path):
    pixels = LARGE[0] * LARGE[1]
    files, bounds = [], {}
    for name, (mode, fmt, options) in cases.FORMAT_CASES.items():
        colour = 77 if len(mode) == 1 or mode.startswith("I") else None
        data = cases.encode(Image.new(mode, LARGE, colour), fmt, **options)
        path = write(tmp_path, name, data, fmt.lower())
        cost = decode_cost(Image.open(io.BytesIO(data)))
        assert cost <= 2 * BYTES_PER_PIXEL  # so a decode at half the pixel limit is never refused
        files.append(path)
        bounds[path] = cost * pixels + len(data) + OUTPUT_BUDGET  # the upload's bytes are in memory too
    peaks = probe("upload", files)
    over = {
        path.parent.name: f"{peaks[path] / MB:.0f} MB > {bound / MB:.0f} MB"
        for path, bound in bounds.items()
        if peaks[path] > bound
    }
    assert not over, over


@pytest.fixture(scope="module")
def rgba_at_the_limit(tmp_path_factory) -> Path:
    """A 363 kB RGBA PNG of 9,400 x 9,400 pixels: it took 2.0 GB to decode, and two at once 4.9 GB."""
    data = cases.encode(Image.new("RGBA", AT_THE_LIMIT, (10, 20, 30, 40)), "PNG")
    return write(tmp_path_factory.mktemp("limit"), "rgba-9400", data, "png")


@pytest.mark.slow
@pytest.mark.parametrize("kind, at_once", [("upload", 1), ("upload", 2), ("precompute", 1)])
def test_an_image_at_the_pixel_limit_costs_its_budget(rgba_at_the_limit, kind, at_once):
    pixels = AT_THE_LIMIT[0] * AT_THE_LIMIT[1]
    peak = probe(kind, [rgba_at_the_limit], at_once)[rgba_at_the_limit]
    assert peak <= at_once * (BYTES_PER_PIXEL * pixels + OUTPUT_BUDGET), f"{peak / MB:.0f} MB"
