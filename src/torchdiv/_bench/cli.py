"""``python -m torchdiv bench``: the argparse subcommand, its checks, the progress bar.

Every torchdiv method and the hand-written recipes run on the same problems; each result is
checked against an exact float64 reference before it is measured (a method that disagrees is
reported WRONG, not timed); then peak memory and interleaved torch.utils.benchmark timings.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from torchdiv._bench import operators, plot, report, suite
from torchdiv._bench.runner import run_case, steps
from torchdiv._bench.timing import load_warning
from torchdiv._core.mixing.errors import BatchInteractionError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
EXAMPLES = """examples:
  python -m torchdiv bench                              # the quick suite (the default)
  python -m torchdiv bench --plot bench.png --json bench.json
  python -m torchdiv bench --operator jacobian --dims 16,64 --methods auto,jacrev,loop
  python -m torchdiv bench --model mypkg.models:ScoreNet --shape 3,32,32 --batch 16
  python -m torchdiv bench --operator divergence --family ffjord --dims 768 --width 16
"""


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas (e.g. 8,32,128), got {text!r}"
        )
    return values


def _names(text: str) -> tuple[str, ...]:
    """``"a, b,a"`` -> ``("a", "b")``: once each, in order; none at all is an error (an empty
    ``--methods ''`` ran nothing and ``--operator ''`` everything, both silently)."""
    values = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not values:
        raise argparse.ArgumentTypeError(f"expected names separated by commas, got {text!r}")
    return values


def positive(kind: type) -> Any:
    """An argparse ``type``: a finite number of ``kind`` above zero (``bench/_common.py`` too)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _image_path(text: str) -> Path:
    """``--plot`` without a suffix is a PNG: matplotlib would add ``.png`` to the name itself,
    and the run would then report a file that does not exist."""
    path = Path(text)
    return path if path.suffix else path.with_name(f"{path.name}.png")


