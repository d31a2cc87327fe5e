"""PyTorch Geometric's own layers and models, used as its documentation and examples use them.

Not a project extra: every test skips without ``torch_geometric`` (installed here pure
Python, without ``torch_scatter``/``torch_sparse``/``torch_cluster``: PyG's ``scatter`` then
runs ``index_add``/``scatter_reduce``, and ``SchNet`` gets its edges from an
``interaction_graph`` built here, since ``radius_graph`` needs ``torch_cluster``).

- Layout (a): a fixed-size graph per sample, node features ``(B, N, d)``: ``GCNConv``,
  ``GINConv`` and ``EdgeConv`` take them as they are (``node_dim=-2``); ``GATConv`` and
  ``SchNet``, which want flat nodes, get ``(B * N, d)`` with the edges offset per sample
  inside ``f``.
- Layout (b): PyG's concatenated ``Batch``, all graphs' atoms in one ``(total_atoms, 3)``
  tensor with a ``batch`` vector: an energy per graph ``(G,)`` has ``batch_dims=0``
  Laplacians, and each atom's force divergence is the diagonal of the whole Jacobian
  (``jacobian_diagonal(forces, pos, batch_dims=0)``), summed per graph by ``batch``.

References: each graph alone through plain ``autograd.grad`` in float64 (a batch of one for
layout (a); the graph's own atoms and edges for (b)), differentiated again for the parameter
gradients of a loss built from the operator's output. Tolerances: float64, a few hundred
flops deep: 1e-10 (``conftest.tolerances``); measured 1e-16-1.4e-15.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import assert_close
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

pyg_nn = pytest.importorskip("torch_geometric.nn")
pyg_utils = pytest.importorskip("torch_geometric.utils")

f64 = torch.float64


def _ring(n: int) -> torch.Tensor:
    """A ring of ``n`` nodes and one chord, both directions: ``edge_index`` of shape ``(2, E)``."""
    s = torch.arange(n)
    d = (s + 1) % n
    return torch.cat([torch.stack([s, d]), torch.stack([d, s]), torch.tensor([[0, n // 2]]).T], 1)


def _offset(edges: torch.Tensor, b: int, n: int) -> torch.Tensor:
    """One graph's ``edge_index`` repeated for ``b`` graphs of ``n`` nodes stacked flat."""
    return edges.repeat(1, b) + (torch.arange(b) * n).repeat_interleave(edges.shape[1])


