"""Running one problem through fastcnf, torchdiffeq or torchode with the same pinned settings.

``make_solve(library, func, problem, config)`` returns a zero-argument callable that solves
the problem and returns the solution at every output time, in the user's state layout.
torchode solves batches of independent problems; it gets the whole state as one (1, N) row,
so it solves the same joint system (same RMS error norm) as the other two.

``CountingFunc`` wraps the user's function to count its calls per phase (forward solve,
backward pass) and the steps a solver reports through torchdiffeq's step callbacks.
"""

import importlib.util

import torch
import torchdiffeq
from torch import nn

import fastcnf

__all__ = ["LIBRARIES", "UnsupportedCase", "make_solve", "CountingFunc", "AdaptiveCountingFunc",
           "library_version", "HAS_TORCHODE"]

LIBRARIES = ("fastcnf", "torchdiffeq", "torchode")
HAS_TORCHODE = importlib.util.find_spec("torchode") is not None
TORCHODE_METHODS = {"dopri5": "Dopri5", "tsit5": "Tsit5"}


class UnsupportedCase(Exception):
    """The library cannot run this workload (missing package or method); the benchmark is skipped."""


def library_version(library):
    if library == "torchode" and not HAS_TORCHODE:
        return "not installed"
    module = importlib.import_module(library)
    return getattr(module, "__version__", "unknown")


def make_solve(library, func, problem, config):
    """Zero-argument solve of ``problem`` (with ``func`` as its dynamics) through ``library``."""
    if library == "fastcnf":
        return _torchdiffeq_style(fastcnf, func, problem, config)
    if library == "torchdiffeq":
        return _torchdiffeq_style(torchdiffeq, func, problem, config)
    if library == "torchode":
        return TorchodeSolve(func, problem, config)
    raise ValueError(f"unknown library {library!r}; expected one of {LIBRARIES}")


def _torchdiffeq_style(module, func, problem, config):
    if config.adjoint and not hasattr(module, "odeint_adjoint"):
        raise UnsupportedCase(f"{module.__name__} has no odeint_adjoint")
    odeint = module.odeint_adjoint if config.adjoint else module.odeint
    options = dict(config.options) or None

    def solve():
        return odeint(func, problem.y0, problem.t, rtol=config.rtol, atol=config.atol, method=config.method,
                      options=options)

    return solve


class _FlatState:
    """Packs a tensor or tuple state into one flat vector and back (for torchode)."""

    def __init__(self, y0):
        self.is_tuple = isinstance(y0, tuple)
        parts = y0 if self.is_tuple else (y0,)
        self.shapes = [part.shape for part in parts]
        self.sizes = [part.numel() for part in parts]

    def flatten(self, state):
        parts = state if self.is_tuple else (state,)
        return torch.cat([part.reshape(-1) for part in parts])

    def unflatten(self, flat):
        """(..., N) -> state with the leading dimensions kept."""
        lead = flat.shape[:-1]
        parts = [chunk.reshape(*lead, *shape) for chunk, shape in zip(flat.split(self.sizes, dim=-1), self.shapes)]
        return tuple(parts) if self.is_tuple else parts[0]


class TorchodeSolve:
    """torchode's AutoDiffAdjoint with an IntegralController at the pinned tolerances (eager mode).

    The solver objects are built once; each call solves again. ``last_stats`` holds torchode's
    statistics of the latest solve (``n_f_evals``, ``n_steps``, ``n_accepted``).
    """

    def __init__(self, func, problem, config):
        if not HAS_TORCHODE:
            raise UnsupportedCase("torchode is not installed")
        if config.method not in TORCHODE_METHODS:
            raise UnsupportedCase(f"torchode has no {config.method!r} method")
        if config.adjoint:
            raise UnsupportedCase("the torchode adapter runs backprop-through-solver only")
        import torchode

        self.layout = _FlatState(problem.y0)
        self.y0 = self.layout.flatten(problem.y0)[None]
        self.t_eval = problem.t[None]
        layout = self.layout

        def flat_func(t, y):
            return layout.flatten(func(t[0], layout.unflatten(y[0])))[None]

        term = torchode.ODETerm(flat_func)
        step = getattr(torchode, TORCHODE_METHODS[config.method])(term=term)
        controller = torchode.IntegralController(atol=config.atol, rtol=config.rtol, term=term)
        self.solver = torchode.AutoDiffAdjoint(step, controller)
        self.problem_type = torchode.InitialValueProblem
        self.last_stats = None

    def __call__(self):
        solution = self.solver.solve(self.problem_type(y0=self.y0, t_eval=self.t_eval))
        self.last_stats = solution.stats
        return self.layout.unflatten(solution.ys[0])


class CountingFunc(nn.Module):
    """``func(t, y)`` that counts its calls per phase and the steps reported by ``callback_step``.

    Set ``phase`` to "forward" or "backward" around the forward solve and the backward pass.
    A wrapped ``nn.Module`` stays a submodule, so adjoint methods still find its parameters.
    """

    def __init__(self, func):
        super().__init__()
        self.func = func
        self.phase = "forward"
        self.calls = {"forward": 0, "backward": 0}
        self.steps = 0

    def forward(self, t, y):
        self.calls[self.phase] += 1
        return self.func(t, y)

    def callback_step(self, t, y, dt):
        self.steps += 1


class AdaptiveCountingFunc(CountingFunc):
    """``CountingFunc`` that also counts rejected steps (only adaptive methods report them)."""

    def __init__(self, func):
        super().__init__(func)
        self.rejected = 0

    def callback_reject_step(self, t, y, dt):
        self.rejected += 1
