"""Timing with ``torch.utils.benchmark``: interleaved rounds, median and interquartile range."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.benchmark import Measurement, Timer


def time_interleaved(
    calls: Mapping[str, Callable[[], Any]],
    rounds: int,
    min_run_time: float,
    on_round: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Median and interquartile range (ms) of each call, timed round-robin.

    Each round gives every call a ``Timer.blocked_autorange`` of ``min_run_time`` seconds, so
    slow drifts of the machine (frequency, other load) spread over all methods alike instead of
    favouring whichever ran in the quiet minute. The rounds' samples are merged per call.
    ``Timer`` synchronises CUDA around each block. ``on_round(name)`` is called after each
    call's turn (for a progress bar).

    Returns:
        ``{name: {"median_ms", "iqr_ms", "samples"}}``.
    """
    samples: dict[str, list[Measurement]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            timer = Timer(
                "fn()", globals={"fn": fn}, label=name, num_threads=torch.get_num_threads()
            )
            samples[name].append(timer.blocked_autorange(min_run_time=min_run_time))
            if on_round is not None:
                on_round(name)
    out = {}
    for name, ms in samples.items():
        (merged,) = Measurement.merge(ms)
        out[name] = {
            "median_ms": merged.median * 1e3,
            "iqr_ms": merged.iqr * 1e3,
            "samples": len(merged.times),
        }
    return out
