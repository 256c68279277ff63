"""CNF training step (forward solve + backward pass of the NLL) with fastcnf's networks: fastcnf against
torchdiffeq in one process, at 1 and 2 torch threads. A script, not a pytest suite.

    python bench/bench_training_step.py --threads 1 2 --rounds 7 --json bench/results/cpu-training-step.json
    python bench/bench_training_step.py --workloads cnf2d --modes adjoint --rounds 3     # a quick look

Workloads (dopri5 at rtol = atol = 1e-5, fastcnf's ``ODEnet`` with concatsquash layers and tanh,
float32). The network is a trained one from a fastcnf run (``--checkpoint cnf2d=DIR``, e.g. made by
``python -m fastcnf train --data 8gaussians --divergence exact --batch-size 512 --weight-decay 1e-5
--iterations 400 --no-plot --out runs/bench-cnf2d``, about 5 min), or else the default
initialisation with every linear weight times ``--weight-scale`` (deterministic; an easier flow,
fewer evaluations per solve than a trained model):

    cnf2d   8gaussians, batch 512, 2-64-64-64-2, T = 0.5; exact and Hutchinson divergence
    cnf64   digits (64-D, dequantized to (0, 1)), batch 256, 64-256-256-64, T = 0.5; Hutchinson

each through ``odeint_adjoint`` (adjoint) and through the solver (backprop). Variants:

    torchdiffeq      FFJORD-style dynamics (the net plus an autograd divergence: one vector-Jacobian
                     product per dimension, or eps^T J eps) through torchdiffeq.odeint[_adjoint]
    fastcnf-dropin   the same dynamics through fastcnf (``import fastcnf as torchdiffeq``)
    fastcnf          ``fastcnf.cnf.CNF`` with its default estimator: the fused divergence pass
    fastcnf-pi       the same with the PI controller for the forward solve (``options=dict(controller="pi")``;
                     the adjoint solve keeps the integral controller, as fastcnf's trainer does)
    fastcnf-compile  ``fastcnf`` with the fused pass compiled by torch.compile (``compile=True``; ``--compile``;
                     the compilation happens in the counted run before the timing)

Hutchinson noise is the same tensor for every variant. Every round runs each variant once, in
turn, and records the CPU time of the process (``time.process_time``: with 1 thread, that of the
one compute thread; with 2, of both) and the wall time; the table reports medians over rounds and
the median over rounds of the per-round ratio to torchdiffeq (robust against load that drifts
while the benchmark runs). NFE (forward / backward) come from a counted run before the timing.
The final loss of each variant is printed as a check that all of them compute the same thing.

``--matmuls`` adds the floor the matrix products set: the products one step of each variant makes
(recorded by torch.profiler with their shapes: ``aten::mm``, ``addmm``, ``bmm``) replayed alone on random
operands of the same shapes, best CPU time of three replays, and that time over torchdiffeq's step. A
variant cannot be faster than its products; where they alone are near half of torchdiffeq's step, a 0.5x
step needs fewer or cheaper products, not less overhead.
"""

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torchdiffeq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastcnf  # noqa: E402
from bench.libraries import CountingFunc  # noqa: E402
from bench.models import ExactDivergenceCNF, HutchinsonCNF, standard_normal_logpdf  # noqa: E402
from fastcnf.cnf import CNF, ExactDivergence, HutchinsonDivergence, ODEnet, SolverSettings  # noqa: E402

VARIANTS = ("torchdiffeq", "fastcnf-dropin", "fastcnf", "fastcnf-pi", "fastcnf-compile")
TOLERANCE = 1e-5
END_TIME = 0.5


class FixedNoise(HutchinsonDivergence):
    """fastcnf's Hutchinson estimator with a given noise tensor instead of a fresh draw per solve."""

    def __init__(self, noise, compile=False):
        super().__init__("gaussian", compile=compile)
        self.fixed = noise

    def resample(self, z):
        self.noise = self.fixed


def _data(name, batch):
    from fastcnf.training.data import load_digits, toy_sample

    if name == "cnf2d":
        return torch.as_tensor(toy_sample("8gaussians", batch, np.random.default_rng(0)), dtype=torch.float32)
    digits = load_digits(seed=0).train[:batch]
    return (torch.as_tensor(digits, dtype=torch.float32) + 0.5) / 17.0


