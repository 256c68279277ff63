"""Block-wise training of a ``fastcnf.cnf.jko.JKOFlow``: the stage schedule and the ``jko`` method.

Training runs in stages; a stage trains one block alone (fresh Adam, every other block frozen)
for a fixed number of iterations on mini-batches of a fixed training pool pushed through the
blocks before it:

    grow            block k = 1, 2, ... with h_k = h_0 rho^(k-1), warm-started from block k-1,
                    until a block moves less than ``tolerance`` (W2 proxy over the pool) or
                    ``max_blocks`` blocks exist
    reparameterize  (optional) re-space the intervals so every block moves about the same W2
                    distance (``fastcnf.cnf.jko.reparameterized_intervals``), then fine-tune the blocks
                    in order
    refine          (optional) split every block into two of half length, both initialised from
                    the parent, then fine-tune the blocks in order

The pushed-forward pool is cached (``fastcnf.training.jko_data.PushForwardCache``) and advanced by one
block when a stage ends, so an iteration costs the memory and compute of one block. On resume
the cache is recomputed from the saved blocks, bit for bit.
"""

import math
from dataclasses import dataclass

import torch

from ..cnf.flow import standard_normal_log_prob
from ..cnf.jko import BlockSolver, JKOFlow, block_objective, reparameterized_intervals
from ..cnf.nets import ODEnet
from ..ode.validation import require_bool, require_non_negative, require_positive, require_positive_int
from ..stats import untracked
from .errors import ConfigError
from .jko_data import IndexSampler, PushForwardCache, training_pool
from .training_methods import TrainingMethod, resolve_divergence

__all__ = ["JKOSettings", "JKOSchedule", "JKOIFlow", "jko_settings", "block_solver", "PHASES"]

PHASES = ("grow", "reparameterize", "refine", "done")


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

    h0: float = 1.0
    rho: float = 1.2
    block_iterations: int = 250
    max_blocks: int = 4
    tolerance: float = 0.05
    finetune_iterations: int = 100
    reparameterize: bool = False
    refine: bool = False

    def __post_init__(self):
        require_positive("jko h0", self.h0)
        require_positive("jko rho", self.rho)
        for name in ("block_iterations", "max_blocks", "finetune_iterations"):
            require_positive_int(f"jko {name.replace('_', ' ')}", getattr(self, name))
        require_non_negative("jko tolerance", self.tolerance)
        for name in ("reparameterize", "refine"):
            require_bool(f"jko {name}", getattr(self, name))

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


# ----------------------------------------------------------------------------- schedule
class JKOSchedule:
    """The optimization object of block-wise training (``begin``/``step``/``state_dict``, like
    ``fastcnf.training.training_methods.OptimizerStep``); see the module docstring for the stages.

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
class JKOIFlow(TrainingMethod):
    """JKO-iFlow through the ``fastcnf.training.trainer.Trainer``: batches are indices into the cached pool."""

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

    def sampler(self, dataset, config, shard=None):
        if shard is not None:
            raise ConfigError("--method jko does not run under torchrun yet: its cached pushed-forward pool is "
                              "per process. Train it in one process.")
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
