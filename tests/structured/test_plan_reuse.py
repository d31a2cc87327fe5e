"""Plans reused across calls by the public functions: the same values (and parameter
gradients) as a plan made afresh, whatever changed in between (``torchdiv._taylor.cache`` for
recordings, ``torchdiv._structured.products`` for products of weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchdiv
from torchdiv._structured import products
from torchdiv._taylor import cache
from torchdiv.flows import log_likelihood

DOUBLE = torch.float64


@pytest.fixture(autouse=True)
def _empty():
    cache.RECORDINGS.clear()
    products.clear()
    yield
    cache.RECORDINGS.clear()
    products.clear()


def fresh(fn, *args, **kwargs):
    """``fn`` with nothing kept from earlier calls."""
    cache.RECORDINGS.clear()
    products.clear()
    return fn(*args, **kwargs)


def mlp(d: int = 6, h: int = 32) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, d))
    return net.double()


@pytest.mark.parametrize("op", ["divergence", "jacobian_diagonal"])
def test_reused_plans_give_the_values_and_parameter_gradients_of_fresh_ones(op):
    net, x = mlp(), torch.randn(200, 6, dtype=DOUBLE)
    fn = getattr(torchdiv, op)
    fn(net, x)  # kept
    assert len(cache.RECORDINGS._entries) == 1
    value = fn(net, x)
    (grads,) = torch.autograd.grad(value.square().sum(), [net[0].weight])
    expected = fresh(fn, net, x)
    (expected_grads,) = torch.autograd.grad(expected.square().sum(), [net[0].weight])
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-12, atol=1e-12)
    reference = torch.func.vmap(torch.func.jacrev(lambda z: net(z[None])[0]))(x)
    diag = reference.diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(value, diag.sum(-1) if op == "divergence" else diag)


@pytest.mark.parametrize("how", ["in place", "through .data", "replaced", "frozen then trained"])
def test_changed_weights_are_never_served_from_an_old_plan(how):
    net, x = mlp(), torch.randn(200, 6, dtype=DOUBLE)
    net.requires_grad_(False)
    before = torchdiv.divergence(net, x)
    torchdiv.divergence(net, x)  # products of weights kept too
    if how == "in place":
        with torch.no_grad():
            net[0].weight.mul_(1.5)
    elif how == "through .data":  # the version counter does not move
        net[4].weight.data.copy_(torch.randn_like(net[4].weight))
    elif how == "replaced":
        net[0] = nn.Linear(6, 32).double().requires_grad_(False)
    else:
        net.requires_grad_(True)
    after = torchdiv.divergence(net, x)
    assert not torch.allclose(after, before) or how == "frozen then trained"
    torch.testing.assert_close(after, fresh(torchdiv.divergence, net, x), rtol=1e-12, atol=1e-12)
    if how == "frozen then trained":  # the kept product has no graph: not used
        assert after.requires_grad


def test_a_different_structure_at_the_same_site_is_planned_afresh():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 6)).double()
    x = torch.randn(200, 6, dtype=DOUBLE)
    first = torchdiv.divergence(net, x)
    net[1] = nn.ELU()  # same module object, another op
    second = torchdiv.divergence(net, x)
    torch.testing.assert_close(second, fresh(torchdiv.divergence, net, x))
    assert not torch.allclose(first, second)
    net.eval()  # nothing to switch here: still the same plan and values
    torch.testing.assert_close(torchdiv.divergence(net, x), second)


def test_train_and_eval_batch_norm_never_share_a_plan():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 6))
    net = net.double()
    x = torch.randn(200, 6, dtype=DOUBLE)
    net.eval()
    evaluated = torchdiv.divergence(net, x)
    net.train()
    with pytest.raises(torchdiv.BatchInteractionError):  # batch statistics mix samples
        torchdiv.divergence(net, x)
    net.eval()
    torch.testing.assert_close(torchdiv.divergence(net, x), evaluated)


@pytest.mark.parametrize("change", ["dtype", "shape", "requires_grad", "no_grad"])
def test_another_input_or_mode_gets_its_own_plan(change):
    net, x = mlp(), torch.randn(200, 6, dtype=DOUBLE)
    torchdiv.divergence(net, x)
    if change == "dtype":
        net, x = net.float(), x.float()
    elif change == "shape":
        x = torch.randn(300, 6, dtype=DOUBLE)
    elif change == "requires_grad":
        x = x.clone().requires_grad_(True)
    if change == "no_grad":
        with torch.no_grad():
            value = torchdiv.divergence(net, x)
        assert not value.requires_grad
    else:
        value = torchdiv.divergence(net, x)
    torch.testing.assert_close(value, fresh(torchdiv.divergence, net, x))


class ConcatSquash(nn.Module):
    """FFJORD's ConcatSquashLinear: ``Linear(x) * sigmoid(gate(t)) + bias(t)``."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear, self.gate = nn.Linear(d_in, d_out), nn.Linear(1, d_out)
        self.bias = nn.Linear(1, d_out, bias=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = t.reshape(1, 1)
        return self.linear(x) * torch.sigmoid(self.gate(t)) + self.bias(t)


class Field(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.layers = nn.ModuleList([ConcatSquash(d, h), ConcatSquash(h, h), ConcatSquash(h, d)])

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(t, x)
            x = torch.tanh(x) if i < 2 else x
        return x


def test_a_solve_reuses_its_plan_at_every_time_and_gets_the_fresh_result():
    torch.manual_seed(0)
    field, x = Field(4, 24).double(), torch.randn(300, 4, dtype=DOUBLE)
    normal = torch.distributions.Normal(0.0, 1.0)

    def base(z):
        return normal.log_prob(z).sum(-1)

    calls = []
    get = cache.RECORDINGS.get

    def counted(where, k):
        found = get(where, k)
        calls.append(found is not None)
        return found

    options = {"rtol": 1e-8, "atol": 1e-8}
    cache.RECORDINGS.get = counted  # type: ignore[method-assign]
    try:
        kept = log_likelihood(field, x, 0.0, 1.0, base, **options)
    finally:
        del cache.RECORDINGS.get
    # recorded at the first evaluations (the state requires grad from the second on), then
    # checked at every other one
    assert calls.count(False) <= 2 and len(calls) > 10
    cache.RECORDINGS.get = lambda where, k: None  # type: ignore[method-assign]
    try:
        expected = fresh(log_likelihood, field, x, 0.0, 1.0, base, **options)
    finally:
        del cache.RECORDINGS.get
    torch.testing.assert_close(kept, expected, rtol=1e-10, atol=1e-10)


def test_kept_products_are_found_by_their_factors_bits():
    a, b = torch.randn(8, 50), torch.randn(50, 8)
    first = products.product(torch.matmul, a, b, cost=10**6)
    assert products.product(torch.matmul, a.clone(), b.clone(), cost=10**6) is first
    b.data[0, 0] = torch.nextafter(b[0, 0], torch.tensor(float("inf")))  # one ulp
    second = products.product(torch.matmul, a, b, cost=10**6)
    assert second is not first
    torch.testing.assert_close(second, a @ b, rtol=0, atol=0)
    c = torch.randn(8, 50, requires_grad=True)
    assert products.product(torch.matmul, c, b, cost=10**6).requires_grad  # never kept
