"""Command line interface: ``python -m fastcnf {info,train,sample,eval}``.

    python -m fastcnf train --data 8gaussians --method ffjord --iterations 1000 --out runs/demo
    python -m fastcnf train --out runs/demo --resume            # continue a stopped run
    python -m fastcnf sample --checkpoint runs/demo --num 5000 --out samples.npy
    python -m fastcnf eval --checkpoint runs/demo --split test
    torchrun --nproc_per_node 2 -m fastcnf train ...           # one run on 2 processes (fastcnf.training.distributed)

Bad input (unknown data or method, bad numbers, a missing or foreign checkpoint, an ``--out`` that is
in use, unwritable or holds something a new run would replace...) prints one line
``fastcnf <command>: error: ...`` and exits with status 2, like argparse's own errors. A training that
diverges or stalls (``--max-nfe``) exits 1 with one line; Ctrl-C saves a checkpoint at the current
iteration and exits 130 with one line (a second Ctrl-C, or one during the final evaluation, stops at once,
keeping the last checkpoint).
"""

import argparse
import contextlib
import json
import os
import signal
import sys

__all__ = ["main", "build_parser"]

RESUMABLE = ("iterations", "out", "max_nfe")


def _hidden_widths(text):
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths like 64,64,64, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive integers, got {text!r}")
    return widths


