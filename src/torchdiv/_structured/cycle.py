"""Traces of products of shared matrices and per-sample diagonals, by trace cyclicity.

For a path ``J_b = F_m ... F_1`` (``torchdiv._structured.factors``), ``tr(J_b)`` is invariant
under rotating the product, so the factors form a *cycle*. Adjacent shared matrices are
multiplied once for all samples (``W_1 W_L`` of an MLP's first and last layers included:
``tr(W_L D ... W_1) = tr(D ... W_1 W_L)``), diagonals the same in every sample are folded into
a neighbouring matrix, and what remains alternates between shared matrices ``S_i`` and
per-sample diagonals ``D_i``:

    tr(D_n S_n ... D_1 S_1)

* ``n = 0``: ``tr(S)``, or ``sum(d)`` for a purely elementwise path;
* ``n = 1``: ``d . diag(S)``: one dot product per sample;
* ``n = 2``: ``d_2^T (S_2 o S_1^T) d_1`` with ``o`` the elementwise product: the matrix is
  shared, so every sample costs one matrix-vector product, about one layer of a forward pass;
* ``n >= 3``: the cycle is opened before the ``S_i`` that makes it cheapest, and the columns
  of that shared matrix travel once around it: ``w`` columns (its input width), a batched
  matrix product per remaining ``S_j`` except the last, which is contracted on the diagonal
  only. ``chunk`` columns at a time bound the memory; by default as many as keep the carried
  block near ``EAGER_BLOCK_ELEMENTS`` (cache-sized: 2.2x faster than all columns at once for a
  5-layer MLP, D = H = 256, N = 128, on a 2-core CPU; the 2 MiB L2 cache a core has there:
  ``bench/chain_blocks.py``).

A 3-layer MLP (two activations) is ``n = 2``: its exact divergence costs about two forward
passes instead of ``D`` (plus recording ``f``). Joining the last matrix to the first is skipped
when leaving the cycle open at the event is cheaper (a 2-D flow with 64-wide layers: 2
columns, not 64). Jacobian *diagonals* cannot rotate (the trace is invariant, the diagonal is
not): ``diagonal`` keeps each path in its order, leading and trailing diagonals scale the
result, and the first matrix's columns are carried through the others (``_entries``).
"""

from __future__ import annotations

import torch

from torchdiv._core.basis import chunks
from torchdiv._structured import products
from torchdiv._structured.factors import Diagonal, Factor, Path, Shared

Tensor = torch.Tensor
# an eager call's block (2 MiB in float32, a core's L2 cache here), with ``_entries``' last
# contraction (its docstring): a tanh MLP's diagonal at w = 64, N = 4096 took 7.1 / 12.0 ms
# at D = 8 / 16 (blocks of 4 MiB: 7.1 / 21.6; of 1 MiB: 5.1 / 16.7), at D = 64, N = 256 2.0
# (2.8; 2.1); deep MLPs' traces 1.07-1.09x 4 MiB's; w = 512 alike (``bench/chain_blocks.py``,
# quiet, one thread; the contraction's change alone took the D = 16 diagonal 19 -> 11 ms)
EAGER_BLOCK_ELEMENTS = 1 << 19
# a compiled call's (``replay``: its chunk and the batch sizes it serves, ``_carried``): each
# block is unrolled into the graph, and blocks of 2^18 there compiled a 64-wide MLP's diagonal
# at 2000 rows in 23-24 s (32 blocks; 7.5-8.8 s in 8) and served a replay recorded at 2 rows
# up to 128 (512), another graph at 200, for no faster compiled call (rev-lead30)
BLOCK_ELEMENTS = 1 << 20
JOIN_ELEMENTS = 1 << 20  # shared matrices are multiplied up to this size (4 MiB in float32)