def _grads(value: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Parameter gradients of a fixed random weighting of ``value`` (a training loss)."""
    weights = torch.randn(value.shape, generator=torch.Generator().manual_seed(1), dtype=f64)
    grads = torch.autograd.grad(
        (weights * value).sum(), params, retain_graph=True, allow_unused=True
    )
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _traces(f1: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Each sample's Jacobian trace, sample alone, row by row (differentiable)."""
    out = []
    for xb in x:
        leaf = xb.detach().clone().requires_grad_(True)
        y = f1(leaf).reshape(-1)
        rows = (torch.autograd.grad(y[i], leaf, create_graph=True)[0] for i in range(len(y)))
        out.append(sum(row.reshape(-1)[i] for i, row in enumerate(rows)))
    return torch.stack(out)


def _laplacians(e1: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Each sample's Laplacian of the scalar ``e1``, sample alone, by grad of grad."""
    return _traces(
        lambda p: torch.autograd.grad(e1(p), p, create_graph=True)[0],
        x,
    )


def _assert_values_and_grads(got, expected, params) -> None:
    assert_close(got, expected)
    for g, e in zip(_grads(got, params), _grads(expected, params), strict=True):
        assert_close(g, e)


class _Field(nn.Module):
    """Two PyG layers on ``(B, N, d)`` node features (``node_dim=-2``), a score model's form."""

    def __init__(self, kind: str, d: int = 2, hidden: int = 4) -> None:
        super().__init__()
        if kind == "gcn":
            self.first, self.second = pyg_nn.GCNConv(d, hidden), pyg_nn.GCNConv(hidden, d)
        elif kind == "gin":
            mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
            self.first = pyg_nn.GINConv(mlp, train_eps=True)
            self.second = pyg_nn.GINConv(nn.Linear(hidden, d))
        else:  # DGCNN's EdgeConv, max over the neighbours' messages
            mlp = nn.Sequential(nn.Linear(2 * d, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
            self.first = pyg_nn.EdgeConv(mlp, aggr="max")
            self.second = pyg_nn.GCNConv(hidden, d)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x, edge_index)), edge_index)


@pytest.mark.parametrize("kind", ["gcn", "gin", "edgeconv"])
def test_pyg_layers_on_a_batch_axis_divergence_and_laplacian(kind: str) -> None:
    """Layout (a): a per-node field ``(B, N, d) -> (B, N, d)`` by PyG layers and the Laplacian
    of an energy of it, ``"auto"``, twice each (the second call's caches), against each graph
    alone: values and parameter gradients."""
    torch.manual_seed(0)
    net = _Field(kind).to(f64)
    params = list(net.parameters())
    edges = _ring(4)
    x = torch.randn(2, 4, 2, dtype=f64)
    field = lambda p: net(p, edges)  # noqa: E731
    energy = lambda p: (field(p) ** 2).sum((-1, -2))  # noqa: E731
    div = _traces(lambda p: field(p[None])[0], x)
    lap = _laplacians(lambda p: energy(p[None])[0], x)
    for _ in range(2):
        _assert_values_and_grads(torchdiv.divergence(field, x), div, params)
        _assert_values_and_grads(torchdiv.laplacian(energy, x), lap, params)


class _Edges:
    """SchNet's ``interaction_graph``: a precomputed ``edge_index`` (``radius_graph`` needs
    ``torch_cluster``) and its lengths, as PyG's ``RadiusInteractionGraph`` returns them."""

    def __init__(self, edge_index: torch.Tensor) -> None:
        self.edge_index = edge_index

    def __call__(self, pos: torch.Tensor, batch: torch.Tensor):
        row, col = self.edge_index
        return self.edge_index, (pos[row] - pos[col]).norm(dim=-1)


def _schnet(edge_index: torch.Tensor) -> tuple[nn.Module, _Edges]:
    torch.manual_seed(0)
    graph = _Edges(edge_index)
    net = pyg_nn.SchNet(
        hidden_channels=8,
        num_filters=8,
        num_interactions=2,
        num_gaussians=6,
        cutoff=5.0,
        interaction_graph=graph,
    )
    return net.to(f64), graph


def test_schnet_energy_laplacian_per_structure_follows_its_edges() -> None:
    """Layout (a) for PyG's ``SchNet``: ``E(pos)`` of ``(B, N, 3)`` flattened inside ``f``,
    the Laplacian ``"auto"`` per structure against each structure alone (values, parameter
    gradients); then other edges of the same shape (no stale plan), then an edge from
    structure 1 into structure 0, refused though the call before passed."""
    b, n = 2, 4
    ring = _ring(n)[:, :-2]
    other = torch.tensor([0, 2, 1, 3])[ring]  # another ring, the same number of edges
    net, graph = _schnet(_offset(ring, b, n))
    z = torch.randint(1, 6, (n,), generator=torch.Generator().manual_seed(0))
    batch = torch.arange(b).repeat_interleave(n)
    energy = lambda p: net(z.repeat(b), p.reshape(-1, 3), batch).reshape(b)  # noqa: E731
    pos = torch.randn(b, n, 3, dtype=f64, generator=torch.Generator().manual_seed(1))
    params = list(net.parameters())

    def alone(edges: torch.Tensor) -> torch.Tensor:
        def one(p: torch.Tensor) -> torch.Tensor:
            graph.edge_index = edges
            return net(z, p).reshape(())

        expected = _laplacians(one, pos)
        return expected

    for edges in (ring, other):
        expected = alone(edges)
        graph.edge_index = _offset(edges, b, n)
        _assert_values_and_grads(torchdiv.laplacian(energy, pos), expected, params)
    graph.edge_index = _offset(ring, b, n)
    torchdiv.laplacian(energy, pos)
    graph.edge_index[0, 0] = n + 1  # in place: a message from structure 1 into structure 0
    with pytest.raises(BatchInteractionError, match="laplacian"):
        torchdiv.laplacian(energy, pos)


def test_pyg_packed_batch_energy_laplacian_and_per_graph_force_divergence() -> None:
    """Layout (b), PyG's ``Batch``: graphs of 3, 4 and 2 atoms in one ``(9, 3)`` tensor.
    ``laplacian(E, pos, batch_dims=0)`` is each graph's Laplacian; the diagonal of the forces'
    whole Jacobian summed by ``batch`` is each graph's force divergence (its negative);
    ``batch_dims=1`` (each atom a sample) is refused, naming ``batch_dims=0``."""
    sizes = [3, 4, 2]
    batch = torch.cat([torch.full((k,), i) for i, k in enumerate(sizes)])
    starts = [0, 3, 7]
    full = [(~torch.eye(k, dtype=torch.bool)).nonzero().T for k in sizes]
    net, graph = _schnet(torch.cat([e + s for e, s in zip(full, starts, strict=True)], 1))
    z = torch.randint(1, 6, (9,), generator=torch.Generator().manual_seed(0))
    pos = torch.randn(9, 3, dtype=f64, generator=torch.Generator().manual_seed(1))
    params = list(net.parameters())
    packed = graph.edge_index
    energy = lambda p: net(z, p, batch).reshape(3)  # noqa: E731

    def forces(p: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            p = p if p.requires_grad else p.requires_grad_(True)
            return -torch.autograd.grad(energy(p).sum(), p, create_graph=True)[0]

    expected = []
    for k in range(len(sizes)):
        graph.edge_index = full[k]
        atoms = pos[batch == k][None]
        expected.append(_laplacians(lambda p: net(z[batch == k], p).reshape(()), atoms)[0])  # noqa: B023
    expected = torch.stack(expected)
    graph.edge_index = packed
    _assert_values_and_grads(torchdiv.laplacian(energy, pos, batch_dims=0), expected, params)
    diagonal = torchdiv.jacobian_diagonal(forces, pos, batch_dims=0)
    per_graph = torch.zeros(3, dtype=f64).index_add(0, batch, diagonal.sum(-1))
    _assert_values_and_grads(per_graph, -expected, params)
    with pytest.raises(BatchInteractionError, match=r"jacobian_diagonal\(f, x, batch_dims=0\)"):
        torchdiv.divergence(forces, pos)
    with pytest.raises(ValueError, match="pass batch_dims=0"):
        torchdiv.laplacian(energy, pos)


def test_gat_with_an_edge_across_samples_is_refused_after_a_passing_call() -> None:
    """``GATConv`` wants flat nodes: ``(B, N, d)`` flattened inside ``f`` with the edges offset
    per sample (a module buffer) is per sample, and not refused; an edge written in place
    from sample 1 into sample 0 (same shape) is refused by ``"auto"`` and one-probe
    Hutchinson at the next call."""
    torch.manual_seed(0)
    b, n, d = 3, 5, 2

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = pyg_nn.GATConv(d, 3, heads=2)
            self.second = pyg_nn.GATConv(6, d)
            self.register_buffer("edge_index", _offset(_ring(n), b, n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = nn.functional.elu(self.first(x.reshape(-1, d), self.edge_index))
            return self.second(h, self.edge_index).reshape(x.shape)

    net = Flat().to(f64)
    x = torch.randn(b, n, d, dtype=f64)
    expected = _traces(
        lambda p: net.second(nn.functional.elu(net.first(p, _ring(n))), _ring(n)),
        x,
    )
    for method, probes in (("auto", None), ("hutchinson", 1)):
        got = torchdiv.divergence(net, x, method=method, num_probes=probes)
        if method == "auto":
            _assert_values_and_grads(got, expected, list(net.parameters()))
    net.edge_index[0, 0] = n + 1
    for method, probes in (("auto", None), ("hutchinson", 1)):
        with pytest.raises(BatchInteractionError, match="divergence"):
            torchdiv.divergence(net, x, method=method, num_probes=probes)


@pytest.mark.filterwarnings("ignore:Sparse (invariant checks|CSR tensor support):UserWarning")
@pytest.mark.parametrize("aggr", ["mean", "max"])
def test_mean_aggregation_over_a_sparse_adjacency_across_samples_is_refused(aggr: str) -> None:
    """PyG's ``SAGEConv`` (mean or max aggregation: ``torch.sparse.mm(adj, h, reduce)``,
    ATen ``_sparse_mm_reduce_impl``) given a ``torch.sparse`` CSR adjacency
    (``to_torch_csr_tensor``) over the flattened nodes with an edge from sample 1 into
    sample 0: ``"auto"`` returned sample 1's divergence 1.573 against 1.613 of its own
    block, one-probe Hutchinson 3.184 against 2.964, silently (mean; before mixdiffs16)."""
    torch.manual_seed(1)
    b, n, d = 3, 5, 2
    edges = _offset(_ring(n), b, n)
    edges[0, 0] = n + 1
    net = pyg_nn.SAGEConv(d, d, aggr=aggr).to(f64)
    adj_t = pyg_utils.to_torch_csr_tensor(edges.flip(0), size=(b * n, b * n)).to(f64)
    field = lambda p: net(p.reshape(-1, d), adj_t).reshape(p.shape)  # noqa: E731
    x = torch.randn(b, n, d, dtype=f64)
    for method, probes in (("auto", None), ("hutchinson", 1)):
        with pytest.raises(BatchInteractionError, match="_sparse_mm_reduce_impl"):
            torchdiv.divergence(field, x, method=method, num_probes=probes)


@pytest.mark.filterwarnings("ignore:Sparse (invariant checks|CSR tensor support):UserWarning")
@pytest.mark.parametrize("aggr", ["mean", "max"])
def test_mean_aggregation_over_a_block_diagonal_sparse_adjacency_is_per_sample(aggr: str) -> None:
    """The same ``SAGEConv`` over a block-diagonal CSR ``adj_t`` (no edge across samples):
    each row reduces its own sample's nodes, so ``"auto"`` gives each graph's own divergence
    (refused as a product over samples before mixdiffs16), twice; the same adjacency joined
    across samples in place after those calls is refused at the next. PyTorch has no second
    derivative of ``_sparse_mm_reduce_impl`` (parameter gradients raise its error), so values
    only."""
    torch.manual_seed(1)
    b, n, d = 3, 5, 2
    net = pyg_nn.SAGEConv(d, d, aggr=aggr).to(f64)
    adj_t = pyg_utils.to_torch_csr_tensor(_offset(_ring(n), b, n).flip(0), size=(b * n, b * n)).to(
        f64
    )
    field = lambda p: net(torch.tanh(p.reshape(-1, d)), adj_t).reshape(p.shape)  # noqa: E731
    one = pyg_utils.to_torch_csr_tensor(_ring(n).flip(0), size=(n, n)).to(f64)
    x = torch.randn(b, n, d, dtype=f64)
    expected = _traces(lambda p: net(torch.tanh(p), one), x).detach()
    for _ in range(2):
        assert_close(torchdiv.divergence(field, x).detach(), expected)
    adj_t.col_indices()[0] = n + 1  # node 0's first neighbour: sample 1's node 1
    with pytest.raises(BatchInteractionError, match="_sparse_mm_reduce_impl"):
        torchdiv.divergence(field, x)


def test_a_dense_batch_readout_within_samples_is_per_sample() -> None:
    """The hand-written dense layout of the test below with the right ``batch`` (each graph's
    nodes written into its own ``N + 1`` rows of a fresh buffer): followed as a flattened
    batch, not refused, each sample's Laplacian and parameter gradients its own, twice."""
    b, n, d = 3, 4, 2
    weight = torch.randn(d, d, dtype=f64, generator=torch.Generator().manual_seed(0))
    weight.requires_grad_(True)
    batch = torch.arange(b).repeat_interleave(n)

    def energy(p: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(p.reshape(-1, d) @ weight)
        slot = torch.arange(len(batch)) + batch  # graph g's nodes at rows g * (n + 1) + i
        dense = h.new_zeros(len(batch) // n * (n + 1), d)
        dense[slot] = h
        return (dense.view(-1, n + 1, d).sum(1) ** 2).sum(-1)

    x = torch.randn(b, n, d, dtype=f64)
    expected = _laplacians(lambda p: ((torch.tanh(p @ weight).sum(0)) ** 2).sum(), x)
    for method, probes in (("auto", None), ("auto", None), ("hutchinson", 1)):
        got = torchdiv.laplacian(energy, x, method=method, num_probes=probes)
        if probes is None:
            _assert_values_and_grads(got, expected, [weight])


@pytest.mark.parametrize("max_nodes", [None, 2, 3])
def test_pyg_dense_batch_readout_of_padded_samples_is_per_sample(max_nodes: int | None) -> None:
    """PyG's own ``to_dense_batch`` (a repeated fill of ``B * N_max + 1`` rows, the nodes
    written at computed places, the trash slot sliced off) over graphs of 2, 4 and 3 of each
    sample's 4 nodes: followed as a flattened batch (with its spare row), not refused, each
    sample's Laplacian and parameter gradients its own, twice. A ``max_num_nodes`` smaller
    than some graphs sends the nodes it cuts off, of several samples, to the trash slot:
    refused as samples written into sample 0's place until leftovers18; each sample's
    derivatives are those of its first ``max_nodes`` nodes."""
    b, n, d = 3, 4, 2
    weight = torch.randn(d, d, dtype=f64, generator=torch.Generator().manual_seed(0))
    weight.requires_grad_(True)
    sizes = [2, 4, 3]
    keep = torch.cat([torch.arange(s) + g * n for g, s in enumerate(sizes)])
    batch = torch.repeat_interleave(torch.arange(b), torch.tensor(sizes))

    def energy(p: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(p.reshape(-1, d)[keep] @ weight)
        dense = pyg_utils.to_dense_batch(h, batch, batch_size=b, max_num_nodes=max_nodes)[0]
        return (dense.sum(1) ** 2).sum(-1)

    x = torch.randn(b, n, d, dtype=f64)
    kept = [min(s, max_nodes or s) for s in sizes]
    expected = torch.cat(
        [
            _laplacians(lambda p, s=s: (torch.tanh(p[:s] @ weight).sum(0) ** 2).sum(), x[g : g + 1])
            for g, s in enumerate(kept)
        ]
    )
    for _ in range(2):
        _assert_values_and_grads(torchdiv.laplacian(energy, x), expected, [weight])


@pytest.mark.parametrize("form", ["hand-written", "to_dense_batch"])
def test_a_dense_batch_readout_across_samples_is_refused(form: str) -> None:
    """A readout through PyG's dense layout (``to_dense_batch``, as ``SortAggregation``,
    ``LSTMAggregation`` and ``GraphMultisetTransformer`` pool) with a ``batch`` vector that
    puts node 0 of sample 1 into sample 0 (its energy then depends on sample 1): ``"auto"``
    and one-probe Hutchinson returned Laplacians (20.36 and -5.40 for samples 0 and 1 of a
    review's case, against 16.05 and -18.65 with the right ``batch``), silently."""
    b, n, d = 3, 4, 2
    weight = torch.randn(d, d, dtype=f64, generator=torch.Generator().manual_seed(0))
    batch = torch.arange(b).repeat_interleave(n)
    batch[n] = 0

    def energy(p: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(p.reshape(-1, d) @ weight)
        if form == "to_dense_batch":
            dense = pyg_utils.to_dense_batch(h, batch, batch_size=b)[0]
        else:
            starts = torch.tensor([0, 5, 8])  # graphs of 5, 3 and 4 nodes by ``batch``
            slot = torch.arange(b * n) - starts[batch] + batch * (n + 1)
            dense = h.new_zeros(b * (n + 1), d)
            dense[slot] = h
            dense = dense.view(b, n + 1, d)
        return (dense.sum(1) ** 2).sum(-1)

    x = torch.randn(b, n, d, dtype=f64)
    for method, probes in (("auto", None), ("hutchinson", 1)):
        with pytest.raises(BatchInteractionError, match="laplacian"):
            torchdiv.laplacian(energy, x, method=method, num_probes=probes)


_QUANTILES = {  # (q exact in float32, as PyG keeps it: the interpolation points exact)
    "median": lambda: pyg_nn.aggr.MedianAggregation(),
    "quantile": lambda: pyg_nn.aggr.QuantileAggregation([0.375, 0.625]),
}


@pytest.mark.parametrize("kind", list(_QUANTILES))
def test_a_median_readout_within_samples_is_per_sample(kind: str) -> None:
    """PyG's ``MedianAggregation``/``QuantileAggregation`` readout over a flattened batch
    (it sorts all nodes by value, then stably by graph, and gathers back: each graph's
    sorted nodes in rows of their own) was refused as a sort along samples; followed, each
    sample's Laplacian and parameter gradients its own (its graph alone, by grad of grad),
    twice."""
    b, n, d = 3, 5, 2
    weight = torch.randn(d, d, dtype=f64, generator=torch.Generator().manual_seed(0))
    weight.requires_grad_(True)
    pool = _QUANTILES[kind]()
    batch = torch.arange(b).repeat_interleave(n)

    def energy(p: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(p.reshape(-1, d) @ weight)
        return (pool(h, batch, dim_size=b).reshape(b, -1) ** 2).sum(-1)

    def alone(p: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(p.reshape(-1, d) @ weight)
        return (pool(h, torch.zeros(n, dtype=torch.long), dim_size=1) ** 2).sum()

    x = torch.randn(b, n, d, dtype=f64)
    expected = _laplacians(alone, x)
    for _ in range(2):
        _assert_values_and_grads(torchdiv.laplacian(energy, x), expected, [weight])


@pytest.mark.parametrize("form", ["one graph", "graph across samples", "sorted values"])
def test_a_median_across_samples_is_refused(form: str) -> None:
    """The same readout's sort with samples that do mix: the median of all nodes of the
    batch as one graph, a ``batch`` vector putting sample 1's first node into graph 0, and
    a row of the values sorted along the batch (each sample's energy then depends on
    others): refused."""
    b, n, d = 3, 5, 2
    weight = torch.randn(d, d, dtype=f64, generator=torch.Generator().manual_seed(0))
    pool = pyg_nn.aggr.MedianAggregation()
    batch = torch.arange(b).repeat_interleave(n)
    batch[n] = 0

    def energy(p: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(p.reshape(-1, d) @ weight)
        if form == "one graph":
            out = h.reshape(b, n, d) - pool(h, torch.zeros_like(batch), dim_size=1)
        elif form == "graph across samples":
            out = pool(h, batch, dim_size=b)
        else:
            out = h.sort(0).values.reshape(b, n, d)
        return (out.reshape(b, -1) ** 2).sum(-1)

    with pytest.raises(BatchInteractionError, match="sort along samples"):
        torchdiv.laplacian(energy, torch.randn(b, n, d, dtype=f64))


@pytest.mark.parametrize("form", ["spare row read", "graph across samples"])
def test_a_truncating_dense_batch_across_samples_is_refused(form: str) -> None:
    """The truncating layout's spare row, holding several samples' nodes, read (added to
    every sample's rows), and ``to_dense_batch`` truncating to 3 nodes with a ``batch`` that
    puts sample 0's last node first into graph 1 (kept there): refused."""
    b, n, d = 3, 4, 2
    weight = torch.randn(d, d, dtype=f64, generator=torch.Generator().manual_seed(0))
    batch = torch.arange(b).repeat_interleave(n)
    if form == "graph across samples":
        batch[n - 1] = 1

    def energy(p: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(p.reshape(-1, d) @ weight)
        if form == "spare row read":  # (to_dense_batch's own write, the trash slot kept)
            slot = torch.arange(b * n) % n + batch * 2
            dense = h.new_zeros(b * 2 + 1, d)
            dense[torch.where(torch.arange(b * n) % n < 2, slot, b * 2)] = h
            dense = dense[:-1].reshape(b, 2, d) + dense[-1]
        else:
            dense = pyg_utils.to_dense_batch(h, batch, batch_size=b, max_num_nodes=3)[0]
        return (dense.sum(1) ** 2).sum(-1)

    match = "spare last row" if form == "spare row read" else "laplacian"
    with pytest.raises(BatchInteractionError, match=match):
        torchdiv.laplacian(energy, torch.randn(b, n, d, dtype=f64))
