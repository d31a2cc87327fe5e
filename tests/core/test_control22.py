"""Sample mixing through control flow and Python-side reads of values (rev-control22).

A dispatch-level watch sees ops, not the Python code between them. Branches and loops per
sample (``torch.where(x > 0, ...)``, a loop that masks converged samples and stops on
``active.any()``, ``y[m] = g(x[m])``, a permutation undone) must not be refused; a branch on
a batch statistic that flips ``f`` into moving samples at a later call must be refused
there, by every entry point that remembers a pass; a branch whose only coupling is which
per-sample code runs (``if x.abs().max() > 5: y = y / 2``) is not refused, and the results
are the derivatives of the batched ``f`` (the documented limitation). ``torch.cond`` and
``torch.while_loop``, PyTorch's control-flow ops, are named with the way out. References:
each sample alone (``jacobian_alone``, ``laplacian_alone``; float64, exact sums of the same
products: 1e-12) or the full Jacobian of the flattened batch.
"""

from __future__ import annotations

import pytest
import torch
from conftest import jacobian_alone, laplacian_alone

import torchdiv
from torchdiv import BatchInteractionError
from torchdiv._exact.autograd import UndifferentiableBackward

f64 = torch.float64
B, D = 4, 3
PERM = torch.tensor([1, 2, 3, 0])
W = torch.randn(D, D, generator=torch.Generator().manual_seed(22), dtype=f64)
T = 5.0  # a batch statistic above it flips the branch


def _g(z: torch.Tensor) -> torch.Tensor:
    return torch.tanh(z @ W)


def _where(z):  # a branch per sample, as a tensor op
    return torch.where(z > 0, _g(z), z.sin())


def _masked_loop(z):  # a fixed point per sample, converged samples masked, one stop for all
    y, active = z.clone(), torch.ones(len(z), dtype=torch.bool)
    while bool(active.any()):
        y = torch.where(active[:, None], 0.5 * (y + _g(z)), y)
        active = (y - _g(z)).abs().amax(-1) > 1e-3
    return y


def _put_back(z):  # a shape set by values, the rows written back in their places
    m = z[:, 0] > 0
    out = torch.zeros_like(z)
    out[m] = _g(z[m])
    out[~m] = z[~m].sin()
    return out


def _unsorted(z):  # samples sorted by a value, then put back in order
    order = z[:, 0].argsort()
    return (_g(z[order]) * z[order])[order.argsort()]


def _index_copy(z):  # nonzero's rows replaced in place
    rows = (z[:, 0] > 0).nonzero().squeeze(1)
    return z.sin().index_copy(0, rows, _g(z[rows]))


def _each_item(z):  # a Python branch on each sample's own number
    return torch.stack([_g(zi) if zi.sum().item() > 0 else zi.sin() for zi in z])


PER_SAMPLE = {
    "where": _where,
    "masked-loop": _masked_loop,
    "put-back": _put_back,
    "unsorted": _unsorted,
    "index-copy": _index_copy,
    "each-item": _each_item,
}


