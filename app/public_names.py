"""How pages name the server's local files: by what identifies them, never by where they are.

The index records the model, SAEs and image sources as they were given to the job, which for local
files are absolute paths of the machine that built it (`local-dir:/data/models/tiny-clip`,
`/home/me/saes/20_resid/1200013184.pt`). Pages and JSON show a local folder by its name and a local file
as `{folder}/{file}` (`local-dir:tiny-clip`, `20_resid/1200013184.pt`); hub ids, URLs and relative paths
stay as they are. Setting `show_local_paths` (CLIPSCOPE_SHOW_LOCAL_PATHS) shows absolute paths again,
for an operator's own server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath

LOCAL_DIR = "local-dir:"
FILE_URL = "file://"
WINDOWS_ABSOLUTE = re.compile(r"^[A-Za-z]:[\\/]|^\\\\")
# An absolute path inside a sentence: a "/" or "~/" that does not continue a word, a URL or another path
# (except right after "local-dir:"), up to whitespace, a quote or a bracket.
PATH_IN_TEXT = re.compile(r"(?:(?<=local-dir:)|(?<![\w:/.~\\-]))~?/[^\s/'\"`<>()\[\],;][^\s'\"`<>()\[\],;]*")


def _is_absolute(path: str) -> bool:
    return path.startswith(("/", "~")) or bool(WINDOWS_ABSOLUTE.match(path))


def _short(path: str) -> str:
    """A folder's name, or a file's folder and name (a last part with a suffix is taken to be a file)."""
    pure = PureWindowsPath(path) if WINDOWS_ABSOLUTE.match(path) else PurePosixPath(path)
    parts = [p for p in pure.parts if p not in ("/", "~", pure.anchor)]
    if not parts:
        return "."
    keep = 2 if PurePosixPath(parts[-1]).suffix else 1
    return "/".join(parts[-keep:])


def public_name(spec: str | None) -> str | None:
    """`spec` (a model or SAE spec, a file, a folder or an image source) without the local path to it."""
    if spec is None:
        return None
    for prefix in (LOCAL_DIR, FILE_URL):
        if spec.startswith(prefix):
            rest = spec[len(prefix) :]
            if not _is_absolute(rest):
                return spec
            return prefix + _short(rest) if prefix == LOCAL_DIR else _short(rest)
    return _short(spec) if _is_absolute(spec) else spec


def public_text(text: str | None) -> str | None:
    """A message with every absolute path in it shortened as `public_name` does."""
    if not text:
        return text

    def shorten(match: re.Match) -> str:
        path = match.group(0)
        tail = len(path) - len(path.rstrip(".:"))  # sentence punctuation after the path
        return _short(path[: len(path) - tail]) + path[len(path) - tail :]

    return PATH_IN_TEXT.sub(shorten, text)


@dataclass(frozen=True)
class PublicNames:
    """The naming policy of one server: local paths shortened unless `show_local_paths`."""

    show_local_paths: bool = False

    def name(self, spec: str | None) -> str | None:
        return spec if self.show_local_paths else public_name(spec)

    def text(self, text: str | None) -> str | None:
        return text if self.show_local_paths else public_text(text)

    def sample(self, sample: dict) -> dict:
        """`meta.sample` with its sources and the sources and reasons of what was skipped named so."""
        skipped = [
            {**item, "source": self.name(item.get("source")), "reason": self.text(item.get("reason"))}
            for item in sample.get("skipped") or []
        ]
        return {**sample, "sources": [self.name(str(s)) for s in sample.get("sources") or []], "skipped": skipped}
