"""Drop-in exactness against torchdiffeq 0.2.5 where the two used to differ: perturbed fixed grids
under the adjoint, event location accuracy, result dtypes of ``func``, tuple entries that
flatten to the state's size, and the options torchdiffeq accepts."""

import math
import warnings

import numpy as np
import pytest
import torch
import torchdiffeq

import fastcnf

EXPLICIT_FIXED = ["euler", "midpoint", "heun2", "heun3", "rk4"]
ADAMS = ["explicit_adams", "implicit_adams"]
IMPLICIT = ["implicit_euler", "implicit_midpoint", "trapezoid", "radauIIA3", "gl4", "radauIIA5", "gl6", "sdirk2",
            "trbdf2"]
ADAPTIVE = ["dopri5", "bosh3", "dopri8", "adaptive_heun", "fehlberg2"]  # tsit5 is not in torchdiffeq 0.2.5
DTYPES = [torch.float32, torch.float64]
TORCHDIFFEQ_ADAMS_ORDER = {"explicit_adams": dict(max_order=12)}  # fastcnf's default is 5 (README)


def quiet(call, *args, **kwargs):
    """Run ``call`` with warnings silenced (torchdiffeq's Adams warns about convergence)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


# ----------------------------------------------------------- 1. perturbed fixed grids and the adjoint
class TimeRecorder(torch.nn.Module):
    """y' = -a y, recording every time it is evaluated at."""

    def __init__(self, dtype):
        super().__init__()
        self.rate = torch.nn.Parameter(torch.tensor(1.0, dtype=dtype))
        self.times = []

    def forward(self, t, y):
        self.times.append(t.item())
        return -self.rate * y


def adjoint_run(lib, method, dtype, t_requires_grad):
    """Forward and backward evaluation times of an adjoint solve on a perturbed grid of step 0.5."""
    func = TimeRecorder(dtype)
    x0 = torch.tensor([1.0, 2.0], dtype=dtype, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=dtype, requires_grad=t_requires_grad)
    xs = quiet(lib.odeint_adjoint, func, x0, t, method=method, options=dict(step_size=0.5, perturb=True))
    forward, func.times = func.times, []
    xs.sum().backward()
    return forward, func.times, x0.grad, func.rate.grad, t.grad


def test_the_issue_example_evaluates_where_torchdiffeq_does():
    """The adjoint of rk4 with perturb=True used to start its backward pass with one evaluation at
    exactly t=1.0, on the grid, and one more than torchdiffeq."""
    _, ours, *_ = adjoint_run(fastcnf, "rk4", torch.float32, False)
    _, theirs, *_ = adjoint_run(torchdiffeq, "rk4", torch.float32, False)
    assert len(ours) == len(theirs) == 8
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert ours[0] == float(np.nextafter(np.float32(1.0), np.float32(0.0)))


@pytest.mark.parametrize("t_requires_grad", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", EXPLICIT_FIXED + ADAMS + IMPLICIT)
def test_perturbed_grid_never_evaluates_on_a_grid_point(method, dtype, t_requires_grad):
    forward, backward, *_ = adjoint_run(fastcnf, method, dtype, t_requires_grad)
    grid = {0.0, 0.5, 1.0}
    assert not grid & set(forward), sorted(grid & set(forward))
    assert not grid & set(backward), sorted(grid & set(backward))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", EXPLICIT_FIXED + ADAMS)
def test_perturbed_adjoint_matches_torchdiffeq(method, dtype):
    """Same evaluation count backward as torchdiffeq when t needs no gradient, one fewer per output
    time when it does (fastcnf reads dL/dt off the solver's first evaluation), same gradients."""
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for t_requires_grad in (False, True):
        ours = adjoint_run(fastcnf, method, dtype, t_requires_grad)
        theirs = adjoint_run(torchdiffeq, method, dtype, t_requires_grad)
        assert len(ours[0]) == len(theirs[0])
        assert len(ours[1]) == len(theirs[1]) - (1 if t_requires_grad else 0)
        for mine, expected in zip(ours[2:], theirs[2:]):
            if expected is not None:
                torch.testing.assert_close(mine, expected, **tolerance)


# ----------------------------------------------------------------- 2. event location accuracy
def event_problem(name, dtype, reverse, target=None):
    """(func, y0, event_fn, exact event time) of y' = 2.5 (const), y' = t (linear), y' = cos t (sine)."""
    sign = -1.0 if reverse else 1.0
    if name == "const":
        exact = sign * 1.52
        return (lambda t, y: torch.full_like(y, 2.5)), torch.full((1,), 0.3, dtype=dtype), \
            (lambda t, y: y[0] - (0.3 + 2.5 * exact)), exact
    if name == "linear":
        exact = sign * 2.0
        return (lambda t, y: t * torch.ones_like(y)), torch.zeros(1, dtype=dtype), (lambda t, y: y[0] - 2.0), exact
    target = 0.9 if target is None else target
    return (lambda t, y: torch.cos(t) * torch.ones_like(y)), torch.zeros(1, dtype=dtype), \
        (lambda t, y: y[0] - sign * target), sign * math.asin(target)


def event_error(lib, method, dtype, name, reverse, options=None, target=None, **tolerances):
    """Relative error of the located event time."""
    func, y0, event_fn, exact = event_problem(name, dtype, reverse, target)
    event_t, _ = quiet(lib.odeint_event, func, y0, torch.tensor(0.0, dtype=dtype), event_fn=event_fn,
                       reverse_time=reverse, method=method, options=options, **tolerances)
    return abs(event_t.item() - exact) / abs(exact)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", ["const", "linear", "sine"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", EXPLICIT_FIXED + ADAMS)
