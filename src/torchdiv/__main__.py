"""Command line of torchdiv: python -m torchdiv bench."""

from __future__ import annotations

import argparse
import sys

from torchdiv._bench import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchdiv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    cli.add_parser(commands)
    args = parser.parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
