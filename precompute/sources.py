"""Image sources: webdataset tar shards (img2dataset layout) and image folders.

Every source is cut into shards, numbered in the order given. A sample's
*ordinal* is ``shard_index << 32 | position_in_shard``: it orders samples the
same way in every run, resumed or distributed, and breaks activation ties.

Batches never straddle shards and always start at a multiple of the batch
size within their shard, so a resumed or distributed run sees exactly the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import torch

from precompute.imageio import ImageDecodeError, jpeg_bytes, open_rgb, square_crop

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://")
FOLDER_SHARD_SIZE = 1000
READ_RETRIES = 3
RETRY_BACKOFF_S = float(os.environ.get("CLIPSCOPE_RETRY_BACKOFF", 1.0))
REMOTE_TIMEOUT_S = float(os.environ.get("CLIPSCOPE_REMOTE_TIMEOUT", 60))
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
    failure: str | None = None  # the shard could not be read to its end (retries exhausted)


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


def _check_protocol(url: str) -> None:
    import fsspec

    try:
        fsspec.get_filesystem_class(url.split("://", 1)[0])
    except ImportError as error:  # s3:// needs s3fs, gs:// needs gcsfs
        raise SourceError(f"{url}: {error} (for s3:// install clipscope-explorer[s3])") from error


def resolve_sources(specs: list[str]) -> list[Shard]:
    """Shards for the given paths, globs, brace ranges, URLs and folders; errors before compute."""
    shards: list[Shard] = []
    for spec in specs:
        for item in expand_braces(spec):
            if item.startswith(REMOTE_PREFIXES):
                _check_protocol(item)
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

        options = {}
        if location.startswith(("http://", "https://")):
            import aiohttp

            options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=REMOTE_TIMEOUT_S,
                                                                         sock_read=REMOTE_TIMEOUT_S)}
        return fsspec.open(location, "rb", **options).open()
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
        try:
            group = {"image": path.read_bytes()}
        except OSError as error:  # one file gone or unreadable: that sample is skipped, not the shard
            yield relative, {"error": f"unreadable file: {type(error).__name__}"}
            continue
        caption = path.with_suffix(".txt")
        if caption.is_file():
            group["txt"] = caption.read_bytes()
        yield relative, group


class ShardReadError(OSError):
    """A shard could not be read, even after retries."""


def read_groups(shard: Shard, start: int = 0) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(position, key, group) of a shard from `start` on.

    A read error (shard gone, truncated, network timeout) is retried with
    exponential backoff, resuming after the last sample delivered; after
    READ_RETRIES failures the shard is given up with a ShardReadError.
    """
    wanted = start
    for attempt in range(READ_RETRIES + 1):
        try:
            groups = _folder_groups(shard) if shard.is_folder else _tar_groups(shard)
            for position, (key, group) in enumerate(groups):
                if position >= wanted:
                    yield position, key, group
                    wanted = position + 1
            break
        except (OSError, tarfile.TarError, EOFError, asyncio.TimeoutError) as error:
            reason = f"{type(error).__name__}: {error}"
            if attempt < READ_RETRIES:
                time.sleep(RETRY_BACKOFF_S * 2**attempt)
    else:
        raise ShardReadError(f"{shard.label}: gave up after {READ_RETRIES + 1} attempts, "
                             f"{wanted} samples read ({reason})")
    expected = known_size(shard)
    if expected is not None and wanted < expected:  # a tar cut at a member boundary reads as a short tar
        raise ShardReadError(f"{shard.label}: truncated, {wanted} of the {expected} samples its stats file lists")


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
        sample.error = group.get("error", "no image member")
        return sample
    try:
        image = open_rgb(data)
    except ImageDecodeError as error:
        sample.error = f"undecodable image: {error}"
        return sample
    sample.width, sample.height = image.size
    sample.pixels = preprocess(image)
    sample.thumbnail = jpeg_bytes(square_crop(image, thumb_size), THUMBNAIL_QUALITY)
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
        pending: list[Sample] = []
        end, failure = start, None
        try:
            for position, key, group in read_groups(shard, start):
                if limit is not None and position >= limit:
                    break
                pending.append(decode_sample(shard, position, key, group, self.preprocess, self.thumb_size))
                end = position + 1
                if len(pending) == self.batch_size:
                    yield self._collate(shard, pending, done=False)
                    pending = []
        except ShardReadError as error:
            failure = str(error)
        yield self._collate(shard, pending, done=True, end=end, failure=failure)

    @staticmethod
    def _collate(shard: Shard, samples: list[Sample], done: bool, end: int | None = None,
                 failure: str | None = None) -> Batch:
        good = [s for s in samples if s.error is None]
        pixels = torch.stack([s.pixels for s in good]) if good else None
        for s in good:
            s.pixels = None
        first = (samples[0].ordinal & 0xFFFFFFFF) if samples else (end or 0)
        last = (samples[-1].ordinal & 0xFFFFFFFF) + 1 if samples else (end or 0)
        return Batch(
            shard=shard.index, start=first, end=end if end is not None else last, shard_done=done,
            pixels=pixels, ordinals=torch.tensor([s.ordinal for s in good], dtype=torch.long),
            samples=good, skipped=[s for s in samples if s.error is not None], failure=failure,
        )
