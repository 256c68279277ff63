"""The user's ``func(t, y)`` as the solvers see it.

Solvers work on one flat (N,) state vector and on time as Python floats (float64) in
increasing order. ``Dynamics`` converts at the boundary: it builds the 0-dim time tensor the
user expects (the state's real dtype, negated back for reverse-time solves, nudged to the next
or previous representable value when a perturbation is requested), restores the user's state
layout (a tensor of any shape or a tuple of tensors), flattens the derivative and casts it to the
state dtype (as torchdiffeq's stage buffers do: a float64, float16 or integer result of a float32
state becomes float32), counts evaluations and forwards the step callbacks.

A ``func`` may also supply its own vector-Jacobian product for ``odeint_adjoint``, as a method
``adjoint_vjp(t, y, cotangent, params)`` (fastcnf only; torchdiffeq never calls it): ``t`` the 0-dim
time, ``y`` and ``cotangent`` in the state's layout, ``params`` the adjoint parameters. It returns
``(f, c^T df/dy, [c^T df/dp per parameter, None for zero], c^T df/dt or None)`` with ``f = func(t, y)``
and the first two in the state's layout, or None to let autograd differentiate ``func(t, y)``
instead. The parameter gradients may also come as one flat tensor, each flattened and concatenated in
``params`` order (what the adjoint state holds, so it is taken whole). ``fastcnf.cnf.CNFDynamics`` uses
it to skip autograd's graph of the fused divergence pass.

What ``func`` may return is what torchdiffeq accepts: for a tensor state a tensor of its shape; for
a tuple state a tuple of tensors with as many elements as each entry (torchdiffeq flattens each
entry, so an (N, 1) result for an (N,) entry is fine).
"""

import functools
import math
from enum import IntEnum

import numpy as np
import torch

from ..stats import BUDGETS, charge_evaluation

__all__ = ["Perturb", "StateLayout", "Dynamics", "CALLBACK_NAMES", "nudge"]

CALLBACK_NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")


class Perturb(IntEnum):
    """Evaluate at the time itself, just after it (right limit) or just before it (left limit)."""

    NONE = 0
    PREV = 1
    NEXT = 2


class StateLayout:
    """Shape bookkeeping between the user's state (tensor or tuple of tensors) and a flat vector."""

    def __init__(self, y0):
        self.is_tuple = not isinstance(y0, torch.Tensor)
        tensors = tuple(y0) if self.is_tuple else (y0,)
        self.shapes = tuple(tensor.shape for tensor in tensors)
        self.sizes = tuple(tensor.numel() for tensor in tensors)
        self.numel = sum(self.sizes)
        self.is_flat = not self.is_tuple and len(self.shapes[0]) == 1

    def flatten(self, state):
        """User state -> (N,) tensor."""
        if self.is_tuple:
            return torch.cat([part.reshape(-1) for part in state])
        return state if state.dim() == 1 else state.reshape(-1)

    def unflatten(self, flat):
        """(..., N) tensor -> user state with the leading dimensions kept."""
        if self.is_flat:
            return flat
        lead = flat.shape[:-1]
        if not self.is_tuple:
            return flat.view((*lead, *self.shapes[0]))
        parts, start = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            parts.append(flat[..., start:start + size].view((*lead, *shape)))
            start += size
        return tuple(parts)


def nudge(value, direction, dtype):
    """The representable number next to ``value`` in ``dtype``, toward ``direction`` (+1/-1)."""
    if dtype == torch.float64:
        return math.nextafter(value, direction * math.inf)
    if dtype == torch.float32:
        return float(np.nextafter(np.float32(value), np.float32(direction * np.inf)))
    tensor = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(tensor, tensor + direction))


