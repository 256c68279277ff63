"""Implicit Runge-Kutta methods: convergence, stiff problems against scipy, torchdiffeq-style
usage (tuple states, reverse time, float32, events), Jacobian options, errors."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import fastcnf
from fastcnf.ode.implicit.runge_kutta import ImplicitRungeKutta, stage_groups
from fastcnf.ode.implicit.tableaus import IMPLICIT_TABLEAUS, ImplicitTableau
from fastcnf.ode.registry import OdeMethod as Method

F64 = torch.float64
METHOD_NAMES = sorted(IMPLICIT_TABLEAUS)
TIGHT = dict(nonlinear_rtol=1e-14, nonlinear_atol=1e-14)


def nonautonomous(t, y):
    """y = (exp(sin t), 1 / (1 + sin t)): linear and quadratic, both time dependent."""
    return torch.stack([torch.cos(t) * y[0], -torch.cos(t) * y[1] ** 2])


def nonautonomous_exact(t):
    t = torch.as_tensor(t, dtype=F64)
    return torch.stack([torch.exp(torch.sin(t)), 1 / (1 + torch.sin(t))])


# Step counts in each method's asymptotic range, with errors well above rounding.
ORDER_STEPS = {"implicit_euler": (16, 32), "implicit_midpoint": (8, 16), "trapezoid": (8, 16), "sdirk2": (8, 16),
               "trbdf2": (8, 16), "radauIIA3": (16, 32), "gl4": (4, 8), "radauIIA5": (4, 8), "gl6": (2, 4)}


def _final_error(method, steps, options=None):
    y0 = nonautonomous_exact(0.0)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    options = dict(step_size=1 / steps, **TIGHT, **(options or {}))
    y = fastcnf.odeint(nonautonomous, y0, t, method=method, options=options)
    return float((y[-1] - nonautonomous_exact(1.0)).abs().max())


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_convergence_order(method):
    coarse, fine = ORDER_STEPS[method]
    observed = math.log2(_final_error(method, coarse) / _final_error(method, fine))
    assert observed == pytest.approx(IMPLICIT_TABLEAUS[method].order, abs=0.2)


def test_a_fully_implicit_tableau_with_an_explicit_stage_converges(monkeypatch):
    """Lobatto IIIA (order 4): an explicit first stage, then a coupled (2N) block."""
    lobatto = ImplicitTableau(name="lobattoIIIA4", order=4, c=(0.0, 0.5, 1.0),
                              a=((0.0, 0.0, 0.0), (5 / 24, 1 / 3, -1 / 24), (1 / 6, 2 / 3, 1 / 6)),
                              b=(1 / 6, 2 / 3, 1 / 6), l_stable=False)
    monkeypatch.setitem(fastcnf.METHODS, "lobattoIIIA4", Method(ImplicitRungeKutta, {"tableau": lobatto}))
    observed = math.log2(_final_error("lobattoIIIA4", 4) / _final_error("lobattoIIIA4", 8))
    assert observed == pytest.approx(4, abs=0.2)


# A stiff linear system y' = A y + sin(t): eigenvalues of A log-spaced in [-1e4, -1].
def _stiff_problem():
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=F64))
    a = q @ torch.diag(-torch.logspace(0, 4, 8, dtype=F64)) @ q.T
    y0 = torch.randn(8, generator=generator, dtype=F64)
    return a, y0


STIFF_A, STIFF_Y0 = _stiff_problem()


def stiff(t, y):
    return STIFF_A @ y + torch.sin(t)


@pytest.fixture(scope="module")
def stiff_reference():
    a = STIFF_A.numpy()
    solution = solve_ivp(lambda t, y: a @ y + np.sin(t), (0.0, 1.0), STIFF_Y0.numpy(), method="Radau", rtol=1e-12,
                         atol=1e-12, jac=a)
    return torch.from_numpy(solution.y[:, -1])


# Errors at t=1 with 20 steps (|lambda| dt up to 500); measured values times about three.
STIFF_ERROR = {"implicit_euler": 3e-2, "sdirk2": 5e-4, "trbdf2": 5e-4, "radauIIA3": 3e-5, "radauIIA5": 1e-8}


@pytest.mark.parametrize("method", sorted(STIFF_ERROR))
def test_l_stable_methods_match_scipy_radau_on_a_stiff_system(method, stiff_reference):
    y = fastcnf.odeint(stiff, STIFF_Y0, torch.tensor([0.0, 1.0], dtype=F64), method=method,
                       options=dict(step_size=0.05))
    assert float((y[-1] - stiff_reference).abs().max()) < STIFF_ERROR[method]


@pytest.mark.parametrize("method", ["implicit_midpoint", "trapezoid", "gl4", "gl6"])
def test_a_stable_methods_stay_bounded_where_rk4_explodes(method):
    """Gauss and trapezoid methods do not damp the stiff modes (|R(-inf)| = 1) but stay bounded."""
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y = fastcnf.odeint(stiff, STIFF_Y0, t, method=method, options=dict(step_size=0.05))
    assert float(y[-1].abs().max()) < 2 * float(STIFF_Y0.abs().max()) + 1
    exploded = fastcnf.odeint(stiff, STIFF_Y0, t, method="rk4", options=dict(step_size=0.05))
    assert float(exploded[-1].abs().max()) > 1e100


def test_rk4_needs_two_hundred_times_the_steps_of_radau(stiff_reference):
    """RK4 is stable only for |lambda| dt < 2.79, i.e. >= 3590 steps here; radauIIA5 needs 20."""
    t = torch.tensor([0.0, 1.0], dtype=F64)
    radau = fastcnf.odeint(stiff, STIFF_Y0, t, method="radauIIA5", options=dict(step_size=1 / 20))
    assert float((radau[-1] - stiff_reference).abs().max()) < 1e-8
    with pytest.raises(fastcnf.NonFiniteStateError):  # |lambda| dt = 3.3: overflows to Inf
        fastcnf.odeint(stiff, STIFF_Y0, t, method="rk4", options=dict(step_size=1 / 3000))
    stable = fastcnf.odeint(stiff, STIFF_Y0, t, method="rk4", options=dict(step_size=1 / 4000))
    assert float((stable[-1] - stiff_reference).abs().max()) < 1e-8


def robertson(t, y):
    y1, y2, y3 = y.unbind()
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 ** 2, 3e7 * y2 ** 2])


def _robertson_numpy(t, y):
    y1, y2, y3 = y
    return [-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 ** 2, 3e7 * y2 ** 2]


@pytest.fixture(scope="module")
def robertson_reference():
    solution = solve_ivp(_robertson_numpy, (0.0, 40.0), [1.0, 0.0, 0.0], method="Radau", rtol=1e-11, atol=1e-14)
    return torch.tensor(solution.y[:, -1])


def _robertson(method, dtype, jacobian="auto"):
    """Robertson on [0, 40] over a geometric grid of 120 steps from 1e-5."""
    end = 40.0
    grid = torch.cat([torch.zeros(1, dtype=dtype), torch.logspace(-5, math.log10(end), 120, dtype=dtype)])
    grid[-1] = end
    y = fastcnf.odeint(robertson, torch.tensor([1.0, 0.0, 0.0], dtype=dtype), torch.tensor([0.0, end], dtype=dtype),
                       method=method, options=dict(grid_constructor=lambda func, y0, t: grid, jacobian=jacobian))
    return y[-1].double()


@pytest.mark.parametrize("method, rel_error", [("radauIIA5", 1e-8), ("radauIIA3", 2e-5)])
def test_robertson_on_a_geometric_grid_matches_scipy(method, rel_error, robertson_reference):
    y = _robertson(method, F64)
    assert float(((y - robertson_reference) / robertson_reference).abs().max()) < rel_error


@pytest.mark.parametrize("jacobian", ["finite_difference", "jacfwd"])
def test_robertson_in_float32(jacobian, robertson_reference):
    """Float32 finite differences need steps relative to each entry (y2 is about 3e-5)."""
    y = _robertson("radauIIA5", torch.float32, jacobian)
    assert float(((y - robertson_reference) / robertson_reference).abs().max()) < 1e-4


def _rows_problem(dtype=F64):
    """A CNF-shaped tuple state ((B, D) state, (B, 1) log-density) whose rows do not interact."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(3, 3, generator=generator, dtype=F64)

    def func(t, state):
        z, _ = state
        dz = torch.tanh(z @ weight.to(z.dtype)) * torch.cos(t) - z
        return dz, -(dz ** 2).sum(1, keepdim=True)

    z0 = torch.randn(5, 3, generator=generator, dtype=F64).to(dtype)
    return func, (z0, torch.zeros(5, 1, dtype=dtype))


