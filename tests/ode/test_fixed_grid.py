"""Fixed-grid Runge-Kutta methods through ``odeint`` (fastcnf/ode/explicit/fixed_grid.py): convergence order on
analytic problems, the time grid, interpolation between grid points and perturbed evaluations."""

import math

import numpy as np
import pytest
import torch
from problems import CountingFunc, convergence_slope, decay_sine, decay_sine_exact, linear, linear_exact

import fastcnf

ORDERS = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}
STAGES = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}
# Step sizes in each method's asymptotic range (float64 errors well above rounding).
STEP_SIZES = {1: [0.02, 0.01, 0.005, 0.0025], 2: [0.04, 0.02, 0.01, 0.005], 3: [0.1, 0.05, 0.025, 0.0125],
              4: [0.2, 0.1, 0.05, 0.025]}


def fixed_step_errors(method, func, y0, exact, end, **options):
    t = torch.tensor([0.0, end], dtype=torch.float64)
    step_sizes = STEP_SIZES[ORDERS[method]]
    errors = []
    for step_size in step_sizes:
        solution = fastcnf.odeint(func, y0, t, method=method, options=dict(step_size=step_size, **options))
        errors.append(float(np.abs(solution[-1].numpy() - exact).max()))
    return step_sizes, errors


@pytest.mark.parametrize("method", list(ORDERS))
def test_order_on_decaying_sine(method):
    """y' = -y + sin t, y(0) = (1, -2): error at t=3 falls like step_size^order."""
    y0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    exact = decay_sine_exact(3.0, y0.numpy())
    step_sizes, errors = fixed_step_errors(method, decay_sine, y0, exact, 3.0)
    assert abs(convergence_slope(step_sizes, errors) - ORDERS[method]) < 0.15, errors


@pytest.mark.parametrize("method", list(ORDERS))
def test_order_on_linear_system(method):
    """y' = A y with complex eigenvalues against expm(A t) y0."""
    y0 = torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64)
    exact = linear_exact([2.0], y0.numpy())[0]
    step_sizes, errors = fixed_step_errors(method, linear, y0, exact, 2.0)
    assert abs(convergence_slope(step_sizes, errors) - ORDERS[method]) < 0.15, errors


class StepLog(torch.nn.Module):
    """Dynamics y' = -y that records (t0, dt) of every step through ``callback_step``."""

    def __init__(self):
        super().__init__()
        self.steps = []
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return -y

    def callback_step(self, t0, y0, dt):
        self.steps.append((float(t0), float(dt)))


@pytest.mark.parametrize("method", list(ORDERS))
def test_step_size_grid_ends_exactly_at_the_last_time(method):
    """step_size=0.3 on [0, 1]: steps at 0, 0.3, 0.6, 0.9 and a last short step of 0.1 ending at 1;
    each step costs one evaluation per stage."""
    func = StepLog()
    fastcnf.odeint(func, torch.ones(2), torch.tensor([0.0, 1.0]), method=method, options=dict(step_size=0.3))
    starts, sizes = zip(*func.steps)
    np.testing.assert_allclose(starts, [0.0, 0.3, 0.6, 0.9], atol=1e-6)
    np.testing.assert_allclose(sizes, [0.3, 0.3, 0.3, 0.1], atol=1e-6)
    assert math.isclose(starts[-1] + sizes[-1], 1.0, abs_tol=1e-7)
    assert func.calls == 4 * STAGES[method]


def test_without_step_size_the_grid_is_t():
    func = StepLog()
    t = torch.tensor([0.0, 0.1, 0.5, 0.6, 2.0], dtype=torch.float64)
    fastcnf.odeint(func, torch.ones(2, dtype=torch.float64), t, method="euler")
    np.testing.assert_allclose([s for s, _ in func.steps], t[:-1].numpy())
    np.testing.assert_allclose([d for _, d in func.steps], np.diff(t.numpy()))


def test_grid_constructor_sets_the_steps():
    """A user grid (denser near the start) is followed exactly; repeated points cost nothing."""
    func = StepLog()
    grid = torch.tensor([0.0, 0.01, 0.05, 0.05, 0.2, 1.0], dtype=torch.float64)
    out = fastcnf.odeint(func, torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64),
                         method="euler", options=dict(grid_constructor=lambda f, y0, t: grid))
    np.testing.assert_allclose([s for s, _ in func.steps], [0.0, 0.01, 0.05, 0.2])
    assert func.calls == 4
    assert out[-1].item() == pytest.approx(0.99 * 0.96 * 0.85 * 0.2, rel=1e-12)


def test_euler_matches_the_closed_form_recursion():
    """Euler on y' = -y with step h gives exactly (1 - h)^n."""
    out = fastcnf.odeint(lambda t, y: -y, torch.ones(1, dtype=torch.float64),
                         torch.tensor([0.0, 1.0], dtype=torch.float64), method="euler", options=dict(step_size=0.125))
    assert out[-1].item() == pytest.approx(0.875 ** 8, rel=1e-14)


def test_outputs_between_grid_points_are_interpolated():
    """rk4 with step 0.2 and output times in the middle of steps: linear interpolation has an
    O(h^2) error, the cubic Hermite interpolant (one extra evaluation per output) is far better;
    on grid points both give the step's own value."""
    y0 = torch.tensor([1.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.5, 1.3, 2.0], dtype=torch.float64)
    exact = decay_sine_exact(t.numpy(), y0.numpy())
    linear_out = fastcnf.odeint(decay_sine, y0, t, method="rk4", options=dict(step_size=0.2))
    counting = CountingFunc(decay_sine)
    cubic_out = fastcnf.odeint(counting, y0, t, method="rk4", options=dict(step_size=0.2, interp="cubic"))
    linear_error = np.abs(linear_out.numpy() - exact)[1:4].max()
    cubic_error = np.abs(cubic_out.numpy() - exact)[1:4].max()
    assert 1e-3 < linear_error < 1e-2
    assert cubic_error < 1e-4
    assert counting.calls == 10 * 4 + 4  # 10 steps of 4 stages, one f(t1) per interpolated output
    torch.testing.assert_close(cubic_out[-1], linear_out[-1], rtol=0, atol=0)


def step_down_at_one(t, y):
    """y' = +1 for t <= 1 and -1 after: the value at exactly t = 1 belongs to the left piece."""
    return torch.where(t <= 1.0, torch.ones_like(y), -torch.ones_like(y))


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun3", "rk4"])
def test_perturb_evaluates_each_step_on_its_own_side_of_a_discontinuity(method):
    """With perturb=True stage 0 is evaluated just after t0 and stages at t1 just before t1, so a
    grid point on the jump gives the exact piecewise-linear solution y(2) = y0 + 1 - 1."""
    y0 = torch.zeros(1, dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    perturbed = fastcnf.odeint(step_down_at_one, y0, t, method=method, options=dict(step_size=0.5, perturb=True))
    assert perturbed[-1].item() == pytest.approx(0.0, abs=1e-12)
    plain = fastcnf.odeint(step_down_at_one, y0, t, method=method, options=dict(step_size=0.5))
    if method == "euler":  # steps from 0, 0.5, 1 (f(1) = +1) and 1.5: 0.5 * (1 + 1 + 1 - 1)
        assert plain[-1].item() == pytest.approx(1.0, abs=1e-12)
