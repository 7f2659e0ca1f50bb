"""The run configuration as text: every field with its type, default and description, grouped by section
(the epilog of ``jobs/finetune.py --help``), and a config as the YAML that rebuilds it (``--print-config``).

Both are generated from the pydantic models (the sections of scoreaction.config), so a new
field appears here with its description and default without an edit.
"""

from __future__ import annotations

import textwrap
import types
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from scoreaction.config.build import validate_config
from scoreaction.config.presets import PRESETS, preset
from scoreaction.config.schema import Config

# Sections in the order a user meets them; a section not named here follows them in Config's order.
SECTION_ORDER: tuple[str, ...] = (
    "run",
    "model",
    "policy",
    "sampler",
    "algorithm",
    "value",
    "reward",
    "resources",
)
_WIDTH = 110
_MISSING = object()


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def config_sections(
    model: type[BaseModel] = Config, prefix: str = ""
) -> list[tuple[str, FieldInfo | None, list[tuple[str, FieldInfo]]]]:
    """Every section of the config, parents before their sub-sections: (dotted name, the section's own field
    (None at the top level), [(field name, field) for each field that is not itself a section])."""
    names = list(model.model_fields)
    if model is Config:
        names = [n for n in SECTION_ORDER if n in names] + [n for n in names if n not in SECTION_ORDER]
    out: list[tuple[str, FieldInfo | None, list[tuple[str, FieldInfo]]]] = []
    for name in names:
        info = model.model_fields[name]
        if not _is_section(info.annotation):
            continue
        path = f"{prefix}{name}"
        section = typing.cast(type[BaseModel], info.annotation)
        leaves = [(n, f) for n, f in section.model_fields.items() if not _is_section(f.annotation)]
        out.append((path, info, leaves))
        out.extend(config_sections(section, f"{path}."))
    return out


def type_name(annotation: Any) -> str:
    """A short name for --help: INT, FLOAT, STR, BOOL, {a,b} (choices), [X, ...], {K: V}, X|null."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        members = [type_name(a) for a in args if a is not type(None)]
        return "|".join(members + (["null"] if type(None) in args else []))
    if origin is list:
        return f"[{type_name(args[0])}, ...]"
    if origin is dict:
        key = "NAME" if typing.get_origin(args[0]) is Literal else type_name(args[0])
        return f"{{{key}: {type_name(args[1])}}}"
    names = {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)).upper())


def yaml_value(value: Any) -> str:
    """A value as it would be written after --set key= (one line of YAML: 3, 0.5, null, [a, b], {})."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def config_help(width: int = _WIDTH) -> str:
    """Every config field, grouped by section: ``--set section.field=TYPE  (default X)``, its description,
    and the values the presets give it where they differ from the default."""
    # what each preset sets (build_config would add its name as run.preset, which is not a setting)
    presets = {name: validate_config(preset(name)).model_dump(mode="json") for name in PRESETS}
    defaults = Config().model_dump(mode="json")
    indent = " " * 6
    lines = [
        "configuration fields:",
        *textwrap.wrap(
            "Set any field with --set SECTION.FIELD=VALUE (VALUE is parsed as YAML: 3, 0.5, true, null, "
            "[a, b]) or in a --config YAML file with the same nesting; --preset first, then --config, then "
            "each --set in order, then --output-dir. The defaults below are the fields' own: a preset "
            "(--preset, default tiny) changes some of them, listed under 'presets:'. --print-config prints "
            "the effective value of every field.",
            width,
            initial_indent="  ",
            subsequent_indent="  ",
        ),
    ]
    for path, info, leaves in config_sections():
        heading = f"{path}:"
        if info is not None and info.description:
            heading += f" {info.description}"
        lines += ["", heading]
        for name, field in leaves:
            dotted = f"{path}.{name}"
            default = field.get_default(call_default_factory=True)
            lines.append(f"  --set {dotted}={type_name(field.annotation)}  (default {yaml_value(default)})")
            lines += textwrap.wrap(
                field.description or "",
                width,
                initial_indent=indent,
                subsequent_indent=indent,
                break_on_hyphens=False,
                break_long_words=False,
            )
            changed = [
                f"{preset_name}={yaml_value(value)}"
                for preset_name, data in presets.items()
                if (value := _lookup(data, dotted)) is not _MISSING and value != _lookup(defaults, dotted)
            ]
            if changed:
                lines += textwrap.wrap(
                    "presets: " + "; ".join(changed),
                    width,
                    initial_indent=indent,
                    subsequent_indent=indent + "  ",
                    break_on_hyphens=False,
                )
    return "\n".join(lines)


def config_yaml(cfg: Config, preset_name: str) -> str:
    """The whole config as YAML (every field, so ``--config`` of it rebuilds ``cfg`` over any preset)."""
    header = (
        f"# scoreaction run configuration: --preset {preset_name} with --config, --set and --output-dir applied;\n"
        "# every field is set, so\n"
        "# `python jobs/finetune.py --config THIS_FILE` runs with exactly this configuration.\n"
    )
    data = cfg.model_dump(mode="json")
    ordered = {path: data[path] for path, _, _ in config_sections() if path in data}
    body = yaml.safe_dump({**ordered, **data}, sort_keys=False, width=10**6)
    return header + body
