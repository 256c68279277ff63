"""FFJORD-style dynamics networks ``f(t, z) -> dz/dt`` for CNFs.

Every layer takes ``(t, x)``: ``t`` a 0-dim time tensor, ``x`` of shape (B, in). Three kinds:

    concat         W [t, x] + b                                (time column first)
    concatsquash   (W x + b) * sigmoid(a t + c) + d t          (time gates and shifts)
    ignore         W x + b                                     (autonomous)

``ODEnet`` stacks them with an activation between layers and none after the last. At a fixed time t
every layer is an affine map of x (``affine(t)``):

    concat         W[:, 1:] x + (b + W[:, 0] t)
    concatsquash   diag(g) W x + (g b + d t),   g = sigmoid(a t + c)
    ignore         W x + b

so at time t the whole net is a plain MLP of (W_eff, b_eff) layers, O(width^2) work per layer.
``ODEnet.mlp_spec(t)`` describes it as a ``fastcnf.cnf.mlp_spec.MLPSpec``, which lets the divergence
estimators evaluate f and the trace of df/dz in one structured pass (``fastcnf.kernels.tangent_mlp``,
or the Triton kernel on CUDA); gradients of (W_eff, b_eff) reach the parameters and t through
autograd (a concatsquash fold is one graph node with a hand-derived backward, ``SquashFold``).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..ode.validation import require_choice, require_positive_int
from .mlp_spec import MLPSpec

__all__ = ["ConcatLinear", "ConcatSquashLinear", "IgnoreLinear", "ODEnet", "SquashFold", "LAYERS", "ACTIVATIONS",
           "fold_layers", "unfold_layers"]


def _time_column(t, x):
    """``t`` broadcast to a (B, 1) column in the dtype and device of ``x``."""
    return torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(1, 1).expand(x.shape[0], 1)


def _time_scalar(t, like):
    """``t`` as a (1,) tensor in the dtype and device of ``like`` (differentiable when t requires grad)."""
    return torch.as_tensor(t, dtype=like.dtype, device=like.device).reshape(1)


class _TimeLayer(nn.Module):
    """A layer of kind ``kind`` (a key of ``LAYERS``); ``affine(t)`` is its fold by ``fold_layers``."""

    kind = None

    def affine(self, t):
        """(W, b) of the map x -> W x + b this layer is at time t (differentiable in the parameters and t)."""
        weights, biases, _ = fold_layers((self.kind,), list(self.parameters()), _time_scalar(t, self.linear.weight))
        return weights[0], biases[0]


class ConcatLinear(_TimeLayer):
    """W [t, x] + b: a linear layer on the input with the time prepended as a column."""

    kind = "concat"

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in + 1, dim_out)

    def forward(self, t, x):
        return self.linear(torch.cat([_time_column(t, x), x], dim=1))


class ConcatSquashLinear(_TimeLayer):
    """(W x + b) * sigmoid(a t + c) + d t: time gates each output and shifts it."""

    kind = "concatsquash"

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.gate = nn.Linear(1, dim_out)
        self.shift = nn.Linear(1, dim_out, bias=False)

    def forward(self, t, x):
        time = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(1, 1)
        return self.linear(x) * torch.sigmoid(self.gate(time)) + self.shift(time)


def _fold_packed(time, params):
    """(diag(g) W, g b + d t) with g = sigmoid(a t + c) for every layer (five parameters each), the per-output
    vectors of all layers concatenated so that their arithmetic runs once.

    Returns ((W_eff..., b_eff...), what the backward needs).
    """
    weights = params[0::5]
    sizes = [weight.shape[0] for weight in weights]
    bias, gate_weight, gate_bias, shift = (torch.cat([param.reshape(-1) for param in params[k::5]])
                                           for k in range(1, 5))
    gate = torch.sigmoid(torch.addcmul(gate_bias, gate_weight, time))
    bias_eff = torch.addcmul(bias * gate, shift, time)
    gates = gate.split(sizes)
    folded = (*(weight * g[:, None] for weight, g in zip(weights, gates)), *bias_eff.split(sizes))
    return folded, (weights, bias, gate_weight, shift, gate, sizes)


class SquashFold(torch.autograd.Function):
    """The concatsquash fold of several layers as one graph node: ``apply(time, *five parameters per layer)``
    -> (W_eff of every layer, then b_eff of every layer), with gradients for every parameter and t."""

    @staticmethod
    def forward(ctx, time, *params):
        folded, (weights, bias, gate_weight, shift, gate, sizes) = _fold_packed(time, params)
        ctx.sizes = sizes
        ctx.save_for_backward(time, bias, gate_weight, shift, gate, *weights)
        return folded

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        time, bias, gate_weight, shift, gate, *weights = ctx.saved_tensors
        count = len(weights)
        grad_params, grad_time = _unfold_packed(time, (weights, bias, gate_weight, shift, gate, ctx.sizes),
                                                grads[:count], grads[count:])
        return (grad_time, *grad_params)


def _unfold_packed(time, saved, grad_weights_eff, grad_biases_eff):
    """The vector-Jacobian product of ``_fold_packed``: ([gradient of each of the five parameters per layer],
    gradient of the (1,) time) for the gradients of every layer's W_eff and b_eff."""
    weights, bias, gate_weight, shift, gate, sizes = saved
    grad_bias_eff = torch.cat(list(grad_biases_eff))
    gates = gate.split(sizes)
    grad_gate = torch.cat([(g * w).sum(dim=1) for g, w in zip(grad_weights_eff, weights)])
    grad_pre = grad_gate.addcmul_(grad_bias_eff, bias).mul_(gate * (1 - gate))  # through the sigmoid
    grad_time = (grad_pre.dot(gate_weight) + grad_bias_eff.dot(shift)).reshape(1)
    grad_bias = (grad_bias_eff * gate).split(sizes)
    grad_gate_weight = (grad_pre * time).split(sizes)
    grad_shift = (grad_bias_eff * time).split(sizes)
    grad_gate_bias = grad_pre.split(sizes)
    grad_params = []
    for layer, (grad_weight_eff, g) in enumerate(zip(grad_weights_eff, gates)):
        grad_params += [grad_weight_eff * g[:, None], grad_bias[layer], grad_gate_weight[layer][:, None],
                        grad_gate_bias[layer], grad_shift[layer][:, None]]
    return grad_params, grad_time


