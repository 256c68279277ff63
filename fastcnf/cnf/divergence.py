"""Estimators of the divergence tr(df/dz) of CNF dynamics, selectable by name.

Every estimator is called as ``estimator(func, t, z, frobenius=False)`` with ``z`` of shape
(B, *event) and returns a ``DivergenceEstimate``: f(t, z), the per-sample divergence (B,) and,
when asked, a per-sample estimate of the squared Jacobian Frobenius norm |df/dz|_F^2 (B,) for
the Jacobian regularizer.

    exact                   sum_i d f_i / d z_i, one vector-Jacobian product per dimension
    hutchinson-gaussian     eps^T (df/dz) eps, eps ~ N(0, I)       (one vector-Jacobian product)
    hutchinson-rademacher   same with eps uniform on {-1, +1}
    fd-gaussian             eps^T (f(z + h eps) - f(z - h eps)) / 2h  (no double backward)
    fd-rademacher

The Hutchinson noise is drawn by ``resample(z)`` (a CNF calls it at the start of every solve) and
stays fixed during the solve and its adjoint, as an unbiased estimator of a solve requires. In
multi-process training the training loop installs a noise source (``fastcnf.cnf.noise``) that draws it
for the global batch and keeps this process's rows, so a sample's noise does not depend on the
number of processes.
Gradients through the estimates flow to ``z`` and to the parameters of ``func`` under plain
autograd and under ``odeint_adjoint``.

Fused pass (``fused="auto"``, the default of the exact and Hutchinson estimators): a network that
describes itself at time t as an MLP of affine layers, ``func.mlp_spec(t)`` (``fastcnf.cnf.nets.ODEnet``
for every layer kind and activation), is evaluated in one structured forward-mode pass that gives f
and the trace (``fastcnf.kernels.tangent_mlp``: D unit probes for the exact trace, the noise for
Hutchinson's) with a hand-derived backward, so the vector-Jacobian products of a backward pass or an
adjoint solve do not differentiate an autograd graph twice. On CUDA with the Triton backend
Hutchinson's estimate runs in the fused Triton kernel ``fastcnf.kernels.hutchinson`` where its
``supports(spec, device)`` holds (``fused_kernel``). Under ``odeint_adjoint`` a backward step of an
``ODEnet`` is one function without autograd (``odenet_vector_jacobian``, reached through
``vector_jacobian`` and ``fastcnf.cnf.flow.CNFDynamics.adjoint_vjp``): the fold of the parameters and t
into layer weights, the pass, its reverse recurrence and the fold's backward, all by hand. Backprop
through a solve sees an ``ODEnet``'s evaluation as one graph node (``OdenetPass``: the fold and the pass
forward, ``odenet_backward`` back), and a CNF's solve looks the net's parameters up once (``solve_scope``).
With ``compile=True`` these functions and the forward pass of solves without gradients (``odenet_values``)
run compiled by ``torch.compile`` (``fastcnf.cnf.compiled``). Any other network, and ``fused=False``,
takes the autograd path above, which stays the reference the fused pass is tested against. The fused
pass evaluates tanh as 2 sigmoid(2x) - 1 and folds the time into the weights, so its values agree
with the autograd path to rounding, not bit for bit.
"""

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch.autograd.function import once_differentiable

from ..kernels import tangent_mlp
from ..ode.backend import select_backend
from .compiled import CompiledPass
from .nets import ODEnet, fold_layers, unfold_layers
from .noise import NOISES, estimator_noise

__all__ = ["DivergenceEstimate", "ExactDivergence", "HutchinsonDivergence", "FiniteDifferenceDivergence",
           "ESTIMATORS", "FUSED_CHOICES", "make_estimator", "fused_spec", "OdenetPass", "solve_scope"]

KERNEL_MODULE = "fastcnf.kernels.hutchinson"
FUSED_CHOICES = ("auto", True, False)
_FUSED_DTYPES = (torch.float32, torch.float64)


@dataclass
class DivergenceEstimate:
    """f(t, z) (B, *event), divergence (B,), squared Frobenius norm estimate (B,) or None."""

    f: torch.Tensor
    divergence: torch.Tensor
    frobenius: torch.Tensor = None


def _with_grad_input(z, create_graph):
    """``z`` when the estimate joins the caller's graph and ``z`` is in it, else a detached copy that requires
    grad. (Without a graph to join, ``z`` may be a view made under no_grad of a tensor that requires grad,
    as in the forward solve of odeint_adjoint from inputs that require grad: such a view says it requires
    grad but is not connected to anything, so differentiating through it would give no gradient.)"""
    return z if create_graph and z.requires_grad else z.detach().requires_grad_(True)


