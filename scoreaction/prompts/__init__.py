"""Prompt sets: built-in ones by name (``run.prompt_set``) and prompt files (``run.prompts_file``).

A prompt file holds one prompt a line; surrounding whitespace is stripped, blank lines and lines starting
with ``#`` are skipped. The built-in sets ship as such files next to this module (package data), each
naming its source in its header:

- ``single_prompt``: the one prompt of the authors' ImageReward experiment (hanyang1999/ContTimeRL4DM);
- ``simple_animals``: ddpo-pytorch's 45 animal names (kvablack/ddpo-pytorch);
- ``imagenet_animals``: ddpo-pytorch's first 398 ImageNet class names, the animals (kvablack/ddpo-pytorch).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

PromptSet = Literal["single_prompt", "simple_animals", "imagenet_animals"]
PROMPT_SETS: tuple[str, ...] = ("single_prompt", "simple_animals", "imagenet_animals")


class PromptFileError(ValueError):
    """A prompt file is missing, unreadable or holds no prompt; the message names the field and path."""


def parse_prompts(text: str) -> list[str]:
    """The prompts of a prompt file's text: stripped lines, without blank and '#' lines."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_prompts_file(path: str | Path, field: str = "run.prompts_file") -> list[str]:
    """The prompts of a file (one a line); PromptFileError naming `field` if it is missing, not a file,
    not UTF-8 text or holds no prompt."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PromptFileError(f"{field}={str(path)!r} does not exist (a text file, one prompt a line)")
    if not p.is_file():
        raise PromptFileError(f"{field}={str(path)!r} is not a file (a text file, one prompt a line)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptFileError(
            f"{field}={str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except OSError as exc:
        raise PromptFileError(f"{field}={str(path)!r} cannot be read: {exc.strerror or exc}") from None
    prompts = parse_prompts(text)
    if not prompts:
        raise PromptFileError(
            f"{field}={str(path)!r} holds no prompt (only blank lines or '#' comments); write one prompt a line"
        )
    return prompts


def builtin_prompts(name: str) -> list[str]:
    """The prompts of a built-in set (see PROMPT_SETS)."""
    if name not in PROMPT_SETS:
        raise PromptFileError(f"run.prompt_set={name!r} is unknown; allowed: {', '.join(PROMPT_SETS)}")
    text = resources.files(__name__).joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return parse_prompts(text)
