"""The errors a bad job config raises, and turning pydantic's ``ValidationError`` into them.

A ``ConfigError`` lists ``ConfigIssue``s, each naming the field path, the bad value and what is
allowed, so users see their mistake rather than a pydantic traceback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from orchestrator.configuration.schema import allowed_keys, is_model, locate, type_text, unknown_key, unwrap
from specs import FieldProblem, UserError


class _Missing:
    """Marks an issue without a value (a missing field, a file-level problem)."""

    def __repr__(self) -> str:
        return "<missing>"


#: The value of an issue that has none.
MISSING: Any = _Missing()


def short_repr(value: Any, limit: int = 160) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config: where (dotted path), what value was found, and what is allowed."""

    path: str
    value: Any
    message: str

    def __str__(self) -> str:
        where = self.path or "(top level)"
        shown = short_repr(self.value)
        # mlot's own messages already end in "got <value>": do not repeat it.
        got = "" if self.value is MISSING or f"got {shown}" in self.message else f" (got {shown})"
        return f"{where}: {self.message}{got}"


class ConfigError(UserError, ValueError):
    """A job config is invalid. ``issues`` lists each problem; ``str()`` is a readable report."""

    def __init__(self, message: str, issues: Sequence[ConfigIssue] = ()) -> None:
        super().__init__(message)
        self.issues: list[ConfigIssue] = list(issues)

    @classmethod
    def from_issues(cls, issues: Sequence[ConfigIssue], source: str | None = None) -> ConfigError:
        """Build the error with a header naming the config's source and one line per issue."""
        head = f"invalid job config{f' {source}' if source else ''}"
        n = len(issues)
        lines = [f"{head}: {n} problem{'s' if n != 1 else ''}"] + [f"  - {i}" for i in issues]
        return cls("\n".join(lines), issues)


_CONSTRAINT_TEXT = [(annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="),
                    (annotated_types.Lt, "lt", "<"), (annotated_types.Le, "le", "<=")]


def _expected(info: FieldInfo) -> str:
    """'float > 0 or null: Peak learning rate' — the type, constraints and description of a field."""
    bounds = []
    for m in info.metadata:
        for cls, attr, op in _CONSTRAINT_TEXT:
            if isinstance(m, cls):
                bounds.append(f"{op} {getattr(m, attr)}")
    ann = info.annotation
    base = unwrap(ann)
    text = type_text(base) + (" " + " and ".join(bounds) if bounds else "")
    if base is not ann:
        text += " or null"
    return f"{text}{f' ({info.description})' if info.description else ''}"


def issues_from(exc: ValidationError, root: type[BaseModel]) -> list[ConfigIssue]:
    """One issue per problem pydantic found validating ``root``, each saying what the field expects."""
    issues: list[ConfigIssue] = []
    for err in exc.errors():
        loc = list(err["loc"])
        base = ".".join(str(p) for p in loc)
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, FieldProblem):
            # Our validators' own problems, with paths relative to the model that raised them.
            for rel, value, message in ctx_error.problems:
                path = ".".join(p for p in (base, rel) if p)
                issues.append(ConfigIssue(path, value, message))
            continue
        kind = err["type"]
        if kind == "extra_forbidden":
            parent, key = loc[:-1], str(loc[-1])
            model = unwrap(locate(root, parent)[0])
            allowed = allowed_keys(model) if is_model(model) else []
            where = ".".join(str(p) for p in parent) or "the top level"
            issues.append(ConfigIssue(base, err["input"], unknown_key(key, allowed, where)))
            continue
        _, info = locate(root, loc)
        expected = f"; expected {_expected(info)}" if info is not None else ""
        if kind == "string_type" and isinstance(err.get("input"), dict) \
                and all(v is None for v in err["input"].values()):
            expected += "; a format string like {prompt} must be quoted in YAML: '{prompt}'"
        if kind == "missing":
            issues.append(ConfigIssue(base, MISSING, f"required field is missing{expected}"))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            issues.append(ConfigIssue(base, err.get("input", MISSING), f"{msg}{expected}"))
    return issues
