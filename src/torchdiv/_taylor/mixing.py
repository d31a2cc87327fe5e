"""Sample mixing at the ``torchdiv._taylor`` level: recording ``f`` once to find where it mixes
samples (for errors that do not say so), and the objects ``f`` already watched at a structure
(``passed_before``), whose later calls the small engines need not watch again."""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from torchdiv._core.checks import unwrapped
from torchdiv._core.mixing import BatchInteractionError, allowed, unnamed
from torchdiv._taylor import RULES, capture
from torchdiv._taylor.cache import PlanCache, structure_key


def recorded_mixing(f: Any, x: torch.Tensor, batch_dims: int) -> str | None:
    """The ``BatchInteractionError`` message of recording ``f`` once (state put back), or
    ``None`` if it does not mix samples where the recorder can see it. For an ``f`` that a
    ``torch.func`` transform refused for updating state (a train-mode batch norm)."""
    if allowed():
        return None
    try:
        capture(f, x, RULES, batch_dims=batch_dims).undo()
    except BatchInteractionError as exc:
        return unnamed(str(exc))
    except Exception:  # f fails otherwise: the original error stands
        return None
    return None


# the objects f (not their code: a lambda made anew is another object, watched again; not
# unwrapped: a wrapper may mix what it wraps) whose evaluation at a structure (``structure``)
# was watched without mixing samples, each with its ``Passed``
_PASSED = PlanCache(256)

Structure = tuple[Any, Hashable]  # (site, key) for a PlanCache


@dataclass
class Passed:
    """This very ``f`` passed a watch for sample mixing at a structure; ``plain``: no
    evaluation of it there has shown an op that ``SafeDerivatives`` changes, so the next
    may run outside the mode (``torchdiv._exact.autograd.GraphJacobian.of_function``)."""

    plain: bool = True


def passed_before(
    f: Any, x: torch.Tensor, batch_dims: int, at: Structure | None = None
) -> Passed | None:
    """Whether this very ``f`` passed a watch for sample mixing at the structure of ``x``
    (``passed``; ``at``: that structure, if the caller made it already): it then makes the
    same calls on the same shapes, unless its code branches on state outside the structure;
    the one such state that turns mixing on in practice, a batch norm switched to train mode
    in a submodule, shows in the autograd graph of every call
    (``torchdiv._core.mixing.check_graph``). With detection off (``allowed``), every ``f``
    has passed.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> x = torch.randn(4, 2)
        >>> passed_before(net, x, 1)
        >>> passed(net, x, 1)
        >>> passed_before(net, x, 1), passed_before(net, x[:3], 1)
        (Passed(plain=True), None)
    """
    at = at or structure(f, x, batch_dims)
    found: Passed | None = _PASSED.get(*at)
    if found is None and allowed():
        found = Passed()
        _PASSED.put(*at, found)
    return found


def passed(f: Any, x: torch.Tensor, batch_dims: int, at: Structure | None = None) -> None:
    """``f`` was watched at the structure of ``x`` (``at``, if made already) and did not mix
    samples."""
    at = at or structure(f, x, batch_dims)
    if _PASSED.get(*at) is None:
        _PASSED.put(*at, Passed())


def structure(f: Any, x: torch.Tensor, batch_dims: int) -> Structure:
    """``f`` itself and ``cache.structure_key``; a bound method (a new object at every
    attribute access, ``model.forward``) by its object, its function in the key (weakly: the
    function of a class made at every call held what it closes over as long as the key was
    kept). Only torchdiv's own wrappers are unwrapped (``checks.unwrapped``): two wrappers of
    one function (``functools.wraps``) may compute different things."""
    f = unwrapped(f)
    if inspect.ismethod(f):
        func = f.__func__
        with contextlib.suppress(TypeError):  # (an object without weak references: as it is)
            func = weakref.ref(func)
        return f.__self__, (func, structure_key(f, x, batch_dims))
    return f, structure_key(f, x, batch_dims)
