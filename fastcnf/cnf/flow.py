"""Continuous normalizing flows on fastcnf's solvers.

A ``CNF`` block maps data x to z = z(T) by dz/dt = f(t, z), z(0) = x, carrying the augmented state

    (z, logp, r_1, ..., r_m),   dlogp/dt = -tr(df/dz),   dr_j/dt = rate of state regularizer j

as a tuple through ``fastcnf.odeint_adjoint`` (training, by default) or ``fastcnf.odeint``. With
FFJORD's convention ``forward(x)`` returns ``(z, delta_logp)``, delta_logp = -int_0^T tr(df/dz) dt,
and log p(x) = log N(z; 0, I) - delta_logp. ``SequentialFlow`` stacks blocks; their delta_logp
terms add up.

The end time is a float or a ``fastcnf.cnf.toflow.TerminalTime`` (trainable T; dL/dT comes out of the
adjoint pass). Training and evaluation use separate ``SolverSettings`` (and optionally separate
divergence estimators), switched by ``module.train()`` / ``module.eval()``. Regularizers
(``fastcnf.cnf.regularizers``) act in training mode only; after a forward pass ``regularization()``
is their weighted sum, ready to add to the loss.

Any ``nn.Module`` ``f(t, z) -> dz/dt`` works as the dynamics, e.g. a torchdiffeq-style user net.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..ode.adjoint import odeint_adjoint
from ..ode.odeint import odeint
from ..ode.registry import check_method
from ..ode.validation import require_positive
from .divergence import make_estimator, solve_scope
from .toflow import TerminalTime

__all__ = ["SolverSettings", "CNFDynamics", "CNF", "SequentialFlow", "Flow", "standard_normal_log_prob"]


def _network_parameter(module):
    """A parameter of the networks in ``module`` (terminal times are float64 and do not count)."""
    for child in module.modules():
        if isinstance(child, TerminalTime):
            continue
        for param in child.parameters(recurse=False):
            return param
    return None


def standard_normal_log_prob(z):
    """log N(z; 0, I) summed over the event dimensions of z (B, *event) -> (B,)."""
    flat = z.reshape(z.shape[0], -1)
    return -0.5 * (flat.pow(2).sum(dim=1) + flat.shape[1] * math.log(2 * math.pi))


@dataclass
class SolverSettings:
    """How a CNF solve is run: ``odeint`` arguments plus whether to use the adjoint.

    ``adjoint_options`` goes to ``odeint_adjoint`` (e.g. ``{"norm": "seminorm"}``). The adjoint
    is used only when gradients are being recorded; otherwise ``odeint`` runs.
    """

    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    options: dict = field(default_factory=dict)
    adjoint: bool = True
    adjoint_options: dict = None

    def __post_init__(self):
        check_method(self.method)
        self.rtol = require_positive("rtol", self.rtol)
        self.atol = require_positive("atol", self.atol)

    def solve(self, func, y0, t):
        """Solution of dy/dt = func(t, y) at the times ``t`` (tuple states allowed)."""
        kwargs = dict(rtol=self.rtol, atol=self.atol, method=self.method, options=dict(self.options))
        if self.adjoint and torch.is_grad_enabled():
            adjoint_options = None if self.adjoint_options is None else dict(self.adjoint_options)
            return odeint_adjoint(func, y0, t, adjoint_options=adjoint_options, **kwargs)
        return odeint(func, y0, t, **kwargs)


def _estimator(divergence, fused_kernel):
    if not isinstance(divergence, str):
        return divergence
    if divergence.startswith("hutchinson"):
        return make_estimator(divergence, fused_kernel=fused_kernel)
    return make_estimator(divergence)


class CNFDynamics(nn.Module):
    """The augmented dynamics (z, logp, *regularizer states) -> their time derivatives.

    ``state_regularizers`` are the regularizers whose integrals are carried in this solve;
    the owning CNF sets them (and the estimator) before every solve.
    """

    def __init__(self, net, estimator):
        super().__init__()
        self.net = net
        self.estimator = estimator
        self.state_regularizers = ()

    def forward(self, t, state):
        z, logp = state[0], state[1]
        needs_frobenius = any(r.needs_frobenius for r in self.state_regularizers)
        estimate = self.estimator(self.net, t, z, frobenius=needs_frobenius)
        dlogp = -estimate.divergence.to(logp.dtype).reshape(logp.shape)
        return (estimate.f, dlogp, *(r.rate(estimate).to(z.dtype) for r in self.state_regularizers))

    def adjoint_vjp(self, t, state, cotangent, params):
        """``odeint_adjoint``'s vector-Jacobian product by the estimator's fused pass (``fastcnf.ode.dynamics``):
        ((f, dlogp), (c^T d/dz, 0), [c^T d/dp], c^T d/dt) for the cotangent c = (c_z, c_logp); None (autograd)
        with state regularizers or where the estimator has no fused pass for the net."""
        vector_jacobian = getattr(self.estimator, "vector_jacobian", None)
        if self.state_regularizers or vector_jacobian is None:
            return None
        (z, logp), (grad_z, grad_logp) = state, cotangent
        result = vector_jacobian(self.net, t, z, grad_z, -grad_logp.reshape(-1).to(z.dtype), params)  # dlogp = -div
        if result is None:
            return None
        estimate, vjp_z, vjp_params, vjp_t = result
        dlogp = -estimate.divergence.to(logp.dtype).reshape(logp.shape)
        return (estimate.f, dlogp), (vjp_z, torch.zeros_like(logp)), vjp_params, vjp_t


class Flow(nn.Module):
    """Density, sampling and regularization shared by ``CNF`` and ``SequentialFlow``.

    Subclasses define ``forward(x, logp=None) -> (z, logp_out)`` and ``inverse(z, logp=None)``.
    """

    event_shape = None

    def log_prob(self, x):
        """log p(x) (B,) for x (B, *event)."""
        z, delta_logp = self(x)
        return standard_normal_log_prob(z) - delta_logp.reshape(-1)

    def sample(self, num_samples, event_shape=None, generator=None):
        """``num_samples`` draws: z ~ N(0, I) pushed through ``inverse``."""
        shape = tuple(event_shape) if event_shape is not None else self.event_shape
        if shape is None:
            raise ValueError("sample() needs event_shape: pass it, or build the flow with event_shape=... "
                             "(fastcnf.cnf.nets.ODEnet sets it).")
        param = _network_parameter(self)
        dtype = param.dtype if param is not None else torch.get_default_dtype()
        device = param.device if param is not None else None
        z = torch.randn((num_samples,) + shape, generator=generator, dtype=dtype, device=device)
        return self.inverse(z)

    def cnf_blocks(self):
        return [m for m in self.modules() if isinstance(m, CNF)]

    def regularization_terms(self):
        """Unweighted regularization values of the last training forward pass, summed over blocks."""
        totals = {}
        for block in self.cnf_blocks():
            for name, (_, value) in block.last_terms.items():
                totals[name] = totals.get(name, 0.0) + value
        return totals

    def regularization(self):
        """Weighted sum of every regularizer of the last training forward pass (0-dim tensor or 0.0)."""
        total = 0.0
        for block in self.cnf_blocks():
            for weight, value in block.last_terms.values():
                total = total + weight * value
        return total


class CNF(Flow):
    """One CNF block; see the module docstring.

    Args:
        net: dynamics ``net(t, z) -> dz/dt`` (an ``nn.Module``; z is (B, *event)).
        end_time: T as a positive float or a ``TerminalTime`` (trainable, TO-FLOW).
        divergence: estimator name (``fastcnf.cnf.divergence.ESTIMATORS``) or instance, for training.
        test_divergence: estimator used in eval mode (default: the training one).
        regularizers: ``KineticEnergy``, ``JacobianFrobenius``, ``TrajectoryPolynomial`` instances.
        train_solver, test_solver: ``SolverSettings`` for train and eval mode.
        fused_kernel: passed to Hutchinson estimators built from a name.
        event_shape: shape of one sample (default: ``net.event_shape`` if the net has it).
    """

    def __init__(self, net, end_time=1.0, divergence="hutchinson-gaussian", test_divergence=None, regularizers=(),
                 train_solver=None, test_solver=None, fused_kernel=None, event_shape=None):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module f(t, z), got {type(net).__name__}.")
        if not isinstance(end_time, TerminalTime):
            end_time = require_positive("end_time (a number or a TerminalTime)", end_time)
        self.terminal_time = end_time if isinstance(end_time, TerminalTime) else None
        self.fixed_end_time = None if self.terminal_time is not None else end_time
        self.train_estimator = _estimator(divergence, fused_kernel)
        self.test_estimator = self.train_estimator if test_divergence is None else _estimator(test_divergence,
                                                                                              fused_kernel)
        self.dynamics = CNFDynamics(net, self.train_estimator)
        self.regularizers = tuple(regularizers)
        self.train_solver = train_solver if train_solver is not None else SolverSettings()
        self.test_solver = test_solver if test_solver is not None else self.train_solver
        self.event_shape = tuple(event_shape) if event_shape is not None else getattr(net, "event_shape", None)
        self.last_terms = {}

    @property
    def net(self):
        return self.dynamics.net

    def end_time(self):
        """T as a float64 0-dim tensor (differentiable for a TerminalTime)."""
        if self.terminal_time is not None:
            return self.terminal_time()
        return torch.tensor(self.fixed_end_time, dtype=torch.float64)

    def _solver(self):
        return self.train_solver if self.training else self.test_solver

    def _times(self, fractions, device):
        end = self.end_time().to(device)
        return fractions.to(device) * end

    def forward(self, x, logp=None):
        """x (B, *event) -> (z, logp_out); logp_out = logp - int tr(df/dz) dt (logp defaults to 0, shape (B,))."""
        logp = x.new_zeros(x.shape[0]) if logp is None else logp
        active = self.training
        state_regs = tuple(r for r in self.regularizers if r.is_state) if active else ()
        trajectory_regs = tuple(r for r in self.regularizers if not r.is_state) if active else ()
        fractions = self._fractions(trajectory_regs)
        estimator = self.train_estimator if self.training else self.test_estimator
        estimator.resample(x)
        self.dynamics.estimator, self.dynamics.state_regularizers = estimator, state_regs
        state = (x, logp) + tuple(x.new_zeros(x.shape[0]) for _ in state_regs)
        with solve_scope(estimator):
            solution = self._solver().solve(self.dynamics, state, self._times(fractions, x.device))
        self.last_terms = self._terms(state_regs, trajectory_regs, fractions, solution)
        return solution[0][-1], solution[1][-1]

    def _fractions(self, trajectory_regs):
        if not trajectory_regs:
            return torch.tensor([0.0, 1.0], dtype=torch.float64)
        if len(trajectory_regs) > 1:
            raise ValueError("one TrajectoryPolynomial regularizer per CNF block.")
        return trajectory_regs[0].sample_fractions()

    def _terms(self, state_regs, trajectory_regs, fractions, solution):
        terms = {}
        for index, reg in enumerate(state_regs):
            terms[reg.name] = (reg.weight, solution[2 + index][-1].mean())
        for reg in trajectory_regs:
            states = (solution[0], solution[1]) if reg.include_logp else solution[0]
            terms[reg.name] = (reg.weight, reg.penalty(fractions, states))
        if self.training and self.terminal_time is not None:
            terms["terminal_time"] = (1.0, self.terminal_time.penalty())
        return terms

    def inverse(self, z, logp=None):
        """z -> x by integrating from T back to 0.

        Returns x when ``logp`` is None (no divergence is computed), else ``(x, logp_x)`` with
        logp_x = logp + int tr(df/dz) dt (pass log N(z) to get log p(x)).
        """
        times = self._times(torch.tensor([1.0, 0.0], dtype=torch.float64), z.device)
        if logp is None:
            return self._solver().solve(self.net, z, times)[-1]
        estimator = self.train_estimator if self.training else self.test_estimator
        estimator.resample(z)
        self.dynamics.estimator, self.dynamics.state_regularizers = estimator, ()
        with solve_scope(estimator):
            solution = self._solver().solve(self.dynamics, (z, logp), times)
        return solution[0][-1], solution[1][-1]

    def extra_repr(self):
        end = "trainable" if self.terminal_time is not None else f"{self.fixed_end_time}"
        return (f"T={end}, divergence={self.train_estimator.name}, regularizers={list(self.regularizers)}, "
                f"train_solver={self.train_solver}, test_solver={self.test_solver}")


class SequentialFlow(Flow):
    """Blocks applied in order; ``forward`` adds their delta_logp terms, ``inverse`` runs them backwards."""

    def __init__(self, blocks, event_shape=None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        if len(self.blocks) == 0:
            raise ValueError("SequentialFlow needs at least one block.")
        self.event_shape = tuple(event_shape) if event_shape is not None else getattr(self.blocks[0], "event_shape",
                                                                                      None)

    def forward(self, x, logp=None):
        for block in self.blocks:
            x, logp = block(x, logp)
        return x, logp

    def inverse(self, z, logp=None):
        for block in reversed(self.blocks):
            if logp is None:
                z = block.inverse(z)
            else:
                z, logp = block.inverse(z, logp)
        return z if logp is None else (z, logp)