def _per_sample_sum(values):
    return values.reshape(values.shape[0], -1).sum(dim=1)


def _vector_jacobian(f, z, vector, create_graph, retain_graph=None):
    """vector^T df/dz, zeros where f does not depend on z."""
    if not f.requires_grad:
        return torch.zeros_like(z)
    (grad,) = torch.autograd.grad(f, z, vector, create_graph=create_graph, retain_graph=retain_graph,
                                  allow_unused=True)
    return torch.zeros_like(z) if grad is None else grad


def _finish(f, create_graph):
    return f if create_graph else f.detach()


def _set_fused_pass(estimator, fused, compile):
    """The fused pass's settings on an exact or Hutchinson estimator, with its caches of the net's parameters
    (``adjoint_inputs`` for adjoint solves, ``solve_inputs`` installed by a CNF for each solve)."""
    estimator.fused = _check_fused(fused)
    estimator.compile = _check_compile(compile)
    estimator.adjoint_inputs = _AdjointInputs()
    estimator.solve_inputs = None


def _check_fused(fused):
    if not any(fused is choice for choice in FUSED_CHOICES):
        raise ValueError(f"fused must be 'auto', True or False, got {fused!r}.")
    return fused


def _check_compile(compile):
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}.")
    return compile


def fused_spec(func, t, z):
    """``func.mlp_spec(t)`` when the fused pass can evaluate ``func`` on ``z``, else None.

    That needs a ``mlp_spec(t)`` method on ``func`` (an MLP of affine layers at time t), a (B, D)
    float32/float64 state, and weights of the state's dtype and device.
    """
    describe = getattr(func, "mlp_spec", None)
    if not callable(describe) or z.ndim != 2 or z.dtype not in _FUSED_DTYPES:
        return None
    spec = describe(t)
    if spec is None or spec.time_concat != "none":
        return None
    if any(w.dtype != z.dtype or w.device != z.device for w in spec.weights + spec.biases):
        return None
    return spec


def odenet_values(kinds, activation, params, time, z, probes):
    """``(f, trace)`` of an ``ODEnet`` (layer ``kinds``, its ``parameters()`` as ``params``) at the (1,)
    ``time`` by the fused pass: a pure function of tensors, what ``torch.compile`` fuses whole."""
    weights, biases, _ = fold_layers(kinds, params, time)
    return tangent_mlp.tangent_values(weights, biases, activation, z, probes)


def odenet_forward(kinds, activation, params, time, z, probes):
    """The fused pass of an ``ODEnet`` keeping what its vector-Jacobian product needs (``odenet_backward``):
    ``(f (B, D), trace (B,), saved)``. Call it without autograd (the fold then takes its autograd-free form)."""
    weights, biases, folded = fold_layers(kinds, params, time)
    f, trace, _, passed = tangent_mlp.tangent_forward(weights, biases, activation, z, probes, save=True)
    return f, trace, (weights, folded, passed)


def odenet_backward(kinds, activation, params, time, probes, saved, grad_f, grad_divergence):
    """The vector-Jacobian product of ``odenet_forward``'s (f, trace) with (grad_f (B, D), grad_divergence
    (B,)) by hand: the pass's reverse recurrence and the fold's backward. ``(grad_z, [gradient of each of
    params], grad_time (1,))``."""
    weights, folded, passed = saved
    grad_z, _, grad_weights, grad_biases = tangent_mlp.tangent_backward(passed, weights, activation, probes, grad_f,
                                                                        grad_divergence)
    grad_params, grad_time = unfold_layers(kinds, params, time, folded, grad_weights, grad_biases)
    return grad_z, grad_params, grad_time


def odenet_vector_jacobian(kinds, activation, params, time, z, probes, grad_f, grad_divergence):
    """``odenet_forward`` and ``odenet_backward`` in one call, without autograd: ``(f, trace, grad_z,
    grad_params (P,), grad_time (1,))`` (one flat parameter gradient the adjoint state takes whole). A pure
    function of tensors."""
    f, trace, saved = odenet_forward(kinds, activation, params, time, z, probes)
    grad_z, grad_params, grad_time = odenet_backward(kinds, activation, params, time, probes, saved, grad_f,
                                                     grad_divergence)
    return f, trace, grad_z, _concatenate(grad_params), grad_time


