"""Multi-process training on torch.distributed: torchrun's environment, the process group, DDP.

    torchrun --nproc_per_node 2 -m fastcnf train --data 8gaussians --batch-size 512 ...

``process_group(device)`` reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), joins the process group (gloo for a CPU run, nccl for CUDA, each process on
cuda:LOCAL_RANK) and yields the process's ``World``; outside torchrun it yields ``SINGLE`` and
touches nothing. A ``World`` carries the few collectives the trainer needs (gather numbers,
agree on a flag, gather or broadcast a small object); on ``SINGLE`` they are identities.

Gradients: ``data_parallel`` wraps the module that computes a batch's loss (``BatchLoss``) in
``DistributedDataParallel``. Its hooks sit on the parameters' gradient accumulators; the adjoint
(``fastcnf.ode.adjoint``) returns all parameter gradients at once as the outputs of its autograd
Function's backward (the solver's inner ``torch.autograd.grad`` calls do not run the
accumulators), so every parameter is reduced once per iteration, after the adjoint solve, and no
collective runs inside a solve: adaptive solvers may take different steps on different processes.
"""

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .config import ConfigError
from .sharding import Shard

__all__ = ["World", "SINGLE", "DistributedError", "launch_environment", "process_device", "process_group",
           "current_world", "check_agreement", "differing_settings", "reduce_metrics", "BatchLoss",
           "data_parallel", "LAUNCH_VARIABLES", "MAXIMUM_METRICS"]

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# metrics reduced by their maximum over processes (the slowest process sets the pace); others by the mean
MAXIMUM_METRICS = ("nfe_forward", "nfe_backward", "seconds")


class DistributedError(ConfigError):
    """A multi-process launch that cannot work (environment, device, disagreeing processes)."""


@dataclass(frozen=True)
class World:
    """This process among the training processes.

    ``distributed`` is True inside a process group (also with one process under torchrun);
    ``collective_device`` holds the tensors of collectives (cpu for gloo, cuda:LOCAL_RANK for nccl).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    distributed: bool = False
    collective_device: str = "cpu"

    @property
    def is_main(self):
        """Rank 0 writes logs, metrics, checkpoints and pictures."""
        return self.rank == 0

    @property
    def shard(self):
        return Shard(self.rank, self.size)

    def gather(self, values):
        """Every process's list of numbers (same length everywhere) as a (size, n) float64 CPU tensor."""
        local = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if not self.distributed:
            return local.reshape(1, -1)
        local = local.to(self.collective_device)
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local)
        return torch.stack(parts).cpu()

    def all_true(self, flag):
        """True when ``flag`` holds on every process."""
        if not self.distributed:
            return bool(flag)
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.collective_device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def gather_objects(self, obj):
        """Every process's ``obj`` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every process."""
        if not self.distributed:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


SINGLE = World()


def _launch_integer(environ, name, minimum):
    text = environ[name]
    try:
        value = int(text)
    except ValueError:
        raise DistributedError(f"environment variable {name}={text!r} is not an integer.") from None
    if value < minimum:
        raise DistributedError(f"environment variable {name}={value} must be >= {minimum}.")
    return value


