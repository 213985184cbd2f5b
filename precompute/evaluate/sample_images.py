"""The pixels of any sample image, by `samples.image_id`, for judges that look at images.

An image some feature shows has its thumbnail in the index (`images.thumbnail`, the model's input square): that
is what is returned. Any other sample is read from where the index says it came from: `samples.source` is an
image folder (the file is `source/key`) or a webdataset tar shard, a local path or a URL (the member named
`key` plus an image extension; uncompressed tar, as img2dataset writes). A shard's member offsets are listed
once and kept, so that many reads of one shard do not rescan it.

When the images have moved since the index was built, `images_root` stands for the folder that held each
source: a shard `/old/00001.tar` is read as `images_root/00001.tar`, an image folder `/old/photos` as
`images_root/photos` (or as `images_root` itself when that has no `photos` folder). The recorded source still
names the image (`identities`), so answers cached under it stay valid after a move.

Every image is decoded through `open_rgb` (bounded decode). An image that cannot be had raises a
`SampleImageError` naming the image id, its source and key, and why.

The index is read through an in-memory DuckDB connection that attaches it read-only, so it opens beside any
other connection of this process to the same file, whatever that one's configuration.
"""

from __future__ import annotations

import tarfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import duckdb
from PIL import Image

from clipscope_explorer.precompute.model.imageio import ImageDecodeError, open_rgb
from clipscope_explorer.precompute.shard_reader import REMOTE_PREFIXES, _open

