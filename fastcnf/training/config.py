"""``TrainConfig``: every setting of a training run, validated, serializable to JSON.

The CLI fills it from its arguments, the trainer reads it, checkpoints store it (``as_dict``)
so ``--resume``, ``sample`` and ``eval`` rebuild exactly the same model.
"""

import dataclasses
from dataclasses import dataclass
from functools import partial

from ..cnf.divergence import ESTIMATORS
from ..cnf.jko import BLOCK_TIMES
from ..cnf.nets import ACTIVATIONS, LAYERS
from ..cnf.toflow import REGULARIZERS as TIME_REGULARIZERS
from ..cnf.toflow import SCHEDULES as TIME_SCHEDULES
from ..ode.control import CONTROLLERS
from ..ode.registry import METHODS as SOLVERS
from ..ode.validation import (
    require_choice,
    require_fraction,
    require_non_negative,
    require_positive,
    require_positive_int,
)
from .data import DATASET_NAMES, TOY_DATASETS
from .errors import ConfigError
from .jko_schedule import JKOSettings
from .registry import TRAINING_METHODS

__all__ = ["TrainConfig", "ConfigError", "DIVERGENCE_CHOICES"]

DIVERGENCE_CHOICES = ("auto",) + tuple(ESTIMATORS)

_choice = partial(require_choice, error=ConfigError)
_positive = partial(require_positive, error=ConfigError)
_non_negative = partial(require_non_negative, error=ConfigError)
_positive_int = partial(require_positive_int, error=ConfigError)



