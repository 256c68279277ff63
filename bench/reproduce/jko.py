"""JKO-iFlow (Xu, Cheng & Xie, NeurIPS 2023): block-wise training against FFJORD with the adjoint.

    python -m bench.reproduce.jko [--seeds 0 1 2] [--datasets 8gaussians checkerboard digits] [--jobs 1]
                                  [--jko-iterations 8gaussians=1200 ...] [--validations 10] [--mmd-points 2000]

The paper claims sample quality similar to or better than other flows at a much lower compute and
memory cost. Every run of a dataset shares its data, batch, seed and evaluation; the arms:

    G   JKO-iFlow, grow only: K blocks, each trained alone through the adjoint on its JKO step
    R   JKO-iFlow, grow + one round of damped time reparameterization (eta 0.5) and fine-tuning
    RR  JKO-iFlow, grow + reparameterization + refinement of the selected blocks (those moving at
        least the mean movement, each split in two) and fine-tuning from the first split block
    F   FFJORD, one CNF block, dopri5 at rtol = atol = 1e-4, the adjoint, exact divergence in 2-D
        (Hutchinson on digits), given JKO's training time: it runs after the JKO arms of its
        (dataset, seed), for the longest training time they took on the budget clock

The JKO arms end when their schedule ends and spend the same total number of iterations
(``--jko-iterations`` per dataset): G on growing, R half on growing and half on the re-spaced
fine-tuning pass, RR a third on each pass (its refinement pass fine-tunes more blocks, so it can
use a little more). So the arms compare the passes at equal training cost, not by adding training.
``--seconds``/``--iterations`` are refused: the schedules and the measured JKO time set every
budget. The budget clock (``--clock``) is the CPU time of the training thread by default on CPU,
which other processes disturb little, so ``--jobs 2`` may share the machine; with ``--clock wall``
(the default on CUDA) use ``--jobs 1`` so that wall time is not shared.

Runtime (2-core AMD EPYC, one torch thread per run): the full protocol (the defaults) took 74 minutes
with ``--jobs 2`` while tests and profiles shared the machine (load 2-4): 1.41 h of training CPU time
and 2.36 h of wall time including evaluation, summed over the 36 runs (a 2-D JKO arm about 135-170 s of training CPU, a
digits arm 115-120 s). A scaled-down run for a first look (about 33 minutes with ``--jobs 1``):

    python -m bench.reproduce.jko --jko-iterations 8gaussians=280 checkerboard=280 digits=140 \
        --validations 4 --mmd-points 1000

Every model is evaluated the same way: test NLL with dopri5 at rtol = atol = 1e-6 (JKO-iFlow's
blocks are trained with 4 rk4 steps but evaluated with dopri5), MMD^2 between ``--mmd-points``
(2000) model samples and as many test points (Gaussian kernel, median bandwidth of the pooled
points, unbiased estimate; ``fastcnf.training.mmd``), peak tensor memory of one training step
(forward and backward; torch profiler on CPU, measured at iteration 10 and every 500 iterations,
outside the training clock), training CPU and wall time, iterations. Samples of seed 0 are drawn as pictures.

Shared settings: concatsquash 64-64-64 (FFJORD tanh, T = 0.5; JKO softplus) on the 2-D sets,
256-256 on digits (8x8, dequantized); batch 512 (digits 256); Adam. FFJORD's learning rate is
1e-3 (digits 2e-3). The JKO arms deviate from the authors' code where a CPU budget forces it, and
say so in the report: learning rate 1e-3 instead of 1e-4 (the authors train 10,000-20,000
iterations per block at batch 2000; here a block gets a few hundred), h_k = 0.5 * 1.3^k with K = 6
blocks (tolerance 0: a fixed K keeps the arms' costs equal), gradient norm clipped at 1, the
training pool 20,000 points (2-D) or the 1437 training digits. The JKO blocks use the authors'
unit block time (each block over [0, 1], h_k weighting the penalty only): a reparameterized h_k
then changes the penalty, not the map a block computes. (A smoke run, 60 iterations per arm, seed
0: on digits the interval convention gave test NLL 271 (G) and 3328 (R), unit time 56.8 and 59.0;
on 8gaussians 4.87/5.71 against 4.83/5.47.)
"""

