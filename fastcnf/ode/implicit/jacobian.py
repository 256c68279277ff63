"""Jacobians of the dynamics ``df/dy`` for Newton's method, dense or per row.

Dense: one (N, N) matrix for the flat state. Row blocks: for states whose leading dimension
indexes independent rows (a batch of B samples, as in a CNF), the Jacobian is block diagonal
with one (D, D) block per row, and only the blocks are formed: a (B, D, D) tensor, at the cost
of D probes instead of N = B * D. Row ``b`` of a tuple state is the concatenation of entry
``b`` of every tensor of the tuple.

How the columns are probed (``method``):

* ``"jacfwd"``: ``torch.func.jacfwd``, N (or D) forward-mode products in one batched call;
* ``"jacrev"``: ``torch.func.jacrev``, N (or D) vector-Jacobian products in one batched call;
* ``"finite_difference"``: N (or D) further evaluations of ``func``; works for any ``func``.
  Forward differences with steps ``sqrt(eps) * max(|y_j|, 1e-3 * max_k |y_k|)``: relative to
  each entry, with a floor for entries near zero taken from the size of the whole state (a
  step of ``sqrt(eps)`` on an entry of size 1e-5, as in the Robertson problem, would change
  it by a factor 30 in float32);
* ``"auto"``: finite differences when there are at most ``AUTO_FINITE_DIFFERENCE_COLUMNS``
  columns (the evaluations then cost less than torch.func's set-up), ``jacfwd`` otherwise,
  falling back to finite differences (with a warning) when torch.func cannot transform ``func``
  (for example a ``func`` that calls ``torch.autograd.grad`` itself).

The Jacobian only steers Newton's method: an inexact one (finite differences, or a block
diagonal one for rows that do interact) slows convergence but cannot make a converged step
wrong.
"""

import warnings

import torch
from torch.func import jacfwd, jacrev

from ...errors import InvalidOptionError
from ..validation import require_choice

__all__ = ["JACOBIAN_METHODS", "AUTO_FINITE_DIFFERENCE_COLUMNS", "RowBlocks", "DynamicsJacobian",
           "check_jacobian_method"]

JACOBIAN_METHODS = ("auto", "jacfwd", "jacrev", "finite_difference")
AUTO_FINITE_DIFFERENCE_COLUMNS = 16