WORKLOADS = {
    "cnf2d": dict(dim=2, hidden=(64, 64, 64), batch=512, divergences=("exact", "hutchinson")),
    "cnf64": dict(dim=64, hidden=(256, 256), batch=256, divergences=("hutchinson",)),
}


class Case:
    """One workload, divergence and mode: the network, data and noise every variant shares."""

    def __init__(self, workload, divergence, mode, weight_scale, checkpoint=None):
        spec = WORKLOADS[workload]
        self.name = f"{workload} {divergence} {mode}"
        self.adjoint = mode == "adjoint"
        self.divergence = divergence
        torch.manual_seed(0)
        self.net = ODEnet(spec["dim"], spec["hidden"], "concatsquash", "tanh")
        if checkpoint is not None:
            from fastcnf.training.trainer import load_run

            self.net.load_state_dict(load_run(checkpoint)[1].blocks[0].net.state_dict())
        else:
            with torch.no_grad():
                for layer in self.net.layers:
                    layer.linear.weight.mul_(weight_scale)
        self.x = _data(workload, spec["batch"])
        self.noise = torch.randn(self.x.shape, generator=torch.Generator().manual_seed(1))
        self.times = torch.tensor([0.0, END_TIME])

    def step(self, variant):
        """A zero-argument training step (forward, NLL, backward); returns the loss. Gradients are zeroed."""
        if variant in ("torchdiffeq", "fastcnf-dropin"):
            return self._ffjord_step(torchdiffeq if variant == "torchdiffeq" else fastcnf)
        options = dict(controller="pi") if variant == "fastcnf-pi" else {}
        compile = variant == "fastcnf-compile"
        estimator = ExactDivergence(compile=compile) if self.divergence == "exact" else FixedNoise(self.noise, compile)
        cnf = CNF(self.net, END_TIME, estimator,
                  train_solver=SolverSettings("dopri5", TOLERANCE, TOLERANCE, options, adjoint=self.adjoint,
                                              adjoint_options={}))

        def step():
            self.net.zero_grad(set_to_none=True)
            z, delta_logp = cnf(self.x)
            loss = -(standard_normal_logpdf(z) - delta_logp).mean()
            loss.backward()
            return loss.detach()

        return step

    def _ffjord_step(self, library):
        dynamics = ExactDivergenceCNF(self.net) if self.divergence == "exact" else HutchinsonCNF(self.net, self.noise)
        self.counted = CountingFunc(dynamics)
        odeint = library.odeint_adjoint if self.adjoint else library.odeint
        state = (self.x, torch.zeros(self.x.shape[0], 1))

        def step():
            self.net.zero_grad(set_to_none=True)
            self.counted.phase = "forward"
            z, logp = odeint(self.counted, state, self.times, rtol=TOLERANCE, atol=TOLERANCE, method="dopri5")
            loss = -(standard_normal_logpdf(z[-1]) - logp[-1][:, 0]).mean()
            self.counted.phase = "backward"
            loss.backward()
            return loss.detach()

        return step

    def count(self, variant, step):
        """(loss, NFE forward, NFE backward) of one run."""
        if variant == "torchdiffeq" or variant == "fastcnf-dropin":
            self.counted.calls = {"forward": 0, "backward": 0}
            loss = step()
            return float(loss), self.counted.calls["forward"], self.counted.calls["backward"]
        with fastcnf.track() as stats:
            loss = step()
        return float(loss), stats.nfe_forward, stats.nfe_backward


MATMUL_OPS = {"aten::mm": torch.mm, "aten::addmm": torch.addmm, "aten::bmm": torch.bmm}
OPERANDS = {"aten::mm": 2, "aten::addmm": 3, "aten::bmm": 2}  # then an ``out=`` buffer, if any


def matrix_products(step):
    """{(op name, operand shapes): count} of the matrix products one call of ``step`` makes."""
    with torch.profiler.profile(record_shapes=True) as profile:
        step()
    counts = collections.Counter()
    for event in profile.events():
        parent, nested = event.cpu_parent, False
        while parent is not None and not nested:
            nested, parent = parent.name in MATMUL_OPS, parent.cpu_parent
        if event.name in MATMUL_OPS and not nested:
            shapes = tuple(tuple(shape) for shape in event.input_shapes if shape)[:OPERANDS[event.name]]
            counts[(event.name, shapes)] += 1
    return counts


