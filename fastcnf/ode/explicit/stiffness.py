"""Stiffness detection for the adaptive explicit solvers, from stages already computed.

An explicit Runge-Kutta step is stable only while h * lambda stays inside the method's stability
region. On a stiff problem the accuracy demand allows long steps but the stiff eigenvalues do not: the
controller pins h * |lambda| at the region's edge and the solve creeps along for millions of steps.
Hairer's DOPRI5 notices this from two stages the step evaluated at the same time: for stages a and b
with equal nodes (for dopri5 and tsit5 the sixth stage and the FSAL stage, both at t0 + h),

    k_a - k_b = f(t, Y_a) - f(t, Y_b) ~ J (Y_a - Y_b),    Y_a - Y_b = h * sum_j (a_aj - a_bj) k_j,

so  h * |lambda| ~ ||k_a - k_b|| / ||sum_j (a_aj - a_bj) k_j||,  two combinations of the (S, N)
stages and no evaluation of f (the estimate does not depend on h). A step counts as stability-limited
when this exceeds 98% of the method's stability boundary on the negative real axis (3.24 for dopri5,
Hairer's 3.25; 3.44 for tsit5; 5.06 for dopri8). After ``RUN`` such steps, with fewer than ``RESET``
unlimited ones between any two, and when the stability limit costs more than ``MIN_STEPS`` steps over
the solve's span (``|t_end - t_0|``; for an event search, the span covered so far), the solve warns
once (``StiffnessWarning``) naming t and suggesting
an implicit method; ``options=dict(stiffness="error")`` raises ``StiffProblemError`` instead and
``stiffness="off"`` turns the check off. The test runs on every ``CHECK_EVERY``-th accepted step and
on every step while a run is building (Hairer: every 1000th), so it costs nothing measurable.

bosh3, fehlberg2 and adaptive_heun evaluate no two stages at one node, so their stages give no such
estimate (stages at different times mix in df/dt); the check is off for them, and asking for it
explicitly (``stiffness="warn"`` or ``"error"``) is an ``InvalidOptionError``. The sync-free device
loop (CUDA) does not run the check.
"""

import functools
import warnings

import numpy as np
import torch

from ...errors import InvalidOptionError, StiffnessWarning, StiffProblemError

__all__ = ["StiffnessCheck", "STIFFNESS_CHOICES", "stability_boundary", "stage_pair", "RUN", "RESET", "CHECK_EVERY",
           "MIN_STEPS"]

STIFFNESS_CHOICES = ("warn", "error", "off")
RUN = 15  # stability-limited steps that make a problem stiff (Hairer's 15)
RESET = 6  # consecutive unlimited steps that end a run (Hairer's 6)
CHECK_EVERY = 50  # accepted steps between two checks while no run is building
EDGE = 0.98  # fraction of the stability boundary above which a step counts as stability-limited
MIN_STEPS = 1000  # a stability limit that costs fewer steps over the solve's span is not worth a warning


def stage_pair(tableau):
    """(a, b): the last stage and the latest earlier stage with the same node, or None."""
    last = tableau.stages - 1
    for other in range(last - 1, 0, -1):
        if tableau.c[other] == tableau.c[last]:
            return last, other
    return None


@functools.lru_cache(maxsize=None)
def stability_boundary(tableau):
    """Largest x with |R(-s)| <= 1 for all s in [0, x]: where the real axis leaves the stability region
    of the propagated solution, R(z) = 1 + z b^T (I - z A)^-1 1 (to 1e-3)."""
    stages = tableau.stages
    a = np.zeros((stages, stages))
    for i, row in enumerate(tableau.a):
        a[i, :len(row)] = row
    b, ones = np.array(tableau.b), np.ones(stages)
    s = 0.0
    while abs(1 - (s + 1e-3) * b @ np.linalg.solve(np.eye(stages) + (s + 1e-3) * a, ones)) <= 1:
        s += 1e-3
    return s


