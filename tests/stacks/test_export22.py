"""Models from PyTorch's export and compile tool chain passed as ``f``, as deployment- and
compile-minded users make them: ``torch.export.export(model, (x,)).module()`` with a dynamic
batch (``dynamic_shapes``) and without, after ``run_decompositions()``; ``torch.compile``'s
inductor on CPU (``fullgraph``, ``dynamic``, ``mode="max-autotune-no-cudagraphs"``); compiled
autograd around a training step whose loss holds a divergence or a Laplacian.

References, float64: each sample's Jacobian diagonal row by row (``loop_diagonal``) and each
sample's Laplacian alone by grad of grad (``laplacian_alone``), through the eager module the
exported or compiled one was made from; parameter gradients through the same references.

Found here: an exported module with a dynamic batch holds its shape constraints
(``range_constraints``, ``{s0: VR[0, int_oo]}``: SymPy symbols and ``ValueRanges``), which
the structure key could not tell: it was led by ``UNTOLD``, no pass was kept, and every call
of ``"auto"`` was watched for sample mixing again (``jacobian_diagonal`` 3.8x, ``jacobian``
3.6x, a four-probe Hutchinson estimate 8x the static export's time, 64 x 16 MLP). They are
told by value now (``_taylor.cache._symbolic``).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from conftest import (
    CentredMLP,
    assert_close,
    assert_gradients_as,
    laplacian_alone,
    loop_diagonal,
    reference_jacobian,
)
from torch.export import Dim

import torchdiv

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch.export's own
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    # Dynamo reads .grad of the non-leaf tensors it resumes with after a graph break
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not"),
]

f64 = torch.float64


def _mlp(d_out: int = 3) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, d_out)
    ).double()


def _exported(net: torch.nn.Module, x: torch.Tensor, how: str) -> torch.nn.Module:
    """``net`` (a copy) exported at ``x``: ``"static"``, ``"dynamic"`` (the batch a ``Dim``),
    or ``"decomposed"`` (dynamic, then ``run_decompositions()``); unlifted (``.module()``)."""
    name = next(iter(inspect.signature(net.forward).parameters))  # (Sequential's: input)
    shapes = {name: {0: Dim("batch")}} if how != "static" else None
    program = torch.export.export(copy.deepcopy(net), (x,), dynamic_shapes=shapes)
    return (program.run_decompositions() if how == "decomposed" else program).module()


def test_a_dynamic_batch_export_keeps_its_pass(watches: list[int]) -> None:
    """Fails without the fix: the exported module's ``range_constraints`` made its structure
    key untold, so each of three ``jacobian_diagonal`` calls watched it again (three watches,
    3.8x the static export's time); now one, as for the eager module. Values as the eager
    module's per-sample diagonal, at the traced batch and another."""
    torch.manual_seed(0)
    net = _mlp()
    x = torch.randn(4, 3, dtype=f64)
    model = _exported(net, x, "dynamic")
    for _ in range(3):
        assert_close(torchdiv.jacobian_diagonal(model, x), loop_diagonal(net, x))
    assert len(watches) == 1
    x6 = torch.randn(6, 3, dtype=f64)
    assert_close(torchdiv.jacobian_diagonal(model, x6), loop_diagonal(net, x6))


_DIAGONALS = ["auto", "structured", "forward", "reverse"]
_LAPLACIANS = ["auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"]


@pytest.mark.slow  # three exports and every method: about 1.5 s
@pytest.mark.parametrize("how", ["static", "dynamic", "decomposed"])
def test_exported_models_every_method(how: str) -> None:
    """Divergence, Jacobian diagonal, Jacobian and Laplacian of an exported MLP, every
    method, twice, at the traced batch (and another where the batch is dynamic): values and
    parameter gradients as the eager module's per-sample references."""
    torch.manual_seed(0)
    net, scalar = _mlp(), _mlp(1)
    x = torch.randn(4, 3, dtype=f64)
    model, model1 = _exported(net, x, how), _exported(scalar, x, how)
    batches = [x] if how == "static" else [x, torch.randn(6, 3, dtype=f64)]
    for z in batches:
        diagonal = loop_diagonal(net, z, create_graph=True)
        lap = laplacian_alone(lambda u: scalar(u)[:, 0], z)
        for method in _DIAGONALS:
            for _ in range(2):
                got = torchdiv.divergence(model, z, method=method)
                assert_close(got, diagonal.sum(1).detach())
                assert_gradients_as(model, got.sum(), net, diagonal.sum())
                got = torchdiv.jacobian_diagonal(model, z, method=method)
                assert_close(got, diagonal.detach())
        assert_close(torchdiv.jacobian(model, z), reference_jacobian(net, z))
        for method in _LAPLACIANS:
            for _ in range(2):
                got = torchdiv.laplacian(model1, z, method=method)[:, 0]
                assert_close(got, lap.detach())
                assert_gradients_as(model1, got.sum(), scalar, lap.sum())


class _OutCentred(torch.nn.Module):
    """A head whose outputs are centred over the batch (``y - y.mean(0)``): mixes samples."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.linear(x))
        return y - y.mean(0)


class _Permuted(torch.nn.Module):
    """Rows gathered by an index buffer (the identity at first): per sample until the buffer
    is written with a permutation."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.register_buffer("perm", torch.arange(batch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))[self.perm]


@pytest.mark.slow  # six exports: about 1 s
@pytest.mark.parametrize("how", ["dynamic", "decomposed"])
def test_exported_models_after_a_kept_pass(how: str) -> None:
    """With the pass kept (the fix above): an exported mixing model is refused at every call;
    a weight written in place or replaced, and a static export's index buffer written with a
    permutation after a pass, are seen at the next call (values, or the refusal)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=f64)
    mixing = _exported(_OutCentred().double(), x, how)
    mixing1 = _exported(CentredMLP().double(), x, how)
    for _ in range(2):
        with pytest.raises(torchdiv.BatchInteractionError, match=r"^divergence: f mixes samples"):
            torchdiv.divergence(mixing, x)
        with pytest.raises(torchdiv.BatchInteractionError, match=r"^laplacian: f mixes samples"):
            torchdiv.laplacian(lambda z: mixing1(z)[:, 0], x)
    net = _mlp()
    model = _exported(net, x, how)
    torchdiv.divergence(model, x)
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    with torch.no_grad():
        weights[0].mul_(2.0), net[0].weight.mul_(2.0)
    assert_close(torchdiv.divergence(model, x), loop_diagonal(net, x).sum(1))
    owner, name = weights[1], "2"
    assert owner is model.get_submodule(name).weight
    model.get_submodule(name).weight = torch.nn.Parameter(3.0 * owner.detach())
    net[2].weight = torch.nn.Parameter(3.0 * net[2].weight.detach())
    assert_close(torchdiv.divergence(model, x), loop_diagonal(net, x).sum(1))
    permuted = torch.export.export(_Permuted(4).double(), (x,)).module()
    torchdiv.divergence(permuted, x)
    with torch.no_grad():
        permuted.perm.copy_(torch.tensor([1, 0, 3, 2]))
    with pytest.raises(torchdiv.BatchInteractionError, match=r"^divergence: f mixes samples"):
        torchdiv.divergence(permuted, x)


@pytest.mark.slow  # inductor's code generation on CPU: 10-30 s a mode
@pytest.mark.parametrize(
    "options",
    [{"fullgraph": True}, {"dynamic": True}, {"mode": "max-autotune-no-cudagraphs"}],
    ids=["fullgraph", "dynamic", "max-autotune-no-cudagraphs"],
)
def test_inductor_compiled_models(options: dict) -> None:
    """A model compiled with inductor (the default backend) on CPU, as ``f``: divergence and
    Laplacian (``"auto"``) values and parameter gradients as the eager module's, at the batch
    it was compiled at (and another under ``dynamic``); a mixing one refused."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net, scalar = _mlp(), _mlp(1)
    model, model1 = torch.compile(net, **options), torch.compile(scalar, **options)
    batches = [4, 6] if options.get("dynamic") else [4]  # (each graph: seconds of codegen)
    for z in [torch.randn(n, 3, dtype=f64) for n in batches]:
        model(z), model1(z)
        diagonal = loop_diagonal(net, z, create_graph=True)
        got = torchdiv.divergence(model, z)
        assert_close(got, diagonal.sum(1).detach())
        assert_gradients_as(net, got.sum(), net, diagonal.sum())
        lap = laplacian_alone(lambda u: scalar(u)[:, 0], z)
        got = torchdiv.laplacian(model1, z)[:, 0]
        assert_close(got, lap.detach())
        assert_gradients_as(scalar, got.sum(), scalar, lap.sum())
    mixing = torch.compile(_OutCentred().double(), **options)
    with pytest.raises(torchdiv.BatchInteractionError, match=r"^divergence: f mixes samples"):
        torchdiv.divergence(mixing, torch.randn(4, 3, dtype=f64))
    torch._dynamo.reset()


@pytest.mark.slow  # compiled autograd traces each backward: about 20 s
@pytest.mark.parametrize("op", ["divergence", "laplacian"])
def test_a_compiled_training_step_under_compiled_autograd(op: str) -> None:
    """``torch._dynamo.config.compiled_autograd = True`` and ``torch.compile(step)``, the step
    computing a loss that holds a divergence or a Laplacian of the model, its backward and
    an SGD step: three steps' losses and parameters as an eager step with the per-sample
    references (float64)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = _mlp(3 if op == "divergence" else 1)
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)

    def step(x: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        if op == "divergence":
            loss = torchdiv.divergence(net, x).square().sum()
        else:
            loss = torchdiv.laplacian(lambda z: net(z)[:, 0], x).square().sum()
        loss.backward()
        opt.step()
        return loss.detach()

    compiled = torch.compile(step, backend="aot_eager")
    with torch._dynamo.config.patch(compiled_autograd=True):
        for _ in range(3):
            x = torch.randn(4, 3, dtype=f64)
            got = compiled(x)
            ref_opt.zero_grad()
            if op == "divergence":
                want = loop_diagonal(ref, x, create_graph=True).sum(1).square().sum()
            else:
                want = laplacian_alone(lambda z: ref(z)[:, 0], x).square().sum()
            want.backward()
            ref_opt.step()
            assert_close(got, want.detach())
            for p, q in zip(net.parameters(), ref.parameters(), strict=True):
                assert_close(p.detach(), q.detach())
    torch._dynamo.reset()