def _add_train_parser(commands):
    from ..cnf.jko import BLOCK_TIMES
    from ..cnf.nets import ACTIVATIONS, LAYERS
    from ..cnf.toflow import REGULARIZERS as TIME_REGULARIZERS
    from ..cnf.toflow import SCHEDULES as TIME_SCHEDULES
    from ..ode.control import CONTROLLERS
    from ..ode.registry import METHODS as SOLVERS
    from .config import DIVERGENCE_CHOICES
    from .data import DATASET_NAMES
    from .registry import TRAINING_METHODS

    methods = ", ".join(f"{name} ({cls.summary})" for name, cls in TRAINING_METHODS.items())
    parser = commands.add_parser("train", help="train a CNF", argument_default=argparse.SUPPRESS,
                                 description=f"Train a CNF. Methods: {methods}. Settings not given keep the "
                                             "defaults shown; on --resume they come from the checkpoint.")
    group = parser.add_argument_group("data and method")
    group.add_argument("--data", help=f"{', '.join(DATASET_NAMES)} or a .npy/.csv table (default 8gaussians)")
    group.add_argument("--logit", action="store_true", help="logit-transform dequantized digits")
    group.add_argument("--method", choices=tuple(TRAINING_METHODS), help="training method (default ffjord)")
    group = parser.add_argument_group("network")
    group.add_argument("--hidden", type=_hidden_widths, help="hidden widths (default 64,64,64)")
    group.add_argument("--layer", choices=tuple(LAYERS), help="layer kind (default concatsquash)")
    group.add_argument("--activation", choices=tuple(ACTIVATIONS), help="activation (default tanh)")
    group.add_argument("--blocks", type=int, help="number of stacked CNF blocks (default 1)")
    group.add_argument("--end-time", dest="end_time", type=float, help="T of each block (default 0.5; toflow: "
                                                                        "initial T, default 1)")
    group = parser.add_argument_group("solver")
    group.add_argument("--solver", choices=tuple(SOLVERS), help="ODE method for training (default dopri5)")
    group.add_argument("--rtol", type=float, help="relative tolerance (default 1e-5)")
    group.add_argument("--atol", type=float, help="absolute tolerance (default 1e-5)")
    group.add_argument("--step-size", dest="step_size", type=float, help="step of fixed-step solvers")
    group.add_argument("--test-solver", dest="test_solver", choices=tuple(SOLVERS), help="ODE method for evaluation")
    group.add_argument("--test-rtol", dest="test_rtol", type=float, help="evaluation rtol (default: --rtol)")
    group.add_argument("--test-atol", dest="test_atol", type=float, help="evaluation atol (default: --atol)")
    group.add_argument("--no-adjoint", dest="adjoint", action="store_false", help="backpropagate through the solver")
    group.add_argument("--seminorm", action="store_true", help="adjoint error control without parameter adjoints")
    group.add_argument("--controller", choices=CONTROLLERS,
                       help="step-size controller of the forward training solve (integral: torchdiffeq's; "
                            "pi: PI control; adjoint solves and evaluation keep integral)")
    group.add_argument("--divergence", choices=DIVERGENCE_CHOICES,
                       help="divergence estimator (auto: exact for 2-D, else hutchinson-gaussian)")
    group.add_argument("--test-divergence", dest="test_divergence", choices=DIVERGENCE_CHOICES,
                       help="estimator for evaluation (auto: exact up to 10-D)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the fused divergence pass of the training solves (CPU: about 1.3-1.4x "
                            "faster evaluations after tens of seconds of compilation; BENCHMARKS.md)")
    group = parser.add_argument_group("regularizers")
    group.add_argument("--kinetic", type=float, help="kinetic energy weight (rnode default 0.01)")
    group.add_argument("--jacobian", type=float, help="Jacobian Frobenius weight (rnode default 0.01)")
    group.add_argument("--tpr-weight", dest="tpr_weight", type=float, help="TPR weight lambda (tpr default 5)")
    group.add_argument("--tpr-degree", dest="tpr_degree", type=int, help="TPR polynomial degree p >= 1 (default 1)")
    group.add_argument("--tpr-times", dest="tpr_times", type=int,
                       help="TPR random interior times per solve, K >= p (default 2; the end points are added)")
    group.add_argument("--tpr-logp", dest="tpr_logp", action="store_true",
                       help="TPR also fits the log-density state (the paper fits z only)")
    group = parser.add_argument_group("TO-FLOW (--method toflow; T is stepped by SGD with momentum)")
    group.add_argument("--time-lr", dest="time_lr", type=float,
                       help="learning rate of T, in time^2 per nat (default 1e-3)")
    group.add_argument("--time-momentum", dest="time_momentum", type=float, help="momentum of T's SGD (0.9)")
    group.add_argument("--time-alpha", dest="time_alpha", type=float,
                       help="temporal regularizer weight, nats per unit of time (default 0.1)")
    group.add_argument("--time-regularizer", dest="time_regularizer", choices=TIME_REGULARIZERS,
                       help="alpha*T (linear, default) or alpha*T^2 (quadratic)")
    group.add_argument("--t-min", dest="t_min", type=float, help="lower clip of T (default 0.1)")
    group.add_argument("--t-max", dest="t_max", type=float, help="upper clip of T (default 1.9)")
    group.add_argument("--time-schedule", dest="time_schedule", choices=TIME_SCHEDULES,
                       help="joint: T stepped from the weights' pass (default); alternate: T iterations of its own")
    group.add_argument("--weight-steps", dest="weight_steps", type=int, help="weight steps per cycle (default 1)")
    group.add_argument("--time-steps", dest="time_steps", type=int, help="T steps per cycle (default 1)")
    group = parser.add_argument_group("JKO-iFlow (--method jko; --iterations caps the whole schedule; "
                                      "--no-adjoint backpropagates through each block's solver)")
    group.add_argument("--jko-h0", dest="jko_h0", type=float, help="first block's step h_0 (default 0.25)")
    group.add_argument("--jko-rho", dest="jko_rho", type=float,
                       help="step growth h_k = min(h_0 rho^(k-1), h_max) (default 1.4)")
    group.add_argument("--jko-h-min", dest="jko_h_min", type=float, help="smallest step h_k (default 0.01)")
    group.add_argument("--jko-h-max", dest="jko_h_max", type=float, help="largest step h_k (default 5)")
    group.add_argument("--jko-block-time", dest="jko_block_time", choices=BLOCK_TIMES,
                       help="interval: block k integrates over [t_(k-1), t_k] (default); unit: over [0, 1] with h_k "
                            "only weighting the penalty, as the authors' code")
    group.add_argument("--jko-block-iterations", dest="jko_block_iterations", type=int,
                       help="iterations per block while growing the stack (2000)")
    group.add_argument("--jko-max-blocks", dest="jko_max_blocks", type=int, help="most blocks grown (8)")
    group.add_argument("--jko-tolerance", dest="jko_tolerance", type=float,
                       help="stop growing when a block's E|x_k-x_(k-1)|^2/E|x_k|^2 is below it (0.01; 0: never)")
    group.add_argument("--jko-reparameterize", dest="jko_reparameterize", action="store_true",
                       help="damped re-spacing of the steps towards equal movement, then fine-tune every block")
    group.add_argument("--jko-rounds", dest="jko_rounds", type=int, help="reparameterization rounds (1)")
    group.add_argument("--jko-eta", dest="jko_eta", type=float, help="damping of a re-spacing step, in (0, 1] (0.5)")
    group.add_argument("--jko-refine", dest="jko_refine", action="store_true",
                       help="split the selected blocks in two halves, then fine-tune from the first split block")
    group.add_argument("--jko-refine-threshold", dest="jko_refine_threshold", type=float,
                       help="split blocks moving at least this times the mean movement (1; 0: every block)")
    group.add_argument("--jko-finetune-iterations", dest="jko_finetune_iterations", type=int,
                       help="iterations per block in the reparameterize/refine passes (1000)")
    group.add_argument("--jko-clip", dest="jko_clip", type=float, help="gradient norm clip per step (1; 0: off)")
    group.add_argument("--jko-finetune-lr", dest="jko_finetune_lr", type=float,
                       help="learning rate of the reparameterize/refine passes (default: --lr)")
    group.add_argument("--jko-lr-decay", dest="jko_lr_decay", type=float,
                       help="block k (0-based) trains at lr * decay^k (default 1)")
    group.add_argument("--jko-solver", dest="jko_solver", choices=tuple(SOLVERS),
                       help="ODE method of a block (default rk4; adaptive ones use --rtol/--atol)")
    group.add_argument("--jko-steps", dest="jko_steps", type=int, help="steps per block of fixed-grid solvers (4)")
    group.add_argument("--jko-pool", dest="jko_pool", type=int,
                       help="training points drawn from a toy (20000; tables and digits use their rows)")
    group = parser.add_argument_group("optimization")
    group.add_argument("--iterations", type=int, help="training iterations (default 1000)")
    group.add_argument("--batch-size", dest="batch_size", type=int,
                       help="batch size (default 512); under torchrun the global batch, split over the processes")
    group.add_argument("--lr", type=float, help="learning rate (default 1e-3; jko 1e-4)")
    group.add_argument("--weight-decay", dest="weight_decay", type=float, help="Adam weight decay (default 0)")
    group.add_argument("--seed", type=int, help="random seed (default 0)")
    group.add_argument("--device", help="cpu or cuda (default cpu)")
    group.add_argument("--threads", type=int, help="torch CPU threads (default 1 on CPU)")
    group.add_argument("--max-nfe", dest="max_nfe", type=int,
                       help="stop when one iteration's solves evaluate the network more than this (default 20000; "
                            "0: no limit)")
    group = parser.add_argument_group("output")
    group.add_argument("--out", help="run directory (default runs/fastcnf)")
    group.add_argument("--val-every", dest="val_every", type=int, help="validate every N iterations (100)")
    group.add_argument("--val-size", dest="val_size", type=int, help="validation points (2000)")
    group.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, help="checkpoint every N (100)")
    group.add_argument("--no-plot", dest="plot", action="store_false", help="skip the final picture")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    group.add_argument("--overwrite", action="store_true",
                       help="start a new run in an --out that holds an earlier run or other files (the earlier "
                            "run's files are removed)")


