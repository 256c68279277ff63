"""State layouts and time orientation (fastcnf/ode/dynamics.py, fastcnf/ode/validation.py): tuple states and
tuple tolerances, decreasing t, dtype rules, len(t) == 1, 0-d and odd-shaped, non-contiguous
states."""

import warnings

import numpy as np
import pytest
import torch
import torchdiffeq
from problems import CountingFunc, decay_sine, decay_sine_exact, tanh_problem

import fastcnf

F64 = torch.float64
SOLVERS = [("dopri5", None), ("bosh3", None), ("rk4", dict(step_size=0.05)), ("euler", dict(step_size=0.05)),
           ("explicit_adams", dict(step_size=0.05)), ("implicit_adams", dict(step_size=0.05, max_iters=10)),
           ("scipy_solver", dict(solver="RK45"))]
SOLVER_IDS = [name for name, _ in SOLVERS]


def torchdiffeq_odeint(*args, **kwargs):
    """torchdiffeq.odeint without its scipy warning (it always passes min_step to solve_ivp)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The following arguments have no effect")
        return torchdiffeq.odeint(*args, **kwargs)


def coupled(t, state):
    """A tuple system: position (2, 3) and a scalar-per-row velocity (2,)."""
    position, velocity = state
    return velocity[:, None] * torch.cos(position) + torch.sin(t), -0.5 * velocity + position.mean(-1)


def coupled_flat(t, y):
    """The same system on a flat (8,) state: the reference for the tuple solve."""
    position, velocity = y[:6].reshape(2, 3), y[6:]
    d_position, d_velocity = coupled(t, (position, velocity))
    return torch.cat([d_position.reshape(-1), d_velocity])


def coupled_initial_state(dtype=F64):
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, generator=generator, dtype=dtype), torch.randn(2, generator=generator, dtype=dtype)


# ---------------------------------------------------------------- tuple states
@pytest.mark.parametrize("method, options", SOLVERS, ids=SOLVER_IDS)
def test_tuple_state_equals_the_flat_solve(method, options):
    """A tuple state is solved as the concatenated flat state (fixed grids: identically; adaptive:
    with the max-over-entries RMS norm, so compare to the tolerance)."""
    position, velocity = coupled_initial_state()
    t = torch.linspace(0, 2, 4, dtype=F64)
    out_position, out_velocity = fastcnf.odeint(coupled, (position, velocity), t, method=method, options=options,
                                                rtol=1e-9, atol=1e-11)
    assert out_position.shape == (4, 2, 3) and out_velocity.shape == (4, 2)
    flat = fastcnf.odeint(coupled_flat, torch.cat([position.reshape(-1), velocity]), t, method=method,
                          options=options, rtol=1e-9, atol=1e-11)
    # Adaptive steps differ: the tuple's norm is the max over entries, the flat one RMS over all.
    atol = 2e-6 if options is None or method == "scipy_solver" else 1e-13
    torch.testing.assert_close(out_position.reshape(4, -1), flat[:, :6], rtol=0, atol=atol)
    torch.testing.assert_close(out_velocity, flat[:, 6:], rtol=0, atol=atol)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_tuple_state_agrees_with_torchdiffeq(method):
    options = None if method == "dopri5" else dict(step_size=0.1)
    y0 = coupled_initial_state()
    t = torch.tensor([0.0, 0.4, 1.5], dtype=F64)
    ours, theirs = CountingFunc(coupled), CountingFunc(coupled)
    expected = torchdiffeq.odeint(theirs, y0, t, method=method, options=options, rtol=1e-8, atol=1e-10)
    actual = fastcnf.odeint(ours, y0, t, method=method, options=options, rtol=1e-8, atol=1e-10)
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert ours.calls == theirs.calls


def fast_and_slow(t, state):
    """A fast rotation (angular frequency 5) next to a slow decay."""
    fast, slow = state
    return torch.stack([5.0 * fast[1], -5.0 * fast[0]]), -0.1 * slow


def test_tuple_tolerances_apply_per_entry():
    """Loosening only the fast entry's tolerance takes far fewer steps than tight tolerances on
    both, while the slow entry keeps its tight accuracy (exact: exp(-0.1 t))."""
    y0 = (torch.tensor([1.0, 0.0], dtype=F64), torch.ones(3, dtype=F64))
    t = torch.tensor([0.0, 3.0], dtype=F64)
    tight, mixed = CountingFunc(fast_and_slow), CountingFunc(fast_and_slow)
    fastcnf.odeint(tight, y0, t, rtol=1e-9, atol=1e-9)
    out = fastcnf.odeint(mixed, y0, t, rtol=(1e-4, 1e-9), atol=(1e-4, 1e-9))
    assert mixed.calls * 3 < tight.calls
    np.testing.assert_allclose(out[1][-1].numpy(), np.exp(-0.3), rtol=1e-8)
    fast_error = np.abs(out[0][-1].numpy() - [np.cos(15.0), -np.sin(15.0)]).max()
    assert 1e-7 < fast_error < 1e-2


def test_tensor_tolerances_per_element():
    """rtol/atol as tensors of the state's shape weight the error of each element."""
    func, y0 = tanh_problem(F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    ours, theirs = CountingFunc(func), CountingFunc(func)
    rtol = torch.full_like(y0, 1e-8)
    rtol[0] = 1e-3
    expected = torchdiffeq.odeint(theirs, y0, t, rtol=rtol, atol=1e-10)
    actual = fastcnf.odeint(ours, y0, t, rtol=rtol, atol=1e-10)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-8)
    assert ours.calls == theirs.calls


