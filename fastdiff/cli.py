"""`fastdiff` command line. Each subcommand lives in fastdiff/commands/<name>.py and provides
HELP (one line), add_arguments(parser) and run(args) -> exit code. Command modules keep heavy
imports (torch, triton) inside run() so that `fastdiff --help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from fastdiff import host

COMMANDS = ("train", "sample", "eval", "streams", "experiment", "bench", "profile", "tune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdiff",
        description="Train latent video diffusion models online from a single video stream.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"fastdiff.commands.{name}")
        p = sub.add_parser(
            name, help=module.HELP, description=module.__doc__ or module.HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and bad arguments end here, before the quarter second of sampling below
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    # Must be set before torch (and its OpenMP runtime) loads; the commands import torch only inside run().
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = host.openmp_wait_policy()
    host.keep_freed_memory()
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
