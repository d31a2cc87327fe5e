"""The examples run end to end on tiny settings (the full settings are in their docstrings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(script: str, *args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_cnf_2d_trains_and_writes_the_png_in_the_ignored_examples_out(tmp_path):
    out = EXAMPLES / "out" / "cnf_2d.png"  # the default, git-ignored
    out.unlink(missing_ok=True)
    stdout = run("cnf_2d.py", "--iters", "3", "--batch", "64", "--grid", "12", cwd=tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out log-likelihood: model" in stdout
    assert not list(tmp_path.iterdir())  # nothing left where it was run from


@pytest.mark.slow
def test_pf_ode_likelihood_prints_the_table():
    stdout = run(
        "pf_ode_likelihood.py", "--train-steps", "2", "--batch", "2", "--num-probes", "6",
        "--solver", "rk4", "--step-size", "0.5",
    )  # fmt: skip
    table = stdout.split("|err|/se\n")[1].splitlines()
    assert [line.split()[0] for line in table] == ["exact", "hutchinson", "hutch++", "xtrace"]
    bits = [float(line.split()[2]) for line in table]
    assert all(abs(b - bits[0]) < 0.5 for b in bits)  # every method near the exact bits/dim


@pytest.mark.slow
def test_diffusion_bits_per_dim_prints_the_table():
    pytest.importorskip("diffusers")
    stdout = run(
        "diffusion_bits_per_dim.py", "--train-steps", "1", "--train-batch", "8", "--batch", "2",
        "--num-probes", "6", "--solver", "euler", "--step-size", "1.0",
    )  # fmt: skip
    table = stdout.split("|err|/se\n")[1].splitlines()
    assert [line.split()[0] for line in table] == ["exact", "hutchinson", "hutch++", "xtrace"]
    bits = [float(line.split()[2]) for line in table]
    assert all(abs(b - bits[0]) < 0.5 for b in bits)  # every method near the exact bits/dim


@pytest.mark.slow  # ~10 s; tests/stacks/test_distributed.py covers the sharded divergence
def test_ddp_cnf_trains_and_its_sharded_likelihood_equals_one_process():
    stdout = run("ddp_cnf.py", "--iters", "2", "--batch", "4", "--eval-batch", "2")
    assert "step    1  loss" in stdout
    gap = float(stdout.split("largest difference from one process: ")[1].split(")")[0])
    assert gap < 1e-4  # float32 log-likelihoods of about 100
