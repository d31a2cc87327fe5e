"""Peak memory of one call: the CUDA allocator's peak, or on CPU the profiler's memory events."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def peak_memory_mb(fn: Callable[[], Any], device: str | torch.device = "cpu") -> float:
    """Peak tensor memory allocated by one call of ``fn``, in MiB, above what was live before.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
    allocated before the call (the caching allocator's reserved pool is not counted).

    CPU: read from the profiler's memory events (``profile_memory=True``): every allocation and
    free of PyTorch's allocator carries the running total of allocated bytes, so the peak is
    exact and deterministic, unlike the process's resident set, which the C allocator's caching
    and the kernel's lazy accounting blur. It counts tensors only (not Python objects or
    autograd's bookkeeping), the same way for every method.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with (
        _stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not memory:
        return 0.0
    before = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return float(max(m["Total Allocated"] for m in memory) - before) / 2**20


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """The profiler's C++ side logs two lines per use to file descriptor 2; drop them.

    (``KINETO_LOG_LEVEL`` does not reach those lines in torch 2.13.)
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
