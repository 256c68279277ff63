"""Drop-in agreement with torchdiffeq 0.2.5: same solutions (to tolerance) and the same number of
function evaluations for every shared method and every option, in float32 and float64."""

import warnings

import pytest
import torch
import torchdiffeq
from problems import CountingFunc, tanh_problem

import fastcnf

ADAPTIVE = ["dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun"]
FIXED = ["euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams"]
TOLERANCES = {torch.float32: (1e-4, 1e-6), torch.float64: (1e-6, 1e-8)}
# How far apart two correct adaptive solutions may be, in units of atol + rtol * |y|. dopri8's
# quartic dense output is coarse for its long steps, so where the two packages step differently
# (float32, see below) its outputs differ by a few tolerances.
AGREEMENT = 10.0


def run_both(method, dtype, options=None, t=None, rtol=None, atol=None, func=None, y0=None):
    """Solve one problem with both packages; returns (ours, theirs, our calls, their calls, stats)."""
    default_func, default_y0 = tanh_problem(dtype)
    func = default_func if func is None else func
    y0 = default_y0 if y0 is None else y0
    t = torch.linspace(0, 2, 5, dtype=dtype) if t is None else t
    default_rtol, default_atol = TOLERANCES[dtype]
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    ours, theirs = CountingFunc(func), CountingFunc(func)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The following arguments have no effect")  # torchdiffeq passes min_step
        expected = torchdiffeq.odeint(theirs, y0, t, method=method, options=options, rtol=rtol, atol=atol)
    with fastcnf.track() as stats:
        actual = fastcnf.odeint(ours, y0, t, method=method, options=options, rtol=rtol, atol=atol)
    return actual, expected, ours.calls, theirs.calls, stats


def assert_adaptive_agreement(actual, expected, rtol, atol, factor=AGREEMENT):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    allowed = factor * (atol + rtol * expected.abs())
    assert bool(((actual - expected).abs() <= allowed).all()), (actual - expected).abs().max()


