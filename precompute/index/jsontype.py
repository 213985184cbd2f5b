"""The types of `meta` values (JSON), as data: each checks a value and describes itself for docs/schema.md.

`check(value, strict)` returns None when `value` has the type, else a short reason. `strict` (the writer)
also refuses record fields the type does not name; readers are lenient there, so an index written by a
newer minor version, whose records may hold more fields, still opens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


class JsonType:
    def check(self, value, strict: bool = False) -> str | None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _show(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Integer(JsonType):
    minimum: int | None = None

    def check(self, value, strict=False):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{_show(value)} is not an integer"
        if self.minimum is not None and value < self.minimum:
            return f"{value} is below {self.minimum}"
        return None

    def describe(self):
        return "integer" if self.minimum is None else f"integer >= {self.minimum}"


@dataclass(frozen=True)
class Number(JsonType):
    def check(self, value, strict=False):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{_show(value)} is not a number"
        return None

    def describe(self):
        return "number"


@dataclass(frozen=True)
class String(JsonType):
    choices: tuple[str, ...] = ()

    def check(self, value, strict=False):
        if not isinstance(value, str):
            return f"{_show(value)} is not a string"
        if self.choices and value not in self.choices:
            return f"{_show(value)} is not one of {', '.join(self.choices)}"
        return None

    def describe(self):
        return " or ".join(f'"{c}"' for c in self.choices) if self.choices else "string"


@dataclass(frozen=True)
class Boolean(JsonType):
    def check(self, value, strict=False):
        return None if isinstance(value, bool) else f"{_show(value)} is not true or false"

    def describe(self):
        return "boolean"


@dataclass(frozen=True)
class Nullable(JsonType):
    of: JsonType

    def check(self, value, strict=False):
        return None if value is None else self.of.check(value, strict)

    def describe(self):
        return f"{self.of.describe()} or null"


@dataclass(frozen=True)
class ListOf(JsonType):
    of: JsonType
    length: int | None = None  # exact length
    min_length: int = 0

    def check(self, value, strict=False):
        if not isinstance(value, list):
            return f"{_show(value)} is not a list"
        if self.length is not None and len(value) != self.length:
            return f"has {len(value)} items, not {self.length}"
        if len(value) < self.min_length:
            return f"has {len(value)} items, fewer than {self.min_length}"
        for i, item in enumerate(value):
            problem = self.of.check(item, strict)
            if problem:
                return f"item {i}: {problem}"
        return None

    def describe(self):
        if self.length is not None:
            return "[" + ", ".join([self.of.describe()] * self.length) + "]"
        at_least = f" (at least {self.min_length})" if self.min_length else ""
        return f"list of {self.of.describe()}{at_least}"


@dataclass(frozen=True)
class Record(JsonType):
    """An object with named fields; `optional` fields may be absent."""

    fields: dict[str, JsonType]
    optional: frozenset[str] = field(default_factory=frozenset)

    def check(self, value, strict=False):
        if not isinstance(value, dict):
            return f"{_show(value)} is not an object"
        for name, kind in self.fields.items():
            if name not in value:
                if name not in self.optional:
                    return f"has no {name!r}"
                continue
            problem = kind.check(value[name], strict)
            if problem:
                return f"{name!r}: {problem}"
        if strict:
            unknown = sorted(set(value) - set(self.fields))
            if unknown:
                return f"has unknown field {unknown[0]!r}"
        return None

    def describe(self):
        parts = [
            f'"{name}"{"?" if name in self.optional else ""}: {kind.describe()}' for name, kind in self.fields.items()
        ]
        return "{" + ", ".join(parts) + "}"


@dataclass(frozen=True)
class MapOf(JsonType):
    """An object whose keys are free (strings) and whose values all have one type."""

    of: JsonType
    key: str = "string"  # how the keys are described

    def check(self, value, strict=False):
        if not isinstance(value, dict):
            return f"{_show(value)} is not an object"
        for name, item in value.items():
            problem = self.of.check(item, strict)
            if problem:
                return f"{name!r}: {problem}"
        return None

    def describe(self):
        return f"{{{self.key}: {self.of.describe()}}}"
