"""FFJORD-style layers and ODEnet, and their MLPSpec description."""

import pytest
import torch
import torch.nn.functional as F

from fastcnf.kernels.tangent_mlp import mlp_reference
from fastcnf.cnf.nets import ConcatLinear, ConcatSquashLinear, IgnoreLinear, ODEnet


def _inputs(dim=3, batch=5):
    generator = torch.Generator().manual_seed(0)
    return torch.tensor(0.7, dtype=torch.float64), torch.randn(batch, dim, generator=generator, dtype=torch.float64)


def test_concat_linear_prepends_the_time_column():
    t, x = _inputs()
    layer = ConcatLinear(3, 4).double()
    expected = torch.cat([torch.full((5, 1), 0.7, dtype=torch.float64), x], 1) @ layer.linear.weight.t() \
        + layer.linear.bias
    torch.testing.assert_close(layer(t, x), expected)


def test_concatsquash_gates_and_shifts_by_time():
    t, x = _inputs()
    layer = ConcatSquashLinear(3, 4).double()
    gate = torch.sigmoid(0.7 * layer.gate.weight[:, 0] + layer.gate.bias)
    expected = layer.linear(x) * gate + 0.7 * layer.shift.weight[:, 0]
    torch.testing.assert_close(layer(t, x), expected)


def test_ignore_linear_does_not_depend_on_time():
    _, x = _inputs()
    layer = IgnoreLinear(3, 4).double()
    torch.testing.assert_close(layer(torch.tensor(0.0), x), layer(torch.tensor(5.0), x))


def test_odenet_applies_activation_between_layers_only():
    t, x = _inputs()
    net = ODEnet(3, (8, 6), "ignore", "softplus").double()
    a, b, c = (layer.linear for layer in net.layers)
    torch.testing.assert_close(net(t, x), c(F.softplus(b(F.softplus(a(x))))))


LAYER_KINDS = ["concat", "concatsquash", "ignore", ("concatsquash", "concat", "ignore")]


@pytest.mark.parametrize("layers", LAYER_KINDS)
@pytest.mark.parametrize("activation", ["tanh", "softplus", "swish", "elu"])
def test_mlp_spec_evaluates_like_the_net(layers, activation):
    """At every time the net equals the MLP of its layers' affine maps (W_eff, b_eff)."""
    _, x = _inputs()
    net = ODEnet(3, (8, 6), layers, activation).double()
    for time in (0.0, 0.7, -1.3):
        spec = net.mlp_spec(torch.tensor(time, dtype=torch.float64))
        assert spec.time_concat == "none" and spec.activation == activation
        torch.testing.assert_close(mlp_reference(spec, None, x), net(torch.tensor(time, dtype=torch.float64), x))


@pytest.mark.parametrize("layers", LAYER_KINDS)
def test_mlp_spec_gradients_reach_the_parameters_and_time(layers):
    """Gradients through the effective weights equal those through the net itself (parameters and t)."""
    _, x = _inputs()
    net = ODEnet(3, (5, 4), layers, "tanh").double()
    grads = []
    for evaluate in (lambda t: net(t, x), lambda t: mlp_reference(net.mlp_spec(t), None, x)):
        t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
        grads.append(torch.autograd.grad(evaluate(t).pow(2).sum(), [t, *net.parameters()], allow_unused=True))
    for got, expected in zip(*grads):
        if expected is None:  # an ignore-only net does not depend on t
            assert got is None
        else:
            torch.testing.assert_close(got, expected)


def test_mlp_spec_of_a_float32_net_takes_a_float64_time():
    net = ODEnet(2, (4,), "concatsquash", "tanh")
    spec = net.mlp_spec(torch.tensor(0.3, dtype=torch.float64))
    assert all(w.dtype == torch.float32 for w in spec.weights + spec.biases)
    assert spec.weights[0].shape == (4, 2) and spec.weights[1].shape == (2, 4)


def test_float64_time_with_float32_state():
    net = ODEnet(2, (4,), "concatsquash", "tanh")
    out = net(torch.tensor(0.3, dtype=torch.float64), torch.randn(3, 2))
    assert out.dtype == torch.float32 and out.shape == (3, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=0), "dim must be a positive integer"),
    (dict(dim=2, hidden_dims=(4, 0)), "hidden widths"),
    (dict(dim=2, layer="dense"), "unknown layer 'dense'"),
    (dict(dim=2, activation="relu6"), "unknown activation 'relu6'"),
    (dict(dim=2, hidden_dims=(4,), layer=("concat",)), "need 2 layer kinds"),
])
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ODEnet(**kwargs)