def launch_environment(environ=None):
    """(rank, world size, local rank) of a torchrun launch, or None when RANK and WORLD_SIZE are unset."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ and "WORLD_SIZE" not in environ:
        return None
    missing = [name for name in LAUNCH_VARIABLES if name not in environ]
    if missing:
        raise DistributedError(f"incomplete distributed launch: {', '.join(missing)} not set (start the processes with "
                               "torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT).")
    rank = _launch_integer(environ, "RANK", 0)
    size = _launch_integer(environ, "WORLD_SIZE", 1)
    local_rank = _launch_integer(environ, "LOCAL_RANK", 0)
    if rank >= size:
        raise DistributedError(f"RANK={rank} must be smaller than WORLD_SIZE={size}.")
    return rank, size, local_rank


def process_device(device, local_rank=0, distributed=False):
    """The torch.device this process trains on: ``device``, or cuda:LOCAL_RANK for ``cuda`` under torchrun."""
    if not distributed or device.type != "cuda":
        return device
    if device.index is not None:
        raise DistributedError(f"--device {device} names one GPU, but under torchrun every process uses "
                               "cuda:LOCAL_RANK; pass --device cuda.")
    if local_rank >= torch.cuda.device_count():
        raise DistributedError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPUs; "
                               "start at most that many processes per node (--nproc_per_node).")
    return torch.device("cuda", local_rank)


@contextmanager
def process_group(device):
    """Join torchrun's process group for a run on ``device`` (a torch.device); yields the ``World``.

    Outside torchrun it yields ``SINGLE`` and does nothing. The backend is gloo for CPU runs and
    nccl for CUDA runs (the process then uses cuda:LOCAL_RANK). The group is destroyed on exit,
    after a barrier when the block ends normally (an exception may have hit one process only).
    """
    launch = launch_environment()
    if launch is None:
        yield SINGLE
        return
    if dist.is_initialized():
        raise DistributedError("a torch.distributed process group is already initialized in this process.")
    rank, size, local_rank = launch
    device = process_device(device, local_rank, distributed=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=size)
    try:
        yield World(rank, size, local_rank, True, str(device) if backend == "nccl" else "cpu")
    except BaseException:
        dist.destroy_process_group()
        raise
    _leave_together()


def _leave_together():
    """Destroy the process group once every process is done with it.

    Objects holding the group (a DistributedDataParallel wrapper) go first, and a barrier keeps a
    process from closing its connections while another still uses them: either makes gloo abort
    a process at exit now and then ("terminate called without an active exception").
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def current_world():
    """The ``World`` of an initialized process group (e.g. a user's own), else ``SINGLE``."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    collective = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    return World(dist.get_rank(), dist.get_world_size(), local_rank, True, collective)


def differing_settings(per_rank):
    """``{name: [value on each rank]}`` for the entries of the dicts ``per_rank`` that are not all equal."""
    names = sorted(set().union(*per_rank), key=str)
    missing = object()
    differing = {}
    for name in names:
        values = [settings.get(name, missing) for settings in per_rank]
        if any(value != values[0] for value in values[1:]):
            differing[name] = ["<unset>" if value is missing else value for value in values]
    return differing


def check_agreement(world, settings):
    """Raise ``DistributedError`` on every process unless all processes hold equal ``settings`` (a dict).

    The message names each differing setting with its value per rank.
    """
    if not world.distributed:
        return
    differing = differing_settings(world.gather_objects(settings))
    if differing:
        details = "; ".join(f"{name}: " + ", ".join(f"rank {rank} {value!r}" for rank, value in enumerate(values))
                            for name, values in differing.items())
        raise DistributedError(f"the {world.size} processes disagree on {', '.join(differing)} ({details}); start "
                               "every process with the same arguments and the same checkpoint.")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def reduce_metrics(world, row):
    """A metrics row with global values: ``MAXIMUM_METRICS`` by their maximum, other numbers by their mean.

    Per-process means over equal shares of the global batch average to the global batch's mean.
    Numbers equal on every process (iteration, T) and non-numbers (the phase) are kept as they are.
    """
    if not world.distributed:
        return row
    names = [name for name, value in row.items() if _is_number(value)]
    gathered = world.gather([row[name] for name in names])
    reduced = dict(row)
    for column, name in enumerate(names):
        values = gathered[:, column]
        if name in MAXIMUM_METRICS:
            value = values.max().item()
            reduced[name] = int(value) if isinstance(row[name], int) else value
        elif not bool((values == values[0]).all()):
            reduced[name] = values.mean().item()
    return reduced


class BatchLoss(nn.Module):
    """``method.loss(model, batch)`` as a module, so ``DistributedDataParallel`` can wrap it."""

    def __init__(self, method, model):
        super().__init__()
        self.method, self.model = method, model

    def forward(self, batch):
        return self.method.loss(self.model, batch)


@contextmanager
def _all_trainable(module):
    frozen = [p for p in module.parameters() if not p.requires_grad]
    for param in frozen:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for param in frozen:
            param.requires_grad_(False)


def data_parallel(module, world, device, find_unused_parameters):
    """``module`` wrapped in ``DistributedDataParallel`` inside a process group, else ``module`` itself.

    ``find_unused_parameters`` must be True for methods that switch parameters' ``requires_grad``
    per phase (TO-FLOW, block-wise training). DDP registers the parameters that require gradients
    when it is built, so all of them are made trainable for that moment.
    """
    if not world.distributed:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    with _all_trainable(module):
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)

