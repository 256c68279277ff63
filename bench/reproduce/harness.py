"""Run the arms of a reproduction protocol through fastcnf's own ``Trainer`` under a training budget.

    protocol = Protocol("tpr", arms=(Arm("A", "8gaussians", dict(rtol=1e-5, atol=1e-5)), ...),
                        seeds=(0, 1, 2), budget=Budget(iterations=2000))
    summaries = run_protocol(protocol, "runs/reproduce/tpr", jobs=2)

An ``Arm`` is one configuration of a paper's comparison on one dataset: ``TrainConfig`` overrides
on top of the protocol's shared ``base`` settings, and optional ``ArmHooks`` (extra columns, an
extra measurement on the trained model). Every (arm, seed) is one run, trained by calling
``Trainer.train_step()`` in a loop until the ``Budget`` is spent.

The budget counts training only, as iterations or as seconds of the chosen clock:
``"thread"`` (default) is the CPU time of the training thread (``time.thread_time()``; torch runs
one thread on CPU), which other processes on a shared machine hardly change; ``"wall"`` is
elapsed time (``time.perf_counter()``, after ``torch.cuda.synchronize()`` on a GPU: use it there).
Both clocks are always recorded. Validation (held-out points, all arms at the protocol's
``eval_tolerance``) runs outside the budget at ``budget.validations + 1`` evenly spaced points of
it, the start included; the test NLL is measured once at the end.

Files of a run, in ``root/<dataset>/<arm>/seed<k>/``:

    train.csv        one row per iteration: iteration, cpu_seconds, wall_seconds (cumulative training
                     time), step_cpu_seconds, step_wall_seconds, nfe_forward, nfe_backward,
                     nfe_cumulative, loss, nll, end_time, then the method's own columns (phase,
                     regularizer values, ...) and the hooks' columns
    validation.csv   one row per validation point: iteration, fraction (of the budget), cpu_seconds,
                     wall_seconds, nfe_cumulative, nll, nfe (of one evaluation solve), eval_seconds
    summary.json     written last; its presence marks the run finished (status "finished", or
                     "diverged" or "stalled" with the error): final test NLL, totals, the hooks' results
    trainer/         the Trainer's directory: checkpoint.pt (saved at every validation point)

A finished run is never redone: ``run_protocol`` skips it (after checking its settings are the
ones asked for). An interrupted run resumes from its last checkpoint, bit for bit: the CSVs are cut
back to that iteration and the cumulative clocks and counts continue from their last kept row.

``jobs > 1`` runs independent runs in that many processes (spawned, one torch thread each). Runs
start in seed-major order (every arm of seed 0, then seed 1, ...), so all arms share the machine
with the same kind of neighbours; the CPU-time budget is nearly unaffected by a busy machine, but
wall times and seconds per iteration are only comparable between runs made with the same ``jobs``
(the summary records it).
"""

import dataclasses
import json
import math
import os
import platform
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import torch

from fastcnf.training.checkpoint import CHECKPOINT_NAME, atomic_write_text
from fastcnf.training.config import TrainConfig
from fastcnf.training.metrics import MetricsLog
from fastcnf.training.trainer import Trainer, TrainingDiverged, TrainingStalled, evaluate_nll

__all__ = ["Arm", "ArmHooks", "Budget", "Protocol", "run_arm", "run_protocol", "run_directory", "arm_config",
           "machine_description", "CLOCKS", "ITERATION_CAP"]

CLOCKS = ("thread", "wall")
ITERATION_CAP = 10 ** 9  # TrainConfig.iterations of a run budgeted in seconds
TRAIN_COLUMNS = ("iteration", "cpu_seconds", "wall_seconds", "step_cpu_seconds", "step_wall_seconds", "nfe_forward",
                 "nfe_backward", "nfe_cumulative", "loss", "nll", "end_time")
TRAINER_ONLY = ("seconds",)  # trainer row keys replaced by the harness's own clocks
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


class ArmHooks:
    """Per-arm extensions of a run; every method is optional. Subclass at module level (``jobs > 1``
    pickles them) and keep no state that a resume would lose: derive everything from the trainer.

    setup(trainer)             after the trainer is built or resumed (e.g. change solver options)
    row(trainer, row)          extra columns of an iteration row (a dict, the same keys every time)
    validation(trainer)        extra columns of a validation row
    finish(trainer)            extra entries of the summary, measured on the trained model
    """

    def setup(self, trainer):
        pass

    def row(self, trainer, row):
        return {}

    def validation(self, trainer):
        return {}

    def finish(self, trainer):
        return {}


