"""The EVA02 source-fusion network (:class:`EvaFusionNet`), the seed's architecture.

A timm EVA/ViT backbone with one input channel.  Each gather becomes an image
(:mod:`speedstructure.models.inputs`).  The first ``split_at`` blocks run on each source
separately, then the five token sequences are fused per token
(:mod:`speedstructure.models.fusion`), and the remaining blocks run on the fused sequence.
Head: final norm, prefix tokens dropped, Linear(dim -> 300) per token, the g*g tokens resized
to 1259 depth cells ("area"), sigmoid scaled to ``[v_min, v_max]``.  Backbones come from
timm; pretrained weights from a local file (:mod:`speedstructure.models.pretrained`) or the hub.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from speedstructure.config.schema import (
    EvaFusionVariant,
)
from speedstructure.config.typed import ConfigError, resolve_path
from speedstructure.errors import UserError
from speedstructure.models.base import NX, NZ, VelocityModel
from speedstructure.models.fusion import SourceFusion
from speedstructure.models.inputs import N_SOURCES, full_precision, preprocess_gathers


def hub_error(backbone: str, exc: BaseException) -> UserError:
    """The one-line error for pretrained weights that could not come from the model hub."""
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    return UserError(
        f"cannot download the pretrained weights of {backbone!r} from the model hub ({reason}); "
        "run `speedstructure fetch-weights` once on a machine with internet access, bring "
        "paths.weights here (`dvc push` there, `dvc pull` here, or copy it) and point the "
        "variant's `pretrained:` at the file"
    )


def is_hub_failure(exc: BaseException) -> bool:
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
        if kwargs.get("pretrained") and v.pretrained == "timm" and is_hub_failure(exc):
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

    @property
    def prepared_numel(self) -> int:
        """Numbers per sample in :meth:`prepare`'s output (the training engine's cache)."""
        return N_SOURCES * self.img_shape[0] * self.img_shape[1]

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
