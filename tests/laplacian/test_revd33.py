"""rev-d33: rev-b33's value of ``value_grad_laplacian(method="forward-over-reverse")``
(the Hessian products' primal, ``ForwardJacobian(has_aux=True)``) and rev-c33's
``autocast_off`` attacked. No fault found; these pin what was checked, each against float64
per-sample loops of ``torch.autograd.grad`` (grad-of-grad) or a closed form."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._C._functorch import is_functorch_wrapped_tensor

import torchdiv
from tests.models.test_revb33 import _Layer, _transformed

f64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")


def _net(outputs: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, outputs)).to(f64)


def _loss_reference(
    f: Callable[[torch.Tensor], torch.Tensor],
    params: list[torch.Tensor],
    x: torch.Tensor,
    coordinates: list[int] | None,
) -> tuple[torch.Tensor, ...]:
    """Gradients, for the parameters and ``x``, of ``sum(value²) + sum(gradient²) +
    sum(Laplacian)`` by per-sample float64 loops of ``autograd.grad`` (grad-of-grad); ``f``'s
    output ``(B,)``."""
    total = torch.zeros((), dtype=f64)
    for i in range(x.shape[0]):
        xi = x[i]
        y = f(xi[None])[0]
        (g,) = torch.autograd.grad(y, xi, create_graph=True)
        idx = range(xi.numel()) if coordinates is None else coordinates
        lap = sum(torch.autograd.grad(g[j], xi, create_graph=True)[0][j] for j in idx)
        total = total + y**2 + (g**2).sum() + lap
    return torch.autograd.grad(total, [*params, x])


@pytest.mark.parametrize("coordinates", [None, [0, 2]])
@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_value_keeps_the_callers_graph_chunked_and_with_coordinates(
    chunk_size: int | None, coordinates: list[int] | None
) -> None:
    """The value from inside torch.func's transforms is a plain tensor with the caller's graph:
    a loss of value, gradient and Laplacian differentiated for the parameters and ``x``
    against the loop's (float64: 1e-12), with several chunks (2 of 3 coordinates: uneven)."""
    net = _net(1)

    def f(z: torch.Tensor) -> torch.Tensor:
        return net(z)[:, 0]  # (B,)

    x = torch.randn(4, 3, dtype=f64, requires_grad=True)
    out = torchdiv.value_grad_laplacian(
        f, x, method="forward-over-reverse", chunk_size=chunk_size, coordinates=coordinates
    )
    assert not is_functorch_wrapped_tensor(out.value)
    assert out.value.shape == (4,) and out.value.dtype == f64
    torch.testing.assert_close(out.value, f(x), rtol=0, atol=1e-14)
    loss = (out.value**2).sum() + (out.gradient**2).sum() + out.laplacian.sum()
    got = torch.autograd.grad(loss, [*net.parameters(), x])
    for a, b in zip(got, _loss_reference(f, list(net.parameters()), x, coordinates), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("coordinates", [None, [1]])
def test_value_shapes_batch_dims_two_non_contiguous_and_no_grad(
    coordinates: list[int] | None,
) -> None:
    """``batch_dims=2``, a non-contiguous ``(B, 2)`` output and a ``(B, 1)`` one: the value
    ``f(x)``'s shape and dtype, with ``x``'s gradient of a loss of it as ``f``'s (float64);
    under the caller's ``no_grad`` without a graph."""
    net = _net()

    def transposed(z: torch.Tensor) -> torch.Tensor:
        y = net(z)
        return torch.stack([y[..., 1], y[..., 0]], 0).movedim(0, -1)  # not contiguous in B

    def column(z: torch.Tensor) -> torch.Tensor:
        return net(z)[..., :1]

    torch.manual_seed(1)
    for f, x in [
        (transposed, torch.randn(2, 3, 3, dtype=f64, requires_grad=True)),
        (column, torch.randn(4, 3, dtype=f64, requires_grad=True)),
    ]:
        bd = x.dim() - 1
        out = torchdiv.value_grad_laplacian(
            f, x, batch_dims=bd, method="forward-over-reverse", chunk_size=2,
            coordinates=coordinates,
        )  # fmt: skip
        y = f(x)
        assert out.value.shape == y.shape and out.value.dtype == y.dtype
        torch.testing.assert_close(out.value, y, rtol=0, atol=1e-14)
        w = torch.randn_like(y)
        (got,) = torch.autograd.grad((out.value * w).sum(), x)
        (want,) = torch.autograd.grad((y * w).sum(), x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
        with torch.no_grad():
            out = torchdiv.value_grad_laplacian(
                f, x, batch_dims=bd, method="forward-over-reverse", coordinates=coordinates
            )
        assert out.value.grad_fn is None and not out.value.requires_grad


class _Dropped(nn.Module):
    """``sum_j m_j x_j² / (1 - p)`` (a dropout mask ``m``) and a call counter: the gradient
    ``2 m x / (1 - p)`` shows the draw, the Laplacian ``2 sum_j m_j / (1 - p)``."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.register_buffer("calls", torch.zeros((), dtype=f64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (self.drop(x) * x).sum(-1, keepdim=True)


@pytest.mark.parametrize("coordinates", [None, [0, 1, 3]])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_value_of_the_draw_every_chunk_differentiates_and_state_moved_once(
    chunk_size: int | None, coordinates: list[int] | None
) -> None:
    """Each chunk evaluates ``f`` again, from one state: value, gradient and Laplacian are of
    one dropout draw (closed form in the gradient's mask, float64 exact), the counter and the
    generator moved as by one plain ``f(x)``."""
    f = _Dropped().train()
    x = torch.randn(3, 4, dtype=f64, requires_grad=True)
    torch.manual_seed(1)
    out = torchdiv.value_grad_laplacian(
        f, x, method="forward-over-reverse", chunk_size=chunk_size, coordinates=coordinates
    )
    state = torch.get_rng_state()
    assert f.calls.item() == 1
    torch.manual_seed(1)
    f(x.detach())
    assert torch.equal(state, torch.get_rng_state())
    xd = x.detach()
    mask = out.gradient.reshape(3, 4) / (2 * xd)  # m / (1 - p)
    idx = list(range(4)) if coordinates is None else coordinates
    torch.testing.assert_close(out.value, (mask * xd**2).sum(-1, keepdim=True))
    torch.testing.assert_close(out.laplacian, 2 * mask[:, idx].sum(-1, keepdim=True))
    w = torch.randn(3, 1, dtype=f64)
    (got,) = torch.autograd.grad((out.value * w).sum(), x)
    torch.testing.assert_close(got, 2 * mask * xd * w)


def test_value_inside_the_callers_vmap_of_grad() -> None:
    """``vmap(grad(value + Laplacian))`` against the per-sample float64 loop."""
    net = _net()

    def loss(z: torch.Tensor) -> torch.Tensor:
        out = torchdiv.value_grad_laplacian(
            net, z[None], method="forward-over-reverse", chunk_size=1
        )
        return out.value.sum() + out.laplacian.sum()

    x = torch.randn(3, 3, dtype=f64)
    got = torch.func.vmap(torch.func.grad(loss))(x)
    want = []
    for xi in x:
        xi = xi.clone().requires_grad_()
        y = net(xi[None])[0]
        total = y.sum()
        for k in range(y.numel()):
            (g,) = torch.autograd.grad(y[k], xi, create_graph=True)
            for j in range(3):
                total = total + torch.autograd.grad(g[j], xi, create_graph=True)[0][j]
        want.append(torch.autograd.grad(total, xi)[0])
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_value_under_torch_compile_with_coordinates() -> None:
    """A compiled step (``aot_eager``): value and its parameter and ``x`` gradients as
    ``f``'s (float64), whole and along coordinates."""
    net = _net()
    x = torch.randn(5, 3, dtype=f64, requires_grad=True)
    for coordinates in (None, [0, 2]):
        torch._dynamo.reset()

        def step(z: torch.Tensor, coordinates: list[int] | None = coordinates) -> torch.Tensor:
            return torchdiv.value_grad_laplacian(
                net, z, method="forward-over-reverse", chunk_size=2, coordinates=coordinates
            ).value

        value = torch.compile(step, backend="aot_eager")(x)
        y = net(x)
        w = torch.randn_like(y)
        got = torch.autograd.grad((value * w).sum(), [*net.parameters(), x])
        want = torch.autograd.grad((y * w).sum(), [*net.parameters(), x])
        torch.testing.assert_close(value, y, rtol=0, atol=1e-14)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def _own_regions(x: torch.Tensor) -> torch.Tensor:
    """f entering autocast regions itself, a bfloat16 one then a float32 one
    (``enabled=False``): its casts are recorded calls, and the caller's autocast changes none
    of its calls."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(6, 3), torch.randn(3, 6) * 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.tanh(x @ w1.T)
        with torch.autocast("cpu", enabled=False):
            return torch.tanh(h.float() @ w2.T) * x


@pytest.mark.slow
def test_a_replay_keeps_fs_own_autocast_regions() -> None:
    """The compiled Taylor Laplacian and structured diagonal (replays with autocast off) of an
    ``f`` whose regions fix every call's dtype, under the caller's float16 autocast: bit for
    bit the eager result without the caller's autocast (the same calls of ``f``; a sweep run
    under the caller's autocast rounds to float16), float32, the caller's autocast on after."""
    x = torch.randn(4, 3)
    calls = {
        "laplacian": lambda: torchdiv.laplacian(_own_regions, x, method="taylor"),
        "diagonal": lambda: torchdiv.jacobian_diagonal(_own_regions, x, method="structured"),
    }
    for name, call in calls.items():
        want = call()

        def run(call: Callable[[], torch.Tensor] = call) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.float16):
                out = call()
                assert torch.is_autocast_enabled("cpu")
                assert torch.get_autocast_dtype("cpu") == torch.float16
            return out

        torch._dynamo.reset()
        for got in (run(), torch.compile(run, backend="aot_eager")()):
            assert got.dtype == torch.float32, name
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_autocast_of_other_devices_set_with_x_on_cpu_and_restored_after_an_error() -> None:
    """Autocast flagged on for cuda (no CUDA needed) with ``x`` on the CPU: the Taylor
    Laplacian as without it (float32 exact) and the flag still on; a replay that raises
    leaves the caller's CPU autocast on, its dtype kept."""
    x = torch.randn(4, 3)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ torch.ones(3, 3))

    plain = torchdiv.laplacian(f, x, method="taylor")
    was = torch.is_autocast_enabled("cuda")
    torch.set_autocast_enabled("cuda", True)
    try:
        torch.testing.assert_close(torchdiv.laplacian(f, x, method="taylor"), plain, rtol=0, atol=0)
        assert torch.is_autocast_enabled("cuda")
    finally:
        torch.set_autocast_enabled("cuda", was)
    propagate = sys.modules["torchdiv._taylor.propagate"]
    seen: list[bool] = []

    def boom(*args: object, **kwargs: object) -> None:
        seen.append(torch.is_autocast_enabled("cpu"))
        raise RuntimeError("boom")

    original = propagate._propagate
    propagate._propagate = boom
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            with pytest.raises(RuntimeError, match="boom"):
                torchdiv.laplacian(f, x, method="taylor")
            assert torch.is_autocast_enabled("cpu")
            assert torch.get_autocast_dtype("cpu") == torch.float16
    finally:
        propagate._propagate = original
    assert seen == [False]  # (the sweep ran with autocast off)
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("coordinates", [None, [0, 2]])
def test_value_of_the_transformed_draw_over_uneven_chunks(coordinates: list[int] | None) -> None:
    """rev-b33's train-mode transformer layer (its dropouts draw otherwise under torch.func
    than plainly), ``chunk_size=2`` over 3 coordinates: a batched chunk (``vmap``,
    ``randomness="same"``) first, then a single one; the value (the first chunk's primal),
    the gradient and its parameter gradients are of the draw of one ``torch.func.vjp``
    evaluation from the same seed, every chunk's alike (float64: 1e-12 is rounding)."""
    torch.manual_seed(0)
    f = _Layer()
    x = torch.randn(3, 3, dtype=f64)
    torch.manual_seed(1)
    plain = f(x)
    torch.manual_seed(1)
    y, jac = _transformed(f, x)
    assert (plain - y).abs().max() > 1e-3  # (the two draws differ: the test can fail)
    torch.manual_seed(1)
    out = torchdiv.value_grad_laplacian(
        f, x, method="forward-over-reverse", chunk_size=2, coordinates=coordinates
    )
    torch.testing.assert_close(out.value, y, rtol=0, atol=1e-12)
    if coordinates is None:  # (with coordinates the gradient is jacobian's, rev-b33's test)
        torch.testing.assert_close(out.gradient, jac, rtol=0, atol=1e-12)
    torch.manual_seed(1)
    whole = torchdiv.laplacian(f, x, method="forward-over-reverse", coordinates=coordinates)
    torch.testing.assert_close(out.laplacian, whole, rtol=0, atol=1e-12)
    params = list(f.parameters())
    got = torch.autograd.grad(out.value.sum(), params, allow_unused=True)
    want = torch.autograd.grad(y.sum(), params, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
