"""Which values decide what ``f`` does: ops that read them (``decides``), reads the
dispatcher does not see (``Reads``), and ops whose results ignore them (``VALUE_FREE``).

A watch of ``f`` during which no op turned floating values into something that decides what
the code calls next (a Python number, a shape set by values, integers or booleans computed from
floating values, an op that raises on its argument's values) holds for every floating value
``f`` reads (``torchdiv._taylor.mixing.identity``); ``BatchAxes.values_decide`` notes the
contrary. ``Reads`` is the ``TorchFunctionMode`` that notes reads that bypass the dispatcher
(``tolist()``, ``numpy()``, ``str()``) and follows the results of tensor subclasses
(``BatchAxes.follow``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from torchdiv._core.modes import (
    refuse_gradient_hook,
)

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


def decides(func: Any, args: Sequence[Any], out: Any) -> bool:
    """Whether the op ``func`` turned values into something that can decide what the code
    calls next or which samples an index moves: a Python number (``item``, a branch on a
    tensor), a shape set by values (``nonzero``, ``unique``), or integers or booleans computed
    from floating values (``x > 0``, ``argmax``, ``.long()``, a sort's indices), or an op that
    raises on a floating argument's values (``_CHECKS_VALUES``: ``try: bernoulli(p)``, its
    error caught, decides what ``f`` does next by ``p`` though no result shows it). A watch of
    ``f`` during which no op did holds for every floating value ``f`` reads, not only
    those it was watched with (``torchdiv._taylor.mixing.identity``): which ops ran, on
    which shapes, with which integer indices, followed from ``f``'s code and the rest.
    (A read that bypasses the dispatcher, ``tolist()``, ``numpy()`` or ``str()``, is noted
    by ``Reads``.)

    Example:
        >>> x = torch.ones(2)
        >>> decides(aten.gt.Scalar, (x, 0.5), x > 0.5), decides(aten.tanh.default, (x,), x)
        (True, False)
    """
    decided = _DECIDED.get(func)
    if decided is None:
        tagged = any(tag in func.tags for tag in _VALUES_DECIDE)
        decided = _DECIDED[func] = tagged or func in _CHECKS_VALUES
    if decided:
        return True
    outs = out if isinstance(out, list | tuple) else (out,)
    if all(t is None or (isinstance(t, torch.Tensor) and _floating(t)) for t in outs):
        return False
    return any(isinstance(a, torch.Tensor) and _floating(a) for a in tree_leaves(args))


def _floating(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class Reads(TorchFunctionMode):
    """Note in ``axes`` (``BatchAxes.values_decide``) a floating tensor's values read where
    the dispatcher does not see it, so ``decides`` cannot: ``tolist()``, ``numpy()``,
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
        >>> axes.values_decide
        True
    """

    def __init__(self, axes: BatchAxes) -> None:
        super().__init__()
        self.axes = axes

    def __torch_function__(
        self, func: Any, types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        refuse_gradient_hook(func, args)  # (a watched plain evaluation: no other mode sees it)
        if func in _READS:
            held = args[0] if args else None
            if isinstance(held, torch.Tensor) and _floating(held):
                self.axes.values_decide = True
        self._follow(args)  # (a subclass's results: ``BatchAxes.follow``)
        out = func(*args, **(kwargs or {}))
        self._follow((out,))
        return out

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


_DECIDED: dict[Any, bool] = {}  # each op's verdict by its tags, as first met


# the ops that raise on the values of a floating argument, where ``f`` may catch the error and
# do something else (nothing they return shows it): bernoulli's ``p`` or a binary cross
# entropy's input outside [0, 1], normal's negative ``std``, poisson's negative rate, histc's
# or histogram's infinite range, an assert on a value, LAPACK failing to converge (``svd``,
# ``eig``, ``eigh``, ``pinv``; the ``*_ex`` factorizations return their integer ``info``)
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
    }.items()
    for overload in overloads
)
