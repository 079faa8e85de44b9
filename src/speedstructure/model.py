"""Velocity models: one configurable EVA02 source-fusion network and two baselines.

Every model is built from one typed variant (:class:`speedstructure.config.Variant`,
an entry of the ``variants:`` section of ``params.yaml``) by :func:`build_model`, keeps it
as ``model.variant``, and shares one interface:

* ``forward(x)``: ``x`` is ``(B, 5, 10001, 31)`` float32 (the five shot gathers in source
  order 1, 75, 150, 225, 300); returns velocities ``(B, 300, 1259)`` in km/s, bounded to
  ``[v_min, v_max]``.
* ``predict(x, tta=True)``: inference (eval mode, no gradients) with flip test-time
  augmentation, the median of the plain and the flipped-back prediction.
* ``transformer_blocks()``: the transformer blocks whose 2-D weight matrices go to Muon
  (see :func:`muon_param_names`); empty for the baselines.
* ``requires_training``: ``False`` for :class:`DepthTrend`, which is fitted with ``fit``.

Architectures (key ``arch``):

``eva_fusion`` (:class:`EvaFusionNet`)
    A timm EVA/ViT backbone with one input channel.  Each gather is scaled (x 1e3),
    resampled to 10000 time samples (area), its time axis folded into 100 x 100 and laid
    out as a (100, 31 x 100) image, resized (bilinear) to ``img_size`` squared.  The first
    ``split_at`` blocks run on each source separately, then the five token sequences are
    fused per token (``fusion``: ``mean``, ``single`` self-attention + mean, or ``dual``
    source embedding + self-attention + attention pooling + LayerNorm), and the remaining
    blocks run on the fused sequence.  Head: final norm, prefix tokens dropped,
    Linear(dim -> 300) per token, the g*g tokens resized to 1259 depth cells ("area"),
    sigmoid scaled to ``[v_min, v_max]``.
``inversionnet`` (:class:`InversionNet`)
    OpenFWI's InversionNet adapted to (300, 1259): a convolutional encoder that compresses
    time, a latent vector, a transposed-convolution decoder; ``width`` scales all channels.
``depth_trend`` (:class:`DepthTrend`)
    The mean velocity of each depth cell over the training targets, broadcast over x.

Flips: :func:`flip_inputs` / :func:`flip_target`.  The physically consistent flip
mirrors the receivers *and* reverses the source order (source at x=1 <-> x=300); the
seed's ``receivers`` flip (source order kept) is available for comparison only.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from speedstructure.config import (
    ARCHS,
    FLIP_MODES,
    FUSIONS,
    ConfigError,
    DepthTrendVariant,
    EvaFusionVariant,
    InversionNetVariant,
    Params,
    Variant,
    load_params,
    parse_variant,
    resolve_path,
)
from speedstructure.dataio import GATHER_SHAPE, SOURCES, VP_SHAPE
from speedstructure.errors import UserError
from speedstructure.seafloor import with_picked_floor

__all__ = [
    "ARCHS",
    "FUSIONS",
    "FLIP_MODES",
    "INPUT_SHAPE",
    "OUTPUT_SHAPE",
    "VelocityModel",
    "EvaFusionNet",
    "SourceFusion",
    "InversionNet",
    "DepthTrend",
    "build_model",
    "flip_inputs",
    "flip_target",
    "fold_gathers",
    "preprocess_gathers",
    "muon_param_names",
    "count_parameters",
    "forward_flops",
    "model_summary",
    "add_commands",
]

N_SOURCES = len(SOURCES)
N_TIME, N_RECEIVERS = GATHER_SHAPE
NX, NZ = VP_SHAPE
INPUT_SHAPE = (N_SOURCES, N_TIME, N_RECEIVERS)  # per sample
OUTPUT_SHAPE = VP_SHAPE  # per sample
FOLD = 100  # 10000 time samples folded into FOLD x FOLD


# ----------------------------------------------------------------------------- flips


def flip_inputs(x, mode: str = "consistent"):
    """Mirror gathers ``(..., 5, T, 31)`` (torch or numpy) horizontally.

    ``consistent``: receivers mirrored and the source order reversed (the physical mirror
    image of the experiment).  ``receivers``: receivers mirrored only (the seed's flip).
    Applying the same flip twice gives back the input.
    """
    if mode not in FLIP_MODES:
        raise ValueError(f"flip mode {mode!r}: expected one of {FLIP_MODES}")
    dims = (-3, -1) if mode == "consistent" else (-1,)
    if isinstance(x, np.ndarray):
        return np.flip(x, axis=dims).copy()
    return torch.flip(x, dims=dims)


def flip_target(y):
    """Mirror velocity models ``(..., 300, 1259)`` (torch or numpy) along x."""
    if isinstance(y, np.ndarray):
        return np.flip(y, axis=-2).copy()
    return torch.flip(y, dims=(-2,))


def impose_picked_floor(pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``pred`` with the water floor picked from the gathers ``x`` imposed (seafloor.py)."""
    fixed = with_picked_floor(pred.float().cpu().numpy(), x.float().cpu().numpy())
    return torch.from_numpy(fixed).to(device=pred.device, dtype=pred.dtype)


def _median(preds: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise median; for an even count the mean of the two middle values."""
    if len(preds) == 1:
        return preds[0]
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
            pred = impose_picked_floor(pred, x)
        return pred

    @staticmethod
    def _check_input(x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != INPUT_SHAPE:
            raise ValueError(f"input shape {tuple(x.shape)}, expected (B, *{INPUT_SHAPE})")


# ----------------------------------------------------------------------------- EVA fusion


def fold_gathers(x: torch.Tensor, scale: float = 1.0e3) -> torch.Tensor:
    """``(B, 5, 10001, 31)`` -> ``(B*5, 1, 100, 3100)``, source-major: scaled, 10001 -> 10000
    time samples (area), time folded into 100 x 100 and laid out as ``(100, 31*100)``
    (row: coarse time t // 100; column: receiver * 100 + t % 100)."""
    b, s, t, r = x.shape
    g = (x * scale).reshape(b * s, t, r).transpose(1, 2)  # (BS, 31, 10001)
    g = F.interpolate(g, size=FOLD * FOLD, mode="area")  # (BS, 31, 10000)
    g = g.reshape(b * s, r, FOLD, FOLD).permute(0, 2, 1, 3)  # (BS, coarse, receiver, fine)
    return g.reshape(b * s, 1, FOLD, r * FOLD)


def time_receiver_gathers(x: torch.Tensor, size: tuple[int, int], scale: float = 1.0e3):
    """``(B, 5, 10001, 31)`` -> ``(B*5, 1, H, W)``, source-major, time down the rows and the
    receivers across: time area-resampled to ``H`` rows (an anti-aliased mean), the 31
    receivers linearly to ``W`` columns; each image keeps the traveltime and moveout axes."""
    b, s, t, r = x.shape
    h, w = size
    g = (x * scale).reshape(b * s, t, r).transpose(1, 2)  # (BS, 31, 10001)
    g = F.interpolate(g, size=h, mode="area").transpose(1, 2)  # (BS, H, 31)
    g = F.interpolate(g, size=w, mode="linear", align_corners=True)  # (BS, H, W)
    return g.unsqueeze(1)


def signlog(a: torch.Tensor) -> torch.Tensor:
    """``sign(a) * log(1 + |a|)``: compresses the direct arrival against the weak reflections."""
    return torch.sign(a) * torch.log1p(a.abs())


def preprocess_gathers(
    x: torch.Tensor,
    img_size: int | tuple[int, int],
    scale: float = 1.0e3,
    *,
    layout: str = "fold",
    amplitude: str = "linear",
) -> torch.Tensor:
    """``(B, 5, 10001, 31)`` -> ``(B*5, 1, H, W)`` images (``img_size``: H = W, or ``(H, W)``).

    ``fold`` (the seed's): :func:`fold_gathers`, then a bilinear resize; ``time_receiver``:
    :func:`time_receiver_gathers`.  ``amplitude="signlog"`` applies :func:`signlog` last."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if layout == "fold":
        img = fold_gathers(x, scale)
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
    else:
        img = time_receiver_gathers(x, size, scale)
    return signlog(img) if amplitude == "signlog" else img


class SourceFusion(nn.Module):
    """Fuses the five per-source token sequences ``(B, 5, N, C)`` into ``(B, N, C)``.

    ``mean``: plain mean.  ``single``: pre-norm self-attention across the sources of each
    token (residual), then the mean.  ``dual``: learned source embedding, pre-norm
    self-attention across sources (residual), attention pooling with a learned query
    (``shared`` by all tokens or one ``per_token``), then LayerNorm.
    """

    def __init__(
        self,
        mode: str,
        dim: int,
        n_tokens: int,
        channel_heads: int = 4,
        fusion_heads: int = 2,
        pool_query: str = "shared",
        n_sources: int = N_SOURCES,
    ):
        super().__init__()
        self.mode = mode
        self.self_attn = self.pool_attn = None
        if mode in ("single", "dual"):
            self.norm_in = nn.LayerNorm(dim)
            self.self_attn = nn.MultiheadAttention(dim, channel_heads, batch_first=True)
        if mode == "dual":
            self.source_embed = nn.Parameter(torch.zeros(1, n_sources, dim))
            nn.init.trunc_normal_(self.source_embed, std=0.02)
            self.query = nn.Parameter(
                torch.zeros(n_tokens if pool_query == "per_token" else 1, dim)
            )
            nn.init.trunc_normal_(self.query, std=0.02)
            self.pool_attn = nn.MultiheadAttention(dim, fusion_heads, batch_first=True)
            self.norm_out = nn.LayerNorm(dim)

    def attention_modules(self) -> list[nn.Module]:
        return [m for m in (self.self_attn, self.pool_attn) if m is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, n, c = x.shape
        if self.mode == "mean":
            return x.mean(dim=1)
        h = x.permute(0, 2, 1, 3).reshape(b * n, s, c)  # one sequence of 5 per token
        if self.mode == "dual":
            h = h + self.source_embed
        q = self.norm_in(h)
        h = h + self.self_attn(q, q, q, need_weights=False)[0]
        if self.mode == "single":
            return h.mean(dim=1).reshape(b, n, c)
        query = self.query.expand(n, c) if self.query.shape[0] == 1 else self.query
        query = query.unsqueeze(0).expand(b, n, c).reshape(b * n, 1, c)
        pooled = self.pool_attn(query, h, h, need_weights=False)[0]
        return self.norm_out(pooled.reshape(b, n, c))


def full_precision(t: torch.Tensor):
    """Autocast switched off on ``t``'s device while it is on (a no-op context otherwise):
    the model's head runs in float32 under mixed precision, as the loss does."""
    kind = t.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.autocast(device_type=kind, enabled=False)
    return contextlib.nullcontext()


def hub_error(backbone: str, exc: BaseException) -> UserError:
    """The one-line error for pretrained weights that could not come from the model hub."""
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    return UserError(
        f"cannot download the pretrained weights of {backbone!r} from the model hub ({reason}); "
        "run `speedstructure fetch-weights` once on a machine with internet access, bring "
        "paths.weights here (`dvc push` there, `dvc pull` here, or copy it) and point the "
        "variant's `pretrained:` at the file"
    )


def _is_hub_failure(exc: BaseException) -> bool:
    """A download failure: no network, offline mode, a file missing from the hub cache."""
    mod = type(exc).__module__.split(".")[0]
    return isinstance(exc, OSError) or mod in ("huggingface_hub", "requests", "urllib3", "httpx")


def _create_backbone(v: EvaFusionVariant, *, load_weights: bool) -> nn.Module:
    import timm

    kwargs = {
        "in_chans": 1,
        "dynamic_img_size": True,
        "num_classes": 0,
        "img_size": int(v.img_size) if v.img_width is None else (int(v.img_size), int(v.img_width)),
        "drop_path_rate": float(v.drop_path_rate),
    }
    if v.depth is not None:
        kwargs["depth"] = int(v.depth)
    kwargs.update(v.backbone_kwargs or {})
    if load_weights and v.pretrained != "none":
        kwargs.update(_pretrained_kwargs(v))
    try:
        return timm.create_model(v.backbone, **kwargs)
    except Exception as exc:
        if kwargs.get("pretrained") and v.pretrained == "timm" and _is_hub_failure(exc):
            raise hub_error(v.backbone, exc) from exc
        if not isinstance(exc, RuntimeError):
            raise
        msg = str(exc)
        if "Unknown model" in msg or "Invalid pretrained tag" in msg:
            raise ConfigError(f"unknown timm backbone {v.backbone!r}: {msg}") from exc
        if "pretrained_cfg_overlay" in kwargs:
            raise UserError(
                f"{kwargs['pretrained_cfg_overlay']['file']}: weights do not fit backbone "
                f"{v.backbone!r}: {msg}"
            ) from exc
        raise


def _pretrained_kwargs(v: EvaFusionVariant) -> dict[str, Any]:
    """timm keyword arguments that load ``v.pretrained`` (``timm`` or a local file)."""
    kwargs: dict[str, Any] = {"pretrained": True}
    if v.pretrained != "timm":
        path = resolve_path(v.pretrained)
        if not path.is_file():
            raise UserError(
                f"pretrained weights file not found: {path} (`speedstructure fetch-weights` "
                "downloads it once, online; `dvc pull` restores a fetched one)"
            )
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    if v.depth is not None:
        # a shallower backbone keeps the checkpoint's first `depth` blocks
        kwargs["pretrained_strict"] = False
    return kwargs


class EvaFusionNet(VelocityModel):
    """EVA02 (any timm EVA/ViT with blocks, patch_embed, rope) with per-source early blocks,
    fusion across the five sources, and a per-token linear velocity head."""

    arch = "eva_fusion"

    def __init__(self, v: EvaFusionVariant, *, load_weights: bool = True):
        super().__init__(v, prior=v.prior)
        self.img_size = int(v.img_size)
        self.img_shape = (self.img_size, int(v.img_width or v.img_size))
        self.layout, self.amplitude = v.layout, v.amplitude
        self.backbone = _create_backbone(v, load_weights=load_weights)
        bb = self.backbone
        for attr in ("blocks", "patch_embed", "_pos_embed"):
            if not hasattr(bb, attr):
                raise ConfigError(f"backbone {v.backbone!r} has no '{attr}': not an EVA/ViT model")
        depth = len(bb.blocks)
        self.split_at = int(v.split_at)
        if not 0 <= self.split_at <= depth:
            raise ConfigError(
                f"split_at={self.split_at} outside [0, {depth}] (backbone has {depth} blocks)"
            )
        dim = bb.embed_dim
        used = {"mean": (), "single": ("channel_heads",), "dual": ("channel_heads", "fusion_heads")}
        for key in used[v.fusion]:
            heads = getattr(v, key)
            if heads is None or int(heads) < 1 or dim % int(heads):
                raise ConfigError(f"{key}={heads} must divide the backbone width {dim}")
        grid = bb.patch_embed.dynamic_feat_size(self.img_shape)
        self.grid = tuple(int(g) for g in grid)
        self.num_prefix_tokens = int(getattr(bb, "num_prefix_tokens", 1))
        n_tokens = self.num_prefix_tokens + self.grid[0] * self.grid[1]
        self.fusion = SourceFusion(
            v.fusion,
            dim,
            n_tokens,
            channel_heads=int(v.channel_heads or 1),
            fusion_heads=int(v.fusion_heads or 1),
            pool_query=v.pool_query,
        )
        self.head_resize, self.head_kind = v.head_resize, v.head
        # rows: each token a lateral profile (300 x), tokens resized to depth (the seed's);
        # grid: each token a patch of the (depth, x) section at its place in the token grid
        self.patch = (math.ceil(NZ / self.grid[0]), math.ceil(NX / self.grid[1]))
        self.head = nn.Linear(dim, NX if v.head == "rows" else self.patch[0] * self.patch[1])
        if self.prior != "none":  # start from the prior exactly; the network learns the deviation
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        # the per-token final norm: EVA02 with average pooling keeps it in fc_norm
        norm = getattr(bb, "norm", None)
        self._final_norm_name = (
            "norm" if norm is not None and not isinstance(norm, nn.Identity) else "fc_norm"
        )

    # -- pieces, public so tests and analyses can check them against timm
    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.backbone, self._final_norm_name)(x)

    def embed(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch + position embedding of ``(N, 1, H, W)`` images (as timm's forward_features):
        tokens ``(N, prefix + h*w, C)`` and the rotary embedding for that grid."""
        bb = self.backbone
        x = bb.patch_embed(img)
        if x.ndim == 3:  # a backbone without dynamic_img_size flattens already
            raise ConfigError("the backbone must be created with dynamic_img_size=True")
        x, rope = bb._pos_embed(x)
        x = bb.norm_pre(x) if hasattr(bb, "norm_pre") else x
        return x, rope

    def run_blocks(
        self, x: torch.Tensor, rope: torch.Tensor | None, start: int, stop: int
    ) -> torch.Tensor:
        """Backbone blocks ``start``..``stop-1`` with the rotary embedding, as timm does."""
        bb = self.backbone
        mixed = getattr(bb, "rope_mixed", False) and rope is not None
        ckpt = getattr(bb, "grad_checkpointing", False) and torch.is_grad_enabled()
        for i in range(start, stop):
            blk = bb.blocks[i]
            r = rope[i] if mixed else rope
            if ckpt:
                x = torch.utils.checkpoint.checkpoint(blk, x, rope=r, use_reentrant=False)
            else:
                x = blk(x, rope=r)
        return x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.grad_checkpointing = enable

    def transformer_blocks(self) -> list[nn.Module]:
        """The backbone blocks and the fusion's attention layers (their 2-D weight matrices
        are the Muon parameters)."""
        return list(self.backbone.blocks) + self.fusion.attention_modules()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The model-ready images ``(B, 5, H, W)`` of gathers ``(B, 5, 10001, 31)``: what
        :meth:`forward` computes first, per sample and per source (so a sample's images are
        the same whatever batch it is prepared in, and reversing the source order of the
        images is reversing it in the gathers).  The training engine caches them
        (``train.cache_inputs``) and calls ``forward(images, prepared=True)``."""
        self._check_input(x)
        img = preprocess_gathers(
            x, self.img_shape, self.input_scale, layout=self.layout, amplitude=self.amplitude
        )
        return img.reshape(x.shape[0], N_SOURCES, *img.shape[-2:])

    def forward(self, x: torch.Tensor, prepared: bool = False) -> torch.Tensor:
        """Velocities of gathers ``x``, or of the images :meth:`prepare` made of them."""
        img = x if prepared else self.prepare(x)
        b = img.shape[0]
        t, rope = self.embed(img.reshape(b * N_SOURCES, 1, *img.shape[-2:]))
        t = self.run_blocks(t, rope, 0, self.split_at)
        n, c = t.shape[1], t.shape[2]
        t = self.fusion(t.reshape(b, N_SOURCES, n, c))
        t = self.run_blocks(t, rope, self.split_at, len(self.backbone.blocks))
        t = self.final_norm(t)[:, self.num_prefix_tokens :]
        with full_precision(t):  # the head in float32 under autocast: velocities not quantised
            t = t.float()
            out = self._rows_head(t) if self.head_kind == "rows" else self._grid_head(t)
            return self.to_velocity(out)

    def _rows_head(self, t: torch.Tensor) -> torch.Tensor:
        out = self.head(t).transpose(1, 2)  # (B, 300, g*g): tokens in row-major grid order
        if self.head_resize == "area":
            return F.interpolate(out, size=NZ, mode="area")
        return F.interpolate(out, size=NZ, mode="linear", align_corners=False)

    def _grid_head(self, t: torch.Tensor) -> torch.Tensor:
        """Token (i, j) of the (time, receiver) grid -> the (depth, x) patch (i, j); the
        mosaic is resized (bilinear) to (1259, 300) and returned as (B, 300, 1259)."""
        b = t.shape[0]
        (gh, gw), (ph, pw) = self.grid, self.patch
        p = self.head(t).reshape(b, gh, gw, ph, pw).permute(0, 1, 3, 2, 4)
        mosaic = p.reshape(b, 1, gh * ph, gw * pw)
        out = F.interpolate(mosaic, size=(NZ, NX), mode="bilinear", align_corners=False)
        return out[:, 0].transpose(1, 2)


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


# ----------------------------------------------------------------------------- building


def build_model(
    variant: Variant | dict[str, Any],
    *,
    device: str | torch.device | None = None,
    meta: bool = False,
    name: str | None = None,
) -> VelocityModel:
    """Build the model described by a typed variant, or by its mapping: a ``variants:``
    entry of ``params.yaml`` or the ``variant`` record of a checkpoint (new records hold
    :meth:`Variant.model_dict`, older ones the raw or fully resolved mapping).

    ``meta=True`` builds on the meta device (no memory, pretrained weights not loaded,
    nothing downloaded): for parameter counts and FLOP estimates.  ``name`` only improves
    error messages.  The model keeps the typed variant as ``model.variant``.
    """
    v = parse_variant(_old_record(variant), f"variant '{name}'" if name else "variant")
    ctx = torch.device("meta") if meta else contextlib.nullcontext()
    with ctx:
        if isinstance(v, EvaFusionVariant):
            model: VelocityModel = EvaFusionNet(v, load_weights=not meta)
        elif isinstance(v, InversionNetVariant):
            model = InversionNet(v)
        else:
            model = DepthTrend(v)
    model.variant = v
    if device is not None and not meta:
        model = model.to(device)
    return model


def _old_record(variant: Variant | dict[str, Any]) -> Variant | dict[str, Any]:
    """A checkpoint record of the earlier format: ``pretrained: null`` meant ``none``."""
    if isinstance(variant, dict) and "pretrained" in variant and variant["pretrained"] is None:
        return {**variant, "pretrained": "none"}
    return variant


# ----------------------------------------------------------------------------- analysis


def muon_param_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the 2-D weight matrices inside
    ``model.transformer_blocks()``: the parameters to optimise with Muon."""
    blocks = model.transformer_blocks() if hasattr(model, "transformer_blocks") else []
    ids = {id(p) for blk in blocks for p in blk.parameters() if p.ndim == 2}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts per top-level part (backbone, fusion, head / encoder, decoder) and
    the total; parameters shared between parts are counted once."""
    parts: dict[str, int] = {}
    seen: set[int] = set()
    for n, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        part = n.split(".", 1)[0]
        parts[part] = parts.get(part, 0) + p.numel()
    parts["total"] = sum(parts.values())
    return parts


def forward_flops(model: VelocityModel, batch: int = 1) -> int:
    """Forward FLOPs (2 per multiply-add) of ``batch`` samples, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` on meta tensors when the model lives on the
    meta device (no memory, no compute), otherwise on a zero input on the model's device.
    Counts matrix products, convolutions and attention; element-wise operations,
    normalisation and interpolation are not counted.  Prefer a meta-device model
    (``build_model(..., meta=True)``): on CPU PyTorch's fused attention kernel is invisible
    to the counter, so a real CPU forward misses the attention matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters(), None)
    b = next(model.buffers(), None)
    dev = (
        (p if p is not None else b).device
        if (p is not None or b is not None)
        else torch.device("cpu")
    )
    if isinstance(model, DepthTrend):
        return 0
    x = torch.zeros(batch, *INPUT_SHAPE, device=dev)
    was_training = model.training
    # train mode: nn.MultiheadAttention's inference fast path is a fused op the counter misses
    model.train()
    try:
        counter = FlopCounterMode(display=False)
        # (no torch.no_grad(): the counter's module tracker rejects parameter views made
        # under no_grad)
        with counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)


def model_summary(name: str, params: Params) -> dict[str, Any]:
    """Parameter counts, shapes and forward FLOPs of variant ``name`` of ``params``, built on
    the meta device (nothing allocated, no weights loaded or downloaded)."""
    model = build_model(params.variant(name), meta=True, name=name)
    v = model.variant
    out: dict[str, Any] = {"variant": name, "arch": v.arch}
    if isinstance(model, EvaFusionNet):
        out.update(_fusion_summary(model))
    counts = count_parameters(model)
    out["params"] = {
        "backbone": counts.get("backbone", 0),
        "fusion": counts.get("fusion", 0),
        "head": counts.get("head", 0),
        **{k: n for k, n in counts.items() if k not in ("backbone", "fusion", "head", "total")},
        "total": counts["total"],
    }
    out["params_muon"] = sum(
        p.numel() for n, p in model.named_parameters() if n in muon_param_names(model)
    )
    out["input_shape"] = [1, *INPUT_SHAPE]
    out["output_shape"] = [1, *OUTPUT_SHAPE]
    out["forward_flops_per_sample"] = forward_flops(model, batch=1)
    out["flops_method"] = (
        "torch.utils.flop_counter.FlopCounterMode over one forward pass on meta tensors "
        "(matmul, convolution, attention; 2 FLOPs per multiply-add)"
    )
    out["tta_flip"] = v.tta_flip
    out["floor"] = v.floor
    return out


def _fusion_summary(model: EvaFusionNet) -> dict[str, Any]:
    v = model.variant
    return {
        "backbone": v.backbone,
        "pretrained": str(v.pretrained),
        "blocks": len(model.backbone.blocks),
        "split_at": model.split_at,
        "fusion": v.fusion,
        "channel_heads": v.channel_heads if v.fusion != "mean" else None,
        "fusion_heads": v.fusion_heads if v.fusion == "dual" else None,
        "embed_dim": int(model.backbone.embed_dim),
        "image_shape_per_source": [1, *model.img_shape],
        "token_grid": list(model.grid),
    }


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:,.3f} M" if n >= 1e5 else f"{n:,}"


_SUMMARY_KEYS = (
    "backbone",
    "pretrained",
    "blocks",
    "split_at",
    "fusion",
    "channel_heads",
    "fusion_heads",
    "embed_dim",
    "image_shape_per_source",
    "token_grid",
    "tta_flip",
    "floor",
)


def _print_summary(info: dict[str, Any]) -> None:
    print(f"variant {info['variant']}  (arch {info['arch']})")
    for key in _SUMMARY_KEYS:
        if info.get(key) is not None:
            print(f"  {key:24s} {info[key]}")
    print("  parameters")
    for k, n in info["params"].items():
        print(f"    {k:22s} {_fmt_count(n):>14s}")
    print(f"    {'(on Muon)':22s} {_fmt_count(info['params_muon']):>14s}")
    print(f"  {'input shape':24s} {tuple(info['input_shape'])}")
    print(f"  {'output shape':24s} {tuple(info['output_shape'])}")
    print(f"  {'forward FLOPs/sample':24s} {info['forward_flops_per_sample'] / 1e9:,.2f} G")
    print(f"  ({info['flops_method']})")


def _cmd_model_summary(args: argparse.Namespace) -> int:
    from speedstructure import cli

    info = model_summary(args.variant, load_params(args.params))
    if args.json != "-":  # JSON on standard output replaces the table
        _print_summary(info)
    cli.write_json_output(args.json, info)
    return 0


def add_commands(subparsers) -> None:
    from speedstructure import cli

    p = subparsers.add_parser(
        "model-summary",
        help="parameter counts, shapes and FLOPs of a model variant (no weights downloaded)",
        description="Build a variant from params.yaml on the meta device and report parameter "
        "counts (backbone, fusion, head, total), input/output shapes and forward FLOPs per sample.",
    )
    p.add_argument("variant", help="a key of the 'variants' section of params.yaml")
    cli.add_json_option(p)
    p.add_argument(
        "--params",
        metavar="FILE",
        default=None,
        help="parameter file (default: params.yaml of the project)",
    )
    p.set_defaults(func=_cmd_model_summary)