import copy
import dataclasses
import math
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch

from bench.measure import peak_memory_bytes

from fastcnf.training.mmd import mmd2

from .cli import protocol_parser, select
from .harness import Arm, ArmHooks, Budget, Protocol, run_arm
from .report import Column, MethodReport, arms_of, save_figure, spread, write_report

__all__ = ["DATASETS", "SEEDS", "JKO_ITERATIONS", "arms", "build_protocol", "run", "jko_budget", "ffjord_budget",
           "time_to_reach", "growth_and_final_nll", "JKOHooks", "JKOReport",
           "REPORT", "main"]

DATASETS = ("8gaussians", "checkerboard", "digits")
SEEDS = (0, 1, 2)
VALIDATIONS = 10  # validation points over a run (the start excluded)
ITERATION_BOUND = 2  # a JKO arm's iteration cap, in multiples of its scheduled total (never reached)
JKO_ITERATIONS = {"8gaussians": 1200, "checkerboard": 1200, "digits": 600}  # total per JKO arm
BLOCKS = 6
EVAL_TOLERANCE = 1e-6
MMD_POINTS = 2000
PICTURE_POINTS = {"digits": 64}
MEMORY_FIRST, MEMORY_EVERY = 10, 500
NLL_MARGIN, TIME_RATIO = 0.05, 0.5  # targets on the 2-D sets

TWO_D = dict(hidden=(64, 64, 64), layer="concatsquash", batch_size=512)
DIGITS = dict(hidden=(256, 256), layer="concatsquash", batch_size=256)
FFJORD = dict(method="ffjord", activation="tanh", blocks=1, end_time=0.5, solver="dopri5", rtol=1e-4, atol=1e-4,
              adjoint=True)
JKO = dict(method="jko", activation="softplus", adjoint=True, jko_block_time="unit", jko_solver="rk4", jko_steps=4,
           jko_h0=0.5, jko_rho=1.3,
           jko_max_blocks=BLOCKS, jko_tolerance=0.0, jko_clip=1.0, jko_eta=0.5, jko_refine_threshold=1.0,
           divergence="hutchinson-gaussian")


