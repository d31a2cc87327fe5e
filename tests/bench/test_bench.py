"""The benchmark's parts: operator registry, runner statuses, suite and model loading."""

from __future__ import annotations

import math
import time

import pytest
import torch
from bench_model import TinyField
from conftest import (
    conv_net,
    reference_diagonal,
    reference_divergence,
    reference_jacobian,
    reference_laplacian,
    tanh_mlp,
)

from torchdiv._bench import operators, report, runner, suite, timing
from torchdiv._bench.operators import Method, Operator, relative_error, tolerance

PROBLEMS = {
    "mlp": lambda: (tanh_mlp(5, 8, 5), torch.randn(3, 5, dtype=torch.float64)),
    "conv": lambda: (conv_net(2), torch.randn(2, 2, 3, 3, dtype=torch.float64)),
    "scalar": lambda: (tanh_mlp(5, 8, 1), torch.randn(3, 5, dtype=torch.float64)),
    # XTrace sketches with num_probes / 2 = 15 vectors: the event needs at least 15 elements
    "wide": lambda: (tanh_mlp(16, 8, 16), torch.randn(3, 16, dtype=torch.float64)),
}
INDEPENDENT = {  # operator -> (reference from conftest, problems it runs on)
    "divergence": (reference_divergence, ("mlp", "conv")),
    "estimators": (reference_divergence, ("wide", "conv")),
    "jacobian": (reference_jacobian, ("mlp", "conv")),
    "jacobian_diagonal": (reference_diagonal, ("mlp", "conv")),
    "laplacian": (reference_laplacian, ("scalar",)),
}


@pytest.mark.parametrize(
    ("name", "problem"), [(n, p) for n, (_, problems) in INDEPENDENT.items() for p in problems]
)
def test_every_right_method_matches_an_independent_reference(name, problem):
    """conftest's references (cross-batch jacrev, hessian), not the registry's, are the judge;
    stochastic estimates must at least be finite and shaped like the operator."""
    op, (f, x) = operators.OPERATORS[name], PROBLEMS[problem]()
    reference, _ = INDEPENDENT[name]
    expected = reference(f, x)
    assert relative_error(op.reference(f, x), expected) < 1e-12
    for key, method in op.methods.items():
        out = method.call(f, x)
        if method.stochastic:
            assert out.numel() == expected.numel() and out.isfinite().all(), key
            continue
        err = relative_error(out, expected)
        if key == "ones-vjp":
            assert err > 0.1  # column sums are not the trace
        else:
            assert err <= tolerance(torch.float64), key


@pytest.mark.parametrize("name", operators.OPERATORS)
def test_only_methods_labelled_create_graph_keep_a_graph_on_a_frozen_problem(name):
    """The suite freezes the parameters so that no method pays for a differentiable result;
    a recipe that keeps the graph anyway (torchdyn's) does more work and must say so."""
    op = operators.OPERATORS[name]
    f, x = PROBLEMS[INDEPENDENT[name][1][0]]()
    f.requires_grad_(False)
    for key, method in op.methods.items():
        keeps_graph = method.call(f, x).requires_grad
        assert keeps_graph == ("create_graph=True" in method.label), key


def test_every_operator_is_checked_against_an_independent_reference():
    assert set(INDEPENDENT) == set(operators.OPERATORS)


def test_tolerances_follow_the_dtype():
    assert tolerance(torch.float64) == 1e-9
    assert tolerance(torch.float32) == 1e-4
    assert tolerance(torch.bfloat16) == 0.078125  # 10 eps: bfloat16 keeps 8 bits


def test_relative_error_is_absolute_when_the_reference_is_zero():
    assert relative_error(torch.full((3,), 2.0), torch.full((3,), 4.0)) == 0.5
    assert relative_error(torch.full((3,), 1e-3), torch.zeros(3)) == pytest.approx(1e-3)


def test_cross_batch_limit_names_the_sizes():
    x = torch.zeros(64, 128)
    assert operators.cross_batch_too_big(x[:2, :8], x[:2, :8]) is None
    reason = operators.cross_batch_too_big(x, x)
    assert "8192x8192 cross-batch Jacobian" in reason and "B=64" in reason


def _case(f, x: torch.Tensor) -> suite.Case:
    problem = suite.Problem(f, x, f, x)  # reference in x's dtype
    return suite.Case("test", "test case", x[0].numel(), x.shape[0], "toy", lambda: problem)


