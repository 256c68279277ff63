"""Solver statistics: ``fastcnf.track()`` counts function evaluations and steps.

    with fastcnf.track() as stats:
        loss = odeint_adjoint(func, y0, t).sum()
        loss.backward()
    stats.nfe_forward, stats.nfe_backward, stats.steps_accepted, stats.steps_rejected

Each evaluation of the dynamics adds one to a counter on its solve; the active trackers are updated
once per finished solve (``record_solve``), so counting costs nothing measurable.

``evaluation_budget(limit)`` bounds the evaluations of every solve inside it (forward and adjoint
together): the evaluation that exceeds ``limit`` raises ``EvaluationBudgetError`` in the middle of the
solve, so a solve that would take millions of tiny steps stops instead of stalling.
"""

from contextlib import contextmanager
from dataclasses import dataclass

from .errors import EvaluationBudgetError

__all__ = ["SolverStats", "track", "untracked", "backward_phase", "evaluation_budget", "BUDGETS", "charge_evaluation"]

_ACTIVE = []
_PHASE = ["forward"]
BUDGETS = []  # [limit, used] of every active evaluation_budget(); the dynamics charge them per evaluation


@dataclass
class SolverStats:
    """Counts for every solve run inside a ``track()`` block (forward and adjoint solves)."""

    nfe_forward: int = 0
    nfe_backward: int = 0
    steps_accepted: int = 0
    steps_rejected: int = 0
    solves: int = 0

    @property
    def nfe(self):
        return self.nfe_forward + self.nfe_backward

    def as_dict(self):
        return dict(
            nfe_forward=self.nfe_forward,
            nfe_backward=self.nfe_backward,
            steps_accepted=self.steps_accepted,
            steps_rejected=self.steps_rejected,
            solves=self.solves,
        )


@contextmanager
def track():
    """Context manager yielding a ``SolverStats`` that every solve inside the block updates."""
    stats = SolverStats()
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE.remove(stats)


@contextmanager
def untracked():
    """Solves inside this block are not counted by the ``track()`` blocks around it."""
    hidden = list(_ACTIVE)
    _ACTIVE.clear()
    try:
        yield
    finally:
        _ACTIVE[:0] = hidden


@contextmanager
def backward_phase():
    """Count evaluations inside this block as backward (adjoint) evaluations."""
    _PHASE.append("backward")
    try:
        yield
    finally:
        _PHASE.pop()


def record_solve(dynamics, accepted=0, rejected=0):
    """Add one finished solve to every active tracker: the evaluations counted on ``dynamics``
    (then reset) and the accepted/rejected steps. Evaluations inside ``backward_phase()`` count
    as backward."""
    count, dynamics.nfe = dynamics.nfe, 0
    backward = _PHASE[-1] == "backward"
    for stats in _ACTIVE:
        if backward:
            stats.nfe_backward += count
        else:
            stats.nfe_forward += count
        stats.steps_accepted += accepted
        stats.steps_rejected += rejected
        stats.solves += 1


@contextmanager
def evaluation_budget(limit):
    """Raise ``EvaluationBudgetError`` once the solves inside this block evaluate the dynamics more than
    ``limit`` times; yields the ``[limit, used]`` counter."""
    budget = [int(limit), 0]
    BUDGETS.append(budget)
    try:
        yield budget
    finally:
        BUDGETS.remove(budget)


def charge_evaluation():
    """Count one evaluation against every active budget (called by the dynamics when ``BUDGETS``)."""
    for budget in BUDGETS:
        budget[1] += 1
        if budget[1] > budget[0]:
            raise EvaluationBudgetError(f"the solves evaluated the dynamics more than {budget[0]} times (the "
                                        f"evaluation budget), {_PHASE[-1]} pass.")