@dataclass(frozen=True)
class Arm:
    """One configuration of the comparison on one dataset: ``overrides`` of ``TrainConfig`` fields."""

    name: str
    dataset: str
    overrides: dict = field(default_factory=dict)
    label: str = ""
    hooks: ArmHooks = None

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(f"arm name {self.name!r} must be letters, digits and _.+- (it names a directory).")


@dataclass(frozen=True)
class Budget:
    """Training budget: ``iterations`` or ``seconds`` of ``clock`` (exactly one of the two)."""

    iterations: int = None
    seconds: float = None
    validations: int = 20
    clock: str = "thread"

    def __post_init__(self):
        if (self.iterations is None) == (self.seconds is None):
            raise ValueError("a budget is either iterations or seconds: give exactly one.")
        if self.iterations is not None and (isinstance(self.iterations, bool) or not isinstance(self.iterations, int)
                                            or self.iterations < 1):
            raise ValueError(f"budget iterations must be a positive integer, got {self.iterations!r}.")
        if self.seconds is not None and not (isinstance(self.seconds, (int, float)) and self.seconds > 0):
            raise ValueError(f"budget seconds must be a positive number, got {self.seconds!r}.")
        if isinstance(self.validations, bool) or not isinstance(self.validations, int) or self.validations < 1:
            raise ValueError(f"budget validations must be a positive integer, got {self.validations!r}.")
        if self.clock not in CLOCKS:
            raise ValueError(f"unknown budget clock {self.clock!r}; choose one of {', '.join(CLOCKS)}.")

    @property
    def total(self):
        return self.iterations if self.iterations is not None else self.seconds

    def used(self, iteration, cpu_seconds, wall_seconds):
        """How much of the budget is used, in its own unit."""
        if self.iterations is not None:
            return iteration
        return cpu_seconds if self.clock == "thread" else wall_seconds

    def last_due(self, used):
        """The largest k with k / validations of the budget used (0 ... validations)."""
        return min(self.validations, math.floor(used * self.validations / self.total + 1e-9))

    def describe(self):
        if self.iterations is not None:
            return f"{self.iterations} iterations"
        return f"{self.seconds:g} s of {'training-thread CPU' if self.clock == 'thread' else 'wall'} time"


@dataclass(frozen=True)
class Protocol:
    """The arms, seeds and budget of one method's reproduction.

    ``base``: ``TrainConfig`` settings every arm shares (arms override them). ``eval_tolerance``:
    rtol = atol of every validation and test solve. ``eval_batch``: points per evaluation solve
    (None: each split in one solve, so the evaluation NFE is that of one solve).
    """

    method: str
    arms: tuple
    seeds: tuple = (0, 1, 2)
    budget: Budget = Budget(iterations=2000)
    base: dict = field(default_factory=dict)
    eval_tolerance: float = 1e-5
    eval_batch: int = None
    val_size: int = 2000
    device: str = "cpu"

    def __post_init__(self):
        if not _NAME.match(self.method):
            raise ValueError(f"method name {self.method!r} must be letters, digits and _.+-.")
        keys = [(arm.dataset, arm.name) for arm in self.arms]
        if len(set(keys)) != len(keys):
            raise ValueError("two arms share a dataset and a name.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds!r}.")


def run_directory(root, arm, seed):
    return os.path.join(root, arm.dataset, arm.name, f"seed{seed}")


def arm_config(protocol, arm, seed, out):
    """The ``TrainConfig`` of (arm, seed): base, the arm's overrides, then what the protocol fixes."""
    values = {**protocol.base, **arm.overrides}
    values.update(data=arm.dataset, seed=seed, out=out, plot=False, device=protocol.device,
                  test_rtol=protocol.eval_tolerance, test_atol=protocol.eval_tolerance, val_size=protocol.val_size)
    budget = protocol.budget
    values["iterations"] = budget.iterations if budget.iterations is not None else values.get("iterations",
                                                                                           ITERATION_CAP)
    return TrainConfig(**values)


def machine_description():
    """CPU model and core count (and the GPU's name when one is used)."""
    model = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        model = names[0] if names else model
    text = f"{model}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def _comparable(config_dict):
    return {key: value for key, value in config_dict.items() if key != "out"}


def _json_ready(values):
    return json.loads(json.dumps(values, default=list))


def _read_summary(path):
    with open(path) as handle:
        return json.load(handle)


