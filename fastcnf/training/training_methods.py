"""Training methods by name: what model is built, how it is optimized, what loss a batch gives.

A ``TrainingMethod`` is the part of a training run that differs between methods; the
``fastcnf.training.trainer.Trainer`` owns everything else (loop, data, metrics, checkpoints). A method

    build_model(config, dim)           -> a ``fastcnf.cnf.Flow``
    build_optimization(model, config)  -> an object with begin(iteration) -> phase name, step(),
                                          state_dict(), load_state_dict() (``OptimizerStep`` or
                                          ``fastcnf.cnf.toflow.CoordinateDescent``)
    loss(model, batch)                 -> (scalar loss tensor, {metric name: float})
    sampler(dataset, config)           -> the batch sampler (default ``dataset.sampler``)
    finished(optimization)             -> True when the method's own schedule is complete (the
                                          trainer then stops before ``config.iterations``)
    progress(row)                      -> the progress bar's fields for a metrics row

The methods here: ffjord (plain maximum likelihood), rnode (kinetic-energy and Jacobian
regularizers), tpr (trajectory polynomial regularization), toflow (trainable end time per block,
weights and T updated by coordinate descent). Regularizer weights given explicitly in the config
combine with any method (e.g. toflow with ``tpr_weight=5``). Block-wise JKO-iFlow (``jko``,
``fastcnf.training.jko_schedule``) builds on the same base: its optimization object decides per
iteration which block trains. ``fastcnf.training.registry`` lists them all by name.
"""

import torch

from ..cnf.divergence import make_estimator
from ..cnf.flow import CNF, SequentialFlow, SolverSettings
from ..cnf.nets import ODEnet
from ..cnf.regularizers import JacobianFrobenius, KineticEnergy, TrajectoryPolynomial
from ..cnf.toflow import CoordinateDescent, TerminalTime, terminal_times, time_optimizer
from ..ode.registry import METHODS
from .sharding import sharded_sampler

__all__ = ["TrainingMethod", "OptimizerStep", "FFJORD", "RNODE", "TPR", "TOFLOW", "build_flow", "resolve_divergence"]

def resolve_divergence(name, dim, test=False, train_name=None):
    """``"auto"`` -> exact for dim <= 2 (training) or dim <= 10 (evaluation), else Hutchinson."""
    if name != "auto":
        return name
    if test:
        return "exact" if dim <= 10 else train_name
    return "exact" if dim <= 2 else "hutchinson-gaussian"


def _solver_settings(config, test):
    method = (config.test_solver or config.solver) if test else config.solver
    rtol = (config.test_rtol or config.rtol) if test else config.rtol
    atol = (config.test_atol or config.atol) if test else config.atol
    options = {"step_size": config.step_size} if config.step_size is not None else {}
    adjoint_options = {"norm": "seminorm"} if config.seminorm else None
    if not test and config.controller != "integral" and METHODS[method].adaptive:
        # The forward training solve only: the adjoint solve and evaluation keep torchdiffeq's controller
        # (with PI control the adjoint, whose error norm includes the growing parameter adjoints, takes
        # more steps than it saves; bench/bench_training_step.py).
        options["controller"] = config.controller
        adjoint_options = adjoint_options or {}
    return SolverSettings(method, rtol, atol, options, config.adjoint, adjoint_options)


def build_flow(config, dim, end_time_factory, regularizers):
    """``config.blocks`` CNF blocks of ODEnets; ``end_time_factory()`` gives each block's T."""
    divergence = resolve_divergence(config.divergence, dim)
    test_divergence = resolve_divergence(config.test_divergence, dim, test=True, train_name=divergence)
    blocks = []
    for _ in range(config.blocks):
        net = ODEnet(dim, config.hidden, config.layer, config.activation)
        train = make_estimator(divergence, compile=True) if config.compile else divergence
        blocks.append(CNF(net, end_time_factory(), train, test_divergence, regularizers,
                          _solver_settings(config, test=False), _solver_settings(config, test=True)))
    return SequentialFlow(blocks)


def _scalar(value):
    return value.detach().item() if isinstance(value, torch.Tensor) else float(value)


