"""A dynamics function's own vector-Jacobian product (``adjoint_vjp``) in odeint_adjoint's backward solve:
the same gradients, time gradients and evaluation counts as autograd's, in forward and reverse time, for
tensor and tuple states, and autograd again where the function declines."""

import pytest
import torch

import fastcnf

F64 = torch.float64


class Rotation(torch.nn.Module):
    """dy/dt = tanh(A y + b t) for a tensor state (B, 2): autograd differentiates it."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.A = torch.nn.Parameter(torch.randn(2, 2, generator=generator, dtype=F64))
        self.b = torch.nn.Parameter(torch.randn(2, generator=generator, dtype=F64))

    def forward(self, t, y):
        return torch.tanh(y @ self.A.t() + self.b * t)


class RotationWithVJP(Rotation):
    """The same dynamics with its vector-Jacobian product written out; counts its calls."""

    def __init__(self, decline=False):
        super().__init__()
        self.calls, self.decline = 0, decline

    def adjoint_vjp(self, t, y, cotangent, params):
        if self.decline:
            return None
        self.calls += 1
        f = self.forward(t, y)
        g = cotangent * (1 - f * f)  # through tanh
        grads = {id(self.A): g.t() @ y, id(self.b): (g * t).sum(dim=0)}
        return f, g @ self.A, [grads.get(id(p)) for p in params], (g * self.b).sum()


class RotationWithFlatVJP(RotationWithVJP):
    """The same vector-Jacobian product with the parameter gradients as one flat tensor in ``params`` order
    (``size`` overrides its length, to check the size is checked)."""

    def __init__(self, size=None):
        super().__init__()
        self.size = size

    def adjoint_vjp(self, t, y, cotangent, params):
        f, grad_y, grads, grad_t = super().adjoint_vjp(t, y, cotangent, params)
        flat = torch.cat([g.reshape(-1) for g in grads])
        return f, grad_y, flat if self.size is None else flat.new_zeros(self.size), grad_t


class TupleRotation(Rotation):
    """The same dynamics on a tuple state (y, s) with ds/dt = |y|^2 per row."""

    def forward(self, t, state):
        y, _ = state
        return super().forward(t, y), y.square().sum(dim=1)


class TupleRotationWithVJP(TupleRotation):
    calls = 0

    def adjoint_vjp(self, t, state, cotangent, params):
        (y, s), (c_y, c_s) = state, cotangent
        self.calls += 1
        f = Rotation.forward(self, t, y)
        g = c_y * (1 - f * f)
        grads = {id(self.A): g.t() @ y, id(self.b): (g * t).sum(dim=0)}
        grad_y = g @ self.A + 2 * c_s[:, None] * y
        return (f, y.square().sum(dim=1)), (grad_y, torch.zeros_like(s)), [grads.get(id(p)) for p in params], \
            (g * self.b).sum()


def _gradients(func, y0, t, **kwargs):
    y0 = tuple(part.clone().requires_grad_() for part in y0) if isinstance(y0, tuple) else y0.clone().requires_grad_()
    t = t.clone().requires_grad_()
    with fastcnf.track() as stats:
        solution = fastcnf.odeint_adjoint(func, y0, t, rtol=1e-9, atol=1e-9, **kwargs)
        parts = solution if isinstance(solution, tuple) else (solution,)
        loss = sum((part[1:] * torch.linspace(1, 2, part[1:].numel(), dtype=F64).view(part[1:].shape)).sum()
                   for part in parts)
        inputs = (*(y0 if isinstance(y0, tuple) else (y0,)), t, *func.parameters())
        grads = torch.autograd.grad(loss, inputs)
    return loss.detach(), grads, stats


def _assert_same(result, expected):
    (loss, grads, stats), (expected_loss, expected_grads, expected_stats) = result, expected
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (stats.nfe_forward, stats.nfe_backward) == (expected_stats.nfe_forward, expected_stats.nfe_backward)


@pytest.mark.parametrize("times", [[0.0, 0.4, 1.0], [1.0, 0.3, -0.5]], ids=["forward", "reverse"])
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_own_vector_jacobian_gives_autograds_gradients(times, method):
    y0 = torch.tensor([[0.3, -0.2], [1.0, 0.5], [-0.7, 0.1]], dtype=F64)
    t = torch.tensor(times, dtype=F64)
    options = {"step_size": 0.05, "perturb": True} if method == "rk4" else None
    func = RotationWithVJP()
    result = _gradients(func, y0, t, method=method, options=options)
    assert func.calls == result[2].nfe_backward > 0  # every backward evaluation took it
    _assert_same(result, _gradients(Rotation(), y0, t, method=method, options=options))


def test_own_vector_jacobian_on_a_tuple_state():
    y0 = (torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=F64), torch.zeros(2, dtype=F64))
    t = torch.tensor([0.0, 0.5, 1.2], dtype=F64)
    func = TupleRotationWithVJP()
    result = _gradients(func, y0, t)
    assert func.calls == result[2].nfe_backward > 0
    _assert_same(result, _gradients(TupleRotation(), y0, t))


def test_a_declining_function_is_differentiated_by_autograd():
    y0, t = torch.tensor([[0.3, -0.2]], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    func = RotationWithVJP(decline=True)
    _assert_same(_gradients(func, y0, t), _gradients(Rotation(), y0, t))
    assert func.calls == 0


def test_parameters_outside_the_function_get_zero_gradients():
    y0, t = torch.tensor([[0.3, -0.2]], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    func, other = RotationWithVJP(), torch.nn.Parameter(torch.ones(3, dtype=F64))
    y = fastcnf.odeint_adjoint(func, y0, t, adjoint_params=(*func.parameters(), other))
    grads = torch.autograd.grad(y[-1].sum(), [func.A, other])
    assert func.calls > 0 and torch.equal(grads[1], torch.zeros(3, dtype=F64)) and grads[0].abs().sum() > 0


def test_a_flat_parameter_gradient_is_taken_whole():
    y0, t = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=F64), torch.tensor([0.0, 0.6, 1.0], dtype=F64)
    func = RotationWithFlatVJP()
    result = _gradients(func, y0, t)
    assert func.calls == result[2].nfe_backward > 0
    _assert_same(result, _gradients(Rotation(), y0, t))


def test_a_flat_parameter_gradient_of_the_wrong_size_is_an_error():
    y0, t = torch.tensor([[0.3, -0.2]], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    y = fastcnf.odeint_adjoint(RotationWithFlatVJP(size=5), y0, t)
    with pytest.raises(ValueError, match="flat parameter gradient of shape \\(5,\\); the parameters have 6 elements"):
        y[-1].sum().backward()
