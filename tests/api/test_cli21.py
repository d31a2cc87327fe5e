"""A new user's first commands, as the README and ``--help`` write them: ``python -m torchdiv
bench --family cnf`` (issue 19's small CNFs) runs the nets it names under the operators that
apply to them, a family no named operator applies to fails before any timing, the bench's
torchdyn baseline is torchdyn's own trace, and the public functions name a bad argument
before anything else goes wrong."""

from __future__ import annotations

import json

import pytest
import torch

from torchdiv import distributed
from torchdiv.__main__ import main
from torchdiv._bench import recipes

TINY = ["--batch", "2", "--width", "4", "--repeats", "1", "--min-run-time", "0.001"]


@pytest.mark.parametrize(
    ("families", "expected"),
    [
        ("cnf", {("divergence", "small CNF (ELU)")}),
        ("mlp,scalar", {("divergence", "tanh MLP"), ("laplacian", "tanh MLP to a scalar")}),
    ],
)
def test_family_alone_runs_under_the_default_operators_that_apply_to_it(
    tmp_path, families, expected
):
    """The defaults are divergence and laplacian; ``--family cnf`` ran the CNFs' divergence,
    then exited on the Laplacian (a vector field) with no table and no JSON."""
    out = tmp_path / "b.json"
    argv = ["bench", "--family", families, "--dims", "2", "--methods", "auto", *TINY]
    assert main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["operator"], r["family"]) for r in rows} == expected


@pytest.mark.parametrize(
    ("operator", "family", "message"),
    [
        ("divergence,laplacian", "cnf", "laplacian's baselines need one output per sample"),
        ("divergence", "mlp,scalar", "--family scalar has one output per sample"),
    ],
)
def test_a_family_a_named_operator_does_not_apply_to_fails_before_timing(
    capsys, operator, family, message
):
    argv = ["bench", "--operator", operator, "--family", family, "--dims", "2", *TINY]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f, x: distributed.divergence(f, x, method="foo"), "unknown method 'foo'"),
        (lambda f, x: distributed.divergence(f, x, chunk_size=0), "chunk_size must be at least"),
        (lambda f, x: distributed.laplacian(f, x, batch_dims=3), "batch_dims must be in"),
    ],
)
def test_distributed_names_a_bad_argument_before_the_missing_process_group(call, message):
    """A bad argument was reported as ``torch.distributed is not initialised`` (a
    RuntimeError) until a process group existed; it is a ValueError naming the argument."""
    with pytest.raises(ValueError, match=message):
        call(torch.nn.Linear(3, 3), torch.randn(4, 3))


@pytest.mark.slow  # torchdyn's import (lightning): seconds
def test_the_bench_torchdyn_baseline_is_torchdyns_own_trace():
    """The bench times a copy of torchdyn's ``autograd_trace`` (it cannot call it on ``f``);
    the copy computes what torchdyn's does, a graph kept for training included."""
    cnf = pytest.importorskip("torchdyn.models.cnf")
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ELU(), torch.nn.Linear(8, 3))
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    net = net.double()
    ours = recipes.torchdyn_trace(net, x)
    theirs = cnf.autograd_trace(net(x), x)
    assert ours.requires_grad and theirs.requires_grad
    assert torch.equal(ours, theirs)
