"""``value_grad_laplacian(coordinates=...)``: the value, the full gradient and the Laplacian
over chosen coordinates only (a heat or Navier-Stokes residual's ``u``, ``∇u`` with ``u_t``,
``Δ_x u``), by every path of every method, against a float64 per-sample grad-of-grad loop
(one sample at a time), closed forms, ``laplacian(coordinates=)`` and ``jacobian``."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, tanh_mlp
from torch import nn

import torchdiv
from torchdiv._api import second_order
from torchdiv._laplacian import loop

f64 = torch.float64
METHODS = ["auto", "taylor", "forward-over-reverse"]


def manufactured(x: torch.Tensor) -> torch.Tensor:
    """``u = sin x sin y exp(-t)`` of ``(x, y, t)``: ``Δ_xy u = -2u``, ``u_t = -u``."""
    return torch.sin(x[..., 0]) * torch.sin(x[..., 1]) * torch.exp(-x[..., 2])


def per_sample_reference(f, x: torch.Tensor, batch_dims: int, coordinates: list[int]):
    """``f(x)``, the per-sample Jacobian and the Laplacian over the flat event indices
    ``coordinates``, one sample at a time by nested ``autograd.grad`` (graphs kept: the
    results are differentiable in ``x`` and ``f``'s parameters)."""
    batch, event = x.shape[:batch_dims], x.shape[batch_dims:]
    flat = x.reshape(-1, *event)
    values, jacobians, laplacians = [], [], []
    for b in range(flat.shape[0]):
        xb = flat[b].reshape(*[1] * batch_dims, *event)
        y = f(xb).reshape(-1)
        rows, laps = [], []
        for i in range(len(y)):
            (g,) = torch.autograd.grad(y[i], xb, create_graph=True)
            g = g.reshape(-1)
            total = xb.new_zeros(())
            for j in coordinates:
                (h,) = torch.autograd.grad(g[j], xb, create_graph=True, allow_unused=True)
                total = total if h is None else total + h.reshape(-1)[j]
            rows.append(g)
            laps.append(total)
        values.append(y)
        jacobians.append(torch.stack(rows))
        laplacians.append(torch.stack(laps))
    y_event = f(flat[:1].reshape(*[1] * batch_dims, *event)).shape[batch_dims:]
    return (
        torch.stack(values).reshape(*batch, *y_event),
        torch.stack(jacobians).reshape(*batch, *y_event, *event),
        torch.stack(laplacians).reshape(*batch, *y_event),
    )


def _loss(value, gradient, lap) -> torch.Tensor:
    """A loss reading all three, with weights that tell them apart."""
    w = torch.linspace(0.5, 1.5, gradient[(0,) * gradient.dim()].numel() or 1, dtype=f64)
    return (
        value.sum()
        + (gradient * torch.cos(torch.arange(gradient.numel(), dtype=f64)).reshape(gradient.shape))
        .sum()
        .mul(w[0])
        + 0.7 * lap.square().sum()
    )


def _check(f, x, params, coordinates, flat_coordinates, method, batch_dims=1, **options):
    """Values and parameter (and ``x``) gradients of ``_loss`` against the per-sample loop."""
    got = torchdiv.value_grad_laplacian(
        f, x, batch_dims=batch_dims, method=method, coordinates=coordinates, **options
    )
    want = per_sample_reference(f, x, batch_dims, flat_coordinates)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        assert_close(a, b)
    inputs = [x, *params]
    g_got = torch.autograd.grad(_loss(*got), inputs, allow_unused=True)
    g_want = torch.autograd.grad(_loss(*want), inputs, allow_unused=True)
    for a, b in zip(g_got, g_want, strict=True):
        assert (a is None) == (b is None) or float((a if b is None else b).abs().max()) == 0
        if a is not None and b is not None:
            assert_close(a, b)
    return got


def _pinn(d_in: int = 3, d_out: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return tanh_mlp(d_in, 16, d_out)


@pytest.mark.parametrize("method", METHODS)
def test_manufactured_heat_solution_in_one_call(method):
    """``u = sin x sin y exp(-t)`` solves ``u_t = Δ_xy u / 2``: from one call, ``u``, the
    full gradient (``u_t`` included) and ``Δ_xy u = -2u`` (not ``Δ_xyt u = -u``)."""
    x = torch.randn(64, 3, dtype=f64)
    out = torchdiv.value_grad_laplacian(manufactured, x, method=method, coordinates=[0, 1])
    u, e = manufactured(x), torch.exp(-x[:, 2])
    gradient = torch.stack(
        [
            torch.cos(x[:, 0]) * torch.sin(x[:, 1]) * e,
            torch.sin(x[:, 0]) * torch.cos(x[:, 1]) * e,
            -u,
        ],
        -1,
    )
    assert_close(out.value, u)
    assert_close(out.gradient, gradient)
    assert_close(out.laplacian, -2 * u)
    assert_close(out.gradient[:, 2] - 0.5 * out.laplacian, torch.zeros_like(u))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "coordinates, flat",
    [([0, 1], [0, 1]), ([-3, -2], [0, 1]), (torch.tensor([True, False, True]), [0, 2]), ([], [])],
)
@pytest.mark.parametrize("samples", [5, 24])
def test_pinn_values_and_parameter_gradients(method, coordinates, flat, samples):
    """A tanh PINN of ``(x, y, t)`` in training (parameters and ``x`` require grad; ``"auto"``
    takes the Taylor engine at three inputs, the loop is below): every method's value,
    gradient, Laplacian over the coordinates (indices, negative ones, a mask, none) and a
    loss's gradients as the per-sample loop's."""
    net = _pinn()
    f = lambda z: net(z).squeeze(-1)  # noqa: E731
    x = torch.randn(samples, 3, dtype=f64, requires_grad=True)
    _check(f, x, list(net.parameters()), coordinates, flat, method)


@pytest.mark.parametrize("method", METHODS)
def test_navier_stokes_vector_output(method):
    """``(u, v, p)`` of ``(x, y, t)``: the Jacobian of all three in every input, the
    Laplacian of each over ``(x, y)``; equal to ``jacobian`` and ``laplacian(coordinates=)``."""
    net = _pinn(3, 3)
    x = torch.randn(32, 3, dtype=f64, requires_grad=True)
    out = _check(net, x, list(net.parameters()), [0, 1], [0, 1], method)
    assert_close(out.gradient, torchdiv.jacobian(net, x))
    assert_close(out.laplacian, torchdiv.laplacian(net, x, coordinates=[0, 1]))


@pytest.mark.parametrize("method", METHODS)
def test_one_dimensional_heat_by_the_loop_of_auto(method, monkeypatch):
    """``u(x, t)`` of a small PINN (two inputs, little arithmetic): ``"auto"`` loops, its
    second-level passes batched or not, along ``x`` only."""
    net = _pinn(2, 1)
    f = lambda z: net(z).squeeze(-1)  # noqa: E731
    x = torch.randn(16, 2, dtype=f64, requires_grad=True)
    calls: list[int] = []
    real = loop._loop
    monkeypatch.setattr(loop, "_loop", lambda *a: calls.append(1) or real(*a))
    for _ in range(2):  # the second call: the remembered loop (batched, plain)
        _check(f, x, list(net.parameters()), [0], [0], method)
    assert bool(calls) == (method == "auto")


@pytest.mark.parametrize("batched", [False, True])
def test_the_loop_with_and_without_batched_passes(batched):
    """``loop.value_grad_laplacian`` along chosen coordinates, the second-level passes one
    at a time or batched: as the per-sample reference."""
    net = _pinn(4, 2)
    x = torch.randn(6, 4, dtype=f64, requires_grad=True)
    settings = loop.Settings(batched=batched)
    value, jac, lap = loop.value_grad_laplacian(net, x, 1, settings=settings, coordinates=[3, 1])
    want = per_sample_reference(net, x, 1, [3, 1])
    assert_close(value, want[0])
    assert_close(jac, want[1])
    assert_close(lap, want[2])
    params = [x, *net.parameters()]
    got = torch.autograd.grad(lap.square().sum(), params, allow_unused=True)
    ref = torch.autograd.grad(want[2].square().sum(), params, allow_unused=True)
    for a, b, p in zip(got, ref, params, strict=True):  # (the last bias: unused, None)
        zero = torch.zeros_like(p)
        assert_close(zero if a is None else a, zero if b is None else b)


def _particles(net: nn.Module):
    """A function of ``n`` particles in 3-D, ``(..., n, 3)``: one network per particle,
    summed, and a pair term."""

    def f(r: torch.Tensor) -> torch.Tensor:
        pair = (r.unsqueeze(-2) - r.unsqueeze(-3)).square().sum(-1)
        return net(r).squeeze(-1).sum(-1) + torch.exp(-pair).sum((-1, -2))

    return f


XY = torch.tensor([[True, True, False]] * 4)  # every particle's x and y, not z


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "coordinates, flat", [(XY, [0, 1, 3, 4, 6, 7, 9, 10]), ([0, 4, -1], [0, 4, 11])]
)
@pytest.mark.parametrize("batch_dims", [1, 2])
def test_an_event_of_particles(method, coordinates, flat, batch_dims):
    """Event ``(4, 3)``: the coordinates index the flattened event (a mask of the event's
    shape or flat indices, as ``laplacian`` reads them), with one or two batch dimensions;
    the gradient has the event's shape."""
    net = _pinn(3, 1)
    f = _particles(net)
    shape = (6,) if batch_dims == 1 else (2, 3)
    x = torch.randn(*shape, 4, 3, dtype=f64, requires_grad=True)
    out = _check(f, x, list(net.parameters()), coordinates, flat, method, batch_dims)
    assert out.gradient.shape == x.shape
    assert_close(out.laplacian, torchdiv.laplacian(f, x, batch_dims=batch_dims, coordinates=flat))


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_chunks_of_directions(chunk_size):
    """Chunks that end inside the chosen coordinates, or straddle where the others start:
    the Taylor sweep's chunks never mix the two (``_directions``), gradients in order."""
    net = _pinn(5, 1)
    f = lambda z: net(z).squeeze(-1)  # noqa: E731
    x = torch.randn(8, 5, dtype=f64, requires_grad=True)
    _check(f, x, list(net.parameters()), [4, 0, 2], [4, 0, 2], "taylor", chunk_size=chunk_size)


