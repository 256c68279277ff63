"""TPR (Huang & Yeh, AAAI 2021): do polynomial-regularized trajectories need fewer evaluations?

    python -m bench.reproduce.tpr [--iterations 2000] [--seeds 0 1 2] [--datasets 8gaussians checkerboard]
                                  [--jobs 2]

The paper claims 42.3%-71.3% fewer function evaluations in density estimation at unchanged test
loss. Its authors train TPR at atol = rtol = 1e-4 but their FFJORD baselines at 1e-5, so the arms
separate the regularizer from the looser tolerance (the same network, data, optimizer and seeds):

    A  FFJORD, trained at tolerance 1e-5             (the paper's baseline)
    B  FFJORD, trained at 1e-4                       (the looser tolerance alone)
    C  TPR, paper defaults, trained at 1e-4          (lambda 5, degree 1, K = 2, z only)
    D  TPR, fastcnf's previous defaults, at 1e-4     (degree 2, K = 4, z and log p, mean normalization)

D's previous penalty was the mean of the squared residual over every entry of the (M, B, D + 1)
array of times, samples and (z, log p) entries, i.e. sum / (M B (D + 1)); the paper's
normalization is sum / (M B). The same loss is therefore ``tpr_weight = 5 / (D + 1)`` (5/3 for
2-D data) with ``tpr_logp=True``, ``tpr_degree=2``, ``tpr_times=4``.

Shared settings (the authors' toy set-up where the issue does not fix them): concatsquash
64-64-64 tanh, one block, T = 0.5 fixed, exact divergence, dopri5 through the adjoint, batch 512,
Adam lr 1e-3 with weight decay 1e-5; validation and test at rtol = atol = 1e-5 on held-out points.

After training, every run measures (``TPRHooks.finish``) the training NFE of its final model on 8
fixed batches with the adjoint's carried step size (``carry_step_size=True``, fastcnf's default)
and restarted per output interval (``False``, as torchdiffeq and the authors' code do), and its
trajectories on 1000 test points: the mean acceleration |d^2 z/dt^2| along t and the residual of
a straight-line fit on 41 times (the paper's penalty at degree 1 on a dense grid).

Runtime (2-core AMD EPYC, one torch thread per run, CPU time of the training thread; fastcnf at 90abcea):
the full protocol (2 datasets x 4 arms x 3 seeds x 2000 iterations) took 3.1 h of training CPU time and 2.1 h
of wall time with ``--jobs 2``. A run of arm A took 480-700 s of training (8gaussians 0.30 s/it at the end, the
NFE growing from about 45 to 110 per iteration over training; checkerboard 0.25 s/it); B, C and D cost about
0.7, 0.85 and 0.95 times A. Shorter runs (``--iterations``) keep every arm, dataset and seed; at 400
iterations the flows are far from converged.

Any dataset of ``fastcnf.training.data`` can be named: on a GPU, ``--device cuda --datasets digits``
runs the same arms on 64-d digits (Hutchinson divergence in training and evaluation, D's weight
5/65), timed by the wall clock.
"""


import numpy as np
import torch

from fastcnf.cnf.regularizers import TrajectoryPolynomial
from fastcnf.stats import track
from fastcnf.training.data import load_dataset

from .cli import budget_from, protocol_main, select
from .harness import Arm, ArmHooks, Protocol
from .report import (STANDARD_COLUMNS, Column, MethodReport, last_fraction_mean, mean_band_plot, pyplot, save_figure,
                     spread)

__all__ = ["DATASETS", "BASE", "arms", "build_protocol", "previous_defaults", "TPRHooks", "TPRReport", "REPORT",
           "main"]

DATASETS = ("8gaussians", "checkerboard")
SEEDS = (0, 1, 2)
ITERATIONS = 2000
BASE = dict(hidden=(64, 64, 64), layer="concatsquash", activation="tanh", blocks=1, end_time=0.5, solver="dopri5",
            adjoint=True, divergence="auto", batch_size=512, lr=1e-3, weight_decay=1e-5)
EVAL_TOLERANCE = 1e-5
MEASURE_BATCHES = 8  # fixed batches for the end-of-training NFE measurement
MEASURE_SEED = 10_000  # their sampler's seed, and the seed of TPR's random times there
PROFILE_POINTS, PROFILE_TIMES = 1000, 41
NFE_TARGET, NLL_TARGET = 0.40, 0.02


def previous_defaults(dim):
    """fastcnf's TPR before the paper's normalization, as settings of the new one (see the module doc)."""
    return dict(tpr_weight=5.0 / (dim + 1), tpr_degree=2, tpr_times=4, tpr_logp=True)