# ---------------------------------------------------------------- reverse time
@pytest.mark.parametrize("method, options", SOLVERS, ids=SOLVER_IDS)
def test_decreasing_t_solves_backwards(method, options):
    """From y(3) backwards to t = 0: the exact solution of y' = -y + sin t (backwards, errors grow
    like e^(3 - t)), and the same numbers as torchdiffeq."""
    y3 = decay_sine_exact(3.0, [1.0, -0.5])
    t = torch.tensor([3.0, 2.0, 0.5, 0.0], dtype=F64)
    y0 = torch.tensor(y3, dtype=F64)
    out = fastcnf.odeint(decay_sine, y0, t, method=method, options=options, rtol=1e-10, atol=1e-12)
    exact = decay_sine_exact(t.numpy(), [1.0, -0.5])
    bound = {"euler": 0.3, "bosh3": 1e-6, "rk4": 1e-6, "explicit_adams": 1e-4, "implicit_adams": 1e-4}.get(method,
                                                                                                      1e-8)
    np.testing.assert_allclose(out.numpy(), exact, rtol=0, atol=bound)
    expected = torchdiffeq_odeint(decay_sine, y0, t, method=method,
                                  options=dict(options or {}, max_order=5) if method == "explicit_adams" else options,
                                  rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_reverse_time_sees_user_time_and_user_callback_times():
    """Internally time is negated; func and callbacks still receive the user's (decreasing) t."""
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, t, y):
            seen.append(float(t))
            return -y

    t = torch.tensor([2.0, 1.0], dtype=F64)
    fastcnf.odeint(Recorder(), torch.ones(1, dtype=F64), t, method="euler", options=dict(step_size=0.25))
    np.testing.assert_allclose(seen, [2.0, 1.75, 1.5, 1.25])


def test_reverse_time_step_t_and_grid_constructor_are_in_user_time():
    ends = []

    class Recorder(torch.nn.Module):
        def forward(self, t, y):
            return decay_sine(t, y)

        def callback_accept_step(self, t0, y0, dt):
            ends.append(float(t0) - float(dt))

    t = torch.tensor([3.0, 0.0], dtype=F64)
    y0 = torch.ones(1, dtype=F64)
    fastcnf.odeint(Recorder(), y0, t, options=dict(step_t=torch.tensor([2.2, 0.9], dtype=F64)))
    for point in (2.2, 0.9):
        assert min(abs(end - point) for end in ends) < 1e-12

    grid = torch.tensor([3.0, 2.9, 2.0, 0.0], dtype=F64)
    starts = []

    class GridRecorder(torch.nn.Module):
        def forward(self, t, y):
            starts.append(float(t))
            return -y

    fastcnf.odeint(GridRecorder(), y0, t, method="euler", options=dict(grid_constructor=lambda f, y, tt: grid))
    np.testing.assert_allclose(starts, [3.0, 2.9, 2.0])