def test_fixed_grid_events_are_as_accurate_as_torchdiffeqs(method, dtype, name, reverse):
    """Where the step's discretization error dominates (sine), the errors agree to 0.1%; where the
    interpolant is exact (const, linear) fastcnf's is within 4 eps of torchdiffeq's or smaller."""
    options = dict(step_size=0.1, **TORCHDIFFEQ_ADAMS_ORDER.get(method, {}))
    ours = event_error(fastcnf, method, dtype, name, reverse, options)
    theirs = event_error(torchdiffeq, method, dtype, name, reverse, options)
    assert ours <= theirs * (1 + 1e-3) + 4 * torch.finfo(dtype).eps, (ours, theirs)


@pytest.mark.parametrize("rate, target, step", [(1.0, 30.0, 0.01), (0.7, 20.0, 0.01), (3.0, 50.0, 0.02)])
@pytest.mark.parametrize("method", ["rk4", "euler"])
def test_long_float32_fixed_grid_event_search_does_not_drift(method, rate, target, step):
    """y' = const over thousands of float32 steps: the event time used to be off by up to 4e-4
    (relative; 3e-5 here), the state drifting by a rounding per step against the float64 time."""
    def locate(lib):
        event_t, _ = quiet(lib.odeint_event, lambda t, y: torch.full_like(y, rate), torch.ones(1),
                           torch.tensor(0.0), event_fn=lambda t, y: y[0] - target, method=method,
                           options=dict(step_size=step))
        return abs(event_t.item() - (target - 1.0) / rate) / ((target - 1.0) / rate)

    ours, theirs = locate(fastcnf), locate(torchdiffeq)
    assert ours <= 4 * torch.finfo(torch.float32).eps
    assert ours <= theirs + 4 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", ["const", "linear"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_events_on_exact_interpolants(method, dtype, name, reverse):
    """The dense output reproduces these solutions, so the error is the event search's own (it
    bisects to atol=1e-9)."""
    ours = event_error(fastcnf, method, dtype, name, reverse, rtol=1e-4, atol=1e-9)
    theirs = event_error(torchdiffeq, method, dtype, name, reverse, rtol=1e-4, atol=1e-9)
    assert ours <= theirs * (1 + 1e-6) + 4 * torch.finfo(dtype).eps, (ours, theirs)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", [m for m in ADAPTIVE if m != "adaptive_heun"]
                         + [pytest.param("adaptive_heun", marks=pytest.mark.slow)])  # 4000 steps a solve
def test_adaptive_events_on_the_sine(method, dtype, reverse):
    """Here the error is the dense output's, which depends on where in its step the event falls. In
    float64 both packages take the same steps; in float32 at the default rtol=1e-7 both step on
    rounding noise, so the error is compared as a mean over 12 event levels."""
    targets = np.linspace(0.1, 0.95, 12)
    ours = np.mean([event_error(fastcnf, method, dtype, "sine", reverse, target=x) for x in targets])
    theirs = np.mean([event_error(torchdiffeq, method, dtype, "sine", reverse, target=x) for x in targets])
    if dtype == torch.float64:  # the same steps: equal up to the bisection's tolerance (atol)
        assert ours <= theirs + 2e-9, (ours, theirs)
    else:
        assert ours <= 1.25 * theirs + 4 * torch.finfo(dtype).eps, (ours, theirs)


# ----------------------------------------------------------------------- 3. func's result dtype
class Decay(torch.nn.Module):
    """y' = -a y returned as ``result_dtype`` (an integer result is the constant -1)."""

    def __init__(self, state_dtype, result_dtype):
        super().__init__()
        self.rate = torch.nn.Parameter(torch.tensor(0.5, dtype=state_dtype))
        self.result_dtype = result_dtype

    def derivative(self, y):
        if self.result_dtype.is_floating_point:
            return (-self.rate * y).to(self.result_dtype)
        return torch.full_like(y, -1, dtype=self.result_dtype)

    def forward(self, t, y):
        return tuple(self.derivative(part) for part in y) if isinstance(y, tuple) else self.derivative(y)


