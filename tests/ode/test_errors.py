"""Every error path (fastcnf/ode/validation.py, fastcnf/errors.py and the solvers): the exception type,
a message that names the problem and the offending value, and torchdiffeq compatibility (what
torchdiffeq reports with ``assert`` is still an AssertionError)."""

import math
import re
import time
import warnings

import pytest
import torch
import torchdiffeq

import fastcnf
from fastcnf import (
    FastCNFError,
    InvalidOptionError,
    InvalidStateError,
    InvalidTimeGridError,
    InvalidToleranceError,
    MaxNumStepsError,
    NonFiniteStateError,
    StepSizeUnderflowError,
    UnknownMethodError,
)

F64 = torch.float64
Y0 = torch.ones(2, dtype=F64)
T = torch.tensor([0.0, 1.0], dtype=F64)


def decay(t, y):
    return -y


def solve(func=decay, y0=Y0, t=T, **kwargs):
    return fastcnf.odeint(func, y0, t, **kwargs)


# ---------------------------------------------------------------- time grid
@pytest.mark.parametrize("t, message", [
    (torch.tensor([0.0, 1.0, 0.5]), r"strictly increasing or decreasing; t\[1\]=1.0 and t\[2\]=0.5"),
    (torch.tensor([0.0, 1.0, 1.0]), r"t\[1\]=1.0 and t\[2\]=1.0"),
    (torch.tensor([3.0, 2.0, 2.5]), r"t\[1\]=2.0 and t\[2\]=2.5"),
    (torch.tensor([[0.0, 1.0]]), r"one dimensional .* shape \(1, 2\)"),
    (torch.tensor([]), r"non-empty, got shape \(0,\)"),
    (torch.tensor([0.0, math.nan]), r"NaN or Inf: \[0.0, nan\]"),
    (torch.tensor([0.0, math.inf]), r"NaN or Inf: \[0.0, inf\]"),
    ([0.0, 1.0], r"must be a torch.Tensor, got list"),
])
def test_bad_time_grid(t, message):
    with pytest.raises(InvalidTimeGridError, match=message):
        solve(t=t)


def test_integer_time_is_a_type_error_like_torchdiffeq():
    with pytest.raises(TypeError, match="`t` must be a floating point Tensor but is a torch.LongTensor"):
        solve(t=torch.tensor([0, 1]))


# ---------------------------------------------------------------- initial state
@pytest.mark.parametrize("y0, message", [
    ([torch.ones(2)], r"y0 must be either a torch.Tensor or a tuple \(a non-empty one, of torch.Tensors\), got list"),
    ((), "a non-empty one"),
    ((torch.ones(2), 1.0), "got tuple"),
    (torch.ones(2, dtype=torch.int64), "`y0` must be a floating point Tensor but is a torch.LongTensor"),
    ((torch.ones(2), torch.ones(2, dtype=torch.int32)), "`y0\\[1\\]` must be a floating point Tensor"),
    ((torch.ones(2), torch.ones(2, dtype=F64)), r"share one dtype, got \[torch.float32, torch.float64\]"),
])
def test_bad_initial_state(y0, message):
    with pytest.raises(InvalidStateError, match=message):
        solve(func=lambda t, y: y, y0=y0)


def test_tuple_state_on_two_devices():
    y0 = (torch.ones(2), torch.ones(2, device="meta"))
    with pytest.raises(ValueError, match=r"one device, got \['cpu', 'meta'\]"):
        solve(func=lambda t, y: y, y0=y0, t=torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_non_finite_initial_state(bad, method):
    y0 = torch.tensor([1.0, bad], dtype=F64)
    options = dict(step_size=0.1) if method == "rk4" else None
    with pytest.raises(NonFiniteStateError, match="^non-finite values in state `y`: y0 contains NaN or Inf"):
        solve(y0=y0, method=method, options=options)


# ---------------------------------------------------------------- non-finite values during the solve
def reported_start_time(error):
    """The first ``t=<number>`` in an error message."""
    return float(re.search(r"(?<![a-z])t=(-?[0-9.e+-]+)", str(error.value)).group(1).rstrip("."))


def nan_after_half(t, y):
    return torch.where(t > 0.5, torch.full_like(y, math.nan), -y)


def inf_after_half(t, y):
    return torch.where(t > 0.5, torch.full_like(y, math.inf), -y)


@pytest.mark.parametrize("func", [nan_after_half, inf_after_half])
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "adaptive_heun"])
def test_non_finite_dynamics_stop_an_adaptive_solve_where_they_appear(func, method):
    """Trial steps that produce NaN/Inf are rejected and shrunk until the step underflows at
    t = 0.5, promptly; the message says where and why."""
    start = time.perf_counter()
    with pytest.raises(StepSizeUnderflowError, match=r"^underflow in dt .* NaN/Inf values appeared") as error:
        solve(func=func, method=method)
    assert time.perf_counter() - start < 5.0
    assert reported_start_time(error) == pytest.approx(0.5, abs=1e-9)