class _Clock:
    """Cumulative training time of both clocks (synchronizing a CUDA device before each reading)."""

    def __init__(self, device, cpu=0.0, wall=0.0):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.cpu, self.wall = cpu, wall

    def start(self):
        self.sync()
        self._cpu0, self._wall0 = time.thread_time(), time.perf_counter()

    def stop(self):
        self.sync()
        step_cpu, step_wall = time.thread_time() - self._cpu0, time.perf_counter() - self._wall0
        self.cpu += step_cpu
        self.wall += step_wall
        return step_cpu, step_wall


class _Run:
    """One (arm, seed): builds or resumes the trainer and drives it through the budget."""

    def __init__(self, protocol, arm, seed, root, jobs):
        self.protocol, self.arm, self.seed, self.jobs = protocol, arm, seed, jobs
        self.hooks = arm.hooks if arm.hooks is not None else ArmHooks()
        self.directory = run_directory(root, arm, seed)
        self.trainer_dir = os.path.join(self.directory, "trainer")
        self.summary_path = os.path.join(self.directory, "summary.json")
        self.config = arm_config(protocol, arm, seed, self.trainer_dir)

    def finished_summary(self):
        """The summary of an already finished run with these settings, else None."""
        if not os.path.isfile(self.summary_path):
            return None
        summary = _read_summary(self.summary_path)
        if summary.get("config") != _json_ready(_comparable(self.config.as_dict())):
            raise ValueError(f"{self.directory} holds a finished run with other settings; remove it or choose "
                             "another output root.")
        return summary

    def _open(self):
        """The trainer (new or resumed) and the logs cut back to its iteration."""
        paths = [os.path.join(self.directory, name) for name in ("train.csv", "validation.csv")]
        resuming = os.path.isfile(os.path.join(self.trainer_dir, CHECKPOINT_NAME))
        if resuming:
            trainer = Trainer.resume(self.trainer_dir, progress=False)
            if _comparable(trainer.config.as_dict()) != _comparable(self.config.as_dict()):
                raise ValueError(f"{self.directory} holds an unfinished run with other settings; remove it or "
                                 "choose another output root.")
        else:  # nothing to resume: start clean
            for path in paths:
                if os.path.isfile(path):
                    os.remove(path)
            if os.path.isdir(self.trainer_dir):
                shutil.rmtree(self.trainer_dir)
            os.makedirs(self.directory, exist_ok=True)
            trainer = Trainer(self.config, progress=False)
        self.train_log, self.val_log = MetricsLog(paths[0]), MetricsLog(paths[1])
        if resuming:
            self.train_log.truncate(trainer.iteration)
            self.val_log.truncate(trainer.iteration)
        rows, validations = self.train_log.rows(), self.val_log.rows()
        last = rows[-1] if rows else {}
        self.clock = _Clock(trainer.device, float(last.get("cpu_seconds", 0.0)), float(last.get("wall_seconds", 0.0)))
        self.nfe_total = int(last.get("nfe_cumulative", 0))
        self.next_validation = (round(float(validations[-1]["fraction"]) * self.protocol.budget.validations) + 1
                                if validations else 0)
        self.eval_seconds = sum(float(row["eval_seconds"]) for row in validations)
        self.hooks.setup(trainer)
        return trainer

    def _evaluate(self, trainer, data):
        """(NLL, NFE of one evaluation solve, seconds) of ``data`` at the evaluation tolerance."""
        batch = self.protocol.eval_batch or len(data)
        start = time.perf_counter()
        nll, nfe = evaluate_nll(trainer.model, data, batch, self.seed + 1)
        return nll, nfe / math.ceil(len(data) / batch), time.perf_counter() - start

    def _validate(self, trainer, k):
        data = trainer.dataset.validation[:self.protocol.val_size]
        nll, nfe, seconds = self._evaluate(trainer, data)
        extra = self.hooks.validation(trainer)
        self.eval_seconds += seconds
        self.val_log.append({"iteration": trainer.iteration, "fraction": k / self.protocol.budget.validations,
                             "cpu_seconds": self.clock.cpu, "wall_seconds": self.clock.wall,
                             "nfe_cumulative": self.nfe_total, "nll": nll, "nfe": nfe, "eval_seconds": seconds,
                             **extra})
        self.next_validation = k + 1
        trainer.save()

    def _validate_if_due(self, trainer, force=False):
        budget = self.protocol.budget
        k = budget.validations if force else budget.last_due(budget.used(trainer.iteration, self.clock.cpu,
                                                                           self.clock.wall))
        if k >= self.next_validation:
            self._validate(trainer, k)

    def _spent(self, trainer):
        budget = self.protocol.budget
        used = budget.used(trainer.iteration, self.clock.cpu, self.clock.wall)
        return used >= budget.total or trainer.training_method.finished(trainer.optimization)

    def _step(self, trainer):
        self.clock.start()
        row = trainer.train_step()
        step_cpu, step_wall = self.clock.stop()
        self.nfe_total += row["nfe_forward"] + row["nfe_backward"]
        own = {"iteration": row["iteration"], "cpu_seconds": self.clock.cpu, "wall_seconds": self.clock.wall,
               "step_cpu_seconds": step_cpu, "step_wall_seconds": step_wall, "nfe_forward": row["nfe_forward"],
               "nfe_backward": row["nfe_backward"], "nfe_cumulative": self.nfe_total, "loss": row["loss"],
               "nll": row["nll"], "end_time": row["end_time"]}
        rest = {key: value for key, value in row.items() if key not in own and key not in TRAINER_ONLY}
        self.train_log.append({**own, **rest, **self.hooks.row(trainer, row)})

    def run(self):
        trainer = self._open()
        status, error = "finished", None
        try:
            self._validate_if_due(trainer)
            while not self._spent(trainer):
                self._step(trainer)
                self._validate_if_due(trainer)
            self._validate_if_due(trainer, force=True)
        except TrainingDiverged as exc:
            status, error = "diverged", str(exc)
        except TrainingStalled as exc:  # an iteration's solves ran past TrainConfig.max_nfe
            status, error = "stalled", str(exc)
        return self._finish(trainer, status, error)

    def _finish(self, trainer, status, error):
        start = time.perf_counter()
        test, extra = None, {}
        if status == "finished":
            nll, nfe, seconds = self._evaluate(trainer, trainer.dataset.test)
            test = {"nll": nll, "nfe": nfe, "seconds": seconds}
            extra = self.hooks.finish(trainer)
        validations = self.val_log.rows()
        rows = self.train_log.rows()
        summary = {
            "method": self.protocol.method, "arm": self.arm.name, "label": self.arm.label,
            "arm_index": self.protocol.arms.index(self.arm), "dataset": self.arm.dataset, "seed": self.seed,
            "status": status, "error": error, "config": _comparable(self.config.as_dict()),
            "budget": dataclasses.asdict(self.protocol.budget), "eval_tolerance": self.protocol.eval_tolerance,
            "iterations": trainer.iteration, "train_cpu_seconds": self.clock.cpu,
            "train_wall_seconds": self.clock.wall,
            "nfe_forward": sum(int(row["nfe_forward"]) for row in rows),
            "nfe_backward": sum(int(row["nfe_backward"]) for row in rows),
            "validation": ({"nll": float(validations[-1]["nll"]), "nfe": float(validations[-1]["nfe"])}
                           if validations else None),
            "test": test, "hooks": extra, "jobs": self.jobs, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(trainer.device), "machine": machine_description(),
        }
        summary["total_wall_seconds"] = (self.clock.wall + self.eval_seconds + time.perf_counter() - start)
        summary = _json_ready(summary)
        atomic_write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", self.summary_path)
        return summary


