"""odeint_adjoint: gradients against backprop, torchdiffeq, finite differences; NFE and memory."""

import pytest
import torch
import torchdiffeq

import fastcnf


class MLPDynamics(torch.nn.Module):
    """Small time-dependent MLP with one parameter that does not affect the output."""

    def __init__(self, dim=2, hidden=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inner = torch.nn.Linear(dim + 1, hidden).double()
        self.outer = torch.nn.Linear(hidden, dim).double()
        self.unused = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))

    def forward(self, t, y):
        time = t * torch.ones_like(y[..., :1])
        return self.outer(torch.tanh(self.inner(torch.cat([y, time], -1))))


def _grads(library, func, y0, t, loss_fn, **kwargs):
    params = [y0, t] + list(func.parameters())
    for p in params:
        p.grad = None
    with fastcnf.track() as stats:
        out = library.odeint_adjoint(func, y0, t, **kwargs)
        loss_fn(out).backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    return out.detach(), grads, stats


def _loss(out):
    return (out ** 2).sum() + out[-1].sin().sum()


@pytest.mark.parametrize("method, options", [("dopri5", None), ("tsit5", None), ("rk4", {"step_size": 0.05}),
                                             ("bosh3", None), ("implicit_adams", {"step_size": 0.05})])
def test_adjoint_matches_backprop_through_odeint(method, options):
    func = MLPDynamics()
    y0 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64, requires_grad=True)
    tol = dict(rtol=1e-10, atol=1e-10)
    _, adjoint, _ = _grads(fastcnf, func, y0, t, _loss, method=method, options=options, **tol)
    for p in [y0, t] + list(func.parameters()):
        p.grad = None
    out = fastcnf.odeint(func, y0, t, method=method, options=options, **tol)
    _loss(out).backward()
    # y0 and parameter gradients: the adjoint equals backprop up to solver accuracy (both
    # approximate the exact gradient; the third-order bosh3 only to about 1e-6 here)
    accuracy = dict(rtol=1e-4, atol=1e-5) if method == "bosh3" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adjoint[0], y0.grad, **accuracy)
    for got, param in zip(adjoint[2:], func.parameters()):
        expected = torch.zeros_like(param) if param.grad is None else param.grad
        torch.testing.assert_close(got, expected, **accuracy)
    # unused parameters get zeros, not None
    names = [name for name, _ in func.named_parameters()]
    assert torch.equal(adjoint[2 + names.index("unused")], torch.zeros(3, dtype=torch.float64))


def test_adjoint_gradcheck_small_problem():
    func = MLPDynamics(hidden=4)
    y0 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.7], dtype=torch.float64, requires_grad=True)

    def solve(y0, t):
        return fastcnf.odeint_adjoint(func, y0, t, rtol=1e-11, atol=1e-11)

    assert torch.autograd.gradcheck(solve, (y0, t), atol=1e-6)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "dopri8"])
@pytest.mark.parametrize("t_requires_grad", [False, True])
def test_adjoint_matches_torchdiffeq(method, t_requires_grad):
    """Same backward steps as torchdiffeq without time gradients; with them torchdiffeq's steps
    shift (its dL/dt terms enter the error control), so agreement is to solver accuracy."""
    func = MLPDynamics()
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.2], dtype=torch.float64, requires_grad=t_requires_grad)
    tol = dict(rtol=1e-9, atol=1e-10) if t_requires_grad else dict(rtol=1e-7, atol=1e-8)
    out_a, grads_a, stats_a = _grads(torchdiffeq, func, y0, t, _loss, method=method, **tol)
    out_b, grads_b, stats_b = _grads(fastcnf, func, y0, t, _loss, method=method, **tol,
                                     adjoint_options=dict(carry_step_size=False))
    # dopri8's error estimate is at rounding level here, so its step sizes differ by rounding
    output_tolerance = 1e-6 if method == "dopri8" else 1e-9
    torch.testing.assert_close(out_b, out_a, rtol=output_tolerance, atol=output_tolerance)
    tolerance = dict(rtol=1e-5, atol=1e-7) if t_requires_grad or method == "dopri8" else dict(rtol=1e-6, atol=1e-8)
    for got, expected in zip(grads_b, grads_a):
        torch.testing.assert_close(got, expected, **tolerance)


def test_time_gradients_cost_no_extra_evaluations():
    """dL/dt comes from the evaluation the backward solve makes anyway (torchdiffeq: +1 per output time)."""
    func = MLPDynamics()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    counts = {}
    for requires_grad in (False, True):
        t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, requires_grad=requires_grad)
        _, _, stats = _grads(fastcnf, func, y0, t, _loss, rtol=1e-6, atol=1e-8, adjoint_options=dict(norm="seminorm"))
        counts[requires_grad] = stats.nfe_backward
    assert counts[True] == counts[False]


