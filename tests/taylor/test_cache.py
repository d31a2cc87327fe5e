"""Recordings kept across calls (``torchdiv._taylor.cache``): reused only when ``f`` computes
the same calls again, with this call's values; never a stale plan."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, assert_same_parameter_gradients, reference_divergence
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchdiv
from torchdiv._taylor import RULES, capture
from torchdiv._taylor import cache as plans
from torchdiv._taylor.cache import PlanCache, checked, recorded, site, template


@pytest.fixture(autouse=True)
def _empty_cache():
    plans.RECORDINGS.clear()
    yield
    plans.RECORDINGS.clear()


def mlp(d: int = 3, h: int = 8, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, h), act(), nn.Linear(h, d)).double()


def same_values(a, b) -> None:
    """Two graphs of the same calls computed the same values (a profiler's handle: of the
    same type)."""
    assert len(a.values) == len(b.values)
    for va, vb in zip(a.values, b.values, strict=True):
        for ta, tb in zip(va, vb, strict=True):
            if isinstance(ta, torch.ScriptObject):
                assert type(tb) is torch.ScriptObject
            else:
                torch.testing.assert_close(ta, tb, rtol=0, atol=0)


def record(f, x, where):
    """``recorded`` and whether it reused the template (the cache's entry count does not
    move on a hit, so compare the template objects)."""
    before = plans.RECORDINGS.get(where, plans.key(x, 1))
    graph = recorded(where, f, x, RULES, 1)
    after = plans.RECORDINGS.get(where, plans.key(x, 1))
    return graph, before is not None and after is before


def test_second_call_checks_instead_of_recording_and_gives_the_same_graph():
    net, x = mlp(), torch.randn(5, 3, dtype=torch.float64)
    first, hit = record(net, x, net)
    assert not hit
    again, hit = record(net, x, net)
    assert hit
    assert [n.func for n in again.nodes] == [n.func for n in first.nodes]
    fresh = capture(net, x, RULES, keep_values=True, batch_dims=1)
    same_values(again, fresh)
    facts = ("widest", "dependent_calls", "elements", "products", "requires_grad", "output_shape")
    assert [getattr(again, k) for k in facts] == [getattr(fresh, k) for k in facts]


def test_changed_parameter_values_are_read_from_the_new_call():
    net, x = mlp(), torch.randn(5, 3, dtype=torch.float64)
    recorded(net, net, x, RULES, 1)
    with torch.no_grad():
        net[0].weight.mul_(2.0)
        net[2].bias.add_(1.0)
    again, hit = record(net, x, net)
    assert hit
    same_values(again, capture(net, x, RULES, keep_values=True, batch_dims=1))
    torch.testing.assert_close(again.values[-1][0], net(x), rtol=0, atol=0)


def test_new_input_values_and_float_arguments_are_values_not_structure():
    net = mlp()
    scale = [0.5]

    def f(x):
        return net(x) * scale[0]

    x = torch.randn(5, 3, dtype=torch.float64)
    recorded(site(f), f, x, RULES, 1)
    scale[0], x2 = 3.0, torch.randn(5, 3, dtype=torch.float64)
    again, hit = record(f, x2, site(f))
    assert hit
    torch.testing.assert_close(again.values[-1][0], f(x2), rtol=0, atol=0)


@pytest.mark.parametrize(
    "change",
    [
        "activation",  # another op
        "weight shape",  # an outside tensor of another shape
        "requires_grad",  # a parameter that now requires grad
        "integer argument",  # an int argument (a dimension, a shift)
    ],
)
def test_a_structure_change_is_recorded_again(change):
    net = mlp().requires_grad_(False)
    shift = [1]

    def f(x):
        return net(x).roll(shift[0], dims=-1)

    x = torch.randn(5, 3, dtype=torch.float64)
    recorded(site(f), f, x, RULES, 1)
    if change == "activation":
        net[1] = nn.ELU()
    elif change == "weight shape":
        net[0], net[2] = nn.Linear(3, 4).double(), nn.Linear(4, 3).double()
    elif change == "requires_grad":
        net[0].weight.requires_grad_(True)
    else:
        shift[0] = 2
    found = plans.RECORDINGS.get(site(f), plans.key(x, 1))
    assert checked(found, f, x, RULES) is None  # the template does not fit
    graph, hit = record(f, x, site(f))
    assert not hit
    same_values(graph, capture(f, x, RULES, keep_values=True, batch_dims=1))


@pytest.mark.parametrize("what", ["shape", "dtype", "requires_grad", "grad mode", "batch_dims"])
def test_the_key_holds_what_the_input_and_modes_change(what):
    x = torch.randn(5, 3, dtype=torch.float64)
    k = plans.key(x, 1)
    if what == "shape":
        other = plans.key(torch.randn(6, 3, dtype=torch.float64), 1)
    elif what == "dtype":
        other = plans.key(x.float(), 1)
    elif what == "requires_grad":
        other = plans.key(x.requires_grad_(True), 1)
    elif what == "grad mode":
        with torch.no_grad():
            other = plans.key(x, 1)
    else:
        other = plans.key(x, 2)
    assert other != k


def test_train_mode_batch_norm_is_recorded_again_and_its_statistics_move_once():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).double().eval()
    x = torch.randn(6, 3, dtype=torch.float64)
    recorded(net, net, x, RULES, None)
    assert plans.RECORDINGS.get(net, plans.key(x, None)) is not None  # eval: a template
    net.train()
    stats = net[1].running_mean.clone()
    found = plans.RECORDINGS.get(net, plans.key(x, None))
    assert checked(found, net, x, RULES) is None  # batch statistics: not the eval template
    torch.testing.assert_close(net[1].running_mean, stats, rtol=0, atol=0)  # put back
    graph = recorded(net, net, x, RULES, None)
    assert graph.changed  # the recorder saw the update once
    reference = stats.clone()
    reference.mul_(0.9).add_(0.1 * net[0](x).mean(0).detach())
    torch.testing.assert_close(net[1].running_mean, reference)
    # a recording with writes is never kept: the eval template is still the one stored
    assert plans.RECORDINGS.get(net, plans.key(x, None)) is found


def test_dropout_in_train_mode_is_never_kept_and_draws_are_put_back_on_a_mismatch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5)).double().eval()
    x = torch.randn(6, 3, dtype=torch.float64)
    recorded(net, net, x, RULES, 1)
    found = plans.RECORDINGS.get(net, plans.key(x, 1))
    net.train()
    state = torch.get_rng_state()
    assert checked(found, net, x, RULES) is None
    assert torch.equal(torch.get_rng_state(), state)  # the mask will be drawn once
    assert template(capture(net, x, RULES, keep_values=True)) is None


def test_functions_are_found_by_their_code():
    net = mlp()
    made = [lambda x, net=net: net(x) for _ in range(2)]
    assert site(made[0]) is site(made[1])
    assert site(net) is net
    assert site(net.forward) is site(net.forward)


def test_a_freed_site_is_not_matched_by_a_new_object():
    cache = PlanCache(4)

    class Site:
        pass

    a = Site()
    cache.put(a, "k", "plan")
    del a
    b = Site()  # may reuse the id
    assert cache.get(b, "k") is None


def test_least_recently_used_entries_go_first():
    cache = PlanCache(2)
    sites = [nn.Linear(1, 1) for _ in range(3)]
    for s in sites[:2]:
        cache.put(s, "k", s)
    cache.get(sites[0], "k")
    cache.put(sites[2], "k", sites[2])
    assert cache.get(sites[1], "k") is None
    assert cache.get(sites[0], "k") is sites[0]
    assert cache.get(sites[2], "k") is sites[2]


def _checked_calls(f, x: torch.Tensor, calls: int) -> tuple[list[bool], list[bool]]:
    """``calls`` recordings of ``f`` at its site: whether each was a kept template's hit and
    whether that template is then lean; every graph has a fresh capture's values."""
    hits, leans = [], []
    for _ in range(calls):
        graph, hit = record(f, x, site(f))
        hits.append(hit)
        leans.append(plans.RECORDINGS.get(site(f), plans.key(x, 1)).lean)
        same_values(graph, capture(f, x, RULES, keep_values=True, batch_dims=1))
    return hits, leans


