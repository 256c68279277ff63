"""Time to quality: fastcnf's trainer against an FFJORD-style training loop on torchdiffeq. A script.

    python bench/bench_time_to_quality.py --iterations 1000 --json bench/results/cpu-time-to-quality.json
    python bench/bench_time_to_quality.py --iterations 50 --eval-every 25          # a quick look

Both train the same network from the same initial weights on the same batches with the same
optimizer: 8gaussians, ``ODEnet`` 2-64-64-64-2 concatsquash tanh, T = 0.5, dopri5 at
rtol = atol = 1e-5, batch 512, Adam (lr 1e-3, weight decay 1e-5), exact divergence, adjoint,
1 torch thread.

    torchdiffeq   FFJORD's loop: dynamics = the net plus the exact divergence by one autograd
                  vector-Jacobian product per dimension (graph kept only under autograd), solved by
                  torchdiffeq.odeint_adjoint, NLL, backward, Adam step
    fastcnf       ``fastcnf.training.Trainer`` with the same settings (its defaults: the fused
                  divergence pass, torchdiffeq's step-size controller); ``--fastcnf-controller pi``,
                  ``--seminorm`` and ``--compile`` (the fused pass through torch.compile) run further
                  fastcnf variants

The loops run interleaved, one iteration of each in turn, so load on a shared machine affects both
alike. Seconds per iteration cover the forward solve, the backward pass and the optimizer step
(the trainer's ``seconds`` column; the same span for the torchdiffeq loop), as wall time and as
process CPU time (inductor compiles in worker processes: for ``--compile`` count the first
iteration's wall time, reported alone, and the means with and without the first iteration). Every
``--eval-every`` iterations and at the end both models are evaluated by
the same function (``fastcnf.training.trainer.evaluate_nll``: exact divergence, dopri5 at 1e-5, in
eval mode) on the same validation set; the final test NLL is on the 5000-point test set. A
prefix's cumulative training seconds against its validation NLL is the time-to-quality curve.
"""

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torchdiffeq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastcnf  # noqa: E402
from bench.models import ExactDivergenceCNF, standard_normal_logpdf  # noqa: E402
from fastcnf.training.config import TrainConfig  # noqa: E402
from fastcnf.training.trainer import Trainer, evaluate_nll  # noqa: E402

SETTINGS = dict(data="8gaussians", method="ffjord", hidden=(64, 64, 64), layer="concatsquash", activation="tanh",
                end_time=0.5, solver="dopri5", rtol=1e-5, atol=1e-5, batch_size=512, lr=1e-3, weight_decay=1e-5,
                divergence="exact", test_divergence="exact", adjoint=True, threads=1, seed=0, plot=False)


class FFJORDLoop:
    """The torchdiffeq training loop: its own copy of the network, optimizer and batch sampler."""

    def __init__(self, model, sampler):
        self.model = copy.deepcopy(model)  # the fastcnf Flow; only its ODEnet is used for training here
        self.net = self.model.blocks[0].net
        self.dynamics = ExactDivergenceCNF(self.net)
        self.sampler = sampler
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=SETTINGS["lr"],
                                          weight_decay=SETTINGS["weight_decay"])
        self.times = torch.tensor([0.0, SETTINGS["end_time"]])
        self.counts = []

    def step(self):
        """One iteration; returns (loss, wall seconds, CPU seconds)."""
        batch = self.sampler.next()
        wall, cpu = time.perf_counter(), time.process_time()
        calls = _Counter(self.dynamics)
        z, logp = torchdiffeq.odeint_adjoint(calls, (batch, torch.zeros(batch.shape[0], 1)), self.times,
                                             rtol=SETTINGS["rtol"], atol=SETTINGS["atol"], method="dopri5",
                                             adjoint_params=tuple(self.net.parameters()))
        loss = -(standard_normal_logpdf(z[-1]) - logp[-1][:, 0]).mean()
        forward_calls = calls.calls
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        seconds = (time.perf_counter() - wall, time.process_time() - cpu)
        self.counts.append((forward_calls, calls.calls - forward_calls))
        return float(loss.detach()), *seconds


class _Counter(torch.nn.Module):
    def __init__(self, func):
        super().__init__()
        self.func, self.calls = func, 0

    def forward(self, t, y):
        self.calls += 1
        return self.func(t, y)


def _trainer_step(trainer):
    """One trainer iteration; returns (loss, wall seconds, CPU seconds, NFE forward, NFE backward)."""
    cpu = time.process_time()
    row = trainer.train_step()
    return row["loss"], row["seconds"], time.process_time() - cpu, row["nfe_forward"], row["nfe_backward"]


def _evaluate(model, data, seed):
    nll, _ = evaluate_nll(model, data, 1000, seed)
    return nll


