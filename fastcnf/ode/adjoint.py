"""``odeint_adjoint``: gradients by solving the adjoint ODE backwards (memory independent of steps).

The forward solve runs without autograd and keeps only the outputs. The backward pass solves,
interval by interval from the last output time to the first, the augmented system

    s = [a_t, y, a_y, a_theta],   ds/dt = [-a_y . df/dt, f, -a_y^T df/dy, -a_y^T df/dtheta]

as ONE flat vector, so the backward solver runs on the same fast path as the forward one and its
default norm (torchdiffeq's: max of |a_t| and the RMS norms of y, a_y and each parameter; or the
seminorm that leaves the parameters out) is a ``SegmentNorm`` evaluated by the fused controller.

Time gradients at no extra cost (TO-FLOW): dL/dt_i = grad_y(t_i) . f(t_i, y(t_i)). torchdiffeq
evaluates f(t_i, y_i) once more per output time; here the backward solve of the interval ending at
t_i starts by evaluating the augmented dynamics at (t_i, s_i) anyway, and the y-part of that
evaluation is f(t_i, y_i). fastcnf keeps the y-part of the solver's first evaluation and reads
dL/dt_i off it, so the backward pass evaluates ``func`` exactly where the solver does: with a
fixed grid's ``perturb=True`` that first evaluation is just inside the interval (f's left limit
at t_i, the one y(t_i) was reached with), never on the grid point. Since nothing depends on a_t,
the dL/dt_i enter a_t after the solves, so asking for time gradients changes neither the steps nor
the number of evaluations.
"""

import warnings

import torch
import torch.nn as nn

from ..errors import InvalidOptionError, InvalidToleranceError
from ..stats import backward_phase
from .dynamics import CALLBACK_NAMES, Perturb, StateLayout, nudge
from .norms import SegmentNorm, mixed_norm
from .problem import flip_time_options, prepare, resolve_norm
from .registry import METHODS, check_method, check_options

__all__ = ["odeint_adjoint", "find_parameters"]

# Options describing the layout of the forward state; they do not carry over to the augmented one.
FORWARD_STATE_OPTIONS = ("norm", "jacobian_structure")


def odeint_adjoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
                   adjoint_rtol=None, adjoint_atol=None, adjoint_method=None, adjoint_options=None,
                   adjoint_params=None):
    """Like ``odeint``, with gradients computed by the adjoint method.

    Same signature and semantics as torchdiffeq's ``odeint_adjoint``. ``adjoint_*`` arguments
    configure the backward solve and default to their forward counterparts (``adjoint_options``
    defaults to ``options`` without ``norm``). ``adjoint_options=dict(norm="seminorm")`` leaves the
    parameter adjoints out of the backward error control. ``adjoint_params`` defaults to
    ``func.parameters()``; parameters that do not affect the output get zero gradients.

    With several output times the adjoint is solved interval by interval (its state jumps by
    the loss gradient at each output). fastcnf starts each interval with the step size the
    previous one ended with (``adjoint_options=dict(carry_step_size=False)`` restarts the step
    size selection per interval, exactly as torchdiffeq does).
    """
    if adjoint_params is None and not isinstance(func, nn.Module):
        raise ValueError("func must be an instance of nn.Module to specify the adjoint parameters; alternatively "
                         "they can be specified explicitly via the `adjoint_params` argument. If there are no "
                         "parameters then it is allowable to set `adjoint_params=()`.")
    adjoint_rtol = rtol if adjoint_rtol is None else adjoint_rtol
    adjoint_atol = atol if adjoint_atol is None else adjoint_atol
    adjoint_method = method if adjoint_method is None else adjoint_method
    if adjoint_method != method and options is not None and adjoint_options is None:
        raise ValueError("If `adjoint_method != method` then we cannot infer `adjoint_options` from `options`. So as "
                         "`options` has been passed then `adjoint_options` must be passed as well.")
    if adjoint_options is None:
        # the forward options without those that describe the forward state itself
        adjoint_options = {k: v for k, v in options.items() if k not in FORWARD_STATE_OPTIONS} if options else {}
    else:
        adjoint_options = dict(adjoint_options)

    params = tuple(find_parameters(func)) if adjoint_params is None else tuple(adjoint_params)
    trainable = tuple(p for p in params if p.requires_grad)
    if len(trainable) != len(params) and callable(adjoint_options.get("norm")):
        warnings.warn("An adjoint parameter was passed without requiring gradient. For efficiency this will be "
                      "excluded from the adjoint pass, and will not appear as a tensor in the adjoint norm.")

    problem = prepare(func, y0, t, rtol, atol, method, options, event_fn)
    backward = _BackwardConfig(problem, trainable, func, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options)
    result = _AdjointSolve.apply(problem, backward, problem.y0, problem.t, *trainable)
    if event_fn is None:
        return problem.unflatten_solution(result)
    event_t, solution = result
    event_t = event_t.to(problem.t)
    if problem.reverse:
        event_t = -event_t
    return event_t, problem.unflatten_solution(problem.event_solution_dtype(solution))


