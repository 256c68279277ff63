"""FFJORD-style dynamics networks ``f(t, z) -> dz/dt`` for CNFs.

Every layer takes ``(t, x)``: ``t`` a 0-dim time tensor, ``x`` of shape (B, in). Three kinds:

    concat         W [t, x] + b                                (time column first)
    concatsquash   (W x + b) * sigmoid(a t + c) + d t          (time gates and shifts)
    ignore         W x + b                                     (autonomous)

``ODEnet`` stacks them with an activation between layers and none after the last. A net made
only of concat/ignore layers describes itself as a ``fastcnf.cnf.mlp_spec.MLPSpec`` (``mlp_spec()``),
which lets the divergence estimators use the fused Hutchinson kernel.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ode.validation import require_choice, require_positive_int
from .mlp_spec import MLPSpec

__all__ = ["ConcatLinear", "ConcatSquashLinear", "IgnoreLinear", "ODEnet", "LAYERS", "ACTIVATIONS"]


def _time_column(t, x):
    """``t`` broadcast to a (B, 1) column in the dtype and device of ``x``."""
    return torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(1, 1).expand(x.shape[0], 1)


class ConcatLinear(nn.Module):
    """W [t, x] + b: a linear layer on the input with the time prepended as a column."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in + 1, dim_out)

    def forward(self, t, x):
        return self.linear(torch.cat([_time_column(t, x), x], dim=1))


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


class IgnoreLinear(nn.Module):
    """W x + b, ignoring the time."""

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

    def time_concat(self):
        """``MLPSpec.time_concat`` of this net, or None when it is not a plain concat/ignore MLP."""
        if all(kind == "concat" for kind in self.kinds):
            return "all"
        if all(kind == "ignore" for kind in self.kinds):
            return "none"
        if self.kinds[0] == "concat" and all(kind == "ignore" for kind in self.kinds[1:]):
            return "first"
        return None

    def mlp_spec(self):
        """``MLPSpec`` sharing this net's parameters, or None for concatsquash layers."""
        time_concat = self.time_concat()
        if time_concat is None:
            return None
        weights = tuple(layer.linear.weight for layer in self.layers)
        biases = tuple(layer.linear.bias for layer in self.layers)
        return MLPSpec(weights, biases, self.activation, time_concat)

    def extra_repr(self):
        return f"dim={self.dim}, layers={'/'.join(self.kinds)}, activation={self.activation}"
