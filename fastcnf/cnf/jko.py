"""JKO-iFlow: a stack of residual neural-ODE blocks, each trained alone on one JKO step.

Block k moves samples by dx/dt = f_k(t, x) over an interval of length h_k. The flow is the
composition x_0 -> x_1 -> ... -> x_K and, with the divergence integrated along,

    log p(x_0) = log N(x_K; 0, I) + sum_k int tr(df_k/dx)(t, x(t)) dt.

Block k is trained on the JKO (proximal) step of the KL gradient flow toward N(0, I) from the
samples x_{k-1} that the frozen earlier blocks produced (``block_objective``):

    L_k = E[ 1/2 |x_k|^2 - int tr(df_k/dx) dt + |x_k - x_{k-1}|^2 / (2 h_k) ].

Block time (``JKOFlow(block_time=...)``):

    "interval"  block k integrates over its own interval [t_{k-1}, t_k], t_k = h_1 + ... + h_k
                (global time: f_k sees t in its interval); h_k is the integration length AND the
                penalty step (the paper's formulation)
    "unit"      every block integrates over [0, 1] and h_k only weights the penalty (the authors'
                code, hamrel-cxu/JKO-iFlow)

The two are the same dynamics under a change of time: with g_k the unit-time field, the interval
field f_k(t, x) = g_k((t - t_{k-1}) / h_k, x) / h_k gives the same map x_{k-1} -> x_k and the same
integrated divergence, hence the same L_k; a fixed-grid solver with S steps takes the same stages
in both (its step h_k / S on f_k is the step 1 / S on g_k). What differs is the parameterization
the optimizer sees (a net learning g_k / h_k instead of g_k) and the warm start of a new block.

By default a block's solve is differentiated with ``fastcnf.odeint_adjoint`` (the backward pass
solves the adjoint ODE with the same method and grid), so the memory of a training step is that
of one network evaluation, whatever the number of steps or blocks; ``BlockSolver(adjoint=False)``
backpropagates through the solver's operations instead (the gradient of the discrete map).

``fastcnf.training.jko_schedule`` runs the block-wise schedule (warm starts, stopping rule, damped
time reparameterization ``reparameterized_intervals``, refinement ``refinement_selection``).

    flow = JKOFlow(ODEnet(2, (128, 128, 128), "concatsquash", "softplus"), interval=0.5)
    objective = block_objective(flow, 0, x)        # train block 0 on x
    flow.append_block(0.6)                          # block 1, warm-started from block 0
    log_p = flow.eval().log_prob(x)                 # the whole stack
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..ode.adjoint import odeint_adjoint
from ..ode.odeint import odeint
from ..ode.registry import METHODS, check_method
from ..ode.validation import require_bool, require_choice, require_non_negative, require_positive, \
    require_positive_int
from .divergence import make_estimator, solve_scope
from .flow import CNFDynamics, Flow

__all__ = ["BlockSolver", "JKOFlow", "BlockObjective", "block_objective", "movement", "relative_movement",
           "geometric_intervals", "reparameterized_intervals", "refinement_selection", "BLOCK_TIMES"]

BLOCK_TIMES = ("interval", "unit")


@dataclass(frozen=True)
class BlockSolver:
    """How one block's interval is integrated.

    A fixed-grid method (rk4, euler, ..., implicit ones) takes ``steps`` equal steps per block,
    whatever the block's length; an adaptive method (dopri5, ...) uses ``rtol``/``atol``.
    ``adjoint``: differentiate with ``odeint_adjoint`` (same method, grid and tolerances
    backwards) when gradients are recorded; False backpropagates through the solver.
    """

    method: str = "rk4"
    steps: int = 4
    rtol: float = 1e-5
    atol: float = 1e-5
    adjoint: bool = True

    def __post_init__(self):
        check_method(self.method)
        require_positive_int("steps", self.steps)
        require_positive("rtol", self.rtol)
        require_positive("atol", self.atol)
        require_bool("adjoint", self.adjoint)

    @property
    def fixed_grid(self):
        return "grid_constructor" in METHODS[self.method].options

    def grid(self, func, y0, t):
        """``steps + 1`` equally spaced times from t[0] to t[-1] (a ``grid_constructor``)."""
        grid = torch.linspace(float(t[0]), float(t[-1]), self.steps + 1, dtype=t.dtype, device=t.device)
        grid[0], grid[-1] = t[0], t[-1]
        return grid

    def solve(self, func, y0, t0, t1):
        """State at ``t1`` of dy/dt = func(t, y), y(t0) = y0 (tensor or tuple of tensors).

        ``func`` is an ``nn.Module``: under the adjoint its parameters that require gradients
        are the adjoint parameters.
        """
        first = y0[0] if isinstance(y0, tuple) else y0
        times = torch.tensor([t0, t1], dtype=torch.float64, device=first.device)
        options = {"grid_constructor": self.grid} if self.fixed_grid else {}
        solve = odeint_adjoint if self.adjoint and torch.is_grad_enabled() else odeint
        solution = solve(func, y0, times, rtol=self.rtol, atol=self.atol, method=self.method, options=options)
        return tuple(part[-1] for part in solution) if isinstance(solution, tuple) else solution[-1]


def _estimator(divergence):
    return make_estimator(divergence) if isinstance(divergence, str) else divergence


class JKOFlow(Flow):
    """A stack of residual neural-ODE blocks with their own time intervals (see the module docstring).

    Args:
        net: dynamics of the first block, ``net(t, x) -> dx/dt`` on (B, D) states; later blocks
            start as copies of it (``append_block``).
        interval: h_1, the first block's JKO step (and, with ``block_time="interval"``, its length).
        solver: a ``BlockSolver`` for training mode (default: 4 rk4 steps per block, adjoint gradients).
        test_solver: the ``BlockSolver`` of eval mode (density, sampling; default: ``solver``).
        divergence: estimator name (``fastcnf.cnf.divergence.ESTIMATORS``) or instance, for training.
        test_divergence: estimator in eval mode (default: the training one).
        event_shape: shape of one sample (default ``net.event_shape``).
        block_time: ``"interval"`` (block k integrates over [t_{k-1}, t_k]) or ``"unit"`` (every
            block over [0, 1]); see the module docstring.

    The intervals are part of ``state_dict()`` (extra state): loading a state dict with more or
    fewer blocks resizes the stack to match.
    """

    def __init__(self, net, interval, solver=None, divergence="hutchinson-gaussian", test_divergence=None,
                 event_shape=None, block_time="interval", test_solver=None):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module f(t, x), got {type(net).__name__}.")
        self.nets = nn.ModuleList([net])
        self._intervals = [require_positive("interval", interval)]
        self.solver = solver if solver is not None else BlockSolver()
        self.test_solver = test_solver if test_solver is not None else self.solver
        self.train_estimator = _estimator(divergence)
        self.test_estimator = self.train_estimator if test_divergence is None else _estimator(test_divergence)
        self.event_shape = tuple(event_shape) if event_shape is not None else getattr(net, "event_shape", None)
        self.block_time = require_choice("block time", block_time, BLOCK_TIMES)

    # ------------------------------------------------------------------ structure
    @property
    def num_blocks(self):
        return len(self.nets)

    @property
    def intervals(self):
        """(h_1, ..., h_K) as floats."""
        return tuple(self._intervals)

    def boundaries(self):
        """(t_0 = 0, t_1, ..., t_K): the JKO times, t_k = h_1 + ... + h_k."""
        times = [0.0]
        for interval in self._intervals:
            times.append(times[-1] + interval)
        return tuple(times)

    def block_times(self, index):
        """The times block ``index`` (0-based) integrates between: (t_{k-1}, t_k), or (0, 1) with
        ``block_time="unit"``."""
        self._check_index(index)
        if self.block_time == "unit":
            return 0.0, 1.0
        start = sum(self._intervals[:index])
        return start, start + self._intervals[index]

    def _check_index(self, index):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_blocks:
            raise IndexError(f"block index {index!r} out of range for {self.num_blocks} blocks.")

    def append_block(self, interval):
        """Add a block of length ``interval`` after the last one, warm-started from the last block's
        weights; returns its index."""
        interval = require_positive("interval", interval)
        self.nets.append(copy.deepcopy(self.nets[-1]))
        self._intervals.append(interval)
        return self.num_blocks - 1

    def split_block(self, index):
        """Replace block ``index`` by two blocks of half its interval, both copies of it; the second
        one gets index ``index + 1``. With ``block_time="interval"`` the flow field is unchanged;
        with ``"unit"`` each half runs the parent's field for unit time (a warm start, not the
        same map) until it is trained."""
        self._check_index(index)
        half = self._intervals[index] / 2.0
        self.nets.insert(index + 1, copy.deepcopy(self.nets[index]))
        self._intervals[index:index + 1] = [half, self._intervals[index] - half]

    def set_intervals(self, intervals):
        """New lengths (h_1, ..., h_K), one per block."""
        intervals = [require_positive("interval", h) for h in intervals]
        if len(intervals) != self.num_blocks:
            raise ValueError(f"need {self.num_blocks} intervals, got {len(intervals)}.")
        self._intervals = intervals

    def block_parameters(self, index):
        self._check_index(index)
        return list(self.nets[index].parameters())

    def train_only(self, index):
        """Let gradients reach block ``index`` only (every other block is frozen)."""
        self._check_index(index)
        for position, net in enumerate(self.nets):
            net.requires_grad_(position == index)

    def get_extra_state(self):
        return {"intervals": list(self._intervals)}

    def set_extra_state(self, state):
        intervals = [require_positive("interval", h) for h in state["intervals"]]
        if not intervals:
            raise ValueError("a JKOFlow state needs at least one interval.")
        while self.num_blocks > len(intervals):
            del self.nets[-1]
        while self.num_blocks < len(intervals):
            self.nets.append(copy.deepcopy(self.nets[-1]))  # weights follow from the state dict
        self._intervals = intervals

    # ------------------------------------------------------------------ transport
    def _current_solver(self):
        return self.solver if self.training else self.test_solver

    def _current_estimator(self, estimator):
        if estimator is not None:
            return _estimator(estimator)
        return self.train_estimator if self.training else self.test_estimator

    def block_forward(self, index, x, logp=None, estimator=None):
        """x_{k-1} (B, D) -> (x_k, logp - int tr(df_k/dx) dt) through block ``index``.

        ``logp`` (B,) defaults to zeros; ``estimator`` overrides the mode's divergence estimator.
        """
        start, end = self.block_times(index)
        logp = x.new_zeros(x.shape[0]) if logp is None else logp
        estimator = self._current_estimator(estimator)
        estimator.resample(x)
        dynamics = CNFDynamics(self.nets[index], estimator)
        with solve_scope(estimator):
            return self._current_solver().solve(dynamics, (x, logp), start, end)

    def block_inverse(self, index, z, logp=None, estimator=None):
        """x_k -> x_{k-1} by integrating block ``index`` backwards in time.

        Returns x_{k-1} when ``logp`` is None (no divergence is computed), else
        ``(x_{k-1}, logp + int tr(df_k/dx) dt)``.
        """
        start, end = self.block_times(index)
        if logp is None:
            return self._current_solver().solve(self.nets[index], z, end, start)
        estimator = self._current_estimator(estimator)
        estimator.resample(z)
        dynamics = CNFDynamics(self.nets[index], estimator)
        with solve_scope(estimator):
            return self._current_solver().solve(dynamics, (z, logp), end, start)

    def forward(self, x, logp=None):
        """x (B, D) -> (x_K, logp - sum_k int tr(df_k/dx) dt) through every block."""
        for index in range(self.num_blocks):
            x, logp = self.block_forward(index, x, logp)
        return x, logp

    def inverse(self, z, logp=None):
        """x_K -> x_0 through every block backwards (with ``logp``: also logp + sum of the integrals)."""
        for index in reversed(range(self.num_blocks)):
            if logp is None:
                z = self.block_inverse(index, z)
            else:
                z, logp = self.block_inverse(index, z, logp)
        return z if logp is None else (z, logp)

    def extra_repr(self):
        intervals = ", ".join(f"{h:.4g}" for h in self._intervals)
        return (f"intervals=[{intervals}], block_time={self.block_time}, solver={self.solver}, "
                f"test_solver={self.test_solver}, "
                f"divergence={self.train_estimator.name}, "
                f"test_divergence={self.test_estimator.name}")


@dataclass
class BlockObjective:
    """L_k of one batch and its parts (0-dim tensors), plus the pushed samples.

    potential = E 1/2 |x_k|^2, divergence = E int tr(df_k/dx) dt, displacement = E |x_k - x_{k-1}|^2;
    loss = potential - divergence + displacement / (2 h_k). ``x`` (B, D) are the samples x_k and
    ``delta_logp`` (B,) = -int tr(df_k/dx) dt per sample.
    """

    loss: torch.Tensor
    potential: torch.Tensor
    divergence: torch.Tensor
    displacement: torch.Tensor
    x: torch.Tensor
    delta_logp: torch.Tensor


def block_objective(flow, index, x_prev):
    """The JKO-step loss L_k of block ``index`` on the samples x_{k-1} = ``x_prev`` (B, D)."""
    x_next, delta_logp = flow.block_forward(index, x_prev)
    interval = flow.intervals[index]
    potential = 0.5 * x_next.pow(2).sum(dim=1).mean()
    divergence = -delta_logp.mean()
    displacement = (x_next - x_prev).pow(2).sum(dim=1).mean()
    loss = potential - divergence + displacement / (2.0 * interval)
    return BlockObjective(loss, potential, divergence, displacement, x_next, delta_logp)


def movement(x_prev, x_next):
    """W2 proxy of one block's move: sqrt(mean_b |x_next - x_prev|^2) as a float."""
    return math.sqrt(_mean_square(x_next.detach() - x_prev.detach()))


