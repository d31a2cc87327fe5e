"""The per-op tables the watch dispatches on, built from the rule modules below it.

``_CARRY``: op -> its ``Carry`` (where the batch dimensions of its results go: elementwise ops
beyond PyTorch's ``pointwise`` tag, views, joins, indexing, puts, writes, factories, and the
ops of ``_MIXING`` whose results keep the batch); ``_MIXING``: op -> its ``Mixing`` (what it
combines). ``_kind`` gives an op in neither its rule (``pointwise`` tag: ``_pointwise``; no
rule at all: ``_unknown``), and ``_rules`` remembers each op's pair as first met
(``BatchAxes.before``). The op sets ``BatchAxes`` reads (``_IN_PLACE_VIEWS``, ``_PUTS``,
``_JOINS``, ``_CATS``, ``_ELEMENTWISE``) are here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from torchdiv._core.mixing.carry import (
    _broadcast,
    _cat,
    _complex_view,
    _convolved,
    _cut,
    _detached,
    _duplicated,
    _first_like_input,
    _fresh,
    _in_order,
    _mm,
    _moved,
    _narrowed,
    _permute,
    _pointwise,
    _reduced,
    _repeated,
    _select,
    _sliced,
    _stack,
    _untracked,
    _view,
)
from torchdiv._core.mixing.combining import (
    _BATCH_NORMS,
    _BIASED,
    _MATRIX_PRODUCTS,
    _REDUCTIONS,
    _SOFTMAXES,
    _SPECTRAL,
    _WHOLE,
    _attention,
    _batch_norm,
    _contraction,
    _convolution,
    _diagonal,
    _group_norm,
    _layer_norm,
    _masked_scatter,
    _paired,
    _pairwise,
    _recurrence,
    _reduction,
    _renorm,
    _softmaxed,
    _spectral,
    _whole,
)
from torchdiv._core.mixing.indexing import (
    _ROLLS,
    _gather,
    _index,
    _index_copy,
    _index_put,
    _index_select,
    _masked_put,
    _masked_select,
    _reordered,
    _scatter,
    _sorted,
)
from torchdiv._core.mixing.reads import VALUE_FREE
from torchdiv._core.mixing.unknown import _leading, _unknown
from torchdiv._core.mixing.writes import (
    _copied,
    _padded_constant,
    _scattered_into,
    _sliced_at,
    _strided,
)

if TYPE_CHECKING:
    from torchdiv._core.mixing.axes import Axes, Carry, Mixing

aten = torch.ops.aten


_POINTWISE_EXTRA = {
    aten.alias.default,
    aten.native_dropout.default,
    aten.expand.default,
    aten.masked_fill.Scalar,
    aten.masked_fill.Tensor,
    aten.where.self,
    # elementwise, though not tagged so
    aten.log_sigmoid_forward.default,
    aten.log_sigmoid_backward.default,
    aten.hardswish.default,
    aten.hardswish_backward.default,
    aten._prelu_kernel.default,  # its weight broadcast (C, 1, ..., 1)
}


_VIEWS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten._reshape_alias.default,
    aten.unsqueeze.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.flatten.using_ints,
}


_CARRY: dict[Any, Carry] = {
    **dict.fromkeys(_POINTWISE_EXTRA, _pointwise),
    aten.clone.default: _duplicated,
    aten._to_copy.default: _duplicated,
    **dict.fromkeys(_VIEWS, _view),
    aten.permute.default: _permute,
    aten.repeat.default: _repeated,
    aten.transpose.int: _permute,
    aten.t.default: _permute,
    aten.select.int: _select,
    aten.slice.Tensor: _cut(1, _sliced),
    aten.narrow.default: _cut(1, _narrowed),
    aten.split.Tensor: _cut(2, _in_order),
    aten.split_with_sizes.default: _cut(2, _in_order),
    aten.unsafe_split.Tensor: _cut(2, _in_order),
    aten.unsafe_split_with_sizes.default: _cut(2, _in_order),
    aten.unbind.int: _cut(1, _in_order),
    aten.cat.default: _cat,
    aten.stack.default: _stack,
    aten.copy_.default: _copied,
    aten.constant_pad_nd.default: _padded_constant,
    aten.copy.default: _copied,
    aten.select_scatter.default: _scattered_into(lambda t, a: t.select(a[2], a[3])),
    aten.slice_scatter.default: _scattered_into(lambda t, a: t[_sliced_at(t, a)]),
    aten.broadcast_tensors.default: _broadcast,
    # samples of different lengths packed one time step after the other: not followed
    aten._pack_padded_sequence.default: _untracked,
    aten.as_strided.default: _strided,  # any layout, even of the same shape (a transpose)
}


_IN_PLACE_VIEWS = {
    aten.unsqueeze_.default,
    aten.squeeze_.default,
    aten.squeeze_.dim,
    aten.squeeze_.dims,
    aten.transpose_.default,
    aten.swapdims_.default,
    aten.swapaxes_.default,
    aten.t_.default,
}


def _in_place_view(func: Any, t: torch.Tensor, axes: Axes, args: Sequence[Any]) -> Axes:
    """The batch dimensions of ``t`` after ``unsqueeze_``, ``squeeze_``, ``transpose_`` (and
    ``swapdims_``, ``t_``), read from its shape before the call: ``quantile`` makes all three
    inside ATen, and after the call ``t``'s old positions would name the wrong dimensions."""
    n = t.dim()
    if func == aten.unsqueeze_.default:
        at = args[1] % (n + 1)
        return tuple(_moved(a, int(a.position >= at)) for a in axes)
    if func in (aten.squeeze_.default, aten.squeeze_.dim, aten.squeeze_.dims):
        named = range(n) if func == aten.squeeze_.default else args[1]
        dims = [named] if isinstance(named, int) else list(named)
        gone = {d % n for d in dims if n and t.shape[d % n] == 1}
        return tuple(_moved(a, -sum(d < a.position for d in gone)) for a in axes)
    if n < 2:
        return axes
    d0, d1 = (0, 1) if func == aten.t_.default else (args[1] % n, args[2] % n)
    swap = {d0: d1, d1: d0}
    return tuple(sorted(a._replace(position=swap.get(a.position, a.position)) for a in axes))


