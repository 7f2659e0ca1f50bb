"""jobs/finetune.py --help lists every config field (type, default, description, the presets' values) by
section, and --print-config prints the effective YAML, which --config turns back into the same config; it
starts and writes nothing. In-process: no run, no Ray."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from scoreaction.config import PRESETS, Config, build_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import finetune  # noqa: E402

HEADER = re.compile(r"^  --set (?P<key>[\w.]+)=(?P<type>.+?)  \(default (?P<default>.*)\)$")


def _leaves(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """{dotted key: FieldInfo} of every field that is not itself a section, walking the pydantic models."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out.update(_leaves(field.annotation, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = field
    return out


def _help_entries(text: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The section headings in order, and per field: its section, type, default text, description and the
    presets line, parsed from the help text."""
    sections: list[str] = []
    entries: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    epilog = text[text.index("configuration fields:") :]
    for line in epilog.splitlines()[1:]:
        if m := HEADER.match(line):
            assert m["key"] not in entries, f"{m['key']} listed twice"
            current = entries[m["key"]] = {
                **m.groupdict(),
                "section": sections[-1],
                "desc": "",
                "presets": "",
            }
        elif m := re.match(r"^([a-z_][\w.]*):", line):
            sections.append(m[1])
            current = None
        elif line.startswith("      ") and current is not None:
            part = "presets" if line.strip().startswith("presets:") or current["presets"] else "desc"
            current[part] = f"{current[part]} {line.strip()}".strip()
    return sections, entries


def test_help_lists_every_field_of_every_section_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    sections, entries = _help_entries(text)
    leaves = _leaves(Config)
    assert sorted(entries) == sorted(leaves)  # every field, nothing else
    assert sections[:8] == ["run", "model", "model.toy", "policy", "sampler", "algorithm", "value", "reward"]
    assert set(sections) == {key.rsplit(".", 1)[0] for key in leaves}
    for key, field in leaves.items():
        entry = entries[key]
        assert entry["section"] == key.rsplit(".", 1)[0], key
        # the default, read back as YAML (the syntax of --set), is the field's own default
        assert yaml.safe_load(entry["default"]) == field.get_default(call_default_factory=True), key
        assert field.description, f"{key} has no description"
        assert entry["desc"] == " ".join(field.description.split()), key
    # the presets' values where they differ from the default; none where no preset sets the field
    assert entries["run.epochs"]["default"] == "3"
    assert entries["run.epochs"]["presets"] == (
        "presets: tiny=8; toy-gmm=60; sd15=100; sd15-random=100; sd15-ctrl-paper=100; sd15-ddpo-paper=100; digits=4"
    )
    assert entries["sampler.stepper"]["presets"] == "presets: toy-gmm=euler_maruyama"
    assert entries["run.seed"]["presets"] == ""
    assert entries["model.compile"]["type"] == "{off,default,reduce-overhead,max-autotune}"
    assert entries["reward.weights"]["type"] == "{NAME: FLOAT}|null"
    flat = " ".join(text.split())
    assert "--print-config" in flat and "a preset (--preset, default tiny) changes some of them" in flat


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fail the test if main() gets as far as a run, a Ray connection or a cluster query."""

    def refuse(*args, **kwargs):
        raise AssertionError("--print-config must start nothing")

    for name in ("run", "run_single_process", "connect", "cluster_nodes"):
        monkeypatch.setattr(finetune, name, refuse)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_print_config_round_trips_through_config(preset, tmp_path, capsys, nothing_starts):
    assert finetune.main(["--preset", preset, "--print-config"]) == 0
    text = capsys.readouterr().out
    printed = tmp_path / "printed.yaml"
    printed.write_text(text)
    assert build_config(preset, printed) == build_config(preset)
    # every field is in the file, so the preset it is merged over does not matter
    other = "toy-gmm" if preset == "tiny" else "tiny"
    assert build_config(other, printed) == build_config(preset)
    assert finetune.main(["--preset", other, "--config", str(printed), "--print-config"]) == 0
    again = capsys.readouterr().out
    assert [line for line in again.splitlines() if not line.startswith("#")] == [
        line for line in text.splitlines() if not line.startswith("#")
    ]  # the same YAML


def test_print_config_applies_config_file_overrides_and_output_dir(tmp_path, capsys, nothing_starts):
    file = tmp_path / "c.yaml"
    file.write_text("sampler:\n  num_steps: 5\nalgorithm:\n  kl_coef: 0.5\n")
    run_dir = tmp_path / "run #2"  # a path, taken literally (not YAML: '#' would start a comment)
    sets = ["--set", "sampler.num_steps=7", "--set", "run.prompts=[a cat, 'b: dog']"]
    args = ["--preset", "toy-gmm", "--config", str(file), *sets, "--output-dir", str(run_dir)]
    # --dry-run and --resume are ignored: --print-config returns before anything is checked or started
    assert finetune.main([*args, "--dry-run", "--resume", "--print-config"]) == 0
    text = capsys.readouterr().out
    data = yaml.safe_load(text)
    assert data["sampler"]["num_steps"] == 7  # --set after --config
    assert data["algorithm"]["kl_coef"] == 0.5  # from --config
    assert data["run"]["prompts"] == ["a cat", "b: dog"]
    assert data["run"]["output_dir"] == str(run_dir)
    assert data["run"]["epochs"] == 60 and data["model"]["preset"] == "toy-gmm"  # the preset's
    expected = build_config(
        "toy-gmm",
        file,
        ["sampler.num_steps=7", "run.prompts=[a cat, 'b: dog']"],
        {"run.output_dir": str(run_dir)},
    )
    assert Config.model_validate(data) == expected
    assert not run_dir.exists()
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_print_config_still_validates(capsys, nothing_starts):
    assert finetune.main(["--set", "sampler.num_steps=0", "--print-config"]) == 2
    captured = capsys.readouterr()
    assert "sampler.num_steps=0" in captured.err and captured.out == ""
