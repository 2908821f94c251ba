"""``--set`` overrides: ``KEY=VALUE`` with a dotted KEY (``train.lr=3e-4``, ``teachers.0.weight=2``).

An override edits the raw (pre-validation) data. Its path is checked against the schema as it is
walked, so a typo fails with the allowed keys rather than silently adding a key.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel

from orchestrator.configuration.errors import ConfigError, ConfigIssue, short_repr
from orchestrator.configuration.schema import Step, allowed_keys, is_model, step, type_text, unknown_key, unwrap
from orchestrator.configuration.yaml_source import parse_yaml


class _Refused(Exception):
    """One segment of an override's path cannot be set; the message says why."""


def _split_override(override: str) -> tuple[list[str], str]:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not s for s in key.split(".")):
        raise ConfigError(f"override {override!r}: expected KEY=VALUE with a dotted KEY, "
                          "e.g. train.lr=3e-4 or teachers.0.weight=2",
                          [ConfigIssue(key, override, "malformed override")])
    return key.split("."), raw


def parse_override(override: str) -> tuple[list[str], Any]:
    """``"a.b.0=3"`` -> (["a", "b", "0"], 3); the value is parsed as YAML (``3``, ``true``, ``[1,2]``,
    ``null``, ``3e-4``; an empty value is null)."""
    segs, raw = _split_override(override)
    return segs, parse_yaml(raw, f"override {override!r}")


def _descend(ann: Any, seg: str, here: str) -> Step:
    """The schema below ``seg``; refuses a segment the schema at ``here`` does not have."""
    found = step(ann, seg)
    if found is not None:
        return found
    target = unwrap(ann)
    if is_model(target):
        raise _Refused(unknown_key(seg, allowed_keys(target), here))
    if typing.get_origin(target) is list:
        raise _Refused(f"{here} is a list: expected an index like {here}.0, not {seg!r}")
    raise _Refused(f"{here} is a value ({type_text(target)}), not a section: cannot set {seg!r} inside it")


def _leaf_value(ann: Any, raw: str, value: Any, parse_error: ConfigError | None) -> tuple[Any, ConfigError | None]:
    """The leaf's value: a string field takes the text as typed (``template.prompt={question}`` would
    otherwise be a YAML mapping, or not YAML at all, and ``name=123`` an int); null stays null where allowed."""
    if unwrap(ann) is str and (parse_error is not None or not isinstance(value, str)) \
            and not (value is None and unwrap(ann) is not ann):
        return raw.strip(), None
    return value, parse_error


def _check_slot(node: Any, key: str | int, seg: str, here: str) -> None:
    """Refuse a ``key`` that ``node``, the raw data at ``here``, cannot hold."""
    if isinstance(node, dict):
        if isinstance(key, int):
            raise _Refused(f"{here} is a mapping here, not a list")
    elif isinstance(node, list):
        if not isinstance(key, int):
            raise _Refused(f"{here} is a list: expected an index, not {seg!r}")
        if key >= len(node):
            raise _Refused(f"index {key} is out of range: {here} has {len(node)} item(s)")
    else:
        raise _Refused(f"{here} is {short_repr(node)}, not a section or list")


def _child(node: dict[str, Any] | list[Any], key: str | int, ann: Any, path: str, next_seg: str) -> Any:
    """The raw data at ``node[key]`` (checked by ``_check_slot``) that the override goes on into."""
    if isinstance(node, list):
        return node[typing.cast(int, key)]
    child = node.get(typing.cast(str, key))
    if child is None:
        # An absent section is created, so `--set student.deepspeed.stage=3` works on a
        # YAML without a deepspeed block. An absent list has no index to set.
        if typing.get_origin(unwrap(ann)) is list:
            raise _Refused(f"index {next_seg} is out of range: {path} has no items")
        child = node[typing.cast(str, key)] = {}
    return child


def apply_override(data: dict[str, Any], override: str, root: type[BaseModel]) -> None:
    """Set one dotted path in the raw data of a ``root`` model, in place; raise ConfigError."""
    segs, raw = _split_override(override)
    parse_error: ConfigError | None = None
    try:
        value = parse_yaml(raw, f"override {override!r}")
    except ConfigError as exc:
        # Not YAML, but maybe a string field's text (`template.prompt={prompt}?`): decided at the leaf.
        value, parse_error = raw, exc
    node: Any = data
    ann: Any = root
    for depth, seg in enumerate(segs):
        here = ".".join(segs[:depth]) or "the top level"
        path = ".".join(segs[: depth + 1])
        last = depth == len(segs) - 1
        try:
            found = _descend(ann, seg, here)
            ann = found.ann
            if last:
                value, parse_error = _leaf_value(ann, raw, value, parse_error)
                if parse_error is not None:
                    raise parse_error
            _check_slot(node, found.key, seg, here)
            if last:
                node[found.key] = value
                return
            node = _child(node, found.key, ann, path, segs[depth + 1])
        except _Refused as exc:
            raise ConfigError(f"override {override!r}: {exc}", [ConfigIssue(path, value, str(exc))]) from None
