"""TO-FLOW (Du et al., CVPR 2022): a trainable terminal time T for CNF blocks, trained by coordinate descent.

A CNF maps data x to z(T) by dz/dt = f(z, t). TO-FLOW makes T a parameter, adds a temporal
regularizer R(T) to the loss and updates the network weights and T in turn, projecting T onto a
safe range [t_min, t_max] after every update of T. The choices here, and why:

- T is the parameter itself (a float64 scalar, no softplus or exp), as in the authors' code; the
  projection keeps it positive. Its gradient is then dL/dT in nats per unit of time.
- R(T) = alpha*T (the authors' form; alpha*T^2 is available). With plain gradient descent on T the
  stationary T satisfies E[dNLL/dT] + R'(T) = 0: alpha is the marginal likelihood (nats per unit of
  time) worth giving up for a shorter integration, which is what a penalty weight means.
- T is stepped by SGD with momentum (``time_optimizer``), learning rate in units of time^2 per nat.
  The authors used Adam, under which alpha loses that meaning: Adam's step is about
  lr * sign(dNLL/dT + alpha) whenever the sign is consistent, so once the weights have adapted to the
  current T (dNLL/dT near 0) T drifts down at lr per step for every alpha > 0 and alpha only sets a
  threshold. Momentum leaves the stationary point unchanged and averages the minibatch noise.
- dL/dT comes out of fastcnf's adjoint pass at no extra function evaluation:
  dL/dT = a(T) . F(T, s(T)), the adjoint at T dotted with the augmented dynamics at T, which the
  backward solve evaluates first anyway (``fastcnf.ode.adjoint``). Each block's T gets the exact
  gradient of the whole loss (the authors' code keeps only the last block's and scales part of it
  by 1/batch). Passing one ``TerminalTime`` to every block gives the authors' shared T; its
  gradient is then the sum over the blocks.

``CoordinateDescent`` runs the schedule: ``"joint"`` steps the weights and T from the same forward
and backward pass (the authors' released code; T's gradient is free), ``"alternate"`` gives T
iterations of its own (the paper's coordinate descent; those iterations cost a full pass each).

Usable with any CNF code that calls ``odeint``/``odeint_adjoint`` with a time tensor::

    T = TerminalTime(init=1.0, alpha=0.1)
    z = odeint_adjoint(func, x, T.integration_times())[-1]
    loss = nll(z) + T.penalty()
"""

import torch
import torch.nn as nn

from ..ode.validation import require_choice, require_non_negative, require_positive, require_positive_int

__all__ = ["TerminalTime", "CoordinateDescent", "terminal_times", "time_optimizer"]

REGULARIZERS = ("linear", "quadratic")
SCHEDULES = ("joint", "alternate")


class TerminalTime(nn.Module):
    """Trainable end time T of a CNF block: a float64 0-dim parameter kept in [t_min, t_max].

    Args:
        init: initial T (the authors start at 1).
        t_min, t_max: the safe range ``clip_()`` projects T onto (the authors': [0.1, 1.9]).
        regularizer: ``"linear"`` (alpha*T) or ``"quadratic"`` (alpha*T^2).
        alpha: regularizer weight (>= 0), in the loss's units per unit of time.
    """

    def __init__(self, init=1.0, t_min=0.1, t_max=1.9, regularizer="linear", alpha=0.0):
        super().__init__()
        require_choice("regularizer", regularizer, REGULARIZERS)
        if not 0 < t_min < t_max:
            raise ValueError(f"need 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}.")
        if not t_min <= init <= t_max:
            raise ValueError(f"init={init} must lie in [t_min, t_max] = [{t_min}, {t_max}].")
        require_non_negative("alpha", alpha)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.regularizer, self.alpha = regularizer, float(alpha)
        self.value = nn.Parameter(torch.tensor(float(init), dtype=torch.float64))

    def forward(self):
        """T as a 0-dim float64 tensor."""
        return self.value

    def integration_times(self, t0=0.0, fractions=None):
        """Differentiable times ``[t0, t0 + T]``, or ``t0 + fractions * T`` for fractions in [0, 1]."""
        end = self.value
        if fractions is None:
            return torch.stack([end.new_tensor(t0), t0 + end])
        fractions = torch.as_tensor(fractions, dtype=end.dtype, device=end.device)
        return t0 + fractions * end

    def penalty(self):
        """The temporal regularizer alpha*T or alpha*T^2 (0-dim tensor)."""
        end = self.value
        return self.alpha * (end if self.regularizer == "linear" else end * end)

    @torch.no_grad()
    def clip_(self):
        """Project T onto [t_min, t_max] (call after every update of T)."""
        self.value.clamp_(self.t_min, self.t_max)

    def extra_repr(self):
        return (f"T={float(self.value):.4g}, range=[{self.t_min}, {self.t_max}], "
                f"{self.regularizer} alpha={self.alpha}")


