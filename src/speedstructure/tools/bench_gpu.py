"""``speedstructure bench gpu``: the competition training path, checked and timed on one machine.

For each variant (default: every variant of the competition profile; ``--variant V``
names others, e.g. a tiny one on a CPU) with random weights (``pretrained`` is ignored:
nothing is downloaded) and random inputs of the challenge's shapes, through the real
engine (:class:`speedstructure.engine.loop.Trainer`: Muon + AdamW, clipping, EMA, the
DataLoader with the variant's ``num_workers`` and pinned memory):

* ``--steps N`` training steps at batch 1 in bf16 autocast, and again in fp16 autocast with
  a ``GradScaler`` (fp16 only on CUDA; on a CPU it is reported as skipped, and so is bf16
  where the CPU emulates it: the steps run in float32 instead): samples per
  second (median step time, the first step being the warm-up), peak GPU memory, the
  projected hours per fold (the seed's 6,000 samples x 30 epochs) and whether every loss,
  weight and EMA weight stayed finite;
* one validation batch (``val_batch_size`` samples) under the variant's ``amp``, as the
  engine validates each epoch;
* a save + resume round trip: ``best.pt`` and ``last.pt`` written as at an epoch end,
  read back by a fresh model and trainer, which must hold the same weights, EMA, optimizer
  state and step count; that trainer then predicts the validation batch as the test is
  predicted (float32, flip TTA, ``val_preds.npz``);
* one flip-TTA prediction of one sample, timed.

Only torch, timm, numpy and pyyaml are imported on this path (no MLflow, DVC, deepwave,
Optuna, pandas, ...): ``pip install -e . --no-deps`` on a machine with torch and timm is all
it needs.  The exit code is 1 when a check fails (a non-finite value, a resume mismatch).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from speedstructure.config.schema import (
    V_MAX,
    V_MIN,
    EvaFusionVariant,
    Params,
    TrainConfig,
    Variant,
)

log = logging.getLogger(__name__)
FOLD_SAMPLES, FOLD_EPOCHS = 6000, 30  # the seed's training set per fold and epochs
GATHER_STD = 0.015  # the real gathers' standard deviation (about 0.0155)


class RandomSamples(Dataset):
    """``n`` reproducible random samples of the challenge's shapes: ``(x, y, i)`` as
    :class:`speedstructure.engine.data.SampleDataset` yields them."""

    def __init__(self, n: int, seed: int = 0, prefix: str = "R"):
        self.n, self.seed = int(n), int(seed)
        self.sample_ids = [f"{prefix}{i:017d}" for i in range(self.n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 100_003 + int(i))
        x = GATHER_STD * torch.randn(5, 10001, 31, generator=g)
        y = V_MIN + (V_MAX - V_MIN) * torch.rand(300, 1259, generator=g)
        return x, y, int(i)


# --------------------------------------------------------------------------- pieces


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(variant: Variant, device: torch.device, seed: int):
    """The variant with random weights, created directly on ``device``."""
    from speedstructure.models.build import build_model

    if isinstance(variant, EvaFusionVariant):
        variant = dataclasses.replace(variant, pretrained="none")
    # random gathers hold no sea-floor reflection to pick: the network alone is timed
    variant = dataclasses.replace(variant, floor="learned")
    torch.manual_seed(seed)
    with device:
        return build_model(variant)


def bench_trainer(
    variant: Variant, cfg: TrainConfig, device: torch.device, out: Path, seed: int, n_train: int
):
    """A :class:`~speedstructure.engine.loop.Trainer` of a fresh model on ``n_train`` random
    samples (one step each at batch 1), with ``val_batch_size`` random validation samples."""
    from speedstructure.engine.loop import Trainer
    from speedstructure.engine.results import Run
    from speedstructure.engine.runtime import Dist, amp_dtype

    run = Run(
        cfg=cfg,
        out_dir=out,
        ranks=Dist(),
        device=device,
        variant=variant,
        amp_dtype=amp_dtype(cfg.amp, device),
    )
    out.mkdir(parents=True, exist_ok=True)
    train = RandomSamples(n_train, seed=1, prefix="T")
    val = RandomSamples(max(1, cfg.val_batch_size), seed=2, prefix="V")
    return Trainer(run, _build(variant, device, seed), train, val), run, val


def _all_finite(*modules: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


def _peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def train_steps(trainer, device: torch.device) -> dict[str, Any]:
    """One optimizer step per batch of the trainer's loader, each timed; the summary."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for batch in trainer.loader:
        x = batch[0].to(device, non_blocking=True)
        y = batch[1].to(device, non_blocking=True)
        _sync(device)
        t0 = time.perf_counter()
        loss = trainer.train_step(x, y)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    timed = times[1:] or times  # the first step warms up (kernels, allocator, workers)
    step = statistics.median(timed)
    sps = 1.0 / step
    out = {
        "steps": len(times),
        "step_seconds_median": round(step, 4),
        "samples_per_second": round(sps, 3),
        "peak_memory_gb": _peak_memory_gb(device),
        "projected_hours_per_fold": round(FOLD_SAMPLES * FOLD_EPOCHS / sps / 3600, 2),
        "losses": [round(v, 6) for v in losses],
        "finite": all(map(math.isfinite, losses))
        and _all_finite(trainer.model, trainer.ema.module),
    }
    if trainer.scaler.is_enabled():
        out["grad_scale"] = float(trainer.scaler.get_scale())
    return out


