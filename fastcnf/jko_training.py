"""Block-wise training of a ``fastcnf.jko.JKOFlow``: sample cache, stage schedule, the ``jko`` method.

Training runs in stages; a stage trains one block alone (fresh Adam, every other block frozen)
for a fixed number of iterations on mini-batches of a fixed training pool pushed through the
blocks before it:

    grow            block k = 1, 2, ... with h_k = h_0 rho^(k-1), warm-started from block k-1,
                    until a block moves less than ``tolerance`` (W2 proxy over the pool) or
                    ``max_blocks`` blocks exist
    reparameterize  (optional) re-space the intervals so every block moves about the same W2
                    distance (``fastcnf.jko.reparameterized_intervals``), then fine-tune the blocks
                    in order
    refine          (optional) split every block into two of half length, both initialised from
                    the parent, then fine-tune the blocks in order

The pushed-forward pool is cached (``PushForwardCache``) and advanced by one block when a stage
ends, so an iteration costs the memory and compute of one block. On resume the cache is
recomputed from the saved blocks; the pushes draw their Hutchinson noise from a seed per block,
never from the training RNG, so a resumed run continues bit for bit.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .cnf import standard_normal_log_prob
from .data import ArrayDataset, DataError, ToyDataset, toy_sample
from .jko import BlockSolver, JKOFlow, block_objective, movement, reparameterized_intervals
from .methods import TrainingMethod, register_training_method, resolve_divergence
from .nets import ODEnet
from .stats import untracked

__all__ = ["JKOSettings", "PushForwardCache", "IndexSampler", "JKOSchedule", "JKOIFlow", "training_pool",
           "jko_settings", "block_solver", "PHASES"]

PHASES = ("grow", "reparameterize", "refine", "done")
POOL_STREAM = 3  # child of numpy's SeedSequence(seed) drawing the pool (datasets use children 0-2)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")


@dataclass(frozen=True)
class JKOSettings:
    """The block-wise schedule (see the module docstring).

    h0, rho: first interval and growth factor of the intervals (h_k = h0 rho^(k-1)).
    block_iterations: iterations per block while growing the stack.
    max_blocks: at most this many blocks are grown.
    tolerance: stop growing once a block's W2 proxy sqrt(E|x_k - x_{k-1}|^2) is below it (0: never).
    finetune_iterations: iterations per block in the reparameterization and refinement passes.
    reparameterize, refine: run those passes.
    """

    h0: float = 0.5
    rho: float = 1.2
    block_iterations: int = 200
    max_blocks: int = 8
    tolerance: float = 0.05
    finetune_iterations: int = 100
    reparameterize: bool = False
    refine: bool = False

    def __post_init__(self):
        _positive("jko h0", self.h0)
        _positive("jko rho", self.rho)
        for name in ("block_iterations", "max_blocks", "finetune_iterations"):
            _positive_int(f"jko {name.replace('_', ' ')}", getattr(self, name))
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or \
                not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise ValueError(f"jko tolerance must be a finite number >= 0, got {self.tolerance!r}.")
        for name in ("reparameterize", "refine"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"jko {name} must be True or False, got {getattr(self, name)!r}.")

    def phases(self):
        """The phases this schedule runs, in order, ending with ``"done"``."""
        return ("grow",) + ("reparameterize",) * self.reparameterize + ("refine",) * self.refine + ("done",)

    def interval(self, index):
        """h of the grown block ``index`` (0-based): h0 rho^index."""
        return self.h0 * self.rho ** index


def jko_settings(config):
    """``JKOSettings`` from a ``TrainConfig``."""
    return JKOSettings(config.jko_h0, config.jko_rho, config.jko_block_iterations, config.jko_max_blocks,
                       config.jko_tolerance, config.jko_finetune_iterations, config.jko_reparameterize,
                       config.jko_refine)


def block_solver(config):
    """``BlockSolver`` from a ``TrainConfig`` (``jko_solver`` with ``jko_steps`` steps, or rtol/atol)."""
    return BlockSolver(config.jko_solver, config.jko_steps, config.rtol, config.atol)


# ----------------------------------------------------------------------------- data
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


class IndexSampler:
    """Endless batches of row indices (int64) into a pool of ``size`` rows, reshuffled every epoch."""

    def __init__(self, size, batch_size, seed):
        if batch_size > size:
            raise DataError(f"batch size {batch_size} exceeds the {size} training points of the pool.")
        self.size, self.batch_size = size, batch_size
        self.rng = np.random.default_rng(seed)
        self.order, self.position = self.rng.permutation(size), 0

    def next(self):
        if self.position + self.batch_size > self.size:
            self.order, self.position = self.rng.permutation(self.size), 0
        rows = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return torch.from_numpy(rows.astype(np.int64))

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state, "order": torch.from_numpy(self.order.copy()),
                "position": self.position}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]
        self.order, self.position = state["order"].numpy().copy(), int(state["position"])


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
        """Push through block ``depth`` (depth += 1); returns that block's W2 proxy over the pool."""
        if self.depth is None:
            raise RuntimeError("the cache is not built; call reset(flow) or rebuild(flow, depth, seed).")
        index = self.depth
        with _seeded_rng(_block_seed(seed, index), self.x.device):
            pushed = [flow.block_forward(index, x, logp, estimator=flow.test_estimator)
                      for x, logp in zip(self.x.split(self.chunk_size), self.delta_logp.split(self.chunk_size))]
        x_next = torch.cat([x for x, _ in pushed])
        moved = movement(self.x, x_next)
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