# Extensions a sample's image may have in a shard, in the order the precompute job prefers them.
IMAGE_EXTENSIONS = ("image", "jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CACHED_SHARDS = 256  # shards whose member offsets are kept (each: one entry per image in it)
ALIAS = "sample_index"


class SampleImageError(LookupError):
    """A sample image that cannot be read; the message names its id, source and key."""

    def __init__(self, image_id: int, source: str | None, key: str | None, reason: str):
        where = f"{source} : {key}" if source is not None else "not in the index's samples"
        super().__init__(f"sample image {image_id} ({where}): {reason}")
        self.image_id, self.source, self.key = image_id, source, key


class SampleImages:
    """Sample images of one index, by id: thread-safe (one DuckDB cursor per thread)."""

    def __init__(self, index_path: Path | str, images_root: Path | str | None = None, originals: bool = False):
        """originals: read each image from its source first (the very bytes the index encoded), its
        thumbnail only when the source cannot be read (`thumbnails_used` counts those)."""
        self.index_path = Path(index_path)
        self.originals, self.thumbnails_used = originals, 0
        self.images_root = None if images_root is None else Path(images_root)
        if not self.index_path.is_file():
            raise FileNotFoundError(f"index not found: {self.index_path}")
        self._con = duckdb.connect(config={"threads": 1})
        quoted = str(self.index_path).replace("'", "''")
        self._con.execute(f"ATTACH '{quoted}' AS {ALIAS} (READ_ONLY)")
        tables = {row[0] for row in self._con.execute(f"SHOW TABLES FROM {ALIAS}").fetchall()}
        # schema 1.0 and 1.1 have no `samples`: their `images` are all the images there are
        self._samples = f"{ALIAS}.samples" if "samples" in tables else f"{ALIAS}.images"
        self._local = threading.local()
        self._lock, self._scan_lock = threading.Lock(), threading.Lock()
        self._shards: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self.shards_scanned = 0

    def __enter__(self) -> SampleImages:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._con.close()

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            with self._lock:
                cursor = self._local.cursor = self._con.cursor()
        return cursor

    def _rows(self, ids: Sequence[int], with_thumbnails: bool) -> dict[int, tuple]:
        thumbnail = "i.thumbnail" if with_thumbnails else "NULL"
        join = f"LEFT JOIN {ALIAS}.images i USING (image_id)" if with_thumbnails else ""
        query = (
            f"SELECT s.image_id, s.source, s.key, {thumbnail} FROM {self._samples} s {join} "
            "WHERE s.image_id IN (SELECT unnest(?::INTEGER[]))"
        )
        rows = self._cursor().execute(query, [[int(i) for i in set(ids)]]).fetchall()
        return {row[0]: row[1:] for row in rows}

    def identities(self, ids: Sequence[int]) -> dict[int, str]:
        """`source/key` of each id, as recorded (unknown ids left out): what names an image across indexes."""
        return {image_id: f"{source}/{key}" for image_id, (source, key, _) in self._rows(ids, False).items()}

    def image(self, image_id: int) -> Image.Image:
        return self.images([image_id])[0]

    def images(self, ids: Sequence[int]) -> list[Image.Image]:
        """The RGB pixels of each id, in order (one index query for all of them)."""
        rows = self._rows(ids, True)
        return [self._decode(int(image_id), rows.get(int(image_id))) for image_id in ids]

    def _decode(self, image_id: int, row: tuple | None) -> Image.Image:
        if row is None:
            raise SampleImageError(image_id, None, None, "no such image id")
        source, key, thumbnail = row
        try:
            data = thumbnail if thumbnail is not None and not self.originals else self._original(source, key, thumbnail)
            return open_rgb(data)
        except ImageDecodeError as error:
            raise SampleImageError(image_id, source, key, f"cannot decode it ({error})") from None
        except (OSError, tarfile.TarError, EOFError, KeyError, ValueError) as error:
            raise SampleImageError(image_id, source, key, f"{type(error).__name__}: {error}") from None

    def _original(self, source: str, key: str, thumbnail: bytes | None) -> bytes:
        try:
            return self._read(source, key)
        except (OSError, tarfile.TarError, EOFError, KeyError, ValueError):
            if thumbnail is None:
                raise
            with self._lock:
                self.thumbnails_used += 1
            return thumbnail

    def location(self, source: str) -> str:
        """Where a recorded source is read from now (see `images_root`)."""
        if self.images_root is None:
            return source
        moved = self.images_root / PurePosixPath(source.split("?", 1)[0].rstrip("/")).name
        if not _is_shard(source) and not moved.is_dir():
            return str(self.images_root)  # an image folder moved to images_root itself
        return str(moved)

    def _read(self, source: str, key: str) -> bytes:
        location = self.location(source)
        hint = "" if self.images_root else "; if the images moved, give images_root"
        if not _is_shard(source):
            path = Path(location) / key
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist{hint}")
            return path.read_bytes()
        if not location.startswith(REMOTE_PREFIXES) and not Path(location).is_file():
            raise FileNotFoundError(f"shard {location} does not exist{hint}")
        members = self._members(location)
        if key not in members:
            raise KeyError(f"no image member for this key in {location}")
        offset, size = members[key]
        try:
            with _open(location) as stream:
                stream.seek(offset)
                data = stream.read(size)
        except ValueError:  # an HTTP server that takes no range requests: stream up to the member
            data = _streamed(location, offset, size)
        if len(data) != size:
            raise EOFError(f"{location} is truncated: {len(data)} of the member's {size} bytes")
        return data

    def _members(self, location: str) -> dict[str, tuple[int, int]]:
        """{key: (offset, size)} of a shard's image members, listed once (the first-preferred extension)."""
        with self._lock:
            if location in self._shards:
                self._shards.move_to_end(location)
                return self._shards[location]
        with self._scan_lock:  # one scan at a time, so that threads asking for one shard scan it once
            with self._lock:
                if location in self._shards:
                    return self._shards[location]
            return self._scan(location)

    def _scan(self, location: str) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int, int]] = {}
        # a local shard: each header read, the data sought over; a remote one: read through once, in order
        mode = "r|" if location.startswith(REMOTE_PREFIXES) else "r:"
        with _open(location) as stream, tarfile.open(fileobj=stream, mode=mode) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                path = PurePosixPath(member.name)
                base, _, ext = path.name.partition(".")
                if ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                key, rank = str(path.with_name(base)), IMAGE_EXTENSIONS.index(ext.lower())
                if key not in found or rank < found[key][0]:
                    found[key] = (rank, member.offset_data, member.size)
        members = {key: (offset, size) for key, (_, offset, size) in found.items()}
        with self._lock:
            self.shards_scanned += 1
            self._shards[location] = members
            while len(self._shards) > CACHED_SHARDS:
                self._shards.popitem(last=False)
        return members


def _streamed(url: str, offset: int, size: int) -> bytes:
    import fsspec

    with fsspec.open(url, "rb", block_size=0) as stream:
        while offset:
            skipped = len(stream.read(min(offset, 1 << 20)))
            if not skipped:
                break
            offset -= skipped
        return stream.read(size)


def _is_shard(source: str) -> bool:
    """A tar shard (the precompute job reads local shards only from `.tar` files), else an image folder."""
    return source.startswith(REMOTE_PREFIXES) or ".tar" in PurePosixPath(source).name
