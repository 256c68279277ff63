"""Fused Runge-Kutta stage arithmetic in Triton: stage combination, error ratio and step decision.

Three kernels replace the O(stages) small tensor ops of an explicit Runge-Kutta step:

* stage combination ``y0 + dt * sum_j w_j k_j`` for one row of a tableau (a stage input with
  ``a[i]``, or the solution update with ``b``): one pass over the stage buffer, zero weights
  skipped, the same rounding as the CPU solver's combiners (``TritonStageCombiner``,
  ``stage_combine``, autograd-aware through ``StageCombine``);
* the error ratio: the embedded error estimate ``dt * sum_j e_j k_j``, scaled element-wise by
  ``atol + rtol * max(|y0|, |y1|)`` and measured with a segment-wise RMS norm (max over the
  segments that are not skipped; the norm is any object with ``ends`` and ``skip``, such as
  ``fastcnf.ode.norms.SegmentNorm``) (``ErrorRatio``). Each program reduces one block of one
  segment to a partial sum of squares; a single program then adds each segment's partials in a
  fixed order, so the result is deterministic;
* the step decision (``ErrorRatio.decide``): the same single program applies the step-size rule
  (torchdiffeq's integral controller, or the PI controller, which also reads the error ratio of
  the last accepted step: accept, next step size, status, the new last accepted ratio) to the
  ratio, so a trial step is judged without reading anything back to the host.

States are flat (N,) tensors with any element stride and stages an (S, N) buffer with any
strides, in float32 or float64. ``dt`` is a Python float or a 0-dim device tensor (read by the
kernels, so a device-side loop never synchronizes). Stage combinations are computed in the state
dtype (on a GPU the compiler may fuse multiply-adds), the error ratio in float64 for both, as the
C++ controller does; a non-finite new state or error makes the ratio NaN. The plain torch
references are ``stage_combine_reference`` and ``error_ratio_reference``; the decision follows
``fastcnf.ode.control.reference.propose_step`` (the tests compare them). This module imports
nothing from fastcnf.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "DTYPES",
    "TritonStageCombiner",
    "StageCombine",
    "stage_combine",
    "stage_combine_reference",
    "ErrorRatio",
    "fused_error_ratio",
    "error_ratio_reference",
]

DTYPES = (torch.float32, torch.float64)
COMBINE_BLOCK = 1024
NORM_BLOCK = 1024
FINALIZE_CHUNK = 256


# ---------------------------------------------------------------------------------------- kernels
@triton.jit
def _step_size(dt_value, dt_pointer, DT_POINTER: tl.constexpr):
    """A scalar (dt, or the last accepted error ratio) as a float64 block of one: loaded from the device, or the
    value passed in."""
    if DT_POINTER:
        return tl.load(dt_pointer + tl.arange(0, 1)).to(tl.float64)
    return tl.full([1], dt_value, tl.float64)


@triton.jit
def _stage_combine_kernel(out, y0, stages, indices, weights, num_weights, dt_value: tl.float64, dt_pointer, numel,
                          y0_stride, stage_stride0, stage_stride1, DT_POINTER: tl.constexpr, BLOCK: tl.constexpr):
    """out[n] = y0[n] + sum_j (weights[j] * dt) * stages[indices[j], n] for one block of n.

    The float64 products ``weights[j] * dt`` are rounded to the state dtype and the increment is
    summed in stage order before it is added to y0 once, the arithmetic of the CPU paths (C++
    combiner, torch adds). ``dt`` is read from ``dt_pointer`` when ``DT_POINTER`` is set, else it is
    ``dt_value``.
    """
    dtype = out.dtype.element_ty
    step = _step_size(dt_value, dt_pointer, DT_POINTER)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    increment = tl.zeros([BLOCK], dtype=dtype)
    for j in range(num_weights):
        row = tl.load(indices + j).to(tl.int64)
        stage = tl.load(stages + row * stage_stride0 + offsets * stage_stride1, mask=mask, other=0.0)
        increment += (tl.load(weights + j) * step).to(dtype) * stage
    total = tl.load(y0 + offsets * y0_stride, mask=mask, other=0.0) + increment
    tl.store(out + offsets, total, mask=mask)


@triton.jit
def _error_partials_kernel(partials, y0, y1, stages, indices, weights, num_weights, dt_value: tl.float64,
                           dt_pointer, rtol_value: tl.float64, atol_value: tl.float64, rtol, atol, block_bounds,
                           num_blocks, y0_stride, y1_stride, stage_stride0, stage_stride1, DT_POINTER: tl.constexpr,
                           RTOL_PER_ELEMENT: tl.constexpr, ATOL_PER_ELEMENT: tl.constexpr, BLOCK: tl.constexpr):
    """partials[p] = sum over block p of (dt * sum_j e_j k_j / (atol + rtol * max(|y0|, |y1|)))^2.

    ``block_bounds`` is (2, P): start and end offsets of each block (a block never spans two
    segments). A non-finite |y1| poisons the partial with NaN.
    """
    block = tl.program_id(0)
    start = tl.load(block_bounds + block)
    end = tl.load(block_bounds + num_blocks + block)
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < end
    error = tl.zeros([BLOCK], tl.float64)
    for j in range(num_weights):
        row = tl.load(indices + j).to(tl.int64)
        stage = tl.load(stages + row * stage_stride0 + offsets * stage_stride1, mask=mask, other=0.0)
        error += tl.load(weights + j) * stage.to(tl.float64)
    error = error * _step_size(dt_value, dt_pointer, DT_POINTER)
    size0 = tl.abs(tl.load(y0 + offsets * y0_stride, mask=mask, other=0.0).to(tl.float64))
    size1 = tl.abs(tl.load(y1 + offsets * y1_stride, mask=mask, other=0.0).to(tl.float64))
    if RTOL_PER_ELEMENT:
        relative = tl.load(rtol + offsets, mask=mask, other=0.0)
    else:
        relative = tl.full([1], rtol_value, tl.float64)
    if ATOL_PER_ELEMENT:
        absolute = tl.load(atol + offsets, mask=mask, other=1.0)
    else:
        absolute = tl.full([1], atol_value, tl.float64)
    scaled = error / (absolute + relative * tl.where(size1 > size0, size1, size0))
    # size1 - size1 is 0 for a finite entry and NaN otherwise.
    squares = tl.where(mask, scaled * scaled + (size1 - size1), 0.0)
    tl.store(partials + block, tl.sum(squares, axis=0))


@triton.jit
def _error_finalize_kernel(out, partials, segment_blocks, segment_sizes, num_segments, dt_value: tl.float64,
                           dt_pointer, last_value: tl.float64, last_pointer, order: tl.float64, safety: tl.float64,
                           ifactor: tl.float64, dfactor: tl.float64, min_step: tl.float64, max_step: tl.float64,
                           pcoeff: tl.float64, icoeff: tl.float64, STATUS_OK: tl.constexpr,
                           STATUS_NONFINITE: tl.constexpr, STATUS_FAILED_NONFINITE: tl.constexpr,
                           DT_POINTER: tl.constexpr, LAST_POINTER: tl.constexpr, PI: tl.constexpr,
                           DECIDE: tl.constexpr, CHUNK: tl.constexpr):
    """out[0] = r = max over segments s of sqrt(sum of the partials of s / size of s); NaN if any is not finite.

    ``segment_blocks`` is (2, num_segments): first and end block index of each counted segment.
    With ``DECIDE`` the rule is applied to r as well: out[1] = accept (1.0 or 0.0), out[2] = the next
    step size, out[3] = the status code (one of the three ``STATUS_*`` the caller passes in), out[4] =
    the error ratio of the last accepted step after this decision. With ``PI`` the PI rule reads the
    last accepted ratio before it (from ``last_pointer`` when ``LAST_POINTER``, else ``last_value``).
    """
    ratio = tl.zeros([1], tl.float64)
    poison = tl.zeros([1], tl.float64)
    for segment in range(num_segments):
        first = tl.load(segment_blocks + segment)
        last = tl.load(segment_blocks + num_segments + segment)
        total = tl.zeros([CHUNK], tl.float64)
        for chunk in range(first, last, CHUNK):
            offsets = chunk + tl.arange(0, CHUNK)
            total += tl.load(partials + offsets, mask=offsets < last, other=0.0)
        rms = tl.sqrt(tl.sum(total, axis=0) / tl.load(segment_sizes + segment))
        ratio = tl.maximum(ratio, rms)
        poison += rms - rms
    ratio = ratio + poison
    first = tl.arange(0, 1)
    tl.store(out + first, ratio)
    if DECIDE:
        dt = _step_size(dt_value, dt_pointer, DT_POINTER)
        one = tl.full([1], 1.0, tl.float64)
        grow, shrink_most = one * ifactor, one * dfactor  # float64 blocks: no rounding of the settings
        finite = (ratio - ratio) == 0.0  # False for NaN and +-Inf
        at_min = dt <= min_step
        accept = ((ratio <= 1.0) & (dt <= max_step)) | at_min
        accept = accept & finite
        shrink = tl.where(ratio < 1.0, one, shrink_most)
        last = _step_size(last_value, last_pointer, LAST_POINTER)
        if PI:  # safety * ratio ** (-(icoeff + pcoeff) / order) * last ** (pcoeff / order)
            growth = safety * tl.exp(tl.log(ratio) * (-(icoeff + pcoeff) / order)) * tl.exp(
                tl.log(last) * (pcoeff / order))
        else:
            growth = safety / tl.exp(tl.log(ratio) / order)  # safety / ratio ** (1 / order); inf at ratio 0
        factor = tl.minimum(grow, tl.maximum(growth, shrink))
        factor = tl.where(ratio == 0.0, grow, factor)
        factor = tl.where(finite, factor, shrink_most)
        dt_next = tl.minimum(tl.maximum(dt * factor, one * min_step), one * max_step)
        status = tl.where(finite, STATUS_OK, tl.where(at_min, STATUS_FAILED_NONFINITE, STATUS_NONFINITE))
        last = tl.where(accept, tl.where(ratio > 0.0, ratio, one), last)
        tl.store(out + 1 + first, tl.where(accept, one, 0.0 * one))
        tl.store(out + 2 + first, dt_next)
        tl.store(out + 3 + first, status.to(tl.float64))
        tl.store(out + 4 + first, last)


# ----------------------------------------------------------------------------- stage combination
@dataclass(frozen=True)
class _SparseRow:
    """The non-zero weights of one tableau row: (J,) int32 stage indices and (J,) float64 weights."""

    indices: torch.Tensor
    weights: torch.Tensor
    length: int  # number of stages the row spans (zeros included)

    @classmethod
    def build(cls, weights, device):
        weights = [float(w) for w in weights]
        used = [j for j, w in enumerate(weights) if w != 0]
        return cls(indices=torch.tensor(used, dtype=torch.int32, device=device),
                   weights=torch.tensor([weights[j] for j in used], dtype=torch.float64, device=device),
                   length=len(weights))


def _dt_arguments(dt, device, name="dt"):
    """(value, pointer, DT_POINTER) kernel arguments for a float or 0-dim tensor scalar (``dt`` by default)."""
    if isinstance(dt, torch.Tensor):
        if dt.numel() != 1 or dt.device != device:
            raise ValueError(f"{name} must be a float or a one-element tensor on {device}, got shape "
                             f"{tuple(dt.shape)} on {dt.device}.")
        return 0.0, dt.detach().reshape(1), True
    return float(dt), None, False


def _launch_combine(row, y0, stages, dt):
    out = torch.empty(y0.shape, dtype=y0.dtype, device=y0.device)
    numel = y0.numel()
    if numel:
        dt_value, dt_pointer, from_pointer = _dt_arguments(dt, y0.device)
        grid = (triton.cdiv(numel, COMBINE_BLOCK),)
        _stage_combine_kernel[grid](out, y0, stages, row.indices, row.weights, row.indices.numel(), dt_value,
                                    dt_pointer, numel, y0.stride(0), stages.stride(0), stages.stride(1),
                                    DT_POINTER=from_pointer, BLOCK=COMBINE_BLOCK)
    return out


class StageCombine(torch.autograd.Function):
    """``y0 + dt * sum_j w_j stages[j]`` with gradients for ``y0`` and ``stages`` (dt and w constant: step
    sizes carry no gradient)."""

    @staticmethod
    def forward(ctx, y0, stages, row, dt):
        ctx.row, ctx.stages_shape = row, stages.shape
        ctx.dt = dt.detach().to(torch.float64) if isinstance(dt, torch.Tensor) else float(dt)
        return _launch_combine(row, y0, stages, dt)

    @staticmethod
    def backward(ctx, grad):
        grad_stages = None
        if ctx.needs_input_grad[1]:
            grad_stages = grad.new_zeros(ctx.stages_shape)
            grad_stages[ctx.row.indices.long()] = (ctx.dt * ctx.row.weights).to(grad.dtype)[:, None] * grad
        return grad, grad_stages, None, None


def _combine(row, y0, stages, dt):
    _check_combine_inputs(row, y0, stages)
    if torch.is_grad_enabled() and (y0.requires_grad or stages.requires_grad):
        return StageCombine.apply(y0, stages, row, dt)
    return _launch_combine(row, y0, stages, dt)


class TritonStageCombiner:
    """Stage inputs and solution update of one tableau for states of ``dtype`` on ``device``.

    Args:
        a: the strictly lower triangular rows of the tableau (row ``i`` has ``i`` entries).
        b: (S,) solution weights.
    """

    def __init__(self, a, b, dtype, device):
        _check_dtype(dtype)
        self.rows = [_SparseRow.build(row, device) for row in a]
        self.solution_row = _SparseRow.build(b, device)

    def stage(self, index, y0, stages, dt):
        """Input of stage ``index``: ``y0 + dt * sum_{j < index} a[index][j] * stages[j]``, an (N,) tensor."""
        return _combine(self.rows[index], y0, stages, dt)

    def solution(self, y0, stages, dt):
        """The new state ``y0 + dt * sum_j b[j] * stages[j]``, an (N,) tensor."""
        return _combine(self.solution_row, y0, stages, dt)


def stage_combine(y0, stages, weights, dt):
    """``y0 + dt * sum_j weights[j] * stages[j]`` in one kernel launch.

    Args:
        y0: (N,) float32/float64 state (any stride).
        stages: (S, N) stage derivatives (any strides), same dtype and device.
        weights: J <= S floats (a tableau row).
        dt: float step size, or a 0-dim tensor on the states' device.

    Returns:
        (N,) contiguous tensor; differentiable in ``y0`` and ``stages``.
    """
    return _combine(_SparseRow.build(weights, y0.device), y0, stages, dt)


def stage_combine_reference(y0, stages, weights, dt):
    """Plain torch twin of ``stage_combine`` (what the solver runs under autograd on CPU)."""
    weights = torch.as_tensor(weights, dtype=y0.dtype, device=y0.device)
    return torch.addmv(y0, stages[:weights.numel()].t(), weights, alpha=dt)


# ----------------------------------------------------------------------------------- error ratio
class ErrorRatio:
    """The fused scaled error ratio of one solve (fixed error weights, norm, state size, tolerances).

    Args:
        error_weights: (S,) floats ``b - b_embedded`` of the tableau.
        norm: segments of the norm: ``norm.ends`` (exclusive end offsets, the last one ``numel``) and
            ``norm.skip`` (segments left out of the max), e.g. a ``fastcnf.ode.norms.SegmentNorm``.
        numel: N, the size of the flat state.
        rtol, atol: floats, or (N,) tensors of per-element tolerances.
        device: where the states live.
    """

    def __init__(self, error_weights, norm, numel, rtol, atol, device):
        _check_norm(norm, numel)
        self.row = _SparseRow.build(error_weights, device)
        self.rtol_value, self.rtol = _tolerance("rtol", rtol, numel, device)
        self.atol_value, self.atol = _tolerance("atol", atol, numel, device)
        self.numel = numel
        blocks, segment_blocks, segment_sizes = _norm_blocks(norm, NORM_BLOCK)
        self.num_blocks, self.num_segments = len(blocks[0]), len(segment_sizes)
        self.block_bounds = torch.tensor(blocks, dtype=torch.int64, device=device)
        self.segment_blocks = torch.tensor(segment_blocks, dtype=torch.int64, device=device).reshape(2, -1)
        self.segment_sizes = torch.tensor(segment_sizes or [1.0], dtype=torch.float64, device=device)
        self.partials = torch.empty(max(self.num_blocks, 1), dtype=torch.float64, device=device)

    def _launch(self, y0, y1, stages, dt, rule=None, codes=(0, 1, 2), last_ratio=1.0):
        _check_error_inputs(self.row, self.numel, y0, y1, stages)
        dt_value, dt_pointer, from_pointer = _dt_arguments(dt, y0.device)
        last_value, last_pointer, last_from_pointer = _dt_arguments(last_ratio, y0.device, "last_ratio")
        out = torch.empty(5 if rule is not None else 1, dtype=torch.float64, device=y0.device)
        if self.num_blocks:
            rtol = self.rtol if self.rtol is not None else self.partials
            atol = self.atol if self.atol is not None else self.partials
            _error_partials_kernel[(self.num_blocks,)](
                self.partials, y0, y1, stages, self.row.indices, self.row.weights, self.row.indices.numel(),
                dt_value, dt_pointer, self.rtol_value, self.atol_value, rtol, atol, self.block_bounds,
                self.num_blocks, y0.stride(0), y1.stride(0), stages.stride(0), stages.stride(1),
                DT_POINTER=from_pointer, RTOL_PER_ELEMENT=self.rtol is not None,
                ATOL_PER_ELEMENT=self.atol is not None, BLOCK=NORM_BLOCK)
        rule_values = (1.0, 0.9, 10.0, 0.2, 0.0, float("inf"), 0.0, 1.0) if rule is None else (
            float(rule.order), float(rule.safety), float(rule.ifactor), float(rule.dfactor), float(rule.min_step),
            float(rule.max_step), float(rule.pcoeff), float(rule.icoeff))
        segment_blocks = self.segment_blocks if self.num_segments else self.block_bounds
        _error_finalize_kernel[(1,)](out, self.partials, segment_blocks, self.segment_sizes, self.num_segments,
                                     dt_value, dt_pointer, last_value, last_pointer, *rule_values,
                                     STATUS_OK=codes[0], STATUS_NONFINITE=codes[1], STATUS_FAILED_NONFINITE=codes[2],
                                     DT_POINTER=from_pointer, LAST_POINTER=last_from_pointer,
                                     PI=rule is not None and rule.controller == "pi", DECIDE=rule is not None,
                                     CHUNK=FINALIZE_CHUNK)
        return out

    def __call__(self, y0, y1, stages, dt):
        """The error ratio of a trial step as a 0-dim float64 tensor on the device (no host sync).

        Args:
            y0, y1: (N,) states at the start and end of the step (any stride).
            stages: (S, N) stage derivatives (any strides).
            dt: float step size or a 0-dim tensor on the device.
        """
        return self._launch(y0, y1, stages, dt)[0]

    def value(self, y0, y1, stages, dt):
        """The error ratio as a Python float (synchronises with the device)."""
        return float(self(y0, y1, stages, dt))

    def decide(self, y0, y1, stages, dt, rule, codes, last_ratio=1.0):
        """Error ratio and step decision of a trial step, on the device (no host sync).

        Args:
            rule: the step-size rule: attributes ``order``, ``safety``, ``ifactor``, ``dfactor``,
                ``min_step``, ``max_step``, ``controller`` (``"integral"`` or ``"pi"``), ``pcoeff``,
                ``icoeff`` (e.g. ``fastcnf.ode.control.StepRule``).
            codes: the status values for (judged, rejected for NaN/Inf, failed for NaN/Inf at min_step).
            last_ratio: the error ratio of the last accepted step, a float or a 0-dim device tensor.

        Returns:
            0-dim tensors ``(accept (bool), dt_next (float64), error_ratio (float64), status (int64),
            last_ratio (float64))``, the last one for the next decision.
        """
        out = self._launch(y0, y1, stages, dt, rule, codes, last_ratio)
        return out[1] != 0, out[2], out[0], out[3].long(), out[4]


def fused_error_ratio(y0, y1, stages, error_weights, dt, rtol, atol, norm):
    """One-off fused twin of ``error_ratio_reference`` (same arguments); a 0-dim float64 tensor."""
    return ErrorRatio(error_weights, norm, y0.numel(), rtol, atol, y0.device)(y0, y1, stages, dt)


def error_ratio_reference(y0, y1, stages, error_weights, dt, rtol, atol, norm):
    """Plain torch twin of ``ErrorRatio``: max over the counted segments of the RMS of the scaled error.

    Same arguments as ``fused_error_ratio``; returns a Python float (NaN when y1 or the error is not finite).
    """
    weights = torch.as_tensor(error_weights, dtype=torch.float64, device=y0.device)
    error = torch.mv(stages[:weights.numel()].double().t(), weights) * float(dt)
    size = torch.maximum(y0.double().abs(), y1.double().abs())
    scaled = error / (torch.as_tensor(atol, dtype=torch.float64) + torch.as_tensor(rtol, dtype=torch.float64) * size)
    scaled = torch.where(torch.isfinite(y1), scaled, torch.nan)
    values, start = [], 0
    for end, skip in zip(norm.ends, norm.skip):
        if not skip and end > start:
            values.append(float(scaled[start:end].pow(2).mean().sqrt()))
        start = end
    return math.nan if any(math.isnan(v) for v in values) else max(values, default=0.0)


def _norm_blocks(norm, block):
    """Kernel tables for ``norm``: block bounds (2, P), segment block ranges (2 * S') and sizes (S').

    Skipped and empty segments get no blocks (they do not count in the max).
    """
    starts, ends, first_blocks, end_blocks, sizes = [], [], [], [], []
    segment_start = 0
    for segment_end, skip in zip(norm.ends, norm.skip):
        if not skip and segment_end > segment_start:
            first_blocks.append(len(starts))
            for offset in range(segment_start, segment_end, block):
                starts.append(offset)
                ends.append(min(offset + block, segment_end))
            end_blocks.append(len(starts))
            sizes.append(float(segment_end - segment_start))
        segment_start = segment_end
    return [starts, ends], first_blocks + end_blocks, sizes


def _tolerance(name, tol, numel, device):
    """(float value, None) for a scalar tolerance, (0.0, (N,) float64 tensor) for a per-element one."""
    if isinstance(tol, torch.Tensor) and tol.numel() != 1:
        if tol.numel() != numel:
            raise ValueError(f"{name} has {tol.numel()} elements; a per-element tolerance needs {numel}.")
        return 0.0, tol.detach().reshape(-1).to(device=device, dtype=torch.float64).contiguous()
    return float(tol), None


# ------------------------------------------------------------------------------------ validation
def _check_dtype(dtype):
    if dtype not in DTYPES:
        raise TypeError(f"the Triton RK kernels support float32 and float64 states, got {dtype}.")


def _check_flat(name, tensor, numel, dtype, device):
    if tensor.dim() != 1 or tensor.numel() != numel:
        raise ValueError(f"{name} must be a flat ({numel},) tensor, got shape {tuple(tensor.shape)}.")
    if tensor.dtype != dtype or tensor.device != device:
        raise ValueError(f"{name} must be {dtype} on {device}, got {tensor.dtype} on {tensor.device}.")


def _check_stages(stages, length, numel, dtype, device):
    if stages.dim() != 2 or stages.shape[1] != numel or stages.shape[0] < length:
        raise ValueError(f"stages must be an (S, {numel}) tensor with S >= {length}, got shape "
                         f"{tuple(stages.shape)}.")
    if stages.dtype != dtype or stages.device != device:
        raise ValueError(f"stages must be {dtype} on {device}, got {stages.dtype} on {stages.device}.")


def _check_combine_inputs(row, y0, stages):
    _check_dtype(y0.dtype)
    _check_flat("y0", y0, y0.numel(), y0.dtype, row.weights.device)
    _check_stages(stages, row.length, y0.numel(), y0.dtype, y0.device)


def _check_error_inputs(row, numel, y0, y1, stages):
    _check_dtype(y0.dtype)
    _check_flat("y0", y0, numel, y0.dtype, row.weights.device)
    _check_flat("y1", y1, numel, y0.dtype, y0.device)
    _check_stages(stages, row.length, numel, y0.dtype, y0.device)


def _check_norm(norm, numel):
    if not (hasattr(norm, "ends") and hasattr(norm, "skip")):
        raise TypeError(f"the fused error ratio needs a segment norm (ends, skip), got {type(norm).__name__}.")
    ends = list(norm.ends)
    if len(ends) != len(norm.skip) or ends != sorted(ends) or (ends and ends[-1] != numel):
        raise ValueError(f"the norm segments {norm.ends} must be increasing and end at the state size {numel}.")
