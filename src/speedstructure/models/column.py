"""The column network (:class:`ColumnNet`, ``arch: column``): one velocity column per x, with
weights shared over x, predicted below the water floor picked from the gathers.

The five shots cover one 300 m section; every source-receiver trace reflects off the
subsurface under its midpoint.  So the gathers are re-sorted by midpoint and offset:

1. the water-only wavefield (the direct wave, the same for every sample) is subtracted
   (:func:`~speedstructure.physics.seafloor.water_response`, mirrored for gathers flipped
   consistently), leaving the reflections;
2. time is averaged down to ``time_samples`` and gained by ``t ** gain`` (spherical spreading);
3. each trace is averaged into its (offset band, midpoint bin) cell: ``offset_edges`` bands,
   ``midpoint_bins`` bins over the 300 m; one mask channel per band says which cells hold
   traces.  The result is a ``(2 x bands, time, bins)`` image with x across.

A convolutional encoder compresses time (stride 2, kernels 3 wide in x), a small 1-D
network over x mixes neighbouring bins and the section's mean, and a shared head turns each
bin's features into ``knots`` velocities.  These describe the column from the water floor
(``t = 0``) to the bottom of the model (``t = 1``), the coordinate the depth trend of the
sediments follows; they are interpolated to 300 columns and 1259 cells below the floor picked
from the gathers (:func:`~speedstructure.physics.seafloor.pick_floor`), water above.  The
loss therefore never spends anything on the floor, and lateral variation is the default.
The optional ``depth_trend`` prior is the training targets' mean in the same coordinate.

With ``seafloor_velocity: true`` the network also reads the velocity under the floor from the
sea-floor reflection's strength (:func:`~speedstructure.physics.seafloor.seafloor_velocity`,
a measurement, not a fit to the training set): it enters the network over x as one more
channel and shifts every knot's logit by a learned amount per knot, a linear path that
carries the level beyond the velocities seen in training.

With ``level_read: true`` it reads the velocity level as well: the near-offset reflections
integrated from the floor down (:func:`~speedstructure.physics.level.level_features`), the
velocity under the floor and the floor's depth, mapped to the mean velocity below the floor in
each depth band (``level_bands``: their inner edges in metres) by one ridge regression a band,
fitted on the training set before the network trains (:meth:`ColumnNet.fit_level_reader`).
In eval mode (validation, prediction) the cells below the floor in each band are scaled so
that the model's mean there becomes ``level_blend`` of the read level and the rest its own;
training fits the network alone.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from speedstructure.config.schema import ColumnVariant
from speedstructure.config.typed import ConfigError
from speedstructure.errors import UserError
from speedstructure.models.base import NX, NZ, VelocityModel
from speedstructure.models.inputs import N_RECEIVERS, N_SOURCES, N_TIME
from speedstructure.physics.level import WINDOWS

log = logging.getLogger(__name__)

LEVEL_CENTRE, LEVEL_SCALE = 2.2, 0.5  # km/s: the read velocity enters as (v - centre) / scale
LEVEL_FEATURES = WINDOWS + 2  # level_read: the reflections' integral, the velocity, the floor


# ----------------------------------------------------------------------------- geometry


@functools.lru_cache(maxsize=8)
def binning(edges: tuple[float, ...], bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The averaging matrix ``(5 * 31, bands * bins)`` that takes the traces (source-major)
    to their (offset band, midpoint bin) cells, and the cells' mask ``(bands, bins)``."""
    from speedstructure.physics.seafloor import trace_geometry

    mid, offset, _ = trace_geometry()
    band = np.digitize(offset.ravel(), edges[1:-1])
    cell = np.minimum((mid.ravel() // (NX / bins)).astype(int), bins - 1)
    n_bands = len(edges) - 1
    w = np.zeros((mid.size, n_bands * bins))
    w[np.arange(mid.size), band * bins + cell] = 1.0
    count = w.sum(axis=0)
    w /= np.maximum(count, 1.0)
    return w.astype(np.float32), (count > 0).reshape(n_bands, bins)


def floor_relative_to_depth(vt: torch.Tensor, floor: torch.Tensor, water: float) -> torch.Tensor:
    """Columns ``vt (B, 300, K)`` sampled evenly from the water floor (first knot) to the
    bottom (last) -> velocities ``(B, 300, 1259)`` with water above ``floor (B, 300)`` (m),
    linear in between; differentiable in ``vt``."""
    k = vt.shape[-1]
    z = torch.arange(NZ, device=vt.device, dtype=vt.dtype)
    f = floor.to(vt.dtype).unsqueeze(-1)
    t = ((z - f) / (NZ - 1 - f).clamp(min=1.0)).clamp(0, 1) * (k - 1)
    i0 = t.floor().long().clamp(0, k - 2)
    w = t - i0
    v = torch.gather(vt, -1, i0) * (1 - w) + torch.gather(vt, -1, i0 + 1) * w
    return torch.where(z < f, torch.full_like(v, water), v)


def depth_to_floor_relative(y: np.ndarray, floor: np.ndarray, knots: int) -> np.ndarray:
    """The inverse for one target ``(300, 1259)``: each column from ``floor`` (m) to the
    bottom sampled at ``knots`` even points, float64 ``(300, knots)``."""
    t = np.linspace(0.0, 1.0, knots)
    z = np.arange(NZ)
    out = np.empty((NX, knots))
    for x in range(NX):
        out[x] = np.interp(floor[x] + t * (NZ - 1 - floor[x]), z, y[x])
    return out


def fill_floor(floor: np.ndarray, default: float) -> np.ndarray:
    """A picked floor ``(300,)`` with its NaN columns interpolated from their neighbours;
    ``default`` everywhere when no column was picked."""
    ok = np.isfinite(floor)
    if not ok.any():
        return np.full(NX, default)
    return np.interp(np.arange(NX), np.flatnonzero(ok), floor[ok])


# ----------------------------------------------------------------------------- the network


def _block(cin: int, cout: int, k: tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, (2, 1), (k[0] // 2, k[1] // 2)),
        nn.GroupNorm(min(8, cout), cout),
        nn.GELU(),
    )


class ColumnNet(VelocityModel):
    """Midpoint-binned, offset-banded gathers -> a velocity column per x below the picked
    water floor (see the module's description)."""

    arch = "column"

    def __init__(self, v: ColumnVariant):
        if v.floor != "relative":
            raise ConfigError("arch column predicts below the picked floor: set floor: relative")
        super().__init__(v, prior=v.prior)
        self.edges = tuple(float(e) for e in v.offset_edges)
        self.bins, self.time_samples = int(v.midpoint_bins), int(v.time_samples)
        self.knots, self.gain = int(v.knots), float(v.gain)
        if len(self.edges) < 2 or list(self.edges) != sorted(self.edges) or self.knots < 2:
            raise ConfigError("column: offset_edges must rise (>= 2 edges) and knots >= 2")
        if not 2 <= self.bins <= NX or not 32 <= self.time_samples <= N_TIME:
            raise ConfigError(f"column: midpoint_bins in [2, {NX}], time_samples in [32, {N_TIME}]")
        if not 0.0 <= float(v.level_blend) <= 1.0:
            raise ConfigError(f"column: level_blend must lie in [0, 1], got {v.level_blend}")
        self.level_edges = (0.0, *(float(e) for e in v.level_bands), float(NZ))
        if list(self.level_edges) != sorted(set(self.level_edges)):
            raise ConfigError(f"column: level_bands must rise inside (0, {NZ}): {v.level_bands}")
        w, n_bands = int(v.width), len(self.edges) - 1
        widths = [2 * n_bands, w, w, 2 * w, 2 * w, 4 * w]
        self.encoder = nn.Sequential(
            *(
                _block(a, b, (7, 3) if i == 0 else (3, 3))
                for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))
            )
        )
        t = self.time_samples
        for _ in widths[1:]:
            t = (t - 1) // 2 + 1
        feat, hidden = 4 * w * t, int(v.hidden)
        self.reads_level = bool(v.seafloor_velocity)
        self.mix = nn.Sequential(
            nn.Conv1d(2 * feat + int(self.reads_level), hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv1d(hidden, hidden, 3, padding=1),
            nn.GELU(),
        )
        self.head = nn.Conv1d(hidden, self.knots, 1)
        nn.init.zeros_(self.head.weight)  # start from the prior (or mid-range) exactly
        nn.init.zeros_(self.head.bias)
        if self.reads_level:  # the read velocity's linear path to the knots, from zero
            self.level = nn.Linear(1, self.knots, bias=False)
            nn.init.zeros_(self.level.weight)
        self.reads_trend, self.level_blend = bool(v.level_read), float(v.level_blend)
        if self.reads_trend:  # the ridge maps of the level read, a band each (fit_level_reader)
            k = len(self.level_edges) - 1
            for name in ("level_mean", "level_scale", "level_coef"):
                self.register_buffer(name, torch.zeros(k, LEVEL_FEATURES, dtype=torch.float64))
            self.register_buffer("level_intercept", torch.zeros(k, dtype=torch.float64))
            self.register_buffer("level_band_fitted", torch.zeros(k, dtype=torch.bool))
            self.register_buffer("level_fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("floor_default", torch.zeros(()))  # the training floors' mean
        if self.prior == "depth_trend":
            self.prior_logit = torch.zeros(self.knots)  # the knots' prior, not depth cells
        else:  # fit_prior still sets floor_default
            self.register_buffer("prior_fitted", torch.zeros((), dtype=torch.bool))

    # -- inputs

    @property
    def prepared_numel(self) -> int:
        """Numbers per sample in :meth:`prepare`'s output (the training engine's cache)."""
        return self._n_image + NX + int(self.reads_level) + LEVEL_FEATURES * self.reads_trend

    def _picker(self):
        if self.floor_picker is None:
            raise ValueError(
                "arch column needs the physics of the data: build_model(..., floor_picker=...)"
            )
        return self.floor_picker

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 5, 10001, 31)`` gathers -> ``(B, prepared_numel)``: the binned image,
        flattened, the picked floor (m), then with ``seafloor_velocity`` the velocity read
        under it (km/s), then with ``level_read`` the level read's features; per sample, so a
        sample's numbers do not depend on its batch."""
        self._check_input(x)
        b = x.shape[0]
        if x.device.type == "meta":  # shapes and FLOPs only: no physics on the meta device
            physics = torch.zeros(b, self.prepared_numel - self._n_image, device=x.device)
            return torch.cat([self._binned(x).flatten(1), physics], 1)
        from speedstructure.physics.seafloor import oriented_direct_wave, water_response

        picker = self._picker()
        direct, _ = water_response(picker.sim, picker.water_velocity)
        rows = []
        for g in x.float():
            record = g.cpu().numpy().astype(np.float64)
            oriented = oriented_direct_wave(record, direct, picker.sim.record_dt)
            d = torch.as_tensor(oriented.copy(), dtype=torch.float32, device=x.device)
            image = self._binned(g[None] - d[None]).flatten(1)
            physics = torch.as_tensor(self._physics(record, oriented), device=x.device)[None]
            rows.append(torch.cat([image, physics.to(image.dtype)], 1))
        return torch.cat(rows).float()

    def _physics(self, record: np.ndarray, direct: np.ndarray) -> np.ndarray:
        """What one sample's gathers (float64) say of the water floor: its depth per column
        (m), with ``seafloor_velocity`` the velocity under it (km/s), with ``level_read`` the
        level read's features (the reflections' integral, that velocity, the mean floor in
        km); where nothing can be picked, the training floors' mean and :data:`LEVEL_CENTRE`.
        ``direct``: the water-only wavefield in the gathers' orientation."""
        from speedstructure.physics.level import level_features
        from speedstructure.physics.seafloor import read_seafloor_picks

        picker = self._picker()
        water = picker.water_velocity
        floor, v, times, delay = read_seafloor_picks(record, picker.sim, water, picker.method)
        floor = fill_floor(floor, float(self.floor_default))
        if (self.reads_level or self.reads_trend) and not np.isfinite(v):
            log.warning("no sea-floor reflection to read a velocity from: %.1f km/s", LEVEL_CENTRE)
            v = LEVEL_CENTRE
        parts = [floor, [v] * self.reads_level]
        if self.reads_trend:
            integral = level_features(record, direct, delay, times, picker.sim, water)
            parts.append(np.r_[integral, v, floor.mean() / 1000.0])
        return np.concatenate(parts)

    @property
    def _n_image(self) -> int:
        return 2 * (len(self.edges) - 1) * self.time_samples * self.bins

    # -- the level read

    @torch.no_grad()
    def fit_level_reader(self, ds) -> None:
        """With ``level_read``: fit the ridge maps from the level read's features to the mean
        velocity below the floor in each depth band on the training set ``ds`` (samples ``(x,
        y, ...)``, or :class:`~speedstructure.engine.data.PreparedInputs`, whose prepared rows
        it reuses); a band with fewer than two samples reaching it is left uncorrected."""
        from speedstructure.metrics import water_floor_depth
        from speedstructure.physics.level import fit_ridge

        if not self.reads_trend or bool(self.level_fitted):
            return
        images = getattr(ds, "images", None)
        features, levels = [], []
        for i in range(len(ds)):
            row = images[i][0][None] if images is not None else self.prepare(ds[i][0][None])
            features.append(row[0, -LEVEL_FEATURES:].double().cpu().numpy())
            y = ds.target(i) if hasattr(ds, "target") else ds[i][1]
            y = np.asarray(y, np.float64).reshape(NX, NZ)
            levels.append(self._band_levels(y, water_floor_depth(y, self._water())))
        if not features:
            raise UserError("column: no training samples to fit the level read to")
        x, levels = np.stack(features), np.stack(levels)
        for k in range(levels.shape[1]):
            ok = np.isfinite(levels[:, k])
            if ok.sum() < 2:
                continue
            fitted = fit_ridge(x[ok], levels[ok, k])
            for key in ("mean", "scale", "coef", "intercept"):
                getattr(self, f"level_{key}")[k].copy_(torch.as_tensor(fitted[key]))
            self.level_band_fitted[k] = True
        self.level_fitted.fill_(True)
        log.info("level read fitted on %d training samples", len(features))

    def _band_levels(self, v: np.ndarray, floor: np.ndarray) -> np.ndarray:
        """Per depth band, the mean of ``v`` ``(300, 1259)`` below ``floor`` (NaN: none)."""
        z = np.arange(NZ)[None, :]
        below = z >= floor[:, None]
        out = []
        for top, bottom in zip(self.level_edges[:-1], self.level_edges[1:], strict=True):
            cells = below & (z >= top) & (z < bottom)
            out.append(v[cells].mean() if cells.any() else np.nan)
        return np.asarray(out)

    def _read_level(self, p: torch.Tensor, out: torch.Tensor, floor: torch.Tensor):
        """``out`` ``(B, 300, 1259)`` with the cells below ``floor`` in each depth band scaled
        so that their mean becomes ``level_blend`` of the level read from ``p`` there and the
        rest their own."""
        f = p[:, None, -LEVEL_FEATURES:].double()  # (B, 1, F)
        z = (f - self.level_mean) / self.level_scale
        read = (z * self.level_coef).sum(-1) + self.level_intercept  # (B, bands)
        depth = torch.arange(NZ, device=out.device)[None, None, :]
        below = depth >= floor[:, :, None]
        edges = self.level_edges
        for k, (top, bottom) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            cells = below & (depth >= top) & (depth < bottom)
            n = cells.sum((1, 2))
            own = (out * cells).sum((1, 2)) / n.clamp_min(1)
            target = (1.0 - self.level_blend) * own + self.level_blend * read[:, k].to(own.dtype)
            use = (n > 0) & self.level_band_fitted[k]
            scale = torch.where(use, target / own.clamp_min(1e-6), torch.ones_like(own))
            out = torch.where(cells, out * scale[:, None, None], out)
        return torch.where(below, out.clamp(self.v_min, self.v_max), out)

    def _binned(self, residual: torch.Tensor) -> torch.Tensor:
        """Reflections ``(B, 5, 10001, 31)`` -> the ``(B, 2 x bands, time, bins)`` image."""
        b = residual.shape[0]
        r = residual.float() * self.input_scale
        r = r.transpose(2, 3).reshape(b, N_SOURCES * N_RECEIVERS, N_TIME)  # source-major traces
        r = F.interpolate(r, size=self.time_samples, mode="area")
        t = (torch.arange(self.time_samples, device=r.device) + 0.5) / self.time_samples
        r = r * t**self.gain
        w, mask = binning(self.edges, self.bins)
        cells = torch.einsum("bnt,nc->btc", r, torch.as_tensor(w, device=r.device))
        n_bands = len(self.edges) - 1
        image = cells.reshape(b, self.time_samples, n_bands, self.bins).permute(0, 2, 1, 3)
        m = torch.as_tensor(mask, dtype=image.dtype, device=image.device)
        m = m[None, :, None, :].expand(b, n_bands, self.time_samples, self.bins)
        return torch.cat([image, m], 1)

    # -- prior

    @torch.no_grad()
    def fit_prior(self, targets: Iterable) -> None:
        """The prior (with ``prior: depth_trend``): the training targets' mean velocity at
        each knot between their own water floor and the bottom; and the floors' mean, used
        where no floor can be picked."""
        from speedstructure.metrics import water_floor_depth

        water = self._picker().water_velocity
        total, floors, n = np.zeros(self.knots), [], 0
        for y in targets:
            a = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
            for target in a.reshape(-1, NX, NZ):
                floor = water_floor_depth(target, water).astype(np.float64)
                total += depth_to_floor_relative(target, floor, self.knots).mean(axis=0)
                floors.append(floor.mean())
                n += 1
        if n == 0:
            raise UserError("column: no training targets to fit the prior to")
        self.floor_default.fill_(float(np.mean(floors)))
        if self.prior == "depth_trend":
            frac = (torch.from_numpy(total / n) - self.v_min) / (self.v_max - self.v_min)
            logit = torch.logit(frac.clamp(1e-4, 1 - 1e-4))
            self.prior_logit.copy_(logit.to(self.prior_logit))
        self.prior_fitted.fill_(True)

    @property
    def needs_prior(self) -> bool:
        """Fitted before training with or without a prior (the floors' mean is needed)."""
        return not bool(self.prior_fitted)

    # -- forward

    def forward(self, x: torch.Tensor, prepared: bool = False) -> torch.Tensor:
        """Velocities of gathers ``x``, or of what :meth:`prepare` made of them."""
        p = x if prepared else self.prepare(x)
        b, n_bands, n_image = p.shape[0], len(self.edges) - 1, self._n_image
        image = p[:, :n_image].reshape(b, 2 * n_bands, self.time_samples, self.bins)
        floor = p[:, n_image : n_image + NX]
        h = self.encoder(image)
        h = h.reshape(b, -1, self.bins)
        parts = [h, h.mean(-1, keepdim=True).expand_as(h)]
        if self.reads_level:
            read = (p[:, n_image + NX : n_image + NX + 1] - LEVEL_CENTRE) / LEVEL_SCALE  # (B, 1)
            parts.append(read[:, :, None].expand(b, 1, self.bins))
        knots = self.head(self.mix(torch.cat(parts, 1)))  # (B, knots, bins)
        if self.reads_level:
            knots = knots + self.level(read)[:, :, None]
        # velocities and depths in float32 under any autocast (bf16 would snap depths to 2-8 m)
        knots = F.interpolate(knots.float(), size=NX, mode="linear", align_corners=False)
        vt = self.to_velocity(knots.transpose(1, 2))  # (B, 300, knots)
        out = floor_relative_to_depth(vt, floor, self._water())
        if self.reads_trend and not self.training and bool(self.level_fitted):
            out = self._read_level(p.float(), out, floor.float())
        return out

    def _water(self) -> float:
        return self.floor_picker.water_velocity if self.floor_picker is not None else self.v_min
