"""Taylor rules for the ops that add values into places of a tensor, ``index_add``,
``scatter_add`` and ``index_put(accumulate=True)`` (message passing over a batch of graphs, a
mixture of experts' token dispatch): they had none, so the Laplacian's ``"auto"`` fell back to
the generic engines (``m x n`` second-order products for sequence outputs). Values and
parameter gradients against per-sample grad-of-grad loops (float64, each sample evaluated
alone), divergences against each sample's Jacobian trace; a write without accumulation
(``index_put``) and a message into another graph are still refused. Also ``tensor_split``, which
``glu`` decomposes to (GLU nets fell back the same way)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import assert_close, assert_same_parameter_gradients, laplacian_alone
from torch import nn
from torch.autograd.functional import jacobian

import torchdiv
from torchdiv._taylor import UnsupportedOp

f64 = torch.float64


def unsorted_segment_sum(data: torch.Tensor, segment_ids: torch.Tensor, num: int) -> torch.Tensor:
    """The EGNN repository's segment sum: ``scatter_add_`` into a fresh zero tensor."""
    result = data.new_zeros(num, data.shape[1])
    result.scatter_add_(0, segment_ids[:, None].expand(-1, data.shape[1]), data)
    return result


class EGNNLayer(nn.Module):
    """An E(n) equivariant layer (Satorras et al. 2021) over a batch of ``N``-node graphs with
    the nodes flattened to ``(B N, .)`` and the edges offset per graph: edge messages from both
    ends' features and the squared distance, summed into the receiving node
    (``unsorted_segment_sum``); coordinates moved by the differences weighted by a message MLP
    (summed by ``index_add``); features updated by a node MLP. ``forward(pos)`` (``(B, N, 3)``)
    returns the new coordinates (an E(n) flow's velocity); ``energy(pos)`` a scalar per graph."""

    def __init__(self, nodes: int = 4, features: int = 3, hidden: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.nodes = nodes
        self.h = nn.Parameter(torch.randn(nodes, features, dtype=f64))
        self.edge_mlp = nn.Sequential(
            nn.Linear(2 * features + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        ).double()
        self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.coord_mlp.double()
        self.node_mlp = nn.Sequential(
            nn.Linear(features + hidden, hidden), nn.SiLU(), nn.Linear(hidden, features)
        ).double()
        pairs = [(i, j) for i in range(nodes) for j in range(nodes) if i != j]
        self.register_buffer("row", torch.tensor([i for i, _ in pairs]))
        self.register_buffer("col", torch.tensor([j for _, j in pairs]))

    def layer(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = pos.shape[:2]
        offsets = (torch.arange(b) * n)[:, None]
        row, col = (self.row + offsets).reshape(-1), (self.col + offsets).reshape(-1)
        x, h = pos.reshape(b * n, -1), self.h.repeat(b, 1)
        diff = x[row] - x[col]
        radial = diff.square().sum(-1, keepdim=True)
        m = self.edge_mlp(torch.cat([h[row], h[col], radial], 1))
        x = x + torch.zeros_like(x).index_add(0, row, diff * self.coord_mlp(m))
        h = h + self.node_mlp(torch.cat([h, unsorted_segment_sum(m, row, b * n)], 1))
        return x.reshape(pos.shape), h.reshape(b, n, -1)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return self.layer(pos)[0]

    def energy(self, pos: torch.Tensor) -> torch.Tensor:
        x, h = self.layer(pos)
        return (h.tanh().sum((1, 2)) + 0.1 * x.square().sum((1, 2))).squeeze()


class TopOneExperts(nn.Module):
    """A top-1 mixture of experts over tokens flattened to ``(B T, D)``: each token sent to its
    gate's expert by indexing, the outputs added back into place by ``index_add_`` (as
    Switch-style code dispatches), or by ``index_put_(accumulate=True)``."""

    def __init__(self, dim: int = 3, experts: int = 3, put: bool = False) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.gate = nn.Linear(dim, experts).double()
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 6), nn.Tanh(), nn.Linear(6, dim)).double()
            for _ in range(experts)
        )
        self.put = put

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        tokens = x.reshape(-1, x.shape[-1])
        weight, choice = self.gate(tokens).softmax(-1).max(-1)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            (picked,) = torch.nonzero(choice == e, as_tuple=True)
            y = expert(tokens[picked]) * weight[picked, None]
            if self.put:
                out.index_put_((picked,), y, accumulate=True)
            else:
                out.index_add_(0, picked, y)
        return (out + tokens).reshape(x.shape).tanh().sum((1, 2))


