"""Factorizations of weights (``svd``, ``eigh``, ``pinv``, ``matrix_norm(W, 2)``) in a watched
``f``: ops that raise on their argument's values (``reads._CHECKS_VALUES``), where ``f`` may
catch the error and take another branch. On a parameter ``f`` held before the call, whether
it raises follows from that parameter alone, which ``x`` did not set: the pass holds for any
``x`` while the parameter stays as it was (``Verdict.while_held``), so a spectrally
normalised net is watched once, and again after a write into the weight. On a tensor computed
from ``x`` (a per-sample Kabsch alignment), the pass holds for those values of ``x`` only.

References: per-sample traces of the float64 Jacobian of one sample at a time (plain
autograd, ``torch.autograd.functional.jacobian``) and their parameter gradients by autograd
through ``create_graph``; the engine sums the same products (1e-12).
"""

from __future__ import annotations

import pytest
import torch

import torchdiv
from torchdiv import BatchInteractionError
from torchdiv._core.mixing.watch import verdicts, watched

f64 = torch.float64


class SpectralMLP(torch.nn.Module):
    """An MLP whose weights are divided by their spectral norm at every forward (a
    Lipschitz-bounded residual block's, as in invertible ResNets written without
    ``torch.nn.utils.parametrizations.spectral_norm``'s power iteration)."""

    def __init__(self, d: int, h: int, fallback: bool = False) -> None:
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(d, h), torch.nn.Linear(h, d)
        self.fallback = fallback

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            w1 = self.l1.weight / torch.linalg.matrix_norm(self.l1.weight, 2)
        except RuntimeError:  # (a fallback that centres the batch: mixes samples)
            if not self.fallback:
                raise
            return x - x.mean(0)
        w2 = self.l2.weight / torch.linalg.svdvals(self.l2.weight.mT)[0]
        h = torch.tanh(torch.nn.functional.linear(x, w1, self.l1.bias))
        return torch.nn.functional.linear(h, w2, self.l2.bias)