def replay_products(counts, replays=3):
    """Best CPU seconds of ``counts``'s products run alone on random float32 operands of their shapes."""
    operands = {key: [torch.randn(shape) for shape in key[1]] for key in counts}
    best = float("inf")
    for _ in range(replays):
        start = time.process_time()
        for key, count in counts.items():
            op, args = MATMUL_OPS[key[0]], operands[key]
            for _ in range(count):
                op(*args)
        best = min(best, time.process_time() - start)
    return best


def measure(case, variants, rounds, threads, matmuls=False):
    torch.set_num_threads(threads)
    steps = {variant: case.step(variant) for variant in variants}
    rows = {}
    for variant, step in steps.items():
        loss, nfe_forward, nfe_backward = case.count(variant, step)
        rows[variant] = dict(loss=loss, nfe_forward=nfe_forward, nfe_backward=nfe_backward, cpu=[], wall=[])
        if matmuls:
            products = matrix_products(step)
            rows[variant].update(matmul_calls=sum(products.values()), matmul_cpu=replay_products(products))
    for _ in range(rounds):
        for variant, step in steps.items():
            cpu, wall = time.process_time(), time.perf_counter()
            step()
            rows[variant]["cpu"].append(time.process_time() - cpu)
            rows[variant]["wall"].append(time.perf_counter() - wall)
    baseline = rows["torchdiffeq"]
    for row in rows.values():
        for clock in ("cpu", "wall"):
            row[f"{clock}_median"] = statistics.median(row[clock])
            row[f"{clock}_ratio"] = statistics.median(a / b for a, b in zip(row[clock], baseline[clock]))
        if matmuls:
            row["matmul_ratio"] = row["matmul_cpu"] / baseline["cpu_median"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=tuple(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--modes", nargs="+", choices=("adjoint", "backprop"), default=["adjoint", "backprop"])
    parser.add_argument("--divergences", nargs="+", choices=("exact", "hutchinson"), default=["exact", "hutchinson"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--weight-scale", type=float, default=2.5)
    parser.add_argument("--checkpoint", nargs="+", default=[], metavar="WORKLOAD=RUN",
                        help="trained networks: a fastcnf run directory or checkpoint per workload, e.g. cnf2d=runs/x")
    parser.add_argument("--controller", choices=("integral", "pi"), nargs="+", default=["integral", "pi"],
                        help="fastcnf variants to run: the default controller, the PI controller, or both")
    parser.add_argument("--compile", action="store_true", help="also run fastcnf with the fused pass compiled")
    parser.add_argument("--matmuls", action="store_true",
                        help="also time each variant's matrix products alone (the floor they set)")
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args(argv)
    variants = ["torchdiffeq", "fastcnf-dropin"] + [{"integral": "fastcnf", "pi": "fastcnf-pi"}[c]
                                                    for c in args.controller] + ["fastcnf-compile"] * args.compile
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    results = dict(checkpoints=checkpoints, machine=dict(platform=platform.platform(), processor=platform.processor(),
                                                         cpus=os.cpu_count(),
                                torch=torch.__version__, fastcnf=fastcnf.__version__,
                                torchdiffeq=torchdiffeq.__version__, weight_scale=args.weight_scale,
                                rounds=args.rounds), cases=[])
    extra = " products | products CPU s | products / torchdiffeq |" if args.matmuls else ""
    print("| case | threads | variant | NFE fwd/bwd | loss | CPU s (median) | CPU ratio | wall s (median) "
          "| wall ratio |" + extra)
    print("|---|---|---|---|---|---|---|---|---|" + "---|" * (3 * args.matmuls))
    for workload in args.workloads:
        for divergence in WORKLOADS[workload]["divergences"]:
            if divergence not in args.divergences:
                continue
            for mode in args.modes:
                case = Case(workload, divergence, mode, args.weight_scale, checkpoints.get(workload))
                for threads in args.threads:
                    rows = measure(case, variants, args.rounds, threads, args.matmuls)
                    results["cases"].append(dict(case=case.name, threads=threads, variants=rows))
                    for variant, row in rows.items():
                        floor = (f" {row['matmul_calls']} | {row['matmul_cpu']:.3f} | {row['matmul_ratio']:.2f} |"
                                 if args.matmuls else "")
                        print(f"| {case.name} | {threads} | {variant} | {row['nfe_forward']}/{row['nfe_backward']} | "
                              f"{row['loss']:.5f} | {row['cpu_median']:.3f} | {row['cpu_ratio']:.2f} | "
                              f"{row['wall_median']:.3f} | {row['wall_ratio']:.2f} |" + floor, flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
