"""Optimizer and learning-rate schedule of the training engine.

* one optimizer object (:class:`MuonAdamW`): Muon (:class:`Muon`, ``torch.optim.Muon``
  with its Newton-Schulz orthogonalisation run in a chosen precision) on the 2-D weight
  matrices of the transformer blocks (``model.muon_param_names()``)
  and ``AdamW`` on every other parameter;
* :func:`orthogonalize`: torch's Newton-Schulz iteration (its coefficients, step count and
  order of operations) in bfloat16, as torch runs it, or in float32.  bfloat16 is what the
  seed ran on its GPUs; on a CPU without native bf16 each bf16 product is emulated, 20-40x
  slower than float32 (:func:`speedstructure.engine.runtime.muon_dtype` picks by device);
* learning rate (:func:`build_scheduler`): cosine annealing with warm restarts (period
  ``T_0`` optimizer steps, floor ``min_lr``) for ``cosine_epochs`` epochs, then constant
  at ``const_factor x lr``; stepped once per optimizer step.

Both take their settings from a :class:`~speedstructure.config.schema.TrainConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from speedstructure.config.schema import TrainConfig

# TrainConfig keys that are MuonAdamW's keyword arguments
OPTIMIZER_KEYS = (
    "lr",
    "weight_decay",
    "momentum",
    "nesterov",
    "betas",
    "eps",
    "muon_lr",
    "muon_adjust_lr",
)


def orthogonalize(
    grad: torch.Tensor,
    coefficients: Sequence[float],
    steps: int,
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The Newton-Schulz orthogonalisation of the 2-D ``grad`` in ``dtype``.

    The operations of torch's ``_zeropower_via_newtonschulz`` in the same order: in
    bfloat16 the result equals torch's bit for bit (``tests/engine/test_precision.py`` checks it).
    ``grad`` is never modified (torch's in-place normalisation would write into a float32
    input passed in float32)."""
    if grad.ndim != 2:
        raise ValueError(f"orthogonalize needs a 2-D matrix, got shape {tuple(grad.shape)}")
    a, b, c = (float(k) for k in coefficients)
    tall = grad.size(0) > grad.size(1)
    x = grad.to(dtype, copy=True)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm at most 1
    for _ in range(int(steps)):
        gram = x @ x.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's learning rate for a ``shape`` matrix (torch's ``adjust_lr_fn`` rules)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / cols))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    elif adjust_lr_fn == "spectral_unclamped":
        ratio = math.sqrt(rows / cols)
    else:
        ratio = 1.0
    return lr * ratio


def closure_loss(closure):
    """An optimizer step's ``closure()`` evaluated with gradients on (None without one)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with the orthogonalisation in ``ns_dtype`` (bfloat16: torch's
    own arithmetic; float32 where bf16 is slow).  Settings, state and ``state_dict`` are
    torch's: a checkpoint of either loads into the other.  ``ns_dtype`` is how it runs,
    not what it learns, so it is an attribute, not a saved setting."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        """torch's single-tensor Muon update of ``p``, orthogonalised in ``ns_dtype``."""
        grad, lr, momentum = p.grad, float(group["lr"]), group["momentum"]
        if grad.is_sparse or torch.is_complex(p):
            raise RuntimeError("Muon supports neither sparse gradients nor complex parameters")
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf
        update = orthogonalize(
            update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
        )
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))


