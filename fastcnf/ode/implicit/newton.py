"""The nonlinear stage equations of an implicit Runge-Kutta step and their iterative solution.

A group of ``s`` coupled stages (all stages of a fully implicit method, one stage of a
diagonally implicit one) solves ``K = Phi(K)`` for the stage derivatives K (s, N), with

    Phi(K)_i = f(t_i, base_i + dt * sum_j coefficients_ij K_j).

Simplified Newton iterates ``K <- K - M^-1 (K - Phi(K))`` with the iteration matrix
``M = I - dt * (coefficients (x) J)``, J = df/dy formed once per step and M factored once
(LU) and reused by every iteration. Fixed-point iteration is the same loop with ``M = I``.

Convergence is measured on the update in state units, ``dt * dK``, in the weighted RMS norm
with weights ``atol + rtol * |y0|``: the solve stops when the last update, or the error left
after it as estimated from the contraction rate ``theta`` (``theta / (1 - theta) * |dK|``,
Hairer & Wanner, Solving ODEs II, IV.8), is at most 1. It raises ``NonlinearSolveError`` when
``max_iters`` iterations do not get there or the iterates stop being finite.
"""

import math

import torch

from ...errors import NonlinearSolveError

__all__ = ["StageEquations", "DenseIterationMatrix", "RowBlockIterationMatrix", "IdentityIterationMatrix",
           "solve_stage_equations", "weighted_rms"]


class StageEquations:
    """``Phi`` of one group of stages in one step.

    Args:
        dynamics: the flat-state ``Dynamics``.
        times: one ``(t_i, perturb_i)`` per stage; ``t_i`` a float or a 0-dim tensor.
        base: (s, N) the known part of each stage state.
        coefficients: (s, s) the tableau entries coupling the stages of the group.
        dt: the step size (float or 0-dim tensor).
    """

    def __init__(self, dynamics, times, base, coefficients, dt):
        self.dynamics = dynamics
        self.times = times
        self.base = base
        self.coefficients = coefficients
        self.dt = dt

    def __call__(self, stages):
        """(s, N) stage derivatives -> (s, N) derivatives at the stage states they imply."""
        states = self.base + self.dt * (self.coefficients @ stages)
        return torch.stack([self.dynamics(t, state, perturb) for (t, perturb), state in zip(self.times, states)])


class DenseIterationMatrix:
    """LU factors of ``I - dt * (coefficients (x) J)`` for a dense (N, N) Jacobian J."""

    def __init__(self, jacobian, coefficients, dt):
        self.shape = (coefficients.shape[0], jacobian.shape[0])
        matrix = torch.kron(coefficients, jacobian).mul_(-dt)
        matrix.diagonal().add_(1)
        self.lu, self.pivots, info = torch.linalg.lu_factor_ex(matrix)
        self.singular = bool(info != 0)

    def solve(self, rhs, adjoint=False):
        """(s, N) -> (s, N): M^-1 rhs, or M^-T rhs with ``adjoint``."""
        out = torch.linalg.lu_solve(self.lu, self.pivots, rhs.reshape(-1, 1), adjoint=adjoint)
        return out.view(self.shape)


class RowBlockIterationMatrix:
    """LU factors of the per-row matrices ``I - dt * (coefficients (x) J_b)``, J_b (D, D) blocks.

    Args:
        blocks: (B, D, D) the Jacobian blocks.
        coefficients: (s, s).
        dt: step size (float).
        rows: the ``RowBlocks`` mapping flat states to rows.
    """

    def __init__(self, blocks, coefficients, dt, rows):
        count, width = blocks.shape[0], blocks.shape[1]
        stages = coefficients.shape[0]
        self.rows = rows
        self.stages = stages
        matrix = (coefficients[None, :, None, :, None] * blocks[:, None, :, None, :]).mul_(-dt)
        matrix = matrix.reshape(count, stages * width, stages * width)
        matrix.diagonal(dim1=-2, dim2=-1).add_(1)
        self.lu, self.pivots, info = torch.linalg.lu_factor_ex(matrix)
        self.singular = bool((info != 0).any())

    def solve(self, rhs, adjoint=False):
        """(s, N) -> (s, N): M^-1 rhs, or M^-T rhs with ``adjoint``, row by row."""
        rows = self.rows.to_rows(rhs)  # (s, B, D)
        count, width = rows.shape[1], rows.shape[2]
        stacked = rows.transpose(0, 1).reshape(count, self.stages * width, 1)
        out = torch.linalg.lu_solve(self.lu, self.pivots, stacked, adjoint=adjoint)
        return self.rows.from_rows(out.view(count, self.stages, width).transpose(0, 1))


class IdentityIterationMatrix:
    """``M = I``: the loop becomes fixed-point iteration ``K <- Phi(K)``."""

    singular = False

    def solve(self, rhs, adjoint=False):
        return rhs


def weighted_rms(values, scale):
    """RMS of ``values / scale`` over every element, as a float (``scale`` broadcasts)."""
    return float((values / scale).square().mean().sqrt())


def solve_stage_equations(equations, guess, matrix, scale, *, max_iters, describe):
    """Iterate ``K <- K - M^-1 (K - Phi(K))`` from ``guess`` until converged; returns K (s, N).

    Args:
        equations: the ``StageEquations`` (no autograd graph is recorded: call under no_grad).
        guess: (s, N) starting stage derivatives.
        matrix: an iteration matrix (``solve(rhs)``).
        scale: (N,) ``atol + rtol * |y0|`` for the convergence norm.
        max_iters: at most this many iterations.
        describe: returns the text naming the step, for error messages.
    """
    if matrix.singular:
        raise NonlinearSolveError(f"The Newton iteration matrix I - dt * (A (x) df/dy) is singular for {describe()}; "
                                  "use a smaller step_size.")
    dt = abs(float(equations.dt))
    stages = guess
    previous = None
    for iteration in range(1, max_iters + 1):
        residual = stages - equations(stages)
        update = -matrix.solve(residual)
        stages = stages + update
        size = dt * weighted_rms(update, scale)
        if not math.isfinite(size):
            raise _not_converged(describe(), iteration, dt * weighted_rms(residual, scale), size, "diverged to NaN/Inf")
        if size <= 1:
            return stages
        if previous is not None:
            rate = size / previous
            if rate < 1 and rate / (1 - rate) * size <= 1:
                return stages
        previous = size
    raise _not_converged(describe(), max_iters, dt * weighted_rms(residual, scale), size, "did not converge")


def _not_converged(where, iterations, residual, update, what):
    return NonlinearSolveError(
        f"The nonlinear solve for {where} {what} after {iterations} iteration(s): residual norm {residual:.3e}, "
        f"last update norm {update:.3e} (weighted RMS norms of dt * (K - Phi(K)) and dt * dK; converged means "
        "<= 1). Use a smaller step_size, raise max_iters, or loosen nonlinear_rtol / nonlinear_atol.")