class RowBlocks:
    """Maps the flat (N,) state to (B, D) rows and back.

    Args:
        layout: the ``StateLayout`` of the user's state; every tensor must have at least one
            dimension and all must share the leading size B.
    """

    def __init__(self, layout, device):
        _check_row_shapes(layout.shapes)
        self.count = layout.shapes[0][0]
        widths = [size // self.count if self.count else 0 for size in layout.sizes]
        self.width = sum(widths)
        if len(widths) == 1:
            self.index = self.inverse = None
            return
        row = torch.arange(self.count, device=device)[:, None]
        parts, offset = [], 0
        for size, width in zip(layout.sizes, widths):
            parts.append(offset + row * width + torch.arange(width, device=device)[None, :])
            offset += size
        self.index = torch.cat(parts, dim=1)
        self.inverse = torch.argsort(self.index.reshape(-1))

    def to_rows(self, flat):
        """(..., N) -> (..., B, D)."""
        if self.index is None:
            return flat.reshape(*flat.shape[:-1], self.count, self.width)
        return flat[..., self.index]

    def from_rows(self, rows):
        """(..., B, D) -> (..., N)."""
        flat = rows.reshape(*rows.shape[:-2], self.count * self.width)
        return flat if self.inverse is None else flat[..., self.inverse]


def _check_row_shapes(shapes):
    if any(len(shape) == 0 for shape in shapes) or len({shape[0] for shape in shapes}) != 1:
        raise InvalidOptionError(
            "jacobian_structure='block_diagonal' needs every tensor of the state to have a leading (row) dimension "
            f"of one common size; got shapes {[tuple(shape) for shape in shapes]}.")


def check_jacobian_method(method):
    return require_choice("'jacobian'", method, JACOBIAN_METHODS, InvalidOptionError)


class DynamicsJacobian:
    """``df/dy`` of ``dynamics`` at a given time and state.

    Args:
        dynamics: the flat-state ``Dynamics``.
        method: one of ``JACOBIAN_METHODS``.
        rows: a ``RowBlocks`` for the block-diagonal Jacobian, or None for the dense one.

    Calling it with ``(t, y, f, perturb)`` (``t`` a float, ``y`` and ``f = dynamics(t, y)`` of
    shape (N,)) returns an (N, N) tensor, or (B, D, D) with ``rows``.
    """

    def __init__(self, dynamics, method, rows=None):
        self.dynamics = dynamics
        self.rows = rows
        columns = dynamics.layout.numel if rows is None else rows.width
        if method == "auto":
            small = columns <= AUTO_FINITE_DIFFERENCE_COLUMNS
            transformable = getattr(dynamics, "transformable", True)
            method = "finite_difference" if small or not transformable else "jacfwd"
            self.fallback = True
        else:
            self.fallback = False
        self.method = method

    def __call__(self, t, y, f, perturb):
        with torch.no_grad():
            if self.method == "finite_difference":
                return self._finite_difference(t, y, f, perturb)
            try:
                # torch.func can promote the result (e.g. float * 0-dim float32 tensor gives float64).
                return self._torch_func(t, y, perturb).to(y.dtype).contiguous()
            except Exception as error:  # torch.func cannot transform every function
                if not self.fallback:
                    raise
                warnings.warn(f"torch.func.{self.method} could not differentiate func ({type(error).__name__}: "
                              f"{error}); using finite-difference Jacobians for this solve.")
                self.method = "finite_difference"
                return self._finite_difference(t, y, f, perturb)

    def _torch_func(self, t, y, perturb):
        dynamics, rows = self.dynamics, self.rows
        transform = jacfwd if self.method == "jacfwd" else jacrev
        if rows is None:
            return transform(lambda state: dynamics(t, state, perturb))(y)
        base = rows.to_rows(y)
        if self.method == "jacfwd":
            # The same shift x (D,) added to every row: d f_b / d x is block b.
            def shifted(x):
                return rows.to_rows(dynamics(t, rows.from_rows(base + x), perturb))

            return jacfwd(shifted)(torch.zeros(rows.width, dtype=y.dtype, device=y.device))

        # Rows do not interact, so d (sum_b f_b) / d y_b is block b.
        def summed(state_rows):
            return rows.to_rows(dynamics(t, rows.from_rows(state_rows), perturb)).sum(0)

        return jacrev(summed)(base).transpose(0, 1)

    def _finite_difference(self, t, y, f, perturb):
        probe = y + _difference_steps(y)
        if self.rows is None:
            return self._dense_difference(t, y, f, perturb, probe)
        rows = self.rows
        base, f_rows, probe = rows.to_rows(y), rows.to_rows(f), rows.to_rows(probe)
        steps = probe - base  # exactly representable steps
        columns = []
        for d in range(rows.width):
            shifted = base.clone()
            shifted[:, d] = probe[:, d]
            value = rows.to_rows(self.dynamics(t, rows.from_rows(shifted), perturb))
            columns.append((value - f_rows) / steps[:, d, None])
        return torch.stack(columns, dim=-1)

    def _dense_difference(self, t, y, f, perturb, probe):
        steps = probe - y
        columns = []
        for j in range(y.numel()):
            shifted = y.clone()
            shifted[j] = probe[j]
            columns.append((self.dynamics(t, shifted, perturb) - f) / steps[j])
        return torch.stack(columns, dim=-1)


def _difference_steps(y):
    """sqrt(eps) * max(|y_j|, 1e-3 * max_k |y_k|), or sqrt(eps) where the whole state is 0."""
    magnitude = y.abs()
    floor = 1e-3 * float(magnitude.max()) if y.numel() else 0.0
    return torch.finfo(y.dtype).eps ** 0.5 * magnitude.clamp(min=floor if floor > 0 else 1.0)
