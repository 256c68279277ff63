"""Implicit Runge-Kutta methods on a fixed grid (implicit_euler, implicit_midpoint, trapezoid,
radauIIA3, gl4, radauIIA5, gl6, sdirk2, trbdf2), for stiff problems.

One stepper reads any ``ImplicitTableau``. Stages are grouped by the tableau's structure:
diagonally implicit methods solve their stages one after another, each an N-dimensional
system (stages whose row of ``a`` is zero from the diagonal on are evaluated directly, e.g.
the first stage of trapezoid and trbdf2 is ``f(t0, y0)``); fully implicit methods solve all
stages together, an (S * N)-dimensional system. Each system is solved by simplified Newton
(``fastcnf.ode.implicit.newton``) with the Jacobian formed once per step, at ``(t0, y0)``, and its iteration
matrix factored once per step (diagonally implicit stages with equal diagonal entries share
one factorization). The initial guess for every stage derivative is ``f(t0, y0)``. Under
autograd the stage gradients come from the implicit function theorem
(``fastcnf.ode.implicit.gradient``), whose backward linear solve stops at a relative change of
1e-10 (float64) or 1e-5 (float32).

Options (besides ``step_size``, ``grid_constructor``, ``interp`` and ``perturb`` of every
fixed-grid method):

* ``max_iters`` (100): iterations per nonlinear solve (torchdiffeq's option).
* ``nonlinear_solver`` ("newton"): or "fixed_point" (no Jacobian; converges only when
  ``dt * |a| * |df/dy|`` is small, i.e. not for stiff problems).
* ``nonlinear_rtol`` (>= 0), ``nonlinear_atol`` (> 0): the stage solve stops when its update in
  state units is within ``atol + rtol * |y0|`` (weighted RMS); both default to 1e-10 for
  float64 and 1e-5 for float32 states (the only dtypes supported). torchdiffeq's
  ``rtol``/``atol`` arguments do not apply to fixed-grid methods and are not used here.
* ``jacobian`` ("auto"): "jacfwd", "jacrev" or "finite_difference" (see ``fastcnf.ode.implicit.jacobian``).
* ``jacobian_structure`` ("dense"): or "block_diagonal" when rows of the state (its leading
  dimension) do not interact, as in a CNF batch: only the (D, D) blocks are formed and
  factored, B * D^2 entries instead of (B * D)^2. A wrong claim slows or stops convergence but
  cannot give a wrong converged step.

When a solve does not converge, ``NonlinearSolveError`` names the step, the residual norm and
the iteration count (torchdiffeq only warns and keeps the unconverged step).

Differences from torchdiffeq's repository head: its gl4 tableau has both nodes at
1/2 - sqrt(3)/6 (the second is 1/2 + sqrt(3)/6), so for time-dependent ``func`` its gl4 is
first order; here it is fourth order. Its nonlinear solve is Broyden's method started from the
identity; results agree to within the solves' tolerances where it converges.
"""

from dataclasses import dataclass
from functools import partial

import torch

from ...errors import InvalidOptionError
from ..dynamics import Perturb
from ..explicit.fixed_grid import FixedGridSolver
from ..validation import require_choice, require_non_negative, require_positive
from .gradient import attach_implicit_gradient
from .jacobian import DynamicsJacobian, RowBlocks, check_jacobian_method
from .newton import (
    DenseIterationMatrix,
    IdentityIterationMatrix,
    RowBlockIterationMatrix,
    StageEquations,
    solve_stage_equations,
)

__all__ = ["ImplicitRungeKutta", "DEFAULT_NONLINEAR_TOLERANCE", "stage_groups"]

DEFAULT_NONLINEAR_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
NONLINEAR_SOLVERS = ("newton", "fixed_point")
_option_choice = partial(require_choice, error=InvalidOptionError)
JACOBIAN_STRUCTURES = ("dense", "block_diagonal")


