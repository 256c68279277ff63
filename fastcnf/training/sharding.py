"""A process's share of the global batch in multi-process training: its rows, its noise, its batches.

With ``size`` processes, the process of rank ``r`` holds the rows ``r, r + size, r + 2 size, ...``
of every global batch (``Shard.take``: ``rows[r::size]``). Everything random per sample is drawn
for the whole global batch, from a generator every process holds in the same state, and each
process keeps its rows. A sample's data and noise then depend on its position in the global
batch only, not on the number of processes, and every process makes the same draws, so the
shared random streams (torch's global generator, the toy samplers' generators) stay equal on all
processes and a checkpoint written by rank 0 resumes every rank.

    with shard_draws(shard, global_rows):      # the trainer wraps each iteration in this
        ...                                     # the divergence estimators draw through draw_rows

Samplers (``sharded_sampler``): the toy datasets draw the global batch and keep the shard's rows
(``ShardedSampler``); finite tables are sharded by ``torch.utils.data.DistributedSampler``
(``DistributedEpochSampler``), whose strided split makes the union of the ranks' batches the
batch a single-rank job with the same global batch size draws, for any number of ranks.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

from ..cnf.noise import noise_source
from .data import ArrayDataset, DataError

__all__ = ["Shard", "WHOLE", "shard_draws", "draw_rows", "ShardedSampler", "DistributedEpochSampler",
           "sharded_sampler", "local_batch_size"]


@dataclass(frozen=True)
class Shard:
    """Rows ``rank::size`` of a global batch."""

    rank: int = 0
    size: int = 1

    def __post_init__(self):
        for name in ("rank", "size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"shard {name} must be an int, got {value!r}.")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"shard rank must lie in [0, {self.size}), got {self.rank}.")

    @property
    def whole(self):
        """True for the shard of a single process (every row)."""
        return self.size == 1

    def take(self, rows):
        """This shard's rows of ``rows`` (a tensor or array with the global batch first)."""
        return rows if self.whole else rows[self.rank::self.size]

    def count(self, global_rows):
        """How many of ``global_rows`` rows this shard holds."""
        return len(range(self.rank, global_rows, self.size))


WHOLE = Shard()
_ACTIVE = []


@contextmanager
def shard_draws(shard, global_rows):
    """Inside the block ``draw_rows`` (and so every divergence estimator, through
    ``fastcnf.cnf.noise_source``) draws per-sample noise for ``global_rows`` rows and keeps ``shard``'s."""
    _ACTIVE.append((shard, int(global_rows)))
    try:
        with noise_source(draw_rows):
            yield
    finally:
        _ACTIVE.pop()


def draw_rows(draw, like):
    """``draw(template)`` -> noise shaped like ``like`` (rows first) for this process's rows.

    Outside ``shard_draws`` (or for a whole shard) this is ``draw(like)``. Inside, ``draw`` runs on a
    template of the global batch and the shard's rows are kept. A state whose row count is not the
    shard's share of the global batch (e.g. samples pushed through a flow) draws its own noise.
    """
    if not _ACTIVE:
        return draw(like)
    shard, global_rows = _ACTIVE[-1]
    if shard.whole or like.ndim == 0 or like.shape[0] != shard.count(global_rows):
        return draw(like)
    template = like.new_empty((global_rows,) + tuple(like.shape[1:]))
    return shard.take(draw(template)).contiguous()


def local_batch_size(batch_size, shard):
    """Rows per process of a global batch of ``batch_size``; it must split evenly."""
    if batch_size % shard.size:
        raise DataError(f"the batch size {batch_size} is the global batch of all {shard.size} processes and must be "
                        "divisible by their number.")
    return batch_size // shard.size


class ShardedSampler:
    """The shard's rows of the global batches of ``sampler`` (every process draws the global batch)."""

    def __init__(self, sampler, shard):
        self.sampler, self.shard = sampler, shard

    def next(self):
        return self.shard.take(self.sampler.next()).contiguous()

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)


class DistributedEpochSampler:
    """Shuffled mini-batches of a fixed array, split over processes by ``DistributedSampler``.

    Each epoch ``DistributedSampler`` (shuffled with ``seed + epoch``, tail dropped) gives this
    process its rows, taken ``batch_size // shard.size`` at a time; the union over processes of
    batch k is the batch k of a single process with the same global ``batch_size``.
    ``transform(batch, rng)`` (e.g. dequantization noise) runs on the global batch layout with a
    generator seeded by (seed, epoch, batch), so a row's noise depends on its global position
    only. The state is (epoch, batch) and is the same on every process.
    """

    def __init__(self, array, batch_size, seed, shard, transform=None):
        if batch_size > len(array):
            raise DataError(f"batch size {batch_size} exceeds the {len(array)} training rows.")
        self.array, self.batch_size, self.seed, self.shard = array, batch_size, seed, shard
        self.local_size = local_batch_size(batch_size, shard)
        self.transform = transform
        self.index = DistributedSampler(range(len(array)), num_replicas=shard.size, rank=shard.rank, shuffle=True,
                                        seed=seed, drop_last=True)
        self.epoch, self.batch = 0, 0
        self._rows = None

    def _epoch_rows(self):
        if self._rows is None:
            self.index.set_epoch(self.epoch)
            self._rows = np.fromiter(iter(self.index), dtype=np.int64)
        return self._rows

    def next(self):
        if (self.batch + 1) * self.local_size > len(self._epoch_rows()):
            self.epoch, self.batch, self._rows = self.epoch + 1, 0, None
        start = self.batch * self.local_size
        batch = self.array[self._epoch_rows()[start:start + self.local_size]]
        if self.transform is not None:
            batch = self._transformed(batch)
        self.batch += 1
        return torch.from_numpy(np.ascontiguousarray(batch)).float()

    def _transformed(self, batch):
        rng = np.random.default_rng([self.seed, self.epoch, self.batch])
        layout = np.zeros((self.batch_size,) + batch.shape[1:], dtype=batch.dtype)
        layout[self.shard.rank::self.shard.size] = batch
        return self.shard.take(self.transform(layout, rng))

    def state_dict(self):
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state):
        self.epoch, self.batch, self._rows = int(state["epoch"]), int(state["batch"]), None


def sharded_sampler(dataset, batch_size, seed, shard):
    """This process's batches of ``dataset`` for a global ``batch_size`` (see the module docstring)."""
    local_batch_size(batch_size, shard)
    if isinstance(dataset, ArrayDataset):
        return DistributedEpochSampler(dataset.train, batch_size, seed, shard, dataset.transform)
    return ShardedSampler(dataset.sampler(batch_size, seed), shard)
