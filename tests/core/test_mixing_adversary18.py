"""rev-watch18's attacks on the sample-mixing watch's remembered passes (mixfast17's
factorizations of parameters alone, index tensors the structure key holds, and their value
checks of rev-merges17a).

Each ``f`` takes a branch that mixes samples (``h * h.mean(0)``) only at a later call, where
an ``except`` catches a factorization's error or an index buffer holds other edges: the
watch must see that call (``BatchInteractionError``), not serve it by the first call's pass.
Faults found: the ``*_ex`` factorizations behind ``cholesky``, ``inv``, ``solve``,
``lu_factor`` and ``ldl_factor`` (their ``info`` raised on by ``_linalg_check_errors``) read
as deciding nothing; a weight or index buffer ``f`` writes before reading it (from a schedule
no put-back covers) kept its pass, compared at the next call's start, before that call's
write. The guard: a Cholesky factor of a parameter alone is still watched once, with the
per-sample float64 values and parameter gradients (1e-12).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64

# factorizations that raise on a singular or indefinite matrix through ``_linalg_check_errors``
_FACTORIZATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "cholesky": torch.linalg.cholesky,
    "inv": torch.linalg.inv,
    "solve": lambda a: torch.linalg.solve(a, torch.ones_like(a)),
    "lu_factor": lambda a: torch.linalg.lu_factor(a)[0],
    "ldl_factor": lambda a: torch.linalg.ldl_factor(a)[0],
    "cholesky_ex": lambda a: torch.linalg.cholesky_ex(a, check_errors=True)[0],
}


class Factorized(torch.nn.Module):
    """``tanh(lin(x)) @ factor(A)``, or where the factorization fails, a fallback that
    scales each sample by the batch mean (mixes samples). ``schedule``: values ``forward``
    writes into ``A`` first (``how``: ``.data =``, ``.data.copy_``, ``out=A``,
    ``_foreach_lerp_([A], ...)`` or ``copy_`` under ``no_grad``), one per call."""

    def __init__(
        self,
        factor: Callable[[torch.Tensor], torch.Tensor],
        schedule: list[float] | None = None,
        how: str = "",
    ) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).to(f64)
        self.A = torch.nn.Parameter(2 * torch.eye(3, dtype=f64))
        self.factor, self.schedule, self.how = factor, schedule, how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.schedule is not None:
            value = torch.eye(3, dtype=f64) * self.schedule.pop(0)
            if self.how == "data":
                self.A.data = value
            elif self.how == "data_copy":
                self.A.data.copy_(value)
            elif self.how == "out":  # (an ``out=`` overload: ``W`` keyword-only)
                with torch.no_grad():
                    torch.mul(value, 1.0, out=self.A)
            elif self.how == "foreach":  # (a list written: an EMA's ``_foreach_lerp_``)
                with torch.no_grad():
                    torch._foreach_lerp_([self.A], [value], 1.0)
            else:
                with torch.no_grad():
                    self.A.copy_(value)
        h = torch.tanh(self.lin(x))
        try:
            return h @ self.factor(self.A)
        except RuntimeError:
            return h * h.mean(0)


def _spectral(a: torch.Tensor) -> torch.Tensor:
    """``A / ||A||_2`` by its singular values (a spectrally normalised layer's)."""
    return a / torch.linalg.svdvals(a)[0]


def _per_sample(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The divergence of ``net`` at each sample of ``x`` alone (``(B, D)``), by autograd's
    Jacobian of a batch of one, with its graph (for parameter gradients)."""
    jacobians = [torch.autograd.functional.jacobian(net, s[None], create_graph=True) for s in x]
    return torch.stack([j[0, :, 0].trace() for j in jacobians])


@pytest.mark.parametrize("name", list(_FACTORIZATIONS))
def test_a_weight_made_singular_after_a_passed_call_is_watched_again(name: str) -> None:
    """An optimizer's step (here a write under ``no_grad``) makes ``A`` indefinite and
    singular: the factorization raises, the fallback mixes samples."""
    torch.manual_seed(0)
    net, x = Factorized(_FACTORIZATIONS[name]), torch.randn(4, 3, dtype=f64)
    torchdiv.divergence(net, x)
    with torch.no_grad():
        net.A.copy_(torch.diag(torch.tensor([1.0, -1.0, 0.0], dtype=f64)))
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(net, x)


def test_a_factorization_of_values_from_x_is_watched_at_every_call() -> None:
    """``cholesky`` of a per-sample matrix from ``x`` (a Gaussian layer's covariance): the
    next ``x`` makes one indefinite."""

    def f(x: torch.Tensor) -> torch.Tensor:
        cov = torch.eye(3, dtype=f64) + x[:, :, None] * x[:, None, :] * x[:, :1, None]
        try:
            return (torch.linalg.cholesky(cov) @ x[:, :, None])[..., 0]
        except RuntimeError:
            return x * x.mean(0)

    x = torch.rand(4, 3, dtype=f64) * 0.1
    torchdiv.divergence(f, x)
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(f, torch.cat([x[:3], -torch.ones(1, 3, dtype=f64) * 2]))


@pytest.mark.parametrize("how", ["data", "data_copy", "copy", "out", "foreach"])
def test_a_weight_written_before_its_factorization_is_watched_again(how: str) -> None:
    """``forward`` writes ``A`` from a schedule first: at each call's start ``A`` holds the
    last call's value, the one the pass kept; the fourth call's write makes it ``nan``.
    (``out`` and ``foreach`` were served until rev-merges18a: only an op's first argument,
    and only a tensor there, was noted as written.)"""
    torch.manual_seed(0)
    net = Factorized(_spectral, [1.0] * 3 + [float("nan")], how)
    x = torch.randn(4, 3, dtype=f64)
    for _ in range(3):
        torchdiv.divergence(net, x)
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(net, x)


class Messages(torch.nn.Module):
    """A message-passing step over a flattened batch of 2-node graphs, ``edges`` a buffer
    ``forward`` sets from a schedule (``.data =``): within each sample, then across."""

    def __init__(self, schedule: list[torch.Tensor]) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2).to(f64)
        self.register_buffer("edges", schedule[0].clone())
        self.schedule = schedule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.edges.data = self.schedule.pop(0).clone()
        h = torch.tanh(self.lin(x)).reshape(-1, 2)
        senders, receivers = self.edges
        return h.index_add(0, receivers, h[senders] ** 2).reshape(x.shape)


def test_an_index_buffer_written_before_it_is_read_is_watched_again() -> None:
    within, across = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]]), torch.tensor([[0, 1], [2, 3]])
    net = Messages([within] * 3 + [across.repeat(1, 2)])
    x = torch.randn(2, 2, 2, dtype=f64)
    for _ in range(3):
        torchdiv.divergence(net, x)
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(net, x)


def test_a_cholesky_factor_of_a_parameter_is_watched_once(watches: list[int]) -> None:
    """No false refusal: ``x @ cholesky(A)`` keeps its pass over new ``x`` (per-sample float64
    divergences and parameter gradients), and is watched again after a step writes ``A``."""
    torch.manual_seed(0)
    net = Factorized(torch.linalg.cholesky)
    for _ in range(3):
        x = torch.randn(4, 3, dtype=f64)
        div = torchdiv.divergence(net, x)
        want = _per_sample(net, x)
        params = list(net.parameters())
        got = torch.autograd.grad(div.square().sum(), params)
        grads = torch.autograd.grad(want.square().sum(), params)
        torch.testing.assert_close(div.detach(), want.detach(), rtol=1e-12, atol=1e-12)
        for g, w in zip(got, grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert len(watches) == 1
    with torch.no_grad():
        net.A.mul_(1.5)
    torchdiv.divergence(net, x)
    assert len(watches) == 2


class ExpertChoice(torch.nn.Module):
    """A mixture of experts in Megatron-LM's sequence-first layout (``x`` given ``(B, T, F)``,
    its tokens ``(T * B, F)``, row ``t * B + b``): each expert takes the ``capacity`` tokens
    of the whole batch that score highest for it (expert-choice routing), the others get
    nothing from it (dropped: the residual alone), and puts its outputs back in their rows
    (``put``: ``index_put`` into zeros, or ``index_add``)."""

    def __init__(self, features: int, experts: int, capacity: int, put: str) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(features, experts, bias=False).to(f64)
        self.experts = torch.nn.ModuleList(
            torch.nn.Linear(features, features).to(f64) for _ in range(experts)
        )
        self.capacity, self.put = capacity, put

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        tokens = x.transpose(0, 1).reshape(t * b, d)
        scores = torch.softmax(self.gate(tokens), -1)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows = scores[:, e].topk(self.capacity).indices
            y = scores[rows, e, None] * torch.tanh(expert(tokens[rows]))
            if self.put == "index_put":
                part = torch.zeros_like(tokens)
                part[rows] = y
                out = out + part
            else:
                out = out.index_add(0, rows, y)
        return (tokens + out).reshape(t, b, d).transpose(0, 1)


@pytest.mark.parametrize("put", ["index_put", "index_add"])
def test_sequence_first_tokens_dropped_by_capacity_are_followed(put: str) -> None:
    """No false refusal (was: 'samples moved into a tensor of shape (12, 2)', the tokens'
    own layout tried only where as many rows as the buffer were put back). Reference: the
    diagonal blocks' traces of the whole batch's float64 Jacobian, whose blocks across
    samples are zero (which tokens an expert takes depends on the batch, not derivatives)."""
    torch.manual_seed(0)
    net, x = ExpertChoice(2, 2, 5, put), torch.randn(3, 4, 2, dtype=f64)
    div = torchdiv.divergence(net, x)
    jac = torch.autograd.functional.jacobian(net, x).reshape(3, 8, 3, 8)
    for b in range(3):
        torch.testing.assert_close(div[b], jac[b, :, b].trace(), rtol=1e-12, atol=1e-12)
        for c in set(range(3)) - {b}:
            assert not jac[b, :, c].any()


class Solved(torch.nn.Module):
    """``tanh(A^{-1} x)`` per sample, by ``linalg.solve`` with ``x``'s rows as right-hand
    sides (an implicit linear layer's)."""

    def __init__(self) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(2 * torch.eye(3, dtype=f64) + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.linalg.solve(self.A, x.T).T)


def test_a_solve_with_a_weight_is_watched_once(watches: list[int]) -> None:
    """Whether a solve raises follows from ``A`` alone, not from the right-hand sides that
    ``x`` sets: watched once over new ``x`` (not at every call since its ``*_ex`` op counts
    as raising on values), with the per-sample float64 divergences."""
    torch.manual_seed(0)
    net = Solved()
    for _ in range(3):
        x = torch.randn(4, 3, dtype=f64)
        want = _per_sample(net, x).detach()
        torch.testing.assert_close(torchdiv.divergence(net, x), want, rtol=1e-12, atol=1e-12)
    assert len(watches) == 1
