"""The two baselines every ensemble is compared with.

``inversionnet`` (:class:`InversionNet`)
    OpenFWI's InversionNet adapted to (300, 1259): a convolutional encoder that compresses
    time, a latent vector, a transposed-convolution decoder; ``width`` scales all channels.
``depth_trend`` (:class:`DepthTrend`)
    The mean velocity of each depth cell over the training targets, broadcast over x.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from speedstructure.config.schema import (
    DepthTrendVariant,
    InversionNetVariant,
)
from speedstructure.config.typed import ConfigError
from speedstructure.data.format import VP_SHAPE
from speedstructure.errors import UserError
from speedstructure.models.base import NX, NZ, VelocityModel, depth_mean
from speedstructure.models.inputs import N_RECEIVERS, N_SOURCES, N_TIME, full_precision

# ----------------------------------------------------------------------------- InversionNet


def _norm2d(kind: str, c: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(c)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, c), c)
    return nn.Identity()


def _conv(cin, cout, k, s=1, p=0, norm="batch"):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, p), _norm2d(norm, cout), nn.LeakyReLU(0.2, inplace=True)
    )


def _deconv(cin, cout, k, s=1, p=0, norm="batch"):
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, k, s, p), _norm2d(norm, cout), nn.LeakyReLU(0.2, inplace=True)
    )


def _out_len(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


class InversionNet(VelocityModel):
    """OpenFWI's InversionNet adapted to five (T, 31) gathers -> (300, 1259).

    Encoder over (time, receivers) with the five sources as channels: four stride-2
    convolutions along time only, three stride-2 in both axes, then a convolution whose
    kernel covers what is left -> a latent vector of ``16*width``.  Decoder: a transposed
    convolution to a 5 x 20 map, five x2 up-sampling stages to 160 x 640, a 3 x 3
    convolution to one channel, bilinear resize to 300 x 1259, sigmoid scaled.
    """

    arch = "inversionnet"

    def __init__(self, v: InversionNetVariant):
        super().__init__(v, prior=v.prior)
        w = int(v.width)
        norm = v.norm
        self.time_samples = int(v.time_samples)
        if w < 1 or self.time_samples < 64:
            raise ConfigError("inversionnet: width must be >= 1 and time_samples >= 64")
        t, r = self.time_samples, N_RECEIVERS
        layers = [_conv(N_SOURCES, w, (7, 1), (2, 1), (3, 0), norm)]
        t = _out_len(t, 7, 2, 3)
        chans = [w, 2 * w, 2 * w, 4 * w]
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            layers += [
                _conv(cin, cout, (3, 1), (2, 1), (1, 0), norm),
                _conv(cout, cout, (3, 1), 1, (1, 0), norm),
            ]
            t = _out_len(t, 3, 2, 1)
        chans = [4 * w, 4 * w, 8 * w, 8 * w]
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            layers += [_conv(cin, cout, 3, 2, 1, norm), _conv(cout, cout, 3, 1, 1, norm)]
            t, r = _out_len(t, 3, 2, 1), _out_len(r, 3, 2, 1)
        # latent: no normalisation here (a 1 x 1 map cannot be batch-normalised at batch 1)
        layers += [nn.Conv2d(8 * w, 16 * w, (t, r)), nn.LeakyReLU(0.2, inplace=True)]
        self.encoder = nn.Sequential(*layers)
        dec = [_deconv(16 * w, 16 * w, (5, 20), 1, 0, norm), _conv(16 * w, 16 * w, 3, 1, 1, norm)]
        chans = [16 * w, 8 * w, 4 * w, 2 * w, w, w]
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            dec += [_deconv(cin, cout, 4, 2, 1, norm), _conv(cout, cout, 3, 1, 1, norm)]
        dec += [nn.Conv2d(w, 1, 3, 1, 1)]
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        b = x.shape[0]
        g = (x * self.input_scale).transpose(2, 3).reshape(b, N_SOURCES * N_RECEIVERS, N_TIME)
        g = F.interpolate(g, size=self.time_samples, mode="area")
        g = g.reshape(b, N_SOURCES, N_RECEIVERS, self.time_samples).transpose(2, 3)  # (B, 5, T, 31)
        z = self.encoder(g)
        y = self.decoder(z)  # (B, 1, 160, 640): x along rows, depth along columns
        with full_precision(y):  # the resize and the sigmoid in float32 under autocast
            y = F.interpolate(y.float(), size=VP_SHAPE, mode="bilinear", align_corners=False)
            return self.to_velocity(y[:, 0])


class DepthTrend(VelocityModel):
    """Mean velocity of each depth cell over the training targets, the same at every x.

    No gradient-trained parameters (``requires_training = False``): call :meth:`fit` with
    the training fold's targets.  The trend is a buffer, so it travels with ``state_dict``.
    """

    arch = "depth_trend"
    requires_training = False

    def __init__(self, v: DepthTrendVariant):
        super().__init__(v)
        self.register_buffer("trend", torch.full((NZ,), 0.5 * (self.v_min + self.v_max)))
        self.register_buffer("n_fitted", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def fit(self, targets: Iterable) -> DepthTrend:
        """Set the trend to the per-depth mean over all targets (each ``(300, 1259)`` or a
        batch ``(B, 300, 1259)``, numpy or torch) and all x positions."""
        counter = [0]
        self.trend.copy_(torch.from_numpy(depth_mean(targets, counter)).to(self.trend))
        self.n_fitted.fill_(counter[0])
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.trend.device.type != "meta" and int(self.n_fitted) == 0:
            raise UserError(
                "depth_trend: the model is not fitted (call fit() with the training targets)"
            )
        return self.trend.to(x.dtype).expand(x.shape[0], NX, NZ).clone()
