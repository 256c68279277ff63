"""FFJORD-style layers and ODEnet, and their MLPSpec description."""

import pytest
import torch
import torch.nn.functional as F

from fastcnf.cnf.mlp_spec import mlp_forward
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


@pytest.mark.parametrize("layers, time_concat", [("concat", "all"), ("ignore", "none"),
                                                 (("concat", "ignore", "ignore"), "first")])
@pytest.mark.parametrize("activation", ["tanh", "softplus", "swish", "elu"])
def test_mlp_spec_evaluates_like_the_net(layers, time_concat, activation):
    t, x = _inputs()
    net = ODEnet(3, (8, 6), layers, activation).double()
    spec = net.mlp_spec()
    assert spec.time_concat == time_concat
    torch.testing.assert_close(mlp_forward(spec, t, x), net(t, x))


def test_mlp_spec_shares_parameters_and_is_none_for_concatsquash():
    net = ODEnet(2, (4,), "concat", "tanh")
    spec = net.mlp_spec()
    assert spec.weights[0] is net.layers[0].linear.weight
    assert ODEnet(2, (4,), "concatsquash", "tanh").mlp_spec() is None
    assert ODEnet(2, (4,), ("ignore", "concat"), "tanh").mlp_spec() is None


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
