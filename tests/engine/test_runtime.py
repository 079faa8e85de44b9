"""Where a training runs, decided once (speedstructure.engine.runtime): placement, the seed rule."""

from __future__ import annotations

import torch

from speedstructure.engine.runtime import Dist, place, training_seed


def test_the_seed_rule_shares_the_weights_and_gives_each_rank_its_draws():
    rank3 = Dist(rank=3, world=4)
    assert training_seed(7, rank3, weights=True) == 7  # identical initial weights on every rank
    assert training_seed(7, rank3, weights=False) == 10  # its own flips, padding, dropout
    assert training_seed(7, Dist(), weights=False) == training_seed(7, Dist(), weights=True)


def test_place_decides_the_ranks_the_device_and_the_threads(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    before = torch.get_num_threads()
    try:
        p = place("cpu", 1)
        assert (p.ranks.world, p.ranks.rank, p.device.type, p.threads) == (1, 0, "cpu", 1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
