"""Tests of the profile switch (speedstructure.config.profiles) on copies of the real
params.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from speedstructure import cli
from speedstructure.config.load import load_params
from speedstructure.config.profiles import differences, profile_names, switch
from speedstructure.config.typed import ConfigError
from support import ROOT

REAL = ROOT / "params.yaml"
PROFILE_KEYS = {"runs", "ensemble", "tune", "profile"}  # the top-level keys a switch may touch


@pytest.fixture
def params_copy(tmp_path) -> Path:
    p = tmp_path / "params.yaml"
    shutil.copyfile(REAL, p)
    return p


def _load(p: Path) -> dict:
    return yaml.safe_load(p.read_text())


def _comment_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip().startswith("#")]


def _normalized(text: str) -> list[str]:
    """Lines with runs of whitespace collapsed (the layout of the tokens, not the padding)."""
    return [" ".join(ln.split()) for ln in text.splitlines() if ln.strip()]


# --------------------------------------------------------------------------- switching


def test_switch_to_competition(params_copy):
    original_text = params_copy.read_text()
    before = _load(params_copy)
    assert before["profile"] != "competition"
    comp = before["profiles"]["competition"]

    changed = switch("competition", params_copy)
    assert set(changed) >= {"runs", "tune.n_trials", "profile"}
    text = params_copy.read_text()
    after = _load(params_copy)

    assert after["profile"] == "competition"
    assert after["runs"] == comp["runs"] != before["runs"]
    for k, v in comp["ensemble"].items():
        assert after["ensemble"][k] == v
    assert after["ensemble"] != before["ensemble"]
    assert after["tune"]["n_trials"] == comp["tune"]["n_trials"] != before["tune"]["n_trials"]
    # the rest of tune, and every unrelated section, is untouched
    assert {k: v for k, v in after["tune"].items() if k != "n_trials"} == {
        k: v for k, v in before["tune"].items() if k != "n_trials"
    }
    for key in set(before) - PROFILE_KEYS:
        assert after[key] == before[key], key
    assert set(after) == set(before)
    for key in ("variants", "train", "synth", "profiles", "folds", "mlflow", "data"):
        assert after[key] == before[key]

    # comments are kept: every full-line comment, and distinctive end-of-line ones
    assert _comment_lines(text) == _comment_lines(original_text)
    for c in (
        "# K-Means clusters of the velocity-model features (seed: 6)",
        "# learning rate of the Muon group; null = lr",
        "# hand-set weights, for comparison (the seed's: 0.8 dual42, 0.3 single4)",
        "# Optuna TPE trials per study (3 studies per fold: two halves + the whole fold)",
        "# ---------------------------------------------------------------- training runs",
        "#   competition: the seed's 1st-place setup: EVA02-Large at 560 px "
        "(fetched weights, GPU),",
    ):
        assert c in text, c
    # the profile definitions are written out in full, not as YAML anchors/aliases,
    # and lines outside the switched keys keep their tokens (e.g. `null` stays `null`)
    assert "&id" not in text and "*id" not in text
    assert text.count(": null") == original_text.count(": null")
    start = original_text.index("\nprofiles:")
    assert text[text.index("\nprofiles:") :].rstrip("\n") == original_text[start:].rstrip("\n")
    assert (
        text[: text.index("\nruns:")].replace("profile: competition", "profile: default", 1)
        == original_text[: original_text.index("\nruns:")]
    )

    assert differences(after, "competition") == []
    assert "runs" in differences(after, "default")
    typed = load_params(params_copy)  # the typed params agree with the raw mapping
    assert typed.profile == "competition" and differences(typed, "competition") == []
    assert "runs" in differences(typed, "default")


def test_switch_back_restores_the_original(params_copy):
    original_text = params_copy.read_text()
    original = _load(params_copy)
    active = original["profile"]
    other = next(n for n in profile_names(original) if n != active)
    switch(other, params_copy)
    assert _load(params_copy) != original
    changed = switch(active, params_copy)
    assert "profile" in changed and "runs" in changed
    restored = _load(params_copy)
    assert restored == original
    assert differences(restored, active) == []
    # the text too, up to the padding before end-of-line comments
    assert _normalized(params_copy.read_text()) == _normalized(original_text)


def test_switch_to_the_active_profile_changes_nothing(params_copy):
    active = _load(params_copy)["profile"]
    original = params_copy.read_bytes()
    assert switch(active, params_copy) == []
    assert params_copy.read_bytes() == original


def test_unknown_profile_is_an_error(params_copy):
    original = params_copy.read_bytes()
    with pytest.raises(ConfigError, match="no profile 'gpu-monster'") as ei:
        switch("gpu-monster", params_copy)
    assert "competition" in str(ei.value) and "default" in str(ei.value)  # lists the choices
    assert params_copy.read_bytes() == original
    with pytest.raises(ConfigError, match="no profile 'nope'"):
        differences(_load(params_copy), "nope")


def test_cli_profile(params_copy, monkeypatch, capsys):
    monkeypatch.chdir(params_copy.parent)
    active = _load(params_copy)["profile"]
    assert cli.main(["profile"]) == 0
    assert f"profile: {active} (params.yaml agrees)" in capsys.readouterr().out
    assert cli.main(["profile", "competition"]) == 0
    assert "tune.n_trials" in capsys.readouterr().out
    assert _load(params_copy)["profile"] == "competition"
    # a hand edit that disagrees with the active profile is reported (exit 1)
    params_copy.write_text(params_copy.read_text().replace("n_trials: 200 ", "n_trials: 7 ", 1))
    assert _load(params_copy)["tune"]["n_trials"] == 7
    assert cli.main(["profile"]) == 1
    assert "differs in tune.n_trials" in capsys.readouterr().out
    assert cli.main(["profile", "nope"]) == 2
    assert "no profile 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------ the repository's params.yaml


@pytest.fixture(scope="module")
def real() -> dict:
    return _load(REAL)


def test_real_params_active_profile_agrees(real):
    assert real["profile"] in profile_names(real)
    assert set(profile_names(real)) >= {"default", "competition"}
    assert differences(real, real["profile"]) == []
    typed = load_params(REAL)
    assert profile_names(typed) == profile_names(real)
    assert differences(typed, typed.profile) == []


def test_real_params_profiles_are_consistent(real):
    variants = real["variants"]
    n_folds = int(real["folds"]["n_folds"])
    for name, prof in real["profiles"].items():
        runs = prof["runs"]
        assert runs, name
        for key, run in runs.items():
            assert run["variant"] in variants, (name, key)
            assert 0 <= int(run["fold"]) < n_folds, (name, key)
        members = prof["ensemble"]["variants"]
        assert members, name
        run_variants = {r["variant"] for r in runs.values()}
        for v in members:
            assert v in variants, (name, v)
            assert v in run_variants, f"profile {name}: ensemble variant {v} has no run"
            assert variants[v].get("profile") == name, (name, v)
        for v in prof["ensemble"].get("hand_weights") or {}:
            assert v in members, (name, v)
        # a profile's models are its own group of variants (baselines are shared)
        for v in run_variants:
            assert variants[v].get("profile") in (name, "default"), (name, v)