def arms(datasets, hooks=None):
    hooks = TPRHooks() if hooks is None else hooks
    result = []
    for dataset in datasets:
        dim = load_dataset(dataset).dim
        result += [
            Arm("A", dataset, dict(method="ffjord", rtol=1e-5, atol=1e-5), "FFJORD, tol 1e-5", hooks),
            Arm("B", dataset, dict(method="ffjord", rtol=1e-4, atol=1e-4), "FFJORD, tol 1e-4", hooks),
            Arm("C", dataset, dict(method="tpr", rtol=1e-4, atol=1e-4, tpr_weight=5.0, tpr_degree=1, tpr_times=2,
                                   tpr_logp=False), "TPR paper (λ 5, p 1, K 2, z), tol 1e-4", hooks),
            Arm("D", dataset, dict(method="tpr", rtol=1e-4, atol=1e-4, **previous_defaults(dim)),
                f"TPR previous (λ 5/{dim + 1}, p 2, K 4, z+logp), tol 1e-4", hooks),
        ]
    return tuple(result)


def build_protocol(args):
    return Protocol("tpr", select(arms(args.datasets), args), seeds=tuple(args.seeds), budget=budget_from(args),
                    base=BASE, eval_tolerance=EVAL_TOLERANCE, device=args.device)


# ---------------------------------------------------------------------------------- measurements
class TPRHooks(ArmHooks):
    """End-of-training measurements of every arm: NFE with and without the carried adjoint step
    size on fixed batches, and the trajectories' acceleration and straight-line residual."""

    def finish(self, trainer):
        with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
            return {"end_nfe": {name: measure_nfe(trainer, carry) for name, carry in (("carry", True),
                                                                                      ("restart", False))},
                    "trajectory": trajectory_profile(trainer.model, trainer.dataset.test[:PROFILE_POINTS])}


def measure_nfe(trainer, carry_step_size, batches=MEASURE_BATCHES):
    """Mean forward and backward NFE of one training iteration's loss and gradient (no update) on
    fixed batches, with the adjoint's ``carry_step_size`` set as given; same TPR times for every call."""
    model, method = trainer.model, trainer.training_method
    blocks = model.cnf_blocks()
    saved = [block.train_solver.adjoint_options for block in blocks]
    sampler = trainer.dataset.sampler(trainer.config.batch_size, MEASURE_SEED)
    torch.manual_seed(MEASURE_SEED)
    forward, backward = [], []
    try:
        for block in blocks:
            block.train_solver.adjoint_options = {**(block.train_solver.adjoint_options or {}),
                                                  "carry_step_size": carry_step_size}
        model.train()
        for _ in range(batches):
            batch = sampler.next().to(trainer.device)
            with track() as stats:
                loss, _ = method.loss(model, batch)
                loss.backward()
            model.zero_grad(set_to_none=True)
            forward.append(stats.nfe_forward)
            backward.append(stats.nfe_backward)
    finally:
        for block, options in zip(blocks, saved):
            block.train_solver.adjoint_options = options
    return {"forward": float(np.mean(forward)), "backward": float(np.mean(backward)), "batches": batches}


def trajectory_profile(model, points, num_times=PROFILE_TIMES):
    """Trajectories of ``points`` through each block at the evaluation tolerance: the mean over points
    of |d^2 z/dt^2| = |df/dt + (df/dz) f| at ``num_times`` times per block (normalized time s in
    [k, k + 1] for block k) and the straight-line residual of z on that grid (paper normalization)."""
    model.eval()
    device = next(model.parameters()).device
    z = points.to(device)
    fractions = torch.linspace(0.0, 1.0, num_times, dtype=torch.float64)
    line = TrajectoryPolynomial(degree=1, num_times=num_times - 2)
    times_out, acceleration, residual = [], [], 0.0
    with torch.no_grad():
        for index, block in enumerate(model.cnf_blocks()):
            end = float(block.end_time())
            path = block.test_solver.solve(block.net, z, (fractions * end).to(device))
            residual += float(line.penalty(fractions, path.double()))
            for fraction, state in zip(fractions, path):
                t = torch.tensor(float(fraction) * end, dtype=state.dtype, device=device)
                f = block.net(t, state)
                _, second = torch.func.jvp(block.net, (t, state), (torch.ones_like(t), f))
                acceleration.append(float(second.norm(dim=1).mean()))
                times_out.append(index + float(fraction))
            z = path[-1]
    model.train()
    return {"fractions": times_out, "acceleration": acceleration, "linear_residual": residual,
            "points": int(points.shape[0])}


# ---------------------------------------------------------------------------------------- report
def training_nfe(run):
    """Forward + backward NFE per iteration over the last 20% of training."""
    return last_fraction_mean(run, "nfe_forward") + last_fraction_mean(run, "nfe_backward")


