"""Exception types raised by fastcnf.

torchdiffeq reports most solver failures and several input errors with bare ``assert``
statements, so code written against it catches ``AssertionError``. Every error that
torchdiffeq raises by ``assert`` derives here from ``AssertionError`` as well as from the
builtin type that describes it, so both ``except AssertionError`` (torchdiffeq style) and
``except RuntimeError`` / ``ValueError`` / ``TypeError`` keep working.
"""

__all__ = [
    "FastCNFError",
    "InvalidStateError",
    "InvalidToleranceError",
    "InvalidTimeGridError",
    "InvalidOptionError",
    "UnknownMethodError",
    "NonFiniteStateError",
    "StepSizeUnderflowError",
    "MaxNumStepsError",
    "NonlinearSolveError",
    "EvaluationBudgetError",
    "IgnoredOptionWarning",
    "StiffnessWarning",
    "StiffProblemError",
]


class FastCNFError(Exception):
    """Base class of every error raised by fastcnf itself."""


class InvalidStateError(FastCNFError, TypeError, AssertionError):
    """``y0`` is not a floating point tensor or a tuple of them sharing one dtype."""


class InvalidToleranceError(FastCNFError, ValueError, AssertionError):
    """``rtol`` or ``atol`` is negative, requires grad, or does not match a tuple state."""


class InvalidTimeGridError(FastCNFError, ValueError, AssertionError):
    """The time tensor ``t`` is not a strictly monotone 1-D floating point tensor."""


class InvalidOptionError(FastCNFError, ValueError, AssertionError):
    """An option name is unknown, not accepted by the chosen method, or has a bad value."""


class UnknownMethodError(FastCNFError, ValueError):
    """The ``method`` string names no solver."""


class NonFiniteStateError(FastCNFError, FloatingPointError, AssertionError):
    """NaN or Inf appeared in the state, the dynamics or the step size."""


class StepSizeUnderflowError(FastCNFError, RuntimeError, AssertionError):
    """The adaptive step size became too small to advance time."""


class MaxNumStepsError(FastCNFError, RuntimeError, AssertionError):
    """The solver took ``max_num_steps`` steps without reaching the next output time."""


class NonlinearSolveError(FastCNFError, RuntimeError):
    """The nonlinear solve of an implicit method did not converge."""


class EvaluationBudgetError(FastCNFError, RuntimeError):
    """The solves inside ``fastcnf.stats.evaluation_budget(limit)`` evaluated the dynamics more than ``limit``
    times."""


class IgnoredOptionWarning(UserWarning):
    """An option the chosen method does not use was ignored (torchdiffeq warns about it too);
    ``FASTCNF_STRICT_OPTIONS=1`` makes it an ``InvalidOptionError``."""


class StiffnessWarning(UserWarning):
    """An adaptive explicit solve kept taking steps limited by stability rather than accuracy."""


class StiffProblemError(FastCNFError, RuntimeError):
    """The stiffness check found a stiff problem and ``options=dict(stiffness="error")`` was given."""