def find_parameters(module):
    """Parameters of ``module`` (also inside a DataParallel replica, where they are plain tensors)."""
    if getattr(module, "_is_replica", False):
        def tensor_attributes(mod):
            return [(k, v) for k, v in mod.__dict__.items() if torch.is_tensor(v) and v.requires_grad]

        return [param for _, param in module._named_members(get_members_fn=tensor_attributes)]
    return list(module.parameters())


class _BackwardConfig:
    """Everything the backward solve needs: method, tolerances, options and the adjoint norm."""

    def __init__(self, problem, params, func, rtol, atol, method, options):
        self.method = check_method(method)
        self.rtol = _scalar_tolerance("adjoint_rtol", rtol)
        self.atol = _scalar_tolerance("adjoint_atol", atol)
        user_norm = options.pop("norm", None)
        self.carry_step_size = options.pop("carry_step_size", True)
        if not isinstance(self.carry_step_size, bool):
            raise InvalidOptionError(f"adjoint option 'carry_step_size' must be True or False, got "
                                     f"{self.carry_step_size!r}.")
        self.carry_step_size = self.carry_step_size and METHODS[self.method].adaptive
        self.options = check_options(self.method, options)
        if not problem.reverse:  # options are in user time; the backward solve runs in tau = -t_internal
            flip_time_options(self.options)
        self.params = params
        self.callbacks = {name: getattr(func, name + "_adjoint", None) for name in CALLBACK_NAMES}
        numel = problem.y0.numel()
        self.sizes = (1, numel, numel) + tuple(p.numel() for p in params)
        self.norm = _adjoint_norm(user_norm, problem, params, self.sizes)
        if "norm" in METHODS[self.method].options:
            self.options["norm"] = self.norm


def _scalar_tolerance(name, value):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise InvalidOptionError(f"{name} must be a scalar for the adjoint solve; pass it explicitly.")
        value = value.item()
    if isinstance(value, (tuple, list)):
        raise InvalidOptionError(f"{name} must be a scalar for the adjoint solve; pass it explicitly.")
    if not float(value) >= 0:
        raise InvalidToleranceError(f"{name} must be a non-negative number, got {value!r}.")
    return float(value)


def _adjoint_norm(user_norm, problem, params, sizes):
    """torchdiffeq's adjoint norm (or seminorm, or the user's) on the flat augmented state."""
    forward_norm = problem.options.get("norm", resolve_norm(None, problem.layout))
    seminorm = user_norm == "seminorm"
    if user_norm is None or seminorm:
        if isinstance(forward_norm, SegmentNorm):
            state_ends = forward_norm.ends
            part_sizes = [b - a for a, b in zip((0,) + state_ends[:-1], state_ends)]
            segment_sizes = [1] + part_sizes + part_sizes + [p.numel() for p in params]
            skip = [False] * (1 + 2 * len(part_sizes)) + [seminorm] * len(params)
            return SegmentNorm.from_sizes(segment_sizes, skip)
        return _CompositeAdjointNorm(forward_norm, sizes, include_params=not seminorm)
    if not callable(user_norm):
        raise InvalidOptionError(f"adjoint_options['norm'] must be 'seminorm' or callable, got {user_norm!r}.")
    return _UserAdjointNorm(user_norm, problem.layout, sizes, params)


def _split(flat, sizes):
    return torch.split(flat, list(sizes))


class _CompositeAdjointNorm:
    """max(|a_t|, norm(y), norm(a_y), mixed norm of the parameter adjoints) for a custom forward norm."""

    def __init__(self, state_norm, sizes, include_params):
        self.state_norm, self.sizes, self.include_params = state_norm, sizes, include_params

    def __call__(self, flat):
        adj_t, y, adj_y, *adj_params = _split(flat, self.sizes)
        value = max(adj_t.abs().max(), self.state_norm(y), self.state_norm(adj_y))
        if self.include_params:
            value = max(value, mixed_norm(adj_params))
        return value