@pytest.mark.parametrize("method", ["radauIIA5", "trbdf2"])
def test_tuple_state_dense_and_block_diagonal_agree_with_dopri5(method):
    func, state0 = _rows_problem()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    reference = fastcnf.odeint(func, state0, t, method="dopri5", rtol=1e-11, atol=1e-11)
    dense = fastcnf.odeint(func, state0, t, method=method, options=dict(step_size=0.05))
    block = fastcnf.odeint(func, state0, t, method=method,
                           options=dict(step_size=0.05, jacobian_structure="block_diagonal"))
    error = 1e-8 if method == "radauIIA5" else 5e-3  # trbdf2 is second order
    for d, b, r in zip(dense, block, reference):
        torch.testing.assert_close(b, d, rtol=0, atol=1e-12)
        torch.testing.assert_close(d, r, rtol=0, atol=error)


@pytest.mark.parametrize("method", ["gl4", "sdirk2"])
def test_reverse_time_retraces_the_forward_solve(method):
    func, state0 = _rows_problem()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    forward = fastcnf.odeint(func, state0, t, method=method, options=dict(step_size=0.05))
    end = tuple(part[-1] for part in forward)
    backward = fastcnf.odeint(func, end, t.flip(0), method=method, options=dict(step_size=0.05))
    order = IMPLICIT_TABLEAUS[method].order
    for f, b in zip(forward, backward):
        torch.testing.assert_close(b.flip(0), f, rtol=0, atol=10 * 0.05 ** order)


