"""Building a config: a preset, then a YAML file, then --set overrides, then literal values, validated into
a Config; a validation error becomes one line per bad field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from scoreaction.config.base import ConfigError
from scoreaction.config.presets import preset
from scoreaction.config.schema import Config


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = (
            _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        )
    return out


def parse_set(item: str) -> dict[str, Any]:
    """'a.b.c=value' -> {'a': {'b': {'c': value}}}; the value parses as YAML (lists, numbers, null...)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} must look like dotted.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set key {key!r} is not a dotted name such as sampler.num_steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}={raw!r}: the value is not valid YAML ({exc})") from exc
    out: dict[str, Any] = value
    for p in reversed(parts):
        out = {p: out}
    return out


def _is_union_tag(part: Any) -> bool:
    """Whether a pydantic error location part names a member of a union (float, list[float], ...)."""
    return isinstance(part, str) and (part in ("float", "int", "str", "bool", "none") or "[" in part)


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad field: 'dotted.field=value: what is allowed'. A value that fails every member of a
    union is reported once, with its first member's reason; checks of a whole section or of the whole
    config name their fields in their own message."""
    lines: list[str] = []
    seen: set[str] = set()
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"] if not _is_union_tag(x))
        if loc in seen:
            continue
        seen.add(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "finite_number":
            msg = "must be a finite number (NaN and +-inf are not allowed)"
        value = err.get("input")
        if not loc:
            lines.append(msg)
        elif err["type"] == "value_error" and isinstance(value, dict) and len(repr(value)) > 120:
            lines.append(f"{loc}: {msg}")  # a whole section's check: its message names the fields
        else:
            lines.append(f"{loc}={value!r}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def set_value(key: str, value: Any) -> dict[str, Any]:
    """'a.b.c', value -> {'a': {'b': {'c': value}}}: an override whose value is taken as is (not YAML), such
    as a path from a command-line option ('/data/run #2' stays '/data/run #2')."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{key!r} is not a dotted name such as run.output_dir")
    out: dict[str, Any] = value
    for p in reversed(parts):
        out = {p: out}
    return out


def build_config(
    preset_name: str = "tiny",
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> Config:
    """Preset (its name goes to run.preset), then YAML file, then --set overrides (values parsed as YAML),
    then `values` ({dotted key: value}, taken literally: paths and other strings from options), validated.
    Raises ConfigError naming each bad field."""
    data = _merge(preset(preset_name), {"run": {"preset": preset_name}})
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"--config {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {str(path)!r} must hold a YAML mapping, got {type(loaded).__name__}")
        data = _merge(data, loaded)
    for item in overrides or []:
        data = _merge(data, parse_set(item))
    for key, value in (values or {}).items():
        data = _merge(data, set_value(key, value))
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