def test_a_recording_that_replaced_an_op_is_checked_under_all_modes():
    """Templates are checked without ``SafeDerivatives`` and the attention switch
    (``Template.lean``) where the recording called nothing they change; ``f`` calls ``cdist``,
    which ``SafeDerivatives`` replaces (a lean check would see PyTorch's own and fail, and
    ``f`` be evaluated twice): every check runs under all of capture's modes, from the
    second call on a hit with the replacement's values."""

    def f(x):
        return torch.cdist(x, x)

    x = torch.randn(3, 5, 4, dtype=torch.float64)
    hits, leans = _checked_calls(f, x, 4)
    assert hits == [False, True, True, True]
    assert leans == [False, False, False, False]


def test_a_lean_check_that_cannot_match_a_replaced_op_is_followed_by_full_ones():
    """A lean template (a branch without a replaced op) whose check then meets ``cdist``
    (``f`` took the other branch, with the template's calls first): recorded again, and, the
    same calls, checked under all of capture's modes from then on."""
    state = {"cdist": False}

    def f(x):
        return torch.cdist(x, x) if state["cdist"] else torch.tanh(x)

    x = torch.randn(3, 5, 4, dtype=torch.float64)
    recorded(site(f), f, x, RULES, 1)
    state["cdist"] = True
    hits, leans = _checked_calls(f, x, 3)
    assert hits == [False, True, True]
    assert leans == [False, False, False]


