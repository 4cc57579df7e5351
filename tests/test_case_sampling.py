"""Hard-case sampling: per-scan running losses, the weights they give, and the sampler drawing by them."""
import io

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from data.case_sampling import HardCaseSampling
from data.loaders import EpochSampler


def test_draws_are_uniform_until_a_loss_is_known():
    sampling = HardCaseSampling(["a", "b", "c", "d"], fraction=0.5)
    assert sampling.weights() == pytest.approx([0.25] * 4)
    sampling.end_epoch()                                     # an epoch without any finite loss changes nothing
    assert sampling.weights() == pytest.approx([0.25] * 4)


def test_weights_follow_the_losses_above_a_uniform_floor():
    sampling = HardCaseSampling(["easy", "hard", "negative", "unseen"], fraction=0.5)
    sampling.record(["easy", "hard"], [0.2, 1.0])
    sampling.record(["negative", "hard"], [0.0, float("nan")])   # a non-finite loss is ignored
    sampling.end_epoch()
    weights = sampling.weights()
    # losses 0.2, 1.0, 0.0 and, for the scan not drawn yet, the largest (1.0): sum 2.2
    assert weights == pytest.approx([0.125 + 0.5 * 0.2 / 2.2, 0.125 + 0.5 / 2.2, 0.125, 0.125 + 0.5 / 2.2])
    assert weights.sum() == pytest.approx(1.0)
    assert HardCaseSampling(["x", "y"], fraction=1.0).weights() == pytest.approx([0.5, 0.5])


def test_running_loss_averages_an_epoch_then_moves_halfway_to_the_next():
    sampling = HardCaseSampling(["a", "b"], fraction=1.0)
    sampling.record(["a", "a", "b"], [1.0, 3.0, 1.0])
    sampling.end_epoch()
    assert sampling.running == {"a": 2.0, "b": 1.0}
    sampling.record(["a"], [0.0])
    sampling.end_epoch()
    assert sampling.running == {"a": 1.0, "b": 1.0} and sampling.pending == []
    assert sampling.weights() == pytest.approx([0.5, 0.5])


def test_every_rank_folds_in_every_ranks_losses():
    mine, theirs = HardCaseSampling(["a", "b"], 1.0), [("b", 3.0)]
    mine.record(["a"], [1.0])
    mine.end_epoch(gather=lambda records: records + theirs)
    assert mine.running == {"a": 1.0, "b": 3.0}


def test_state_survives_a_checkpoint_loaded_with_weights_only():
    sampling = HardCaseSampling(["a", "b"], 0.5)
    sampling.record(["a"], [0.7])
    sampling.end_epoch()
    sampling.record(["b"], [0.3])                            # mid-epoch: not folded in yet
    buffer = io.BytesIO()
    torch.save(sampling.state_dict(), buffer)
    buffer.seek(0)
    restored = HardCaseSampling(["a", "b"], 0.5)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.running == sampling.running and restored.pending == [("b", 0.3)]
    assert restored.weights() == pytest.approx(sampling.weights())


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ValueError, match="hard case fraction must be in \\[0, 1\\]"):
        HardCaseSampling(["a"], fraction)


def _sampler(n, rank=0, world_size=1, seed=3):
    inner = DistributedSampler(list(range(n)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return EpochSampler(inner, case_ids=[f"{i:03d}" for i in range(n)])


def test_sampler_draws_scans_in_proportion_to_their_weights():
    sampler = _sampler(400)
    weights = np.zeros(400)
    weights[[7, 9]] = [0.75, 0.25]
    sampler.set_epoch(0, weights)
    drawn = [index for index, epoch in sampler]
    assert len(drawn) == 400 and set(drawn) == {7, 9}
    assert 0.65 < drawn.count(7) / 400 < 0.85
    sampler.set_epoch(0, weights)
    assert [index for index, _ in sampler] == drawn           # a function of (seed, epoch, weights): resumable
    sampler.set_epoch(1, weights)
    assert [index for index, _ in sampler] != drawn
    sampler.set_epoch(2)                                      # no weights: the shuffled pass, each scan once
    assert sorted(index for index, _ in sampler) == list(range(400))


def test_ranks_share_one_weighted_draw():
    weights = np.linspace(1, 2, 10)
    single = _sampler(10)
    single.set_epoch(4, weights)
    ranks = [_sampler(10, rank, 2) for rank in range(2)]
    for sampler in ranks:
        sampler.set_epoch(4, weights)
    orders = [[index for index, _ in sampler] for sampler in ranks]
    assert [index for pair in zip(*orders) for index in pair] == [index for index, _ in single]


def test_sampler_refuses_weights_of_another_length():
    with pytest.raises(ValueError, match="3 case weights for 5 scans"):
        _sampler(5).set_epoch(0, np.ones(3))


def test_positives_and_negatives_keep_their_share_of_the_draws():
    """Ranked against positives (whose loss has a Dice term) negatives would hardly be drawn: each stratum keeps
    its share, and the losses only move draws within it."""
    sampling = HardCaseSampling(["p1", "p2", "n1", "n2"], fraction=1.0, strata=[1, 1, 0, 0])
    sampling.record(["p1", "p2", "n1", "n2"], [3.0, 1.0, 0.03, 0.01])
    sampling.end_epoch()
    assert sampling.weights() == pytest.approx([0.375, 0.125, 0.375, 0.125])        # 3 : 1 within each half
    unranked = HardCaseSampling(["p1", "p2", "n1", "n2"], fraction=1.0)
    unranked.running = dict(sampling.running)
    assert unranked.weights()[2:].sum() < 0.02
    with pytest.raises(ValueError, match="3 strata for 4 scans"):
        HardCaseSampling(["p1", "p2", "n1", "n2"], 1.0, strata=[1, 1, 0])