def end_nfe(setting, part=None):
    def value(run):
        counts = run.summary["hooks"]["end_nfe"][setting]
        return counts["forward"] + counts["backward"] if part is None else counts[part]
    return value


def _penalty(run):
    return last_fraction_mean(run, "trajectory_polynomial") if "trajectory_polynomial" in run.train else None


TRAINING_TABLE = (STANDARD_COLUMNS[:3] + (Column("NFE fwd+bwd/it (last 20%)", training_nfe, ".1f"),) +
                  STANDARD_COLUMNS[3:])
END_TABLE = (
    Column("fwd (carry)", end_nfe("carry", "forward"), ".1f"),
    Column("bwd (carry)", end_nfe("carry", "backward"), ".1f"),
    Column("fwd+bwd (carry)", end_nfe("carry"), ".1f"),
    Column("bwd (restart)", end_nfe("restart", "backward"), ".1f"),
    Column("fwd+bwd (restart)", end_nfe("restart"), ".1f"),
    Column("line-fit residual", lambda run: run.summary["hooks"]["trajectory"]["linear_residual"], ".3g"),
    Column("TPR penalty (last 20%)", _penalty, ".3g"),
)


def _arm_values(runs, name, value):
    return [value(run) for run in runs if run.summary["arm"] == name]


def _change(new, old):
    """Relative change new / old - 1 (-0.4: 40% fewer)."""
    return new / old - 1.0