class _UserAdjointNorm:
    """A user adjoint norm receiving (a_t, y, a_y, *a_params) in the user's layout, like torchdiffeq."""

    def __init__(self, norm, layout, sizes, params):
        self.norm, self.layout, self.sizes = norm, layout, sizes
        self.param_shapes = [p.shape for p in params]

    def __call__(self, flat):
        adj_t, y, adj_y, *adj_params = _split(flat, self.sizes)
        adj_params = [a.view(shape) for a, shape in zip(adj_params, self.param_shapes)]
        if self.layout.is_tuple:
            return self.norm((adj_t.reshape(()), *self.layout.unflatten(y), *self.layout.unflatten(adj_y),
                              *adj_params))
        return self.norm((adj_t.reshape(()), self.layout.unflatten(y), self.layout.unflatten(adj_y), *adj_params))


class AugmentedDynamics:
    """The adjoint system on a flat state, in the backward solve's own increasing time tau = -t.

    Quacks like ``fastcnf.ode.dynamics.Dynamics`` for the solvers. After ``watch_first(tau)`` the next
    evaluation, if it is made at ``tau`` (perturbed or not), keeps its y-part f(t, y) in ``first_f``.
    An evaluation takes the function's own vector-Jacobian product where it supplies one
    (``adjoint_vjp``, see ``fastcnf.ode.dynamics``), else differentiates f(t, y) with autograd.
    """

    reverse = True
    transformable = False  # evaluating it calls torch.autograd.grad: no torch.func transforms

    def __init__(self, dynamics, params, numel, callbacks, sizes):
        self.dynamics = dynamics
        self.sizes = sizes
        self.layout = StateLayout(torch.empty(sum(sizes), device="meta"))
        self.params = params
        self.params_numel = sum(sizes[3:])
        self.numel = numel
        self.callbacks = callbacks
        self.real_dtype = dynamics.real_dtype
        self._watched = None
        self.first_f = None

    @property
    def nfe(self):
        return self.dynamics.nfe

    @nfe.setter
    def nfe(self, value):
        self.dynamics.nfe = value

    def watch_first(self, tau):
        """Keep f(t, y) of the next evaluation in ``first_f`` if that evaluation is at ``tau``."""
        self._watched, self.first_f = float(tau), None

    def __call__(self, tau, state, perturb=Perturb.NONE):
        watched, self._watched = self._watched, None
        keep = watched is not None and float(tau) == watched
        if perturb:
            tau = nudge(float(tau), 1 if perturb == Perturb.NEXT else -1, self.real_dtype)
        t = -float(tau)
        n = self.numel
        y, adj_y = state[1:1 + n], state[1 + n:1 + 2 * n]
        # a_t is integrated whether or not t needs a gradient: torchdiffeq does the same (its
        # t_requires_grad switch has no effect), and a_t takes part in the step-size control,
        # so this keeps the backward steps identical to torchdiffeq's.
        # d/dtau (a_t, y, a_y, a_p) = (a_y^T df/dt, -f, a_y^T df/dy, a_y^T df/dp): the products are taken with
        # a_y itself, so that only f, not the whole augmented vector, is negated
        direct = self.dynamics.vector_jacobian(t, y, adj_y, self.params)
        if direct is None:
            f, vjp_y, vjp_params, vjp_t = self._autograd_vjp(t, y, adj_y)
        else:
            f, vjp_y, vjp_params, vjp_t = direct
        if keep:
            self.first_f = f
        if isinstance(vjp_params, torch.Tensor):  # already flat, in the order of self.params
            if vjp_params.shape != (self.params_numel,):
                raise ValueError(f"adjoint_vjp returned a flat parameter gradient of shape {tuple(vjp_params.shape)}; "
                                 f"the parameters have {self.params_numel} elements.")
            vjp_params = [vjp_params.to(state.dtype)]
        else:
            vjp_params = [_zero_if_none(g, p).reshape(-1).to(state.dtype) for g, p in zip(vjp_params, self.params)]
        vjp_t = state.new_zeros(1) if vjp_t is None else vjp_t.to(state.dtype).reshape(1)
        return torch.cat([vjp_t, -f, _zero_if_none(vjp_y, y), *vjp_params])

    def _autograd_vjp(self, t, y, adj_y):
        """(f, a_y^T df/dy, [a_y^T df/dp], a_y^T df/dt) by differentiating one evaluation with autograd."""
        with torch.enable_grad():
            y_var = y.detach().requires_grad_(True)
            t_var = torch.tensor(t, dtype=torch.float64, device=y.device, requires_grad=True)
            f = self.dynamics(t_var, y_var)
            grads = torch.autograd.grad(f, (y_var,) + self.params + (t_var,), adj_y, allow_unused=True)
        return f.detach(), grads[0], grads[1:-1], grads[-1]

    def callback(self, name, tau, state, dt):
        callback = self.callbacks[name]
        if callback is not None:
            adj_t, y, adj_y, *adj_params = _split(state, self.sizes)
            layout = self.dynamics.layout
            if not layout.is_tuple:
                y, adj_y = layout.unflatten(y), layout.unflatten(adj_y)
            adj_params = [a.view_as(p) for a, p in zip(adj_params, self.params)]
            callback(torch.as_tensor(-tau, dtype=torch.float64), (adj_t.reshape(()), y, adj_y, *adj_params),
                     torch.as_tensor(dt, dtype=torch.float64))

    def has_callback(self, name):
        return self.callbacks[name] is not None


