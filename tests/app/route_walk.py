"""The app's real routes as data, so tests that walk them cover a new route automatically.

`endpoints(app)` lists every API route (however FastAPI nests included routers)
with its methods, path parameters and query parameters; `fill(path, values)`
puts values into a path template. Mounts (`/static`) are listed by `mounts(app)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import Mount, Route


@dataclass(frozen=True)
class Endpoint:
    path: str
    methods: frozenset[str]
    path_params: tuple[str, ...]
    query_params: tuple[str, ...]

    def __str__(self) -> str:
        return f"{'/'.join(sorted(self.methods))} {self.path}"


def _walk(routes):
    for route in routes:
        nested = getattr(route, "original_router", None)
        if nested is not None:
            yield from _walk(nested.routes)
        else:
            yield route


def _query_params(dependant) -> list[str]:
    """Query parameter names, with a query model (`Annotated[Model, Query()]`) spelled out field by field."""
    names = []
    for param in dependant.query_params:
        model = param.field_info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            names += [field.alias or name for name, field in model.model_fields.items()]
        else:
            names.append(param.name)
    for sub in dependant.dependencies:
        names += _query_params(sub)
    return names


def endpoints(app) -> list[Endpoint]:
    out = []
    for route in _walk(app.routes):
        if isinstance(route, APIRoute):
            out.append(
                Endpoint(
                    route.path,
                    frozenset(route.methods),
                    tuple(route.param_convertors),
                    tuple(dict.fromkeys(_query_params(route.dependant))),
                )
            )
        elif isinstance(route, Route):  # /openapi.json and other plain Starlette routes
            out.append(Endpoint(route.path, frozenset(route.methods or ()), tuple(route.param_convertors), ()))
    return out


def mounts(app) -> list[str]:
    return [route.path for route in _walk(app.routes) if isinstance(route, Mount)]


def fill(path: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        path = path.replace("{" + name + "}", value)
    return path