def test_non_finite_dynamics_stop_an_event_search():
    with pytest.raises(StepSizeUnderflowError, match="NaN/Inf values appeared") as error:
        solve(func=nan_after_half, t=torch.tensor([0.0, 9.0], dtype=F64), event_fn=lambda t, y: y[0] - 1e-3)
    assert reported_start_time(error) == pytest.approx(0.5, abs=1e-9)


def test_non_finite_dynamics_with_min_step_is_a_non_finite_state_error():
    """At min_step the step cannot shrink: the error names the step that contains t = 0.5."""
    with pytest.raises(NonFiniteStateError, match=r"^non-finite values in state `y` or its derivative in the step from "
                                                  r"t=.*dt=0.001 is already at min_step") \
            as error:
        solve(func=nan_after_half, options=dict(min_step=1e-3))
    assert 0.499 <= reported_start_time(error) <= 0.5


def test_non_finite_dynamics_in_reverse_time_report_user_time():
    def nan_before_half(t, y):
        return torch.where(t < 0.5, torch.full_like(y, math.nan), -y)

    with pytest.raises(StepSizeUnderflowError, match="NaN/Inf") as error:
        solve(func=nan_before_half, t=torch.tensor([1.0, 0.0], dtype=F64))
    assert reported_start_time(error) == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("method", ["euler", "rk4", "explicit_adams", "implicit_adams"])
def test_non_finite_state_on_a_fixed_grid(method):
    """Fixed grids check the outputs: the error names the step (in user time) that produced the
    non-finite output."""
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # implicit Adams: the corrector does not converge on NaN
        with pytest.raises(NonFiniteStateError,
                           match=r"^non-finite values in state `y`: NaN/Inf at the output in the step from "
                                 r"t=0\.9.* to t=1\.0"):
            solve(func=nan_after_half, t=t, method=method, options=dict(step_size=0.1))


def test_blow_up_underflows_near_the_singularity():
    """y' = y^2, y(0) = 1 has y = 1 / (1 - t): the step size underflows just after t = 1."""
    with pytest.raises(StepSizeUnderflowError, match=r"^underflow in dt .* no longer advances t=1\.0000"):
        solve(func=lambda t, y: y * y, t=torch.tensor([0.0, 2.0], dtype=F64))


def test_max_num_steps():
    with pytest.raises(MaxNumStepsError, match=r"max_num_steps exceeded \(5>=5\) at t=0\.\d+"):
        solve(func=lambda t, y: torch.cos(20 * t) * y, t=torch.tensor([0.0, 10.0], dtype=F64),
              options=dict(max_num_steps=5))


def test_max_num_steps_in_event_mode():
    with pytest.raises(MaxNumStepsError, match=r"max_num_steps exceeded \(3>=3\)"):
        solve(event_fn=lambda t, y: y[0] - 1e-9, options=dict(max_num_steps=3))


def test_scipy_solver_failure():
    with pytest.raises(FastCNFError, match=r"scipy_solver \(RK45\) failed"):
        solve(func=lambda t, y: y * y, t=torch.tensor([0.0, 2.0], dtype=F64), method="scipy_solver",
              options=dict(solver="RK45"))


# ---------------------------------------------------------------- methods and options
def test_unknown_method_lists_the_methods():
    with pytest.raises(UnknownMethodError, match=r'Invalid method "rk45"\. Must be one of \{"dopri8", "dopri5"'):
        solve(method="rk45")


