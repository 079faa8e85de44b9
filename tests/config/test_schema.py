"""The typed configuration: defaults agree with params.yaml, errors name the key."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import yaml

from speedstructure.config.load import load_params, parse_params, parse_variant
from speedstructure.config.schema import (
    SECTIONS,
    V_MAX,
    V_MIN,
    EvaFusionVariant,
    Params,
    TrainConfig,
)
from speedstructure.config.typed import ConfigError, as_plain
from support import ROOT

SHIPPED = yaml.safe_load((ROOT / "params.yaml").read_text())


def _raw(**changes) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    return raw


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_code_defaults_are_the_shipped_params_and_every_key_is_written_out(section):
    cls = SECTIONS[section]
    assert getattr(load_params(ROOT / "params.yaml"), section) == cls()
    assert set(SHIPPED[section]) == {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("profile", ["default", "competition"])
def test_both_profiles_load_and_agree_with_the_code_defaults(profile, tmp_path):
    from speedstructure.config.profiles import switch

    path = tmp_path / "params.yaml"
    shutil.copy2(ROOT / "params.yaml", path)
    switch(profile, path)
    params = load_params(path)
    raw = yaml.safe_load(path.read_text())
    set_by_profile = set(raw["profiles"][profile])
    for section, cls in SECTIONS.items():
        value = as_plain(getattr(params, section))
        if section in set_by_profile:  # the profile's own values, the rest the defaults
            expected = {**as_plain(cls()), **as_plain(raw["profiles"][profile][section])}
        else:
            expected = as_plain(cls())
        assert value == expected, section
    assert set(params.runs) == set(raw["profiles"][profile]["runs"])
    for key, run in params.runs.items():
        assert params.variant(run.variant).profile in (profile, None) or run.variant.startswith(
            "baseline"
        ), key


def test_competition_variants_train_with_their_own_recipe():
    params = load_params(ROOT / "params.yaml")
    t = params.train_for("comp_s10_dual42")
    assert (t.lr, t.batch_size, t.amp, t.T_0, t.epochs, t.cosine_epochs) == (
        1e-4,
        1,
        "bf16",
        100,
        30,
        25,
    )
    assert params.train_for("tiny_dual42") == params.train  # no overrides


# The seed's training recipe (MuonWithAuxAdam, EMA, cosine-then-constant schedule, batch 1,
# bf16): every training key of every competition variant, pinned.  A key added to
# TrainConfig must be placed in one of the two groups below.
SEED_RECIPE = {
    "lr": 1e-4,
    "muon_lr": None,  # Muon and Adam share lr 1e-4
    "muon_adjust_lr": "original",  # Keller Jordan's scaling: max(1, rows / cols) ** 0.5
    "weight_decay": 0.01,
    "momentum": 0.95,
    "nesterov": True,
    "betas": (0.9, 0.95),
    "eps": 1e-10,  # MuonWithAuxAdam's Adam default
    "clip": 3.0,
    "amp": "bf16",
    "ema_decay": 0.99,
    "T_0": 100,
    "min_lr": 5e-5,
    "cosine_epochs": 25,
    "const_factor": 0.02,
    "epochs": 30,
    "batch_size": 1,
    "accum_steps": 1,  # the seed declared 2 and never applied it
    "patience": 5,
    "flip_prob": 0.5,
    "lateral_weight": 0.0,  # MAPE alone: the seed had no lateral term
}
NOT_RECIPE = {  # how and where it runs, not what it learns
    "val_batch_size": 16,
    "num_workers": 4,
    "seed": 42,
    "tta_val": False,
    "device": "auto",
    "progress": True,
    "ddp_find_unused": False,
    "grad_checkpointing": False,
    "threads": None,
    "muon_precision": "auto",  # bf16 on CUDA, as the seed ran (engine/test_precision.py)
    "cache_inputs": False,
}
COMPETITION = ("comp_s10_dual42", "comp_s10_dual22", "comp_s9_dual44", "comp_s10_single4")


@pytest.mark.parametrize("name", COMPETITION)
def test_competition_variants_pin_every_training_key_to_the_seed_recipe(name):
    params = load_params(ROOT / "params.yaml")
    assert sorted(k for k, v in params.variants.items() if v.profile == "competition") == sorted(
        COMPETITION
    )
    t = as_plain(params.train_for(name))
    assert set(SEED_RECIPE) | set(NOT_RECIPE) == set(t), "place new train keys in a group"
    assert {k: t[k] for k in SEED_RECIPE} == as_plain(SEED_RECIPE)
    assert {k: t[k] for k in NOT_RECIPE} == NOT_RECIPE
    # the optimizer really gets Keller's scaling
    import torch

    from speedstructure.engine.optim import build_optimizer

    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    opt = build_optimizer(net, params.train_for(name), muon_names={"0.weight"})
    assert opt.muon.param_groups[0]["adjust_lr_fn"] == "original"
    # on the seed's GPUs the orthogonalisation stays in bf16, torch's own arithmetic
    from speedstructure.engine.runtime import muon_dtype

    assert muon_dtype(params.train_for(name).muon_precision, torch.device("cuda")) == torch.bfloat16
    assert opt.adamw.param_groups[0]["eps"] == 1e-10
    # pretrained weights come from the local, DVC-tracked file (no hub at training time)
    v = params.variant(name)
    assert v.pretrained == f"{params.paths.weights}/{v.backbone}.safetensors"


def test_paths_resolve_against_the_root(tmp_path):
    params = parse_params(_raw(), root=tmp_path)
    assert params.path("folds_table") == tmp_path / "folds/folds.csv"
    assert params.zip_path("test") == tmp_path / "data/test.zip"
    assert params.run_dir("tiny_dual42", 1) == tmp_path / "models/tiny_dual42/fold_1"
    with pytest.raises(ConfigError, match="no key paths.nope"):
        params.path("nope")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train__lr": "fast"}, r"train\.lr must be a number, got 'fast'"),
        ({"train__epochs": 2.5}, r"train\.epochs must be an integer"),
        ({"train__progress": "yes"}, r"train\.progress must be true or false"),
        ({"train__lrr": 1.0}, r"train: unknown key\(s\) lrr"),
        ({"folds__k_groups": None}, r"folds\.k_groups must be an integer"),
        ({"train__amp": "fp8"}, r"train\.amp must be one of none, auto, bf16, fp16"),
        ({"synth__water_depth": [1, 2, 3]}, r"synth\.water_depth must be a list of 2 values"),
        (
            {"runs__x": {"variant": "nope", "fold": 0}},
            r"runs\.x\.variant names unknown variant 'nope'",
        ),
        ({"runs__x": {"variant": "tiny_dual42"}}, r"runs\.x: missing required key 'fold'"),
        ({"ensemble__variants": ["tiny_dual42", "tiny_dual42"]}, r"lists a variant twice"),
        ({"ensemble__variants": ["ghost"]}, r"ensemble\.variants names unknown variant 'ghost'"),
        ({"tune__n_trials": 0}, r"tune\.n_trials must be >= 1"),
        ({"tune__weights": "median"}, r"tune\.weights must be one of auto, best_single"),
        ({"variants__tiny_mean__fusion": "max"}, r"variants\.tiny_mean\.fusion must be one of"),
        ({"variants__tiny_mean__width": 8}, r"variants\.tiny_mean: unknown key\(s\) width"),
        (
            {"variants__tiny_mean__train": {"lr": "x"}},
            r"variants\.tiny_mean\.train\.lr must be a number",
        ),
        ({"variants__bad": {"arch": "unet"}}, r"variants\.bad\.arch must be one of"),
        (
            {"variants__bad": {"arch": "eva_fusion", "split_at": 2}},
            r"missing required key 'backbone'",
        ),
        ({"data__zips": {"train": "t.zip"}}, r"data\.zips must name the splits"),
        ({"bogus": 1}, r"unknown top-level key\(s\) bogus"),
    ],
)
def test_errors_name_the_key(changes, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        parse_params(_raw(**changes), root=tmp_path)


def test_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="parameter file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_params(bad)
    assert "\n" not in str(err.value)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(bad)


def test_a_variant_record_round_trips_and_bounds_come_from_one_place():
    params = load_params(ROOT / "params.yaml")
    v = params.variant("tiny_dual42")
    assert isinstance(v, EvaFusionVariant) and (v.v_min, v.v_max) == (V_MIN, V_MAX)
    again = parse_variant(v.model_dict())
    assert again.model_dict() == v.model_dict()
    assert "train" not in v.model_dict() and "profile" not in v.model_dict()


def test_params_are_frozen():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.lr = 1.0  # type: ignore[misc]
    assert dataclasses.replace(params.train, lr=1.0) != TrainConfig()