def stage_groups(tableau):
    """Stage indices solved together, in order: one per stage for diagonally implicit methods;
    otherwise the leading explicit stages one by one, then all others at once."""
    if tableau.diagonally_implicit:
        return [(i,) for i in range(tableau.stages)]
    explicit = 0
    while explicit < tableau.stages and tableau.explicit_stage(explicit):
        explicit += 1
    return [(i,) for i in range(explicit)] + [tuple(range(explicit, tableau.stages))]


@dataclass(frozen=True)
class _GroupPlan:
    """How one group of stages is computed in every step.

    ``coupling`` (s, s) holds the tableau entries among the group's stages, ``inputs`` (s, p)
    those on the p earlier stages (None when p = 0); ``key`` identifies the coupling, so groups
    with equal couplings share a factorization.
    """

    stages: tuple
    explicit: bool
    is_first_derivative: bool
    coupling: torch.Tensor
    inputs: object
    key: tuple


def _plan_groups(tableau, dtype, device):
    a = torch.tensor(tableau.a, dtype=dtype, device=device)
    plans = []
    for group in stage_groups(tableau):
        first = group[0]
        explicit = len(group) == 1 and tableau.explicit_stage(first)
        plans.append(_GroupPlan(
            stages=group,
            explicit=explicit,
            is_first_derivative=explicit and tableau.c[first] == 0 and not any(tableau.a[first]),
            coupling=a[first:group[-1] + 1, first:group[-1] + 1],
            inputs=a[first:group[-1] + 1, :first] if first > 0 else None,
            key=tuple(tableau.a[i][j] for i in group for j in group),
        ))
    return plans


class ImplicitRungeKutta(FixedGridSolver):
    """An implicit Runge-Kutta method of ``fastcnf.ode.implicit.tableaus`` on a grid; see the module docstring."""

    OPTIONS = FixedGridSolver.OPTIONS | {"max_iters", "nonlinear_solver", "nonlinear_rtol", "nonlinear_atol",
                                         "jacobian", "jacobian_structure"}

    def __init__(self, dynamics, y0, rtol, atol, *, tableau, max_iters=100, nonlinear_solver="newton",
                 nonlinear_rtol=None, nonlinear_atol=None, jacobian=None, jacobian_structure=None, **options):
        super().__init__(dynamics, y0, rtol, atol, **options)
        _check_state_dtype(y0, tableau.name)
        self.tableau = tableau
        self.max_iters = int(max_iters)
        self.newton = _option_choice("'nonlinear_solver'", nonlinear_solver, NONLINEAR_SOLVERS) == "newton"
        _check_newton_options(self.newton, jacobian, jacobian_structure)
        default = DEFAULT_NONLINEAR_TOLERANCE[y0.dtype]
        self.nonlinear_rtol = require_non_negative("option 'nonlinear_rtol'",
                                                   default if nonlinear_rtol is None else nonlinear_rtol,
                                                   InvalidOptionError)
        self.nonlinear_atol = require_positive("option 'nonlinear_atol'",
                                               default if nonlinear_atol is None else nonlinear_atol,
                                               InvalidOptionError)
        structure = _option_choice("'jacobian_structure'", jacobian_structure or "dense", JACOBIAN_STRUCTURES)
        self.rows = RowBlocks(dynamics.layout, y0.device) if structure == "block_diagonal" else None
        self.jacobian = None
        if self.newton:
            self.jacobian = DynamicsJacobian(dynamics, check_jacobian_method(jacobian or "auto"), self.rows)
        self.groups = _plan_groups(tableau, y0.dtype, y0.device)
        self.b = torch.tensor(tableau.b, dtype=y0.dtype, device=y0.device)
        self.start_perturb = Perturb.NEXT if self.perturb else Perturb.NONE

    def _increment(self, t0, dt, t1, y0):
        f0 = self.dynamics(t0, y0, self.start_perturb)
        step = ImplicitStageSolve(self, t0, dt, t1, y0, f0)
        stages = []
        for group in self.groups:
            stages.append(step.solve_group(group, torch.cat(stages) if stages else None))
        stages = torch.cat(stages)
        if isinstance(dt, torch.Tensor):
            return dt * (self.b @ stages), f0
        return torch.mv(stages.t(), self.b) * dt, f0


