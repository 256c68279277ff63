"""Data of block-wise JKO-iFlow training: a fixed pool of training points, batches of indices into
it, and the pool pushed forward through the trained blocks.

Block k trains on x_{k-1}, the pool after blocks 1..k-1. ``PushForwardCache`` holds it and is
advanced by one block when that block's stage ends, so an iteration never runs the earlier
blocks. The pushes run without gradients and draw their Hutchinson noise from a seed per block
(never from the training RNG), so recomputing the cache after a resume gives the same bits.
"""

from contextlib import contextmanager

import numpy as np
import torch

from ..cnf.jko import movement, relative_movement
from .data import ArrayDataset, DataError, EpochSampler, ToyDataset, toy_sample

__all__ = ["training_pool", "IndexSampler", "PushForwardCache", "POOL_STREAM"]

POOL_STREAM = 3  # child of numpy's SeedSequence(seed) drawing the pool (datasets use children 0-2)


def training_pool(dataset, size, seed):
    """The fixed training points (N, D) float32 of block-wise training.

    A 2-D toy gives ``size`` fresh draws from its own stream of ``seed``; a table or digits gives
    its training rows (digits dequantized once, with a fixed seed).
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(POOL_STREAM + 1)[POOL_STREAM])
    if isinstance(dataset, ToyDataset):
        points = toy_sample(dataset.name, size, rng)
    elif isinstance(dataset, ArrayDataset):
        points = dataset.train if dataset.transform is None else dataset.transform(dataset.train, rng)
    else:
        raise DataError(f"block-wise training needs a toy or array dataset, got {type(dataset).__name__}.")
    return torch.from_numpy(np.ascontiguousarray(points)).float()


class IndexSampler(EpochSampler):
    """Endless batches of row indices (int64) into a pool of ``size`` rows, reshuffled every epoch."""

    def __init__(self, size, batch_size, seed):
        if batch_size > size:
            raise DataError(f"batch size {batch_size} exceeds the {size} training points of the pool.")
        super().__init__(np.arange(size), batch_size, seed)

    def next(self):
        return torch.from_numpy(self.next_rows().astype(np.int64))


@contextmanager
def _seeded_rng(seed, device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class PushForwardCache:
    """The pool pushed through blocks 0..depth-1 of a flow, without gradients.

    Holds ``x`` (N, D) and ``delta_logp`` (N,) = -(sum of the blocks' integrated divergences, by
    the flow's evaluation estimator). ``depth`` is None until ``reset``/``rebuild``. Pushes run in
    chunks of ``chunk_size`` rows; block k's Hutchinson noise comes from the seed ``seed``,k.
    """

    def __init__(self, pool=None, chunk_size=4096):
        self.pool, self.chunk_size = pool, chunk_size
        self.x = self.delta_logp = self.depth = None

    def set_pool(self, pool):
        self.pool = pool
        self.invalidate()

    def invalidate(self):
        self.x = self.delta_logp = self.depth = None

    def _require_pool(self):
        if self.pool is None:
            raise RuntimeError("PushForwardCache has no pool; call set_pool(points) first.")

    def reset(self, flow):
        """Depth 0: the pool itself, on the flow's device."""
        self._require_pool()
        device = next(flow.parameters()).device
        self.x = self.pool.to(device)
        self.delta_logp = self.x.new_zeros(self.x.shape[0])
        self.depth = 0

    @torch.no_grad()
    def advance(self, flow, seed):
        """Push through block ``depth`` (depth += 1); returns that block's W2 proxy
        sqrt(E|x_k - x_{k-1}|^2) and relative movement E|x_k - x_{k-1}|^2 / E|x_k|^2 over the pool."""
        if self.depth is None:
            raise RuntimeError("the cache is not built; call reset(flow) or rebuild(flow, depth, seed).")
        index = self.depth
        with _seeded_rng(_block_seed(seed, index), self.x.device):
            pushed = [flow.block_forward(index, x, logp, estimator=flow.test_estimator)
                      for x, logp in zip(self.x.split(self.chunk_size), self.delta_logp.split(self.chunk_size))]
        x_next = torch.cat([x for x, _ in pushed])
        moved = movement(self.x, x_next), relative_movement(self.x, x_next)
        self.x, self.delta_logp = x_next, torch.cat([logp for _, logp in pushed])
        self.depth += 1
        return moved

    def rebuild(self, flow, depth, seed):
        """Recompute depth ``depth`` from the pool (bit-identical to advancing block by block)."""
        self.reset(flow)
        for _ in range(depth):
            self.advance(flow, seed)

    def batch(self, indices):
        """(x (B, D), delta_logp (B,)) of the cached rows ``indices``."""
        if self.depth is None:
            raise RuntimeError("the cache is not built; call reset(flow) or rebuild(flow, depth, seed).")
        return self.x[indices], self.delta_logp[indices]


def _block_seed(seed, index):
    return (seed * 1_000_003 + 7919 * (index + 1)) % (2 ** 63)
