"""Adaptive Runge-Kutta loop that keeps every decision on the device (no host sync per step).

The host loop of ``fastcnf.ode.explicit.adaptive`` reads each decision back to the host; on a GPU
that is a synchronization per step. Here time, step size, the accepted state, the outputs and the
solve's ``Status`` are device tensors, steps are accepted or rejected with ``torch.where``, and the
host reads them only every ``check_every`` steps. Between two checks the loop runs about half the
steps estimated from the remaining distance over the current step size, so steps run after the
end (masked no-ops that still evaluate the dynamics) stay rare and the number of checks grows only
logarithmically with the number of steps.

With the Triton backend (the default on CUDA) the stage combinations run in the fused stage
kernel and the error ratio and step decision in the fused error kernel, both reading ``dt`` from
the device (``fastcnf.kernels.rk_stage``). Any other controller makes its decision on the host
(one read per step): fine on the CPU, where the loop runs in tests.

Failures (max_num_steps, step-size underflow, NaN/Inf at the minimum step) are recorded as a
``Status`` on the device and raised, naming t, at the next check. Results equal the host loop's.
"""

import math

import torch

from ..control import Decision, Status, solve_failure
from ..interpolation import quartic_weights

__all__ = ["integrate_on_device", "DEFAULT_CHECK_EVERY"]

DEFAULT_CHECK_EVERY = 16


def integrate_on_device(solver, t, check_every=DEFAULT_CHECK_EVERY):
    """Solve with ``solver`` (an ``AdaptiveRungeKutta``) at the increasing times ``t``; (len(t), N)."""
    y0, dynamics, stepper, controller = solver.y0, solver.dynamics, solver.stepper, solver.controller
    rule, device = solver.rule, y0.device
    times = t.to(device=device, dtype=torch.float64)
    outputs = y0[None].repeat(len(t), 1)  # row 0 is y0; the others are overwritten when reached
    if len(t) == 1:
        return outputs
    if not torch.is_grad_enabled():
        stepper.reuse_buffers()
    t_end = times[-1]
    t0 = times[0]
    f0 = dynamics(t0, y0)
    if solver.first_step is None:
        dt = controller.initial_step(dynamics, float(times[0].detach()), y0, f0)
    else:
        dt = solver.first_step
    dt = torch.tensor(dt, dtype=torch.float64, device=device)
    status = torch.full((), int(Status.OK), dtype=torch.int64, device=device)
    last_ratio = torch.ones((), dtype=torch.float64, device=device)  # of the last accepted step (PI control)
    since_output = torch.zeros((), dtype=torch.int64, device=device)
    b_mid = solver.tableau.b_mid
    steps_until_check, buffer = 1, 0
    accepted = rejected = 0
    solver.host_checks = 0
    while True:
        for _ in range(steps_until_check):
            active = (t0 < t_end) & (status == Status.OK)
            dt = torch.where(torch.isfinite(dt), dt, torch.full_like(dt, rule.min_step))
            dt = torch.clamp(dt, min=rule.min_step, max=rule.max_step)
            t1 = t0 + dt
            underflow = active & ~(t1 > t0)
            buffer = 1 - buffer
            y1, stages, last_stage = stepper.step(t0, y0, f0, dt, t1, buffer=buffer)
            with torch.no_grad():  # step-size decisions carry no gradient, as in the host loop
                decision = _decide(controller, y0, y1, stages, dt, last_ratio)
            judged = active & ~underflow
            failed_nonfinite = judged & (decision.status == Status.FAILED_NONFINITE)
            accept = decision.accept & judged

            # outputs inside the accepted step [t0, t1]
            inside = accept & (times > t0) & (times <= t1)
            x = ((times - t0) / dt).clamp(0, 1).to(y0.dtype)
            w, v = quartic_weights(x, b_mid)
            v = torch.stack(v, dim=-1)  # (T, S)
            values = y0 + w[:, None] * (y1 - y0) + dt.to(y0.dtype) * (v @ stages)
            outputs = torch.where(inside[:, None], values, outputs)

            since_output = torch.where(inside.any(), torch.zeros_like(since_output), since_output + active.long())
            status = torch.where(underflow, torch.full_like(status, Status.FAILED_UNDERFLOW), status)
            status = torch.where(failed_nonfinite, torch.full_like(status, Status.FAILED_NONFINITE), status)
            status = torch.where(active & (since_output >= solver.max_num_steps),
                                 torch.full_like(status, Status.FAILED_MAX_STEPS), status)
            y0 = torch.where(accept, y1, y0)
            f0 = torch.where(accept, last_stage, f0)
            t0 = torch.where(accept, t1, t0)
            dt = torch.where(active, decision.dt_next, dt)
            last_ratio = torch.where(accept, decision.last_ratio, last_ratio)
            accepted = accepted + accept.long()
            rejected = rejected + (active & ~accept).long()
        t_now, dt_now, code, end = torch.stack([t0, dt, status.to(torch.float64), t_end]).tolist()
        solver.host_checks += 1
        if code != Status.OK:
            user_t = -t_now if dynamics.reverse else t_now
            raise solve_failure(Status(int(code)), user_t, dt_now, solver.max_num_steps)
        if t_now >= end:
            break
        # Run about half the estimated remaining steps before the next check: step sizes usually
        # grow, and every step past the end is an evaluation of the dynamics thrown away.
        remaining = (end - t_now) / dt_now if dt_now > 0 else 1.0
        steps_until_check = int(min(check_every, max(1, math.ceil(remaining / 2))))
    solver.accepted, solver.rejected = int(accepted), int(rejected)
    solver.last_step_size = dt_now
    return outputs


def _decide(controller, y0, y1, stages, dt, last_ratio):
    """The controller's decision as device tensors (host controllers decide on float dt and last_ratio)."""
    if controller.on_device:
        return controller.adapt(y0, y1, stages, dt, last_ratio)
    accept, dt_next, ratio, status, last = controller.adapt(y0, y1, stages, float(dt), float(last_ratio))
    device = dt.device
    return Decision(torch.tensor(accept, device=device), torch.tensor(dt_next, dtype=torch.float64, device=device),
                    torch.tensor(ratio, dtype=torch.float64, device=device),
                    torch.tensor(int(status), dtype=torch.int64, device=device),
                    torch.tensor(last, dtype=torch.float64, device=device))
