"""The real nflows and normflows packages, used as their users use them (rev-nflows19).

``tests/models/test_nflows_style.py`` checks flows written the way these libraries write them;
here the packages' own classes run: nflows' masked autoregressive transforms (affine and
rational-quadratic, with a context), couplings over its ``ResidualNet``,
``CompositeTransform`` with ``RandomPermutation``, ``LULinear`` and ``BatchNorm``,
``ActNorm``; normflows' ``MaskedAffineFlow``, Real NVP's ``AffineCouplingBlock``, a Glow block
(whose ``ActNorm`` initialises from the data at the first call), planar, radial and
neural-spline flows and the invertible residual block (``Residual``) with its own
power-series log-det.

References, independent of torchdiv: the packages' own log-dets (a triangular Jacobian's
``log|det J| = sum log|diag J|`` checks ``jacobian_diagonal``; ``slogdet`` a full Jacobian),
the per-sample blocks of the whole batch's Jacobian by plain autograd, one element at a time
(where a batch norm's mixing shows), and parameter gradients of losses built from both.
"""

from __future__ import annotations

import copy

import pytest
import torch

nflows = pytest.importorskip("nflows")
nf = pytest.importorskip("normflows")

from conftest import assert_close, assert_same_parameter_gradients, sampled_daily  # noqa: E402
from nflows import transforms  # noqa: E402
from nflows.nn.nets import ResidualNet  # noqa: E402
from nflows.utils import create_alternating_binary_mask  # noqa: E402

import torchdiv  # noqa: E402
from torchdiv._exact.autograd import UndifferentiableBackward  # noqa: E402

f64 = torch.float64
METHODS = ["auto", "reverse", "forward"]
D = 4


def _perturbed(module: torch.nn.Module, scale: float = 0.3, seed: int = 1) -> torch.nn.Module:
    """Parameters moved off their initial values (which often make the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _blocks(f, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Each sample's block ``d f(x)[b] / d x[b]`` of the whole batch's Jacobian, ``(B, m, n)``,
    by one ``autograd.grad`` per output element of the batch: mixing shows here."""
    leaf = x.detach().requires_grad_(True)
    y = f(leaf).reshape(len(x), -1)
    rows = [
        torch.autograd.grad(y[b, i], leaf, retain_graph=True, create_graph=create_graph)[0][b]
        for b in range(len(x))
        for i in range(y.shape[1])
    ]
    return torch.stack(rows).reshape(len(x), y.shape[1], -1)


def _inputs(batch: int = 5, dtype: torch.dtype = f64, seed: int = 0) -> torch.Tensor:
    """Samples spread past the splines' tail bound (3) on some entries."""
    return 1.8 * torch.randn(batch, D, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _assert_jacobian_log_det(flow: torch.nn.Module, method: str) -> None:
    """``flow``'s Jacobian (of ``x -> flow(x)[0]``) is the batch's blocks; its ``slogdet`` is
    the flow's own log-det ``flow(x)[1]``, with its parameter gradients."""
    x = _inputs()
    jac = torchdiv.jacobian(lambda z: flow(z)[0], x, method=method)
    assert_close(jac, _blocks(lambda z: flow(z)[0], x))
    log_det, own = torch.linalg.slogdet(jac)[1], flow(x)[1]
    assert_close(log_det, own)
    assert_same_parameter_gradients(flow, log_det.square().sum(), own.square().sum())


_CONTEXT = torch.randn(5, 3, dtype=f64, generator=torch.Generator().manual_seed(11))


def _residual_net(features: int, out_features: int) -> torch.nn.Module:
    return ResidualNet(features, out_features, hidden_features=16, num_blocks=2)


# nflows' transforms whose Jacobian is triangular (up to a permutation of both sides): each
# returns ``(z, logabsdet)`` from ``(x, context)``
_TRIANGULAR = {
    "maf": lambda: transforms.MaskedAffineAutoregressiveTransform(D, 16, num_blocks=2),
    "maf-spline": lambda: transforms.MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
        D, 16, num_bins=5, tails="linear", tail_bound=3.0
    ),
    "maf-context": lambda: transforms.MaskedAffineAutoregressiveTransform(
        D, 16, context_features=3, num_blocks=2
    ),
    "affine-coupling": lambda: transforms.AffineCouplingTransform(
        create_alternating_binary_mask(D, even=True), _residual_net
    ),
    "spline-coupling": lambda: transforms.PiecewiseRationalQuadraticCouplingTransform(
        create_alternating_binary_mask(D, even=False),
        _residual_net,
        num_bins=5,
        tails="linear",
        tail_bound=3.0,
    ),
}