def build_parser():
    parser = argparse.ArgumentParser(prog="fastcnf", description="Fast ODE solvers and CNF training.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, C++ extension and available backends")
    _add_train_parser(commands)

    sample = commands.add_parser("sample", help="draw samples from a trained run")
    sample.add_argument("--checkpoint", required=True, help="run directory or checkpoint file")
    sample.add_argument("--num", type=int, default=1000, help="number of samples (default 1000)")
    sample.add_argument("--out", help="output .npy or .csv (default <run>/samples.npy)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sample.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")

    evaluate = commands.add_parser("eval", help="negative log-likelihood of a trained run")
    evaluate.add_argument("--checkpoint", required=True, help="run directory or checkpoint file")
    evaluate.add_argument("--split", choices=("validation", "test"), default="test", help="data split (test)")
    evaluate.add_argument("--batch-size", dest="batch_size", type=int, default=1000, help="evaluation batch (1000)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the Hutchinson noise (default 0)")
    evaluate.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    return parser


class UsageError(ValueError):
    """Bad command line input found after parsing."""


def _train(args):
    """Train, alone or as one process of a torchrun launch (then only rank 0 prints the summary)."""
    from .config import TrainConfig
    from .distributed import process_group
    from .run_folder import claim_run_folder
    from .trainer import Trainer, load_resume_point, select_device

    settings = vars(args).copy()
    settings.pop("command")
    progress = settings.pop("progress", True)
    resume = settings.pop("resume", False)
    overwrite = settings.pop("overwrite", False)
    if resume and overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it; pass one of them.")
    out = settings.get("out", TrainConfig.out)
    if resume:
        fixed = sorted(set(settings) - set(RESUMABLE))
        if fixed:
            raise UsageError(f"--{fixed[0].replace('_', '-')} cannot be changed on --resume; the run's settings "
                             "come from its checkpoint (only --iterations and --max-nfe may be changed).")
        load_resume_point(out)  # a missing, truncated or foreign checkpoint fails here, before anything else
    else:
        TrainConfig(**settings)  # bad settings fail before the folder is touched
    with process_group(select_device(settings.get("device", TrainConfig.device))) as world, \
            claim_run_folder(out, resume, overwrite, world):
        if resume:  # read under the folder's lock: the checkpoint another run may have been writing
            config, checkpoint = load_resume_point(out, settings.get("iterations"))
            if "max_nfe" in settings:
                config = config.replace(max_nfe=settings["max_nfe"])
        else:
            config, checkpoint = TrainConfig(**settings), None
        trainer = Trainer(config, progress, checkpoint, world)
        with _stop_on_first_interrupt(trainer):
            summary = trainer.run()
    if world.is_main:
        test = summary["test"]
        print(f"test NLL {test['nll']:.4f} nats ({trainer.iteration} iterations, {summary['train_seconds']:.1f} s "
              f"training); run in {trainer.out}" + (f"; picture {summary['picture']}" if summary["picture"] else ""))
    return 0