_MASKED_SCATTERS = {aten.masked_scatter.default, aten.masked_scatter_.default}


_CARRY.update(
    {
        aten.index.Tensor: _index,
        aten.index_select.default: _index_select,
        aten.gather.default: _gather,
        aten.masked_select.default: _masked_select,
        aten.flip.default: _reordered,
        **dict.fromkeys(_ROLLS, _reordered),
        **dict.fromkeys(_MASKED_SCATTERS, _masked_put),
        **dict.fromkeys(
            [aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default],
            _index_put,
        ),
        **dict.fromkeys(
            [
                aten.index_copy.default,
                aten.index_copy_.default,
                aten.index_add.default,
                aten.index_add_.default,
            ],
            _index_copy,
        ),
        **dict.fromkeys(
            [
                aten.scatter.src,
                aten.scatter_.src,
                aten.scatter_add.default,
                aten.scatter_add_.default,
                aten.scatter_reduce.two,
                aten.scatter_reduce_.two,
            ],
            _scatter,
        ),
    }
)


_PUTS = {op for op, rule in _CARRY.items() if rule in (_index_put, _index_copy, _scatter)}


_PUTS |= {aten.select_scatter.default, aten.slice_scatter.default}


_CATS = {aten.cat.default}


_JOINS = {*_CATS, aten.stack.default}


_FRESH = {
    aten.zeros.default,
    aten.full.default,
    aten.empty.memory_format,
    aten.zeros_like.default,
    aten.full_like.default,
    aten.empty_like.default,
    aten.new_zeros.default,
    aten.new_full.default,
    aten.new_empty.default,
    aten.lift_fresh.default,  # ``torch.tensor(data)``, ``as_tensor(number)``: Python's data
}