# ---------------------------------------------------------------- dtypes
@pytest.mark.parametrize("method, options", [("dopri5", None), ("rk4", dict(step_size=0.1))])
def test_float64_time_with_float32_state(method, options):
    """t in float64 and y0 in float32 (common in CNF code): the solution is float32, func receives
    float32 time, and the result matches torchdiffeq."""
    time_dtypes = []

    def func(t, y):
        time_dtypes.append(t.dtype)
        return decay_sine(t, y)

    y0 = torch.tensor([1.0, 2.0])
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    out = fastcnf.odeint(func, y0, t, method=method, options=options, rtol=1e-6, atol=1e-8)
    assert out.dtype == torch.float32
    assert set(time_dtypes) == {torch.float32}
    expected = torchdiffeq_odeint(decay_sine, y0, t, method=method, options=options, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_float64_solution_is_float64_accurate():
    y0 = torch.tensor([1.0], dtype=F64)
    out = fastcnf.odeint(decay_sine, y0, torch.tensor([0.0, 4.0], dtype=F64), rtol=1e-13, atol=1e-14)
    assert out.dtype == F64
    assert abs(out[-1].item() - decay_sine_exact(4.0, [1.0])[0]) < 1e-12


# ---------------------------------------------------------------- shapes
@pytest.mark.parametrize("method, options", SOLVERS, ids=SOLVER_IDS)
def test_single_time_returns_y0(method, options):
    y0 = torch.randn(2, 3)
    func = CountingFunc(decay_sine)
    out = fastcnf.odeint(func, y0, torch.tensor([0.7]), method=method, options=options)
    assert out.shape == (1, 2, 3)
    assert torch.equal(out[0], y0)


def test_single_time_tuple_state_returns_y0():
    y0 = coupled_initial_state()
    out = fastcnf.odeint(coupled, y0, torch.tensor([0.7], dtype=F64))
    assert [o.shape for o in out] == [(1, 2, 3), (1, 2)]
    assert all(torch.equal(o[0], y) for o, y in zip(out, y0))


@pytest.mark.parametrize("method, options", SOLVERS, ids=SOLVER_IDS)
def test_zero_dimensional_state(method, options):
    y0 = torch.tensor(1.0, dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    out = fastcnf.odeint(decay_sine, y0, t, method=method, options=options)
    assert out.shape == (3,)
    expected = torchdiffeq_odeint(decay_sine, y0, t, method=method,
                                  options=dict(options, max_order=5) if method == "explicit_adams" else options)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_zero_dimensional_entries_in_a_tuple_state():
    out = fastcnf.odeint(lambda t, y: (-y[0], y[0] * y[1]), (torch.tensor(1.0, dtype=F64), torch.ones(2, dtype=F64)),
                         torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-10, atol=1e-12)
    assert out[0].shape == (2,) and out[1].shape == (2, 2)
    assert out[0][-1].item() == pytest.approx(np.exp(-1.0), rel=1e-9)
    np.testing.assert_allclose(out[1][-1].numpy(), np.exp(1 - np.exp(-1.0)), rtol=1e-9)


@pytest.mark.parametrize("method, options", [("dopri5", None), ("midpoint", dict(step_size=0.1))])
def test_state_of_shape_3_1_2(method, options):
    y0 = torch.arange(6, dtype=F64).reshape(3, 1, 2)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    out = fastcnf.odeint(decay_sine, y0, t, method=method, options=options, rtol=1e-10, atol=1e-12)
    assert out.shape == (2, 3, 1, 2)
    if options is None:
        np.testing.assert_allclose(out[-1].numpy(), decay_sine_exact(1.0, y0.numpy().reshape(-1)).reshape(3, 1, 2),
                                   atol=1e-9)


@pytest.mark.parametrize("method, options", [("dopri5", None), ("rk4", dict(step_size=0.1))])
def test_non_contiguous_state(method, options):
    """A transposed (non-contiguous) y0 gives the same result as its contiguous copy; func sees the
    state in y0's shape."""
    base = torch.randn(3, 4, dtype=F64)
    y0 = base.t()
    assert not y0.is_contiguous()
    func, _ = tanh_problem(F64)

    def rowwise(t, y):
        assert y.shape == (4, 3)
        return func(t, y.t()).t()

    t = torch.tensor([0.0, 1.0], dtype=F64)
    out = fastcnf.odeint(rowwise, y0, t, method=method, options=options, rtol=1e-8, atol=1e-10)
    reference = fastcnf.odeint(rowwise, y0.contiguous(), t, method=method, options=options, rtol=1e-8, atol=1e-10)
    assert torch.equal(out, reference)
    assert torch.equal(out[0], y0)
