"""DeepXDE (``DDE_BACKEND=pytorch``) as its users write PINNs: a PDE residual with
``torchdiv.laplacian`` (function form, on the ``dde.nn.FNN`` with its feature and output
transforms) or ``graph_laplacian`` (on the ``y`` DeepXDE passes to ``pde(x, y)``) against
DeepXDE's own ``dde.grad.hessian`` sum; skipped where DeepXDE is not installed."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import torchdiv

dde: Any = None  # DeepXDE, imported by ``_deepxde`` once a test of this file runs


@pytest.fixture(autouse=True, scope="module")
def _deepxde() -> None:
    """Import DeepXDE when a test of this file runs, not at collection, where every
    pytest-xdist worker paid over a second for it (SciPy, scikit-learn, matplotlib); skip the
    file's tests where it cannot be imported or runs another backend."""
    global dde
    os.environ.setdefault("DDE_BACKEND", "pytorch")
    dde = pytest.importorskip("deepxde")
    if dde.backend.backend_name != "pytorch":
        pytest.skip("DeepXDE runs another backend here")


def _net(n_in: int = 2, n_out: int = 1) -> torch.nn.Module:
    """An FNN on ``[x, sin(pi x)]`` features, times a factor zero on the unit square's edges."""
    torch.manual_seed(0)
    net = dde.nn.FNN([2 * n_in] + [16] * 2 + [n_out], "tanh", "Glorot normal")
    net.apply_feature_transform(lambda x: torch.cat([x, torch.sin(torch.pi * x)], 1))
    net.apply_output_transform(lambda x, y: (x * (1 - x)).prod(1, keepdim=True) * y)
    return net


def _hessian_trace(y: torch.Tensor, x: torch.Tensor, coordinates: list[int]) -> torch.Tensor:
    """DeepXDE's recipe: ``sum_i dde.grad.hessian(y, x, component=k, i=i, j=i)`` per output."""
    columns = [
        sum(dde.grad.hessian(y, x, component=k, i=i, j=i) for i in coordinates)
        for k in range(y.shape[1])
    ]
    dde.grad.clear()
    return torch.cat(columns, 1)


def test_residual_and_its_parameter_gradients_match_dde_grad_hessian() -> None:
    """float64: values and the gradient of a weighted residual loss, for every parameter."""
    net = _net(n_out=2).double()
    x = torch.rand(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x.requires_grad_(True)  # as dde.Model passes the collocation points
    y = net(x)
    params = list(net.parameters())
    c = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(8, 2)
    for coordinates in ([0, 1], [0]):
        want = _hessian_trace(y, x, coordinates)
        expected = torch.autograd.grad((c * want).sum(), params, retain_graph=True)
        for got in (
            torchdiv.laplacian(net, x, coordinates=coordinates),
            torchdiv.graph_laplacian(y, x, create_graph=True, coordinates=coordinates),
        ):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
            grads = torch.autograd.grad((c * got).sum(), params, retain_graph=True)
            for g, e in zip(grads, expected, strict=True):
                torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_dde_model_trains_the_same_with_either_laplacian() -> None:
    """A Poisson problem trained by ``dde.Model`` for 10 Adam steps in float32 (DeepXDE's
    default), with the residual written both ways: the same losses to float32 round-off."""

    def train(laplacian) -> list[float]:
        dde.config.set_random_seed(0)
        net = _net()
        geom = dde.geometry.Rectangle([0, 0], [1, 1])

        def pde(x, y):
            source = (
                2 * torch.pi**2 * torch.sin(torch.pi * x[:, :1]) * torch.sin(torch.pi * x[:, 1:])
            )
            return -laplacian(net, x, y) - source

        data = dde.data.PDE(geom, pde, [], num_domain=32, train_distribution="uniform")
        model = dde.Model(data, net)
        model.compile("adam", lr=1e-3)
        losses, _ = model.train(iterations=10, display_every=5, verbose=0)
        return [float(v) for loss in losses.loss_train for v in loss]

    want = train(lambda net, x, y: _hessian_trace(y, x, [0, 1]))
    got = train(lambda net, x, y: torchdiv.laplacian(net, x))
    assert len(got) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-7)