def _each_alone(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's Jacobian trace, evaluated alone by plain autograd."""
    n = x[0].numel()
    return torch.stack([jacobian(f, xb[None], create_graph=True).reshape(n, n).trace() for xb in x])


@pytest.mark.parametrize("method", ["taylor", "auto"])
@pytest.mark.parametrize("model", ["egnn", "experts", "experts by index_put"])
def test_laplacians_through_added_messages(method, model):
    """The Laplacian (3 graphs of 4 nodes in 3D: 12 inputs; 4 sequences of 3 tokens) by the
    Taylor engine, which refused these ops before: values and the parameter gradients of a
    loss, as the per-sample grad-of-grad loop's."""
    if model == "egnn":
        net = EGNNLayer()
        f, x = net.energy, torch.randn(3, 4, 3, dtype=f64)
    else:
        net = TopOneExperts(put=model != "experts")
        f, x = net, torch.randn(4, 3, 3, dtype=f64)
    got = torchdiv.laplacian(f, x, method=method)
    want = laplacian_alone(f, x)
    assert_close(got, want)
    assert_same_parameter_gradients(net, got.square().sum(), want.square().sum())


@pytest.mark.parametrize("method", ["structured", "auto"])
def test_divergence_of_an_egnn_velocity(method):
    """An E(n) flow's velocity (the new coordinates): its divergence by the structured engine
    (recorded with the new rules) as each graph's Jacobian trace alone; parameter gradients
    too."""
    net = EGNNLayer()
    x = torch.randn(3, 4, 3, dtype=f64)
    got = torchdiv.divergence(net, x, method=method)
    want = _each_alone(net, x)
    assert_close(got, want)
    assert_same_parameter_gradients(net, got.square().sum(), want.square().sum())


def test_a_write_twice_without_accumulation_and_a_message_across_graphs_are_refused():
    """``index_put`` without ``accumulate`` writes its values over those places: followed
    where each place is written once; where one is written twice PyTorch keeps one of the
    writes: refused by ``"taylor"`` naming it (``"auto"`` falls back, right). An edge from one
    graph into another mixes samples: ``BatchInteractionError``."""
    x = torch.randn(2, 4, 2, dtype=f64)

    def written(twice: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def f(z: torch.Tensor) -> torch.Tensor:
            h, first = z.reshape(-1, 2).clone(), torch.arange(len(z)) * 4  # each graph's node 0
            into = torch.cat([first, first]) if twice else first
            h[into] = torch.tanh(h[torch.cat([first + 1, first + 2]) if twice else first + 1])
            return h.reshape(len(z), -1).sin().sum(-1)

        return f

    assert_close(
        torchdiv.laplacian(written(False), x, method="taylor"), laplacian_alone(written(False), x)
    )
    with pytest.raises(UnsupportedOp, match="index_put without accumulate writing a place twice"):
        torchdiv.laplacian(written(True), x, method="taylor")
    assert_close(torchdiv.laplacian(written(True), x), laplacian_alone(written(True), x))

    def across(z: torch.Tensor) -> torch.Tensor:
        h = z.reshape(-1, 2)
        into = torch.tensor([4, 1, 2, 3, 0, 5, 6, 7])  # node 0 of graph 0 into graph 1
        return torch.zeros_like(h).index_add(0, into, h.sin()).reshape(len(z), -1).sum(-1)

    for method in ("taylor", "auto"):
        with pytest.raises(torchdiv.BatchInteractionError):
            torchdiv.laplacian(across, x, method=method)


class GatedConvolution(nn.Module):
    """A GLU over channels between 1-D convolutions (the Conformer's and ConvS2S's gating)."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.into = nn.Conv1d(channels, 2 * channels, 3, padding=1).double()
        self.out = nn.Conv1d(channels, 1, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L)
        return self.out(nn.functional.glu(self.into(x), dim=1)).tanh().sum((1, 2))


@pytest.mark.parametrize("method", ["taylor", "auto"])
def test_a_glu_is_propagated(method):
    """``glu`` (``tensor_split`` in the recording) had no Taylor rule: ``"taylor"`` refused it.
    Values and parameter gradients as the per-sample loop's; a ``tensor_split`` at indices too."""
    net = GatedConvolution()
    x = torch.randn(3, 2, 5, dtype=f64)
    got = torchdiv.laplacian(net, x, method=method)
    want = laplacian_alone(net, x)
    assert_close(got, want)
    assert_same_parameter_gradients(net, got.square().sum(), want.square().sum())
    pieces = lambda z: torch.cat(torch.tensor_split(z.sin(), [1, 3], -1)[::-1], -1)  # noqa: E731
    f = lambda z: pieces(z).cumsum(-1).square().sum(-1)  # noqa: E731
    assert_close(torchdiv.laplacian(f, x[:, 0], method=method), laplacian_alone(f, x[:, 0]))


class GatedSums(nn.Module):
    """Sums within each sample (``index_add``, ``scatter_add`` over its features) gated by a
    GLU, as a plate-equation network's scalar output: every op now has a Taylor rule, so the
    biharmonic runs the Taylor engine inside the Taylor engine."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.into, self.out = nn.Linear(3, 3).double(), nn.Linear(3, 1).double()
        self.register_buffer("index", torch.tensor([0, 2, 2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3) -> (B,)
        h = torch.tanh(self.into(x))
        added = torch.zeros_like(h).index_add(1, self.index, h * h)
        spread = self.index.view(1, 3).expand_as(h)
        scattered = torch.zeros_like(h).scatter_add(1, spread, torch.sin(h))
        return self.out(nn.functional.glu(torch.cat([added, scattered], -1), -1)).squeeze(-1)


def _biharmonic_alone(f, xb: torch.Tensor) -> torch.Tensor:
    """``Σ_ij ∂⁴f / ∂x_i² ∂x_j²`` of the scalar ``f`` at one sample ``xb`` alone, by grad of
    grad twice (plain autograd, ``create_graph`` for the parameter gradients)."""
    leaf = xb[None].detach().requires_grad_(True)

    def laplacian_of(y: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(y, leaf, create_graph=True)
        rows = (torch.autograd.grad(g[0, i], leaf, create_graph=True)[0] for i in range(len(xb)))
        return sum(row[0, i] for i, row in enumerate(rows))

    return laplacian_of(laplacian_of(f(leaf).sum()))


def test_a_biharmonic_through_added_values():
    """The inner Laplacian's jets, ``(k, B, n)``, added into a zero tensor of their own under
    ``vmap`` (the rules' ``applied``): the outer recording's watch took that for samples
    added into an unfollowed tensor, a ``BatchInteractionError`` for a model that keeps
    them apart. Values and parameter gradients as the per-sample loop's Laplacian of its
    Laplacian."""
    net = GatedSums()
    x = torch.randn(4, 3, dtype=f64)
    got = torchdiv.biharmonic(net, x)
    want = torch.stack([_biharmonic_alone(net, xb) for xb in x])
    assert_close(got, want)
    assert_same_parameter_gradients(net, got.square().sum(), want.square().sum())
