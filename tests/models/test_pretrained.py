"""Pretrained weights offline: fetched once into a DVC-tracked file, read without the hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from speedstructure.errors import UserError
from speedstructure.fsutil import file_md5
from speedstructure.models import pretrained as P
from support import ROOT, model_from

TINY = "eva02_tiny_patch14_224.mim_in22k"


def _fake_hub(calls: list[str]):
    """A downloader that returns a tiny EVA02's weights as the hub would (3 channels, 56 px)."""
    import timm

    def download(backbone: str) -> dict:
        calls.append(backbone)
        torch.manual_seed(7)
        m = timm.create_model(backbone, pretrained=False, num_classes=0, img_size=56, depth=2)
        return {k: v.detach().contiguous() for k, v in m.state_dict().items()}

    return download


@pytest.fixture
def pretrained_params(tmp_path, tiny_params, tiny_variant):
    """Parameters whose variants point at hub weights (two sharing one backbone), at a file of
    their own, and at no pretrained weights."""
    variants = {
        "a": tiny_variant(pretrained="timm"),
        "b": tiny_variant(pretrained="timm", fusion="mean"),  # same backbone: same file
        "c": tiny_variant(pretrained="weights/own.safetensors"),
        "scratch": tiny_variant(),
    }
    return tiny_params(tmp_path, variants=variants, runs={}, ensemble={"variants": []})


def test_fetch_downloads_once_into_the_file_each_variant_points_at(pretrained_params):
    calls: list[str] = []
    recs = P.fetch_weights(pretrained_params, download=_fake_hub(calls))
    files = {Path(r["file"]) for r in recs}
    assert files == {
        pretrained_params.root / "weights" / f"{TINY}.safetensors",
        pretrained_params.root / "weights" / "own.safetensors",
    }
    assert calls == [TINY, TINY] and {r["status"] for r in recs} == {"downloaded"}
    assert all(r["md5"] == file_md5(r["file"]) for r in recs)
    again = P.fetch_weights(pretrained_params, ["a", "b"], download=_fake_hub(calls))
    assert len(calls) == 2 and [r["status"] for r in again] == ["present"]
    P.fetch_weights(pretrained_params, ["a"], force=True, download=_fake_hub(calls))
    assert len(calls) == 3
    with pytest.raises(UserError, match="scratch.*pretrained: none"):
        P.fetch_weights(pretrained_params, ["scratch"], download=_fake_hub(calls))


def test_a_variant_pointing_at_the_fetched_file_loads_it_without_the_hub(
    pretrained_params, monkeypatch
):
    import timm

    (rec,) = P.fetch_weights(pretrained_params, ["c"], download=_fake_hub([]))
    from safetensors.torch import load_file

    saved = load_file(rec["file"])
    real = timm.create_model

    def no_hub(*args, **kwargs):  # a local file is read through pretrained_cfg_overlay only
        assert "file" in (kwargs.get("pretrained_cfg_overlay") or {}), "the hub was asked"
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_hub)
    monkeypatch.chdir(
        pretrained_params.root
    )  # `pretrained:` paths are relative to the project root
    model = model_from(pretrained_params.variant("c"))
    key = "blocks.0.attn.qkv.weight"
    torch.testing.assert_close(model.backbone.state_dict()[key], saved[key], rtol=0, atol=0)


def test_fetched_file_is_tracked_by_dvc(tmp_path, tiny_params, tiny_variant):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True, env=env)
    params = tiny_params(
        tmp_path,
        variants={"a": tiny_variant(pretrained="timm")},
        runs={},
        ensemble={"variants": []},
    )
    (rec,) = P.fetch_weights(params, download=_fake_hub([]))
    assert P.dvc_add([Path(rec["file"])], params.root)
    dvc_file = Path(rec["file"] + ".dvc")
    out = yaml.safe_load(dvc_file.read_text())["outs"][0]
    assert out["md5"] == rec["md5"] == file_md5(rec["file"])
    assert Path(rec["file"]).name in (Path(rec["file"]).parent / ".gitignore").read_text()
    assert not P.dvc_add([Path(rec["file"])], tmp_path / "not-a-dvc-project")


def test_offline_fetch_is_a_one_line_error(tmp_path, tiny_variant):
    """The real downloader against no network: exit code 2, one line saying what to do."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["variants"] = {"a": tiny_variant(pretrained="timm")}
    raw["runs"], raw["ensemble"] = {}, {"variants": [], "hand_weights": {}}
    raw["profiles"] = {}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache
        "SPEEDSTRUCTURE_ROOT": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "speedstructure.cli", "fetch-weights", "a"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]  # (the rest: progress)
    assert len(errors) == 1 and errors[0].startswith("speedstructure fetch-weights: error:")
    assert proc.stderr.rstrip().endswith(errors[0]) and "Traceback" not in proc.stderr
    assert "`speedstructure fetch-weights`" in errors[0] and TINY in errors[0]
    assert not (tmp_path / "weights").exists() or not any((tmp_path / "weights").iterdir())
