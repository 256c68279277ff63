"""JKO-iFlow: the block objective against closed forms, one block in the graph, the stack's
likelihood and inverse, the schedule's stopping rule, reparameterization and refinement."""

import math
import re

import pytest
import torch

from fastcnf.cnf import standard_normal_log_prob
from fastcnf.cnf.jko import (
    BlockSolver,
    JKOFlow,
    block_objective,
    geometric_intervals,
    movement,
    refinement_selection,
    relative_movement,
)
from fastcnf.cnf.nets import ODEnet
from fastcnf.stats import track, untracked
from fastcnf.training.config import TrainConfig
from fastcnf.training.data import toy_sample
from fastcnf.training.jko_data import IndexSampler, PushForwardCache
from fastcnf.training.jko_schedule import JKOSchedule, JKOSettings
from fastcnf.training.trainer import Trainer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as the trainer uses on CPU (two threads on 2 shared cores are several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


W = torch.tensor([[-0.7, 0.4], [-0.3, 0.2]], dtype=torch.float64)
B = torch.tensor([0.3, -0.5], dtype=torch.float64)


def _affine_flow(solver, divergence="exact", intervals=(0.3, 0.5)):
    """Blocks f(t, x) = W x + b (one 'ignore' layer), float64."""
    net = ODEnet(2, (), "ignore").double()
    with torch.no_grad():
        net.layers[0].linear.weight.copy_(W)
        net.layers[0].linear.bias.copy_(B)
    flow = JKOFlow(net, intervals[0], solver, divergence)
    for h in intervals[1:]:
        flow.append_block(h)
    return flow


def _rk4_affine_map(x, weight, bias, h, steps):
    """rk4 on x' = W x + b is the Taylor polynomial of the flow: x + s (I + sW/2 + s^2W^2/6 + s^3W^3/24)(Wx + b)."""
    s = h / steps
    eye = torch.eye(2, dtype=torch.float64)
    phi = eye + s * weight / 2 + s ** 2 * weight @ weight / 6 + s ** 3 * weight @ weight @ weight / 24
    for _ in range(steps):
        x = x + s * (x @ weight.T + bias) @ phi.T
    return x


def _exact_affine_map(x, weight, bias, h):
    """x(h) = e^{hW} x + W^{-1} (e^{hW} - I) b."""
    expm = torch.linalg.matrix_exp(h * weight)
    shift = torch.linalg.solve(weight, (expm - torch.eye(2, dtype=torch.float64)) @ bias)
    return x @ expm.T + shift


def _closed_form_loss(x, x_next, divergence_integral, h):
    return (0.5 * x_next.pow(2).sum(1) - divergence_integral + (x_next - x).pow(2).sum(1) / (2 * h)).mean()


def test_block_objective_of_linear_dynamics_equals_the_closed_form_rk4_map():
    torch.manual_seed(0)
    x = torch.randn(64, 2, dtype=torch.float64)
    flow = _affine_flow(BlockSolver("rk4", steps=4))
    objective = block_objective(flow, 1, x)  # the second block: interval [0.3, 0.8]
    x_next = _rk4_affine_map(x, W, B, 0.5, 4)
    torch.testing.assert_close(objective.x, x_next, rtol=1e-12, atol=1e-12)
    trace = float(torch.trace(W))
    torch.testing.assert_close(objective.delta_logp, torch.full((64,), -0.5 * trace, dtype=torch.float64))
    expected = _closed_form_loss(x, x_next, 0.5 * trace, 0.5)
    torch.testing.assert_close(objective.loss, expected, rtol=1e-12, atol=1e-12)
    assert objective.displacement.item() == pytest.approx((x_next - x).pow(2).sum(1).mean().item(), rel=1e-12)
    assert movement(x, objective.x) == pytest.approx(math.sqrt(objective.displacement.item()), rel=1e-12)


def test_block_objective_and_its_gradient_match_the_exact_flow_map():
    """dopri5 at tight tolerances against e^{hW}; the gradient against autograd of the closed form."""
    torch.manual_seed(1)
    x = torch.randn(32, 2, dtype=torch.float64)
    flow = _affine_flow(BlockSolver("dopri5", rtol=1e-11, atol=1e-11))
    objective = block_objective(flow, 1, x)
    objective.loss.backward()
    layer = flow.nets[1].layers[0].linear
    weight, bias = W.clone().requires_grad_(True), B.clone().requires_grad_(True)
    expected = _closed_form_loss(x, _exact_affine_map(x, weight, bias, 0.5), 0.5 * torch.trace(weight), 0.5)
    expected.backward()
    torch.testing.assert_close(objective.loss, expected.detach(), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=1e-6, atol=1e-8)
    assert flow.nets[0].layers[0].linear.weight.grad is None  # block 0 was not part of the graph


def test_hutchinson_block_divergence_is_the_quadratic_form_of_its_noise():
    x = torch.randn(16, 2, dtype=torch.float64)
    flow = _affine_flow(BlockSolver("rk4", steps=2), divergence="hutchinson-rademacher")
    torch.manual_seed(5)
    noise = torch.randint_like(x, 0, 2).mul_(2).sub_(1)
    torch.manual_seed(5)
    objective = block_objective(flow, 0, x)
    quadratic = ((noise @ W.T) * noise).sum(1)
    torch.testing.assert_close(objective.delta_logp, -0.3 * quadratic, rtol=1e-12, atol=1e-12)


def _net_flow(blocks, hidden=(32, 32), seed=0):
    torch.manual_seed(seed)
    flow = JKOFlow(ODEnet(2, hidden, "concatsquash", "softplus"), 0.3, BlockSolver("rk4", 3), "hutchinson-gaussian",
                   "exact")
    for k in range(1, blocks):
        flow.append_block(0.3 * 1.5 ** k)
        with torch.no_grad():  # distinct blocks
            for p in flow.nets[k].parameters():
                p.add_(0.1 * torch.randn_like(p))
    return flow


def _saved_bytes(compute):
    """Bytes autograd saves for backward while ``compute()`` runs."""
    saved = [0]

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = compute()
    return saved[0], result


def test_training_memory_is_one_block_whatever_the_depth():
    flow = _net_flow(5)
    pool = torch.from_numpy(toy_sample("8gaussians", 512, 0)).float()
    cache = PushForwardCache(pool)
    measured = {}
    for block in (0, 4):
        cache.rebuild(flow, block, seed=0)
        flow.train_only(block)
        bytes_saved, objective = _saved_bytes(lambda: block_objective(flow, block, cache.batch(torch.arange(256))[0]))
        objective.loss.backward()
        with_grad = {k for k, net in enumerate(flow.nets) if any(p.grad is not None for p in net.parameters())}
        assert with_grad == {block}
        flow.zero_grad(set_to_none=True)
        measured[block] = bytes_saved
    assert measured[4] == measured[0] > 0
    flow.requires_grad_(True)
    end_to_end, _ = _saved_bytes(lambda: flow.log_prob(pool[:256]).mean())
    assert end_to_end > 4.5 * measured[0]  # the measure sees five blocks when five are in the graph


def test_refinement_split_keeps_the_flow_and_state_dicts_resize_the_stack():
    flow = _net_flow(3).eval()
    x = torch.from_numpy(toy_sample("moons", 200, 1)).float()
    before = flow.log_prob(x)
    z_before, _ = flow(x)
    flow.split_block(1)
    assert flow.num_blocks == 4 and flow.intervals[1] == flow.intervals[2] == pytest.approx(0.3 * 1.5 / 2)
    assert flow.boundaries()[-1] == pytest.approx(0.3 + 0.45 + 0.675)
    for a, b in zip(flow.nets[1].parameters(), flow.nets[2].parameters()):
        assert torch.equal(a, b)
    z_after, _ = flow(x)
    torch.testing.assert_close(z_after, z_before, rtol=0, atol=2e-3)  # rk4 on a finer grid
    torch.testing.assert_close(flow.log_prob(x), before, rtol=0, atol=2e-3)
    fresh = _net_flow(1, seed=3).eval()
    fresh.load_state_dict(flow.state_dict())
    assert fresh.intervals == flow.intervals and fresh.num_blocks == 4
    torch.testing.assert_close(fresh.log_prob(x), flow.log_prob(x), rtol=0, atol=0)
    with pytest.raises(IndexError, match="block index 4 out of range for 4 blocks"):
        flow.split_block(4)


def test_warm_start_copies_the_previous_block_and_times_follow_the_intervals():
    flow = _net_flow(1)
    index = flow.append_block(0.45)
    assert index == 1 and flow.block_times(1) == pytest.approx((0.3, 0.75))
    for a, b in zip(flow.nets[0].parameters(), flow.nets[1].parameters()):
        assert torch.equal(a, b) and a is not b
    assert geometric_intervals(0.3, 1.5, 3) == pytest.approx((0.3, 0.45, 0.675))


def _train_schedule(flow, pool, settings, batch_size=256):
    """Run the schedule on ``pool`` as the trainer does; returns it and {phase: block movements in it}."""
    cache = PushForwardCache(pool)
    schedule = JKOSchedule(flow, cache, settings, lr=2e-2, seed=0)
    sampler = IndexSampler(len(pool), batch_size, seed=0)
    while not schedule.finished:
        schedule.begin(0)
        block_objective(flow, schedule.block, cache.batch(sampler.next())[0]).loss.backward()
        schedule.step()
    moved = {}
    for record in schedule.history:
        moved.setdefault(record["phase"], []).append(record["movement"])
    return schedule, moved


def _spread(values):
    return max(values) / min(values)


def _grown_h(schedule):
    return [record["h"] for record in schedule.history if record["phase"] == "grow"]


def test_damped_reparameterization_rounds_equalize_the_block_movements():
    torch.manual_seed(0)
    flow = JKOFlow(ODEnet(2, (), "ignore"), 0.05, BlockSolver("rk4", 2), "exact")
    pool = torch.from_numpy(toy_sample("8gaussians", 2048, 0)).float()
    settings = JKOSettings(h0=0.05, rho=4.0, block_iterations=120, max_blocks=3, tolerance=0.0,
                           finetune_iterations=120, reparameterize=True, rounds=3, eta=0.5, h_min=0.01, h_max=2.0)
    schedule, ended = _train_schedule(flow, pool, settings)
    assert schedule.finished and flow.num_blocks == 3 and _grown_h(schedule) == pytest.approx((0.05, 0.2, 0.8))
    grown = ended["grow"]
    rounds = [ended["reparameterize"][3 * r:3 * r + 3] for r in range(3)]
    assert [record["round"] for record in schedule.history if record["phase"] == "reparameterize"] == [0] * 3 + [
        1] * 3 + [2] * 3
    assert _spread(grown) > 2.0, grown
    assert _spread(grown) > _spread(rounds[0]) > _spread(rounds[2]), (grown, rounds)
    assert _spread(rounds[2]) < 1.4, rounds
    assert all(0.01 <= h <= 2.0 for h in flow.intervals)


def test_stopping_rule_follows_the_relative_movement_and_refinement_splits_the_selected_blocks():
    torch.manual_seed(0)
    pool = torch.from_numpy(toy_sample("8gaussians", 1024, 0)).float()
    flow = JKOFlow(ODEnet(2, (), "ignore"), 0.5, BlockSolver("rk4", 2), "exact")
    settings = JKOSettings(h0=0.5, rho=1.0, block_iterations=30, max_blocks=10, tolerance=0.02,
                           finetune_iterations=10, refine=True, refine_threshold=1.0)
    schedule, _ = _train_schedule(flow, pool, settings)
    grown = [record for record in schedule.history if record["phase"] == "grow"]
    relative = [record["relative"] for record in grown]
    assert relative[-1] < 0.02 and all(r >= 0.02 for r in relative[:-1]) and 1 < len(grown) < 10, relative
    moved = [record["movement"] for record in grown]
    selected = refinement_selection(moved, 1.0)
    assert 0 < len(selected) < len(grown), moved  # the first blocks move most: not every block is split
    expected = []
    for k in range(len(grown)):
        expected += [0.25, 0.25] if k in selected else [0.5]
    assert flow.intervals == pytest.approx(expected)
    refined = [record["block"] for record in schedule.history if record["phase"] == "refine"]
    first = selected[0]  # blocks before the first split one keep their inputs and are not retrained
    assert refined == list(range(first, flow.num_blocks))
    assert all(m is not None for m in schedule.movements) and schedule.optimizer is None
    with pytest.raises(RuntimeError, match="schedule is complete"):
        schedule.begin(0)


def test_learning_rate_per_stage_and_gradient_clipping():
    torch.manual_seed(0)
    pool = torch.from_numpy(toy_sample("8gaussians", 512, 0)).float()
    flow = JKOFlow(ODEnet(2, (8,), "ignore", "softplus"), 0.5, BlockSolver("rk4", 2), "exact")
    settings = JKOSettings(h0=0.5, rho=1.0, block_iterations=3, max_blocks=2, tolerance=0.0, finetune_iterations=2,
                           reparameterize=True, finetune_lr=1e-3, lr_decay=0.5, clip=0.25)
    cache = PushForwardCache(pool)
    schedule = JKOSchedule(flow, cache, settings, lr=1e-2, seed=0)
    sampler = IndexSampler(len(pool), 128, seed=0)
    seen, norms, hooked = [], [], []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        clipped = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
        seen.append((schedule.phase, schedule.block, optimizer.param_groups[0]["lr"], norms[-1], clipped))

    while not schedule.finished:
        schedule.begin(0)
        x = 10.0 * cache.batch(sampler.next())[0]  # large inputs: gradients far above the clip
        block_objective(flow, schedule.block, x).loss.backward()
        before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in flow.block_parameters(schedule.block)]))
        norms.append(before.item())
        if schedule.optimizer not in hooked:  # one hook per stage's optimizer
            hooked.append(schedule.optimizer)
            schedule.optimizer.register_step_pre_hook(record)
        schedule.step()
    lrs = [(phase, block, lr) for phase, block, lr, _, _ in seen]
    assert lrs == [("grow", 0, 1e-2)] * 3 + [("grow", 1, 5e-3)] * 3 + [("reparameterize", 0, 1e-3)] * 2 + [
        ("reparameterize", 1, 5e-4)] * 2
    assert all(before > 0.25 and after == pytest.approx(0.25, rel=1e-5) for *_, before, after in seen)


