"""Flag values of the `clipscope-explorer` command: argparse `type=` checkers and a parser that reports in one line.

A checker takes the text as typed and returns the value, or raises
ArgumentTypeError; the parser prints that as one line naming the flag and the
value (``clipscope-explorer serve: error: argument --port: '99999' is not a
whole number from 1 to 65535``) and exits with code 2. Everything here runs
before anything heavy is imported or loaded (torch, a model, an index).
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

WHOLE = re.compile(r"[0-9]+")  # ASCII digits only: int() would also take '٣', '1_000' and ' 3 '
DECIMAL = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
DEVICE = re.compile(r"auto|cpu|cuda(?::[0-9]{1,3})?")  # what the live_device setting accepts
HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_BLOCK = 9999


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) with exit code 2, and which runs `check`
    (namespace -> message or None) on the parsed values, for rules that involve more than one flag."""

    def __init__(self, *args, check: Callable[[argparse.Namespace], str | None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.check = check

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if self.check is not None and (problem := self.check(namespace)):
            self.error(problem)
        return namespace, extras

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class DeprecatedAlias(argparse.Action):
    """The old spelling of a flag: still accepted, hidden from --help, with a one-line note naming the new one."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        kwargs.pop("default", None)
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stderr.write(f"{parser.prog}: note: {option_string} is deprecated; use {self.new}\n")
        setattr(namespace, self.dest, values)


def _bad(text: str, what: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{text!r} is not {what}")


def _shown(number: float) -> str:
    return f"{number:,}" if number >= 100_000 else f"{number:g}"


def whole(low: int, high: int) -> Callable[[str], int]:
    """A checker for a whole number from `low` to `high`."""

    def check(text: str) -> int:
        if WHOLE.fullmatch(text) and len(text.lstrip("0")) <= len(str(high)) and low <= int(text) <= high:
            return int(text)
        raise _bad(text, f"a whole number from {_shown(low)} to {_shown(high)}")

    return check


def positive(high: float) -> Callable[[str], float]:
    """A checker for a finite decimal number above 0 and at most `high` (``2.5``, ``1e-3``)."""

    def check(text: str) -> float:
        value = float(text) if DECIMAL.fullmatch(text) else math.nan
        if math.isfinite(value) and 0 < value <= high:
            return value
        raise _bad(text, f"a number above 0 and at most {_shown(high)}")

    return check


PORT = whole(1, 65535)


def host(text: str) -> str:
    """An IP address or a host name (RFC 1123 labels; a name of digits and dots must be an IPv4 address)."""
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    labels = text.removesuffix(".").split(".")
    if len(text) <= 253 and all(HOST_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit():
        return text
    raise _bad(text, "an IP address or host name")


def root_path(text: str) -> str:
    """A path prefix such as ``/explorer`` (a trailing slash is dropped), as the root_path setting takes it."""
    from clipscope_explorer.app.settings import ROOT_PATH  # only when the flag is given

    prefix = text.strip().rstrip("/")
    if ROOT_PATH.fullmatch(prefix):
        return prefix
    raise _bad(text, "a path prefix such as /explorer")


def device(text: str) -> str:
    if DEVICE.fullmatch(text):
        return text
    raise _bad(text, "a device: auto, cpu, cuda or cuda:N")


def layer_list(text: str) -> list[int]:
    """Comma-separated block numbers, each once: ``20,22``."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(WHOLE.fullmatch(part) and len(part) <= len(str(MAX_BLOCK)) for part in parts):
        raise _bad(text, "a comma-separated list of block numbers, e.g. 20,22")
    layers = [int(part) for part in parts]
    if len(set(layers)) < len(layers):
        raise argparse.ArgumentTypeError(f"{text!r} names a block twice")
    return layers


def path(text: str) -> Path:
    """A path, with ``~`` and ``~user`` expanded."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~user of no such user
        raise argparse.ArgumentTypeError(f"{text!r}: no such home folder") from None


def _nearest_existing(target: Path, text: str) -> Path:
    try:
        return next(folder for folder in (target, *target.parents) if folder.exists())
    except OSError as error:  # a name too long, a folder that cannot be looked into
        raise argparse.ArgumentTypeError(f"{text!r}: {error.strerror or error}") from None


def _check_writable(folder: Path, text: str) -> None:
    """`folder` is a folder, or can be made as one, and a file can be written in it (tried, not guessed: a
    read-only mount or /proc passes permission checks made as root)."""
    existing = _nearest_existing(folder, text)
    if not existing.is_dir():
        where = "" if existing == folder else f": {existing}"
        raise argparse.ArgumentTypeError(f"{text!r}{where} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: cannot write in {existing} ({error.strerror or error})") from None


def folder_to_write(text: str) -> Path:
    """A folder that exists or will be made, and can be written in."""
    folder = path(text)
    _check_writable(folder, text)
    return folder


def file_to_write(text: str) -> Path:
    """A file that will be written (made or replaced), in a folder that exists or will be made."""
    file = path(text)
    if _nearest_existing(file, text) == file and file.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder: name the file to write in it")
    _check_writable(file.parent, text)
    return file


def vocabulary_file(text: str) -> Path:
    """A readable text file of zero-shot label terms, one a line, holding at least one (read now, so a bad
    file is named before any compute)."""
    from clipscope_explorer.precompute.zero_shot import read_user_vocabulary  # torch-free

    file = path(text)
    try:
        read_user_vocabulary(file)
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return file