def terminal_times(module):
    """Every distinct TerminalTime inside ``module``."""
    return [m for m in module.modules() if isinstance(m, TerminalTime)]


def time_optimizer(times, lr=0.01, momentum=0.9):
    """SGD with momentum over the terminal times (see the module docstring for why not Adam).

    ``lr`` is in units of time^2 per nat: a constant gradient g moves T by about lr * g / (1 - momentum)
    per step.
    """
    require_positive("time lr", lr)
    if not 0 <= momentum < 1:
        raise ValueError(f"time momentum must lie in [0, 1), got {momentum}.")
    return torch.optim.SGD([p for t in times for p in t.parameters()], lr=lr, momentum=momentum)


class CoordinateDescent:
    """Updates of the network weights and the terminal times in a ratio ``weight_steps : time_steps``.

    ``schedule="joint"`` (default, the authors' released code): every iteration steps the weights;
    the last ``time_steps`` iterations of each cycle of ``weight_steps`` also step T, from the same
    pass (so ``time_steps <= weight_steps``; 1:1 steps both every iteration). T's gradient costs
    nothing extra.
    ``schedule="alternate"`` (the paper's coordinate descent): ``weight_steps`` iterations update only
    the weights, then ``time_steps`` iterations update only T, each with its own pass.

    Parameters not updated in an iteration have ``requires_grad`` switched off, so the adjoint pass
    does not compute their gradients.

    Usage per iteration::

        schedule.begin(iteration)      # freezes what this iteration does not update; returns the phase
        loss = ...; loss.backward()
        schedule.step()                # steps the active optimizer(s), clips T, zeroes grads
    """

    def __init__(self, weight_optimizer, time_optimizer, times, weight_steps=1, time_steps=1, schedule="joint"):
        require_choice("schedule", schedule, SCHEDULES)
        require_positive_int("weight_steps", weight_steps)
        require_positive_int("time_steps", time_steps)
        if schedule == "joint" and time_steps > weight_steps:
            raise ValueError(f"the joint schedule steps T together with the weights, so time_steps={time_steps} "
                             f"cannot exceed weight_steps={weight_steps}; use schedule='alternate'.")
        self.weight_optimizer, self.time_optimizer = weight_optimizer, time_optimizer
        self.times = list(times)
        self.weight_steps, self.time_steps, self.schedule = int(weight_steps), int(time_steps), schedule
        self.current = None

    def phase(self, iteration):
        """``"weights"``, ``"time"`` or ``"joint"`` (both) for this iteration (0-based)."""
        if self.schedule == "joint":
            position = iteration % self.weight_steps
            return "joint" if position >= self.weight_steps - self.time_steps else "weights"
        position = iteration % (self.weight_steps + self.time_steps)
        return "weights" if position < self.weight_steps else "time"

    @staticmethod
    def _set_trainable(optimizer, trainable):
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