def _concatenate(tensors):
    """The tensors flattened and concatenated, (P,)."""
    return torch.cat([tensor.reshape(-1) for tensor in tensors])


def _split(flat, shapes):
    """The inverse of ``_concatenate``: views of ``flat`` of the given shapes."""
    views, start = [], 0
    for shape in shapes:
        views.append(flat[start:start + shape.numel()].view(shape))
        start += shape.numel()
    return views


def odenet_forward_flat(kinds, activation, shapes, flat_params, time, z, probes):
    """``odenet_forward`` with the parameters as one (P,) tensor of the given ``shapes``."""
    return odenet_forward(kinds, activation, _split(flat_params, shapes), time, z, probes)


def odenet_backward_flat(kinds, activation, shapes, flat_params, time, probes, saved, grad_f, grad_divergence):
    """``odenet_backward`` with the parameters and their gradient as one (P,) tensor:
    ``(grad_z, grad_params (P,), grad_time (1,))``."""
    grad_z, grad_params, grad_time = odenet_backward(kinds, activation, _split(flat_params, shapes), time, probes,
                                                     saved, grad_f, grad_divergence)
    return grad_z, _concatenate(grad_params), grad_time


COMPILED_VALUES = CompiledPass(odenet_values)
COMPILED_VJP = CompiledPass(odenet_vector_jacobian)
COMPILED_FORWARD = CompiledPass(odenet_forward_flat)
COMPILED_BACKWARD = CompiledPass(odenet_backward_flat)


def _odenet_inputs(func, z):
    """The parameters of ``func`` when it is an ``ODEnet`` the fused pass can evaluate on ``z``, else None."""
    if not isinstance(func, ODEnet) or z.ndim != 2 or z.dtype not in _FUSED_DTYPES:
        return None
    params = list(func.parameters())
    if any(p.dtype != z.dtype or p.device != z.device for p in params):
        return None
    return params


def _fused_vector_jacobian(estimator, func, t, z, probes, grad_f, grad_divergence, params):
    """The fused pass of an ``ODEnet`` and its vector-Jacobian product by hand, without autograd (what
    ``odeint_adjoint`` evaluates at every backward step; ``odenet_vector_jacobian``, compiled with
    ``estimator.compile``). Returns ``(DivergenceEstimate, grad_z (B, D), gradients of ``params``, grad_t)``
    for the cotangents ``grad_f`` (B, D) and ``grad_divergence`` (B,), or None where it does not apply
    (``fused=False``, another network, another dtype or device). The gradients of ``params`` are one flat
    (P,) tensor when ``params`` are the net's parameters in order (the usual adjoint), else a list with
    None for a parameter outside the net.
    """
    inputs = None if estimator.fused is False else estimator.adjoint_inputs.get(func, z, params)
    if inputs is None:
        return None
    net_params, aligned = inputs
    time = t.detach().to(z.dtype).reshape(1)
    vjp = COMPILED_VJP if estimator.compile else odenet_vector_jacobian
    with torch.no_grad():  # the fold takes its autograd-free form (fold_layers)
        f, trace, grad_z, grad_flat, grad_time = vjp(func.kinds, func.activation, net_params, time, z, probes,
                                                     grad_f, grad_divergence)
    if aligned:
        grad_params = grad_flat
    else:
        grads = grad_flat.split([param.numel() for param in net_params])
        by_id = {id(param): grad.view_as(param) for param, grad in zip(net_params, grads)}
        grad_params = [by_id.get(id(param)) for param in params]
    return DivergenceEstimate(f, trace), grad_z, grad_params, grad_time.reshape(())


class _AdjointInputs:
    """The parameters an adjoint solve hands the fused pass, looked up once per solve: ``odeint_adjoint``
    passes the same ``params`` tuple at every backward step, so (net, state dtype and device, ``params``)
    keep their answer for the solve; walking the net's modules at every step costs a few percent of it."""

    def __init__(self):
        self.func, self.params, self.state, self.value = None, None, None, None

    def get(self, func, z, params):
        """(the net's parameters, whether they are ``params`` in order) or None (see ``_odenet_inputs``)."""
        state = (z.ndim, z.dtype, z.device)
        if self.func is not func or self.params is not params or self.state != state:
            net_params = _odenet_inputs(func, z)
            aligned = net_params is not None and len(net_params) == len(params) and all(
                a is b for a, b in zip(net_params, params))
            self.func, self.params, self.state = func, params, state
            self.value = None if net_params is None else (net_params, aligned)
        return self.value