UNUSED_OPTIONS = [
    ("dopri5", dict(foo=1), r"Option 'foo' is not used by method 'dopri5'; it accepts: check_every, controller, "
                            r"device_loop, dfactor, dtype"),
    ("euler", dict(first_step=0.1), r"Option 'first_step' is not used by method 'euler' \(a fixed-grid method takes "
                                    r"the steps of its grid\); it accepts: grid_constructor, interp, norm, perturb, "
                                    r"step_size"),
    ("dopri5", dict(step_size=0.1), r"Option 'step_size' is not used by method 'dopri5' \(an adaptive method "
                                    r"chooses its own steps\)"),
    ("rk4", dict(max_order=4), r"Option 'max_order' is not used by method 'rk4'"),
    ("scipy_solver", dict(step_size=0.1), r"Option 'step_size' is not used by method 'scipy_solver'"),
]


@pytest.mark.parametrize("method, options, message", UNUSED_OPTIONS)
def test_option_not_used_by_the_method_is_ignored_with_a_warning(method, options, message, monkeypatch):
    """torchdiffeq warns about options a method does not use and ignores them; so does fastcnf."""
    monkeypatch.delenv("FASTCNF_STRICT_OPTIONS", raising=False)
    with pytest.warns(fastcnf.IgnoredOptionWarning, match=message + r".* It is ignored \(FASTCNF_STRICT_OPTIONS=1"):
        ours = solve(method=method, options=options)
    plain_options = {"euler": dict(), "rk4": dict()}.get(method)
    expected = solve(method=method, options=plain_options)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method, options, message", UNUSED_OPTIONS)
def test_strict_options_make_unused_options_errors(method, options, message, monkeypatch):
    monkeypatch.setenv("FASTCNF_STRICT_OPTIONS", "1")
    with pytest.raises(InvalidOptionError, match=message):
        solve(method=method, options=options)
    with pytest.raises(InvalidOptionError, match=message):
        fastcnf.odeint_adjoint(decay, Y0, T, method=method, options=options, adjoint_params=())


