"""The training loop: ``Trainer`` runs a ``TrainingMethod`` on a dataset and owns its files.

A run directory holds ``checkpoint.pt`` (model, optimizer, sampler and RNG states: resuming
continues bit for bit), ``metrics.csv`` (one row per iteration: loss, NLL, regularizers, end time,
forward/backward NFE, seconds), ``metrics.json`` (config, validation history, final test NLL,
averages), ``config.json`` and at the end a picture (``density.png`` for 2-D data, ``samples.png``
for 8x8 images).

The training method (``fastcnf.training.training_methods``, chosen by name in
``fastcnf.training.registry``) builds the model and its optimization, supplies the batches and turns
a batch into a loss; the trainer runs the loop around it. The one thing it asks of the method's
optimization object is whether it updates every parameter each iteration (``OptimizerStep``): when
not (TO-FLOW's phases, block-wise JKO-iFlow), DistributedDataParallel is told to expect unused
parameters. Validation runs on a forked RNG so it never changes the training stream, and every
random draw of training comes from state the checkpoint saves.

Under torchrun (``fastcnf.training.distributed``) every process runs a ``Trainer`` on its share of each
global batch of ``batch_size`` rows (``fastcnf.training.sharding``), gradients are averaged by
DistributedDataParallel once per iteration, metrics rows and validation NLLs are reduced to
global values, and only rank 0 writes files; every process resumes from the same checkpoint.
"""

import contextlib
import json
import math
import os
import random
import time

import numpy as np
import torch

from ..errors import EvaluationBudgetError
from ..stats import evaluation_budget, track
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    atomic_save,
    atomic_write_text,
    capture_rng_states,
    load_run_checkpoint,
    restore_rng_states,
)
from .config import ConfigError, TrainConfig
from .data import load_dataset
from .distributed import (
    SINGLE,
    BatchLoss,
    check_agreement,
    current_world,
    data_parallel,
    process_device,
    reduce_metrics,
)
from .errors import TrainingDiverged, TrainingInterrupted, TrainingStalled
from .metrics import MetricsLog, write_summary
from .registry import TRAINING_METHODS
from .sharding import shard_draws
from .training_methods import OptimizerStep

__all__ = ["Trainer", "TrainingDiverged", "TrainingStalled", "TrainingInterrupted", "evaluate_nll", "load_run",
           "load_resume_point", "seed_everything", "select_device"]

CHECKPOINT_FORMAT = 1



