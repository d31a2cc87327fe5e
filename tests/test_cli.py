"""A tiny CPU smoke run of ``python -m torchdiv``."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from torchdiv.__main__ import main
from torchdiv._demo import run_demo


def test_demo_table_shows_every_method_and_flags_the_wrong_recipe():
    report = run_demo(min_run_time=0.01)
    rows = re.findall(r"^(\S.*?)\s{2,}([\d.]+)\s+([\d.e+-]+)$", report, re.M)
    names = {name for name, _, _ in rows}
    assert {
        "torchdiv auto",
        "torchdiv forward",
        "torchdiv reverse",
        "loop of autograd.grad",
        "torch.func vmap(jacrev)",
    } <= names
    assert len(rows) == 2 * 10  # two nets, ten methods each
    for name, ms, err in rows:
        assert float(ms) > 0
        if "wrong" in name:
            assert float(err) > 1e-2  # column sums are not the trace
        else:
            assert float(err) < 1e-4  # float32 nets against a float64 reference


def test_main_prints_the_demo(capsys):
    assert main(["demo", "--min-run-time", "0.01"]) == 0
    assert "torchdiv auto" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["-1", "0", "nan", "inf"])
def test_bad_arguments_exit_with_a_message(capsys, bad):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--min-run-time", bad])
    assert exc.value.code == 2
    assert "--min-run-time must be positive seconds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["nonsense"])


def test_module_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "torchdiv", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in out.stdout
