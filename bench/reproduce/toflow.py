"""TO-FLOW (Du et al., CVPR 2022): does a trained end time T reach FFJORD's quality sooner?

    python -m bench.reproduce.toflow [--seconds 600] [--seeds 0 1 2] [--datasets 8gaussians checkerboard]
                                     [--jobs 2] [--control-of ARM]

The paper claims about 20% less training time than FFJORD at maintained quality, by training T
with the weights (coordinate descent) under a temporal regularizer alpha*T. Every arm gets the
same budget of training CPU time (the CPU time of the training thread, ``--seconds``, default
600 s), so cheaper iterations count in an arm's favour and T-only iterations against it:

    ffjord-T0.5         FFJORD, T = 0.5 fixed (FFJORD's toy setting)
    ffjord-T1           FFJORD, T = 1 fixed (TO-FLOW's starting point)
    toflow-a0.1         TO-FLOW from T = 1, alpha 0.1, joint 1:1 (weights and T stepped from the same
                        pass every iteration: the authors' released schedule)
    toflow-a0.3         the same with alpha 0.3
    toflow-a0.1-alt4    TO-FLOW, alpha 0.1, alternate 4:1 (four weight iterations, then one iteration
                        that updates T only: the paper's coordinate descent; it costs a full pass)
    toflow-a0.3-alt4    the same with alpha 0.3
    toflow-a0.1-rnode   toflow-a0.1 + RNODE (kinetic energy 0.01, Jacobian Frobenius 0.01)
    toflow-a0.1-tpr     toflow-a0.1 + TPR (lambda 5, degree 1, K = 2: the TPR paper's settings)
    control             FFJORD with T fixed at the final T of ``--control-of`` (default toflow-a0.1),
                        the mean over its seeds: run after every other arm, from their results

T is stepped by SGD with momentum 0.9 and learning rate 1e-3 (``fastcnf.cnf.toflow`` explains why
not Adam) and clipped to [0.1, 1.9] (the authors' range). Shared settings: concatsquash 64-64-64
tanh, one block, exact divergence, dopri5 at rtol = atol = 1e-5 through the adjoint, batch 512,
Adam lr 1e-3 with weight decay 1e-5; validation (2000 held-out points, 40 times over the budget)
and test at 1e-5.

The report (``TOFLOWReport``) adds, per dataset: each arm's final T; the training CPU time and
cumulative NFE (forward + backward) at which each arm's validation NLL first reaches FFJORD's
quality (the final validation NLL of ffjord-T0.5 and of ffjord-T1, mean over seeds, + 0.02); the
target (TO-FLOW reaches it in at most 0.8x FFJORD's time); whether the fixed-T control matches
TO-FLOW (then the gain comes from the better T, not from optimizing it); and T against time.

A run is 600 s of training CPU plus validation. The full protocol is 9 arms x 2 datasets x 3 seeds =
54 runs: about 10 h of CPU. With ``--jobs 2`` on the 2-core machine a run took about 620 s of wall
time when nothing else ran (two at a time) and up to 1000 s beside other work, so about 5-7 h in
all; an interrupted protocol resumes where it stopped.
"""

import json
import math
import os

import numpy as np

from bench.report import markdown_table

from .cli import budget_from, protocol_parser, select
from .harness import Arm, ArmHooks, Budget, Protocol, run_directory, run_protocol
from .report import STANDARD_COLUMNS, Column, MethodReport, arms_of, mean_band_plot, save_figure, spread, write_report

__all__ = ["DATASETS", "SEEDS", "SECONDS", "BASE", "ALPHAS", "arms", "control_arm", "final_end_time",
           "build_protocol", "parse_args", "run_toflow_protocol", "time_to_reach", "TOFLOWHooks", "TOFLOWReport",
           "REPORT", "main"]

DATASETS = ("8gaussians", "checkerboard")
SEEDS = (0, 1, 2)
SECONDS = 600.0
VALIDATIONS = 40
BASE = dict(hidden=(64, 64, 64), layer="concatsquash", activation="tanh", blocks=1, solver="dopri5", rtol=1e-5,
            atol=1e-5, adjoint=True, divergence="auto", batch_size=512, lr=1e-3, weight_decay=1e-5)
