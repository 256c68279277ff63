"""Multi-process training: 2 CPU processes (gloo) against 1, resume after a killed process, disagreeing
processes, gradients averaged once per iteration under the adjoint.

The processes are started the way torchrun starts its workers (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT and TORCHELASTIC_USE_AGENT_STORE), with the rendezvous store hosted by
the test on a socket bound to 127.0.0.1 and gloo on the loopback interface: nothing listens on
another address (torchrun's own store would listen on all interfaces).
"""

import csv
import datetime
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastcnf.stats import track
from fastcnf.training.checkpoint import load_checkpoint
from fastcnf.training.cli import main
from fastcnf.training.config import TrainConfig
from fastcnf.training.distributed import (
    SINGLE,
    BatchLoss,
    DistributedError,
    data_parallel,
    differing_settings,
    launch_environment,
    process_device,
    process_group,
    reduce_metrics,
)
from fastcnf.training.registry import TRAINING_METHODS
from fastcnf.training.run_folder import LOCK_NAME

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not dist.is_gloo_available(),
                                reason="needs Linux (loopback interface 'lo') and torch.distributed with gloo")

RUN = ["--data", "8gaussians", "--method", "toflow", "--tpr-weight", "1", "--divergence", "hutchinson-gaussian",
       "--solver", "rk4", "--step-size", "0.125", "--hidden", "16,16", "--batch-size", "64", "--lr", "1e-2",
       "--weight-steps", "2", "--time-steps", "1", "--iterations", "20", "--checkpoint-every", "4", "--val-every", "10",
       "--val-size", "200", "--threads", "1", "--no-plot", "--no-progress"]
ITERATIONS = 20
RUN_FILES = {"checkpoint.pt", "config.json", "metrics.csv", "metrics.json"}


# ----------------------------------------------------------------------------- launching
def _worker_environment(rank, size, port):
    return {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True", "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1"}


class _LoopbackStore:
    """The rendezvous store of one job on 127.0.0.1 (what torchrun's agent hosts for its workers)."""

    def __init__(self):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        # the store takes over the listening socket (and closes it)
        self.store = dist.TCPStore("127.0.0.1", self.port, is_master=True, master_listen_fd=listener.detach(),
                                   wait_for_workers=False, timeout=datetime.timedelta(seconds=120))

    def close(self):
        self.store = None


class _Job:
    """``python -m fastcnf <arguments of rank r>`` in one process per rank; output to files in ``logs``."""

    def __init__(self, arguments_per_rank, logs):
        self.store = _LoopbackStore()
        size = len(arguments_per_rank)
        os.makedirs(logs, exist_ok=True)
        self.logs = [(os.path.join(logs, f"rank{rank}.out"), os.path.join(logs, f"rank{rank}.err"))
                     for rank in range(size)]
        self.processes = []
        for rank, arguments in enumerate(arguments_per_rank):
            with open(self.logs[rank][0], "w") as out, open(self.logs[rank][1], "w") as err:
                environment = {**os.environ, **_worker_environment(rank, size, self.store.port)}
                self.processes.append(subprocess.Popen([sys.executable, "-m", "fastcnf", *arguments], stdout=out,
                                                       stderr=err, env=environment))

    def wait(self, timeout=240):
        """[(exit status, stdout, stderr)] per rank."""
        deadline = time.time() + timeout
        try:
            codes = [process.wait(timeout=max(1.0, deadline - time.time())) for process in self.processes]
        finally:
            for process in self.processes:
                if process.poll() is None:
                    process.kill()
            self.store.close()
        return [(code, open(out).read(), open(err).read()) for code, (out, err) in zip(codes, self.logs)]


def _same_for_all(size, *arguments):
    return [list(arguments)] * size


def _rows(out, skip=("seconds",)):
    with open(os.path.join(out, "metrics.csv"), newline="") as handle:
        return [{key: value for key, value in row.items() if key not in skip} for row in csv.DictReader(handle)]


# ----------------------------------------------------------------------------- the three runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-process run, the same run killed after its first checkpoint and resumed, and a 1-process run."""
    root = tmp_path_factory.mktemp("distributed")
    two, killed, one = str(root / "two"), str(root / "killed"), str(root / "one")
    reference = _Job(_same_for_all(2, "train", *RUN, "--out", two), str(root / "logs-two"))
    victim = _Job(_same_for_all(2, "train", *RUN, "--out", killed), str(root / "logs-killed"))
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(killed, "checkpoint.pt")) and time.time() < deadline:
        assert all(process.poll() is None for process in victim.processes), victim.wait()
        time.sleep(0.01)
    victim.processes[1].send_signal(signal.SIGKILL)
    victim_results = victim.wait(timeout=120)
    stopped_at = load_checkpoint(killed)["iteration"]
    resumed = _Job(_same_for_all(2, "train", "--out", killed, "--resume", "--no-progress"),
                   str(root / "logs-resumed")).wait()
    reference_results = reference.wait()
    assert main(["train", *RUN, "--out", one]) == 0
    return SimpleNamespace(two=two, killed=killed, one=one, reference=reference_results, victim=victim_results,
                           stopped_at=stopped_at, resumed=resumed)


