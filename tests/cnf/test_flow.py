"""CNF blocks: densities, inverses, gradients under the adjoint, TO-FLOW end times (float64)."""

import pytest
import torch
import torchdiffeq

import fastcnf
from fastcnf.cnf import CNF, SequentialFlow, SolverSettings, standard_normal_log_prob
from fastcnf.cnf.nets import ODEnet
from fastcnf.cnf.toflow import TerminalTime
from linear_flow import Linear

TIGHT = SolverSettings("dopri5", rtol=1e-9, atol=1e-9)


def _net(dim=2, seed=0, layer="concatsquash"):
    torch.manual_seed(seed)
    return ODEnet(dim, (16, 16), layer, "tanh").double()


def _points(num=8, dim=2, seed=1):
    return torch.randn(num, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_linear_flow_matches_the_matrix_exponential():
    matrix = torch.tensor([[-0.4, 1.2], [-0.8, 0.3]], dtype=torch.float64)
    x = _points()
    cnf = CNF(Linear(matrix), end_time=0.9, divergence="hutchinson-gaussian", train_solver=TIGHT)
    z, delta_logp = cnf(x)
    torch.testing.assert_close(z, x @ torch.linalg.matrix_exp(0.9 * matrix).t())
    eps = cnf.train_estimator.noise  # Hutchinson with fixed noise: exactly -T eps^T A eps for linear dynamics
    torch.testing.assert_close(delta_logp, -0.9 * ((eps @ matrix) * eps).sum(1))
    exact = CNF(Linear(matrix), end_time=0.9, divergence="exact", train_solver=TIGHT)
    torch.testing.assert_close(exact(x)[1], torch.full((8,), -0.9 * float(matrix.trace()), dtype=torch.float64))


def test_density_integrates_to_one_over_a_grid():
    net = _net()
    with torch.no_grad():
        for param in net.parameters():
            param.mul_(2.0)  # a flow that visibly reshapes N(0, I)
    cnf = CNF(net, end_time=1.0, divergence="exact", test_solver=SolverSettings(rtol=1e-6, atol=1e-6)).eval()
    axis = torch.linspace(-6.5, 6.5, 91, dtype=torch.float64)
    xs, ys = torch.meshgrid(axis, axis, indexing="ij")
    grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
    with torch.no_grad():
        density = cnf.log_prob(grid).exp()
    mass = density.sum() * (axis[1] - axis[0]) ** 2
    assert abs(float(mass) - 1.0) < 1e-3
    assert (density - standard_normal_log_prob(grid).exp()).abs().max() > 0.05


def test_matches_torchdiffeq_on_the_same_augmented_dynamics():
    cnf = CNF(_net(), end_time=0.8, divergence="exact", train_solver=SolverSettings(rtol=1e-8, atol=1e-8))
    x = _points()
    z, delta_logp = cnf(x)
    times = torch.tensor([0.0, 0.8], dtype=torch.float64)
    expected = torchdiffeq.odeint(cnf.dynamics, (x, torch.zeros(8, dtype=torch.float64)), times, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(z, expected[0][-1], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(delta_logp, expected[1][-1], rtol=1e-7, atol=1e-7)


def test_inverse_round_trip_and_log_density_through_the_inverse():
    cnf = CNF(_net(), end_time=0.7, divergence="exact", test_solver=TIGHT).eval()
    x = _points()
    with torch.no_grad():
        z, delta_logp = cnf(x)
        torch.testing.assert_close(cnf.inverse(z), x, rtol=1e-7, atol=1e-7)
        x_back, log_px = cnf.inverse(z, standard_normal_log_prob(z))
        torch.testing.assert_close(x_back, x, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(log_px, cnf.log_prob(x), rtol=1e-7, atol=1e-7)


def test_sequential_flow_adds_log_determinants_and_inverts():
    blocks = [CNF(_net(seed=s), end_time=0.5, divergence="exact", test_solver=TIGHT) for s in (0, 1)]
    flow = SequentialFlow(blocks).eval()
    x = _points()
    with torch.no_grad():
        z, delta = flow(x)
        middle, first = blocks[0](x)
        end, second = blocks[1](middle)
        torch.testing.assert_close(z, end)
        torch.testing.assert_close(delta, first + second)
        torch.testing.assert_close(flow.inverse(z), x, rtol=1e-7, atol=1e-7)
        samples = flow.sample(5)
    assert samples.shape == (5, 2) and samples.dtype == torch.float64


@pytest.mark.parametrize("divergence", ["exact", "hutchinson-rademacher", "fd-gaussian"])
def test_adjoint_gradients_match_backpropagation_through_the_solver(divergence):
    x = _points()
    grads = []
    for adjoint in (True, False):
        cnf = CNF(_net(), end_time=0.6, divergence=divergence,
                  train_solver=SolverSettings("dopri5", rtol=1e-9, atol=1e-9, adjoint=adjoint))
        torch.manual_seed(7)  # same Hutchinson noise in both solves
        loss = -cnf.log_prob(x).mean()
        grads.append(torch.autograd.grad(loss, list(cnf.parameters())))
    for adjoint_grad, direct_grad in zip(*grads):
        torch.testing.assert_close(adjoint_grad, direct_grad, rtol=1e-5, atol=1e-7)


def _two_block_loss(ends, grad=True, shared=False):
    """Loss of two CNF blocks with end times ``ends`` (one TerminalTime for both when ``shared``)."""
    x = _points()
    times = [TerminalTime(init=end, alpha=0.1, t_max=5.0) for end in ends]
    if shared:
        times = [times[0], times[0]]
    flow = SequentialFlow([CNF(_net(seed=seed), end_time=time, divergence="exact", train_solver=TIGHT)
                           for seed, time in enumerate(times)])
    with torch.set_grad_enabled(grad):
        loss = -flow.log_prob(x).mean() + flow.regularization()
    return times, loss


def test_each_block_gets_the_exact_gradient_of_its_terminal_time():
    ends, step = (0.8, 0.6), 1e-5
    times, loss = _two_block_loss(ends)
    with fastcnf.track() as stats:
        loss.backward()
    for index in range(2):
        up, down = list(ends), list(ends)
        up[index] += step
        down[index] -= step
        finite = (_two_block_loss(up, False)[1] - _two_block_loss(down, False)[1]) / (2 * step)
        torch.testing.assert_close(times[index].value.grad, finite, rtol=1e-5, atol=1e-8)
    # dL/dT costs no function evaluation: the backward pass evaluates exactly as often with T frozen
    frozen, loss = _two_block_loss(ends)
    for time in frozen:
        time.value.requires_grad_(False)
    with fastcnf.track() as frozen_stats:
        loss.backward()
    assert stats.nfe_backward == frozen_stats.nfe_backward > 0


def test_one_terminal_time_shared_by_blocks_gets_the_sum_of_their_gradients():
    step = 1e-5
    times, loss = _two_block_loss((0.7, 0.7), shared=True)
    loss.backward()
    finite = (_two_block_loss((0.7 + step,) * 2, False, True)[1]
              - _two_block_loss((0.7 - step,) * 2, False, True)[1]) / (2 * step)
    torch.testing.assert_close(times[0].value.grad, finite, rtol=1e-5, atol=1e-8)


def test_train_and_test_solvers_are_switched_by_mode():
    cnf = CNF(_net(), end_time=1.0, divergence="exact",
              train_solver=SolverSettings("rk4", options={"step_size": 0.25}),
              test_solver=SolverSettings("dopri5", rtol=1e-8, atol=1e-8))
    x = _points()
    with torch.no_grad(), fastcnf.track() as train_stats:
        cnf(x)
    cnf.eval()
    with torch.no_grad(), fastcnf.track() as test_stats:
        cnf(x)
    assert train_stats.nfe_forward == 16  # 4 steps of 4 stages
    assert test_stats.nfe_forward > 16 and test_stats.nfe_forward % 6 == 2  # dopri5: 2 setup + 6 per step


def test_separate_test_divergence():
    cnf = CNF(_net(), divergence="hutchinson-gaussian", test_divergence="exact", train_solver=TIGHT)
    x = _points()
    with torch.no_grad():
        cnf.eval()
        exact = cnf.log_prob(x)
        cnf.train()
        noisy = cnf.log_prob(x)
    assert not torch.allclose(noisy, exact)
    reference = CNF(_net(), divergence="exact", train_solver=TIGHT)
    with torch.no_grad():
        torch.testing.assert_close(exact, reference.log_prob(x))


def test_user_dynamics_module_and_sample_shape_errors():
    cnf = CNF(Linear([[0.2, 0.0], [0.0, -0.1]]), divergence="exact")
    with pytest.raises(ValueError, match="sample\\(\\) needs event_shape"):
        cnf.sample(3)
    assert cnf.sample(3, event_shape=(2,)).shape == (3, 2)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(net=lambda t, z: z), TypeError, "net must be an nn.Module"),
    (dict(net=Linear([[1.0]]), end_time=0.0), ValueError,
     "end_time \\(a number or a TerminalTime\\) must be a positive finite number"),
    (dict(net=Linear([[1.0]]), divergence="trace"), ValueError, "unknown divergence estimator"),
])
def test_bad_arguments_are_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        CNF(**kwargs)


def test_bad_solver_settings_are_rejected():
    with pytest.raises(fastcnf.UnknownMethodError):
        SolverSettings("rk45")
    with pytest.raises(ValueError, match="rtol must be a positive finite number"):
        SolverSettings(rtol=0.0)


def test_sampling_with_a_terminal_time_uses_the_network_dtype():
    """The float64 TerminalTime parameter must not decide the dtype of the samples."""
    from fastcnf.cnf.toflow import TerminalTime

    torch.manual_seed(0)
    flow = CNF(ODEnet(2, (8,), "concatsquash", "tanh"), end_time=TerminalTime(init=0.5), divergence="exact")
    samples = flow.eval().sample(5)
    assert samples.dtype == torch.float32 and samples.shape == (5, 2) and bool(torch.isfinite(samples).all())
