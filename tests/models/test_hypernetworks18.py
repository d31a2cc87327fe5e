"""Models whose weights depend on the sample or come stacked, as their users write them: a
hypernetwork making each sample's weights from ``x`` (``einsum('bij,bj->bi')``) or from a
per-sample context (``torch.bmm``), FiLM's ``gamma(c) * h + beta(c)``, a dynamic convolution
(per-sample kernels by a grouped convolution with ``groups=B``, the batch folded into the
channels), an ensemble by ``stack_module_state`` and ``vmap(functional_call)`` averaged over its
members, ``functional_call`` with a parameter dict ``f`` closes over, per-sample LoRA adapters
picked by index (``lora_A[idx]``), a HyperNODE field whose weights are made from ``t``, and a
MAML inner step inside ``f`` (on a support set: per sample; on the batch itself: mixing).

Each exact method and Hutchinson with fixed probes against a float64 loop of backward passes
over one sample at a time (its own context), values and the gradients of a weighted loss of
them with respect to every parameter (1e-10: float64, a few hundred flops deep).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, assert_same_parameter_gradients
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

import torchdiv

f64 = torch.float64
D, H, K, B, C = 3, 6, 4, 3, 2


class HyperFromX(nn.Module):
    """Each sample's ``(D, D)`` weight made from the sample itself."""

    def __init__(self) -> None:
        super().__init__()
        self.hyper = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, D * D))
        self.skip = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.hyper(x).view(-1, D, D)
        return torch.tanh(torch.einsum("bij,bj->bi", w, x)) + self.skip(x)


class HyperFromContext(nn.Module):
    """Two layers whose weights a context ``c`` of shape ``(B, K)`` makes, applied by ``bmm``."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2, self.b1 = nn.Linear(K, H * D), nn.Linear(K, D * H), nn.Linear(K, H)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = torch.bmm(self.w1(c).view(-1, H, D), x[..., None])[..., 0] + self.b1(c)
        return torch.bmm(self.w2(c).view(-1, D, H), torch.tanh(h)[..., None])[..., 0]


class FiLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out, self.film = nn.Linear(D, H), nn.Linear(H, D), nn.Linear(K, 2 * H)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(c).chunk(2, -1)
        return self.out(torch.tanh(gamma * F.silu(self.inp(x)) + beta))


class DynamicConv(nn.Module):
    """Per-sample ``3 x 3`` kernels from a context, run as one grouped convolution over the
    batch folded into the channels (``groups=B``)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = nn.Linear(K, C * C * 9)
        self.bias = nn.Parameter(torch.randn(C))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        kernels = self.kernels(c).view(b * C, C, 3, 3)
        y = F.conv2d(x.reshape(1, b * C, h, w), kernels, padding=1, groups=b)
        return torch.tanh(y.view(b, C, h, w) + self.bias[:, None, None])


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, D)).to(f64)


class Ensemble(nn.Module):
    """The mean of three MLPs, their parameters stacked by ``stack_module_state`` and run by
    ``vmap(functional_call)`` over the members (torch.func's model-ensembling recipe)."""

    def __init__(self) -> None:
        super().__init__()
        params, self.buffers_ = stack_module_state([_mlp() for _ in range(3)])
        self.names = list(params)
        self.stacked = nn.ParameterList(nn.Parameter(p) for p in params.values())
        self.base = [_mlp().to("meta")]  # a list: not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def member(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
            return functional_call(self.base[0], (params, buffers), (x,))

        params = dict(zip(self.names, self.stacked, strict=True))
        return vmap(member, in_dims=(0, 0, None))(params, self.buffers_, x).mean(0)


