"""The rule for an op no table knows (``_unknown``), read from its schema (``_Signature``).

It combines samples if its ``dim`` argument names a batch dimension (``sort``, ``topk``,
``median``/``mode``/``cummax`` along it, ``nansum``, ``unfold``), it pools or resamples along
one among its spatial dimensions (``grid_sample`` there at any grid), it is a ``linalg``
function of matrices whose rows or columns are samples (``det``, ``svd``, ``matrix_exp``),
its keys are samples (attention), or it reads different samples in one place
(``linalg_cross(x, x.flip(0))``); a result with no dimension that could hold the samples (a
scalar ``dist``, ``median()``, a mean loss) depends on all of them; a result shaped as a
tracked argument holds its samples in place, and one of an op that rearranges only some
dimensions (a pad, a pool, ``interpolate``, ``im2col``/``col2im``, ``pixel_shuffle``,
``diag_embed``, ``diagonal``, ``glu``: ``_left_alone``) holds them along the others. Anything
else ends the tracking of its result, silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.utils._pytree import tree_leaves

from torchdiv._core.checks import _shape
from torchdiv._core.mixing.axes import Axes
from torchdiv._core.mixing.places import _batch_at, _dims, _held

if TYPE_CHECKING:
    from torchdiv._core.mixing.axes import Carry
    from torchdiv._core.mixing.tracker import BatchAxes


_DIM_ARGUMENTS = ("dim", "dims", "dimension")


_SPATIAL_ARGUMENTS = ("kernel_size", "output_size")


# the ops sampling their input at a grid's points (``_resampled``)
_GRID_SAMPLERS = frozenset(
    {"grid_sampler_2d", "grid_sampler_3d", "_grid_sampler_2d_cpu_fallback", "cudnn_grid_sampler"}
)


_RIGHT_HAND_SIDES = ("B", "b")  # of ``linalg_solve`` and kin: each column solved alone


# of ``linalg_householder_product``: a batch of vectors, not of matrices
_VECTOR_ARGUMENTS = ("tau",)


# solves outside ``torch.linalg``, whose first argument is the right-hand side, and another
# matrix function there
_SOLVES = ("cholesky_solve", "triangular_solve")


_MATRIX_FUNCTIONS = (*_SOLVES, "cholesky_inverse")


_PADS = re.compile(r"(reflection|replication)_pad\dd$")  # copies of the edges: the others mix


# sliding windows: the argument naming the dimension whose places they change
_WINDOWS = {"unfold": "dimension", "unfold_backward": "dim"}


# ops that leave their first argument's leading dimensions alone and rearrange the others:
# the names of the arguments whose smallest (wrapped around the result's or the argument's
# dimensions) counts those left alone, or a count less than the argument's dimensions
_LEADING_DIMS: dict[str, tuple[str, ...] | int] = {
    "pixel_shuffle": 3,  # (*, C r^2, H, W) -> (*, C, H r, W r)
    "pixel_unshuffle": 3,
    "diag_embed": ("dim1", "dim2"),  # (*, D) -> matrices along dim1, dim2 of the result
    "diagonal": ("dim1", "dim2"),  # dim1, dim2 taken out, the diagonal appended
    "affine_grid_generator": 2,  # (*, 2, 3) -> (*, H, W, 2)
}


def _unknown(func: Any) -> Carry:
    """The rule for an op no table knows, read from its schema: it combines samples (each
    floating result then depends on the combination) if, for an argument ``t`` holding samples,

    * its ``dim``/``dims``/``dimension`` argument names a batch dimension of its first
      argument (``sort``, ``topk``, ``kthvalue``, ``median``, ``mode``, ``cummax``,
      ``nansum``, ``unfold``, ``glu``, ``linalg_cross``);
    * it pools or resamples (a ``kernel_size``/``output_size`` argument) its first argument
      along a batch dimension among its last, spatial ones: a kernel wider than one or a new
      size there; or pads it there by reflection or replication (copies of other places);
    * it is a ``linalg`` matrix function (no ``dim`` argument; or ``cholesky_solve``,
      ``triangular_solve``, ``cholesky_inverse``) of matrices whose rows or columns are
      samples (the last two dimensions; of a solve's right-hand side ``B``, the rows alone:
      each column is solved alone);
    * its ``key`` or ``value`` (attention kernels) has samples along its sequence dimension;
    * two tracked arguments, or one in two ways, hold different samples at one place
      (``linalg_cross(x, x.flip(0))``), samples an indexing op moved among them;
    * it overlap-adds frames that are samples (``unfold_backward``, ``torch.istft``'s);
    * it shuffles channels that are samples (``channel_shuffle``: ``_shuffled``).

    Else only its floating results with no room for a batch dimension of ``t`` (no dimension
    a multiple of its samples: a scalar ``dist``, ``median()``, a mean loss)
    depend on combined samples. Ops that keep the samples in place (fused attention, pooling
    over the event, embeddings, interpolation) pass; a result shaped as a tracked
    argument is followed as holding its samples in place (not one that is an argument the op
    writes, as an in-place op returns it; a fresh one is, beside arguments written: a fused
    fake-quantize's output beside its observer's statistics, ``rrelu_with_noise``'s),
    and a pad's, ``unfold``'s, ``unfold_backward``'s, one of as many dimensions by an op
    along another dimension (``glu``), a pool's, a resampling's (``interpolate``, ``im2col``,
    ``col2im``), ``pixel_shuffle``'s or ``diag_embed``'s as holding those along the dimensions
    it leaves alone (``_left_alone``), ``grid_sample``'s as holding its grid's at the places read
    (``_sampled_at``); the others not."""
    op = _Signature.of(func)

    def rule(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
        tracked = [
            (arg, t, axes)
            for arg, a in [*zip(op.names, args, strict=False), *tr.kwargs.items()]
            for t in (a if isinstance(a, list | tuple) else (a,))
            if (axes := tr.axes(t))
        ]
        if not tracked:
            return None
        outs = [
            o
            for o in tree_leaves(out)
            if isinstance(o, torch.Tensor)
            and o.numel()
            and (o.dtype.is_floating_point or o.is_complex())
        ]
        what = _combined(op, tr, args, tracked, out) if outs else None
        for o in outs:
            lost = what or _no_room(op.name, tracked, o)
            if lost is not None:
                tr.mixed[id(o)] = (o, tr.message(tr.func, lost))
        if what is not None:
            return None
        # a result shaped as a tracked argument holds its samples in place; a pad's or a
        # sliding window's, those along the dimensions it leaves alone
        results = out if isinstance(out, list | tuple) else (out,)
        # (grid_sample's by its arguments' roles alone: its result shaped as its input holds
        # the grid's samples too)
        return [
            (
                _sampled_at(op, tr, args, o)
                if op.name in _GRID_SAMPLERS
                else next((axes for _, t, axes in tracked if t.shape == o.shape), None)
                or _left_alone(op, tr, args, o)
            )
            if isinstance(o, torch.Tensor) and not written
            else None
            for o, written in zip(results, op.written or (False,) * len(results), strict=False)
        ]

    return rule


class _Signature(NamedTuple):
    """What ``_unknown`` reads of an op's schema, once."""

    name: str  # ``sort``
    names: list[str]  # of its arguments
    defaults: list[Any]  # what the dispatcher leaves out of ``args``
    dim: str | None  # its ``dim``-like argument, if its first one is a tensor ``self``
    spatial: str | None  # its ``kernel_size`` or ``output_size`` argument, likewise
    spatial_dims: int | None  # from its name: ``avg_pool2d``, 2
    linalg: bool  # a ``linalg`` function of matrices (no ``dim``)
    # per result of an op that writes in place, whether it is (a view of) an argument written:
    # not followed; its fresh results are (``aten._fused_moving_avg_obs_fq_helper``'s output
    # beside the observer statistics it writes, ``rrelu_with_noise``'s); empty if none written
    written: tuple[bool, ...]

    @classmethod
    def of(cls, func: Any) -> _Signature:
        schema = func._schema
        names = [a.name for a in schema.arguments]
        name = schema.name.split("::")[-1]
        first = bool(names) and names[0] in ("self", "input")
        first = first and str(schema.arguments[0].type) == "Tensor"
        dim = next((n for n in _DIM_ARGUMENTS if n in names), None) if first else None
        digits = re.findall(r"(\d)d", name)
        return cls(
            name,
            names,
            [a.default_value for a in schema.arguments],
            dim,
            next((n for n in _SPATIAL_ARGUMENTS if n in names), None) if first else None,
            int(digits[-1]) if digits else None,
            (name.startswith(("linalg_", "_linalg_")) and dim is None) or name in _MATRIX_FUNCTIONS,
            tuple(r.alias_info is not None for r in schema.returns) if schema.is_mutable else (),
        )

    def argument(self, args: Sequence[Any], kwargs: dict[str, Any], arg: str) -> Any:
        at = self.names.index(arg)
        return args[at] if at < len(args) else kwargs.get(arg, self.defaults[at])


Tracked = tuple[str, torch.Tensor, Axes]  # an op's argument (schema name), holding samples


def _combined(
    op: _Signature, tr: BatchAxes, args: Sequence[Any], tracked: list[Tracked], out: Any
) -> str | None:
    """What combines samples in the call of ``op`` (``_unknown``'s rules), if anything."""
    t = args[0] if args else None
    if isinstance(t, torch.Tensor) and tr.axes(t) and t.dim():
        what = (
            _along(op, tr, args, t)
            or _resampled(op, tr, args, t, out)
            or _padded(op, tr, args, t)
            or _overlapped(op, tr, args, t)
            or _shuffled(op, tr, args, t)
        )
        if what is not None:
            return what
    core = (lambda arg, a: 1 if _vector(op, tr, args, arg, a) else 2) if op.linalg else None
    return (
        _matrices(op, tr, args, tracked)
        or _attended(op, tracked)
        or _conflicting(op.name, tracked, core)
    )


def _along(op: _Signature, tr: BatchAxes, args: Sequence[Any], t: torch.Tensor) -> str | None:
    """``op``'s ``dim`` names a batch dimension of its first argument ``t``."""
    dims = None if op.dim is None else op.argument(args, tr.kwargs, op.dim)
    q = None if dims is None or dims == [] else _batch_at(tr, t, _dims(t, dims))
    return None if q is None else f"{op.name} along samples (dimension {q} of {_shape(t)})"


def _resampled(
    op: _Signature, tr: BatchAxes, args: Sequence[Any], t: torch.Tensor, out: Any
) -> str | None:
    """``op`` pools or resamples ``t`` along a batch dimension among its last, spatial ones:
    a kernel wider than one there, or a new size; or samples it at a grid's points
    (``grid_sample``), whose values pick the places read, so any place reads any sample."""
    gridded = op.name in _GRID_SAMPLERS
    if gridded:
        k = t.dim() - 2
    elif op.spatial is not None:
        k = op.spatial_dims or len(op.argument(args, tr.kwargs, op.spatial) or ())
    else:
        return None
    kernel = op.argument(args, tr.kwargs, "kernel_size") if "kernel_size" in op.names else None
    first = out if isinstance(out, torch.Tensor) else tree_leaves(out)[0]
    for i, d in enumerate(range(max(t.dim() - k, 0), t.dim())):
        wide = kernel is not None and len(kernel) > 0 and kernel[min(i, len(kernel) - 1)] > 1
        wide = wide or gridded
        if _batch_at(tr, t, [d]) is not None and (wide or first.shape[d] != t.shape[d]):
            return f"{op.name} across samples (dimension {d} of {_shape(t)}, a spatial one)"
    return None


def _changed_dims(
    op: _Signature, tr: BatchAxes, args: Sequence[Any], o: torch.Tensor
) -> set[int] | None:
    """The dimensions of the first argument ``t`` whose places a pad (the last
    ``len(padding) // 2``), ``unfold`` or ``unfold_backward`` (``torch.stft``'s and
    ``torch.istft``'s frames; ``dim``) changes, or an op along one dimension ``dim`` (not a
    batch one: ``_along``) whose result ``o`` has as many dimensions (``glu``, halving it:
    its result was not followed, so a mean over samples after a GLU passed unseen), a pool
    or a resampling (a ``kernel_size``/``output_size`` argument: its spatial dimensions;
    with a ``weight``, the channels too), ``pixel_shuffle``, ``diag_embed`` or ``diagonal``
    (all but the leading dimensions, ``_LEADING_DIMS``: their results were not followed
    either), a ``linalg`` function (each matrix: ``det``, ``eigvalsh``) or an op along
    dimensions ``dims`` keeping their number (``rot90``); ``None`` for any other op."""
    t = args[0]
    if _PADS.match(op.name):
        n = len(op.argument(args, tr.kwargs, "padding")) // 2
        return set(range(t.dim() - n, t.dim()))
    if op.name in _LEADING_DIMS:
        dims = _LEADING_DIMS[op.name]
        if isinstance(dims, int):
            return set(range(max(t.dim() - dims, 0), t.dim()))
        n = o.dim() if op.name == "diag_embed" else t.dim()
        return set(range(min(op.argument(args, tr.kwargs, d) % n for d in dims), t.dim()))
    if op.linalg:  # a matrix function of each matrix: (*, m, n) -> (*, ...)
        return set(range(max(t.dim() - 2, 0), t.dim()))
    if op.spatial is not None:  # a pool or a resampling: (N, C, *spatial), the last k changed
        k = op.spatial_dims or len(op.argument(args, tr.kwargs, op.spatial) or ())
        # one with a weight (a convolution's kernel) mixes the channels too
        return set(range(1 if "weight" in op.names else max(t.dim() - k, 0), t.dim()))
    if op.name in _WINDOWS:
        return {op.argument(args, tr.kwargs, _WINDOWS[op.name]) % t.dim()}
    dim = None if op.dim is None else op.argument(args, tr.kwargs, op.dim)
    if isinstance(dim, int) and t.dim() and o.dim() == t.dim():
        return {dim % t.dim()}
    if isinstance(dim, list | tuple) and dim and t.dim() and o.dim() == t.dim():  # rot90
        return {d % t.dim() for d in dim}
    return None


def _left_alone(op: _Signature, tr: BatchAxes, args: Sequence[Any], o: torch.Tensor) -> Axes | None:
    """The batch dimensions of ``op``'s first argument ``t`` (a pad, ``unfold``,
    ``unfold_backward``, an op along one other dimension: ``_changed_dims``) along the
    dimensions it leaves alone, in the same places of its result ``o`` (a reflection-padded
    signal's channels, each sample's frames of ``torch.stft``, ``torch.istft``'s
    overlap-added frames of each sample, a GLU's halves)."""
    t = args[0] if args else None
    axes = tr.axes(t)
    if not axes or not isinstance(t, torch.Tensor):
        return None
    changed = _changed_dims(op, tr, args, o)
    if changed is None:
        return None
    kept = tuple(
        axis
        for axis in axes
        if axis.position not in changed
        and axis.position < o.dim()
        and o.shape[axis.position] == t.shape[axis.position]
    )
    return kept or None


def _leading(func: Any) -> Carry:
    """The rule of an op with a mixing check of its own (``diagonal``) that leaves its first
    argument's leading dimensions alone (``_LEADING_DIMS``): their batch dimensions are
    followed into its result (a diagonal of each sample's matrix, ``x[:, :, None] * x[:, None]``
    taken along ``dim1=1, dim2=2``, was not followed, so a mean over samples after it passed
    unseen)."""
    op = _Signature.of(func)
    return lambda tr, args, out: [_left_alone(op, tr, args, out)]


def _sampled_at(op: _Signature, tr: BatchAxes, args: Sequence[Any], o: torch.Tensor) -> Axes | None:
    """The batch dimensions of ``grid_sample``'s result ``o``, ``(N, C, *places)``: its input's
    along ``N`` and ``C`` (along a spatial one it combined them: ``_resampled``), its grid's
    ``(N, *places, 2 or 3)`` along ``N`` and the places, one dimension further on. A tri-plane
    or K-planes field reads learned planes at every sample's points, which lie along the grid's
    places (``grid.view(1, -1, 1, 2)``): its result was not followed, so a mean over the
    samples after it passed unseen."""
    if op.name not in _GRID_SAMPLERS or len(args) < 2:
        return None
    image, grid = args[0], args[1]
    kept = [
        axis
        for axis in tr.axes(image) or ()
        if axis.position < 2 and o.shape[axis.position] == image.shape[axis.position]
    ]
    for axis in tr.axes(grid) or ():
        at = axis.position + (axis.position > 0)
        if axis.position < grid.dim() - 1 and o.shape[at] == grid.shape[axis.position]:
            kept.append(axis._replace(position=at))
    return tuple(sorted(set(kept))) or None


def _shuffled(op: _Signature, tr: BatchAxes, args: Sequence[Any], t: torch.Tensor) -> str | None:
    """``channel_shuffle`` of ``(N, C, *spatial)`` with samples along the channels, in two or
    more groups of two or more: it moves samples to other samples' places, keeping the shape
    (followed in place, it passed a per-sample ``f`` of ``x[None, :, :, None]`` silently
    wrong)."""
    if op.name not in ("channel_shuffle", "native_channel_shuffle") or t.dim() < 2:
        return None
    groups = op.argument(args, tr.kwargs, "groups")
    q = _batch_at(tr, t, [1]) if 1 < groups < t.shape[1] else None
    return None if q is None else f"{op.name} moving samples (dimension {q} of {_shape(t)})"


def _overlapped(op: _Signature, tr: BatchAxes, args: Sequence[Any], t: torch.Tensor) -> str | None:
    """``unfold_backward`` (the overlap-add of ``torch.istft``) of frames that are samples,
    overlapping (``size > step``): each place sums neighbouring samples."""
    if op.name != "unfold_backward":
        return None
    dim, size, step = (op.argument(args, tr.kwargs, a) for a in ("dim", "size", "step"))
    q = _batch_at(tr, t, [dim % t.dim()]) if size > step else None
    return (
        None
        if q is None
        else f"an overlap-add of frames that are samples (dimension {q} of {_shape(t)})"
    )


def _padded(op: _Signature, tr: BatchAxes, args: Sequence[Any], t: torch.Tensor) -> str | None:
    """``op``, a reflection or replication pad, pads ``t`` along a batch dimension: the new
    places hold copies of other places' samples, then followed as if they held their own."""
    if not _PADS.match(op.name):
        return None
    padding = op.argument(args, tr.kwargs, "padding")
    for i in range(len(padding) // 2):
        d = t.dim() - 1 - i
        if (padding[2 * i] or padding[2 * i + 1]) and _batch_at(tr, t, [d]) is not None:
            return f"{op.name} across samples (dimension {d} of {_shape(t)}, padded)"
    return None


def _matrices(
    op: _Signature, tr: BatchAxes, args: Sequence[Any], tracked: list[Tracked]
) -> str | None:
    """``op``, a ``linalg`` function, reads matrices whose rows or columns are samples (of a
    solve's right-hand side ``B``, whose columns are solved alone, the rows)."""
    if not op.linalg or not args:
        return None
    for arg, a, axes in tracked:
        matrix = [a.dim() - 2, a.dim() - 1]
        if _vector(op, tr, args, arg, a):
            matrix = [a.dim() - 1]
        elif arg in _RIGHT_HAND_SIDES or (op.name in _SOLVES and arg == "self"):
            # the rows of a right-hand side (left=False: its columns)
            matrix = [a.dim() - (2 if tr.kwargs.get("left", True) else 1)]
        q = next((q for q, *_ in axes if q in matrix), None)
        if q is not None:
            return (
                f"{op.name} of matrices whose rows or columns are samples (dimension {q} of "
                f"{_shape(a)})"
            )
    return None


def _vector(op: _Signature, tr: BatchAxes, args: Sequence[Any], arg: str, a: torch.Tensor) -> bool:
    """Whether the argument ``arg`` (``a``) of the ``linalg`` function ``op`` is a (batch of)
    vector(s), its dimensions before the last its batch: ``householder_product``'s ``tau``, a
    solve's right-hand side of one dimension fewer than its matrix (PyTorch's rule)."""
    if arg in _VECTOR_ARGUMENTS:
        return True
    solve = op.name in _SOLVES  # (B, A): cholesky_solve, triangular_solve
    if not (arg in _RIGHT_HAND_SIDES or (solve and arg == "self")):
        return False
    lhs = args[int(solve)] if len(args) > int(solve) else None  # A
    return a.dim() == 1 or (isinstance(lhs, torch.Tensor) and a.shape == lhs.shape[:-1])


def _attended(op: _Signature, tracked: list[Tracked]) -> str | None:
    """``op``, an attention kernel, attends each query to keys (values) that are samples."""
    for arg, a, axes in tracked:
        if arg in ("key", "value") and any(q == a.dim() - 2 for q, *_ in axes):
            return f"{op.name}, attention across samples (dimension {a.dim() - 2} of {arg})"
    return None


def _conflicting(
    name: str, tracked: list[Tracked], core: Callable[[str, torch.Tensor], int] | None = None
) -> str | None:
    """Whether the arguments hold different samples at one place (dimensions aligned at the
    right; for a ``linalg`` function, the batch dimensions before each argument's ``core``
    last ones, 2 of a matrix, 1 of a vector: ``solve(A.flip(0), b)``'s ``A`` ``(B, n, n)``
    and ``b`` ``(B, n)`` were compared one dimension apart, and passed), one of them samples
    an indexing op moved: ``x`` and ``x.flip(0)``."""
    if not any(axis.rows for *_, axes in tracked for axis in axes):
        return None
    seen: dict[tuple[int, int], tuple[int, ...]] = {}
    for arg, t, axes in tracked:
        end = t.dim() - (0 if core is None else core(arg, t))
        for axis in axes:
            held = _held(axis, t.shape[axis.position])
            key = (axis.position - end, axis.size)
            other = seen.setdefault(key, held)
            n = min(len(held), len(other))
            if held[:n] != other[:n]:
                return (
                    f"{name} combining different samples in one place (dimension "
                    f"{axis.position} of a tensor of shape {_shape(t)})"
                )
    return None


def _no_room(name: str, tracked: list[Tracked], out: torch.Tensor) -> str | None:
    """Whether the result ``out`` has no dimension for the samples of an argument: none whose
    size is a multiple of their number (a scalar, ``median()``, singular values)."""
    for _, t, axes in tracked:
        for axis in axes:
            if not any(n % axis.period == 0 for n in out.shape if n):
                return (
                    f"{name} of a tensor holding samples along dimension {axis.position} (shape "
                    f"{_shape(t)}), whose result of shape {_shape(out)} has no room for them"
                )
    return None


# namespaces whose ops the tables and schemas judge (collectives: ``tracker._collective``)
_SEEN_THROUGH = ("aten", "prims", "c10d", "_c10d_functional", "_c10d_functional_autograd")


def inside_kernel(func: Any) -> Callable[[BatchAxes, Sequence[Any]], str | None] | None:
    """The rule for a ``torch.library`` op (outside PyTorch's namespaces, ``_SEEN_THROUGH``),
    whose kernel the watch cannot see into: its schema (``_unknown``) says where its samples
    sit, but its Python or C++ kernel may combine them (``x - x.mean(0)`` inside: ``"auto"``
    returned the batch's derivatives). Judged by running it again: where changing the first
    sample of its first argument holding samples changes another sample's place in a result
    shaped as that argument, it combines samples. Not judged (``None``): an op that writes
    (``mutates_args``), gives other values for the same arguments (random), or runs where
    values are not real (fake tensors, ``torch.func``'s wrappers)."""
    if not isinstance(func, torch._ops.OpOverload) or func.namespace in _SEEN_THROUGH:
        return None
    if func._schema.is_mutable:
        return None

    def rule(tr: BatchAxes, args: Sequence[Any]) -> str | None:
        at = next(
            (
                (i, a, axes[0])
                for i, a in enumerate(args)
                if type(a) is torch.Tensor and a.is_floating_point() and (axes := tr.axes(a))
            ),
            None,
        )
        if at is None or at[2].size < 2 or torch.compiler.is_compiling():
            return None
        i, t, axis = at
        if is_functorch_wrapped_tensor(t) or t.is_meta:
            return None
        first = (axis.samples(torch.arange(t.shape[axis.position])) == 0).to(t.device)
        shape = [1] * t.dim()
        shape[axis.position] = -1
        first = first.reshape(shape)
        moved = list(args)
        cpu = t.device.type == "cpu"  # (the generators put back: f's own draws unchanged)
        rng = torch.random.fork_rng([] if cpu else [t.device], device_type=t.device.type)
        with torch.no_grad(), rng:
            moved[i] = t + first * (1 + t.abs())  # the first sample's elements alone changed
            out, again, changed = (tree_leaves(func(*a, **tr.kwargs)) for a in (args, args, moved))
            for r, s, c in zip(out, again, changed, strict=False):
                if not isinstance(r, torch.Tensor) or r.shape != t.shape:
                    continue
                if not torch.equal(r, s):
                    return None  # (random: not judged)
                others = ~first.expand(r.shape)
                if not torch.equal(r[others], c[others]):
                    return (
                        f"the custom op {func._name}, whose kernel changes other samples' "
                        "results where one sample's input changes (it combines samples inside "
                        "its kernel, which the watch cannot see into; its schema says nothing)"
                    )
        return None

    return rule