def test_runner_times_estimates_reports_wrong_and_failing_methods():
    def noisy(f, x):
        return operators.DIVERGENCE.reference(f, x) * 1.1

    def broken(f, x):
        raise RuntimeError("no forward-mode rule\nsecond line")

    op = Operator(
        "toy",
        {
            "exact": Method("exact", operators.DIVERGENCE.methods["reverse"].call),
            "estimate": Method("estimate", noisy, stochastic=True),
            "off": Method("off by 10%", noisy),
            "broken": Method("broken", broken, baseline=True),
        },
        operators.DIVERGENCE.reference,
    )
    f, x = tanh_mlp(4, 8, 4, dtype=torch.float32), torch.randn(3, 4)
    ticks = []
    rows = runner.run_case(op, _case(f, x), list(op.methods), 2, 1e-3, lambda w, n: ticks.append(n))
    assert sum(ticks) == runner.steps(list(op.methods), 2)
    by_key = {r["method"]: r for r in rows}
    assert by_key["exact"]["status"] == "ok" and by_key["exact"]["rel_err"] <= 1e-4
    assert by_key["estimate"]["status"] == "ok" and by_key["estimate"]["median_ms"] > 0
    assert by_key["estimate"]["rel_err"] == pytest.approx(0.1, rel=1e-3)
    assert by_key["off"]["status"] == "WRONG" and "median_ms" not in by_key["off"]
    assert by_key["broken"] == by_key["broken"] | {
        "status": "error",
        "note": "RuntimeError: no forward-mode rule",
    }
    assert "vs_best_baseline" not in by_key["exact"]  # no baseline was timed


def test_a_failing_reference_is_a_clear_error():
    f = lambda x: x.tolist() and x  # noqa: E731  (vmap cannot run .tolist())
    with pytest.raises(ValueError, match=r"exact reference failed: RuntimeError"):
        runner.run_case(operators.DIVERGENCE, _case(f, torch.randn(2, 3)), ["auto"], 1, 1e-3)


def test_builtin_cases_cover_families_and_round_conv_sizes_to_images():
    cases = suite.builtin_cases(
        ("mlp", "conv"),
        (8, 9, 32),
        {"mlp": 4, "conv": 2},
        {"mlp": 16, "conv": 4},
        torch.float32,
        torch.device("cpu"),
    )
    assert [(c.family, c.dim) for c in cases] == [
        ("tanh MLP", 8),
        ("tanh MLP", 9),
        ("tanh MLP", 32),
        ("conv net", 8),  # 2 x 2 x 2 (9 rounds to the same images, kept once)
        ("conv net", 32),  # 2 x 4 x 4
    ]
    problem = cases[-1].make()
    assert problem.x.shape == (2, 2, 4, 4) and problem.x.dtype == torch.float32
    assert problem.x64.dtype == torch.float64 and problem.f64(problem.x64).dtype == torch.float64
    assert not any(p.requires_grad for p in problem.f.parameters())


def test_load_model_accepts_instances_classes_factories_and_functions(monkeypatch):
    import bench_model

    monkeypatch.setattr(bench_model, "INSTANCE", TinyField(), raising=False)
    for attr in ("INSTANCE", "TinyField", "make_field"):
        assert isinstance(suite.load_model(f"bench_model:{attr}"), TinyField)
    assert suite.load_model("bench_model:field") is bench_model.field
    assert suite.load_model("torch.nn:Tanh")(torch.zeros(1)) == 0  # dotted modules too


def test_a_function_that_refuses_float64_gets_its_reference_in_its_own_dtype():
    w = torch.randn(3, 3)
    problem = suite.make_problem(lambda x: x @ w, (3,), 2, torch.float32, torch.device("cpu"))
    assert problem.x64.dtype == torch.float32


