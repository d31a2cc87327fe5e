"""``python -m torchdiv bench`` end to end on tiny sizes: JSON, PNG, table, --model, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchdiv.__main__ as torchdiv_main
from torchdiv.__main__ import main
from torchdiv._bench import operators, timing

TINY = ["--batch", "2", "--width", "4", "--repeats", "1", "--min-run-time", "0.001"]
HERE = Path(__file__).resolve().parents[1]  # tests/, where bench_model.py is
ROW_KEYS = {"operator", "family", "case", "dim", "batch", "setting", "dtype", "method", "label"}


@pytest.fixture(autouse=True)
def idle_machine(monkeypatch):
    """The load warning depends on what else runs: the tests fake an idle machine."""
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (0.0, 0.0, 0.0))


@pytest.fixture
def threads_restored():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_smoke_run_writes_json_png_and_table_and_flags_the_wrong_recipe(
    tmp_path, capsys, threads_restored
):
    out_json, out_png, out_md = tmp_path / "b.json", tmp_path / "b.png", tmp_path / "b.md"
    argv = ["bench", "--dims", "2,8", *TINY, "--json", str(out_json), "--plot", str(out_png)]
    argv += ["--markdown", str(out_md), "--threads", "1"]
    assert main(argv) == 0
    doc = json.loads(out_json.read_text())
    assert {"torch", "threads", "processor", "python", "device"} <= doc["machine"].keys()
    assert doc["settings"] == {
        "rounds": 1,
        "min_run_time": 0.001,
        "dtype": "float32",
        "time_limit_s": 60.0,
    }
    assert doc["machine"]["threads"] == 1
    rows = doc["rows"]
    assert {(r["operator"], r["family"], r["dim"]) for r in rows} == {
        (o, f, d)
        for o, families in (
            ("divergence", ("tanh MLP", "conv net", "small CNF (ELU)")),
            ("laplacian", ("tanh MLP to a scalar",)),
        )
        for f in families
        for d in (2, 8)
    }
    for name in operators.DEFAULT_OPERATORS:
        ran = {r["method"] for r in rows if r["operator"] == name}
        assert ran == set(operators.OPERATORS[name].methods)
    for row in rows:
        assert row.keys() >= ROW_KEYS
        stochastic = operators.OPERATORS[row["operator"]].methods[row["method"]].stochastic
        if row["method"] == "ones-vjp":
            assert row["status"] == "WRONG" and row["rel_err"] > 0.1
            assert "median_ms" not in row and "peak_mb" not in row
        else:
            assert row["status"] == "ok", row
            assert stochastic or row["rel_err"] <= 1e-4
            assert row["median_ms"] > 0 and row["iqr_ms"] >= 0 and row["peak_mb"] >= 0
            assert row["vs_best_baseline"] > 0
    png = out_png.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    table = capsys.readouterr().out
    assert "divergence · tanh MLP" in table and "WRONG" in table and "torchdiv auto" in table
    md = out_md.read_text()
    assert "| method | D=2 | D=8 |" in md and "| grad(y, x, ones) [wrong] | WRONG" in md


def test_every_operator_runs_and_a_method_too_big_is_skipped_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(operators, "CROSS_BATCH_LIMIT", 16)
    out = tmp_path / "b.json"
    argv = ["bench", "--operator", "jacobian,jacobian_diagonal", "--dims", "2,3"]
    argv += [*TINY, "--methods", "auto,reverse,jacfwd,loop,functional", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["operator"], r["family"], r["dim"]) for r in rows} == {
        (op, family, dim)
        for op in ("jacobian", "jacobian_diagonal")
        for family, dim in (("tanh MLP", 2), ("tanh MLP", 3), ("conv net", 2))
    }
    for row in rows:
        if row["method"] == "functional" and row["dim"] == 3:
            assert row["status"] == "skipped" and "cross-batch Jacobian" in row["note"]
        else:
            assert row["status"] == "ok" and row["rel_err"] <= 1e-4, row


@pytest.mark.parametrize(
    "spec",
    [
        "bench_model:TinyField",
        "bench_model:make_field",
        "bench_model:field",
        f"{HERE / 'bench_model.py'}:TinyField",
    ],
)
def test_model_by_import_path(tmp_path, spec):
    out = tmp_path / "b.json"
    argv = ["bench", "--model", spec, "--shape", "2,3", *TINY, "--methods", "auto,jacrev"]
    assert main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["family"], r["dim"], r["status"]) for r in rows] == [("model", 6, "ok")] * 2


@pytest.mark.slow
def test_the_module_entry_point_benchmarks_a_user_module():
    argv = ["--model", "bench_model:TinyField", "--shape", "6", *TINY, "--methods", "auto,loop"]
    out = subprocess.run(
        [sys.executable, "-m", "torchdiv", "bench", *argv],
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE,
    )
    assert "torchdiv auto" in out.stdout and "loop of autograd.grad" in out.stdout
    assert "USDT" not in out.stderr  # the profiler's C++ log lines are silenced


@pytest.mark.slow
def test_the_entry_point_waits_passively(tmp_path):
    """End to end: without OMP_WAIT_POLICY, the command runs again with it set to PASSIVE."""
    out = tmp_path / "b.json"
    argv = ["--model", "bench_model:field", "--shape", "3", *TINY, "--methods", "auto"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    subprocess.run(
        [sys.executable, "-m", "torchdiv", "bench", *argv, "--json", str(out)],
        capture_output=True,
        check=True,
        cwd=HERE,
        env=env,
    )
    assert json.loads(out.read_text())["machine"]["env"]["OMP_WAIT_POLICY"] == "PASSIVE"


@pytest.mark.parametrize(("given", "restarts"), [(None, True), ("ACTIVE", False), ("", False)])
def test_the_entry_point_restarts_only_if_the_caller_left_the_policy_unset(
    monkeypatch, given, restarts
):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    if given is not None:
        monkeypatch.setenv("OMP_WAIT_POLICY", given)
    calls = []
    monkeypatch.setattr(torchdiv_main.os, "execv", lambda *args: calls.append(args))
    torchdiv_main._with_passive_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == ("PASSIVE" if given is None else given)
    assert calls == ([(sys.executable, [sys.executable, *sys.orig_argv[1:]])] if restarts else [])


def test_a_loaded_machine_is_reported_and_recorded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    argv = ["bench", "--model", "bench_model:field", "--shape", "3", *TINY, "--methods", "auto"]
    assert main([*argv, "--json", str(out), "--markdown", str(md)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("warning: the machine is loaded (load average 64.0") == 2  # before, after
    assert "load average 64.0" in json.loads(out.read_text())["settings"]["load_warning"]
    assert "warning: the machine is loaded" in md.read_text()


def test_an_idle_machine_gets_no_warning(tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["bench", "--model", "bench_model:field", "--shape", "3", *TINY, "--methods", "auto"]
    assert main([*argv, "--json", str(out)]) == 0
    assert "warning" not in capsys.readouterr().out
    assert "load_warning" not in json.loads(out.read_text())["settings"]


def test_ffjord_multiscale_family_is_coloured_on_images_wider_than_its_reach(tmp_path):
    out = tmp_path / "b.json"
    argv = ["bench", "--operator", "divergence", "--family", "ffjord-multiscale"]
    argv += ["--dims", "768", "--methods", "structured", *TINY, "--json", str(out)]
    assert main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["case"] == "FFJORD multiscale ODEnet, x (2, 3, 16, 16), width 4"
    assert row["status"] == "ok" and row["plan"] == "colours: 432 directions for 768 unit vectors"


def test_ffjord_family_names_the_structured_plan(tmp_path, capsys):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    argv = ["bench", "--operator", "divergence", "--family", "ffjord", "--dims", "300"]
    argv += ["--methods", "structured,jacrev", *TINY, "--json", str(out), "--markdown", str(md)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["family"], r["case"]) for r in rows} == {
        ("FFJORD ODEnet", "FFJORD ODEnet, x (2, 3, 10, 10), width 4")
    }
    (structured,) = [r for r in rows if r["method"] == "structured"]
    assert (
        structured["status"] == "ok"
        and structured["plan"] == "colours: 75 directions for 300 unit vectors"
    )
    assert "torchdiv structured, D=300: colours: 75 directions for 300" in md.read_text()


def test_unet_family_runs_and_names_its_plan(tmp_path):
    """guided-diffusion's U-Net (attention at half resolution): all unit vectors, checked
    against jacrev's divergence by the runner before it is timed."""
    out = tmp_path / "b.json"
    argv = ["bench", "--operator", "divergence", "--family", "unet", "--dims", "48"]
    argv += ["--methods", "structured,jacrev", *TINY, "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["case"] for r in rows} == {"guided-diffusion U-Net, x (2, 3, 4, 4), width 4"}
    assert all(r["status"] == "ok" for r in rows)
    (structured,) = [r for r in rows if r["method"] == "structured"]
    assert structured["plan"] == "columns: 48 unit vectors"


def test_a_model_that_mixes_samples_is_refused():
    with pytest.raises(SystemExit, match="samples interact"):
        main(["bench", "--model", "bench_model:mixes_samples", "--shape", "3", *TINY])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("takes_time", r"missing 1 required positional argument: 't'; --model must be f\(x\)"),
        ("returns_a_tuple", r"must be a torch.Tensor, got tuple; --model must be f\(x\)"),
    ],
)
def test_a_model_that_is_not_a_function_of_x_alone_is_a_one_line_error(spec, match):
    """Was a traceback of a TypeError from inside the runner (a diffusers U-Net as --model)."""
    with pytest.raises(SystemExit, match=rf"--model bench_model:{spec} on x of shape \(2, 3\): "):
        main(["bench", "--model", f"bench_model:{spec}", "--shape", "3", *TINY])
    with pytest.raises(SystemExit, match=match):
        main(["bench", "--model", f"bench_model:{spec}", "--shape", "3", *TINY])


