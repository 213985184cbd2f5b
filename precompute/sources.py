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
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clipscope_explorer.precompute.model.imageio import ImageDecodeError, jpeg_bytes, open_picture, square_crop
from clipscope_explorer.precompute.shard_patterns import SourceError, check_patterns, expand_braces
from clipscope_explorer.precompute.shard_reader import REMOTE_PREFIXES, ShardReadError, read_groups

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FOLDER_SHARD_SIZE = 1000
THUMBNAIL_QUALITY = 85


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

    def pin_memory(self) -> Batch:
        """The DataLoader's pin-memory thread calls this (it pins only tensors and objects that have it), so
        the pixels reach a GPU by an asynchronous copy from page-locked memory."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def ordinal(shard: int, position: int) -> int:
    return (shard << 32) | position


def _folder_shards(folder: Path, first_index: int) -> list[Shard]:
    files = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
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
    check_patterns(specs)
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


def _image_bytes(group: dict[str, bytes]) -> bytes | None:
    for ext in ("image",) + tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS):
        if ext in group:
            return group[ext]
    return None


def decode_sample(
    shard: Shard, position: int, key: str, group: dict[str, bytes], preprocess: Callable, thumb_size: int
) -> Sample:
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
        picture = open_picture(data)  # the same decoder as uploads: what they cost is sized by the model
    except ImageDecodeError as error:
        sample.error = f"undecodable image: {error}"
        return sample
    sample.width, sample.height = picture.size
    sample.pixels = preprocess(picture.image)
    sample.thumbnail = jpeg_bytes(square_crop(picture.image, thumb_size), THUMBNAIL_QUALITY)
    return sample


class ShardBatches(torch.utils.data.IterableDataset):
    """Batches from a set of shards; DataLoader workers take shards round-robin.

    progress: {shard index: samples already done} (resume), `done` shards skipped.
    quota: {shard index: max samples} (for --max-images).
    """

    def __init__(
        self,
        shards: list[Shard],
        preprocess: Callable,
        batch_size: int,
        thumb_size: int,
        progress: dict[int, int] | None = None,
        done: set[int] | None = None,
        quota: dict[int, int] | None = None,
    ):
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
    def _collate(
        shard: Shard, samples: list[Sample], done: bool, end: int | None = None, failure: str | None = None
    ) -> Batch:
        good = [s for s in samples if s.error is None]
        pixels = torch.stack([s.pixels for s in good]) if good else None
        for s in good:
            s.pixels = None
        first = (samples[0].ordinal & 0xFFFFFFFF) if samples else (end or 0)
        last = (samples[-1].ordinal & 0xFFFFFFFF) + 1 if samples else (end or 0)
        return Batch(
            shard=shard.index,
            start=first,
            end=end if end is not None else last,
            shard_done=done,
            pixels=pixels,
            ordinals=torch.tensor([s.ordinal for s in good], dtype=torch.long),
            samples=good,
            skipped=[s for s in samples if s.error is not None],
            failure=failure,
        )
