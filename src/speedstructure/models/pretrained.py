"""Pretrained backbone weights as local files: fetched once, tracked by DVC, read offline.

``speedstructure fetch-weights [VARIANT ...]`` downloads the timm backbone weights of each
named variant (default: every variant with ``pretrained:`` other than ``none``) from the
model hub, once, into the file the variant points at: its ``pretrained:`` path, or for
``pretrained: timm`` ``<paths.weights>/<backbone>.safetensors``.  Variants sharing a
backbone share the file (the four competition variants: one 1.2 GB file).  A file already
there is kept (``--force`` downloads again).  The file holds the state dict of the timm
model as the hub ships it (3 input channels, its own image size); building a variant
adapts it (timm sums the patch embedding over the channels and resamples the position
embedding to ``img_size``), so the same file serves every image size and depth.

In a DVC project the file is then tracked (``dvc add``; ``--no-dvc`` skips it): commit
the ``.dvc`` file, ``dvc push`` shares the weights through the remote and ``dvc pull``
restores them on a machine without internet.  Training never touches the hub when the
variants point at the file; with ``pretrained: timm`` on such a machine, the download
failure is a one-line error that says what to do
(:func:`speedstructure.models.eva_fusion.hub_error`).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from speedstructure.config.load import load_params
from speedstructure.config.schema import EvaFusionVariant, Params
from speedstructure.config.typed import resolve_path
from speedstructure.errors import UserError
from speedstructure.fsutil import atomic_output, file_md5

log = logging.getLogger(__name__)
SUFFIX = ".safetensors"

Downloader = Callable[[str], dict]  # backbone name -> state dict


def weights_file(params: Params, backbone: str) -> Path:
    """The file for ``pretrained: timm`` weights: ``<paths.weights>/<backbone>.safetensors``."""
    return params.path("weights") / f"{backbone}{SUFFIX}"


def wanted_files(params: Params, names: list[str] | None = None) -> dict[Path, str]:
    """``{file: backbone}`` for the named variants (default: all with pretrained weights)."""
    names = list(names or [])
    if not names:
        names = [
            k
            for k, v in params.variants.items()
            if isinstance(v, EvaFusionVariant) and v.pretrained != "none"
        ]
    files: dict[Path, str] = {}
    for name in names:
        v = params.variant(name)
        if not isinstance(v, EvaFusionVariant) or v.pretrained == "none":
            raise UserError(f"variant '{name}' uses no pretrained weights (pretrained: none)")
        if v.pretrained == "timm":
            path = weights_file(params, v.backbone)
        else:
            path = resolve_path(v.pretrained, params.root)
        if files.get(path, v.backbone) != v.backbone:
            raise UserError(f"{path}: named for two backbones, {files[path]} and {v.backbone}")
        files[path] = v.backbone
    return files


def download_state_dict(backbone: str) -> dict:
    """The hub's pretrained weights of ``backbone``, as timm loads them (classifier dropped)."""
    import timm

    from speedstructure.models.eva_fusion import hub_error, is_hub_failure

    try:
        model = timm.create_model(backbone, pretrained=True, num_classes=0)
    except Exception as exc:
        if is_hub_failure(exc):
            raise hub_error(backbone, exc) from exc
        raise UserError(f"cannot create timm backbone {backbone!r}: {exc}") from exc
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_weights(state: dict, path: Path, backbone: str) -> None:
    """``state`` as a safetensors file, atomically."""
    from safetensors.torch import save_file

    with atomic_output(path, suffix=SUFFIX) as tmp:
        save_file(state, str(tmp), metadata={"backbone": backbone, "source": "timm pretrained"})


def fetch_weights(
    params: Params,
    names: list[str] | None = None,
    *,
    force: bool = False,
    download: Downloader | None = None,
) -> list[dict[str, Any]]:
    """Download each wanted file that is missing (all with ``force``; ``download``: the
    backbone -> state dict function, default :func:`download_state_dict`); one record each."""
    download = download or download_state_dict
    out = []
    for path, backbone in wanted_files(params, names).items():
        status = "present"
        if force or not path.is_file():
            log.info("downloading the weights of %s ...", backbone)
            save_weights(download(backbone), path, backbone)
            status = "downloaded"
        rec = {"file": str(path), "backbone": backbone, "status": status}
        rec.update(bytes=path.stat().st_size, md5=file_md5(path))
        out.append(rec)
    return out


def dvc_add(paths: list[Path], root: Path) -> bool:
    """``dvc add`` the files when ``root`` is a DVC project; False when it is not."""
    if not (root / ".dvc").is_dir() or not paths:
        return False
    cmd = [sys.executable, "-m", "dvc", "add", "-q", *(str(p) for p in paths)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = " ".join((proc.stderr or proc.stdout).split())[:300]
        raise UserError(f"dvc add {' '.join(map(str, paths))} failed: {detail}")
    return True


# --------------------------------------------------------------------------- CLI


def add_commands(subparsers) -> None:
    from speedstructure import cli

    p = subparsers.add_parser("fetch-weights", help=cli.COMMANDS["fetch-weights"][1])
    p.description = (
        "Download the pretrained backbone weights of VARIANT(s) (default: every variant with "
        "pretrained weights) once into the file each points at, and track it with DVC."
    )
    p.add_argument("variants", nargs="*", metavar="VARIANT", help="variants of params.yaml")
    p.add_argument("--force", action="store_true", help="download again a file already there")
    p.add_argument("--no-dvc", dest="dvc", action="store_false", help="do not `dvc add` the files")
    cli.add_json_option(p)
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from speedstructure import cli

    params = load_params()
    records = fetch_weights(params, args.variants, force=args.force)
    tracked = args.dvc and dvc_add([Path(r["file"]) for r in records], params.root)
    for r in records:
        size = r["bytes"] / 1e6
        print(f"{r['file']}: {r['status']} ({r['backbone']}, {size:,.1f} MB, md5 {r['md5']})")
    if tracked:
        print("tracked by DVC: commit the .dvc file(s); `dvc push` shares the weights")
    cli.write_json_output(args.json, {"files": records, "dvc": bool(tracked)})
    return 0