def add_parser(commands: Any) -> None:
    """Register ``bench`` on the ``python -m torchdiv`` subcommands."""
    p = commands.add_parser(
        "bench",
        help="time and check every method and the usual recipes (default: the quick suite)",
        description=(__doc__ or "").partition("\n\n")[2],  # no docstring under python -OO
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, short timing (default)")
    size.add_argument("--full", action="store_true", help="sizes up to D=512, longer timing")
    ops = ", ".join(f"{op.name} ({op.summary})" for op in operators.OPERATORS.values())
    p.add_argument(
        "--operator",
        type=_names,
        help=f"comma-separated: {ops}; default: {','.join(operators.DEFAULT_OPERATORS)} "
        "(divergence with --model)",
    )
    p.add_argument(
        "--dims",
        type=_ints,
        help="event sizes D of the built-in nets, e.g. 8,32,128; the image nets take the "
        "closest D their images have (conv: 2 x s x s, so 16 runs at 18)",
    )
    p.add_argument(
        "--family",
        type=_names,
        help=f"comma-separated built-in nets: {', '.join(suite.FAMILIES)} "
        "(default: the operator's own)",
    )
    p.add_argument("--batch", type=positive(int), help="samples per batch")
    p.add_argument("--width", type=positive(int), help="hidden units (MLP) and channels (conv)")
    p.add_argument("--methods", type=_names, help="comma-separated method keys (default: all)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="default float32")
    p.add_argument("--threads", type=positive(int), help="torch.set_num_threads (CPU)")
    p.add_argument("--repeats", type=positive(int), help="interleaved timing rounds")
    p.add_argument("--min-run-time", type=positive(float), help="seconds per method per round")
    p.add_argument(
        "--time-limit",
        type=positive(float),
        default=60.0,
        metavar="SECONDS",
        help="per method: one that would take longer to check, measure and time is skipped "
        "(default 60)",
    )
    p.add_argument("--model", help="your model: module:attr or path/to/file.py:attr")
    p.add_argument("--shape", type=_ints, help="per-sample input shape for --model, e.g. 3,32,32")
    p.add_argument("--json", type=Path, help="write every figure and the machine here")
    p.add_argument("--plot", type=_image_path, help="write the PNG (time and memory vs D) here")
    p.add_argument("--markdown", type=Path, help="write the tables as markdown here")
    p.set_defaults(run=run, parser=p)


def _check(args: argparse.Namespace) -> None:
    """Argument combinations argparse cannot express; errors exit with status 2."""
    fail: Callable[[str], NoReturn] = args.parser.error
    for name in args.operator or ():
        if name not in operators.OPERATORS:
            fail(f"--operator {name!r} is unknown; choose from {', '.join(operators.OPERATORS)}")
    known = {k for op in _operators(args) for k in op.methods}
    for key in args.methods or ():
        if key not in known:
            fail(f"--methods {key!r} is unknown; choose from {', '.join(sorted(known))}")
    if (args.model is None) != (args.shape is None):
        fail("--model and --shape go together: --model module:attr --shape 3,32,32")
    if args.model is not None and args.dims is not None:
        fail("--dims sizes the built-in nets; with --model the size is --shape")
    for name in args.family or ():
        if name not in suite.FAMILIES:
            fail(f"--family {name!r} is unknown; choose from {', '.join(suite.FAMILIES)}")
    if args.model is not None and args.family is not None:
        fail("--family picks built-in nets; --model runs yours")
    for op in _operators(args) if args.operator else ():  # before minutes of other cases
        for name in args.family or ():
            if not _fits(op, name):
                fail(_misfit(op, name))
    device = torch.device(args.device) if _is_device(args.device) else None
    if device is None or device.type not in ("cpu", "cuda"):
        fail(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: CUDA is not available here (torch.cuda.is_available() is False)")
    try:
        import matplotlib  # noqa: F401
        import rich  # noqa: F401
    except ImportError as exc:
        fail(f"bench needs rich and matplotlib ({exc}): pip install 'torchdiv[bench]'")
    _check_outputs(args, fail)


def _check_outputs(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
    """Output files the run could not write fail now, not after minutes of timing: a path that
    is a folder or lies under a file, and a ``--plot`` suffix matplotlib cannot save."""
    for flag in ("json", "plot", "markdown"):
        path: Path | None = getattr(args, flag)
        if path is None:
            continue
        if path.is_dir():
            fail(f"--{flag} {path} is a folder; give a file path")
        above = next((p for p in path.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            fail(f"--{flag} {path}: {above} is a file, not a folder")
    if args.plot is not None:  # never without a suffix (_image_path)
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if args.plot.suffix[1:].lower() not in formats:
            fail(
                f"--plot {args.plot}: matplotlib cannot write {args.plot.suffix!r} files; "
                f"use one of {', '.join('.' + f for f in sorted(formats))} (e.g. .png)"
            )


def _is_device(text: str) -> bool:
    try:
        torch.device(text)
    except RuntimeError:
        return False
    return True


def _fits(operator: operators.Operator, family: str) -> bool:
    """Whether ``operator`` applies to the built-in net ``family``, known before it is built
    (``runner.check_shapes`` finds the same from ``f(x)``): square operators take the vector
    fields, the Laplacian's baselines the nets with one output per sample, the Jacobian both."""
    one = family in suite.ONE_OUTPUT
    return not one if operator.square else one or operator.name != "laplacian"


def _misfit(operator: operators.Operator, family: str) -> str:
    """Why ``--family family`` cannot run under ``--operator operator`` and what can."""
    if operator.square:
        return (
            f"--family {family} has one output per sample, but --operator {operator.name} "
            "needs as many outputs as inputs; run it under --operator jacobian or laplacian"
        )
    return (
        f"--family {family} is a vector field, but --operator {operator.name}'s baselines "
        f"need one output per sample: --family {','.join(suite.ONE_OUTPUT)}"
    )


def _operators(args: argparse.Namespace) -> list[operators.Operator]:
    """The operators asked for, else the defaults: a user's model is a vector field unless
    they ask for the Laplacian, and ``--family`` runs each built-in net under the default
    operators that apply to it (``--family cnf`` alone is the divergence, not an error after
    the divergence's timings)."""
    defaults = [operators.OPERATORS[n] for n in operators.DEFAULT_OPERATORS]
    if args.operator:
        return [operators.OPERATORS[n] for n in args.operator]
    if args.model is not None:
        return [operators.DIVERGENCE]
    if args.family:
        return [op for op in defaults if any(_fits(op, f) for f in args.family)]
    return defaults


def _cases(
    args: argparse.Namespace, operator: operators.Operator, preset: suite.Preset
) -> list[suite.Case]:
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    if args.model is not None:
        batch = args.batch or preset.batch["model"]
        return [suite.model_case(args.model, args.shape, batch, dtype, device)]
    batch = {f: args.batch or b for f, b in preset.batch.items()}
    width = {f: args.width or w for f, w in preset.width.items()}
    dims = args.dims or preset.dims
    fitting = tuple(f for f in args.family or () if _fits(operator, f))
    families = fitting if args.family else operator.families
    own = args.dims is None  # the small CNFs keep their sizes unless --dims is given
    return suite.builtin_cases(families, dims, batch, width, dtype, device, own)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, run every case with a progress bar, print tables, write files."""
    _check(args)
    from rich.console import Console

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    preset = suite.FULL if args.full else suite.QUICK
    settings: dict[str, Any] = {
        "rounds": args.repeats or preset.rounds,
        "min_run_time": args.min_run_time or preset.min_run_time,
        "dtype": args.dtype,
        "time_limit_s": args.time_limit,
    }
    try:
        plan = [(op, case) for op in _operators(args) for case in _cases(args, op, preset)]
    except ValueError as exc:
        parser: argparse.ArgumentParser = args.parser
        parser.error(str(exc))
    console = Console() if sys.stdout.isatty() else Console(width=120)
    measured = report.machine(args.device)  # when it started: one date for every output
    warning = load_warning()  # before timing: what the run itself adds is not the machine's
    if warning is not None:
        settings["load_warning"] = warning
        console.print(warning, style="bold yellow", markup=False)
    rows = _run_plan(
        plan, args.methods, settings["rounds"], settings["min_run_time"], args.time_limit
    )
    info = measured | ({"warning": warning} if warning else {})
    for table in report.rich_tables(rows, info):
        console.print(table)
    if warning is not None:
        console.print(warning, style="bold yellow", markup=False)
    outputs: list[tuple[Path | None, Callable[[Path], object]]] = [
        (args.json, lambda path: report.write_json(path, rows, settings, measured)),
        (args.markdown, lambda path: path.write_text(report.grid_markdown(rows, info))),
        (args.plot, lambda path: plot.plot(rows, info, path)),
    ]
    for path, write in outputs:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
            console.print(f"wrote {path}")
    return 0


def _run_plan(
    plan: list[tuple[operators.Operator, suite.Case]],
    keys: tuple[str, ...] | None,
    rounds: int,
    min_run_time: float,
    time_limit: float,
) -> list[dict[str, Any]]:
    """Every case under one progress bar (on stderr, gone when done)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    methods = {op.name: [k for k in op.methods if keys is None or k in keys] for op, _ in plan}
    plan = [(op, case) for op, case in plan if methods[op.name]]  # --methods left none
    total = sum(steps(methods[op.name], rounds) for op, _ in plan)
    rows: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("bench", total=total)

        def progress(what: str, n: int) -> None:
            bar.update(task, advance=n, description=what[:70])

        for op, case in plan:
            try:
                rows += run_case(
                    op, case, methods[op.name], rounds, min_run_time, progress, time_limit
                )
            except (ValueError, BatchInteractionError) as exc:
                raise SystemExit(f"python -m torchdiv bench: {exc}") from exc
    return rows
