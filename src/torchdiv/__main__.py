"""Command line of torchdiv: python -m torchdiv bench."""

from __future__ import annotations

import argparse
import os
import sys

from torchdiv._bench import cli


def main(argv: list[str] | None = None) -> int:
    """``python -m torchdiv COMMAND ...``: parse ``argv`` (default ``sys.argv``), run the
    command, return its exit status."""
    parser = argparse.ArgumentParser(prog="python -m torchdiv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    cli.add_parser(commands)
    args = parser.parse_args(argv)
    status: int = args.run(args)
    return status


def _with_passive_openmp() -> None:
    """Run this command again with ``OMP_WAIT_POLICY=PASSIVE`` unless the caller set it.

    OpenMP threads that spin while they wait stall when another process holds a core (on a
    busy 2-core machine the loop recipes ran many times slower). The OpenMP runtime reads the
    variable once, when ``import torchdiv`` loaded torch, before this module ran: hence a new
    process, with the same interpreter options and arguments.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


if __name__ == "__main__":
    _with_passive_openmp()
    sys.exit(main())