def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def select_device(name):
    """torch.device for ``name``, with a clear error when it is not available here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu or cuda[:index].") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available on this machine.")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use cpu or cuda[:index].")
    return device


def _thread_count(threads, device):
    """``threads``, or 1 on CPU: CNF-sized ops run fastest single-threaded (several times faster than 2
    threads on a 2-core machine), and a fixed count keeps CPU runs reproducible."""
    if threads is not None:
        return threads
    return 1 if device.type == "cpu" else torch.get_num_threads()


def _fork_rng(device):
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


@torch.no_grad()
def evaluate_nll(model, data, batch_size, seed, world=SINGLE):
    """Mean negative log-likelihood (nats) of ``data`` in eval mode, and the forward NFE it took.

    Runs on a forked RNG seeded with ``seed`` (Hutchinson noise), leaving the caller's RNG as it was.
    With a distributed ``world`` (every process must call this) each process evaluates its rows of
    every chunk of ``batch_size`` (noise drawn per global chunk) and the NLL is that of all of
    ``data``; the NFE is the largest of any process. By default the evaluation is local.
    """
    shard = world.shard
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with _fork_rng(device), track() as stats:
        torch.manual_seed(seed)
        for chunk in data.split(batch_size):
            rows = shard.take(chunk)
            if rows.shape[0] == 0:
                continue
            with shard_draws(shard, chunk.shape[0]):
                log_p = model.log_prob(rows.to(device))
            total += float(log_p.double().sum())
            count += rows.shape[0]
    model.train(was_training)
    if not world.distributed:
        return -total / count, stats.nfe_forward
    totals = world.gather([total, count, stats.nfe_forward])
    return -totals[:, 0].sum().item() / totals[:, 1].sum().item(), int(totals[:, 2].max().item())


def load_resume_point(out, iterations=None):
    """(config, checkpoint) to continue the run in ``out`` (``iterations`` may extend it)."""
    checkpoint = load_run_checkpoint(os.path.join(out, CHECKPOINT_NAME))
    values = dict(checkpoint["config"], out=out)
    if iterations is not None:
        values["iterations"] = iterations
    return TrainConfig.from_dict(values), checkpoint


def load_run(location, device="cpu"):
    """(config, model in eval mode, dataset, checkpoint) of a run directory or checkpoint file."""
    checkpoint = load_run_checkpoint(location)
    config = TrainConfig.from_dict(checkpoint["config"])
    device = select_device(device)
    torch.set_num_threads(_thread_count(config.threads, device))
    dataset = load_dataset(config.data, config.seed, config.logit)
    model = TRAINING_METHODS[config.method]().build_model(config, checkpoint["dim"]).to(device)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return config, model, dataset, checkpoint


def _stall_message(max_nfe, iteration, checkpoint):
    kept = (f"the checkpoint of iteration {checkpoint['iteration']} is kept" if checkpoint is not None else
            "no checkpoint was written yet")
    return (f"iteration {iteration} stopped: its ODE solves needed more than {max_nfe} evaluations of the network "
            "(--max-nfe); the dynamics became too fast or stiff to integrate. Lower --lr, loosen --rtol/--atol, or "
            f"raise --max-nfe (0: no limit); {kept}.")


def _divergence_message(loss_value, iteration):
    what = "non-finite in another process" if math.isfinite(loss_value) else str(loss_value)
    return f"the loss became {what} at iteration {iteration}; lower --lr or tighten --rtol/--atol."


class Trainer:
    """Runs ``config`` (a ``TrainConfig``) in the directory ``config.out``.

    ``Trainer(config)`` starts a new run (``config.out`` must not hold one);
    ``Trainer.resume(out)`` continues the run in ``out`` from its checkpoint, bit for bit.
    ``progress`` shows a tqdm bar (loss, NLL, NFE, T, it/s).
    ``world`` (``fastcnf.training.distributed.World``, default: the current process group's, if any) makes
    it one process of a multi-process run: ``config.batch_size`` is then the global batch.

    Setting ``stop_requested`` (the command line does on Ctrl-C) ends ``run`` after the iteration in
    progress: it checkpoints that iteration (what a periodic checkpoint there would hold, so a resumed run
    continues bit for bit) and raises ``TrainingInterrupted``. An iteration whose solves evaluate the
    dynamics more than ``config.max_nfe`` times (0: no limit) raises ``TrainingStalled``; in a multi-process
    run in every process together (the forward solves stop at the budget, the backward pass is counted after
    it ends).
    """

    def __init__(self, config, progress=True, checkpoint=None, world=None):
        self.config, self.out = config, config.out
        self.world = current_world() if world is None else world
        self.progress = progress and self.world.is_main
        self.checkpoint_file = os.path.join(self.out, CHECKPOINT_NAME)
        self.device = process_device(select_device(config.device), self.world.local_rank, self.world.distributed)
        check_agreement(self.world, {**config.as_dict(),
                                     "checkpoint iteration": None if checkpoint is None else checkpoint["iteration"]})
        torch.set_num_threads(_thread_count(config.threads, self.device))
        seed_everything(config.seed)
        self.dataset = load_dataset(config.data, config.seed, config.logit)
        if checkpoint is None:
            self._prepare_new_run()
        self.training_method = TRAINING_METHODS[config.method]()
        self.model = self.training_method.build_model(config, self.dataset.dim).to(self.device)
        self.optimization = self.training_method.build_optimization(self.model, config)
        shard = self.world.shard if self.world.distributed else None
        self.sampler = self.training_method.sampler(self.dataset, config, shard)
        self.iteration, self.elapsed, self.validation_history = 0, 0.0, []
        self.metrics = MetricsLog(os.path.join(self.out, "metrics.csv"))
        if checkpoint is not None:
            self._restore(checkpoint)
        self._parallel_loss = None
        self.stop_requested = False
        self.in_training_loop = False  # True while ``run`` iterates (a stop request is honoured there)
        if self.world.is_main:
            atomic_write_text(json.dumps(config.as_dict(), indent=2) + "\n", os.path.join(self.out, "config.json"))

    @classmethod
    def resume(cls, out, iterations=None, progress=True, world=None):
        """The trainer of the run in ``out`` at its last checkpoint (``iterations`` may extend it)."""
        config, checkpoint = load_resume_point(out, iterations)
        return cls(config, progress, checkpoint, world)

    def _prepare_new_run(self):
        if os.path.isfile(self.checkpoint_file):
            raise ConfigError(f"{self.out!r} already holds a run; pass --resume to continue it or choose another "
                              "--out.")
        if not self.world.is_main:
            return
        os.makedirs(self.out, exist_ok=True)
        for name in ("metrics.csv", "metrics.json"):
            if os.path.isfile(os.path.join(self.out, name)):
                os.remove(os.path.join(self.out, name))

    # ------------------------------------------------------------------ state
    def state_dict(self):
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.as_dict(),
            "dim": self.dataset.dim,
            "iteration": self.iteration,
            "elapsed": self.elapsed,
            "model": self.model.state_dict(),
            "optimization": self.optimization.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": capture_rng_states(self.device),
            "validation": self.validation_history,
        }

    def _restore(self, checkpoint):
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint format {checkpoint.get('format')!r} is not {CHECKPOINT_FORMAT}.")
        if checkpoint["iteration"] > self.config.iterations:
            raise ConfigError(f"the checkpoint is at iteration {checkpoint['iteration']}, beyond --iterations "
                              f"{self.config.iterations}.")
        self.model.load_state_dict(checkpoint["model"])
        self.optimization.load_state_dict(checkpoint["optimization"])
        self.sampler.load_state_dict(checkpoint["sampler"])
        restore_rng_states(checkpoint["rng"], self.device)
        self.iteration, self.elapsed = checkpoint["iteration"], checkpoint["elapsed"]
        self.validation_history = list(checkpoint["validation"])
        if self.world.is_main:
            self.metrics.truncate(self.iteration)

    def save(self):
        """Checkpoint and summary (rank 0 only)."""
        if self.world.is_main:
            atomic_save(self.state_dict(), self.checkpoint_file)
            write_summary(self.summary(), os.path.join(self.out, "metrics.json"))

    # ------------------------------------------------------------------ loop
    def train_step(self):
        """One iteration; returns its metrics row (global values in a multi-process run)."""
        self.iteration += 1
        batch = self.sampler.next().to(self.device)
        start = time.perf_counter()
        limit, distributed = self.config.max_nfe, self.world.distributed
        with track() as stats, shard_draws(self.world.shard, self.config.batch_size), \
                contextlib.ExitStack() as budget:
            if limit:
                budget.enter_context(evaluation_budget(limit))
            phase = self.optimization.begin(self.iteration - 1)
            stalled = False
            try:
                loss, metrics = self._batch_loss()(batch)
                loss_value = loss.item()
            except EvaluationBudgetError:
                stalled = True
            self._stop_if_stalled(stalled)
            if distributed:  # a process cannot leave the backward pass's gradient exchange midway: the budget
                budget.close()  # stops the forward solves only, and the backward's count is checked after it
            if not self.world.all_true(math.isfinite(loss_value)):
                raise TrainingDiverged(_divergence_message(loss_value, self.iteration))
            try:
                loss.backward()
            except EvaluationBudgetError:
                stalled = True
            self._stop_if_stalled(stalled or (distributed and limit and stats.nfe_forward + stats.nfe_backward > limit))
            self.optimization.step()
        seconds = time.perf_counter() - start
        row = reduce_metrics(self.world, {
            "iteration": self.iteration, "phase": phase, "loss": loss_value, **metrics,
            "nfe_forward": stats.nfe_forward, "nfe_backward": stats.nfe_backward, "seconds": seconds})
        self.elapsed += row["seconds"]
        return row

    def _stop_if_stalled(self, stalled):
        """Raise ``TrainingStalled`` in every process when the evaluation budget ran out in any (a collective
        in a multi-process run: every process calls it at the same points)."""
        if self.world.all_true(not stalled):
            return
        saved = load_run_checkpoint(self.checkpoint_file) if os.path.isfile(self.checkpoint_file) else None
        raise TrainingStalled(_stall_message(self.config.max_nfe, self.iteration, saved))

    def _batch_loss(self):
        """``method.loss(model, batch)``, through DistributedDataParallel when distributed (built on first use)."""
        if self._parallel_loss is None:
            # methods with their own schedule (TO-FLOW, block-wise) leave parameters without gradient in some phases
            self._parallel_loss = data_parallel(BatchLoss(self.training_method, self.model), self.world, self.device,
                                                find_unused_parameters=not isinstance(self.optimization,
                                                                                      OptimizerStep))
        return self._parallel_loss

    def validate(self, split="validation"):
        data = self.dataset.validation[:self.config.val_size] if split == "validation" else self.dataset.test
        nll, nfe = evaluate_nll(self.model, data, max(self.config.batch_size, 1000), self.config.seed + 1, self.world)
        return {"iteration": self.iteration, "nll": nll, "nfe": nfe}

    def run(self):
        """Train to ``config.iterations``; returns the summary dictionary (also in metrics.json).

        The DistributedDataParallel wrapper of a multi-process run is released when the loop ends: it
        holds the process group, which must outlive it (gloo aborts a process whose group is torn
        down at exit with a wrapper still alive).
        """
        from tqdm import tqdm

        config = self.config
        bar = tqdm(total=config.iterations, initial=self.iteration, disable=not self.progress, unit="it",
                   dynamic_ncols=True, mininterval=0.5, desc=f"{config.method} {config.data}")
        self.in_training_loop = True
        try:
            while self.iteration < config.iterations and not self.training_method.finished(self.optimization):
                row = self.train_step()
                if self.world.is_main:
                    self.metrics.append(row)
                bar.set_postfix(self.training_method.progress(row))
                bar.update()
                last = self.iteration == config.iterations or self.training_method.finished(self.optimization)
                if self.iteration % config.val_every == 0 or last:
                    self.validation_history.append(self.validate())
                    if self.world.is_main:
                        bar.write(f"iteration {self.iteration}: validation NLL "
                                  f"{self.validation_history[-1]['nll']:.4f}")
                saved = self.iteration % config.checkpoint_every == 0 or last
                if saved:
                    self.save()
                if self._stopping() and not last:
                    if not saved:
                        self.save()
                    raise TrainingInterrupted(self.iteration, self.out)
        finally:
            self.in_training_loop = False
            bar.close()
            self._parallel_loss = None
        return self.finish()

    def _stopping(self):
        """Whether to stop after this iteration: ``stop_requested`` in any process."""
        if not self.world.distributed:
            return self.stop_requested
        return not self.world.all_true(not self.stop_requested)

    def finish(self):
        """Test NLL, the picture and the final summary (every process returns rank 0's)."""
        test = self.validate("test")
        summary = None
        if self.world.is_main:
            picture = self.plot(test["nll"]) if self.config.plot else None
            summary = self.summary(test=test, picture=picture)
            write_summary(summary, os.path.join(self.out, "metrics.json"))
        return self.world.broadcast_object(summary)

    def summary(self, test=None, picture=None):
        rows = self.metrics.rows()
        averages = {}
        for key in ("nfe_forward", "nfe_backward", "seconds"):
            values = [float(row[key]) for row in rows]
            averages[f"mean_{key}"] = sum(values) / len(values) if values else None
        return {"config": self.config.as_dict(), "iteration": self.iteration, "train_seconds": self.elapsed,
                "validation": self.validation_history, "test": test, "picture": picture, **averages}

    @torch.no_grad()
    def plot(self, test_nll=None):
        """Write the run's picture (``test_nll`` in its title); returns its path, or None for data without a
        picture."""
        from .plots import plot_2d, plot_images

        with _fork_rng(self.device):
            torch.manual_seed(self.config.seed + 2)
            self.model.eval()
            samples = self.model.sample(5000).cpu()
            self.model.train()
        title = f"{self.config.method} on {self.config.data}, {self.iteration} iterations"
        if test_nll is not None:
            title += f": test NLL {test_nll:.3f} nats"
        if self.dataset.dim == 2:
            path = os.path.join(self.out, "density.png")
            self.model.eval()
            plot_2d(self.dataset.test[:20000], self.model, samples, path, title=title)
            self.model.train()
            return path
        if self.dataset.dim == 64 and self.config.data == "digits":
            images = (lambda x: torch.sigmoid(x).sub(0.05).div(0.9)) if self.config.logit else (lambda x: x)
            path = os.path.join(self.out, "samples.png")
            plot_images(images(self.dataset.test).clamp(0, 1), images(samples).clamp(0, 1), path, (8, 8),
                        title=title)
            return path
        return None
