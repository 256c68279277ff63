"""Benchmark workloads: one ODE problem, one pinned solver configuration, one autograd mode.

A ``Workload`` is library-agnostic. Its ``build`` makes the problem (dynamics, initial state,
output times, loss) from a fixed seed, so each library gets identical networks and data. Its
``name`` is the pytest-benchmark group: the report pairs the libraries' results by group.

Problem builders for reuse by every suite: ``decay_problem`` (trivial linear dynamics, the
solver-overhead probe) and ``ffjord_2d_problem`` (a 2-D FFJORD-style CNF with exact divergence).
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .models import ConcatMLP, ExactDivergenceCNF, HutchinsonCNF, eight_gaussians, standard_normal_logpdf

__all__ = ["SolverConfig", "Problem", "Workload", "decay_problem", "ffjord_2d_problem", "final_state",
           "ADAPTIVE_METHODS"]

ADAPTIVE_METHODS = frozenset({"dopri8", "dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun"})


@dataclass(frozen=True)
class SolverConfig:
    """Pinned solver settings, passed unchanged to every library."""

    method: str
    rtol: float
    atol: float
    options: dict = field(default_factory=dict)
    adjoint: bool = False

    @property
    def adaptive(self):
        return self.method in ADAPTIVE_METHODS

    def describe(self):
        if self.adaptive:
            return f"{self.method} rtol={self.rtol:g} atol={self.atol:g}"
        return f"{self.method} " + " ".join(f"{key}={value}" for key, value in self.options.items())


@dataclass
class Problem:
    """An initial value problem plus the loss used when backpropagating through the solver.

    Attributes:
        func: ``func(t, y)`` on the user's state (a tensor or a tuple of tensors).
        y0: initial state.
        t: (T,) output times; benchmarks use the state at ``t[-1]``.
        loss: maps the state at ``t[-1]`` to a scalar.
        inputs: tensors the loss is differentiated with respect to (made to require grad in
            backprop mode).
        reference: the exact state at ``t[-1]`` when known, else None.
    """

    func: Callable
    y0: object
    t: torch.Tensor
    loss: Callable
    inputs: tuple
    reference: Optional[object] = None


@dataclass(frozen=True)
class Workload:
    """One benchmark case, run once per library.

    Attributes:
        name: readable unique name; the pytest-benchmark group.
        build: ``build(device) -> Problem``, deterministic.
        solver: the pinned ``SolverConfig``.
        backprop: also differentiate ``problem.loss`` through the solve (else run under no_grad).
        accuracy: largest allowed max-abs deviation of the final state from ``problem.reference``
            (or, without one, from torchdiffeq's result); guards against timing a wrong answer.
        state: the state's shape as text, for the report.
    """

    name: str
    build: Callable
    solver: SolverConfig
    backprop: bool
    accuracy: float
    state: str

    @property
    def mode(self):
        return "backprop" if self.backprop else "inference"

    @property
    def id(self):
        """pytest id: the name with separators only."""
        text = self.name.replace(", ", "x").replace(",", "").replace("(", " ").replace(")", " ")
        return "-".join(text.split())


def final_state(solution):
    """The last time slice of a solution (tensor or tuple of tensors)."""
    if isinstance(solution, tuple):
        return tuple(part[-1] for part in solution)
    return solution[-1]


def decay_problem(shape, *, rate=0.5, t_end=10.0, seed=0, dtype=torch.float32):
    """dy/dt = -rate * y on a random state of ``shape``; loss = sum of y(t_end); exact reference."""

    def decay(t, y):
        return -rate * y

    def build(device):
        generator = torch.Generator().manual_seed(seed)
        y0 = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        t = torch.tensor([0.0, t_end], dtype=dtype, device=device)
        return Problem(func=decay, y0=y0, t=t, loss=torch.sum, inputs=(y0,),
                       reference=y0 * math.exp(-rate * t_end))

    return build


def ffjord_2d_problem(batch=512, *, hidden=(64, 64, 64), weight_scale=4.0, t_end=1.0, seed=0,
                      dtype=torch.float32, divergence="exact", time_gradient=False):
    """FFJORD-style 2-D CNF on 8-Gaussians data: state ``(z (B, 2), logp (B, 1))``.

    The network's default initial weights are multiplied by ``weight_scale``: at the default
    initialisation the flow is nearly linear and dopri5 at 1e-5 needs 3 steps, while a scale
    of 4 gives a trained-looking nonlinear flow (about 18 steps, some rejected).

    Loss: the negative mean log-likelihood, -mean(log N(z(T)) - logp(T)); differentiated with
    respect to the network parameters (and, with ``time_gradient``, the output times, as a
    trainable terminal time needs). ``divergence`` is ``"exact"`` or ``"hutchinson"`` (Gaussian
    noise fixed by the seed).
    """

    def build(device):
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net = ConcatMLP((2, *hidden, 2))
        with torch.no_grad():
            for layer in net.layers:
                layer.weight.mul_(weight_scale)
        x = eight_gaussians(batch, generator, dtype).to(device)
        if divergence == "exact":
            func = ExactDivergenceCNF(net)
        else:
            func = HutchinsonCNF(net, torch.randn(batch, 2, generator=generator, dtype=dtype))
        func = func.to(device=device, dtype=dtype)
        y0 = (x, torch.zeros(batch, 1, dtype=dtype, device=device))
        t = torch.tensor([0.0, t_end], dtype=dtype, device=device)

        def negative_log_likelihood(state):
            z, logp = state
            return -(standard_normal_logpdf(z) - logp[:, 0]).mean()

        inputs = tuple(func.parameters()) + ((t,) if time_gradient else ())
        return Problem(func=func, y0=y0, t=t, loss=negative_log_likelihood, inputs=inputs)

    return build