class MuonAdamW(torch.optim.Optimizer):
    """:class:`Muon` on some parameters and ``AdamW`` on the rest, as one optimizer
    (``ns_dtype``: the precision of Muon's orthogonalisation).

    ``param_groups`` and ``state`` are shared with the two inner optimizers, so
    LR schedulers, ``GradScaler``, ``zero_grad`` and ``state_dict`` /
    ``load_state_dict`` treat it as one.  Group ``"kind"`` tells which is which.
    """

    def __init__(
        self,
        muon_params: Sequence[nn.Parameter],
        adamw_params: Sequence[nn.Parameter],
        *,
        lr: float,
        weight_decay: float = 0.01,
        momentum: float = 0.95,
        nesterov: bool = True,
        betas: Sequence[float] = (0.9, 0.95),
        eps: float = 1e-8,
        muon_lr: float | None = None,
        muon_adjust_lr: str | None = "match_rms_adamw",
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        muon_params, adamw_params = list(muon_params), list(adamw_params)
        self.muon: torch.optim.Optimizer | None = None
        self.adamw: torch.optim.Optimizer | None = None
        groups: list[dict] = []
        if muon_params:
            self.muon = Muon(
                muon_params,
                ns_dtype=ns_dtype,
                lr=float(muon_lr if muon_lr is not None else lr),
                weight_decay=float(weight_decay),
                momentum=float(momentum),
                nesterov=bool(nesterov),
                adjust_lr_fn=muon_adjust_lr,
            )
            self.muon.param_groups[0]["kind"] = "muon"
            groups += self.muon.param_groups
        if adamw_params:
            self.adamw = torch.optim.AdamW(
                adamw_params,
                lr=float(lr),
                betas=tuple(float(b) for b in betas),
                eps=float(eps),
                weight_decay=float(weight_decay),
            )
            self.adamw.param_groups[0]["kind"] = "adamw"
            groups += self.adamw.param_groups
        if not groups:
            raise ValueError("MuonAdamW: no parameters to optimize")
        # The group dicts are added by identity: the inner optimizers see every change.
        super().__init__(groups, {})
        self._link()

    def _inner(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adamw) if o is not None]

    def _link(self) -> None:
        i = 0
        for opt in self._inner():
            n = len(opt.param_groups)
            opt.param_groups = self.param_groups[i : i + n]
            opt.state = self.state  # parameters are disjoint: one shared state mapping
            i += n

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for opt in self._inner():
            opt.step()
        return loss

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._link()  # the base class rebuilt param_groups and state


def muon_names_of(model: nn.Module) -> set[str]:
    """The parameters ``model`` puts on Muon: what its ``muon_param_names()`` lists (every
    velocity model has it: :class:`~speedstructure.models.base.VelocityModel`); none for a
    module without it, which then trains on AdamW alone."""
    fn = getattr(model, "muon_param_names", None)
    return set(fn()) if callable(fn) else set()


def build_optimizer(
    model: nn.Module,
    cfg: TrainConfig,
    muon_names: set[str] | None = None,
    device: torch.device | None = None,
) -> MuonAdamW:
    """:class:`MuonAdamW` with Muon on ``muon_names`` (default: :func:`muon_names_of`), its
    orthogonalisation in the precision ``cfg.muon_precision`` gives on ``device`` (default:
    the model's; :func:`~speedstructure.engine.runtime.muon_dtype`)."""
    from speedstructure.engine.runtime import muon_dtype

    names = muon_names_of(model) if muon_names is None else set(muon_names)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    unknown = names - {n for n, _ in named}
    if unknown:
        raise ValueError(f"muon_param_names lists unknown parameters: {sorted(unknown)[:5]}")
    muon = [p for n, p in named if n in names]
    rest = [p for n, p in named if n not in names]
    if device is None:
        device = next((p.device for _, p in named), torch.device("cpu"))
    return MuonAdamW(
        muon,
        rest,
        ns_dtype=muon_dtype(cfg.muon_precision, device),
        **{key: getattr(cfg, key) for key in OPTIMIZER_KEYS},
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, world: int = 1
):
    """Cosine annealing with warm restarts (period ``T_0`` steps, floor ``min_lr``; ``T_0:
    null`` = one period over the whole cosine phase) for ``cosine_epochs`` epochs, then
    constant ``const_factor x lr``.  Step once per optimizer step.

    ``T_0`` counts the optimizer steps of one process.  Under ``torchrun`` with ``world``
    processes each step consumes ``world`` times the samples, so the period is
    ``T_0 / world`` steps (rounded, at least 1): it spans the same number of samples as on
    one GPU (with the same ``batch_size`` and ``accum_steps``).  ``steps_per_epoch`` is
    per process already, so the cosine phase ends after the same epochs in any case."""
    from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, LambdaLR, SequentialLR

    factor = float(cfg.const_factor)
    constant = LambdaLR(optimizer, lambda _step: factor)
    cos_steps = int(cfg.cosine_epochs) * int(steps_per_epoch)
    if cos_steps <= 0:
        return constant
    period = scaled_period(cfg.T_0, world) if cfg.T_0 else cos_steps  # null: the whole phase
    cosine = CosineAnnealingWarmRestarts(optimizer, T_0=max(1, period), eta_min=float(cfg.min_lr))
    return SequentialLR(optimizer, [cosine, constant], milestones=[cos_steps])


def scaled_period(t0: int, world: int = 1) -> int:
    """``T_0`` optimizer steps of one process as steps of ``world`` data-parallel processes
    (the same number of samples): ``round(T_0 / world)``, at least 1."""
    return max(1, int(int(t0) / max(1, int(world)) + 0.5))