class StiffnessCheck:
    """Watches the accepted steps of one solve (``observe``) for a run of stability-limited steps.

    Args:
        tableau: the solver's ``ButcherTableau``.
        mode: ``"warn"``, ``"error"`` or ``"off"``; None means ``"warn"`` where the tableau allows it.
    """

    def __init__(self, tableau, mode=None):
        pair = stage_pair(tableau)
        if mode is not None and mode != "off" and pair is None:
            raise InvalidOptionError(
                f"option 'stiffness'={mode!r}: {tableau.name} evaluates no two stages at the same time, so its "
                "stages give no stiffness estimate; use dopri5, tsit5 or dopri8 for the check.")
        self.mode = "off" if pair is None else (mode or "warn")
        self.name = tableau.name
        self.limit = EDGE * stability_boundary(tableau)
        self.steps = self.limited = self.unlimited = 0
        self.reported = False
        self.t_start, self.span = 0.0, None
        if self.mode != "off":
            a, b = pair
            difference = np.zeros(tableau.stages)
            difference[:len(tableau.a[a])] += tableau.a[a]
            difference[:len(tableau.a[b])] -= tableau.a[b]
            derivative = np.zeros(tableau.stages)
            derivative[a], derivative[b] = 1.0, -1.0
            self.weights = torch.tensor(np.stack([derivative, difference]), dtype=torch.float64)

    @property
    def active(self):
        return self.mode != "off" and not self.reported

    def begin(self, t_start, t_end=None):
        """The solve runs from ``t_start`` to ``t_end`` (None: an event search, open-ended)."""
        self.t_start = t_start
        self.span = None if t_end is None else abs(t_end - t_start)

    def estimate(self, stages):
        """h * |lambda| from the (S, N) stages of a step (``inf`` is never returned: 0/0 counts as 0)."""
        with torch.no_grad():
            weights = self.weights.to(stages.device)
            numerator, denominator = torch.linalg.vector_norm(weights @ stages.detach().double(), dim=1).tolist()
        return numerator / denominator if denominator > 0 else 0.0

    def observe(self, stages, t, dt):
        """Account for an accepted step ending at user time ``t`` with (S, N) ``stages`` and size ``dt``."""
        if not self.active:
            return
        self.steps += 1
        if self.limited == 0 and self.steps % CHECK_EVERY:
            return
        h_lambda = self.estimate(stages)
        if h_lambda <= self.limit:
            self.unlimited += 1
            if self.unlimited >= RESET:
                self.limited = 0
            return
        self.unlimited = 0
        self.limited += 1
        if self.limited < RUN:
            return
        span = self.span if self.span is not None else abs(t - self.t_start)
        if span < MIN_STEPS * abs(dt):  # a stability limit this mild costs little: watch on
            self.limited = 0
            return
        self.reported = True
        self._report(t, dt, h_lambda, span)

    def _report(self, t, dt, h_lambda, span):
        message = (
            f"the problem seems to have become stiff at t={t!r}: {self.name}'s last {RUN} checked steps were "
            f"limited by stability, not accuracy (h*|lambda| ~ {h_lambda:.3g} at the edge of its stability region, "
            f"|lambda| ~ {h_lambda / dt:.3g} with dt={dt:.3g}), so it needs about {h_lambda / dt / self.limit:.3g} "
            f"steps per unit of time ({span / abs(dt):.3g} steps over a span of {span:.3g}). "
            "Use an implicit method: method='scipy_solver' with "
            "options=dict(solver='LSODA') (adaptive, no gradients), or a fixed-grid implicit method such as "
            "method='radauIIA5' or 'trbdf2' with a step_size.")
        if self.mode == "error":
            raise StiffProblemError(message + " (options=dict(stiffness='error') stopped the solve.)")
        warnings.warn(message + " Pass options=dict(stiffness='error') to stop such solves.", StiffnessWarning,
                      stacklevel=5)