def _same_state(a, b) -> bool:
    """Two trainers hold equal weights, EMA, optimizer state and step counts."""
    for ma, mb in ((a.model, b.model), (a.ema.module, b.ema.module)):
        sb = mb.state_dict()
        if any(not torch.equal(v, sb[k]) for k, v in ma.state_dict().items()):
            return False
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for k, st in oa.items():
        for name, v in st.items():
            w = ob.get(k, {}).get(name)
            same = torch.equal(v, w) if torch.is_tensor(v) and torch.is_tensor(w) else v == w
            if not same:
                return False
    steps = a.scheduler.state_dict()["last_epoch"] == b.scheduler.state_dict()["last_epoch"]
    return steps and a.state.opt_steps == b.state.opt_steps and len(oa) == len(ob)


def save_and_resume(trainer, run, variant, device: torch.device, seed: int) -> dict[str, Any]:
    """``best.pt`` + ``last.pt`` as at an epoch end, then a fresh trainer resumes from them
    (and predicts the validation samples with flip TTA in float32, as the test is)."""
    from speedstructure.engine.checkpoint import BEST_NAME, LAST_NAME

    row = {"epoch": 1, "train_loss": 0.0, "val_mape": 0.5, "lr": 0.0, "seconds": 0.0}
    trainer.state.record_epoch(row, has_val=True, patience=0, epochs=1)
    t0 = time.perf_counter()
    trainer.save_epoch(row, improved=True)
    saved = time.perf_counter() - t0
    n_train = len(trainer.train_ds)
    again, _, val = bench_trainer(variant, run.cfg, device, run.out_dir, seed + 1, n_train)
    t0 = time.perf_counter()
    res = again.fit()  # resumes: nothing left to do; predicts val_preds.npz
    _sync(device)
    resumed = time.perf_counter() - t0
    preds = res.val_pred.astype(np.float32) if res.val_pred is not None else np.zeros(0)
    ok = _same_state(trainer, again) and res.epochs_run == 1 and len(preds) == len(val)
    out = {
        "ok": bool(ok),
        "save_seconds": round(saved, 2),
        "resume_and_tta_val_seconds": round(resumed, 2),
        "best_pt_mb": round((run.out_dir / BEST_NAME).stat().st_size / 1e6, 1),
        "last_pt_mb": round((run.out_dir / LAST_NAME).stat().st_size / 1e6, 1),
        "tta_val_finite": bool(np.isfinite(preds).all()),
    }
    del again
    return out