def run(iterations, eval_every, variants, out_dir):
    torch.set_num_threads(1)
    trainers = {}
    for name, extra in variants.items():
        config = TrainConfig(**SETTINGS, iterations=iterations, val_every=iterations + 1, checkpoint_every=10 ** 9,
                             out=os.path.join(out_dir, name), **extra)
        trainers[name] = Trainer(config, progress=False)
    reference = next(iter(trainers.values()))
    dataset = reference.dataset
    loop = FFJORDLoop(reference.model, dataset.sampler(SETTINGS["batch_size"], SETTINGS["seed"]))
    for trainer in trainers.values():  # every run starts from the same weights
        trainer.model.load_state_dict(reference.model.state_dict())
    history = {name: dict(loss=[], wall=[], cpu=[], nfe=[], validation=[]) for name in ["torchdiffeq", *trainers]}
    validation = dataset.validation[:2000]
    for iteration in range(1, iterations + 1):
        loss, wall, cpu = loop.step()
        record = history["torchdiffeq"]
        record["loss"].append(loss), record["wall"].append(wall), record["cpu"].append(cpu)
        record["nfe"].append(loop.counts[-1])
        for name, trainer in trainers.items():
            loss, wall, cpu, nfe_forward, nfe_backward = _trainer_step(trainer)
            record = history[name]
            record["loss"].append(loss), record["wall"].append(wall), record["cpu"].append(cpu)
            record["nfe"].append((nfe_forward, nfe_backward))
        if iteration % eval_every == 0 or iteration == iterations:
            models = {"torchdiffeq": loop.model, **{name: t.model for name, t in trainers.items()}}
            for name, model in models.items():
                history[name]["validation"].append((iteration, _evaluate(model, validation, SETTINGS["seed"] + 1)))
            print(f"iteration {iteration}: validation NLL " + ", ".join(
                f"{name} {history[name]['validation'][-1][1]:.4f}" for name in history), flush=True)
    models = {"torchdiffeq": loop.model, **{name: t.model for name, t in trainers.items()}}
    summary = {}
    for name, record in history.items():
        summary[name] = dict(
            test_nll=_evaluate(models[name], dataset.test, SETTINGS["seed"] + 1),
            wall_per_iteration=statistics.mean(record["wall"]), cpu_per_iteration=statistics.mean(record["cpu"]),
            wall_median=statistics.median(record["wall"]), cpu_median=statistics.median(record["cpu"]),
            first_wall=record["wall"][0],
            wall_per_iteration_after_first=statistics.mean(record["wall"][1:] or record["wall"]),
            cpu_per_iteration_after_first=statistics.mean(record["cpu"][1:] or record["cpu"]),
            nfe_forward=statistics.mean(n[0] for n in record["nfe"]),
            nfe_backward=statistics.mean(n[1] for n in record["nfe"]))
    base = summary["torchdiffeq"]
    print("| run | s/iteration wall (mean) | ratio | s/iteration CPU (mean) | ratio | CPU after the 1st | ratio "
          "| 1st iteration wall s | NFE fwd/bwd | test NLL |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in summary.items():
        print(f"| {name} | {row['wall_per_iteration']:.3f} "
              f"| {row['wall_per_iteration'] / base['wall_per_iteration']:.2f} "
              f"| {row['cpu_per_iteration']:.3f} | {row['cpu_per_iteration'] / base['cpu_per_iteration']:.2f} | "
              f"{row['cpu_per_iteration_after_first']:.3f} | "
              f"{row['cpu_per_iteration_after_first'] / base['cpu_per_iteration_after_first']:.2f} | "
              f"{row['first_wall']:.1f} | {row['nfe_forward']:.1f}/{row['nfe_backward']:.1f} | {row['test_nll']:.4f} |")
    return dict(settings={k: list(v) if isinstance(v, tuple) else v for k, v in SETTINGS.items()},
                iterations=iterations, summary=summary, history=history,
                versions=dict(torch=torch.__version__, fastcnf=fastcnf.__version__,
                              torchdiffeq=torchdiffeq.__version__))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--fastcnf-controller", nargs="+", choices=("integral", "pi"), default=["integral"],
                        help="fastcnf trainer variants by step-size controller")
    parser.add_argument("--seminorm", action="store_true", help="also run fastcnf with the adjoint seminorm")
    parser.add_argument("--compile", action="store_true", help="also run fastcnf with the fused pass compiled")
    parser.add_argument("--json", help="write the summary and every iteration's figures here")
    args = parser.parse_args(argv)
    variants = {("fastcnf" if c == "integral" else f"fastcnf-{c}"): dict(controller=c) for c in args.fastcnf_controller}
    if args.seminorm:
        variants["fastcnf-seminorm"] = dict(seminorm=True)
    if args.compile:
        variants["fastcnf-compile"] = dict(compile=True)
    with tempfile.TemporaryDirectory() as out_dir:
        result = run(args.iterations, args.eval_every, variants, out_dir)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