def test_the_taylor_sweep_takes_second_order_terms_along_the_chosen_directions_only():
    """Of the sweep's chunks (2 directions at most), those of the chosen coordinates carry
    second-order terms, the others do not (a forward-mode sweep); no chunk mixes the two."""
    x = torch.randn(3, 6, dtype=f64)
    seen = [
        (u.reshape(len(u), -1).argmax(-1).tolist(), second)
        for u, second in second_order._directions(x, 1, 2, torch.tensor([5, 1, 3]))
    ]
    assert seen == [([5, 1], True), ([3], True), ([0, 2], False), ([4], False)]


@pytest.mark.parametrize("n", [3, 12])
def test_an_op_without_a_taylor_rule(n):
    """``lgamma`` has no Taylor rule: ``"auto"`` falls back to the loop (3 inputs, at the
    first call and at the remembered refusal of the second) or computes the three separately
    (12 inputs); ``"taylor"`` raises naming the op."""
    torch.manual_seed(0)
    w = torch.randn(n, 4, dtype=f64, requires_grad=True)
    f = lambda z: torch.lgamma((z @ w).square() + 1).sum(-1)  # noqa: E731
    x = torch.randn(5, n, dtype=f64, requires_grad=True)
    for _ in range(2):
        _check(f, x, [w], [0, n - 1], [0, n - 1], "auto")
    with pytest.raises(NotImplementedError, match=r"^value_grad_laplacian: .*lgamma"):
        torchdiv.value_grad_laplacian(f, x, method="taylor", coordinates=[0])


