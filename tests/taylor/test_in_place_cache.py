"""In-place writes and the recordings kept across calls (``torchdiv._taylor.cache``).

A write of values computed from ``x`` into ``f``'s own tensor (``nn.SiLU(inplace=True)``,
``out += identity``, ``h.clamp_(...)``) is recorded as its out-of-place op; the outputs
of the calls made before it that live in the written memory are no longer what those calls
computed (``Graph.overwritten``: computed again where needed). Such a recording is kept as a
template and checked at the next call, not recorded again (``"structured"`` recorded ``f``
at every call: 1.8x the step of the same net out of place). The check must see every change
that would make the kept structure wrong: a swapped activation, parameters of other shapes,
train/eval, an attribute changed.

References: float64 per-sample grad-of-grad loops of plain autograd on the same ``f`` (one
sample at a time; PyTorch's in-place ops differentiate right there), values and the
parameter gradients of ``(op * w).sum()``, every call made three times.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdiv
from tests.conftest import parameter_gradients
from torchdiv._taylor import cache
from torchdiv._taylor.jet import UnsupportedOp

D = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}  # float64 through a few layers and two derivatives


class Block(nn.Module):
    """A residual block written as torchvision's ``BasicBlock``: activations in place,
    ``out += identity``, then clamps, a constant mask filled and a scale, in place."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4), nn.Linear(4, width)
        self.act = nn.SiLU(inplace=True)
        self.register_buffer("mask", torch.tensor([False, True, False, False]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        h.mul_(1.5).clamp_(-2.0, 2.0)
        h.masked_fill_(self.mask, 0.25)
        torch.nan_to_num_(h)
        out = self.fc2(h)
        out += x
        return F.elu(out, inplace=True) * 0.5


def _mlp(act: Callable[[], nn.Module], width: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, 4), act(), nn.Linear(4, 4), act(), nn.Linear(4, width))


def _block() -> nn.Module:
    torch.manual_seed(0)
    return Block()


NETS: dict[str, Callable[[], nn.Module]] = {
    "silu": lambda: _mlp(lambda: nn.SiLU(inplace=True)),
    "elu": lambda: _mlp(lambda: nn.ELU(0.7, inplace=True)),
    "mish": lambda: _mlp(lambda: nn.Mish(inplace=True)),
    "relu": lambda: _mlp(lambda: nn.ReLU(inplace=True)),
    "block": _block,
}


def _grad(out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(out, z, create_graph=True, allow_unused=True)
    return torch.zeros_like(z) if g is None else g


def _loop(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, op: str) -> torch.Tensor:
    """Per sample, by grad of grad: the Jacobian's diagonal (of ``f`` flattened per sample,
    in ``x``'s shape), or the Laplacian of each output."""
    rows = []
    for i in range(x.shape[0]):
        z = x[i : i + 1].clone().requires_grad_(True)
        y = f(z)[0].reshape(-1)
        grads = [_grad(y[k], z).reshape(-1) for k in range(y.shape[0])]
        if op == "jacobian_diagonal":
            rows.append(torch.stack([g[k] for k, g in enumerate(grads)]).reshape(x.shape[1:]))
        elif op == "divergence":
            rows.append(sum(g[k] for k, g in enumerate(grads)))
        else:
            n = z.numel()
            lap = [sum(_grad(g[j], z).reshape(-1)[j] for j in range(n)) for g in grads]
            rows.append(torch.stack(lap))  # type: ignore[arg-type]
    return torch.stack(rows)  # type: ignore[arg-type]


def _check(net: nn.Module, x: torch.Tensor, op: str, method: str, calls: int = 3) -> None:
    """``op`` by ``method`` equals the loop, values and parameter gradients, ``calls`` times."""
    expected = _loop(net, x, op)
    weights = torch.randn(expected.shape, dtype=D, generator=torch.Generator().manual_seed(2))
    expected_grads = parameter_gradients(net, (expected * weights).sum())
    for _ in range(calls):
        got = getattr(torchdiv, op)(net, x, method=method)
        torch.testing.assert_close(got, expected, **TOL)
        grads = parameter_gradients(net, (got * weights).sum())
        for g, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(g, e, **TOL)


@pytest.fixture
def recordings(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How many times the cached engines recorded ``f`` (``capture`` inside ``recorded``)."""
    count = [0]
    capture = cache.capture

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        count[0] += 1
        return capture(*args, **kwargs)

    cache.RECORDINGS.clear()
    monkeypatch.setattr(cache, "capture", counted)
    yield count
    cache.RECORDINGS.clear()


CASES = [
    ("divergence", "structured"),
    ("jacobian_diagonal", "structured"),
    ("divergence", "auto"),
    ("jacobian_diagonal", "auto"),
    ("laplacian", "taylor"),
    ("laplacian", "auto"),
]


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize(
    ("op", "method"),
    # ("auto" takes the recording engines here: a sample of them runs in make test)
    [c if c[1] != "auto" else pytest.param(*c, marks=pytest.mark.slow) for c in CASES],
)
def test_in_place_nets_right_at_every_call(name: str, op: str, method: str) -> None:
    x = 1.5 * torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    _check(NETS[name]().to(D), x, op, method)


@pytest.mark.parametrize("name", list(NETS))
def test_in_place_recording_checked_not_recorded_again(name: str, recordings: list[int]) -> None:
    """The recording of a net that writes in place is kept: one recording for three calls
    (it was recorded at every call), each call right."""
    x = torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    _check(NETS[name]().to(D), x, "divergence", "structured")
    assert recordings[0] == 1


def test_in_place_sequence_model_kept_and_right(recordings: list[int]) -> None:
    """A token-wise MLP on (batch, tokens, width): ``F.linear`` on 3 dimensions makes its
    result a view of a matrix product's, so the in-place activation writes memory that other
    recorded tensors share (noted, and checked again at each call)."""
    net = _mlp(lambda: nn.SiLU(inplace=True)).to(D)
    x = torch.randn(3, 2, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    _check(net, x, "divergence", "structured")
    _check(net, x, "jacobian_diagonal", "structured")
    assert recordings[0] == 1


def _changes() -> dict[str, Callable[[nn.Sequential], None]]:
    def swap(net: nn.Sequential) -> None:
        net[1] = nn.ELU(inplace=True)

    def out_of_place(net: nn.Sequential) -> None:
        net[1].inplace = False
        net[3].inplace = False

    def shapes(net: nn.Sequential) -> None:  # the same modules, parameters of other shapes
        g = torch.Generator().manual_seed(5)
        net[0].weight = nn.Parameter(torch.randn(6, 3, dtype=D, generator=g))
        net[0].bias = nn.Parameter(torch.randn(6, dtype=D, generator=g))
        net[2].weight = nn.Parameter(torch.randn(4, 6, dtype=D, generator=g))

    def slope(net: nn.Sequential) -> None:
        net[1].negative_slope = 0.3

    def values(net: nn.Sequential) -> None:
        with torch.no_grad():
            net[0].weight.mul_(-2.0)

    def train(net: nn.Sequential) -> None:
        net.train(not net.training)

    return {
        "swapped": swap,
        "out_of_place": out_of_place,
        "shapes": shapes,
        "slope": slope,
        "values": values,
        "train": train,
    }


class Halved(nn.Module):
    """``h.mul_(0.5)`` in train mode, ``h.mul_(2.0)`` in eval mode (as dropout's scaling)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul_(0.5 if self.training else 2.0)


@pytest.mark.parametrize("change", list(_changes()))
@pytest.mark.parametrize(("op", "method"), [CASES[0], CASES[1]])
def test_kept_in_place_recording_sees_changes(change: str, op: str, method: str) -> None:
    """Between calls: an activation swapped, switched out of place, parameters of other
    shapes, a float attribute changed, parameter values changed, train/eval switched: the
    result is the loop's of the changed net (the template is checked, or recorded again)."""
    torch.manual_seed(0)
    act = nn.LeakyReLU(0.1, inplace=True) if change == "slope" else nn.SiLU(inplace=True)
    net = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 4), nn.Mish(inplace=True))
    net.append(Halved()).append(nn.Linear(4, 3)).to(D).eval()
    x = torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    _check(net, x, op, method, calls=2)
    _changes()[change](net)
    _check(net, x, op, method, calls=2)


def _setitem(h: torch.Tensor) -> torch.Tensor:
    h = h.sin()
    h[:, 0] = h[:, 1] * 2  # (copy_ into a select of h; h read after)
    h[:, 2:] += h[:, 1:2].exp()  # (add_ into a slice)
    return h


def _assembled(h: torch.Tensor) -> torch.Tensor:
    """An output put together column by column into ``torch.empty`` (a PINN's fields)."""
    y = torch.empty(h.shape[0], 4, dtype=h.dtype)
    y[:, 0] = h[:, 1].sin()
    y[:, 1] = h[:, 0] + h[:, 2]
    y[:, 2:] = h[:, 2:].tanh()
    return y


def _nested_view(h: torch.Tensor) -> torch.Tensor:
    h = h.sin()
    h.view(-1, 2, 2)[:, 0, 1] = h[:, 3].clone().exp()  # (a view of a view; h read after)
    h.T[2] = h[:, 0].clone() ** 3
    return h


def _constants(h: torch.Tensor) -> torch.Tensor:
    h = h.cos()
    h[:, 0] = 0.5  # (fill_ of a select)
    h[:, 1:3].mul_(2.0)
    return h


def _index_copy(h: torch.Tensor) -> torch.Tensor:
    h = h.sin()
    return h.index_copy_(1, torch.tensor([3, 0]), h[:, 1:3].tanh())  # (distinct places)


def _index_setitem(h: torch.Tensor) -> torch.Tensor:
    h = h.sin()
    h[:, torch.tensor([2, -4])] = h[:, 1:3].tanh()  # (index_put_ without accumulate)
    return h


def _transposed_base(h: torch.Tensor) -> torch.Tensor:
    """Writes into a tensor that is not contiguous (``h.t() * 1`` keeps ``h.t()``'s
    strides), read after through a view made after the write."""
    r = h.sin().t() * 1
    r[1] = r[0].tanh()  # (copy_ into a select of r)
    r[::2] += r[1::2].tanh()  # (add_ into a strided slice)
    r.t()[:, 3] = h[:, 0].cos()  # (through a view of a view)
    return r.t()


def _transposed_diagonal(h: torch.Tensor) -> torch.Tensor:
    a = (h[:, :, None] * h[:, None, :]).transpose(1, 2) * 1.0
    a.diagonal(dim1=1, dim2=2).copy_(h.sin())
    return a.sum(-1)


WRITES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "index_copy_": _index_copy,
    "index_setitem": _index_setitem,
    "transposed_base": _transposed_base,
    "transposed_diagonal": _transposed_diagonal,
    "sinc_": lambda h: h.sinc_(),  # (torchdiv's sinc writes back with copy_)
    "copy_": lambda h: torch.empty_like(h).copy_(h[:, :1].sin()) * h,  # (broadcast)
    "setitem": _setitem,
    "assembled": _assembled,
    "nested_view": _nested_view,
    "constants": _constants,
    "zero_": lambda h: (h * 2).zero_().add_(h.cos()),
}


class Between(nn.Module):
    """``Linear(3, 4)``, a function of the activations, ``Linear(4, 3)``."""

    def __init__(self, body: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.l1, self.l2, self.body = nn.Linear(3, 4), nn.Linear(4, 3), body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.body(self.l1(x)))


@pytest.mark.parametrize("name", list(WRITES))
@pytest.mark.parametrize(("op", "method"), [CASES[0], CASES[1], CASES[4]])
def test_in_place_writes_recorded_right(
    name: str, op: str, method: str, recordings: list[int]
) -> None:
    """``copy_``, ``fill_``, ``zero_`` and writes through views of a tensor ``f`` reads later
    (``h[:, 0] = ...``, ``h[:, 1:].mul_(2)``), also of one that is not contiguous, and
    ``index_copy_``/``h[:, idx] = v`` at distinct places: the recording engines refused them
    (naming ``aten.copy_``, the write into shared memory, or ``index_put`` without
    accumulate). Recorded now, the base as the values scattered into it, right at every
    call, recorded once."""
    torch.manual_seed(0)
    net = Between(WRITES[name]).to(D)
    x = torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    # (sinc's second derivative near 0 loses ~1e-11 to cancellation in PyTorch's formula)
    tolerance = {"rtol": 1e-9, "atol": 1e-9} if name == "sinc_" else TOL
    expected = _loop(net, x, op)
    weights = torch.randn(expected.shape, dtype=D, generator=torch.Generator().manual_seed(2))
    expected_grads = parameter_gradients(net, (expected * weights).sum())
    for _ in range(3):
        got = getattr(torchdiv, op)(net, x, method=method)
        torch.testing.assert_close(got, expected, **tolerance)
        grads = parameter_gradients(net, (got * weights).sum())
        for g, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(g, e, **tolerance)
    if method == "structured":  # (sinc_: a replaced op, checked under all modes at once)
        assert recordings[0] == 1


def _read_after(h: torch.Tensor) -> torch.Tensor:
    h = h.sin()
    v = h[:, :2]  # made before the write, read after: it sees h[:, 1] written
    h[:, 1:3] = h[:, 3:4] * 2
    return h + v.sum(-1, keepdim=True)


def test_view_made_before_a_write_read_after_refused_or_right() -> None:
    net = Between(_read_after).to(D)
    x = torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    with pytest.raises(UnsupportedOp, match="copy_"):
        torchdiv.laplacian(net, x, method="taylor")
    for _ in range(2):
        torch.testing.assert_close(torchdiv.laplacian(net, x), _loop(net, x, "laplacian"), **TOL)


class Indexed(nn.Module):
    """``index_copy_`` at places held in a buffer (a channel permutation the caller sets)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 3)
        self.register_buffer("index", torch.tensor([3, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        h = h.index_copy_(1, self.index, h[:, 1:3].tanh() * x[:, :2])
        return self.l2(h * 1.0)


@pytest.mark.parametrize(("op", "method"), [CASES[0], CASES[4]])
def test_index_copy_follows_its_index_at_every_call(op: str, method: str) -> None:
    """The index's values decide which places are written: the kept recording is right after
    they change (the propagation reads each call's index), and a call where they name a place
    twice (PyTorch keeps one of the two writes) is refused naming it; ``"auto"`` right."""
    torch.manual_seed(0)
    net = Indexed().to(D)
    x = torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    for index in ([3, 0], [1, 2], [0, 3]):
        net.index.copy_(torch.tensor(index))
        _check(net, x, op, method, calls=2)
    net.index.copy_(torch.tensor([2, 2]))
    with pytest.raises(UnsupportedOp, match="index_put without accumulate writing a place twice"):
        getattr(torchdiv, op)(net, x, method=method)
    torch.testing.assert_close(getattr(torchdiv, op)(net, x), _loop(net, x, op), **TOL)