def trace(paths: list[Path], x: Tensor, n_samples: int, chunk: int | None) -> Tensor:
    """``sum_p c_p tr(F_{p,m} ... F_{p,1})`` for every sample, shape ``(N,)``; a path without
    factors is the identity on ``x``'s event (``x + g(x)``: its trace is the event size)."""
    total = None
    for path in paths:
        if path.factors:
            part = _cycle_trace(_cheaper_cycle(_merged(path.factors)), chunk)
        else:
            part = x.new_full((1,), x.numel() // n_samples)
        part = part if path.coefficient == 1 else path.coefficient * part
        total = part if total is None else total + part
    if total is None:
        total = x.new_zeros(1)
    return total if len(total) == n_samples else total.expand(n_samples).clone()


def _merged(factors: tuple[Factor, ...]) -> list[Factor]:
    """Adjacent factors multiplied where that costs nothing per sample, all in the dtype
    their product promotes to (a float64 constant scaling a float32 layer's output, a
    float32 buffer after a bfloat16 layer: ``f`` promotes there, and a matrix product of the
    two dtypes would fail)."""
    dtype = _promoted(factors)
    out: list[Factor] = []
    for f in (_cast(f, dtype) for f in factors):
        joined = _join(out[-1], f) if out else None
        if joined is None:
            out.append(f)
        else:
            out[-1] = joined
    return out


def _promoted(factors: tuple[Factor, ...]) -> torch.dtype:
    """The dtype that products of all ``factors`` promote to."""
    tensors = [f.matrix if isinstance(f, Shared) else f.scale for f in factors]
    dtype = tensors[0].dtype if tensors else torch.float32
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _cast(factor: Factor, dtype: torch.dtype) -> Factor:
    if isinstance(factor, Shared):
        return factor if factor.matrix.dtype == dtype else Shared(factor.matrix.to(dtype))
    return factor if factor.scale.dtype == dtype else Diagonal(factor.scale.to(dtype))


def _join(first: Factor, then: Factor) -> Factor | None:
    """``then @ first`` as one factor, if it is one without per-sample matrices and, for two
    matrices, no larger than ``JOIN_ELEMENTS`` or than one of them (a bottleneck
    ``D -> 2 -> D`` stays two thin factors instead of a ``D x D`` matrix)."""
    if isinstance(first, Shared) and isinstance(then, Shared):
        rows, cols = then.matrix.shape[0], first.matrix.shape[1]
        largest = max(then.matrix.numel(), first.matrix.numel(), JOIN_ELEMENTS)
        if rows * cols > largest:
            return None
        return Shared(products.matmul(then.matrix, first.matrix))
    if isinstance(first, Diagonal) and isinstance(then, Diagonal):
        return Diagonal(first.scale * then.scale)
    if isinstance(first, Shared) and isinstance(then, Diagonal) and then.shared:
        return Shared(then.scale.T * first.matrix)  # rows scaled
    if isinstance(first, Diagonal) and first.shared and isinstance(then, Shared):
        return Shared(then.matrix * first.scale)  # columns scaled
    return None


def _closed(factors: list[Factor]) -> list[Factor]:
    """The cycle: the last factor joined to the first where possible (``tr(AB) = tr(BA)``)."""
    if len(factors) > 1:
        joined = _join(factors[-1], factors[0])
        if joined is not None:
            return [joined, *factors[1:-1]]
    return factors


def _cheaper_cycle(factors: list[Factor]) -> list[Factor]:
    """The cycle with its last and first factors joined, or left apart if that is cheaper:
    joining the first and last layers of an MLP saves a layer, but when the event is much
    narrower than the layers (a 2-D flow) the cycle is best opened at the event itself."""
    closed = _closed(factors)
    ends_are_matrices = isinstance(factors[0], Shared) and isinstance(factors[-1], Shared)
    if len(closed) == len(factors) or len(closed) == 1 or not ends_are_matrices:
        return closed
    opened = _rotation(_matrices(factors))[0] < _rotation(_matrices(closed))[0]
    return factors if opened else closed  # (not ``min(key=)``: Dynamo cannot trace it)


def _matrices(cycle: list[Factor]) -> list[Tensor]:
    """The shared matrices of a cycle, as ``_alternated`` gives them (in order from the
    first)."""
    return [f.matrix for f in cycle if isinstance(f, Shared)]


def _alternated(cycle: list[Factor]) -> tuple[list[Tensor], list[Tensor]]:
    """A cycle of two or more factors as matrices ``S_1 .. S_n`` and diagonals ``D_1 .. D_n``
    (``tr(D_n S_n ... D_1 S_1)``)."""
    start = 0 if isinstance(cycle[0], Shared) else 1
    return _alternating(cycle[start:] + cycle[:start], cyclic=True)


def _rotation(shared: list[Tensor]) -> tuple[int, int]:
    """Multiply-adds per sample of ``_cycle_trace`` on these matrices (their own products
    aside), and the matrix to open the cycle before (``n >= 3``)."""
    if len(shared) <= 2:
        return shared[-1].shape[0] if len(shared) == 1 else shared[-1].numel(), 0
    return min([(_cost(shared[r:] + shared[:r]), r) for r in range(len(shared))])


def _cycle_trace(cycle: list[Factor], chunk: int | None) -> Tensor:
    """Per-sample trace of a cycle (module docstring), ``(N,)`` or ``(1,)``."""
    if len(cycle) == 1:
        (f,) = cycle
        if isinstance(f, Shared):
            return f.matrix.diagonal().sum().reshape(1)
        return f.scale.sum(-1)
    shared, scales = _alternated(cycle)
    if len(shared) == 1:
        return (scales[0] * shared[0].diagonal()).sum(-1)
    if len(shared) == 2:
        joined = products.join(shared[1], shared[0])  # shared[1] o shared[0]^T
        return ((scales[1] @ joined) * scales[0]).sum(-1)
    _, best = _rotation(shared)
    return _opened(shared[best:] + shared[:best], scales[best:] + scales[:best], chunk)


def _alternating(factors: list[Factor], cyclic: bool) -> tuple[list[Tensor], list[Tensor]]:
    """``factors`` (starting with a matrix) as the matrices and the diagonals between them,
    with a unit diagonal between two matrices that were not joined (also between the last and
    the first, for a cycle), so that matrices and diagonals alternate."""
    shared: list[Tensor] = []
    scales: list[Tensor] = []
    following = factors[1:] + (factors[:1] if cyclic else [])
    for f, then in zip(factors, following + [None] * (len(factors) - len(following)), strict=True):
        if isinstance(f, Diagonal):
            scales.append(f.scale)
            continue
        shared.append(f.matrix)
        if isinstance(then, Shared):
            scales.append(f.matrix.new_ones(1, f.matrix.shape[0]))
    return shared, scales


def _cost(shared: list[Tensor]) -> int:
    """Multiply-adds per sample of ``_opened`` starting at ``shared[0]``."""
    return shared[0].shape[1] * sum(s.numel() for s in shared[1:-1])


def _opened(shared: list[Tensor], scales: list[Tensor], chunk: int | None) -> Tensor:
    """``tr(D_n S_n ... D_1 S_1)``: the diagonal of ``S_n D_{n-1} ... S_1``, scaled."""
    return (scales[-1] * _entries(shared, scales[:-1], chunk)).sum(-1)


def _entries(shared: list[Tensor], scales: list[Tensor], chunk: int | None) -> Tensor:
    """The diagonal of every sample's ``S_k D_{k-1} ... D_1 S_1`` (square, ``k >= 2``), shape
    ``(N, w)`` (or ``(1, w)``), by carrying ``S_1``'s columns through, ``chunk`` at a time
    (default: blocks of about ``EAGER_BLOCK_ELEMENTS``); ``S_k`` is contracted on the diagonal
    only. The columns are kept as rows, ``(N, k, w)``, so that every ``S_j`` is one matrix
    product over all samples and columns at once (``(N k, w) @ S_j^T``), and the last
    diagonal ``D_{k-1}`` is contracted as one batched product: ``(v o S_k) @ d``, ``(N, k, w)
    @ (N, w, 1)`` (not a product ``(N, k, w)`` more and its sum: a tanh MLP's diagonal,
    D = 16, w = 64, N = 4096, 14.3 -> 10.7 ms, one thread); a block of one column as one
    matrix-vector product, ``(v_0 o d) @ s_k`` (``N`` batched products of two vectors took
    1.15-1.25x the product and sum at w = 512, N = 4096; this, 1.0x)."""
    width, n_samples = shared[0].shape[1], max(d.shape[0] for d in scales)
    if chunk is None:
        widest = max(s.shape[0] for s in shared)
        chunk = max(1, EAGER_BLOCK_ELEMENTS // (n_samples * widest))
    parts = []
    for start, stop in chunks(width, chunk):
        v = shared[0][:, start:stop].T.contiguous()[None]  # (1, k, w_1)
        for s, d in zip(shared[1:-1], scales[:-1], strict=True):
            v = v * d[:, None, :]
            v = (v.reshape(-1, v.shape[-1]) @ s.T).reshape(*v.shape[:2], -1)
        if stop - start > 1:  # entries (start + j, j)
            parts.append(((v * shared[-1][start:stop]) @ scales[-1][:, :, None])[..., 0])
        else:
            parts.append(((v[:, 0] * scales[-1]) @ shared[-1][start])[:, None])
    return torch.cat(parts, -1)


def diagonal(paths: list[Path], x: Tensor, n_samples: int, chunk: int | None) -> Tensor:
    """``sum_p c_p diag(F_{p,m} ... F_{p,1})`` for every sample, shape ``(N, n)``.

    Rotating the product keeps its trace, not its diagonal, so each path is taken in its own
    order: leading and trailing diagonals scale the result, and the matrices in between carry
    the first one's ``n`` columns (about one forward pass of the middle layers per column)."""
    n = x.numel() // n_samples
    total = x.new_zeros(1, n)
    for path in paths:
        total = total + path.coefficient * _path_diagonal(_merged(path.factors), x, n, chunk)
    return total if total.shape[0] == n_samples else total.expand(n_samples, n).clone()


def _path_diagonal(factors: list[Factor], x: Tensor, n: int, chunk: int | None) -> Tensor:
    ends = []
    if factors and isinstance(factors[0], Diagonal):
        ends.append(factors[0].scale)
        del factors[0]
    if factors and isinstance(factors[-1], Diagonal):
        ends.append(factors[-1].scale)
        del factors[-1]
    if not factors:
        core = x.new_ones(1, n)
    elif len(factors) == 1 and isinstance(factors[0], Shared):
        core = factors[0].matrix.diagonal()[None]
    else:
        core = _entries(*_alternating(factors, cyclic=False), chunk)
    for scale in ends:
        core = core * scale
    return core