def _reference(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-sample divergences (one sample at a time) and the parameter gradients of their
    sum of squares (the last bias, unused by the divergence: zeros)."""
    div = torch.stack(
        [
            torch.autograd.functional.jacobian(net, s[None], create_graph=True)[0, :, 0].trace()
            for s in x
        ]
    )
    grads = torch.autograd.grad((div**2).sum(), list(net.parameters()), materialize_grads=True)
    return div.detach(), list(grads)


def test_a_spectrally_normalised_net_is_watched_once_while_its_weights_stay(
    watches: list[int],
) -> None:
    """Watched once over three new ``x``; a write into a weight (an optimizer's step) makes
    the next call watched again. Values and parameter gradients are the per-sample ones."""
    torch.manual_seed(0)
    net = SpectralMLP(3, 8).to(f64)
    for _ in range(3):
        x = torch.randn(5, 3, dtype=f64)
        div = torchdiv.divergence(net, x)
        got = torch.autograd.grad((div**2).sum(), list(net.parameters()), materialize_grads=True)
        want, grads = _reference(net, x)
        torch.testing.assert_close(div.detach(), want, rtol=1e-12, atol=1e-12)
        for g, w in zip(got, grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert len(watches) == 1
    with torch.no_grad():
        net.l2.weight.mul_(1.5)
    torchdiv.divergence(net, x)
    assert len(watches) == 2


def _nan_in_place(layer: torch.nn.Linear) -> object:
    with torch.no_grad():
        layer.weight.fill_(float("nan"))
    return None


def _nan_through_data(layer: torch.nn.Linear) -> object:
    layer.weight.data.fill_(float("nan"))  # (a hand-written step, ``p.data -= lr * g``)
    return None


def _nan_data_assigned(layer: torch.nn.Linear) -> object:
    layer.weight.data = torch.full_like(layer.weight, float("nan"))  # (as ``_apply`` sets)
    return None


def _nan_parameter_replaced(layer: torch.nn.Linear) -> object:
    old = layer.weight  # (kept alive, unchanged: as an optimizer's list holds it)
    layer.weight = torch.nn.Parameter(torch.full_like(old, float("nan")))
    return old


@pytest.mark.parametrize(
    "write", [_nan_in_place, _nan_through_data, _nan_data_assigned, _nan_parameter_replaced]
)
def test_a_fallback_when_a_weights_factorization_fails_is_refused(write) -> None:
    """``try: matrix_norm(W, 2) except: <centre the batch>``: two passing calls, then the
    weight turns non-finite (LAPACK raises): the fallback's call is watched and refused, not
    served by the first calls' pass. Written in place; through ``.data`` (its version
    unchanged) or replaced by another parameter while the old one lives: served unwatched,
    the divergence 0 where the full Jacobian's off-diagonal blocks are 0.06-0.2, until
    rev-merges17a."""
    torch.manual_seed(1)
    net = SpectralMLP(3, 8, fallback=True).to(f64)
    x = torch.randn(5, 3, dtype=f64)
    for _ in range(2):
        torchdiv.divergence(net, x)
    kept = write(net.l1)
    with pytest.raises(BatchInteractionError, match="mixes samples"):
        torchdiv.divergence(net, x)
    del kept


def _kabsch(x: torch.Tensor, *, quiet: bool = False) -> torch.Tensor:
    """Each sample's 4 points rotated onto a fixed template (Kabsch: the ``svd`` of their
    cross-covariance); where it fails, the batch's mean rotation (mixes samples). ``quiet``:
    the rotation under ``no_grad`` (a frame, as equivariant models canonicalise)."""
    p = x.view(-1, 4, 3)
    q = torch.arange(12, dtype=x.dtype).view(4, 3).sin()
    try:
        with torch.no_grad() if quiet else torch.enable_grad():
            u, _, vh = torch.linalg.svd(p.mT @ q)
    except RuntimeError:
        return x - x.mean(0)
    return torch.tanh(p @ (u @ vh)).reshape(x.shape)


@pytest.mark.parametrize("quiet", [False, True], ids=["graph", "no_grad"])
def test_a_per_sample_factorization_holds_for_those_values_only(quiet: bool) -> None:
    """The ``svd`` of values computed from ``x`` (under ``no_grad`` too, where no batch axis
    is followed): the verdict keeps nothing, and a later ``x`` on which it fails takes the
    mixing fallback, refused."""
    x = torch.randn(3, 12, dtype=f64)
    with verdicts() as seen:
        watched(lambda z: _kabsch(z, quiet=quiet), x, 1)
    assert seen.verdict.kept() is None
    f = lambda z: _kabsch(z, quiet=quiet)  # noqa: E731
    for _ in range(2):
        torchdiv.divergence(f, x)
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(BatchInteractionError, match="mixes samples"):
        torchdiv.divergence(f, bad)


def test_a_factorization_of_weights_keeps_them_and_their_versions() -> None:
    """The verdict of a watch whose only values read are a parameter's singular values names
    that parameter at its version and values; so it does a plain tensor held before the call
    (since paramonly18: ``passed`` keeps the pass only where the key holds it, here the
    lambda's closure by identity)."""
    net = SpectralMLP(3, 4).to(f64)
    x = torch.randn(2, 3, dtype=f64)
    with verdicts() as seen:
        watched(net, x, 1)
    kept = seen.verdict.kept()
    assert kept is not None and not seen.verdict.for_any_x
    assert {id(k.ref()) for k in kept} == {id(net.l1.weight), id(net.l2.weight)}
    assert all(k.version == k.ref()._version and k.current() for k in kept)
    w = torch.randn(3, 3, dtype=f64)
    with verdicts() as seen:
        watched(lambda z: z / torch.linalg.matrix_norm(w, 2), x, 1)
    assert [k.ref() is w for k in seen.verdict.kept() or ()] == [True]


def test_a_factorization_of_weights_a_function_holds_is_watched_once(watches: list[int]) -> None:
    """The pass keeps each weight where ``f`` holds it: a lambda over the module (the
    module's parameter places) or over the weight itself (the key holds it by identity),
    each made anew at every call as in a training loop: watched once each."""
    torch.manual_seed(2)
    net = SpectralMLP(3, 8).to(f64)
    weight = torch.nn.Parameter(torch.randn(3, 3, dtype=f64))
    makers = (
        lambda: lambda z: net(z),
        lambda: lambda z: z @ (weight / torch.linalg.matrix_norm(weight, 2)),
    )
    for make in makers:
        watches.clear()
        for _ in range(3):
            torchdiv.divergence(make(), torch.randn(4, 3, dtype=f64))
        assert len(watches) == 1
