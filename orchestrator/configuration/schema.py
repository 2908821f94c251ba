"""Walking a pydantic schema by dotted path (``teachers.0.resources.custom``) and describing what it allows.

The one walk over the models: error reports (``errors.issues_from``) and ``--set`` overrides
(``overrides.apply_override``) both step through it. The schema itself is ``orchestrator/config.py``;
nothing here knows its classes, callers pass the root model.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo


@dataclasses.dataclass(frozen=True)
class Step:
    """One path segment resolved against the schema."""

    key: str | int           # where the value sits in the raw data: a field's YAML name, a list index, a mapping key
    ann: Any                 # the annotation of what is below the segment
    info: FieldInfo | None   # the model field it names; None for a list item or a free-form mapping's value


def unwrap(ann: Any) -> Any:
    """``X | None`` -> ``X`` (our schema has no other unions)."""
    if typing.get_origin(ann) in (Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def is_model(ann: Any) -> bool:
    """Whether ``ann`` is a pydantic model class (a config section)."""
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def field_of(model: type[BaseModel], key: str) -> tuple[str, FieldInfo] | None:
    """The field a YAML key names (by alias or attribute name): (yaml key, FieldInfo)."""
    for attr, info in model.model_fields.items():
        if key in (attr, info.alias):
            return (info.alias or attr), info
    return None


def allowed_keys(model: type[BaseModel]) -> list[str]:
    """The YAML keys of a section, in schema order."""
    return [info.alias or attr for attr, info in model.model_fields.items()]


def step(ann: Any, seg: str | int) -> Step | None:
    """The schema one path segment below ``ann`` (None if the segment does not fit)."""
    ann = unwrap(ann)
    if is_model(ann):
        found = field_of(ann, str(seg))
        return Step(found[0], found[1].annotation, found[1]) if found else None
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is list:
        return Step(int(seg), args[0], None) if (isinstance(seg, int) or str(seg).isdigit()) else None
    if origin is dict:
        return Step(str(seg), args[1] if args else Any, None)
    if ann is Any or ann is dict:
        return Step(str(seg), Any, None)
    return None


def locate(root: type[BaseModel], path: Sequence[str | int]) -> tuple[Any, FieldInfo | None]:
    """Annotation and nearest FieldInfo at ``path`` below ``root`` (Any where the path leaves the schema)."""
    ann: Any = root
    info: FieldInfo | None = None
    for seg in path:
        found = step(ann, seg)
        if found is None:
            return Any, None
        ann = found.ann
        # Inside a list or free-form dict, the enclosing field still says what is expected.
        info = found.info or info
    return ann, info


def unknown_key(key: str, allowed: Sequence[str], where: str) -> str:
    """The message for a key that ``where`` (a section's path) does not have, with the closest allowed key."""
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r} in {where}; {hint}allowed keys: {', '.join(allowed)}"


def type_text(ann: Any) -> str:
    """An annotation in words: ``one of 'paper', 'reference'``, ``a list of TeacherConfig`` ..."""
    if ann is type(None):
        return "null"
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {type_text(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {type_text(args[0])} to {type_text(args[1])}" if args else "a mapping"
    if ann is Any:
        return "any value"
    if is_model(ann):
        return f"a mapping with keys {', '.join(allowed_keys(ann))}"
    return getattr(ann, "__name__", str(ann))
