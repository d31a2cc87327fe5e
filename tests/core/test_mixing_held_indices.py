"""Integer indices read along the batch that ``f`` reaches through an object the remembered
pass does not key by (an attribute of a plain object, a dictionary's entry, a bound method's
``self``), replaced between calls at the same shapes.

Since mixing16, ``x[idx]`` with integer ``idx`` decides nothing (``reads.decides``), so a
first watch of such an ``f`` is remembered for any ``x`` (``Verdict.for_any_x``). That holds
for an index tensor ``f``'s key holds (a closure cell, a default, a global: by identity and
version; a module's attribute), not for one reached otherwise: a neighbour list recomputed
outside ``f`` (a simulator's ``self.edges`` rebuilt every few steps from the positions, over
the flattened batch without its ``batch`` vector) crosses samples at a later call of the
same shape, and that call was served by the first verdict (refused before mixing16 for
``p[senders]``; for ``p.index_select(0, senders)``, PyG's way, served before too).
The reference: the full Jacobian of the flattened batch (``torch.autograd.functional``,
float64) has nonzero blocks across samples there (checked), so no per-sample value exists
and the call must be refused.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64
B, N = 3, 3  # graphs, nodes per graph (2-d positions)
LOCAL = torch.tensor([[0, 1], [1, 2], [2, 0]])


def _within() -> torch.Tensor:
    """Each graph's ring, offset per sample in the flattened batch: ``(2, B * 3)``."""
    return (LOCAL[None] + N * torch.arange(B)[:, None, None]).reshape(-1, 2).T.contiguous()


def _across() -> torch.Tensor:
    """The same shape, its senders moved one graph on: edges across samples."""
    edges = _within().clone()
    edges[0] = (edges[0] + N) % (B * N)
    return edges


torch.manual_seed(0)
_LIN = torch.nn.Linear(2, 2).to(f64)


def _gns(z: torch.Tensor, edges: torch.Tensor, gather: str) -> torch.Tensor:
    """One message-passing step of a GNS over the flattened batch, its nodes gathered by
    ``p[senders]`` or by ``p.index_select(0, senders)`` (PyG's ``MessagePassing``)."""
    p = z.reshape(B * N, 2)
    senders, receivers = edges
    if gather == "index":
        messages = torch.tanh(_LIN(p[senders] - p[receivers]))
    else:
        messages = torch.tanh(_LIN(p.index_select(0, senders) - p.index_select(0, receivers)))
    return (p + torch.zeros_like(p).index_add(0, receivers, messages)).reshape(B, N * 2)


class _Simulator:
    """A neighbour list kept on a plain object and rebuilt outside ``f``."""

    def __init__(self, gather: str) -> None:
        self.edges, self.gather = _within(), gather

    def dynamics(self, z: torch.Tensor) -> torch.Tensor:
        return _gns(z, self.edges, self.gather)


Holders = dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[], None]]]


def _holders(gather: str) -> Holders:
    """Each way: ``f`` and what replaces its edges by crossing ones."""
    sim = _Simulator(gather)
    store = {"edges": _within()}
    return {
        "bound-method": (sim.dynamics, lambda: setattr(sim, "edges", _across())),
        "dict": (lambda z: _gns(z, store["edges"], gather), lambda: store.update(edges=_across())),
    }


def _one_probe(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    probes = torch.ones(1, *x.shape, dtype=x.dtype)
    return torchdiv.divergence(f, x, method="hutchinson", probes=probes)


CALLS = {"divergence": torchdiv.divergence, "one-probe": _one_probe}


@pytest.mark.parametrize("gather", ["index", "index_select"])
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("way", ["bound-method", "dict"])
def test_edges_replaced_outside_f_are_watched_again(way: str, call: str, gather: str) -> None:
    x = torch.randn(B, N * 2, dtype=f64)
    f, replace = _holders(gather)[way]
    for _ in range(2):
        CALLS[call](f, x)
    replace()
    full = torch.autograd.functional.jacobian(lambda v: f(v).reshape(-1), x)
    blocks = full.reshape(B, N * 2, B, N * 2)
    assert bool(blocks[0, :, 1, :].abs().sum() > 0)  # (the reference: samples cross now)
    try:
        CALLS[call](f, x)
    except BatchInteractionError:
        return
    raise AssertionError(f"{way}: a call whose edges cross samples was served unwatched")


def test_a_pyg_data_s_edges_replaced_are_watched_again() -> None:
    """The same, with the edges on a ``torch_geometric.data.Data`` (set anew on one object, as
    a training loop reusing its batch object would)."""
    data_module = pytest.importorskip("torch_geometric.data")
    data = data_module.Data(edge_index=_within())
    x = torch.randn(B, N * 2, dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return _gns(z, data.edge_index, "index_select")

    for _ in range(2):
        torchdiv.divergence(f, x)
    data.edge_index = _across()
    try:
        torchdiv.divergence(f, x)
    except BatchInteractionError:
        return
    raise AssertionError("a call whose edges cross samples was served unwatched")
