"""Adaptive Runge-Kutta solves (fastcnf/ode/explicit/adaptive.py): accuracy against scipy's DOP853 and exact
solutions, and what each step-control option does to the steps taken."""

import math

import numpy as np
import pytest
import torch
from problems import CountingFunc, kepler, kepler_exact
from scipy.integrate import solve_ivp

import fastcnf

TIMES = np.linspace(0.0, 5.0, 6)


def lotka_volterra(t, y):
    prey, predator = y[..., 0], y[..., 1]
    return torch.stack([1.5 * prey - prey * predator, -3.0 * predator + prey * predator], -1)


@pytest.fixture(scope="module")
def lotka_volterra_reference():
    def rhs(t, y):
        return [1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]]

    result = solve_ivp(rhs, (0.0, 5.0), [1.0, 1.0], method="DOP853", rtol=1e-12, atol=1e-12, t_eval=TIMES)
    return result.y.T


# (tolerance, bound on global error / tolerance). The bounds are about twice the observed ratios;
# fehlberg2's is large because, as in torchdiffeq, its next first stage is f at the first-order
# solution while the second-order one is propagated.
ACCURACY = {
    "dopri8": [(1e-10, 5), (1e-12, 10)],
    "dopri5": [(1e-8, 50), (1e-10, 20)],
    "tsit5": [(1e-8, 15), (1e-10, 6)],
    "bosh3": [(1e-6, 60), (1e-7, 60)],
    "fehlberg2": [(1e-5, 4000), (1e-6, 4000)],
    "adaptive_heun": [(1e-5, 30), (1e-6, 30)],
}


@pytest.mark.parametrize("method", list(ACCURACY))
def test_lotka_volterra_against_scipy_dop853(method, lotka_volterra_reference):
    """Global error against DOP853 (rtol=atol=1e-12) stays within a fixed multiple of the
    tolerance and shrinks with it. step_t puts step ends on the output times so the comparison
    measures the integration, not the dense interpolant."""
    errors = []
    for tol, bound in ACCURACY[method]:
        out = fastcnf.odeint(lotka_volterra, torch.tensor([1.0, 1.0], dtype=torch.float64),
                             torch.tensor(TIMES), method=method, rtol=tol, atol=tol,
                             options=dict(step_t=torch.tensor(TIMES)))
        errors.append(np.abs(out.numpy() - lotka_volterra_reference).max())
        assert errors[-1] < bound * tol, (tol, errors[-1])
    assert errors[1] < errors[0] / 2.5


@pytest.mark.parametrize("method", ["dopri8", "dopri5", "tsit5"])
def test_kepler_orbit_at_tight_tolerance(method):
    """Half an orbit of eccentricity 0.5 (including the close pericentre pass) to 1e-8. (Without
    step_t, dopri8's large steps leave the quartic interpolant at t=1 a 4e-8 error.)"""
    t = torch.tensor([0.0, 1.0, math.pi], dtype=torch.float64)
    out = fastcnf.odeint(kepler, torch.tensor(kepler_exact(0.0)), t, method=method, rtol=1e-11, atol=1e-12,
                         options=dict(step_t=t))
    np.testing.assert_allclose(out.numpy(), kepler_exact(t.numpy()), rtol=0, atol=1e-8)


class StepRecorder(torch.nn.Module):
    """Wraps a function and records (t0, dt) of every attempted, accepted and rejected step."""

    def __init__(self, func):
        super().__init__()
        self.func = func
        self.attempted, self.accepted, self.rejected = [], [], []

    def forward(self, t, y):
        return self.func(t, y)

    def callback_step(self, t0, y0, dt):
        self.attempted.append((float(t0), float(dt)))

    def callback_accept_step(self, t0, y0, dt):
        self.accepted.append((float(t0), float(dt)))

    def callback_reject_step(self, t0, y0, dt):
        self.rejected.append((float(t0), float(dt)))


def solve_recorded(func=lotka_volterra, t_end=5.0, rtol=1e-6, atol=1e-8, method="dopri5", **options):
    recorder = StepRecorder(func)
    out = fastcnf.odeint(recorder, torch.tensor([1.0, 1.0], dtype=torch.float64),
                         torch.tensor([0.0, t_end], dtype=torch.float64), method=method, rtol=rtol, atol=atol,
                         options=options)
    return recorder, out