@pytest.mark.parametrize("method, options", [
    ("dopri5", dict(max_step=math.inf, first_step=None, jump_t=None, step_t=None, min_step=0.0, safety=0.9,
                    ifactor=10.0, dfactor=0.2, max_num_steps=2 ** 31 - 1, dtype=torch.float64)),
    ("rk4", dict(step_size=None, grid_constructor=None, interp="linear", perturb=False)),
    ("euler", dict(step_size=0.25, grid_constructor=None)),
    ("implicit_adams", dict(step_size=0.25, max_iters=4, max_order=12)),
    ("scipy_solver", dict(solver="LSODA", min_step=0.0, max_step=math.inf)),
])
def test_torchdiffeqs_defaults_given_explicitly_are_accepted(method, options, monkeypatch):
    """They used to raise InvalidOptionError; here they give torchdiffeq's result, without a warning."""
    monkeypatch.setenv("FASTCNF_STRICT_OPTIONS", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # implicit Adams: its corrector's convergence warning
        warnings.simplefilter("error", fastcnf.IgnoredOptionWarning)
        ours = solve(method=method, options=options)
        theirs = torchdiffeq.odeint(decay, Y0, T, method=method, options=options)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("method, name, value, message", [
    ("rk4", "step_size", -0.1, "positive finite number, got -0.1"),
    ("rk4", "step_size", math.inf, "positive finite number, got inf"),
    ("dopri5", "first_step", 0.0, "positive finite number, got 0.0"),
    ("dopri5", "max_step", math.nan, "positive finite number, got nan"),
    ("dopri5", "min_step", -1.0, "non-negative number, got -1.0"),
    ("dopri5", "safety", 0, "positive finite number, got 0"),
    ("dopri5", "ifactor", 0.5, "number >= 1, got 0.5"),
    ("dopri5", "dfactor", 1.5, r"in \(0, 1\], got 1.5"),
    ("dopri5", "dfactor", "0.2", r"in \(0, 1\], got '0.2'"),
    ("dopri5", "max_num_steps", 0, "positive integer, got 0"),
    ("dopri5", "max_num_steps", 2.5, "positive integer, got 2.5"),
    ("dopri5", "max_num_steps", True, "positive integer, got True"),
    ("implicit_adams", "max_order", 0, "positive integer, got 0"),
    ("implicit_adams", "max_order", 13, r"must be at most 12 \(and at least 1\), got 13"),
    ("implicit_adams", "max_iters", -2, "positive integer, got -2"),
    ("euler", "grid_constructor", [0.0, 1.0], r"must be callable, got \[0.0, 1.0\]"),
    ("dopri5", "norm", "rms", "must be callable, got 'rms'"),
    ("dopri5", "step_t", torch.tensor([0.5, math.nan]), "contains NaN or Inf"),
    ("dopri5", "jump_t", "0.5", "must be a 1-D tensor of times"),
    ("dopri5", "dtype", torch.int32, "floating torch.dtype, got torch.int32"),
    ("rk4", "interp", "quadratic", "method 'quadratic': interp must be 'linear' or 'cubic'"),
])
def test_bad_option_value(method, name, value, message):
    with pytest.raises(InvalidOptionError, match=f"{name}.*{message}"):
        solve(method=method, options={name: value})


def test_step_size_and_grid_constructor_are_exclusive():
    with pytest.raises(ValueError, match="step_size and grid_constructor are mutually exclusive"):
        solve(method="euler", options=dict(step_size=0.1, grid_constructor=lambda f, y, t: t))


def test_grid_must_span_t():
    with pytest.raises(InvalidTimeGridError, match=r"start at t\[0\]=0.0 and end at t\[-1\]=1.0; .* \[0.0, ..., 0.5\]"):
        solve(method="euler", options=dict(grid_constructor=lambda f, y, t: torch.tensor([0.0, 0.5], dtype=F64)))


def test_step_t_and_jump_t_must_not_share_points():
    with pytest.raises(ValueError, match="`step_t` and `jump_t` must not have any repeated elements"):
        solve(options=dict(step_t=torch.tensor([0.5]), jump_t=torch.tensor([0.5])))


# ---------------------------------------------------------------- tolerances
@pytest.mark.parametrize("kwargs, message", [
    (dict(rtol=torch.tensor(1e-3, requires_grad=True)), "rtol cannot require gradient"),
    (dict(atol=torch.tensor(1e-3, requires_grad=True)), "atol cannot require gradient"),
    (dict(rtol=-1e-3), r"rtol must be a non-negative number, got -0.001"),
    (dict(atol=torch.tensor([1e-6, -1e-6], dtype=F64)), "atol must be non-negative"),
])
def test_bad_tolerance(kwargs, message):
    with pytest.raises(InvalidToleranceError, match=message):
        solve(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(atol=torch.tensor([1e-6, math.nan], dtype=F64)), r"atol must be non-negative and not NaN, got nan at flat "
                                                           r"index 1"),
    (dict(rtol=torch.tensor([[1e-6], [math.nan]], dtype=F64), y0=torch.ones(2, 2, dtype=F64)),
     r"rtol must be non-negative and not NaN, got nan at flat index 2"),
    (dict(atol=torch.full((3,), 1e-6, dtype=F64)), r"atol of shape \(3,\) does not broadcast to the state's shape "
                                                  r"\(2,\)"),
    (dict(func=lambda t, y: y, y0=(Y0, Y0), atol=(1e-6, torch.full((3,), 1e-6))),
     r"atol\[1\] of shape \(3,\) does not broadcast to the state's shape \(2,\)"),
    (dict(func=lambda t, y: y, y0=(Y0, Y0), rtol=torch.full((3,), 1e-6)),
     r"rtol for a tuple state must be a number, a tuple with one entry per tensor, or a tensor of its 4 elements"),
    (dict(rtol=math.nan), "rtol must be a non-negative number, got nan"),
    (dict(atol="1e-6"), "atol must be a non-negative number, got '1e-6'"),
])
def test_bad_tolerance_tensors_get_one_line_errors(kwargs, message):
    """NaN entries used to end in "underflow in dt 0.0", wrong sizes in raw torch broadcasting errors."""
    with pytest.raises(InvalidToleranceError, match=message) as error:
        solve(**kwargs)
    assert "\n" not in str(error.value)


