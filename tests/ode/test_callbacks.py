"""Step callbacks on an nn.Module func (fastcnf/ode/dynamics.py): callback_step, callback_accept_step
and callback_reject_step are called as torchdiffeq calls them (same arguments, same counts)."""

import warnings

import pytest
import torch
import torchdiffeq
from problems import tanh_problem

import fastcnf

F64 = torch.float64


class Recorder(torch.nn.Module):
    """Wraps ``func`` and logs (callback name, t0, y0, dt) for every callback."""

    def __init__(self, func):
        super().__init__()
        self.func = func
        self.log = []

    def forward(self, t, y):
        return self.func(t, y)

    def _record(self, name, t0, y0, dt):
        assert isinstance(t0, torch.Tensor) and isinstance(dt, torch.Tensor)
        state = tuple(part.detach().clone() for part in y0) if isinstance(y0, tuple) else y0.detach().clone()
        self.log.append((name, float(t0), state, float(dt)))

    def callback_step(self, t0, y0, dt):
        self._record("step", t0, y0, dt)

    def callback_accept_step(self, t0, y0, dt):
        self._record("accept", t0, y0, dt)

    def callback_reject_step(self, t0, y0, dt):
        self._record("reject", t0, y0, dt)


def assert_same_calls(ours, theirs, tol):
    """Same sequence of callbacks; times, steps and states equal up to ``tol`` (relative for t and
    dt: the error ratio of a small first step is rounding noise, which shifts later steps by ~1e-8)."""
    assert [entry[0] for entry in ours] == [entry[0] for entry in theirs]
    for (_, t_ours, y_ours, dt_ours), (_, t_theirs, y_theirs, dt_theirs) in zip(ours, theirs):
        assert t_ours == pytest.approx(t_theirs, rel=tol, abs=tol)
        assert dt_ours == pytest.approx(dt_theirs, rel=tol, abs=tol)
        for a, b in zip(*(((y_ours,), (y_theirs,)) if isinstance(y_ours, torch.Tensor) else (y_ours, y_theirs))):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=0, atol=tol)


def tuple_func(t, state):
    x, v = state
    return v.sum() * torch.cos(x) + torch.sin(t), -x.mean(0) * v


TUPLE_Y0 = (torch.tensor([[0.3, -0.1], [1.0, 0.2]], dtype=F64), torch.tensor([0.5, -1.5], dtype=F64))
CASES = [
    ("dopri5", None),
    ("bosh3", None),
    ("adaptive_heun", None),
    ("fehlberg2", dict(first_step=0.05)),
    ("euler", dict(step_size=0.1)),
    ("rk4", dict(step_size=0.3)),
    ("implicit_adams", dict(step_size=0.1)),
]


@pytest.mark.parametrize("state", ["tensor", "tuple"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("method, options", CASES, ids=[case[0] for case in CASES])
def test_callbacks_match_torchdiffeq(method, options, direction, state):
    """Adaptive solvers call callback_step before every attempt and then accept or reject (with
    the attempt's t0, y0 and dt); fixed-grid solvers call callback_step once per step. In
    reverse time t0 is the user's (decreasing) time and dt the (positive) internal step."""
    if state == "tensor":
        func, y0 = tanh_problem(F64)
    else:
        func, y0 = tuple_func, TUPLE_Y0
    t = torch.tensor([0.0, 0.8, 1.5], dtype=F64)
    if direction == "reverse":
        t = t.flip(0)
    ours, theirs = Recorder(func), Recorder(func)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "does not support callbacks" for fixed grids, in both
        torchdiffeq.odeint(theirs, y0, t, method=method, options=options, rtol=1e-5, atol=1e-7)
        fastcnf.odeint(ours, y0, t, method=method, options=options, rtol=1e-5, atol=1e-7)
    assert_same_calls(ours.log, theirs.log, tol=1e-6)
    names = {entry[0] for entry in ours.log}
    if options and "step_size" in options:
        assert names == {"step"}
    else:
        assert {"step", "accept"} <= names
    if method == "adaptive_heun":
        assert "reject" in names  # the comparison covers rejected steps too


def test_adaptive_callback_counts_add_up():
    """Every attempt is either accepted or rejected; accepted steps tile [t0, t1]."""
    func, y0 = tanh_problem(F64)
    recorder = Recorder(func)
    fastcnf.odeint(recorder, y0, torch.tensor([0.0, 2.0], dtype=F64), method="adaptive_heun", rtol=1e-5, atol=1e-7)
    counts = {name: sum(1 for entry in recorder.log if entry[0] == name) for name in ("step", "accept", "reject")}
    assert counts["step"] == counts["accept"] + counts["reject"]
    assert counts["reject"] > 0
    accepted = [(t0, dt) for name, t0, _, dt in recorder.log if name == "accept"]
    assert accepted[0][0] == 0.0
    for (t0, dt), (next_t0, _) in zip(accepted[:-1], accepted[1:]):
        assert next_t0 == pytest.approx(t0 + dt, abs=1e-14)
    assert accepted[-1][0] + accepted[-1][1] >= 2.0


def test_callbacks_unsupported_by_the_method_warn_like_torchdiffeq():
    func, y0 = tanh_problem(F64)
    with pytest.warns(UserWarning, match=r"Solver 'rk4' does not support callbacks \{.*callback_accept_step"):
        fastcnf.odeint(Recorder(func), y0, torch.tensor([0.0, 1.0], dtype=F64), method="rk4",
                       options=dict(step_size=0.5))


def test_scipy_solver_supports_no_callbacks():
    func, y0 = tanh_problem(F64)
    recorder = Recorder(func)
    with pytest.warns(UserWarning, match="Solver 'scipy_solver' does not support callbacks"):
        fastcnf.odeint(recorder, y0, torch.tensor([0.0, 1.0], dtype=F64), method="scipy_solver")
    assert recorder.log == []


def test_plain_function_without_callbacks_does_not_warn():
    func, y0 = tanh_problem(F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastcnf.odeint(func, y0, torch.tensor([0.0, 1.0], dtype=F64), method="rk4", options=dict(step_size=0.5))


def test_callbacks_are_called_in_event_mode():
    func, y0 = tanh_problem(F64)
    ours, theirs = Recorder(func), Recorder(func)
    kwargs = dict(event_fn=lambda t, y: y[0, 0] + 1.0, rtol=1e-6, atol=1e-8)  # crosses near t = 3.4
    torchdiffeq.odeint(theirs, y0, torch.tensor([0.0, 5.0], dtype=F64), **kwargs)
    fastcnf.odeint(ours, y0, torch.tensor([0.0, 5.0], dtype=F64), **kwargs)
    assert len(ours.log) > 2
    assert_same_calls(ours.log, theirs.log, tol=1e-6)
