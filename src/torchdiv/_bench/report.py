"""The benchmark's outputs as text: a grid per operator and family, JSON, and the machine.

The grid has one line per method and one column per D; a cell is ``median ± IQR ms`` over
``peak MiB``, or why the method was not timed (WRONG, skipped, error) with the reason in the
notes under it. ``rich_tables`` renders it for the terminal (bench extra), ``markdown`` for the
README.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

Row = dict[str, Any]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")
LEGEND = (
    "cells: median ± IQR ms over peak MiB (estimates: and their relative error); bold green: "
    "fastest exact method; grey: hand-written baselines; "
    "WRONG: disagrees with the float64 reference, not timed"
)


def machine(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What the numbers were measured on and when: library versions, threads, processor,
    accelerator, the date (UTC, to the minute)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    out = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processor": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "env": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
    }
    if torch.device(device).type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
    return out


def describe(info: dict[str, Any]) -> str:
    """One line for titles: ``Intel Xeon ..., 2 threads, torch 2.13.0+cpu, 2026-12-05 02:40 UTC``
    (no date for a record written before dates were kept)."""
    where = info.get("device_name", f"{info['processor']}, {info['threads']} threads")
    when = f", {info['date']}" if "date" in info else ""
    return f"{where}, torch {info['torch']}{when}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(
    path: Path,
    rows: list[Row],
    settings: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> None:
    """``{"machine": ..., "settings": ..., "rows": [...]}``, every figure of every method;
    ``info`` is the run's ``machine()`` (default: this CPU, now), the one its tables name.
    A figure that is not finite (the relative error of a method that returned NaN) is written
    as ``null``: ``NaN`` and ``Infinity`` are not JSON, and strict readers reject the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": info or machine(), "settings": settings or {}, "rows": rows}
    path.write_text(json.dumps(_finite(doc), indent=1, allow_nan=False))


def _finite(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by ``None``, in dicts and lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def markdown(rows: list[Row], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` by ``(key, header)`` columns; floats to 3 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def groups(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    """Rows by (operator, family), in the order they ran."""
    out: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        out.setdefault((row["operator"], row["family"]), []).append(row)
    return out


def cell(row: Row) -> tuple[str, ...]:
    """The lines of a grid cell: time and memory, or the status (and why, in the notes)."""
    if "median_ms" in row:
        memory = f"{row['peak_mb']:.3g} MiB"
        if row["stochastic"]:  # an estimate: its accuracy belongs next to its cost
            memory += f" · rel. err {row['rel_err']:.2g}"
        return f"{row['median_ms']:.3g} ± {row['iqr_ms']:.2g} ms", memory
    if row["status"] == "WRONG":
        return "WRONG", f"rel. err {row['rel_err']:.2g}"
    if "limit_s" in row:
        return (f"skipped: over {row['limit_s']:g} s",)
    return row["status"], "see notes"


def grid(group: list[Row]) -> tuple[list[int], dict[str, dict[int, Row]], list[str]]:
    """Columns (the Ds), ``{label: {D: row}}`` and the notes: why cells are untimed, and
    the structured method's plan at each D."""
    dims = sorted({r["dim"] for r in group})
    table: dict[str, dict[int, Row]] = {}
    for row in group:
        table.setdefault(row["label"], {})[row["dim"]] = row
    notes = [
        f"{r['label']}, D={r['dim']}: {r['status']}: {r['note']}"
        for r in group
        if r["status"] in ("skipped", "error")
    ]
    notes += [f"{r['label']}, D={r['dim']}: {r['plan']}" for r in group if "plan" in r]
    return dims, table, notes


def fastest(group: list[Row]) -> dict[int, str]:
    """The label of the fastest timed exact method at each D (an estimate is not a contender)."""
    best: dict[int, Row] = {}
    for row in group:
        d = row["dim"]
        timed = "median_ms" in row and not row["stochastic"]
        if timed and (d not in best or row["median_ms"] < best[d]["median_ms"]):
            best[d] = row
    return {d: r["label"] for d, r in best.items()}


def grid_markdown(rows: list[Row], info: dict[str, Any]) -> str:
    """The grids as markdown (for the README): one table per operator and family."""
    parts = [f"Measured on {describe(info)}.", ""]
    if "warning" in info:  # the machine was loaded before timing
        parts += [info["warning"], ""]
    for (operator, family), group in groups(rows).items():
        dims, table, notes = grid(group)
        best = fastest(group)
        lines = [
            {"label": label}
            | {
                str(d): _bold(" · ".join(cell(by_dim[d])), best.get(d) == label)
                for d in dims
                if d in by_dim
            }
            for label, by_dim in table.items()
        ]
        columns = [("label", "method"), *((str(d), f"D={d}") for d in dims)]
        parts += [f"**{operator}, {family}** ({group[0]['setting']})", ""]
        parts += [markdown(lines, columns), "", *(f"- {n}" for n in notes), ""]
    parts.append(
        "Cells: median ± IQR ms · peak MiB (estimates: · relative error); bold: fastest exact "
        "method at that D; WRONG: disagrees with the "
        "float64 reference, not timed."
    )
    return "\n".join(parts)


def _bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


def rich_tables(rows: list[Row], info: dict[str, Any]) -> list[Any]:
    """The grids as ``rich`` tables (bold: fastest at that D; grey: baselines)."""
    from rich.markup import escape
    from rich.table import Table

    tables = []
    for (operator, family), group in groups(rows).items():
        dims, table, notes = grid(group)
        best = fastest(group)
        out = Table(
            title=f"{operator} · {family} · {group[0]['setting']} · {describe(info)}",
            caption=f"{LEGEND}" + "".join(f"\n{escape(n)}" for n in notes),
            caption_justify="left",
        )
        out.add_column("method", no_wrap=True)
        for d in dims:
            out.add_column(f"D={d}", justify="right")
        for label, by_dim in table.items():
            first = next(iter(by_dim.values()))
            style = "grey50" if first["baseline"] else None
            cells = [_rich_cell(by_dim.get(d), best.get(d) == label) for d in dims]
            out.add_row(escape(label), *cells, style=style)
        tables.append(out)
    return tables


def _rich_cell(row: Row | None, is_best: bool) -> str:
    if row is None:
        return ""
    text = "\n".join(cell(row))
    if row["status"] == "WRONG":
        return f"[bold red]{text}[/]"
    return f"[bold green]{text}[/]" if is_best else text
