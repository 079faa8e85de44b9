"""What the networks see: the five gathers turned into images.

Each gather is scaled (x ``input_scale``), optionally sign-log compressed, and laid out as an
image: ``layout: fold`` (the seed's: 10000 time samples wrapped into ``TIME_WRAP`` x
``TIME_WRAP``, laid out beside each other per receiver, then resized) or ``time_receiver`` (time x
receivers resized directly).  :func:`full_precision` runs a block outside autocast.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from speedstructure.data.format import GATHER_SHAPE, SOURCES, VP_SHAPE

N_SOURCES = len(SOURCES)
N_TIME, N_RECEIVERS = GATHER_SHAPE
INPUT_SHAPE = (N_SOURCES, N_TIME, N_RECEIVERS)  # per sample
OUTPUT_SHAPE = VP_SHAPE  # per sample
TIME_WRAP = 100  # 10000 time samples wrapped into TIME_WRAP rows of TIME_WRAP


# ----------------------------------------------------------------------------- EVA fusion


def wrap_time(x: torch.Tensor, scale: float = 1.0e3) -> torch.Tensor:
    """``(B, 5, 10001, 31)`` -> ``(B*5, 1, 100, 3100)``, source-major: scaled, 10001 -> 10000
    time samples (area), time folded into 100 x 100 and laid out as ``(100, 31*100)``
    (row: coarse time t // 100; column: receiver * 100 + t % 100)."""
    b, s, t, r = x.shape
    g = (x * scale).reshape(b * s, t, r).transpose(1, 2)  # (BS, 31, 10001)
    g = F.interpolate(g, size=TIME_WRAP * TIME_WRAP, mode="area")  # (BS, 31, 10000)
    g = g.reshape(b * s, r, TIME_WRAP, TIME_WRAP).permute(
        0, 2, 1, 3
    )  # (BS, coarse, receiver, fine)
    return g.reshape(b * s, 1, TIME_WRAP, r * TIME_WRAP)


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

    ``fold`` (the seed's): :func:`wrap_time`, then a bilinear resize; ``time_receiver``:
    :func:`time_receiver_gathers`.  ``amplitude="signlog"`` applies :func:`signlog` last."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if layout == "fold":
        img = wrap_time(x, scale)
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
    else:
        img = time_receiver_gathers(x, size, scale)
    return signlog(img) if amplitude == "signlog" else img


def full_precision(t: torch.Tensor):
    """Autocast switched off on ``t``'s device while it is on (a no-op context otherwise):
    the model's head runs in float32 under mixed precision, as the loss does."""
    kind = t.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.autocast(device_type=kind, enabled=False)
    return contextlib.nullcontext()
