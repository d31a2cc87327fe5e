"""What ``f`` changes outside itself, put back so that evaluating ``f`` again changes it once.

``method="auto"`` may evaluate ``f`` more than once: the forward engine once per chunk, and
each engine tried after one that could not run ``f`` (``_exact``). Each evaluation would
move a training-mode batch norm's running statistics (or any buffer ``f`` updates in place)
once more, and draw a new dropout mask, so that the engines would differentiate different
functions. ``Changes`` watches evaluations of ``f`` (a ``TorchDispatchMode``) until one
completes, noting every tensor ``f`` wrote to that it did not make itself, with its value
before, and the state of every random number generator ``f`` drew from (and of Python's and
NumPy's global ones, whose draws it cannot see: ``GLOBALS``); ``again(f)`` then
evaluates ``f`` from that state, so that every evaluation computes the same function and the
changes are made once. (``_taylor.capture``'s ``Graph.undo`` does the same for the Laplacian.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import torch
from torch._C._autograd import _unsafe_set_version_counter

from torchdiv._core.generators import GLOBALS
from torchdiv._core.mixing.watch import put_back_with
from torchdiv._core.modes import DispatchMode, forget_computed_weights
from torchdiv._core.settings import Settings
from torchdiv._exact.attributes import PlainAttributes, unwrap_between_evaluations
from torchdiv._taylor.capture import _BATCH_NORMS, _storage, _written, lifted
from torchdiv._taylor.tree import leaves

T = TypeVar("T")


class View(NamedTuple):
    """A tensor's geometry on its storage: ``size``, ``stride`` and ``storage_offset``."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    @staticmethod
    def of(tensor: torch.Tensor) -> View:
        return View(tuple(tensor.shape), tuple(tensor.stride()), int(tensor.storage_offset()))

    def put(self, tensor: torch.Tensor) -> None:
        """Give ``tensor`` (resized in place by ``f``: ``resize_``, ``set_``) this geometry
        back, its storage grown to hold it where ``f`` swapped in a smaller one. Its size alone
        was not enough: copied into the grown tensor, the value was broadcast (``[1]`` into
        ``[1, 1]``), and a transposed buffer came back row-major, so that the next
        ``resize_`` read its storage otherwise (a scale 3 where one evaluation's is 2).

        >>> buffer = torch.arange(4.0).reshape(2, 2).t()
        >>> view = View.of(buffer)
        >>> _ = buffer.resize_(3, 2)
        >>> view.put(buffer); buffer.stride()
        (1, 2)
        """
        if View.of(tensor) == self:
            return
        extent = 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        extent = self.offset + extent if all(self.size) else 0
        if tensor.untyped_storage().nbytes() < extent * tensor.element_size():
            # (resize_, which a parameter refuses, only where the storage is too small)
            tensor.as_strided_((0,), (1,), 0).resize_(extent)
        tensor.as_strided_(self.size, self.stride, self.offset)


