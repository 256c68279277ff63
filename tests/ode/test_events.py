"""Event handling (fastcnf/ode/odeint.py, fastcnf/ode/events.py): odeint(..., event_fn=...) and
odeint_event, against a falling body with a known impact time, torchdiffeq and finite differences."""

import math

import pytest
import torch
import torchdiffeq

import fastcnf

F64 = torch.float64
GRAVITY = 9.81


class FallingBody(torch.nn.Module):
    """Height and velocity (h, v) under constant gravity ``g`` (a parameter)."""

    def __init__(self, gravity=GRAVITY):
        super().__init__()
        self.gravity = torch.nn.Parameter(torch.tensor(gravity, dtype=F64))

    def forward(self, t, state):
        return torch.stack([state[..., 1], -self.gravity * torch.ones_like(state[..., 0])], -1)


def hits_ground(t, state):
    return state[..., 0]


def impact_time(height, velocity, gravity=GRAVITY):
    """First t > 0 with h + v t - g t^2 / 2 = 0."""
    return (velocity + math.sqrt(velocity ** 2 + 2 * gravity * height)) / gravity


# bosh3 is left out: as in torchdiffeq its dense output uses a second-order midpoint value, so on
# the long steps this quadratic trajectory allows the located event is 0.035 early (see below).
ADAPTIVE_CASES = [("dopri5", None, 1e-9), ("tsit5", None, 1e-9), ("dopri8", None, 1e-9)]
FIXED_CASES = [("rk4", dict(step_size=0.01), 1e-4), ("euler", dict(step_size=0.001), 2e-3),
               ("midpoint", dict(step_size=0.01), 1e-4)]


@pytest.mark.parametrize("method, options, tol", ADAPTIVE_CASES + FIXED_CASES)
def test_event_time_and_state_of_a_falling_body(method, options, tol):
    """odeint with event_fn returns (event_t, solution) with solution = [y0, y(event_t)]; only
    t[0] of t matters."""
    y0 = torch.tensor([2.0, 1.5], dtype=F64)
    event_t, solution = fastcnf.odeint(FallingBody(), y0, torch.tensor([0.0, 100.0], dtype=F64), method=method,
                                       options=options, event_fn=hits_ground, rtol=1e-10, atol=1e-12)
    expected = impact_time(2.0, 1.5)
    assert event_t.shape == () and event_t.dtype == F64
    assert event_t.item() == pytest.approx(expected, abs=tol)
    assert solution.shape == (2, 2)
    assert torch.equal(solution[0], y0)
    assert abs(solution[1, 0].item()) < 10 * tol
    assert solution[1, 1].item() == pytest.approx(1.5 - GRAVITY * expected, abs=100 * tol)


@pytest.mark.parametrize("method, options", [("dopri5", None), ("bosh3", None), ("dopri8", None),
                                             ("rk4", dict(step_size=0.01)),
                                             ("midpoint", dict(step_size=0.01, interp="cubic"))])
def test_event_matches_torchdiffeq(method, options):
    y0 = torch.tensor([2.0, 1.5], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ours = fastcnf.odeint(FallingBody(), y0, t, method=method, options=options, event_fn=hits_ground)
    theirs = torchdiffeq.odeint(FallingBody(), y0, t, method=method, options=options, event_fn=hits_ground)
    # the event is located by bisection to atol (1e-9 by default), so step rounding may move it by that
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-8)


@pytest.mark.parametrize("method, options", [("dopri5", None), ("rk4", dict(step_size=0.01))])
def test_event_in_reverse_time(method, options):
    """Backwards from t=0 the body rises to where it left the ground at t = -impact_time(2, -1.5)."""
    y0 = torch.tensor([2.0, 1.5], dtype=F64)
    expected = -impact_time(2.0, -1.5)
    event_t, solution = fastcnf.odeint(FallingBody(), y0, torch.tensor([0.0, -1.0], dtype=F64), method=method,
                                       options=options, event_fn=hits_ground, rtol=1e-10, atol=1e-12)
    assert event_t.item() == pytest.approx(expected, abs=1e-4)
    event_t, _ = fastcnf.odeint_event(FallingBody(), y0, torch.tensor(0.0, dtype=F64), event_fn=hits_ground,
                                      reverse_time=True, method=method, options=options, rtol=1e-10, atol=1e-12)
    assert event_t.item() == pytest.approx(expected, abs=1e-4)
    theirs, _ = torchdiffeq.odeint_event(FallingBody(), y0, torch.tensor(0.0, dtype=F64), event_fn=hits_ground,
                                         reverse_time=True, method=method, options=options, rtol=1e-10, atol=1e-12)
    assert event_t.item() == pytest.approx(theirs.item(), abs=1e-12)


