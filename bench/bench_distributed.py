"""Training throughput of the 2-D CNF with 1 and 2 processes (torchrun, gloo, CPU): a script, not a pytest suite.

    python bench/bench_distributed.py --iterations 30 --batch 512 2048 --json bench/results/cpu-distributed.json

Every setup trains the same FFJORD-style CNF on 8gaussians (``python -m fastcnf train``, exact
divergence, adjoint) with the same global batch, from the same seed, for ``--iterations``
iterations, and reports samples per second = batch / mean seconds per iteration over the
iterations after the first ``--warmup`` (the trainer's ``seconds`` column: forward, backward with
the gradient all-reduce, optimizer step; under torchrun the slowest process's time). Setups:

    1 process, 1 thread      the default single-process run
    1 process, N threads     the same with torch's intra-op threads
    torchrun, 1 process      the distributed code path with one process
    torchrun, N processes    N processes of 1 thread, each with batch / N rows

Adaptive solvers choose their steps from the error of the rows each process holds, so the NFE per
iteration is reported too: compare samples/s only between rows with similar NFE. torchrun's
rendezvous store listens on --master-port (on every interface, as torchrun does).
"""

import argparse
import csv
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import torch

WORKLOAD = ["--data", "8gaussians", "--method", "ffjord", "--hidden", "64,64,64", "--solver", "dopri5", "--rtol",
            "1e-5", "--atol", "1e-5", "--lr", "1e-3", "--seed", "0", "--no-plot", "--no-progress"]


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _command(processes, threads, torchrun):
    if not torchrun:
        return [sys.executable, "-m", "fastcnf", "train", "--threads", str(threads)]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "fastcnf", "train", "--threads",
            str(threads)]


def _setups(cores):
    return [("1 process, 1 thread", 1, 1, False), (f"1 process, {cores} threads", 1, cores, False),
            ("torchrun, 1 process", 1, 1, True), (f"torchrun, {cores} processes", cores, 1, True)]


def _measure(name, processes, threads, torchrun, batch, iterations, warmup, root):
    out = os.path.join(root, f"{name.replace(' ', '_').replace(',', '')}-{batch}")
    command = _command(processes, threads, torchrun) + WORKLOAD + [
        "--batch-size", str(batch), "--iterations", str(iterations), "--val-every", str(iterations),
        "--checkpoint-every", str(iterations), "--val-size", "500", "--out", out]
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, env=environment)
    wall = time.perf_counter() - start
    if finished.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{finished.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))[warmup:]
    mean = lambda key: sum(float(row[key]) for row in rows) / len(rows)  # noqa: E731
    return {"setup": name, "processes": processes, "threads": threads, "torchrun": torchrun, "batch": batch,
            "iterations": iterations, "seconds_per_iteration": mean("seconds"),
            "samples_per_second": batch / mean("seconds"), "nfe_forward": mean("nfe_forward"),
            "nfe_backward": mean("nfe_backward"), "final_loss": float(rows[-1]["loss"]), "wall_seconds": wall}


def _table(results):
    lines = ["| batch | setup | samples/s | vs 1 process, 1 thread | s/iteration | NFE fwd + bwd | wall s |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    baseline = {r["batch"]: r["samples_per_second"] for r in results if r["processes"] == 1 and r["threads"] == 1
                and not r["torchrun"]}
    for r in results:
        lines.append(f"| {r['batch']} | {r['setup']} | {r['samples_per_second']:.0f} | "
                     f"{r['samples_per_second'] / baseline[r['batch']]:.2f}x | {r['seconds_per_iteration']:.3f} | "
                     f"{r['nfe_forward']:.0f} + {r['nfe_backward']:.0f} | {r['wall_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first iterations left out of the means (default 5)")
    parser.add_argument("--batch", type=int, nargs="+", default=[512, 2048], help="global batch sizes")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="processes / threads to compare with 1")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.warmup >= args.iterations:
        parser.error("--warmup must be smaller than --iterations")
    root = tempfile.mkdtemp(prefix="fastcnf-bench-distributed-")
    load_before = os.getloadavg()
    try:
        results = [_measure(name, processes, threads, torchrun, batch, args.iterations, args.warmup, root)
                   for batch in args.batch for name, processes, threads, torchrun in _setups(args.cores)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    machine = {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "load_average_before": load_before, "load_average_after": os.getloadavg()}
    print(f"{machine['cpu_count']} CPU cores, torch {machine['torch']}, load average before/after "
          f"{load_before[0]:.1f}/{machine['load_average_after'][0]:.1f}")
    print(_table(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "workload": WORKLOAD, "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
