"""JKO-iFlow against an end-to-end FFJORD-style CNF at an equal training-time budget.

For each dataset both methods train with the ``fastcnf.training.trainer.Trainer`` (one CPU thread, same
batch size and seed) for ``BUDGET`` seconds of training-step time (validation excluded); the
validation NLL is recorded at fixed fractions of the budget (NLL vs wall time) and the test NLL
at the end. JKO-iFlow may finish its schedule before the budget; its curve then ends early.
Peak memory of one training step (forward and backward of a batch; ``bench.measure.peak_memory_bytes``:
CPU allocation events of ``torch.profiler``) is measured outside the timed steps: FFJORD after 20
iterations, JKO-iFlow halfway through every block it grows (one figure per block).

    python -m pytest bench/ -k jko_vs_ffjord --benchmark-enable -s

``FASTCNF_BENCH_SCALE`` (default 1) multiplies every budget and JKO-iFlow's iterations per stage;
with ``--benchmark-disable`` every case runs at 2% of its budget, as a smoke check. Results are in the pytest-benchmark
JSON under ``extra_info`` of ``jko-vs-ffjord-<data>[<method>]``, printed as a table at the end.
"""

import copy
import math
import os

import pytest
import torch

from fastcnf.training.config import TrainConfig
from fastcnf.training.trainer import Trainer

from .measure import memory_method, peak_memory_bytes

SCALE = float(os.environ.get("FASTCNF_BENCH_SCALE", "1"))
SMOKE_SCALE = 0.02  # --benchmark-disable (the smoke check): a few seconds per case
MARKS = (0.125, 0.25, 0.5, 0.75, 1.0)  # fractions of the budget at which the validation NLL is taken
CASES = {
    "8gaussians": dict(
        budget=90.0,
        common=dict(data="8gaussians", hidden=(64, 64), batch_size=256, lr=5e-3, val_size=2000, seed=0, threads=1,
                    plot=False),
        methods={
            "ffjord": dict(method="ffjord", solver="dopri5", rtol=1e-4, atol=1e-4, divergence="exact",
                           test_divergence="exact"),
            "jko": dict(method="jko", activation="softplus", jko_h0=1.0, jko_rho=1.0, jko_max_blocks=4,
                        jko_block_iterations=1500, jko_steps=4, jko_tolerance=0.02, divergence="hutchinson-gaussian",
                        test_divergence="exact"),
        },
    ),
    "digits": dict(
        budget=150.0,
        common=dict(data="digits", hidden=(256, 256), batch_size=256, lr=2e-3, val_size=180, seed=0, threads=1,
                    plot=False),
        methods={
            "ffjord": dict(method="ffjord", solver="dopri5", rtol=1e-4, atol=1e-4, divergence="hutchinson-gaussian",
                           test_divergence="hutchinson-gaussian"),
            "jko": dict(method="jko", activation="softplus", jko_h0=1.0, jko_rho=1.25, jko_max_blocks=6,
                        jko_block_iterations=300, jko_steps=4, jko_tolerance=0.02, divergence="hutchinson-gaussian",
                        test_divergence="hutchinson-gaussian"),
        },
    ),
}
RESULTS = {}


def _config(data, method, out, scale=1.0, iterations=10 ** 6):
    """The case's TrainConfig; JKO's iterations per stage follow the budget ``scale``."""
    case = CASES[data]
    settings = dict(case["methods"][method])
    for name in ("jko_block_iterations", "jko_finetune_iterations"):
        if name in settings:
            settings[name] = max(2, round(settings[name] * scale))
    return TrainConfig(**case["common"], **settings, out=out, iterations=iterations, val_every=iterations,
                       checkpoint_every=iterations)


def _step_memory(trainer):
    """Peak bytes of the forward and backward pass of one training batch (no optimizer step).

    Runs on a copy of the sampler and a forked RNG, so the training run itself is unchanged.
    """
    batch = copy.deepcopy(trainer.sampler).next().to(trainer.device)

    def step():
        loss, _ = trainer.training_method.loss(trainer.model, batch)
        loss.backward()

    with torch.random.fork_rng():
        peak = peak_memory_bytes(step, "cpu")
    trainer.model.zero_grad(set_to_none=True)
    return peak


def _memory_due(trainer):
    """FFJORD after 20 iterations; JKO-iFlow halfway through every block it grows."""
    schedule = trainer.optimization
    if not hasattr(schedule, "phase"):
        return trainer.iteration == 20
    return schedule.phase == "grow" and schedule.stage_iteration == schedule.settings.block_iterations // 2