PARAMETER_COUNTS = {"concat": 2, "concatsquash": 5, "ignore": 2}  # per layer kind, in ``parameters()`` order


def fold_layers(kinds, params, time):
    """The layers of an ``ODEnet`` of layer ``kinds`` at the (1,) tensor ``time`` as affine maps:
    ``(weights, biases, saved)`` with ``params`` the net's parameters in ``parameters()`` order (W, b per
    concat or ignore layer; W, b, a, c, d per concatsquash layer). The concatsquash layers fold together:
    under autograd (when t or their parameters require grad) as one ``SquashFold`` node and ``saved`` None,
    else by ``_fold_packed`` with ``saved`` what ``unfold_layers`` needs."""
    per_layer = _split_parameters(kinds, params)
    squash = [p for kind, layer in zip(kinds, per_layer) if kind == "concatsquash" for p in layer]
    if squash and torch.is_grad_enabled() and (time.requires_grad or any(p.requires_grad for p in squash)):
        folded, packed = SquashFold.apply(time, *squash), None
    else:
        folded, packed = _fold_packed(time, squash) if squash else ((), None)
    count = len(folded) // 2
    squash_weights, squash_biases = iter(folded[:count]), iter(folded[count:])
    weights, biases = [], []
    for kind, layer in zip(kinds, per_layer):
        if kind == "concatsquash":
            weight, bias = next(squash_weights), next(squash_biases)
        elif kind == "concat":
            weight, bias = layer[0][:, 1:], torch.addcmul(layer[1], layer[0][:, 0], time)
        else:
            weight, bias = layer
        weights.append(weight)
        biases.append(bias)
    return weights, biases, packed


