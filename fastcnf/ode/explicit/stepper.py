"""One explicit Runge-Kutta step for any tableau.

Stage ``i`` is evaluated at ``y0 + dt * a[i] @ K[:i]`` with ``K`` the (S, N) stages. How that
combination is formed depends on the situation:

* Triton backend (CUDA tensors by default): one launch of the fused stage kernel of
  ``fastcnf.kernels.rk_stage`` per combination, ``dt`` a float or a device tensor (the device
  loop's), under autograd on the stacked stages through the kernel's autograd.Function;
* under autograd otherwise: stages are separate tensors and each input is a chain of scaled adds,
  whose backward is a few scalings (copying stages into slices of one buffer would make the
  backward clone the whole buffer at every slice);
* ``dt`` a tensor otherwise (fixed grids built from a differentiable ``t``): torch matrix products;
* outside autograd, small states (N <= ``FUSED_MAX_NUMEL``) on CPU with the C++ extension: the
  extension's combiner (one call, one pass, no intermediate tensors), working in the user's state
  shape so that no view or reshape happens at the boundary of every evaluation;
* outside autograd for callers that need no ``K`` (fixed grids), on CPU with the extension, at
  every size: the stages stay the tensors the dynamics returned and the combiner reads them in
  place (no copies into a buffer);
* outside autograd otherwise: in-place ``add_`` over the non-zero weights, which torch spreads over
  all CPU threads (for large states this beats a tall-skinny ``addmv``).

Outside autograd two stage buffers are reused for a whole solve; the one holding the accepted
step is never written by the next trial.
"""

import torch

from ..backend import select_backend
from ..dynamics import Perturb
from ..native import NATIVE_DTYPES, CpuStageCombiner

__all__ = ["ExplicitRKStepper", "FUSED_MAX_NUMEL"]

FUSED_MAX_NUMEL = 16384


