"""``speedstructure bench gpu`` on a CPU with a tiny variant, with only torch, timm, numpy and
pyyaml importable (as after ``pip install -e . --no-deps`` on a GPU box)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib

import torch
import yaml

from support import ROOT

# what `bench gpu` may use: torch, timm, numpy, pyyaml and what they bring themselves
ALLOWED = {"torch", "torchvision", "timm", "numpy", "pyyaml", "tqdm"}
IMPORT_NAME = {"pyyaml": "yaml", "scikit-learn": "sklearn", "ruamel.yaml": "ruamel"}


def _blocked_imports() -> set[str]:
    """Import names of the project's other dependencies (every one of pyproject.toml's)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[=<>~! ]", d, maxsplit=1)[0].lower() for d in deps}
    blocked = {IMPORT_NAME.get(n, n.replace("-", "_")) for n in names - ALLOWED}
    assert {"mlflow", "dvc", "deepwave", "optuna", "pandas", "sklearn"} <= blocked
    return blocked


SCRIPT = """
import importlib.abc, importlib.machinery, json, sys
BLOCKED = set({blocked!r})

class Missing(importlib.abc.Loader):  # importing it fails as if it were not installed
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {{spec.name!r}} (blocked)", name=spec.name)

    def exec_module(self, module):
        pass

class NoDeps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, Missing())
        return None

sys.meta_path.insert(0, NoDeps())
from speedstructure.cli import main
rc = main(["bench", "gpu", "--variant", "tiny", "--steps", "3", "--json", {out!r}])
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & BLOCKED)
print("LOADED", json.dumps(loaded))
sys.exit(rc)
"""


def test_bench_gpu_runs_on_cpu_with_only_torch_timm_numpy_pyyaml(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["variants"]["tiny"] = {
        "profile": "competition",
        "arch": "eva_fusion",
        "backbone": "eva02_tiny_patch14_224.mim_in22k",
        "pretrained": "weights/never-downloaded.safetensors",  # random weights: never read
        "img_size": 28,
        "depth": 2,
        "split_at": 1,
        "fusion": "dual",
        "channel_heads": 2,
        "fusion_heads": 2,
        "backbone_kwargs": {"embed_dim": 32, "num_heads": 2},
        "train": {
            **raw["variants"]["comp_s10_dual42"]["train"],
            "val_batch_size": 2,
            "num_workers": 1,
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "gpu.json"
    blocked = _blocked_imports()
    env = {**os.environ, "SPEEDSTRUCTURE_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT.format(blocked=blocked, out=str(out)))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout  # no MLflow, DVC, deepwave, Optuna, pandas, ...
    report = json.loads(out.read_text())["gpu"]
    assert report["ok"] and report["device_type"] == "cpu" and report["steps"] == 3
    v = report["variants"]["tiny"]
    # the precision follows the device: bf16 where this CPU has it natively, else float32
    # with bf16 reported as emulated (never timed: nobody trains so)
    from speedstructure.engine.runtime import native_bf16

    main = "bf16" if native_bf16(torch.device("cpu")) else "none"
    assert v["amp"] == main and v["finite"] and v["ok"]
    steps = v[main]
    assert steps["steps"] == 3 and len(steps["losses"]) == 3 and steps["finite"]
    assert steps["samples_per_second"] > 0 and steps["peak_memory_gb"] is None  # no GPU here
    hours = 6000 * 30 / steps["samples_per_second"] / 3600
    assert abs(steps["projected_hours_per_fold"] - hours) <= 0.01 * hours + 0.01
    assert v["fp16"] == {"skipped": "fp16 with GradScaler needs CUDA"}
    if main == "none":
        assert "bf16 is emulated on this CPU" in v["bf16"]["skipped"]
    assert v["validation"]["batch"] == 2 and v["validation"]["finite"]
    assert v["tta"]["shape"] == [1, 300, 1259] and v["tta"]["dtype"] == "float32"
    r = v["resume"]
    assert r["ok"] and r["tta_val_finite"] and r["last_pt_mb"] > r["best_pt_mb"] > 0
    assert not (tmp_path / "weights").exists()  # nothing downloaded, nothing read
