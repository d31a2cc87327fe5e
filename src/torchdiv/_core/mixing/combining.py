"""What combines samples (``before`` rules): each a ``Mixing``, ``rule(tr, args)`` -> what
the op combined across samples (for the message), ``None`` if nothing.

Matrix products contracting a batch dimension (``_contraction``; not within marked attention
blocks, ``_within_blocks``, nor by a constant block-diagonal matrix over a flattened batch's
rows, ``places.constant_blocks``), reductions over one (``_reduction``, ``_whole``; a softmax whose
keys are samples, ``_attention``, with its weights marked where they are exactly 0 across
samples, ``_softmaxed``), train-mode batch norms, layer and group norms over batch dimensions,
convolutions with a batch dimension among the channels or spatial dimensions
(``_convolution``), recurrences over the samples (``_recurrence``: cuDNN's, MIOpen's and
oneDNN's fused RNN kernels), diagonals, pairwise distances, ``renorm``, FFTs over a batch
dimension (``_spectral``) and ``view_as_complex`` pairing samples. The op sets at the end
(``_MATRIX_PRODUCTS``, ``_REDUCTIONS``, ...) name the ops each rule is for
(``torchdiv._core.mixing.tables`` builds the tables from them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from torchdiv._core.checks import _shape
from torchdiv._core.mixing.carry import _reduced
from torchdiv._core.mixing.errors import _PRODUCT_WHAT
from torchdiv._core.mixing.indexing import _one_per_place
from torchdiv._core.mixing.places import (
    _batch_at,
    _dims,
    _reduced_dims,
    _samples_along,
    _zeros_across,
    constant_blocks,
)

if TYPE_CHECKING:
    from torchdiv._core.mixing.axes import Axes, Block, Carry, Mixing
    from torchdiv._core.mixing.tracker import BatchAxes

aten = torch.ops.aten


def _reduction(op: Any, name: str) -> Mixing:
    def rule(tr: BatchAxes, args: Sequence[Any]) -> str | None:
        q = _batch_at(tr, args[0], _reduced_dims(op, args))
        if q is None:
            return None
        return f"a {name} over samples (dimension {q} of a tensor of shape {_shape(args[0])})"

    return rule


def _whole(name: str) -> Mixing:
    def rule(tr: BatchAxes, args: Sequence[Any]) -> str | None:
        return f"a {name} of all elements, across samples" if tr.axes(args[0]) else None

    return rule


def _masked_scatter(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """``masked_scatter`` fills the mask's places with ``source`` read in flat order over the
    whole tensor, so a source that carries samples lands in other samples' places, unless it
    holds one value per place (``x[m]``: ``_masked_put`` checks where each lands)."""
    if not tr.axes(args[2]) or _one_per_place(args):
        return None
    return "a masked_scatter, which reads its source across samples"


def _attention(op: Any, name: str) -> Mixing:
    """A softmax over samples: refused, unless its rows hold samples of the same batch
    dimension too (attention over every sample's tokens packed into one sequence), where
    ``_softmaxed`` reads its result: weights that are exactly 0 across samples (a
    block-diagonal mask, ``batch[:, None] == batch[None, :]``, PyG-style) keep them apart."""
    reduction = _reduction(op, name)

    def rule(tr: BatchAxes, args: Sequence[Any]) -> str | None:
        message = reduction(tr, args)
        if message is None:
            return None
        t, key = args[0], _batch_at(tr, args[0], _reduced_dims(op, args))
        axes = tr.axes(t) or ()
        keys = [a for a in axes if a.position == key]
        rows = [a for a in axes if a.position != key]
        if len(keys) != 1 or len(rows) != 1 or rows[0].source != keys[0].source:
            return message
        tr.block_check = (rows[0].position, cast(int, key), message)
        return None

    return rule


def _softmaxed(op: Any) -> Carry:
    """``_reduced``, and for a softmax ``_attention`` let through: its result is marked
    (``BatchAxes.blocks``) if exactly 0 at every (row, key) of different samples, else it
    combines samples (``pending``). The verdict holds for these values only
    (``BatchAxes.values_read``: a call with another mask is watched again)."""
    reduced = _reduced(op)

    def rule(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
        result = reduced(tr, args, out)
        if tr.block_check is not None:
            row, key, message = tr.block_check
            tr.values_read()
            if not _zero_across(tr, args[0], out, row, key):
                tr.pending = message
        return result

    return rule


def _zero_across(tr: BatchAxes, t: torch.Tensor, out: Any, row: int, key: int) -> bool:
    """Whether ``out`` (shaped as ``t``) is exactly 0 wherever the sample along ``row``
    differs from the sample along ``key`` (then marked, as weights over its last two
    dimensions, rows by keys)."""
    rows, keys = _samples_along(tr, t, row), _samples_along(tr, t, key)
    if not isinstance(out, torch.Tensor) or out.shape != t.shape or rows is None or keys is None:
        return False
    zero = _zeros_across(out.movedim((row, key), (-2, -1)), rows, keys)
    if zero and (row, key) == (t.dim() - 2, t.dim() - 1):
        tr.blocks[id(out)] = (out, rows, keys, _version(out))
    return zero


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (shared by its views; ``None``: none to read, an inference
    tensor's or a wrapper's)."""
    try:
        return int(t._version)
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


def _marked(tr: BatchAxes, t: Any) -> Block | None:
    """``t``'s mark (``BatchAxes.blocks``) if no write changed it since (its version then:
    ``w.clone().add_(c)``, an item or a view written, would put values across samples into
    weights marked exactly 0 there)."""
    entry = tr.blocks.get(id(t)) if isinstance(t, torch.Tensor) else None
    if entry is None or entry[0] is not t or entry[3] is None or entry[3] != _version(t):
        return None
    return entry


def _keep_block(tr: BatchAxes, t: Any, out: Any) -> None:
    """A copy, a broadcast or a view of marked weights that keeps their last two dimensions
    (``expand``, ``view`` merging the heads into the batch of a ``bmm``, ``clone``,
    ``_to_copy``) holds each matrix of them in the same places: marked alike."""
    entry = _marked(tr, t)
    if entry is None or not isinstance(out, torch.Tensor):
        return
    if out.dim() >= 2 and out.shape[-2:] == t.shape[-2:]:
        tr.blocks[id(out)] = (out, entry[1], entry[2], _version(out))


def _within_blocks(tr: BatchAxes, a: Any, b: Any) -> bool:
    """Whether ``a @ b`` sums marked weights ``a`` (rows by keys: its last two dimensions,
    holding the samples the mark was checked with, and no other, still 0 across samples:
    ``w.data`` replaced or ``w.untyped_storage()`` written changes no version) against ``b``
    whose summed dimension holds the keys' samples, in order, and no other: each row then
    sums values of its own sample only (the weights of others are 0, and so are their
    derivatives)."""
    entry = _marked(tr, a)
    if entry is None or a.dim() < 2:
        return False
    _, rows, keys, _ = entry
    summed = max(b.dim() - 2, 0)
    if len(tr.axes(a) or ()) != 2 or len(tr.axes(b) or ()) != 1:
        return False
    along = [_samples_along(tr, a, a.dim() - 2), _samples_along(tr, a, a.dim() - 1)]
    held = _samples_along(tr, b, summed)
    return all(
        s is not None and torch.equal(s, want)
        for s, want in zip((*along, held), (rows, keys, keys), strict=True)
    ) and _zeros_across(a, rows, keys)  # (read again: `w.data =`, a storage write: no version)


def _contraction(biased: bool) -> Mixing:
    """Matrix products sum over the left operand's last dimension and the right one's second
    to last (a vector's only dimension)."""

    def rule(tr: BatchAxes, args: Sequence[Any]) -> str | None:
        a, b = (args[1], args[2]) if biased else (args[0], args[1])
        if (tr.blocks and _within_blocks(tr, a, b)) or constant_blocks(tr, a, b):
            return None
        for t, summed in ((a, a.dim() - 1), (b, max(b.dim() - 2, 0))):
            for q, *_ in tr.axes(t) or ():
                if q == summed:
                    return f"{_PRODUCT_WHAT} (dimension {q} of an operand of shape {_shape(t)})"
        return None

    return rule


def _batch_norm(training_arg: int) -> Mixing:
    def rule(tr: BatchAxes, args: Sequence[Any]) -> str | None:
        if len(args) <= training_arg or not args[training_arg]:
            return None
        t = args[0]
        if _batch_at(tr, t, [d for d in range(t.dim()) if d != 1]) is None:
            return None
        return "a batch norm in train mode, normalising with statistics of the whole batch"

    return rule


def _recurrence(batch_first_arg: int | None) -> Mixing:
    """A fused RNN kernel (cuDNN's, MIOpen's, oneDNN's LSTM layer that ``nn.LSTM`` runs in
    float32 on the CPU; elsewhere on the CPU the dispatcher sees the steps, whose picked
    samples ``_picked_in`` follows) of an input ``(T, B, D)``, or ``(B, T, D)`` if its
    ``batch_first`` argument is set (``batch_first_arg``; ``None``: always ``(T, B, D)``, as
    oneDNN's layer is given it, its ``batch_first`` passed on after the transpose): samples
    along the time steps are read one after the other, along the features summed; only its
    batch dimension may hold them."""

    def rule(tr: BatchAxes, args: Sequence[Any]) -> str | None:
        t = args[0]
        batch = 0 if batch_first_arg is not None and args[batch_first_arg] else 1
        q = _batch_at(tr, t, [d for d in range(t.dim()) if d != batch])
        if q is None:
            return None
        return (
            f"a recurrent net run over samples (dimension {q} of its input of shape "
            f"{_shape(t)}, whose batch dimension is {batch}: batch_first set wrongly?)"
        )

    return rule


def _layer_norm(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    t, shape = args[0], args[1]
    q = _batch_at(tr, t, range(t.dim() - len(shape), t.dim()))
    return None if q is None else f"a layer norm over samples (dimension {q} of shape {_shape(t)})"


def _within_runs(tr: BatchAxes, t: Any, width: int) -> bool:
    """Whether every batch dimension of ``t`` along its channels (dimension 1) holds each
    sample in runs that consecutive blocks of ``width`` channels never straddle: a batch
    folded into the channels, ``x.reshape(1, B * C, H, W)``, split into groups of
    ``width`` channels that each lie inside one sample (``inner`` a multiple of ``width``)."""
    return all(axis.inner % width == 0 for axis in tr.axes(t) or () if axis.position == 1)


def _group_norm(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """``native_group_norm(t, weight, bias, N, C, HxW, group, eps)`` normalises each of
    ``group`` blocks of ``C // group`` channels over them and the positions: samples along
    the positions are combined, along the channels only where a block holds several (a batch
    folded into the channels with one group per sample or more is per sample)."""
    t = args[0]
    q = _batch_at(tr, t, range(2, t.dim()))
    if q is None and not _within_runs(tr, t, max(args[4] // max(args[6], 1), 1)):
        q = 1
    if q is None and not _per_channel(tr, t, args[1:3]):
        return (
            f"a group norm whose weight or bias hold samples other than its channels' ({_shape(t)})"
        )
    return None if q is None else f"a group norm over samples (dimension {q} of shape {_shape(t)})"


def _per_channel(tr: BatchAxes, t: Any, params: Sequence[Any]) -> bool:
    """Whether a normalisation's per-channel ``params`` (weight, bias) computed from ``x``
    (AdaGN's scale and shift as the affine of a group norm over a batch folded into the
    channels) hold, at each channel, the sample of ``t``'s channel: their one batch
    dimension along their only dimension, ``t``'s only one along its channels."""
    held = [tr.axes(u) or () for u in params if isinstance(u, torch.Tensor)]
    if not any(held):
        return True
    t_axes = tr.axes(t) or ()
    if len(t_axes) != 1 or t_axes[0].position != 1:
        return False
    source, channels = t_axes[0].source, torch.arange(t.shape[1])
    want = t_axes[0].samples(channels)
    return all(
        len(axes) == 1
        and axes[0].position == 0
        and axes[0].source == source
        and torch.equal(axes[0].samples(channels).cpu(), want.cpu())
        for axes in held
        if axes
    )


def _diagonal(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """``t.diagonal(offset, dim1, dim2)`` pairs sample ``i`` with index ``i`` of the other
    dimension when either dimension holds samples."""
    t = args[0]
    pair = _dims(t, [args[2] if len(args) > 2 else 0, args[3] if len(args) > 3 else 1])
    q = _batch_at(tr, t, pair)
    return None if q is None else f"a diagonal across samples (dimension {q} of {_shape(t)})"


def _pairwise(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """``pdist(t)``: the distances between every two rows of ``t``, over its columns: any
    batch dimension of ``t`` is combined (its ``n (n - 1) / 2`` distances are a multiple of
    an odd ``n``: the result's size says nothing)."""
    q = _batch_at(tr, args[0], range(args[0].dim()))
    return None if q is None else f"pairwise distances across samples (dimension {q} of pdist)"


def _renorm(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """``renorm(t, p, dim, maxnorm)`` scales each slice along ``dim`` by its norm over all the
    other dimensions."""
    t = args[0]
    q = _batch_at(tr, t, [d for d in range(t.dim()) if d != args[2] % max(t.dim(), 1)])
    return None if q is None else f"a renorm, a norm over samples (dimension {q} of {_shape(t)})"


def _convolution(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """A convolution sums over each group's input channels and the kernel's positions:
    samples along the channels are combined unless each group's channels lie inside one
    sample (a batch folded into the channels with ``groups`` a multiple of it: StyleGAN2's
    modulated convolution)."""
    t, weight = args[0], args[1]
    groups = args[8] if len(args) > 8 else 1
    mixed = [] if _within_runs(tr, t, t.shape[1] // groups) else [1]
    mixed += [d for d in range(2, t.dim()) if weight.shape[d] > 1]
    q = _batch_at(tr, t, mixed)
    if q is None and not _conv_parameters(tr, args, groups):
        return (
            "a convolution whose weights or bias hold samples other than its input channels' "
            f"(weights of shape {_shape(weight)}, groups={groups})"
        )
    return (
        None if q is None else f"a convolution across samples (dimension {q} of shape {_shape(t)})"
    )


def _conv_parameters(tr: BatchAxes, args: Sequence[Any], groups: int) -> bool:
    """Whether a convolution's weights and bias computed from ``x`` (a hypernetwork's
    per-sample kernels, ``(B * C_out, C_in // groups, k, k)`` over a batch folded into the
    channels) keep samples apart: their samples along their first dimension only, one batch
    dimension each, of the input's source, and every output channel reading one sample: its
    group's input channels (``_within_runs``), its weights (the input channels' rows of a
    transposed convolution's) and its bias of the same sample; the input's samples only
    along its channels (a weight of another sample than a row's input mixes them)."""
    t, weight, bias, transposed = args[0], args[1], args[2], bool(args[6])
    held = [(u, tr.axes(u) or ()) for u in (weight, bias) if isinstance(u, torch.Tensor)]
    if not any(axes for _, axes in held):
        return True
    t_axes = tr.axes(t) or ()
    every = [a for _, axes in held for a in axes] + list(t_axes)
    if any(len(axes) > 1 for _, axes in held) or len(t_axes) > 1:
        return False
    if len({a.source for a in every}) != 1 or any(a.position != 0 for _, ax in held for a in ax):
        return False
    if t_axes and t_axes[0].position != 1:
        return False
    c_in = t.shape[1]
    c_out = (weight.shape[1] * groups) if transposed else weight.shape[0]
    width_in, width_out = c_in // groups, c_out // groups

    def by_group(samples: torch.Tensor) -> torch.Tensor | None:  # input channels -> groups
        rows = samples.reshape(groups, width_in)
        if not bool((rows == rows[:, :1]).all()):
            return None
        return rows[:, 0].repeat_interleave(width_out)

    lines: list[torch.Tensor | None] = []
    if t_axes:
        lines.append(by_group(t_axes[0].samples(torch.arange(c_in))))
    for u, axes in held:
        if axes:
            line = axes[0].samples(torch.arange(u.shape[0]))
            lines.append(by_group(line) if transposed and u is weight else line)
    first = lines[0]
    return first is not None and all(
        line is not None and torch.equal(line.cpu(), first.cpu()) for line in lines
    )


def _spectral(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """An FFT (``_fft_r2c``, ``_fft_c2r``, ``_fft_c2c``: every ``torch.fft`` transform,
    ``fftn`` without ``dim`` too) over a batch dimension: each frequency sums the samples."""
    t, dims = args[0], args[1]
    q = _batch_at(tr, t, _dims(t, dims)) if dims else None
    name = tr.func._schema.name.split("::")[-1]
    return None if q is None else f"{name} along samples (dimension {q} of {_shape(t)})"


def _paired(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """``view_as_complex`` of a last dimension (real, imaginary) that holds two samples."""
    t = args[0]
    q = _batch_at(tr, t, [t.dim() - 1])
    return None if q is None else f"view_as_complex pairing samples (dimension {q} of {_shape(t)})"


_SPECTRAL = {aten._fft_r2c.default, aten._fft_c2r.default, aten._fft_c2c.default}


_MATRIX_PRODUCTS = {
    aten.mm.default,
    aten.addmm.default,
    aten._sparse_addmm.default,  # ``torch.sparse.mm``: ``addmm`` with a sparse ``a``
    # ``torch.sparse.mm(a, b, reduce)`` (PyG's mean/max aggregation over a sparse ``adj_t``):
    # ``(out, argout)``, the rows carried by ``out``; ``argout``'s integers untracked
    aten._sparse_mm_reduce_impl.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.mv.default,
    aten.addmv.default,
    aten.dot.default,
    aten.vdot.default,
}


_BIASED = {  # (bias, a, b)
    aten.addmm.default,
    aten._sparse_addmm.default,
    aten.baddbmm.default,
    aten.addmv.default,
}


_REDUCTIONS = {
    aten.sum.dim_IntList: "sum",
    aten.mean.dim: "mean",
    aten.amax.default: "max",
    aten.amin.default: "min",
    aten.max.dim: "max",
    aten.min.dim: "min",
    aten.prod.dim_int: "product",
    aten.var.correction: "variance",
    aten.std.correction: "standard deviation",
    aten.var_mean.correction: "variance",
    aten.std_mean.correction: "standard deviation",
    aten.logsumexp.default: "logsumexp",
    aten.linalg_vector_norm.default: "norm",
    aten.norm.ScalarOpt_dim: "norm",
    aten._softmax.default: "softmax",
    aten._log_softmax.default: "log-softmax",
    aten._safe_softmax.default: "softmax",
    aten.cumsum.default: "cumulative sum",
    aten.cumprod.default: "cumulative product",
    aten.logcumsumexp.default: "cumulative logsumexp",
}


_SOFTMAXES = {aten._softmax.default, aten._safe_softmax.default}  # (``_attention``)


# ops whose result holds the same values in the same places as their input, if shaped alike
_SAME_PLACES = {
    aten.expand.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.alias.default,
    aten.clone.default,
    aten._to_copy.default,
}


_WHOLE = {
    aten.sum.default: "sum",
    aten.mean.default: "mean",
    aten.max.default: "max",
    aten.min.default: "min",
    aten.prod.default: "product",
}


_BATCH_NORMS = {
    aten.native_batch_norm.default: 5,
    aten._native_batch_norm_legit.default: 5,
    aten._native_batch_norm_legit.no_stats: 3,
    aten._native_batch_norm_legit_functional.default: 5,
    aten.cudnn_batch_norm.default: 5,
    aten.miopen_batch_norm.default: 5,
}
