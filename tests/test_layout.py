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
    return {m for m in _imports_of(path, "speedstructure") if _module_file(m)}


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
        assert [p.relative_to(PKG).as_posix() for p in hits] == ["config/schema.py"], (
            literal,
            hits,
        )


# --------------------------------------------------------------------------- layers

# The package's layers, lowest first: a module may import its own layer and the layers below
# it, never one above.  The foundation is the top-level modules (errors, files, metrics and the
# command table, which imports each command's module by name only, at run time).  Tracking
# needs only the configuration, so every layer above may log to MLflow.  The engine trains
# any torch module: the models it trains sit above it and hand it what it needs.
LAYERS: tuple[str, ...] = (
    "<top-level modules>",
    "config",
    "tracking",
    "data",
    "physics",
    "synth",
    "engine",
    "models",
    "ensemble",
    "reports",
    "stages",
    "tools",
)
MAX_FILE_LINES = 500


def layer_of(module: str) -> int:
    """The layer index of a ``speedstructure`` module (its first sub-package)."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS):
        return LAYERS.index(parts[1])
    return 0  # speedstructure itself and its top-level modules


def _package_modules(pkg: Path) -> dict[str, Path]:
    root = pkg.parent
    out = {}
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def _imports_of(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports (``from p import m`` counts ``p.m``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == package}


def layer_violations(pkg: Path) -> list[str]:
    """``a imports b`` for every import of a module in a layer above the importer's."""
    modules = _package_modules(pkg)
    out = []
    for name, path in modules.items():
        for imported in sorted(_imports_of(path, pkg.name) & set(modules)):
            if layer_of(imported) > layer_of(name):
                out.append(f"{name} imports {imported}")
    return out


def stage_imports(pkg: Path) -> list[str]:
    """``a imports b`` for every stage module that imports another stage module."""
    modules = _package_modules(pkg)
    stages = {m for m in modules if m.startswith(f"{pkg.name}.stages.")}
    return [
        f"{name} imports {imported}"
        for name in sorted(stages)
        for imported in sorted(_imports_of(modules[name], pkg.name) & (stages - {name}))
    ]


def long_files(pkg: Path) -> list[str]:
    return [
        f"{p.relative_to(pkg.parent)} ({n} lines)"
        for p in sorted(pkg.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    ]


def test_every_subpackage_is_a_named_layer():
    subpackages = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert subpackages == set(LAYERS[1:])


def test_no_module_imports_a_layer_above_it():
    assert not layer_violations(PKG)


def test_no_stage_imports_another_stage():
    assert not stage_imports(PKG)


def test_no_file_is_over_500_lines():
    assert not long_files(PKG)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "speedstructure"
    for rel, text in {"__init__.py": "", **files}.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(pkg).parents:
            (pkg / parent / "__init__.py").touch()
        path.write_text(text)
    return pkg


def test_layer_rule_fails_on_an_import_from_above(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "engine/loop.py": "from speedstructure.models.build import build_model\n",
            "models/build.py": "from speedstructure.engine import loop\n",
            "config/schema.py": "from speedstructure.errors import UserError\n",
            "errors.py": "",
        },
    )
    assert layer_violations(pkg) == [
        "speedstructure.engine.loop imports speedstructure.models.build"
    ]
    (pkg / "config" / "schema.py").write_text(
        "def f():\n    from speedstructure.stages import train\n"
    )
    (pkg / "stages" / "train.py").parent.mkdir()
    (pkg / "stages" / "__init__.py").touch()
    (pkg / "stages" / "train.py").touch()
    assert "speedstructure.config.schema imports speedstructure.stages.train" in layer_violations(
        pkg
    )


def test_stage_rule_fails_on_a_stage_importing_a_stage(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "stages/refine.py": "from speedstructure.stages.qc import run_qc\n",
            "stages/qc.py": "from speedstructure.reports import qc\n",
            "reports/qc.py": "",
        },
    )
    assert stage_imports(pkg) == ["speedstructure.stages.refine imports speedstructure.stages.qc"]


def test_file_rule_fails_on_a_501_line_file(tmp_path):
    pkg = _package(tmp_path, {"data/big.py": "x = 1\n" * 501, "data/ok.py": "x = 1\n" * 500})
    assert long_files(pkg) == ["speedstructure/data/big.py (501 lines)"]


# --------------------------------------------------------------------------- one home per fact


WATER_VELOCITY_VALUES = (1.5, 1500.0)  # km/s, m/s


def water_constants(pkg: Path) -> list[str]:
    """The water velocity given to a name about water (a constant, a default, a field)
    outside the schema: it is ``synth.water_velocity`` of params.yaml, with its default in
    ``config/schema.py`` only; everything else receives it."""
    out = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg).as_posix()
        if rel == "config/schema.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            pairs: list[tuple[str, ast.AST]] = []
            if isinstance(node, ast.Assign):
                pairs += [(t.id, node.value) for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                pairs.append((node.target.id, node.value))
            elif isinstance(node, ast.arguments):
                args = node.posonlyargs + node.args
                named = [a.arg for a in args[len(args) - len(node.defaults) :]]
                pairs += list(zip(named, node.defaults, strict=True))
                kw = zip(node.kwonlyargs, node.kw_defaults, strict=True)
                pairs += [(a.arg, d) for a, d in kw if d]
            out += [
                f"{rel}:{value.lineno} {name} = {value.value}"
                for name, value in pairs
                if "water" in name.lower()
                and isinstance(value, ast.Constant)
                and value.value in WATER_VELOCITY_VALUES
            ]
    return out


def test_the_water_velocity_has_one_home():
    assert not water_constants(PKG)


def test_water_rule_fails_on_a_default_and_a_constant(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "metrics.py": "def floor(v, water_velocity=1.5):\n    return v\n",
            "physics/misfit.py": "WATER_VELOCITY_MS = 1500.0\n",
            "config/schema.py": "class S:\n    water_velocity: float = 1.5\n",
        },
    )
    assert water_constants(pkg) == [
        "metrics.py:1 water_velocity = 1.5",
        "physics/misfit.py:1 WATER_VELOCITY_MS = 1500.0",
    ]
