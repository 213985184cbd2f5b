"""Image sources: webdataset tar shards (img2dataset layout) and image folders.

Every source is cut into shards, numbered in the order given. A sample's
*ordinal* is ``shard_index << 32 | position_in_shard``: it orders samples the
same way in every run, resumed or distributed, and breaks activation ties.

Batches never straddle shards and always start at a multiple of the batch
size within their shard, so a resumed or distributed run sees exactly the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import glob
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://")
FOLDER_SHARD_SIZE = 1000
THUMBNAIL_QUALITY = 85


class SourceError(ValueError):
    """A source named on the command line cannot be used."""


@dataclass(frozen=True)
class Shard:
    index: int
    location: str  # tar path or URL; for folders, the folder
    members: tuple[str, ...] = ()  # folder shards: files relative to the folder

    @property
    def is_folder(self) -> bool:
        return bool(self.members)

    @property
    def label(self) -> str:
        if self.is_folder:
            return f"{self.location}[{self.members[0]}..]"
        return self.location


@dataclass
class Sample:
    """One decoded (or failed) sample; `error` set means it is skipped."""

    ordinal: int
    source: str
    key: str
    url: str | None = None
    caption: str | None = None
    width: int = 0
    height: int = 0
    pixels: torch.Tensor | None = None
    thumbnail: bytes = b""
    error: str | None = None


@dataclass
class Batch:
    shard: int
    start: int  # position in shard of the first sample
    end: int  # position after the last sample
    shard_done: bool
    pixels: torch.Tensor | None
    ordinals: torch.Tensor  # [n] int64
    samples: list[Sample] = field(default_factory=list)  # decoded ones, pixels dropped
    skipped: list[Sample] = field(default_factory=list)


def ordinal(shard: int, position: int) -> int:
    return (shard << 32) | position


BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a..b}`` ranges (zero padding kept) and ``{x,y}`` lists, leftmost first, as a shell does."""
    match = BRACE.search(pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    if match.group(3) is not None:
        options = match.group(3).split(",")
    else:
        low, high = match.group(1), match.group(2)
        width = len(low) if low.startswith("0") else 0
        options = [f"{n:0{width}d}" for n in range(int(low), int(high) + 1)]
    return [x for option in options for x in expand_braces(head + option + tail)]


def _folder_shards(folder: Path, first_index: int) -> list[Shard]:
    files = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise SourceError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    chunks = [files[i : i + FOLDER_SHARD_SIZE] for i in range(0, len(files), FOLDER_SHARD_SIZE)]
    return [Shard(first_index + n, str(folder), tuple(chunk)) for n, chunk in enumerate(chunks)]


def resolve_sources(specs: list[str]) -> list[Shard]:
    """Shards for the given paths, globs, brace ranges, URLs and folders; errors before compute."""
    shards: list[Shard] = []
    for spec in specs:
        for item in expand_braces(spec):
            if item.startswith(REMOTE_PREFIXES):
                shards.append(Shard(len(shards), item))
                continue
            path = Path(item).expanduser()
            if path.is_dir():
                shards.extend(_folder_shards(path, len(shards)))
                continue
            matches = sorted(glob.glob(str(path))) if glob.has_magic(item) else [str(path)]
            if not matches:
                raise SourceError(f"no files match {item}")
            for match in matches:
                if not Path(match).is_file():
                    raise SourceError(f"shard {match} does not exist")
                if not match.endswith(".tar"):
                    raise SourceError(f"{match} is neither a .tar shard nor an image folder")
                shards.append(Shard(len(shards), match))
    if not shards:
        raise SourceError("no image sources given")
    return shards


# ---------------------------------------------------------------- reading


def _open(location: str):
    if location.startswith(REMOTE_PREFIXES):
        import fsspec

        return fsspec.open(location, "rb").open()
    return open(location, "rb")


def _tar_groups(shard: Shard) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a tar shard, in order."""
    key, group = None, {}
    with _open(shard.location) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            path = PurePosixPath(member.name)
            base, _, ext = path.name.partition(".")
            member_key = str(path.with_name(base))
            if member_key != key and key is not None:
                yield key, group
                group = {}
            key = member_key
            group[ext.lower()] = tar.extractfile(member).read()
    if key is not None:
        yield key, group


def _folder_groups(shard: Shard) -> Iterator[tuple[str, dict[str, bytes]]]:
    root = Path(shard.location)
    for relative in shard.members:
        path = root / relative
        group = {"image": path.read_bytes()}
        caption = path.with_suffix(".txt")
        if caption.is_file():
            group["txt"] = caption.read_bytes()
        yield relative, group


def count_samples(shard: Shard) -> int:
    if shard.is_folder:
        return len(shard.members)
    return sum(1 for _ in _tar_groups(shard))


def known_size(shard: Shard) -> int | None:
    """Samples in a shard without reading it: folder listing, or img2dataset's stats file."""
    if shard.is_folder:
        return len(shard.members)
    stats = Path(shard.location).with_name(Path(shard.location).stem + "_stats.json")
    if shard.location.startswith(REMOTE_PREFIXES) or not stats.is_file():
        return None
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (ValueError, KeyError, OSError):
        return None


def _image_bytes(group: dict[str, bytes]) -> bytes | None:
    for ext in ("image",) + tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS):
        if ext in group:
            return group[ext]
    return None


