"""Fixed-grid Adams methods: Adams-Bashforth (explicit_adams) and Adams-Bashforth-Moulton
predictor-corrector (implicit_adams / fixed_adams), as in torchdiffeq.

The first steps use the 3/8-rule RK4 until three derivatives are known; after that the order
grows with the history up to ``max_order - 1`` steps. The corrector iterates at most
``max_iters`` times until successive increments agree to rtol/atol (max norm); when it does
not converge torchdiffeq's behaviour is kept (a warning, and the oldest history entry is
dropped).

Difference from torchdiffeq: explicit_adams defaults to ``max_order=5`` (four-step
Adams-Bashforth). torchdiffeq's default of 12 runs the 11-step method, whose stability interval
is about [-0.003, 0]: on y' = -y + sin(t) it returns errors of 1e7 at step size 0.02. Pass
``max_order=12`` to get torchdiffeq's behaviour.
"""

import collections
import warnings

import torch

from ...errors import InvalidOptionError
from ..dynamics import Perturb
from ..explicit.fixed_grid import FixedGridSolver
from ..explicit.stepper import ExplicitRKStepper
from ..explicit.tableaus import RK4
from .coefficients import bashforth, moulton

__all__ = ["Adams", "MAX_ORDER", "MIN_ORDER"]

MIN_ORDER = 4
MAX_ORDER = 12
HISTORY_DTYPE = torch.float64  # the dtype of the sums over the history (see ``Adams._increment``)


class Adams(FixedGridSolver):
    """Adams-Bashforth(-Moulton) on a fixed grid; ``implicit`` selects the corrector."""

    OPTIONS = FixedGridSolver.OPTIONS | {"max_iters", "max_order"}

    def __init__(self, dynamics, y0, rtol, atol, *, implicit, max_iters=4, max_order=None, **options):
        super().__init__(dynamics, y0, rtol, atol, **options)
        if max_order is None:
            max_order = MAX_ORDER if implicit else 5
        max_order = int(max_order)
        if not 1 <= max_order <= MAX_ORDER:
            raise InvalidOptionError(f"max_order must be at most {MAX_ORDER} (and at least 1), got {max_order}.")
        if max_order < MIN_ORDER:
            warnings.warn(f"max_order is below {MIN_ORDER}, so the solver reduces to `rk4`.")
        if int(max_iters) < 1:
            raise InvalidOptionError(f"max_iters must be a positive integer, got {max_iters}.")
        self.implicit = implicit
        self.max_iters = int(max_iters)
        self.max_order = max_order
        self.rk4 = ExplicitRKStepper(RK4, dynamics, y0.numel(), y0.dtype, y0.device, perturb_end=self.perturb)

    def _start(self):
        self.history = collections.deque(maxlen=self.max_order - 1)
        self.history_t = None

    def _remember(self, t, f):
        if self.history_t is None or self.history_t != t:
            self.history.appendleft(f)
            self.history_t = t

    def _increment(self, t0, dt, t1, y0):
        f0 = self.dynamics(t0, y0, Perturb.NEXT if self.perturb else Perturb.NONE)
        self._remember(t0, f0)
        order = min(len(self.history), self.max_order - 1)
        if order < MIN_ORDER - 1:
            _, stages, _ = self.rk4.step(t0, y0, f0, dt, t1)
            return self.rk4.increment(stages, dt), f0
        # The weights of high orders are large and of both signs (up to 133 at order 11), so the sums
        # over the history cancel: they are formed in float64 and the increment rounded once.
        past = torch.stack(tuple(self.history)[:order], 1).to(HISTORY_DTYPE)
        weights = torch.tensor(bashforth(order), dtype=HISTORY_DTYPE, device=y0.device)
        dy = (dt * torch.mv(past, weights)).to(y0.dtype)
        if self.implicit:
            dy = self._correct(t1, dt, y0, dy, past, order)
        return dy, f0

    def _correct(self, t1, dt, y0, dy, past, order):
        """Adams-Moulton fixed-point iterations on the increment ``dy``; ``past`` is in ``HISTORY_DTYPE``."""
        weights = moulton(order + 1)
        history_weights = torch.tensor(weights[1:], dtype=HISTORY_DTYPE, device=y0.device)
        delta = dt * torch.mv(past, history_weights)
        perturb = Perturb.PREV if self.perturb else Perturb.NONE
        converged = False
        for _ in range(self.max_iters):
            dy_old = dy
            f1 = self.dynamics(t1, y0 + dy, perturb)
            dy = (dt * weights[0] * f1 + delta).to(y0.dtype)
            tolerance = self.atol + self.rtol * torch.maximum(dy_old.abs(), dy.abs())
            converged = bool(((dy_old - dy).abs() / tolerance).max() < 1)
            if converged:
                break
        if not converged:
            warnings.warn("Functional iteration did not converge. Solution may be incorrect.")
            self.history.pop()
        return dy