RESULT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.int64]
SHARED_METHODS = ["dopri5", "euler", "midpoint", "rk4", "explicit_adams", "implicit_adams"]


def dtype_run(lib, method, state_dtype, result_dtype, mode):
    """Solution (and gradients) of ``mode``: plain, tuple, adjoint or event."""
    func = Decay(state_dtype, result_dtype)
    options = dict(step_size=0.25) if method not in ("dopri5", "bosh3") else None
    y0 = torch.linspace(1.0, 2.0, 3, dtype=state_dtype).requires_grad_()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=state_dtype)
    if mode == "event":
        event_t, out = quiet(lib.odeint_event, func, y0, t[0], event_fn=lambda t, y: y[0] - 0.8, method=method,
                             options=options)
        return out, event_t
    if mode == "tuple":
        out = quiet(lib.odeint, func, (y0, 2 * y0), t, method=method, options=options)[1]
    else:
        extra = {}
        if mode == "adjoint" and lib is fastcnf:  # torchdiffeq's backward steps (README)
            extra = dict(adjoint_options=dict(options or {}, carry_step_size=False))
        call = lib.odeint_adjoint if mode == "adjoint" else lib.odeint
        out = quiet(call, func, y0, t, method=method, options=options, **extra)
    if not result_dtype.is_floating_point:
        return out, None, None
    out[-1].double().square().sum().backward()
    return out, y0.grad, func.rate.grad


@pytest.mark.parametrize("mode", ["plain", "tuple", "adjoint", "event"])
@pytest.mark.parametrize("result_dtype", RESULT_DTYPES, ids=str)
@pytest.mark.parametrize("state_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", SHARED_METHODS)
def test_results_in_another_dtype_give_torchdiffeqs_result(method, state_dtype, result_dtype, mode):
    """Same dtypes everywhere (a fixed grid's event solution is y0 + dt * f: a float64 result widens a
    float32 state, as in torchdiffeq) and the same numbers to the precision of the narrower dtype."""
    if result_dtype == state_dtype:
        pytest.skip("not a different dtype")
    ours, theirs = dtype_run(fastcnf, method, state_dtype, result_dtype, mode), \
        dtype_run(torchdiffeq, method, state_dtype, result_dtype, mode)
    narrow = min(torch.finfo(state_dtype).eps, torch.finfo(result_dtype).eps if result_dtype.is_floating_point
                 else 1.0, key=lambda eps: -eps)
    for mine, expected in zip(ours, theirs):
        if expected is None:
            assert mine is None or not mine.requires_grad
            continue
        assert mine.dtype == expected.dtype
        torch.testing.assert_close(mine, expected, rtol=100 * narrow, atol=100 * narrow, check_dtype=False)


# ----------------------------------------------------------------------------- 4. tuple entries
@pytest.mark.parametrize("method", ["rk4", "dopri5", "implicit_adams"])
def test_tuple_entries_may_come_back_in_another_shape(method):
    """The issue's example (a published JKO-iFlow codebase returns (N, 1) for an (N,) entry)."""
    def func(t, state):
        x, _ = state
        return -x, -(x * x).sum(dim=1, keepdim=True)

    y0 = (torch.randn(5, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(5))
    t = torch.tensor([0.0, 0.5, 1.0])
    options = dict(step_size=0.1) if method != "dopri5" else None
    ours = quiet(fastcnf.odeint, func, y0, t, method=method, options=options)
    theirs = quiet(torchdiffeq.odeint, func, y0, t, method=method, options=options)
    for mine, expected in zip(ours, theirs):
        assert mine.shape == expected.shape
        torch.testing.assert_close(mine, expected, rtol=1e-6, atol=1e-6)


def test_tuple_entries_under_the_adjoint_match_torchdiffeq():
    net = torch.nn.Linear(2, 2).double()

    class Func(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, state):
            x, _ = state
            dx = torch.tanh(self.net(x))
            return dx, -dx.sum(dim=1, keepdim=True)

    def gradients(lib):
        x0 = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        x, logp = lib.odeint_adjoint(Func(), (x0, torch.zeros(4, dtype=torch.float64)),
                                     torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-9, atol=1e-9)
        (x[-1].square().sum() + logp[-1].sum()).backward()
        grads = [x0.grad, *(p.grad.clone() for p in net.parameters())]
        net.zero_grad()
        return grads

    for mine, expected in zip(gradients(fastcnf), gradients(torchdiffeq)):
        torch.testing.assert_close(mine, expected, rtol=1e-6, atol=1e-8)


def test_tuple_entries_with_the_wrong_number_of_elements_still_fail():
    with pytest.raises(ValueError, match=r"shape \(5, 2\) for a state of shape \(5,\) \(tuple entry 1\); it must "
                                         r"have 5 elements"):
        fastcnf.odeint(lambda t, s: (-s[0], torch.zeros(5, 2)), (torch.randn(5, 2), torch.zeros(5)),
                       torch.tensor([0.0, 1.0]))
