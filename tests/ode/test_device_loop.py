"""The sync-free device loop equals the host loop and reports failures at its checks.

On CPU the loop is forced with ``options=dict(device_loop=True)``; on CUDA with the Triton backend it
is the default. Its Triton kernels (launch counts, the on-device step decision) are tested in
tests/kernels/test_kernel_solver.py.
"""

import math

import pytest
import torch

import fastcnf


def _problem(dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=generator, dtype=dtype) * 0.5
    y0 = torch.randn(3, 4, generator=generator, dtype=dtype)
    return (lambda t, y: torch.tanh(y @ weight) + torch.sin(t)), y0


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8", "adaptive_heun"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_loop_equals_host_loop(method, dtype, monkeypatch):
    monkeypatch.setenv("FASTCNF_BACKEND", "torch")  # same float32 error-ratio arithmetic in both loops
    func, y0 = _problem(dtype)
    t = torch.linspace(0, 2, 6, dtype=dtype)
    with fastcnf.track() as host:
        expected = fastcnf.odeint(func, y0, t, method=method, rtol=1e-6, atol=1e-8)
    with fastcnf.track() as device:
        actual = fastcnf.odeint(func, y0, t, method=method, rtol=1e-6, atol=1e-8, options=dict(device_loop=True))
    # float32 at rtol=1e-6 is at the edge of its resolution: the two loops form the stages with different
    # (equally valid) roundings, which may move a borderline decision and the result by a few 1e-5
    tolerance = 5e-5 if dtype == torch.float32 else 1e-8
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)
    if dtype == torch.float64:
        assert (device.steps_accepted, device.steps_rejected) == (host.steps_accepted, host.steps_rejected)
    else:  # float32 stage roundoff may flip one borderline accept/reject decision
        assert abs(device.steps_rejected - host.steps_rejected) <= 1
    # masked steps past the end (and a flipped float32 decision) cost a few evaluations, never many
    stages = len(fastcnf.ode.explicit.tableaus.ADAPTIVE_TABLEAUS[method].c)
    assert host.nfe_forward <= device.nfe_forward <= host.nfe_forward + 4 * stages


def test_host_checks_grow_slowly_with_the_number_of_steps():
    func, y0 = _problem()
    problem_t = torch.tensor([0.0, 20.0], dtype=torch.float64)
    from fastcnf.ode.problem import prepare

    problem = prepare(func, y0, problem_t, 1e-9, 1e-9, "dopri5", dict(device_loop=True), None)
    solver = problem.build_solver()
    solver.integrate(problem.t)
    steps = solver.accepted + solver.rejected
    assert steps > 100
    assert solver.host_checks <= 4 * math.log2(steps) + 16


def test_gradients_through_the_device_loop():
    func, y0 = _problem()
    y0 = y0.clone().requires_grad_(True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    grads = []
    for device_loop in (False, True):
        out = fastcnf.odeint(func, y0, t, rtol=1e-8, atol=1e-10, options=dict(device_loop=device_loop))
        grads.append(torch.autograd.grad((out ** 2).sum(), (y0, t)))
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


def test_adjoint_with_device_loop():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()

    class Func(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y)

    func = Func()
    y0 = torch.randn(5, 2, dtype=torch.float64)
    results = []
    for device_loop in (False, True):
        out = fastcnf.odeint_adjoint(func, y0, torch.tensor([0.0, 1.0]), options=dict(device_loop=device_loop))
        results.append(torch.autograd.grad(out[-1].pow(2).sum(), list(net.parameters())))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)


def test_failures_are_raised_at_the_next_check():
    func, y0 = _problem()
    t = torch.tensor([0.0, 5.0], dtype=torch.float64)
    with pytest.raises(fastcnf.MaxNumStepsError, match="max_num_steps"):
        fastcnf.odeint(func, y0, t, rtol=1e-12, atol=1e-12, options=dict(device_loop=True, max_num_steps=5))

    def blows_up(t, y):
        return torch.where(t > 0.5, torch.full_like(y, math.nan), -y)

    with pytest.raises((fastcnf.StepSizeUnderflowError, fastcnf.NonFiniteStateError), match="t="):
        fastcnf.odeint(blows_up, y0, t, options=dict(device_loop=True))


def test_device_loop_option_validation():
    func, y0 = _problem()
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(fastcnf.InvalidOptionError, match="device_loop"):
        fastcnf.odeint(func, y0, t, options=dict(device_loop="yes"))
    with pytest.raises(fastcnf.InvalidOptionError, match="step_t"):
        fastcnf.odeint(func, y0, t, options=dict(device_loop=True, step_t=torch.tensor([0.5])))
