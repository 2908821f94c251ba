"""Loading, overriding and dumping job configs; the schema itself is ``orchestrator/config.py``.

    from orchestrator.configuration import load_config, dump_config
    cfg = load_config("orchestrator/configs/quickstart.yaml", ["train.lr=3e-4", "teachers.0.weight=2"])

Where to look:

* ``errors``: ``ConfigError`` / ``ConfigIssue``, and pydantic's ValidationError turned into issues;
* ``schema``: the walk over the schema by dotted path, and what a field expects in words;
* ``yaml_source``: the YAML reader (YAML 1.2 floats, duplicate keys refused, errors with line:column);
* ``overrides``: ``--set KEY=VALUE`` parsed and applied to the raw data;
* here: the entry points below.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.config import JobConfig
from orchestrator.configuration.errors import MISSING, ConfigError, ConfigIssue, issues_from
from orchestrator.configuration.overrides import apply_override, parse_override
from orchestrator.configuration.yaml_source import parse_yaml

__all__ = ["ConfigError", "ConfigIssue", "apply_overrides", "config_from_dict", "dump_config", "load_config",
           "parse_override"]


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = (), source: str | None = None) -> JobConfig:
    """Validate a raw (YAML-shaped) mapping after applying ``overrides``; raise ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"invalid job config{f' {source}' if source else ''}: the top level must be a mapping "
                          f"of sections, got {type(data).__name__}",
                          [ConfigIssue("", data, "the top level must be a mapping")])
    raw = copy.deepcopy(dict(data))  # overrides edit it in place: never mutate the caller's dict
    for ov in overrides:
        apply_override(raw, ov, JobConfig)
    if overrides and source:
        source = f"{source} (with overrides {list(overrides)})"
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError.from_issues(issues_from(exc, JobConfig), source) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> JobConfig:
    """Read a job YAML, apply ``--set`` style ``overrides`` (``"train.lr=3e-4"``, ``"teachers.0.weight=2"``)
    and validate it. Raises ConfigError (a ValueError) naming the field path, bad value and what is allowed."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read job config {source}: {exc.strerror or exc}",
                          [ConfigIssue("", MISSING, str(exc))]) from None
    data = parse_yaml(text, source)
    if data is None:
        data = {}
    return config_from_dict(data, overrides, source)


def apply_overrides(cfg: JobConfig, overrides: Sequence[str]) -> JobConfig:
    """A new validated config: ``cfg`` with ``overrides`` applied (a sweep trial is exactly this)."""
    return config_from_dict(cfg.model_dump(mode="json"), overrides, source=f"{cfg.name!r} with overrides")


def dump_config(cfg: JobConfig) -> str:
    """The config as YAML (every field, defaults included); ``load_config`` reads it back equal."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False, allow_unicode=True)
