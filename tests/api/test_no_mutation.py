"""Nothing the caller passed changes: x, its requires_grad, parameters, .grad, training mode."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from conftest import assert_close, tanh_mlp

import torchdiv

CALLS = {
    "divergence": lambda net, x, m: torchdiv.divergence(net, x, method=m),
    "jacobian": lambda net, x, m: torchdiv.jacobian(net, x, method=m, chunk_size=2),
    "jacobian_diagonal": lambda net, x, m: torchdiv.jacobian_diagonal(net, x, method=m),
    "check_batch_independence": lambda net, x, m: torchdiv.check_batch_independence(net, x),
}


def _snapshot(net: torch.nn.Module) -> dict:
    return {
        "params": [p.detach().clone() for p in net.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in net.parameters()],
        "requires_grad": [p.requires_grad for p in net.parameters()],
        "training": [m.training for m in net.modules()],
    }


def _assert_same(before: dict, after: dict) -> None:
    for key in ("requires_grad", "training"):
        assert before[key] == after[key], key
    for a, b in zip(before["params"], after["params"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(before["grads"], after["grads"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


SCALAR = {  # one output per sample
    "laplacian": lambda net, x, m: torchdiv.laplacian(
        net, x, method=m, chunk_size=2, **({"num_probes": 2} if m == "hutchinson" else {})
    )
}
STOCHASTIC = {
    "divergence": lambda net, x, m: torchdiv.divergence(net, x, method=m, num_probes=6),
    "estimate_divergence": lambda net, x, m: torchdiv.estimate_divergence(
        net, x, method=m, num_probes=6, rtol=0.5, max_probes=96
    ),
    "jacobian_diagonal": lambda net, x, m: torchdiv.jacobian_diagonal(
        net, x, method="hutchinson", num_probes=2
    ),
}
CASES = [
    *[(CALLS, c, m) for c in CALLS for m in ("auto", "forward", "reverse")],
    *[(CALLS, c, "structured") for c in ("divergence", "jacobian_diagonal")],
    *[
        (SCALAR, c, m)
        for c in SCALAR
        for m in ("auto", "taylor", "forward-over-reverse", "hessian")
    ],
    (SCALAR, "laplacian", "hutchinson"),
    *[(STOCHASTIC, c, m) for c in STOCHASTIC for m in ("hutchinson", "hutch++", "xtrace")],
]


@pytest.mark.parametrize(("calls", "call", "method"), CASES, ids=[f"{c}-{m}" for _, c, m in CASES])
@pytest.mark.parametrize("x_requires_grad", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_nothing_is_mutated(calls, call, method, x_requires_grad, training):
    net = tanh_mlp(3, 5, 1 if calls is SCALAR else 3).train(training)
    net[0].weight.grad = torch.ones_like(net[0].weight)  # an existing .grad must survive
    net[2].requires_grad_(False)  # a frozen layer must stay frozen
    x = torch.randn(4, 3, dtype=torch.float64).requires_grad_(x_requires_grad)
    x_before = x.detach().clone()
    before = _snapshot(net)
    calls[call](net, x, method)
    assert torch.equal(x.detach(), x_before)
    assert x.requires_grad == x_requires_grad and x.grad is None
    _assert_same(before, _snapshot(net))


def test_graph_form_mutates_nothing():
    net = tanh_mlp(3, 5, 3)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = net(x)
    before = _snapshot(net)
    torchdiv.graph_divergence(y, x, create_graph=True)
    torchdiv.graph_jacobian(y, x)
    assert x.grad is None and x.requires_grad
    _assert_same(before, _snapshot(net))


def _doubled(x: torch.Tensor) -> torch.Tensor:
    x.mul_(2)
    return x.sin()


def _first_zeroed(x: torch.Tensor) -> torch.Tensor:
    x[:, 0] = 0  # through a view of x
    return x.sin()


def _shifted(x: torch.Tensor) -> torch.Tensor:
    x.add_(1)
    return x * x


IN_PLACE = {"mul_": _doubled, "fill_": _first_zeroed, "add_": _shifted}
WRITING = [
    *[(c, m) for c in ("divergence", "jacobian", "jacobian_diagonal") for m in ("auto", "forward")],
    *[(c, m) for c in ("divergence", "jacobian", "jacobian_diagonal") for m in ("reverse",)],
    ("divergence", "structured"),
    ("jacobian_diagonal", "structured"),
    ("divergence", "hutchinson"),
    *[("laplacian", m) for m in ("auto", "taylor", "forward-over-reverse", "hessian")],
    ("laplacian", "grad-of-grad"),
    ("laplacian", "hutchinson"),
    # a Laplacian of a Laplacian: the inner call's refusal was reported as the outer's f
    # raising it ("biharmonic: f(x) raised ValueError: biharmonic: f writes ...")
    *[("biharmonic", m) for m in ("auto", "taylor", "forward-over-reverse")],
    ("value_grad_laplacian", "auto"),
]


@pytest.mark.parametrize(("call", "method"), WRITING, ids=[f"{c}-{m}" for c, m in WRITING])
@pytest.mark.parametrize("op", IN_PLACE)
@pytest.mark.parametrize("shape", [(4, 3), (64, 16)])  # tiny, and planned by "auto"
def test_f_writing_into_its_input_is_refused_and_x_kept(call, method, op, shape) -> None:
    """``f`` that writes into its input: ``method="forward"`` changed the caller's ``x`` and
    returned the derivatives of a mix of evaluations; the recording methods changed it and
    refused the op; the backward-pass ones raised autograd's "a leaf Variable ... in-place"
    error. Every method now raises a ``ValueError`` naming the op and the fix, and leaves
    the caller's ``x`` as it was: values, version counter, ``requires_grad``, no graph."""
    f = IN_PLACE[op]
    g = (lambda z: f(z).sum(-1)) if "laplacian" in call or call == "biharmonic" else f
    probes = {"num_probes": 2} if method == "hutchinson" else {}
    for requires_grad in (False, True):
        x = torch.randn(*shape, dtype=torch.float64).requires_grad_(requires_grad)
        before, version = x.detach().clone(), x._version
        match = rf"^{call}: f writes into its input x in place \(aten\.{op}.*x = x\.clone\(\)"
        with pytest.raises(ValueError, match=match):
            getattr(torchdiv, call)(g, x, method=method, **probes)
        assert torch.equal(x.detach(), before)
        assert x._version == version
        assert x.requires_grad == requires_grad and x.grad_fn is None and x.grad is None


