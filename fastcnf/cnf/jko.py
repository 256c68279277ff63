"""JKO-iFlow: a stack of residual neural-ODE blocks, each trained alone on one JKO step.

Block k moves samples by dx/dt = f_k(t, x) over its own interval [t_{k-1}, t_k] of length
h_k = t_k - t_{k-1} (t_0 = 0, global time: f_k sees t in its interval). The flow is the
composition x_0 -> x_1 -> ... -> x_K and, with the divergence integrated along,

    log p(x_0) = log N(x_K; 0, I) + sum_k int_{t_{k-1}}^{t_k} tr(df_k/dx)(t, x(t)) dt.

Block k is trained on the JKO (proximal) step of the KL gradient flow toward N(0, I) from the
samples x_{k-1} that the frozen earlier blocks produced (``block_objective``):

    L_k = E[ 1/2 |x_k|^2 - int_{t_{k-1}}^{t_k} tr(df_k/dx) dt + |x_k - x_{k-1}|^2 / (2 h_k) ].

A block's solve is backpropagated directly (no adjoint): one block is small, and the gradient is
that of the discrete map the block applies. ``fastcnf.training.jko_schedule`` runs the block-wise
schedule (warm starts, stopping rule, time reparameterization, refinement).

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

from ..ode.odeint import odeint
from ..ode.registry import METHODS, check_method
from ..ode.validation import require_positive, require_positive_int
from .divergence import make_estimator
from .flow import CNFDynamics, Flow

__all__ = ["BlockSolver", "JKOFlow", "BlockObjective", "block_objective", "movement", "geometric_intervals",
           "reparameterized_intervals"]


@dataclass(frozen=True)
class BlockSolver:
    """How one block's interval is integrated.

    A fixed-grid method (rk4, euler, ..., implicit ones) takes ``steps`` equal steps per block,
    whatever the block's length; an adaptive method (dopri5, ...) uses ``rtol``/``atol``.
    """

    method: str = "rk4"
    steps: int = 4
    rtol: float = 1e-5
    atol: float = 1e-5

    def __post_init__(self):
        check_method(self.method)
        require_positive_int("steps", self.steps)
        require_positive("rtol", self.rtol)
        require_positive("atol", self.atol)

    @property
    def fixed_grid(self):
        return "grid_constructor" in METHODS[self.method].options

    def grid(self, func, y0, t):
        """``steps + 1`` equally spaced times from t[0] to t[-1] (a ``grid_constructor``)."""
        grid = torch.linspace(float(t[0]), float(t[-1]), self.steps + 1, dtype=t.dtype, device=t.device)
        grid[0], grid[-1] = t[0], t[-1]
        return grid

    def solve(self, func, y0, t0, t1):
        """State at ``t1`` of dy/dt = func(t, y), y(t0) = y0 (tensor or tuple of tensors)."""
        first = y0[0] if isinstance(y0, tuple) else y0
        times = torch.tensor([t0, t1], dtype=torch.float64, device=first.device)
        options = {"grid_constructor": self.grid} if self.fixed_grid else {}
        solution = odeint(func, y0, times, rtol=self.rtol, atol=self.atol, method=self.method, options=options)
        return tuple(part[-1] for part in solution) if isinstance(solution, tuple) else solution[-1]


def _estimator(divergence):
    return make_estimator(divergence) if isinstance(divergence, str) else divergence


class JKOFlow(Flow):
    """A stack of residual neural-ODE blocks with their own time intervals (see the module docstring).

    Args:
        net: dynamics of the first block, ``net(t, x) -> dx/dt`` on (B, D) states; later blocks
            start as copies of it (``append_block``).
        interval: h_1, the length of the first block's interval.
        solver: a ``BlockSolver`` (default: 4 rk4 steps per block).
        divergence: estimator name (``fastcnf.cnf.divergence.ESTIMATORS``) or instance, for training.
        test_divergence: estimator in eval mode (default: the training one).
        event_shape: shape of one sample (default ``net.event_shape``).

    The intervals are part of ``state_dict()`` (extra state): loading a state dict with more or
    fewer blocks resizes the stack to match.
    """

    def __init__(self, net, interval, solver=None, divergence="hutchinson-gaussian", test_divergence=None,
                 event_shape=None):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module f(t, x), got {type(net).__name__}.")
        self.nets = nn.ModuleList([net])
        self._intervals = [require_positive("interval", interval)]
        self.solver = solver if solver is not None else BlockSolver()
        self.train_estimator = _estimator(divergence)
        self.test_estimator = self.train_estimator if test_divergence is None else _estimator(test_divergence)
        self.event_shape = tuple(event_shape) if event_shape is not None else getattr(net, "event_shape", None)

    # ------------------------------------------------------------------ structure
    @property
    def num_blocks(self):
        return len(self.nets)

    @property
    def intervals(self):
        """(h_1, ..., h_K) as floats."""
        return tuple(self._intervals)

    def boundaries(self):
        """(t_0 = 0, t_1, ..., t_K): the block boundaries in time."""
        times = [0.0]
        for interval in self._intervals:
            times.append(times[-1] + interval)
        return tuple(times)

    def block_times(self, index):
        """(t_{k-1}, t_k) of block ``index`` (0-based)."""
        self._check_index(index)
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
        """Replace block ``index`` by two blocks of half its length, both copies of it (so the flow
        field is unchanged); the second one gets index ``index + 1``."""
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
        return self.solver.solve(dynamics, (x, logp), start, end)

    def block_inverse(self, index, z, logp=None, estimator=None):
        """x_k -> x_{k-1} by integrating block ``index`` backwards in time.

        Returns x_{k-1} when ``logp`` is None (no divergence is computed), else
        ``(x_{k-1}, logp + int tr(df_k/dx) dt)``.
        """
        start, end = self.block_times(index)
        if logp is None:
            return self.solver.solve(self.nets[index], z, end, start)
        estimator = self._current_estimator(estimator)
        estimator.resample(z)
        dynamics = CNFDynamics(self.nets[index], estimator)
        return self.solver.solve(dynamics, (z, logp), end, start)

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
        return (f"intervals=[{intervals}], solver={self.solver}, divergence={self.train_estimator.name}, "
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
    return math.sqrt((x_next.detach() - x_prev.detach()).double().pow(2).sum(dim=1).mean().item())


def geometric_intervals(h0, rho, count):
    """(h_0, h_0 rho, ..., h_0 rho^(count - 1))."""
    h0, rho = require_positive("h0", h0), require_positive("rho", rho)
    return tuple(h0 * rho ** k for k in range(require_positive_int("count", count)))


def reparameterized_intervals(intervals, movements, floor=1e-8):
    """Re-spaced intervals h'_k proportional to h_k / m_k with the same total time.

    If block k moved m_k over h_k at a roughly constant speed, h'_k makes every block move about
    the same W2 distance. Movements below ``floor`` count as ``floor``.
    """
    if len(intervals) != len(movements) or not intervals:
        raise ValueError(f"need one movement per interval, got {len(intervals)} intervals and {len(movements)} "
                         "movements.")
    intervals = [require_positive("interval", h) for h in intervals]
    for value in movements:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"movements must be finite and >= 0, got {value!r}.")
    weights = [h / max(m, floor) for h, m in zip(intervals, movements)]
    scale = sum(intervals) / sum(weights)
    return tuple(w * scale for w in weights)
