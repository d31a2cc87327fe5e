"""Graph convolutions through a sparse adjacency per sample, by ``method="reverse"``.

DCRNN's diffusion convolution (Li et al. 2018) multiplies one sparse support matrix of the
sensor graph by the node features with the batch in the columns,
``torch.sparse.mm(support, x.permute(1, 2, 0).reshape(N, F * B))``: per sample. PyTorch
2.13 has no batching rule for the backward of a product with a sparse matrix, so the
reverse engine's ``vmap`` over the pullback raised PyTorch's bare "expand is unsupported for
Sparse tensors" (``"auto"`` ran). It now runs the pullback once per cotangent there. A CSR
matrix cannot enter ``torch.func``'s transforms at all ("Sparse CSR tensors do not have
strides"): the error names the way out. The reference is a per-sample loop of backward
passes over the dense adjacency, float64.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import torchdiv

f64 = torch.float64
B, N, F = 3, 5, 2


def _graph() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    dense = (torch.rand(N, N, generator=generator) < 0.4).to(f64) + torch.eye(N, dtype=f64)
    return dense / dense.sum(1, keepdim=True)  # a random-walk support D^-1 A


class DiffusionConv(torch.nn.Module):
    """One diffusion step of DCRNN's ``_gconv``: ``tanh(W [x, S x])`` per node."""

    def __init__(self, support: torch.Tensor) -> None:
        super().__init__()
        self.support = support
        self.weight = torch.nn.Linear(2 * F, F, dtype=f64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        x0 = x.permute(1, 2, 0).reshape(N, F * batch)
        x1 = torch.sparse.mm(self.support, x0).reshape(N, F, batch).permute(2, 0, 1)
        return torch.tanh(self.weight(torch.cat([x, x1], -1)))


def _reference(model: DiffusionConv, dense: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Every sample's Jacobian ``(B, N F, N F)``, one sample at a time, dense support."""

    def one(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(model.weight(torch.cat([z, dense @ z], -1)))

    jacobians = []
    for b in range(B):
        z = x[b].detach().requires_grad_(True)
        y = one(z).reshape(-1)
        rows = [torch.autograd.grad(y[i], z, create_graph=True)[0] for i in range(len(y))]
        jacobians.append(torch.stack([row.reshape(-1) for row in rows]))
    return torch.stack(jacobians)


def _of(jacobians: torch.Tensor, op: str) -> torch.Tensor:
    if op == "jacobian":
        return jacobians
    diagonal = jacobians.diagonal(0, 1, 2)
    return diagonal.sum(-1) if op == "divergence" else diagonal


@pytest.mark.parametrize("op", ["divergence", "jacobian", "jacobian_diagonal"])
def test_sparse_support_by_reverse_mode(op: str) -> None:
    """COO support: values and the parameter gradients of a squared loss equal the dense
    per-sample loop's (float64, to rounding), and a second call gives the same."""
    dense = _graph()
    model = DiffusionConv(dense.to_sparse())
    x = torch.randn(B, N, F, dtype=f64, generator=torch.Generator().manual_seed(1))
    want = _of(_reference(model, dense, x), op)
    want_grads = torch.autograd.grad(want.square().sum(), list(model.parameters()))
    got = getattr(torchdiv, op)(model, x, method="reverse")
    torch.testing.assert_close(got.reshape(want.shape), want)
    got_grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)
    again = getattr(torchdiv, op)(model, x, method="reverse")
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_sparse_batched_adjacency_by_reverse_mode() -> None:
    """A sparse ``(B, N, N)`` adjacency, one graph per sample, by ``torch.bmm``: per sample,
    and the reverse divergence equals the dense one's."""
    generator = torch.Generator().manual_seed(2)
    dense = (torch.rand(B, N, N, generator=generator) < 0.4).to(f64)
    sparse = dense.to_sparse()
    lin = torch.nn.Linear(F, F, dtype=f64)
    x = torch.randn(B, N, F, dtype=f64, generator=generator)
    got = torchdiv.divergence(lambda z: torch.tanh(lin(torch.bmm(sparse, z))), x, method="reverse")
    want = torchdiv.divergence(lambda z: torch.tanh(lin(torch.bmm(dense, z))), x, method="reverse")
    torch.testing.assert_close(got, want)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_csr_support_names_the_way_out() -> None:
    """A CSR support under ``method="reverse"``: PyTorch's error with a hint naming the CSR
    matrix and the ways out (``"auto"``, a COO matrix); ``"auto"`` gives the dense values."""
    dense = _graph()
    model = DiffusionConv(dense.to_sparse_csr())
    x = torch.randn(B, N, F, dtype=f64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match=r"sparse CSR matrix .* method='auto'.* COO"):
        torchdiv.divergence(model, x, method="reverse")
    want = _of(_reference(model, dense, x), "divergence")
    torch.testing.assert_close(torchdiv.divergence(model, x), want)


def _flattened(
    adjacency: torch.Tensor, lin: torch.nn.Module
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A GCN layer on the batch flattened to ``(B * N, F)`` by one ``(B N, B N)`` matrix."""

    def f(z: torch.Tensor) -> torch.Tensor:
        h = adjacency @ z.reshape(B * N, F)
        return torch.tanh(lin(h)).reshape(B, N, F)

    return f


@pytest.mark.parametrize("layout", ["dense", "coo"])
def test_block_diagonal_adjacency_over_flattened_samples_is_per_sample(layout: str) -> None:
    """``torch.block_diag(*adj) @ h.reshape(B * N, F)`` (dense, or its COO matrix by
    ``torch.sparse.mm``): no entry joins two samples, so each sample's divergence is its own
    graph's, which the watch lets through (refused as a product over samples before
    mixdiffs16), at every call; joined across samples in place after a passing call, the
    adjacency is refused at the next (its zeros were read: the pass holds for them only)."""
    generator = torch.Generator().manual_seed(3)
    adj = (torch.rand(B, N, N, generator=generator) < 0.4).to(f64)
    lin = torch.nn.Linear(F, F, dtype=f64)
    x = torch.randn(B, N, F, dtype=f64, generator=generator)
    block = torch.block_diag(*adj)
    matrix = block if layout == "dense" else block.to_sparse()
    want = torchdiv.divergence(lambda z: torch.tanh(lin(torch.bmm(adj, z))), x)
    for _ in range(2):
        torch.testing.assert_close(torchdiv.divergence(_flattened(matrix, lin), x), want)
    if layout == "dense":
        matrix[1, N + 1] = 1.0  # sample 0's node 1 receives sample 1's node 1
    else:
        matrix._indices()[1, 0] += N  # an entry of sample 0 moved across samples
    with pytest.raises(torchdiv.BatchInteractionError, match="summing over samples"):
        torchdiv.divergence(_flattened(matrix, lin), x)


def test_refused_product_over_samples_names_bmm() -> None:
    """A flattened adjacency with an edge across samples is refused; the message should name
    the way out for graphs: a ``(B, N, N)`` adjacency through ``torch.bmm``."""
    adj = torch.eye(B * N, dtype=f64)
    adj[1, N + 1] = 1.0  # sample 0's node 1 receives sample 1's node 1
    lin = torch.nn.Linear(F, F, dtype=f64)
    x = torch.randn(B, N, F, dtype=f64)
    with pytest.raises(torchdiv.BatchInteractionError, match=r"\(B, N, N\).*torch\.bmm"):
        torchdiv.divergence(_flattened(adj, lin), x)