def test_step_t_points_are_step_ends():
    points = [0.3, 1.7, 2.2, 4.05]
    recorder, _ = solve_recorded(step_t=torch.tensor(points, dtype=torch.float64))
    ends = [t0 + dt for t0, dt in recorder.accepted]
    for point in points:
        assert min(abs(end - point) for end in ends) < 1e-12


def kink(t, y):
    """A right-hand side with a jump at t = 1.5 (+1 before, -2 after)."""
    return torch.where(t < 1.5, torch.ones_like(y), -2.0 * torch.ones_like(y))


def test_jump_t_steps_onto_a_discontinuity_and_restarts_there():
    """With jump_t at the jump, the piecewise-linear solution is exact and far fewer evaluations
    are needed than when the controller has to find the jump by rejecting steps."""
    y0, t = torch.zeros(1, dtype=torch.float64), torch.tensor([0.0, 3.0], dtype=torch.float64)
    with_jump, without_jump = CountingFunc(kink), CountingFunc(kink)
    out = fastcnf.odeint(with_jump, y0, t, rtol=1e-8, atol=1e-10, options=dict(jump_t=torch.tensor([1.5])))
    reference = fastcnf.odeint(without_jump, y0, t, rtol=1e-8, atol=1e-10)
    assert out[-1].item() == pytest.approx(1.5 - 3.0, abs=1e-12)
    assert reference[-1].item() == pytest.approx(-1.5, abs=1e-4)
    assert with_jump.calls * 3 < without_jump.calls


def test_max_step_bounds_every_step():
    recorder, _ = solve_recorded(max_step=0.05)
    assert max(dt for _, dt in recorder.attempted) <= 0.05
    assert len(recorder.accepted) >= 100


def test_min_step_forces_acceptance_of_large_steps():
    """Steps at min_step are accepted whatever their error; the solution is then coarse."""
    recorder, _ = solve_recorded(min_step=0.5, rtol=1e-10, atol=1e-12)
    assert min(dt for _, dt in recorder.attempted) >= 0.5 - 1e-12
    assert not recorder.rejected


def test_first_step_is_the_first_attempt():
    recorder, _ = solve_recorded(first_step=0.0123)
    assert recorder.attempted[0] == (0.0, 0.0123)


@pytest.mark.parametrize("ifactor, dfactor", [(10.0, 0.2), (1.5, 0.5), (3.0, 0.05)])
def test_step_growth_and_shrink_factors(ifactor, dfactor):
    """Between attempts the step grows by at most ifactor and shrinks to no less than dfactor
    times the last one."""
    recorder, _ = solve_recorded(first_step=1e-4, ifactor=ifactor, dfactor=dfactor, rtol=1e-7, atol=1e-9)
    sizes = [dt for _, dt in recorder.attempted]
    ratios = np.array(sizes[1:]) / np.array(sizes[:-1])
    assert ratios.max() == pytest.approx(ifactor, rel=1e-12)  # the tiny first step grows at the cap
    assert ratios.min() >= dfactor * (1 - 1e-12)
    assert recorder.rejected


def test_safety_factor_scales_the_steps():
    """A smaller safety factor takes proportionally smaller steps, so more of them."""
    cautious, _ = solve_recorded(safety=0.5)
    default, _ = solve_recorded()
    assert len(cautious.accepted) > 1.3 * len(default.accepted)


def test_custom_norm_is_called_on_the_users_state():
    """The norm sees tensors of the state's shape; a max norm is stricter than RMS -> more steps."""
    shapes = []

    def max_norm(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor.abs().max()

    strict, _ = solve_recorded(norm=max_norm)
    default, _ = solve_recorded()
    assert set(shapes) == {(2,)}
    assert len(strict.accepted) > len(default.accepted)


def test_dtype_option_keeps_float64_solutions():
    """dtype sets torchdiffeq's time dtype; with a float64 state time stays float64."""
    _, out = solve_recorded(dtype=torch.float32, rtol=1e-10, atol=1e-12)
    _, reference = solve_recorded(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_output_times_inside_steps_use_dense_output(method):
    """Many output times cost no extra evaluations: they are interpolated inside the steps."""
    few, many = CountingFunc(lotka_volterra), CountingFunc(lotka_volterra)
    y0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    fastcnf.odeint(few, y0, torch.tensor([0.0, 5.0], dtype=torch.float64), method=method, rtol=1e-6, atol=1e-8)
    out = fastcnf.odeint(many, y0, torch.linspace(0, 5, 200, dtype=torch.float64), method=method,
                         rtol=1e-6, atol=1e-8)
    assert many.calls == few.calls
    assert out.shape == (200, 2)
