"""The scripts in bench/ write new results to the git-ignored bench/results/local/ and replace
the committed ones only with --update, for a run of every case."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = ("a", "b", "c")


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import _common

    return _common


def parse(common, *argv: str) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(CASES))
    common.add_output_options(parser, "x.json")
    return parser, parser.parse_args(argv)


def test_a_run_writes_the_local_folder_by_default_even_for_a_subset(common):
    for argv in ((), ("--cases", "b")):
        assert common.output_path(*parse(common, *argv), "x.json", CASES) == (
            ROOT / "bench" / "results" / "local" / "x.json"
        )


def test_json_picks_the_file(common, tmp_path):
    target = tmp_path / "mine.json"
    assert common.output_path(*parse(common, "--json", str(target)), "x.json", CASES) == target


def test_update_replaces_the_committed_results_of_every_case_only(common, capsys):
    parser, args = parse(common, "--update", "--cases", "c,a,b")
    committed = ROOT / "bench" / "results" / "x.json"
    assert common.output_path(parser, args, "x.json", CASES) == committed
    with pytest.raises(SystemExit):
        common.output_path(*parse(common, "--update", "--cases", "a"), "x.json", CASES)
    assert "--update replaces the committed results of every case" in capsys.readouterr().err


def test_the_local_folder_is_ignored_by_git():
    paths = ["bench/results/local/x.json", "examples/out/cnf_2d.png"]
    done = subprocess.run(
        ["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if done.returncode == 128:
        pytest.skip(f"git cannot tell: {done.stderr}")
    assert done.stdout.split() == paths


def test_every_script_names_its_results_file_not_a_path():
    """``script`` joins the name to the local folder: a full path there would make every run
    replace the committed results (two scripts did)."""
    for path in (ROOT / "bench").glob("*.py"):
        assert not re.search(r"script\([^)]*RESULTS /", path.read_text()), path.name


def test_alike_rounds_time_every_call_after_its_own_and_alternate_the_order(common):
    """``entry_cpu.py``'s rounds: a call that outlasts the budget is one measurement, so each
    is timed right after an untimed call of its own, never after another method (``"auto"``,
    first in every round, was always timed after ``vmap(hessian)``), and no call is always
    first."""
    log: list[str] = []
    calls = {k: (lambda k=k: log.append(k)) for k in "abc"}

    def measure(call) -> float:
        call()
        log.append("timed")
        return float(len(log))

    times = common.alike_rounds(calls, 3, measure)
    rounds = ["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]
    assert log == [s for order in rounds for k in order for s in (k, k, "timed")]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


@pytest.mark.parametrize("operator", ["divergence", "jacobian_diagonal", "jacobian"])
def test_small_events_frozen_scenario_has_a_recipe_of_every_kind_without_a_graph(common, operator):
    """Frozen, ``auto`` keeps no graph; torchdyn's loop always does (more work). Each kind of
    recipe (vmap, is_grads_batched, the loop) must also run without one, or "auto / best"
    compares unequal work."""
    import small_events
    import torch

    net = small_events.mlp(3, torch.nn.Tanh).requires_grad_(False)
    x = torch.randn(4, 3)
    recipes = small_events.recipes(operator, train=False)
    kinds = {"vmap": "vmap", "batched": "is_grads_batched", "loop": "loop"}
    without_graph = {
        kind
        for name, recipe in recipes.items()
        for kind, word in kinds.items()
        if word in name and not recipe(net, x).requires_grad
    }
    expected = set(kinds) - ({"loop"} if operator == "jacobian" else set())
    assert without_graph == expected


@pytest.fixture
def laplacian_small(common, monkeypatch):
    """bench/laplacian_small.py as it loads where DeepXDE cannot be imported (its import alone
    takes seconds), under a name of its own."""
    monkeypatch.setitem(sys.modules, "deepxde", None)
    path = ROOT / "bench" / "laplacian_small.py"
    spec = importlib.util.spec_from_file_location("_laplacian_small_without_deepxde", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_laplacian_small_says_why_the_deepxde_column_is_missing(
    laplacian_small, monkeypatch, tmp_path, capsys
):
    saved = tmp_path / "saved.json"
    saved.write_text('{"rows": []}')
    monkeypatch.setattr(sys, "argv", ["laplacian_small.py", "--report", str(saved)])
    laplacian_small.main()
    assert "deepxde hessian sum: left out, import deepxde failed" in capsys.readouterr().out


def test_laplacian_small_frozen_loop_keeps_no_graph(laplacian_small):
    """Frozen, auto keeps no graph; the loop of grad-of-grad must not either (DeepXDE's
    hessian, left out here, keeps one as DeepXDE does); in training every method keeps one."""
    import torch

    net = laplacian_small.fnn(2, width=4).requires_grad_(False)
    x = torch.randn(3, 2)
    for name, method in laplacian_small.methods(train=False).items():
        assert method(net, x).requires_grad == name.startswith("deepxde"), name
    net.requires_grad_(True)
    for name, method in laplacian_small.methods(train=True).items():
        assert method(net, x).requires_grad, name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cases", "a,nope"], "--cases 'nope' is unknown; choose from a, b, c"),
        (["--rounds", "0"], "--rounds: expected a positive int, got '0'"),
        (["--min-run-time", "-1"], "--min-run-time: expected a positive float, got '-1'"),
    ],
)
def test_script_arguments_that_cannot_run_are_argparse_errors(
    common, monkeypatch, capsys, tmp_path, argv, message
):
    """Not a KeyError or an empty merge of timings after the cases before it ran."""
    ran = []
    monkeypatch.setattr(sys, "argv", ["script.py", *argv, "--json", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit) as exc:
        common.script("doc", dict.fromkeys(CASES), lambda *a: ran.append(a) or [], "x.json", print)
    assert exc.value.code == 2 and not ran
    assert message in capsys.readouterr().err


def test_thread_cpu_time_refuses_more_than_one_thread(common, monkeypatch):
    """With torch on two threads the calling thread's clock misses half the work: the
    compile benchmarks' ratios would favour whatever parallelises best."""
    import torch

    calls = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with pytest.raises(RuntimeError, match="OMP_NUM_THREADS=1"):
        common.cpu_interleaved_ms({"a": lambda: calls.append(1)}, 1, 0.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert len(common.cpu_interleaved_ms({"a": lambda: calls.append(1)}, 1, 0.0)["a"]) == 1
