"""What a watch for sample mixing that passed says of later calls (``reads.Verdict``).

Calls that remember a pass (tiny ``"auto"``, one-probe Hutchinson, the Laplacian's loop,
``value_grad_laplacian``, the compiled-model watch) serve later calls at the structure
without watching them. That holds for other values of ``x`` only where nothing that ran
could have depended on them: not where values reached Python (a number read out, a shape
set by values: its code may do anything after), nor where indices were read along the batch
after values decided something (a comparison, ``argmax``, ``.long()``). Each ``f`` below
builds indices (or a branch) from ``x``'s values in one way; at the first two calls its
samples do not cross (small ``x``: the batch in order), at the third they do (large ``x``):
that call must be refused. References for the calls that pass: the full Jacobian of the
flattened batch (``torch.autograd.functional.jacobian``, float64), whose blocks across
samples are exactly zero there, and the traces of its diagonal blocks (exact sums of the
same products: 1e-12).
"""

from __future__ import annotations

import ast
import inspect
import pathlib
from collections.abc import Callable

import numpy as np
import pytest
import torch

import torchdiv
from torchdiv import BatchInteractionError
from torchdiv._core.mixing.reads import Verdict
from torchdiv._core.mixing.watch import verdicts, watched
from torchdiv._taylor import mixing

f64 = torch.float64
B, D = 3, 2
PERM = torch.tensor([1, 2, 0])  # (a cycle: every sample moved)
T = 5.0  # the threshold: the small x's values are below it, the large x's above