def _zero_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


class _AdjointSolve(torch.autograd.Function):
    """Forward: solve without autograd. Backward: solve the adjoint system interval by interval."""

    @staticmethod
    def forward(ctx, problem, backward, y0, t, *params):
        ctx.problem, ctx.backward = problem, backward
        ctx.event_mode = problem.event_fn is not None
        with torch.no_grad():
            solver = problem.build_solver()
            if ctx.event_mode:
                event_t, solution = solver.integrate_until_event(t[0], problem.event_fn)
                ctx.save_for_backward(t, solution, event_t, *params)
                return event_t, solution
            solution = solver.integrate(t)
        ctx.save_for_backward(t, solution, *params)
        return solution

    @staticmethod
    def backward(ctx, *grads):
        problem, config = ctx.problem, ctx.backward
        if ctx.event_mode:
            t_all, solution, event_t, *params = ctx.saved_tensors
            t = torch.cat([t_all[0].reshape(-1), event_t.reshape(-1).to(t_all)])
            grad_solution = grads[1]
        else:
            t, solution, *params = ctx.saved_tensors
            grad_solution = grads[0]
        t_requires_grad = ctx.needs_input_grad[3]
        with torch.no_grad(), backward_phase():
            adj_y0, adj_params, time_vjps = _solve_adjoint(problem, config, tuple(params), t, solution,
                                                           grad_solution, t_requires_grad)
        if ctx.event_mode and time_vjps is not None:
            time_vjps = torch.cat([time_vjps[:1], torch.zeros_like(t_all[1:])])
        return (None, None, adj_y0, time_vjps, *adj_params)


def _solve_adjoint(problem, config, params, t, solution, grad_solution, t_requires_grad):
    """Integrate the adjoint backwards over every output interval; returns dL/dy0, dL/dparams, dL/dt."""
    n = problem.y0.numel()
    dtype, device = solution.dtype, solution.device
    augmented = AugmentedDynamics(problem.dynamics, params, n, config.callbacks, config.sizes)
    method = METHODS[config.method]
    times = t.tolist()
    state = torch.cat([solution.new_zeros(1), solution[-1], grad_solution[-1],
                       *[torch.zeros(p.numel(), dtype=dtype, device=device) for p in params]])
    time_vjps = torch.zeros(len(times), dtype=t.dtype, device=t.device) if t_requires_grad else None
    step_size = None  # carried from one output interval to the next (see carry_step_size)
    for i in range(len(times) - 1, 0, -1):
        tau = torch.tensor([-times[i], -times[i - 1]], dtype=torch.float64)
        options = dict(config.options)
        if config.carry_step_size and step_size is not None:
            options["first_step"] = step_size
        solver = method.build(augmented, state, config.rtol, config.atol, options)
        augmented.watch_first(-times[i])
        state = solver.integrate(tau)[-1].clone()
        if t_requires_grad:
            # dL/dt_i from the evaluation the solver started with (module docstring). It enters a_t
            # additively (nothing depends on a_t), so it is applied after the solve: the backward
            # steps are then the same whether or not t requires grad.
            f_i = augmented.first_f
            if f_i is None:  # a solver that did not start at (t_i, y_i): one evaluation more
                f_i = problem.dynamics(times[i], solution[i])
            time_vjps[i] = torch.dot(f_i, grad_solution[i])
        step_size = getattr(solver, "last_step_size", None)
        state[1:1 + n] = solution[i - 1]
        state[1 + n:1 + 2 * n] += grad_solution[i - 1]
    if t_requires_grad:
        time_vjps[0] = state[0] - time_vjps[1:].sum()
    offsets = torch.split(state, list(config.sizes))
    adj_y0 = offsets[2]
    adj_params = [a.view_as(p).to(p.dtype) for a, p in zip(offsets[3:], params)]
    return adj_y0, adj_params, time_vjps
