"""An MLP and its Jacobian trace in one structured pass: the math of the fused Hutchinson kernel, in torch.

For an MLP of affine layers ``x -> W_k x + b_k`` with an activation between them (every layer of a
time-dependent network is affine in x at a fixed time t, so the caller folds t into ``W_k`` and
``b_k``), the hidden state ``h`` and P tangents ``v_p = (dh/dz) u_p`` for probe vectors ``u_p`` are
propagated together (forward-mode differentiation):

    pre_k = W_k h_{k-1} + b_k          h_k = act(pre_k)              (h_0 = z)
    tan_k = W_k v_{k-1}                v_k = act'(pre_k) * tan_k      (v_0 = u_p)
    f = pre_L,   trace = sum_p u_p . tan_L,p,   frobenius = sum_p |tan_L,p|^2

With the D unit vectors as probes (``probes=None``) ``trace`` is the exact tr(df/dz) and
``frobenius`` the exact |df/dz|_F^2; with one Gaussian or Rademacher probe they are Hutchinson's
estimates eps^T (df/dz) eps and |(df/dz) eps|^2. The h row and the P tangent rows of a layer are one
(P + 1, B, width) stack, so each layer is one matrix product.

The backward pass (``TangentMLP``) runs the reverse of the (h, v) recurrence by hand, so a
vector-Jacobian product of (f, trace) costs two matrix products per layer and no autograd graph of
the forward-mode pass (no double backward):

    d pre_k = d h_k * act'(pre_k) + act''(pre_k) * sum_p d v_k,p * tan_k,p
    d tan_k = d v_k * act'(pre_k)
    d W_k = [d pre_k; d tan_k]^T [h_{k-1}; v_{k-1}],   d b_k = sum_B d pre_k,
    [d h_{k-1}; d v_{k-1}] = [d pre_k; d tan_k] W_k

It is the CPU twin of the Triton kernel ``hutchinson.py`` (one probe, the same recurrence, whose
backward is ``tangent_backward`` here) and runs on any device. ``tangent_mlp_reference`` is the
plain ``torch.func.jvp`` twin the tests compare both with. This module imports neither triton nor
anything from fastcnf.
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["ACTIVATIONS", "SOFTPLUS_THRESHOLD", "activation_slope", "activation_derivatives", "tangent_mlp",
           "TangentMLP", "tangent_forward", "tangent_backward", "tangent_values", "tangent_mlp_reference",
           "mlp_reference"]

SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus's default: the identity above it
ACTIVATIONS = {
    "tanh": torch.tanh,
    "softplus": F.softplus,
    "sigmoid": torch.sigmoid,
    "swish": F.silu,
    "elu": F.elu,
}


# ------------------------------------------------------------------------------- activations
def activation_derivatives(name, x):
    """(act(x), act'(x), act''(x)) element-wise, with torch's derivative conventions."""
    value, slope = activation_slope(name, x)
    return value, slope, _curvature(name, x, value, slope)


def activation_slope(name, x, out=None):
    """(act(x), act'(x)); the value is written into ``out`` when given.

    tanh is evaluated as 2 sigmoid(2x) - 1: torch's CPU tanh costs about three sigmoids, and the
    difference to it is at most one unit of the dtype's precision times |tanh|'s scale (absolute).
    """
    if name == "tanh":
        value = torch.sigmoid(torch.mul(x, 2), out=out).mul_(2).sub_(1)
        return value, torch.rsub(value * value, 1)
    if name == "softplus":
        slope = torch.sigmoid(x).masked_fill_(x > SOFTPLUS_THRESHOLD, 1.0)
        return _into(F.softplus(x), out), slope
    if name == "sigmoid":
        value = torch.sigmoid(x, out=out)
        return value, value - value * value
    if name == "swish":
        sigmoid = torch.sigmoid(x)
        value = torch.mul(x, sigmoid, out=out)
        return value, sigmoid + value * (1 - sigmoid)
    if name == "elu":
        return _into(F.elu(x), out), torch.exp(torch.clamp(x, max=0)).masked_fill_(x > 0, 1.0)
    raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}.")


def _into(value, out):
    return value if out is None else out.copy_(value)


def _curvature(name, x, value, slope):
    """act''(x) from x, act(x) and act'(x)."""
    if name == "tanh":
        return -2 * value * slope
    if name == "softplus":
        return slope - slope * slope  # sigmoid (1 - sigmoid); 0 above the threshold, where the slope is 1
    if name == "sigmoid":
        return slope * (1 - 2 * value)
    if name == "swish":
        sigmoid = torch.sigmoid(x)
        return sigmoid * (1 - sigmoid) * (2 + x * (1 - 2 * sigmoid))
    return slope.masked_fill(x > 0, 0.0)  # elu


# ------------------------------------------------------------------------------- passes
def _first_layer(weight, bias, z, probes):
    """Layer 0's output stack (P + 1, B, out) and the input its weight gradient needs.

    Unit probes need no product: their tangents are the columns of W (broadcast over the batch), and
    the weight gradient needs only z. Given probes are stacked under z: [z; u_1; ...; u_P].
    """
    if probes is None:
        out = z.new_empty((z.shape[1] + 1, z.shape[0], weight.shape[0]))
        torch.addmm(bias, z, weight.t(), out=out[0])
        out[1:].copy_(weight.t()[:, None, :])
        return out, z
    stack = torch.cat([z[None], probes])
    out = torch.matmul(stack, weight.t())
    out[0].add_(bias)
    return out, stack


def _trace(tangents, probes):
    """sum_p u_p . tan_p per row, (B,), for (P, B, D) output tangents."""
    if probes is None:
        return tangents.diagonal(dim1=0, dim2=2).sum(dim=1)
    return (tangents * probes).sum(dim=(0, 2))


def tangent_forward(weights, biases, activation, z, probes=None, frobenius=False, save=False):
    """The forward pass; returns ``(f, trace, frobenius or None, saved)``.

    ``saved`` (None unless ``save``) holds, per layer, its input (layer 0: z for unit probes, else
    the stack [z; probes]; later layers: the (P + 1, B, in) stack [h; v]) and, per hidden layer, its
    output stack (pre-activation and tangents, (P + 1, B, out)) and act'(pre) (B, out): what
    ``tangent_backward`` needs.
    """
    inputs, outputs, slopes = [], [], []
    last = len(weights) - 1
    for layer, (weight, bias) in enumerate(zip(weights, biases)):
        if layer == 0:
            out, first_input = _first_layer(weight, bias, z, probes)
            inputs.append(first_input)
        else:
            inputs.append(stack)
            out = torch.matmul(stack, weight.t())
            out[0].add_(bias)
        if layer == last:
            break
        stack = torch.empty_like(out)
        _, slope = activation_slope(activation, out[0], out=stack[0])
        torch.mul(out[1:], slope, out=stack[1:])
        outputs.append(out)
        slopes.append(slope)
    tangents = out[1:]
    trace = _trace(tangents, probes)
    squares = tangents.square().sum(dim=(0, 2)) if frobenius else None
    saved = (inputs, outputs, slopes, tangents) if save else None
    return out[0].clone(), trace, squares, saved


def tangent_backward(saved, weights, activation, probes, grad_f, grad_trace, grad_frobenius=None,
                     probes_grad=False):
    """Vector-Jacobian product of ``tangent_forward``'s (f, trace, frobenius) by the reverse recurrence.

    Args:
        saved: ``tangent_forward(..., save=True)[3]``.
        grad_f: (B, D); grad_trace: (B,) or None; grad_frobenius: (B,) or None.
        probes_grad: also return the gradient for the probes (a given (P, B, D) tensor).

    Returns:
        ``(grad_z, grad_probes or None, [grad W_k], [grad b_k])``.
    """
    inputs, outputs, slopes, tangents = saved
    grad = torch.zeros((tangents.shape[0] + 1,) + tuple(grad_f.shape), dtype=grad_f.dtype, device=grad_f.device)
    grad[0] = grad_f
    if grad_trace is not None:
        if probes is None:
            grad[1:].diagonal(dim1=0, dim2=2).copy_(grad_trace[:, None].expand(-1, grad_f.shape[1]))
        else:
            grad[1:] = grad_trace[None, :, None] * probes
    if grad_frobenius is not None:
        grad[1:] += 2 * grad_frobenius[None, :, None] * tangents
    num_layers = len(weights)
    grad_weights, grad_biases = [None] * num_layers, [None] * num_layers
    for layer in reversed(range(num_layers)):
        grad_biases[layer] = grad[0].sum(dim=0)
        if layer == 0:
            break
        grad_weights[layer] = grad.reshape(-1, grad.shape[-1]).t() @ inputs[layer].reshape(-1, inputs[layer].shape[-1])
        grad = torch.matmul(grad, weights[layer])  # [d h; d v] of the layer below
        out, slope = outputs[layer - 1], slopes[layer - 1]
        curvature = _curvature(activation, out[0], inputs[layer][0], slope)
        grad[0].mul_(slope).add_(curvature * (grad[1:] * out[1:]).sum(dim=0))
        grad[1:].mul_(slope)
    weight = weights[0]
    grad_z = grad[0] @ weight
    grad_probes = None
    if probes is None:  # d W_0 = d pre^T z + the tangent rows summed into the unit probes' columns
        grad_weights[0] = torch.addmm(grad[1:].sum(dim=1).t(), grad[0].t(), inputs[0])
    else:
        grad_weights[0] = grad.reshape(-1, grad.shape[-1]).t() @ inputs[0].reshape(-1, inputs[0].shape[-1])
        if probes_grad:
            grad_probes = torch.matmul(grad[1:], weight)
            if grad_trace is not None:
                grad_probes += grad_trace[None, :, None] * tangents
    return grad_z, grad_probes, grad_weights, grad_biases


def tangent_values(weights, biases, activation, z, probes=None):
    """``(f, trace)`` of the forward pass alone (no Frobenius norm, nothing saved)."""
    f, trace, _, _ = tangent_forward(weights, biases, activation, z, probes)
    return f, trace


class TangentMLP(torch.autograd.Function):
    """``(f, trace[, frobenius])`` of ``tangent_forward`` with the hand-derived backward.

    ``apply(activation, frobenius, num_layers, z, probes, *weights, *biases)``; ``probes`` is None
    (unit vectors) or a (P, B, D) tensor.
    """

    @staticmethod
    def forward(ctx, activation, frobenius, num_layers, z, probes, *params):
        weights, biases = params[:num_layers], params[num_layers:]
        f, trace, squares, saved = tangent_forward(weights, biases, activation, z, probes, frobenius, save=True)
        ctx.activation, ctx.frobenius, ctx.num_layers = activation, frobenius, num_layers
        ctx.saved = saved
        ctx.save_for_backward(probes, *weights)
        return (f, trace, squares) if frobenius else (f, trace)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f, grad_trace, grad_frobenius=None):
        probes, *weights = ctx.saved_tensors
        grad_z, grad_probes, grad_weights, grad_biases = tangent_backward(
            ctx.saved, weights, ctx.activation, probes, grad_f, grad_trace, grad_frobenius,
            probes_grad=probes is not None and ctx.needs_input_grad[4])
        return (None, None, None, grad_z, grad_probes, *grad_weights, *grad_biases)


def tangent_mlp(weights, biases, activation, z, probes=None, frobenius=False):
    """The MLP's output and its Jacobian trace (and squared Frobenius norm) in one structured pass.

    Args:
        weights: (out_k, in_k) tensors; biases: (out_k,) tensors; the last layer maps back to D.
        activation: a name of ``ACTIVATIONS``, applied between layers.
        z: (B, D) states, the dtype and device of the weights.
        probes: None for the D unit vectors (exact trace), or (P, B, D) probe vectors (P = 1:
            Hutchinson's estimator with the noise ``probes[0]``).
        frobenius: also return sum_p |(df/dz) u_p|^2 per row.

    Returns:
        ``(f (B, D), trace (B,))`` or ``(f, trace, frobenius (B,))``, differentiable in z, the
        probes, the weights and the biases (first derivatives; the backward is hand-derived).
    """
    _check_inputs(weights, biases, activation, z, probes)
    tensors = (z, probes, *weights, *biases)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return TangentMLP.apply(activation, frobenius, len(weights), *tensors)
    f, trace, squares, _ = tangent_forward(weights, biases, activation, z, probes, frobenius)
    return (f, trace, squares) if frobenius else (f, trace)


def tangent_mlp_reference(weights, biases, activation, z, probes=None, frobenius=False):
    """Plain torch twin of ``tangent_mlp``: ``torch.func.jvp`` through the MLP once per probe."""
    act = ACTIVATIONS[activation]

    def mlp(state):
        return _affine_stack(weights, biases, act, state)

    vectors = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)[:, None, :].expand(-1, z.shape[0], -1) \
        if probes is None else probes
    f, trace, squares = mlp(z), 0, 0
    for vector in vectors:
        _, tangent = torch.func.jvp(mlp, (z,), (vector,))
        trace = trace + (tangent * vector).sum(dim=1)
        squares = squares + tangent.square().sum(dim=1)
    return (f, trace, squares) if frobenius else (f, trace)