class ExplicitRKStepper:
    """Evaluates the stages of ``tableau`` for ``dynamics`` on (N,) states of ``dtype``/``device``.

    Args:
        perturb_start: evaluate stage 0 just after t0 (only when it is evaluated here).
        perturb_end: evaluate stages with node 1 just before t1.
    """

    def __init__(self, tableau, dynamics, numel, dtype, device, perturb_start=False, perturb_end=True):
        self.tableau = tableau
        self.dynamics = dynamics
        self.c = tableau.c
        self.a_rows = [torch.tensor(row, dtype=dtype, device=device) for row in tableau.a]
        self.b = torch.tensor(tableau.b, dtype=dtype, device=device)
        self.start_perturb = Perturb.NEXT if perturb_start else Perturb.NONE
        self.end_perturb = Perturb.PREV if perturb_end else Perturb.NONE
        self.numel, self.dtype, self.device = numel, dtype, device
        self.buffers = self.buffer_combiner = self.separate_combiner = self._bound_buffers = None
        self._fsal = tableau.fsal
        # (index, node, node == 1) of the stages after the first: a stage at node 1 is evaluated at t1
        # (just before it, with end_perturb); the others at t0 + node * dt
        self._stages = tuple((i, c_i, c_i == 1) for i, c_i in enumerate(tableau.c) if i > 0)
        backend = select_backend(device)
        self.triton = _triton_combiner(tableau, dtype, device) if backend == "triton" else None
        self.native = backend == "cpp" and device.type == "cpu" and dtype in NATIVE_DTYPES
        self._sparse_rows = [[(j, w) for j, w in enumerate(row) if w != 0] for row in tableau.a]
        self._sparse_b = [(j, w) for j, w in enumerate(tableau.b) if w != 0]
        layout = getattr(dynamics, "layout", None)
        self._shaped = layout is not None and not layout.is_tuple and not layout.is_flat
        self._shape = layout.shapes[0] if self._shaped else (numel,)
        self._call = dynamics.call_shaped if self._shaped else dynamics

    def reuse_buffers(self):
        """Allocate the two reusable stage buffers (call only outside autograd)."""
        stages = self.tableau.stages
        self.buffers = [torch.empty(stages, self.numel, dtype=self.dtype, device=self.device) for _ in range(2)]
        self._rows = [[buf[i] for i in range(stages)] for buf in self.buffers]
        self._shaped_rows = [[row.view(self._shape) for row in rows] for rows in self._rows] if self._shaped \
            else self._rows
        if self.native:  # separate stages at every size (fixed grids); the buffer for small states only
            self.separate_combiner = CpuStageCombiner(self.tableau.a, self.tableau.b, self.dtype, self.numel,
                                                      self._shape)
            if self.numel <= FUSED_MAX_NUMEL:
                self.buffer_combiner = self.separate_combiner
                self._bound_buffers = [self.buffer_combiner.bind(buf) for buf in self.buffers]

    def first_stage(self, time, y0):
        return self.dynamics(time, y0, self.start_perturb)

    def step(self, t0, y0, f0, dt, t1, time=None, buffer=0, keep_stages=True):
        """Stages of one step; returns ``(y1, K, k_last)``: the new state, the (S, N) stages and
        the last stage as its own tensor (the next step's first stage for FSAL tableaus).

        Args:
            t0, dt, t1: floats, or 0-dim tensors (time gradients, the device loop).
            y0, f0: (N,) contiguous state and its derivative at t0.
            time: maps a float time to what the dynamics receive (default: identity).
            buffer: which reusable buffer to write (0 or 1) when buffers are reused.
            keep_stages: False when the caller needs no K (fixed grids): under autograd K is then
                not stacked and None is returned in its place.
        """
        time = time or _identity
        if isinstance(dt, torch.Tensor) and self.triton is None:
            return self._step_tensor_dt(t0, y0, f0, dt, t1)
        if self.buffers is None:
            return self._step_autograd(t0, y0, f0, dt, t1, time, keep_stages)
        if self.triton is not None:
            return self._step_triton_buffer(t0, y0, f0, dt, t1, time, buffer)
        if not keep_stages and self.separate_combiner is not None:
            return self._step_separate(t0, y0, f0, dt, t1, time)
        if self.buffer_combiner is not None:
            return self._step_native_buffer(t0, y0, f0, dt, t1, time, buffer)
        return self._step_inplace(t0, y0, f0, dt, t1, time, buffer)

    def increment(self, stages, dt):
        """``dt * b @ K``: the change of the state over a step with (S, N) ``stages`` (dt a float or tensor)."""
        if isinstance(dt, torch.Tensor):
            return dt.to(stages.dtype) * torch.mv(stages.t(), self.b)
        return torch.mv(stages.t(), self.b) * dt

    def _step_autograd(self, t0, y0, f0, dt, t1, time, keep_stages):
        """Under autograd: stages stay separate tensors, combined by scaled adds (cheap backward),
        and are stacked once at the end for the controller and the dense output."""
        dynamics, end = self.dynamics, self.end_perturb
        stages = [f0]
        yi = y0
        for i, node, at_end in self._stages:
            yi = self._combine_list(i, y0, stages, dt)
            stages.append(dynamics(time(t1), yi, end) if at_end else dynamics(time(t0 + node * dt), yi))
        if not self._fsal:
            yi = self._combine_list(None, y0, stages, dt)
        return yi, torch.stack(stages) if keep_stages else None, stages[-1]

    def _step_triton_buffer(self, t0, y0, f0, dt, t1, time, buffer):
        """Outside autograd on the Triton backend: one fused kernel launch per stage input."""
        dynamics, end = self.dynamics, self.end_perturb
        stages, rows = self.buffers[buffer], self._rows[buffer]
        rows[0].copy_(f0)
        yi = y0
        for i, node, at_end in self._stages:
            yi = self.triton.stage(i, y0, stages, dt)
            rows[i].copy_(dynamics(time(t1), yi, end) if at_end else dynamics(time(t0 + node * dt), yi))
        if not self._fsal:
            yi = self.triton.solution(y0, stages, dt)
        return yi, stages, rows[-1]

    def _step_native_buffer(self, t0, y0, f0, dt, t1, time, buffer):
        """The C++ combiner on the (S, N) buffer, working in the user's state shape."""
        call, end = self._call, self.end_perturb
        stages = self.buffers[buffer]
        rows = self._shaped_rows[buffer]
        self._rows[buffer][0].copy_(f0)
        bound = self._bound_buffers[buffer].start(y0)
        yi = None
        for i, node, at_end in self._stages:
            yi = bound.stage_input(i, dt)
            rows[i].copy_(call(time(t1), yi, end) if at_end else call(time(t0 + node * dt), yi))
        if not self._fsal:
            return bound.solution(dt), stages, self._rows[buffer][-1]
        return (yi.view(-1) if self._shaped else yi), stages, self._rows[buffer][-1]

    def _step_separate(self, t0, y0, f0, dt, t1, time):
        """No stage buffer (the caller needs no K): the stages stay the tensors the dynamics returned
        and the C++ combiner reads them in place, so nothing is copied."""
        call, end = self._call, self.end_perturb
        separate = self.separate_combiner.separate(y0)
        separate.append(f0)
        yi = None
        for i, node, at_end in self._stages:
            yi = separate.stage_input(i, dt)
            separate.append(call(time(t1), yi, end) if at_end else call(time(t0 + node * dt), yi))
        y1 = yi.reshape(-1) if self._fsal else separate.solution(dt)
        return y1, None, separate.tensors[-1].reshape(-1)

    def _step_inplace(self, t0, y0, f0, dt, t1, time, buffer):
        """Torch in-place adds on the (S, N) buffer (large states, or the torch backend)."""
        dynamics, end = self.dynamics, self.end_perturb
        stages, rows = self.buffers[buffer], self._rows[buffer]
        rows[0].copy_(f0)
        yi = y0
        for i, node, at_end in self._stages:
            yi = self._add_inplace(self._sparse_rows[i], y0, stages, dt)
            rows[i].copy_(dynamics(time(t1), yi, end) if at_end else dynamics(time(t0 + node * dt), yi))
        if not self._fsal:
            yi = self._add_inplace(self._sparse_b, y0, stages, dt)
        return yi, stages, rows[-1]

    def _combine_list(self, i, y0, stages, dt):
        """Stage input (or, for ``i=None``, the solution) from a list of stage tensors under autograd."""
        if self.triton is not None:  # one kernel launch (and a stack, whose backward is free)
            stacked = torch.stack(stages)
            return self.triton.solution(y0, stacked, dt) if i is None else self.triton.stage(i, y0, stacked, dt)
        return _scaled_sum(y0, stages, self._sparse_b if i is None else self._sparse_rows[i], dt)

    @staticmethod
    def _add_inplace(weights, y0, stages, dt):
        """y0 + dt * sum_j w_j stages[j], the increment summed before it is added to y0 (see ``_scaled_sum``)."""
        if not weights:
            return y0.clone()
        (first, weight), rest = weights[0], weights[1:]
        out = torch.mul(stages[first], weight * dt)
        for j, weight in rest:
            out.add_(stages[j], alpha=weight * dt)
        return out.add_(y0)

    def _step_tensor_dt(self, t0, y0, f0, dt, t1):
        """Stages when dt is a tensor (fixed grids built from a differentiable t; the device loop on
        the torch backend)."""
        dynamics, end = self.dynamics, self.end_perturb
        stages = [f0]
        dt_state = dt.to(y0.dtype)
        for i, node, at_end in self._stages:
            yi = y0 + dt_state * torch.mv(torch.stack(stages, 1), self.a_rows[i])
            stages.append(dynamics(t1, yi, end) if at_end else dynamics(t0 + node * dt, yi))
        last = stages[-1]
        stages = torch.stack(stages)
        return y0 + dt_state * torch.mv(stages.t(), self.b), stages, last


def _triton_combiner(tableau, dtype, device):
    """The Triton stage combiner for states of ``dtype``, or None where the kernels do not apply."""
    if dtype not in NATIVE_DTYPES:
        return None
    from ...kernels.rk_stage import TritonStageCombiner

    return TritonStageCombiner(tableau.a, tableau.b, dtype, device)


def _identity(t):
    return t


def _scaled_sum(y0, stages, weights, dt):
    """y0 + dt * sum_j w_j stages[j] over the non-zero weights (autograd-friendly).

    The increment is summed first and added to y0 once (torchdiffeq's order): adding each stage
    to y0 in turn rounds at the scale of y once per stage, which makes a float32 state drift.
    """
    if not weights:
        return y0
    (first, weight), rest = weights[0], weights[1:]
    increment = stages[first] * (weight * dt)
    for j, weight in rest:
        increment = torch.add(increment, stages[j], alpha=weight * dt)
    return y0 + increment
