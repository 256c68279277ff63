"""Gradients through the time of an event (used by ``odeint_event``).

The event time t* solves g(t*, y(t*)) = 0. By the implicit function theorem a change of the
final state moves t* by dt* = -(dg/dy . dy) / (dg/dt + dg/dy . f), so a loss on t* and y(t*)
sends its gradient into the final state only; odeint then carries it back to y0 and the
parameters. Same rule as torchdiffeq's ``ImplicitFnGradientRerouting``.
"""

import torch

__all__ = ["EventTimeGradient"]


class EventTimeGradient(torch.autograd.Function):
    """Identity on (event_t, state) whose backward reroutes the event-time gradient."""

    @staticmethod
    def forward(ctx, dynamics, event_fn, event_t, state):
        ctx.dynamics, ctx.event_fn = dynamics, event_fn
        ctx.save_for_backward(event_t, state)
        return event_t.detach(), state.detach()

    @staticmethod
    def backward(ctx, grad_t, grad_state):
        event_t, state = ctx.saved_tensors
        event_t = event_t.detach().clone().requires_grad_(True)
        state = state.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            f_value = ctx.dynamics(event_t, state)
            value = ctx.event_fn(event_t, state)
            dg_dt, dg_dy = torch.autograd.grad(value, (event_t, state), allow_unused=True)
        dg_dt = torch.zeros_like(event_t) if dg_dt is None else dg_dt
        dg_dy = torch.zeros_like(state) if dg_dy is None else dg_dy
        f_value = f_value.detach()
        total_dg_dt = dg_dt + torch.sum(dg_dy * f_value)
        grad_t = grad_t + torch.sum(grad_state * f_value)
        grad_state = grad_state + dg_dy * (-grad_t / (total_dg_dt + 1e-12)).reshape_as(value)
        return None, None, None, grad_state