def test_float32_against_float64():
    """The float32 results within float32's rounding of the float64 ones (a tanh network of
    depth 3: about 1e-6 relative)."""
    net = _pinn()
    x = torch.randn(64, 3, dtype=f64)
    f = lambda z: net(z).squeeze(-1)  # noqa: E731
    want = torchdiv.value_grad_laplacian(f, x, coordinates=[0, 1])
    net32 = net.float()
    for method in METHODS:
        got = torchdiv.value_grad_laplacian(f, x.float(), method=method, coordinates=[0, 1])
        for a, b in zip(got, want, strict=True):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    assert net32 is net


@pytest.mark.parametrize("method", METHODS)
def test_samples_isolated_caller_state_kept_and_a_second_call_equal(method):
    """Changing sample 3 changes no other sample's results; ``x`` and the coordinates are not
    mutated; a second call (cached plans) gives the first's results bit for bit."""
    net = _pinn()
    f = lambda z: net(z).squeeze(-1)  # noqa: E731
    x = torch.randn(32, 3, dtype=f64)
    coordinates = torch.tensor([1, 0])
    saved = x.clone(), coordinates.clone()
    # "auto"'s deciding call runs the Taylor engine from its recording, later ones the loop
    # it decided on (two chosen coordinates): the plan is made first
    torchdiv.value_grad_laplacian(f, x, method=method, coordinates=coordinates)
    first = torchdiv.value_grad_laplacian(f, x, method=method, coordinates=coordinates)
    second = torchdiv.value_grad_laplacian(f, x, method=method, coordinates=coordinates)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(x, saved[0]) and torch.equal(coordinates, saved[1])
    y = x.clone()
    y[3] += 1.0
    moved = torchdiv.value_grad_laplacian(f, y, method=method, coordinates=coordinates)
    others = torch.arange(32) != 3
    for a, b in zip(first, moved, strict=True):
        assert_close(a[others], b[others])
        assert not torch.allclose(a[3], b[3])


