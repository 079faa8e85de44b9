"""Where and how a training process runs: device, mixed precision, ranks, seeds, progress.

* :func:`pick_device`: ``auto`` (CUDA when available) | ``cpu`` | ``cuda``; under
  ``torchrun`` each rank takes ``cuda:<LOCAL_RANK>``.
* :func:`amp_dtype` / :func:`autocast`: ``amp: none | auto | bf16 | fp16`` (``auto``: bf16
  where it is native, float32 elsewhere; fp16 needs CUDA; bf16 on a CPU without native bf16
  runs, with a one-line warning naming its cost).
* The precision rule, one place: :func:`native_bf16` (CUDA, or a CPU whose torch may use
  AVX-512 BF16 or AMX) and :func:`muon_dtype` (``train.muon_precision: auto``: bfloat16 on
  CUDA, as the seed ran, float32 on every CPU).
* :func:`setup_distributed`: the process group under ``torchrun`` (gloo on CPU, nccl on
  CUDA), described by a :class:`Dist`; without ``torchrun`` one rank of one.
* :func:`seed_everything`, :func:`rng_state` / :func:`set_rng_state` (python, numpy,
  torch and CUDA generators, in a form ``torch.load(weights_only=True)`` accepts) and
  :func:`gather_rng_states` (one state per rank, for ``last.pt``).
* :func:`progress_bar` (a tqdm bar on standard error, or the bare iterable) and
  :func:`log_main` (a diagnostic from rank 0 only).
* :func:`set_threads` / :func:`resolve_threads`: torch's CPU thread budget, ``train.threads``
  or (``null``) the cores this process may use divided by the training processes on the
  machine (:func:`training_processes`), so that two trainings side by side do not
  oversubscribe the cores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from speedstructure.config.schema import AMPS, MUON_PRECISIONS
from speedstructure.errors import UserError

log = logging.getLogger("speedstructure.engine")  # the engine's diagnostics


# --------------------------------------------------------------------------- device, AMP


def pick_device(req: str | torch.device | None, local_rank: int | None = None) -> torch.device:
    """The device for ``req`` (``None`` = ``auto``); ``cuda`` becomes ``cuda:<local_rank>``."""
    req = "auto" if req is None else str(req)
    if req == "auto":
        req = "cuda" if torch.cuda.is_available() else "cpu"
    if req.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("device 'cuda' requested but CUDA is not available")
        if req == "cuda" and local_rank is not None:
            req = f"cuda:{local_rank}"
    elif req != "cpu":
        raise UserError(f"unknown device '{req}' (use cpu, cuda or auto)")
    return torch.device(req)


def launcher_local_rank() -> int | None:
    """``LOCAL_RANK`` when started by ``torchrun``, else None."""
    return int(os.environ.get("LOCAL_RANK", "0")) if "RANK" in os.environ else None


def is_main_process() -> bool:
    """True on rank 0 (and without ``torchrun``)."""
    return int(os.environ.get("RANK", "0")) == 0


def cpu_capability() -> str:
    """The instruction set torch's CPU kernels use (``AVX2``, ``AVX512``, ...; capped by
    ``ATEN_CPU_CAPABILITY``)."""
    return str(torch.backends.cpu.get_cpu_capability())


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run natively on ``device``: always on CUDA; on a CPU
    only when torch may use AVX-512 (not capped to AVX2) and the CPU has AVX-512 BF16 or AMX.
    Elsewhere (AVX2-only x86, ARM) torch emulates them, 20-40x slower than float32."""
    if device.type == "cuda":
        return True
    if device.type != "cpu" or not cpu_capability().startswith("AVX512"):
        return False
    cpu = torch.cpu
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