TIME = dict(method="toflow", end_time=1.0, time_lr=1e-3, time_momentum=0.9, t_min=0.1, t_max=1.9,
            time_regularizer="linear")
ALPHAS = (0.1, 0.3)
EVAL_TOLERANCE = 1e-5
REFERENCES = ("ffjord-T0.5", "ffjord-T1")  # FFJORD's quality: their final validation NLL
QUALITY_MARGIN = 0.02  # nats above FFJORD's final validation NLL
TIME_TARGET = 0.8  # TO-FLOW reaches FFJORD's quality in at most this fraction of FFJORD's time
PRIMARY = f"toflow-a{ALPHAS[0]}"
CONTROL = "control"


class TOFLOWHooks(ArmHooks):
    """Records every block's T after the last step (the control arm reads it) and, for the control,
    the arm whose final T it fixes."""

    def __init__(self, control_of=None):
        self.control_of = control_of

    def finish(self, trainer):
        result = {"end_times": [block.end_time().item() for block in trainer.model.cnf_blocks()]}
        if self.control_of is not None:
            result["control_of"] = self.control_of
        return result


def arms(datasets, hooks=None):
    """Every arm but the control (which needs the others' results: ``control_arm``)."""
    hooks = TOFLOWHooks() if hooks is None else hooks
    result = []
    for dataset in datasets:
        result += [Arm("ffjord-T0.5", dataset, dict(method="ffjord", end_time=0.5), "FFJORD, T = 0.5", hooks),
                   Arm("ffjord-T1", dataset, dict(method="ffjord", end_time=1.0), "FFJORD, T = 1", hooks)]
        for alpha in ALPHAS:
            result.append(Arm(f"toflow-a{alpha}", dataset, dict(TIME, time_alpha=alpha),
                              f"TO-FLOW, α {alpha}, joint 1:1", hooks))
        for alpha in ALPHAS:
            result.append(Arm(f"toflow-a{alpha}-alt4", dataset,
                              dict(TIME, time_alpha=alpha, time_schedule="alternate", weight_steps=4, time_steps=1),
                              f"TO-FLOW, α {alpha}, alternate 4:1", hooks))
        alpha = ALPHAS[0]
        result += [Arm(f"toflow-a{alpha}-rnode", dataset, dict(TIME, time_alpha=alpha, kinetic=0.01, jacobian=0.01),
                       f"TO-FLOW, α {alpha}, joint 1:1 + RNODE (KE 0.01, JF 0.01)", hooks),
                   Arm(f"toflow-a{alpha}-tpr", dataset,
                       dict(TIME, time_alpha=alpha, tpr_weight=5.0, tpr_degree=1, tpr_times=2),
                       f"TO-FLOW, α {alpha}, joint 1:1 + TPR (λ 5, p 1, K 2)", hooks)]
    return tuple(result)


def final_end_time(root, arm, seeds):
    """Mean over ``seeds`` of ``arm``'s final T (rounded to 1e-3), or None if a run has not finished."""
    values = []
    for seed in seeds:
        path = os.path.join(run_directory(root, arm, seed), "summary.json")
        if not os.path.isfile(path):
            return None
        with open(path) as handle:
            summary = json.load(handle)
        if summary["status"] != "finished":
            return None
        values.append(sum(summary["hooks"]["end_times"]))
    return round(float(np.mean(values)), 3)


def control_arm(reference, end_time):
    """FFJORD with T fixed at ``end_time``, the final T of the ``reference`` arm."""
    return Arm(CONTROL, reference.dataset, dict(method="ffjord", end_time=end_time),
               f"FFJORD, T = {end_time:g} fixed (final T of {reference.name})", TOFLOWHooks(reference.name))


def _budget(args):
    if args.iterations is None and args.seconds is None:
        return Budget(seconds=SECONDS, validations=args.validations, clock=args.clock or "thread")
    return budget_from(args)


def build_protocol(args, controls=()):
    chosen = select(arms(args.datasets), args) if not args.arms or set(args.arms) - {CONTROL} else ()
    return Protocol("toflow", tuple(chosen) + tuple(controls), seeds=tuple(args.seeds), budget=_budget(args),
                    base=BASE, eval_tolerance=EVAL_TOLERANCE, device=args.device)


