"""Sequence models as score-model and time-series codes write them, one sequence ``(T, D)`` per
sample: a Mamba block's selective scan in plain torch (input-dependent ``dt`` by softplus,
``B`` and ``C`` projections, a depthwise causal ``Conv1d``, SiLU gating), as a sequential
``for t in range(T)`` scan and as a parallel log-space scan (``cumsum`` of ``dt * A`` and a
causal ``exp`` of its differences); and mixtures of experts routing tokens ``(B * T, D)``:
top-k with ``index_add_`` dispatch, and Switch-style expert capacity, where tokens of the
whole batch compete for an expert's slots.

References: the same modules in float64, one sample at a time, differentiated by plain
autograd (Jacobian rows, Hessian diagonals by grad of grad); parameter gradients of
``sum(w * result)`` with fixed random ``w``. Float64 throughout: 1e-10 relative leaves room
for the few hundred flops of each path (the results agree to 1e-13 or better).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64
Function = Callable[[torch.Tensor], torch.Tensor]


class Mamba(nn.Module):
    """A Mamba block (Gu and Dao): ``(B, T, D) -> (B, T, D)``, residual."""

    def __init__(self, d: int = 2, state: int = 3, parallel: bool = False):
        super().__init__()
        inner = 2 * d
        self.state, self.parallel = state, parallel
        self.in_proj = nn.Linear(d, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, 3, groups=inner, padding=2)
        self.x_proj = nn.Linear(inner, 1 + 2 * state, bias=False)
        self.dt_proj = nn.Linear(1, inner)
        self.A_log = nn.Parameter(torch.arange(1.0, state + 1).log().repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv1d(u.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2))
        dt, b, c = self.x_proj(u).split([1, self.state, self.state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # (B, T, inner)
        dta = torch.einsum("btd,dn->btdn", dt, -self.A_log.exp())
        dbu = torch.einsum("btd,btn,btd->btdn", dt, b, u)
        y = self._parallel(dta, dbu) if self.parallel else self._sequential(dta, dbu)
        y = torch.einsum("btdn,btn->btd", y, c) + u * self.D
        return self.out_proj(y * F.silu(z)) + x

    @staticmethod
    def _sequential(dta: torch.Tensor, dbu: torch.Tensor) -> torch.Tensor:
        """``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``, step by step."""
        h, states = torch.zeros_like(dbu[:, 0]), []
        for t in range(dbu.shape[1]):
            h = dta[:, t].exp() * h + dbu[:, t]
            states.append(h)
        return torch.stack(states, 1)

    @staticmethod
    def _parallel(dta: torch.Tensor, dbu: torch.Tensor) -> torch.Tensor:
        """``h_t = sum_{s <= t} exp(S_t - S_s) dt_s B_s u_s`` with ``S = cumsum(dt A)``."""
        cs = dta.cumsum(1)
        steps = dta.shape[1]
        causal = torch.ones(steps, steps, dtype=torch.bool).tril()[None, :, :, None, None]
        segments = (cs[:, :, None] - cs[:, None]).masked_fill(~causal, -torch.inf)
        return torch.einsum("btsdn,bsdn->btdn", segments.exp(), dbu)


class Expert(nn.Module):
    def __init__(self, d: int, hidden: int = 4):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)))


class TopKExperts(nn.Module):
    """Mixtral-style routing of ``(B * T, D)`` tokens: softmax gate, top-k, renormalised
    weights, each expert's tokens picked by ``torch.where`` and added back by ``index_add_``."""

    def __init__(self, d: int = 2, experts: int = 3, k: int = 2):
        super().__init__()
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(Expert(d) for _ in range(experts))
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weights, chosen = self.gate(tokens).softmax(-1).topk(self.k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, expert(tokens[token]) * weights[token, slot, None])
        return out.reshape(x.shape) + x


