"""Shard patterns of `--images`: brace expansion (the `braceexpand` package), capped; torch-free.

``laion/{00000..00099}.tar`` names 100 shards, as a shell would expand it. A
pattern is sized before it is expanded, so ``x/{1..99999999999}.tar`` is an
error at once instead of minutes of work ending in a MemoryError.
"""

from __future__ import annotations

import braceexpand
from braceexpand import UnbalancedBracesError

MAX_SHARDS = 1_000_000


class SourceError(ValueError):
    """A source named on the command line cannot be used."""


def _group_size(body: str, commas: int) -> int:
    """Names one ``{...}`` group stands for, as braceexpand reads it (a list, a range, or a literal)."""
    if commas:
        return commas + 1
    numbers = braceexpand.int_range_re.match(body)
    if numbers:
        low, high, step = numbers.groups()
        return abs(int(high) - int(low)) // (int(step or 1) or 1) + 1
    letters = braceexpand.char_range_re.match(body)
    if letters:
        low, high, step = letters.groups()
        distance = abs(braceexpand.alphabet.index(high) - braceexpand.alphabet.index(low))
        return distance // (int(step or 1) or 1) + 1
    return 1


def expansion_bound(pattern: str) -> int:
    """An upper bound of the number of names `pattern` expands to: the product of the sizes of its brace
    groups (exact unless a list holds further groups), counted only until it passes MAX_SHARDS."""
    total, open_groups, position = 1, [], 0
    while position < len(pattern) and total <= MAX_SHARDS:
        char = pattern[position]
        if char == "\\":  # an escaped character, as braceexpand reads it
            position += 1
        elif char == "{":
            open_groups.append([position, 0])
        elif char == "," and open_groups:
            open_groups[-1][1] += 1
        elif char == "}" and open_groups:
            start, commas = open_groups.pop()
            try:
                total *= _group_size(pattern[start + 1 : position], commas)
            except ValueError:  # a number too long to read is far past the cap
                return MAX_SHARDS + 1
        position += 1
    return total


def check_patterns(patterns: list[str]) -> None:
    """Refuse a pattern that names more than MAX_SHARDS shards or whose braces do not pair up, and patterns
    that together name more than MAX_SHARDS."""
    for pattern in patterns:
        if expansion_bound(pattern) > MAX_SHARDS:
            raise SourceError(f"--images {pattern}: its brace ranges name more than {MAX_SHARDS:,} shards")
        try:
            braceexpand.braceexpand(pattern)  # parses at once; bounded by the check above
        except UnbalancedBracesError:
            raise SourceError(f"--images {pattern}: unbalanced braces") from None
    if sum(expansion_bound(pattern) for pattern in patterns) > MAX_SHARDS:
        raise SourceError(f"--images: the patterns name more than {MAX_SHARDS:,} shards together")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a..b}`` ranges (zero padding kept) and ``{x,y}`` lists, leftmost first, as a shell does."""
    check_patterns([pattern])
    return list(braceexpand.braceexpand(pattern))
