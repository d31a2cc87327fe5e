"""Plain-autograd rows of small square problems: ``torch.func.vmap`` of ``autograd.grad``, its
fallback, its warnings, and the watch on the evaluation that feeds them."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import (
    LegacyCube,
    assert_close,
    central_difference,
    directional_gradient,
    shifted,
    tanh_mlp,
)
from torch.func import jacrev, vmap

import torchdiv
from torchdiv._core.basis import quiet_batching
from torchdiv._exact.autograd import LOOP_ROWS, GraphJacobian


def _per_sample(f, x: torch.Tensor) -> torch.Tensor:
    """``(B, m, n)``: ``torch.func.vmap(jacrev)`` of ``f`` on one sample."""
    return vmap(jacrev(lambda z: f(z[None])[0]))(x)


def _no_legacy_batching(monkeypatch) -> None:
    """Fail where ``autograd.grad`` is asked for its legacy ``is_grads_batched``."""
    grad = torch.autograd.grad

    def spy(*args, **kwargs):
        assert not kwargs.get("is_grads_batched"), "is_grads_batched"
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)


@pytest.mark.parametrize(
    ("d", "batch"),
    [(LOOP_ROWS + 1, 16), (16, 256)],  # tiny; up to ROWS_PROBLEM
)
def test_rows_match_jacrev_per_sample_with_parameter_gradients(monkeypatch, d, batch):
    """Values of the three operators and the parameter gradient of a loss of the Jacobian
    against ``vmap(jacrev)`` per sample, float64, on the first (watched) and a later call, with
    every batch of rows through ``torch.func.vmap`` (no legacy ``is_grads_batched``); the
    divergence's parameter gradient also against central differences."""
    _no_legacy_batching(monkeypatch)
    torch.manual_seed(0)
    net = tanh_mlp(d, 8, d)
    x = torch.randn(batch, d, dtype=torch.float64)
    want = _per_sample(net, x)
    weights = torch.randn_like(want)
    params = list(net.parameters())

    def grads(jac):
        return torch.autograd.grad(
            (jac * weights).sum(), params, allow_unused=True, materialize_grads=True
        )

    want_grads = grads(want)
    for _ in range(2):  # the first call is watched; later ones may be unwatched rows
        jac = torchdiv.jacobian(net, x)
        assert_close(jac, want)
        for got, expected in zip(grads(jac), want_grads, strict=True):
            assert_close(got, expected)
        assert_close(torchdiv.jacobian_diagonal(net, x), want.diagonal(dim1=1, dim2=2))
    div = torchdiv.divergence(net, x)
    assert_close(div, want.diagonal(dim1=1, dim2=2).sum(-1))
    directions = [torch.randn_like(p) for p in params]
    analytic = directional_gradient(div, params, directions)

    def moved(t):
        with shifted(params, directions, t), torch.no_grad():
            return torch.einsum("bii->", _per_sample(net, x))

    numeric = central_difference(moved).item()
    assert abs(analytic - numeric) <= 1e-8 * max(1.0, abs(numeric))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_fallback_evaluation_is_watched_for_mixing(requires_grad):
    """Where ``torch.func`` cannot run ``f`` (a legacy ``autograd.Function``), plain autograd
    evaluates it under the watch, which now follows its copy of ``x``: a mix is refused (the
    custom function's own output is not followed: the ops inside run without grad)."""
    x = torch.randn(64, 3, dtype=torch.float64, requires_grad=requires_grad)
    cube = LegacyCube.apply
    assert_close(torchdiv.divergence(cube, x), (3 * x.detach() ** 2).sum(-1))
    for mixes in (lambda z: cube(z) + z.mean(0), lambda z: cube(z) + z * z[0]):
        for op in (torchdiv.divergence, torchdiv.jacobian):
            with pytest.raises(torchdiv.BatchInteractionError):
                op(mixes, x)


class _NonzeroInBackward(torch.autograd.Function):
    """``2 x``, whose backward calls ``nonzero`` (data-dependent shape): ``torch.func.vmap``
    refuses it, ``is_grads_batched``'s legacy ``vmap`` loops over it."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad + 0 * grad.nonzero().sum()


def test_rows_fall_back_to_is_grads_batched_where_vmap_raises():
    x = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    y = _NonzeroInBackward.apply(x)
    engine = GraphJacobian(y, x, 1, create_graph=False)
    rows = engine.block(0, 8)  # (8, 64, 8): row i of each sample's 2 I
    assert_close(rows, 2 * torch.eye(8, dtype=x.dtype)[:, None].expand(8, 64, 8))


def test_no_batching_rule_warning_from_rows():
    """``cummax``'s backward has no batching rule: ``vmap`` runs it by a loop and warns; the
    rows do not pass that warning on (the suite turns warnings into errors), and a warning
    filter of the caller's is left as it was."""
    torch.manual_seed(0)
    x = torch.randn(512, 8, dtype=torch.float64)

    def f(z):
        return torch.cummax(z, -1).values

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the reference's own vmap warns)
        want = _per_sample(f, x)
    before = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            assert_close(torchdiv.jacobian(f, x), want)
    assert warnings.filters == before


def test_quiet_batching_leaves_other_filters_and_nests():
    before = list(warnings.filters)
    with quiet_batching:
        with quiet_batching:
            inside = list(warnings.filters)
        warnings.filterwarnings("ignore", "a filter of the caller.s")  # meanwhile
        mine = warnings.filters[0]
    try:
        assert len(inside) == len(before) + 1
        assert warnings.filters == [mine, *before]
    finally:
        warnings.filters.remove(mine)
    assert warnings.filters == before