class ImplicitStageSolve:
    """The work of one step: the Jacobian, the factored iteration matrices, the stage solves."""

    def __init__(self, solver, t0, dt, t1, y0, f0):
        self.solver = solver
        self.t0, self.dt, self.t1 = t0, dt, t1
        self.y0, self.f0 = y0, f0
        self.floats = (_as_float(t0), _as_float(dt), _as_float(t1))
        self.describe = partial(_describe_step, solver.tableau.name, self.floats[0], self.floats[2],
                                solver.dynamics.reverse)
        self.scale = solver.nonlinear_atol + solver.nonlinear_rtol * y0.detach().abs()
        self.jacobian = None
        self.matrices = {}

    def solve_group(self, group, previous):
        """Stage derivatives (s, N) of ``group`` (a ``_GroupPlan``) given the earlier stages (p, N) or None."""
        solver = self.solver
        if group.is_first_derivative:
            return self.f0[None]
        base = self.y0.expand(len(group.stages), -1) if previous is None else self.y0 + self.dt * (
            group.inputs @ previous)
        if group.explicit:
            t, perturb = self._time(group.stages[0], self.t0, self.dt, self.t1)
            return solver.dynamics(t, base[0], perturb)[None]
        t0, dt, t1 = self.floats
        with torch.no_grad():
            matrix = self._matrix(group)
            detached = StageEquations(solver.dynamics, [self._time(i, t0, dt, t1) for i in group.stages],
                                      base.detach(), group.coupling, dt)
            guess = self.f0.detach().expand(len(group.stages), -1)
            stages = solve_stage_equations(detached, guess, matrix, self.scale, max_iters=solver.max_iters,
                                           describe=self.describe)
        if not torch.is_grad_enabled():
            return stages
        recorded = StageEquations(solver.dynamics, [self._time(i, self.t0, self.dt, self.t1) for i in group.stages],
                                  base, group.coupling, self.dt)
        return attach_implicit_gradient(recorded, detached, stages, matrix,
                                        rtol=DEFAULT_NONLINEAR_TOLERANCE[stages.dtype], max_iters=solver.max_iters,
                                        describe=self.describe)

    def _time(self, stage, t0, dt, t1):
        """(time, perturb) of a stage; node 1 is evaluated at t1 just before it, as torchdiffeq does."""
        node = self.solver.tableau.c[stage]
        if node == 1:
            return t1, Perturb.PREV
        return t0 + node * dt, Perturb.NONE

    def _matrix(self, group):
        """The factored iteration matrix of ``group``, shared by groups with equal couplings."""
        solver = self.solver
        if not solver.newton:
            return IdentityIterationMatrix()
        if group.key not in self.matrices:
            if self.jacobian is None:
                self.jacobian = solver.jacobian(self.floats[0], self.y0.detach(), self.f0.detach(),
                                                solver.start_perturb)
            dt = self.floats[1]
            if solver.rows is None:
                matrix = DenseIterationMatrix(self.jacobian, group.coupling, dt)
            else:
                matrix = RowBlockIterationMatrix(self.jacobian, group.coupling, dt, solver.rows)
            self.matrices[group.key] = matrix
        return self.matrices[group.key]


def _describe_step(name, t0, t1, reverse):
    """The step in the user's time, for error messages."""
    sign = -1 if reverse else 1
    return f"{name}: the step from t={sign * t0 + 0.0!r} to t={sign * t1 + 0.0!r}"  # + 0.0: no "-0.0"


def _as_float(time):
    return float(time.detach()) if isinstance(time, torch.Tensor) else float(time)


def _check_state_dtype(y0, name):
    if y0.dtype not in DEFAULT_NONLINEAR_TOLERANCE:
        raise TypeError(f"method {name!r} needs a float32 or float64 state (its linear solves use torch.linalg), "
                        f"got {y0.dtype}.")


def _check_newton_options(newton, jacobian, jacobian_structure):
    if not newton and (jacobian is not None or jacobian_structure is not None):
        raise InvalidOptionError("options 'jacobian' and 'jacobian_structure' apply to nonlinear_solver='newton' "
                                 "only, not to 'fixed_point'.")