def test_f_writing_into_a_copy_or_a_parameter_is_not_refused() -> None:
    """A copy of ``x`` written in place is ``f``'s own; a parameter written in place (not
    ``x``) keeps autograd's error."""
    x = torch.randn(4, 3, dtype=torch.float64)

    def copied(z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        z[:, 0] = 0
        return z.sin()

    expected = torch.cat([torch.zeros(4, 1), torch.cos(x[:, 1:])], 1).sum(-1)
    for method in ("auto", "forward", "reverse"):
        torch.testing.assert_close(torchdiv.divergence(copied, x, method=method), expected)
    for method in ("auto", "reverse"):
        weight = torch.ones(3, dtype=torch.float64, requires_grad=True)
        with pytest.raises(RuntimeError, match=r"leaf Variable|captured Tensor") as error:
            torchdiv.divergence(lambda z, w=weight: w.mul_(2) * z, x, method=method)
        assert "writes into its input" not in str(error.value)


class _KeepsActivation(torch.nn.Module):
    """The identity, keeping its last input as a plain attribute (a model's activation cache)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.last = z
        return z


def _legacy_wrapped(wrap: str, d_out: int) -> torch.nn.Sequential:
    """``tanh_mlp`` with its first layer under the legacy ``nn.utils`` ``wrap``, whose forward
    pre-hook sets ``weight`` as a plain attribute, and its activation kept."""
    net = tanh_mlp(3, 5, d_out)
    with warnings.catch_warnings():  # (deprecated for torch.nn.utils.parametrizations)
        warnings.simplefilter("ignore")
        getattr(torch.nn.utils, wrap)(net[0])
    net.insert(2, _KeepsActivation())
    return net


@pytest.mark.parametrize(("calls", "call", "method"), CASES, ids=[f"{c}-{m}" for _, c, m in CASES])
@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm"])
def test_tensors_f_sets_on_its_modules_are_left_plain(calls, call, method, wrap) -> None:
    """The legacy ``weight_norm``/``spectral_norm`` set ``module.weight`` in a forward pre-hook
    as a plain attribute, as a model that keeps its activation does: under the engines'
    ``torch.func`` transforms (auto at this size, forward, reverse, the estimators, the
    Laplacian's nested methods) that was left a dead functorch wrapper, and
    ``torch.save(model)`` failed ("Cannot access storage of TensorWrapper"). Now each is the
    tensor a plain forward leaves: plain, its value, its graph to the parameters."""
    net = _legacy_wrapped(wrap, 1 if calls is SCALAR else 3).eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    before = net[0].weight
    calls[call](net, x, method)
    if call == "check_batch_independence":  # (it leaves f as it found it, zoo33: no forward)
        assert net[0].weight is before and not hasattr(net[2], "last")
        torch.save(net, io.BytesIO())
        return
    weight, last = net[0].weight, net[2].last
    for kept in (weight, last):
        assert not torch._C._functorch.is_functorch_wrapped_tensor(kept)
    torch.save(net, io.BytesIO())
    with torch.no_grad():
        assert_close(last, torch.tanh(net[0](x)))  # (the pre-hook sets weight again)
    assert weight.grad_fn is not None
    (weight * weight).sum().backward()  # reaches the parameters the pre-hook computed it from
    assert all(p.grad is not None for n, p in net[0].named_parameters() if n != "bias")


class _KeepsInContainers(torch.nn.Module):
    """The identity, keeping its last input in a registered buffer it assigns and a list it
    appends to (a model's activation cache, a statistic kept so)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("last", torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.last = z.detach().abs().mean()
        self.seen.append(z)
        return z


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_tensors_f_keeps_in_buffers_and_lists_are_left_plain(method) -> None:
    """Only a module's direct attributes were put back: a buffer ``f`` assigns
    (``self.last = ...`` sets ``_buffers``) and a list it appends to kept the engines' dead
    wrappers, and ``torch.save(model)`` failed ("Cannot access storage of TensorWrapper").
    Each is now the tensor a plain forward leaves."""
    net = torch.nn.Sequential(tanh_mlp(3, 5, 3), _KeepsInContainers()).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    torchdiv.divergence(net, x, method=method)
    keeper = net[1]
    kept = [keeper.last, *keeper.seen]
    assert not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in kept)
    torch.save(net, io.BytesIO())
    with torch.no_grad():
        assert_close(keeper.seen[-1], net[0](x))
        assert_close(keeper.last, net[0](x).abs().mean())


def test_a_long_list_f_appends_to_is_searched_at_its_end(monkeypatch) -> None:
    """A module holding a long list (a memory of 10,000 tensors) had every element looked
    at after each call under the transforms: +22 ms a call at 100,000. Now only its end,
    back to the first element that is no dead wrapper: this call's appends, left plain, and
    the list is the module's own."""
    from torchdiv._exact import attributes

    net = torch.nn.Sequential(tanh_mlp(3, 5, 3), _KeepsInContainers()).double()
    keeper = net[1]
    memory = keeper.seen
    memory += [torch.zeros(()) for _ in range(10_000)]
    looked = []

    def counted(t: torch.Tensor) -> int:
        looked.append(t)
        return torch._C._functorch.maybe_get_level(t)

    monkeypatch.setattr(attributes, "maybe_get_level", counted)
    torchdiv.divergence(net, torch.randn(4, 3, dtype=torch.float64), method="forward")
    assert keeper.seen is memory and len(memory) == 10_001
    assert not torch._C._functorch.is_functorch_wrapped_tensor(memory[-1])
    assert len(looked) < 100


_GLOBAL_NET = _legacy_wrapped("weight_norm", 3)


@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_tensors_set_on_modules_a_function_names_are_left_plain(method) -> None:
    """The modules of a function ``f`` (its closure's, the globals it names) are walked too."""
    local = _legacy_wrapped("spectral_norm", 3)
    x = torch.randn(4, 3, dtype=torch.float64)
    torchdiv.divergence(lambda z: local(_GLOBAL_NET(z)), x, method=method)
    for net in (local, _GLOBAL_NET):
        assert not torch._C._functorch.is_functorch_wrapped_tensor(net[0].weight)
        assert not torch._C._functorch.is_functorch_wrapped_tensor(net[2].last)
        torch.save(net, io.BytesIO())


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_what_a_forward_hook_stored_gives_a_plain_tensor_through_an_op(method) -> None:
    """What docs/guide/limitations.md tells a forward hook's user: the stored activation is
    the engine's tensor, but an op on it after the call is a plain tensor, with its graph."""
    net = tanh_mlp(3, 5, 3)
    store = {}
    net[1].register_forward_hook(lambda module, args, out: store.update(act=out))
    x = torch.randn(4, 3, dtype=torch.float64)
    torchdiv.divergence(net, x, method=method)
    act = store["act"].clone()
    assert not torch._C._functorch.is_functorch_wrapped_tensor(act)
    torch.save(act, io.BytesIO())
    with torch.no_grad():
        assert_close(act, torch.tanh(net[0](x)))
    act.sum().backward()
    assert net[0].weight.grad is not None


class _CachesEdges(torch.nn.Module):
    """EDM's and E-NF's ``EGNN_dynamics`` keep the edge indices of a fully connected batch of
    graphs, made on the first forward at each size, in ``self._edges_dict[n_nodes][batch_size]``
    (a list ``[rows, cols]``); here also as a tuple in a dictionary, and in a list."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()
        self._edges_dict: dict[int, dict[int, list[torch.Tensor]]] = {}
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, n = z.shape[0], z.shape[1] // 3
        if b not in self._edges_dict.setdefault(n, {}):
            rows = [i + k * n for k in range(b) for i in range(n) for j in range(n)]
            cols = [j + k * n for k in range(b) for i in range(n) for j in range(n)]
            self._edges_dict[n][b] = [torch.LongTensor(rows), torch.LongTensor(cols)]
            self.pairs[b] = (torch.tensor(rows), torch.tensor(cols))
        rows, cols = self._edges_dict[n][b]
        h = z.reshape(b * n, 3)
        self.last = [(rows, h)]
        messages = torch.tanh(self.lin(h[rows] - h[cols]))
        return (h + torch.zeros_like(h).index_add(0, rows, messages)).reshape(z.shape)


@pytest.mark.parametrize("method", ["auto", "forward", "reverse", "hutchinson"])
def test_tensors_f_caches_in_dictionaries_and_tuples_are_left_plain(method) -> None:
    """The edge indices EDM's dynamics caches in a dictionary of dictionaries of lists on
    its first forward, made inside the engines' transforms, were left dead wrappers:
    ``copy.deepcopy(model)`` (an EMA copy) and ``torch.save(model)`` failed ("Cannot access
    storage of TensorWrapper") after any call but the structured engine's. Now plain."""
    net = _CachesEdges()
    x = torch.randn(4, 9, dtype=torch.float64)
    torchdiv.divergence(net, x, method=method, num_probes=2 if method == "hutchinson" else None)
    rows, cols = net._edges_dict[3][4]
    kept = [rows, cols, *net.pairs[4], *net.last[0]]
    assert not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in kept)
    copy.deepcopy(net)
    torch.save(net, io.BytesIO())
    with torch.no_grad():
        assert_close(net.last[0][1], x.reshape(12, 3))


def test_tuples_of_settings_in_a_module_s_dictionaries_are_not_searched(monkeypatch) -> None:
    """The search for dead wrappers in a module's dictionaries called itself on each tuple
    there: a dictionary of 20 tuples of sizes cost 28 us per module and call (0.7 us before
    dictionaries were searched), 100 such layers +3 ms a reverse divergence of 4 ms. A tuple
    holding no tensor and no container is passed over; one with a tensor is still made
    plain (the values f cached, checked by the test above)."""
    from torchdiv._exact import attributes

    searched = []
    search = attributes._unwrap_held

    def counted(held, depth):
        searched.append(type(held))
        return search(held, depth)

    monkeypatch.setattr(attributes, "_unwrap_held", counted)
    layers = torch.nn.Sequential(*(torch.nn.Linear(3, 3) for _ in range(4)))
    for layer in layers:
        layer.meta = {f"k{j}": (j, j + 1) for j in range(20)}
        layer.strides = [(1, 1), (2, 2)]
    torchdiv.divergence(layers, torch.randn(2, 3), method="reverse")
    assert searched == [dict, list] * 4
