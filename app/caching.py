"""Immutable responses and their conditional GET (RFC 9110: `ETag`, `If-None-Match`).

What an immutable URL names never changes (image URLs carry the index id;
upload ids are content hashes), so its answer may be cached for a year and is
revalidated by its `ETag`. Callers check that the object exists first: a
validator sent for something that is not there gets the usual 404, never a 304.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import Response

IMMUTABLE = "public, max-age=31536000, immutable"
MEMBER = re.compile(r'(?:[^,"]|"[^"]*")+')  # a list member: commas inside quotes do not split
ENTITY_TAG = re.compile(r'(W/)?"([^"]*)"')


def none_match(field_values: list[str], etag: str) -> bool:
    """Whether `If-None-Match` (all its field lines) names this current representation: `*` (any
    representation), or an entity tag equal to `etag` by weak comparison (`W/"x"` matches `"x"`),
    anywhere in the comma-separated lists. Malformed members match nothing."""
    members = [member.strip() for member in MEMBER.findall(",".join(field_values))]
    if "*" in members:
        return True
    opaque = ENTITY_TAG.fullmatch(etag).group(2)
    return any((tag := ENTITY_TAG.fullmatch(member)) and tag.group(2) == opaque for member in members)


def immutable(request: Request, etag: str, media_type: str, produce: Callable[[], bytes]) -> Response:
    """304 when the client holds the representation tagged `etag`, else `produce()`; both cacheable forever."""
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
    if none_match(request.headers.getlist("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(produce(), media_type=media_type, headers=headers)
