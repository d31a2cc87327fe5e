"""Plans reused across calls by the public functions: the same values (and parameter
gradients) as a plan made afresh, whatever changed in between (``torchdiv._taylor.cache`` for
recordings, ``torchdiv._structured.products`` for products of weights)."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import answers
from torch import nn
from torch._C._dynamo.eval_frame import get_eval_frame_callback, set_eval_frame

import torchdiv
from torchdiv import _structured
from torchdiv._core import crossover
from torchdiv._structured import products
from torchdiv._taylor import cache
from torchdiv.flows import log_likelihood

capture = importlib.import_module("torchdiv._taylor.capture")  # (the package exports a function)
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
    # (past ROWS_DIAGONAL_WORK_TRAINED: a smaller diagonal goes to plain autograd, unplanned)
    net, x = mlp(h=96), torch.randn(1000, 6, dtype=DOUBLE)
    assert crossover.work(net, x, 1) > _structured.ROWS_DIAGONAL_WORK_TRAINED
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


@pytest.mark.parametrize(
    "how",
    [
        "in place",
        "through .data",
        ".data assigned",
        "set_",
        "load_state_dict",
        "replaced",
        "frozen then trained",
    ],
)
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
    elif how == ".data assigned":  # another tensor, the same Parameter object
        net[2].weight.data = torch.randn_like(net[2].weight)
    elif how == "set_":
        with torch.no_grad():
            net[2].weight.set_(torch.randn_like(net[2].weight))
    elif how == "load_state_dict":
        net.load_state_dict({k: v + 0.1 for k, v in net.state_dict().items()})
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


@pytest.mark.parametrize("op", ["matmul", "join"])
def test_kept_products_are_found_by_their_factors_bits(op):
    a, b = torch.randn(64, 32), torch.randn(32, 64)  # matmul: 64 per compared element
    product = getattr(products, op)
    first = product(a, b)
    assert product(a.clone(), b.clone()) is first
    # factors read in place only where contiguous and without a negative bit
    assert product(a.T.contiguous().T, torch._neg_view(-b)) is first
    assert product(a, torch._neg_view(b)) is not first
    b.data[0, 0] = torch.nextafter(b[0, 0], torch.tensor(float("inf")))  # one ulp
    second = product(a, b)
    assert second is not first
    torch.testing.assert_close(second, a @ b if op == "matmul" else a * b.T, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["matmul", "join"])
def test_a_kept_product_has_the_gradients_of_a_fresh_one(op):
    """Factors that require grad get the kept value through a node whose backward is the
    product's own: first and second derivatives as the plain product's (float64 finite
    differences), and the kept value is never the tensor handed out."""
    shapes = [(32, 2), (2, 32)] if op == "matmul" else [(6, 5), (5, 6)]  # matmul: 16 per element
    a, b = (torch.randn(shape, dtype=DOUBLE, requires_grad=True) for shape in shapes)
    product = getattr(products, op)
    product(a, b)  # kept
    assert len(products._kept) == (1 if op == "matmul" else int(products._MEMCMP is not None))
    out = product(a, b)
    assert out.grad_fn is not None and all(out is not k.result for k in products._kept)
    assert torch.autograd.gradcheck(product, (a, b))
    assert torch.autograd.gradgradcheck(product, (a, b))


@pytest.mark.parametrize("how", ["optimizer step", "through .data"])
def test_trained_weights_are_never_served_from_a_kept_product(how):
    """In training (weights require grad), the product of the first and last weights is kept
    between steps; a step that changes them in place must not reuse it, and the parameter
    gradients after it are those of a plan made afresh."""
    net, x = mlp(), torch.randn(200, 6, dtype=DOUBLE)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):  # the product is kept at the first call, reused at the second
        loss = torchdiv.divergence(net, x).square().mean()
    assert products._kept
    loss.backward()
    if how == "optimizer step":
        optimizer.step()
    else:  # the version counter does not move
        net[0].weight.data.mul_(1.5)
    value = torchdiv.divergence(net, x)
    weights = [p for p in net.parameters() if p is not net[4].bias]  # the divergence's own
    grads = torch.autograd.grad(value.square().mean(), weights)
    jacobians = torch.func.vmap(torch.func.jacrev(lambda z: net(z[None])[0]))(x)
    expected = jacobians.diagonal(dim1=1, dim2=2).sum(-1)  # torch.func: no kept product
    expected_grads = torch.autograd.grad(expected.square().mean(), weights)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def _reference_divergence(f, x):
    jacobians = torch.func.vmap(torch.func.jacrev(lambda z: f(z[None])[0]))(x)
    return jacobians.diagonal(dim1=1, dim2=2).sum(-1)


def test_a_chain_followed_along_kept_routes_reads_each_calls_values():
    """The chain's routes (which call gives which factor, which sums give which signs) are
    kept with the template; each call makes the factors and the signs from its own values: a
    sum's ``alpha``, a time concatenated to the input, an index that permutes features."""
    torch.manual_seed(0)
    net = mlp(7, 16)
    inner = nn.Linear(6, 6).double()
    state = {"alpha": 0.5, "t": torch.zeros(1, 1, dtype=DOUBLE), "order": torch.arange(6)}

    def f(x):
        t = state["t"].expand(x.shape[0], 1)
        h = net(torch.cat([x, t], 1))[:, :6].index_select(1, state["order"])
        return torch.sub(h, torch.tanh(inner(x)), alpha=state["alpha"])

    x = torch.randn(100, 6, dtype=DOUBLE)
    for alpha, t in [(0.5, 0.0), (-2.0, 1.5), (3.0, -1.0)]:
        state["alpha"], state["t"] = alpha, torch.full((1, 1), t, dtype=DOUBLE)
        state["order"] = torch.randperm(6)
        value = torchdiv.divergence(f, x, method="structured")
        torch.testing.assert_close(value, _reference_divergence(f, x))
    (template,) = (entry[1] for entry in cache.RECORDINGS._entries.values())
    assert "chain" in template.derived  # followed, not walked, at the later calls