def _nflows(name: str) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    context = {"context": _CONTEXT} if name == "maf-context" else {}
    return _perturbed(_TRIANGULAR[name]().double()).eval(), context


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "name", sampled_daily(list(_TRIANGULAR), {"maf-spline", "affine-coupling", "spline-coupling"})
)
def test_an_nflows_triangular_transform_diagonal_is_its_logabsdet(name: str, method: str) -> None:
    """``sum log|jacobian_diagonal|`` is the transform's own ``logabsdet``, with its parameter
    gradients; the diagonal is the whole batch's Jacobian's."""
    flow, context = _nflows(name)
    x = _inputs()
    diag = torchdiv.jacobian_diagonal(lambda z: flow(z, **context)[0], x, method=method)
    assert_close(diag, torch.diagonal(_blocks(lambda z: flow(z, **context)[0], x), 0, 1, 2))
    log_det, own = diag.abs().log().sum(1), flow(x, **context)[1]
    assert_close(log_det, own)
    weights = torch.linspace(0.5, 1.5, len(x), dtype=f64)
    assert_same_parameter_gradients(flow, (weights * log_det).sum(), (weights * own).sum())


def test_an_nflows_context_flow_in_float32_at_batch_size_one() -> None:
    """One sample in float32: the diagonal's log-det is the flow's within float32's rounding."""
    flow, context = _nflows("maf-context")
    flow = flow.float()
    x, context = _inputs(1, torch.float32), {"context": _CONTEXT[:1].float()}
    diag = torchdiv.jacobian_diagonal(lambda z: flow(z, **context)[0], x)
    assert diag.dtype == torch.float32
    assert_close(diag.abs().log().sum(1), flow(x, **context)[1])


@pytest.mark.parametrize("method", METHODS)
def test_an_nflows_composite_jacobian_log_det(method: str) -> None:
    """MAF, ``RandomPermutation`` (a buffer of indices), ``LULinear`` and ``BatchNorm`` in eval
    mode: the Jacobian's ``slogdet`` is the composite's ``logabsdet``, with its gradients."""
    torch.manual_seed(0)
    flow = transforms.CompositeTransform(
        [
            transforms.MaskedAffineAutoregressiveTransform(D, 16, num_blocks=2),
            transforms.RandomPermutation(D),
            transforms.LULinear(D, identity_init=False),
            transforms.BatchNorm(D),
        ]
    )
    flow = _perturbed(flow.double()).eval()
    _assert_jacobian_log_det(flow, method)


def test_nflows_batch_norms_in_train_mode_are_refused() -> None:
    """nflows' ``BatchNorm`` normalises by the batch's mean and variance (``mean(0)``): mixing,
    which ``"auto"`` refuses with the running statistics left as they were (the explicit
    methods do not look for reductions over the batch: limitations); a ``ResidualNet`` with
    ``use_batch_norm`` (``nn.BatchNorm1d``) is refused by every method."""
    torch.manual_seed(0)
    flow = transforms.CompositeTransform(
        [transforms.MaskedAffineAutoregressiveTransform(D, 16), transforms.BatchNorm(D)]
    ).double()
    x = _inputs()
    running = flow._transforms[1].running_mean.clone()
    for op in (torchdiv.divergence, torchdiv.jacobian_diagonal):
        with pytest.raises(torchdiv.BatchInteractionError, match="mean over samples"):
            op(lambda z: flow(z)[0], x)
    assert torch.equal(flow._transforms[1].running_mean, running)
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.check_batch_independence(lambda z: flow(z)[0], x)
    coupling = transforms.AffineCouplingTransform(
        create_alternating_binary_mask(D, even=True),
        lambda i, o: ResidualNet(i, o, hidden_features=16, num_blocks=1, use_batch_norm=True),
    ).double()
    for method in ("auto", "reverse", "forward", "structured"):
        with pytest.raises(torchdiv.BatchInteractionError, match="batch norm in train mode"):
            torchdiv.divergence(lambda z: coupling(z)[0], x, method=method)