def test_two_processes_train_like_one_process_on_the_global_batch(runs):
    assert [code for code, _, _ in runs.reference] == [0, 0], runs.reference
    two, one = load_checkpoint(runs.two), load_checkpoint(runs.one)
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-4, atol=2e-5, msg=name)
    two_rows, one_rows = _rows(runs.two), _rows(runs.one)
    assert len(two_rows) == len(one_rows) == ITERATIONS
    assert abs(float(two_rows[-1]["end_time"]) - 0.5) > 1e-3  # T was trained (TO-FLOW time phases)
    for mine, theirs in zip(two_rows, one_rows):
        assert (mine["phase"], mine["nfe_forward"], mine["nfe_backward"]) == \
               (theirs["phase"], theirs["nfe_forward"], theirs["nfe_backward"])
        for key in ("loss", "nll", "trajectory_polynomial", "terminal_time", "end_time"):
            assert float(mine[key]) == pytest.approx(float(theirs[key]), rel=1e-5, abs=1e-9), (mine, theirs)
    for mine, theirs in zip(two["validation"], one["validation"]):
        assert mine["nll"] == pytest.approx(theirs["nll"], rel=1e-5)
    assert torch.equal(two["rng"]["torch"], one["rng"]["torch"])  # the same random stream as one process


def test_a_killed_process_ends_the_job_and_resume_reproduces_the_run(runs):
    assert runs.victim[1][0] == -signal.SIGKILL
    assert runs.victim[0][0] not in (0, None), "rank 0 went on without rank 1"
    assert 4 <= runs.stopped_at < ITERATIONS
    assert [code for code, _, _ in runs.resumed] == [0, 0], runs.resumed
    assert _rows(runs.killed) == _rows(runs.two)
    killed, two = load_checkpoint(runs.killed), load_checkpoint(runs.two)
    for name, value in two["model"].items():
        assert torch.equal(killed["model"][name], value), name
    assert killed["validation"] == two["validation"]


def test_only_rank_zero_writes_and_prints(runs):
    assert set(os.listdir(runs.two)) == RUN_FILES | {LOCK_NAME}  # rank 0 held the folder for both processes
    assert (pathlib.Path(runs.two) / LOCK_NAME).read_text().strip().isdigit()
    assert [int(row["iteration"]) for row in _rows(runs.two)] == list(range(1, ITERATIONS + 1))
    (_, out0, _), (_, out1, _) = runs.reference
    assert out0.count("test NLL") == 1 and out0.count("validation NLL") == 2
    assert out1 == ""


def test_processes_that_disagree_fail_together_naming_the_settings(tmp_path):
    out = str(tmp_path / "run")
    common = ["train", "--hidden", "8", "--batch-size", "32", "--iterations", "2", "--no-plot", "--no-progress",
              "--out", out]
    results = _Job([common + ["--lr", "1e-3"], common + ["--lr", "2e-3", "--hidden", "8,8"]],
                   str(tmp_path / "logs")).wait()
    for code, _, err in results:
        assert code == 2, err
        assert "the 2 processes disagree on hidden, lr (hidden: rank 0 (8,), rank 1 (8, 8); lr: rank 0 0.001, " \
               "rank 1 0.002)" in err
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------- gradients under the adjoint
def _toflow_model():
    config = TrainConfig(method="toflow", hidden=(8,), time_schedule="alternate", weight_steps=1, time_steps=1,
                         rtol=1e-6, atol=1e-6, divergence="exact", end_time=1.0, plot=False)
    torch.manual_seed(0)
    method = TRAINING_METHODS["toflow"]()
    model = method.build_model(config, 2)
    return method, model, method.build_optimization(model, config)


