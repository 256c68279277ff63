"""TO-FLOW: a trainable terminal time T for CNF blocks, trained by coordinate descent.

A CNF maps data x to z(T) by dz/dt = f(z, t). TO-FLOW makes T a parameter and alternates updates
of the network weights and of T, with a temporal regularizer (alpha*T or alpha*T^2) and a
projection of T onto [t_min, t_max] after every update. With ``fastcnf.odeint_adjoint`` the
gradient dL/dT comes out of the same backward pass at no extra function evaluation.

Usable with any CNF code that calls ``odeint``/``odeint_adjoint`` with a time tensor:

    T = TerminalTime(init=1.0, alpha=0.01)
    z = odeint_adjoint(func, x, T.integration_times())[-1]
    loss = nll(z) + T.penalty()
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ode.validation import require_choice, require_non_negative, require_positive_int

__all__ = ["TerminalTime", "CoordinateDescent", "terminal_times"]

PARAMETERIZATIONS = ("softplus", "exp")
REGULARIZERS = ("linear", "quadratic")


class TerminalTime(nn.Module):
    """Positive trainable end time T (a 0-dim tensor) of one CNF block.

    Args:
        init: initial T.
        t_min, t_max: the safe range T is projected onto by ``clip_()``.
        parameterization: ``"softplus"`` (T = softplus(raw)) or ``"exp"`` (T = exp(raw)).
        regularizer: ``"linear"`` (alpha*T) or ``"quadratic"`` (alpha*T^2).
        alpha: regularizer weight (>= 0).
    """

    def __init__(self, init=1.0, t_min=0.05, t_max=10.0, parameterization="softplus", regularizer="linear",
                 alpha=0.0):
        super().__init__()
        require_choice("parameterization", parameterization, PARAMETERIZATIONS)
        require_choice("regularizer", regularizer, REGULARIZERS)
        if not 0 < t_min < t_max:
            raise ValueError(f"need 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}.")
        if not t_min <= init <= t_max:
            raise ValueError(f"init={init} must lie in [t_min, t_max] = [{t_min}, {t_max}].")
        require_non_negative("alpha", alpha)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.parameterization, self.regularizer, self.alpha = parameterization, regularizer, float(alpha)
        self.raw = nn.Parameter(torch.tensor(self._inverse(float(init)), dtype=torch.float64))

    def _inverse(self, value):
        if self.parameterization == "exp":
            return math.log(value)
        return value + math.log(-math.expm1(-value))  # inverse softplus, stable for large values

    def forward(self):
        """T as a 0-dim float64 tensor."""
        if self.parameterization == "exp":
            return self.raw.exp()
        return F.softplus(self.raw)

    def integration_times(self, t0=0.0, fractions=None):
        """Differentiable times ``[t0, t0 + T]``, or ``t0 + fractions * T`` for fractions in [0, 1]."""
        end = self()
        if fractions is None:
            return torch.stack([end.new_tensor(t0), t0 + end])
        fractions = torch.as_tensor(fractions, dtype=end.dtype)
        return t0 + fractions * end

    def penalty(self):
        """The temporal regularizer alpha*T or alpha*T^2."""
        end = self()
        return self.alpha * (end if self.regularizer == "linear" else end * end)

    @torch.no_grad()
    def clip_(self):
        """Project T onto [t_min, t_max] (call after every update of T)."""
        value = min(max(float(self()), self.t_min), self.t_max)
        self.raw.fill_(self._inverse(value))

    def extra_repr(self):
        return (f"T={float(self()):.4g}, range=[{self.t_min}, {self.t_max}], {self.parameterization}, "
                f"{self.regularizer} alpha={self.alpha}")


def terminal_times(module):
    """Every TerminalTime inside ``module``."""
    return [m for m in module.modules() if isinstance(m, TerminalTime)]


class CoordinateDescent:
    """Alternating (or joint) updates of network weights and terminal times.

    In ``"alternate"`` mode, ``weight_steps`` iterations update only the weights, then
    ``time_steps`` iterations update only the terminal times, and so on. In ``"joint"`` mode both
    are updated every iteration. Parameters that are not updated in a phase have
    ``requires_grad`` switched off, so the adjoint pass does not compute their gradients.

    Usage per iteration::

        schedule.begin(iteration)      # freezes what this phase does not update
        loss = ...; loss.backward()
        schedule.step()                # steps the active optimizer(s), clips T, zeroes grads
    """

    MODES = ("alternate", "joint")

    def __init__(self, weight_optimizer, time_optimizer, times, weight_steps=1, time_steps=1, mode="alternate"):
        require_choice("mode", mode, self.MODES)
        require_positive_int("weight_steps", weight_steps)
        require_positive_int("time_steps", time_steps)
        self.weight_optimizer, self.time_optimizer = weight_optimizer, time_optimizer
        self.times = list(times)
        self.weight_steps, self.time_steps, self.mode = int(weight_steps), int(time_steps), mode
        self.current = None

    def phase(self, iteration):
        """``"weights"``, ``"time"`` or ``"joint"`` for this iteration (0-based)."""
        if self.mode == "joint":
            return "joint"
        position = iteration % (self.weight_steps + self.time_steps)
        return "weights" if position < self.weight_steps else "time"

    def _set_trainable(self, optimizer, trainable):
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.requires_grad_(trainable)

    def begin(self, iteration):
        """Switch gradients on for what this iteration updates; returns the phase."""
        self.current = self.phase(iteration)
        self._set_trainable(self.weight_optimizer, self.current in ("weights", "joint"))
        self._set_trainable(self.time_optimizer, self.current in ("time", "joint"))
        return self.current

    def step(self):
        if self.current is None:
            raise RuntimeError("call begin(iteration) before step().")
        if self.current in ("weights", "joint"):
            self.weight_optimizer.step()
        if self.current in ("time", "joint"):
            self.time_optimizer.step()
            for terminal_time in self.times:
                terminal_time.clip_()
        self.weight_optimizer.zero_grad(set_to_none=True)
        self.time_optimizer.zero_grad(set_to_none=True)

    def state_dict(self):
        return {"weights": self.weight_optimizer.state_dict(), "time": self.time_optimizer.state_dict()}

    def load_state_dict(self, state):
        self.weight_optimizer.load_state_dict(state["weights"])
        self.time_optimizer.load_state_dict(state["time"])