@pytest.mark.parametrize("method", ["radauIIA3", "trbdf2", "gl6"])
def test_float32_agrees_with_float64(method):
    func, state0 = _rows_problem()
    t = torch.tensor([0.0, 1.0], dtype=F64)
    expected = fastcnf.odeint(func, state0, t, method=method, options=dict(step_size=0.1))
    func32, state32 = _rows_problem(torch.float32)
    actual = fastcnf.odeint(func32, state32, t.float(), method=method, options=dict(step_size=0.1))
    for a, e in zip(actual, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=0, atol=2e-5)


@pytest.mark.parametrize("reverse_time", [False, True])
@pytest.mark.parametrize("method", ["gl4", "radauIIA5", "trbdf2"])
def test_odeint_event_finds_the_quarter_period(method, reverse_time):
    def oscillator(t, y):
        return torch.stack([y[1], -y[0]])

    event_t, solution = fastcnf.odeint_event(
        oscillator, torch.tensor([1.0, 0.0], dtype=F64), torch.tensor(0.0, dtype=F64), reverse_time=reverse_time,
        event_fn=lambda t, y: y[0], method=method, atol=1e-12, options=dict(step_size=0.01, interp="cubic"))
    tolerance = 1e-9 if IMPLICIT_TABLEAUS[method].order >= 4 else 1e-4
    assert float(event_t) == pytest.approx(-math.pi / 2 if reverse_time else math.pi / 2, abs=tolerance)
    assert float(solution[-1, 0]) == pytest.approx(0.0, abs=tolerance)