def test_a_structure_change_is_then_checked_under_all_modes():
    """A lean check that fails because ``f`` took another branch is followed by a full
    template of the new branch: ``f`` may change again (a cache it grows), and a full check
    that misses records from its own evaluation (a lean one cannot: ``f`` is evaluated
    again); its checks still give the fresh graph."""
    state = {"branch": False}

    def f(x):
        return torch.sin(x) if state["branch"] else torch.tanh(x)

    x = torch.randn(5, 3, dtype=torch.float64)
    recorded(site(f), f, x, RULES, 1)
    state["branch"] = True
    hits, leans = _checked_calls(f, x, 3)
    assert hits == [False, True, True]
    assert leans == [False, False, False]


@pytest.mark.parametrize("change", ["arguments swapped", "no_grad inside f"])
def test_the_same_ops_reading_other_results_or_without_grad_are_recorded_again(change):
    """A check compares the results a call reads by identity first and knows from the
    template which calls depend on ``x``: the same ops in the same order, reading each
    other's results the other way round, or computed under ``no_grad`` (constants), are
    another structure."""
    state = {"swap": False, "no_grad": False}

    def f(x):
        with torch.set_grad_enabled(not state["no_grad"]):
            a, b = torch.tanh(x), torch.sin(x)
        return torch.sub(b, a) if state["swap"] else torch.sub(a, b)

    x = torch.randn(5, 3, dtype=torch.float64)
    recorded(site(f), f, x, RULES, 1)
    state["swap" if change == "arguments swapped" else "no_grad"] = True
    found = plans.RECORDINGS.get(site(f), plans.key(x, 1))
    assert checked(found, f, x, RULES) is None
    graph, hit = record(f, x, site(f))
    assert not hit
    same_values(graph, capture(f, x, RULES, keep_values=True, batch_dims=1))
    assert [n.depends for n in graph.nodes][:2] == [change != "no_grad inside f"] * 2