_CARRY.update({**dict.fromkeys(_FRESH, _fresh), aten.detach.default: _detached})


_rules: dict[Any, tuple[Mixing | None, Carry]] = {}  # each op's two rules, as first met


# (and their in-place forms' (``_writing``), as met)
_ELEMENTWISE: set[Carry] = {_pointwise, _duplicated}


def _kind(func: Any, unknown: bool) -> Carry:
    """Elementwise ops (PyTorch's ``pointwise`` tag) broadcast; an op with no rule of its own
    (``unknown``: in neither table) is judged by ``_unknown``; the others end the tracking."""
    if torch.Tag.pointwise in func.tags:
        return _pointwise
    return _unknown(func) if unknown and func not in VALUE_FREE else _untracked


_CARRY[aten.diagonal.default] = _leading(aten.diagonal.default)


_CARRY.update({op: _sorted(_unknown(op)) for op in (aten.sort.default, aten.sort.stable)})


_MIXING: dict[Any, Mixing] = {
    **{op: _contraction(op in _BIASED) for op in _MATRIX_PRODUCTS},
    **{op: _reduction(op, name) for op, name in _REDUCTIONS.items()},
    **{op: _attention(op, "softmax") for op in _SOFTMAXES},
    **{op: _whole(name) for op, name in _WHOLE.items()},
    **{op: _batch_norm(i) for op, i in _BATCH_NORMS.items()},
    aten.native_layer_norm.default: _layer_norm,
    aten.native_group_norm.default: _group_norm,
    aten.convolution.default: _convolution,
    aten._convolution.default: _convolution,  # (torch.jit.trace's; the same first 9 arguments)
    aten.diagonal.default: _diagonal,
    **dict.fromkeys(_MASKED_SCATTERS, _masked_scatter),
    aten.trace.default: _diagonal,  # the sum of the diagonal (0, 1): one kernel on CPU
    aten._pdist_forward.default: _pairwise,
    aten.renorm.default: _renorm,
    aten.renorm_.default: _renorm,
    aten._cudnn_rnn.default: _recurrence(10),
    aten.miopen_rnn.default: _recurrence(8),
    **dict.fromkeys(_SPECTRAL, _spectral),
    aten.view_as_complex.default: _paired,
    aten.mkldnn_rnn_layer.default: _recurrence(None),
}


_CARRY.update(
    {
        **{op: _mm(op in _BIASED) for op in _MATRIX_PRODUCTS},
        **{op: _reduced(op) for op in _REDUCTIONS},
        **{op: _softmaxed(op) for op in _SOFTMAXES},
        **dict.fromkeys(_BATCH_NORMS, _first_like_input),
        aten._native_batch_norm_legit_no_training.default: _first_like_input,
        aten.native_layer_norm.default: _first_like_input,
        aten.native_group_norm.default: _first_like_input,
        aten.convolution.default: _convolved,
        aten._convolution.default: _convolved,
        # transforms along event dimensions (``_spectral`` refused the batch): the batch
        # dimensions keep their places and sizes
        **dict.fromkeys(_SPECTRAL, _first_like_input),
        aten.view_as_real.default: _complex_view,
        aten.view_as_complex.default: _complex_view,
        aten._cudnn_rnn.default: _first_like_input,
        aten.miopen_rnn.default: _first_like_input,
        aten.mkldnn_rnn_layer.default: _first_like_input,
        # samples set to a value along the batch: each one alone
        **dict.fromkeys(
            [
                aten.index_fill.int_Scalar,
                aten.index_fill.int_Tensor,
                aten.index_fill_.int_Scalar,
                aten.index_fill_.int_Tensor,
            ],
            _first_like_input,
        ),
        # each slice along ``dim`` scaled alone (along the batch: each sample; over it,
        # ``_renorm`` refused it)
        aten.renorm.default: _first_like_input,
        aten.renorm_.default: _first_like_input,
        aten.narrow_copy.default: _cut(1, _narrowed),
    }
)
