"""Adaptive Runge-Kutta loop that keeps every decision on the device (no host sync per step).

The host loop of ``rk_adaptive`` reads the error ratio back (``float(...)``) to decide each
step; on a GPU that is a synchronization per step. Here time, step size, the accepted state,
the outputs and the finished/failed flags are device tensors, steps are accepted or rejected
with ``torch.where``, and the host reads the flags only every ``check_every`` steps. Between two
checks the loop runs about half the steps estimated from the remaining distance over the
current step size, so steps run after the end (masked no-ops that still evaluate the dynamics)
stay rare and the number of checks grows only logarithmically with the number of steps.

Failures (max_num_steps, step-size underflow, NaN/Inf at the minimum step) are recorded as a
status on the device and raised, naming t, at the next check. Results equal the host loop's.
"""

import math

import torch

from .errors import MaxNumStepsError, NonFiniteStateError, StepSizeUnderflowError
from .initial_step import initial_step_size
from .interp import quartic_weights

__all__ = ["integrate_on_device", "DEFAULT_CHECK_EVERY", "device_controller"]

DEFAULT_CHECK_EVERY = 16

RUNNING, FAILED_NONFINITE, FAILED_UNDERFLOW, FAILED_MAX_STEPS = 0, 1, 2, 3


def device_controller(ratio, dt, order, safety, ifactor, dfactor, min_step, max_step):
    """Tensor version of ``controller.propose_step``: ``(accept, dt_next, nonfinite)``, all 0-dim tensors."""
    finite = torch.isfinite(ratio)
    small = dt <= min_step
    accept = ((ratio <= 1) & finite & ~(dt > max_step)) | small
    shrink = torch.where(ratio < 1, torch.ones_like(dt), torch.full_like(dt, dfactor))
    factor = torch.clamp(safety / ratio.to(dt.dtype).pow(1.0 / order), max=ifactor)
    factor = torch.maximum(factor, shrink)
    factor = torch.where(ratio == 0, torch.full_like(dt, ifactor), factor)
    factor = torch.where(finite, factor, torch.full_like(dt, dfactor))
    dt_next = torch.clamp(dt * factor, min=min_step, max=max_step)
    return accept, dt_next, ~finite


def integrate_on_device(solver, t, check_every=DEFAULT_CHECK_EVERY):
    """Solve with ``solver`` (an ``AdaptiveRungeKutta``) at the increasing times ``t``; (len(t), N)."""
    y0, dynamics, stepper, tableau = solver.y0, solver.dynamics, solver.stepper, solver.tableau
    device = y0.device
    times = t.to(device=device, dtype=torch.float64)
    outputs = y0[None].repeat(len(t), 1)  # row 0 is y0; the others are overwritten when reached
    if len(t) == 1:
        return outputs
    t_end = times[-1]
    t0 = times[0]
    f0 = dynamics(t0, y0)
    if solver.first_step is None:
        dt = initial_step_size(dynamics, float(times[0].detach()), y0, f0, tableau.order - 1, solver.rtol, solver.atol,
                               solver.norm)
    else:
        dt = solver.first_step
    dt = torch.tensor(dt, dtype=torch.float64, device=device)
    status = torch.zeros((), dtype=torch.int64, device=device)
    since_output = torch.zeros((), dtype=torch.int64, device=device)
    error_weights = solver.b_error
    b_mid = tableau.b_mid
    steps_until_check = 1
    accepted = rejected = 0
    solver.host_checks = 0
    while True:
        for _ in range(steps_until_check):
            active = (t0 < t_end) & (status == RUNNING)
            dt = torch.where(torch.isfinite(dt), dt, torch.full_like(dt, solver.min_step))
            dt = torch.clamp(dt, min=solver.min_step, max=solver.max_step)
            t1 = t0 + dt
            underflow = active & ~(t1 > t0)
            y1, stages, last_stage = stepper.step(t0, y0, f0, dt.to(y0.dtype), t1)
            with torch.no_grad():  # step-size decisions carry no gradient, as in the host loop
                error = torch.mv(stages.t(), error_weights) * dt.to(y0.dtype)
                tolerance = solver.atol + solver.rtol * torch.maximum(y0.abs(), y1.abs())
                ratio = torch.as_tensor(solver.norm(error / tolerance), device=device)
                accept, dt_next, nonfinite = device_controller(
                    ratio, dt, float(tableau.order), solver.safety, solver.ifactor, solver.dfactor, solver.min_step,
                    solver.max_step)
            accept = accept & active & ~underflow
            failed_nonfinite = active & nonfinite & (dt <= solver.min_step)
            accept = accept & ~failed_nonfinite

            # outputs inside the accepted step [t0, t1]
            inside = accept & (times > t0) & (times <= t1)
            x = ((times - t0) / dt).clamp(0, 1).to(y0.dtype)
            w, v = quartic_weights(x, b_mid)
            v = torch.stack(v, dim=-1)  # (T, S)
            values = y0 + w[:, None] * (y1 - y0) + dt.to(y0.dtype) * (v @ stages)
            outputs = torch.where(inside[:, None], values, outputs)

            since_output = torch.where(inside.any(), torch.zeros_like(since_output), since_output + active.long())
            status = torch.where(underflow, torch.full_like(status, FAILED_UNDERFLOW), status)
            status = torch.where(failed_nonfinite, torch.full_like(status, FAILED_NONFINITE), status)
            status = torch.where(active & (since_output >= solver.max_num_steps),
                                 torch.full_like(status, FAILED_MAX_STEPS), status)
            y0 = torch.where(accept, y1, y0)
            f0 = torch.where(accept, last_stage, f0)
            t0 = torch.where(accept, t1, t0)
            dt = torch.where(active, dt_next, dt)
            accepted = accepted + accept.long()
            rejected = rejected + (active & ~accept).long()
        flags = torch.stack([t0, dt, status.to(torch.float64), t_end]).tolist()
        solver.host_checks += 1
        t_now, dt_now, code, end = flags
        _raise_on_failure(int(code), t_now, dt_now, solver)
        if t_now >= end:
            break
        # Run about half the estimated remaining steps before the next check: step sizes usually
        # grow, and every step past the end is an evaluation of the dynamics thrown away.
        remaining = (end - t_now) / dt_now if dt_now > 0 else 1.0
        steps_until_check = int(min(check_every, max(1, math.ceil(remaining / 2))))
    solver.accepted, solver.rejected = int(accepted), int(rejected)
    solver.last_step_size = dt_now
    return outputs


def _raise_on_failure(code, t, dt, solver):
    user_t = -t if solver.dynamics.reverse else t
    if code == FAILED_UNDERFLOW:
        raise StepSizeUnderflowError(f"step size underflow: dt={dt!r} no longer advances t={user_t!r}.")
    if code == FAILED_NONFINITE:
        raise NonFiniteStateError(f"NaN/Inf in the state or its derivative in the step from t={user_t!r} "
                                  f"(dt={dt!r} is already at min_step).")
    if code == FAILED_MAX_STEPS:
        raise MaxNumStepsError(f"max_num_steps exceeded ({solver.max_num_steps}) at t={user_t!r}: the solver could "
                               f"not reach the next output time. Loosen rtol/atol or raise options['max_num_steps'].")
