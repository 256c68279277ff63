"""bench/reproduce: a tiny protocol runs, writes its CSVs, skips finished runs, resumes an interrupted
one bit for bit, runs in parallel processes with the same results, and its report's table holds
the CSVs' means."""

import csv
import json
import math
import re

import numpy as np
import pytest

from bench.reproduce import harness
from bench.reproduce.harness import Arm, ArmHooks, Budget, Protocol, run_protocol
from bench.reproduce.report import MethodReport, write_report

TINY = dict(hidden=(16, 16), batch_size=64, lr=1e-2)
DETERMINISTIC = ("iteration", "nfe_forward", "nfe_backward", "nfe_cumulative", "loss", "nll", "end_time")


def _protocol(iterations=4, seeds=(0, 1), hooks=None, validations=2):
    arms = (Arm("loose", "8gaussians", dict(rtol=1e-2, atol=1e-2), "FFJORD 1e-2", hooks),
            Arm("tight", "8gaussians", dict(rtol=1e-3, atol=1e-3), "FFJORD 1e-3", hooks))
    return Protocol("tiny", arms, seeds=seeds, budget=Budget(iterations=iterations, validations=validations),
                    base=TINY, eval_tolerance=1e-3, val_size=200)


def _csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _deterministic(path):
    return [{key: row[key] for key in DETERMINISTIC} for row in _csv(path)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return root, run_protocol(_protocol(), str(root))


def test_runs_write_their_csvs_and_summaries(finished):
    root, summaries = finished
    assert [(s["arm"], s["seed"]) for s in summaries] == [("loose", 0), ("tight", 0), ("loose", 1), ("tight", 1)]
    for summary in summaries:
        directory = root / "8gaussians" / summary["arm"] / f"seed{summary['seed']}"
        rows, validations = _csv(directory / "train.csv"), _csv(directory / "validation.csv")
        assert [int(row["iteration"]) for row in rows] == [1, 2, 3, 4]
        cpu = [float(row["cpu_seconds"]) for row in rows]
        assert all(b > a for a, b in zip(cpu, cpu[1:]))
        assert sum(float(row["step_cpu_seconds"]) for row in rows) == pytest.approx(cpu[-1])
        nfe = [int(row["nfe_forward"]) + int(row["nfe_backward"]) for row in rows]
        assert [int(row["nfe_cumulative"]) for row in rows] == list(np.cumsum(nfe))
        # validation at 0, 1/2 and all of the budget; outside the training clocks
        assert [(int(v["iteration"]), float(v["fraction"])) for v in validations] == [(0, 0.0), (2, 0.5), (4, 1.0)]
        assert float(validations[-1]["cpu_seconds"]) == cpu[-1]
        assert summary["status"] == "finished" and summary["iterations"] == 4
        assert summary["nfe_forward"] + summary["nfe_backward"] == nfe[-1] + sum(nfe[:-1])
        assert math.isfinite(summary["test"]["nll"]) and summary["test"]["nfe"] >= 8
        assert summary["config"]["test_rtol"] == 1e-3 and summary["config"]["seed"] == summary["seed"]
        assert json.loads((directory / "summary.json").read_text()) == summary
    # the tighter training tolerance takes at least as many evaluations
    assert summaries[1]["nfe_forward"] >= summaries[0]["nfe_forward"]


def test_finished_runs_are_not_redone(finished, monkeypatch):
    root, summaries = finished

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(harness, "Trainer", no_training)
    assert run_protocol(_protocol(), str(root)) == summaries


def test_a_finished_run_with_other_settings_is_refused(finished):
    root, _ = finished
    with pytest.raises(ValueError, match="holds a finished run with other settings"):
        run_protocol(_protocol(iterations=6), str(root))


class _Interrupt(ArmHooks):
    """Stops the process (an exception) once the run reaches ``at`` iterations."""

    def __init__(self, at):
        self.at = at

    def row(self, trainer, row):
        if row["iteration"] == self.at:
            raise KeyboardInterrupt
        return {}


def test_an_interrupted_run_resumes_bit_for_bit(finished, tmp_path):
    root, _ = finished
    with pytest.raises(KeyboardInterrupt):  # checkpoint at iteration 2 (a validation point), killed at 3
        run_protocol(_protocol(seeds=(0,), hooks=_Interrupt(3)), str(tmp_path))
    partial = tmp_path / "8gaussians" / "loose" / "seed0"
    assert len(_csv(partial / "train.csv")) == 2 and not (partial / "summary.json").exists()
    run_protocol(_protocol(seeds=(0,)), str(tmp_path))
    complete = root / "8gaussians" / "loose" / "seed0"
    assert _deterministic(partial / "train.csv") == _deterministic(complete / "train.csv")
    assert [row["nll"] for row in _csv(partial / "validation.csv")] == [
        row["nll"] for row in _csv(complete / "validation.csv")]
    resumed, reference = (json.loads((d / "summary.json").read_text()) for d in (partial, complete))
    assert resumed["test"]["nll"] == reference["test"]["nll"]


@pytest.mark.slow  # spawned workers import torch and fastcnf afresh: about 10-30 s
def test_parallel_jobs_give_the_same_runs(finished, tmp_path):
    root, summaries = finished
    parallel = run_protocol(_protocol(seeds=(1,)), str(tmp_path), jobs=2)
    assert [s["jobs"] for s in parallel] == [2, 2]
    for summary in parallel:
        relative = f"8gaussians/{summary['arm']}/seed1/train.csv"
        assert _deterministic(tmp_path / relative) == _deterministic(root / relative)


def test_budgets_are_checked():
    with pytest.raises(ValueError, match="exactly one"):
        Budget(iterations=10, seconds=5.0)
    with pytest.raises(ValueError, match="unknown budget clock"):
        Budget(seconds=5.0, clock="gpu")
    assert Budget(iterations=2000).last_due(99) == 0 and Budget(iterations=2000).last_due(100) == 1
    assert Budget(seconds=10.0, validations=4).last_due(7.4) == 2


def test_a_seconds_budget_stops_on_the_training_clock(tmp_path):
    protocol = Protocol("tiny", (Arm("a", "8gaussians", dict(rtol=1e-2, atol=1e-2)),), seeds=(0,),
                        budget=Budget(seconds=0.3, validations=3), base=TINY, eval_tolerance=1e-2, val_size=200)
    (summary,) = run_protocol(protocol, str(tmp_path))
    rows = _csv(tmp_path / "8gaussians" / "a" / "seed0" / "train.csv")
    assert float(rows[-1]["cpu_seconds"]) >= 0.3 > float(rows[-2]["cpu_seconds"])
    validations = _csv(tmp_path / "8gaussians" / "a" / "seed0" / "validation.csv")
    assert [float(v["fraction"]) for v in validations][-1] == 1.0
    for row in validations[1:-1]:  # each validation right after its share of the budget was used
        assert float(row["cpu_seconds"]) >= 0.3 * float(row["fraction"])


class _Report(MethodReport):
    method = "tiny"
    heading = "Tiny protocol"


def _cell_mean(cell):
    return float(cell.split(" ± ")[0])


def test_report_tables_hold_the_csv_means(finished, tmp_path):
    root, summaries = finished
    document = tmp_path / "REPRODUCTION.md"
    document.write_text("# title\n\n## Other method\n\nkept\n")
    write_report(_Report(), str(root), str(document))
    write_report(_Report(), str(root), str(document))  # replaces its own section only
    text = document.read_text()
    assert text.count("## Tiny protocol") == 1 and "## Other method\n\nkept" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    for line in lines[1:]:
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        arm = cells["arm"]
        runs = [root / "8gaussians" / arm / f"seed{seed}" for seed in (0, 1)]
        tests = [json.loads((run / "summary.json").read_text())["test"]["nll"] for run in runs]
        assert _cell_mean(cells["test NLL"]) == pytest.approx(np.mean(tests), abs=5e-4)
        assert cells["test NLL"].endswith(f"± {np.std(tests, ddof=1):.3f}")
        last = [np.mean([float(r["nfe_backward"]) for r in _csv(run / "train.csv")[-1:]]) for run in runs]
        assert _cell_mean(cells["NFE bwd/it (last 20%)"]) == pytest.approx(np.mean(last), abs=0.05)
        cpu = [json.loads((run / "summary.json").read_text())["train_cpu_seconds"] / 4 for run in runs]
        assert _cell_mean(cells["CPU s/it"]) == pytest.approx(np.mean(cpu), abs=5e-4)
        assert cells["seeds"] == "2"
    for name in ("8gaussians-validation.png", "8gaussians-nfe.png"):
        assert (tmp_path / "reproduction" / "tiny" / name).stat().st_size > 1000
        assert f"(reproduction/tiny/{name})" in text
    assert re.search(r"\| loose \| FFJORD 1e-2 \| 2 \|", text)


def test_an_arm_past_the_evaluation_budget_ends_stalled(tmp_path):
    """TrainConfig.max_nfe stops an iteration whose solves run away; the arm ends "stalled", the
    protocol goes on."""
    arm = Arm("capped", "8gaussians", dict(rtol=1e-3, atol=1e-3, max_nfe=20), "FFJORD, 20 evaluations")
    protocol = Protocol("tiny", (arm,), seeds=(0,), budget=Budget(iterations=4, validations=2), base=TINY,
                        eval_tolerance=1e-3, val_size=200)
    [summary] = run_protocol(protocol, str(tmp_path))
    assert summary["status"] == "stalled"
    assert summary["error"].startswith("iteration 1 stopped: its ODE solves needed more than 20 evaluations")
