"""Fused Hutchinson kernel for MLP dynamics: ``f(t, z)`` and ``eps^T (df/dz) eps`` in one pass.

For an MLP described by a spec (``weights``, ``biases``, ``activation`` and ``has_time(layer)``, as
``fastcnf.cnf.mlp_spec.MLPSpec`` provides) the kernel propagates the hidden state ``h`` and its
tangent ``v = (dh/dz) eps`` through all layers together (forward-mode
differentiation), one program per block of batch rows:

    pre_k = W_k [t, h_{k-1}] + b_k        h_k = act(pre_k)
    tan_k = W_k [0, v_{k-1}]              v_k = act'(pre_k) * tan_k          (h_0 = z, v_0 = eps)
    f = pre_L,   quad = sum_d eps_d * tan_L,d

so the Hutchinson quadratic form costs one fused launch instead of a forward pass plus an
autograd vector-Jacobian product. Each layer is a runtime loop of outer products over its
inputs: plain FMAs in the state dtype, so results match torch to rounding, and small code that
compiles in seconds for any width up to ``MAX_WIDTH`` (``supports`` checks that). Under autograd
the kernel also stores every hidden ``pre_k`` and ``tan_k``; the backward (``HutchinsonMLP``) is
the reverse pass of the (h, v) recurrence of ``tangent_mlp.tangent_backward`` (torch matmuls),
with the time columns folded into the biases (b_k + t W_k[:, 0]), and gives gradients to ``z``,
``eps``, ``t`` and every weight and bias. ``tangent_mlp`` is this kernel's CPU twin and holds the
math (any number of probes, on any device). The plain torch reference is ``hutchinson_reference``
(``torch.func.jvp`` through ``mlp_reference``). This module imports nothing from fastcnf; the
caller (``fastcnf.cnf.divergence``) decides when to use it.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .tangent_mlp import ACTIVATIONS, activation_slope, mlp_reference, tangent_backward
from .tangent_mlp import SOFTPLUS_THRESHOLD as _SOFTPLUS_THRESHOLD

__all__ = ["MAX_WIDTH", "DTYPES", "ACTIVATIONS", "supports", "hutchinson_mlp", "HutchinsonMLP", "hutchinson_reference",
           "mlp_reference"]

MAX_WIDTH = 128
DTYPES = (torch.float32, torch.float64)
TILE_ELEMENTS = {torch.float32: 1024, torch.float64: 512}
MAX_BATCH_BLOCK = 64
SOFTPLUS_THRESHOLD = tl.constexpr(_SOFTPLUS_THRESHOLD)  # torch.nn.functional.softplus's: identity above it


# ---------------------------------------------------------------------------------------- kernel
@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    """(act(x), act'(x)) element-wise."""
    if ACTIVATION == "tanh":
        value = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
        slope = 1.0 - value * value
    elif ACTIVATION == "softplus":
        sigmoid = 1.0 / (1.0 + tl.exp(-x))
        smooth = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
        value = tl.where(x > SOFTPLUS_THRESHOLD, x, smooth)
        slope = tl.where(x > SOFTPLUS_THRESHOLD, 1.0, sigmoid)
    elif ACTIVATION == "sigmoid":
        value = 1.0 / (1.0 + tl.exp(-x))
        slope = value * (1.0 - value)
    elif ACTIVATION == "swish":
        sigmoid = 1.0 / (1.0 + tl.exp(-x))
        value = x * sigmoid
        slope = sigmoid * (1.0 + x * (1.0 - sigmoid))
    else:  # elu
        negative = tl.exp(tl.minimum(x, 0.0))
        value = tl.where(x > 0.0, x, negative - 1.0)
        slope = tl.where(x > 0.0, 1.0, negative)
    return value, slope


@triton.jit
def _hutchinson_kernel(f, quad, z, eps, t, weights, biases, scratch, saved_pre, saved_tangent, batch,
                       z_stride0, z_stride1, eps_stride0, eps_stride1, saved_layer_stride,
                       WIDTHS: tl.constexpr, PADDED: tl.constexpr, TIME: tl.constexpr, ACTIVATION: tl.constexpr,
                       SAVE: tl.constexpr, SCRATCH_WIDTH: tl.constexpr, BLOCK_B: tl.constexpr):
    """f and quad for BLOCK_B batch rows; with SAVE, also each hidden layer's pre-activation and tangent.

    WIDTHS are the layer widths (D, h_1, ..., D), PADDED their padded sizes, TIME[k] is 1 when
    layer k reads the time column (column 0 of its weight matrix). Each layer accumulates
    outer products over its input features in a runtime loop (small code, plain float32/float64
    FMAs); a layer's output reaches the next through this program's (2, BLOCK_B, SCRATCH_WIDTH)
    tile of ``scratch`` (h, then v). Saved tensors are (L - 1, batch, SCRATCH_WIDTH).
    """
    num_layers: tl.constexpr = len(WIDTHS) - 1
    dtype = f.dtype.element_ty
    program = tl.program_id(0).to(tl.int64)
    local = tl.arange(0, BLOCK_B)
    rows = program * BLOCK_B + local
    row_mask = rows < batch
    scratch_h = scratch + program * (2 * BLOCK_B * SCRATCH_WIDTH) + local * SCRATCH_WIDTH
    scratch_v = scratch_h + BLOCK_B * SCRATCH_WIDTH
    time = tl.load(t)
    for layer in tl.static_range(num_layers):
        if layer == 0:
            h_rows, h_step = z + rows * z_stride0, z_stride1
            v_rows, v_step = eps + rows * eps_stride0, eps_stride1
        else:
            h_rows, h_step = scratch_h, 1
            v_rows, v_step = scratch_v, 1
        columns = WIDTHS[layer] + TIME[layer]
        outputs = tl.arange(0, PADDED[layer + 1])
        out_mask = outputs < WIDTHS[layer + 1]
        weight_columns = weights[layer] + outputs * columns + TIME[layer]
        pre = tl.zeros([BLOCK_B, PADDED[layer + 1]], dtype)
        tangent = tl.zeros([BLOCK_B, PADDED[layer + 1]], dtype)
        for k in range(WIDTHS[layer]):
            weight = tl.load(weight_columns + k, mask=out_mask, other=0.0)[None, :]
            pre += tl.load(h_rows + k * h_step, mask=row_mask, other=0.0)[:, None] * weight
            tangent += tl.load(v_rows + k * v_step, mask=row_mask, other=0.0)[:, None] * weight
        bias = tl.load(biases[layer] + outputs, mask=out_mask, other=0.0)
        if TIME[layer]:
            bias += time * tl.load(weights[layer] + outputs * columns, mask=out_mask, other=0.0)
        pre += bias[None, :]
        if layer < num_layers - 1:
            if SAVE:
                offsets = layer * saved_layer_stride + rows[:, None] * SCRATCH_WIDTH + outputs[None, :]
                save_mask = row_mask[:, None] & out_mask[None, :]
                tl.store(saved_pre + offsets, pre, mask=save_mask)
                tl.store(saved_tangent + offsets, tangent, mask=save_mask)
            h, slope = _activation(pre, ACTIVATION)
            tl.debug_barrier()  # every thread is done reading this layer's input from the scratch tile
            tl.store(scratch_h[:, None] + outputs[None, :], h)
            tl.store(scratch_v[:, None] + outputs[None, :], slope * tangent)
            tl.debug_barrier()
        else:
            out_mask_2d = row_mask[:, None] & out_mask[None, :]
            noise = tl.load(eps + rows[:, None] * eps_stride0 + outputs[None, :] * eps_stride1, mask=out_mask_2d,
                            other=0.0)
            tl.store(f + rows[:, None] * WIDTHS[layer + 1] + outputs[None, :], pre, mask=out_mask_2d)
            tl.store(quad + rows, tl.sum(noise * tangent, axis=1), mask=row_mask)


# ------------------------------------------------------------------------------------ host side
@dataclass(frozen=True)
class _Architecture:
    """What the kernel specialises on: widths (D, h_1, ..., D), time flags per layer, activation."""

    widths: tuple
    time: tuple
    activation: str

    @property
    def padded(self):
        return tuple(triton.next_power_of_2(width) for width in self.widths)

    @property
    def num_layers(self):
        return len(self.widths) - 1

    @property
    def scratch_width(self):
        """Row width of the scratch tile and of the saved hidden layers."""
        return max(self.padded[1:-1], default=1)


def _architecture(spec):
    _check_ranks(spec)
    widths = [spec.weights[0].shape[1] - spec.has_time(0)]
    widths += [weight.shape[0] for weight in spec.weights]
    time = tuple(int(spec.has_time(layer)) for layer in range(len(spec.weights)))
    return _Architecture(tuple(int(width) for width in widths), time, spec.activation)


def _batch_block(arch, batch, dtype):
    """Rows per program: a (rows, widest layer) tile of about TILE_ELEMENTS[dtype] elements, which
    keeps the two accumulators in registers (ptxas for sm_80/sm_90 at widths 16 to MAX_WIDTH:
    56 to 96 registers, spills of at most 20 bytes). Worth tuning on a GPU."""
    rows = max(1, TILE_ELEMENTS[dtype] // max(arch.padded))
    return min(rows, MAX_BATCH_BLOCK, triton.next_power_of_2(batch))


def _launch(arch, z, eps, t, weights, biases, save):
    """Run the kernel; returns (f, quad, saved_pre, saved_tangent) (saved_* are None unless ``save``)."""
    batch = z.shape[0]
    f = torch.empty(batch, arch.widths[-1], dtype=z.dtype, device=z.device)
    quad = torch.empty(batch, dtype=z.dtype, device=z.device)
    saved_pre = saved_tangent = None
    if save:
        shape = (max(arch.num_layers - 1, 1), batch, arch.scratch_width)
        saved_pre = torch.empty(shape, dtype=z.dtype, device=z.device)
        saved_tangent = torch.empty(shape, dtype=z.dtype, device=z.device)
    if batch:
        block = _batch_block(arch, batch, z.dtype)
        programs = triton.cdiv(batch, block)
        scratch = torch.empty(programs, 2, block, arch.scratch_width, dtype=z.dtype, device=z.device)
        _hutchinson_kernel[(programs,)](
            f, quad, z, eps, t, tuple(weights), tuple(biases), scratch,
            saved_pre if save else f, saved_tangent if save else f, batch,
            z.stride(0), z.stride(1), eps.stride(0), eps.stride(1), batch * arch.scratch_width,
            WIDTHS=arch.widths, PADDED=arch.padded, TIME=arch.time, ACTIVATION=arch.activation,
            SAVE=save, SCRATCH_WIDTH=arch.scratch_width, BLOCK_B=block)
    return f, quad, saved_pre, saved_tangent


class HutchinsonMLP(torch.autograd.Function):
    """``(f, quad)`` of the fused kernel with gradients for z, eps, t (shape (1,)), weights and biases."""

    @staticmethod
    def forward(ctx, arch, z, eps, t, *params):
        weights, biases = params[:arch.num_layers], params[arch.num_layers:]
        f, quad, saved_pre, saved_tangent = _launch(arch, z, eps, t, weights, biases, save=True)
        ctx.arch = arch
        ctx.save_for_backward(z, eps, t, saved_pre, saved_tangent, *weights)
        return f, quad

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f, grad_quad):
        arch = ctx.arch
        z, eps, t, saved_pre, saved_tangent, *weights = ctx.saved_tensors
        inputs, outputs, slopes = [torch.stack([z, eps])], [], []
        for layer in range(arch.num_layers - 1):
            width = arch.widths[layer + 1]
            pre, tangent = saved_pre[layer, :, :width], saved_tangent[layer, :, :width]
            value, slope = activation_slope(arch.activation, pre)
            inputs.append(torch.stack([value, slope * tangent]))
            outputs.append(torch.stack([pre, tangent]))
            slopes.append(slope)
        last_weight = weights[-1][:, arch.time[-1]:]
        tangents = (inputs[-1][1] @ last_weight.t())[None]
        saved = (inputs, outputs, slopes, tangents)
        weights_h = [weight[:, time:] for weight, time in zip(weights, arch.time)]
        grad_z, grad_eps, grad_weights_h, grad_biases = tangent_backward(
            saved, weights_h, arch.activation, eps[None], grad_f, grad_quad, probes_grad=True)
        grad_weights, grad_t = [], torch.zeros_like(t)
        for weight, grad_weight_h, grad_bias, time in zip(weights, grad_weights_h, grad_biases, arch.time):
            if time:  # the time column enters as the bias t * W[:, 0]
                grad_weights.append(torch.cat([(t * grad_bias)[:, None], grad_weight_h], dim=1))
                grad_t = grad_t + grad_bias @ weight[:, 0]
            else:
                grad_weights.append(grad_weight_h)
        return (None, grad_z, grad_eps[0], grad_t, *grad_weights, *grad_biases)


def hutchinson_mlp(spec, t, z, eps):
    """The dynamics and the Hutchinson quadratic form of an MLP in one fused kernel.

    Args:
        spec: ``MLPSpec`` of the network (weights and biases in z's dtype and device).
        t: time, a float or a 1-element tensor (may require grad).
        z: (B, D) states; eps: (B, D) probe vectors (any strides).

    Returns:
        ``f`` (B, D) = f(t, z) and ``quad`` (B,) = eps^T (df/dz) eps per row, differentiable in
        z, eps, t, the weights and the biases.
    """
    arch = _architecture(spec)
    _check_inputs(spec, arch, z, eps)
    time = _time_tensor(t, z)
    weights = [weight.contiguous() for weight in spec.weights]
    biases = [bias.contiguous() for bias in spec.biases]
    tensors = (z, eps, time, *weights, *biases)
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors):
        return HutchinsonMLP.apply(arch, *tensors)
    f, quad, _, _ = _launch(arch, z, eps, time, weights, biases, save=False)
    return f, quad