def test_the_recorder_and_the_check_turn_dynamo_off_only_where_it_is_on():
    """``TorchDispatchMode`` wraps a subclass's ``__torch_dispatch__`` in
    ``torch._disable_dynamo``, ~5 us an ATen call in eager code too: the recorder's and the
    check's modes go without it, and turn Dynamo off themselves where a callback is set."""
    for mode in (capture._Recorder, cache._Checker):
        assert not hasattr(mode.__torch_dispatch__, "_torchdynamo_disable")
    seen = []

    class Seeing(capture.DispatchMode):
        def dispatch(self, func, args, kwargs):
            seen.append(get_eval_frame_callback())
            return func(*args, **kwargs)

    prior = set_eval_frame(False)  # Dynamo's run-only callback
    try:
        with Seeing():
            torch.ones(2).add(1)
    finally:
        set_eval_frame(prior)
    assert seen and all(callback is None for callback in seen)


@pytest.mark.parametrize("indexed", [False, True], ids=["time input", "index"])
def test_data_movement_matrices_kept_only_where_shapes_alone_move_the_elements(
    monkeypatch, indexed
):
    """A time input's ``cat`` and an output's slice (zuko's CNF velocity): their 0/1 matrices
    depend on shapes alone, made at one call and kept for the next (``factors._kept_moved``:
    none made at the later calls, whatever time); an ``index_select`` by an index that changes
    between calls makes its matrix at every call. Each call's divergence equals ``jacrev``'s
    of the same ``f``, float64."""
    from torchdiv._structured import factors

    made = answers(monkeypatch, factors, "_moved")  # (one entry per matrix made)
    torch.manual_seed(0)
    net = mlp(9, 16)
    state = {"t": torch.zeros(1, 2, dtype=DOUBLE), "order": torch.arange(7)}

    def f(x):
        t = state["t"].expand(x.shape[0], 2)
        h = torch.cat([t, x], 1)
        if indexed:
            h = h.index_select(1, torch.cat([state["order"], torch.tensor([7, 8])]))
        return net(h)[:, :7]

    x = torch.randn(100, 7, dtype=DOUBLE)
    for call, t in enumerate((0.0, 0.5, -1.5)):
        state["t"], state["order"] = torch.full((1, 2), t, dtype=DOUBLE), torch.randperm(7)
        made.clear()
        value = torchdiv.divergence(f, x, method="structured")
        torch.testing.assert_close(value, _reference_divergence(f, x))
        if call:  # (the first call's may have been kept by an earlier test)
            assert bool(made) == indexed, (call, made)