class _StitchGradient(torch.autograd.Function):
    """Return ``replacement`` in the forward pass and pass gradients straight to ``original``."""

    @staticmethod
    def forward(ctx, original, replacement):
        return replacement

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class Dynamics:
    """Flat-state view of a user function.

    Args:
        func: the user's ``func(t, y)``.
        layout: ``StateLayout`` of the user's state.
        reverse: the solve runs in negated time (decreasing user ``t``).
        dtype, device: dtype and device of the flat state.

    ``dynamics(t, y, perturb)`` takes ``t`` as a float (or a 0-dim tensor when gradients with
    respect to time are needed) and ``y`` as an (N,) tensor and returns an (N,) tensor.
    """

    def __init__(self, func, layout, reverse, dtype, device):
        self.func = func
        self.layout = layout
        self.reverse = reverse
        self.dtype = dtype
        self.real_dtype = torch.empty((), dtype=dtype).abs().dtype
        self.device = device
        self.nfe = 0
        self.result_dtype = None  # dtype of func's (flattened) result, known after the first evaluation
        self._checked = False
        self.callbacks = {name: _user_callback(func, name) for name in CALLBACK_NAMES}
        self.adjoint_vjp = _user_callback(func, "adjoint_vjp")

    def __call__(self, t, y, perturb=Perturb.NONE):
        if BUDGETS:
            charge_evaluation()
        return self._flat_result(self.func(self.user_time(t, perturb), self.layout.unflatten(y)))

    def _flat_result(self, out):
        """Count one evaluation, check ``out`` the first time, and return it as an (N,) tensor in the state
        dtype, negated in reverse-time solves."""
        self.nfe += 1
        if not self._checked:
            self._check_output(out)
        flat = self.layout.flatten(out)
        if flat.dtype != self.dtype:  # torchdiffeq stores every stage in the state dtype
            flat = flat.to(self.dtype)
        return -flat if self.reverse else flat

    def call_shaped(self, t, y, perturb=Perturb.NONE):
        """Like calling it, for a tensor state already in the user's shape; returns that shape too."""
        if BUDGETS:
            charge_evaluation()
        out = self.func(self.user_time(t, perturb), y)
        self.nfe += 1
        if not self._checked:
            self._check_output(out)
        if out.dtype != self.dtype:
            out = out.to(self.dtype)
        return -out if self.reverse else out

    def vector_jacobian(self, t, y, cotangent, params):
        """``func``'s own vector-Jacobian product at the float time ``t`` on flat tensors, or None.

        Args:
            y, cotangent: (N,) state and the vector c of c^T dF/dy, where F is this flat dynamics
                (negated in reverse-time solves).
            params: the parameters to differentiate.

        Returns:
            ``(F (N,), c^T dF/dy (N,), [c^T dF/dp or None per parameter] or their flat concatenation (P,),
            c^T dF/dt (0-dim) or None)``, or None when ``func`` has no ``adjoint_vjp`` or declines (nothing
            is counted then).
        """
        if self.adjoint_vjp is None:
            return None
        sign = -1.0 if self.reverse else 1.0  # F(t, y) = sign f(sign t, y)
        user_cotangent = self.layout.unflatten(cotangent if sign > 0 else -cotangent)
        result = self.adjoint_vjp(self.user_time(t), self.layout.unflatten(y), user_cotangent, params)
        if result is None:
            return None
        if BUDGETS:
            charge_evaluation()
        out, vjp_y, vjp_params, vjp_t = result
        if vjp_t is not None and sign < 0:
            vjp_t = -vjp_t
        if not isinstance(vjp_params, torch.Tensor):
            vjp_params = list(vjp_params)
        return self._flat_result(out), self.layout.flatten(vjp_y), vjp_params, vjp_t

    def user_time(self, t, perturb=Perturb.NONE):
        """The 0-dim time tensor passed to the user's function."""
        if isinstance(t, torch.Tensor):
            return self._user_time_tensor(t, perturb)
        if perturb:
            t = nudge(t, 1 if perturb == Perturb.NEXT else -1, self.real_dtype)
        return torch.scalar_tensor(-t if self.reverse else t, dtype=self.real_dtype, device=self.device)

    def _user_time_tensor(self, t, perturb):
        t = t.to(self.real_dtype)
        if perturb:
            with torch.no_grad():
                nudged = torch.nextafter(t, t + (1 if perturb == Perturb.NEXT else -1))
            t = _StitchGradient.apply(t, nudged)
        return -t if self.reverse else t

    def callback(self, name, t, y, dt):
        """Call the user's ``name`` callback with (t, y, dt) if it defined one."""
        callback = self.callbacks[name]
        if callback is not None:
            time = torch.as_tensor(-t if self.reverse else t, dtype=torch.float64)
            callback(time, self.layout.unflatten(y), torch.as_tensor(dt, dtype=torch.float64))

    def has_callback(self, name):
        return self.callbacks[name] is not None

    def _check_output(self, out):
        parts = tuple(out) if self.layout.is_tuple else (out,)
        expected = len(self.layout.shapes)
        if self.layout.is_tuple and len(parts) != expected:
            raise ValueError(f"func returned {len(parts)} tensors for a tuple state of {expected} tensors.")
        for index, (part, shape) in enumerate(zip(parts, self.layout.shapes)):
            where = f" (tuple entry {index})" if self.layout.is_tuple else ""
            if not isinstance(part, torch.Tensor):
                raise TypeError(f"func must return a torch.Tensor{where}, got {type(part).__name__}.")
            fits = part.numel() == shape.numel() if self.layout.is_tuple else part.shape == shape
            if not fits:
                raise ValueError(f"func returned a tensor of shape {tuple(part.shape)} for a state of shape "
                                 f"{tuple(shape)}{where}" + (f"; it must have {shape.numel()} elements."
                                                            if self.layout.is_tuple else "."))
            if part.device != self.device:
                raise ValueError(f"func returned a tensor on {part.device} for a state on {self.device}{where}.")
        self.result_dtype = functools.reduce(torch.promote_types, [part.dtype for part in parts])
        self._checked = True


def _user_callback(func, name):
    callback = getattr(func, name, None)
    return callback if callable(callback) else None