def _schedules(total):
    """Stage lengths of the JKO arms that spend about ``total`` iterations each (see the module doc)."""
    grow = max(2, total // BLOCKS)
    half = max(2, total // (2 * BLOCKS))
    third = max(2, total // (3 * BLOCKS))
    return {
        "G": dict(jko_block_iterations=grow, jko_finetune_iterations=grow),
        "R": dict(jko_block_iterations=half, jko_finetune_iterations=half, jko_reparameterize=True),
        "RR": dict(jko_block_iterations=third, jko_finetune_iterations=third, jko_reparameterize=True,
                   jko_refine=True),
    }


LABELS = {
    "F": "FFJORD, dopri5 1e-4, adjoint",
    "G": "JKO-iFlow, grow only",
    "R": "JKO-iFlow + reparameterization",
    "RR": "JKO-iFlow + reparameterization + refinement",
}


def arms(datasets, jko_iterations=None, hooks=None):
    hooks = JKOHooks() if hooks is None else hooks
    jko_iterations = {**JKO_ITERATIONS, **(jko_iterations or {})}
    result = []
    for dataset in datasets:
        digits = dataset == "digits"
        shape = DIGITS if digits else TWO_D
        ffjord = dict(FFJORD, lr=2e-3 if digits else 1e-3,
                      divergence="hutchinson-gaussian" if digits else "exact")
        result.append(Arm("F", dataset, {**shape, **ffjord}, LABELS["F"], hooks))
        for name, schedule in _schedules(jko_iterations[dataset]).items():
            result.append(Arm(name, dataset, {**shape, **JKO, "lr": 1e-3, **schedule}, LABELS[name], hooks))
    return tuple(result)


def _iterations_option(text):
    name, _, value = text.partition("=")
    if not value or not value.isdigit() or int(value) < BLOCKS:
        raise ValueError(f"expected DATASET=ITERATIONS with ITERATIONS >= {BLOCKS}, got {text!r}")
    return name, int(value)


def add_options(parser):
    parser.add_argument("--jko-iterations", dest="jko_iterations", nargs="+", type=_iterations_option, default=[],
                        metavar="DATASET=N", help="total iterations of every JKO arm on a dataset (default "
                                                  + ", ".join(f"{k}={v}" for k, v in JKO_ITERATIONS.items()) + ")")
    parser.add_argument("--mmd-points", dest="mmd_points", type=int, default=MMD_POINTS,
                        help=f"model samples and test points of the MMD (default {MMD_POINTS})")
    parser.set_defaults(validations=VALIDATIONS)


def build_protocol(args):
    """Every arm in report order, with the JKO arms' budget: the iterations of the longest JKO
    schedule (each JKO arm ends with its own schedule). The FFJORD arms run afterwards with a
    budget of their own on the same clock (``ffjord_budget``); see ``run``."""
    if args.seconds is not None or args.iterations is not None:
        raise SystemExit("bench.reproduce.jko sets its own budgets: the JKO arms run their schedules "
                         "(--jko-iterations) and FFJORD gets their measured training time; drop "
                         "--seconds/--iterations.")
    hooks = JKOHooks(getattr(args, "mmd_points", MMD_POINTS))
    chosen = select(arms(args.datasets, dict(args.jko_iterations), hooks), args)
    cap = max([ITERATION_BOUND * max(jko_iterations(args, arm.dataset), BLOCKS) for arm in chosen], default=1)
    return Protocol("jko", chosen, seeds=tuple(args.seeds),
                    budget=Budget(iterations=cap, validations=args.validations, clock=budget_clock(args)),
                    base=dict(test_solver="dopri5"), eval_tolerance=EVAL_TOLERANCE, device=args.device)


def budget_clock(args):
    """The clock that times FFJORD's budget: ``--clock``, else training-thread CPU time on CPU and
    wall time on CUDA (as every protocol)."""
    return getattr(args, "clock", None) or ("wall" if args.device.startswith("cuda") else "thread")


def jko_iterations(args, dataset):
    return {**JKO_ITERATIONS, **dict(args.jko_iterations)}[dataset]


def jko_budget(protocol, arm, total):
    """The budget of a JKO arm: an iteration cap its schedule of ``total`` iterations never reaches
    (refinement adds blocks), so the schedule ends the run; validations spread over ``total``."""
    return Budget(iterations=ITERATION_BOUND * total, validations=ITERATION_BOUND * protocol.budget.validations,
                  clock=protocol.budget.clock)


def ffjord_budget(protocol, jko_summaries):
    """FFJORD's budget on one (dataset, seed): the longest training time of that pair's JKO arms on
    the protocol's clock (the report reads FFJORD's NLL at half of it from its validation curve)."""
    clock = protocol.budget.clock
    seconds = max(train_seconds(summary) for summary in jko_summaries)
    return Budget(seconds=seconds, validations=protocol.budget.validations, clock=clock)


def _run(task):
    protocol, arm, seed, root, jobs = task
    return run_arm(protocol, arm, seed, root, jobs)


def _map(tasks, jobs):
    if jobs == 1:
        return [_run(task) for task in tasks]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_run, tasks))


def run(protocol, root, args, jobs=1):
    """The JKO arms (each to the end of its schedule), then every FFJORD arm with the training time
    its (dataset, seed)'s JKO arms took. Finished runs are skipped, as in ``harness.run_protocol``."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}.")
    tasks, ffjord = [], []
    for seed in protocol.seeds:
        for arm in protocol.arms:
            if arm.name == "F":
                ffjord.append((arm, seed))
                continue
            total = jko_iterations(args, arm.dataset)
            tasks.append((dataclasses.replace(protocol, budget=jko_budget(protocol, arm, total)), arm, seed, root,
                          jobs))
    summaries = _map(tasks, jobs)
    by_pair = {}
    for summary in summaries:
        by_pair.setdefault((summary["dataset"], summary["seed"]), []).append(summary)
    tasks = []
    for arm, seed in ffjord:
        jko_runs = by_pair.get((arm.dataset, seed))
        if not jko_runs:
            raise SystemExit(f"FFJORD on {arm.dataset} seed {seed} needs a JKO arm to time it; add one to --arms.")
        tasks.append((dataclasses.replace(protocol, budget=ffjord_budget(protocol, jko_runs)), arm, seed, root, jobs))
    return summaries + _map(tasks, jobs)


# ---------------------------------------------------------------------------------- measurements
def _fork(trainer):
    return torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else [])


def step_peak_bytes(trainer):
    """Peak tensor memory of one training step's forward and backward pass (no update), on the next
    batch of a copy of the sampler, with the RNG forked: the run itself is not changed."""
    batch = copy.deepcopy(trainer.sampler).next().to(trainer.device)
    method, model = trainer.training_method, trainer.model
    if hasattr(trainer.optimization, "block"):  # JKO-iFlow: only the block being trained has gradients
        if trainer.optimization.finished:
            return None
        trainer.optimization.begin(trainer.iteration)

    def step():
        loss, _ = method.loss(model, batch)
        loss.backward()

    with _fork(trainer):
        peak = peak_memory_bytes(step, trainer.device)
    model.zero_grad(set_to_none=True)
    return peak


class JKOHooks(ArmHooks):
    """Per-run measurements: step memory in the iteration rows, MMD of ``mmd_points`` samples against
    as many test points and the samples themselves (for the pictures) at the end."""

    def __init__(self, mmd_points=MMD_POINTS):
        self.mmd_points = mmd_points

    def row(self, trainer, row):
        due = trainer.iteration == MEMORY_FIRST or (trainer.iteration > MEMORY_FIRST and
                                                    trainer.iteration % MEMORY_EVERY == 0)
        peak = step_peak_bytes(trainer) if due else None
        return {"step_peak_bytes": float("nan") if peak is None else float(peak)}

    def finish(self, trainer):
        model = trainer.model.eval()
        test = trainer.dataset.test
        with _fork(trainer), torch.no_grad():
            torch.manual_seed(trainer.config.seed + 20_000)
            samples = model.sample(self.mmd_points).cpu()
        reference = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:self.mmd_points]]
        mmd = mmd2(samples, reference)
        picture = samples[:PICTURE_POINTS.get(trainer.config.data, self.mmd_points)]
        model.train()
        extra = {"mmd2": mmd, "mmd_points": [len(samples), len(reference)],
                 "samples": [[round(float(v), 4) for v in point] for point in picture.reshape(len(picture), -1)]}
        if hasattr(model, "intervals"):
            extra.update(blocks=model.num_blocks, intervals=list(model.intervals),
                         history=trainer.optimization.history)
        return extra


# ---------------------------------------------------------------------------------------- report
def _peak_mb(run):
    values = run.train.get("step_peak_bytes")
    if values is None:
        return None
    values = values[np.isfinite(values)]
    return float(values.max()) / 2 ** 20 if len(values) else None


def _nll(run):
    return run.summary["test"]["nll"]


def _mmd(run):
    return run.summary["hooks"]["mmd2"]


def _cpu(run):
    return run.summary["train_cpu_seconds"]


COLUMNS = (
    Column("test NLL (dopri5 1e-6)", _nll),
    Column("MMD² x 1e3", lambda run: 1e3 * _mmd(run)),
    Column("peak MB / step", _peak_mb),
    Column("train CPU s", _cpu),
    Column("train wall s", lambda run: run.summary["train_wall_seconds"]),
    Column("iterations", lambda run: run.summary["iterations"]),
    Column("blocks", lambda run: run.summary["hooks"].get("blocks", 1)),
    Column("eval NFE", lambda run: run.summary["test"]["nfe"]),
)


def _clock_key(summary):
    """The time column of a run's budget clock: training-thread CPU seconds or wall seconds."""
    return "cpu_seconds" if summary["budget"]["clock"] == "thread" else "wall_seconds"


def train_seconds(summary):
    """A run's training time on its budget clock."""
    return summary["train_" + _clock_key(summary)]


def _seconds(run):
    return train_seconds(run.summary)


def _clock_words(runs):
    """'CPU' or 'wall': the budget clock of ``runs`` (one protocol run uses one clock)."""
    clocks = {run.summary["budget"]["clock"] for run in runs}
    if len(clocks) != 1:
        raise ValueError(f"runs on different budget clocks {sorted(clocks)}; report them from separate roots.")
    return "CPU" if clocks == {"thread"} else "wall"


def _mb(value):
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f} MB"


