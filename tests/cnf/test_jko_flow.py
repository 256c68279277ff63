"""JKO-iFlow model pieces: adjoint block training (memory of one evaluation whatever the depth and the
steps, gradients equal to backprop's), the unit-time convention against the interval one, the damped
time reparameterization and the selection of the blocks to refine."""

import math

import pytest
import torch

from bench.measure import peak_memory_bytes
from fastcnf.cnf.jko import (
    BlockSolver,
    JKOFlow,
    block_objective,
    geometric_intervals,
    refinement_selection,
    relative_movement,
    reparameterized_intervals,
)
from fastcnf.cnf.nets import ODEnet


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stack(blocks, steps, adjoint, hidden=(64, 64)):
    torch.manual_seed(0)
    flow = JKOFlow(ODEnet(2, hidden, "concatsquash", "softplus"), 0.3, BlockSolver("rk4", steps, adjoint=adjoint),
                   "hutchinson-gaussian")
    for _ in range(1, blocks):
        flow.append_block(0.3)
    flow.train_only(blocks - 1)
    return flow


def _step_peak(blocks, steps, adjoint, x):
    """Peak memory of one training step (forward and backward) of the last block of a stack."""
    flow = _stack(blocks, steps, adjoint)

    def step():
        block_objective(flow, blocks - 1, x).loss.backward()

    step()  # warm-up: lazily created buffers are not part of a step
    flow.zero_grad(set_to_none=True)
    return peak_memory_bytes(step, "cpu")


def test_adjoint_step_memory_does_not_grow_with_the_blocks_or_the_steps():
    x = torch.randn(256, 2)
    adjoint = {(blocks, steps): _step_peak(blocks, steps, True, x) for blocks, steps in ((1, 4), (5, 4), (1, 16))}
    backprop = {steps: _step_peak(1, steps, False, x) for steps in (4, 16)}
    base = adjoint[(1, 4)]
    assert base > 0
    assert adjoint[(5, 4)] == pytest.approx(base, rel=0.01), adjoint  # 5 blocks: the block trained is the 5th
    assert adjoint[(1, 16)] == pytest.approx(base, rel=0.01), adjoint  # 4x the solver steps
    assert backprop[16] > 3.5 * backprop[4], backprop  # the measure sees the graph grow with the steps
    assert backprop[4] > 4 * base, (backprop, base)


W = torch.tensor([[-0.7, 0.4], [-0.3, 0.2]], dtype=torch.float64)
B = torch.tensor([0.3, -0.5], dtype=torch.float64)


def _affine_flow(adjoint, steps):
    net = ODEnet(2, (), "ignore").double()
    with torch.no_grad():
        net.layers[0].linear.weight.copy_(W)
        net.layers[0].linear.bias.copy_(B)
    flow = JKOFlow(net, 0.3, BlockSolver("rk4", steps, adjoint=adjoint), "exact")
    flow.append_block(0.5)
    return flow


@pytest.mark.parametrize("steps", [4, 8])
def test_adjoint_gradient_of_a_block_matches_backprop_through_rk4(steps):
    """The adjoint integrates the continuous adjoint with the same rk4 grid: equal to the gradient of
    the discrete map up to rk4's O(h^4) error."""
    torch.manual_seed(1)
    x = torch.randn(64, 2, dtype=torch.float64)
    grads = {}
    for adjoint in (True, False):
        flow = _affine_flow(adjoint, steps)
        flow.train_only(1)
        objective = block_objective(flow, 1, x)
        objective.loss.backward()
        layer = flow.nets[1].layers[0].linear
        grads[adjoint] = (objective.loss.detach(), layer.weight.grad, layer.bias.grad)
    for with_adjoint, with_backprop in zip(grads[True], grads[False]):
        torch.testing.assert_close(with_adjoint, with_backprop, rtol=2e-5 * (4 / steps) ** 4, atol=1e-9)


def _unit_and_interval_flows(h, start):
    """The same dynamics twice: g over [0, 1] (unit) and g / h over an interval of length h."""
    torch.manual_seed(2)
    unit_net = ODEnet(2, (16,), "ignore", "softplus").double()
    interval_net = ODEnet(2, (16,), "ignore", "softplus").double()
    interval_net.load_state_dict(unit_net.state_dict())
    with torch.no_grad():  # the last layer is linear: scaling it scales the field
        interval_net.layers[-1].linear.weight.div_(h)
        interval_net.layers[-1].linear.bias.div_(h)
    solver = BlockSolver("rk4", 3)
    unit = JKOFlow(unit_net, start, solver, "exact", block_time="unit")
    interval = JKOFlow(interval_net, start, solver, "exact", block_time="interval")
    unit.append_block(h)
    interval.append_block(h)
    return unit, interval


