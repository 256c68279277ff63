"""fastcnf.track() (fastcnf/stats.py): evaluation and step counts of every solve in a block."""

import pytest
import torch
from problems import CountingFunc, tanh_problem

import fastcnf

F64 = torch.float64


class CountingRecorder(CountingFunc):
    """Counts evaluations and accepted / rejected steps through the callbacks."""

    def __init__(self, func):
        super().__init__(func)
        self.accepted = self.rejected = 0

    def callback_accept_step(self, t0, y0, dt):
        self.accepted += 1

    def callback_reject_step(self, t0, y0, dt):
        self.rejected += 1


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "adaptive_heun"])
def test_adaptive_counts_equal_what_the_function_and_callbacks_see(method):
    func, y0 = tanh_problem(F64)
    recorder = CountingRecorder(func)
    with fastcnf.track() as stats:
        fastcnf.odeint(recorder, y0, torch.linspace(0, 3, 4, dtype=F64), method=method, rtol=1e-6, atol=1e-8)
    assert stats.nfe_forward == recorder.calls > 0
    assert stats.steps_accepted == recorder.accepted > 0
    assert stats.steps_rejected == recorder.rejected
    assert stats.nfe_backward == 0 and stats.solves == 1
    assert stats.nfe == stats.nfe_forward


def test_rejected_steps_are_counted():
    func, y0 = tanh_problem(F64)
    recorder = CountingRecorder(func)
    with fastcnf.track() as stats:
        fastcnf.odeint(recorder, y0, torch.tensor([0.0, 3.0], dtype=F64), method="adaptive_heun", rtol=1e-5,
                       atol=1e-7)
    assert stats.steps_rejected == recorder.rejected > 0


@pytest.mark.parametrize("method, options, steps", [("euler", dict(step_size=0.1), 30), ("rk4", dict(step_size=0.5), 6),
                                                    ("explicit_adams", dict(step_size=0.25), 12)])
def test_fixed_grid_counts(method, options, steps):
    func, y0 = tanh_problem(F64)
    counting = CountingFunc(func)
    with fastcnf.track() as stats:
        fastcnf.odeint(counting, y0, torch.tensor([0.0, 3.0], dtype=F64), method=method, options=options)
    assert stats.nfe_forward == counting.calls
    assert stats.steps_accepted == steps and stats.steps_rejected == 0


@pytest.mark.parametrize("kind", ["events", "dense", "scipy"])
def test_counts_of_events_dense_output_and_scipy(kind):
    func, y0 = tanh_problem(F64)
    counting = CountingFunc(func)
    with fastcnf.track() as stats:
        if kind == "events":
            fastcnf.odeint(counting, y0, torch.tensor([0.0, 5.0], dtype=F64), event_fn=lambda t, y: y[0, 0] + 1.0)
        elif kind == "dense":
            fastcnf.odeint_dense(counting, y0, torch.tensor(0.0, dtype=F64), torch.tensor(2.0, dtype=F64))
        else:
            fastcnf.odeint(counting, y0, torch.tensor([0.0, 2.0], dtype=F64), method="scipy_solver")
    assert stats.nfe_forward == counting.calls > 0
    assert stats.solves == 1


def test_every_solve_in_the_block_counts_and_nothing_outside():
    func, y0 = tanh_problem(F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    first, second = CountingFunc(func), CountingFunc(func)
    fastcnf.odeint(func, y0, t)  # outside: not counted
    with fastcnf.track() as outer:
        fastcnf.odeint(first, y0, t)
        with fastcnf.track() as inner:
            fastcnf.odeint(second, y0, t, method="rk4", options=dict(step_size=0.1))
    fastcnf.odeint(func, y0, t)
    assert inner.nfe_forward == second.calls and inner.solves == 1
    assert outer.nfe_forward == first.calls + second.calls and outer.solves == 2
    assert outer.as_dict() == dict(nfe_forward=outer.nfe_forward, nfe_backward=0,
                                   steps_accepted=outer.steps_accepted, steps_rejected=0, solves=2)


def test_backprop_through_odeint_costs_no_solver_evaluations():
    """Without the adjoint, backward replays the recorded graph: nfe_backward stays 0."""
    func, y0 = tanh_problem(F64)
    y0.requires_grad_()
    with fastcnf.track() as stats:
        fastcnf.odeint(func, y0, torch.tensor([0.0, 1.0], dtype=F64)).sum().backward()
    assert stats.nfe_backward == 0 and stats.nfe_forward > 0


def test_a_failed_solve_is_still_counted():
    counting = CountingFunc(lambda t, y: y * y)
    with fastcnf.track() as stats:
        with pytest.raises(fastcnf.StepSizeUnderflowError):
            fastcnf.odeint(counting, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64))
    assert stats.nfe_forward == counting.calls > 0
    assert stats.solves == 1
