"""The C++ extension ``fastcnf._C`` behind a checked boundary.

The extension is built with pybind11 only (no torch headers), so tensors reach it as raw data
pointers. This module is the only place that takes them: before a pointer crosses, the tensor's
dtype, device, contiguity and size are checked against what the C++ code will read, and a
mismatch raises ``NativeBoundaryError`` naming the tensor instead of letting C++ read the wrong
bytes. ``HAS_EXT`` says whether the extension is there; without it the package warns and runs on
the Python reference (``FASTCNF_REQUIRE_EXTENSION=1`` turns that warning into an ImportError).
"""

import math
import os
import warnings

import torch

from ..errors import FastCNFError

__all__ = ["HAS_EXT", "NATIVE_DTYPES", "NativeBoundaryError", "CpuStageCombiner", "CppStepController",
           "cpp_propose_step", "native_status_codes"]

NATIVE_DTYPES = (torch.float32, torch.float64)

try:
    from .. import _C
except ImportError as _error:  # the package still works, with the Python controller
    if os.environ.get("FASTCNF_REQUIRE_EXTENSION", "0") == "1":
        raise ImportError(f"FASTCNF_REQUIRE_EXTENSION=1 but the C++ extension fastcnf._C did not load ({_error}); "
                          "reinstall with a C++ compiler and pybind11.") from _error
    _C = None
    warnings.warn(
        f"fastcnf: the C++ extension fastcnf._C is not available ({_error}); using the pure-Python "
        "step-size controller. Reinstall with a C++ compiler to build it.",
        RuntimeWarning,
        stacklevel=2,
    )

HAS_EXT = _C is not None


class NativeBoundaryError(FastCNFError, TypeError):
    """A tensor about to be handed to the C++ extension has the wrong dtype, device, layout or size."""


def _pointer(tensor, dtype, numel, name):
    """``tensor.data_ptr()`` after checking it is a contiguous CPU tensor of ``dtype`` with ``numel`` elements."""
    if tensor.dtype is not dtype or not tensor.is_cpu or not tensor.is_contiguous() or tensor.numel() != numel:
        raise NativeBoundaryError(
            f"{name} must be a contiguous CPU {dtype} tensor of {numel} elements for the C++ extension, got a "
            f"{'contiguous' if tensor.is_contiguous() else 'non-contiguous'} {tensor.device} {tensor.dtype} tensor "
            f"of {tensor.numel()} elements.")
    return tensor.data_ptr()


def _stage_rows(stages, dtype, rows, numel, name):
    """Pointer to an (S, N) stage buffer whose first ``rows`` rows the C++ code reads (row stride N)."""
    shape = stages.shape
    if len(shape) != 2 or shape[0] < rows or shape[1] != numel:
        raise NativeBoundaryError(f"{name} must be an (S >= {rows}, {numel}) tensor, got shape {tuple(shape)}.")
    return _pointer(stages, dtype, shape[0] * numel, name)


def _check_dtype(dtype):
    if dtype not in NATIVE_DTYPES:
        raise NativeBoundaryError(f"the C++ extension handles float32 and float64 states, got {dtype}.")


def native_status_codes():
    """The extension's status vocabulary ``{name: value}`` (equal to ``fastcnf.ode.control.Status``)."""
    return dict(_C.STATUS)


class CpuStageCombiner:
    """Runge-Kutta stage inputs ``y0 + dt * sum_j a_ij k_j`` and solution updates in one C++ pass.

    The results are new tensors that this class allocates (of ``shape``, default (N,)); the tensors
    it reads are checked once when they are handed in (``bind`` for an (S, N) stage buffer and then
    ``start`` for each step's y0, ``separate`` for stages held as separate tensors).

    Args:
        a: the strictly lower triangular rows of the tableau (row ``i`` has ``i`` entries).
        b: (S,) solution weights.
        dtype: float32 or float64, the state dtype.
        numel: N, the size of the flat state.
        shape: shape of the stage inputs handed to the dynamics (N elements; default (N,)).
    """

    def __init__(self, a, b, dtype, numel, shape=None):
        _check_dtype(dtype)
        self.dtype, self.numel = dtype, int(numel)
        self.shape = (self.numel,) if shape is None else tuple(shape)
        if math.prod(self.shape) != self.numel:
            raise NativeBoundaryError(f"shape {self.shape} does not hold {self.numel} elements.")
        self.row_lengths = [len(row) for row in a]
        self.solution_length = len(b)
        self._cpp = _C.CpuStageCombiner([list(row) for row in a], list(b), dtype == torch.float64)
        self._input_template = torch.empty(self.shape, dtype=dtype)  # torch.empty_like is the cheapest allocation
        self._flat_template = self._input_template.view(-1)

    def bind(self, stages):
        """Combinations reading the rows of the (S, N) buffer ``stages`` (checked here, once)."""
        rows = max(self.row_lengths + [self.solution_length])
        return _BufferStages(self, _stage_rows(stages, self.dtype, rows, self.numel, "stages"))

    def separate(self, y0):
        """Combinations of ``y0`` (N,) and stages appended one tensor at a time."""
        return _SeparateStages(self, _pointer(y0, self.dtype, self.numel, "y0"))