def hutchinson_reference(spec, t, z, eps):
    """Plain torch twin of ``hutchinson_mlp``: ``torch.func.jvp`` through ``mlp_reference``."""
    time = t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=z.dtype, device=z.device)
    f, jvp = torch.func.jvp(lambda state: mlp_reference(spec, time.reshape(()), state), (z,), (eps,))
    return f, (eps * jvp).sum(dim=1)


def supports(spec, device):
    """True when ``hutchinson_mlp`` can run ``spec`` on ``device``: a CUDA device (or the CPU under
    ``TRITON_INTERPRET=1``), every tensor float32 or float64 on that device, a known activation and
    no layer wider than ``MAX_WIDTH``."""
    device = torch.device(device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    if spec.activation not in ACTIVATIONS:
        return False
    tensors = (*spec.weights, *spec.biases)
    if any(tensor.dtype not in DTYPES or tensor.device.type != device.type for tensor in tensors):
        return False
    return max(_architecture(spec).widths) <= MAX_WIDTH


# ------------------------------------------------------------------------------------ validation
def _time_tensor(t, z):
    """t as a (1,) tensor in z's dtype and device (differentiable when t requires grad)."""
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"t must be a scalar time, got a tensor of shape {tuple(t.shape)}.")
        return t.reshape(1).to(dtype=z.dtype, device=z.device)
    return torch.full((1,), float(t), dtype=z.dtype, device=z.device)