class CapacityExperts(nn.Module):
    """Switch-style top-1 routing with expert capacity: a token's place in its expert's queue
    is a ``cumsum`` of one-hot choices over the tokens, of each sequence (``per_sample``) or
    of the whole batch (GShard and Switch as written), and tokens past ``capacity`` are
    dropped. ``dispatch``: tokens sent to ``(experts, capacity, D)`` slots shared by the
    batch, by an ``einsum`` with the one-hot dispatch tensor, rather than by masking each
    expert's output."""

    def __init__(self, per_sample: bool, dispatch: bool, d: int = 2, experts: int = 2):
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(Expert(d) for _ in range(experts))
        self.per_sample, self.dispatch, self.capacity = per_sample, dispatch, 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        gate, choice = self.router(x).softmax(-1).max(-1)
        one_hot = F.one_hot(choice, len(self.experts)).reshape(
            -1 if self.per_sample else 1,
            *((t, len(self.experts)) if self.per_sample else (b * t, len(self.experts))),
        )
        place = (one_hot.cumsum(1) - 1) * one_hot  # (groups, tokens, experts)
        kept = (one_hot * (place < self.capacity)).reshape(b, t, -1).to(x.dtype)
        if not self.dispatch:
            out = sum(kept[..., e, None] * expert(x) for e, expert in enumerate(self.experts))
            return out * gate[..., None] + x
        slots = F.one_hot(place.sum(-1).clamp(max=self.capacity - 1), self.capacity)
        send = kept.reshape(-1, len(self.experts))[..., None] * slots.reshape(-1, 1, self.capacity)
        inputs = torch.einsum("nec,nd->ecd", send, x.reshape(-1, d))
        outputs = torch.stack([expert(inputs[e]) for e, expert in enumerate(self.experts)])
        out = torch.einsum("nec,ecd->nd", send * gate.reshape(-1, 1, 1), outputs)
        return out.reshape(b, t, d) + x