def assert_nfe_close(ours, theirs):
    assert abs(ours - theirs) <= 0.1 * theirs, (ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_method_agrees(method, dtype):
    """Float32 dopri8 is the one case without an NFE check: torchdiffeq casts its error weights
    to float32, where they no longer sum to zero (1.2e-7 instead of 4e-16), so its error estimate
    and accept/reject decisions are dominated by rounding; fastcnf keeps the weights in float64."""
    actual, expected, our_calls, their_calls, stats = run_both(method, dtype)
    noisy = method == "dopri8" and dtype == torch.float32  # both packages step on rounding noise
    assert_adaptive_agreement(actual, expected, *TOLERANCES[dtype], factor=3 * AGREEMENT if noisy else AGREEMENT)
    assert stats.nfe_forward == our_calls
    if not (method == "dopri8" and dtype == torch.float32):
        assert_nfe_close(our_calls, their_calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", FIXED)
def test_fixed_grid_method_agrees(method, dtype):
    """Same grid and same arithmetic: equal to rounding, and the same evaluations. (In float32 the
    implicit Adams corrector's convergence test can flip by one iteration on rounding: torchdiffeq
    forms the Adams sums in float64, fastcnf in the state's dtype.)"""
    options = dict(step_size=0.1)
    if method == "explicit_adams":
        options["max_order"] = 5  # fastcnf's default; torchdiffeq's is unstable (see test_adams.py)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # implicit Adams corrector warnings, raised by both
        actual, expected, our_calls, their_calls, stats = run_both(method, dtype, options)
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)
    assert our_calls == stats.nfe_forward
    if dtype == torch.float64 or method == "explicit_adams" or "adams" not in method:
        assert our_calls == their_calls
    else:
        assert_nfe_close(our_calls, their_calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scipy_solver_agrees(dtype):
    options = dict(solver="RK45")
    actual, expected, our_calls, their_calls, stats = run_both("scipy_solver", dtype, options)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)
    assert our_calls == their_calls == stats.nfe_forward


# ---------------------------------------------------------------- options
F64 = torch.float64
T_LONG = torch.linspace(0, 4, 5, dtype=F64)


@pytest.mark.parametrize("name, method, options", [
    ("step_t", "dopri5", dict(step_t=torch.tensor([0.33, 1.41, 2.5], dtype=F64))),
    ("jump_t", "dopri5", dict(jump_t=torch.tensor([1.2, 3.3], dtype=F64))),
    ("step_t and jump_t", "bosh3", dict(step_t=torch.tensor([0.5, 2.7]), jump_t=torch.tensor([1.5]))),
    ("first_step", "dopri5", dict(first_step=0.37)),
    ("min_step", "dopri5", dict(min_step=0.05)),
    ("max_step", "dopri8", dict(max_step=0.1)),
    ("safety ifactor dfactor", "dopri5", dict(safety=0.7, ifactor=2.0, dfactor=0.5)),
    ("max_num_steps", "dopri5", dict(max_num_steps=1000)),
    ("dtype", "dopri5", dict(dtype=torch.float64)),
])
def test_adaptive_option_agrees(name, method, options):
    actual, expected, our_calls, their_calls, _ = run_both(method, F64, options, t=T_LONG)
    assert_adaptive_agreement(actual, expected, *TOLERANCES[F64], factor=1.0)
    assert our_calls == their_calls


@pytest.mark.parametrize("norm_name", ["max", "l1"])
def test_custom_norm_agrees(norm_name):
    """A user norm gets the state in the user's shape in both packages and gives the same steps."""
    norm = {"max": lambda x: x.abs().max(), "l1": lambda x: x.abs().mean()}[norm_name]
    actual, expected, our_calls, their_calls, _ = run_both("dopri5", F64, dict(norm=norm), t=T_LONG)
    assert_adaptive_agreement(actual, expected, *TOLERANCES[F64], factor=1.0)
    assert our_calls == their_calls


def test_float32_state_with_float32_time_dtype_agrees():
    """dtype=float32 makes torchdiffeq keep time in float32; fastcnf keeps float64 time, so the
    step sequence differs by time rounding only."""
    actual, expected, our_calls, their_calls, _ = run_both("dopri5", torch.float32, dict(dtype=torch.float32))
    assert_adaptive_agreement(actual, expected, *TOLERANCES[torch.float32])
    assert_nfe_close(our_calls, their_calls)


def step_down_at_one(t, y):
    return torch.where(t <= 1.0, torch.ones_like(y), -torch.ones_like(y)) + 0.1 * y


@pytest.mark.parametrize("method", ["euler", "rk4", "implicit_adams"])
def test_perturb_agrees(method):
    y0 = torch.ones(3, dtype=F64)
    options = dict(step_size=0.25, perturb=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        actual, expected, our_calls, their_calls, _ = run_both(method, F64, options, func=step_down_at_one, y0=y0,
                                                               t=T_LONG)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    assert our_calls == their_calls


def test_perturb_and_jump_t_agree_for_adaptive_steps():
    y0 = torch.ones(3, dtype=F64)
    options = dict(jump_t=torch.tensor([1.0], dtype=F64))
    actual, expected, our_calls, their_calls, _ = run_both("dopri5", F64, options, func=step_down_at_one, y0=y0,
                                                           t=T_LONG)
    assert_adaptive_agreement(actual, expected, *TOLERANCES[F64], factor=1.0)
    assert our_calls == their_calls


def test_grid_constructor_agrees():
    def quadratic_grid(func, y0, t):
        return t[0] + (t[-1] - t[0]) * torch.linspace(0, 1, 17, dtype=t.dtype) ** 2

    actual, expected, our_calls, their_calls, _ = run_both("midpoint", F64, dict(grid_constructor=quadratic_grid),
                                                           t=T_LONG)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    assert our_calls == their_calls


@pytest.mark.parametrize("method", ["euler", "rk4", "explicit_adams"])
def test_cubic_interpolation_agrees(method):
    t = torch.tensor([0.0, 0.13, 0.5, 0.77, 1.9], dtype=F64)
    options = dict(step_size=0.2, interp="cubic")
    if method == "explicit_adams":
        options["max_order"] = 5
    actual, expected, our_calls, their_calls, _ = run_both(method, F64, options, t=t)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    assert our_calls == their_calls


@pytest.mark.parametrize("max_order", [2, 3, 5, 8])
def test_max_order_agrees(max_order):
    """(torchdiffeq fails with an IndexError for max_order=1; fastcnf runs rk4, see test_adams.py.)"""
    options = dict(step_size=0.1, max_order=max_order)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_order < 4 warns in both
        actual, expected, our_calls, their_calls, _ = run_both("implicit_adams", F64, options)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    assert our_calls == their_calls


def test_tuple_rtol_atol_agree():
    func, y0 = tanh_problem(F64)
    pair = (y0[:1], y0[1:])

    def tuple_func(t, state):
        return tuple(func(t, torch.cat(state))[i] for i in (slice(0, 1), slice(1, None)))

    ours, theirs = CountingFunc(tuple_func), CountingFunc(tuple_func)
    kwargs = dict(rtol=(1e-7, 1e-4), atol=(1e-9, 1e-6))
    expected = torchdiffeq.odeint(theirs, pair, T_LONG, **kwargs)
    actual = fastcnf.odeint(ours, pair, T_LONG, **kwargs)
    for a, b in zip(actual, expected):
        assert_adaptive_agreement(a, b, 1e-4, 1e-6, factor=1.0)
    assert ours.calls == theirs.calls