def _check_inputs(spec, arch, z, eps):
    if z.dim() != 2 or eps.shape != z.shape:
        raise ValueError(f"z and eps must both be (B, D) tensors, got {tuple(z.shape)} and {tuple(eps.shape)}.")
    if z.dtype not in DTYPES:
        raise TypeError(f"the fused Hutchinson kernel supports float32 and float64, got {z.dtype}.")
    if z.shape[1] != arch.widths[0] or arch.widths[-1] != arch.widths[0]:
        raise ValueError(f"the MLP maps {arch.widths[0]} to {arch.widths[-1]} features; z has {z.shape[1]}.")
    for tensor in (eps, *spec.weights, *spec.biases):
        if tensor.dtype != z.dtype or tensor.device != z.device:
            raise ValueError(f"eps and every weight and bias must be {z.dtype} on {z.device}, got "
                             f"{tensor.dtype} on {tensor.device}.")
    _check_layer_shapes(spec, arch)


def _check_ranks(spec):
    for layer, (weight, bias) in enumerate(zip(spec.weights, spec.biases)):
        if weight.dim() != 2 or bias.dim() != 1:
            raise ValueError(f"layer {layer}: the weight must be 2-D and the bias 1-D, got shapes "
                             f"{tuple(weight.shape)} and {tuple(bias.shape)}.")


def _check_layer_shapes(spec, arch):
    for layer, (weight, bias) in enumerate(zip(spec.weights, spec.biases)):
        fan_in, fan_out = arch.widths[layer], arch.widths[layer + 1]
        expected = (fan_out, fan_in + arch.time[layer])
        if tuple(weight.shape) != expected or tuple(bias.shape) != (fan_out,):
            raise ValueError(f"layer {layer}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not "
                             f"chain; expected {expected} and ({fan_out},).")