def time_to_reach(run, nll):
    """Training time (budget clock) of the first validation point of ``run`` at or below ``nll``
    (None: never)."""
    below = np.flatnonzero(run.validation["nll"] <= nll)
    return float(run.validation[_clock_key(run.summary)][below[0]]) if len(below) else None


def growth_and_final_nll(run):
    """(validation NLL at the last validation point within the growing pass, final validation NLL) of a JKO run:
    what the passes after growing (reparameterization, refinement) changed."""
    grown_at = BLOCKS * run.summary["config"]["jko_block_iterations"]
    iterations, nll = run.validation["iteration"], run.validation["nll"]
    return float(nll[np.flatnonzero(iterations <= grown_at)[-1]]), float(nll[-1])


def _by_arm(runs):
    return {name: group for name, _, group in arms_of(runs)}


def _mean_std(runs, value):
    """(mean, std) over the runs; (nan, nan) when a run has no value (e.g. no step memory measured)."""
    values = [value(run) for run in runs]
    if any(v is None for v in values):
        return float("nan"), float("nan")
    mean, std, _, _ = spread(values)
    return mean, std


class JKOReport(MethodReport):
    method = "jko"
    heading = "JKO-iFlow: block-wise training (Xu, Cheng & Xie, NeurIPS 2023)"

    def columns(self):
        return COLUMNS

    def tables(self):
        return [("", COLUMNS)]

    def preamble(self, runs):
        first = runs[0].summary
        seeds = sorted({run.summary["seed"] for run in runs})
        datasets = sorted({run.summary["dataset"] for run in runs})
        totals = {run.summary["dataset"]: BLOCKS * run.summary["config"]["jko_block_iterations"]
                  for run in runs if run.summary["arm"] == "G"}
        full = (len(seeds) >= len(SEEDS) and set(DATASETS) <= set(datasets)
                and all(totals.get(name, 0) >= JKO_ITERATIONS[name] for name in DATASETS))
        cpu_hours = sum(run.summary["train_cpu_seconds"] for run in runs) / 3600
        wall_hours = sum(run.summary["total_wall_seconds"] for run in runs) / 3600
        scale = ("the full protocol" if full else
                 "**a scaled-down run, not the protocol** (which is "
                 + ", ".join(f"{k}={v}" for k, v in JKO_ITERATIONS.items())
                 + f" JKO iterations, seeds {list(SEEDS)}); the targets below are read on it only provisionally")
        iterations = ", ".join(f"{name} {total}" for name, total in sorted(totals.items()))
        clock = _clock_words(runs)
        return "\n".join([
            "Claim: sample quality similar to or better than other flows at a significantly reduced computational "
            "and memory cost. Arms (code and settings: `bench/reproduce/jko.py`):",
            "",
            "- G: JKO-iFlow, "
            f"{BLOCKS} blocks grown one at a time (each trained alone through the adjoint, 4 rk4 steps, "
            "Hutchinson divergence, unit block time: h_k weights the penalty), h_k = 0.5·1.3^k. R: the same "
            "total iterations, half on growing, half on fine-tuning after one damped reparameterization step "
            "(eta 0.5). RR: a third each on growing, the reparameterized pass and a refinement pass (blocks "
            "moving at least the mean movement split in two). "
            "F: FFJORD, one block, dopri5 at 1e-4 with the adjoint, run after the JKO arms for the longest "
            f"training {clock} time of the JKO arms of the same dataset and seed (equal {clock} time).",
            "- Every model: test NLL with dopri5 at 1e-6; MMD² of the model's samples against as many test points "
            "(Gaussian kernel, median bandwidth, unbiased); peak memory of one training step (profiler, max over "
            f"the measured iterations); training CPU time of the training thread and wall time ({clock} time is the "
            "budget clock).",
            "- Deviations from the authors' code forced by the CPU budget: lr 1e-3 (not 1e-4), a few hundred "
            "iterations per block (not 10,000-20,000 at batch 2000), a fixed number of blocks.",
            f"- This report: {', '.join(datasets)}; seeds {seeds}; JKO iterations per arm: {iterations}; "
            f"{first['jobs']} run(s) at a time; {first['machine']}; torch {first['torch']}, {first['threads']} "
            f"thread(s). That is {scale}.",
            f"- Time spent: {cpu_hours:.2f} h of training CPU time, {wall_hours:.2f} h of wall time including "
            "evaluation (summed over runs).",
        ])

    def findings(self, runs):
        lines = ["### Targets", ""]
        for dataset in sorted({run.summary["dataset"] for run in runs}):
            groups = _by_arm([run for run in runs if run.summary["dataset"] == dataset])
            if "F" not in groups or not {"G", "R", "RR"} & set(groups):
                lines.append(f"- {dataset}: arm F and a JKO arm are needed; not all ran.")
                continue
            lines += self._speed_targets(dataset, groups) + self._pass_targets(dataset, groups)
        clock = _clock_words(runs)
        lines += ["", f"Definitions. Target 1 (2-D sets): F trains for the JKO arms' {clock} time T. "
                  "A JKO arm meets it "
                  f"when, on every seed, its validation NLL reaches F's final validation NLL + {NLL_MARGIN} nats by "
                  f"{TIME_RATIO}·T (the first validation point at or below it; validation: dopri5 1e-6 on 2000 "
                  "held-out points), and its mean peak step memory is at most F's. Target 2: R improves on "
                  "G, and RR on R, in test NLL or in MMD² by more than the larger standard deviation over seeds of "
                  "the two arms."]
        return "\n".join(lines)

    def _speed_targets(self, dataset, groups):
        ffjord = {run.summary["seed"]: run for run in groups["F"]}
        nll_f, _ = _mean_std(groups["F"], _nll)
        clock = _clock_words(groups["F"])
        seconds_f, _ = _mean_std(groups["F"], _seconds)
        mem_f, _ = _mean_std(groups["F"], _peak_mb)
        lines = []
        for name in ("G", "R", "RR"):
            if name not in groups:
                continue
            paired = [run for run in groups[name] if run.summary["seed"] in ffjord]
            nll, _ = _mean_std(groups[name], _nll)
            seconds, _ = _mean_std(groups[name], _seconds)
            mem, _ = _mean_std(groups[name], _peak_mb)
            reach = [time_to_reach(run, ffjord[run.summary["seed"]].summary["validation"]["nll"] + NLL_MARGIN)
                     for run in paired]
            ratios = [None if t is None else t / _seconds(ffjord[run.summary["seed"]]) for t, run in zip(reach, paired)]
            reached = bool(ratios) and all(r is not None for r in ratios)
            met = reached and max(ratios) <= TIME_RATIO and mem <= mem_f
            verdict = ("target 1 **met**" if met else "target 1 **missed**") if dataset != "digits" else "gap"
            reach_text = ("reaches F's final validation NLL + 0.05 at " + ", ".join(
                "not reached" if r is None else f"{r:.2f}" for r in ratios) + f" x F's {clock} time (per seed)")
            lines.append(
                f"- {dataset}, {name}: test NLL {nll:.3f} vs F {nll_f:.3f} ({nll - nll_f:+.3f} nats); training {clock} "
                f"time {seconds:.0f} s (F: {seconds_f:.0f} s, the longest JKO arm's); {reach_text}; peak step memory "
                f"{_mb(mem)} vs F {_mb(mem_f)} ({mem / mem_f:.2f}x). {verdict}.")
        return lines

    def _pass_targets(self, dataset, groups):
        lines = []
        for name in ("R", "RR"):
            if name in groups:
                grown, final = np.mean([growth_and_final_nll(run) for run in groups[name]], axis=0)
                lines.append(f"- {dataset}, {name}: validation NLL {grown:.3f} at the end of its growing pass, "
                             f"{final:.3f} at the end ({final - grown:+.3f} nats from the later passes).")
        for new, old, what in (("R", "G", "reparameterization"), ("RR", "R", "refinement")):
            if new not in groups or old not in groups:
                continue
            parts, improved = [], False
            for label, value in (("NLL", _nll), ("MMD²", _mmd)):
                (mean_new, std_new), (mean_old, std_old) = _mean_std(groups[new], value), _mean_std(groups[old], value)
                gain, noise = mean_old - mean_new, max(std_new, std_old)
                improved = improved or (gain > noise and min(len(groups[new]), len(groups[old])) > 1)
                parts.append(f"{label} {mean_old:.4g} -> {mean_new:.4g} (gain {gain:+.3g}, seed std {noise:.3g})")
            lines.append(f"- {dataset}, {what} ({old} -> {new}, equal iterations): {'; '.join(parts)}: target 2 "
                         f"**{'met' if improved else 'missed'}**.")
        return lines

    def plots(self, runs, dataset, directory):
        path = os.path.join(directory, f"{dataset}-samples.png")
        if _draw_samples(runs, dataset, path):
            return [("samples of seed 0 of each arm, and test points", path)]
        return []


