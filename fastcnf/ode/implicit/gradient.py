"""Gradients of solved stage equations by the implicit function theorem.

The stages K* of an implicit step solve ``K = Phi(K, theta)``, where theta is everything the
stage states depend on: the step's start state, earlier stages, the step times and the
parameters of ``func``. Instead of backpropagating through the Newton iterations, the step
records one evaluation ``Phi(K*, theta)`` with K* held constant and returns K* with that
graph attached. A hook on the evaluation swaps the incoming cotangent v for the solution u of

    (I - dPhi/dK)^T u = v,

so that the graph then yields ``u^T dPhi/dtheta = v^T dK*/dtheta``, the exact derivative of
the solution, whatever iteration produced it. The linear system is solved by the same
preconditioned iteration as the forward pass (``u <- u + M^-T (v - u + dPhi/dK^T u)`` with the
step's factored iteration matrix M), with vector-Jacobian products through one re-evaluation
of Phi at K*. Cost: one extra evaluation of the group's stages per step in the forward pass
(only when autograd is recording), one more plus a few vector-Jacobian products in the
backward pass. Second derivatives are not supported.
"""

import torch

from ...errors import NonlinearSolveError

__all__ = ["attach_implicit_gradient"]


def attach_implicit_gradient(recorded, detached, solution, matrix, *, rtol, max_iters, describe):
    """``solution`` (s, N) carrying the implicit-function-theorem gradient.

    Args:
        recorded: ``StageEquations`` whose base and times carry the autograd graph.
        detached: the same equations on detached inputs (for the backward products).
        solution: (s, N) the converged stages, without graph.
        matrix: the step's iteration matrix (``solve(rhs, adjoint=True)``).
        rtol: relative accuracy of the backward linear solve (max norm).
        max_iters: at most this many backward iterations.
        describe: returns the text naming the step, for error messages.
    """
    evaluation = recorded(solution)
    if not evaluation.requires_grad:
        return solution
    evaluation.register_hook(_CotangentSolve(detached, solution, matrix, rtol, max_iters, describe))
    # The value stays exactly ``solution``; the gradient goes to ``evaluation``.
    return solution + (evaluation - evaluation.detach())


class _CotangentSolve:
    """Tensor hook mapping the cotangent v of Phi(K*) to u = (I - dPhi/dK)^-T v."""

    def __init__(self, equations, solution, matrix, rtol, max_iters, describe):
        self.equations = equations
        self.solution = solution
        self.matrix = matrix
        self.rtol = rtol
        self.max_iters = max_iters
        self.describe = describe

    def __call__(self, cotangent):
        if cotangent is None:
            return None
        with torch.enable_grad():
            stages = self.solution.detach().requires_grad_()
            evaluation = self.equations(stages)
        if not evaluation.requires_grad:  # Phi does not depend on K
            return cotangent
        solve = self.matrix.solve
        adjoint = solve(cotangent, adjoint=True)
        for _ in range(self.max_iters):
            (pulled,) = torch.autograd.grad(evaluation, stages, adjoint, retain_graph=True, allow_unused=True,
                                            materialize_grads=True)
            correction = solve(cotangent - adjoint + pulled, adjoint=True)
            adjoint = adjoint + correction
            change, size = float(correction.abs().max()), float(adjoint.abs().max())
            if change <= self.rtol * size:
                return adjoint
            if change != change or size == float("inf"):
                break
        raise NonlinearSolveError(f"The backward (implicit function theorem) solve for {self.describe()} did not "
                                  f"converge in {self.max_iters} iteration(s); last change {change:.3e} against "
                                  f"solution size {size:.3e}.")