def test_trained_stack_beats_the_base_distribution_and_inverts(tmp_path):
    config = TrainConfig(method="jko", data="8gaussians", hidden=(32, 32), activation="softplus", batch_size=256,
                         lr=1e-2, jko_h0=0.5, jko_rho=1.2, jko_block_iterations=60, jko_max_blocks=4, jko_steps=3,
                         jko_pool=4000, jko_tolerance=0.0, iterations=1000, val_every=1000, val_size=500, plot=False,
                         out=str(tmp_path))
    trainer = Trainer(config, progress=False)
    summary = trainer.run()
    assert trainer.iteration == 240 and trainer.model.num_blocks == 4  # the schedule ended the run
    test = trainer.dataset.test
    base_nll = -standard_normal_log_prob(test).mean().item()  # about 5.9 nats
    assert summary["test"]["nll"] < base_nll - 1.5, (summary["test"], base_nll)

    flow = trainer.model.eval()
    x = test[:500]
    with torch.no_grad():
        z, delta_logp = flow(x)
        x_back = flow.inverse(z)
        x_again, log_p = flow.inverse(z, standard_normal_log_prob(z))
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-4)  # reverse-time rk4 solves
    # with log p the flow runs the fused divergence pass, whose f equals the net's forward to float32 rounding
    torch.testing.assert_close(x_again, x_back, rtol=0, atol=1e-5)
    torch.testing.assert_close(log_p, standard_normal_log_prob(z) - delta_logp, rtol=0, atol=5e-4)
    torch.manual_seed(0)
    with torch.no_grad():
        radius = flow.sample(2000).norm(dim=1)
    assert 2.0 < radius.mean().item() < 3.6  # the modes sit at radius 2.83


