"""Timing with ``torch.utils.benchmark``: interleaved rounds, median and interquartile range;
a deadline for one call, and a warning when other processes load the machine."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.benchmark import Measurement, Timer


def time_interleaved(
    calls: Mapping[str, Callable[[], Any]],
    rounds: int,
    min_run_time: float,
    on_round: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Median and interquartile range (ms) of each call, timed round-robin.

    Each round gives every call a ``Timer.blocked_autorange`` of ``min_run_time`` seconds, so
    slow drifts of the machine (frequency, other load) spread over all methods alike instead of
    favouring whichever ran in the quiet minute. The rounds' samples are merged per call.
    ``Timer`` synchronises CUDA around each block. ``on_round(name)`` is called after each
    call's turn (for a progress bar).

    Returns:
        ``{name: {"median_ms", "iqr_ms", "samples", "rounds_ms"}}``; ``rounds_ms``: each
        round's median, for ratios of two calls round by round (timed minutes apart, rounds
        differ by the machine's load more than calls of one round do).
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
            "rounds_ms": [m.median * 1e3 for m in ms],
        }
    return out


class OverTime(Exception):
    """A call ran past its ``deadline``."""


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise ``OverTime`` in the block after ``seconds`` (``None``: no limit).

    A ``SIGALRM`` timer interrupts Python code (a loop of ``autograd.grad``, ``torch.func``'s
    Python layers) at its next bytecode; one long C++ kernel finishes first. Where there is no
    such timer (Windows, a thread other than the main one) the block runs to its end and the
    caller compares the time it took.
    """
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if seconds is None or not usable:
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise OverTime(f"over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_warning() -> str | None:
    """A warning line when the 1-minute load average exceeds the CPU count (``None`` if not,
    or where the OS has no load average): other processes then take cores from the timed
    calls, so times run high and vary; ratios within one run stay comparable."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this OS
        return None
    cores = os.cpu_count() or 1
    if load <= cores:
        return None
    return (
        f"warning: the machine is loaded (load average {load:.1f} on {cores} CPUs) before "
        "timing: other processes compete for the cores, so times run high; compare ratios "
        "within this run"
    )
