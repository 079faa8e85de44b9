"""Tests of speedstructure.models: shapes, flips/TTA, fusion, Muon names, weights, baselines,
CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from speedstructure import cli
from speedstructure.config.load import load_params, parse_variant
from speedstructure.config.schema import V_MAX, V_MIN, DepthTrendVariant, EvaFusionVariant
from speedstructure.config.typed import ConfigError
from speedstructure.data.flips import flip_inputs, flip_target
from speedstructure.errors import UserError
from speedstructure.models.base import _median, muon_param_names
from speedstructure.models.baselines import DepthTrend
from speedstructure.models.build import build_model, count_parameters, forward_flops, model_summary
from speedstructure.models.eva_fusion import EvaFusionNet
from speedstructure.models.inputs import (
    preprocess_gathers,
    signlog,
    time_receiver_gathers,
    wrap_time,
)
from support import ROOT, model_from, random_velocity

PARAMS = ROOT / "params.yaml"


@pytest.fixture
def tiny_cfg(tiny_variant):
    """``tiny_cfg(**overrides)``: conftest's tiny variant at 56 px (4 x 4 tokens per source)."""
    return lambda **kw: tiny_variant(**{"img_size": 56, **kw})


def gathers(b: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.015 * torch.randn(b, 5, 10001, 31, generator=g)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # (conftest keeps every test offline)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("fusion", ["mean", "single", "dual"])
def test_forward_shape_range_and_batch_independence(fusion, tiny_cfg):
    model = model_from(tiny_cfg(fusion=fusion, v_min=2.0, v_max=3.0)).eval()
    x = gathers(2)
    with torch.no_grad():
        y = model(x)
        y0 = model(x[:1])
    assert y.shape == (2, 300, 1259) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert y.min() >= 2.0 and y.max() <= 3.0
    assert y.std() > 0  # not a constant map
    # folding the sources into the batch must keep samples apart
    torch.testing.assert_close(y0, y[:1], atol=1e-5, rtol=1e-5)
    assert (y[0] - y[1]).abs().max() > 1e-6
    p = model.predict(x, tta=True)
    assert p.shape == (2, 300, 1259) and p.min() >= 2.0 and p.max() <= 3.0


def test_fusion_is_differentiable_and_used(tiny_cfg):
    model = model_from(tiny_cfg(fusion="dual")).train()
    y = model(gathers(1))
    y.mean().backward()
    for name in ("source_embed", "query"):
        g = getattr(model.fusion, name).grad
        assert g is not None and g.abs().sum() > 0, name
    assert model.backbone.blocks[0].attn.proj.weight.grad.abs().sum() > 0


def test_preprocess_layout():
    b, t, r = 2, 10001, 31
    time = torch.arange(t, dtype=torch.float32).view(1, 1, t, 1)
    rec = torch.arange(r, dtype=torch.float32).view(1, 1, 1, r)
    src = torch.arange(5, dtype=torch.float32).view(1, 5, 1, 1)
    x = (1000 * src + 0 * time + rec).expand(b, 5, t, r) * 1e-3  # value = source*1000 + receiver
    img = wrap_time(x)
    assert img.shape == (b * 5, 1, 100, 3100)
    col = torch.arange(3100)
    torch.testing.assert_close(img[7, 0, 42], 2000 + (col // 100).float())  # sample 1, source 2
    # time: rows are the coarse time, the fine time runs inside each receiver's 100 columns
    img_t = wrap_time((time + 0 * rec).expand(1, 5, t, r).contiguous(), scale=1.0)
    approx_t = 100 * torch.arange(100).view(100, 1) + (col % 100).view(1, 3100)
    assert (img_t[0, 0] - approx_t).abs().max() <= 1.0  # 10001 -> 10000 area resampling
    out = preprocess_gathers(x, img_size=28)
    assert out.shape == (b * 5, 1, 28, 28)
    torch.testing.assert_close(out[3, 0, :, 0], torch.full((28,), 3000.0), atol=1e-2, rtol=0)


def test_time_receiver_layout_keeps_time_down_and_receivers_across():
    t, r = 10001, 31
    time = torch.arange(t, dtype=torch.float32).view(1, 1, t, 1)
    rec = torch.arange(r, dtype=torch.float32).view(1, 1, 1, r)
    src = torch.arange(5, dtype=torch.float32).view(1, 5, 1, 1)
    x = (1e-3 * (1000 * src + rec) + 0 * time).expand(2, 5, t, r).contiguous()
    img = time_receiver_gathers(x, (64, 31))
    assert img.shape == (10, 1, 64, 31)
    torch.testing.assert_close(img[7, 0, 10], 2000 + torch.arange(31.0))  # sample 1, source 2
    img_t = time_receiver_gathers((time + 0 * rec).expand(1, 5, t, r).contiguous(), (100, 16), 1.0)
    assert (img_t[0, 0, :, 0] - (100 * torch.arange(100.0) + 49.5)).abs().max() <= 1.0  # area
    torch.testing.assert_close(img_t[0, 0, 5], img_t[0, 0, 5, :1].expand(16))  # same at each x
    # mirrored receivers are mirrored columns: the consistent flip stays a mirror image
    flipped = time_receiver_gathers(flip_inputs(x, "consistent"), (64, 31))
    torch.testing.assert_close(flipped.view(2, 5, 64, 31), img.view(2, 5, 64, 31).flip(1, 3))


def test_signlog_compresses_amplitudes_and_keeps_the_sign():
    a = torch.tensor([-1000.0, -1.0, 0.0, 1.0, 1000.0])
    torch.testing.assert_close(signlog(a), torch.sign(a) * torch.log1p(a.abs()))
    x = gathers(1)
    plain = preprocess_gathers(x, (32, 16), layout="time_receiver")
    torch.testing.assert_close(
        preprocess_gathers(x, (32, 16), layout="time_receiver", amplitude="signlog"),
        signlog(plain),
    )


def test_grid_head_puts_each_token_at_its_place_in_the_section(tiny_cfg):
    v = tiny_cfg(
        img_size=64,
        img_width=32,
        layout="time_receiver",
        head="grid",
        backbone_kwargs={"patch_size": [16, 8]},
        prior="none",
    )
    model = model_from(v).eval()
    assert model.grid == (4, 4) and model.patch == (315, 75)
    # only feature 0 of token (row 3, column 0) is on: it lights the deep, left part alone
    tokens = torch.zeros(1, 16, model.head.in_features)
    tokens[0, 3 * 4 + 0, 0] = 1.0
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[:, 0] = 1.0
        out = model._grid_head(tokens)
    assert out.shape == (1, 300, 1259)
    out = out[0]
    assert out[:60, 1000:].min() > 0.9 and out[100:, :].abs().max() < 1e-6
    assert out[:, :900].abs().max() < 1e-6
    y = model_from(v)(gathers(2))
    assert y.shape == (2, 300, 1259) and y.min() >= 1.5 and y.max() <= 4.5


def test_blocks_match_timm_forward_features(tiny_cfg):
    """embed + run_blocks (rope included) equals timm's own forward_features, also at a
    grid size other than the one the backbone was created for (dynamic image size)."""
    model = model_from(tiny_cfg(split_at=2, fusion="mean")).eval()
    bb = model.backbone
    for size in (56, 70):
        img = torch.randn(2, 1, size, size)
        with torch.no_grad():
            t, rope = model.embed(img)
            ours = model.final_norm(model.run_blocks(t, rope, 0, len(bb.blocks)))
            ref = bb.forward_features(img)
            ref = bb.fc_norm(ref) if isinstance(bb.norm, torch.nn.Identity) else ref
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # and the rope really matters: without it the result differs
    with torch.no_grad():
        t, rope = model.embed(torch.randn(1, 1, 56, 56))
        assert not torch.allclose(
            model.run_blocks(t, rope, 0, 2), model.run_blocks(t, None, 0, 2), atol=1e-4
        )


# ----------------------------------------------------------------------------- flips / TTA


def test_flip_involution_and_layout():
    x = gathers(2)
    for mode in ("consistent", "receivers"):
        assert torch.equal(flip_inputs(flip_inputs(x, mode), mode), x)
    xf = flip_inputs(x, "consistent")
    assert torch.equal(xf[:, 0, :, 0], x[:, 4, :, 30])  # source 1 <-> 300, receiver 0 <-> 30
    assert torch.equal(xf[:, 2, :, 15], x[:, 2, :, 15])  # the middle stays
    xr = flip_inputs(x, "receivers")
    assert torch.equal(xr[:, 0, :, 0], x[:, 0, :, 30])  # source order kept
    y = torch.rand(2, 300, 1259)
    assert torch.equal(flip_target(flip_target(y)), y)
    assert torch.equal(flip_target(y)[:, 0], y[:, 299])
    xn = x[0].numpy()
    np.testing.assert_array_equal(flip_inputs(flip_inputs(xn)), xn)
    np.testing.assert_array_equal(flip_inputs(xn), xf[0].numpy())
    np.testing.assert_array_equal(flip_target(y[0].numpy()), flip_target(y[0]).numpy())
    with pytest.raises(ValueError):
        flip_inputs(x, "sideways")


def test_tta_on_flip_symmetric_input(tiny_cfg):
    """For x == flip(x): TTA = mean(f(x), flip_target(f(x))), which is mirror-symmetric
    in x although the plain prediction f(x) is not."""
    model = model_from(tiny_cfg()).eval()
    x = gathers(1)
    xs = 0.5 * (x + flip_inputs(x, "consistent"))
    assert torch.allclose(flip_inputs(xs, "consistent"), xs)
    with torch.no_grad():
        plain = model(xs)
    tta = model.predict(xs, tta=True)
    assert (plain - flip_target(plain)).abs().max() > 1e-4  # f itself is not symmetric
    torch.testing.assert_close(tta, 0.5 * (plain + flip_target(plain)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tta, flip_target(tta), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.predict(xs, tta=False), plain)


def test_tta_general_input_and_modes(tiny_cfg):
    x = gathers(1, seed=3)
    for mode in ("consistent", "receivers"):
        model = model_from(tiny_cfg(tta_flip=mode)).eval()
        with torch.no_grad():
            expect = 0.5 * (model(x) + flip_target(model(flip_inputs(x, mode))))
        got = model.predict(x)
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
        assert model.training is False
    model.train()
    model.predict(x)
    assert model.training  # predict restores the mode


# ----------------------------------------------------------------------------- competition size


def test_competition_variant_on_meta_device():
    cfg = load_params(PARAMS).variant("comp_s10_dual42")
    assert cfg.pretrained.startswith("weights/") and cfg.train  # the fetched local file
    model = model_from(cfg, meta=True)  # no download, no allocation
    assert isinstance(model, EvaFusionNet)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert len(model.backbone.blocks) == 24 and model.backbone.embed_dim == 1024
    assert model.grid == (40, 40) and model.split_at == 10
    total = count_parameters(model)["total"]
    assert abs(total - 312.4e6) / 312.4e6 < 0.01, total
    classifier = 1024 * 1000 + 1000  # timm's unused ImageNet head
    assert abs(total + classifier - 313.4e6) / 313.4e6 < 0.01
    counts = count_parameters(model)
    assert counts["head"] == 1024 * 300 + 300
    assert counts["backbone"] + counts["fusion"] + counts["head"] == total


# ----------------------------------------------------------------------------- Muon


@pytest.mark.parametrize("fusion", ["mean", "single", "dual"])
def test_muon_param_names_are_exactly_block_matrices(fusion, tiny_cfg):
    model = model_from(tiny_cfg(fusion=fusion))
    names = muon_param_names(model)
    params = dict(model.named_parameters())
    block_prefixes = ("backbone.blocks.", "fusion.self_attn.", "fusion.pool_attn.")
    expect = {n for n, p in params.items() if p.ndim == 2 and n.startswith(block_prefixes)}
    assert names == expect and names
    assert any(n.startswith("backbone.blocks.1.") for n in names)  # blocks after the split too
    assert ("fusion.self_attn.in_proj_weight" in names) == (fusion != "mean")
    for n in names:
        assert params[n].ndim == 2
        for bad in (
            "bias",
            "norm",
            "pos_embed",
            "cls_token",
            "patch_embed",
            "head",
            "query",
            "source_embed",
        ):
            assert bad not in n, n
    # everything else (biases, norms, embeddings, patch embedding, head) stays on AdamW
    rest = set(params) - names
    assert {"backbone.patch_embed.proj.weight", "backbone.pos_embed", "head.weight"} <= rest
    assert len(model.transformer_blocks()) == 2 + {"mean": 0, "single": 1, "dual": 2}[fusion]


def test_baselines_have_no_muon_params():
    for cfg in ({"arch": "depth_trend"}, {"arch": "inversionnet", "width": 2}):
        m = model_from(cfg)
        assert m.transformer_blocks() == [] and muon_param_names(m) == set()


# ----------------------------------------------------------------------------- pretrained


@pytest.mark.parametrize("ext", ["safetensors", "pth"])
def test_local_pretrained_file_is_loaded(tmp_path, ext, tiny_cfg):
    import timm

    torch.manual_seed(123)
    src = timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, in_chans=3, num_classes=0, img_size=56, depth=2
    )
    sd = {k: v.detach().clone().contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"tiny.{ext}"
    if ext == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    torch.manual_seed(0)
    fresh = model_from(tiny_cfg())
    model = model_from(tiny_cfg(pretrained=str(path)))
    bb = model.backbone.state_dict()
    key = "blocks.0.attn.qkv.weight"
    assert not torch.equal(fresh.backbone.state_dict()[key], sd[key])
    for k in (key, "blocks.1.mlp.fc2.weight", "pos_embed", "cls_token", "fc_norm.weight"):
        torch.testing.assert_close(bb[k], sd[k], rtol=0, atol=0)
    # 3 -> 1 input channels adapted by timm (sum over the RGB kernels)
    torch.testing.assert_close(
        bb["patch_embed.proj.weight"], sd["patch_embed.proj.weight"].sum(1, keepdim=True)
    )
    # a shallower variant keeps the checkpoint's first blocks
    short = model_from(tiny_cfg(pretrained=str(path), depth=1, split_at=1))
    torch.testing.assert_close(short.backbone.state_dict()[key], sd[key], rtol=0, atol=0)
    # meta builds never read the file
    model_from(tiny_cfg(pretrained=str(tmp_path / "absent.pth")), meta=True)


def test_missing_pretrained_file_is_a_user_error(tmp_path, tiny_cfg):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(UserError, match=r"nope.safetensors.*fetch-weights"):
        model_from(tiny_cfg(pretrained=str(missing)))


def test_weights_of_another_image_size_and_channels_load(tmp_path, tiny_cfg):
    """As the seed's 448-px RGB weights go into the 560-px one-channel model: the position
    embedding is resampled to the token grid, the patch embedding summed over RGB."""
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=0, img_size=56)
    sd = {k: v.detach().contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / "w56.safetensors"
    save_file(sd, str(path))
    model = model_from(tiny_cfg(pretrained=str(path), img_size=84))  # 4x4 -> 6x6 tokens
    bb = model.backbone.state_dict()
    assert sd["pos_embed"].shape[1] == 1 + 16 and bb["pos_embed"].shape[1] == 1 + 36
    torch.testing.assert_close(bb["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])
    assert bb["patch_embed.proj.weight"].shape[1] == 1
    out = model(gathers(1))
    assert out.shape == (1, 300, 1259) and torch.isfinite(out).all()


def test_hub_failure_is_a_one_line_error_saying_what_to_do(monkeypatch, tiny_cfg):
    import timm

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We have no connection\nand the file is not in the cache")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError) as err:
        model_from(tiny_cfg(pretrained="timm"))
    msg = str(err.value)
    assert "\n" not in msg and "fetch-weights" in msg and "no connection" in msg
    assert isinstance(model_from(tiny_cfg()), EvaFusionNet)  # no weights: no hub


# ----------------------------------------------------------------------------- precision


def test_head_and_loss_run_in_float32_under_autocast(tiny_cfg):
    from speedstructure.metrics import mape

    model = model_from(tiny_cfg())
    seen = {}
    model.head.register_forward_hook(lambda m, i, o: seen.update(inp=i[0].dtype, out=o.dtype))
    x, y = gathers(2), torch.full((2, 300, 1259), 2.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(x)
        loss = mape(pred, y)
        assert model.backbone.blocks[0].mlp.fc1(torch.randn(1, 192)).dtype == torch.bfloat16
    assert seen == {"inp": torch.float32, "out": torch.float32}
    assert pred.dtype == torch.float32 and loss.dtype == torch.float32
    # the velocities are not quantised to bf16's spacing (0.0156 km/s between 2 and 4)
    steps = torch.diff(torch.unique(pred))
    assert steps.min() < 1e-3
    inv = model_from({"arch": "inversionnet", "width": 2})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert inv(x).dtype == torch.float32


# ----------------------------------------------------------------------------- baselines


def test_depth_trend_fit_and_state_dict():
    rng = np.random.default_rng(0)
    ys = [random_velocity(rng) for _ in range(3)]
    batch = torch.from_numpy(random_velocity(rng, 2))
    model = model_from({"arch": "depth_trend"})
    assert isinstance(model, DepthTrend) and not model.requires_training
    assert not any(True for _ in model.parameters())
    with pytest.raises(UserError, match="not fitted"):
        model(gathers(1))
    model.fit([*ys, batch])
    expect = np.concatenate([np.stack(ys), batch.numpy()]).astype(np.float64).mean(axis=(0, 1))
    np.testing.assert_allclose(model.trend.numpy(), expect, rtol=1e-6)
    pred = model.predict(gathers(2))
    assert pred.shape == (2, 300, 1259)
    np.testing.assert_allclose(pred[1, 123].numpy(), expect, rtol=1e-6)
    other = model_from({"arch": "depth_trend"})
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(gathers(1)), model(gathers(1)))


def test_inversionnet_shape_range_and_gradients():
    model = model_from(
        {"arch": "inversionnet", "width": 2, "time_samples": 256, "v_min": 1.5, "v_max": 4.5}
    )
    x = gathers(2)
    y = model(x)
    assert y.shape == (2, 300, 1259) and y.min() >= 1.5 and y.max() <= 4.5
    y.mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.encoder[0][0].weight.grad.abs().sum() > 0
    p = model.predict(x, tta=True)
    assert p.shape == (2, 300, 1259)


# ----------------------------------------------------------------------------- config, FLOPs, CLI


def test_config_validation(tiny_cfg):
    with pytest.raises(ConfigError, match="variant 'typo'.*unknown key.*splt_at"):
        parse_variant(tiny_cfg(splt_at=3), "variant 'typo'")
    with pytest.raises(ConfigError, match="split_at"):
        model_from(tiny_cfg(split_at=5))
    with pytest.raises(ConfigError, match="channel_heads"):
        model_from(tiny_cfg(channel_heads=5))
    with pytest.raises(ConfigError, match="arch"):
        model_from({"arch": "resnet"})
    with pytest.raises(ConfigError, match="split_at"):
        model_from({"arch": "eva_fusion", "backbone": "x"})  # required for eva_fusion
    with pytest.raises(ConfigError, match="width"):
        model_from({"arch": "inversionnet", "width": 0})  # a model-side check
    # per-variant training overrides pass through untouched
    m = model_from(tiny_cfg(train={"lr": 3e-4}, profile="default"), meta=True)
    assert isinstance(m.variant, EvaFusionVariant) and m.variant.img_size == 56
    assert "train" not in m.variant.model_dict() and "profile" not in m.variant.model_dict()
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        load_params(PARAMS).variant("nope")


def test_checkpoint_record_rebuilds_the_network(tiny_cfg):
    model = model_from(tiny_cfg(fusion="single", fusion_heads=None))
    record = model.variant.model_dict()
    assert all(
        isinstance(v, (str, int, float, bool, dict, list, type(None))) for v in record.values()
    )
    rebuilt = model_from(record)
    assert rebuilt.variant == model.variant
    rebuilt.load_state_dict(model.state_dict())  # same architecture, same keys and shapes
    # earlier records: the params.yaml entry itself, or the fully resolved mapping
    old = {**tiny_cfg(fusion="single", fusion_heads=None), "profile": "default", "train": {}}
    assert model_from(old).variant.model_dict() == record
    # typed variants are used as they are; bounds default to the challenge's range
    trend = model_from(DepthTrendVariant())
    assert trend.variant == DepthTrendVariant() and (trend.v_min, trend.v_max) == (V_MIN, V_MAX)


def test_all_variants_in_params_build_on_meta():
    variants = load_params(PARAMS).variants
    profiles = {v.profile for v in variants.values()}
    assert profiles == {"default", "competition"}
    for name, v in variants.items():
        assert build_model(v, meta=True).variant is v, name


def test_forward_flops_meta_matches_real(tiny_cfg):
    cfg = tiny_cfg()
    real = forward_flops(model_from(cfg))
    meta = forward_flops(model_from(cfg, meta=True))
    # the meta count also sees the attention matmuls that CPU's fused kernel hides
    assert real > 0 and real <= meta < 1.2 * real


def test_model_summary_cli(capsys, tmp_path):
    assert cli.main(["model-summary", "tiny_dual42", "--json", "-", "--params", str(PARAMS)]) == 0
    info = json.loads(capsys.readouterr().out)  # '-': the JSON alone on standard output
    assert info == model_summary("tiny_dual42", load_params(PARAMS))
    model = model_from(load_params(PARAMS).variant("tiny_dual42"))
    assert info["params"]["total"] == count_parameters(model)["total"]
    assert (
        info["params"]["backbone"] + info["params"]["fusion"] + info["params"]["head"]
        == info["params"]["total"]
    )
    assert info["input_shape"] == [1, 5, 10001, 31] and info["output_shape"] == [1, 300, 1259]
    assert info["forward_flops_per_sample"] > 1e8
    out = tmp_path / "summary.json"
    argv = ["model-summary", "baseline_inversionnet", "--params", str(PARAMS)]
    assert cli.main([*argv, "--json", str(out)]) == 0
    assert "total" in capsys.readouterr().out  # the table, and the JSON in the file
    assert json.loads(out.read_text())["arch"] == "inversionnet"
    assert cli.main(["model-summary", "no_such_variant", "--params", str(PARAMS)]) == 2
    assert "no_such_variant" in capsys.readouterr().err


def test_the_median_of_two_is_their_mean_bit_for_bit_and_of_more_the_middle():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.rand(3, 300, 1259, generator=g) * 3 + 1.5 for _ in range(3))
    sorted_two = torch.sort(torch.stack([a, b]), dim=0).values
    assert torch.equal(_median([a, b]), 0.5 * (sorted_two[0] + sorted_two[1]))
    assert torch.equal(_median([a, b, c]), torch.median(torch.stack([a, b, c]), dim=0).values)
    assert _median([a]) is a
