"""mypy (strict, pyproject.toml) and pyright (basedpyright, standard mode) report no error on
the package, on the python examples of the README and of ``docs/`` and on ``typed_usage.py``
(which pins, e.g., that ``flows.log_likelihood``'s return type follows ``return_stderr``).

The two checkers run side by side in processes of their own, started at low priority right
after collection (``start_early``, called by ``conftest``), so that the rest of the suite runs
meanwhile; under pytest-xdist (``make test``) the test starts them in its worker and waits there
while the other workers run the rest. mypy keeps its cache in ``.mypy_cache`` (a cold run takes
about half a minute, most of it reading torch's annotations).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_readme import example_name, examples, python_blocks

ROOT = Path(__file__).resolve().parents[2]
_RUNNING: dict[str, subprocess.Popen[bytes]] = {}  # the checkers, once started


def start_early(config: pytest.Config) -> None:
    """Start both checkers at low priority as soon as the test is selected (``conftest``
    calls this after collection): they take 20-40 s of CPU, which the core the other tests
    leave idle absorbs; the test then only waits for their verdicts."""
    if _RUNNING or not all(importlib.util.find_spec(name) for name in ("mypy", "basedpyright")):
        return
    folder = Path(tempfile.mkdtemp(prefix="torchdiv-typing-"))
    config.add_cleanup(lambda: _stop(folder))
    files = []
    for document, i in examples():
        path = folder / f"{example_name(document, i)}.py"
        path.write_text(python_blocks(document)[i])
        files.append(str(path))
    targets = ["src/torchdiv", str(ROOT / "tests" / "typed_usage.py"), *files]
    commands = {
        "mypy": [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", *targets],
        "pyright": [
            sys.executable, "-m", "basedpyright", "--pythonpath", sys.executable, *targets
        ],
    }  # fmt: skip
    # Low priority beside a suite running in this process; not in a pytest-xdist worker, which
    # waits for them (its core is theirs), while the other workers' tests would starve them:
    # a fresh clone's cold mypy under `nice` there ran past the wait on a loaded machine.
    worker = os.environ.get("PYTEST_XDIST_WORKER") is not None
    nice = ["nice", "-n", "10"] if shutil.which("nice") and not worker else []
    for name, cmd in commands.items():
        _RUNNING[name] = subprocess.Popen(
            nice + cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )


def _stop(folder: Path) -> None:
    for process in _RUNNING.values():
        if process.poll() is None:
            process.kill()
            process.wait()
    _RUNNING.clear()
    shutil.rmtree(folder, ignore_errors=True)


def test_mypy_and_pyright_find_no_error(pytestconfig):
    pytest.importorskip("mypy")
    pytest.importorskip("basedpyright")
    start_early(pytestconfig)  # (already started when conftest saw the test selected)
    failures = []
    for name, process in _RUNNING.items():
        out, _ = process.communicate(timeout=600)
        if process.returncode != 0:
            failures.append(f"{name} (exit {process.returncode}):\n{out.decode()}")
    assert not failures, "\n".join(failures)