def test_per_entry_and_broadcast_tolerances_still_work():
    y0 = torch.ones(2, 3, dtype=F64)
    expected = solve(y0=y0, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(solve(y0=y0, rtol=torch.full((3,), 1e-6, dtype=F64), atol=1e-8), expected)
    pair = solve(func=lambda t, y: (-y[0], -y[1]), y0=(Y0, Y0), atol=torch.tensor([1e-8, 1e-8], dtype=F64))
    torch.testing.assert_close(pair[0], solve(atol=1e-8))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("method, options", [("dopri5", None), ("bosh3", None), ("rk4", dict(step_size=1e36))])
def test_an_event_search_whose_step_overflows_gets_a_one_line_error(method, options, dtype):
    """y' = 0 has a zero error estimate, so the adaptive step grows tenfold per step until it leaves the
    range of the time dtype; the event never comes. This used to end in raw torch/Python errors
    ("value cannot be converted to type float without overflow", "cannot convert float infinity")."""
    if method == "rk4" and dtype == F64:
        pytest.skip("20000 steps of 1e36 stay inside float64: the step budget ends the search")
    for event_fn in (lambda t, y: y.sum() - 5.0, lambda t, y: t - 1e300 * torch.ones_like(t)):
        with pytest.raises(NonFiniteStateError, match=r"^step size overflow: the step dt=.* goes beyond the times a "
                                                      rf"{dtype} state can be solved at") as error:
            fastcnf.odeint_event(lambda t, y: torch.zeros_like(y), torch.ones(1, dtype=dtype),
                                 torch.tensor(0.0, dtype=dtype), event_fn=event_fn, method=method, options=options)
        assert "\n" not in str(error.value)
        if dtype == F64:
            break  # an event at t = 1e300 lies inside float64's range: it is found (next test)


def test_an_event_at_a_huge_time_is_located():
    event_t, _ = fastcnf.odeint_event(lambda t, y: torch.zeros_like(y), torch.ones(1, dtype=F64),
                                      torch.tensor(0.0, dtype=F64), event_fn=lambda t, y: t - 1e300)
    assert event_t.item() == pytest.approx(1e300, rel=1e-12)


def test_tupled_tolerance_of_the_wrong_length():
    with pytest.raises(InvalidToleranceError, match="tupled rtol it must have the same length as the tuple y0"):
        solve(func=lambda t, y: y, y0=(Y0, Y0), rtol=(1e-3,))


# ---------------------------------------------------------------- tolerances the dtype cannot resolve
@pytest.mark.parametrize("dtype, floor", [(torch.bfloat16, "6.1e-05"), (torch.float16, "9.5e-07")])
@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_default_tolerances_on_half_precision_states_are_refused(dtype, floor, method):
    """bfloat16 at the default rtol=1e-7 used to return 0.984 (or 1.0) for exp(-1) without a word."""
    message = (rf"rtol=1e-07, atol=1e-09 ask for more than a {dtype} state resolves: its resolution is "
               rf"eps=.*eps\*\*2={floor}.*Pass rtol >= {floor}")
    with pytest.raises(InvalidToleranceError, match=message):
        fastcnf.odeint(decay, torch.ones(2, dtype=dtype), T, method=method)


@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 1e-3), (torch.bfloat16, 1e-4), (torch.float16, 1e-3),
                                         (torch.float16, 1e-5)])
def test_resolvable_tolerances_on_half_precision_states_work(dtype, rtol):
    """Above eps**2 the solve is accurate to a few units of the dtype's resolution (float16 used to
    underflow at any rtol below 1e-2: its error norms overflowed; they are taken in float32 now)."""
    y = fastcnf.odeint(decay, torch.ones(2, dtype=dtype), T, rtol=rtol, atol=rtol * 1e-2)
    assert y.dtype == dtype
    assert abs(y[-1, 0].item() - math.exp(-1)) <= 4 * torch.finfo(dtype).eps * 0.5


def test_float32_at_the_default_tolerance_is_unchanged():
    """float32's eps**2 is 1.4e-14: the default rtol=1e-7 (below float32's eps) is far above it, and the
    solve takes torchdiffeq's steps (README: the same numbers to rounding)."""
    func = CountingDecay()
    ours = fastcnf.odeint(func, torch.linspace(0.5, 2.0, 4), torch.linspace(0, 2, 5))
    theirs_func = CountingDecay()
    theirs = torchdiffeq.odeint(theirs_func, torch.linspace(0.5, 2.0, 4), torch.linspace(0, 2, 5))
    assert func.calls == theirs_func.calls
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-7)
    fastcnf.odeint(decay, torch.ones(2), T, rtol=1e-12, atol=1e-14)  # still above 1.4e-14: allowed