def run_arm(protocol, arm, seed, root, jobs=1):
    """Train ``arm`` for ``seed`` (or return its finished summary); returns the summary dict."""
    run = _Run(protocol, arm, seed, root, jobs)
    summary = run.finished_summary()
    if summary is not None:
        return summary
    summary = run.run()
    _announce(summary)
    return summary


def _announce(summary):
    test = summary["test"]
    outcome = f"test NLL {test['nll']:.4f}" if test else summary["status"]
    print(f"[{summary['method']}] {summary['dataset']} {summary['arm']} seed {summary['seed']}: "
          f"{summary['iterations']} it, {outcome}, {summary['train_cpu_seconds']:.0f} s CPU, "
          f"{summary['total_wall_seconds']:.0f} s wall", flush=True)


def _run_task(protocol, arm_index, seed, root, jobs):
    return run_arm(protocol, protocol.arms[arm_index], seed, root, jobs)


def run_protocol(protocol, root, jobs=1):
    """Every (arm, seed) of ``protocol`` under ``root`` (finished runs are skipped); the summaries in
    seed-major order. ``jobs > 1``: that many runs at a time in spawned processes."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}.")
    tasks = [(index, seed) for seed in protocol.seeds for index in range(len(protocol.arms))]
    if jobs == 1:
        return [_run_task(protocol, index, seed, root, jobs) for index, seed in tasks]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_run_task, protocol, index, seed, root, jobs) for index, seed in tasks]
        return [future.result() for future in futures]