def _rank_batch(rank):
    """Rank 1's points are spread wider, so its adaptive solves take other step counts."""
    return torch.randn(16, 2, generator=torch.Generator().manual_seed(0)) * (1.0, 6.0)[rank]


SCHEDULE = ((0, True), (1, True), (2, False))  # (iteration, adjoint): weights, time (weights frozen), weights


def _counting_allreduce(calls, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls.append(bucket.index())
    return allreduce_hook(None, bucket)


def _ddp_gradients(world, rank):
    """Per iteration of ``SCHEDULE``: phase, NFE, all-reduce calls and the gradients DDP leaves."""
    method, model, optimization = _toflow_model()
    batch_loss = data_parallel(BatchLoss(method, model), world, torch.device("cpu"), find_unused_parameters=True)
    calls = []
    batch_loss.register_comm_hook(calls, _counting_allreduce)
    records = []
    for iteration, adjoint in SCHEDULE:
        for block in model.cnf_blocks():
            block.train_solver.adjoint = adjoint
        phase = optimization.begin(iteration)
        calls.clear()
        with track() as stats:
            loss, _ = batch_loss(_rank_batch(rank))
            loss.backward()
        records.append({"phase": phase, "nfe_backward": stats.nfe_backward, "nfe_forward": stats.nfe_forward,
                        "allreduce_calls": len(calls),
                        "grads": {name: None if p.grad is None else p.grad.clone()
                                  for name, p in model.named_parameters()}})
        model.zero_grad(set_to_none=True)
    return records


def _gradient_worker(rank, size, port, out):
    os.environ.update(_worker_environment(rank, size, port))
    torch.set_num_threads(1)
    with process_group(torch.device("cpu")) as world:
        records = _ddp_gradients(world, rank)  # the DDP wrapper is gone before the group is destroyed
    torch.save(records, os.path.join(out, f"rank{rank}.pt"))


def _single_process_gradients(iteration, adjoint, rank):
    method, model, optimization = _toflow_model()
    for block in model.cnf_blocks():
        block.train_solver.adjoint = adjoint
    optimization.begin(iteration)
    loss, _ = method.loss(model, _rank_batch(rank))
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_adjoint_gradients_are_averaged_once_per_iteration(tmp_path):
    store = _LoopbackStore()
    try:
        mp.start_processes(_gradient_worker, args=(2, store.port, str(tmp_path)), nprocs=2, join=True,
                           start_method="spawn")
    finally:
        store.close()
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        for step, (iteration, adjoint) in enumerate(SCHEDULE):
            mine = [records[step] for records in ranks]
            singles = [_single_process_gradients(iteration, adjoint, rank) for rank in range(2)]
            for name, first in singles[0].items():
                for record in mine:
                    if first is None:  # frozen in this phase: left without gradient on every process
                        assert record["grads"][name] is None, name
                    else:
                        torch.testing.assert_close(record["grads"][name], (first + singles[1][name]) / 2,
                                                   rtol=1e-6, atol=1e-9, msg=name)
            # one all-reduce per gradient bucket (float32 weights, float64 T), however many solver steps
            assert [record["allreduce_calls"] for record in mine] == [2, 2]
            assert mine[0]["phase"] == ("time" if iteration == 1 else "weights")
        # the processes' adaptive forward and adjoint solves took different numbers of steps, without a hang
        forward, backward = ([records[0][key] for records in ranks] for key in ("nfe_forward", "nfe_backward"))
        assert forward[0] != forward[1] and backward[0] != backward[1], (forward, backward)


def _budget_worker(rank, size, port, out, budgets):
    """Two training iterations on this rank with its own evaluation budget; records what each rank raised."""
    from fastcnf.training.errors import TrainingStalled
    from fastcnf.training.trainer import Trainer

    os.environ.update(_worker_environment(rank, size, port))
    torch.set_num_threads(1)
    config = TrainConfig(hidden=(16, 16), batch_size=64, solver="rk4", step_size=0.125, iterations=2, threads=1,
                         out=os.path.join(out, "run"), plot=False, val_every=100, checkpoint_every=100)
    with process_group(torch.device("cpu")) as world:
        trainer = Trainer(config, progress=False, world=world)
        trainer.config = config.replace(max_nfe=budgets[rank])  # past the agreement check: ranks differ
        try:
            trainer.train_step()
            outcome = "trained"
        except TrainingStalled as error:
            outcome = str(error)
        trainer._parallel_loss = None  # the DDP wrapper goes before the group
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as handle:
        handle.write(outcome)


@pytest.mark.parametrize("budget,phase", [(10, "forward"), (24, "backward")])
def test_a_budget_running_out_in_one_process_stops_every_process(tmp_path, budget, phase):
    """Rank 0 runs out of evaluations (rk4, 4 steps of 4 evaluations: 16 forward, 16 backward), rank 1 has
    no limit: both stop with the same TrainingStalled, in the forward solves or after the backward pass,
    instead of rank 1 failing in a collective that rank 0 left."""
    store = _LoopbackStore()
    try:
        context = mp.start_processes(_budget_worker, args=(2, store.port, str(tmp_path), (budget, 0)), nprocs=2,
                                     join=False, start_method="spawn")
        deadline = time.time() + 180
        while not context.join(timeout=1):
            assert time.time() < deadline, f"the processes hang ({phase} budget)"
    finally:
        store.close()
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert outcomes[0].startswith(f"iteration 1 stopped: its ODE solves needed more than {budget} evaluations")
    assert outcomes[1].startswith("iteration 1 stopped: its ODE solves needed more than"), outcomes  # its own limit


# ----------------------------------------------------------------------------- pieces
def test_launch_environment_is_read_and_checked():
    full = _worker_environment(1, 2, 1234)
    assert launch_environment({}) is None
    assert launch_environment(full) == (1, 2, 1)
    partial = {key: value for key, value in full.items() if key != "MASTER_PORT"}
    with pytest.raises(DistributedError, match="incomplete distributed launch: MASTER_PORT not set"):
        launch_environment(partial)
    with pytest.raises(DistributedError, match="RANK=2 must be smaller than WORLD_SIZE=2"):
        launch_environment({**full, "RANK": "2"})
    with pytest.raises(DistributedError, match="WORLD_SIZE='two' is not an integer"):
        launch_environment({**full, "WORLD_SIZE": "two"})


def test_each_process_gets_its_own_gpu_and_a_named_one_is_refused():
    cpu = torch.device("cpu")
    assert process_device(cpu, 3, distributed=True) == cpu
    assert process_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # one process: as asked
    with pytest.raises(DistributedError, match="names one GPU, but under torchrun every process uses cuda:LOCAL_RANK"):
        process_device(torch.device("cuda", 1), 0, distributed=True)
    with pytest.raises(DistributedError, match="LOCAL_RANK=64 but this machine has"):
        process_device(torch.device("cuda"), 64, distributed=True)


def test_differing_settings_lists_every_rank():
    assert differing_settings([{"lr": 1, "seed": 0}, {"lr": 1, "seed": 0}]) == {}
    assert differing_settings([{"lr": 1, "seed": 0}, {"lr": 2, "seed": 0, "extra": 3}]) == \
        {"extra": ["<unset>", 3], "lr": [1, 2]}


class _TwoRanks:
    """A stand-in world of two processes whose gathered metrics are given."""

    distributed = True

    def __init__(self, gathered):
        self.gathered = torch.tensor(gathered, dtype=torch.float64)

    def gather(self, values):
        assert len(values) == self.gathered.shape[1]
        return self.gathered


def test_metrics_are_averaged_except_counts_and_times_which_take_the_maximum():
    row = {"iteration": 7, "phase": "time", "loss": 1.0, "end_time": 0.5, "block": 2, "nfe_forward": 20,
           "nfe_backward": 30, "seconds": 0.25}
    world = _TwoRanks([[7, 1.0, 0.5, 2, 20, 30, 0.25], [7, 2.0, 0.5, 2, 26, 28, 0.5]])
    reduced = reduce_metrics(world, row)
    assert reduced == {"iteration": 7, "phase": "time", "loss": 1.5, "end_time": 0.5, "block": 2, "nfe_forward": 26,
                       "nfe_backward": 30, "seconds": 0.5}
    assert all(type(reduced[name]) is int for name in ("iteration", "block", "nfe_forward"))
    assert reduce_metrics(SINGLE, row) is row


def test_info_names_the_distributed_backends():
    from fastcnf.training.info import describe

    assert "torch.distributed: gloo (CPU) yes, nccl (CUDA) " in describe()
