"""Block-wise training of a ``fastcnf.cnf.jko.JKOFlow``: the stage schedule and the ``jko`` method.

Training runs in stages; a stage trains one block alone (a fresh Adam, every other block frozen,
gradients clipped to a norm) for a fixed number of iterations on mini-batches of a fixed
training pool pushed through the blocks before it:

    grow            block k = 1, 2, ... with h_k = min(h_0 rho^(k-1), h_max), warm-started from
                    block k-1, until a block's relative movement E|x_k - x_{k-1}|^2 / E|x_k|^2
                    falls below ``tolerance`` or ``max_blocks`` blocks exist
    reparameterize  (optional, ``rounds`` times) one damped step of every h_k towards the interval
                    over which its block would move the mean W2 distance, bounded to
                    [h_min, h_max] (``fastcnf.cnf.jko.reparameterized_intervals``), then fine-tune
                    the blocks in order
    refine          (optional) split the selected blocks -- those that moved at least
                    ``refine_threshold`` times the mean movement (``fastcnf.cnf.jko.refinement_selection``;
                    0 splits all) -- into two of half the interval, both initialised from the
                    parent, then fine-tune the blocks from the first split one on (earlier blocks
                    and their inputs are unchanged)

Learning rates: ``lr`` while growing, ``finetune_lr`` (default ``lr``) in the later passes, each
multiplied by ``lr_decay`` ** (block index). The pushed-forward pool is cached
(``fastcnf.training.jko_data.PushForwardCache``) and advanced by one block when a stage ends, so an
iteration costs the memory and compute of one block. On resume the cache is recomputed from the
saved blocks, bit for bit.

Defaults follow the authors' code (hamrel-cxu/JKO-iFlow: Adam at 1e-4, gradient norm clipped at
1, h = 0.25 * 1.4^k, 8 blocks) and the paper's stopping rule (relative movement 0.01) and
damping (eta = 0.5); the paper's h_max, h_min and its rule for selecting the blocks to refine are
not public in code, so those are fastcnf's choices (README, "JKO-iFlow").
"""

import math
from dataclasses import dataclass

import torch

from ..cnf.flow import standard_normal_log_prob
from ..cnf.jko import (
    BlockSolver,
    JKOFlow,
    block_objective,
    refinement_selection,
    reparameterized_intervals,
)
from ..cnf.nets import ODEnet
from ..ode.validation import (
    require_bool,
    require_fraction,
    require_non_negative,
    require_positive,
    require_positive_int,
)
from ..stats import untracked
from .errors import ConfigError
from .jko_data import IndexSampler, PushForwardCache, training_pool
from .training_methods import TrainingMethod, resolve_divergence

__all__ = ["JKOSettings", "JKOSchedule", "JKOIFlow", "jko_settings", "block_solver", "PHASES"]

PHASES = ("grow", "reparameterize", "refine", "done")


@dataclass(frozen=True)
class JKOSettings:
    """The block-wise schedule (see the module docstring).

    h0, rho: first interval and growth factor (h_k = min(h0 rho^(k-1), h_max)).
    h_min, h_max: bounds of every interval, grown or reparameterized.
    block_iterations: iterations per block while growing the stack.
    max_blocks: at most this many blocks are grown.
    tolerance: stop growing once a block's E|x_k - x_{k-1}|^2 / E|x_k|^2 is below it (0: never).
    finetune_iterations: iterations per block in the reparameterization and refinement passes.
    reparameterize, rounds, eta: run ``rounds`` reparameterization passes with damping ``eta``.
    refine, refine_threshold: run the refinement pass; split blocks moving >= threshold x mean.
    clip: largest gradient norm of a block's parameters per step (0: no clipping).
    finetune_lr: learning rate of the later passes (None: the growing one).
    lr_decay: the learning rate of block k (0-based) is multiplied by lr_decay ** k.
    """

    h0: float = 0.25
    rho: float = 1.4
    h_min: float = 0.01
    h_max: float = 5.0
    block_iterations: int = 2000
    max_blocks: int = 8
    tolerance: float = 0.01
    finetune_iterations: int = 1000
    reparameterize: bool = False
    rounds: int = 1
    eta: float = 0.5
    refine: bool = False
    refine_threshold: float = 1.0
    clip: float = 1.0
    finetune_lr: float = None
    lr_decay: float = 1.0

    def __post_init__(self):
        for name in ("h0", "rho", "h_min", "h_max", "lr_decay"):
            require_positive(f"jko {name.replace('_', ' ')}", getattr(self, name))
        if not self.h_min <= self.h_max:
            raise ValueError(f"jko needs h_min <= h_max, got {self.h_min} and {self.h_max}.")
        for name in ("block_iterations", "max_blocks", "finetune_iterations", "rounds"):
            require_positive_int(f"jko {name.replace('_', ' ')}", getattr(self, name))
        for name in ("tolerance", "refine_threshold", "clip"):
            require_non_negative(f"jko {name.replace('_', ' ')}", getattr(self, name))
        require_fraction("jko eta", self.eta)
        if self.finetune_lr is not None:
            require_positive("jko finetune lr", self.finetune_lr)
        for name in ("reparameterize", "refine"):
            require_bool(f"jko {name}", getattr(self, name))

    def phases(self):
        """The phases this schedule runs, in order, ending with ``"done"``."""
        return ("grow",) + ("reparameterize",) * self.reparameterize + ("refine",) * self.refine + ("done",)

    def interval(self, index):
        """h of the grown block ``index`` (0-based): h0 rho^index within [h_min, h_max]."""
        return min(max(self.h0 * self.rho ** index, self.h_min), self.h_max)


