"""First checks that fastcnf.odeint matches torchdiffeq on a small nonlinear problem."""

import pytest
import torch
import torchdiffeq

import fastcnf

METHODS = ["dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "heun2", "heun3", "rk4",
           "implicit_adams"]


def _problem(dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=generator, dtype=dtype) * 0.5
    y0 = torch.randn(3, 4, generator=generator, dtype=dtype)
    return (lambda t, y: torch.tanh(y @ weight) + torch.sin(t)), y0, torch.linspace(0, 2, 5, dtype=dtype)


@pytest.mark.parametrize("method", METHODS)
def test_matches_torchdiffeq_float64(method):
    func, y0, t = _problem(torch.float64)
    options = dict(step_size=0.05) if method not in fastcnf.ode.explicit.tableaus.ADAPTIVE_TABLEAUS else None
    expected = torchdiffeq.odeint(func, y0, t, method=method, options=options, rtol=1e-6, atol=1e-8)
    actual = fastcnf.odeint(func, y0, t, method=method, options=options, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-8)
