"""Which values decide what ``f`` does: ops that read them (``decides``), reads the
dispatcher does not see (``Reads``), and ops whose results ignore them (``VALUE_FREE``).

A watch of ``f`` during which no op turned floating values into something that decides what
the code calls next (a Python number, a shape set by values, integers or booleans computed from
floating values, an op that raises on its argument's values) holds for every floating value
``f`` reads (``torchdiv._taylor.mixing.identity``); ``BatchAxes.values_decide`` notes the
contrary. Values that reach Python (``decides``' ``PYTHON``), or indices read along the batch
after values decided something, make a pass hold for those values of ``x`` only: every call
is then watched (``Verdict``, what every caller that remembers a pass keeps it by). ``Reads``
is the ``TorchFunctionMode`` that notes reads that bypass the dispatcher (``tolist()``,
``numpy()``, ``str()``) and follows the results of tensor subclasses (``BatchAxes.follow``).
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from torchdiv._core.modes import DispatchMode, dropped_hook, refuse_gradient_hook

if TYPE_CHECKING:
    from torchdiv._core.mixing.tracker import BatchAxes

aten = torch.ops.aten


# results that do not depend on their argument's values: a gradient seed ones_like(loss)
VALUE_FREE = {
    aten.detach.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
    aten.empty_like.default,
    aten.rand_like.default,
    aten.randn_like.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
}


class Kept(NamedTuple):
    """A tensor a pass holds at (``ref``, weakly), its version and a copy of its values then
    (``Verdict.while_held``, ``Verdict.indexed_by``).

    ``current`` compares the values too: a write its version does not count (through
    ``.data``, ``.data =``, NumPy's array of ``torch.from_numpy``, another tensor ``set_``
    over its storage) turned a held index into edges across samples, or a held weight into
    one a factorization fails on, unwatched until rev-merges17a.

    Example:
        >>> edges = torch.tensor([0, 1, 2])
        >>> kept = Kept.of(edges)
        >>> edges.data[0] = 2  # (its version unchanged)
        >>> kept.current()
        False
    """

    ref: Any
    version: int
    values: torch.Tensor

    @staticmethod
    def of(t: torch.Tensor) -> Kept:
        """``t`` now: a weak reference, its version and a copy of its values."""
        return Kept(weakref.ref(t), t._version, t.detach().clone())

    def current(self) -> bool:
        """Whether the tensor is alive at its version and values then (``torch.equal``: a
        ``nan`` is never current)."""
        t, values = self.ref(), self.values
        if t is None or t._version != self.version:
            return False
        with torch._C.DisableTorchFunction():
            alike = (t.shape, t.dtype, t.device) == (values.shape, values.dtype, values.device)
            return alike and torch.equal(t.detach(), values)


@dataclass(frozen=True)
class Verdict:
    """What a watch of ``f`` that passed says of its other calls at the same structure
    (``torchdiv._taylor.mixing.passed``; ``BatchAxes.verdict`` makes it): ``for_any_x``, it
    holds for other values of ``x`` too; ``for_any_held``, for other values of the floating
    tensors ``f`` holds as well (no value decided anything: ``decides``). Not ``for_any_x``
    where values reached Python (``PYTHON``: its code may do anything after, a branch on
    ``x.max().item()`` flipping the batch at a later call), where a rule read indices along
    a batch dimension after values decided something (they may come from ``x``: a radius
    graph ``nonzero(cdist(p, p) < r)`` over a flattened batch, within each sample at one call,
    across samples at the next), or where values of attention weights decided the verdict:
    such an ``f`` is watched at every call. The default keeps nothing; ``joined`` gives the
    verdict of several watched evaluations, every caller that remembers a pass takes it from
    one of these.

    ``while_held``: the values that reached Python were only those of parameters ``f`` held
    before the call, through an op that raises on them (``_CHECKS_VALUES``: the singular
    values of a weight, ``W / matrix_norm(W, 2)``), each ``Kept`` then: the pass holds for
    any ``x`` while each of them is alive at that version and values (``kept``).
    ``indexed_by``: the integer tensors a rule read indices along the batch from, before
    values decided anything, each ``Kept`` then with the tensor it is a view of (or
    ``None``): the pass holds for any ``x`` only where ``f``'s structure key holds each of
    them (or its base) by identity, and it stays at its version and values (``passed``
    looks; ``f`` wrote none after reading it). With
    either, ``for_any_x`` stays ``False`` for a caller that looks at neither. ``numbers``:
    one of those ops read a tensor built from held ones (``BatchAxes.built``: ``inv(P @ L @
    U)`` of a Glow layer's parameters and buffers), with Python numbers its ops took
    (``W @ W.T + eps * I``) that a module's attribute may hold, which the structure key does
    not: the pass holds only while the modules ``f`` reaches hold the same numbers too.

    Example:
        >>> Verdict.joined([Verdict(True, True), Verdict(True, False)])
        Verdict(for_any_x=True, for_any_held=False, while_held=None, indexed_by=(), numbers=False)
        >>> Verdict.joined([])  # nothing watched: nothing to keep
        Verdict(for_any_x=False, for_any_held=False, while_held=None, indexed_by=(), numbers=False)
        >>> Verdict(False, False, ()).kept(), Verdict().kept()
        ((), None)
    """

    for_any_x: bool = False
    for_any_held: bool = False
    while_held: tuple[Kept, ...] | None = None
    indexed_by: tuple[tuple[Kept, Kept | None], ...] = ()
    numbers: bool = False

    def kept(self) -> tuple[Kept, ...] | None:
        """The held parameters the pass holds for any ``x`` at (``Kept``; ``()``: at any;
        ``indexed_by`` aside), or ``None`` if it holds for these values of ``x`` only."""
        return () if self.for_any_x else self.while_held

    @staticmethod
    def joined(verdicts: Sequence[Verdict]) -> Verdict:
        """The verdict all of ``verdicts`` make together (none: ``Verdict()``)."""
        if not verdicts:
            return Verdict()
        held = all(v.for_any_held for v in verdicts)
        kept = [v.kept() for v in verdicts]
        indexed = tuple(r for v in verdicts for r in v.indexed_by)
        if all(k == () for k in kept) and not indexed:
            return Verdict(True, held)
        if any(k is None for k in kept):
            return Verdict(False, held)
        numbers = any(v.numbers for v in verdicts)
        return Verdict(False, held, tuple(t for k in kept for t in k or ()), indexed, numbers)


# how far ``decides`` found values reach: a tensor of integers or booleans (``x > 0``), or
# Python itself (a number read out, a shape set by values, an error raised on values)
TENSOR, PYTHON = 1, 2


def decides(
    func: Any,
    args: Sequence[Any],
    out: Any,
    decided: bool = False,
    kwargs: dict[str, Any] | None = None,
) -> int:
    """Whether, and how far, the op ``func`` turned values into something that can decide
    what the code calls next or which samples an index moves: ``0`` not; ``TENSOR``:
    integers or booleans computed from floating values (``x > 0``, ``argmax``, ``.long()``, a
    sort's indices, ``searchsorted``; or drawn at random, ``randperm``, ``randint``: they
    differ at every call as values do), which decide only through the tensors computed from
    them; ``PYTHON``: values handed to Python, from which its code may compute anything
    (a number read out, ``item``, a branch on a tensor; a shape set by values, ``nonzero``,
    ``unique``, a boolean mask's ``x[m]``; an op that raises on a floating argument's values,
    ``_CHECKS_VALUES``: ``try: bernoulli(p)``, its error caught). A number read out of, or a
    shape set by, an integer or boolean tensor counts where values decided something
    before (``decided``: that tensor may hold them) or where a floating tensor sets it;
    ``x[idx]`` with integer ``idx`` decides nothing (its shape is ``idx``'s). A watch of ``f``
    during which no op decided holds for every floating value ``f`` reads, not only those it
    was watched with (``torchdiv._taylor.mixing.identity``): which ops ran, on which shapes,
    with which integer indices, followed from ``f``'s code and the rest. (A read that
    bypasses the dispatcher, ``tolist()``, ``numpy()`` or ``str()``, is noted by ``Reads``.)

    Example:
        >>> x = torch.ones(2)
        >>> decides(aten.gt.Scalar, (x, 0.5), x > 0.5), decides(aten.tanh.default, (x,), x)
        (1, 0)
        >>> decides(aten._local_scalar_dense.default, (x[0],), 1.0)
        2
    """
    kind = _DECIDED.get(func)
    if kind is None:
        tagged = any(tag in func.tags for tag in _VALUES_DECIDE)
        seeded = torch.Tag.nondeterministic_seeded in func.tags
        kind = _READ_OUT if tagged or func in _CHECKS_VALUES else _SEEDED if seeded else 0
        _DECIDED[func] = kind
    if kind == _READ_OUT:
        deciding = args[1:] if func in _SHAPED_BY_INDICES else (args, kwargs)
        if decided or func in _CHECKS_VALUES or _any_floating(deciding):
            return PYTHON
    outs = out if isinstance(out, list | tuple) else (out,)
    if all(t is None or (isinstance(t, torch.Tensor) and _floating(t)) for t in outs):
        return 0
    return TENSOR if kind == _SEEDED or _any_floating((args, kwargs)) else 0


def _any_floating(args: Any) -> bool:
    return any(isinstance(a, torch.Tensor) and _floating(a) for a in tree_leaves(args))


def _floating(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class Reads(TorchFunctionMode):
    """Note in ``axes`` (``BatchAxes.read_out``) a floating tensor's values read where the
    dispatcher does not see it, so ``decides`` cannot (an integer or boolean one's too once
    values decided something: it may hold them): ``tolist()``, ``numpy()``,
    ``np.asarray`` (``__array__``), ``__dlpack__``, ``str``/``repr``/``print``, an f-string or
    ``format`` (``__format__``, inside which this mode does not see ``__repr__``, and ``repr``
    turns the dispatch modes off), its storage or data pointer, ``apply_``/``map_`` (a Python
    callable given each value), a number read out (``item``, ``float``, ``int``, ``bool``: seen
    by the dispatcher too, unless ``f`` turned the dispatch modes off). ``if t.tolist() > 0.5:
    ...`` then keeps ``f`` watched at every new ``t``. The mode sees each ``torch`` call of
    ``f`` (~1 us each, during the watch only).

    Example:
        >>> from torchdiv._core.mixing.tracker import BatchAxes
        >>> axes = BatchAxes(torch.ones(2, 1), 1)
        >>> with Reads(axes):
        ...     _ = torch.tensor(0.5).tolist()
        >>> axes.verdict()
        Verdict(for_any_x=False, for_any_held=False, while_held=None, indexed_by=(), numbers=False)
    """

    def __init__(self, axes: BatchAxes) -> None:
        super().__init__()
        self.axes = axes

    def __torch_function__(
        self, func: Any, types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if refuse_gradient_hook(func, args):  # (a watched plain evaluation: no other mode sees it)
            return dropped_hook()
        if func in _READS and self._by_f():
            held = args[0] if args else None
            if isinstance(held, torch.Tensor) and (_floating(held) or self.axes.values_decide):
                self.axes.read_out()
        self._follow(args)  # (a subclass's results: ``BatchAxes.follow``)
        out = func(*args, **(kwargs or {}))
        if func == _SET_DATA and args:  # (``t.data = v``: no op the dispatcher sees)
            self.axes.wrote(args[0])
        self._follow((out,))
        return out

    def _by_f(self) -> bool:
        """Whether ``f``'s code made the call, not one of torchdiv's dispatch modes handling
        an op (``DispatchMode.__torch_dispatch__`` on the Python stack): the watch's own rules
        and state notes (``t.untyped_storage()`` of a write through views, of new memory)
        read no values for ``f`` (counted, a traced module's every call was watched again).
        Walks the stack at reads only (a few a call, if any)."""
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:
            if frame.f_code is _HANDLER:
                return False
            frame = frame.f_back
        return True

    def _follow(self, values: Sequence[Any]) -> None:
        """``BatchAxes.follow`` each tensor of a subclass among ``values`` (or in a list or
        tuple among them)."""
        for v in values:
            for t in v if isinstance(v, list | tuple) else (v,):
                if type(t) not in _PLAIN_TYPES and isinstance(t, torch.Tensor):
                    self.axes.subclassed = True
                    self.axes.follow(t)


def reading(axes: BatchAxes | None) -> contextlib.AbstractContextManager[Any]:
    """``Reads(axes)`` around a watched evaluation; nothing where none watches (``axes``
    ``None``: a recording without ``batch_dims``, detection off), which would pay the mode
    at every ``torch`` call for no one."""
    return contextlib.nullcontext() if axes is None else Reads(axes)


# those of ``_CHECKS_VALUES`` that raise on their first argument's values alone: a solve
# fails on a singular ``A`` whatever its right-hand side holds (``solve(W, x.T)`` of a weight
# ``W`` keeps its pass for any ``x``: ``BatchAxes._held_read``)
RAISES_ON_FIRST = frozenset(
    getattr(getattr(aten, packet), overload)
    for packet, overloads in {
        "linalg_solve_ex": ("default", "out"),
        "_linalg_solve_ex": ("default", "result"),
    }.items()
    for overload in overloads
)

# ``t.data = v`` as ``Reads`` sees it (the descriptor's setter; stubs type ``data`` a Tensor)
_SET_DATA = vars(torch._C.TensorBase)["data"].__set__

# the code of torchdiv's dispatch modes' handler of each op (``Reads._by_f``)
_HANDLER = DispatchMode.__torch_dispatch__.__code__

# the tensor types whose objects the ATen calls ``BatchAxes`` watches made (``follow``)
_PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})


# the tensor methods that read values where the dispatcher does not see it (``Reads``)
_READS = frozenset(
    {
        torch.Tensor.tolist,
        torch.Tensor.numpy,
        torch.Tensor.__array__,
        torch.Tensor.__dlpack__,
        torch.Tensor.__repr__,
        torch.Tensor.__format__,
        torch.Tensor.item,
        torch.Tensor.__float__,
        torch.Tensor.__int__,
        torch.Tensor.__index__,
        torch.Tensor.__bool__,
        torch.Tensor.__complex__,
        torch.Tensor.untyped_storage,
        torch.Tensor.storage,
        torch.Tensor.data_ptr,
        torch.Tensor.apply_,  # (a Python callable called with each value)
        torch.Tensor.map_,
        torch.Tensor.map2_,
    }
)


# the ops whose results are values read out or shaped by values (``decides``), by their tags
_VALUES_DECIDE = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)

# the ops among those whose results are shaped by their indices or mask alone (the arguments
# after the first): ``x[idx]`` with integer ``idx`` is shaped as ``idx``, whatever ``x`` holds
_SHAPED_BY_INDICES = frozenset({aten.index.Tensor, aten.masked_select.default})


# what each op may do by its tags, as first met (``decides``): hand values to Python, draw
# at random (an integer result then decides as values would), or neither (0)
_DECIDED: dict[Any, int] = {}
_SEEDED, _READ_OUT = 1, 2


# the ops that raise on the values of a floating argument, where ``f`` may catch the error and
# do something else (nothing they return shows it): bernoulli's ``p`` or a binary cross
# entropy's input outside [0, 1], normal's negative ``std``, poisson's negative rate, histc's
# or histogram's infinite range, an assert on a value, LAPACK failing to converge (``svd``,
# ``eig``, ``eigh``, ``pinv``, ``lstsq``; the ``*_ex`` factorizations behind ``cholesky``,
# ``inv``, ``solve``, ``lu_factor``, ``ldl_factor``, whose integer ``info`` the op
# ``_linalg_check_errors`` then raises on: read before rev-watch18 as deciding nothing, a
# ``try: cholesky(W)`` whose ``except`` branch mixes samples was served by a pass once ``W``
# or ``x`` made it fail)
_CHECKS_VALUES = frozenset(
    getattr(getattr(aten, packet), overload)
    for packet, overloads in {
        "bernoulli": ("default", "out", "Tensor", "Tensor_out"),  # (not ``p``: a float)
        "bernoulli_": ("Tensor",),
        "normal": ("float_Tensor", "float_Tensor_out", "Tensor_Tensor", "Tensor_Tensor_out"),
        "poisson": ("default", "out"),
        "histc": ("default", "out"),
        "histogram": ("bins_tensor", "bins_tensor_out", "bin_ct", "bin_ct_out"),
        "binary_cross_entropy": ("default", "out"),
        "_assert_async": ("default", "msg"),
        "_functional_assert_async": ("msg",),
        "_linalg_svd": ("default", "U"),
        "linalg_eig": ("default", "out"),
        "linalg_eigvals": ("default", "out"),
        "_linalg_eigh": ("default", "eigenvalues"),
        "linalg_pinv": ("default", "atol_rtol_float", "atol_rtol_tensor", "rcond_tensor"),
        "linalg_lstsq": ("default", "out"),
        "cholesky": ("default", "out"),  # torch < 2.14
        "linalg_cholesky_ex": ("default", "L"),
        "linalg_inv_ex": ("default", "inverse"),
        "linalg_solve_ex": ("default", "out"),
        "_linalg_solve_ex": ("default", "result"),
        "linalg_lu_factor_ex": ("default", "out"),
        "linalg_ldl_factor_ex": ("default", "out"),
        "_lu_with_info": ("default",),
    }.items()
    if hasattr(aten, packet)  # (``cholesky`` is gone from torch 2.14 on)
    for overload in overloads
)