def test_a_failed_check_puts_back_a_view_f_changed_in_place() -> None:
    """One lambda's code checked against the template of another model: ``nn.GRU`` changes a
    tensor's view in place (``transpose_``), which putting its values back by ``copy_``
    could not undo (a shape error)."""
    torch.manual_seed(0)
    x = torch.randn(64, 4 * 6, dtype=torch.float64)
    models = [
        torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()).double(),
        torch.nn.GRU(6, 6, batch_first=True).double(),
    ]
    for m in models:
        first = lambda y: y[0] if isinstance(y, tuple) else y  # noqa: E731
        f = lambda z: first(m(z.view(64, 4, 6))).reshape(64, -1)  # noqa: E731, B023
        want = torchdiv.divergence(f, x, method="reverse")
        torch.testing.assert_close(torchdiv.divergence(f, x), want)


@pytest.mark.parametrize("method", ["auto", "structured"])
def test_a_call_inside_a_non_reentrant_checkpoint_recomputes_what_it_saved(method) -> None:
    """Inside ``torch.utils.checkpoint(..., use_reentrant=False)`` the call runs twice: in the
    forward and again in the backward pass, which must save the tensors the forward saved.
    The first call at a structure recorded ``f`` and kept the recording, which its
    recomputation then checked instead: another path, ``CheckpointError`` ("Recomputed values
    ... have different metadata") in the caller's backward pass. There no plan is read or
    kept (``PlanCache``, ``checkpointed``). Reference: the same loss without the checkpoint,
    values and parameter gradients."""
    from torch.utils.checkpoint import checkpoint

    net, x = mlp(32, 16), torch.randn(64, 32, dtype=torch.float64)
    params = list(net.parameters())

    def loss(z: torch.Tensor) -> torch.Tensor:
        return torchdiv.divergence(net, z, method=method).square().sum()

    got = checkpoint(loss, x, use_reentrant=False)  # (the first call at this structure)
    grads = torch.autograd.grad(got, params, allow_unused=True, materialize_grads=True)
    assert not plans.checkpointed()
    expected = loss(x)
    wanted = torch.autograd.grad(expected, params, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(got, expected)
    for grad, want in zip(grads, wanted, strict=True):
        torch.testing.assert_close(grad, want)


class Profiled(nn.Module):
    """An MLP whose forward is a profiler range (``torch.profiler.record_function``, as
    FSDP2's hooks open ``FSDP::pre_forward`` around every forward of a sharded module)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.profiler.record_function("block"):
            return self.net(x)


def test_a_profiler_range_in_f_is_checked_not_recorded_again():
    """The range's handle, an argument compared by nothing, kept the graph from a template:
    every call was recorded again. Compared by type (it carries no values), the second call
    is a hit with a fresh capture's values."""
    net, x = Profiled(), torch.randn(5, 3, dtype=torch.float64)
    _, hit = record(net, x, net)
    assert not hit
    again, hit = record(net, x, net)
    assert hit
    same_values(again, capture(net, x, RULES, keep_values=True, batch_dims=1))


class _Cache:
    """A key/value cache as ``transformers.DynamicCache`` keeps one: ``update`` rebinds its
    tensors to longer ones (no module's attribute, no in-place write); detached, as generation
    under ``no_grad`` fills it."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = torch.cat([self.keys, k], -2), torch.cat([self.values, v], -2)
        self.keys, self.values = keys.detach(), values.detach()
        return keys, values


class _Attention(nn.Module):
    """One head of attention over a cache's keys and the new ones (``(B, L, E)``)."""

    def __init__(self, e: int = 4) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(e, 3 * e), nn.Linear(e, e)

    def forward(self, z: torch.Tensor, cache: _Cache) -> torch.Tensor:
        q, k, v = self.qkv(z).unsqueeze(1).chunk(3, -1)
        k, v = cache.update(k, v)
        return self.out(nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1))