def test_cache_rebuilt_from_scratch_equals_the_incremental_pushes_and_leaves_the_rng_alone():
    flow = _net_flow(3)
    flow.test_estimator = flow.train_estimator  # Hutchinson: the pushes draw noise from their own seeds
    pool = torch.from_numpy(toy_sample("pinwheel", 300, 2)).float()
    incremental = PushForwardCache(pool, chunk_size=128)
    incremental.reset(flow)
    torch.manual_seed(11)
    moved = [incremental.advance(flow, seed=4) for _ in range(3)]
    after = torch.rand(3)
    torch.manual_seed(11)
    rebuilt = PushForwardCache(pool, chunk_size=128)
    with track() as stats, untracked():
        rebuilt.rebuild(flow, 3, seed=4)
    assert stats.nfe_forward == 0 and torch.equal(torch.rand(3), after)
    assert torch.equal(rebuilt.x, incremental.x) and torch.equal(rebuilt.delta_logp, incremental.delta_logp)
    x_1 = flow.block_forward(0, pool, estimator="exact")[0]
    assert moved[0] == pytest.approx((movement(pool, x_1), relative_movement(pool, x_1)), rel=1e-5)
    rebuilt.reset(flow)
    with track() as stats:
        rebuilt.advance(flow, seed=4)
    assert stats.nfe_forward == 3 * 12  # 3 chunks x 3 rk4 steps x 4 stages: counted outside untracked()


