"""The precision rule (CPU float32, CUDA bfloat16) and Muon's own orthogonalisation, which
must be torch's in bfloat16 and agree with it in float32."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, _zeropower_via_newtonschulz

from speedstructure.config.schema import TrainConfig
from speedstructure.engine import runtime
from speedstructure.engine.optim import Muon, MuonAdamW, build_optimizer, orthogonalize
from speedstructure.errors import UserError

COEFFS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# the shapes of the tiny models' Muon matrices (and one wide, one tall)
SHAPES = [(192, 192), (576, 192), (768, 192), (192, 768), (300, 192), (8, 16)]


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_orthogonalisation_is_torchs_bit_for_bit(shape):
    g = torch.Generator().manual_seed(sum(shape))
    grad = torch.randn(shape, generator=g)
    ours = orthogonalize(grad, COEFFS, 5, 1e-7, torch.bfloat16)
    theirs = _zeropower_via_newtonschulz(grad, COEFFS, 5, 1e-7)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_orthogonalisation_agrees_with_bf16_within_its_rounding(shape):
    g = torch.Generator().manual_seed(7 + sum(shape))
    grad = torch.randn(shape, generator=g)
    fp32 = orthogonalize(grad, COEFFS, 5, 1e-7, torch.float32)
    bf16 = _zeropower_via_newtonschulz(grad, COEFFS, 5, 1e-7).float()
    assert fp32.dtype == torch.float32 and fp32.shape == grad.shape
    # bf16 keeps 8 significant bits (relative rounding 2**-8 = 0.0039 per operation); five
    # iterations of three products accumulate a few of those, entry by entry
    scale = bf16.abs().max()
    assert (fp32 - bf16).abs().max() <= 0.05 * scale
    assert torch.linalg.norm(fp32 - bf16) / torch.linalg.norm(bf16) < 0.02
    # and it is what it claims: the singular values move to about 0.5-1.5 (by design; the
    # few smallest of a random matrix need more than five iterations)
    s = torch.linalg.svdvals(fp32.double())
    assert float(s.max()) < 1.6 and float(((s > 0.5) & (s < 1.5)).double().mean()) > 0.9


def test_orthogonalisation_leaves_its_input_alone():
    grad = torch.randn(16, 8)
    kept = grad.clone()
    orthogonalize(grad, COEFFS, 5, 1e-7, torch.float32)
    assert torch.equal(grad, kept)
    with pytest.raises(ValueError, match="2-D"):
        orthogonalize(torch.randn(2, 3, 4), COEFFS, 5, 1e-7)


def _three_steps(opt_factory, nesterov: bool) -> torch.Tensor:
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(48, 24))
    opt = opt_factory([p], nesterov=nesterov)
    for k in range(3):
        p.grad = torch.randn(48, 24, generator=torch.Generator().manual_seed(k))
        opt.step()
    return p.detach().clone()


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_in_bf16_steps_exactly_as_torchs(nesterov):
    kw = {"lr": 0.02, "weight_decay": 0.01, "adjust_lr_fn": "original"}
    ours = _three_steps(lambda ps, **k: Muon(ps, ns_dtype=torch.bfloat16, **kw, **k), nesterov)
    theirs = _three_steps(lambda ps, **k: torch.optim.Muon(ps, **kw, **k), nesterov)
    assert torch.equal(ours, theirs)
    fp32 = _three_steps(lambda ps, **k: Muon(ps, ns_dtype=torch.float32, **kw, **k), nesterov)
    assert not torch.equal(fp32, theirs)  # the precision is really switched ...
    assert torch.allclose(fp32, theirs, atol=2e-3)  # ... and the steps agree within bf16


def test_the_precision_rule_cpu_fp32_cuda_bf16():
    assert runtime.muon_dtype("auto", CPU) == torch.float32
    assert runtime.muon_dtype("auto", CUDA) == torch.bfloat16
    assert runtime.muon_dtype("fp32", CUDA) == torch.float32
    assert runtime.muon_dtype("bf16", CPU) == torch.bfloat16  # forced (benchmarks)
    with pytest.raises(UserError, match="muon_precision"):
        runtime.muon_dtype("fp8", CPU)
    assert runtime.native_bf16(CUDA)


def test_the_training_optimizer_follows_the_device():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    opt = build_optimizer(model, TrainConfig(), muon_names={"0.weight"})
    assert isinstance(opt, MuonAdamW) and isinstance(opt.muon, Muon)
    assert opt.muon.ns_dtype == torch.float32  # the model is on the CPU
    cuda_opt = build_optimizer(model, TrainConfig(), muon_names={"0.weight"}, device=CUDA)
    assert cuda_opt.muon.ns_dtype == torch.bfloat16
    forced = build_optimizer(model, TrainConfig(muon_precision="bf16"), muon_names={"0.weight"})
    assert forced.muon.ns_dtype == torch.bfloat16


def test_a_cpu_capped_to_avx2_has_no_native_bf16(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_capability", lambda: "AVX2")
    assert not runtime.native_bf16(CPU)
    monkeypatch.setattr(runtime, "cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert runtime.native_bf16(CPU)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not runtime.native_bf16(CPU)  # AVX-512 without BF16 or AMX emulates bf16


def test_bf16_on_a_cpu_without_it_is_one_warning_naming_the_cost(monkeypatch, caplog):
    monkeypatch.setattr(runtime, "cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(runtime, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="speedstructure.engine"):
        assert runtime.amp_dtype("bf16", CPU) == torch.bfloat16
        runtime.amp_dtype("bf16", CPU)  # once per process
        assert runtime.amp_dtype("none", CPU) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "train.amp bf16" in lines[0] and "AVX2" in lines[0] and "20-40x slower" in lines[0]


def test_amp_auto_is_bf16_only_where_it_is_native(monkeypatch, caplog):
    """``amp: auto`` autocasts to bf16 on CUDA and on a CPU with native bf16, and keeps
    float32 (no autocast, no warning) on a CPU that would emulate it."""
    monkeypatch.setattr(runtime, "_warned", set())
    monkeypatch.setattr(runtime, "cpu_capability", lambda: "AVX2")
    with caplog.at_level(logging.WARNING, logger="speedstructure.engine"):
        assert runtime.amp_dtype("auto", CPU) is None
    assert caplog.records == []
    assert runtime.precision_record("auto", "auto", CPU)["amp_dtype"] == "float32"
    monkeypatch.setattr(runtime, "cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert runtime.amp_dtype("auto", CPU) == torch.bfloat16
    assert runtime.precision_record("auto", "auto", CPU)["amp_dtype"] == "bfloat16"
    assert runtime.amp_dtype("auto", CUDA) == torch.bfloat16
    with pytest.raises(UserError, match="train.amp must be one of none, auto, bf16, fp16"):
        runtime.amp_dtype("fp8", CPU)


def test_the_run_records_its_precision(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_capability", lambda: "AVX2")
    rec = runtime.precision_record("none", "auto", CPU)
    assert rec == {
        "device": "cpu",
        "cpu_capability": "AVX2",
        "native_bf16": "false",
        "amp_dtype": "float32",
        "muon_dtype": "float32",
    }


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_on_cuda_the_orthogonalisation_is_torchs_bit_for_bit(shape):
    g = torch.Generator(device=CUDA).manual_seed(sum(shape))
    grad = torch.randn(shape, generator=g, device=CUDA)
    ours = orthogonalize(grad, COEFFS, 5, 1e-7, runtime.muon_dtype("auto", CUDA))
    theirs = _zeropower_via_newtonschulz(grad, COEFFS, 5, 1e-7)
    assert ours.device.type == "cuda" and torch.equal(ours, theirs)
