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

__all__ = ["ConcatLinear", "ConcatSquashLinear", "IgnoreLinear", "ODEnet", "SquashFold", "LAYERS", "ACTIVATIONS"]


def _time_column(t, x):
    """``t`` broadcast to a (B, 1) column in the dtype and device of ``x``."""
    return torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(1, 1).expand(x.shape[0], 1)


def _time_scalar(t, like):
    """``t`` as a (1,) tensor in the dtype and device of ``like`` (differentiable when t requires grad)."""
    return torch.as_tensor(t, dtype=like.dtype, device=like.device).reshape(1)


class ConcatLinear(nn.Module):
    """W [t, x] + b: a linear layer on the input with the time prepended as a column."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in + 1, dim_out)

    def forward(self, t, x):
        return self.linear(torch.cat([_time_column(t, x), x], dim=1))

    def affine(self, t):
        """(W, b) of the map x -> W x + b this layer is at time t."""
        weight = self.linear.weight
        return weight[:, 1:], torch.addcmul(self.linear.bias, weight[:, 0], _time_scalar(t, weight))


class ConcatSquashLinear(nn.Module):
    """(W x + b) * sigmoid(a t + c) + d t: time gates each output and shifts it."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.gate = nn.Linear(1, dim_out)
        self.shift = nn.Linear(1, dim_out, bias=False)

    def forward(self, t, x):
        time = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(1, 1)
        return self.linear(x) * torch.sigmoid(self.gate(time)) + self.shift(time)

    def affine(self, t):
        """(W, b) of the map x -> W x + b this layer is at time t (one ``SquashFold`` node under autograd)."""
        time = _time_scalar(t, self.linear.weight)
        params = (self.linear.weight, self.linear.bias, self.gate.weight, self.gate.bias, self.shift.weight)
        if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in (time, *params)):
            return SquashFold.apply(time, *params)
        return squash_fold(time, *params)[:2]


def squash_fold(time, weight, bias, gate_weight, gate_bias, shift_weight):
    """(diag(g) W, g b + d t, g) with g = sigmoid(a t + c), for a (1,) ``time`` tensor."""
    gate = torch.sigmoid(torch.addcmul(gate_bias, gate_weight.view(-1), time))
    return weight * gate[:, None], torch.addcmul(bias * gate, shift_weight.view(-1), time), gate


class SquashFold(torch.autograd.Function):
    """``squash_fold`` as one graph node: (W_eff, b_eff) with gradients for the five parameters and t."""

    @staticmethod
    def forward(ctx, time, weight, bias, gate_weight, gate_bias, shift_weight):
        weight_eff, bias_eff, gate = squash_fold(time, weight, bias, gate_weight, gate_bias, shift_weight)
        ctx.save_for_backward(time, weight, bias, gate_weight, shift_weight, gate)
        return weight_eff, bias_eff

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_weight_eff, grad_bias_eff):
        time, weight, bias, gate_weight, shift_weight, gate = ctx.saved_tensors
        grad_gate = (grad_weight_eff * weight).sum(dim=1) + grad_bias_eff * bias
        grad_pre = grad_gate * gate * (1 - gate)  # through the sigmoid
        grad_time = (grad_pre @ gate_weight.view(-1) + grad_bias_eff @ shift_weight.view(-1)).reshape(1)
        return (grad_time, grad_weight_eff * gate[:, None], grad_bias_eff * gate, (grad_pre * time)[:, None], grad_pre,
                (grad_bias_eff * time)[:, None])


class IgnoreLinear(nn.Module):
    """W x + b, ignoring the time."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, t, x):
        return self.linear(x)

    def affine(self, t):
        """(W, b) of the map x -> W x + b (the same at every time)."""
        return self.linear.weight, self.linear.bias


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

        The effective weights and biases are computed from the parameters with autograd-tracked ops,
        so gradients through them reach the parameters and ``t``.
        """
        layers = [layer.affine(t) for layer in self.layers]
        return MLPSpec(tuple(weight for weight, _ in layers), tuple(bias for _, bias in layers), self.activation,
                       "none")

    def extra_repr(self):
        return f"dim={self.dim}, layers={'/'.join(self.kinds)}, activation={self.activation}"