def validation_and_tta(trainer, run, device: torch.device) -> dict[str, Any]:
    """One validation batch as the engine runs it, and one flip-TTA prediction of a sample."""
    from speedstructure.engine.results import validate

    val = RandomSamples(max(1, run.cfg.val_batch_size), seed=2, prefix="V")
    t0 = time.perf_counter()
    mape = validate(trainer.ema.module, val, run)
    _sync(device)
    t1 = time.perf_counter()
    x = val[0][0][None].to(device)
    pred = trainer.ema.module.predict(x, tta=True)
    _sync(device)
    t2 = time.perf_counter()
    return {
        "validation": {
            "batch": len(val),
            "seconds": round(t1 - t0, 3),
            "mape": round(mape, 5),
            "finite": math.isfinite(mape),
        },
        "tta": {
            "seconds": round(t2 - t1, 3),
            "shape": list(pred.shape),
            "dtype": str(pred.dtype).replace("torch.", ""),
            "finite": bool(torch.isfinite(pred).all()),
        },
    }


# --------------------------------------------------------------------------- per variant


def bench_config(params: Params, name: str, amp: str, device: torch.device) -> TrainConfig:
    return dataclasses.replace(
        params.train_for(name),
        amp=amp,
        batch_size=1,
        accum_steps=1,
        epochs=1,
        progress=False,
        device=str(device),
        cache_inputs=False,  # each random sample is trained on once: nothing to reuse
    )


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_variant(
    params: Params, name: str, steps: int, device: torch.device, workdir: Path
) -> dict[str, Any]:
    """The checks and timings of one variant (see the module docstring)."""
    from speedstructure.models.build import count_parameters

    variant = params.variant(name)
    amps = _precisions(device)
    amp = params.train_for(name).amp
    main_amp = amp if amp in amps else amps[0]
    out: dict[str, Any] = {"variant": name, "amp": main_amp}
    for amp in ("bf16", "fp16", "none"):
        if amp not in amps:
            if amp != "none":
                out[amp] = {"skipped": _skip_reason(amp, device)}
            continue
        cfg = bench_config(params, name, amp, device)
        trainer, run, _ = bench_trainer(variant, cfg, device, workdir / name / amp, 0, steps)
        out.setdefault("params_millions", round(count_parameters(trainer.model)["total"] / 1e6, 2))
        out[amp] = train_steps(trainer, device)
        if amp == main_amp:
            out.update(validation_and_tta(trainer, run, device))
            out["resume"] = save_and_resume(trainer, run, variant, device, seed=0)
        del trainer, run
        _release(device)
    out["finite"] = (
        all(out.get(k, {}).get("finite", True) for k in (*amps, "validation", "tta"))
        and out["resume"]["tta_val_finite"]
    )
    out["ok"] = bool(out["finite"] and out["resume"]["ok"])
    return out


def _precisions(device: torch.device) -> tuple[str, ...]:
    """The autocast precisions timed on ``device``: bf16 and fp16 on CUDA; on a CPU bf16
    where it is native, else float32 (``none``): emulated bf16 times nothing a user runs."""
    from speedstructure.engine.runtime import native_bf16

    if device.type == "cuda":
        return ("bf16", "fp16")
    return ("bf16",) if native_bf16(device) else ("none",)


def _skip_reason(amp: str, device: torch.device) -> str:
    from speedstructure.engine.runtime import cpu_capability

    if amp == "fp16":
        return "fp16 with GradScaler needs CUDA"
    return (
        f"bf16 is emulated on this CPU (torch capability {cpu_capability()}), 20-40x slower "
        "than float32: timed in float32 (amp none) instead"
    )


def run_bench_gpu(
    params: Params, names: list[str] | None, steps: int, workdir: str | Path | None = None
) -> dict[str, Any]:
    """``bench_variant`` for each variant (default: the competition profile's), one report."""
    import timm

    from speedstructure.engine.runtime import pick_device

    names = names or [k for k, v in params.variants.items() if v.profile == "competition"]
    device = pick_device("auto")
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "steps": int(steps),
        "projection": f"{FOLD_SAMPLES} samples x {FOLD_EPOCHS} epochs at batch 1, training only",
        "variants": {},
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=workdir) as tmp:
        for name in names:
            log.info("bench gpu: %s on %s", name, report["device"])
            report["variants"][name] = bench_variant(params, name, steps, device, Path(tmp))
            _release(device)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["ok"] = all(v["ok"] for v in report["variants"].values())
    return report
