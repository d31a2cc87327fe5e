"""Plain Python values that ``f``'s modules hold, put back with the tensors ``f`` wrote.

Where a call evaluates ``f`` more than once, torchdiv puts back what an evaluation changed
outside ``f`` before the next (``_exact.state.Changes``, ``_taylor.capture.Graph.undo``): the
tensors it wrote in place (buffers, parameters' ``.data``) and the random generators, so that
every evaluation computes the same function and the changes are made once. A module may
also keep a plain value that its forward changes with those tensors: a data-dependent
initialisation's flag (Glow's ActNorm as Glow-PyTorch writes it copies the first batch's
statistics into its parameters, then sets ``self.inited = True``). Put back without it, the
parameters went back to their values from before while the flag stayed set, and the next
evaluation differentiated the uninitialised layer (a divergence 0.2-0.5 off) and left the
model so. ``Settings`` keeps the plain values (``bool``, ``int``, ``float``, ``complex``,
``str``, ``None``) of the modules that the public call's ``f`` reaches, as they were when it
was made, and puts back those ``f`` changed, and removes those it added (a flag set on the
first forward only). So too the tensors ``f`` assigns (not in place) to an attribute or a
buffer: kept without them, a counter ``self.n = self.n + 1`` that scaled the output moved
once per evaluation, and a Hutchinson Laplacian's products (the second evaluation, the fifth
at four chunks) differentiated ``f`` with ``n = 2`` (or 5) where the call's ``f`` had
``n = 1`` (0.17-0.61 off; ``"auto"``'s Laplacian 0.12); a model that sets ``self.cache =
torch.full(...)`` at each forward and scales its output by the last one's read it unset in
the first chunk of an exact Laplacian and set in the next (0.38 where it is 0.20). Lists,
dictionaries and other objects are not kept (they are not copied: a cache ``f`` fills stays
filled). So too a parameter's or buffer's ``.data`` that ``f`` replaces (``self.u.data =
l2normalize(w.mv(self.v.data))``, the power iteration of the spectral norm GAN code
written before ``torch.nn.utils.spectral_norm``; ``w.data = w.data.clamp(...)``): no op of
the dispatcher, so that nothing else saw it, and each evaluation of one call started from
the one before's (forward mode one direction a chunk differentiated ``f`` with a counter
``n.data = n.data + 1`` at ``n = 1, 2, 3``, 0.10-0.49 off; the spectral norm GAN's layer
0.01-0.03, its parameter gradients 0.05-0.37): it gets its data from before back (the
tensor that held it, kept).

The public call says which modules ``f`` reaches (``calling``, from
``_exact.attributes.PlainAttributes``); outside one (an engine called directly) nothing is
kept. The walk costs about 1.5 us per module, once per call; keeping, a copy of each module's
``__dict__`` (in C), 0.2 us per module where an evaluation is watched or recorded (measured on
this project's 2-core VM). The copies live as long as the ``Changes`` or recorded graph that
holds them: one call.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar, Token

import torch
from torch._C._functorch import is_functorch_wrapped_tensor
from torch._subclasses.fake_tensor import unset_fake_temporarily

from torchdiv._core.script import faking

# the modules the public call's f reaches, found on demand
_MODULES: ContextVar[Callable[[], Iterable[torch.nn.Module]] | None] = ContextVar(
    "_MODULES", default=None
)
_PLAIN = frozenset((bool, int, float, complex, str, type(None)))
# ... and tensors (not parameters, which f cannot set to a computed tensor): what is put back
_KEPT = _PLAIN | {torch.Tensor}


def calling(
    modules: Callable[[], Iterable[torch.nn.Module]],
) -> Token[Callable[[], Iterable[torch.nn.Module]] | None]:
    """A public call starts: ``modules()`` gives the modules its ``f`` reaches (pass the
    returned token to ``ended`` when it ends)."""
    return _MODULES.set(modules)


def ended(token: Token[Callable[[], Iterable[torch.nn.Module]] | None]) -> None:
    """The public call of ``calling``'s ``token`` ended."""
    _MODULES.reset(token)


def calls_modules() -> Callable[[], Iterable[torch.nn.Module]] | None:
    """What ``calling`` got from the public call in flight (``None`` outside one)."""
    return _MODULES.get()