def test_several_event_functions_stop_at_the_first():
    """An event function returning several values stops at whichever changes sign first: here
    the velocity reaching -2 (t = 3.5 / g) before the height reaching 1.5."""
    y0 = torch.tensor([2.0, 1.5], dtype=F64)

    def events(t, state):
        return torch.stack([state[0] - 1.5, state[1] + 2.0])

    event_t, solution = fastcnf.odeint(FallingBody(), y0, torch.tensor([0.0, 10.0], dtype=F64), event_fn=events,
                                       rtol=1e-10, atol=1e-12)
    assert event_t.item() == pytest.approx(3.5 / GRAVITY, abs=1e-9)
    assert solution[-1, 1].item() == pytest.approx(-2.0, abs=1e-8)
    theirs, _ = torchdiffeq.odeint(FallingBody(), y0, torch.tensor([0.0, 10.0], dtype=F64), event_fn=events,
                                   rtol=1e-10, atol=1e-12)
    assert event_t.item() == pytest.approx(theirs.item(), abs=1e-12)


def test_event_function_sees_user_time_and_tuple_state():
    seen = []

    def func(t, state):
        height, velocity = state
        return velocity, -GRAVITY * torch.ones_like(velocity)

    def event_fn(t, state):
        seen.append((t.dtype, tuple(s.shape for s in state)))
        return state[0].sum()

    y0 = (torch.tensor([2.0], dtype=F64), torch.tensor([1.5], dtype=F64))
    event_t, (height, velocity) = fastcnf.odeint(func, y0, torch.tensor([0.0, 9.0], dtype=F64), event_fn=event_fn,
                                                 rtol=1e-10, atol=1e-12)
    assert event_t.item() == pytest.approx(impact_time(2.0, 1.5), abs=1e-9)
    assert height.shape == (2, 1) and velocity.shape == (2, 1)
    assert set(seen) == {(F64, ((1,), (1,)))}


def test_event_needs_exactly_two_times():
    with pytest.raises(ValueError, match=r"len\(t\) == 2 .* len\(t\)=3"):
        fastcnf.odeint(FallingBody(), torch.tensor([2.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0, 2.0], dtype=F64),
                       event_fn=hits_ground)


# ---------------------------------------------------------------- gradients
def event_time_and_velocity(method, options, interface, height, velocity, gravity):
    func = FallingBody()
    with torch.no_grad():
        func.gravity.copy_(gravity)
    event_t, solution = interface.odeint_event(func, torch.stack([height, velocity]), torch.tensor(0.0, dtype=F64),
                                               event_fn=hits_ground, method=method, options=options, rtol=1e-11,
                                               atol=1e-12)
    return event_t, solution[-1, 1], func


@pytest.mark.parametrize("method, options", [("dopri5", None), ("rk4", dict(step_size=0.01))])
def test_event_time_gradient_is_exact(method, options):
    """d t*/d(h, v0, g) by the implicit function theorem equals the derivative of the closed form
    t* = (v0 + sqrt(v0^2 + 2 g h)) / g; so does d v(t*)/d(h, v0, g) for v(t*) = v0 - g t*."""
    height = torch.tensor(2.0, dtype=F64, requires_grad=True)
    velocity = torch.tensor(1.5, dtype=F64, requires_grad=True)
    event_t, final_velocity, func = event_time_and_velocity(method, options, fastcnf, height, velocity, GRAVITY)
    grads = torch.autograd.grad(event_t, (height, velocity, func.gravity), retain_graph=True)

    h, v, g = (torch.tensor(x, dtype=F64, requires_grad=True) for x in (2.0, 1.5, GRAVITY))
    exact_t = (v + torch.sqrt(v * v + 2 * g * h)) / g
    exact_grads = torch.autograd.grad(exact_t, (h, v, g), retain_graph=True)
    for actual, expected in zip(grads, exact_grads):
        assert actual.item() == pytest.approx(expected.item(), abs=1e-6)

    velocity_grads = torch.autograd.grad(final_velocity, (height, velocity, func.gravity))
    exact_velocity_grads = torch.autograd.grad(v - g * exact_t, (h, v, g))
    for actual, expected in zip(velocity_grads, exact_velocity_grads):
        assert actual.item() == pytest.approx(expected.item(), abs=1e-5)


