"""One explicit Runge-Kutta step for any tableau.

Stages live in one (S, N) tensor ``K``; stage ``i`` is evaluated at ``y0 + dt * a[i] @ K[:i]``.
How that combination is formed depends on the situation:

* under autograd: stages are separate tensors and each input is a chain of scaled adds, whose
  backward is a few scalings (copying stages into slices of one buffer would make the backward
  clone the whole buffer at every slice);
* outside autograd, small states (N <= ``FUSED_MAX_NUMEL``) on CPU with the C++ extension: the
  extension's fused combiner (one call, one pass, no intermediate tensors);
* outside autograd otherwise: in-place ``add_`` over the non-zero weights, which torch spreads
  over all CPU threads (for large states this beats a tall-skinny ``addmv``);
* outside autograd for callers that need no ``K`` (fixed grids), on CPU with the extension, at
  every size: the stages stay the tensors the dynamics returned and the combiner reads them in
  place through their pointers (no copies into a buffer);
* with the Triton backend (CUDA tensors by default): one launch of the fused stage kernel of
  ``fastcnf.kernels.rk_stage`` per combination (under autograd on the stacked stages, through the
  kernel's autograd.Function).

Outside autograd two stage buffers are reused for a whole solve; the one holding the accepted
step is never written by the next trial.
"""

import torch

