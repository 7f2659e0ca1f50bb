"""run.prompts_file (one prompt a line) and the built-in prompt sets (run.prompt_set), shipped as package
data."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import pytest

import scoreaction.prompts as prompts_pkg
from scoreaction.config import Config, ConfigError, build_config
from scoreaction.prompts import PROMPT_SETS, builtin_prompts, parse_prompts

ROOT = Path(__file__).resolve().parents[1]
UNICORN = "A unicorn in a clearing. it has a single shining horn. volumetric light."


def test_a_prompts_file_gives_one_prompt_a_line(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text(
        "# my prompts\n\n  a photo of a cat  \n#not this one\na red bicycle, studio light\n\n", "utf-8"
    )
    cfg = build_config("tiny", overrides=[f"run.prompts_file={f}"])
    assert cfg.run.prompts == ["a photo of a cat", "a red bicycle, studio light"]
    assert cfg.run.prompts_file == str(f)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "does not exist"),
        ("", "holds no prompt"),
        ("\n  \n# only a comment\n", "holds no prompt"),
        (b"\xff\xfe a cat", "is not UTF-8"),
        ("dir", "is not a file"),
    ],
)
def test_a_bad_prompts_file_is_a_config_error_naming_the_field(tmp_path, content, match):
    f = tmp_path / "prompts.txt"
    if content == "dir":
        f.mkdir()
    elif isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content, "utf-8")
    with pytest.raises(ConfigError, match=match) as info:
        build_config("tiny", overrides=[f"run.prompts_file={f}"])
    assert "run.prompts_file" in str(info.value)


@pytest.mark.parametrize(
    ("name", "count", "first", "last"),
    [
        ("single_prompt", 1, UNICORN, UNICORN),
        ("simple_animals", 45, "cat", "kangaroo"),
        ("imagenet_animals", 398, "tench, Tinca tinca", "puffer, pufferfish, blowfish, globefish"),
    ],
)
def test_builtin_prompt_sets(name, count, first, last):
    cfg = build_config("tiny", overrides=[f"run.prompt_set={name}"])
    assert cfg.run.prompts == builtin_prompts(name)
    assert (len(cfg.run.prompts), cfg.run.prompts[0], cfg.run.prompts[-1]) == (count, first, last)
    assert len(set(cfg.run.prompts)) == count


def test_unknown_set_and_conflicting_sources_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="run.prompt_set='cats'"):
        build_config("tiny", overrides=["run.prompt_set=cats"])
    f = tmp_path / "p.txt"
    f.write_text("a cat\n", "utf-8")
    with pytest.raises(ConfigError, match="set one of them"):
        build_config("tiny", overrides=["run.prompt_set=simple_animals", f"run.prompts_file={f}"])
    with pytest.raises(ConfigError, match=r"run.prompts .* differs"):
        build_config("tiny", overrides=["run.prompts=[a dog]", f"run.prompts_file={f}"])


def test_a_dumped_config_keeps_its_prompts_where_the_file_is_not(tmp_path):
    """A learner worker on another node re-validates the driver's config without the prompt file."""
    f = tmp_path / "p.txt"
    f.write_text("a cat\na dog\n", "utf-8")
    cfg = build_config("tiny", overrides=[f"run.prompts_file={f}"])
    dumped = cfg.model_dump()
    assert Config.model_validate(dumped).run.prompts == ["a cat", "a dog"]
    f.unlink()
    assert Config.model_validate(dumped).run.prompts == ["a cat", "a dog"]


def test_parse_prompts_strips_and_skips():
    assert parse_prompts("\n # c\n x \r\ny\n") == ["x", "y"]


def test_the_prompt_sets_are_package_data():
    """pyproject's package data covers every built-in set's file, so a wheel ships them."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    pkg_dir = Path(prompts_pkg.__file__).parent
    assert pkg_dir == ROOT / "scoreaction" / "prompts"
    patterns = data["scoreaction.prompts"]
    for name in PROMPT_SETS:
        assert (pkg_dir / f"{name}.txt").is_file()
        assert any(fnmatch.fnmatch(f"{name}.txt", p) for p in patterns), name
        # each file names its source
        assert "Source: github.com/" in (pkg_dir / f"{name}.txt").read_text("utf-8")
