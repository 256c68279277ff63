"""fastcnf: fast ODE solvers for continuous normalizing flows.

A drop-in replacement for torchdiffeq (``import fastcnf as torchdiffeq``) with the same
signatures and results, plus CNF training tools (TO-FLOW, JKO-iFlow, TPR).
"""

from .errors import (
                     FastCNFError,
                     IgnoredOptionWarning,
                     InvalidOptionError,
                     InvalidStateError,
                     InvalidTimeGridError,
                     InvalidToleranceError,
                     MaxNumStepsError,
                     NonFiniteStateError,
                     NonlinearSolveError,
                     StepSizeUnderflowError,
                     StiffnessWarning,
                     StiffProblemError,
                     UnknownMethodError,
)
from .ode.adjoint import odeint_adjoint
from .ode.odeint import odeint, odeint_dense, odeint_event
from .ode.registry import METHODS
from .stats import SolverStats, track

__version__ = "0.1.0"

__all__ = [
    "odeint",
    "odeint_adjoint",
    "odeint_event",
    "odeint_dense",
    "track",
    "SolverStats",
    "METHODS",
    "FastCNFError",
    "InvalidOptionError",
    "InvalidStateError",
    "InvalidToleranceError",
    "InvalidTimeGridError",
    "MaxNumStepsError",
    "NonFiniteStateError",
    "NonlinearSolveError",
    "StepSizeUnderflowError",
    "StiffProblemError",
    "UnknownMethodError",
    "IgnoredOptionWarning",
    "StiffnessWarning",
]