def jko_settings(config):
    """``JKOSettings`` from a ``TrainConfig``."""
    return JKOSettings(
        h0=config.jko_h0, rho=config.jko_rho, h_min=config.jko_h_min, h_max=config.jko_h_max,
        block_iterations=config.jko_block_iterations, max_blocks=config.jko_max_blocks,
        tolerance=config.jko_tolerance, finetune_iterations=config.jko_finetune_iterations,
        reparameterize=config.jko_reparameterize, rounds=config.jko_rounds, eta=config.jko_eta,
        refine=config.jko_refine, refine_threshold=config.jko_refine_threshold, clip=config.jko_clip,
        finetune_lr=config.jko_finetune_lr, lr_decay=config.jko_lr_decay)


def block_solver(config, test=False):
    """``BlockSolver`` from a ``TrainConfig``: for training ``jko_solver`` with ``jko_steps`` steps (or
    rtol/atol), adjoint gradients unless ``adjoint`` is off; for evaluation (``test``) the same
    unless ``test_solver`` is set, then that method at ``test_rtol``/``test_atol`` (default rtol/atol)."""
    if test and config.test_solver is not None:
        return BlockSolver(config.test_solver, config.jko_steps, config.test_rtol or config.rtol,
                           config.test_atol or config.atol, config.adjoint)
    return BlockSolver(config.jko_solver, config.jko_steps, config.rtol, config.atol, config.adjoint)


