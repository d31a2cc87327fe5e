"""Shared benchmark plumbing for the scripts in bench/: the package's helpers, re-exported.

Timing (torch.utils.benchmark, interleaved rounds), peak memory, the machine description,
JSON and markdown tables live in ``torchdiv._bench`` (``python -m torchdiv bench`` uses them
too); the scripts here import them from this module by the names below.
"""

from __future__ import annotations

from pathlib import Path

from torchdiv._bench.memory import peak_memory_mb
from torchdiv._bench.report import machine, markdown, write_json
from torchdiv._bench.timing import time_interleaved

RESULTS = Path(__file__).parent / "results"

__all__ = ["RESULTS", "machine", "markdown", "peak_memory_mb", "time_interleaved", "write_json"]