def _x() -> torch.Tensor:
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=f64)
    x[:2, 0] = torch.tensor([0.7, -0.4], dtype=f64)  # both sides of every per-sample branch
    return x


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_branches_per_sample_are_not_refused(name: str) -> None:
    """Each per-sample branch gives each sample's own derivatives (``f`` on it alone), by
    ``"auto"`` (watched), one-probe Hutchinson (watched, its pass remembered) and the
    Laplacian (watched by its recorder), twice (the second call after a pass)."""
    f, x = PER_SAMPLE[name], _x()
    want = jacobian_alone(f, x).diagonal(dim1=1, dim2=2)
    for _ in range(2):
        torch.testing.assert_close(torchdiv.divergence(f, x), want.sum(-1), rtol=1e-12, atol=1e-12)
        ones = torch.ones(1, B, D, dtype=f64)  # v^T J v, v = 1: each Jacobian's sum
        one = torchdiv.divergence(f, x, method="hutchinson", probes=ones)
        torch.testing.assert_close(one, jacobian_alone(f, x).sum((1, 2)), rtol=1e-12, atol=1e-12)
    got = torchdiv.laplacian(lambda z: f(z).sum(-1), x)
    expected = laplacian_alone(lambda z: f(z).sum(-1), x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def _flips(z):  # per sample until one sample's value passes T, then samples moved
    if z.abs().max() > T:
        return _g(z[PERM]) * z
    return _g(z) * z


def _summed(z):
    return _flips(z).sum(-1)


A = 2 * torch.eye(D, dtype=f64)

# the entry points that remember a pass, beyond ``test_mixing_verdicts``' (divergence, one
# probe, jacobian_diagonal, laplacian, value_grad_laplacian)
REMEMBERING = {
    "jacobian": lambda x: torchdiv.jacobian(_flips, x).diagonal(dim1=1, dim2=2).sum(-1),
    "divergence-chunked": lambda x: torchdiv.divergence(_flips, x, chunk_size=1),
    "diagonal-one-probe": lambda x: torchdiv.jacobian_diagonal(
        _flips, x, method="hutchinson", num_probes=1
    ),
    "laplacian-one-probe": lambda x: torchdiv.laplacian(
        _summed, x, method="hutchinson", num_probes=1
    ),
    "estimate-one-probe": lambda x: torchdiv.estimate_divergence(_flips, x, num_probes=1),
    "hutch++": lambda x: torchdiv.divergence(_flips, x, method="hutch++", num_probes=3),
    "weighted-laplacian": lambda x: torchdiv.weighted_laplacian(_summed, x, diffusion=A),
    "biharmonic": lambda x: torchdiv.biharmonic(_summed, x),
}


@pytest.mark.parametrize("name", REMEMBERING)
def test_a_branch_on_a_batch_statistic_into_mixing_is_refused_when_it_flips(name: str) -> None:
    """Two calls below ``T`` pass (per sample there), the third, one sample above ``T``,
    moves samples: refused, not served by the first calls' pass (``.item()``-like reads
    keep ``f`` watched at every call: ``reads.Verdict``)."""
    run, x = REMEMBERING[name], _x() * 0.5
    for scale in (1.0, 1.01):
        got = run(x * scale)
        if name in ("jacobian", "divergence-chunked"):
            want = jacobian_alone(_flips, x * scale).diagonal(dim1=1, dim2=2).sum(-1)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    large = x.clone()
    large[2] += 2 * T
    with pytest.raises(BatchInteractionError):
        run(large)


def _halved(z):  # which per-sample code runs is decided by all samples
    y = _g(z)
    if z.abs().max() > T:
        y = y / 2
    return y * z


def test_a_branch_on_a_batch_statistic_gives_the_batched_derivatives() -> None:
    """The documented limitation: a Python branch whose only coupling is which per-sample
    code runs is not refused (the watch cannot see the branch not taken), and the
    divergence is that of the batched ``f``, the other samples held fixed (its Jacobian
    across samples is exactly zero), not that of each sample alone. The same gate as a
    tensor op over the batch statistic is refused; the way out, a statistic per sample,
    is each sample's own."""
    x = _x() * 0.5
    x[2] += 2 * T
    full = torch.autograd.functional.jacobian(lambda v: _halved(v.reshape(B, D)).flatten(), x)
    blocks = full.reshape(B, D, B, D)
    same = torch.eye(B, dtype=torch.bool)[:, None, :, None].expand(B, D, B, D)
    assert bool((blocks[~same] == 0).all())
    got = torchdiv.divergence(_halved, x)
    batched = torch.stack([blocks[b, :, b].trace() for b in range(B)])
    torch.testing.assert_close(got, batched, rtol=1e-12, atol=1e-12)
    alone = jacobian_alone(_halved, x).diagonal(dim1=1, dim2=2).sum(-1)
    assert (got - alone).abs()[[0, 1, 3]].min() > 0.01  # (sample 2 alone takes its branch)
    with pytest.raises(BatchInteractionError, match="max of all elements"):
        torchdiv.divergence(lambda z: torch.where(z.abs().max() > T, _g(z) / 2, _g(z)) * z, x)

    def own(z):
        return torch.where(z.abs().amax(-1, keepdim=True) > T, _g(z) / 2, _g(z)) * z

    torch.testing.assert_close(
        torchdiv.divergence(own, x),
        jacobian_alone(own, x).diagonal(dim1=1, dim2=2).sum(-1),
        rtol=1e-12,
        atol=1e-12,
    )


def _cond(z):
    return torch.cond(z.abs().max() > T, lambda t: t.sin() * 2, lambda t: t.sin(), (z,))


CONDS = {
    "divergence": lambda: torchdiv.divergence(_cond, _x()),
    "laplacian": lambda: torchdiv.laplacian(lambda z: _cond(z).sum(-1), _x()),
    "grad-of-grad": lambda: torchdiv.laplacian(
        lambda z: _cond(z).sum(-1), _x(), method="grad-of-grad"
    ),
}


@pytest.mark.parametrize(
    "name",
    # (the first torch.cond of a process costs ~1 s: one case always, the others with --slow)
    [pytest.param(n, marks=() if n == "grad-of-grad" else pytest.mark.slow) for n in CONDS],
)
def test_torch_cond_is_named_with_the_way_out(name: str) -> None:
    """``torch.cond`` runs outside ``torch.compile`` under plain autograd's first derivatives
    only: every method failed with PyTorch's internals (``KeyError: <TransformType.Grad:
    2>``, "no rule registered for HigherOrderOperator cond", a bare ``TypeError`` from its
    double backward) until rev-control22; now they name it and the way out."""
    with pytest.raises(Exception, match=r"f calls torch\.cond.*torch\.where"):
        CONDS[name]()


def _loop(z):
    _, y = torch.while_loop(lambda i, y: i < 3, lambda i, y: (i + 1, y.sin()), (torch.tensor(0), z))
    return y.sum(-1)


def test_second_derivatives_through_torch_while_loop_are_refused() -> None:
    """``torch.while_loop``'s backward (eager) runs over forward carries saved without a
    graph: differentiated again it misses their part (the Laplacian of three ``sin`` steps
    0.3 where it is 1.1; plain autograd's grad of grad the same), served silently by
    ``method="grad-of-grad"`` until rev-control22. Its first derivatives are right."""
    x = _x()
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_loop(leaf).sum(), leaf)
    (want,) = torch.autograd.grad(leaf.sin().sin().sin().sum(), leaf)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(UndifferentiableBackward, match=r"torch\.while_loop.*Python loop"):
        torchdiv.laplacian(_loop, x, method="grad-of-grad")