def relative_movement(x_prev, x_next):
    """The paper's stopping statistic E|x_next - x_prev|^2 / E|x_next|^2 as a float (0 when both vanish)."""
    moved, size = _mean_square(x_next.detach() - x_prev.detach()), _mean_square(x_next.detach())
    return moved / size if size > 0 else 0.0


def _mean_square(x):
    return x.double().pow(2).sum(dim=1).mean().item()


def geometric_intervals(h0, rho, count, h_max=math.inf):
    """(h_0, h_0 rho, ..., h_0 rho^(count - 1)), each capped at ``h_max``."""
    h0, rho = require_positive("h0", h0), require_positive("rho", rho)
    if not h_max > 0:
        raise ValueError(f"h_max must be positive, got {h_max!r}.")
    return tuple(min(h0 * rho ** k, h_max) for k in range(require_positive_int("count", count)))


def _check_movements(intervals, movements):
    if len(intervals) != len(movements) or not intervals:
        raise ValueError(f"need one movement per interval, got {len(intervals)} intervals and {len(movements)} "
                         "movements.")
    for value in movements:
        if value is None or not math.isfinite(value) or value < 0:
            raise ValueError(f"movements must be finite and >= 0, got {value!r}.")


def reparameterized_intervals(intervals, movements, *, eta, h_min, h_max):
    """One damped step of the adaptive time reparameterization: new intervals (h'_1, ..., h'_K).

    Block k moved m_k over h_k; at that speed it would move the mean movement m over
    h_k m / m_k. Each interval takes the step ``eta`` (in (0, 1]) towards that value and is
    clipped to [``h_min``, ``h_max``]:

        h'_k = clip(h_k + eta (min(h_k m / m_k, h_max) - h_k), h_min, h_max).

    A block that did not move (m_k = 0) aims at ``h_max``; the other intervals do not depend on
    it except through the mean. All movements zero: the intervals are only clipped.
    """
    intervals = [require_positive("interval", h) for h in intervals]
    _check_movements(intervals, movements)
    if not 0 < eta <= 1:
        raise ValueError(f"eta must be in (0, 1], got {eta!r}.")
    h_min, h_max = require_positive("h_min", h_min), require_positive("h_max", h_max)
    if not h_min <= h_max:
        raise ValueError(f"need h_min <= h_max, got {h_min} and {h_max}.")
    mean = sum(movements) / len(movements)
    updated = []
    for h, m in zip(intervals, movements):
        if mean == 0:
            target = h
        elif m * h_max <= h * mean:  # h m / m_k >= h_max, also when m_k = 0
            target = h_max
        else:
            target = h * mean / m
        updated.append(min(max(h + eta * (target - h), h_min), h_max))
    return tuple(updated)


def refinement_selection(movements, threshold=1.0):
    """Indices of the blocks to split: those whose movement is at least ``threshold`` times the
    mean movement (0 selects every block; at least the block that moved most is always selected)."""
    _check_movements(movements, movements)
    threshold = require_non_negative("threshold", threshold)
    mean = sum(movements) / len(movements)
    largest = max(range(len(movements)), key=lambda k: movements[k])
    return tuple(k for k, m in enumerate(movements) if m >= threshold * mean or k == largest)