class OdenetPass(torch.autograd.Function):
    """The fused pass of an ``ODEnet`` as one graph node (backprop through a solve): ``apply(kinds, activation,
    compile, shapes, flat_params (P,), time (1,), z (B, D), probes (P, B, D) or None)`` -> (f, trace), with the
    net's parameters concatenated in ``flat_params`` (``shapes`` theirs) and ``odenet_backward`` as its backward
    (both compiled with ``compile``). Gradients reach ``flat_params``, ``time`` and ``z``, not the probes."""

    @staticmethod
    def forward(ctx, kinds, activation, compile, shapes, flat_params, time, z, probes):
        forward = COMPILED_FORWARD if compile else odenet_forward_flat
        f, trace, saved = forward(kinds, activation, shapes, flat_params, time, z, probes)
        ctx.pass_settings, ctx.pass_saved = (kinds, activation, compile, shapes), saved
        ctx.save_for_backward(flat_params, time, probes)
        return f, trace

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f, grad_divergence):
        kinds, activation, compile, shapes = ctx.pass_settings
        flat_params, time, probes = ctx.saved_tensors
        backward = COMPILED_BACKWARD if compile else odenet_backward_flat
        grad_z, grad_params, grad_time = backward(kinds, activation, shapes, flat_params, time, probes,
                                                  ctx.pass_saved, grad_f, grad_divergence)
        return None, None, None, None, grad_params, grad_time, grad_z, None


class _SolveInputs:
    """The parameters of the net a CNF solve evaluates, looked up at its first evaluation and shared by the
    others, and (under autograd) their concatenation for ``OdenetPass``, made once: one graph node then joins
    all of a backprop solve's evaluations to the parameters, which receive one gradient each instead of one per
    evaluation. A CNF installs one on its estimator for the duration of each solve (``solve_scope``),
    so nothing is kept from one solve to the next."""

    def __init__(self):
        self.func = self.state = self.params = self.flat = None

    def get(self, func, z):
        """The net's parameters (see ``_odenet_inputs``), or None."""
        state = (z.ndim, z.dtype, z.device, torch.is_grad_enabled())
        if self.func is not func or self.state != state:
            self.func, self.state, self.params, self.flat = func, state, _odenet_inputs(func, z), None
        return self.params

    def concatenated(self):
        """The parameters of the last ``get`` concatenated, (P,)."""
        if self.flat is None:
            self.flat = _concatenate(self.params)
        return self.flat


def _odenet_estimate(estimator, func, t, z, probes, frobenius):
    """The estimate of an ``ODEnet`` by the fused pass (compiled with ``estimator.compile``): ``odenet_values``
    where no gradient flows through it, else one ``OdenetPass`` node. None where it does not apply (another
    network, ``fused=False``, another dtype or device, a Frobenius norm, probes that require grad)."""
    if estimator.fused is False or frobenius or (probes is not None and probes.requires_grad):
        return None
    shared = estimator.solve_inputs
    params = _odenet_inputs(func, z) if shared is None else shared.get(func, z)
    if params is None:
        return None
    time = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(1)
    if torch.is_grad_enabled() and (time.requires_grad or z.requires_grad or any(p.requires_grad for p in params)):
        flat = _concatenate(params) if shared is None else shared.concatenated()
        shapes = tuple(param.shape for param in params)
        return DivergenceEstimate(*OdenetPass.apply(func.kinds, func.activation, estimator.compile, shapes, flat,
                                                    time, z, probes))
    values = COMPILED_VALUES if estimator.compile else odenet_values
    return DivergenceEstimate(*values(func.kinds, func.activation, params, time, z, probes))


def _required_spec(estimator, func, t, z):
    """The fused spec of ``func`` (None when the estimator's ``fused`` is False); ``fused=True`` insists."""
    if estimator.fused is False:
        return None
    spec = fused_spec(func, t, z)
    if spec is None and estimator.fused is True:
        raise ValueError(f"{type(estimator).__name__}(fused=True) needs a network with mlp_spec(t) (fastcnf.cnf.nets."
                         f"ODEnet) and a (B, D) float32/float64 state of its dtype and device; got "
                         f"{type(func).__name__} on a {z.dtype} state of shape {tuple(z.shape)}.")
    return spec