def test_a_cache_f_grows_is_grown_once_per_call_by_its_one_evaluation():
    """``f`` grows a cache it holds at every evaluation (``model(z, cache=c)`` with a live
    ``DynamicCache``). A check that misses (another cache length) is recorded from its own
    evaluation, never by a second one: each call evaluates ``f`` once, the cache grows once,
    and the divergence and its parameter gradients are those of the cache the call found
    (float64 per-sample references). (Attention: a template checked under all of capture's
    modes from the first recording on, ``Template.lean``.)"""
    torch.manual_seed(0)
    model = _Attention().double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    cache = _Cache(*torch.randn(2, 2, 1, 2, 4, dtype=torch.float64).unbind(0))
    evaluations = []

    def f(z):
        evaluations.append(1)
        return model(z, cache)

    for call in range(3):
        found = _Cache(cache.keys.clone(), cache.values.clone())
        fresh = lambda z: model(z, _Cache(found.keys, found.values))  # noqa: E731, B023
        evaluations.clear()
        got = torchdiv.divergence(f, x, method="structured")
        assert len(evaluations) == 1, f"call {call}"
        assert cache.keys.shape[-2] == 2 + 3 * (call + 1)
        with sdpa_kernel([SDPBackend.MATH]):  # (the fused CPU kernel: no batching rule)
            want = reference_divergence(fresh, x)
        assert_close(got, want)
        weights = torch.randn(2, dtype=torch.float64)
        assert_same_parameter_gradients(model, (weights * got).sum(), (weights * want).sum())


EXACT = [("auto", "reverse", "forward", "structured")] * 2 + [("auto", "reverse", "forward")]
LAPLACIAN = ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad")
APIS = ("divergence", "jacobian_diagonal", "jacobian", "laplacian")
CALLS = [
    (api, method, frozen)
    for api, methods in zip(APIS, [*EXACT, LAPLACIAN], strict=True)
    for method in methods
    for frozen in (0, 1)
]


@pytest.mark.parametrize(("api", "method", "frozen"), CALLS)
def test_every_call_evaluates_f_once(api, method, frozen):
    """A counting ``f`` (a list it appends to: state no one puts back), called three times:
    one evaluation per call, the first (recorded, watched) and the later ones (checked,
    planned) alike, with parameters that require grad (``frozen`` 0) or not."""
    net = mlp().requires_grad_(not frozen)
    x = torch.randn(4, 3, dtype=torch.float64)
    evaluations = []

    def f(z):
        evaluations.append(1)
        return net(z)

    counts = []
    for _ in range(3):
        evaluations.clear()
        getattr(torchdiv, api)(f, x, method=method)
        counts.append(len(evaluations))
    assert counts == [1, 1, 1]


def test_a_miss_inside_a_decomposed_call_is_recorded_from_the_same_evaluation():
    """A full check (``cdist``: a replaced op) meets its first difference inside a call it
    checks as its decomposition (``addcmul``, no rule), whose weight ``f`` takes from state
    it changes at every evaluation (``(1,)`` and ``(d,)`` by turns): the recorder takes over
    after that call, making it again (it writes nothing); one evaluation per call, the
    divergence and its parameter gradients those of the weight the call found."""
    torch.manual_seed(0)
    lin, x = nn.Linear(3, 3).double(), torch.randn(4, 3, dtype=torch.float64)
    evaluations = []

    def weight(n: int) -> torch.Tensor:
        return torch.full((1,), 0.5) if n % 2 else torch.linspace(0.1, 0.3, 3)

    def g(z, n):
        h = lin(z)
        distances = torch.cdist(z.unsqueeze(1), z.unsqueeze(1)).reshape(4, 1)
        return torch.addcmul(h, torch.tanh(h), weight(n).double()) + 0.1 * distances

    def f(z):
        evaluations.append(1)
        return g(z, len(evaluations))

    for _ in range(3):
        before = len(evaluations)
        got = torchdiv.divergence(f, x, method="structured")
        assert len(evaluations) == before + 1
        want = reference_divergence(lambda z: g(z, before + 1), x)  # noqa: B023
        assert_close(got, want)
        assert_same_parameter_gradients(lin, got.sum(), want.sum())