def test_an_absolute_tolerance_below_resolution_at_the_states_scale_is_refused():
    with pytest.raises(InvalidToleranceError, match="float32 state resolves"):
        fastcnf.odeint(decay, torch.full((2,), 1e3), T, rtol=0.0, atol=1e-13)
    fastcnf.odeint(decay, torch.full((2,), 1e-3), T, rtol=0.0, atol=1e-12)  # |y| < 1: judged at unit scale


class CountingDecay(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return -y


# ---------------------------------------------------------------- the user's function
@pytest.mark.parametrize("func, y0, error, message", [
    (lambda t, y: torch.ones(3, dtype=F64), Y0, ValueError, r"shape \(3,\) for a state of shape \(2,\)"),
    (lambda t, y: y.reshape(1, 2), Y0, ValueError, r"shape \(1, 2\) for a state of shape \(2,\)"),
    (lambda t, y: y.tolist(), Y0, TypeError, "must return a torch.Tensor, got list"),
    (lambda t, y: (y[0],), (Y0, Y0), ValueError, "returned 1 tensors for a tuple state of 2 tensors"),
    (lambda t, y: (y[0], y[1][:1]), (Y0, Y0), ValueError,
     r"shape \(1,\) for a state of shape \(2,\) \(tuple entry 1\)"),
])
@pytest.mark.parametrize("method", ["dopri5", "euler"])
def test_func_returning_the_wrong_structure(func, y0, error, message, method):
    options = dict(step_size=0.5) if method == "euler" else None
    with pytest.raises(error, match=message):
        solve(func=func, y0=y0, method=method, options=options)


# ---------------------------------------------------------------- events and dense output
@pytest.mark.parametrize("length", [1, 3])
def test_event_mode_needs_two_times(length):
    with pytest.raises(ValueError, match=rf"len\(t\) == 2 when in event handling mode, but got len\(t\)={length}"):
        solve(t=torch.linspace(0, 1, length, dtype=F64), event_fn=lambda t, y: y[0] - 0.5)


def test_fixed_grid_event_needs_step_size():
    with pytest.raises(InvalidOptionError, match="requires `step_size`"):
        solve(method="rk4", event_fn=lambda t, y: y[0] - 0.5)


def test_dense_output_needs_an_adaptive_method():
    with pytest.raises(InvalidOptionError, match="needs an adaptive Runge-Kutta method, got 'rk4'"):
        fastcnf.odeint_dense(decay, Y0, torch.tensor(0.0), torch.tensor(1.0), method="rk4")


@pytest.mark.parametrize("bad_time", [-0.1, 1.5])
def test_dense_output_outside_the_solved_interval(bad_time):
    dense = fastcnf.odeint_dense(decay, Y0, torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    with pytest.raises(ValueError, match=f"t={bad_time} is outside the solved interval"):
        dense(torch.tensor(bad_time, dtype=F64))


# ---------------------------------------------------------------- torchdiffeq compatibility
ASSERTED_BY_TORCHDIFFEQ = {
    "t not monotone": dict(t=torch.tensor([0.0, 1.0, 0.5], dtype=F64)),
    "t not 1-D": dict(t=torch.tensor([[0.0, 1.0]], dtype=F64)),
    "t with NaN": dict(t=torch.tensor([0.0, math.nan], dtype=F64)),
    "y0 a list": dict(y0=[Y0]),
    "rtol requires grad": dict(rtol=torch.tensor(1e-3, requires_grad=True)),
    "tupled atol length": dict(func=lambda t, y: y, y0=(Y0, Y0), atol=(1e-3, 1e-3, 1e-3)),
    "max_order > 12": dict(method="implicit_adams", options=dict(step_size=0.1, max_order=13)),
    "fixed-grid event without step_size": dict(method="euler", event_fn=lambda t, y: y[0] - 0.5),
    "grid not spanning t": dict(method="euler", options=dict(grid_constructor=lambda f, y, t: t[:1])),
    "max_num_steps": dict(options=dict(max_num_steps=2)),
    "step size underflow": dict(func=lambda t, y: y * y, t=torch.tensor([0.0, 2.0], dtype=F64)),
    "NaN during the solve": dict(func=nan_after_half),
}


@pytest.mark.parametrize("case", list(ASSERTED_BY_TORCHDIFFEQ))
def test_errors_torchdiffeq_asserts_are_assertion_errors(case):
    """Code written against torchdiffeq catches these with ``except AssertionError``."""
    kwargs = dict(ASSERTED_BY_TORCHDIFFEQ[case])
    with pytest.raises(AssertionError):
        torchdiffeq.odeint(kwargs.pop("func", decay), kwargs.pop("y0", Y0), kwargs.pop("t", T), **kwargs)
    kwargs = dict(ASSERTED_BY_TORCHDIFFEQ[case])
    with pytest.raises(AssertionError):
        solve(**kwargs)


# torchdiffeq's message for each failure opens with these words; client code matches on them
# (e.g. ``str(error).startswith("underflow")``), so fastcnf's message opens with them too.
TORCHDIFFEQ_OPENINGS = {
    "t not a tensor": (dict(t=[0.0, 1.0]), "t must be a torch.Tensor"),
    "t not 1-D": (dict(t=torch.tensor([[0.0, 1.0]], dtype=F64)), "t must be one dimensional"),
    "t not monotone": (dict(t=torch.tensor([0.0, 1.0, 0.5], dtype=F64)), "t must be strictly increasing or decreasing"),
    "t with NaN": (dict(t=torch.tensor([0.0, math.nan], dtype=F64)), "t must be strictly increasing or decreasing"),
    "t integer": (dict(t=torch.tensor([0, 1])), "`t` must be a floating point Tensor but is a torch.LongTensor"),
    "y0 a list": (dict(y0=[Y0]), "y0 must be either a torch.Tensor or a tuple"),
    "rtol requires grad": (dict(rtol=torch.tensor(1e-3, requires_grad=True)), "rtol cannot require gradient"),
    "tupled atol length": (dict(func=lambda t, y: y, y0=(Y0, Y0), atol=(1e-3, 1e-3, 1e-3)),
                           "If using tupled atol it must have the same length as the tuple y0"),
    "unknown method": (dict(method="rk45"), 'Invalid method "rk45". Must be one of {"dopri8", "dopri5", '),
    "max_order": (dict(method="implicit_adams", options=dict(step_size=0.1, max_order=13)),
                  "max_order must be at most 12"),
    "interp": (dict(method="euler", options=dict(step_size=0.1, interp="quad")), "Unknown interpolation method"),
    "event without step_size": (dict(method="euler", event_fn=lambda t, y: y[0] - 0.5),
                                "Event handling for fixed step solvers currently requires `step_size`"),
    "event with 3 times": (dict(t=torch.tensor([0.0, 0.5, 1.0], dtype=F64), event_fn=lambda t, y: y[0] - 0.5),
                           "We require len(t) == 2 when in event handling mode, but got len(t)=3"),
    "step_size and grid": (dict(method="euler", options=dict(step_size=0.1, grid_constructor=lambda f, y, t: t)),
                           "step_size and grid_constructor are mutually exclusive arguments"),
    "step_t and jump_t": (dict(options=dict(step_t=torch.tensor([0.5]), jump_t=torch.tensor([0.5]))),
                          "`step_t` and `jump_t` must not have any repeated elements between them"),
    "max_num_steps": (dict(options=dict(max_num_steps=2)), "max_num_steps exceeded (2>=2)"),
    "event max_num_steps": (dict(event_fn=lambda t, y: y.sum() + 1.0, options=dict(max_num_steps=3)),
                            "max_num_steps exceeded (3>=3)"),
    "underflow": (dict(func=lambda t, y: y * y, t=torch.tensor([0.0, 2.0], dtype=F64)), "underflow in dt"),
    "NaN dynamics": (dict(func=nan_after_half), "underflow in dt"),
    "NaN dynamics at min_step": (dict(func=nan_after_half, options=dict(min_step=1e-3)),
                                 "non-finite values in state `y`"),
    "fixed-grid event never happens": (dict(method="rk4", options=dict(step_size=0.1),
                                            event_fn=lambda t, y: y.sum() + 1.0),
                                       "Reached maximum number of iterations 20000"),
}


@pytest.mark.parametrize("case", list(TORCHDIFFEQ_OPENINGS))
def test_messages_open_with_torchdiffeqs_words(case):
    kwargs, opening = TORCHDIFFEQ_OPENINGS[case]
    messages = []
    for lib in (torchdiffeq, fastcnf):
        arguments = dict(kwargs)
        with warnings.catch_warnings(), pytest.raises(Exception) as error:
            warnings.simplefilter("ignore")
            lib.odeint(arguments.pop("func", decay), arguments.pop("y0", Y0), arguments.pop("t", T), **arguments)
        messages.append(str(error.value))
        assert isinstance(error.value, type(error.value)) and error.type.__name__ != "NotImplementedError"
    theirs, ours = messages
    assert theirs.startswith(opening), theirs
    assert ours.startswith(opening), ours
    assert len(ours) > len(opening)  # fastcnf's detail follows


def test_non_finite_y0_opens_with_torchdiffeqs_words_for_a_non_finite_state():
    """torchdiffeq reports NaN in y0 as "underflow in dt 0.0" (its initial step is NaN); its words for a
    non-finite state are "non-finite values in state `y`", which fastcnf's message opens with."""
    with pytest.raises(NonFiniteStateError) as error:
        solve(y0=torch.tensor([1.0, math.nan], dtype=F64))
    assert str(error.value).startswith("non-finite values in state `y`: y0 contains NaN or Inf")


def test_every_error_type_is_a_fastcnf_error_and_a_builtin():
    for error in (InvalidOptionError, InvalidStateError, InvalidTimeGridError, InvalidToleranceError,
                  MaxNumStepsError, NonFiniteStateError, StepSizeUnderflowError, UnknownMethodError):
        assert issubclass(error, FastCNFError)
        assert issubclass(error, (ValueError, TypeError, RuntimeError, FloatingPointError))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_time_on_another_device_is_moved_with_a_warning():
    y0 = torch.ones(2, device="cuda")
    with pytest.warns(UserWarning, match="t is not on the same device as y0"):
        out = fastcnf.odeint(decay, y0, torch.tensor([0.0, 1.0]))
    assert out.device.type == "cuda"
    torch.testing.assert_close(out[-1].cpu(), torch.full((2,), math.exp(-1.0)), rtol=1e-5, atol=1e-6)


def test_overflowing_solution_fails_instead_of_creeping():
    """A solution that overflows with a zero error estimate must not crawl along at the float max."""
    start = time.perf_counter()
    with pytest.raises(fastcnf.NonFiniteStateError, match="overflows"):
        fastcnf.odeint(lambda t, y: torch.full_like(y, 1e37), torch.zeros(2), torch.tensor([0.0, 1e3]),
                       options=dict(first_step=1.0))
    assert time.perf_counter() - start < 10.0


def test_event_that_never_happens_stops():
    # 20000 steps along a solution decayed far below atol: each is limited by stability (|lambda| = 1,
    # dt ~ 3.4), so the search also warns once, after 1000 such steps, that the problem is stiff there
    with pytest.raises(fastcnf.MaxNumStepsError, match="no event"), \
            pytest.warns(fastcnf.StiffnessWarning, match="steps over a span of"):
        fastcnf.odeint_event(lambda t, y: -y, torch.ones(1, dtype=torch.float64),
                             torch.tensor(0.0, dtype=torch.float64), event_fn=lambda t, y: y.sum() + 1.0)
    with pytest.raises(fastcnf.MaxNumStepsError, match="max_num_steps"):
        fastcnf.odeint_event(lambda t, y: -y, torch.ones(1, dtype=torch.float64),
                             torch.tensor(0.0, dtype=torch.float64), event_fn=lambda t, y: y.sum() + 1.0,
                             options=dict(max_num_steps=50))


def test_nan_in_a_fixed_grid_event_search_is_an_error():
    def nan_after_half(t, y):
        return torch.where(t > 0.5, torch.full_like(y, float("nan")), -y)

    with pytest.raises(fastcnf.NonFiniteStateError, match="event function"):
        fastcnf.odeint_event(nan_after_half, torch.ones(1, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64),
                             event_fn=lambda t, y: y.sum() - 0.1, method="rk4", options=dict(step_size=0.1))