def test_carrying_the_step_size_across_output_times_saves_evaluations():
    func = MLPDynamics(hidden=16)
    y0 = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.15, 0.3, 0.45, 0.6, 0.8, 1.0], dtype=torch.float64)
    results = {}
    for carry in (False, True):
        _, grads, stats = _grads(fastcnf, func, y0, t, _loss, rtol=1e-8, atol=1e-8,
                                 adjoint_options=dict(carry_step_size=carry))
        results[carry] = grads, stats.nfe_backward
    assert results[True][1] < 0.8 * results[False][1]
    for got, expected in zip(results[True][0], results[False][0]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(fastcnf.InvalidOptionError, match="carry_step_size"):
        fastcnf.odeint_adjoint(func, y0, t, adjoint_options=dict(carry_step_size="yes"))


def test_terminal_time_gradient_matches_finite_differences():
    func = MLPDynamics()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    end = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros((), dtype=torch.float64)
    out = fastcnf.odeint_adjoint(func, y0, torch.stack([zero, end]), rtol=1e-11, atol=1e-11)
    _loss(out[-1:]).backward()
    step = 1e-5

    def loss_at(value):
        times = torch.tensor([0.0, value], dtype=torch.float64)
        return _loss(fastcnf.odeint(func, y0, times, rtol=1e-12, atol=1e-12)[-1:]).item()

    finite_difference = (loss_at(0.8 + step) - loss_at(0.8 - step)) / (2 * step)
    assert end.grad.item() == pytest.approx(finite_difference, rel=1e-6)


def test_tuple_state_reverse_time_and_seminorm_match_torchdiffeq():
    class TupleDynamics(MLPDynamics):
        def forward(self, t, state):
            a, b = state
            f = super().forward(t, torch.cat([a, b], -1)[..., :2])
            return f, (f[..., :1] * b).sin()

    func = TupleDynamics()
    a0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    b0 = torch.randn(3, 1, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.4, 0.0], dtype=torch.float64, requires_grad=True)
    results = {}
    for library in (torchdiffeq, fastcnf):
        for norm in (None, "seminorm"):
            for p in [a0, b0, t] + list(func.parameters()):
                p.grad = None
            options = dict(norm=norm) if norm else {}
            if library is fastcnf:
                options["carry_step_size"] = False
            with fastcnf.track() as stats:
                out = library.odeint_adjoint(func, (a0, b0), t, rtol=1e-7, atol=1e-8, adjoint_options=options or None)
                (out[0].pow(2).sum() + out[1].sin().sum()).backward()
            grads = [p.grad.clone() for p in [a0, b0, t]] + [
                torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in func.parameters()]
            results[library.__name__, norm] = grads, stats.nfe_backward
    for norm in (None, "seminorm"):  # t requires grad: agreement to solver accuracy
        for got, expected in zip(results["fastcnf", norm][0], results["torchdiffeq", norm][0]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # the seminorm gives the same gradients with fewer backward evaluations
    for got, expected in zip(results["fastcnf", "seminorm"][0], results["fastcnf", None][0]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert results["fastcnf", "seminorm"][1] < results["fastcnf", None][1]


def _saved_bytes(solve):
    """Bytes of the tensors autograd keeps for the backward pass while ``solve`` runs."""
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        solve()
    return total[0]


def test_adjoint_memory_does_not_grow_with_steps():
    func = MLPDynamics(hidden=32)
    y0 = torch.randn(64, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    memory = {}
    for steps in (10, 1000):
        options = dict(step_size=1.0 / steps)
        memory["adjoint", steps] = _saved_bytes(
            lambda: fastcnf.odeint_adjoint(func, y0, t, method="euler", options=options))
        memory["backprop", steps] = _saved_bytes(lambda: fastcnf.odeint(func, y0, t, method="euler", options=options))
    assert memory["adjoint", 1000] == memory["adjoint", 10]
    assert memory["backprop", 1000] > 50 * memory["backprop", 10]


def test_adjoint_requires_parameters_or_module():
    with pytest.raises(ValueError, match="adjoint_params"):
        fastcnf.odeint_adjoint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]))
    out = fastcnf.odeint_adjoint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), adjoint_params=())
    torch.testing.assert_close(out[-1], torch.full((2,), torch.exp(torch.tensor(-1.0)).item()), rtol=1e-6, atol=0)