from .backend import ext, select_backend
from .dynamics import Perturb

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
        self.buffers = self.combiner = self.list_combiner = self._shape = None
        self.triton = _triton_combiner(tableau, dtype, device)
        self._sparse_rows = [[(j, w) for j, w in enumerate(row) if w != 0] for row in tableau.a]
        self._sparse_b = [(j, w) for j, w in enumerate(tableau.b) if w != 0]

    def reuse_buffers(self):
        """Allocate the two reusable stage buffers (call only outside autograd)."""
        stages = self.tableau.stages
        self.buffers = [torch.empty(stages, self.numel, dtype=self.dtype, device=self.device) for _ in range(2)]
        self._rows = [[buf[i] for i in range(stages)] for buf in self.buffers]
        native = (select_backend(self.device) == "cpp" and self.device.type == "cpu"
                  and self.dtype in (torch.float32, torch.float64))
        if native:  # used at every size by callers that need no stage buffer (fixed grids)
            self.list_combiner = ext.StageCombiner([list(row) for row in self.tableau.a], list(self.tableau.b),
                                                   self.dtype == torch.float64)
        if native and self.numel <= FUSED_MAX_NUMEL:  # the buffer path uses it for small states only
            self.combiner = self.list_combiner
            layout = getattr(self.dynamics, "layout", None)
            if layout is not None and not layout.is_tuple and not layout.is_flat:
                # stage inputs are made, and stages copied, in the user's shape: no view/reshape
                # at the boundary of every evaluation
                self._shape = layout.shapes[0]
                self._shaped_rows = [[row.view(self._shape) for row in rows] for rows in self._rows]

    def first_stage(self, time, y0):
        return self.dynamics(time, y0, self.start_perturb)

    def step(self, t0, y0, f0, dt, t1, time=None, buffer=0, keep_stages=True):
        """Stages of one step; returns ``(y1, K, k_last)``: the new state, the (S, N) stages and
        the last stage as its own tensor (the next step's first stage for FSAL tableaus).

        Args:
            t0, dt, t1: floats, or 0-dim tensors when gradients with respect to time are needed.
            y0, f0: (N,) contiguous state and its derivative at t0.
            time: maps a float time to what the dynamics receive (default: identity).
            buffer: which reusable buffer to write (0 or 1) when buffers are reused.
            keep_stages: False when the caller needs no K (fixed grids): under autograd K is then
                not stacked and None is returned in its place.
        """
        if isinstance(dt, torch.Tensor):
            return self._step_tensor_dt(t0, y0, f0, dt, t1)
        c, dynamics, end_perturb = self.c, self.dynamics, self.end_perturb
        time = time or _identity
        if self.buffers is None:
            return self._step_autograd(t0, y0, f0, dt, t1, time, keep_stages)
        if not keep_stages and self.list_combiner is not None:
            return self._step_separate(t0, y0, f0, dt, t1, time)
        if self._shape is not None:
            return self._step_shaped(t0, y0, f0, dt, t1, time, buffer)
        stages = self.buffers[buffer]
        rows = self._rows[buffer]
        rows[0].copy_(f0)
        if self.triton is not None:
            combine = self._combine_triton
        else:
            combine = self._combine_fused if self.combiner is not None else self._combine_inplace
        yi = y0
        for i in range(1, len(c)):
            yi = combine(i, y0, stages, dt)
            if c[i] == 1:
                rows[i].copy_(dynamics(time(t1), yi, end_perturb))
            else:
                rows[i].copy_(dynamics(time(t0 + c[i] * dt), yi))
        if not self.tableau.fsal:
            yi = combine(None, y0, stages, dt)
        return yi, stages, rows[-1]

    def _step_autograd(self, t0, y0, f0, dt, t1, time, keep_stages):
        """Under autograd: stages stay separate tensors, combined by scaled adds (cheap backward),
        and are stacked once at the end for the controller and the dense output."""
        c, dynamics = self.c, self.dynamics
        stages = [f0]
        yi = y0
        for i in range(1, len(c)):
            yi = self._combine_list(i, y0, stages, dt)
            if c[i] == 1:
                stages.append(dynamics(time(t1), yi, self.end_perturb))
            else:
                stages.append(dynamics(time(t0 + c[i] * dt), yi))
        if not self.tableau.fsal:
            yi = self._combine_list(None, y0, stages, dt)
        return yi, torch.stack(stages) if keep_stages else None, stages[-1]

    def _step_separate(self, t0, y0, f0, dt, t1, time):
        """No stage buffer (the caller needs no K): stages stay the tensors the dynamics returned and
        the C++ combiner reads them through their pointers, so nothing is copied."""
        c, combiner, n = self.c, self.list_combiner, self.numel
        layout = self.dynamics.layout
        shaped = not layout.is_tuple and not layout.is_flat
        shape = layout.shapes[0] if shaped else (n,)
        call = self.dynamics.call_shaped if shaped else self.dynamics
        stages = [self._stage_tensor(f0)]
        pointers = [stages[0].data_ptr()]
        y0_ptr = y0.data_ptr()
        yi = None
        for i in range(1, len(c)):
            yi = torch.empty(shape, dtype=self.dtype, device=self.device)
            combiner.stage_from(i, yi.data_ptr(), y0_ptr, pointers, n, dt)
            if c[i] == 1:
                stage = call(time(t1), yi, self.end_perturb)
            else:
                stage = call(time(t0 + c[i] * dt), yi)
            stages.append(self._stage_tensor(stage))
            pointers.append(stages[-1].data_ptr())
        if self.tableau.fsal:
            y1 = yi.reshape(-1)
        else:
            y1 = torch.empty_like(y0)
            combiner.solution_from(y1.data_ptr(), y0_ptr, pointers, n, dt)
        return y1, None, stages[-1].reshape(-1)

    def _stage_tensor(self, value):
        """A stage as a contiguous tensor of the state dtype (what the combiner reads)."""
        if value.dtype != self.dtype or not value.is_contiguous():
            value = value.to(self.dtype).contiguous()
        return value

    def _step_shaped(self, t0, y0, f0, dt, t1, time, buffer):
        """The fused buffer path for a tensor state of any shape, working in that shape."""
        c, combiner, call, n = self.c, self.combiner, self.dynamics.call_shaped, self.numel
        stages = self.buffers[buffer]
        rows = self._shaped_rows[buffer]
        self._rows[buffer][0].copy_(f0)
        y0_ptr, stages_ptr = y0.data_ptr(), stages.data_ptr()
        yi = None
        for i in range(1, len(c)):
            yi = torch.empty(self._shape, dtype=self.dtype, device=self.device)
            combiner.stage(i, yi.data_ptr(), y0_ptr, stages_ptr, n, n, dt)
            if c[i] == 1:
                rows[i].copy_(call(time(t1), yi, self.end_perturb))
            else:
                rows[i].copy_(call(time(t0 + c[i] * dt), yi))
        if self.tableau.fsal:
            y1 = yi.view(-1)
        else:
            y1 = torch.empty_like(y0)
            combiner.solution(y1.data_ptr(), y0_ptr, stages_ptr, n, n, dt)
        return y1, stages, self._rows[buffer][-1]

    def _combine_list(self, i, y0, stages, dt):
        """Stage input (or, for ``i=None``, the solution) from a list of stage tensors under autograd."""
        if self.triton is not None:  # one kernel launch (and a stack, whose backward is free)
            stacked = torch.stack(stages)
            return self.triton.solution(y0, stacked, dt) if i is None else self.triton.stage(i, y0, stacked, dt)
        return _scaled_sum(y0, stages, self._sparse_b if i is None else self._sparse_rows[i], dt)

    def _combine_fused(self, i, y0, stages, dt):
        out = torch.empty_like(y0)
        if i is None:
            self.combiner.solution(out.data_ptr(), y0.data_ptr(), stages.data_ptr(), self.numel, self.numel, dt)
        else:
            self.combiner.stage(i, out.data_ptr(), y0.data_ptr(), stages.data_ptr(), self.numel, self.numel, dt)
        return out

    def _combine_inplace(self, i, y0, stages, dt):
        weights = self._sparse_b if i is None else self._sparse_rows[i]
        out = y0.clone()
        for j, weight in weights:
            out.add_(stages[j], alpha=weight * dt)
        return out

    def _combine_triton(self, i, y0, stages, dt):
        if i is None:
            return self.triton.solution(y0, stages, dt)
        return self.triton.stage(i, y0, stages, dt)

    def _step_tensor_dt(self, t0, y0, f0, dt, t1):
        """Stages when dt is a tensor carrying gradients (fixed grids built from a differentiable t)."""
        c, dynamics = self.c, self.dynamics
        stages = [f0]
        for i in range(1, len(c)):
            yi = y0 + dt * torch.mv(torch.stack(stages, 1), self.a_rows[i])
            ti = t1 if c[i] == 1 else t0 + c[i] * dt
            stages.append(dynamics(ti, yi, self.end_perturb if c[i] == 1 else Perturb.NONE))
        last = stages[-1]
        stages = torch.stack(stages)
        return y0 + dt * torch.mv(stages.t(), self.b), stages, last


def _triton_combiner(tableau, dtype, device):
    """The Triton stage combiner when the Triton backend runs this state, else None."""
    if select_backend(device) != "triton" or dtype not in (torch.float32, torch.float64):
        return None
    from .kernels.rk_stage import StageCombiner

    return StageCombiner(tableau.a, tableau.b, dtype, device)


def _identity(t):
    return t


def _scaled_sum(y0, stages, weights, dt):
    """y0 + dt * sum_j w_j stages[j] over the non-zero weights (autograd-friendly)."""
    out = y0
    for j, weight in weights:
        out = torch.add(out, stages[j], alpha=weight * dt)
    return out