def test_event_gradients_match_torchdiffeq():
    """A nonlinear problem without closed form: dt*/dy0 and d(loss)/d(params) as torchdiffeq."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(F64)

    def func(t, y):
        return net(y) + torch.tensor([0.0, -2.0], dtype=F64)

    def event_fn(t, y):
        return y[0] + 1.0

    results = []
    for interface in (fastcnf, torchdiffeq):
        y0 = torch.tensor([0.3, 0.2], dtype=F64, requires_grad=True)
        event_t, solution = interface.odeint_event(func, y0, torch.tensor(0.0, dtype=F64), event_fn=event_fn,
                                                   rtol=1e-10, atol=1e-12)
        loss = event_t + solution[-1].pow(2).sum()
        results.append([event_t.detach()] + list(torch.autograd.grad(loss, [y0] + list(net.parameters()))))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)


def test_event_time_gradient_against_finite_differences():
    """Central differences of the event time in y0 agree with the implicit-function gradient."""
    def event_time(height, velocity):
        return event_time_and_velocity("dopri5", None, fastcnf, height, velocity, 7.0)[0]

    height = torch.tensor(1.3, dtype=F64, requires_grad=True)
    velocity = torch.tensor(-0.4, dtype=F64, requires_grad=True)
    grads = torch.autograd.grad(event_time(height, velocity), (height, velocity))
    step = 1e-5
    with torch.no_grad():
        fd_height = (event_time(height + step, velocity) - event_time(height - step, velocity)) / (2 * step)
        fd_velocity = (event_time(height, velocity + step) - event_time(height, velocity - step)) / (2 * step)
    assert grads[0].item() == pytest.approx(fd_height.item(), rel=1e-5)
    assert grads[1].item() == pytest.approx(fd_velocity.item(), rel=1e-5)


@pytest.mark.parametrize("method, options, expected", [
    ("dopri5", None, 1.0),
    ("rk4", dict(step_size=0.01, interp="cubic"), 1.0),
    ("rk4", dict(step_size=0.01), None),
])
def test_event_gradient_with_respect_to_start_time(method, options, expected):
    """Starting later only shifts the event: d t*/d t0 = 1. Chained events (a bouncing ball: each
    bounce starts at the previous event time) rely on it. With linear interpolation between grid
    points the state's t0-derivative is the chord's slope, so the gradient is 0.993 here; that is
    torchdiffeq's value too."""
    results = []
    for interface in (fastcnf, torchdiffeq):
        t0 = torch.tensor(0.25, dtype=F64, requires_grad=True)
        event_t, _ = interface.odeint_event(FallingBody(), torch.tensor([2.0, 1.5], dtype=F64), t0,
                                            event_fn=hits_ground, method=method, options=options, rtol=1e-10,
                                            atol=1e-12)
        results.append(torch.autograd.grad(event_t, t0)[0].item())
    assert results[0] == pytest.approx(results[1], abs=1e-9)
    if expected is not None:
        assert results[0] == pytest.approx(expected, abs=1e-6)
    else:
        assert 0.99 < results[0] < 0.999


def test_bouncing_ball_gradients_through_chained_events():
    """Three bounces, each starting (just above the ground) at the previous event time with the
    velocity reversed and damped by 0.8: the last impact time and its gradients in (h0, g) match
    torchdiffeq and the closed form."""
    def last_impact(interface, height, gravity):
        def func(t, state):
            return torch.stack([state[1], -gravity])

        t0, state = torch.tensor(0.0, dtype=F64), torch.stack([height, torch.zeros_like(height)])
        for _ in range(3):
            t0, solution = interface.odeint_event(func, state, t0, event_fn=hits_ground, rtol=1e-10, atol=1e-12)
            state = torch.stack([torch.tensor(1e-12, dtype=F64), -0.8 * solution[-1, 1]])
        return t0

    results = []
    for interface in (fastcnf, torchdiffeq):
        height = torch.tensor(2.0, dtype=F64, requires_grad=True)
        gravity = torch.tensor(GRAVITY, dtype=F64, requires_grad=True)
        impact = last_impact(interface, height, gravity)
        results.append([impact.detach(), *torch.autograd.grad(impact, (height, gravity))])
    # closed form: t = sqrt(2 h / g) * (1 + 2 * 0.8 + 2 * 0.8^2), so dt/dh = t / (2 h), dt/dg = -t / (2 g)
    closed_form = math.sqrt(2 * 2.0 / GRAVITY) * (1 + 1.6 + 1.28)
    assert results[0][0].item() == pytest.approx(closed_form, rel=1e-8)
    assert results[0][1].item() == pytest.approx(closed_form / 4.0, rel=1e-6)
    assert results[0][2].item() == pytest.approx(-closed_form / (2 * GRAVITY), rel=1e-6)
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
