"""Review of three merges of session 20: the structured replay's guards (rev-merges20a's
recordings at other batch sizes with rev-merges20c's served rows ``N..2N + 1``), the Taylor
replay recorded under ``watched()`` and ``replay._marked(batch_free=True)`` (f3f2583), and
``mixing._part``'s long containers of tensors (rev-functional20) with tuple subclasses
counted by ``size()`` (rev-merges20d). Compiled with ``backend="aot_eager"``, values and
parameter gradients against eager float64 (itself against per-sample Jacobians)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import assert_close, reference_divergence, tanh_mlp
from test_compiled_losses import (
    Counting,
    _fresh_dynamo,  # noqa: F401  (autouse: Dynamo reset per test)
)

import torchdiv
from torchdiv import BatchInteractionError

pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")
f64 = torch.float64


class Scaled(torch.nn.Module):
    """A pointwise field scaled by a Python integer made from the batch size (``rule``)."""

    def __init__(self, rule) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w, self.rule = torch.nn.Parameter(torch.randn(3, dtype=f64)), rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.w) * self.rule(x.shape[0])


class PerStep(Scaled):
    """Tokens ``(B, T, d)`` scaled by ``4 / T``, ``T`` the second of two batch dimensions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.w) * (4.0 / x.shape[1])


def _divergences(f: Scaled, shapes: list[tuple[int, ...]], batch_dims: int = 1) -> Counting:
    """The compiled structured divergence of ``f`` (``dynamic=True``) at batches of
    ``shapes``, each equal to eager's (values and parameter gradients); the backend, which
    counted the graphs."""
    backend = Counting()

    def loss(x: torch.Tensor) -> torch.Tensor:  # (literals: a closure's batch_dims is not replayed)
        if batch_dims == 1:
            return torchdiv.divergence(f, x, method="structured").square().sum()
        return torchdiv.divergence(f, x, method="structured", batch_dims=2).square().sum()

    compiled = torch.compile(loss, backend=backend, dynamic=True)
    for shape in shapes:
        x = torch.randn(shape, dtype=f64)
        got, want = compiled(x), loss(x)
        assert_close(got, want)
        assert_close(torch.autograd.grad(got, f.w)[0], torch.autograd.grad(want, f.w)[0])
    return backend


def test_a_number_differing_only_outside_the_served_rows_keeps_one_graph():
    """``min(N, 3)`` recorded at 4 is 3 at every size served (4 to 9), but the recording at 2
    (left from rev-merges20a, before rev-merges20c served only ``N..2N + 1``) saw 2: the
    replay then guarded ``x``'s whole shape, one graph per batch size under ``dynamic=True``
    (Dynamo's recompile limit then ran the call eagerly)."""
    backend = _divergences(Scaled(lambda n: min(n, 3)), [(4, 3), (5, 3), (6, 3)])
    assert backend.compiled == 1


def test_a_number_of_the_second_batch_dimension_keeps_one_graph():
    """``4 / T`` with ``batch_dims=2``: ``T`` is guarded with the event (rev-merges20c), but the
    recordings along it (rev-merges20a) saw other numbers, so the whole shape was guarded:
    one graph per size of the first batch dimension."""
    backend = _divergences(PerStep(lambda n: 1), [(4, 5, 3), (5, 5, 3), (6, 5, 3)], 2)
    assert backend.compiled == 1


