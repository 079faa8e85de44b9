"""The Makefile's user interface: `make` alone lists the targets; `make clean` keeps data."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def _make(*args: str) -> str:
    out = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode()


def test_make_alone_lists_every_target_with_its_description():
    listed = dict(re.findall(r"^  make (\S+)\s+(.+)$", _make(), flags=re.M))
    targets = re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), flags=re.M)
    assert set(targets) <= set(listed), set(targets) - set(listed)
    assert all(text.strip() for text in listed.values())
    assert {"demo", "test", "clean", "help"} <= set(listed)


def test_make_clean_removes_outputs_but_not_data_the_venv_or_the_mlflow_history():
    removed = set(_make("-n", "clean").split()) - {"rm", "-rf"}
    assert {"store", "models", "metrics", "plots", "submission", "dvc_plots"} <= removed
    assert not removed & {"data", ".venv", "mlruns", "params.yaml", "src"}


def test_make_data_demo_and_repro_link_the_dvc_cache_instead_of_keeping_copies():
    """`dvc add` and `dvc repro` copy data/ and store/ into the DVC cache; these targets then
    relink them (tests/tiny_project.py checks the links `make data` leaves)."""
    for target in ("data", "demo", "repro"):
        assert "checkout --relink" in _make("-n", target), target
