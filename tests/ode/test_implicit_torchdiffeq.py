"""Agreement with torchdiffeq's implicit methods, where the installed torchdiffeq has them.

torchdiffeq 0.2.5 (the pinned release) has none; its repository head adds them. Run against
head by putting a checkout first on the path: ``PYTHONPATH=/path/to/torchdiffeq pytest ...``.
Head's Broyden iteration stops at a residual 2-norm of 1e-8, so results agree to about that.
"""

import math

import pytest
import torch
import torchdiffeq
from torchdiffeq._impl.odeint import SOLVERS

import fastcnf
from fastcnf.ode.implicit.tableaus import IMPLICIT_TABLEAUS

F64 = torch.float64
METHOD_NAMES = sorted(IMPLICIT_TABLEAUS)


def _needs(method):
    if method not in SOLVERS:
        pytest.skip(f"torchdiffeq {torchdiffeq.__version__} has no {method!r}")


def autonomous(t, y):
    return torch.stack([-y[0] * y[1], y[0] - y[1] ** 2])


def nonautonomous(t, y):
    return torch.stack([torch.cos(t) * y[0], -torch.cos(t) * y[1] ** 2])


def _stiff_rows():
    """(16, 8) rows of y' = A y, eigenvalues of A log-spaced in [-1e4, -1]."""
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=F64))
    a = q @ torch.diag(-torch.logspace(0, 4, 8, dtype=F64)) @ q.T
    return (lambda t, y: y @ a.T), torch.randn(16, 8, generator=generator, dtype=F64)


def _both(func, y0, t, method, step_size):
    options = dict(step_size=step_size)
    return (fastcnf.odeint(func, y0, t, method=method, options=options),
            torchdiffeq.odeint(func, y0, t, method=method, options=options))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_nonstiff_autonomous(method):
    _needs(method)
    ours, theirs = _both(autonomous, torch.tensor([1.0, 0.5], dtype=F64), torch.linspace(0, 1, 5, dtype=F64), method,
                         0.05)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-8)


@pytest.mark.parametrize("method", [name for name in METHOD_NAMES if name != "gl4"])
def test_nonstiff_time_dependent(method):
    _needs(method)
    ours, theirs = _both(nonautonomous, torch.tensor([1.0, 1.0], dtype=F64), torch.linspace(0, 1, 5, dtype=F64),
                         method, 0.05)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-8)


def test_gl4_time_dependent_is_fourth_order_where_torchdiffeq_head_is_first_order():
    """Head's gl4 evaluates both stages at 1/2 - sqrt(3)/6: for y' = cos(t) its error is O(dt)."""
    _needs("gl4")
    y0, t = torch.zeros(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    errors = {}
    for name, library in (("fastcnf", fastcnf), ("torchdiffeq", torchdiffeq)):
        errors[name] = [abs(float(library.odeint(lambda t, y: torch.cos(t).reshape(1), y0, t, method="gl4",
                                                 options=dict(step_size=h))[-1]) - math.sin(1.0)) for h in (0.1, 0.05)]
    assert math.log2(errors["fastcnf"][0] / errors["fastcnf"][1]) == pytest.approx(4, abs=0.2)
    assert math.log2(errors["torchdiffeq"][0] / errors["torchdiffeq"][1]) == pytest.approx(1, abs=0.2)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_stiff_linear_rows(method):
    _needs(method)
    func, y0 = _stiff_rows()
    ours, theirs = _both(func, y0, torch.tensor([0.0, 0.05], dtype=F64), method, 0.01)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-8)