@pytest.mark.parametrize("jacobian", ["jacfwd", "jacrev", "finite_difference"])
@pytest.mark.parametrize("structure", ["dense", "block_diagonal"])
def test_every_jacobian_option_gives_the_same_solution(jacobian, structure):
    func, state0 = _rows_problem()
    t = torch.tensor([0.0, 1.0], dtype=F64)
    expected = fastcnf.odeint(func, state0, t, method="radauIIA5", options=dict(step_size=0.1, **TIGHT))
    actual = fastcnf.odeint(func, state0, t, method="radauIIA5",
                            options=dict(step_size=0.1, jacobian=jacobian, jacobian_structure=structure, **TIGHT))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-13)


def test_block_diagonal_costs_d_evaluations_per_jacobian_instead_of_n():
    func, state0 = _rows_problem()
    t = torch.tensor([0.0, 1.0], dtype=F64)
    counts = {}
    for structure in ("dense", "block_diagonal"):
        with fastcnf.track() as stats:
            fastcnf.odeint(func, state0, t, method="implicit_euler",
                           options=dict(step_size=0.5, jacobian="finite_difference", jacobian_structure=structure))
        counts[structure] = stats.nfe_forward
    # Two steps; N = 5 * 4 = 20 columns dense, D = 4 per row.
    assert counts["dense"] - counts["block_diagonal"] == 2 * (20 - 4)


@pytest.mark.parametrize("method, evaluations", [("implicit_euler", 1), ("sdirk2", 2), ("trbdf2", 2),
                                                 ("radauIIA5", 3), ("gl6", 3)])
def test_linear_stiff_steps_take_two_newton_iterations(method, evaluations):
    """With the exact Jacobian a linear problem converges in one update, confirmed by a second:
    per step f0, one jacfwd call and two iterations over the implicit stages."""
    steps = 4
    with torch.no_grad(), fastcnf.track() as stats:
        fastcnf.odeint(stiff, STIFF_Y0, torch.tensor([0.0, 0.2], dtype=F64), method=method,
                       options=dict(step_size=0.05, jacobian="jacfwd"))
    assert stats.nfe_forward == steps * (1 + 1 + 2 * evaluations)


@pytest.mark.parametrize("method", ["sdirk2", "trbdf2", "radauIIA5"])
def test_one_factorization_per_step(method, monkeypatch):
    """Equal diagonal entries share one factorization; a fully implicit method factors its (S N) matrix."""
    calls = []
    factor = torch.linalg.lu_factor_ex

    def counting(matrix):
        calls.append(tuple(matrix.shape))
        return factor(matrix)

    monkeypatch.setattr(torch.linalg, "lu_factor_ex", counting)
    fastcnf.odeint(stiff, STIFF_Y0, torch.tensor([0.0, 0.2], dtype=F64), method=method, options=dict(step_size=0.05))
    size = 8 * len(stage_groups(IMPLICIT_TABLEAUS[method])[-1])
    assert calls == [(size, size)] * 4


def test_fixed_point_iteration_solves_a_non_stiff_problem():
    expected = _final_error("gl4", 8)
    assert _final_error("gl4", 8, dict(nonlinear_solver="fixed_point")) == pytest.approx(expected, rel=1e-6)


