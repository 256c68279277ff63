"""The command line every protocol module shares: budget, seeds, datasets, arms, jobs, report.

    python -m bench.reproduce.<method> [--iterations N | --seconds S] [--seeds 0 1 2]
        [--datasets NAME ...] [--arms A B ...] [--jobs 2] [--root DIR] [--report-only | --no-report]

A protocol module defines ``build_protocol(args) -> Protocol`` (it may read its own options,
added by ``add_options(parser)``), ``REPORT`` (a ``MethodReport``) and calls
``protocol_main(...)`` from its ``main``. Runs go to ``--root`` (default
``runs/reproduce/<method>``); finished runs there are skipped, unfinished ones resumed, so the same
command restarts a stopped protocol. After the runs the method's section of ``--document`` is
rewritten from every run under the root.
"""

import argparse
import os

from .harness import CLOCKS, Budget, run_protocol
from .report import write_report

__all__ = ["protocol_parser", "protocol_main", "budget_from", "select"]


def protocol_parser(method, description, datasets, seeds, iterations):
    parser = argparse.ArgumentParser(prog=f"python -m bench.reproduce.{method}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--iterations", type=int, help=f"training iterations per run (default {iterations})")
    budget.add_argument("--seconds", type=float, help="training seconds per run instead of iterations (see --clock)")
    parser.add_argument("--clock", choices=CLOCKS, default=None,
                        help="training clock of a --seconds budget and of the plots: thread (CPU time of the "
                             "training thread; default on CPU) or wall (default on CUDA)")
    parser.add_argument("--validations", type=int, default=20,
                        help="validation points over the budget, besides the start (default 20: every 5%%)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds), help=f"seeds (default {seeds})")
    parser.add_argument("--datasets", nargs="+", default=list(datasets), help=f"datasets (default {datasets})")
    parser.add_argument("--arms", nargs="+", help="only these arms (default: all)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, in separate processes (default 1); see bench/reproduce/harness.py "
                             "for what it changes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--root", help=f"run directory (default runs/reproduce/{method})")
    parser.add_argument("--document", default="REPRODUCTION.md", help="report file (default REPRODUCTION.md)")
    report = parser.add_mutually_exclusive_group()
    report.add_argument("--report-only", action="store_true", help="write the report from the runs, train nothing")
    report.add_argument("--no-report", action="store_true", help="train only")
    parser.set_defaults(default_iterations=iterations)
    return parser


def budget_from(args):
    """The ``Budget`` the arguments ask for."""
    clock = args.clock or ("wall" if args.device.startswith("cuda") else "thread")
    if args.seconds is not None:
        return Budget(seconds=args.seconds, validations=args.validations, clock=clock)
    return Budget(iterations=args.iterations or args.default_iterations, validations=args.validations, clock=clock)


def select(arms, args):
    """The arms of the chosen datasets (and of ``--arms`` if given)."""
    chosen = [arm for arm in arms if arm.dataset in args.datasets and (not args.arms or arm.name in args.arms)]
    if not chosen:
        raise SystemExit("no arm matches --datasets/--arms.")
    return tuple(chosen)


def protocol_main(method, description, build_protocol, report, argv=None, datasets=(), seeds=(0, 1, 2),
                  iterations=2000, add_options=None):
    parser = protocol_parser(method, description, datasets, seeds, iterations)
    if add_options is not None:
        add_options(parser)
    args = parser.parse_args(argv)
    root = args.root or os.path.join("runs", "reproduce", method)
    if not args.report_only:
        run_protocol(build_protocol(args), root, jobs=args.jobs)
    if not args.no_report:
        print(f"wrote {write_report(report, root, args.document)}")
    return 0