@contextlib.contextmanager
def _stop_on_first_interrupt(trainer):
    """Ctrl-C in the training loop asks ``trainer`` to stop after the iteration in progress; a second one, or
    one outside the loop (the final evaluation, after the last checkpoint was written), interrupts at once."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # not ours to handle (e.g. SIGINT ignored by the launcher)
        return

    def request_stop(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if not trainer.in_training_loop:
            raise KeyboardInterrupt
        trainer.stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _positive_count(name, value):
    if value < 1:
        raise UsageError(f"--{name} must be a positive integer, got {value}.")


def _sample(args):
    import numpy as np
    import torch

    from .trainer import load_run

    _positive_count("num", args.num)
    out = args.out or os.path.join(args.checkpoint if os.path.isdir(args.checkpoint) else
                                   os.path.dirname(args.checkpoint), "samples.npy")
    if not out.endswith((".npy", ".csv")):
        raise UsageError(f"--out must end in .npy or .csv, got {out!r}.")
    _, model, _, _ = load_run(args.checkpoint, args.device)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UsageError(f"the folder of --out {out!r} does not exist ({folder}); create it first.")
    torch.manual_seed(args.seed)
    with torch.no_grad():
        samples = model.sample(args.num).cpu().numpy()
    if out.endswith(".npy"):
        np.save(out, samples)
    else:
        np.savetxt(out, samples, delimiter=",")
    print(f"wrote {args.num} samples of dimension {samples.shape[1]} to {out}")
    return 0


def _evaluate(args):
    from .trainer import evaluate_nll, load_run

    _positive_count("batch-size", args.batch_size)
    config, model, dataset, checkpoint = load_run(args.checkpoint, args.device)
    data = dataset.validation if args.split == "validation" else dataset.test
    nll, nfe = evaluate_nll(model, data, args.batch_size, args.seed)
    print(json.dumps({"data": config.data, "method": config.method, "split": args.split, "points": len(data),
                      "iteration": checkpoint["iteration"], "nll": nll, "nfe": nfe}))
    return 0


COMMANDS = {"train": _train, "sample": _sample, "eval": _evaluate}


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from .info import describe

        print(describe())
        return 0
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .errors import TrainingDiverged, TrainingInterrupted, TrainingStalled

    try:
        return COMMANDS[args.command](args)
    except (UsageError, ConfigError, DataError, CheckpointError) as error:
        print(f"fastcnf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # unwritable or full --out, a vanished file: the files written so far are intact
        print(f"fastcnf {args.command}: error: {_describe_os_error(error)}", file=sys.stderr)
        return 2
    except (TrainingDiverged, TrainingStalled) as error:
        print(f"fastcnf {args.command}: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as error:
        print(f"fastcnf {args.command}: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"fastcnf {args.command}: interrupted; files already written (the last checkpoint) are kept.",
              file=sys.stderr)
        return 130


def _describe_os_error(error):
    """One line for an OSError: what failed and on which file."""
    where = f" ({error.filename})" if error.filename else ""
    return f"cannot write or read a file: {error.strerror or error}{where}."


if __name__ == "__main__":
    sys.exit(main())
