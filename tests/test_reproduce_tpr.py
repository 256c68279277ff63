"""bench/reproduce/tpr.py: the arms, arm D's mapping onto the previous penalty, and the end-of-training
measurements (NFE with and without the carried step size, trajectory acceleration) on known answers."""

import argparse

import numpy as np
import pytest
import torch

from bench.reproduce import tpr
from fastcnf.cnf import CNF, SequentialFlow, SolverSettings
from fastcnf.cnf.regularizers import TrajectoryPolynomial, polynomial_residual
from fastcnf.training.config import TrainConfig
from fastcnf.training.trainer import Trainer
from linear_flow import Linear


def test_the_protocol_has_the_issues_arms():
    args = argparse.Namespace(datasets=["8gaussians", "checkerboard"], arms=None, seeds=[0, 1, 2], seconds=None,
                              iterations=None, default_iterations=2000, validations=20, clock=None, device="cpu")
    protocol = tpr.build_protocol(args)
    assert protocol.budget.iterations == 2000 and protocol.seeds == (0, 1, 2) and protocol.eval_tolerance == 1e-5
    assert [(arm.dataset, arm.name) for arm in protocol.arms] == [
        (d, a) for d in ("8gaussians", "checkerboard") for a in "ABCD"]
    a, b, c, d = (tpr.arms(["8gaussians"])[i].overrides for i in range(4))
    assert (a["method"], a["rtol"], b["method"], b["rtol"]) == ("ffjord", 1e-5, "ffjord", 1e-4)
    assert (c["tpr_weight"], c["tpr_degree"], c["tpr_times"], c["tpr_logp"], c["rtol"]) == (5.0, 1, 2, False, 1e-4)
    assert (d["tpr_degree"], d["tpr_times"], d["tpr_logp"], d["rtol"]) == (2, 4, True, 1e-4)
    assert (tpr.BASE["hidden"], tpr.BASE["layer"], tpr.BASE["batch_size"]) == ((64, 64, 64), "concatsquash", 512)


def test_arm_d_reproduces_the_previous_mean_normalized_penalty():
    """Before: 5 * mean of the squared residual over (times, samples, z and log p entries), degree 2."""
    generator = torch.Generator().manual_seed(0)
    fractions = torch.tensor([0.0, 0.15, 0.4, 0.55, 0.9, 1.0], dtype=torch.float64)
    z = torch.randn(6, 32, 2, generator=generator, dtype=torch.float64)
    logp = torch.randn(6, 32, generator=generator, dtype=torch.float64)
    previous = 5.0 * polynomial_residual(fractions, torch.cat([z.reshape(6, -1), logp], 1), 2).pow(2).mean()
    settings = tpr.previous_defaults(dim=2)
    reg = TrajectoryPolynomial(settings["tpr_weight"], settings["tpr_degree"], settings["tpr_times"],
                               settings["tpr_logp"])
    torch.testing.assert_close(reg.weight * reg.penalty(fractions, (z, logp)), previous)


def test_trajectory_profile_is_exact_for_a_linear_flow():
    matrix = torch.tensor([[-0.4, 1.3], [-0.9, 0.2]], dtype=torch.float64)
    tight = SolverSettings("dopri5", rtol=1e-10, atol=1e-10)
    model = SequentialFlow([CNF(Linear(matrix), end_time=0.8, divergence="exact", test_solver=tight)])
    points = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    profile = tpr.trajectory_profile(model, points, num_times=9)
    times = torch.linspace(0, 0.8, 9, dtype=torch.float64)
    paths = torch.stack([points @ torch.linalg.matrix_exp(t * matrix).t() for t in times])  # (9, 50, 2)
    expected = (paths @ (matrix @ matrix).t()).norm(dim=2).mean(dim=1)  # z'' = A^2 z
    np.testing.assert_allclose(profile["acceleration"], expected.numpy(), rtol=1e-7)
    assert profile["fractions"] == pytest.approx(np.linspace(0, 1, 9).tolist())
    line = TrajectoryPolynomial(degree=1, num_times=7).penalty(times / 0.8, paths)
    assert profile["linear_residual"] == pytest.approx(float(line), rel=1e-7) and profile["linear_residual"] > 1e-4


def test_end_nfe_measurement_restores_the_solver_options(tmp_path):
    config = TrainConfig(method="tpr", hidden=(16, 16), batch_size=64, rtol=1e-3, atol=1e-3, out=str(tmp_path),
                         plot=False)
    trainer = Trainer(config, progress=False)
    for _ in range(3):
        trainer.train_step()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    carry = tpr.measure_nfe(trainer, True, batches=2)
    restart = tpr.measure_nfe(trainer, False, batches=2)
    assert carry["forward"] == restart["forward"] > 0  # the same batches and random times
    assert restart["backward"] >= carry["backward"] > 0
    assert all(block.train_solver.adjoint_options is None for block in trainer.model.cnf_blocks())
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(p.grad is None for p in trainer.model.parameters())