def mlp_reference(spec, t, z):
    """Plain torch evaluation on z (B, D) of an MLP described like ``fastcnf.cnf.MLPSpec`` (weights,
    biases, activation, ``has_time(layer)``) at time ``t`` (0-dim tensor; unused when no layer sees it)."""
    return _affine_stack(spec.weights, spec.biases, ACTIVATIONS[spec.activation], z, t, spec.has_time)


def _affine_stack(weights, biases, act, h, t=None, has_time=lambda layer: False):
    """Affine layers with ``act`` between them; a layer with ``has_time(layer)`` sees the column t first."""
    last = len(weights) - 1
    for layer, (weight, bias) in enumerate(zip(weights, biases)):
        if has_time(layer):
            h = torch.cat([torch.ones_like(h[:, :1]) * t, h], dim=1)
        h = F.linear(h, weight, bias)
        if layer < last:
            h = act(h)
    return h


# ------------------------------------------------------------------------------- validation
def _check_inputs(weights, biases, activation, z, probes):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}.")
    if len(weights) != len(biases) or not weights:
        raise ValueError("the MLP needs one bias per weight and at least one layer.")
    if z.dim() != 2:
        raise ValueError(f"z must be a (B, D) tensor, got shape {tuple(z.shape)}.")
    if probes is not None and (probes.dim() != 3 or probes.shape[1:] != z.shape):
        raise ValueError(f"probes must be a (P, B, D) tensor with (B, D) = {tuple(z.shape)}, got shape "
                         f"{tuple(probes.shape)}.")
    width = z.shape[1]
    for layer, (weight, bias) in enumerate(zip(weights, biases)):
        if weight.dim() != 2 or weight.shape[1] != width or bias.shape != weight.shape[:1]:
            raise ValueError(f"layer {layer}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not chain "
                             f"from {width} features.")
        width = weight.shape[0]
    if width != z.shape[1]:
        raise ValueError(f"the MLP maps {z.shape[1]} to {width} features; it must map back to D = {z.shape[1]}.")
    for tensor in (*weights, *biases, *(() if probes is None else (probes,))):
        if tensor.dtype != z.dtype or tensor.device != z.device:
            raise ValueError(f"every weight, bias and probe must be {z.dtype} on {z.device} like z, got "
                             f"{tensor.dtype} on {tensor.device}.")
