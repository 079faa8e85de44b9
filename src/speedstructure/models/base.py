"""The interface every velocity model shares (:class:`VelocityModel`).

* ``forward(x)``: ``x`` is ``(B, 5, 10001, 31)`` float32 (the five shot gathers in source
  order 1, 75, 150, 225, 300); returns velocities ``(B, 300, 1259)`` in km/s, bounded to
  ``[v_min, v_max]``.
* ``predict(x, tta=True)``: inference (eval mode, no gradients) with flip test-time
  augmentation, the median of the plain and the flipped-back prediction; with the variant's
  ``floor: picked`` the water floor picked from the gathers is imposed.
* ``muon_param_names()``: the 2-D weight matrices of ``transformer_blocks()``, which the
  optimiser puts on Muon; empty for the baselines.
* ``requires_training``: ``False`` for the depth trend, which is fitted with ``fit``.

An optional ``depth_trend`` prior adds the training fold's mean velocity per depth cell
(:func:`depth_mean`) to the head's output, so the network learns the deviation from it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

from speedstructure.config.schema import (
    Variant,
)
from speedstructure.data.flips import flip_inputs, flip_target
from speedstructure.data.format import VP_SHAPE
from speedstructure.errors import UserError
from speedstructure.models.inputs import INPUT_SHAPE
from speedstructure.physics.seafloor import FloorPicker

NX, NZ = VP_SHAPE


def _median(preds: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise median; for an even count the mean of the two middle values."""
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:  # flip TTA: the mean, the same numbers as sorting (a + b == b + a)
        return 0.5 * (preds[0] + preds[1])
    s = torch.sort(torch.stack(preds), dim=0).values
    n = s.shape[0]
    if n % 2:
        return s[n // 2]
    return 0.5 * (s[n // 2 - 1] + s[n // 2])


# ----------------------------------------------------------------------------- base


class VelocityModel(nn.Module):
    """Common interface: velocity bounds, flip TTA, Muon block listing."""

    arch: str = ""
    requires_training: bool = True

    def __init__(self, variant: Variant, prior: str = "none"):
        super().__init__()
        self.v_min = float(variant.v_min)
        self.v_max = float(variant.v_max)
        self.tta_flip = variant.tta_flip
        self.floor = variant.floor
        self.input_scale = float(variant.input_scale)
        self.prior = prior
        self.floor_picker: FloorPicker | None = None  # set by build_model for floor: picked
        if prior == "depth_trend":
            # logit of the training fold's mean velocity per depth cell, added to the head's
            # output: the network learns the deviation from the depth trend
            self.register_buffer("prior_logit", torch.zeros(NZ))
            self.register_buffer("prior_fitted", torch.zeros((), dtype=torch.bool))

    @property
    def needs_prior(self) -> bool:
        """True while a ``depth_trend`` prior still has to be fitted (:meth:`fit_prior`)."""
        return self.prior == "depth_trend" and not bool(self.prior_fitted)

    @torch.no_grad()
    def fit_prior(self, targets: Iterable) -> None:
        """Set the depth-trend prior from the training targets (each ``(300, 1259)`` km/s)."""
        trend = depth_mean(targets)
        frac = (torch.from_numpy(trend) - self.v_min) / (self.v_max - self.v_min)
        self.prior_logit.copy_(torch.logit(frac.clamp(1e-4, 1 - 1e-4)).to(self.prior_logit))
        self.prior_fitted.fill_(True)

    def to_velocity(self, logits: torch.Tensor) -> torch.Tensor:
        if self.prior == "depth_trend":
            logits = logits + self.prior_logit.to(logits.dtype)
        return self.v_min + (self.v_max - self.v_min) * torch.sigmoid(logits)

    def transformer_blocks(self) -> list[nn.Module]:
        return []

    def muon_param_names(self) -> set[str]:
        """The parameters the optimiser puts on Muon (:func:`muon_param_names`)."""
        return muon_param_names(self)

    @torch.no_grad()
    def predict(
        self, x: torch.Tensor, tta: bool = True, flip_mode: str | None = None
    ) -> torch.Tensor:
        """Velocities ``(B, 300, 1259)`` in eval mode; with ``tta`` the median of the plain
        prediction and the flipped-back prediction of the flipped input; with the variant's
        ``floor: picked`` each column moved to the water floor picked from ``x``."""
        was_training = self.training
        self.eval()
        try:
            preds = [self(x)]
            if tta:
                mode = flip_mode or self.tta_flip
                preds.append(flip_target(self(flip_inputs(x, mode))))
            pred = _median(preds)
        finally:
            self.train(was_training)
        if self.floor == "picked":
            pred = self._impose_picked_floor(pred, x)
        return pred

    def _impose_picked_floor(self, pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``pred`` with the water floor picked from the gathers ``x`` imposed."""
        if self.floor_picker is None:
            raise ValueError(
                "floor: picked needs the physics of the data: build_model(..., floor_picker=...)"
            )
        fixed = self.floor_picker(pred.float().cpu().numpy(), x.float().cpu().numpy())
        return torch.from_numpy(fixed).to(device=pred.device, dtype=pred.dtype)

    @staticmethod
    def _check_input(x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != INPUT_SHAPE:
            raise ValueError(f"input shape {tuple(x.shape)}, expected (B, *{INPUT_SHAPE})")


# ----------------------------------------------------------------------------- depth trend


def depth_mean(targets: Iterable, counter: list[int] | None = None) -> np.ndarray:
    """Mean velocity per depth cell over all targets (each ``(300, 1259)`` or a batch
    ``(B, 300, 1259)``, numpy or torch) and all x positions: float64 ``(1259,)``.
    ``counter[0]`` receives the number of targets."""
    total = np.zeros(NZ, dtype=np.float64)
    n = 0
    for y in targets:
        a = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        a = a.reshape(-1, *VP_SHAPE) if a.shape[-2:] == VP_SHAPE else None
        if a is None:
            raise ValueError(f"targets must have shape (..., {NX}, {NZ})")
        total += a.astype(np.float64).sum(axis=(0, 1))
        n += a.shape[0]
    if n == 0:
        raise UserError("depth trend: no training targets to fit")
    if counter is not None:
        counter[0] = n
    return total / (n * NX)


# ----------------------------------------------------------------------------- analysis


def muon_param_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the 2-D weight matrices inside
    ``model.transformer_blocks()``: the parameters to optimise with Muon."""
    blocks = model.transformer_blocks() if hasattr(model, "transformer_blocks") else []
    ids = {id(p) for blk in blocks for p in blk.parameters() if p.ndim == 2}
    return {n for n, p in model.named_parameters() if id(p) in ids}