def run_toflow_protocol(args, root):
    """Every arm but the control, then the control of each dataset from the finished reference runs."""
    protocol = build_protocol(args)
    if protocol.arms:
        run_protocol(protocol, root, jobs=args.jobs)
    if args.arms and CONTROL not in args.arms:
        return
    controls = []
    for dataset in args.datasets:
        reference = next(arm for arm in arms((dataset,)) if arm.name == args.control_of)
        end_time = final_end_time(root, reference, args.seeds)
        if end_time is None:
            print(f"[toflow] {dataset}: no control, {args.control_of} has not finished for seeds {args.seeds}.")
            continue
        controls.append(control_arm(reference, end_time))
    if controls:
        run_protocol(build_protocol(args, controls), root, jobs=args.jobs)


def _add_options(parser):
    parser.add_argument("--budget", dest="seconds", type=float,
                        help=f"training CPU seconds per run, the same as --seconds (default {SECONDS:g})")
    parser.add_argument("--control-of", dest="control_of", default=PRIMARY,
                        choices=[arm.name for arm in arms(DATASETS[:1]) if arm.name.startswith("toflow")],
                        help=f"the TO-FLOW arm whose final T the control fixes (default {PRIMARY})")
    parser.set_defaults(validations=VALIDATIONS)
    helps = {"iterations": "training iterations per run, instead of the equal CPU-time budget (--budget)",
             "validations": f"validation points over the budget, besides the start (default {VALIDATIONS})"}
    for action in parser._actions:  # the shared parser's help names its own defaults
        action.help = helps.get(action.dest, action.help)


# ---------------------------------------------------------------------------------------- report
def _clock_key(run):
    """The column of the budget's clock: training-thread CPU seconds, or wall seconds."""
    return "cpu_seconds" if run.summary["budget"]["clock"] == "thread" else "wall_seconds"


def time_to_reach(run, threshold):
    """(training seconds on the budget's clock, cumulative NFE) at the first validation with NLL <=
    threshold, or None."""
    validation = run.validation
    reached = np.flatnonzero(validation["nll"] <= threshold)
    if reached.size == 0:
        return None
    first = reached[0]
    return float(validation[_clock_key(run)][first]), float(validation["nfe_cumulative"][first])


def _final_validation(run):
    return float(run.validation["nll"][-1])


def _final_end_time(run):
    return sum(run.summary["hooks"]["end_times"])


COLUMNS = STANDARD_COLUMNS[:1] + (Column("final T", _final_end_time, 3),
                                  Column("iterations", lambda run: run.summary["iterations"], 0)) + STANDARD_COLUMNS[1:]


def _mean_or_none(values):
    values = [value for value in values if value is not None]
    return spread(values) if values else None


