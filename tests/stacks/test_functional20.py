"""torchdiv called from functional-style code, as ports from JAX and ``torch.func`` users write
it: ``f`` built with ``torch.func.functional_call(model, params, (x,))`` over a parameter
dictionary the caller owns (leaves, or views of one flat vector), dictionaries rebuilt at
every call, buffers passed in the dictionary, a Python MLP over a list of ``(W, b)`` layers,
and the state such a script keeps in an object (a ``TrainState``) beside module-level
globals of the same names. References: the diagonal blocks of the cross-batch Jacobian
(``reference_divergence``), each sample alone in float64 by ``torch.func.jacrev``, and the
count of watches for sample mixing (``watches``)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch.func import functional_call, jacrev, vmap

import torchdiv
from tests.conftest import (
    assert_close,
    jacobian_alone,
    laplacian_alone,
    reference_divergence,
)
from tests.core.test_mixing_weight_factorizations import SpectralMLP

f64 = torch.float64


def _per_sample_divergence(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's trace alone: ``jacrev`` of ``f`` at that sample as a batch of one."""
    return vmap(jacrev(lambda z: f(z[None])[0]))(x).diagonal(dim1=1, dim2=2).sum(-1)


class _Reordered(torch.nn.Module):
    """A layer that hands its outputs back in the order a buffer gives (``y[self.order]``):
    per sample only while ``order`` is the identity."""

    def __init__(self, n: int, batch: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(n, n)
        self.register_buffer("order", torch.arange(batch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))[self.order]


@dataclasses.dataclass
class TrainState:
    """What a JAX port trains with (flax's ``TrainState``, mutable here): its buffers and
    parameters."""

    buffers: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    params: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


# a script's module-level state, as JAX ports keep it: the buffers it started from, and the
# object it trains with (``state.buffers``, an attribute of the same name; see below)
buffers = {"order": torch.arange(4)}


def test_an_attribute_named_as_a_global_is_not_the_global() -> None:
    """``f`` reads ``state.buffers``; the script also holds a global ``buffers`` (the dict it
    started from). The watch's key took every name in ``f``'s code (``co_names``: the
    attributes it reads too) for a global it reads, so it held the global ``buffers`` and the
    index tensor in it, the one the first call read: a pass kept for that index served the
    calls after ``state.buffers`` was replaced by a dictionary whose ``order`` moves samples,
    silently (the traces of the unmoved layer, -0.20 to -0.27, where each output sample's
    derivative in its own input is 0)."""
    torch.manual_seed(0)
    model = _Reordered(3, 4).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = TrainState(buffers)
    f = lambda z: functional_call(model, {**params, **state.buffers}, (z,))  # noqa: E731
    x = torch.randn(4, 3, dtype=f64)
    assert_close(torchdiv.divergence(f, x), reference_divergence(f, x))
    state.buffers = {"order": torch.tensor([1, 2, 3, 0])}  # (the global keeps the first)
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.divergence(f, x)


def _deep_mlp(layers: int, width: int = 8, d: int = 4) -> torch.nn.Module:
    """An MLP of ``layers`` hidden layers: ``2 * layers + 4`` parameter tensors."""
    widths = [d, *[width] * (layers + 1)]
    stack: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(widths):
        stack += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*stack, torch.nn.Linear(width, d)).double()


def _mlp(layers: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """A JAX-style MLP: a function over a list of ``(W, b)`` layers, no module."""
    *hidden, (w, b) = layers
    for wh, bh in hidden:
        x = torch.tanh(x @ wh.T + bh)
    return x @ w.T + b


@pytest.mark.parametrize("style", ["dictionary", "views of a flat vector", "list of layers"])
def test_many_parameters_are_watched_once(style: str, watches: list[int]) -> None:
    """Parameters held outside a module, as many as a 32-layer MLP has (68 tensors, 34 ``(W, b)``
    layers): a dictionary for ``functional_call``, one rebuilt at every call from views of a
    flat vector (L-BFGS over one vector, a hypernetwork's output), a JAX-style list of layers.
    The key told no container of more than 32 items, so such an ``f`` was watched at every call
    (a 16-layer MLP's 36 tensors: 3.2 of 4.6 ms a divergence at 16 samples of 4 elements, 3.3x
    a module's call); its values at each call (parameters changed in place between calls)
    against each sample's ``jacrev``."""
    torch.manual_seed(0)
    model = _deep_mlp(32)
    named = {k: v.detach().clone() for k, v in model.named_parameters()}
    flat = torch.cat([v.flatten() for v in named.values()])

    def views() -> dict[str, torch.Tensor]:
        sizes = [v.numel() for v in named.values()]
        pieces = flat.split(sizes)
        return {k: p.view(v.shape) for (k, v), p in zip(named.items(), pieces, strict=True)}

    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    layers = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in linears]
    f = {
        "dictionary": lambda z: functional_call(model, named, (z,)),
        "views of a flat vector": lambda z: functional_call(model, views(), (z,)),
        "list of layers": lambda z: _mlp(layers, z),
    }[style]
    x = torch.randn(16, 4, dtype=f64)
    for _ in range(3):
        assert_close(torchdiv.divergence(f, x), _per_sample_divergence(f, x))
        with torch.no_grad():
            for t in [*named.values(), flat, *(t for layer in layers for t in layer)]:
                t.mul_(1.01)
    assert len(watches) == 1


