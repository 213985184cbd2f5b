"""Rows of the JSON API's models as Arrow tables: one column per field, typed from the model's annotations (so an
all-null column keeps its type, and integers stay integers beside nulls)."""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence

import pyarrow as pa
from pydantic import BaseModel

SCALARS = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def arrow_type(annotation) -> pa.DataType:
    """The Arrow type of a field annotation: int, float, str, bool, lists of those, and `X | None` as X."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        kept = [arg for arg in args if arg is not type(None)]
        if len(kept) == 1:
            return arrow_type(kept[0])
    elif origin is list:
        return pa.list_(arrow_type(args[0]))
    elif annotation in SCALARS:
        return SCALARS[annotation]
    raise TypeError(f"no Arrow type for {annotation!r}")


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    return pa.schema([(name, arrow_type(field.annotation)) for name, field in model.model_fields.items()])


def arrow_table(model: type[BaseModel], rows: Sequence[BaseModel]) -> pa.Table:
    """`rows` (instances of `model`) as a table whose columns are the model's fields, in their order."""
    return pa.Table.from_pylist([row.model_dump() for row in rows], schema=arrow_schema(model))