def muon_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of Muon's orthogonalisation: ``bf16`` / ``fp32`` as asked; ``auto`` is
    bfloat16 on CUDA (torch's and the seed's) and float32 on a CPU (an orthogonalisation of
    the tiny models' matrices takes 2-6 ms in float32 against 74-283 ms in emulated bf16 on
    an AVX2 CPU; float32 is never the slow choice on a CPU)."""
    precision = str(precision or "auto").lower()
    if precision not in MUON_PRECISIONS:
        raise UserError(f"train.muon_precision must be auto, bf16 or fp32, got '{precision}'")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and not native_bf16(device):
        warn_emulated_bf16("train.muon_precision bf16")
    return torch.bfloat16 if precision == "bf16" else torch.float32


_warned: set[str] = set()


def warn_emulated_bf16(what: str) -> None:
    """The one-line warning for a bf16 choice on a CPU that emulates bf16 (once per process
    and setting)."""
    if what in _warned:
        return
    _warned.add(what)
    log.warning(
        "%s on a CPU without native bf16 (torch CPU capability %s): bf16 matrix products are "
        "emulated, 20-40x slower than float32; use float32 here (amp: none, "
        "muon_precision: auto)",
        what,
        cpu_capability(),
    )


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` (``none`` -> None); ``auto`` is bf16 where bf16 is
    native (:func:`native_bf16`: CUDA, AVX-512 BF16 or AMX) and None (float32) elsewhere;
    fp16 needs CUDA; bf16 on a CPU without native bf16 is warned about
    (:func:`warn_emulated_bf16`)."""
    amp = str(amp or "none").lower()
    if amp not in AMPS:
        raise UserError(f"train.amp must be one of {', '.join(AMPS)}, got '{amp}'")
    if amp == "auto":
        amp = "bf16" if native_bf16(device) else "none"
    if amp == "fp16" and device.type != "cuda":
        raise UserError("train.amp fp16 needs CUDA (use bf16 or none on CPU)")
    if amp == "bf16" and not native_bf16(device):
        warn_emulated_bf16("train.amp bf16")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def precision_record(cfg_amp: str, muon_precision: str, device: torch.device) -> dict[str, str]:
    """What a run logs about its precision: the device, the CPU capability, whether bf16
    is native, the autocast dtype and Muon's orthogonalisation dtype as resolved."""
    amp = amp_dtype(cfg_amp, device)
    return {
        "device": device.type,
        "cpu_capability": cpu_capability(),
        "native_bf16": str(native_bf16(device)).lower(),
        "amp_dtype": "float32" if amp is None else str(amp).removeprefix("torch."),
        "muon_dtype": str(muon_dtype(muon_precision, device)).removeprefix("torch."),
    }


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` in ``dtype``, or a no-op context without one."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this call created the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, obj: object) -> list:
        """``obj`` of every rank, in rank order (a collective call under DDP)."""
        if not self.active:
            return [obj]
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered


def setup_distributed(device_req: str | torch.device | None) -> tuple[Dist, torch.device]:
    """The ranks (from ``torchrun``'s environment) and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device_req, local if world > 1 else None)
    d = Dist(rank=rank, world=world, local_rank=local)
    if world > 1 and "RANK" in os.environ:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
            d.owns_group = True
        d.rank, d.world = dist.get_rank(), dist.get_world_size()
    else:
        d.world, d.rank = 1, 0
    return d, dev


@dataclass(frozen=True)
class Placement:
    """Where one training runs, decided once (:func:`place`): its ranks, device, CPU threads."""

    ranks: Dist
    device: torch.device
    threads: int


def place(device_req: str | torch.device | None, threads: int | None) -> Placement:
    """This process's ranks and device (:func:`setup_distributed`) and its CPU threads
    (:func:`set_threads`): called once per training, before the model is built."""
    ranks, device = setup_distributed(device_req)
    return Placement(ranks, device, set_threads(threads))


def teardown_distributed(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- seeds, RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def training_seed(seed: int, ranks: Dist, *, weights: bool) -> int:
    """The distributed seed rule.  The model's initial weights are drawn from ``seed`` on
    every rank (``weights=True``, before the model is built): data-parallel training starts
    from identical weights, whatever the rank.  Everything after (the sampler's padding, flips,
    dropout) is drawn from ``seed + rank``, so the ranks do not draw the same augmentations.
    With one process both are ``seed``."""
    return int(seed) if weights else int(seed) + ranks.rank


def rng_state() -> dict:
    """This process's generator states (tensors and plain values only)."""
    np_state = np.random.get_state()
    st = {
        "python": random.getstate(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def gather_rng_states(d: Dist) -> list[dict]:
    """Every rank's :func:`rng_state`, in rank order (a collective call under DDP)."""
    return d.gather(rng_state())


# --------------------------------------------------------------------------- progress, logging


def progress_bar(
    it: Iterable, desc: str, *, enabled: bool, leave: bool = True, total: int | None = None
):
    """``it`` wrapped in a tqdm bar on standard error when ``enabled``."""
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=leave, total=total, dynamic_ncols=True, file=sys.stderr)


def log_main(d: Dist, msg: str, *args) -> None:
    """An INFO diagnostic, from rank 0 only."""
    if d.main:
        log.info(msg, *args)


# --------------------------------------------------------------------------- CPU threads


def _cmdlines() -> list[list[str]]:
    """The argument vectors of the processes on this machine (Linux ``/proc``; [] elsewhere)."""
    out = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        if raw:
            out.append([a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")])
    return out


def is_training_command(argv: list[str]) -> bool:
    """Whether ``argv`` runs ``speedstructure train`` (the console script or
    ``python -m speedstructure.cli``, as ``torchrun`` starts each rank; not torchrun itself)."""
    for i, arg in enumerate(argv):
        script = os.path.basename(arg) == "speedstructure" or (
            arg == "speedstructure.cli" and i > 0 and argv[i - 1] == "-m"
        )
        if script:
            launcher_ok = all(a.startswith("-") for a in argv[1:i] if a != "speedstructure.cli")
            rest = [a for a in argv[i + 1 :] if not a.startswith("-")]
            return launcher_ok and bool(rest) and rest[0] == "train"
    return False


def training_processes() -> int:
    """How many training processes share this machine (at least 1): the largest of
    ``torchrun``'s ``LOCAL_WORLD_SIZE``, the DVC queue's workers (``dvc queue start -j N``)
    and the ``speedstructure train`` processes running now."""
    cmds = _cmdlines()
    trainings = sum(is_training_command(c) for c in cmds)
    queue_workers = sum(1 for c in cmds if "exp" in c and "queue-worker" in c)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, trainings, queue_workers, local_world)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def resolve_threads(requested: int | None, key: str = "train.threads") -> int:
    """``requested`` threads, or for ``None`` the usable cores divided by the training
    processes on the machine (at least 1); ``key`` names the setting in the error."""
    if requested is not None:
        if int(requested) < 1:
            raise UserError(f"{key} must be a positive integer or null, got {requested}")
        return int(requested)
    return max(1, usable_cores() // training_processes())


def set_threads(requested: int | None, key: str = "train.threads") -> int:
    """Set torch's intra-op CPU threads to :func:`resolve_threads` of ``requested``; the count."""
    n = resolve_threads(requested, key)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