def unfold_layers(kinds, params, time, saved, grad_weights, grad_biases):
    """The vector-Jacobian product of ``fold_layers``: ([gradient per parameter, in ``params`` order],
    gradient of the (1,) time) for the gradients of every layer's W_eff and b_eff."""
    per_layer = _split_parameters(kinds, params)
    squash = [k for k, kind in enumerate(kinds) if kind == "concatsquash"]
    squash_grads = iter(())
    grad_time = torch.zeros_like(time)
    if squash:
        grads, grad_time = _unfold_packed(time, saved, [grad_weights[k] for k in squash],
                                          [grad_biases[k] for k in squash])
        squash_grads = iter(grads)
    grad_params = []
    for kind, layer, grad_weight, grad_bias in zip(kinds, per_layer, grad_weights, grad_biases):
        if kind == "concatsquash":
            grad_params += [next(squash_grads) for _ in range(PARAMETER_COUNTS[kind])]
        elif kind == "concat":  # W[:, 0] t enters the bias
            grad_params += [torch.cat([(grad_bias * time)[:, None], grad_weight], dim=1), grad_bias]
            grad_time = grad_time + grad_bias.dot(layer[0][:, 0]).reshape(1)
        else:
            grad_params += [grad_weight, grad_bias]
    return grad_params, grad_time


def _split_parameters(kinds, params):
    layers, start = [], 0
    for kind in kinds:
        layers.append(tuple(params[start:start + PARAMETER_COUNTS[kind]]))
        start += PARAMETER_COUNTS[kind]
    if start != len(params):
        raise ValueError(f"layers {kinds} take {start} parameters, got {len(params)}.")
    return layers


class IgnoreLinear(_TimeLayer):
    """W x + b, ignoring the time."""

    kind = "ignore"

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, t, x):
        return self.linear(x)


LAYERS = {"concat": ConcatLinear, "concatsquash": ConcatSquashLinear, "ignore": IgnoreLinear}
ACTIVATIONS = {"tanh": torch.tanh, "softplus": F.softplus, "swish": F.silu, "elu": F.elu}


def _check_dims(dim, hidden_dims):
    require_positive_int("dim", dim)
    for width in hidden_dims:
        require_positive_int(f"hidden widths {tuple(hidden_dims)!r}: each", width)


class ODEnet(nn.Module):
    """An MLP ``f(t, z)`` on (B, dim) states built from layer kinds and hidden widths.

    Args:
        dim: state dimension D.
        hidden_dims: widths of the hidden layers, e.g. ``(64, 64, 64)``.
        layer: a layer kind of ``LAYERS`` for every layer, or a sequence with one kind per layer
            (``len(hidden_dims) + 1`` entries).
        activation: one of ``ACTIVATIONS`` (swish is x * sigmoid(x)).
    """

    def __init__(self, dim, hidden_dims=(64, 64, 64), layer="concatsquash", activation="tanh"):
        super().__init__()
        hidden_dims = tuple(hidden_dims)
        _check_dims(dim, hidden_dims)
        kinds = (layer,) * (len(hidden_dims) + 1) if isinstance(layer, str) else tuple(layer)
        if len(kinds) != len(hidden_dims) + 1:
            raise ValueError(f"need {len(hidden_dims) + 1} layer kinds for {len(hidden_dims)} hidden layers, "
                             f"got {len(kinds)}.")
        for kind in kinds:
            require_choice("layer", kind, tuple(LAYERS))
        require_choice("activation", activation, tuple(ACTIVATIONS))
        widths = (dim,) + hidden_dims + (dim,)
        self.dim, self.kinds, self.activation = dim, kinds, activation
        self.event_shape = (dim,)
        self.layers = nn.ModuleList(LAYERS[kind](w_in, w_out) for kind, w_in, w_out in zip(kinds, widths, widths[1:]))

    def forward(self, t, z):
        act = ACTIVATIONS[self.activation]
        h = z
        for index, layer in enumerate(self.layers):
            h = layer(t, h)
            if index < len(self.layers) - 1:
                h = act(h)
        return h

    def mlp_spec(self, t):
        """The net at time ``t`` (float or tensor) as an ``MLPSpec`` of affine layers (no time columns).

        The effective weights and biases come from ``fold_layers`` under autograd (all concatsquash
        layers in one ``SquashFold`` node), so gradients through them reach the parameters and ``t``.
        """
        time = _time_scalar(t, self.layers[0].linear.weight)
        weights, biases, _ = fold_layers(self.kinds, list(self.parameters()), time)
        return MLPSpec(tuple(weights), tuple(biases), self.activation, "none")

    def extra_repr(self):
        return f"dim={self.dim}, layers={'/'.join(self.kinds)}, activation={self.activation}"
