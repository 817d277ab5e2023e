"""Command line: one parser builder per command, defaults from the configs, errors as one line.

A `BiounetError` becomes one line on stderr and exit code 2; nothing else is caught. Building
the parser imports no torch, so ``--help``, ``--version`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from biounet import __version__
from biounet.cli import export, models, predict, tools, train
from biounet.cli.common import as_flags
from biounet.errors import BiounetError

log = logging.getLogger("biounet")
# Crash tests only: kill this process with SIGKILL at the Nth place a kill must be survived.
FAULT_ENV = "BIOUNET_FAULT_AT"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    _fault_injection(os.environ.get(FAULT_ENV))
    try:
        return int(args.func(args) or 0)
    except BiounetError as exc:
        print(f"biounet: error{_rank()}: {as_flags(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("biounet: interrupted", file=sys.stderr)
        return 130


def _rank() -> str:
    """Which training process speaks, under torchrun or srun (rank 0 needs no tag)."""
    rank = os.environ.get("RANK", "0")
    return "" if os.environ.get("WORLD_SIZE", "1") == "1" or rank == "0" else f" (rank {rank})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="biounet",
        description="The U-Net of Ronneberger et al. (2015): train, predict, inspect, export.",
    )
    p.add_argument("--version", action="version", version=f"biounet {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress display and no summary lines"
    )
    sub = p.add_subparsers(dest="command", required=True)
    models.add_init(sub)
    models.add_info(sub)
    train.add_parser(sub)
    tools.add_evaluate(sub)
    tools.add_weights(sub)
    tools.add_augment(sub)
    predict.add_parser(sub)
    export.add_parser(sub)
    return p


def _fault_injection(value: str | None) -> None:
    if not value:
        return
    from biounet.durable import set_fault_hook

    # "N" kills at the Nth place (SIGKILL); "N:INT" sends SIGINT there instead (Ctrl-C).
    at, _, name = value.partition(":")
    target, seen = int(at), [0]
    sig = signal.Signals[f"SIG{name or 'KILL'}"]

    def hook(what: str) -> None:
        seen[0] += 1
        if seen[0] == target:
            print(f"biounet: fault injection: {sig.name} at {what}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), sig)

    set_fault_hook(hook)
