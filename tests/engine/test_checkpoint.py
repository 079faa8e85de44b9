"""Tests of speedstructure.engine.checkpoint: checkpoint files, TrainState, fingerprints."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from speedstructure.config.load import parse_variant
from speedstructure.config.schema import TrainConfig
from speedstructure.engine import checkpoint as C
from speedstructure.engine.runtime import Dist
from speedstructure.errors import UserError
from support import model_from, random_velocity


class _Unsafe:
    """Something ``torch.load(weights_only=True)`` refuses to unpickle."""


class _Rows:
    def __init__(self, ids):
        self.sample_ids = list(ids)

    def __len__(self) -> int:
        return len(self.sample_ids)


def _unreadable(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    unsafe = tmp_path / "unsafe.pt"
    with open(unsafe, "wb") as fh:
        torch.save({"x": _Unsafe()}, fh, pickle_module=pickle)
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    return [tmp_path / "missing.pt", garbage, truncated, unsafe, listed]


def test_load_checkpoint_failures_are_one_line_user_errors(tmp_path):
    for path in _unreadable(tmp_path):
        with pytest.raises(UserError) as ei:
            C.load_checkpoint(path)
        msg = str(ei.value)
        assert msg.startswith(f"{path}: not a readable checkpoint ("), msg
        assert "\n" not in msg and "weights_only" not in msg, msg


def test_save_checkpoint_is_atomic_and_loads(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    C.save_checkpoint({"model": {"w": torch.arange(3.0)}, "epoch": 2}, path)
    ck = C.load_checkpoint(path)
    assert ck["epoch"] == 2 and torch.equal(ck["model"]["w"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]  # no temporary left behind


def test_train_state_round_trip(tmp_path):
    st = C.TrainState(
        fingerprint={"train": {"lr": 1e-3}},
        epoch=3,
        opt_steps=12,
        best_val_mape=0.1,
        best_epoch=2,
        history=[{"epoch": 1}],
        finished=True,
        stop_reason="epochs",
        model={"w": torch.ones(2)},
        rng=[{"torch": torch.get_rng_state()}],
    )
    st.save(tmp_path / C.LAST_NAME)
    raw = C.load_checkpoint(tmp_path / C.LAST_NAME)
    assert raw["format"] == C.CHECKPOINT_FORMAT and raw["opt_steps"] == 12
    back = C.TrainState.load(tmp_path / C.LAST_NAME)
    assert back.epoch == 3 and back.history == [{"epoch": 1}] and back.stop_reason == "epochs"
    assert torch.equal(back.model["w"], torch.ones(2)) and back.ema is None
    # an earlier baseline last.pt had fewer entries: the rest take their defaults
    old = C.TrainState.from_dict({"format": 1, "epoch": 1, "finished": True, "fingerprint": {}})
    assert old.opt_steps == 0 and old.best_val_mape == math.inf and old.scaler is None


def test_record_epoch_best_patience_and_stop():
    st = C.TrainState()
    rows = [0.5, 0.4, 0.45, 0.41, 0.39]
    flags = []
    for i, v in enumerate(rows, 1):
        row = {"epoch": i, "train_loss": 1.0, "val_mape": v, "lr": 0.1, "seconds": 1.0}
        flags.append(st.record_epoch(row, has_val=True, patience=2, epochs=10))
        if st.finished:
            break
    assert flags == [True, True, False, False] and st.stop_reason == "early_stop"
    assert (st.best_epoch, st.best_val_mape, st.bad_epochs, st.epoch) == (2, 0.4, 2, 4)
    assert st.seconds == 4.0 and len(st.history) == 4
    # without a validation set every epoch's weights are the best there are
    st = C.TrainState()
    row = {"epoch": 1, "train_loss": 1.0, "val_mape": float("nan"), "lr": 0.1, "seconds": 1.0}
    assert st.record_epoch(row, has_val=False, patience=0, epochs=1)
    assert st.best_epoch == 1 and st.finished and st.stop_reason == "epochs"


def test_fingerprint_keys_and_old_variant_records(tiny_variant):
    raw = tiny_variant(profile="default", train={"lr": 1e-3})
    v = parse_variant(raw)
    cfg = TrainConfig()
    fp = C.fingerprint(cfg, v, _Rows(["b", "a"]), world=1)
    assert set(fp["train"]) == {
        f for f in TrainConfig.__dataclass_fields__ if f not in C.RESUME_FREE_KEYS
    }
    assert fp["variant"] == v.model_dict() and fp["n_train"] == 2 and fp["world_size"] == 1
    assert C.fingerprint(cfg, v, _Rows(["a", "b"]), 1) == fp  # order of samples is irrelevant
    assert C.fingerprint(TrainConfig(epochs=99, device="cpu"), v, _Rows("ab"), 1) == fp
    # a last.pt of the earlier engine recorded the params.yaml entry as written
    old = {**fp, "variant": {k: x for k, x in raw.items() if k != "train"}}
    assert C.fingerprint_diff(old, fp) == []
    changed = C.fingerprint(TrainConfig(lr=1.0), v, _Rows("abc"), 2)
    assert C.fingerprint_diff(fp, changed) == ["n_train", "train.lr", "train_ids", "world_size"]


def test_resume_state_refuses_or_discards_a_changed_run(tmp_path):
    fp = {"train": {"lr": 1.0}}
    assert C.resume_state(tmp_path, fp, restart_on_change=False, ranks=Dist()) is None
    C.TrainState(fingerprint=fp, epoch=2).save(tmp_path / C.LAST_NAME)
    (tmp_path / C.HISTORY_NAME).write_text("x")
    assert C.resume_state(tmp_path, fp, restart_on_change=False, ranks=Dist()).epoch == 2
    other = {"train": {"lr": 2.0}}
    with pytest.raises(UserError, match=r"last.pt: written with different settings \(train.lr\)"):
        C.resume_state(tmp_path, other, restart_on_change=False, ranks=Dist())
    assert C.resume_state(tmp_path, other, restart_on_change=True, ranks=Dist()) is None
    assert list(tmp_path.iterdir()) == []  # the state and what was derived from it are gone


def test_best_checkpoint_and_val_preds(tmp_path, tiny_variant):

    model = model_from(tiny_variant())
    ck = C.best_checkpoint(model.state_dict(), model.variant, TrainConfig(), 3, 0.25, {"fold": 1})
    C.save_checkpoint(ck, tmp_path / C.BEST_NAME)
    back = C.load_checkpoint(tmp_path / C.BEST_NAME)
    assert back["epoch"] == 3 and back["val_mape"] == 0.25 and back["meta"] == {"fold": 1}
    assert back["train"]["betas"] == [0.9, 0.95]
    rebuilt = model_from(back["variant"])
    rebuilt.load_state_dict(back["model"])
    assert rebuilt.variant == model.variant
    preds = random_velocity(np.random.default_rng(0), 2)
    C.save_val_preds(tmp_path / C.VAL_PREDS_NAME, ["s1", "s0"], preds)
    ids, arr = C.load_val_preds(tmp_path / C.VAL_PREDS_NAME)
    assert ids == ["s1", "s0"] and arr.dtype == np.float16
    np.testing.assert_array_equal(arr, preds.astype(np.float16))
    C.write_history(tmp_path / C.HISTORY_NAME, [{"epoch": 1, "train_loss": 0.5, "extra": 1}])
    assert (tmp_path / C.HISTORY_NAME).read_text().splitlines() == [
        "epoch,train_loss,val_mape,lr",  # no timings in a versioned file
        "1,0.5,,",
    ]