class _NoiseEstimator:
    """Base of the stochastic estimators: holds the noise fixed between ``resample`` calls."""

    stochastic = True

    def __init__(self, noise="gaussian"):
        if noise not in NOISES:
            raise ValueError(f"unknown noise {noise!r}; choose one of {', '.join(NOISES)}.")
        self.noise_kind = noise
        self.noise = None

    def resample(self, z):
        """Draw fresh noise shaped like ``z`` (B, *event); it is used until the next call."""
        self.noise = estimator_noise(self.noise_kind, z.detach())

    def _current_noise(self, z):
        if self.noise is None or self.noise.shape != z.shape:
            got = None if self.noise is None else tuple(self.noise.shape)
            raise RuntimeError(f"{type(self).__name__}: no noise for a state of shape {tuple(z.shape)} (have {got}); "
                               "call resample(z) before the solve.")
        return self.noise.to(dtype=z.dtype, device=z.device)


class ExactDivergence:
    """tr(df/dz) by one vector-Jacobian product per event dimension (use for D up to ~10).

    Args:
        fused: ``"auto"`` (default): the fused pass for networks with ``mlp_spec(t)`` (exact trace and
            Frobenius norm from D forward-mode tangents), the autograd path otherwise; ``True``: the
            fused pass or an error; ``False``: always the autograd path.
        compile: run the fused pass of an ``ODEnet`` compiled by ``torch.compile`` (forward solves, backprop
            through them, ``odeint_adjoint``'s steps; ``fastcnf.cnf.compiled``).
    """

    stochastic = False
    name = "exact"

    def __init__(self, fused="auto", compile=False):
        _set_fused_pass(self, fused, compile)

    def resample(self, z):
        """Nothing to draw; present so every estimator can be driven the same way."""

    def __call__(self, func, t, z, frobenius=False):
        estimate = _odenet_estimate(self, func, t, z, None, frobenius)
        if estimate is not None:
            return estimate
        spec = _required_spec(self, func, t, z)
        if spec is not None:
            return DivergenceEstimate(*tangent_mlp.tangent_mlp(spec.weights, spec.biases, spec.activation, z, None,
                                                               frobenius))
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            z_in = _with_grad_input(z, create_graph)
            f = func(t, z_in)
            flat_f = f.reshape(f.shape[0], -1)
            size = flat_f.shape[1]
            divergence = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
            squares = torch.zeros_like(divergence) if frobenius else None
            for i in range(size):
                row = _vector_jacobian(flat_f[:, i].sum(), z_in, None, create_graph,
                                       retain_graph=True if i < size - 1 else create_graph)
                row = row.reshape(row.shape[0], -1)
                divergence = divergence + row[:, i]
                if frobenius:
                    squares = squares + row.pow(2).sum(dim=1)
        return DivergenceEstimate(_finish(f, create_graph), divergence, squares)

    def vector_jacobian(self, func, t, z, grad_f, grad_divergence, params):
        """The estimate at (t, z) and the vector-Jacobian product of (f, divergence) with (grad_f,
        grad_divergence) for z, ``params`` and t by the fused pass, or None (see ``_fused_vector_jacobian``)."""
        return _fused_vector_jacobian(self, func, t, z, None, grad_f, grad_divergence, params)


