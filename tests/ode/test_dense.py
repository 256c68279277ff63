"""Dense output (fastcnf.odeint_dense, fastcnf/ode/interpolation.py): one solve, then the state at any time,
for every adaptive method, forwards and backwards in time."""

import numpy as np
import pytest
import torch
import torchdiffeq
from problems import CountingFunc, convergence_slope, decay_sine, kepler, kepler_exact, tanh_problem

import fastcnf
from fastcnf.ode.explicit.stepper import ExplicitRKStepper
from fastcnf.ode.explicit.tableaus import ADAPTIVE_TABLEAUS
from fastcnf.ode.interpolation import quartic_eval

F64 = torch.float64
TIMES = [0.0, 0.13, 0.5, 0.77, 1.2, 1.99, 2.0]


@pytest.mark.parametrize("method", list(ADAPTIVE_TABLEAUS))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_dense_values_equal_odeint_at_the_same_times(method, reverse):
    """The dense solution at any time is what odeint returns there (same steps, same interpolant)."""
    func, y0 = tanh_problem(F64)
    start, end = (2.0, 0.0) if reverse else (0.0, 2.0)
    times = torch.tensor([start + (end - start) * s / 2.0 for s in TIMES], dtype=F64)
    dense = fastcnf.odeint_dense(func, y0, torch.tensor(start, dtype=F64), torch.tensor(end, dtype=F64),
                                 method=method, rtol=1e-6, atol=1e-8)
    expected = fastcnf.odeint(func, y0, times, method=method, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(dense(times), expected, rtol=0, atol=1e-12)
    assert torch.equal(dense(times[0]), y0)


def test_dense_matches_torchdiffeq_dopri5():
    """torchdiffeq's odeint_dense (dopri5 only) evaluates one time per call."""
    func, y0 = tanh_problem(F64)
    t0, t1 = torch.tensor(0.0, dtype=F64), torch.tensor(2.0, dtype=F64)
    ours = fastcnf.odeint_dense(func, y0, t0, t1, rtol=1e-7, atol=1e-9)
    theirs = torchdiffeq.odeint_dense(func, y0, t0, t1, rtol=1e-7, atol=1e-9)
    for time in [0.05, 0.5, 1.3, 1.97]:
        time = torch.tensor(time, dtype=F64)
        torch.testing.assert_close(ours(time), theirs(time), rtol=0, atol=1e-12)


def test_evaluating_the_dense_solution_costs_no_evaluations():
    func, y0 = tanh_problem(F64)
    counting = CountingFunc(func)
    dense = fastcnf.odeint_dense(counting, y0, torch.tensor(0.0, dtype=F64), torch.tensor(2.0, dtype=F64))
    calls = counting.calls
    dense(torch.linspace(0, 2, 101, dtype=F64))
    assert counting.calls == calls


def test_dense_output_shapes():
    """A 0-dim time gives the state's shape; times of any shape come first."""
    func, y0 = tanh_problem(F64)
    dense = fastcnf.odeint_dense(func, y0, torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    assert dense(torch.tensor(0.5, dtype=F64)).shape == (3, 4)
    assert dense(torch.tensor([0.1, 0.5], dtype=F64)).shape == (2, 3, 4)
    assert dense(torch.rand(2, 5, dtype=F64)).shape == (2, 5, 3, 4)
    assert dense(0.25).shape == (3, 4)


def test_dense_output_of_a_tuple_state():
    y0 = (torch.tensor([1.0, -1.0], dtype=F64), torch.tensor(0.5, dtype=F64))
    dense = fastcnf.odeint_dense(lambda t, s: (-s[0], s[1] * torch.cos(t)), y0, torch.tensor(0.0, dtype=F64),
                                 torch.tensor(2.0, dtype=F64), rtol=1e-10, atol=1e-12)
    x, z = dense(torch.tensor([0.5, 1.5], dtype=F64))
    np.testing.assert_allclose(x.numpy(), np.exp(-np.array([[0.5], [1.5]])) * [1.0, -1.0], rtol=1e-8)
    np.testing.assert_allclose(z.numpy(), 0.5 * np.exp(np.sin([0.5, 1.5])), rtol=1e-8)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
def test_dense_solution_is_accurate_between_steps(method):
    """y' = -y + sin t at many times inside the steps, against the exact solution. dopri8 takes
    much longer steps for the same tolerance, and its dense output is the same quartic (as in
    torchdiffeq), so between step ends it is less accurate than its steps."""
    y0 = torch.tensor([1.0], dtype=F64)
    dense = fastcnf.odeint_dense(decay_sine, y0, torch.tensor(0.0, dtype=F64), torch.tensor(5.0, dtype=F64),
                                 method=method, rtol=1e-10, atol=1e-12)
    times = np.linspace(0, 5, 97)
    exact = 1.5 * np.exp(-times) + 0.5 * (np.sin(times) - np.cos(times))
    bound = 1e-6 if method == "dopri8" else 1e-8
    np.testing.assert_allclose(dense(torch.tensor(times)).numpy()[:, 0], exact, rtol=0, atol=bound)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
def test_quartic_interpolant_has_local_error_of_order_five(method):
    """Inside one step of size h the quartic dense output at x = 0.3 is off by O(h^5)."""
    tableau = ADAPTIVE_TABLEAUS[method]
    y0 = torch.tensor(kepler_exact(0.0))
    stepper = ExplicitRKStepper(tableau, lambda t, y, perturb=0: kepler(torch.tensor(t), y), 4, F64, y0.device,
                                perturb_end=False)
    step_sizes = [0.2, 0.1, 0.05, 0.025]
    errors = []
    with torch.no_grad():
        for h in step_sizes:
            y1, stages, _ = stepper.step(0.0, y0, kepler(torch.tensor(0.0), y0), h, h)
            value = quartic_eval(0.3, y0, y1, stages, h, tableau.b_mid)
            errors.append(float((value - torch.tensor(kepler_exact(0.3 * h))).abs().max()))
    assert convergence_slope(step_sizes, errors) > 4.7, errors
