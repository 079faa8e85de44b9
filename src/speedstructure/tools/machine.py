"""What the machine has: CPU, GPUs, memory, free disk, versions, and what the active profile
needs of it (disk for the zips, the store and the checkpoints).  Each finding is a
:class:`Check`; ``speedstructure doctor`` (:mod:`speedstructure.tools.doctor`) prints them.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from speedstructure.config.schema import Params

log = logging.getLogger(__name__)


GB = 1e9
# Bytes a sample takes: the gathers (5 x 10001 x 31 float32) and the target (300 x 1259)
SAMPLE_BYTES = 5 * 10001 * 31 * 4 + 300 * 1259 * 4
# The challenge's sizes (real data): train 2000 + extended about 4000, test 150
REAL_SAMPLES = {"train": 2000, "extended": 4000, "test": 150}
CHECKPOINT_COPIES = 3  # best.pt, last.pt (weights, EMA, optimizer state: about 2x), the cache
SPARE_FRACTION = 0.1  # room for MLflow, plots, reports and temporary files


@dataclasses.dataclass
class Check:
    """One finding: a line of the screen and, when it stops the profile, a reason."""

    section: str
    label: str
    value: str
    problem: str | None = None


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpus() -> list[tuple[str, float]]:
    """``(name, memory GB)`` of each CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        prop = torch.cuda.get_device_properties(i)
        out.append((prop.name, prop.total_memory / GB))
    return out


def free_disk(path: Path) -> float:
    """Free bytes on the file system holding ``path`` (its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return float(shutil.disk_usage(path).free)


def dvc_cache_dir(root: Path) -> Path:
    """The DVC cache: ``cache.dir`` of ``.dvc/config`` (or its local override), else
    ``.dvc/cache``."""
    import configparser

    for name in ("config.local", "config"):
        cfg = configparser.ConfigParser()
        try:
            cfg.read(root / ".dvc" / name)
        except configparser.Error:
            continue
        if cfg.has_option("cache", "dir"):
            return (root / ".dvc" / cfg.get("cache", "dir")).resolve()
    return root / ".dvc" / "cache"


def versions() -> str:
    names = ("torch", "dvc", "mlflow", "optuna")
    found = []
    for n in names:
        try:
            found.append(f"{n} {metadata.version(n)}")
        except metadata.PackageNotFoundError:
            found.append(f"{n} missing")
    return f"Python {platform.python_version()}, " + ", ".join(found)


def machine_checks(params: Params) -> list[Check]:
    import torch

    from speedstructure.engine.runtime import (
        cpu_capability,
        muon_dtype,
        native_bf16,
        resolve_threads,
        usable_cores,
    )

    cpu = torch.device("cpu")
    bf16 = "native" if native_bf16(cpu) else "emulated (20-40x slower than float32)"
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = str(muon_dtype(params.train.muon_precision, dev)).removeprefix("torch.")
    threads = resolve_threads(params.train.threads)
    found = gpus()
    gpu_text = ", ".join(f"{n} ({m:.0f} GB)" for n, m in found) or "none"
    return [
        Check("machine", "CPU", f"{cpu_model()}; torch uses {cpu_capability()}"),
        Check("machine", "bf16 on the CPU", f"{bf16}; Muon orthogonalises in {precision}"),
        Check("machine", "cores", f"{usable_cores()} usable; a training uses {threads} threads"),
        Check("machine", "GPUs", gpu_text),
        Check("machine", "versions", versions()),
    ]


# --------------------------------------------------------------------------- disk and memory


def profile_samples(params: Params) -> int:
    """Samples the active profile's data holds: the synthetic set's counts for the default
    profile (unless real zips are there), the challenge's for the competition profile."""
    if params.profile == "competition" or _real_data(params):
        return sum(REAL_SAMPLES.values())
    s = params.synth
    return s.n_train + s.n_extended_1 + s.n_extended_2 + s.n_test + s.ood.n_test


def _real_data(params: Params) -> bool:
    data = params.path("data")
    return (data / "train.zip").is_file() and not (data / "synth_meta.json").is_file()


def checkpoint_bytes(params: Params) -> int:
    """Bytes of the training runs' checkpoints (from each variant's parameter count)."""
    from speedstructure.models.build import build_model, count_parameters

    sizes: dict[str, int] = {}
    total = 0
    for run in params.runs.values():
        name = run.variant
        if name not in sizes:
            model = build_model(params.variant(name), meta=True)
            sizes[name] = count_parameters(model)["total"] * 4 * CHECKPOINT_COPIES
        total += sizes[name]
    return total


def disk_need(params: Params) -> tuple[float, str]:
    """Bytes the active profile needs: the zips (those not there yet), the sample store,
    their copies in the DVC cache (``dvc add`` and ``dvc repro`` copy them: measured 6.6 GB
    beside 3.3 GB of zips and a 2.9 GB store), the checkpoints, and a tenth more; with the
    breakdown."""
    n = profile_samples(params)
    have_zips = all(params.zip_path(s).is_file() for s in params.data.zips)
    zips = 0 if have_zips else n * SAMPLE_BYTES
    store = 0 if params.path("store").is_dir() else n * SAMPLE_BYTES
    cache = zips + store
    ckpt = checkpoint_bytes(params)
    need = (zips + store + cache + ckpt) * (1 + SPARE_FRACTION)
    parts = (
        f"zips {zips / GB:.1f} + store {store / GB:.1f} + DVC cache {cache / GB:.1f}"
        f" + checkpoints {ckpt / GB:.1f} GB"
    )
    log.debug("disk need for %d samples: %s", n, parts)
    return need, parts


def disk_checks(params: Params) -> list[Check]:
    root = params.root
    places = {
        "data/": params.path("data"),
        "DVC cache": dvc_cache_dir(root),
        "$TMPDIR": Path(tempfile.gettempdir()),
    }
    free = {label: free_disk(p) for label, p in places.items()}
    text = ", ".join(f"{label} {b / GB:.0f} GB" for label, b in free.items())
    need, parts = disk_need(params)
    worst = min(free["data/"], free["DVC cache"])
    problem = None
    if worst < need:
        problem = (
            f"disk: {worst / GB:.0f} GB free, the {params.profile} profile needs about "
            f"{need / GB:.0f} GB ({parts})"
        )
    checks = [Check("machine", "free disk", text, problem)]
    checks.append(Check("machine", "disk needed", f"about {need / GB:.1f} GB ({parts})"))
    return checks


def memory_checks() -> list[Check]:
    from speedstructure.engine.data import memory_bytes

    have = memory_bytes()
    if have is None:
        return [Check("machine", "memory", "unknown")]
    return [Check("machine", "memory", f"{have / GB:.0f} GB")]
