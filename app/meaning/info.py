"""What the search pages show and check about search by meaning: its state, the template parameter, and
the 503 a JSON twin answers when it is not available (the HTML page explains instead)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Depends, Request
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field
from starlette.exceptions import HTTPException

from clipscope_explorer.app.deps import blank_is_none
from clipscope_explorer.app.meaning.prompts import DEFAULT_TEMPLATE, MAX_TEMPLATE_CHARS, check_template
from clipscope_explorer.app.meaning.service import Kind, MeaningService, Status
from clipscope_explorer.app.queries import Index

RETRY_SECONDS = 5


async def get_meaning(request: Request) -> MeaningService:
    return request.app.state.meaning


MeaningDep = Annotated[MeaningService, Depends(get_meaning)]
Template = Annotated[
    str | None,
    BeforeValidator(blank_is_none),
    AfterValidator(lambda value: None if value is None else check_template(value)),
    Field(
        max_length=MAX_TEMPLATE_CHARS,
        description=f"prompt template with one {{}} for the query (default '{DEFAULT_TEMPLATE}')",
    ),
]


class MeaningInfo(BaseModel):
    """Whether search by meaning works here: `state` off, loading, ready or failed; `message` says why
    not (null when ready); `model` is the text tower's open_clip model."""

    state: Literal["off", "loading", "ready", "failed"]
    message: str | None
    model: str | None


def meaning_info(index: Index, service: MeaningService, kind: Kind) -> MeaningInfo:
    status = service.status(kind)
    return MeaningInfo(
        state=status.state,
        message=index.names.text(status.message),
        model=index.names.name(service.spec.model) if service.spec else None,
    )


def unavailable(index: Index, status: Status) -> HTTPException:
    """The JSON twin's answer when search by meaning cannot run: 503 with the one-line reason (and
    Retry-After while loading)."""
    headers = {"Retry-After": str(RETRY_SECONDS)} if status.state == "loading" else None
    return HTTPException(503, index.names.text(status.message), headers=headers)


def explain(index: Index, status: Status, detail: bool) -> str:
    """Why search by meaning cannot run, for the HTML page (its message); the JSON twin raises its 503."""
    if detail:
        raise unavailable(index, status)
    return index.names.text(status.message)
