"""Every public operator inside a DDP- or FSDP2-wrapped training loss: right, wrong or error.

Runs every combination of ``tests/ddp_cases.py`` (wrapper x model x operator/method x loss;
the test suite runs a share of them) on two gloo processes on localhost and prints each case
that is not right, then the counts per wrapper. See ``tests/ddp_cases.py`` for what is
compared.

    python bench/ddp_matrix.py [--wrappers ddp,fsdp] [--models mlp] [--ops divergence/auto]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import ddp_cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wrappers", default=",".join(ddp_cases.WRAPPERS))
    parser.add_argument("--models", default=",".join(ddp_cases.MODELS))
    parser.add_argument("--ops", default="", help="operator/method names, comma-separated")
    parser.add_argument("--verbose", action="store_true", help="print the right cases too")
    args = parser.parse_args()
    ops = [o for o in args.ops.split(",") if o] or None
    cases = ddp_cases.configs(args.wrappers.split(","), args.models.split(","), ops)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def report(index: int, outcome: tuple[str, object]) -> None:
        verdict, detail = ddp_cases.judge(cases[index], outcome)
        counts[cases[index][0]][verdict] += 1
        if verdict != "right" or args.verbose:
            print(f"{verdict:6} {'/'.join(cases[index])}: {detail}", flush=True)

    start = time.perf_counter()
    ddp_cases.run_pairs(list(enumerate(cases)), report=report)
    print(f"\n{len(cases)} cases in {time.perf_counter() - start:.0f} s")
    total: collections.Counter = collections.Counter()
    for wrapper, c in counts.items():
        total += c
        print(f"{wrapper:18}", dict(c))
    print(f"{'all':18}", dict(total))
    sys.exit(0 if set(total) == {"right"} else 1)


if __name__ == "__main__":
    main()