def _train_for(config, budget):
    """Train for ``budget`` seconds of step time; returns the trainer, the NLL curve and the peak
    step memory {block (1 for FFJORD): bytes}."""
    trainer = Trainer(config, progress=False)
    marks = [fraction * budget for fraction in MARKS]
    curve = [{"seconds": 0.0, "iteration": 0, "val_nll": trainer.validate()["nll"]}]
    memory = {}
    while marks and not trainer.training_method.finished(trainer.optimization):
        trainer.train_step()
        if _memory_due(trainer):
            memory[getattr(trainer.optimization, "block", 0) + 1] = _step_memory(trainer)
        if trainer.elapsed >= marks[0] or trainer.training_method.finished(trainer.optimization):
            while marks and trainer.elapsed >= marks[0]:
                marks.pop(0)
            curve.append({"seconds": trainer.elapsed, "iteration": trainer.iteration,
                          "val_nll": trainer.validate()["nll"]})
    return trainer, curve, memory


def _backprop_memory(trainer):
    """Peak step bytes of the trained FFJORD model with the adjoint switched off (backprop through
    every solver step, as an end-to-end stack without the adjoint would train)."""
    solvers = [block.train_solver for block in trainer.model.cnf_blocks()]
    for solver in solvers:
        solver.adjoint = False
    try:
        return _step_memory(trainer)
    finally:
        for solver in solvers:
            solver.adjoint = True


def _run(data, method, out, scale):
    budget = CASES[data]["budget"] * scale
    trainer, curve, memory = _train_for(_config(data, method, out, scale), budget)
    test = trainer.validate("test")
    parameters = sum(p.numel() for p in trainer.model.parameters())
    result = {"data": data, "method": method, "budget_seconds": budget, "train_seconds": trainer.elapsed,
              "iterations": trainer.iteration, "curve": curve, "test_nll": test["nll"], "eval_nfe": test["nfe"],
              "parameters": parameters, "peak_step_bytes": memory, "memory_method": memory_method("cpu")}
    if method == "ffjord":
        result["peak_step_bytes_without_adjoint"] = _backprop_memory(trainer)
    if method == "jko":
        schedule = trainer.optimization
        result.update(blocks=trainer.model.num_blocks, intervals=list(trainer.model.intervals),
                      movements=list(schedule.movements), phase=schedule.phase)
    return result


@pytest.mark.parametrize("method", ("ffjord", "jko"))
@pytest.mark.parametrize("data", tuple(CASES))
def test_jko_vs_ffjord(benchmark, data, method, tmp_path):
    benchmark.group = f"jko-vs-ffjord-{data}"
    scale = SMOKE_SCALE if benchmark.disabled else SCALE
    result = benchmark.pedantic(_run, args=(data, method, str(tmp_path / method), scale), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    RESULTS[(data, method)] = result
    assert math.isfinite(result["test_nll"])


def _megabytes(value):
    return f"{value / 2 ** 20:.1f}"


def teardown_module(module):
    if not RESULTS:
        return
    print(f"\n\nJKO-iFlow vs FFJORD at equal training time (1 CPU thread); validation NLL "
          f"(nats) at fractions {', '.join(f'{m:g}' for m in MARKS)} of the budget")
    print("| data | method | params | iterations | train s | val NLL over time | test NLL | peak MB/step |")
    print("|---|---|---|---|---|---|---|---|")
    for (data, method), r in RESULTS.items():
        curve = " / ".join(f"{point['val_nll']:.2f}@{point['seconds']:.0f}s" for point in r["curve"][1:])
        memory = ", ".join(_megabytes(value) for value in r["peak_step_bytes"].values())
        if method == "ffjord":
            memory += f" ({_megabytes(r['peak_step_bytes_without_adjoint'])} without adjoint)"
        if method == "jko":
            method = f"jko ({r['blocks']} blocks, {r['phase']})"
        print(f"| {data} | {method} | {r['parameters']} | {r['iterations']} | {r['train_seconds']:.0f} | {curve} | "
              f"{r['test_nll']:.3f} | {memory} |")
    for (data, method), r in RESULTS.items():
        if method == "jko":
            print(f"{data} jko intervals {[round(h, 3) for h in r['intervals']]}, movements "
                  f"{[None if m is None else round(m, 3) for m in r['movements']]}")
