"""Command line of torchdiv: python -m torchdiv demo."""

from __future__ import annotations

import argparse
import math
import sys

from torchdiv._demo import run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchdiv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="time every exact divergence method on two small nets")
    demo.add_argument(
        "--min-run-time", type=float, default=0.2, help="seconds of timing per method (default 0.2)"
    )
    args = parser.parse_args(argv)
    if not 0 < args.min_run_time < math.inf:
        parser.error(f"--min-run-time must be positive seconds, got {args.min_run_time}")
    print(run_demo(args.min_run_time))
    return 0


if __name__ == "__main__":
    sys.exit(main())