class OptimizerStep:
    """One optimizer updating every parameter each iteration (the phase is always ``"weights"``)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def begin(self, iteration):
        return "weights"

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)


class TrainingMethod:
    """Maximum likelihood of a stack of CNF blocks with the config's regularizers (see module docstring)."""

    name = None
    summary = ""
    default_weights = {}
    default_lr = 1e-3
    default_end_time = 0.5  # FFJORD's toy setting

    def regularizers(self, config):
        weights = {name: getattr(config, name) for name in ("kinetic", "jacobian", "tpr_weight")}
        weights = {name: value if value is not None else self.default_weights.get(name, 0.0)
                   for name, value in weights.items()}
        regularizers = []
        if weights["kinetic"] > 0:
            regularizers.append(KineticEnergy(weights["kinetic"]))
        if weights["jacobian"] > 0:
            regularizers.append(JacobianFrobenius(weights["jacobian"]))
        if weights["tpr_weight"] > 0:
            regularizers.append(TrajectoryPolynomial(weights["tpr_weight"], config.tpr_degree, config.tpr_times,
                                                     config.tpr_logp))
        return regularizers

    def end_time(self, config):
        return config.end_time

    def build_model(self, config, dim):
        return build_flow(config, dim, lambda: self.end_time(config), self.regularizers(config))

    def build_optimization(self, model, config):
        return OptimizerStep(torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay))

    def sampler(self, dataset, config, shard=None):
        """Training batches; ``shard`` (under torchrun) selects this process's rows of each global batch."""
        if shard is not None:
            return sharded_sampler(dataset, config.batch_size, config.seed, shard)
        return dataset.sampler(config.batch_size, config.seed)

    def finished(self, optimization):
        return False

    def progress(self, row):
        return {"loss": f"{row['loss']:.3f}", "nll": f"{row['nll']:.3f}",
                "nfe": row["nfe_forward"] + row["nfe_backward"], "T": f"{row['end_time']:.3g}"}

    def loss(self, model, batch):
        nll = -model.log_prob(batch).mean()
        regularization = model.regularization()
        metrics = {"nll": nll.item(), "regularization": _scalar(regularization)}
        metrics.update({name: _scalar(value) for name, value in model.regularization_terms().items()})
        metrics["end_time"] = sum(_scalar(block.end_time()) for block in model.cnf_blocks())
        return nll + regularization, metrics


class FFJORD(TrainingMethod):
    name = "ffjord"
    summary = "maximum likelihood (FFJORD)"


class RNODE(TrainingMethod):
    name = "rnode"
    summary = "kinetic energy + Jacobian Frobenius regularization (RNODE)"
    default_weights = {"kinetic": 0.01, "jacobian": 0.01}


class TPR(TrainingMethod):
    name = "tpr"
    summary = "trajectory polynomial regularization (TPR)"
    default_weights = {"tpr_weight": 5.0}


class TOFLOW(TrainingMethod):
    """TO-FLOW: each block's T starts at ``end_time`` (default 1, the authors'), is penalized by
    ``time_alpha`` * T (or T^2), stepped by SGD with momentum (``fastcnf.cnf.toflow.time_optimizer``;
    see ``fastcnf.cnf.toflow`` for why not Adam) and clipped to [t_min, t_max] = [0.1, 1.9] by default.
    The schedule (``time_schedule``, ``weight_steps`` : ``time_steps``) defaults to the authors'
    released one: weights and T stepped from the same pass every iteration."""

    name = "toflow"
    summary = "trainable end time per block, coordinate descent on weights and T (TO-FLOW)"
    default_end_time = 1.0

    def end_time(self, config):
        return TerminalTime(init=config.end_time, t_min=config.t_min, t_max=config.t_max,
                            regularizer=config.time_regularizer, alpha=config.time_alpha)

    def build_optimization(self, model, config):
        times = terminal_times(model)
        time_ids = {id(p) for t in times for p in t.parameters()}
        weights = [p for p in model.parameters() if id(p) not in time_ids]
        weight_optimizer = torch.optim.Adam(weights, lr=config.lr, weight_decay=config.weight_decay)
        return CoordinateDescent(weight_optimizer, time_optimizer(times, config.time_lr, config.time_momentum), times,
                                 config.weight_steps, config.time_steps, config.time_schedule)