@dataclass
class TrainConfig:
    """Settings of one training run (see ``python -m fastcnf train --help`` for each field)."""

    data: str = "8gaussians"
    method: str = "ffjord"
    logit: bool = False
    hidden: tuple = (64, 64, 64)
    layer: str = "concatsquash"
    activation: str = "tanh"
    blocks: int = 1
    end_time: float = None
    solver: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    step_size: float = None
    test_solver: str = None
    test_rtol: float = None
    test_atol: float = None
    adjoint: bool = True
    seminorm: bool = False
    controller: str = "integral"  # PI takes more forward NFE per iteration at the same tolerance (BENCHMARKS.md)
    divergence: str = "auto"
    test_divergence: str = "auto"
    compile: bool = False  # torch.compile the fused divergence pass of the training solves (fastcnf.cnf.compiled)
    kinetic: float = None
    jacobian: float = None
    tpr_weight: float = None
    tpr_degree: int = 1
    tpr_times: int = 2
    tpr_logp: bool = False
    time_lr: float = 1e-3
    time_momentum: float = 0.9
    time_alpha: float = 0.1
    time_regularizer: str = "linear"
    t_min: float = 0.1
    t_max: float = 1.9
    time_schedule: str = "joint"
    weight_steps: int = 1
    time_steps: int = 1
    jko_h0: float = JKOSettings.h0
    jko_rho: float = JKOSettings.rho
    jko_h_min: float = JKOSettings.h_min
    jko_h_max: float = JKOSettings.h_max
    jko_block_iterations: int = JKOSettings.block_iterations
    jko_max_blocks: int = JKOSettings.max_blocks
    jko_tolerance: float = JKOSettings.tolerance
    jko_finetune_iterations: int = JKOSettings.finetune_iterations
    jko_reparameterize: bool = JKOSettings.reparameterize
    jko_rounds: int = JKOSettings.rounds
    jko_eta: float = JKOSettings.eta
    jko_refine: bool = JKOSettings.refine
    jko_refine_threshold: float = JKOSettings.refine_threshold
    jko_clip: float = JKOSettings.clip
    jko_finetune_lr: float = JKOSettings.finetune_lr
    jko_lr_decay: float = JKOSettings.lr_decay
    jko_block_time: str = "interval"
    jko_solver: str = "rk4"
    jko_steps: int = 4
    jko_pool: int = 20000
    iterations: int = 1000
    batch_size: int = 512
    lr: float = None
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    threads: int = None
    out: str = "runs/fastcnf"
    val_every: int = 100
    val_size: int = 2000
    checkpoint_every: int = 100
    plot: bool = True
    max_nfe: int = 20000

    def __post_init__(self):
        self.hidden = tuple(self.hidden)
        if self.lr is None and self.method in TRAINING_METHODS:
            self.lr = TRAINING_METHODS[self.method].default_lr
        if self.end_time is None and self.method in TRAINING_METHODS:
            self.end_time = TRAINING_METHODS[self.method].default_end_time
        self.validate()

    def as_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}.")
        return cls(**values)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def validate(self):
        if self.data not in DATASET_NAMES and not str(self.data).endswith((".npy", ".csv")):
            raise ConfigError(f"unknown dataset {self.data!r}; use one of {', '.join(DATASET_NAMES)} or a "
                              ".npy/.csv file.")
        _choice("method", self.method, tuple(TRAINING_METHODS))
        _choice("layer", self.layer, tuple(LAYERS))
        _choice("activation", self.activation, tuple(ACTIVATIONS))
        _choice("solver", self.solver, tuple(SOLVERS))
        if self.test_solver is not None:
            _choice("test solver", self.test_solver, tuple(SOLVERS))
        for solver in {self.solver, self.test_solver or self.solver}:
            _check_step_size(solver, self.step_size)
        _choice("controller", self.controller, CONTROLLERS)
        if self.controller != "integral" and not SOLVERS[self.solver].adaptive:
            raise ConfigError(f"controller {self.controller!r} needs an adaptive solver; {self.solver!r} takes fixed "
                              "steps.")
        _choice("divergence", self.divergence, DIVERGENCE_CHOICES)
        if self.compile and (self.divergence.startswith("fd-") or self.method == "jko"):
            raise ConfigError("compile needs the exact or a Hutchinson divergence (the fused pass) and a method other "
                              f"than jko; got divergence {self.divergence!r} with method {self.method!r}.")
        _choice("test divergence", self.test_divergence, DIVERGENCE_CHOICES)
        _choice("time regularizer", self.time_regularizer, TIME_REGULARIZERS)
        _choice("time schedule", self.time_schedule, TIME_SCHEDULES)
        _choice("jko_solver", self.jko_solver, tuple(SOLVERS))
        _choice("jko_block_time", self.jko_block_time, BLOCK_TIMES)
        if not self.hidden:
            raise ConfigError("hidden needs at least one width, e.g. 64,64,64.")
        for width in self.hidden:
            _positive_int("hidden width", width)
        for name in ("blocks", "iterations", "batch_size", "val_every", "val_size", "checkpoint_every",
                     "weight_steps", "time_steps", "tpr_degree", "tpr_times", "jko_block_iterations",
                     "jko_max_blocks", "jko_finetune_iterations", "jko_rounds", "jko_steps", "jko_pool"):
            _positive_int(name, getattr(self, name))
        if self.threads is not None:
            _positive_int("threads", self.threads)
        if isinstance(self.max_nfe, bool) or not isinstance(self.max_nfe, int) or self.max_nfe < 0:
            raise ConfigError(f"max_nfe must be a non-negative integer (0: no limit), got {self.max_nfe!r}.")
        if self.tpr_times < self.tpr_degree:
            raise ConfigError(f"tpr_times must be >= tpr_degree={self.tpr_degree}, got {self.tpr_times}.")
        for name in ("end_time", "rtol", "atol", "lr", "time_lr", "t_min", "t_max", "jko_h0", "jko_rho", "jko_h_min",
                     "jko_h_max", "jko_lr_decay"):
            _positive(name, getattr(self, name))
        for name in ("step_size", "test_rtol", "test_atol", "jko_finetune_lr"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("weight_decay", "time_alpha", "kinetic", "jacobian", "tpr_weight", "jko_tolerance",
                     "jko_refine_threshold", "jko_clip"):
            if getattr(self, name) is not None:
                _non_negative(name, getattr(self, name))
        require_fraction("jko_eta", self.jko_eta, error=ConfigError)
        if not self.jko_h_min <= self.jko_h_max:
            raise ConfigError(f"need jko_h_min <= jko_h_max, got {self.jko_h_min} and {self.jko_h_max}.")
        if _non_negative("time_momentum", self.time_momentum) >= 1:
            raise ConfigError(f"time_momentum must lie in [0, 1), got {self.time_momentum!r}.")
        if self.time_schedule == "joint" and self.time_steps > self.weight_steps:
            raise ConfigError(f"the joint time schedule steps T together with the weights: time_steps="
                              f"{self.time_steps} cannot exceed weight_steps={self.weight_steps} (use the alternate "
                              "schedule).")
        if not self.t_min < self.t_max:
            raise ConfigError(f"need t_min < t_max, got {self.t_min} and {self.t_max}.")
        if self.method == "toflow" and not self.t_min <= self.end_time <= self.t_max:
            raise ConfigError(f"end_time={self.end_time} must lie in [t_min, t_max] = [{self.t_min}, {self.t_max}].")
        if self.method == "jko" and self.data in TOY_DATASETS and self.batch_size > self.jko_pool:
            raise ConfigError(f"batch_size={self.batch_size} exceeds jko_pool={self.jko_pool}, the training points "
                              "of block-wise training.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}.")
        if not self.device or not isinstance(self.device, str):
            raise ConfigError(f"device must be a string such as 'cpu' or 'cuda', got {self.device!r}.")




def _check_step_size(solver, step_size):
    accepts_step = "step_size" in SOLVERS[solver].options
    if step_size is not None and not accepts_step:
        raise ConfigError(f"solver {solver!r} chooses its own steps and takes no step size.")
    if step_size is None and accepts_step:
        raise ConfigError(f"solver {solver!r} is fixed-step: pass a step size (--step-size).")







