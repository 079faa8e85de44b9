"""``speedstructure bench parallel``: two trainings at once against one after the other.

What ``dvc queue start -j 2`` (or a second user) does to a machine: two CPU-bound training
processes side by side.  A tiny project is written to a temporary folder (random data in
the challenge layout, ``--samples`` samples, a fold table) and the default profile's
``tiny_dual42`` (``--variant``) is trained for ``--epochs`` epochs by two
``speedstructure train`` processes, first one after the other (*sequential*), then both
started at once (*parallel*); ``--repeats`` times each, the medians reported.  It runs once
with ``train.threads: null`` (the automatic budget: cores / training processes) and once
with ``train.threads`` = all cores (each process takes every core: oversubscribed, how
training ran before the budget existed).  ``parallel_over_sequential`` is the ratio of the
wall times: at most 1 means the two trainings lose nothing by sharing the machine.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from speedstructure.config.schema import V_MAX, V_MIN, Params
from speedstructure.config.typed import PARAMS_FILE

_THREADS_LINE = re.compile(r"CPU threads: (\d+)")


def _write_project(folder: Path, params: Params, *, samples: int, epochs: int, threads) -> None:
    """params.yaml (the shipped one, with a short training), data/bench.zip and folds.csv."""
    from speedstructure.data.samples import ZipWriter

    raw = yaml.safe_load((params.root / PARAMS_FILE).read_text())
    raw["train"] = {
        **raw["train"],
        "epochs": epochs,
        "cosine_epochs": epochs,
        "patience": 0,
        "progress": False,
        "device": "cpu",
        "threads": threads,
    }
    (folder / PARAMS_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))
    rng = np.random.default_rng(0)
    ids = [f"BENCH{i:013d}" for i in range(samples)]
    (folder / "data").mkdir(exist_ok=True)
    with ZipWriter(folder / "data" / "bench.zip") as zw:
        for sid in ids:
            x = rng.normal(0.0, 0.015, (5, 10001, 31)).astype(np.float32)
            y = rng.uniform(V_MIN, V_MAX, (300, 1259)).astype(np.float32)
            zw.add(sid, x, y)
    n_val = max(1, samples // 4)
    rows = [f"{sid},data/bench.zip,{0 if i < n_val else 1}" for i, sid in enumerate(ids)]
    (folder / "folds.csv").write_text("sample_id,zip,fold\n" + "\n".join(rows) + "\n")


def _start(folder: Path, variant: str, out: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "speedstructure.cli", "train", "--variant", variant]
    cmd += ["--fold", "0", "--folds", "folds.csv", "--output", out, "--no-mlflow", "--quiet"]
    env = {**os.environ, "SPEEDSTRUCTURE_ROOT": str(folder)}
    return subprocess.Popen(
        cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _wait(procs: list[subprocess.Popen]) -> list[int]:
    """Wait for ``procs``; the CPU threads each reported (an error if one failed)."""
    threads = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"bench training failed ({p.returncode}):\n{err[-2000:]}")
        m = _THREADS_LINE.search(err)
        threads.append(int(m.group(1)) if m else -1)
    return threads


def _timed(folder: Path, variant: str, tag: str, together: bool) -> tuple[float, list[int]]:
    """Wall seconds of two trainings (``tag``-a, ``tag``-b), at once or one after the other."""
    t0 = time.perf_counter()
    if together:
        threads = _wait([_start(folder, variant, f"out/{tag}-{ab}") for ab in "ab"])
    else:
        threads = [t for ab in "ab" for t in _wait([_start(folder, variant, f"out/{tag}-{ab}")])]
    return time.perf_counter() - t0, threads


def _mode(folder: Path, variant: str, repeats: int, name: str) -> dict[str, Any]:
    seq, par, threads = [], [], {}
    for r in range(repeats):
        s, threads["sequential"] = _timed(folder, variant, f"{name}-s{r}", together=False)
        p, threads["parallel"] = _timed(folder, variant, f"{name}-p{r}", together=True)
        seq.append(s)
        par.append(p)
    return {
        "sequential_seconds_median": round(statistics.median(seq), 2),
        "parallel_seconds_median": round(statistics.median(par), 2),
        "parallel_over_sequential": round(statistics.median(par) / statistics.median(seq), 3),
        "threads_per_process": threads,
        "sequential_seconds_all": [round(x, 2) for x in seq],
        "parallel_seconds_all": [round(x, 2) for x in par],
    }


def bench_parallel(
    params: Params, *, variant: str, samples: int, epochs: int, repeats: int
) -> dict[str, Any]:
    """Two trainings at once vs one after the other, with the automatic thread budget and
    with every process taking all cores (see the module docstring)."""
    from speedstructure.engine.runtime import usable_cores

    cores = usable_cores()
    out: dict[str, Any] = {
        "variant": variant,
        "samples": samples,
        "epochs": epochs,
        "repeats": repeats,
        "cores": cores,
        "cpu": _cpu_name(),
    }
    for name, threads in (("auto_threads", None), ("all_cores_each", cores)):
        with tempfile.TemporaryDirectory(prefix="speedstructure-bench-") as tmp:
            folder = Path(tmp)
            _write_project(folder, params, samples=samples, epochs=epochs, threads=threads)
            out[name] = _mode(folder, variant, repeats, name)
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