class OutsideParameters(nn.Module):
    """``functional_call`` of a module with a parameter dict held outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        self.weights = nn.ParameterDict(
            {
                n.replace(".", "_"): nn.Parameter(p.detach() + 0.1)
                for n, p in self.net.named_parameters()
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = {n: self.weights[n.replace(".", "_")] for n, _ in self.net.named_parameters()}
        return functional_call(self.net, params, (x,))


class IndexedLora(nn.Module):
    """A base layer plus the low-rank adapter each sample selects: ``lora_B[idx] lora_A[idx]``."""

    def __init__(self, adapters: int = 4, r: int = 2) -> None:
        super().__init__()
        self.base, self.out = nn.Linear(D, H), nn.Linear(H, D)
        self.lora_A = nn.Parameter(torch.randn(adapters, r, D) / 2)
        self.lora_B = nn.Parameter(torch.randn(adapters, H, r) / 2)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        delta = torch.einsum("bhr,brd,bd->bh", self.lora_B[idx], self.lora_A[idx], x)
        return self.out(torch.tanh(self.base(x) + delta))


class HyperNODE(nn.Module):
    """A field ``U(t) tanh(W(t) x + b(t))`` whose weights a network of ``t`` makes (per sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.hyper = nn.Sequential(nn.Linear(1, H), nn.Tanh(), nn.Linear(H, 2 * D * H + H))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        w, u, b = self.hyper(t[:, None]).split([D * H, D * H, H], -1)
        h = torch.tanh(torch.einsum("bhd,bd->bh", w.view(-1, H, D), x) + b)
        return torch.einsum("bdh,bh->bd", u.view(-1, D, H), h)


class MamlSupport(nn.Module):
    """MAML's adapted network: one SGD step inside ``forward`` on a fixed support set
    (``create_graph=True``), then the query ``x`` through the fast weights: per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        gen = torch.Generator().manual_seed(5)
        self.support = torch.randn(5, D, dtype=f64, generator=gen)
        self.targets = torch.randn(5, D, dtype=f64, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = dict(self.net.named_parameters())
        loss = (self.net(self.support) - self.targets).pow(2).mean()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        fast = {n: p - 0.1 * g for (n, p), g in zip(params.items(), grads, strict=True)}
        return functional_call(self.net, fast, (x,))


def _context(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "c": torch.randn(B, K, dtype=f64, generator=gen),
        "idx": torch.tensor([2, 0, 2]),
        "t": torch.rand(B, dtype=f64, generator=gen),
    }


# name: (model, its per-sample inputs besides x, x's event shape)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[str, ...], tuple[int, ...]]] = {
    "hyper_from_x": (HyperFromX, (), (D,)),
    "hyper_from_context": (HyperFromContext, ("c",), (D,)),
    "film": (FiLM, ("c",), (D,)),
    "dynamic_conv": (DynamicConv, ("c",), (C, 2, 2)),
    "ensemble": (Ensemble, (), (D,)),
    "outside_parameters": (OutsideParameters, (), (D,)),
    "indexed_lora": (IndexedLora, ("idx",), (D,)),
    "hypernode": (HyperNODE, ("t",), (D,)),
    "maml_support": (MamlSupport, (), (D,)),
}


def _setup(name: str) -> tuple[nn.Module, Callable, Callable, torch.Tensor]:
    """The model, ``f`` over the batch, ``f`` of sample ``b`` alone, and ``x``."""
    make, inputs, event = CASES[name]
    torch.manual_seed(0)
    model = make().to(f64)
    ctx = _context(1)
    extra = [ctx[k] for k in inputs]
    x = torch.randn(B, *event, dtype=f64, generator=torch.Generator().manual_seed(2))

    def one(b: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda z: model(z, *(e[b : b + 1] for e in extra))

    return model, (lambda z: model(z, *extra)), one, x


def _gradients(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gradient of every element of the vector ``y`` with respect to ``x``, flattened,
    with graphs: shape ``(len(y), x.numel())``."""
    return torch.stack([torch.autograd.grad(yi, x, create_graph=True)[0].reshape(-1) for yi in y])


def _per_sample(one: Callable, x: torch.Tensor, probes: torch.Tensor | None) -> dict:
    """Per sample ``b``: its Jacobian ``J_b`` (rows by ``autograd.grad``), and its Laplacian
    and, for ``probes`` ``v``, ``v^T H_i v`` of every output ``i`` (double backward), all
    with graphs to the parameters. ``(B, m, n)``, ``(B, m)``, ``(r, B, m)``."""
    jac, lap, quad = [], [], []
    for b in range(len(x)):
        xb = x[b : b + 1].detach().requires_grad_(True)
        y = one(b)(xb).reshape(-1)
        rows = _gradients(y, xb)
        jac.append(rows)
        if probes is None:
            continue
        v = probes[:, b].reshape(len(probes), -1)
        hess = torch.stack([_gradients(r, xb) for r in rows])  # (m, n, n)
        lap.append(hess.diagonal(dim1=1, dim2=2).sum(-1))
        quad.append(torch.einsum("rj,ijk,rk->ri", v, hess, v))
    return {
        "jac": torch.stack(jac),
        "lap": torch.stack(lap) if lap else None,
        "quad": torch.stack(quad, 1) if quad else None,
    }


def _check(model: nn.Module, result: torch.Tensor, expected: torch.Tensor) -> None:
    """Values, and every parameter's gradient of a weighted sum of them."""
    assert_close(result, expected)
    w = torch.linspace(0.5, 1.5, result.numel(), dtype=f64).reshape(result.shape)
    assert_same_parameter_gradients(model, (result * w).sum(), (expected * w).sum())


FIRST_ORDER = (
    [("divergence", m) for m in ("auto", "structured", "forward", "reverse", "hutchinson")]
    + [("jacobian", m) for m in ("auto", "forward", "reverse")]
    + [("jacobian_diagonal", m) for m in ("auto", "structured", "forward", "reverse", "hutchinson")]
)
# f takes a backward pass inside: the recorders refuse, naming it
REFUSED = {("maml_support", "structured")}
TORCH_FUNC = ("forward", "reverse", "forward-over-reverse", "hessian")


def _sampled(names: list[str], methods: list) -> list:
    """``(name, *method)`` pairs: always run for the MAML step (the hint it guards), for the
    first method of every model and for one model of every method (a cyclic diagonal); the
    other pairs in the daily sample of slow tests."""
    return [
        pytest.param(
            name,
            *(method if isinstance(method, tuple) else (method,)),
            marks=[] if name.startswith("maml") or j in (0, i % len(methods)) else pytest.mark.slow,
        )
        for i, name in enumerate(names)
        for j, method in enumerate(methods)
    ]


@pytest.mark.parametrize(("name", "op", "method"), _sampled(list(CASES), FIRST_ORDER))
def test_first_order_operators_and_parameter_gradients(name: str, op: str, method: str) -> None:
    model, f, one, x = _setup(name)
    probes = torchdiv.draw_probes(x, 2, generator=torch.Generator().manual_seed(3))
    if name == "maml_support" and method in TORCH_FUNC:
        with pytest.raises(RuntimeError, match=r"MAML inner step.*method='auto'"):
            getattr(torchdiv, op)(f, x, method=method)
        return
    kw = {"probes": probes} if method == "hutchinson" else {}
    if (name, method) in REFUSED:
        with pytest.raises(NotImplementedError, match="structured"):
            getattr(torchdiv, op)(f, x, method=method, **kw)
        return
    result = getattr(torchdiv, op)(f, x, method=method, **kw)
    jac = _per_sample(one, x, None)["jac"]
    v = probes.reshape(2, B, -1)
    diagonal = jac.diagonal(dim1=1, dim2=2)
    expected = {
        "divergence": lambda: diagonal.sum(-1),
        "jacobian": lambda: jac.reshape(result.shape),
        "jacobian_diagonal": lambda: diagonal.reshape(x.shape),
    }[op]()
    if method == "hutchinson" and op == "divergence":
        expected = torch.einsum("rbi,bij,rbj->b", v, jac, v) / 2
    if method == "hutchinson" and op == "jacobian_diagonal":  # v * (J v) or, reverse, v * (J^T v)
        rows = (torch.einsum("bij,rbj->rbi", jac, v) * v).mean(0).reshape(x.shape)
        columns = (torch.einsum("bji,rbj->rbi", jac, v) * v).mean(0).reshape(x.shape)
        expected = rows if torch.allclose(result, rows) else columns
    _check(model, result, expected)


LAPLACIANS = ["auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad", "hutchinson"]


@pytest.mark.parametrize(("name", "method"), _sampled(list(CASES), LAPLACIANS))
def test_laplacian_and_parameter_gradients(name: str, method: str) -> None:
    """Of the energy ``u = |f(x)|^2 / 2`` per sample (one output: the loop stays short)."""
    model, field, one_field, x = _setup(name)

    def f(z: torch.Tensor) -> torch.Tensor:
        return field(z).flatten(1).square().sum(1) / 2

    def one(b: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda z: one_field(b)(z).flatten(1).square().sum(1) / 2

    probes = torchdiv.draw_probes(x, 2, generator=torch.Generator().manual_seed(3))
    if name == "maml_support" and method in TORCH_FUNC:
        with pytest.raises(RuntimeError, match=r"MAML inner step.*'grad-of-grad'"):
            torchdiv.laplacian(f, x, method=method)
        return
    if name == "maml_support" and method == "taylor":
        with pytest.raises(NotImplementedError, match="backward pass"):
            torchdiv.laplacian(f, x, method=method)
        return
    kw = {"probes": probes} if method == "hutchinson" else {}
    result = torchdiv.laplacian(f, x, method=method, **kw)
    ref = _per_sample(one, x, probes)
    expected = ref["quad"].mean(0) if method == "hutchinson" else ref["lap"]
    _check(model, result, expected.reshape(result.shape))


class MamlOnBatch(MamlSupport):
    """The inner step on a loss over the batch ``x`` itself: every sample's output depends on
    every other sample through the fast weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = dict(self.net.named_parameters())
        loss = self.net(x).pow(2).sum(-1).mean()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        fast = {n: p - 0.1 * g for (n, p), g in zip(params.items(), grads, strict=True)}
        return functional_call(self.net, fast, (x,))


@pytest.mark.parametrize(
    ("op", "method"),
    [("divergence", m) for m in ("auto", "structured", "hutchinson")]
    + [("jacobian", "auto"), ("jacobian_diagonal", "auto")]
    + [("laplacian", m) for m in ("auto", "taylor", "hutchinson")],
)
def test_a_maml_step_on_the_batch_itself_is_refused(op: str, method: str) -> None:
    model = MamlOnBatch()
    x = torch.randn(B, D, dtype=f64)
    kw = {"num_probes": 2} if method == "hutchinson" else {}
    with pytest.raises(torchdiv.BatchInteractionError, match="mixes samples"):
        getattr(torchdiv, op)(model, x, method=method, **kw)


@pytest.mark.parametrize("method", ["auto", "structured", "forward", "hutchinson"])
def test_log_likelihood_of_a_hypernode_flow(method: str) -> None:
    """A CNF whose field's weights a network of ``t`` makes: the batch's log-likelihoods and
    their parameter gradients against one solve per sample (a batch of one, plain reverse
    mode; the same fixed-step RK4 grid, so only round-off separates them)."""
    pytest.importorskip("torchdiffeq")
    torch.manual_seed(0)
    node = HyperNODE().to(f64)

    def field(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return node(z, t.expand(len(z)))

    def base(z: torch.Tensor) -> torch.Tensor:
        return -0.5 * z.square().sum(-1)

    z = torch.randn(B, D, dtype=f64, generator=torch.Generator().manual_seed(2))
    kw = {"solver": "rk4", "options": {"step_size": 0.25}}
    probes = torchdiv.draw_probes(z, 2, generator=torch.Generator().manual_seed(3))
    given = {"probes": probes} if method == "hutchinson" else {}
    result = torchdiv.flows.log_likelihood(field, z, 0.0, 1.0, base, method=method, **kw, **given)
    expected = []
    for b in range(B):
        one = {"probes": probes[:, b : b + 1]} if method == "hutchinson" else {}
        alone = "hutchinson" if method == "hutchinson" else "reverse"
        expected.append(
            torchdiv.flows.log_likelihood(
                field, z[b : b + 1], 0.0, 1.0, base, method=alone, **kw, **one
            )
        )
    _check(node, result, torch.cat(expected))