def modules() -> Iterable[torch.nn.Module]:
    """The modules the public call's ``f`` reaches (none outside a public call)."""
    found = _MODULES.get()
    return () if found is None else found()


class Settings:
    """The plain values of the modules the public call's ``f`` reaches, as now.

    >>> kept = Settings()   # before an evaluation of f
    >>> kept.put_back()     # after it, with the tensors it wrote: its flags as they were
    """

    def __init__(self) -> None:
        # (module, a shallow copy of its ``__dict__``): the plain values read from it only
        # where they are put back; none where Dynamo traces the call (a compiled model's
        # products: its tracing of the copies failed to compile, and a public call under
        # compile keeps no modules)
        self.kept: list[tuple[weakref.ref[torch.nn.Module], dict[str, object]]] = []
        self.buffers: list[tuple[dict[str, object], dict[str, object]]] = []  # (its, a copy)
        # (a parameter or buffer, its ``.data``: an alias of its storage as now)
        self.data: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not torch.compiler.is_compiling():
            self.kept = [(weakref.ref(module), vars(module).copy()) for module in modules()]
            self.buffers = [
                (held, held.copy()) for _, before in self.kept if (held := _buffers(before))
            ]
            self.data = _aliases(self.kept)

    def put_back(self) -> None:
        """Each kept plain value or tensor (an attribute, a buffer) that differs now put back;
        each one added since removed."""
        for ref, before in self.kept:
            module = ref()
            if module is not None:
                _put_back(vars(module), before)
        for held, before in self.buffers:
            _put_back(held, before)
        for tensor, data in self.data:
            if _where(tensor) != _where(data):
                tensor.data = data


def _aliases(
    kept: list[tuple[weakref.ref[torch.nn.Module], dict[str, object]]],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each parameter and buffer of the kept modules with its ``.data`` (an alias of its
    storage as now), read outside a ``FakeTensorMode``: there a real parameter's ``.data`` is
    a fake tensor, which ``put_back`` then set as its data (the caller's weights were meta)."""
    if faking():
        with unset_fake_temporarily():
            return _aliases(kept)
    return [(t, t.data) for _, before in kept for t in _tensors(before)]


def _put_back(attributes: dict[str, object], before: dict[str, object]) -> None:
    """The kept values of ``before`` that differ in ``attributes`` put back; those added
    since removed."""
    for name, value in before.items():
        if type(value) in _KEPT and attributes.get(name, _MISSING) is not value:
            attributes[name] = value
    for name in attributes.keys() - before.keys():
        if type(attributes[name]) in _KEPT:
            del attributes[name]


def _buffers(attributes: dict[str, object]) -> dict[str, object] | None:
    """A module's own dictionary of buffers (``self.n = t`` for a registered buffer sets
    it), from its ``__dict__``."""
    held = attributes.get("_buffers")
    return held if type(held) is dict else None


def _tensors(attributes: dict[str, object]) -> Iterator[torch.Tensor]:
    """A module's own parameters and buffers, from its ``__dict__``: plain tensors and
    parameters only (a lazy module's ``UninitializedParameter`` gets its data on the first
    forward, for good; a tensor subclass, or one ``f`` set anew under ``torch.func``'s
    transforms (an outer call's, around a nested one), may hold no storage of its own)."""
    for name in ("_parameters", "_buffers"):
        held = attributes.get(name)
        for tensor in held.values() if type(held) is dict else ():
            if (
                type(tensor) in _PLAIN_TENSORS
                and tensor.layout is torch.strided
                and not is_functorch_wrapped_tensor(tensor)  # (set anew under a transform)
            ):
                yield tensor


def _where(tensor: torch.Tensor) -> tuple[object, ...] | None:
    """Where ``tensor``'s elements are: its first element's address, its geometry and dtype
    (``.data`` replaced changes one of them); ``None`` for data without storage of its own
    (a ``torch.func`` transform's wrapper, which a nested call's evaluation may have set)."""
    try:
        address = tensor.data_ptr()
    except RuntimeError:
        return None
    return (address, tensor.shape, tensor.stride(), tensor.dtype, tensor.device)


_PLAIN_TENSORS = frozenset((torch.Tensor, torch.nn.Parameter))
_MISSING = object()
