"""Reading shards: the samples of a tar shard (local, http(s), s3 via fsspec) or a folder chunk, in order.

A read error (the shard gone, truncated, a network timeout) is retried with
exponential backoff, resuming after the last sample delivered, and then given
up with a ShardReadError that names the shard; the job records it and goes on.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clipscope_explorer.precompute.sources import Shard

REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://")
READ_RETRIES = 3
RETRY_BACKOFF_S = float(os.environ.get("CLIPSCOPE_RETRY_BACKOFF", 1.0))
REMOTE_TIMEOUT_S = float(os.environ.get("CLIPSCOPE_REMOTE_TIMEOUT", 60))


def _open(location: str):
    if location.startswith(REMOTE_PREFIXES):
        import fsspec

        options = {}
        if location.startswith(("http://", "https://")):
            import aiohttp

            options["client_kwargs"] = {
                "timeout": aiohttp.ClientTimeout(total=None, sock_connect=REMOTE_TIMEOUT_S, sock_read=REMOTE_TIMEOUT_S)
            }
        return fsspec.open(location, "rb", **options).open()
    return open(location, "rb")


# Not webdataset: its handlers raise or skip a failed shard; read_groups resumes after the last sample, ordinals kept.
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
        except (TimeoutError, OSError, tarfile.TarError, EOFError) as error:
            reason = f"{type(error).__name__}: {error}"
            if attempt < READ_RETRIES:
                time.sleep(RETRY_BACKOFF_S * 2**attempt)
    else:
        raise ShardReadError(
            f"{shard.label}: gave up after {READ_RETRIES + 1} attempts, {wanted} samples read ({reason})"
        )
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