class TPRReport(MethodReport):
    method = "tpr"
    heading = "TPR: trajectory polynomial regularization (Huang & Yeh, AAAI 2021)"

    def tables(self):
        return [("Training (per-iteration NFE over the last 20% of training; test NLL at tolerance 1e-5)",
                 TRAINING_TABLE),
                ("The final models' training NFE on 8 fixed batches, with the adjoint's step size carried across "
                 "TPR's output times (carry, fastcnf's default) and restarted per interval (restart, as "
                 "torchdiffeq and the authors' code); trajectory straightness on 1000 test points", END_TABLE)]

    def preamble(self, runs):
        first = runs[0].summary
        iterations = sorted({run.summary["iterations"] for run in runs})
        seeds = sorted({run.summary["seed"] for run in runs})
        datasets = sorted({run.summary["dataset"] for run in runs})
        full = iterations[0] >= ITERATIONS and len(seeds) >= len(SEEDS) and set(DATASETS) <= set(datasets)
        cpu_hours = sum(run.summary["train_cpu_seconds"] for run in runs) / 3600
        wall_hours = sum(run.summary["total_wall_seconds"] for run in runs) / 3600
        scale = ("the full protocol" if full else
                 f"**a scaled-down run, not the protocol** (which asks for {ITERATIONS} iterations, seeds "
                 f"{list(SEEDS)}, datasets {list(DATASETS)}); targets below are read on it only provisionally")
        return "\n".join([
            "Claim: 42.3%-71.3% fewer function evaluations in density estimation at unchanged test loss. The "
            "authors train TPR at tolerance 1e-4 but FFJORD at 1e-5; the arms separate the two effects.",
            "",
            "- A: FFJORD at tolerance 1e-5 (the paper's baseline); B: FFJORD at 1e-4; C: TPR with the paper's "
            "settings (λ = 5, degree 1, K = 2 random times plus the end points, z only) at 1e-4; D: TPR with "
            "fastcnf's previous defaults (degree 2, K = 4, z and log p, the penalty a mean over entries) at 1e-4, "
            "expressed as λ = 5/(D+1) in the paper's normalization.",
            "- Shared: concatsquash 64-64-64 tanh, T = 0.5, exact divergence, dopri5 with the adjoint, batch 512, "
            "Adam lr 1e-3, weight decay 1e-5; validation (2000 points) and test (5000 points) at rtol = atol = "
            "1e-5. Code: `bench/reproduce/tpr.py`.",
            f"- This report: {', '.join(datasets)}; seeds {seeds}; {', '.join(map(str, iterations))} iterations "
            f"per run; {first['jobs']} run(s) at a time; {first['machine']}; torch {first['torch']}, "
            f"{first['threads']} thread(s). That is {scale}.",
            f"- Time spent: {cpu_hours:.2f} h of training CPU time, {wall_hours:.2f} h of wall time including "
            "evaluation (summed over runs). The full protocol, `python -m bench.reproduce.tpr --jobs 2`, took 3.1 h "
            "of training CPU time and 2.1 h of wall time on the 2-core machine (`bench/reproduce/tpr.py`).",
        ])

    def findings(self, runs):
        lines = ["### Targets", ""]
        for dataset in sorted({run.summary["dataset"] for run in runs}):
            subset = [run for run in runs if run.summary["dataset"] == dataset]
            present = {run.summary["arm"] for run in subset}
            if not {"A", "B", "C"} <= present:
                lines.append(f"- {dataset}: arms A, B and C are needed for the targets; not all ran.")
                continue
            lines += self._targets(dataset, subset)
        lines += ["", "Definitions: training NFE = forward + backward evaluations per iteration over the last 20% of "
                  "training (mean over seeds); 'restart' = the same count measured on the final models with "
                  "`adjoint_options=dict(carry_step_size=False)`. Target 1: C has at least 40% fewer training NFE "
                  "than A and a test NLL at most 0.02 nats above A's. Target 2: B's mean NFE exceeds C's by more "
                  "than the larger of the two arms' standard deviations over seeds."]
        return "\n".join(lines)

    def _targets(self, dataset, runs):
        lines = []
        nll = {arm: spread(_arm_values(runs, arm, lambda run: run.summary["test"]["nll"]))[0] for arm in "ABC"}
        seeds = min(len(_arm_values(runs, arm, training_nfe)) for arm in "BC")
        missed = False
        for what, value in (("training NFE", training_nfe), ("restart NFE", end_nfe("restart"))):
            stats = {arm: spread(_arm_values(runs, arm, value)) for arm in "ABC"}
            change = _change(stats["C"][0], stats["A"][0])
            first = change <= -NFE_TARGET and nll["C"] - nll["A"] <= NLL_TARGET
            gap, noise = stats["B"][0] - stats["C"][0], max(stats["B"][1], stats["C"][1])
            second = ("needs at least 2 seeds" if seeds < 2 else "met" if gap > noise else "missed")
            lines.append(
                f"- {dataset}, {what}: C {stats['C'][0]:.1f} vs A {stats['A'][0]:.1f}, a change of {change:+.1%} "
                f"(target -40% or better), test NLL C - A = {nll['C'] - nll['A']:+.3f} nats: target 1 "
                f"**{'met' if first else 'missed'}**. B - C = {gap:+.1f} against a seed spread (std) of "
                f"{noise:.1f}: target 2 **{second}**. The looser tolerance alone (B vs A): "
                f"{_change(stats['B'][0], stats['A'][0]):+.1%}.")
            missed = missed or not first or second == "missed"
        if missed:
            lines.append(f"- {dataset}, why: {self._diagnosis(runs)}")
        return lines

    @staticmethod
    def _diagnosis(runs):
        def mean(arm, value):
            return spread(_arm_values(runs, arm, value))[0]

        forward = {arm: mean(arm, lambda run: last_fraction_mean(run, "nfe_forward")) for arm in "ABC"}
        backward = {arm: mean(arm, lambda run: last_fraction_mean(run, "nfe_backward")) for arm in "ABC"}
        residual = {arm: mean(arm, lambda run: run.summary["hooks"]["trajectory"]["linear_residual"]) for arm in "ABC"}
        peak = {arm: mean(arm, lambda run: max(run.summary["hooks"]["trajectory"]["acceleration"])) for arm in "ABC"}
        return (f"C vs A changes the forward NFE by {_change(forward['C'], forward['A']):+.1%} and the backward NFE "
                f"by {_change(backward['C'], backward['A']):+.1%} (C vs B: {_change(forward['C'], forward['B']):+.1%} "
                f"and {_change(backward['C'], backward['B']):+.1%}); the final trajectories' straight-line residual "
                f"is A {residual['A']:.3g}, B {residual['B']:.3g}, C {residual['C']:.3g} and their peak mean "
                f"acceleration A {peak['A']:.3g}, B {peak['B']:.3g}, C {peak['C']:.3g} (NFE per iteration and "
                "acceleration plots above).")

    def plots(self, runs, dataset, directory):
        path = f"{directory}/{dataset}-trajectories.png"
        plt = pyplot()
        figure, axis = plt.subplots(figsize=(7, 4.5))
        mean_band_plot(axis, runs, lambda run: (run.summary["hooks"]["trajectory"]["fractions"],
                                                run.summary["hooks"]["trajectory"]["acceleration"]))
        axis.set_xlabel("t / T")
        axis.set_ylabel("mean |d²z/dt²| over 1000 test points")
        axis.set_title(f"{dataset}: trajectory acceleration of the final models")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        save_figure(figure, path)
        return [("acceleration along the trajectories (why the NFE differ)", path)]


REPORT = TPRReport()


def main(argv=None):
    return protocol_main("tpr", __doc__, build_protocol, REPORT, argv, datasets=DATASETS, seeds=SEEDS,
                         iterations=ITERATIONS)


if __name__ == "__main__":
    raise SystemExit(main())