class Changes(DispatchMode):
    """State outside ``f`` that ``f`` changed: tensors (value before and after) and generators.

    Used as a context manager around an evaluation of ``f``, it watches; ``again(f)`` wraps
    ``f`` for the evaluations after that.
    """

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.device = x.device
        # (tensor, its value and its geometry before)
        self.written: list[tuple[torch.Tensor, torch.Tensor, View]] = []
        self.after: list[torch.Tensor] | None = None  # their values after a complete evaluation
        # (tensor, its version counter before): put back with its value (``_versions``)
        self.versions: list[tuple[torch.Tensor, int]] = []
        self.generators: dict[Any, Any] = {}  # state before f drew (torch's, ``GLOBALS``)
        self._made: set[int] = set()  # storages of tensors f made
        self._noted: set[tuple[Any, ...]] = set()  # views of other storages in ``written``
        self.settings = Settings()  # the plain values of f's modules, put back with ``written``

    def __enter__(self) -> Changes:
        """Watch an evaluation (``started``)."""
        self.started()
        super().__enter__()
        return self

    def started(self) -> None:
        """An evaluation starts: before the first that completes, note the global generators
        of Python and NumPy, whose draws no dispatch mode sees (``GLOBALS``). Called by every
        mode that watches for ``Changes`` (``plan.OpSizes`` as well: a ``torch.func`` engine
        that failed there, then plain autograd, left them two draws on)."""
        if self.after is None:  # (a get of NumPy's state costs 70-90 us: once a call)
            for generator in GLOBALS:
                if generator not in self.generators and generator.present():
                    self.generators[generator] = generator.get_state()

    def dispatch(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        fresh = self.before(func, args, kwargs)
        out = func(*args, **kwargs)
        if fresh:
            self.made(out)
        return out

    def before(self, func: Any, args: Any, kwargs: dict[str, Any]) -> bool:
        """Note, before the ATen op ``func`` runs, the tensors it writes to that ``f`` did not
        make (their values before) and the generators it draws from (their states); returns
        whether its results are new memory (then ``made`` notes them). ``dispatch`` calls it,
        or another mode watching the same evaluation (``_plan.OpSizes``: one mode, not two)."""
        writes, fresh, random = _facts(func)
        if writes:
            for tensor in _written(func, args, kwargs):
                storage = _storage(tensor)
                # each view of a storage f did not make kept once, with its value before its
                # first write: two views (``buf[0]``, ``buf[1]``) are two parts of one buffer
                view = (storage, tensor.storage_offset(), tensor.shape, tensor.stride())
                if storage not in self._made and view not in self._noted:
                    self._noted.add(view)
                    self.written.append((tensor, tensor.detach().clone(), View.of(tensor)))
                    if not tensor.is_inference():  # (which keeps no version counter)
                        self.versions.append((tensor, tensor._version))
        if random:
            for generator in self._drawn_from(kwargs.get("generator")):
                self.generators.setdefault(generator, generator.get_state())
        return fresh or lifted(func, args)

    def made(self, out: Any) -> None:
        """Note the results ``out`` of an op that returns new memory: ``f``'s own (a view or an
        in-place result is not), written to later without a copy kept."""
        self._made.update(_storage(t) for t in leaves(out) if isinstance(t, torch.Tensor))

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        super().__exit__(kind, error, traceback)
        self.ended(error)

    def ended(self, error: BaseException | None) -> None:
        """The watched evaluation ended. Completed (``error`` is ``None``): the values after
        are kept for ``again``. Failed: it has changed nothing; the values and generator states
        before are put back and forgotten, so that the next evaluation is watched afresh and
        its draws stand as one evaluation's (kept, they were put back after it as well, and
        the call left the generator as if ``f`` had drawn nothing)."""
        if error is None:
            self.after = [tensor.detach().clone() for tensor, _, _ in self.written]
            return
        self._put(before=True)
        self._forget()

    def _forget(self) -> None:
        """Nothing watched yet: the next evaluation is watched afresh (its draws and writes
        stand as one evaluation's)."""
        self.after = None
        self.written, self.versions, self.generators = [], [], {}
        self._made, self._noted = set(), set()

    def again(self, f: Callable[[torch.Tensor], T]) -> Callable[[torch.Tensor], T]:
        """``f``, evaluated from the state before the first evaluation (watched until one
        completes): it draws the same random numbers, and leaves the state as one evaluation
        did; generators drawn from in between (probes) go on where they were. An evaluation
        that raises (``f``'s error, ``KeyboardInterrupt``) leaves the state from before the
        first, which the call then propagates: a failed call has changed nothing of ``f``'s;
        where the call goes on instead (a fallback after forward mode's error, with the same
        ``Once``), the next evaluation is watched afresh, as after a failed first (not after
        ``_wrote_alike``'s refusal, which a fallback must meet again): until
        nnsweep33 the generators of every later one were put back to where it started,
        from before the first (``value_grad_laplacian``'s value, then forward over reverse
        refused by ``F.rrelu`` and the loop: the call left the generator as if ``f`` had
        drawn nothing, the next call's masks the same).
        The functions of several ``again`` calls share that state (the first of them to run
        is watched).
        Called inside a ``torch.func`` transform it puts back the tensors underneath
        (``_put``); a caller wraps the function that applies its own transforms (``Once``),
        whose evaluations ``Changes`` then watches whole."""

        def f_again(x: torch.Tensor) -> T:
            # (not the global ones, which no probe draws from: an evaluation from the state
            # before leaves them as the first did)
            current = {g: g.get_state() for g in self.generators if g not in GLOBALS}
            self._put(before=True)
            try:
                if self.after is None:
                    with self:
                        out = f(x)
                else:
                    try:
                        out = f(x)
                    except BaseException:  # (f's error: forgotten, as a failed first)
                        self._put(before=True)
                        self._forget()
                        raise
                    self._wrote_alike()  # (its refusal stands for the later evaluations)
            except BaseException:
                self._put(before=True)
                raise
            unwrap_between_evaluations()  # (a buffer f set anew under the transforms)
            for generator, state in current.items():
                generator.set_state(state)
            return out

        return f_again

    def _wrote_alike(self) -> None:
        """Check that a later evaluation wrote what the first did (to within rounding: a
        kernel's reduction order). Each starts from the same state, so only state no
        put-back covers (a Python list outside ``f``'s modules) makes them differ: then the
        evaluations computed different functions, and an earlier one's graph, which saved a
        written tensor at the version put back with it (``_versions``), would read the later
        value in its backward pass (silently wrong parameter gradients)."""
        wrote_alike(
            [
                (tensor, first)
                for (tensor, _, _), first in zip(self.written, self.after or (), strict=True)
            ]
        )

    def undo_writes(self) -> None:
        """Put back the tensors written to, not the generators: for an evaluation made once
        more after one that was not watched (its draws stand, as a second draw)."""
        self._put(before=True, generators=False)

    def undo(self) -> None:
        """Put back the state from before the first watched evaluation."""
        self._put(before=True)

    def _put(self, before: bool, generators: bool = True) -> None:
        after = None if before else self.after
        values = [b for _, b, _ in self.written] if after is None else after
        # the tensors as the dispatcher saw them, under no torch.func layer: written so (a
        # transform around the call, a nested call's, refuses writes to captured tensors);
        # the first noted last, where views overlap (``buf[0]``, then ``buf``): its elements'
        # earliest value; a tensor ``f`` resized (``resize_``, ``set_``: a history grown by one
        # entry a call) given its size, strides and offset back first (``View.put``)
        # (the plain values and the tensors' ``.data`` first: a write noted on a parameter
        # whose ``.data`` ``f`` then replaced goes back into its storage from before)
        if before:
            self.settings.put_back()
            forget_computed_weights()  # (computed from the state put back)
        pairs = list(zip(self.written, values, strict=True))
        with torch.no_grad(), torch._C._DisableFuncTorch():
            for (tensor, _, view), value in reversed(pairs):
                if after is None:
                    view.put(tensor)
                elif tensor.shape != value.shape:  # (the values after: their size)
                    tensor.resize_(value.shape)
                tensor.copy_(value)
            if after is None:
                _versions(self.versions)
        for generator, state in self.generators.items() if generators else ():
            generator.set_state(state)

    def _drawn_from(self, generator: torch.Generator | None) -> list[torch.Generator]:
        """An explicit generator, or the default ones (CPU, and ``x``'s GPU)."""
        if generator is not None:
            return [generator]
        return list({torch.default_generator, default_generator(self.device)})


def wrote_alike(written: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Raise unless each tensor of ``written`` holds the value paired with it (``_alike``):
    what an earlier evaluation of ``f`` (the first watched, or a recording) wrote into it,
    which a later evaluation from the same state must write again."""
    with torch.no_grad(), torch._C._DisableFuncTorch():
        for tensor, first in written:
            if not _alike(tensor, first):
                raise ValueError(
                    f"f wrote other values into a tensor of shape {tuple(first.shape)} "
                    "at two evaluations of one call: its evaluations compute different "
                    "functions (state outside its modules, such as a Python list or a "
                    "global, decides what it writes). Keep that state in a module's "
                    "attribute or buffer, which torchdiv puts back between evaluations, "
                    "or write the tensor outside f."
                )


def _alike(now: torch.Tensor, first: torch.Tensor) -> bool:
    """Whether ``now`` holds ``first``'s values: exactly for integers and booleans, to within
    a few rounding errors of their dtype for floating and complex tensors (``nan`` as
    ``nan``)."""
    if now.shape != first.shape or now.dtype != first.dtype:
        return False
    if not (now.is_floating_point() or now.is_complex()):
        return torch.equal(now, first)
    eps = torch.finfo(now.dtype).eps
    return torch.allclose(now, first, rtol=64 * eps, atol=64 * eps, equal_nan=True)


def _versions(noted: list[tuple[torch.Tensor, int]]) -> None:
    """Each noted tensor's version counter set back to its number before ``f`` wrote to it,
    with its value (the first noted last, as the values: a storage's views share one counter).

    A buffer ``f`` writes in place and then computes with (``self.count += 1; h *
    self.count``) is saved by autograd at the version after the write. Its value put back
    moved its counter on (``copy_``), and the next evaluation's write once more, so that the
    backward pass of the first evaluation's graph (a loss's parameter gradients after a
    call that evaluates ``f`` twice) raised PyTorch's "modified by an inplace operation"
    where every evaluation had read the same value. With the counter back, each evaluation
    writes the same values at the same versions, and a graph saved at a version reads the
    value it saved: a counter still raises where the value differs (the tensor written by
    something else in between).

    >>> count = torch.zeros(())
    >>> _ = count.add_(1); count._version
    1
    >>> _versions([(count, 0)]); count._version
    0
    """
    if noted:
        tensors, versions = zip(*reversed(noted), strict=True)
        _unsafe_set_version_counter(tensors, versions)


class Once:
    """The evaluations of ``f`` that one call makes, for a call that makes ``several``: each
    function it wraps (one that evaluates ``f`` once: a chunk of Hessian-vector products, a
    check, a part of a sum) runs from the state before the first (``Changes.again``), so that
    every evaluation computes the same function (the same dropout masks) and ``f``'s changes
    (a buffer written in place, a random generator) are made once. It wraps the function
    that applies the caller's ``torch.func`` transforms, not ``f`` inside them: the state is
    put back before they start.

    For one evaluation it wraps nothing (no dispatch mode to pay for), nor inside a region
    Dynamo traces, which cannot trace a dispatch mode or generator states."""

    def __init__(self, x: torch.Tensor, several: bool = True) -> None:
        self.changes = Changes(x) if several and not torch.compiler.is_compiling() else None

    def __call__(self, fn: Callable[[torch.Tensor], T]) -> Callable[[torch.Tensor], T]:
        return fn if self.changes is None else self.changes.again(fn)

    def undoing(self, fn: Callable[[], T]) -> T:
        """``fn()``: the call's evaluations where ``self`` wraps ``f`` inside the transforms
        (its backward and tangent passes not watched); if it raises after an evaluation
        completed (in a backward or tangent pass), the state from before the first is put
        back, so that a failed call has changed nothing of ``f``'s."""
        try:
            return fn()
        except BaseException:
            if self.changes is not None:
                self.changes.undo()
            raise


_FACTS: dict[Any, tuple[bool, bool, bool]] = {}


def _facts(func: Any) -> tuple[bool, bool, bool]:
    """Whether the ATen op ``func`` may write to an argument (its schema, or a batch norm's
    statistics), returns only new tensors (no alias of an argument), and draws random
    numbers; read off its schema once, as ``Changes`` watches every op."""
    facts = _FACTS.get(func)
    if facts is None:
        schema = func._schema
        writes = func in _BATCH_NORMS or any(
            a.alias_info is not None and a.alias_info.is_write for a in schema.arguments
        )
        fresh = all(r.alias_info is None for r in schema.returns)
        random = torch.Tag.nondeterministic_seeded in func.tags
        facts = _FACTS[func] = (writes, fresh, random)
    return facts


def default_generator(device: torch.device) -> torch.Generator:
    """The generator ``torch.randn(..., device=device)`` draws from without one."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or torch.cuda.current_device()]
    return torch.default_generator


@contextlib.contextmanager
def unchanged(f: Any, z: torch.Tensor) -> Iterator[Changes]:
    """Evaluations of ``f`` inside as a public call of ``f`` makes them, with what they change
    put back after (also after an error): the tensors written, the generators drawn from and
    the plain values of ``f``'s modules (``PlainAttributes`` says which modules ``Changes``'s
    settings cover: without it, Glow's ActNorm kept its ``inited`` flag). For a check that
    evaluates ``f`` before the call proper (``torchdiv._api.compiled``, ``torchdiv.flows``).

    Example:
        >>> counter = torch.zeros(())
        >>> def f(z):
        ...     return z + counter.add_(1)
        >>> with unchanged(f, torch.zeros(2)):
        ...     f(torch.zeros(2))
        tensor([1., 1.])
        >>> counter
        tensor(0.)
    """
    call = PlainAttributes(f)
    changes = Changes(z)
    try:
        with changes:
            yield changes
    finally:
        changes.undo()
        call.close()


put_back_with(Changes)  # (the mixing watch puts its checks' effects back with it)