def test_biharmonic_and_weighted_laplacian_match_nested_dde_hessians() -> None:
    """A Kirchhoff plate's ``Δ²u`` (DeepXDE nests ``hessian`` of the Laplacian) and
    ``tr(A ∇²u)``, float64, with the gradients of ``Δ²u`` for every parameter (fifth
    derivatives through tanh)."""
    net = _net().double()
    x = torch.rand(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x.requires_grad_(True)
    y = net(x)
    lap = _hessian_trace(y, x, [0, 1])
    want = _hessian_trace(lap, x, [0, 1])
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    weighted = sum(a[i, j] * dde.grad.hessian(y, x, i=i, j=j) for i in range(2) for j in range(2))
    dde.grad.clear()
    got = torchdiv.biharmonic(net, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    diffusion = torchdiv.weighted_laplacian(net, x, diffusion=a)
    torch.testing.assert_close(diffusion, weighted, rtol=1e-10, atol=1e-10)
    params = list(net.parameters())
    grads = torch.autograd.grad(got.sum(), params, materialize_grads=True)
    expected = torch.autograd.grad(want.sum(), params, materialize_grads=True)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_lbfgs_training_with_the_graph_form_and_a_gpinn_term_matches_dde_grad() -> None:
    """An Allen-Cahn-like ``TimePDE`` on ``(x, t)`` with a hard initial condition, trained by
    DeepXDE's L-BFGS (strong Wolfe; 3 calls of 5 iterations) in float64, the residual's
    ``u_xx`` from ``graph_laplacian(y, x, coordinates=[0])`` on the ``y`` DeepXDE passes, or
    from ``value_grad_laplacian`` of the network, with a gPINN term (``dde.grad.jacobian`` of
    the residual: third derivatives): every loss and the final parameters as with
    ``dde.grad.hessian``. (DeepXDE sets L-BFGS's iterations per call at import, so
    ``set_LBFGS_options(maxiter=...)`` alone runs 1000 per call: set them here.)"""

    def train(second) -> tuple[torch.Tensor, list[torch.Tensor]]:
        dde.config.set_random_seed(0)
        net = dde.nn.FNN([3] + [16] * 2 + [1], "tanh", "Glorot normal")
        net.apply_feature_transform(
            lambda x: torch.cat([x[:, :1], torch.sin(torch.pi * x[:, :1]), x[:, 1:]], 1)
        )
        net.apply_output_transform(
            lambda x, y: torch.sin(torch.pi * x[:, :1]) + x[:, 1:] * x[:, :1] * (1 - x[:, :1]) * y
        )
        geom = dde.geometry.GeometryXTime(
            dde.geometry.Interval(0, 1), dde.geometry.TimeDomain(0, 1)
        )

        def pde(x, y):
            u_t, u_xx = second(net, x, y)
            residual = u_t - 0.1 * u_xx + 5 * y**3 - 5 * y
            return [residual, dde.grad.jacobian(residual, x, i=0, j=0)]

        data = dde.data.TimePDE(geom, pde, [], num_domain=24, train_distribution="pseudo")
        model = dde.Model(data, net)
        dde.optimizers.config.set_LBFGS_options(maxiter=15)
        dde.optimizers.config.LBFGS_options.update(iter_per_step=5, fun_per_step=8)
        model.compile("L-BFGS", loss_weights=[1, 0.1])
        losses, _ = model.train(display_every=1, verbose=0)
        dde.grad.clear()
        got = [[float(v) for v in loss] for loss in losses.loss_train]
        return torch.tensor(got), [p.detach() for p in net.parameters()]

    def by_dde(net, x, y):
        return dde.grad.jacobian(y, x, i=0, j=1), dde.grad.hessian(y, x, i=0, j=0)

    def by_graph(net, x, y):
        u_xx = torchdiv.graph_laplacian(y, x, create_graph=True, coordinates=[0])
        return dde.grad.jacobian(y, x, i=0, j=1), u_xx

    def by_function(net, x, y):
        out = torchdiv.value_grad_laplacian(net, x, coordinates=[0])
        return out.gradient[:, :, 1], out.laplacian

    options = dict(dde.optimizers.config.LBFGS_options)
    dtype = torch.get_default_dtype()
    dde.config.set_default_float("float64")
    try:
        want, want_params = train(by_dde)
        for second in (by_graph, by_function):
            got, params = train(second)
            assert got.shape == want.shape == (4, 2)  # the initial loss and 3 L-BFGS calls
            # (15 iterations amplify round-off: measured 5e-12 relative)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(params, want_params, rtol=1e-8, atol=1e-10)
    finally:
        dde.config.set_default_float("float32")
        torch.set_default_dtype(dtype)
        dde.optimizers.config.LBFGS_options.clear()
        dde.optimizers.config.LBFGS_options.update(options)


def _point_laplacians(f, points: torch.Tensor) -> torch.Tensor:
    """``f: (P, d) -> (P, F)``, evaluated on the whole batch; the Laplacian of entry ``[q, k]``
    with respect to row ``q`` alone, by a grad-of-grad loop: ``(P, F)``."""
    leaf = points.clone().requires_grad_(True)
    out = f(leaf)
    rows = []
    for q in range(out.shape[0]):
        row = []
        for k in range(out.shape[1]):
            (g,) = torch.autograd.grad(out[q, k], leaf, create_graph=True)
            terms = [
                torch.autograd.grad(g[q, i], leaf, create_graph=True)[0][q, i]
                for i in range(points.shape[1])
            ]
            row.append(sum(terms))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def test_cartesian_product_deeponet_and_mionet_laplacians_over_the_trunk_points() -> None:
    """``DeepONetCartesianProd`` and ``MIONetCartesianProd`` map ``F`` functions and ``P``
    shared points to ``(F, P)``: the points are the samples, so the call is
    ``laplacian(lambda y: net((u, y)).T, y)`` (``(P, F)``), and in ``pde`` the graph form on
    one function's column. Every method's values and branch and trunk parameter gradients
    against a per-point grad-of-grad loop in float64; without the ``.T`` (``F == P``, the
    shapes fit) ``"auto"`` refuses."""
    torch.manual_seed(2)
    f_count, p_count = 3, 4
    u, v = (
        torch.randn(f_count, 5, dtype=torch.float64),
        torch.randn(f_count, 3, dtype=torch.float64),
    )
    deeponet = dde.nn.DeepONetCartesianProd([5, 12, 12], [2, 12, 12], "tanh", "Glorot normal")
    mionet = dde.nn.MIONetCartesianProd([5, 12], [3, 12], [2, 12, 12], "tanh", "Glorot normal")
    points = torch.rand(p_count, 2, dtype=torch.float64)
    for net, inputs in [(deeponet.double(), (u,)), (mionet.double(), (u, v))]:
        on_points = lambda y, net=net, inputs=inputs: net((*inputs, y)).T  # noqa: E731
        want = _point_laplacians(on_points, points)
        weights = torch.randn_like(want)
        params = list(net.parameters())
        want_grads = torch.autograd.grad((want * weights).sum(), params, materialize_grads=True)
        for method in ("auto", "taylor", "forward-over-reverse", "grad-of-grad", "hessian"):
            got = torchdiv.laplacian(on_points, points, method=method)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            grads = torch.autograd.grad((got * weights).sum(), params, materialize_grads=True)
            for g, w in zip(grads, want_grads, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        leaf = points.clone().requires_grad_(True)
        outputs = net((*inputs, leaf))
        for i in range(
            f_count
        ):  # what PDEOperatorCartesianProd passes pde: (x, outputs[i][:, None])
            got = torchdiv.graph_laplacian(outputs[i][:, None], leaf, create_graph=True)
            torch.testing.assert_close(got, want[:, i : i + 1], rtol=1e-10, atol=1e-12)
    square = torch.randn(p_count, 5, dtype=torch.float64)
    with pytest.raises(torchdiv.BatchInteractionError, match="dimension 1 of f's output"):
        torchdiv.laplacian(lambda y: deeponet((square, y)), points)


@pytest.mark.slow
def test_pde_operator_cartesian_prod_trains_the_same_with_torchdiv() -> None:
    """PI-DeepONet for ``-u'' = v`` on ``[0, 1]`` (DeepXDE's ``PDEOperatorCartesianProd``, 8
    Adam steps in float32): ``dde.grad.hessian`` in ``pde``, ``graph_laplacian`` on the column
    DeepXDE passes, and, with DeepXDE's forward-mode autodiff, ``laplacian`` of the
    ``forward_call`` it passes, transposed: the same losses to float32 round-off."""

    def train(residual, autodiff: str = "reverse") -> list[float]:
        dde.config.set_default_autodiff(autodiff)
        try:
            dde.config.set_random_seed(0)
            geom = dde.geometry.Interval(0, 1)
            pde = dde.data.PDE(
                geom,
                lambda x, y, v: residual(x, y) - v,
                dde.icbc.DirichletBC(geom, lambda _: 0, lambda _, on_boundary: on_boundary),
                num_domain=24,
                num_boundary=2,
            )
            sensors = geom.uniform_points(8, boundary=True)
            data = dde.data.PDEOperatorCartesianProd(
                pde, dde.data.PowerSeries(N=4), sensors, num_function=12, num_test=4, batch_size=6
            )
            net = dde.nn.DeepONetCartesianProd([8, 16, 16], [1, 16, 16], "tanh", "Glorot normal")
            model = dde.Model(data, net)
            model.compile("adam", lr=1e-3)
            losses, _ = model.train(iterations=8, display_every=4, verbose=0)
        finally:
            dde.config.set_default_autodiff("reverse")
        return [float(v) for loss in losses.loss_train for v in loss]

    want = train(lambda x, y: -dde.grad.hessian(y, x))
    graph = train(lambda x, y: -torchdiv.graph_laplacian(y, x, create_graph=True))
    forward = train(lambda x, y: -torchdiv.laplacian(lambda t: y[1](t).T, x).T, "forward")
    assert len(want) == 6
    for got in (graph, forward):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-7)
