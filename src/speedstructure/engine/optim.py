"""Optimizer and learning-rate schedule of the training engine.

* one optimizer object (:class:`MuonAdamW`): ``torch.optim.Muon`` on the 2-D weight
  matrices of the transformer blocks (:func:`speedstructure.model.muon_param_names`)
  and ``AdamW`` on every other parameter;
* learning rate (:func:`build_scheduler`): cosine annealing with warm restarts (period
  ``T_0`` optimizer steps, floor ``min_lr``) for ``cosine_epochs`` epochs, then constant
  at ``const_factor x lr``; stepped once per optimizer step.

Both take their settings from a :class:`~speedstructure.config.TrainConfig`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from speedstructure.config import TrainConfig

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


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on some parameters and ``AdamW`` on the rest, as one optimizer.

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
    ):
        muon_params, adamw_params = list(muon_params), list(adamw_params)
        self.muon: torch.optim.Optimizer | None = None
        self.adamw: torch.optim.Optimizer | None = None
        groups: list[dict] = []
        if muon_params:
            self.muon = torch.optim.Muon(
                muon_params,
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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self._inner():
            opt.step()
        return loss

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._link()  # the base class rebuilt param_groups and state


def muon_names_of(model: nn.Module) -> set[str]:
    """The parameters ``model`` puts on Muon: its own ``muon_param_names()`` if it has one
    (a stand-in model may), else :func:`speedstructure.model.muon_param_names`."""
    fn = getattr(model, "muon_param_names", None)
    if callable(fn):
        return set(fn())
    from speedstructure.model import muon_param_names

    return set(muon_param_names(model))


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, muon_names: set[str] | None = None
) -> MuonAdamW:
    """:class:`MuonAdamW` with Muon on ``muon_names`` (default: :func:`muon_names_of`)."""
    names = muon_names_of(model) if muon_names is None else set(muon_names)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    unknown = names - {n for n, _ in named}
    if unknown:
        raise ValueError(f"muon_param_names lists unknown parameters: {sorted(unknown)[:5]}")
    muon = [p for n, p in named if n in names]
    rest = [p for n, p in named if n not in names]
    return MuonAdamW(muon, rest, **{key: getattr(cfg, key) for key in OPTIMIZER_KEYS})


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