def test_unit_block_time_is_the_interval_dynamics_with_time_rescaled():
    h, start = 0.7, 0.4
    unit, interval = _unit_and_interval_flows(h, start)
    assert unit.block_times(1) == (0.0, 1.0) and interval.block_times(1) == pytest.approx((start, start + h))
    assert unit.boundaries() == interval.boundaries() == pytest.approx((0.0, start, start + h))
    x = torch.randn(128, 2, dtype=torch.float64)
    by_unit, by_interval = block_objective(unit, 1, x), block_objective(interval, 1, x)
    for name in ("x", "delta_logp", "loss", "potential", "divergence", "displacement"):
        torch.testing.assert_close(getattr(by_unit, name), getattr(by_interval, name), rtol=1e-12, atol=1e-12)
    # the penalty weight is h in both: it is the JKO step, whatever the integration length
    expected = by_unit.potential - by_unit.divergence + by_unit.displacement / (2 * h)
    torch.testing.assert_close(by_unit.loss, expected, rtol=1e-14, atol=1e-14)
    z = by_unit.x
    torch.testing.assert_close(unit.block_inverse(1, z), interval.block_inverse(1, z), rtol=1e-12, atol=1e-12)


def test_damped_reparameterization_moves_part_of_the_way_within_bounds():
    # the example: the full step made these (0.054, 0.13, 0.518, 4.666)
    intervals, movements = (1.0, 1.2, 1.44, 1.728), (2.0, 1.0, 0.3, 0.04)
    mean = sum(movements) / 4
    targets = [1.0 * mean / 2.0, 1.2 * mean / 1.0, 1.44 * mean / 0.3, 5.0]  # the last one capped at h_max
    expected = [h + 0.5 * (target - h) for h, target in zip(intervals, targets)]
    new = reparameterized_intervals(intervals, movements, eta=0.5, h_min=0.01, h_max=5.0)
    assert new == pytest.approx(expected, rel=1e-14)
    assert new == pytest.approx((0.70875, 1.101, 2.724, 3.364), rel=1e-12)
    # bounds
    assert reparameterized_intervals(intervals, movements, eta=1.0, h_min=0.6, h_max=2.0) == pytest.approx(
        (0.6, 1.002, 2.0, 2.0))


def test_a_block_that_did_not_move_leaves_the_others_finite():
    new = reparameterized_intervals((1.0, 1.0, 1.0), (1.0, 1.0, 0.0), eta=0.5, h_min=0.01, h_max=4.0)
    mean = 2.0 / 3.0
    assert new == pytest.approx((1.0 + 0.5 * (mean - 1.0),) * 2 + (2.5,), rel=1e-14)
    assert reparameterized_intervals((0.5, 8.0), (0.0, 0.0), eta=0.5, h_min=0.01, h_max=4.0) == (0.5, 4.0)


def test_full_step_equalizes_constant_speed_movements_and_damped_steps_converge():
    speeds = (3.0, 1.5, 0.4, 0.1)  # block k moves speed_k * h_k
    intervals = geometric_intervals(0.25, 1.4, 4)
    settings = dict(h_min=1e-3, h_max=100.0)

    def moves(hs):
        return [v * h for v, h in zip(speeds, hs)]

    once = reparameterized_intervals(intervals, moves(intervals), eta=1.0, **settings)
    assert moves(once) == pytest.approx([sum(moves(intervals)) / 4] * 4, rel=1e-12)
    spreads, hs = [], intervals
    for _ in range(12):
        spreads.append(max(moves(hs)) / min(moves(hs)))
        hs = reparameterized_intervals(hs, moves(hs), eta=0.5, **settings)
    assert all(b < a for a, b in zip(spreads, spreads[1:])) and spreads[0] > 10 and spreads[-1] < 1.01


@pytest.mark.parametrize("kwargs, message", [
    (dict(eta=0.0), "eta must be in (0, 1]"),
    (dict(eta=1.5), "eta must be in (0, 1]"),
    (dict(h_min=2.0, h_max=1.0), "need h_min <= h_max"),
    (dict(h_min=0.0), "h_min must be a positive finite number"),
    (dict(movements=(1.0, -1.0)), "movements must be finite and >= 0"),
    (dict(movements=(1.0, None)), "movements must be finite and >= 0"),
    (dict(movements=(1.0,)), "one movement per interval"),
])
def test_bad_reparameterization_arguments_are_named(kwargs, message):
    arguments = dict(intervals=(1.0, 1.0), movements=(1.0, 1.0), eta=0.5, h_min=0.01, h_max=5.0)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        reparameterized_intervals(arguments.pop("intervals"), arguments.pop("movements"), **arguments)


def test_refinement_selects_the_blocks_moving_at_least_the_threshold_times_the_mean():
    movements = (0.4, 1.0, 0.7, 0.2, 0.2)  # mean 0.5
    assert refinement_selection(movements) == (1, 2)
    assert refinement_selection(movements, 0.8) == (0, 1, 2)
    assert refinement_selection(movements, 0.0) == (0, 1, 2, 3, 4)
    assert refinement_selection(movements, 3.0) == (1,)  # the block that moved most, always
    assert refinement_selection((0.0, 0.0)) == (0, 1)


def test_relative_movement_is_the_papers_stopping_statistic():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert relative_movement(x, y) == pytest.approx((1 + 1) / (4 + 1))
    assert relative_movement(torch.zeros(3, 2), torch.zeros(3, 2)) == 0.0
    assert math.isfinite(relative_movement(x, torch.zeros(2, 2)))
