"""The repository is self-contained: no test, script, config or document reads or cites a path outside it.

A fresh clone in an empty folder has nothing beside it. Until issue 13, 25 manifest tests read the KubeRay CRDs
from a `shared` folder next to the checkout (CI happened to have one) and the docs sent readers to a notation
file there; the CRD schemas now live in tests/data/kuberay-crds/ and the notation in README.md and the module
docstrings. These tests scan the files themselves, so a new reference fails here rather than on a user's clone.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What a clone holds and what reads or documents it: code, tests, entry points, deployment files, docs, CI.
SCANNED_DIRS = ["scoreaction", "jobs", "serve", "tests", "cluster", ".ci"]
SCANNED_FILES = ["Makefile", "README.md", "pyproject.toml", "constraints.txt", ".dockerignore", ".gitignore"]
SKIPPED_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".json", ".toml", ".txt", ".cfg", ".ini", ".sh", ""}

# A sibling folder of the checkout (spelled in pieces so that this file does not match itself), the
# workplace's absolute paths, and pathlib spellings of "the folder above the repository".
OUTSIDE = [
    re.escape("../" + "shared"),
    re.escape("..\\" + "shared"),
    re.escape("/work/" + "shared"),
    re.escape("/work/" + "main"),
    r"ROOT\.parent\s*/",
    r"\.parents\[1\]\.parent\b",
]
OUTSIDE_RE = re.compile("|".join(OUTSIDE))


def scanned_files() -> list[Path]:
    files = [ROOT / f for f in SCANNED_FILES if (ROOT / f).is_file()]
    for d in SCANNED_DIRS:
        files += [
            p
            for p in sorted((ROOT / d).rglob("*"))
            if p.is_file()
            and p.suffix in TEXT_SUFFIXES
            and not SKIPPED_PARTS & set(p.relative_to(ROOT).parts)
        ]
    return files


def test_the_scan_sees_the_repository():
    names = {p.relative_to(ROOT).as_posix() for p in scanned_files()}
    assert {
        "README.md",
        "Makefile",
        ".ci/run",
        "tests/test_cluster.py",
        "scoreaction/config/__init__.py",
        "scoreaction/sde.py",
        "cluster/kuberay/rayjob-finetune.yaml",
        "tests/data/kuberay-crds/RayJob.json",
    } <= names
    assert OUTSIDE_RE.search("CRD_DIR = ROOT" + ".parent / 'x'") and OUTSIDE_RE.search(
        "see ../" + "shared/X." + "md"
    )


def test_nothing_refers_outside_the_repository():
    hits = []
    for path in scanned_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE_RE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not hits, "paths outside the repository (a fresh clone has nothing there):\n" + "\n".join(hits)


def test_the_readmes_link_only_to_files_in_the_repository():
    """Relative Markdown links resolve, and no README names a Markdown file the repository does not hold."""
    known = {p.name for p in scanned_files() if p.suffix == ".md"}
    problems = []
    for readme in [
        ROOT / "README.md",
        *sorted((ROOT / "cluster").rglob("*.md")),
        *(ROOT / "tests").rglob("*.md"),
    ]:
        text = readme.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (readme.parent / target).exists():
                problems.append(f"{readme.relative_to(ROOT)}: link to {target!r}, which does not exist")
        for name in set(re.findall(r"\b([\w.-]+\.md)\b", text)):
            if name not in known:
                problems.append(f"{readme.relative_to(ROOT)}: names {name}, which is not in the repository")
    assert not problems, "\n".join(problems)


def test_code_and_tests_cite_only_markdown_files_in_the_repository():
    """A docstring or comment that sends the reader to a notes file only the developers had is as
    broken for a user as a dead link."""
    known = {p.name for p in scanned_files() if p.suffix == ".md"}
    problems = []
    for path in scanned_files():
        if path.suffix != ".py":
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for name in re.findall(r"\b([A-Za-z][\w-]*\.md)\b", line):
                if name not in known:
                    problems.append(
                        f"{path.relative_to(ROOT)}:{n}: names {name}, which is not in the repository"
                    )
    assert not problems, "\n".join(problems)


def test_makefile_and_ci_use_only_repository_paths():
    """`make test` (the README's and CI's test command) runs the repository's own venv on its own tests."""
    make = (ROOT / "Makefile").read_text()
    (test_rule,) = re.findall(r"^test:.*\n((?:\t.*\n)+)", make, re.M)
    assert "pytest" in test_rule and ".." not in test_rule
    assert "-e '.[dev]'" in make or '-e ".[dev]"' in make  # the editable install is this checkout
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    # pytest's configuration: the tests of this repository, nothing else
    assert re.search(r'^testpaths = \["tests"\]$', (ROOT / "pyproject.toml").read_text(), re.M)