@pytest.mark.parametrize("build, error, message", [
    (lambda: JKOSettings(h0=0.0), ValueError, "jko h0 must be a positive finite number, got 0.0"),
    (lambda: JKOSettings(max_blocks=0), ValueError, "jko max blocks must be a positive integer, got 0"),
    (lambda: JKOSettings(tolerance=-1.0), ValueError, "jko tolerance must be a finite number >= 0"),
    (lambda: JKOSettings(refine=1), ValueError, "jko refine must be True or False"),
    (lambda: BlockSolver("rk4", steps=0), ValueError, "steps must be a positive integer, got 0"),
    (lambda: BlockSolver("rk5"), ValueError, 'Invalid method "rk5"'),
    (lambda: JKOFlow(ODEnet(2, (4,)), interval=-0.5), ValueError, "interval must be a positive finite number"),
    (lambda: JKOFlow(ODEnet(2, (4,)), 1.0).set_intervals([1.0, 2.0]), ValueError, "need 1 intervals, got 2"),
    (lambda: JKOSchedule(_net_flow(1).nets[0], PushForwardCache(), JKOSettings()), TypeError, "trains a JKOFlow"),
])
def test_bad_jko_arguments_are_named(build, error, message):
    with pytest.raises(error, match=re.escape(message)):
        build()


