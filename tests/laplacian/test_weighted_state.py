"""``weighted_laplacian``'s evaluations of a stateful ``f`` (one per part of an indefinite ``A``,
one per chunk of a diffusion that requires grad) and its sample-mixing watch, where ``Once``
watches ``f``'s own evaluations only (not the Hessian-vector products' backward and tangent
passes): state after a call as after one evaluation, put back where a later pass raises;
values and parameter gradients of that evaluation's function."""

from __future__ import annotations

import copy

import pytest
import torch
from backward_state import Dropped, Net, SetEachForward, state_of
from conftest import Stateful, assert_close, assert_one_state, one_state
from torch import nn

import torchdiv

f64 = torch.float64
_INDEFINITE = torch.tensor([[1.0, 2.0, 0.0], [2.0, -1.0, 0.3], [0.0, 0.3, 0.5]], dtype=f64)


def _mixes(z: torch.Tensor) -> torch.Tensor:
    """Centres each feature over the batch: samples mixed."""
    return torch.tanh(z - z.mean(0, keepdim=True)).sum(-1)


def _weighted(f, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``tr(sym(A) ∇²f)`` per sample by plain grad of grad over the batch (one evaluation of
    ``f``, graph kept: differentiable in ``x`` too where it requires grad)."""
    z = x if x.requires_grad else x.detach().requires_grad_()
    (g,) = torch.autograd.grad(f(z).sum(), z, create_graph=True)
    rows = [torch.autograd.grad(g[:, i].sum(), z, create_graph=True)[0] for i in range(z.shape[1])]
    hessians = torch.stack(rows, 1)  # (N, n, n)
    return torch.einsum("bij,bij->b", ((a + a.mT) / 2).expand_as(hessians), hessians)


@pytest.mark.parametrize("method", ["auto", "taylor", "hutchinson"])
def test_a_diffusion_that_requires_grad_is_watched_for_sample_mixing(method):
    """Hessian-vector products run such an ``A`` whatever the method, and they watch nothing:
    ``"auto"``, ``"taylor"`` and ``"hutchinson"`` returned a value for ``f`` centring its
    features over the batch (0.29-0.68 for 5 samples) where the same ``A`` without grad
    raised."""
    x = torch.randn(5, 3, dtype=f64)
    a = torch.eye(3, dtype=f64)
    options = {"num_probes": 3} if method == "hutchinson" else {}
    with pytest.raises(torchdiv.BatchInteractionError, match="weighted_laplacian: f mixes"):
        torchdiv.weighted_laplacian(_mixes, x, diffusion=a, method=method, **options)
    with pytest.raises(torchdiv.BatchInteractionError, match="weighted_laplacian: f mixes"):
        torchdiv.weighted_laplacian(
            _mixes, x, diffusion=a.requires_grad_(), method=method, **options
        )
    with torchdiv.allow_batch_interaction():  # the way out the error names
        torchdiv.weighted_laplacian(_mixes, x, diffusion=a, method=method, **options)


@pytest.mark.parametrize("method", ["auto", "taylor", "hutchinson"])
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_a_learned_diffusion_of_independent_samples_is_not_refused(method, chunk_size):
    """The watch refuses no per-sample model (an eval batch norm before an ``lgamma`` MLP with
    train-mode dropout and a forward counter), which changes its state once; the values and
    the gradients (parameters, and ``x`` through ``A(x)`` too) are those of the function of
    one evaluation (its dropout mask), by plain grad of grad."""
    torch.manual_seed(0)
    net, x = Dropped().double(), torch.randn(4, 3, dtype=f64)
    norm = nn.BatchNorm1d(3, dtype=f64).eval()
    norm.running_mean.uniform_(-0.5, 0.5)
    plain = copy.deepcopy(net)
    xr = x.clone().requires_grad_()
    a = torch.diag_embed(1 + xr.square()) + 0.3 * xr[:, :, None] * xr[:, None, :]

    def call(model: nn.Module) -> torch.Tensor:
        options = {"num_probes": 2, "generator": torch.Generator().manual_seed(2)}
        return torchdiv.weighted_laplacian(
            lambda z: model(norm(z))[:, 0],
            xr,
            diffusion=a,
            method=method,
            chunk_size=chunk_size,
            **(options if method == "hutchinson" else {}),
        )

    torch.manual_seed(4)
    got = call(net)
    state = torch.get_rng_state()
    torch.manual_seed(4)
    if method == "hutchinson":  # the same probes and mask (another call), one evaluation's state
        expected = call(plain)
        assert net.counted.count.item() == plain.counted.count.item() == 1
        plain.counted.count.zero_()
        torch.manual_seed(4)
        plain(norm(x))
    else:
        expected = _weighted(lambda z: plain(norm(z))[:, 0], xr, a)
    assert torch.equal(torch.get_rng_state(), state)
    assert net.counted.count.item() == plain.counted.count.item() == 1
    assert_close(got, expected)
    grads = torch.autograd.grad(
        got.square().sum(), [*net.parameters(), xr], allow_unused=True, retain_graph=True
    )  # (A(x)'s graph is the expected value's too)
    wanted = torch.autograd.grad(
        expected.square().sum(), [*plain.parameters(), xr], allow_unused=True
    )
    for got_grad, want in zip(grads, wanted, strict=True):
        assert (got_grad is None) == (want is None)  # (the last bias: none)
        if want is not None:
            assert_close(got_grad, want)


@pytest.mark.parametrize("method", ["auto", "hutchinson"])
def test_a_learned_diffusion_under_allow_batch_interaction_is_of_one_evaluation(method):
    """Inside ``allow_batch_interaction()`` the watch evaluates nothing: ``Once`` must not
    take that for ``f``'s first evaluation (it did in this branch's first draft: the chunks
    after it evaluated ``f`` from the state the one before left, 0.43 off, three calls)."""
    net, x = Stateful(3), torch.randn(4, 3, dtype=f64)
    once, state = one_state(net, x, seed=4)
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=f64)).requires_grad_()
    options = {"num_probes": 2} if method == "hutchinson" else {}
    torch.manual_seed(4)
    with torchdiv.allow_batch_interaction():
        got = torchdiv.weighted_laplacian(
            lambda z: net(z)[:, 0], x, diffusion=a, method=method, chunk_size=1, **options
        )
    if method == "auto":
        assert_one_state(net, once, state)
        assert_close(got, _weighted(lambda z: once(z)[:, 0], x, a))
    else:  # its probes drew from the generator too
        assert net.calls.item() == 1 and torch.equal(net.u, once.u)


@pytest.mark.parametrize("method", ["auto", "forward-over-reverse", "hessian", "grad-of-grad"])
def test_a_part_without_columns_evaluates_f_from_the_call_s_state(method):
    """A scalar event and ``A = [[-2]]``: the positive part has no columns, yet evaluates
    ``f`` (for its output's shape); with only the products watched, that evaluation was made
    from the state the check left, and the generator was put back after the negative part
    to where it had moved it: the call drew dropout twice."""
    net = Stateful(1, head=lambda y: y[:, 0])
    z = torch.randn(6, dtype=f64)
    once, state = one_state(net, z[:, None], seed=6)
    torch.manual_seed(6)
    got = torchdiv.weighted_laplacian(
        lambda t: net(t[:, None]), z, diffusion=torch.tensor([[-2.0]], dtype=f64), method=method
    )
    assert_one_state(net, once, state)
    assert_close(got, -2 * _weighted(lambda t: once(t), z[:, None], torch.ones(1, 1, dtype=f64)))


@pytest.mark.parametrize("kind", ["indefinite", "requires grad"])
@pytest.mark.parametrize("method", ["forward-over-reverse", "hessian"])
def test_an_attribute_set_each_forward_is_read_plain_by_every_chunk(kind, method):
    """A tensor attribute set at every forward (``self.cache = torch.full(...)``) and read by
    the next: each part and chunk finds it as the call did (unset), not a dead wrapper of an
    earlier chunk's transforms."""
    torch.manual_seed(0)
    net = SetEachForward().double()
    plain = copy.deepcopy(net)
    x = torch.randn(4, 3, dtype=f64)
    a = _INDEFINITE.clone().requires_grad_(kind == "requires grad")
    got = torchdiv.weighted_laplacian(
        lambda z: net(z)[:, 0], x, diffusion=a, method=method, chunk_size=1
    )
    assert_close(got, _weighted(lambda z: plain(z)[:, 0], x, _INDEFINITE))
    assert torch.equal(net.cache, torch.full((1,), 2.0, dtype=f64))


@pytest.mark.parametrize("effect", ["buffer", "random"])
@pytest.mark.parametrize("method", ["auto", "forward-over-reverse"])
def test_a_learned_diffusion_that_fails_in_a_later_pass_changes_nothing(effect, method):
    """``f``'s backward pass writes a buffer or draws (``torch.func`` refuses both): the call
    raises after ``f``'s own evaluations completed, in a pass ``Once`` does not watch; the
    state from before the call is put back (``Once.undoing``)."""
    torch.manual_seed(0)
    net, x = Net(effect).double(), torch.randn(4, 3, dtype=f64)
    torch.manual_seed(1)
    before = state_of(net)
    a = torch.eye(3, dtype=f64).requires_grad_()
    with pytest.raises(RuntimeError):
        torchdiv.weighted_laplacian(
            lambda z: net(z)[:, 0], x, diffusion=a, method=method, chunk_size=1
        )
    after = state_of(net)
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert after[1] == before[1] and torch.equal(after[2], before[2])


@pytest.mark.parametrize("call", ["weighted", "value_grad_laplacian"])
def test_spectral_norm_s_power_iteration_is_differentiated_as_one_evaluation(call):
    """``spectral_norm`` in train mode updates ``u`` and ``v`` in place at every forward and
    computes with clones of them: each part and chunk from the state before (the weight of
    one power iteration), parameter gradients by one backward pass (limitations.md: a
    buffer computed with in place would raise there)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.utils.parametrizations.spectral_norm(nn.Linear(3, 16)), nn.Tanh(), nn.Linear(16, 1)
    ).double()
    plain, x = copy.deepcopy(net), torch.randn(4, 3, dtype=f64)
    if call == "weighted":
        got = torchdiv.weighted_laplacian(
            lambda z: net(z)[:, 0], x, diffusion=_INDEFINITE, method="forward-over-reverse"
        )
        expected = _weighted(lambda z: plain(z)[:, 0], x, _INDEFINITE)
    else:
        got = torchdiv.value_grad_laplacian(
            lambda z: net(z)[:, 0], x, method="forward-over-reverse", chunk_size=1
        ).laplacian
        expected = _weighted(lambda z: plain(z)[:, 0], x, torch.eye(3, dtype=f64))
    assert_close(got, expected)
    for key, value in plain.state_dict().items():  # as after one evaluation
        assert torch.equal(net.state_dict()[key], value)
    grads = torch.autograd.grad(got.square().sum(), list(net.parameters()), allow_unused=True)
    wanted = torch.autograd.grad(
        expected.square().sum(), list(plain.parameters()), allow_unused=True
    )
    for got_grad, want in zip(grads, wanted, strict=True):
        assert (got_grad is None) == (want is None)
        if want is not None:
            assert_close(got_grad, want)