def test_a_method_over_the_time_limit_is_stopped_and_skipped_with_a_clear_cell():
    """A call still running at the limit is interrupted (not waited for); one that fits once
    but not with its memory call and timing rounds is skipped before timing."""
    exact = operators.DIVERGENCE.methods["reverse"].call

    def stuck(f, x):
        time.sleep(30)  # interrupted by the deadline: the test would take 30 s otherwise
        return exact(f, x)

    def slowish(f, x):
        time.sleep(0.1)
        return exact(f, x)

    op = Operator(
        "toy",
        {
            "fast": Method("fast", exact),
            "stuck": Method("stuck", stuck),
            "slowish": Method("slowish", slowish),
        },
        operators.DIVERGENCE.reference,
    )
    f, x = tanh_mlp(4, 8, 4, dtype=torch.float32), torch.randn(3, 4)
    start = time.perf_counter()
    rows = runner.run_case(op, _case(f, x), list(op.methods), 3, 1e-3, time_limit=0.3)
    assert time.perf_counter() - start < 20  # not the 30 s of the stuck call
    by_key = {r["method"]: r for r in rows}
    assert by_key["fast"]["status"] == "ok" and by_key["fast"]["median_ms"] > 0
    for key in ("stuck", "slowish"):
        row = by_key[key]
        assert row["status"] == "skipped" and row["limit_s"] == 0.3, row
        assert row["note"].startswith("over 0.3 s") and "median_ms" not in row
        assert report.cell(row) == ("skipped: over 0.3 s",)
    assert "stopped after" in by_key["stuck"]["note"]
    assert "would take about" in by_key["slowish"]["note"]  # 0.1 s x (2 + 3 rounds) > 0.3 s


def test_the_deadline_leaves_no_timer_behind():
    with timing.deadline(0.05):
        pass
    time.sleep(0.1)  # an alarm left set would raise OverTime here
    with pytest.raises(timing.OverTime, match=r"over 0\.05 s"), timing.deadline(0.05):
        time.sleep(5)


@pytest.mark.parametrize(("load", "warned"), [(0.5, False), (2.0, False), (9.0, True)])
def test_the_load_warning_compares_the_load_average_with_the_cpus(monkeypatch, load, warned):
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(timing.os, "cpu_count", lambda: 2)
    warning = timing.load_warning()
    assert (warning is not None) == warned
    if warned:
        assert "load average 9.0 on 2 CPUs" in warning


def test_plot_styles_tell_every_method_apart():
    """Eleven torchdiv methods and five baselines (more than the quick suite has): no two
    methods share a colour, no two baselines a style, and no baseline looks like a method."""
    from torchdiv._bench.plot import _styles

    rows = [{"label": f"ours {i}", "baseline": False} for i in range(11)]
    rows += [{"label": f"theirs {i}", "baseline": True} for i in range(5)]
    styles = _styles(rows)  # type: ignore[arg-type]
    colours = [styles[f"ours {i}"]["color"] for i in range(11)]
    assert len(set(colours)) == 11
    looks = [(s["color"], s["linestyle"], s["marker"]) for k, s in styles.items() if "theirs" in k]
    assert len(set(looks)) == 5
    assert not {c for c, _, _ in looks} & set(colours)


def test_json_output_is_strict_json_even_with_a_nan_error(tmp_path):
    """A method that returns NaN has relative error NaN; the file must still be JSON."""
    import json

    def refuse(name: str) -> float:
        raise ValueError(f"{name} is not JSON")

    path = tmp_path / "b.json"
    rows = [
        {"method": "m", "status": "WRONG", "rel_err": float("nan"), "rounds_ms": [1.0, math.inf]}
    ]
    report.write_json(path, rows, {"rounds": 1})
    doc = json.loads(path.read_text(), parse_constant=refuse)
    assert doc["rows"] == [
        {"method": "m", "status": "WRONG", "rel_err": None, "rounds_ms": [1.0, None]}
    ]
    assert rows[0]["rounds_ms"] == [1.0, math.inf]  # the caller's rows are left as they were


def test_the_plot_names_the_panel_of_a_method_it_left_out():
    """The families have Ds of their own (the CNF's 2, 8, 16; the MLP's 8, 32, 128): a
    skipped cell is named by its panel, not by a D another panel shares."""
    from torchdiv._bench import plot

    def row(family: str, dim: int, label: str, status: str) -> dict:
        timed = {"median_ms": 1.0} if status == "ok" else {}
        return {"operator": "divergence", "family": family, "dim": dim, "label": label,
                "status": status, **timed}  # fmt: skip

    rows = [row("tanh MLP", d, "functional", "ok" if d < 128 else "skipped") for d in (8, 128)]
    rows += [row("small CNF", d, "functional", "ok" if d < 16 else "skipped") for d in (8, 16)]
    rows += [
        row(f, d, "ones", "WRONG")
        for f, ds in (("tanh MLP", (8, 128)), ("small CNF", (8, 16)))
        for d in ds
    ]
    assert plot._not_drawn(rows) == [
        "functional (skipped: tanh MLP D=128; small CNF D=16)",
        "ones (WRONG at every D)",
    ]
    assert plot._not_drawn(rows[:2]) == ["functional (skipped at D=128)"]