def alone(f: Function, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's divergence ``(B,)`` and Laplacian ``(B, n)``, by plain autograd one
    sample at a time (``create_graph`` throughout, so both train)."""
    divs, laps = [], []
    for xb in x:
        leaf = xb[None].detach().requires_grad_(True)
        y = f(leaf).flatten()
        rows = [
            torch.autograd.grad(y[o], leaf, create_graph=True)[0].flatten() for o in range(len(y))
        ]
        divs.append(sum(rows[i][i] for i in range(len(y))))
        laps.append(
            torch.stack(
                [
                    sum(
                        torch.autograd.grad(r[i], leaf, create_graph=True)[0].flatten()[i]
                        for i in range(len(r))
                    )
                    for r in rows
                ]
            )
        )
    return torch.stack(divs), torch.stack(laps)


def assert_trains_alike(model: nn.Module, got: torch.Tensor, want: torch.Tensor) -> None:
    """Values and the parameter gradients of ``sum(w * result)`` agree to 1e-10."""
    w = torch.randn(want.shape, dtype=f64, generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())
    g_got = torch.autograd.grad((w * got).sum(), params)
    g_want = torch.autograd.grad((w * want).sum(), params, retain_graph=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential scan", "parallel scan"])
@pytest.mark.parametrize("method", ["auto", "structured", "reverse"])
def test_selective_scan_divergence(parallel: bool, method: str) -> None:
    torch.manual_seed(0)
    model = Mamba(parallel=parallel).to(f64)
    x = torch.randn(2, 3, 2, dtype=f64)
    div, _ = alone(model, x)
    assert_trains_alike(model, torchdiv.divergence(model, x, method=method), div)


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential scan", "parallel scan"])
@pytest.mark.parametrize("method", ["auto", "taylor"])
def test_selective_scan_laplacian(parallel: bool, method: str) -> None:
    torch.manual_seed(0)
    model = Mamba(parallel=parallel).to(f64)
    x = torch.randn(2, 3, 2, dtype=f64)
    _, lap = alone(model, x)
    got = torchdiv.laplacian(model, x, method=method).flatten(1)
    assert_trains_alike(model, got, lap)


def test_top_k_experts_with_index_add_dispatch() -> None:
    """Tokens of every sample share the experts' calls; each lands back in its own place."""
    torch.manual_seed(0)
    model = TopKExperts().to(f64)
    x = torch.randn(3, 3, 2, dtype=f64)
    div, lap = alone(model, x)
    assert_trains_alike(model, torchdiv.divergence(model, x), div)
    assert_trains_alike(model, torchdiv.laplacian(model, x).flatten(1), lap)


def batch_blocks(f: Function, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The divergence of the batched ``f`` with the other samples held fixed (``(B,)``),
    from its whole Jacobian, and the largest entry of that Jacobian across samples."""
    leaf = x.detach().requires_grad_(True)
    y = f(leaf).flatten()
    jac = torch.stack(
        [torch.autograd.grad(y[o], leaf, create_graph=True)[0] for o in range(len(y))]
    )
    jac = jac.reshape(x.shape[0], -1, x.shape[0], x[0].numel())
    across = max(
        jac[i, :, j].abs().max().item() for i in range(len(x)) for j in range(len(x)) if i != j
    )
    return torch.stack([jac[b, :, b].diagonal().sum() for b in range(len(x))]), across


def test_expert_capacity_per_sequence_is_per_sample() -> None:
    torch.manual_seed(0)
    model = CapacityExperts(per_sample=True, dispatch=False).to(f64)
    x = torch.randn(3, 3, 2, dtype=f64)
    div, lap = alone(model, x)
    assert_trains_alike(model, torchdiv.divergence(model, x), div)
    assert_trains_alike(model, torchdiv.laplacian(model, x).flatten(1), lap)


def test_expert_capacity_across_the_batch() -> None:
    """Tokens of the whole batch compete for the slots: a sample's routing (which of its
    tokens are dropped) depends on the others, but only through integers, so no derivative
    crosses samples; the masked form is not refused and gives the divergence of the batched
    function with the other samples held fixed (not that of each sample run alone, which may
    route differently). The einsum dispatch sums tokens of different samples in a matrix
    product, which the watch refuses (naming the way out); allowed, it is right too."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 2, dtype=f64)
    masked = CapacityExperts(per_sample=False, dispatch=False).to(f64)
    one_by_one = torch.cat([masked(xb[None]) for xb in x])
    assert not torch.allclose(masked(x), one_by_one)  # the batch really changes the routing
    div, across = batch_blocks(masked, x)
    assert across == 0
    assert_trains_alike(masked, torchdiv.divergence(masked, x), div)
    dispatched = CapacityExperts(per_sample=False, dispatch=True).to(f64)
    with pytest.raises(BatchInteractionError, match="allow_batch_interaction"):
        torchdiv.divergence(dispatched, x)
    div, _ = batch_blocks(dispatched, x)
    with torchdiv.allow_batch_interaction():
        assert_trains_alike(dispatched, torchdiv.divergence(dispatched, x), div)


def _time_major_write(x: torch.Tensor, weight: torch.Tensor, shift: int) -> torch.Tensor:
    """Sequence-first code (``(T, B, F)``, fairseq's layout) writing its tokens, flattened to
    ``(T * B, F)`` rows ``t * B + b``, into a fresh buffer at rows moved by ``shift`` steps
    of time (``shift`` rows: one step of another sample, the batch then mixed)."""
    b, t, d = x.shape
    h = torch.tanh(x.transpose(0, 1).reshape(t * b, d) @ weight)
    rows = (torch.arange(t * b) + shift) % (t * b)
    out = h.new_zeros(t * b, d)
    out[rows] = h
    return out.reshape(t, b, d).transpose(0, 1)


def test_tokens_written_into_a_time_major_buffer_are_per_sample() -> None:
    """Tokens of a ``(T, B, F)`` layout written into a fresh ``(T * B, F)`` buffer, each at
    its own sample's rows (rolled by ``B`` rows: one step of time): not refused (it was, as
    "samples written into a tensor of shape (12, 2)": only the ``(B * T, F)`` layout was
    followed), values and parameter gradients those of each sample alone, twice; rolled by
    one row (into the next sample's places): refused."""
    b, t, d = 3, 4, 2
    weight = torch.randn(d, d, dtype=f64, generator=torch.Generator().manual_seed(0))
    weight.requires_grad_(True)
    x = torch.randn(b, t, d, dtype=f64)

    def alone(xb: torch.Tensor) -> torch.Tensor:  # one sample, (T, F): rolled one step
        return torch.tanh(xb @ weight).roll(1, 0)

    expected = []
    for xb in x:
        leaf = xb.clone().requires_grad_(True)
        y = alone(leaf).reshape(-1)
        rows = [torch.autograd.grad(y[i], leaf, create_graph=True)[0] for i in range(len(y))]
        expected.append(sum(row.reshape(-1)[i] for i, row in enumerate(rows)))
    expected_t = torch.stack(expected)
    weights = torch.randn(b, dtype=f64, generator=torch.Generator().manual_seed(1))
    (want,) = torch.autograd.grad((weights * expected_t).sum(), weight)
    for _ in range(2):
        got = torchdiv.divergence(lambda z: _time_major_write(z, weight, b), x)
        torch.testing.assert_close(got, expected_t)
        (grad,) = torch.autograd.grad((weights * got).sum(), weight)
        torch.testing.assert_close(grad, want)
    with pytest.raises(BatchInteractionError, match="divergence"):
        torchdiv.divergence(lambda z: _time_major_write(z, weight, 1), x)


def test_sequence_first_tokens_routed_and_put_back_are_per_sample() -> None:
    """A router sorting sequence-first ``(T * B, F)`` tokens, each token's expert output
    written back to its own row of ``empty_like`` (as fairseq's mixture of experts un-sorts):
    per sample (each sample's rows ``t * B + b``), values those of each token alone."""
    b, t, d = 3, 4, 2
    weight = torch.randn(d, d, dtype=f64, generator=torch.Generator().manual_seed(0))

    def routed(z: torch.Tensor) -> torch.Tensor:
        tokens = z.transpose(0, 1).reshape(t * b, d)
        order = torch.argsort(tokens.detach()[:, 0])
        out = torch.empty_like(tokens)
        out[order] = torch.tanh(tokens[order] @ weight)
        return out.reshape(t, b, d).transpose(0, 1)

    x = torch.randn(b, t, d, dtype=f64)
    slope = 1 - torch.tanh(x @ weight) ** 2  # d tanh(x W)_i / d x_i = (1 - tanh^2) W_ii
    torch.testing.assert_close(
        torchdiv.divergence(routed, x), (slope * weight.diagonal()).sum((1, 2))
    )


def test_sequence_first_tokens_put_back_into_other_samples_rows_are_refused() -> None:
    """The same put-back (``out[order] = h[source]``) with the expert outputs read from the
    rows ``source``: the second layout tried for the fresh buffer lets no crossing through.
    Two calls with ``source`` the rows themselves (per sample: values and the weight's
    gradient those of each token alone), then ``source`` rolled by one row in place (token
    ``r - 1`` written into row ``r``: another sample's in either layout), refused."""
    b, t, d = 3, 4, 2
    weight = torch.randn(d, d, dtype=f64, generator=torch.Generator().manual_seed(1))
    weight.requires_grad_(True)
    order = torch.arange(t * b).flip(0)
    source = order.clone()

    def routed(z: torch.Tensor) -> torch.Tensor:
        tokens = z.transpose(0, 1).reshape(t * b, d)
        out = torch.empty_like(tokens)
        out[order] = torch.tanh(tokens[source] @ weight)
        return out.reshape(t, b, d).transpose(0, 1)

    for _ in range(2):
        x = torch.randn(b, t, d, dtype=f64)
        got = torchdiv.divergence(routed, x)
        slope = 1 - torch.tanh(x @ weight) ** 2
        want = (slope * weight.diagonal()).sum((1, 2))
        torch.testing.assert_close(got, want)
        (g,) = torch.autograd.grad((got**2).sum(), weight)
        (w,) = torch.autograd.grad((want**2).sum(), weight)
        torch.testing.assert_close(g, w)
    source.copy_(order.roll(1))
    with pytest.raises(BatchInteractionError, match="divergence"):
        torchdiv.divergence(routed, x)
