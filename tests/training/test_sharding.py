"""A process's share of the global batch: strided rows, noise cut from the global draw, sharded samplers.

Every check compares the shards of 2 or 3 processes, put back together in global order, with what
one process draws for the whole batch.
"""

import numpy as np
import pytest
import torch

from fastcnf.cnf.divergence import make_estimator
from fastcnf.training.data import DataError, ToyDataset, ToySampler, load_digits
from fastcnf.training.sharding import (
    DistributedEpochSampler,
    Shard,
    ShardedSampler,
    draw_rows,
    local_batch_size,
    shard_draws,
    sharded_sampler,
)


def _interleave(parts):
    """Rows of the shards ``parts`` (rank order) back in global order."""
    total = sum(part.shape[0] for part in parts)
    out = torch.empty((total,) + tuple(parts[0].shape[1:]), dtype=parts[0].dtype)
    for rank, part in enumerate(parts):
        out[rank::len(parts)] = part
    return out


def test_shard_takes_strided_rows_and_checks_its_rank():
    rows = torch.arange(7)
    assert Shard(1, 3).take(rows).tolist() == [1, 4]
    assert Shard(0, 3).count(7) == 3 and Shard(2, 3).count(7) == 2
    assert Shard().take(rows) is rows and Shard().whole
    with pytest.raises(ValueError, match=r"rank must lie in \[0, 2\), got 2"):
        Shard(2, 2)
    with pytest.raises(TypeError, match="size must be an int"):
        Shard(0, 2.0)


@pytest.mark.parametrize("name", ["hutchinson-gaussian", "hutchinson-rademacher", "fd-gaussian"])
@pytest.mark.parametrize("size,global_rows", [(2, 6), (3, 7)])
def test_noise_of_each_shard_is_its_rows_of_the_global_draw(name, size, global_rows):
    estimator = make_estimator(name)
    torch.manual_seed(0)
    estimator.resample(torch.zeros(global_rows, 3))
    whole, whole_state = estimator.noise.clone(), torch.get_rng_state()
    parts = []
    for rank in range(size):
        shard = Shard(rank, size)
        torch.manual_seed(0)
        with shard_draws(shard, global_rows):
            estimator.resample(torch.zeros(shard.count(global_rows), 3))
        parts.append(estimator.noise.clone())
        assert torch.equal(torch.get_rng_state(), whole_state)  # every process stays on the same stream
    assert torch.equal(_interleave(parts), whole)


def test_states_of_another_size_draw_their_own_noise():
    torch.manual_seed(0)
    expected = torch.randn(5, 2)
    torch.manual_seed(0)
    with shard_draws(Shard(1, 2), 8):
        drawn = draw_rows(torch.randn_like, torch.zeros(5, 2))  # not this shard's 4 rows of 8
    assert torch.equal(drawn, expected)


def test_sharded_toy_sampler_together_draws_the_single_process_batch():
    single = ToySampler("moons", 12, seed=4)
    ranks = [ShardedSampler(ToySampler("moons", 12, seed=4), Shard(rank, 3)) for rank in range(3)]
    for _ in range(3):
        parts = [sampler.next() for sampler in ranks]
        assert all(part.shape == (4, 2) for part in parts)
        assert torch.equal(_interleave(parts), single.next())
    state = ranks[0].state_dict()
    again = ShardedSampler(ToySampler("moons", 12, seed=99), Shard(0, 3))
    again.load_state_dict(state)
    assert torch.equal(again.next(), ranks[0].next())


def _noisy(batch, rng):
    return batch + rng.random(batch.shape)


@pytest.mark.parametrize("size", [2, 3])
def test_distributed_epoch_sampler_is_independent_of_the_number_of_processes(size):
    array = np.arange(23 * 2, dtype=np.float64).reshape(23, 2)
    single = DistributedEpochSampler(array, 6, seed=5, shard=Shard(), transform=_noisy)
    ranks = [DistributedEpochSampler(array, 6, seed=5, shard=Shard(rank, size), transform=_noisy)
             for rank in range(size)]
    seen = []
    for _ in range(7):  # 3 batches per epoch (23 rows, tail dropped): crosses two epoch boundaries
        expected = single.next()
        parts = [sampler.next() for sampler in ranks]
        assert torch.equal(_interleave(parts), expected)
        seen.append(np.floor(expected[:, 0].numpy() / 2).astype(int))
    epoch = np.concatenate(seen[:3])
    assert len(set(epoch)) == 18 and epoch.min() >= 0 and epoch.max() < 23  # each row at most once per epoch
    assert not np.array_equal(np.sort(epoch), np.sort(np.concatenate(seen[3:6])))  # reshuffled, other tail dropped
    resumed = DistributedEpochSampler(array, 6, seed=5, shard=Shard(1, size), transform=_noisy)
    resumed.load_state_dict(ranks[1].state_dict())
    assert torch.equal(resumed.next(), ranks[1].next())


def test_sharded_sampler_picks_the_sampler_of_the_dataset():
    digits = load_digits(seed=0)
    sampler = sharded_sampler(digits, 8, 0, Shard(1, 2))
    assert isinstance(sampler, DistributedEpochSampler) and sampler.next().shape == (4, 64)
    toy = sharded_sampler(ToyDataset("rings"), 8, 0, Shard(1, 2))
    assert isinstance(toy, ShardedSampler) and toy.next().shape == (4, 2)


def test_the_global_batch_must_split_evenly():
    assert local_batch_size(12, Shard(1, 3)) == 4
    with pytest.raises(DataError, match="batch size 10 is the global batch of all 3 processes and must be divisible"):
        sharded_sampler(ToyDataset("rings"), 10, 0, Shard(0, 3))
    with pytest.raises(DataError, match="batch size 30 exceeds the 23 training rows"):
        DistributedEpochSampler(np.zeros((23, 2)), 30, 0, Shard(0, 2))