_ACT_NORMS = {
    "nflows": lambda: transforms.ActNorm(D).double(),
    "normflows": lambda: nf.flows.ActNorm((D,)).double(),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("package", list(_ACT_NORMS))
def test_act_norm_initialised_from_the_first_batch(package: str, method: str) -> None:
    """``ActNorm`` sets its scale and shift from the first batch it sees (as constants: nflows
    under ``no_grad``, normflows through ``.data``): the call's Jacobian is that of one
    evaluation of a copy, and the layer is left as that evaluation left it, initialised once."""
    layer = _ACT_NORMS[package]()
    once = copy.deepcopy(layer)
    x = 2.0 * _inputs() + 1.0
    jac = torchdiv.jacobian(lambda z: layer(z)[0], x, method=method)
    assert_close(jac, _blocks(lambda z: once(z)[0], x))
    theirs = once.state_dict()
    for name, mine in layer.state_dict().items():
        assert torch.equal(mine, theirs[name]), name
    # the scale 1 / std (normflows adds 1e-6 to std: 5e-7 relative at std ~ 2)
    scale = torch.diagonal(jac, 0, 1, 2)
    torch.testing.assert_close(scale, 1 / x.std(0).expand_as(x), rtol=1e-6, atol=0)


def _masked_affine() -> torch.nn.Module:
    s, t = nf.nets.MLP([D, 16, D], init_zeros=False), nf.nets.MLP([D, 16, D], init_zeros=False)
    return nf.flows.MaskedAffineFlow(torch.tensor([1.0, 0.0, 1.0, 0.0]), t, s)


# normflows' flows on vectors: ``forward(z) -> (z', log_det)``
_NORMFLOWS = {
    "masked-affine": _masked_affine,
    "real-nvp": lambda: nf.flows.AffineCouplingBlock(nf.nets.MLP([D // 2, 16, D])),
    "planar": lambda: nf.flows.Planar((D,)),
    "radial": lambda: nf.flows.Radial((D,)),
    "autoregressive-spline": lambda: nf.flows.AutoregressiveRationalQuadraticSpline(D, 2, 16),
    "coupled-spline": lambda: nf.flows.CoupledRationalQuadraticSpline(D, 2, 16),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "name",
    sampled_daily(
        list(_NORMFLOWS), {"masked-affine", "planar", "autoregressive-spline", "coupled-spline"}
    ),
)
def test_a_normflows_flow_jacobian_log_det(name: str, method: str) -> None:
    """The Jacobian is the batch's blocks; its ``slogdet`` is the flow's ``log_det``, with
    its parameter gradients."""
    torch.manual_seed(0)
    flow = _perturbed(_NORMFLOWS[name]().double())
    _assert_jacobian_log_det(flow, method)


@pytest.mark.filterwarnings("ignore:torch.lu is deprecated")  # (normflows' LU set-up)
@pytest.mark.slow  # (normflows' GlowBlock takes 0.25 s a forward pass on 2 cores)
@pytest.mark.parametrize("method", METHODS)
def test_a_normflows_glow_block_on_images(method: str) -> None:
    """A Glow block (affine coupling over a conv net, invertible 1x1 convolution by LU, and an
    ``ActNorm`` initialised by this first call) on ``(B, C, H, W)`` events."""
    torch.manual_seed(0)
    block = _perturbed(nf.flows.GlowBlock(2, 8, init_zeros=False).double())
    once = copy.deepcopy(block)
    x = torch.randn(3, 2, 3, 3, dtype=f64, generator=torch.Generator().manual_seed(2))
    jac = torchdiv.jacobian(lambda z: block(z)[0], x, method=method)
    assert jac.shape == (3, 2, 3, 3, 2, 3, 3)
    flat = jac.reshape(3, 18, 18)
    assert_close(flat, _blocks(lambda z: once(z)[0], x))
    assert_close(torch.linalg.slogdet(flat)[1], block(x)[1])


def _residual(reduce_memory: bool, train: bool, features: int = D) -> torch.nn.Module:
    """normflows' ``Residual`` over a ``LipschitzMLP``; a three-term power series (no draws
    from NumPy's generator) in train mode."""
    torch.manual_seed(7)
    net = nf.nets.LipschitzMLP([features, 16, features], init_zeros=False)
    flow = nf.flows.Residual(net, reduce_memory=reduce_memory, n_power_series=3)
    return flow.double().train(train)


def test_a_normflows_residual_block_brute_force_log_det() -> None:
    """In eval mode on 2-D data ``iResBlock`` computes its log-det exactly (``autograd.grad``
    inside ``forward``): ``"auto"``'s Jacobian (``x -> x + g(x)``, its ``inverse``) has it."""
    flow = _residual(reduce_memory=True, train=False, features=2)
    x = _inputs()[:, :2]
    jac = torchdiv.jacobian(lambda z: flow.inverse(z)[0], x)
    assert_close(jac, _blocks(lambda z: flow.inverse(z)[0], x))
    assert_close(torch.linalg.slogdet(jac)[1], flow.inverse(x)[1])


def test_a_normflows_residual_block_divergence_parameter_gradients() -> None:
    """Training mode: the divergence of ``x -> x + g(x)`` and a loss mixing it with the flow's
    own log-det estimate. Without ``reduce_memory`` its gradients are the reference's; with it
    (normflows' default) ``g`` comes out of ``MemoryEfficientLogDetEstimator``, whose backward
    calls ``autograd.grad`` without ``create_graph``: the divergence's values are right, and
    its parameter gradients, which that backward drops, are refused (they were silently
    missing: the loss's gradients 100% off, the divergence without a graph)."""
    x = _inputs()
    plain = _residual(reduce_memory=False, train=True)
    want = torch.diagonal(_blocks(lambda z: plain.inverse(z)[0], x, True), 0, 1, 2).sum(1)
    div = torchdiv.divergence(lambda z: plain.inverse(z)[0], x)
    assert_close(div, want)
    log_det = plain.inverse(x)[1]
    assert_same_parameter_gradients(
        plain, div.square().sum() - log_det.sum(), want.square().sum() - log_det.sum()
    )
    lean = _residual(reduce_memory=True, train=True)
    div = torchdiv.divergence(lambda z: lean.inverse(z)[0], x)
    assert_close(div, want)
    loss = div.square().mean() - lean.inverse(x)[1].mean()
    with pytest.raises(UndifferentiableBackward, match="MemoryEfficientLogDetEstimator"):
        loss.backward()


def test_a_normflows_residual_block_drawing_from_numpy() -> None:
    """In train mode (no ``n_power_series``) ``iResBlock`` draws its power series' length from
    NumPy's global generator (``np.random.geometric``) and writes it into a buffer: every
    evaluation of a call draws the same and the call leaves NumPy's generator, torch's and the
    buffers as one evaluation does (with ``reduce_memory``, normflows' default, it was refused:
    "f wrote other values ... at two evaluations", the draws differing)."""
    np = pytest.importorskip("numpy")
    x = _inputs()
    flow = _residual(reduce_memory=True, train=True)
    flow.iresblock.n_power_series = None
    once = copy.deepcopy(flow)
    # the same x + g(x) without reduce_memory (a backward of MemoryEfficientLogDetEstimator's
    # can run once: its reference Jacobian cannot be taken row by row)
    plain = _residual(reduce_memory=False, train=True)
    np.random.seed(3)
    torch.manual_seed(3)
    once.inverse(x)
    states = np.random.get_state()[1], torch.get_rng_state()
    theirs = {name: value.clone() for name, value in once.state_dict().items()}
    np.random.seed(3)
    torch.manual_seed(3)
    div = torchdiv.divergence(lambda z: flow.inverse(z)[0], x)
    assert np.array_equal(np.random.get_state()[1], states[0])
    assert torch.equal(torch.get_rng_state(), states[1])
    for name, mine in flow.state_dict().items():
        assert torch.equal(mine, theirs[name]), name
    assert_close(div, torch.diagonal(_blocks(lambda z: plain.inverse(z)[0], x), 0, 1, 2).sum(1))
