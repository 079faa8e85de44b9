"""Building a model from its variant, and describing it (the ``model-summary`` command).

Every model is built from one typed variant (:class:`~speedstructure.config.schema.Variant`,
an entry of the ``variants:`` section of ``params.yaml``) by :func:`build_model`, which keeps
it as ``model.variant``.  :func:`count_parameters` and :func:`forward_flops` measure it.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from speedstructure.config.load import load_params
from speedstructure.config.schema import (
    ColumnVariant,
    EvaFusionVariant,
    InversionNetVariant,
    Params,
    Variant,
)
from speedstructure.models.base import VelocityModel, muon_param_names
from speedstructure.models.baselines import DepthTrend, InversionNet
from speedstructure.models.column import ColumnNet
from speedstructure.models.eva_fusion import EvaFusionNet
from speedstructure.models.inputs import INPUT_SHAPE, OUTPUT_SHAPE
from speedstructure.physics.seafloor import FloorPicker

# ----------------------------------------------------------------------------- building


def build_model(
    v: Variant,
    *,
    device: str | torch.device | None = None,
    meta: bool = False,
    floor_picker: FloorPicker | None = None,
) -> VelocityModel:
    """Build the model a typed variant describes (``params.variant(name)``, or a checkpoint's
    record read by :func:`~speedstructure.ensemble.members.load_member`).

    ``meta=True`` builds on the meta device (no memory, pretrained weights not loaded,
    nothing downloaded): for parameter counts and FLOP estimates.  ``floor_picker`` is the
    physics a ``floor: picked`` or ``relative`` variant picks water floors with
    (:meth:`FloorPicker.from_synth` of ``params.synth``).  The model keeps the variant as
    ``model.variant``.
    """
    ctx = torch.device("meta") if meta else contextlib.nullcontext()
    with ctx:
        if isinstance(v, EvaFusionVariant):
            model: VelocityModel = EvaFusionNet(v, load_weights=not meta)
        elif isinstance(v, InversionNetVariant):
            model = InversionNet(v)
        elif isinstance(v, ColumnVariant):
            model = ColumnNet(v)
        else:
            model = DepthTrend(v)
    model.variant = v
    model.floor_picker = floor_picker
    if device is not None and not meta:
        model = model.to(device)
    return model


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
    model = build_model(params.variant(name), meta=True)
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
