"""mypy (strict, pyproject.toml) and pyright (basedpyright, standard mode) report no error on
the package, on the python examples of the README and of ``docs/`` and on ``typed_usage.py``
(which pins, e.g., that ``flows.log_likelihood``'s return type follows ``return_stderr``).

The two checkers run side by side; mypy keeps its cache in ``.mypy_cache`` (a cold run takes
about half a minute, most of it reading torch's annotations).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_readme import example_name, examples, python_blocks

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("examples")
    files = []
    for document, i in examples():
        path = folder / f"{example_name(document, i)}.py"
        path.write_text(python_blocks(document)[i])
        files.append(str(path))
    return ["src/torchdiv", str(ROOT / "tests" / "typed_usage.py"), *files]


def test_mypy_and_pyright_find_no_error(targets):
    pytest.importorskip("mypy")
    pytest.importorskip("basedpyright")
    commands = {
        "mypy": [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", *targets],
        "pyright": [
            sys.executable, "-m", "basedpyright", "--pythonpath", sys.executable, *targets
        ],
    }  # fmt: skip
    running = {
        name: subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for name, cmd in commands.items()
    }
    failures = []
    for name, process in running.items():
        out, _ = process.communicate(timeout=300)
        if process.returncode != 0:
            failures.append(f"{name} (exit {process.returncode}):\n{out.decode()}")
    assert not failures, "\n".join(failures)