class _BufferStages:
    """Stage inputs from an (S, N) buffer (row stride N) bound by ``CpuStageCombiner.bind``; ``start(y0)``
    checks and sets the state each step starts from."""

    __slots__ = ("combiner", "stages", "y0", "_stage", "_solution", "_template", "_numel")

    def __init__(self, combiner, stages):
        self.combiner, self.stages, self.y0 = combiner, stages, None
        self._stage, self._solution = combiner._cpp.stage, combiner._cpp.solution
        self._template, self._numel = combiner._input_template, combiner.numel

    def start(self, y0):
        """Set (and check) the (N,) state the next combinations start from; returns self."""
        self.y0 = _pointer(y0, self.combiner.dtype, self._numel, "y0")
        return self

    def stage_input(self, index, dt):
        """Input of stage ``index``: ``y0 + dt * a[index] @ stages[:index]``, of the combiner's shape."""
        out = torch.empty_like(self._template)
        self._stage(index, out.data_ptr(), self.y0, self.stages, self._numel, self._numel, dt)
        return out

    def solution(self, dt):
        """``y0 + dt * b @ stages`` as a new (N,) tensor."""
        out = torch.empty_like(self.combiner._flat_template)
        self._solution(out.data_ptr(), self.y0, self.stages, self._numel, self._numel, dt)
        return out


class _SeparateStages:
    """Stage inputs from stages held as separate tensors (``CpuStageCombiner.separate``): each stage is
    checked once when appended (converted to the state dtype and made contiguous if needed)."""

    __slots__ = ("combiner", "y0", "pointers", "tensors")

    def __init__(self, combiner, y0):
        self.combiner, self.y0, self.pointers, self.tensors = combiner, y0, [], []

    def append(self, stage):
        """Adopt the next stage (N elements on the CPU); returns the tensor whose pointer is kept."""
        combiner = self.combiner
        if stage.dtype is not combiner.dtype or not stage.is_contiguous():
            stage = stage.to(combiner.dtype).contiguous()
        if not stage.is_cpu or stage.numel() != combiner.numel:
            _pointer(stage, combiner.dtype, combiner.numel, f"stage {len(self.pointers)}")  # raises, naming it
        self.pointers.append(stage.data_ptr())
        self.tensors.append(stage)
        return stage

    def stage_input(self, index, dt):
        """Input of stage ``index`` from the first ``index`` appended stages, of the combiner's shape."""
        combiner = self.combiner
        if len(self.pointers) < combiner.row_lengths[index]:
            raise NativeBoundaryError(f"stage {index} needs {combiner.row_lengths[index]} stages, have "
                                      f"{len(self.pointers)}.")
        out = torch.empty_like(combiner._input_template)
        combiner._cpp.stage_from(index, out.data_ptr(), self.y0, self.pointers, combiner.numel, dt)
        return out

    def solution(self, dt):
        """``y0 + dt * b @ stages`` as a new (N,) tensor."""
        combiner = self.combiner
        if len(self.pointers) < combiner.solution_length:
            raise NativeBoundaryError(f"the solution needs {combiner.solution_length} stages, have "
                                      f"{len(self.pointers)}.")
        out = torch.empty_like(combiner._flat_template)
        combiner._cpp.solution_from(out.data_ptr(), self.y0, self.pointers, combiner.numel, dt)
        return out


def _native_rule(rule):
    """The C++ twin of a ``fastcnf.ode.control.StepRule``."""
    return _C.StepRule(order=float(rule.order), safety=float(rule.safety), ifactor=float(rule.ifactor),
                       dfactor=float(rule.dfactor), min_step=float(rule.min_step), max_step=float(rule.max_step),
                       pi=bool(rule.pi), pcoeff=float(rule.pcoeff), icoeff=float(rule.icoeff))


class CppStepController:
    """The C++ scaled error ratio fused with the accept/reject rule (twin of the Python reference).

    ``step(y0, y1, stages, dt, last_ratio)`` -> ``(accept, dt_next, error_ratio, status, last_ratio)`` with
    ``status`` an int of ``native_status_codes()``.
    """

    def __init__(self, error_weights, rtol, atol, norm, rule, dtype, numel):
        _check_dtype(dtype)
        self.dtype, self.numel, self.rows = dtype, int(numel), len(error_weights)
        self._cpp = _C.StepController(
            error_weights=list(error_weights), rtol=float(rtol), atol=float(atol), segment_ends=list(norm.ends),
            segment_skip=list(norm.skip), rule=_native_rule(rule), is_double=dtype == torch.float64)

    def step(self, y0, y1, stages, dt, last_ratio=1.0):
        """``(accept, dt_next, error_ratio, status, last_ratio)`` of the trial step y0 -> y1 with (S, N)
        ``stages``; ``last_ratio`` in is the error ratio of the last accepted step."""
        n, dtype = self.numel, self.dtype
        # the checks of _pointer/_stage_rows, inlined: this runs once per trial step
        if not (y0.dtype is dtype and y1.dtype is dtype and stages.dtype is dtype and y0.is_cpu and y1.is_cpu
                and stages.is_cpu and y0.is_contiguous() and y1.is_contiguous() and stages.is_contiguous()
                and y0.numel() == n and y1.numel() == n and stages.dim() == 2 and stages.shape[1] == n
                and stages.shape[0] >= self.rows):
            _pointer(y0, dtype, n, "y0"), _pointer(y1, dtype, n, "y1")  # one of these raises, naming the tensor,
            _stage_rows(stages, dtype, self.rows, n, "stages")            # or this one
        return self._cpp.step(y0.data_ptr(), y1.data_ptr(), stages.data_ptr(), n, dt, last_ratio)


def cpp_propose_step(error_ratio, dt, rule, last_ratio=1.0):
    """The C++ accept/reject rule alone (no tensors cross): ``(accept, dt_next, status, last_ratio)``."""
    return _C.propose_step(float(error_ratio), float(dt), _native_rule(rule), float(last_ratio))
