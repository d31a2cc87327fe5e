"""Training-loop idioms around ``estimate_trace`` (optim27).

Residual Flows and i-ResNets (Behrmann et al. 2019, Chen et al. 2019) estimate
``log det(I + J_g) = sum_k (-1)^(k+1) / k tr(J_g^k)`` by Hutchinson: ``v^T (J_g^T)^k v`` from
``k`` vector-Jacobian products, ``g`` a residual branch whose layers are divided by their
spectral norm (``torch.nn.utils.spectral_norm``: in training mode every forward runs a power
iteration that updates the buffers ``u`` and ``v`` in place). Written with ``estimate_trace``,
``matmat`` is that power series; a functional ``matmat`` evaluates ``g`` itself, and
``estimate_trace`` calls it once per chunk of probes (and twice or more for Hutch++ and
XTrace, once per block in the tolerance mode). Each call ran ``g``'s power iteration once
more, so the chunks estimated the traces of different operators (each with its own ``sigma``)
and the call left ``u``, ``v`` several iterations on: with 6 probes in chunks of 2 the
estimate was 0.046 off the one-evaluation estimate and the buffers 0.31, silently. Each
call of ``matmat`` now starts from the state the first found, as ``f``'s evaluations do in
``divergence``. The reference: the same Hutchinson sum by hand on one evaluation of ``g``
(``torch.autograd.grad`` in float64).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchdiv
from tests.conftest import assert_close

f64 = torch.float64
D, B, K = 4, 5, 6
COEFFICIENTS = (1.0, -1 / 2, 1 / 3, -1 / 4)  # log(1 + t) = t - t^2/2 + t^3/3 - ...


def _branch(dropout: bool = False) -> nn.Module:
    """An i-ResNet branch ``g``: legacy spectral norms (train mode: a power iteration at every
    forward), optionally a dropout (a draw at every forward)."""
    torch.manual_seed(0)
    layers = [nn.Linear(D, 16), nn.ELU(), nn.Linear(16, D)]
    if dropout:
        layers.insert(2, nn.Dropout(0.3))
    g = nn.Sequential(*layers).to(f64)
    nn.utils.spectral_norm(g[0])
    nn.utils.spectral_norm(layers[-1])
    return g.train()


def _series(
    gx: torch.Tensor,
    z: torch.Tensor,
    probes: torch.Tensor,
    coefficients: tuple[float, ...] = COEFFICIENTS,
) -> torch.Tensor:
    """``sum_k c_k (J^T)^k V`` for a stack of probes ``V`` (batched VJPs on ``gx``'s graph)."""
    out, w = torch.zeros_like(probes), probes
    for c in coefficients:
        (w,) = torch.autograd.grad(gx, z, w, create_graph=True, is_grads_batched=True)
        out = out + c * w
    return out


def _functional(g: nn.Module, x: torch.Tensor):
    """The power series as a ``matmat`` that evaluates ``g`` at each call."""

    def matmat(probes: torch.Tensor) -> torch.Tensor:
        z = x.detach().requires_grad_(True)
        return _series(g(z), z, probes)

    return matmat


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(B, D, dtype=f64, generator=torch.Generator().manual_seed(1))
    signs = torch.randint(0, 2, (K, B, D), generator=torch.Generator().manual_seed(2))
    return x, (2 * signs - 1).to(f64)


@pytest.mark.parametrize("chunk_size", [1, 2, 4])
@pytest.mark.parametrize("dropout", [False, True])
def test_a_power_series_log_det_by_chunks_is_one_evaluation_s(chunk_size: int, dropout: bool):
    """Values and parameter gradients of the chunked estimate are those of the hand sum on one
    evaluation of ``g`` (one power iteration, one dropout mask), and ``g``'s buffers and the
    random generator are left as that one evaluation left them."""
    x, probes = _inputs()
    g, once = _branch(dropout), _branch(dropout)
    torch.manual_seed(5)
    z = x.detach().requires_grad_(True)
    want = (_series(once(z), z, probes) * probes).sum(-1).mean(0)
    rng = torch.get_rng_state()
    torch.manual_seed(5)
    est = torchdiv.estimate_trace(_functional(g, x), x, probes=probes, chunk_size=chunk_size)
    assert_close(est.value, want)  # (float64: a few hundred flops deep)
    assert torch.equal(torch.get_rng_state(), rng)
    for name, buffer in once.named_buffers():
        assert_close(g.get_buffer(name), buffer)
    assert_gradients_alike(est.value, list(g.parameters()), want, list(once.parameters()))


def assert_gradients_alike(
    value: torch.Tensor, params: list, want: torch.Tensor, ref: list
) -> None:
    """The gradients of ``value.square().sum()`` in ``params`` equal those of ``want``'s in
    their copies ``ref``, ``None`` (unused) alike."""
    got = torch.autograd.grad(value.square().sum(), params, allow_unused=True)
    expected = torch.autograd.grad(want.square().sum(), ref, allow_unused=True)
    for a, b in zip(got, expected, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b)


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_a_sketching_estimate_sees_one_operator(method: str):
    """Hutch++ and XTrace call ``matmat`` for the sketch and again for the residual probes:
    a functional ``matmat`` gives the estimate of the one-evaluation operator (a ``matmat``
    over one kept graph, the same generator), and ``g``'s buffers move once."""
    x, _ = _inputs()
    g, kept = _branch(), _branch()
    z = x.detach().requires_grad_(True)
    gx = kept(z)
    want = torchdiv.estimate_trace(
        lambda v: _series(gx, z, v),
        x,
        method=method,
        num_probes=6,
        generator=torch.Generator().manual_seed(3),
    )
    est = torchdiv.estimate_trace(
        _functional(g, x),
        x,
        method=method,
        num_probes=6,
        generator=torch.Generator().manual_seed(3),
    )
    assert_close(est.value, want.value)
    assert_close(est.stderr, want.stderr)
    for name, buffer in kept.named_buffers():
        assert_close(g.get_buffer(name), buffer)


def test_the_tolerance_mode_s_blocks_see_one_operator():
    """In the tolerance mode every block calls ``matmat``; each sees the operator of the first
    evaluation (two copies of ``g`` at one state agree whatever the blocks), and ``g``'s
    buffers are one forward's."""
    x, _ = _inputs()
    g, once = _branch(), _branch()
    once(x)
    z = x.detach().requires_grad_(True)
    kept = copy.deepcopy(_branch())
    gx = kept(z)
    options = dict(num_probes=4, rtol=1e-3, max_probes=16)
    with pytest.warns(UserWarning, match="max_probes"):
        want = torchdiv.estimate_trace(
            lambda v: _series(gx, z, v), x, generator=torch.Generator().manual_seed(4), **options
        )
    with pytest.warns(UserWarning, match="max_probes"):
        est = torchdiv.estimate_trace(
            _functional(g, x), x, generator=torch.Generator().manual_seed(4), **options
        )
    assert est.num_probes == want.num_probes == 16
    assert_close(est.value, want.value)
    for name, buffer in once.named_buffers():
        assert_close(g.get_buffer(name), buffer)


def test_a_functional_power_series_inside_parametrize_cached():
    """Inside ``parametrize.cached()`` with a train-mode ``parametrizations.spectral_norm``:
    the second ``matmat`` call read the weight the first cached, skipped the power iteration
    and was refused ("f wrote other values"); now every call computes it from the state the
    first found, the estimate is the hand sum on one evaluation in the block, and the weight
    is cached for the block's next forward."""
    x, probes = _inputs()
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(D, 16), nn.ELU(), nn.Linear(16, D)).to(f64).train()
    nn.utils.parametrizations.spectral_norm(g[0])
    once = copy.deepcopy(g)
    with nn.utils.parametrize.cached():
        est = torchdiv.estimate_trace(_functional(g, x), x, probes=probes, chunk_size=2)
        y = g(x)
    with nn.utils.parametrize.cached():
        z = x.detach().requires_grad_(True)
        want = (_series(once(z), z, probes) * probes).sum(-1).mean(0)
        y_want = once(x)
    assert_close(est.value, want)
    assert_close(y, y_want)
    for name, buffer in once.named_buffers():
        assert torch.equal(g.get_buffer(name), buffer), name
