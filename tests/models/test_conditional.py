"""Conditional generative models as their users write them: a conditional CNF's field (FFJORD's
ConcatSquash layers on ``(x, t, c)``, FiLM ``h * (1 + gamma(c)) + beta(c)``) with a context
encoder, a flow-matching field with a class embedding and a null class for classifier-free
guidance (the guided field ``(1 + w) v(x, t, y) - w v(x, t, null)``, ``w`` per sample or a
float; label dropout drawn inside ``forward``). The context goes in through a closure,
``lambda z: field(t, z, c)`` with ``c`` of shape ``(B, k)``.

Checked in float64 against a per-sample loop of backward passes (one sample, its own context):
the divergence, Jacobian and its diagonal of every exact method and the gradients of a loss of
them with respect to the field's and the encoder's parameters; a later call with another
context of the same shapes; a context mixed across the batch (``c.mean(0)``, ``c[perm]``), a
constant for ``x``, is not refused, and ``x`` mixed is; ``log_likelihood`` with a context per
sample against one solve per sample; ``adjoint=True`` refuses a context it cannot
differentiate wherever the module holds it.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import torchdiv

f64 = torch.float64
D, K, KY = 3, 4, 5


class ConcatSquash(nn.Module):
    """FFJORD's ``ConcatSquashLinear``, its gate and bias read ``(t, c)``."""

    def __init__(self, dim_in: int, dim_out: int, context: int):
        super().__init__()
        self.layer = nn.Linear(dim_in, dim_out)
        self.gate = nn.Linear(1 + context, dim_out)
        self.bias = nn.Linear(1 + context, dim_out, bias=False)

    def forward(self, tc: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.layer(h) * torch.sigmoid(self.gate(tc)) + self.bias(tc)


class ConcatSquashField(nn.Module):
    def __init__(self, dim: int, context: int, hidden: int = 16):
        super().__init__()
        self.l1 = ConcatSquash(dim, hidden, context)
        self.l2 = ConcatSquash(hidden, hidden, context)
        self.l3 = ConcatSquash(hidden, dim, context)

    def forward(self, t: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        tc = torch.cat([t.reshape(-1, 1).expand(x.shape[0], 1), c], -1)
        h = torch.tanh(self.l1(tc, x))
        h = nn.functional.softplus(self.l2(tc, h))
        return self.l3(tc, h)


class FiLMField(nn.Module):
    def __init__(self, dim: int, context: int, hidden: int = 16):
        super().__init__()
        self.inp, self.mid = nn.Linear(dim + 1, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, dim)
        self.gamma, self.beta = nn.Linear(context, hidden), nn.Linear(context, hidden)

    def forward(self, t: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        tt = t.reshape(-1, 1).expand(x.shape[0], 1)
        h = nn.functional.silu(self.inp(torch.cat([x, tt], -1)))
        h = h * (1 + self.gamma(c)) + self.beta(c)
        return self.out(nn.functional.silu(self.mid(h)))


def _setup(
    kind: type[nn.Module], batch: int
) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    field = kind(D, K).to(f64)
    encoder = nn.Sequential(nn.Linear(KY, K), nn.Tanh()).to(f64)
    x, y = torch.randn(batch, D, dtype=f64), torch.randn(batch, KY, dtype=f64)
    return field, encoder, x, y, torch.rand(batch, dtype=f64)


def _loop_jacobian(v: Callable[[int, torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Each sample's Jacobian by backward passes of ``v(b, x[b:b+1])``, with a graph."""
    out = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1].detach().requires_grad_(True)
        vb = v(b, xb)[0]
        rows = [torch.autograd.grad(vb[i], xb, create_graph=True)[0][0] for i in range(len(vb))]
        out.append(torch.stack(rows))
    return torch.stack(out)


def _grads(y: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(y, params, retain_graph=True, materialize_grads=True)


@pytest.mark.parametrize("kind", [ConcatSquashField, FiLMField])
@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "structured"])
def test_a_context_per_sample_values_and_the_encoders_gradients(
    kind: type[nn.Module], method: str
) -> None:
    field, encoder, x, y, t = _setup(kind, 5)
    params = [*field.parameters(), *encoder.parameters()]
    want = _loop_jacobian(lambda b, xb: field(t[b : b + 1], xb, encoder(y[b : b + 1])), x)
    weights = torch.randn_like(want)
    for _ in range(2):  # the second call (plans kept) as the first
        c = encoder(y)
        got = torchdiv.divergence(lambda z: field(t, z, c), x, method=method)  # noqa: B023
        trace = want.diagonal(0, -2, -1).sum(-1)
        assert_close(got, trace, rtol=1e-12, atol=1e-12)
        for g, e in zip(
            _grads(got @ weights[:, 0, 0], params),
            _grads(trace @ weights[:, 0, 0], params),
            strict=True,
        ):
            assert_close(g, e, rtol=1e-11, atol=1e-12)
    if method != "structured":
        jac = torchdiv.jacobian(lambda z: field(t, z, encoder(y)), x, method=method)
        assert_close(jac, want, rtol=1e-12, atol=1e-12)
        for g, e in zip(
            _grads((jac * weights).sum(), params),
            _grads((want * weights).sum(), params),
            strict=True,
        ):
            assert_close(g, e, rtol=1e-11, atol=1e-12)
        diagonal = torchdiv.jacobian_diagonal(lambda z: field(t, z, c), x, method=method)
        assert_close(diagonal, want.diagonal(0, -2, -1), rtol=1e-12, atol=1e-12)
    # another context of the same shapes: nothing kept from the last call's
    y2 = torch.randn_like(y)
    c2 = encoder(y2)
    want2 = _loop_jacobian(lambda b, xb: field(t[b : b + 1], xb, c2[b : b + 1]), x)
    got2 = torchdiv.divergence(lambda z: field(t, z, c2), x, method=method)
    assert_close(got2, want2.diagonal(0, -2, -1).sum(-1), rtol=1e-12, atol=1e-12)


class LabelDropout(nn.Module):
    """A flow-matching field on a class embedding with a null class (``num_classes``) for
    classifier-free guidance; in training each label is dropped to the null one with
    probability ``p``, drawn inside ``forward``."""

    def __init__(self, field: nn.Module, num_classes: int, p: float = 0.3):
        super().__init__()
        self.field, self.embed, self.p = field, nn.Embedding(num_classes + 1, K), p
        self.null = num_classes

    def forward(self, t: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.training:
            y = torch.where(torch.rand(y.shape[0]) < self.p, torch.full_like(y, self.null), y)
        return self.field(t, x, self.embed(y))


@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "structured"])
@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("doubled", [False, True])
def test_the_guided_field_of_classifier_free_guidance(
    method: str, per_sample: bool, doubled: bool
) -> None:
    """Also as samplers write it, one forward of the batch doubled (``torch.cat([z, z])``,
    labels then null labels, ``chunk(2)``): no sample mixing, and not refused."""
    field, _, x, _, t = _setup(FiLMField, 6)
    model = LabelDropout(field, 10).to(f64).eval()
    labels = torch.randint(0, 10, (6,))
    null = torch.full_like(labels, model.null)
    w = torch.rand(6, 1, dtype=f64) * 3 if per_sample else 1.5

    def guided(z: torch.Tensor, sl: slice = slice(None)) -> torch.Tensor:
        ws = w[sl] if isinstance(w, torch.Tensor) else w
        return (1 + ws) * model(t[sl], z, labels[sl]) - ws * model(t[sl], z, null[sl])

    def guided_doubled(z: torch.Tensor) -> torch.Tensor:
        both = model(torch.cat([t, t]), torch.cat([z, z]), torch.cat([labels, null]))
        conditional, unconditional = both.chunk(2)
        return (1 + w) * conditional - w * unconditional

    want = _loop_jacobian(lambda b, xb: guided(xb, slice(b, b + 1)), x).diagonal(0, -2, -1).sum(-1)
    got = torchdiv.divergence(guided_doubled if doubled else guided, x, method=method)
    assert_close(got, want, rtol=1e-12, atol=1e-12)
    params = list(model.parameters())
    for g, e in zip(_grads(got.sum(), params), _grads(want.sum(), params), strict=True):
        assert_close(g, e, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "structured"])
def test_label_dropout_drawn_inside_forward_is_one_evaluations(method: str) -> None:
    field, _, x, _, t = _setup(FiLMField, 6)
    model = LabelDropout(field, 10).to(f64).train()
    labels = torch.randint(0, 10, (6,))
    torch.manual_seed(5)
    got = torchdiv.divergence(lambda z: model(t, z, labels), x, method=method)
    torch.manual_seed(5)
    dropped = torch.where(torch.rand(6) < model.p, torch.full_like(labels, model.null), labels)
    c = model.embed(dropped)
    want = _loop_jacobian(lambda b, xb: field(t[b : b + 1], xb, c[b : b + 1]), x)
    assert_close(got, want.diagonal(0, -2, -1).sum(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "structured", "hutchinson"])
def test_a_context_mixed_across_the_batch_is_no_mixing_of_x_but_x_mixed_is(method: str) -> None:
    """``c.mean(0)`` or ``c[perm]`` is a constant for ``x``: each sample's Jacobian is still
    its own (not refused, and right); ``x`` mixed, directly or through the context, is
    refused by the watching methods."""
    field, _, x, _, t = _setup(FiLMField, 6)
    c = torch.randn(6, K, dtype=f64)
    perm = torch.tensor([1, 2, 0, 4, 5, 3])
    options = {"num_probes": 2, "generator": torch.Generator().manual_seed(0)}
    kw = options if method == "hutchinson" else {}
    for mixed in (c.mean(0, keepdim=True).expand_as(c), c[perm]):
        got = torchdiv.divergence(lambda z: field(t, z, mixed), x, method=method, **kw)  # noqa: B023
        if method != "hutchinson":
            want = _loop_jacobian(lambda b, xb: field(t[b : b + 1], xb, mixed[b : b + 1]), x)  # noqa: B023
            assert_close(got, want.diagonal(0, -2, -1).sum(-1), rtol=1e-12, atol=1e-12)
    for mixing in (
        lambda z: field(t, z, c) + z.mean(0),
        lambda z: field(t, z[perm], c),
        lambda z: field(t, z, c + z.mean(0).sum()),
    ):
        with pytest.raises(torchdiv.BatchInteractionError):
            torchdiv.divergence(mixing, x, method=method, **kw)


def _normal(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * z.square().sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def test_the_likelihood_with_a_context_per_sample_and_its_gradients() -> None:
    """``log_likelihood`` of a FiLM-conditioned CNF, the context encoded per sample, against
    one solve per sample (its own context, the divergence by backward passes), both at 1e-10:
    the log-likelihood and the gradients of its sum with respect to the field's and the
    encoder's parameters (by backpropagation through the solver's steps)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    field, encoder, x, y, _ = _setup(FiLMField, 3)
    params = [*field.parameters(), *encoder.parameters()]

    def one(b: int) -> torch.Tensor:
        c = encoder(y[b : b + 1])

        def dynamics(
            t: torch.Tensor, s: tuple[torch.Tensor, torch.Tensor]
        ) -> tuple[torch.Tensor, ...]:
            with torch.enable_grad():
                z = s[0] if s[0].requires_grad else s[0].requires_grad_(True)
                v = field(t, z, c)
                rows = [
                    torch.autograd.grad(v[0, i], z, create_graph=True)[0][0, i] for i in range(D)
                ]
            return v, -sum(rows).reshape(1)

        start = (x[b : b + 1], torch.zeros(1, dtype=f64))
        times = torch.tensor([1.0, 0.0], dtype=f64)
        z, delta = torchdiffeq.odeint(dynamics, start, times, rtol=1e-10, atol=1e-10)
        return _normal(z[-1]) - delta[-1]

    want = torch.cat([one(b) for b in range(3)])
    c = encoder(y)
    got = torchdiv.flows.log_likelihood(
        lambda t, z: field(t, z, c), x, 0.0, 1.0, _normal, rtol=1e-10, atol=1e-10
    )
    assert_close(got, want, rtol=1e-8, atol=1e-8)
    for g, e in zip(_grads(got.sum(), params), _grads(want.sum(), params), strict=True):
        assert_close(g, e, rtol=1e-6, atol=1e-7)


class Holder(nn.Module):
    """A CNF's dynamics module that reads its context from ``self.context`` (set before the
    solve), bare or in a plain object."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field, self.context = field, None

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        c = self.context
        return self.field(t, z, c if isinstance(c, torch.Tensor) else c.c)


@dataclasses.dataclass
class Context:
    c: torch.Tensor


CONTEXT: list[torch.Tensor] = []  # a global the dynamics' forward reads


class GlobalContext(nn.Module):
    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.field(t, z, CONTEXT[0])


@pytest.mark.parametrize("where", ["namespace", "dataclass", "forward", "global"])
def test_adjoint_refuses_a_context_it_cannot_differentiate_wherever_it_is_held(where: str) -> None:
    """``odeint_adjoint`` differentiates the module's parameters only: a context computed by
    an encoder outside the module lost the encoder's gradients, silently (0.22 off), where
    the module held it in a ``SimpleNamespace`` or dataclass, closed over it in a replaced
    ``forward`` or its ``forward`` read it from a global; a bare attribute was refused."""
    field, encoder, x, y, _ = _setup(FiLMField, 3)
    c = encoder(y)
    dynamics: nn.Module = Holder(field)
    if where == "namespace":
        dynamics.context = types.SimpleNamespace(c=c)
    elif where == "dataclass":
        dynamics.context = Context(c)
    elif where == "forward":
        dynamics.forward = lambda t, z: field(t, z, c)
    else:
        dynamics = GlobalContext(field)
        CONTEXT[:] = [c]
    try:
        with pytest.raises(ValueError, match=r"adjoint=True .* lost"):
            torchdiv.flows.log_likelihood(dynamics, x, 0.0, 1.0, _normal, adjoint=True)
    finally:
        CONTEXT.clear()


def _assert_adjoint_equals_backpropagation(dynamics, x, params, rtol: float, atol: float) -> None:
    """``log_likelihood(adjoint=True)``'s values and parameter gradients equal those of
    backpropagation through the solver (tight solver tolerances: the two differ by them)."""
    results = [
        torchdiv.flows.log_likelihood(
            dynamics, x, 0.0, 1.0, _normal, rtol=1e-9, atol=1e-9, adjoint=a
        )
        for a in (False, True)
    ]
    assert_close(results[1], results[0], rtol=1e-7, atol=1e-7)
    for g, e in zip(
        _grads(results[1].sum(), params), _grads(results[0].sum(), params), strict=True
    ):
        assert_close(g, e, rtol=rtol, atol=atol)


def test_adjoint_takes_a_module_that_encodes_its_context_itself() -> None:
    """The way out the error names: the encoder inside the module (its parameters the
    module's), the raw condition a plain attribute: the adjoint's gradients are the
    direct ones."""
    pytest.importorskip("torchdiffeq")
    field, encoder, x, y, _ = _setup(FiLMField, 3)

    class Dynamics(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.field, self.encoder, self.y = field, encoder, y

        def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return self.field(t, z, self.encoder(self.y))

    dynamics = Dynamics()
    params = list(dynamics.parameters())
    _assert_adjoint_equals_backpropagation(dynamics, x, params, rtol=1e-5, atol=1e-6)


class HyperField(nn.Module):
    """A hypernetwork-conditioned field: each sample's weights made from its context
    (``W1 = w1(c).view(B, D, H)``), applied by ``einsum`` or ``bmm``."""

    def __init__(self, how: str, hidden: int = 8):
        super().__init__()
        self.how, self.hidden = how, hidden
        self.w1, self.b1 = nn.Linear(K, D * hidden), nn.Linear(K, hidden)
        self.w2 = nn.Linear(K, hidden * D)

    def forward(self, t: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        w1 = self.w1(c).view(batch, D, self.hidden) * (1 + t.view(-1, 1, 1))
        w2 = self.w2(c).view(batch, self.hidden, D)
        if self.how == "einsum":
            h = torch.tanh(torch.einsum("bd,bdh->bh", x, w1) + self.b1(c))
            return torch.einsum("bh,bhd->bd", h, w2)
        h = torch.tanh(torch.bmm(x[:, None, :], w1)[:, 0] + self.b1(c))
        return torch.bmm(h[:, None], w2)[:, 0]


@pytest.mark.parametrize("how", ["einsum", "bmm"])
@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "structured"])
def test_a_hypernetwork_field_with_weights_per_sample(how: str, method: str) -> None:
    torch.manual_seed(0)
    field = HyperField(how).to(f64)
    x, t = torch.randn(5, D, dtype=f64), torch.rand(5, dtype=f64)
    c = torch.randn(5, K, dtype=f64, requires_grad=True)
    params = [*field.parameters(), c]
    want = _loop_jacobian(lambda b, xb: field(t[b : b + 1], xb, c[b : b + 1]), x)
    want = want.diagonal(0, -2, -1).sum(-1)
    got = torchdiv.divergence(lambda z: field(t, z, c), x, method=method)
    assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, e in zip(_grads(got.sum(), params), _grads(want.sum(), params), strict=True):
        assert_close(g, e, rtol=1e-11, atol=1e-11)


# a global pretrained feature net of the condition, read under no_grad (params require grad)
FROZEN = nn.Linear(KY, K).to(f64)


class Reads(nn.Module):
    """Dynamics that hold a module they do not differentiate: a back-reference to the model
    that owns them (not a submodule: set past ``nn.Module.__setattr__``), an EMA copy kept in
    a list, or a global frozen net whose features they read under ``no_grad``."""

    def __init__(self, field: nn.Module, y: torch.Tensor, encoder: nn.Module, how: str):
        super().__init__()
        self.field, self.encoder, self.y, self.how = field, encoder, y, how
        if how == "parent":
            object.__setattr__(self, "parent", nn.Sequential(nn.Linear(3, 3), self).to(f64))
        elif how == "ema":
            self.ema = [nn.Linear(D, D).to(f64)]

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        c = self.encoder(self.y)
        if self.how == "frozen":
            with torch.no_grad():
                c = c + 0.1 * torch.tanh(FROZEN(self.y))
        return self.field(t, z, c)


@pytest.mark.parametrize("how", ["parent", "ema", "frozen"])
def test_adjoint_takes_dynamics_holding_a_module_they_do_not_differentiate(how: str) -> None:
    """Refused since the adjoint's walk named every module ``f`` reaches (condflow15): one
    evaluation of ``f`` at the solve's ends says none of their parameters is differentiated;
    values and gradients (field and encoder) of the adjoint equal backpropagation's."""
    pytest.importorskip("torchdiffeq")
    field, encoder, x, y, _ = _setup(FiLMField, 3)
    dynamics = Reads(field, y, encoder, how)
    params = [*field.parameters(), *encoder.parameters()]
    _assert_adjoint_equals_backpropagation(dynamics, x, params, rtol=1e-6, atol=1e-7)


def test_adjoint_refuses_a_context_held_deeper_than_the_walk_looks() -> None:
    """A context three plain objects down (``self.config.inputs.context.c``): the walk of
    what ``f`` holds stops at two levels and the encoder's gradients were lost silently;
    the evaluation of ``f`` finds it in its autograd graph."""
    pytest.importorskip("torchdiffeq")
    field, encoder, x, y, _ = _setup(FiLMField, 3)
    ns = types.SimpleNamespace
    deep = ns(inputs=ns(context=ns(c=encoder(y))))

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.field, self.config = field, deep

        def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return self.field(t, z, self.config.inputs.context.c)

    with pytest.raises(ValueError, match=r"adjoint=True .* autograd graph of f\(t, z\)"):
        torchdiv.flows.log_likelihood(Deep(), x, 0.0, 1.0, _normal, adjoint=True)
