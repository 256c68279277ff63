"""CNF training methods on 8gaussians at pinned tolerances: NFE, time per iteration, NLL reached.

Each method trains the same network from the same seed for ``ITERATIONS`` iterations on one CPU
thread; the figures are averaged over the last ``WINDOW`` iterations (after the dynamics have
settled), plus one evaluation solve on the validation set. Run with

    python -m pytest bench/bench_methods.py --benchmark-enable -s

Results are in the pytest-benchmark JSON under ``extra_info`` of ``cnf_methods_8gaussians[<method>]``
and printed as a table at the end. Compare NFE only between rows at the same tolerances.
"""

import csv
import os

import pytest
import torch

import fastcnf
from fastcnf.training.config import TrainConfig
from fastcnf.training.trainer import Trainer

METHODS = ("ffjord", "rnode", "tpr", "toflow")
ITERATIONS = int(os.environ.get("FASTCNF_BENCH_ITERATIONS", "500"))
WINDOW = 50
PINNED = dict(data="8gaussians", hidden=(64, 64), batch_size=256, lr=5e-3, rtol=1e-4, atol=1e-4, solver="dopri5",
              divergence="exact", test_divergence="exact", seed=0, threads=1, val_size=2000, plot=False)
RESULTS = {}


def _train(method, out):
    config = TrainConfig(method=method, out=out, iterations=ITERATIONS, val_every=ITERATIONS,
                         checkpoint_every=ITERATIONS, **PINNED)
    trainer = Trainer(config, progress=False)
    summary = trainer.run()
    with open(os.path.join(out, "metrics.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))[-WINDOW:]
    trainer.model.eval()
    with torch.no_grad(), fastcnf.track() as stats:
        trainer.model.log_prob(trainer.dataset.validation)
    mean = lambda key: sum(float(row[key]) for row in rows) / len(rows)  # noqa: E731
    return {
        "iterations": ITERATIONS,
        "nfe_forward_per_iteration": mean("nfe_forward"),
        "nfe_backward_per_iteration": mean("nfe_backward"),
        "seconds_per_iteration": mean("seconds"),
        "train_seconds_total": summary["train_seconds"],
        "validation_nll": summary["validation"][-1]["nll"],
        "test_nll": summary["test"]["nll"],
        "eval_nfe": stats.nfe_forward,
        "end_time": mean("end_time"),
    }


@pytest.mark.parametrize("method", METHODS)
def test_cnf_methods_8gaussians(benchmark, method, tmp_path):
    benchmark.group = "cnf-methods-8gaussians"
    result = benchmark.pedantic(_train, args=(method, str(tmp_path / method)), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    RESULTS[method] = result
    assert result["test_nll"] < 4.0  # it learned something (N(0, I) on this data: about 6 nats)


def teardown_module(module):
    if not RESULTS:
        return
    print(f"\n\nCNF methods on 8gaussians, dopri5 rtol=atol=1e-4, {ITERATIONS} iterations, exact divergence, "
          f"1 CPU thread (means over the last {WINDOW} iterations)")
    print("| method | NFE fwd/it | NFE bwd/it | s/it | eval NFE | T | val NLL | test NLL |")
    print("|---|---|---|---|---|---|---|---|")
    for method, r in RESULTS.items():
        print(f"| {method} | {r['nfe_forward_per_iteration']:.1f} | {r['nfe_backward_per_iteration']:.1f} | "
              f"{r['seconds_per_iteration']:.4f} | {r['eval_nfe']} | {r['end_time']:.3f} | "
              f"{r['validation_nll']:.3f} | {r['test_nll']:.3f} |")
