"""Test data written in the real layouts: img2dataset shards and image folders."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square")


def shape_image(seed: int, size: tuple[int, int] = (256, 224)) -> tuple[Image.Image, str]:
    rng = random.Random(seed)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    image = Image.new("RGB", size, tuple(rng.randrange(0, 60) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    r = rng.randrange(20, 60)
    x, y = rng.randrange(r, size[0] - r), rng.randrange(r, size[1] - r)
    box = (x - r, y - r, x + r, y + r)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image, f"a {colour} {shape} on a dark background"


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    folder: Path, n_shards: int, per_shard: int, corrupt: set[int] = frozenset(), seed: int = 0
) -> list[Path]:
    """img2dataset output: NNNNN.tar with KEY.jpg/.txt/.json, plus .parquet and _stats.json beside."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(n_shards):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                n = shard * per_shard + i
                key = f"{shard:05d}{i:04d}"
                image, caption = shape_image(seed * 100_000 + n)
                data = b"\xff\xd8 not really a jpeg" if n in corrupt else jpeg(image)
                _add(tar, f"{key}.jpg", data)
                _add(tar, f"{key}.txt", caption.encode())
                meta = {
                    "url": f"https://example.org/{key}.jpg",
                    "caption": caption,
                    "key": key,
                    "width": image.width,
                    "height": image.height,
                    "status": "success",
                }
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"successes": per_shard}))
        (folder / f"{shard:05d}.parquet").write_bytes(b"")
        paths.append(path)
    return paths


def write_folder(folder: Path, n: int, seed: int = 1) -> Path:
    """A nested folder of images with same-named .txt captions for some."""
    for i in range(n):
        image, caption = shape_image(seed * 100_000 + i)
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        image.save(sub / f"img{i:03d}.png")
        if i % 3:
            (sub / f"img{i:03d}.txt").write_text(caption)
    return folder


VOLATILE_META = {"timings", "created_at", "index_id"}


def index_contents(path) -> dict:
    """Everything an index says, minus what differs between identical runs (ids, times)."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        return {
            "meta": {k: v for k, v in con.execute("SELECT key, value FROM meta").fetchall() if k not in VOLATILE_META},
            "layers": con.execute("SELECT * FROM layers ORDER BY layer").fetchall(),
            "features": con.execute("SELECT * FROM features ORDER BY layer, feature").fetchall(),
            "examples": con.execute(
                "SELECT e.* EXCLUDE (image_id), i.key FROM examples e JOIN images i USING (image_id) "
                "ORDER BY layer, feature, kind, band, rank"
            ).fetchall(),
            "images": con.execute("SELECT * FROM images ORDER BY image_id").fetchall(),
            "samples": con.execute("SELECT * FROM samples ORDER BY image_id").fetchall(),
            "sample_codes": con.execute("SELECT * FROM sample_codes ORDER BY layer, image_id").fetchall(),
            "vocabulary": con.execute("SELECT * FROM vocabulary ORDER BY term").fetchall(),
        }
    finally:
        con.close()