def test_jko_refuses_a_sharded_run():
    """Under torchrun every process would cache only its own rows of the pushed-forward pool."""
    from fastcnf.training.config import ConfigError
    from fastcnf.training.data import load_dataset
    from fastcnf.training.registry import TRAINING_METHODS
    from fastcnf.training.sharding import Shard

    config = TrainConfig(method="jko", data="8gaussians")
    with pytest.raises(ConfigError, match="torchrun"):
        TRAINING_METHODS["jko"]().sampler(load_dataset("8gaussians"), config, Shard(rank=1, size=2))


def test_evaluation_uses_the_test_solver_and_training_the_block_solver():
    from fastcnf.training.registry import TRAINING_METHODS

    torch.manual_seed(0)
    config = TrainConfig(method="jko", hidden=(16,), activation="softplus", jko_steps=2, test_solver="dopri5",
                         test_rtol=1e-8, test_atol=1e-8, divergence="exact")
    flow = TRAINING_METHODS["jko"]().build_model(config, 2).double()
    flow.append_block(0.6)
    assert flow.solver == BlockSolver("rk4", 2, config.rtol, config.atol, True)
    assert flow.test_solver == BlockSolver("dopri5", 2, 1e-8, 1e-8, True)
    x = torch.from_numpy(toy_sample("moons", 100, 0)).double()
    reference = JKOFlow(flow.nets[0], 0.25, BlockSolver("rk4", 256), "exact")
    reference.append_block(0.6)
    reference.load_state_dict(flow.state_dict())
    with torch.no_grad(), track() as evaluation:
        evaluated = flow.eval().log_prob(x)
    with torch.no_grad(), track() as training:
        flow.train().log_prob(x)
    with torch.no_grad():
        fine = reference.eval().log_prob(x)
    torch.testing.assert_close(evaluated, fine, rtol=0, atol=3e-6)
    assert training.nfe_forward == 2 * 2 * 4  # blocks x rk4 steps x stages
    assert evaluation.nfe_forward > training.nfe_forward and evaluation.solves == 2  # dopri5 at 1e-8, per block
