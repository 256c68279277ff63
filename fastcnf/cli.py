"""Command line interface: ``python -m fastcnf {info,train,sample,eval}``."""

import argparse
import sys

__all__ = ["main", "build_parser"]


def build_parser():
    parser = argparse.ArgumentParser(prog="fastcnf", description="Fast ODE solvers and CNF training.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, C++ extension and available backends")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from .info import describe

        print(describe())
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
