"""The package's shape: stage modules named as DVC stages, deps covering imports, short functions.

These tests read the source (AST) and ``dvc.yaml``; they import nothing from the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PKG = SRC / "speedstructure"
MAX_FUNCTION_LINES = 80


def _dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _module_file(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imported_modules(path: Path) -> set[str]:
    """``speedstructure`` modules imported anywhere in ``path`` (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in found if m.split(".")[0] == "speedstructure" and _module_file(m)}


def _with_parents(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[: i + 1]) for i in range(len(parts))}


def import_closure(*roots: str) -> set[Path]:
    """Every package file that running ``roots`` imports, transitively (with parent packages)."""
    todo, seen = list(roots), set()
    while todo:
        mod = todo.pop()
        for m in _with_parents(mod) - seen:
            seen.add(m)
            todo += sorted(_imported_modules(_module_file(m)))
    return {_module_file(m) for m in seen}


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def _stage_modules() -> set[str]:
    return {p.stem for p in (PKG / "stages").glob("*.py") if p.stem != "__init__"}


def _stage_body(stage: dict) -> dict:
    return stage["do"] if "foreach" in stage else stage


def test_every_dvc_stage_is_a_module_of_stages_named_as_it():
    assert set(_dvc_stages()) == _stage_modules()


def test_every_stage_command_runs_its_own_module():
    for name, stage in _dvc_stages().items():
        assert _stage_body(stage)["cmd"].split()[:2] == ["speedstructure", name], name


@pytest.mark.parametrize("stage", sorted(_stage_modules()))
def test_stage_deps_cover_every_module_it_imports(stage):
    deps = [d for d in _stage_body(_dvc_stages()[stage])["deps"] if isinstance(d, str)]
    needed = import_closure("speedstructure.cli", f"speedstructure.stages.{stage}")
    missing = sorted(p.relative_to(ROOT).as_posix() for p in needed if not _covered(p, deps))
    assert not missing, f"dvc.yaml stage '{stage}' lacks deps on the modules it imports: {missing}"


def test_the_closure_follows_function_level_imports(tmp_path):
    # tune imports the engine's checkpoint module inside a function: it must be in the closure
    closure = import_closure("speedstructure.stages.tune")
    assert PKG / "engine" / "checkpoint.py" in closure
    assert PKG / "__init__.py" in closure


def _long_functions(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            n = node.end_lineno - first + 1
            if n > MAX_FUNCTION_LINES:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_is_over_80_lines():
    long = [f for p in sorted(PKG.rglob("*.py")) for f in _long_functions(p)]
    assert not long, "functions over 80 lines: " + "; ".join(long)


def test_each_pipeline_path_is_spelled_once_in_the_code():
    for literal in (
        "folds/folds.csv",
        "ensemble/ensemble.json",
        "registry/registered.json",
        "submission/submission.npz",
        "metrics/evaluate.json",
    ):
        hits = [p for p in PKG.rglob("*.py") if literal in p.read_text()]
        assert [p.name for p in hits] == ["config.py"], (literal, hits)