def test_adjoint_method_without_options_is_an_error():
    func = MLPDynamics()
    with pytest.raises(ValueError, match="adjoint_options"):
        fastcnf.odeint_adjoint(func, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0]), method="rk4",
                               options=dict(step_size=0.1), adjoint_method="dopri5")


def test_adjoint_callbacks_are_called():
    class WithCallbacks(MLPDynamics):
        def __init__(self):
            super().__init__()
            self.calls = {"forward": 0, "adjoint": 0}

        def callback_step(self, t, y, dt):
            self.calls["forward"] += 1

        def callback_step_adjoint(self, t, state, dt):
            assert len(state) == 3 + len(list(self.parameters()))
            self.calls["adjoint"] += 1

    func = WithCallbacks()
    y0 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    out = fastcnf.odeint_adjoint(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64))
    out.sum().backward()
    assert func.calls["forward"] > 0 and func.calls["adjoint"] > 0


@pytest.mark.parametrize("method, tolerance", [("radauIIA5", 1e-8), ("gl4", 1e-8), ("trbdf2", 1e-3)])
def test_adjoint_with_implicit_methods(method, tolerance):
    """The forward options' block-diagonal Jacobian does not carry over to the augmented state."""
    func = MLPDynamics()
    y0 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    options = dict(step_size=0.05, jacobian_structure="block_diagonal")
    params = [y0] + [p for name, p in func.named_parameters() if name != "unused"]
    adjoint = torch.autograd.grad(
        fastcnf.odeint_adjoint(func, y0, t, method=method, options=options)[-1].pow(2).sum(), params)
    backprop = torch.autograd.grad(fastcnf.odeint(func, y0, t, method=method, options=options)[-1].pow(2).sum(),
                                   params)
    for got, expected in zip(adjoint, backprop):
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_time_gradient_with_ffjord_style_dynamics():
    """Dynamics that call autograd.grad on a detached copy of a state without grad (FFJORD's idiom).

    torchdiffeq 0.2.5 raises "differentiated Tensor ... not used in the graph" here when t requires
    grad, because it re-evaluates func under no_grad on views of its saved solution.
    """
    torch.manual_seed(0)
    linear = torch.nn.Linear(2, 2).double()

    class WithInnerGrad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear

        def forward(self, t, z):
            with torch.enable_grad():
                if not z.requires_grad:
                    z = z.detach().requires_grad_(True)
                dz = torch.tanh(self.linear(z)) * (1 + t)
                (inner,) = torch.autograd.grad(dz.sum(), z, create_graph=True)
            return dz + 0.1 * inner

    func = WithInnerGrad()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    end = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    times = torch.stack([torch.zeros((), dtype=torch.float64), end])
    fastcnf.odeint_adjoint(func, y0, times, rtol=1e-10, atol=1e-10)[-1].pow(2).sum().backward()

    def loss_at(value):
        grid = torch.tensor([0.0, value], dtype=torch.float64)
        return fastcnf.odeint(func, y0, grid, rtol=1e-12, atol=1e-12)[-1].pow(2).sum().item()

    finite_difference = (loss_at(0.9 + 1e-5) - loss_at(0.9 - 1e-5)) / 2e-5
    assert end.grad.item() == pytest.approx(finite_difference, rel=1e-6)


def test_seminorm_on_a_cnf_gives_equal_gradients_with_fewer_backward_steps():
    from fastcnf.cnf import CNF, SolverSettings
    from fastcnf.cnf.nets import ODEnet

    torch.manual_seed(0)
    net = ODEnet(2, (16, 16), "concat", "tanh").double()
    with torch.no_grad():
        for param in net.parameters():
            param.mul_(3.0)  # a nonlinear flow that needs a few steps
    x = torch.randn(64, 2, dtype=torch.float64)
    results = {}
    for norm in (None, "seminorm"):
        # a relative tolerance with a tiny atol: then the parameter adjoints, not the state, limit
        # the backward steps (with atol ~ rtol the re-integrated state does, and the seminorm
        # changes nothing, in torchdiffeq too)
        solver = SolverSettings("dopri5", rtol=1e-5, atol=1e-9, adjoint_options={"norm": norm} if norm else None)
        flow = CNF(net, end_time=1.0, divergence="exact", train_solver=solver)
        with fastcnf.track() as stats:
            loss = -flow.log_prob(x).mean()
            grads = torch.autograd.grad(loss, list(net.parameters()))
        results[norm] = grads, stats.steps_accepted + stats.steps_rejected, stats.nfe_backward
    for got, expected in zip(results["seminorm"][0], results[None][0]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert results["seminorm"][2] < results[None][2]
