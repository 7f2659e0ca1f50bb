"""The code's layout: the Ray backend does not reach into the in-process one, the library does not import
the jobs or the service, and no library module grows past ~400 lines (split it by what it holds)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "scoreaction"
MAX_LINES = 420


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> set[str]:
    """Every module path this file imports (absolute imports; relative ones resolved against its package)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def test_the_ray_backend_does_not_import_the_in_process_backend():
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.startswith("scoreaction.trainer"))
        for p in _modules(LIBRARY / "distributed")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_library_imports_neither_jobs_nor_the_service():
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.split(".")[0] in ("serve", "jobs"))
        for p in _modules(LIBRARY)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_loop_and_the_learner_work_without_ray():
    """Pure training code: the epoch loop, the learner and the in-process backend never import ray."""
    for name in ("loop", "learner", "trainer", "rollouts", "scoring", "reporter", "ddp", "builders"):
        imported = _imports(LIBRARY / f"{name}.py")
        assert not any(m == "ray" or m.startswith("ray.") for m in imported), name


@pytest.mark.parametrize("path", _modules(LIBRARY), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_library_module_is_longer_than_about_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by what it holds"


def test_the_import_scanner_sees_imports():
    """The checks above would pass on a scanner that finds nothing: it must find these."""
    seen = _imports(LIBRARY / "distributed" / "learner_group.py")
    assert {"ray", "scoreaction.loop", "scoreaction.loop.EpochLoop"} <= seen