def test_a_number_departing_inside_the_served_rows_is_right_with_the_batch_static():
    """``N // 2 - N // 3`` is 1 at the recorded 4, 5 and 9 but 2 at 8: under ``dynamic=True``
    the replay served 8 with 1 (documented in limitations.md: a sampled check cannot see
    it); the way out the documentation names, ``mark_static(x, 0)``, is right."""
    f = Scaled(lambda n: n // 2 - n // 3)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return torchdiv.divergence(f, x, method="structured")

    compiled = torch.compile(loss, backend="aot_eager", dynamic=True)
    for n in (4, 8):
        x = torch.randn(n, 3, dtype=f64)
        torch._dynamo.mark_static(x, 0)
        assert_close(compiled(x), loss(x))


class Heat(torch.nn.Module):
    """``u(x, t)``: a tanh MLP with a scalar per sample (a PINN)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = tanh_mlp(2, 8, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


@pytest.mark.parametrize(  # (1.3 s each: detection off in the daily sample)
    "allowed",
    [False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["watched", "allow_batch_interaction"],
)
def test_the_taylor_replay_of_a_non_mixing_f_and_a_batch_marked_dynamic(allowed):
    """f3f2583 records under ``watched()`` and refuses dimensions marked dynamic but the
    first: a PINN that does not mix samples, inside ``allow_batch_interaction()`` or not, with
    ``mark_dynamic(x, 0)`` and three batch sizes, is still one replayed graph, right."""
    f, backend = Heat(), Counting()

    def loss(x: torch.Tensor) -> torch.Tensor:
        return torchdiv.laplacian(f, x, method="taylor").square().mean()

    compiled = torch.compile(loss, backend=backend)
    params = list(f.parameters())
    options = {"allow_unused": True, "materialize_grads": True}
    for n in (6, 7, 9):
        x = torch.randn(n, 2, dtype=f64)
        torch._dynamo.mark_dynamic(x, 0)
        with torchdiv.allow_batch_interaction() if allowed else torch.enable_grad():
            got, want = compiled(x), loss(x)
        assert_close(got, want)
        for g, e in zip(
            torch.autograd.grad(got, params, **options),
            torch.autograd.grad(want, params, **options),
            strict=True,
        ):
            assert_close(g, e)
    assert backend.compiled == 1 and backend.runs == 3


def _mixing_on(z: torch.Tensor, switch: object) -> torch.Tensor:
    """``z`` centred over the batch (mixing samples) where ``switch`` says."""
    return z - z.mean(0) if switch else z


@pytest.mark.parametrize("held", ["tuple", "list"])
def test_a_long_list_of_layers_with_one_bias_replaced_is_watched_again(
    watches: list[int], held: str
) -> None:
    """A JAX-style list of 40 ``(W, b)`` layers (longer than ``TUPLE_ITEMS``: told by its
    tensors, rev-functional20): one ``b`` replaced by a batch-shaped one that turns mixing
    on is watched again, and raises."""
    torch.manual_seed(0)
    make = tuple if held == "tuple" else list
    layers = [make((torch.randn(4, 4) / 2, torch.randn(4))) for _ in range(40)]
    layers = [make(t.to(f64) for t in layer) for layer in layers]

    def f(z: torch.Tensor) -> torch.Tensor:
        for w, b in layers:
            z = _mixing_on(torch.tanh(z @ w + b), b.dim() == 2)
        return z

    x = torch.randn(8, 4, dtype=f64)
    for _ in range(2):
        assert_close(torchdiv.divergence(f, x), reference_divergence(f, x))
    assert len(watches) == 1
    layers[17] = make((layers[17][0], torch.randn(1, 4, dtype=f64)))
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(f, x)


@pytest.mark.parametrize("first", [True, 1])
def test_true_and_1_after_a_long_list_of_tensors(first: object) -> None:
    """A flag at the end of a list of 40 tensors (not all tensors: not told, watched at every
    call): ``True`` (mixing) and ``1`` (not: ``is True``) swapped between calls."""
    torch.manual_seed(0)
    items: list[object] = [torch.randn(4, dtype=f64) for _ in range(40)] + [first]
    scale = items[0]

    def f(z: torch.Tensor) -> torch.Tensor:
        return _mixing_on(torch.tanh(z * scale), items[-1] is True)

    x = torch.randn(8, 4, dtype=f64)
    for flag in (first, first, 1 if first is True else True):
        items[-1] = flag
        if flag is True:
            with pytest.raises(BatchInteractionError):
                torchdiv.divergence(f, x)
        else:
            assert_close(torchdiv.divergence(f, x), reference_divergence(f, x))


def test_a_dictionary_of_tensors_with_integer_keys(watches: list[int]) -> None:
    """40 tensors keyed by integers (not told: watched at every call), one replaced by a
    batch-shaped one that turns mixing on between calls: raises."""
    torch.manual_seed(0)
    params = {i: torch.randn(4, dtype=f64) for i in range(40)}

    def f(z: torch.Tensor) -> torch.Tensor:
        for i in range(40):
            z = torch.tanh(z * params[i] / 4)
        return _mixing_on(z, params[39].dim() == 2)

    x = torch.randn(8, 4, dtype=f64)
    for _ in range(2):
        assert_close(torchdiv.divergence(f, x), reference_divergence(f, x))
    params[39] = torch.randn(1, 4, dtype=f64)
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(f, x)


def test_long_irreps_in_a_closure_and_a_module_s_tuple() -> None:
    """e3nn irreps of 40 entries (a tuple subclass whose items' ``__len__`` raises, longer
    than ``TUPLE_ITEMS``) held by a function and a module's tuple: no crash, right values."""
    o3 = pytest.importorskip("e3nn.o3")
    torch.manual_seed(0)
    irreps = o3.Irreps("+".join(f"1x{degree % 3}e" for degree in range(40)))
    w = torch.randn(4, dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z * w) * (irreps.dim / 100)

    net = Scaled(lambda n: 1)
    net.held = (irreps, irreps)
    x = torch.randn(8, 3, dtype=f64)
    for _ in range(2):
        z = torch.randn(8, 4, dtype=f64)
        assert_close(torchdiv.divergence(f, z), reference_divergence(f, z))
        assert_close(torchdiv.divergence(net, x), reference_divergence(net, x))
