"""Shared benchmark plumbing: timing with torch.utils.benchmark, peak memory, tables, JSON."""

from __future__ import annotations

import json
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.benchmark import Measurement, Timer

RESULTS = Path(__file__).parent / "results"


def time_interleaved(
    calls: dict[str, Callable[[], Any]], rounds: int, min_run_time: float
) -> dict[str, dict[str, float]]:
    """Median and interquartile range (ms) of each call, timed round-robin.

    Each round gives every call a ``Timer.blocked_autorange`` of ``min_run_time`` seconds, so
    slow drifts of the machine (frequency, other load) spread over all methods alike instead of
    favouring whichever ran in the quiet minute. The rounds' samples are merged per call.
    """
    samples: dict[str, list[Measurement]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            timer = Timer(
                "fn()", globals={"fn": fn}, label=name, num_threads=torch.get_num_threads()
            )
            samples[name].append(timer.blocked_autorange(min_run_time=min_run_time))
    out = {}
    for name, ms in samples.items():
        (merged,) = Measurement.merge(ms)
        out[name] = {
            "median_ms": merged.median * 1e3,
            "iqr_ms": merged.iqr * 1e3,
            "samples": len(merged.times),
        }
    return out


def peak_memory_mb(fn: Callable[[], Any]) -> float:
    """Peak tensor memory allocated by one call of ``fn``, in MiB, above what was live before.

    Read from the profiler's memory events (``profile_memory=True``): every allocation and free
    of PyTorch's allocator carries the running total of allocated bytes, so the peak is exact
    and deterministic, unlike the process's resident set, which the C allocator's caching and
    the kernel's lazy accounting blur.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not memory:
        return 0.0
    before = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return (max(m["Total Allocated"] for m in memory) - before) / 2**20


def machine() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processor": _cpu_model(),
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


def markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` by ``(key, header)`` columns; floats to 3 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])