# ----------------------------------------------------------------------------- schedule
class JKOSchedule:
    """The optimization object of block-wise training (``begin``/``step``/``state_dict``, like
    ``fastcnf.methods.OptimizerStep``); see the module docstring for the stages.

    Attributes: ``phase`` (one of ``PHASES``), ``block`` (0-based index being trained),
    ``stage_iteration`` (iterations done in this stage), ``movements`` (W2 proxy of every block
    over the pool, measured when its last stage ended; None before), ``history`` (one
    ``{"phase", "block", "h", "movement"}`` record per finished stage).
    """

    def __init__(self, flow, cache, settings, lr=1e-3, weight_decay=0.0, seed=0):
        if not isinstance(flow, JKOFlow):
            raise TypeError(f"JKOSchedule trains a JKOFlow, got {type(flow).__name__}.")
        self.flow, self.cache, self.settings = flow, cache, settings
        self.lr, self.weight_decay, self.seed = lr, weight_decay, seed
        self.phase, self.block, self.stage_iteration = "grow", 0, 0
        self.movements = [None] * flow.num_blocks
        self.history = []
        self.optimizer = self._optimizer()

    @property
    def finished(self):
        return self.phase == "done"

    def stage_length(self):
        return self.settings.block_iterations if self.phase == "grow" else self.settings.finetune_iterations

    def _optimizer(self):
        return torch.optim.Adam(self.flow.block_parameters(self.block), lr=self.lr, weight_decay=self.weight_decay)

    def begin(self, iteration):
        """Make the cache hold the samples of the block being trained, freeze the others; returns the phase."""
        if self.finished:
            raise RuntimeError("the JKO schedule is complete; there is no block left to train.")
        if self.cache.depth != self.block:
            with untracked():  # recomputation after a resume: not part of the algorithm's cost
                self.cache.rebuild(self.flow, self.block, self.seed)
        self.flow.train_only(self.block)
        return self.phase

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.stage_iteration += 1
        if self.stage_iteration >= self.stage_length():
            self._end_stage()

    def _end_stage(self):
        moved = self.cache.advance(self.flow, self.seed)
        self.movements[self.block] = moved
        self.history.append({"phase": self.phase, "block": self.block, "h": self.flow.intervals[self.block],
                             "movement": moved})
        if self.phase == "grow":
            keep_growing = moved >= self.settings.tolerance and self.flow.num_blocks < self.settings.max_blocks
            if keep_growing:
                self.block = self.flow.append_block(self.settings.interval(self.flow.num_blocks))
                self.movements.append(None)
            else:
                self._next_phase()
        elif self.block + 1 < self.flow.num_blocks:
            self.block += 1
        else:
            self._next_phase()
        self.stage_iteration = 0
        self.optimizer = None if self.finished else self._optimizer()

    def _next_phase(self):
        phases = self.settings.phases()
        self.phase = phases[phases.index(self.phase) + 1]
        if self.phase == "reparameterize":
            self.flow.set_intervals(reparameterized_intervals(self.flow.intervals, self.movements))
        elif self.phase == "refine":
            for index in reversed(range(self.flow.num_blocks)):
                self.flow.split_block(index)
            self.movements = [None if m is None else m / 2 for m in self.movements for _ in range(2)]
        self.block = 0
        if not self.finished:
            self.cache.reset(self.flow)

    def state_dict(self):
        return {"phase": self.phase, "block": self.block, "stage_iteration": self.stage_iteration,
                "movements": list(self.movements), "history": [dict(record) for record in self.history],
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def load_state_dict(self, state):
        """Restore (after the flow's own state); the cache is recomputed at the next ``begin``."""
        if state["phase"] not in PHASES or not 0 <= state["block"] < self.flow.num_blocks:
            raise ValueError(f"JKO schedule state (phase {state['phase']!r}, block {state['block']}) does not fit a "
                             f"flow of {self.flow.num_blocks} blocks.")
        self.phase, self.block = state["phase"], int(state["block"])
        self.stage_iteration, self.movements = int(state["stage_iteration"]), list(state["movements"])
        self.history = [dict(record) for record in state["history"]]
        self.optimizer = None if self.finished else self._optimizer()
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.cache.invalidate()


# ----------------------------------------------------------------------------- method
@register_training_method
class JKOIFlow(TrainingMethod):
    """JKO-iFlow through the ``fastcnf.train.Trainer``: batches are indices into the cached pool."""

    name = "jko"
    summary = "JKO-iFlow: residual ODE blocks trained one at a time on JKO steps"

    def __init__(self):
        self.cache = PushForwardCache()
        self.schedule = None

    def build_model(self, config, dim):
        divergence = "hutchinson-gaussian" if config.divergence == "auto" else config.divergence
        test_divergence = resolve_divergence(config.test_divergence, dim, test=True, train_name=divergence)
        net = ODEnet(dim, config.hidden, config.layer, config.activation)
        return JKOFlow(net, config.jko_h0, block_solver(config), divergence, test_divergence)

    def build_optimization(self, model, config):
        self.schedule = JKOSchedule(model, self.cache, jko_settings(config), config.lr, config.weight_decay,
                                    config.seed)
        return self.schedule

    def sampler(self, dataset, config):
        pool = training_pool(dataset, config.jko_pool, config.seed)
        self.cache.set_pool(pool)
        return IndexSampler(len(pool), config.batch_size, config.seed)

    def loss(self, model, batch):
        index = self.schedule.block
        x_prev, delta_prev = self.cache.batch(batch)
        objective = block_objective(model, index, x_prev)
        log_p = standard_normal_log_prob(objective.x.detach()) - (delta_prev + objective.delta_logp.detach())
        interval = model.intervals[index]
        displacement = objective.displacement.item()
        metrics = {
            "nll": -log_p.mean().item(),
            "block": index + 1,
            "blocks": model.num_blocks,
            "h": interval,
            "movement": math.sqrt(displacement),
            "potential": objective.potential.item(),
            "divergence": objective.divergence.item(),
            "transport": displacement / (2.0 * interval),
            "end_time": model.block_times(index)[1],
        }
        return objective.loss, metrics

    def finished(self, optimization):
        return optimization.finished

    def progress(self, row):
        return {"block": f"{row['block']}/{row['blocks']}", "move": f"{row['movement']:.3f}",
                "h": f"{row['h']:.3g}", "loss": f"{row['loss']:.3f}", "nll": f"{row['nll']:.3f}"}