def test_func_that_torch_func_cannot_transform_falls_back_to_finite_differences():
    def with_inner_grad(t, y):
        with torch.enable_grad():
            inner = y.detach().requires_grad_()
            (slope,) = torch.autograd.grad((inner ** 3).sum() / 3, inner)
        return -slope.detach() - y

    y0 = torch.linspace(0.1, 1.0, 20, dtype=F64)
    with pytest.warns(UserWarning, match="using finite-difference Jacobians"):
        y = fastcnf.odeint(with_inner_grad, y0, torch.tensor([0.0, 1.0], dtype=F64), method="radauIIA5",
                           options=dict(step_size=0.1))
    reference = fastcnf.odeint(lambda t, y: -y ** 2 - y, y0, torch.tensor([0.0, 1.0], dtype=F64), method="dopri5",
                               rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(y, reference, rtol=0, atol=1e-8)


def test_perturb_evaluates_just_inside_the_step():
    times = []

    def func(t, y):
        times.append(float(t))
        return -y

    fastcnf.odeint(func, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="radauIIA3",
                   options=dict(step_size=1.0, perturb=True, jacobian="jacrev"))
    assert times[0] == math.nextafter(0.0, 1.0)
    assert math.nextafter(1.0, 0.0) in times and 1.0 not in times


# --- errors -------------------------------------------------------------------------------


def test_non_convergence_raises_naming_time_residual_and_iterations():
    with pytest.raises(fastcnf.NonlinearSolveError) as caught:
        fastcnf.odeint(nonautonomous, nonautonomous_exact(0.0), torch.tensor([0.0, 1.0], dtype=F64),
                       method="radauIIA5", options=dict(step_size=0.5, max_iters=1))
    message = str(caught.value)
    assert "radauIIA5: the step from t=0.0 to t=0.5" in message
    assert "after 1 iteration(s)" in message
    assert "residual norm" in message
    assert isinstance(caught.value, RuntimeError)


def test_fixed_point_on_a_stiff_problem_diverges_with_an_error_in_user_time():
    with pytest.raises(fastcnf.NonlinearSolveError, match=r"the step from t=0.0 to t=-0.05 diverged"):
        fastcnf.odeint(stiff, STIFF_Y0, torch.tensor([0.0, -1.0], dtype=F64), method="gl4",
                       options=dict(step_size=0.05, nonlinear_solver="fixed_point"))


def test_singular_newton_matrix_raises():
    # y' = 10 y with implicit Euler and dt = 0.1: I - dt * J = 0.
    with pytest.raises(fastcnf.NonlinearSolveError, match="singular"):
        fastcnf.odeint(lambda t, y: 10 * y, torch.ones(1, dtype=F64), torch.tensor([0.0, 0.1], dtype=F64),
                       method="implicit_euler", options=dict(jacobian="jacfwd"))


@pytest.mark.parametrize("options, message", [
    (dict(nonlinear_solver="broyden"), "nonlinear_solver"),
    (dict(jacobian="exact"), "jacobian"),
    (dict(jacobian_structure="sparse"), "jacobian_structure"),
    (dict(nonlinear_solver="fixed_point", jacobian="jacrev"), "apply to nonlinear_solver='newton' only"),
    (dict(nonlinear_rtol=-1.0), "nonlinear_rtol"),
    (dict(nonlinear_atol=float("nan")), "nonlinear_atol"),
    (dict(nonlinear_atol=0.0), "must be a positive finite number"),
    (dict(max_iters=0), "max_iters"),
    (dict(first_step=0.1), "not used by method 'trbdf2'"),
])
def test_bad_options_raise(options, message, monkeypatch):
    monkeypatch.setenv("FASTCNF_STRICT_OPTIONS", "1")  # an unused option is otherwise a warning
    with pytest.raises(fastcnf.InvalidOptionError, match=message):
        fastcnf.odeint(lambda t, y: -y, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                       method="trbdf2", options=dict(step_size=0.5, **options))


@pytest.mark.parametrize("state", [torch.ones((), dtype=F64), (torch.ones(3, 2, dtype=F64), torch.ones(4, dtype=F64))])
def test_block_diagonal_needs_a_common_leading_dimension(state):
    with pytest.raises(fastcnf.InvalidOptionError, match="leading"):
        fastcnf.odeint(lambda t, y: y, state, torch.tensor([0.0, 1.0], dtype=F64), method="sdirk2",
                       options=dict(step_size=0.5, jacobian_structure="block_diagonal"))


@pytest.mark.parametrize("dtype", [torch.complex128, torch.float16])
def test_states_other_than_float32_and_float64_are_rejected(dtype):
    with pytest.raises(TypeError, match="needs a float32 or float64 state"):
        fastcnf.odeint(lambda t, y: -y, torch.ones(2, dtype=dtype), torch.tensor([0.0, 1.0], dtype=F64),
                       method="gl4", options=dict(step_size=0.5))


def test_no_warnings_on_a_plain_solve():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastcnf.odeint(stiff, STIFF_Y0, torch.tensor([0.0, 0.1], dtype=F64), method="radauIIA5",
                       options=dict(step_size=0.05))