@pytest.mark.parametrize("method", ["auto", "taylor"])
def test_a_function_that_mixes_samples_is_refused(method):
    """``u(x - mean over the batch)`` mixes samples: refused, as by ``laplacian``; the same
    function per sample is not."""
    net = _pinn()
    x = torch.randn(16, 3, dtype=f64)
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.value_grad_laplacian(
            lambda z: net(z - z.mean(0)).squeeze(-1), x, method=method, coordinates=[0, 1]
        )
    torchdiv.value_grad_laplacian(
        lambda z: net(z - z.mean(-1, keepdim=True)).squeeze(-1),
        x,
        method=method,
        coordinates=[0, 1],
    )


@pytest.mark.parametrize(
    "coordinates, error",
    [
        ([3], ValueError),
        ([0, 0], ValueError),
        ([-4], ValueError),
        (torch.tensor([True, False]), ValueError),
        (torch.tensor([0.0]), TypeError),
        (torch.tensor([1], dtype=torch.uint8), TypeError),
        ("xy", TypeError),
    ],
)
def test_bad_coordinates_are_refused_as_by_laplacian(coordinates, error):
    x = torch.randn(4, 3, dtype=f64)
    with pytest.raises(error) as by_laplacian:
        torchdiv.laplacian(manufactured, x, coordinates=coordinates)
    with pytest.raises(error, match=r"^value_grad_laplacian: ") as got:
        torchdiv.value_grad_laplacian(manufactured, x, coordinates=coordinates)
    assert str(got.value).replace("value_grad_laplacian", "laplacian") == str(by_laplacian.value)


@pytest.mark.parametrize("outputs", [1, 2])
@pytest.mark.parametrize("coordinates", [[0, 1], [3, 0, 15]])
def test_few_coordinates_of_many_inputs_take_the_gradient_by_jacobian(outputs, coordinates):
    """At ``SPLIT_OUTSIDE`` or more inputs per output component outside the coordinates,
    ``"auto"`` takes the Laplacian by the Taylor engine along the coordinates only and the
    gradient by ``jacobian`` (the sweep's first-order terms cost one direction per input: 1.3-5x
    slower at 8-29 inputs outside, scalar output): value, gradient, Laplacian and a loss's
    gradients in ``x`` and the parameters as the per-sample loop's; a stateful ``f`` (a buffer
    written, a dropout mask drawn) changes its state once, the same function throughout."""
    from conftest import Stateful, assert_one_state, one_state

    n = 16
    assert (n - len(coordinates) >= second_order.SPLIT_OUTSIDE * outputs) == (outputs == 1)
    net = _pinn(n, outputs)
    x = torch.randn(6, n, dtype=f64, requires_grad=True)
    calls = []
    jacobian = second_order.jacobian
    second_order.jacobian = lambda *a, **k: calls.append(1) or jacobian(*a, **k)
    try:
        _check(net, x, list(net.parameters()), coordinates, coordinates, "auto")
        assert len(calls) == (outputs == 1)
        if outputs == 1:
            stateful = Stateful(n, 1, head=lambda y: y.squeeze(-1))
            once, state = one_state(stateful, x.detach(), seed=4)
            torch.manual_seed(4)
            got = torchdiv.value_grad_laplacian(stateful, x.detach(), coordinates=coordinates)
            assert_one_state(stateful, once, state)
            assert len(calls) == 2
            z = x.detach().requires_grad_()  # (once's mask is the batch's: batched autograd)
            value = once(z)
            (gradient,) = torch.autograd.grad(value.sum(), z, create_graph=True)
            rows = [
                torch.autograd.grad(gradient[:, j].sum(), z, retain_graph=True)[0]
                for j in coordinates
            ]
            lap = sum(row[:, j] for row, j in zip(rows, coordinates, strict=True))
            for a, b in zip(got, (value, gradient, lap), strict=True):
                assert_close(a, b)
    finally:
        second_order.jacobian = jacobian