BAD = [
    (["--dims", "8,x"], "positive integers separated by commas"),
    (["--dims", "0"], "positive integers separated by commas"),
    (["--batch", "-2"], "expected a positive int"),
    (["--repeats", "0"], "expected a positive int"),
    (["--threads", "0"], "expected a positive int"),
    (["--min-run-time", "nan"], "expected a positive float"),
    (["--quick", "--full"], "not allowed with argument"),
    (["--dtype", "int8"], "invalid choice"),
    (["--operator", "curl"], "--operator 'curl' is unknown; choose from divergence, jacobian"),
    (["--methods", "magic"], "--methods 'magic' is unknown; choose from auto, batched-grad"),
    (["--model", "bench_model:TinyField"], "--model and --shape go together"),
    (["--shape", "3"], "--model and --shape go together"),
    (["--model", "bench_model:field", "--shape", "3", "--dims", "4"], "--dims sizes the built-in"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--device", "potato"], "--device must be cpu or cuda"),
    (["--model", "bench_model", "--shape", "3"], "--model must be 'module:attr'"),
    (["--model", "no_such_module_xyz:f", "--shape", "3"], "cannot import 'no_such_module_xyz'"),
    (["--model", "bench_model:missing", "--shape", "3"], "has no attribute 'missing'"),
    (["--model", "bench_model:NOT_CALLABLE", "--shape", "3"], "expected an nn.Module"),
    (["--model", "nowhere/model.py:f", "--shape", "3"], "no file nowhere/model.py"),
    (["--family", "resnet"], "--family 'resnet' is unknown; choose from mlp, conv, scalar"),
    (["--model", "bench_model:field", "--shape", "3", "--family", "mlp"], "--family picks"),
    (["--methods", ""], "--methods: expected names separated by commas, got ''"),
    (["--operator", ","], "--operator: expected names separated by commas, got ','"),
    (["--family", " "], "--family: expected names separated by commas, got ' '"),
]
# the tiny run these would do without the check ends in a traceback, not an argparse error
BAD_OUTPUTS = [
    (["--json", "."], "--json . is a folder; give a file path"),
    (["--plot", "bench.txt"], "--plot bench.txt: matplotlib cannot write '.txt' files"),
    (["--markdown", f"{__file__}/b.md"], "test_cli.py is a file, not a folder"),
]
ONE_CELL = ["--operator", "divergence", "--family", "mlp", "--dims", "2", "--methods", "auto"]


@pytest.mark.parametrize(
    ("argv", "message"), [*BAD, *(([*ONE_CELL, *TINY, *a], m) for a, m in BAD_OUTPUTS)]
)
def test_bad_arguments_exit_with_a_clear_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cuda"])
    assert "CUDA is not available here" in capsys.readouterr().err


def test_missing_bench_extra_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rich", None)
    with pytest.raises(SystemExit):
        main(["bench"])
    assert "pip install 'torchdiv[bench]'" in capsys.readouterr().err


def test_help_lists_the_options_and_operators(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "jacobian_diagonal" in out and "examples:" in out


def test_repeated_names_run_once(tmp_path):
    out = tmp_path / "b.json"
    argv = ["bench", "--operator", "divergence,divergence", "--family", "mlp,mlp", "--dims", "2"]
    assert main([*argv, "--methods", "auto,auto", *TINY, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["operator"], r["family"], r["method"]) for r in rows] == [
        ("divergence", "tanh MLP", "auto")
    ]


def test_a_plot_without_a_suffix_is_written_and_reported_as_a_png(tmp_path, capsys):
    assert main(["bench", *ONE_CELL, *TINY, "--plot", str(tmp_path / "b")]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["b.png"]
    assert f"wrote {tmp_path / 'b.png'}" in capsys.readouterr().out


def test_every_output_names_the_date_of_the_run(tmp_path):
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    argv = ["bench", *ONE_CELL, *TINY, "--json", str(out_json), "--markdown", str(out_md)]
    assert main(argv) == 0
    date = json.loads(out_json.read_text())["machine"]["date"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", date)
    assert out_md.read_text().splitlines()[0].endswith(f", {date}.")


def test_laplacian_of_a_scalar_user_model(tmp_path):
    out = tmp_path / "b.json"
    argv = ["bench", "--model", "bench_model:potential", "--shape", "5", "--operator", "laplacian"]
    assert main([*argv, *TINY, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["method"] for r in rows} == set(operators.LAPLACIAN.methods)


@pytest.mark.parametrize(
    ("spec", "operator", "match"),
    [
        ("bench_model:field", "laplacian", "laplacian on .* one output per sample"),
        ("bench_model:potential", "divergence", "as many elements per sample as x"),
    ],
)
def test_a_model_the_operator_does_not_apply_to_is_refused(spec, operator, match):
    argv = ["bench", "--model", spec, "--shape", "5", "--operator", operator, *TINY]
    with pytest.raises(SystemExit, match=match):
        main(argv)


def test_a_built_in_net_the_laplacian_does_not_apply_to_names_the_one_it_does(capsys):
    """``--family conv --operator laplacian`` (the conv net is a vector field): the error
    said to benchmark a model with one output per sample, not which built-in net has one."""
    argv = ["bench", "--family", "conv", "--operator", "laplacian", "--dims", "8", *TINY]
    with pytest.raises(SystemExit) as exc:  # an argument error, before any net is built
        main(argv)
    assert exc.value.code == 2
    assert re.search(r"--family conv is a vector field.*--family scalar", capsys.readouterr().err)


def test_estimates_show_their_error_and_never_count_as_fastest(tmp_path, capsys):
    out = tmp_path / "b.md"
    argv = ["bench", "--operator", "estimators", "--dims", "8,32", *TINY, "--markdown", str(out)]
    assert main(argv) == 0
    md = out.read_text()
    assert "rel. err" in md and "XTrace's sketch of 15 vectors needs D >= 15 (D=8)" in md
    for line in md.splitlines():
        if "products)" in line:  # the estimators' rows
            assert "**" not in line


def test_methods_that_leave_an_operator_empty_skip_it(tmp_path):
    out = tmp_path / "b.json"
    argv = ["bench", "--operator", "divergence,laplacian", "--methods", "taylor", "--dims", "4"]
    assert main([*argv, *TINY, "--json", str(out)]) == 0
    assert {r["operator"] for r in json.loads(out.read_text())["rows"]} == {"laplacian"}


def test_a_model_computing_in_lower_precision_is_judged_at_its_precision(tmp_path):
    out = tmp_path / "b.json"
    argv = ["bench", "--model", "bench_model:single_precision", "--shape", "4", "--dtype"]
    argv += ["float64", "--methods", "auto,forward,jacfwd", *TINY, "--json", str(out)]
    assert main(argv) == 0
    assert {r["status"] for r in json.loads(out.read_text())["rows"]} == {"ok"}