def test_a_flat_vector_unflattened_by_its_shapes_is_watched_once(watches: list[int]) -> None:
    """A flat parameter vector cut into a dictionary at every call by a helper over the
    ``(name, shape)`` pairs (L-BFGS over one vector, ``torch.nn.utils.vector_to_parameters``
    written for ``functional_call``): the key told no container nested three levels below
    ``f`` (the helper, its list, a pair: a shape there), so such an ``f`` was watched at every
    call. Jacobians (``"auto"`` watches each new ``f``) at each call, the vector changed in
    place between calls, against each sample's ``jacrev``."""
    torch.manual_seed(0)
    model = _deep_mlp(2)
    shapes = [(name, p.shape) for name, p in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def unflatten(vector: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces = vector.split([shape.numel() for _, shape in shapes])
        return {name: p.view(shape) for (name, shape), p in zip(shapes, pieces, strict=True)}

    f = lambda z: functional_call(model, unflatten(flat), (z,))  # noqa: E731
    x = torch.randn(16, 4, dtype=f64)
    for _ in range(3):
        want = vmap(jacrev(lambda z: f(z[None])[0]))(x)
        assert_close(torchdiv.jacobian(f, x), want)
        with torch.no_grad():
            flat.mul_(1.01)
    assert len(watches) == 1


_PROBES = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(5), dtype=f64)

# each operator and method, with its reference on each sample alone (``f``: ``(B, 3) -> (B, 3)``
# for the first-order operators, its first output for the Laplacians)
_CALLS = {
    "divergence structured": (
        lambda f, x: torchdiv.divergence(f, x, method="structured"),
        lambda f, x: jacobian_alone(f, x).diagonal(dim1=1, dim2=2).sum(-1),
    ),
    "divergence forward": (
        lambda f, x: torchdiv.divergence(f, x, method="forward"),
        lambda f, x: jacobian_alone(f, x).diagonal(dim1=1, dim2=2).sum(-1),
    ),
    "divergence hutchinson": (
        lambda f, x: torchdiv.divergence(f, x, method="hutchinson", probes=_PROBES),
        lambda f, x: torch.einsum("rbi,bij,rbj->b", _PROBES, jacobian_alone(f, x), _PROBES) / 2,
    ),
    "jacobian_diagonal reverse": (
        lambda f, x: torchdiv.jacobian_diagonal(f, x, method="reverse"),
        lambda f, x: jacobian_alone(f, x).diagonal(dim1=1, dim2=2),
    ),
    "jacobian auto": (lambda f, x: torchdiv.jacobian(f, x), jacobian_alone),
    "laplacian taylor": (
        lambda f, x: torchdiv.laplacian(lambda z: f(z)[:, 0], x, method="taylor"),
        lambda f, x: laplacian_alone(lambda z: f(z)[:, 0], x),
    ),
    "laplacian forward-over-reverse": (
        lambda f, x: torchdiv.laplacian(lambda z: f(z)[:, 0], x, method="forward-over-reverse"),
        lambda f, x: laplacian_alone(lambda z: f(z)[:, 0], x),
    ),
    "value_grad_laplacian auto": (
        lambda f, x: torchdiv.value_grad_laplacian(lambda z: f(z)[:, 0], x).laplacian,
        lambda f, x: laplacian_alone(lambda z: f(z)[:, 0], x),
    ),
}
_STYLES = ["dictionary", "views of a flat vector", "list of layers"]


@pytest.mark.parametrize("name", sorted(_CALLS))
def test_parameter_gradients_of_functional_styles(name: str) -> None:
    """Each operator's values and gradients with respect to the caller's own tensors (the
    leaves of a parameter dictionary, the flat vector the views are cut from at every call,
    a JAX-style list of ``(W, b)`` layers; one style per operator, in turn) against each
    sample alone in float64, grad of grad; found right (rev-functional20), kept as a guard."""
    torch.manual_seed(0)
    model = _deep_mlp(1, width=6, d=3)
    style = _STYLES[sorted(_CALLS).index(name) % len(_STYLES)]
    named = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    flat = torch.cat([v.detach().flatten() for v in named.values()]).requires_grad_(True)
    layers = [(named[f"{i}.weight"], named[f"{i}.bias"]) for i in (0, 2, 4)]

    def views() -> dict[str, torch.Tensor]:
        pieces = flat.split([v.numel() for v in named.values()])
        return {k: p.view(v.shape) for (k, v), p in zip(named.items(), pieces, strict=True)}

    f, owned = {
        "dictionary": (lambda z: functional_call(model, named, (z,)), list(named.values())),
        "views of a flat vector": (lambda z: functional_call(model, views(), (z,)), [flat]),
        "list of layers": (lambda z: _mlp(layers, z), list(named.values())),
    }[style]
    call, reference = _CALLS[name]
    x = torch.randn(5, 3, dtype=f64)
    got, want = call(f, x), reference(f, x)
    assert_close(got, want.detach())
    weights = torch.randn_like(want)
    ours = torch.autograd.grad((got * weights).sum(), owned, materialize_grads=True)
    theirs = torch.autograd.grad((want * weights).sum(), owned, materialize_grads=True)
    for a, b in zip(ours, theirs, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("named", ["by f", "by a function f calls"])
def test_buffers_of_the_module_kept_in_a_train_state(named: str) -> None:
    """``torch.func``'s idiom, ``buffers = dict(model.named_buffers())`` passed to
    ``functional_call`` from a ``TrainState`` (named by ``f``, or by the step function ``f``
    calls): at the first call the index ``f`` reads is the module's own buffer, which the key
    holds (a module's buffers are in it), so the pass was kept for it; ``state.buffers``
    replaced by a dictionary whose ``order`` moves samples was unseen by the key (``state``:
    by identity) and served by that pass, silently (the traces of the unmoved layer where
    each sample's own is 0). A module's buffer no longer vouches for an index where ``f``
    names a plain object."""
    torch.manual_seed(0)
    model = _Reordered(3, 4).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = TrainState(dict(model.named_buffers()))

    def step(z: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (params, state.buffers), (z,))

    f = step if named == "by f" else lambda z: step(z)
    x = torch.randn(4, 3, dtype=f64)
    assert_close(torchdiv.divergence(f, x), reference_divergence(f, x))
    state.buffers = {"order": torch.tensor([1, 2, 3, 0])}
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.divergence(f, x)


def test_parameters_of_the_module_kept_in_a_train_state() -> None:
    """The same for a weight a factorization reads (``try: W / matrix_norm(W, 2) except:
    <centre the batch>``): ``dict(model.named_parameters())`` in a ``TrainState``, so the
    first calls' weight is the module's own parameter, which the pass was kept for (while
    the module holds it there, unchanged); ``state.params`` replaced by a dictionary whose
    weight is non-finite (LAPACK raises: the fallback mixes samples) was served by that
    pass, 0 for every sample. A module's parameter no longer vouches for a weight where
    ``f`` names a plain object."""
    torch.manual_seed(1)
    net = SpectralMLP(3, 8, fallback=True).double()
    state = TrainState(params=dict(net.named_parameters()))
    f = lambda z: functional_call(net, state.params, (z,))  # noqa: E731
    x = torch.randn(5, 3, dtype=f64)
    for _ in range(2):
        assert_close(torchdiv.divergence(f, x).detach(), _per_sample_divergence(f, x))
    state.params = {**state.params, "l1.weight": torch.full_like(net.l1.weight, float("nan"))}
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.divergence(f, x)


@dataclasses.dataclass
class _Config:
    scale: float = 0.5


def test_a_config_beside_a_factorized_weight_is_watched_once(watches: list[int]) -> None:
    """A plain object ``f`` names that holds none of the modules' tensors (a configuration)
    leaves them vouching for themselves: a spectrally normalised net's weights keep the
    pass, ``f`` watched at its first call only (values against each sample's ``jacrev``)."""
    torch.manual_seed(1)
    net = SpectralMLP(3, 8).double()
    config = _Config()
    f = lambda z: net(z) * config.scale  # noqa: E731
    for _ in range(3):
        x = torch.randn(5, 3, dtype=f64)
        assert_close(torchdiv.divergence(f, x).detach(), _per_sample_divergence(f, x))
    assert len(watches) == 1