def _shifted(z: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
    """``z`` read at ``(i + by_i) % B``: the batch in order where ``by`` is 0."""
    return z[(torch.arange(B) + by) % B]


def _item(z):  # a number read out, then an index built in Python
    k = int(z.max().item() > T)
    return z.roll(k, 0) * z


def _slice_bounds(z):  # slice bounds from a number read out (a roll of the flattened batch)
    k = D * int(z.max().item() > T)
    flat = z.reshape(-1)
    return torch.cat([flat[k:], flat[:k]]).reshape(B, D) * z


def _tolist(z):  # an index tensor made from Python numbers
    by = torch.tensor([int(v > T) for v in z[:, 0].tolist()])
    return _shifted(z, by) * z


def _nonzero(z):  # a radius graph over the batch, PyG's radius_graph without its batch vector
    with torch.no_grad():
        d = torch.cdist(z, z)
        senders, receivers = torch.nonzero((d < 1.0) & (d > 0), as_tuple=True)
    msg = torch.zeros_like(z).index_add(0, receivers, torch.tanh(z[senders] - z[receivers]))
    return z * z + msg


def _argmax(z):  # the nearest other sample's index, when near enough
    with torch.no_grad():
        d = torch.cdist(z, z) + torch.eye(B, dtype=z.dtype) * 1e9
        near = d.min(1).values < 1.0
        j = torch.where(near, d.argmin(1), torch.arange(B))
    return z[j] * z


def _topk(z):  # a k-NN graph, k = 1, where near enough
    with torch.no_grad():
        d = torch.cdist(z, z) + torch.eye(B, dtype=z.dtype) * 1e9
        values, j = (-d).topk(1, dim=1)
        j = torch.where(-values[:, 0] < 1.0, j[:, 0], torch.arange(B))
    return z.index_select(0, j) * z


def _comparison(z):  # integers computed from a comparison
    return _shifted(z, (z[:, 0] > T).long()) * z


def _mask(z):  # a boolean mask picking which index
    return z[torch.where(z[:, 0] > T, PERM, torch.arange(B))] * z


def _searchsorted(z):
    by = torch.searchsorted(torch.tensor([T], dtype=z.dtype), z[:, 0].contiguous())
    return _shifted(z, by) * z


def _bucketize(z):
    return _shifted(z, torch.bucketize(z[:, 0].contiguous(), torch.tensor([T], dtype=z.dtype))) * z


def _cast(z):  # floating values cast to integers
    return _shifted(z, (z[:, 0].detach() / T).floor().long().clamp(0, 1)) * z


def _python_if(z):  # a branch on a tensor: the batch permuted at later calls only
    if z.sum() > T:
        return z[PERM] * z
    return z * z


def _python_if_scatter(z):  # a branch choosing where a scatter puts each sample's values
    to = PERM if bool((z > T).any()) else torch.arange(B)
    return torch.zeros_like(z).scatter_add(0, to[:, None].expand(B, D), z * z)


def _scatter(z):  # a scatter whose places come from values
    to = torch.where(z[:, 0] > T, PERM, torch.arange(B))
    return torch.zeros_like(z).scatter_add(0, to[:, None].expand(B, D), z * z)


WAYS = {
    "item": _item,
    "slice-bounds": _slice_bounds,
    "tolist": _tolist,
    "nonzero": _nonzero,
    "argmax": _argmax,
    "topk": _topk,
    "comparison": _comparison,
    "bool-mask": _mask,
    "searchsorted": _searchsorted,
    "bucketize": _bucketize,
    "cast": _cast,
    "python-if": _python_if,
    "python-if-scatter": _python_if_scatter,
    "scatter": _scatter,
}


def _block_traces(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Each sample's trace of the full Jacobian, its blocks across samples checked zero."""
    full = torch.autograd.functional.jacobian(lambda v: f(v.reshape(B, D)).reshape(-1), x)
    blocks = full.reshape(B, D, B, D)
    same = torch.eye(B, dtype=torch.bool)[:, None, :, None].expand(B, D, B, D)
    assert bool((blocks[~same] == 0).all()), "the reference is not per sample here"
    return torch.stack([blocks[b, :, b, :].trace() for b in range(B)])


def _divergence(f, x):
    return torchdiv.divergence(f, x)


def _one_probe(f, x):
    probes = torch.ones(1, B, D, dtype=f64)  # v^T J v with v = 1: the sum of each block
    return torchdiv.divergence(f, x, method="hutchinson", probes=probes)


def _diagonal(f, x):
    return torchdiv.jacobian_diagonal(f, x).sum(-1)


def _laplacian(f, x):
    return torchdiv.laplacian(lambda z: f(z).sum(-1), x)


def _value_grad_laplacian(f, x):
    return torchdiv.value_grad_laplacian(lambda z: f(z).sum(-1), x).laplacian


CALLS = {
    "divergence": _divergence,
    "one-probe": _one_probe,
    "jacobian_diagonal": _diagonal,
    "laplacian": _laplacian,
    "value_grad_laplacian": _value_grad_laplacian,
}


def _small() -> torch.Tensor:
    """Samples far apart (no radius or nearest-neighbour edge across them), all below ``T``."""
    return torch.tensor([[0.0, 0.1], [2.0, -0.1], [4.0, 0.2]], dtype=f64) * 0.5


def _large() -> torch.Tensor:
    """Samples close together, all above ``T``."""
    return torch.tensor([[6.0, 6.1], [6.2, 6.0], [6.1, 6.3]], dtype=f64)


# the ways every entry point tries in the fast tests (the rest: ``--slow``); divergence, all
FAST_WAYS = ("nonzero", "python-if", "scatter")


@pytest.mark.parametrize(
    ("way", "call"),
    [
        pytest.param(w, c, marks=() if c == "divergence" or w in FAST_WAYS else pytest.mark.slow)
        for c in CALLS
        for w in WAYS
    ],
)
def test_indices_from_values_are_watched_at_every_call(way: str, call: str) -> None:
    """Two calls where the samples do not cross (right: the per-sample reference), then one
    where they do: refused, though the first two passed."""
    f, run = WAYS[way], CALLS[call]
    x = _small()
    for _ in range(2):
        got = run(f, x)
        if call in ("divergence", "jacobian_diagonal"):
            torch.testing.assert_close(got, _block_traces(f, x), rtol=1e-12, atol=1e-12)
        elif call == "one-probe":
            full = torch.autograd.functional.jacobian(lambda v: f(v).reshape(-1), x)
            expected = full.reshape(B, D, B, D).sum((1, 3)).diagonal()
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(BatchInteractionError):
        run(f, _large())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # (Dynamo's; a warning made it run eagerly)
@pytest.mark.parametrize("way", ["item", "nonzero", "python-if", "scatter"])
def test_indices_from_values_in_a_compiled_model_are_watched_at_every_call(way: str) -> None:
    """The compiled-model watch's memo (``_api/compiled.py``) keeps no pass that holds for
    these values only."""
    torch._dynamo.reset()
    f = torch.compile(WAYS[way], backend="aot_eager", dynamic=True)
    for _ in range(2):
        torchdiv.divergence(f, _small())
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(f, _large())


def _verdict(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Verdict:
    with verdicts() as seen:
        watched(f, x, 1)
    return seen.verdict


EDGES = torch.tensor([0, 1, 2, 2, 1, 0])  # a constant index over the batch


def _back(t: torch.Tensor) -> torch.Tensor:
    """``t``'s samples read by ``EDGES`` and summed back into their own places."""
    return torch.zeros_like(t).index_add(0, EDGES, t[EDGES])


@pytest.mark.parametrize(
    ("f", "expected"),
    [
        pytest.param(lambda z: z.sin(), Verdict(True, True), id="nothing-decides"),
        pytest.param(_back, Verdict(False, True, (), ((EDGES, 0),)), id="constant-index"),
        pytest.param(
            lambda z: (y := _back(z)) * (y > 0),
            Verdict(False, False, (), ((EDGES, 0),)),
            id="then-compare",
        ),
        pytest.param(lambda z: _back(z * (z > 0)), Verdict(False, False), id="compare-then-index"),
        pytest.param(lambda z: _back(z) + 0 * z.sum().item(), Verdict(False, False), id="item"),
        pytest.param(lambda z: z + 0 * len(z[z > 0]), Verdict(False, False), id="shape-by-values"),
        pytest.param(lambda z: z * int(EDGES[1] + 1), Verdict(True, True), id="int-read"),
    ],
)
def test_the_verdict_of_a_watch(f, expected: Verdict) -> None:
    """Which watches hold for other values of ``x`` (``for_any_x``) and of the floating
    tensors ``f`` holds (``for_any_held``): an index read along the batch holds for its
    values only (after values decided, they may come from them; before, from a tensor the
    structure's key does not hold, as ``test_mixing_held_indices`` replaces); a number read
    out (or a shape set by values) hands values to Python, whose code may do anything after;
    a number read out of a constant integer tensor reads no value of ``x``. An index read
    before any value decided names its tensor (``indexed_by``, weakly): the pass is kept
    where the structure's key holds it (a global here)."""
    seen = _verdict(f, torch.randn(3, 2, dtype=f64))
    indexed = tuple(kept.ref() for kept, _ in seen.indexed_by)
    assert (seen.for_any_x, seen.for_any_held, seen.kept(), indexed) == (
        expected.for_any_x,
        expected.for_any_held,
        expected.kept(),
        tuple(t for t, _ in expected.indexed_by),
    )


def _gns(senders: torch.Tensor, receivers: torch.Tensor, n: int):
    """A GNS-style message passing over the flattened batch of ``B`` graphs of ``n`` nodes
    (no value decides: ``x[senders]`` with integer indices shapes its result by them)."""

    def f(z: torch.Tensor) -> torch.Tensor:
        p = z.reshape(B * n, 2)
        m = torch.tanh(p[senders] - p[receivers])
        return (p + torch.zeros_like(p).index_add(0, receivers, m)).reshape(B, n * 2)

    return f


class _GNS(torch.nn.Module):
    """The same as a module whose edges are a buffer (PyG's ``radius_graph`` output kept
    with ``register_buffer``, an MGN's mesh edges)."""

    def __init__(self, edges: torch.Tensor, n: int) -> None:
        super().__init__()
        self.register_buffer("edges", edges)
        self.n = n

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _gns(self.edges[0], self.edges[1], self.n)(z)


def test_a_flattened_graph_with_edges_the_key_holds_is_watched_once(watches: list[int]) -> None:
    """Edges offset per sample in a closure (``f`` made anew at every call, as a training
    loop's lambda) or a module's buffer: watched at the first call only, as any per-sample
    ``f`` (the key holds the edges by identity and version: written in place, or replaced,
    watched again, and edges crossing samples then refused). Values: the traces of the
    float64 full Jacobian's diagonal blocks."""
    n = 3
    local = torch.tensor([[0, 1], [1, 2], [2, 0]])
    edges = (local[None] + n * torch.arange(B)[:, None, None]).reshape(-1, 2).T.contiguous()
    x = torch.randn(B, n * 2, dtype=f64)
    net = _GNS(edges.clone(), n)
    senders, receivers = edges
    for make in (lambda: _gns(senders, receivers, n), lambda: net):
        watches.clear()
        for _ in range(3):
            f = make()
            full = torch.autograd.functional.jacobian(
                lambda z, f=f: f(z).reshape(-1), x.reshape(-1)
            )
            blocks = full.reshape(B, n * 2, B, n * 2).diagonal(0, 0, 2)
            torch.testing.assert_close(torchdiv.divergence(f, x), blocks.diagonal(0, 0, 1).sum(-1))
        assert len(watches) == 1
    net.edges[0, 0] = net.edges[0, -1]  # (a sender of sample B - 1 in sample 0's graph)
    with pytest.raises(BatchInteractionError, match="mixes samples"):
        torchdiv.divergence(net, x)


# Writes of a sender of sample B - 1 into sample 0's graph that no version counts: into the
# edges ``arr`` holds (a ``torch.from_numpy`` tensor) or, ``.data =``, the tensor ``f`` reads
# (``held``: the edges themselves, or the senders' view a closure holds).


def _through_data(edges: torch.Tensor, held: torch.Tensor, arr: np.ndarray) -> None:
    edges.data[0, 0] = int(edges[0, -1])


def _through_numpy(edges: torch.Tensor, held: torch.Tensor, arr: np.ndarray) -> None:
    arr[0, 0] = arr[0, -1]


def _through_storage(edges: torch.Tensor, held: torch.Tensor, arr: np.ndarray) -> None:
    alias = torch.empty(0, dtype=edges.dtype).set_(edges.untyped_storage())
    alias[0] = int(edges[0, -1])  # (another tensor over its storage: its own version)


def _data_assigned(edges: torch.Tensor, held: torch.Tensor, arr: np.ndarray) -> None:
    crossing = held.clone()
    crossing.view(-1)[0] = int(edges[0, -1])
    held.data = crossing


@pytest.mark.parametrize("write", [_through_data, _through_numpy, _through_storage, _data_assigned])
@pytest.mark.parametrize("held", ["closure", "buffer"])
def test_edges_the_key_holds_written_unseen_by_their_version_are_watched_again(
    held: str, write
) -> None:
    """Edges the key holds, written so that their version does not count (``.data``, NumPy's
    array of ``torch.from_numpy``, another tensor over their storage, ``.data =``) to
    cross samples after three passing calls: the next call is watched and refused. The
    first three calls' pass served it, the divergence silently per-sample-wrong (the full
    Jacobian's off-diagonal blocks 0.9), until rev-merges17a."""
    n = 3
    local = torch.tensor([[0, 1], [1, 2], [2, 0]])
    arr = (local[None] + n * torch.arange(B)[:, None, None]).reshape(-1, 2).T.numpy().copy()
    edges = torch.from_numpy(arr)
    x = torch.randn(B, n * 2, dtype=f64)
    net = _GNS(edges, n)
    senders, receivers = edges
    make = (lambda: _gns(senders, receivers, n)) if held == "closure" else (lambda: net)
    for _ in range(3):
        torchdiv.divergence(make(), x)
    write(edges, senders if held == "closure" else edges, arr)
    f = make()
    full = torch.autograd.functional.jacobian(lambda z: f(z).reshape(-1), x.reshape(-1))
    assert full.reshape(B, n * 2, B, n * 2)[0, :, B - 1].abs().max() > 0.1  # (it mixes)
    with pytest.raises(BatchInteractionError, match="mixes samples"):
        torchdiv.divergence(f, x)


def test_a_flattened_graph_with_computed_edges_is_watched_at_every_call(
    watches: list[int],
) -> None:
    """Edges ``f`` computes itself at every call (from constants, the key holds no tensor of
    them) are watched at every call: only a tensor the key holds keeps the pass."""
    n = 3
    local = torch.tensor([[0, 1], [1, 2], [2, 0]])

    def f(z: torch.Tensor) -> torch.Tensor:
        senders, receivers = (local[None] + n * torch.arange(B)[:, None, None]).reshape(-1, 2).T
        return _gns(senders, receivers, n)(z)

    x = torch.randn(B, n * 2, dtype=f64)
    for _ in range(3):
        torchdiv.divergence(f, x)
    assert len(watches) == 3


def _names_passed(func: ast.expr) -> bool:
    """Whether a call's function is ``_taylor.mixing.passed`` (by name or ``mixing.passed``)."""
    if isinstance(func, ast.Attribute):
        return func.attr == "passed" and getattr(func.value, "id", None) == "mixing"
    return isinstance(func, ast.Name) and func.id == "passed"


def test_every_caller_that_remembers_a_pass_takes_the_verdict() -> None:
    """``passed`` has no default verdict (a caller must hand one: keyword only), and every
    function in ``src`` that collects ``verdicts()`` reads what they say (``.verdict``) rather
    than the list: a new caller that keeps a pass cannot leave the verdict out."""
    parameter = inspect.signature(mixing.passed).parameters["verdict"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
    assert parameter.default is inspect.Parameter.empty
    src = pathlib.Path(torchdiv.__file__).parent
    collectors = 0
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _names_passed(node.func):
                keywords = {k.arg for k in node.keywords}
                assert "verdict" in keywords, f"{path}:{node.lineno} calls passed without one"
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for item in ast.walk(node):
                if not isinstance(item, ast.With):
                    continue
                for w in item.items:
                    call = w.context_expr
                    if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "verdicts":
                        collectors += 1
                        name = w.optional_vars.id  # type: ignore[union-attr]
                        used = [
                            n
                            for n in ast.walk(node)
                            if isinstance(n, ast.Name) and n.id == name and n is not w.optional_vars
                        ]
                        assert used, f"{path}:{item.lineno}: verdicts() collected, never read"
    assert collectors >= 3  # the Laplacian's loop, value_grad_laplacian's, the compiled watch


class _Switched(torch.nn.Module):
    """A module whose floating buffer, written in place between calls, decides through
    Python (``if``) or through indices along the batch whether it permutes the batch."""

    def __init__(self, through: str) -> None:
        super().__init__()
        self.through = through
        self.register_buffer("scale", torch.tensor(-1.0, dtype=f64))
        self.register_buffer("order", torch.arange(B, dtype=f64))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.through == "python":
            return z[PERM] * z if self.scale > 0 else z * z
        return z[self.order.long()] * z


@pytest.mark.parametrize("through", ["python", "indices"])
def test_a_module_s_floating_buffer_that_decides_is_watched_at_every_call(through: str) -> None:
    """The structure keys a module's floating buffer by dtype and shape (``weight_norm``'s
    weight is made anew at every forward): a write in place whose values turn the
    permutation on is seen at the next call."""
    net = _Switched(through)
    x = _small()
    for _ in range(2):
        torchdiv.divergence(net, x)
    with torch.no_grad():
        net.scale.fill_(1.0)
        net.order.copy_(PERM.to(f64))
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(net, x)


class _Scattered(torch.nn.Module):
    """Message passing by ``scatter_add`` along the batch alone, to places held in an
    integer buffer (a graph's receivers)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(D, D).to(f64)
        self.register_buffer("dest", torch.arange(B))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        places = self.dest[:, None].expand(B, D)
        return torch.zeros_like(z).scatter_add(0, places, torch.tanh(self.lin(z)))


@pytest.mark.parametrize("method", ["auto", "structured"])
def test_a_scatter_s_places_rewritten_in_place_are_seen(method: str) -> None:
    """A scatter along the batch reads its index's values (``BatchAxes.read_indices``), as
    ``index_add`` does: the structured engine's recording is not kept to check later calls
    by shape, which let a buffer rewritten in place to cross samples pass unwatched."""
    torch.manual_seed(0)
    net = _Scattered()
    x = torch.randn(B, D, dtype=f64)
    for _ in range(2):
        torchdiv.divergence(net, x, method=method)
    with torch.no_grad():
        net.dest.copy_(PERM)
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(net, x, method=method)


@pytest.mark.parametrize("draw", ["randperm", "randint"])
def test_random_indices_along_the_batch_are_watched_at_every_call(draw: str) -> None:
    """Indices drawn at random inside ``f`` differ at every call as values do: a first call
    whose draw kept the batch in order passed, and later draws that permute it were served
    by that verdict (``randperm(2)`` is the identity half the time)."""

    def f(z: torch.Tensor) -> torch.Tensor:
        if draw == "randperm":
            return z[torch.randperm(2)] * z
        return z[(torch.arange(2) + torch.randint(0, 2, ())) % 2] * z

    x = torch.randn(2, 3, dtype=f64)
    seeds = [s for s in range(20) if _draw(draw, s) == [0, 1]][:2]
    crossing = next(s for s in range(20) if _draw(draw, s) == [1, 0])
    for seed in seeds:
        torch.manual_seed(seed)
        torchdiv.divergence(f, x)
    torch.manual_seed(crossing)
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(f, x)


def _draw(draw: str, seed: int) -> list[int]:
    """The order of the batch that ``f``'s draw gives after ``manual_seed(seed)``."""
    torch.manual_seed(seed)
    if draw == "randperm":
        return torch.randperm(2).tolist()
    return ((torch.arange(2) + torch.randint(0, 2, ())) % 2).tolist()


def test_an_index_written_after_it_was_read_keeps_no_pass() -> None:
    """An index tensor the key holds, written by ``f`` after the watch read it (its next
    values may come from ``x``): a key made after the call (``passed`` without ``at``)
    holds the new version, which the read did not see, so nothing is kept."""
    perm = torch.arange(B)

    def f(z: torch.Tensor) -> torch.Tensor:
        y = z[perm] * 2
        perm.copy_(perm.flip(0))  # (after the read)
        return y

    x = torch.randn(B, D, dtype=f64)
    with verdicts() as seen:
        watched(f, x, 1)
    perm.copy_(torch.arange(B))  # (as at the read, but written since: another version)
    mixing.passed(f, x, 1, verdict=seen.verdict)
    assert mixing.passed_before(f, x, 1) is None