class TOFLOWReport(MethodReport):
    method = "toflow"
    heading = "TO-FLOW: trainable end time (Du et al., CVPR 2022)"

    def columns(self):
        return COLUMNS

    def preamble(self, runs):
        first = runs[0].summary
        budget = first["budget"]
        clock = "training-thread CPU" if budget["clock"] == "thread" else "wall"
        spent = (f"{budget['seconds']:g} s of {clock} time" if budget["seconds"] is not None else
                 f"{budget['iterations']} iterations (**not an equal-time budget**)")
        seeds = sorted({run.summary["seed"] for run in runs})
        datasets = sorted({run.summary["dataset"] for run in runs})
        full = (budget["seconds"] is not None and budget["seconds"] >= SECONDS and len(seeds) >= len(SEEDS)
                and set(DATASETS) <= set(datasets))
        scale = ("the full protocol" if full else
                 f"**a scaled-down run, not the protocol** (which asks for {SECONDS:g} CPU seconds per run, seeds "
                 f"{list(SEEDS)}, datasets {list(DATASETS)}); read its numbers as a smoke test only")
        cpu_hours = sum(run.summary["train_cpu_seconds"] for run in runs) / 3600
        wall_hours = sum(run.summary["total_wall_seconds"] for run in runs) / 3600
        return "\n".join([
            "Claim: about 20% less training time than FFJORD at maintained quality, by training the end time T "
            "with the weights under a temporal regularizer α·T. Every arm gets the same training CPU time, so an "
            "arm's cheaper or dearer iterations count.",
            "",
            "- FFJORD at T = 0.5 and T = 1; TO-FLOW from T = 1 with α in {" + ", ".join(map(str, ALPHAS)) + "}, "
            "joint 1:1 (weights and T stepped from the same pass every iteration, the authors' released schedule) "
            "and alternate 4:1 (one T-only iteration after four weight iterations, the paper's coordinate descent); "
            "TO-FLOW + RNODE and TO-FLOW + TPR; a control: FFJORD with T fixed at the final T of "
            f"{PRIMARY} (mean over seeds), trained after the other arms.",
            "- T: a raw float64 parameter, SGD with momentum 0.9 and learning rate 1e-3 (so α is the marginal "
            "NLL per unit of T that the stationary T trades, not a threshold as under Adam), clipped to "
            "[0.1, 1.9]; dL/dT comes from the adjoint pass at no extra evaluation.",
            "- Shared: concatsquash 64-64-64 tanh, one block, exact divergence, dopri5 at rtol = atol = 1e-5 "
            "through the adjoint, batch 512, Adam lr 1e-3, weight decay 1e-5; validation on 2000 held-out points "
            f"at {budget['validations'] + 1} evenly spaced points of the budget and test on 5000, both at 1e-5. "
            "Code: `bench/reproduce/toflow.py`.",
            f"- This report: {', '.join(datasets)}; seeds {seeds}; {spent} per run; {first['jobs']} run(s) at a "
            f"time; {first['machine']}; torch {first['torch']}, {first['threads']} thread(s). That is {scale}.",
            f"- Time spent: {cpu_hours:.2f} h of training CPU time, {wall_hours:.2f} h of wall time including "
            "evaluation (summed over runs).",
        ])

    def findings(self, runs):
        lines = ["### Time to FFJORD's quality", "",
                 f"FFJORD's quality: the final validation NLL of a FFJORD arm (mean over seeds) + {QUALITY_MARGIN}. "
                 f"Each cell: training {'CPU' if _clock_key(runs[0]) == 'cpu_seconds' else 'wall'} seconds (and "
                 "cumulative forward + backward NFE) at the first validation "
                 "point where the arm's validation NLL is at or below it, mean ± std over the seeds that reached "
                 "it (how many in brackets); the ratio is to the FFJORD arm's own time to its threshold. The "
                 f"resolution is one validation interval (1/{runs[0].summary['budget']['validations']} of the "
                 "budget).", ""]
        for dataset in sorted({run.summary["dataset"] for run in runs}):
            subset = [run for run in runs if run.summary["dataset"] == dataset]
            lines += [f"#### {dataset}", ""]
            lines += self._reach_table(subset) + [""] + self._targets(dataset, subset) + [""]
        return "\n".join(lines)

    @staticmethod
    def _thresholds(runs):
        groups = {name: group for name, _, group in arms_of(runs)}
        return {name: float(np.mean([_final_validation(run) for run in groups[name]])) + QUALITY_MARGIN
                for name in REFERENCES if name in groups}

    def _reach(self, group, threshold):
        """spread of seconds, spread of NFE, (reached, seeds)."""
        hits = [time_to_reach(run, threshold) for run in group]
        reached = [hit for hit in hits if hit is not None]
        seconds = _mean_or_none([hit[0] for hit in reached])
        nfe = _mean_or_none([hit[1] for hit in reached])
        return seconds, nfe, (len(reached), len(group))

    def _reach_table(self, runs):
        thresholds = self._thresholds(runs)
        if not thresholds:
            return ["(no FFJORD reference arm ran)"]
        groups = arms_of(runs)
        reference_seconds = {name: self._reach(group, thresholds[name])[0] for name, _, group in groups
                             if name in thresholds}
        header = ["arm"] + [f"to {name}'s quality ({thresholds[name]:.3f})" for name in thresholds]
        rows = []
        for name, _, group in groups:
            cells = [name]
            for reference, threshold in thresholds.items():
                seconds, nfe, (reached, total) = self._reach(group, threshold)
                if seconds is None:
                    cells.append(f"not reached (0/{total})")
                    continue
                ratio = seconds[0] / reference_seconds[reference][0] if reference_seconds[reference] else math.nan
                cells.append(f"{_pm(seconds, '.0f')} s, {_pm(nfe, '.0f')} NFE ({reached}/{total}); "
                             f"{ratio:.2f}x")
            rows.append(cells)
        return [markdown_table(header, rows)]

    def _targets(self, dataset, runs):
        thresholds = self._thresholds(runs)
        groups = {name: group for name, _, group in arms_of(runs)}
        lines = []
        for reference, threshold in thresholds.items():
            base = self._reach(groups[reference], threshold)[0]
            if base is None:
                continue
            met, missed = [], []
            for name, group in groups.items():
                if not name.startswith("toflow"):
                    continue
                seconds, _, (reached, total) = self._reach(group, threshold)
                if seconds is None or reached < total:
                    missed.append(f"{name} (reached in {reached}/{total} seeds)")
                    continue
                ratio = seconds[0] / base[0]
                (met if ratio <= TIME_TARGET else missed).append(f"{name} ({ratio:.2f}x)")
            lines.append(f"- {dataset}, to {reference}'s quality ({threshold:.3f}; {reference} takes {base[0]:.0f} s): "
                         f"target (≤ {TIME_TARGET}x FFJORD's time) **met** by {', '.join(met) or 'none'}; "
                         f"**missed** by {', '.join(missed) or 'none'}.")
        lines += self._control(dataset, groups, thresholds)
        return lines

    def _control(self, dataset, groups, thresholds):
        if CONTROL not in groups:
            return [f"- {dataset}: the fixed-T control has not run."]
        reference_name = groups[CONTROL][0].summary["hooks"]["control_of"]
        if reference_name not in groups:
            return []
        lines = []
        for reference, threshold in thresholds.items():
            toflow = self._reach(groups[reference_name], threshold)[0]
            control = self._reach(groups[CONTROL], threshold)[0]
            if toflow is None or control is None:
                lines.append(f"- {dataset}, control vs {reference_name} (to {reference}'s quality): "
                             f"{'neither' if toflow is None and control is None else 'only one of them'} reached "
                             "it in any seed; no verdict.")
                continue
            noise = max(toflow[1], control[1])
            matches = control[0] <= toflow[0] + noise
            verdict = ("the fixed-T control is as fast (within the seeds' spread) or faster: the gain comes from a "
                       "better T, not from optimizing T during training" if matches else
                       "the control is slower by more than the seeds' spread: optimizing T during training helps "
                       "beyond its final value")
            lines.append(f"- {dataset}, control vs {reference_name} (to {reference}'s quality): {control[0]:.0f} s "
                         f"vs {toflow[0]:.0f} s (std up to {noise:.0f} s): {verdict}.")
        test = {name: spread([run.summary["test"]["nll"] for run in groups[name]])[0]
                for name in (CONTROL, reference_name)}
        lines.append(f"- {dataset}: final test NLL control {test[CONTROL]:.3f} vs {reference_name} "
                     f"{test[reference_name]:.3f}.")
        return lines

    def plots(self, runs, dataset, directory):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        key = _clock_key(runs[0])
        path = os.path.join(directory, f"{dataset}-end-time.png")
        figure, axis = plt.subplots(figsize=(7, 4.5))
        mean_band_plot(axis, runs, lambda run: (run.train[key], run.train["end_time"]), align="interp")
        axis.set_xlabel("training time (s, CPU of the training thread)" if key == "cpu_seconds" else
                        "training time (s, wall)")
        axis.set_ylabel("T (sum over blocks)")
        axis.set_title(f"{dataset}: end time T during training (mean over seeds, min-max band)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        save_figure(figure, path)
        return [("T against training time", path)]


def _pm(values, fmt):
    mean, std, _, _ = values
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


REPORT = TOFLOWReport()


def parse_args(argv=None):
    """The shared protocol options (``cli.protocol_parser``) plus --budget and --control-of."""
    parser = protocol_parser("toflow", __doc__, DATASETS, SEEDS, None)
    _add_options(parser)
    return parser.parse_args(argv)


def main(argv=None):
    """``cli.protocol_main`` with the two stages of ``run_toflow_protocol``."""
    args = parse_args(argv)
    root = args.root or os.path.join("runs", "reproduce", "toflow")
    if not args.report_only:
        run_toflow_protocol(args, root)
    if not args.no_report:
        print(f"wrote {write_report(REPORT, root, args.document)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
