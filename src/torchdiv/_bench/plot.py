"""The PNG: time and peak memory against D for every method, log scales, baselines dashed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchdiv._bench.report import Row, describe, groups

if TYPE_CHECKING:  # matplotlib is imported when plotting (the bench extra)
    from matplotlib.artist import Artist

# torchdiv's methods: solid lines, one colour each (tab10, then its light shades)
COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
    "#17becf", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
)  # fmt: skip
# the baselines: thin dark lines, each with its own dash pattern, grey and marker
DASHES = ((0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)), (0, (3, 1, 1, 1, 1, 1)))
GREYS = ("0.15", "0.4", "0.6")
MARKERS = "s^vDPX<>"


def plot(rows: list[Row], info: dict[str, Any], path: Path) -> None:
    """One row of two panels (time, memory) per operator and family; a shared legend.

    torchdiv's methods are coloured solid lines, the hand-written baselines dark dashed lines,
    each with its own dashes and marker (``_styles``); methods that were not timed (WRONG,
    skipped, error) are absent.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator, ScalarFormatter

    by_group = groups(rows)
    fig, axes = plt.subplots(
        len(by_group), 2, figsize=(11, 3.3 * len(by_group) + 1.0), squeeze=False
    )
    styles = _styles(rows)
    for (operator, family), (ax_time, ax_mem) in zip(by_group, axes, strict=True):
        group = by_group[operator, family]
        for label, style in styles.items():
            timed = sorted(
                (r for r in group if r["label"] == label and "median_ms" in r),
                key=lambda r: r["dim"],
            )
            if not timed:
                continue
            dims = [r["dim"] for r in timed]
            ax_time.plot(dims, [r["median_ms"] for r in timed], label=label, **style)
            ax_mem.plot(dims, [max(r["peak_mb"], 1e-3) for r in timed], label=label, **style)
        title = f"{operator}, {family} ({group[0]['setting']})"
        for ax, what in ((ax_time, "median time (ms)"), (ax_mem, "peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["dim"] for r in group}))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_yscale("log")
            ax.set_xlabel("D (elements per sample)")
            ax.set_ylabel(what)
            ax.set_title(f"{title}: {what.split(' (')[0]}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
    handles: dict[str, Artist] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(
        list(handles.values()),
        list(handles.keys()),
        loc="lower center",
        bbox_to_anchor=(0.5, 0.025),
        ncol=3,
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(f"torchdiv bench: {describe(info)}", fontsize=11)
    missing = _not_drawn(rows)
    if missing:
        fig.text(0.5, 0.008, "not drawn: " + "; ".join(missing), ha="center", fontsize=8)
    rows_of_legend = (len(handles) + 2) // 3
    fig.tight_layout(rect=(0, 0.04 + 0.035 * rows_of_legend, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _styles(rows: list[Row]) -> dict[str, dict[str, Any]]:
    """One style per method label, no two alike: a colour of its own for each torchdiv method
    (solid, round markers), and for each baseline its own dash pattern, grey and marker."""
    labels = {row["label"]: row["baseline"] for row in rows}  # first seen first
    ours = [label for label, baseline in labels.items() if not baseline]
    theirs = [label for label, baseline in labels.items() if baseline]
    styles: dict[str, dict[str, Any]] = {}
    for i, label in enumerate(ours):
        colour = COLOURS[i % len(COLOURS)]
        styles[label] = {"color": colour, "marker": "o", "linewidth": 2, "zorder": 3}
    for i, label in enumerate(theirs):
        styles[label] = {
            "color": GREYS[i % len(GREYS)],
            "linestyle": DASHES[i % len(DASHES)],
            "marker": MARKERS[i % len(MARKERS)],
            "linewidth": 1.3,
        }
    return styles


def _not_drawn(rows: list[Row]) -> list[str]:
    """``label (WRONG at every D)`` or ``label (skipped at D=128)`` for each method left out;
    where the run has several panels, each named: ``label (skipped: tanh MLP D=128; small
    CNF (ELU) D=16)`` (the panels' D differ: a bare ``D=16`` names none of them)."""
    panels = groups(rows)
    out: dict[tuple[str, str], dict[tuple[str, str], set[int]]] = {}
    for panel, group in panels.items():
        for row in group:
            if "median_ms" not in row:
                where = out.setdefault((row["label"], row["status"]), {})
                where.setdefault(panel, set()).add(row["dim"])
    lines = []
    for (label, status), where in out.items():
        parts = {
            panel: "every D" if dims == {r["dim"] for r in panels[panel]} else _dims(dims)
            for panel, dims in where.items()
        }
        if len(panels) == 1 or set(parts.values()) == {"every D"}:
            lines.append(f"{label} ({status} at {' and '.join(dict.fromkeys(parts.values()))})")
        else:
            named = "; ".join(f"{family} {text}" for (_, family), text in parts.items())
            lines.append(f"{label} ({status}: {named})")
    return lines


def _dims(dims: set[int]) -> str:
    return "D=" + ", ".join(str(d) for d in sorted(dims))