def _draw_samples(runs, dataset, path):
    """The first seed's samples of every arm next to test points; False when no run kept samples."""
    from fastcnf.training.data import load_dataset

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for name, label, group in arms_of(runs):
        run = min(group, key=lambda run: run.summary["seed"])
        if run.summary["hooks"].get("samples"):
            panels.append((f"{name}: {label}", np.asarray(run.summary["hooks"]["samples"])))
    if not panels:
        return False
    test = load_dataset(dataset, 0).test.numpy()
    panels.insert(0, ("test data", test[:len(panels[0][1])]))
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for axis, (title, points) in zip(np.atleast_1d(axes), panels):
        if points.shape[1] == 2:
            axis.hist2d(points[:, 0], points[:, 1], bins=80, range=[[-4, 4], [-4, 4]], cmap="viridis")
            axis.set_aspect("equal")
        else:
            side = int(math.isqrt(points.shape[1]))
            count = int(math.isqrt(len(points)))
            tiles = points[:count * count].reshape(count, count, side, side).transpose(0, 2, 1, 3)
            axis.imshow(np.clip(tiles.reshape(count * side, count * side), 0, 1), cmap="gray")
        axis.set_title(title, fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
    save_figure(figure, path, dpi=100)
    return True


REPORT = JKOReport()


def main(argv=None):
    parser = protocol_parser("jko", __doc__, DATASETS, SEEDS, None)
    add_options(parser)
    args = parser.parse_args(argv)
    root = args.root or os.path.join("runs", "reproduce", "jko")
    if not args.report_only:
        run(build_protocol(args), root, args, jobs=args.jobs)
    if not args.no_report:
        print(f"wrote {write_report(REPORT, root, args.document)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