def square_crop(image: Image.Image, size: int) -> Image.Image:
    """The model's view: shortest side to `size` (bicubic), centre crop."""
    scale = size / min(image.size)
    resized = image.resize(
        (max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC
    )
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def decode_sample(shard: Shard, position: int, key: str, group: dict[str, bytes],
                  preprocess: Callable, thumb_size: int) -> Sample:
    sample = Sample(ordinal(shard.index, position), shard.location, key)
    meta = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"])
        except (ValueError, UnicodeDecodeError):
            meta = {}
    sample.url = meta.get("url")
    if "txt" in group:
        sample.caption = group["txt"].decode("utf-8", "replace").strip()
    elif isinstance(meta.get("caption"), str):
        sample.caption = meta["caption"]
    data = _image_bytes(group)
    if data is None:
        sample.error = "no image member"
        return sample
    try:
        with Image.open(io.BytesIO(data)) as raw:
            raw.seek(0)
            image = ImageOps.exif_transpose(raw).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        sample.error = f"undecodable image: {type(error).__name__}"
        return sample
    sample.width, sample.height = image.size
    sample.pixels = preprocess(image)
    buffer = io.BytesIO()
    square_crop(image, thumb_size).save(buffer, "JPEG", quality=THUMBNAIL_QUALITY)
    sample.thumbnail = buffer.getvalue()
    return sample


class ShardBatches(torch.utils.data.IterableDataset):
    """Batches from a set of shards; DataLoader workers take shards round-robin.

    progress: {shard index: samples already done} (resume), `done` shards skipped.
    quota: {shard index: max samples} (for --max-images).
    """

    def __init__(self, shards: list[Shard], preprocess: Callable, batch_size: int, thumb_size: int,
                 progress: dict[int, int] | None = None, done: set[int] | None = None,
                 quota: dict[int, int] | None = None):
        self.shards, self.preprocess, self.batch_size = shards, preprocess, batch_size
        self.thumb_size = thumb_size
        self.progress, self.done, self.quota = progress or {}, done or set(), quota or {}

    def _mine(self) -> list[Shard]:
        info = torch.utils.data.get_worker_info()
        todo = [s for s in self.shards if s.index not in self.done and self.quota.get(s.index, 1) > 0]
        if info is None:
            return todo
        return todo[info.id :: info.num_workers]

    def __iter__(self) -> Iterator[Batch]:
        for shard in self._mine():
            yield from self._shard_batches(shard)

    def _shard_batches(self, shard: Shard) -> Iterator[Batch]:
        start = self.progress.get(shard.index, 0)
        limit = self.quota.get(shard.index)
        groups = _folder_groups(shard) if shard.is_folder else _tar_groups(shard)
        pending: list[Sample] = []
        position = -1
        for position, (key, group) in enumerate(groups):
            if limit is not None and position >= limit:
                position -= 1
                break
            if position < start:
                continue
            pending.append(decode_sample(shard, position, key, group, self.preprocess, self.thumb_size))
            if len(pending) == self.batch_size:
                yield self._collate(shard, pending, done=False)
                pending = []
        end = position + 1
        if pending or end >= start:
            yield self._collate(shard, pending, done=True, end=end)

    @staticmethod
    def _collate(shard: Shard, samples: list[Sample], done: bool, end: int | None = None) -> Batch:
        good = [s for s in samples if s.error is None]
        pixels = torch.stack([s.pixels for s in good]) if good else None
        for s in good:
            s.pixels = None
        first = (samples[0].ordinal & 0xFFFFFFFF) if samples else (end or 0)
        last = (samples[-1].ordinal & 0xFFFFFFFF) + 1 if samples else (end or 0)
        return Batch(
            shard=shard.index, start=first, end=end if end is not None else last, shard_done=done,
            pixels=pixels, ordinals=torch.tensor([s.ordinal for s in good], dtype=torch.long),
            samples=good, skipped=[s for s in samples if s.error is not None],
        )
