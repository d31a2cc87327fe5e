"""The batch sizes a replay in a compiled graph serves: one check for both replays.

A replay (``_structured.replay``, ``_laplacian.traced``) bakes the numbers of the calls it
recorded at ``x`` (``N`` samples) into Dynamo's graph. A number ``f`` made from the batch
size (``x * (4.0 / N)``, ``view(N, -1)``, ``min(N, 4)``, ``N // 2 - N // 3``) would be wrong
at another size, so the check here runs ``f`` once more, on a fake ``x`` whose first
dimension is a symbol ``s`` (``FakeTensorMode`` with a ``ShapeEnv``, hint ``N``): every number
``f``'s calls hold is then exact in ``s`` (a ``SymInt`` or ``SymFloat`` holding a symbolic
expression where it depends on ``s``), and every decision ``f``'s Python made on ``s``
(``min``, ``max``, ``if N > 4``) a guard on ``s``, which narrows ``s``'s range. ``served``
gives the sizes over which ``f``'s calls are those it made at ``N``:

- no number depends on ``s`` (integers affine in ``s`` allowed where the replay computes them
  from the traced batch size, ``affine``) and every guard holds over ``s``'s range: that
  range, unbounded above in the usual case (a conv net's padding, a linear layer: every size);
- else ``(N, N)``: the replay serves its own size only (a whole-shape guard; another size
  compiles again and records there).

A second dimension of ``x`` is never symbolic: the replays guard ``x.shape[1:]`` whole.
What the engines add to ``f``'s calls (an op's decomposition holding ``N``, the Taylor
engine's sweep) is checked by recording again at the sizes of ``others`` (the replays).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import sympy  # type: ignore[import-untyped]
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from torchdiv._core.mixing.writes import written_arguments

# the batch sizes a replay recorded at ``n`` records again at (``others``): three, so that an
# integer is fitted affine in ``n`` by two and checked by the third (``_laplacian.traced``)
_MORE = ((1, 1), (1, 2), (2, 5))
UNBOUNDED = torch.iinfo(torch.int64).max  # (``served``'s upper bound where there is none)


def served(f: Callable[[torch.Tensor], Any], x: torch.Tensor, affine: bool) -> tuple[int, int]:
    """The sizes ``lo..hi`` of ``x``'s first dimension over which ``f``'s calls hold the
    numbers they hold at ``x`` (``hi``: ``UNBOUNDED`` where unbounded; module
    docstring); ``affine``: an integer ``a * N + b`` counts as held (the replay makes it from
    the batch size it traces). ``(N, N)`` where ``f`` cannot be run on a fake ``x`` (a value
    read on the host, ``item``) or fails."""
    n = x.shape[0]
    if n < 2 or _lazy(f):  # (Dynamo specialises sizes 0 and 1: no symbol)
        return n, n
    try:
        found = _symbolic(f, x)
    except Exception:
        return n, n
    if found is None:
        return n, n
    numbers, env, symbol = found
    if not all(_held(a, symbol, affine) for a in numbers):
        return n, n
    bounds = env.var_to_range[symbol]
    if not all(_implied(guard.expr, symbol, bounds) for guard in env.guards):
        return n, n
    hi = bounds.upper
    return int(bounds.lower), int(hi) if isinstance(hi, sympy.Integer) else UNBOUNDED


def _lazy(f: Callable[[torch.Tensor], Any]) -> bool:
    """Whether ``f`` holds a lazy module's uninitialized parameter or buffer: run on a fake
    ``x``, it would be materialized there, without data (``f`` broken for every later call,
    eager too; the eager call refuses it)."""
    if not isinstance(f, torch.nn.Module):
        return False
    held = itertools.chain(f.parameters(), f.buffers())
    return any(torch.nn.parameter.is_lazy(t) for t in held)


def serves(sizes: tuple[int, int], n: Any) -> bool:
    """Whether ``n`` (the traced batch size: an int or Dynamo's symbol) is in ``sizes``, as
    Python Dynamo traces into guards (none where ``sizes`` is unbounded and ``n``'s range lies
    inside)."""
    lo, hi = sizes
    if hi == UNBOUNDED:
        return bool(lo <= n)
    return bool(lo <= n <= hi)


def others(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` at the other batch sizes a replay records at (``N + 1``, ``N + 2``,
    ``2 N + 5``), its rows cycled (``x`` itself not copied where not needed: a view)."""
    n = x.shape[0]
    rows = [torch.arange(a * n + b, device=x.device) % n for a, b in _MORE]
    return [x.detach()[r] for r in rows]


def _symbolic(
    f: Callable[[torch.Tensor], Any], x: torch.Tensor
) -> tuple[list[Any], Any, sympy.Symbol] | None:
    """``f`` run on a fake ``x`` whose first dimension is a symbol: the numbers its ATen calls
    hold, the ``ShapeEnv`` (its guards, the symbol's range) and the symbol. With PyTorch's
    Python dispatcher on, as Dynamo traces (its meta functions: without them an upsampling's
    fake kernel specialised the batch size)."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    static = [DimDynamic.STATIC] * (x.dim() - 1)
    context: Any = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, *static])
    fake = mode.from_tensor(x.detach(), symbolic_context=context)
    size = fake.shape[0]
    if not isinstance(size, torch.SymInt):
        return None
    (symbol,) = size.node.expr.free_symbols
    numbers = _Numbers()
    with _restored(f), enable_python_dispatcher(), mode, numbers, torch.random.fork_rng([]):
        f(fake.requires_grad_(x.requires_grad))
    return numbers.found, env, symbol


@contextlib.contextmanager
def _restored(f: Callable[[torch.Tensor], Any]) -> Iterator[None]:
    """Run with ``f``'s modules' state put back after: each module's attributes and the
    lists, dicts and sets they hold, as they were (the symbolic run's ``f`` counts a call,
    appends ``x.shape[0]`` or an activation to a log, replaces a buffer: a symbol or fake
    tensor left in ``f`` broke its next call, eager or recorded). A closure's or a global's
    state is not seen (``docs/guide/limitations.md``)."""
    modules = list(f.modules()) if isinstance(f, torch.nn.Module) else []
    held: list[Any] = [vars(m) for m in modules]
    held += [v for d in held for v in d.values() if isinstance(v, (list, dict, set))]
    saved = [copy.copy(v) for v in held]
    try:
        yield
    finally:
        for now, was in zip(held, saved, strict=True):
            now.clear()
            if isinstance(now, list):
                now.extend(was)
            else:
                now.update(was)


class _Numbers(TorchDispatchMode):
    """The non-tensor arguments of every ATen call; raises at a write into a real tensor
    (``f``'s buffer: the fake mode runs a call on real tensors alone as it is, so the write
    would count once more; the replays refuse such an ``f`` anyway)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[Any] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        from torch._subclasses.fake_tensor import FakeTensor

        kwargs = kwargs or {}
        if not all(isinstance(t, FakeTensor) for t in written_arguments(func, args, kwargs)):
            raise RuntimeError(f"{func} writes into a tensor f holds")
        leaves = pytree.tree_leaves((args, kwargs))
        self.found += [a for a in leaves if not isinstance(a, torch.Tensor)]
        return func(*args, **kwargs)


def _held(a: Any, symbol: sympy.Symbol, affine: bool) -> bool:
    """Whether the number ``a`` is the same at every batch size (or affine in it)."""
    if not isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    expr = a.node.expr
    if not expr.free_symbols:
        return True
    if expr.free_symbols != {symbol}:  # (an unbacked one: read from values, ``item``)
        return False
    if not affine or not isinstance(a, torch.SymInt) or not expr.is_polynomial(symbol):
        return False
    poly = sympy.Poly(expr, symbol)
    return poly.degree() <= 1 and all(c.is_integer for c in poly.all_coeffs())


def _implied(guard: Any, symbol: sympy.Symbol, bounds: Any) -> bool:
    """Whether ``guard`` holds at every value of ``symbol`` in ``bounds`` (a guard Dynamo's
    own range reasoning proves: ``s > 4`` where the range is ``[5, oo]``)."""
    from torch.utils._sympy.value_ranges import bound_sympy

    if not guard.free_symbols:
        return bool(guard)
    if guard.free_symbols != {symbol}:
        return False
    found = bound_sympy(guard, {symbol: bounds})
    return bool(found.lower is sympy.true)