# ----------------------------------------------------------------------------- schedule
class JKOSchedule:
    """The optimization object of block-wise training (``begin``/``step``/``state_dict``, like
    ``fastcnf.training.training_methods.OptimizerStep``); see the module docstring for the stages.

    Attributes: ``phase`` (one of ``PHASES``), ``round`` (0-based reparameterization round),
    ``block`` (0-based index being trained), ``stage_iteration`` (iterations done in this
    stage), ``movements`` and ``relative`` (W2 proxy and relative movement of every block over
    the pool, measured when its last stage ended; None before), ``history`` (one
    ``{"phase", "round", "block", "h", "movement", "relative"}`` record per finished stage).
    """

    def __init__(self, flow, cache, settings, lr=1e-4, weight_decay=0.0, seed=0):
        if not isinstance(flow, JKOFlow):
            raise TypeError(f"JKOSchedule trains a JKOFlow, got {type(flow).__name__}.")
        self.flow, self.cache, self.settings = flow, cache, settings
        self.lr, self.weight_decay, self.seed = lr, weight_decay, seed
        self.phase, self.round, self.block, self.stage_iteration = "grow", 0, 0, 0
        self.movements = [None] * flow.num_blocks
        self.relative = [None] * flow.num_blocks
        self.history = []
        self.optimizer = self._optimizer()

    @property
    def finished(self):
        return self.phase == "done"

    def stage_length(self):
        return self.settings.block_iterations if self.phase == "grow" else self.settings.finetune_iterations

    def learning_rate(self):
        """The learning rate of the current stage (phase and block)."""
        finetune_lr = self.settings.finetune_lr
        base = self.lr if self.phase == "grow" or finetune_lr is None else finetune_lr
        return base * self.settings.lr_decay ** self.block

    def _optimizer(self):
        return torch.optim.Adam(self.flow.block_parameters(self.block), lr=self.learning_rate(),
                                weight_decay=self.weight_decay)

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
        if self.settings.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.flow.block_parameters(self.block), self.settings.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.stage_iteration += 1
        if self.stage_iteration >= self.stage_length():
            self._end_stage()

    def _end_stage(self):
        moved, relative = self.cache.advance(self.flow, self.seed)
        self.movements[self.block], self.relative[self.block] = moved, relative
        self.history.append({"phase": self.phase, "round": self.round, "block": self.block,
                             "h": self.flow.intervals[self.block], "movement": moved, "relative": relative})
        if self.phase == "grow":
            keep_growing = relative >= self.settings.tolerance and self.flow.num_blocks < self.settings.max_blocks
            if keep_growing:
                self.block = self.flow.append_block(self.settings.interval(self.flow.num_blocks))
                self.movements.append(None)
                self.relative.append(None)
            else:
                self._next_pass()
        elif self.block + 1 < self.flow.num_blocks:
            self.block += 1
        else:
            self._next_pass()
        self.stage_iteration = 0
        self.optimizer = None if self.finished else self._optimizer()

    def _next_pass(self):
        """Start the next reparameterization round or the next phase (re-spacing or splitting first)."""
        if self.phase == "reparameterize" and self.round + 1 < self.settings.rounds:
            self.round += 1
        else:
            phases = self.settings.phases()
            self.phase, self.round = phases[phases.index(self.phase) + 1], 0
        start = 0
        if self.phase == "reparameterize":
            settings = self.settings
            self.flow.set_intervals(reparameterized_intervals(self.flow.intervals, self.movements, eta=settings.eta,
                                                              h_min=settings.h_min, h_max=settings.h_max))
        elif self.phase == "refine":
            selected = refinement_selection(self.movements, self.settings.refine_threshold)
            for index in reversed(selected):
                self.flow.split_block(index)
                self.movements[index:index + 1] = [None, None]
                self.relative[index:index + 1] = [None, None]
            start = selected[0]
        self.block = start
        if not self.finished:
            self.cache.rebuild(self.flow, start, self.seed)

    def state_dict(self):
        return {"phase": self.phase, "round": self.round, "block": self.block,
                "stage_iteration": self.stage_iteration, "movements": list(self.movements),
                "relative": list(self.relative), "history": [dict(record) for record in self.history],
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def load_state_dict(self, state):
        """Restore (after the flow's own state); the cache is recomputed at the next ``begin``."""
        if state["phase"] not in PHASES or not 0 <= state["block"] < self.flow.num_blocks:
            raise ValueError(f"JKO schedule state (phase {state['phase']!r}, block {state['block']}) does not fit a "
                             f"flow of {self.flow.num_blocks} blocks.")
        self.phase, self.round, self.block = state["phase"], int(state["round"]), int(state["block"])
        self.stage_iteration = int(state["stage_iteration"])
        self.movements, self.relative = list(state["movements"]), list(state["relative"])
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
    default_lr = 1e-4  # the authors' code

    def __init__(self):
        self.cache = PushForwardCache()
        self.schedule = None

    def build_model(self, config, dim):
        divergence = "hutchinson-gaussian" if config.divergence == "auto" else config.divergence
        test_divergence = resolve_divergence(config.test_divergence, dim, test=True, train_name=divergence)
        net = ODEnet(dim, config.hidden, config.layer, config.activation)
        return JKOFlow(net, jko_settings(config).interval(0), block_solver(config), divergence, test_divergence,
                       block_time=config.jko_block_time, test_solver=block_solver(config, test=True))

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
            "end_time": model.boundaries()[index + 1],
            "round": self.schedule.round,
            "lr": self.schedule.learning_rate(),
        }
        return objective.loss, metrics

    def finished(self, optimization):
        return optimization.finished

    def progress(self, row):
        return {"block": f"{row['block']}/{row['blocks']}", "move": f"{row['movement']:.3f}",
                "h": f"{row['h']:.3g}", "loss": f"{row['loss']:.3f}", "nll": f"{row['nll']:.3f}"}