class HutchinsonDivergence(_NoiseEstimator):
    """eps^T (df/dz) eps with eps fixed per solve; Frobenius estimate |eps^T df/dz|^2.

    Args:
        noise: ``"gaussian"`` or ``"rademacher"``.
        fused: ``"auto"`` (default): the fused pass for networks with ``mlp_spec(t)``, the autograd
            path otherwise; ``True``: the fused pass or an error; ``False``: always the autograd
            path. A Frobenius estimate always takes the autograd path (the fused pass would give
            |(df/dz) eps|^2, a different estimator of the same norm).
        fused_kernel: where the fused pass runs in the Triton kernel ``fastcnf.kernels.hutchinson``:
            ``None`` (default) on CUDA tensors only, ``True`` wherever the kernel supports the
            device, ``False`` never (the torch pass ``fastcnf.kernels.tangent_mlp`` runs instead).
        compile: as ``ExactDivergence``'s, for the torch pass.
    """

    def __init__(self, noise="gaussian", fused="auto", fused_kernel=None, compile=False):
        super().__init__(noise)
        if fused_kernel not in (None, True, False):
            raise ValueError(f"fused_kernel must be None, True or False, got {fused_kernel!r}.")
        _set_fused_pass(self, fused, compile)
        self.fused_kernel = fused_kernel
        self.name = f"hutchinson-{noise}"

    def __call__(self, func, t, z, frobenius=False):
        eps = self._current_noise(z)
        estimate = None if self._wants_kernel(z) else _odenet_estimate(self, func, t, z, eps[None], frobenius)
        if estimate is not None:
            return estimate
        spec = None if frobenius else _required_spec(self, func, t, z)
        if spec is not None:
            kernel = self._kernel(spec, z)
            if kernel is not None:
                return DivergenceEstimate(*kernel.hutchinson_mlp(spec, 0.0, z, eps))
            return DivergenceEstimate(*tangent_mlp.tangent_mlp(spec.weights, spec.biases, spec.activation, z,
                                                               eps[None]))
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            z_in = _with_grad_input(z, create_graph)
            f = func(t, z_in)
            eps_jac = _vector_jacobian(f, z_in, eps, create_graph)
        divergence = _per_sample_sum(eps_jac * eps)
        squares = _per_sample_sum(eps_jac.pow(2)) if frobenius else None
        return DivergenceEstimate(_finish(f, create_graph), divergence, squares)

    def vector_jacobian(self, func, t, z, grad_f, grad_divergence, params):
        """As ``ExactDivergence.vector_jacobian`` with the current noise as the probe; None where the
        Triton kernel evaluates the estimate (it has its own backward)."""
        if self._wants_kernel(z):
            return None
        return _fused_vector_jacobian(self, func, t, z, self._current_noise(z)[None], grad_f, grad_divergence,
                                      params)

    def _wants_kernel(self, z):
        """Whether the Triton kernel is asked for on ``z``'s device (``fused_kernel``)."""
        return self.fused_kernel is True or (self.fused_kernel is None and z.device.type == "cuda")

    def _kernel(self, spec, z):
        """The Triton kernel module when it should evaluate ``spec`` on ``z``, else None."""
        if not self._wants_kernel(z):
            return None
        if select_backend(z.device) != "triton":
            return None
        kernel = load_kernel()
        if kernel is None or not kernel.supports(spec, z.device):
            return None
        return kernel


def load_kernel():
    """The fused Hutchinson kernel module, or None where it is not installed."""
    try:
        return importlib.import_module(KERNEL_MODULE)
    except ImportError:
        return None


class FiniteDifferenceDivergence(_NoiseEstimator):
    """eps^T (f(z + h eps) - f(z - h eps)) / (2h): three evaluations, first-order autograd only.

    The Frobenius estimate is |(f(z + h eps) - f(z - h eps)) / 2h|^2 = |(df/dz) eps|^2, which
    has the same expectation as |eps^T df/dz|^2.

    Args:
        noise: ``"gaussian"`` or ``"rademacher"``.
        step: difference step h; default eps_mach^(1/3) of the state dtype (central differences).
    """

    def __init__(self, noise="gaussian", step=None):
        super().__init__(noise)
        if step is not None and not step > 0:
            raise ValueError(f"step must be positive, got {step!r}.")
        self.step = step
        self.name = f"fd-{noise}"

    def __call__(self, func, t, z, frobenius=False):
        eps = self._current_noise(z)
        h = self.step if self.step is not None else torch.finfo(z.dtype).eps ** (1.0 / 3.0)
        f = func(t, z)
        directional = (func(t, z + h * eps) - func(t, z - h * eps)) / (2.0 * h)
        divergence = _per_sample_sum(directional * eps)
        squares = _per_sample_sum(directional.pow(2)) if frobenius else None
        return DivergenceEstimate(f, divergence, squares)


@contextmanager
def solve_scope(estimator):
    """Within it, the evaluations of ``estimator`` look the net's parameters up once and share them (one
    ``_SolveInputs``); for one solve, whose parameters do not change while it runs. Estimators without a
    fused pass are left alone."""
    if not hasattr(estimator, "solve_inputs"):
        yield
        return
    estimator.solve_inputs = _SolveInputs()
    try:
        yield
    finally:
        estimator.solve_inputs = None


ESTIMATORS = {
    "exact": ExactDivergence,
    "hutchinson-gaussian": partial(HutchinsonDivergence, "gaussian"),
    "hutchinson-rademacher": partial(HutchinsonDivergence, "rademacher"),
    "fd-gaussian": partial(FiniteDifferenceDivergence, "gaussian"),
    "fd-rademacher": partial(FiniteDifferenceDivergence, "rademacher"),
}


def make_estimator(name, **kwargs):
    """The estimator registered as ``name`` (see ``ESTIMATORS``), built with ``kwargs``."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown divergence estimator {name!r}; choose one of {', '.join(ESTIMATORS)}.")
    return ESTIMATORS[name](**kwargs)
