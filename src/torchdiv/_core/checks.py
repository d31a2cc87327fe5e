"""Argument checks shared by every public function.

Each check raises a ``TypeError`` or ``ValueError`` whose message starts with the public
function's name (``"divergence: ..."``), names the offending argument, says what was expected
and what arrived (values and shapes), and, where one helps, gives a hint.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import types
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.autograd.forward_ad as forward_ad
from torch._C._functorch import is_functorch_wrapped_tensor, peek_interpreter_stack
from torch.nn.modules.lazy import LazyModuleMixin
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from torchdiv._core.modes import DispatchMode, WrongDerivatives
from torchdiv._core.script import ahead_of_time, attribute, initialized, scripted

F = TypeVar("F", bound=Callable[..., Any])


def storage_address(t: torch.Tensor) -> int:
    """The address of ``t``'s storage (``0``: an empty one), read without asking for write
    access. ``untyped_storage().data_ptr()`` asks for it, and so materialises a copy-on-write
    storage: ``Unwritten``'s backup of the caller's ``x`` makes x's whole storage one, so every
    such read while a call ran copied all of it, a whole dataset's for ``x = data[:B]`` (and
    moved the caller's ``x`` to the copy). ``const_data_ptr`` reads the address alone; the
    storage starts ``storage_offset`` elements before it. Raises as ``untyped_storage`` does
    (a transform's wrapper, a sparse tensor)."""
    address = t.const_data_ptr()  # type: ignore[attr-defined]  # pyright: ignore[reportAttributeAccessIssue]  # (not in torch's stubs)
    if not address:  # no elements: no address of its own (an empty storage: 0)
        return int(t.untyped_storage().data_ptr())
    return int(address) - int(t.storage_offset()) * t.element_size()


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def event_numel(t: torch.Tensor, batch_dims: int) -> int:
    """Number of elements in one sample of ``t``."""
    return math.prod(t.shape[batch_dims:])


def check_callable(fn: str, f: Any, name: str = "f") -> None:
    """``f`` (the argument ``name`` of the public call ``fn``) must be callable."""
    if not callable(f):
        raise TypeError(
            f"{fn}: {name} must be callable (a function or nn.Module), got {type(f).__name__}"
        )


def check_input(fn: str, x: Any, batch_dims: Any, name: str = "x") -> None:
    """Check that ``x`` (the argument ``name``) is a floating tensor with at least
    ``batch_dims`` dimensions and no tangent of ``torch.autograd.forward_ad`` (a dual tensor
    made by the caller: ``torch.func.jvp``'s wrappers are not refused)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():  # (x.float() would drop the imaginary part: not the way out)
        raise TypeError(
            f"{fn}: {name} must have a real floating dtype, got {x.dtype}; pass "
            f"torch.view_as_real({name}) (real and imaginary parts as a last dimension of 2, "
            "each a real input) and rebuild the complex number inside f with "
            "torch.view_as_complex"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"{fn}: {name} must have a floating dtype (float16/bfloat16/float32/float64), "
            f"got {x.dtype}; convert it first, e.g. x.float()"
        )
    if _dual(x):
        raise ValueError(
            f"{fn}: {name} carries a forward-mode tangent (torch.autograd.forward_ad.make_dual), "
            "which the engines would drop without a word; take the JVP of the call with "
            "torch.func.jvp instead"
        )
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int):
        raise TypeError(f"{fn}: batch_dims must be an int, got {type(batch_dims).__name__}")
    if not 0 <= batch_dims <= x.dim():
        raise ValueError(
            f"{fn}: batch_dims must be in [0, {name}.dim()] = [0, {x.dim()}] for {name} of shape "
            f"{_shape(x)}, got {batch_dims}"
        )


def _dual(x: torch.Tensor) -> bool:
    """Whether ``x`` carries a tangent of ``torch.autograd.forward_ad`` (not while Dynamo
    traces, which cannot trace the test; nor a ``torch.func.jvp`` wrapper, which is fine)."""
    if torch.compiler.is_compiling() or is_functorch_wrapped_tensor(x):
        return False
    # no forward-AD level is open (the usual case): no tensor carries a tangent, as
    # ``unpack_dual`` itself answers at once there (its call and result skipped)
    if forward_ad._current_level < 0:
        return False
    return forward_ad.unpack_dual(x).tangent is not None


def check_chunk_size(fn: str, chunk_size: Any) -> None:
    """``chunk_size`` must be ``None`` (all at once) or an ``int >= 1``."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"{fn}: chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be at least 1 (or None for all), got {chunk_size}")


def check_flag(fn: str, name: str, value: Any) -> None:
    """The argument ``name`` must be ``True`` or ``False`` (not a truthy value)."""
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be True or False, got {value!r}")


def check_generator(fn: str, generator: Any) -> None:
    """``generator`` must be a ``torch.Generator`` or ``None``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}"
        )


def check_method(fn: str, method: Any, valid: Sequence[str]) -> None:
    """``method`` must be one of ``valid``."""
    _check_choice(fn, "method", method, valid)


def _check_choice(fn: str, what: str, value: Any, valid: Sequence[str]) -> None:
    """``value`` must be one of ``valid``; the message lists them."""
    if value not in valid:
        choices = ", ".join(repr(v) for v in valid)
        raise ValueError(f"{fn}: unknown {what} {value!r}; valid {what}s are {choices}")


def check_exact_options(
    fn: str,
    method: str,
    num_probes: Any,
    generator: Any,
    probe: Any = None,
    probes: Any = None,
) -> None:
    """Exact methods take no probes: reject the stochastic options instead of ignoring them."""
    check_generator(fn, generator)
    for name, value in (("num_probes", num_probes), ("probe", probe), ("probes", probes)):
        if value is not None:
            shown = (
                f"a tensor of shape {_shape(value)}" if isinstance(value, torch.Tensor) else value
            )
            raise ValueError(
                f"{fn}: {name} is only used by stochastic methods; method={method!r} is exact, "
                f"got {name}={shown}"
            )
    if generator is not None:
        raise ValueError(
            f"{fn}: generator is only used by stochastic methods; method={method!r} is exact"
        )


def check_num_probes(fn: str, method: str, num_probes: Any, spec: Any) -> int:
    """``num_probes``: a positive int, a multiple of what ``method`` needs (``spec.products``);
    returns it."""
    if num_probes is None:
        raise ValueError(
            f"{fn}: method={method!r} needs num_probes, the number of operator products "
            f"(Jacobian-vector products) per sample, e.g. num_probes={spec.products * 10}"
        )
    if isinstance(num_probes, bool) or not isinstance(num_probes, int):
        raise TypeError(f"{fn}: num_probes must be an int, got {type(num_probes).__name__}")
    if num_probes < 1:
        raise ValueError(f"{fn}: num_probes must be a positive int, got {num_probes}")
    if num_probes % spec.products:
        below = num_probes - num_probes % spec.products
        options = f"{below} or {below + spec.products}" if below else f"{spec.products}"
        raise ValueError(
            f"{fn}: method={method!r} needs num_probes to be a multiple of {spec.products} "
            f"({spec.split}), got {num_probes}; use {options}"
        )
    return num_probes


def check_probe(fn: str, probe: Any, valid: Sequence[str]) -> None:
    """``probe`` (a distribution's name) must be one of ``valid``."""
    _check_choice(fn, "probe", probe, valid)


def check_probes(
    fn: str, probes: Any, like: torch.Tensor, method: str, num_probes: Any, spec: Any, name: str
) -> int:
    """A probe tensor ``(r,) + x.shape`` with ``r`` random vectors that ``method`` can use.

    Returns:
        The products per sample these probes are for; ``num_probes``, if given, must agree.
    """
    if not isinstance(probes, torch.Tensor):
        raise TypeError(f"{fn}: probes must be a torch.Tensor, got {type(probes).__name__}")
    if not probes.is_floating_point():
        raise TypeError(f"{fn}: probes must have a floating dtype, got {probes.dtype}")
    if probes.device != like.device:
        raise ValueError(
            f"{fn}: probes are on {probes.device} but {name} is on {like.device}; draw them "
            f"with draw_probes({name}, ...) or move them with probes.to({name}.device)"
        )
    if probes.dim() != like.dim() + 1 or probes.shape[1:] != like.shape or len(probes) == 0:
        raise ValueError(
            f"{fn}: probes must have shape (r,) + {name}.shape = (r, {str(_shape(like))[1:]} "
            f"with r >= 1 random vectors; got probes of shape {_shape(probes)} and {name} of "
            f"shape {_shape(like)}. draw_probes({name}, num_probes, method=...) makes them"
        )
    r = len(probes)
    if r % spec.vectors:
        raise ValueError(
            f"{fn}: method={method!r} uses {spec.vectors} random vectors per {spec.products} "
            f"products, so probes.shape[0] must be a multiple of {spec.vectors}; got probes of "
            f"shape {_shape(probes)}"
        )
    implied: int = r // spec.vectors * spec.products
    if num_probes is not None and num_probes != implied:
        raise ValueError(
            f"{fn}: probes of shape {_shape(probes)} are {r} random vectors, which method="
            f"{method!r} spends as num_probes={implied} products, but num_probes={num_probes} "
            "was given; pass one of the two"
        )
    return implied


def check_products(fn: str, out: Any, vectors: torch.Tensor) -> None:
    """``matmat(V)`` must return a real tensor shaped like ``V``: the operator is square."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{fn}: matmat(V) must return a torch.Tensor, got {type(out).__name__}")
    if out.shape != vectors.shape:
        raise ValueError(
            f"{fn}: matmat(V) must return a tensor shaped like V (k probe vectors, each shaped "
            f"like `like`): V has shape {_shape(vectors)} but matmat(V) has shape {_shape(out)}"
        )
    if out.is_complex():  # cast to the probes' real dtype, it lost its imaginary part
        raise TypeError(
            f"{fn}: matmat(V) must return a real tensor, got {out.dtype}; the trace is linear: "
            "estimate those of the real and imaginary parts apart (lambda V: matmat(V).real, "
            "then .imag, for real probes V) and add them as re + 1j * im"
        )


def check_tolerance(fn: str, rtol: Any, atol: Any, max_probes: Any, block: int) -> None:
    """``rtol``/``atol`` non-negative numbers (at least one); ``max_probes >= block``."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{fn}: {name} must be a float or None, got {type(value).__name__}")
        if not 0 <= value < math.inf:
            raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {value}")
    if isinstance(max_probes, bool) or not isinstance(max_probes, int):
        raise TypeError(f"{fn}: max_probes must be an int, got {type(max_probes).__name__}")
    if max_probes < block:
        raise ValueError(
            f"{fn}: max_probes={max_probes} is below one block of num_probes={block} products; "
            "raise max_probes or lower num_probes"
        )


def check_output(fn: str, y: Any, x: torch.Tensor, batch_dims: int, name: str = "f(x)") -> None:
    """Check that ``y`` is a floating tensor with the batch shape of ``x``."""
    if not isinstance(y, torch.Tensor):
        hint = _sample_hint(y, "lambda x: unet(x, t).sample")
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(y).__name__}{hint}")
    if _dtensor(y):  # (its ops' backward passes take DTensor gradients, not torchdiv's vectors)
        placements = tuple(getattr(y, "placements", ()))  # (a DTensor's: mypy sees a Tensor)
        raise TypeError(
            f"{fn}: {name} is a DTensor (placements {placements}), which torchdiv's "
            f"products cannot differentiate; return a plain tensor: {name}.full_tensor(), or "
            "the last parallel style's use_local_output=True"
        )
    if y.is_complex():
        raise TypeError(
            f"{fn}: {name} must be a real floating tensor to be differentiated, got {y.dtype}; "
            f"differentiate torch.view_as_real({name}) instead (real and imaginary parts "
            "stacked in a last dimension of 2: each part's derivatives, a complex log psi's "
            "log|psi| and phase), or its .real or .imag"
        )
    if not y.is_floating_point():
        raise TypeError(
            f"{fn}: {name} must be a floating tensor to be differentiated, got {y.dtype}"
        )
    if y.shape[:batch_dims] != x.shape[:batch_dims]:
        raise ValueError(
            f"{fn}: {name} changed the batch shape: {name} has shape {_shape(y)} and x has shape "
            f"{_shape(x)}, so their first batch_dims={batch_dims} dimensions "
            f"{_shape(y)[:batch_dims]} != {_shape(x)[:batch_dims]}. Samples must map to samples; "
            f"check batch_dims{_packed_hint(y, x, batch_dims)}"
        )


def _dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (tensor parallelism's; looked up for subclasses only)."""
    if type(t) is torch.Tensor or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def check_not_dtensor(fn: str, x: torch.Tensor, what: str, name: str = "x") -> None:
    """Refuse a ``DTensor`` ``x`` where ``what`` (a method, a form) meets it with plain tensors
    (its probes, the caller's graph): PyTorch raises "got mixed torch.Tensor and DTensor" from
    inside torchdiv's passes, which names neither the argument nor the way out."""
    if _dtensor(x):
        raise TypeError(
            f"{fn}: {name} is a DTensor, which {what} cannot take (torchdiv's vectors are plain "
            f"tensors); use the function form's exact methods (method='auto'), which take it, "
            f"or pass a plain tensor ({name}.full_tensor(), or {name}.to_local() for this rank's "
            "samples), whose gradients are refused where f's tensor-parallel modules change "
            "placements in backward (ColwiseParallel: DTensor.from_local)"
        )


def _packed_hint(y: Any, x: torch.Tensor, batch_dims: int) -> str:
    """The way out for graphs packed along ``x``'s first dimension with one output row per
    graph (PyTorch Geometric's ``batch`` vector: ``(total_nodes, 3)`` in, ``(graphs,)`` out)."""
    if batch_dims != 1 or y.dim() == 0 or y.shape[0] >= x.shape[0]:
        return ""
    return (
        ". If x packs several graphs' nodes along dimension 0 (a batch vector) and f returns "
        "one row per graph, pass batch_dims=0: the whole batch is then one sample, and a "
        "Laplacian or Jacobian of f holds each graph's own, since each row depends on its "
        "graph's nodes only"
    )


def check_square(fn: str, y: torch.Tensor, x: torch.Tensor, batch_dims: int, name: str) -> None:
    """Check that each sample's Jacobian is square (same event numel in and out)."""
    if event_numel(y, batch_dims) != event_numel(x, batch_dims):
        raise ValueError(
            f"{fn}: needs a square Jacobian, but the event of {name} "
            f"(shape {_shape(y)[batch_dims:]}) and the event of x "
            f"(shape {_shape(x)[batch_dims:]}) differ in size; full shapes "
            f"{_shape(y)} and {_shape(x)} with batch_dims={batch_dims}. Use jacobian() for "
            "non-square maps"
        )


def raised_by_f(exc: BaseException) -> bool:
    """Whether ``exc`` came out of the caller's ``f`` (see ``call_f``), and not out of a
    torchdiv call inside ``f`` that already gave it its final form (``mark_final``)."""
    return getattr(exc, "_torchdiv_in_f", False) and not getattr(exc, "_torchdiv_final", False)


def mark_final(exc: BaseException) -> BaseException:
    """Mark ``exc`` as leaving a public function: an outer torchdiv call whose ``f`` makes
    this call (``biharmonic``'s Laplacian of a Laplacian) passes it on unchanged."""
    with contextlib.suppress(AttributeError):  # a built-in type without __dict__
        exc._torchdiv_final = True  # type: ignore[attr-defined]
    return exc


def call_f(f: Callable[..., Any], *args: Any) -> Any:
    """``f(*args)``, marking an exception ``f`` raises, so that the public function can add its
    context once the error is final (``torchdiv._api.reporting``); torchdiv's own errors raised
    while watching ``f`` (``BatchInteractionError``) carry their own."""
    try:
        return f(*args)
    except Exception as exc:
        if not isinstance(exc, ValueError) or type(exc).__name__ != "BatchInteractionError":
            with contextlib.suppress(AttributeError):  # a built-in type without __dict__
                exc._torchdiv_in_f = True  # type: ignore[attr-defined]
                exc._torchdiv_engine = _engine_now()  # type: ignore[attr-defined]
        raise


def _engine_now() -> str:
    """What is evaluating ``f`` at the moment: for an error's context."""
    if peek_interpreter_stack() is not None:
        return "torch.func transforms (vjp, jvp, vmap)"
    modes = [type(m).__name__ for m in _get_current_dispatch_mode_stack()]
    if "_Recorder" in modes:
        return "the structured recorder (a TorchDispatchMode)"
    return "plain autograd"


def check_initialized(fn: str, f: Any) -> None:
    """Refuse a module ``f`` (or a bound method of one, or a function reaching one the way
    ``script.scripted`` follows: closures, defaults, globals) holding a lazy module that has not
    seen an input yet: its first forward swaps parameter classes, which inside a ``torch.func``
    transform left it half made, and the next evaluation crashed the process (a segmentation
    fault). The walk ``script.scripted`` makes (for a module too: a module it holds as a plain
    attribute or in a partial it holds, which the ``_modules`` dictionaries alone missed; the
    walk at the start of the call met it, and ``"auto"`` then failed on it inside its
    recording, ``"forward"`` initialized it inside ``torch.func``), unless that walk at the
    start of the public call found none already (``script.initialized``)."""
    if initialized(f):
        return
    if not torch.compiler.is_compiling():
        _lazy_in(fn, f)  # (eager: the walk itself)
        return
    owner = f if isinstance(f, torch.nn.Module) else attribute(f, "__self__")
    stack = [owner] if isinstance(owner, torch.nn.Module) else []
    if not stack:  # a function, traced: see _lazy_in
        if isinstance(f, types.FunctionType) and not f.__code__.co_freevars:
            _lazy_in(fn, f)
        return
    while stack:  # a module, traced: its _modules
        m = stack.pop()
        lazy: Any = m  # (torch types the method's self as a protocol checkers reject)
        if isinstance(m, LazyModuleMixin) and lazy.has_uninitialized_params():
            _refuse_lazy(fn, m)
        stack += [c for c in m._modules.values() if c is not None]


def _refuse_lazy(fn: str, m: Any) -> None:
    """Refuse what ``script.scripted``'s walk met that cannot be differentiated: a lazy module
    not yet initialized, or an AOTInductor model (``script.ahead_of_time``)."""
    if ahead_of_time(type(m)):
        raise TypeError(
            f"{fn}: f is or calls an AOTInductor model ({type(m).__name__}, from "
            "torch._inductor.aoti_load_package), which runs compiled kernels without autograd: "
            "its derivatives cannot be taken (they would read as zeros); pass the eager module "
            "it was exported from, or torch.export's program.module(), instead"
        )
    raise ValueError(
        f"{fn}: f has uninitialized parameters (a lazy module, {type(m).__name__}): "
        "call it once on a batch, f(x), to initialize them before differentiating it"
    )


@torch.compiler.assume_constant_result
def _lazy_in(fn: str, f: Any) -> bool:
    """``check_initialized`` of a function while Dynamo traces the call: the walk of its
    defaults and globals (``script.scripted``) run by Dynamo at trace time, not traced (Dynamo
    cannot trace it: a graph break on a closure's ``mappingproxy``), its result a constant
    of the graph (nothing is left in it). Dynamo initialises a lazy module where the traced
    engine first calls it, inside ``torch.func``'s transforms, which crashed the process (a
    segmentation fault in ``kaiming_uniform_``); the ``ValueError`` reaches the caller
    inside Dynamo's ``InternalTorchDynamoError``. Not for a closure (``co_freevars``):
    Dynamo cannot hand its cells over (``ClosureConversionError``), so one is not checked."""
    lazy: list[Any] = []
    scripted(f, lazy=lazy)
    if lazy:
        _refuse_lazy(fn, lazy[0])
    return False


def check_untransformed(fn: str, what: str, way_out: str) -> None:
    """``ValueError`` where the call runs under a ``torch.func`` transform of the caller
    (``vmap``, ``grad``, ``jvp``) but ``what`` differentiates ``f`` by backward passes on a
    leaf copy of ``x``, which PyTorch refuses there (its message names neither the function
    nor a way out)."""
    if peek_interpreter_stack() is not None:
        raise ValueError(
            f"{fn}: {what} runs backward passes on its own copy of x, which PyTorch refuses "
            f"under a torch.func transform (vmap, grad, jvp) around the call; {way_out}"
        )


def untransformed() -> bool:
    """Whether the call runs eagerly outside any ``torch.func`` transform: not while Dynamo
    traces it, nor under the caller's ``vmap``/``grad``/``jvp``, where plain autograd on a
    leaf copy of ``x`` cannot run (PyTorch refuses ``requires_grad_`` there)."""
    return not torch.compiler.is_compiling() and peek_interpreter_stack() is None


def checked(
    fn: str, f: Callable[[torch.Tensor], Any], x: torch.Tensor, batch_dims: int, square: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap ``f`` so that its output is checked wherever it is evaluated (inside transforms too),
    its errors are marked (``call_f``), and an op an engine refuses (``_modes.WrongDerivatives``)
    is reported under ``fn``'s name. The wrapper's ``__wrapped__`` is ``f`` (``inspect.unwrap``).

    A good output is told by one read of its shape (``f`` runs under dispatch modes, which see
    every read of a tensor's attributes: a few microseconds each); the checks that raise run
    only on a bad one."""
    batch, n = x.shape[:batch_dims], event_numel(x, batch_dims)
    check_initialized(fn, f)
    kept = Unwritten(fn, f, x) if untransformed() else None  # (else x is not the caller's)

    def g(z: torch.Tensor) -> torch.Tensor:
        version = -1 if kept is None else z._version
        try:
            y: torch.Tensor = call_f(f, z)  # check_output raises if it is not
        except WrongDerivatives as exc:
            # named once: here, or already by the call whose f this is (biharmonic's inner
            # Laplacians) or by a public call inside f (which the caller's report renames)
            named = WrongDerivatives(str(exc) if exc.named else f"{fn}: {exc}")
            named.named = True
            named._torchdiv_context = getattr(exc, "_torchdiv_context", False)  # type: ignore[attr-defined]
            raise named from None
        except Exception as exc:
            if kept is not None:
                kept.check(z, version, exc)
            raise
        if kept is not None:
            kept.check(z, version)
        shape = y.shape if isinstance(y, torch.Tensor) and y.is_floating_point() else None
        if (
            shape is None
            or shape[:batch_dims] != batch
            or (square and math.prod(shape[batch_dims:]) != n)
            or _dtensor(y)
        ):
            try:
                check_output(fn, y, x, batch_dims)
                if square:
                    check_square(fn, y, x, batch_dims, "f(x)")
            except (TypeError, ValueError) as exc:  # final: a torchdiv call around this one
                raise mark_final(exc) from None  # (biharmonic's) passes it on as it is
        return y

    return wrapping(g, f)


class Unwritten:
    """The caller's ``x`` as it was before ``f`` ran: ``f`` must not write into its input.

    Every engine hands ``f`` the caller's ``x`` (or a view or wrapper of it), and most
    evaluate ``f`` more than once; an ``f`` that writes into it (``x.mul_(2)``,
    ``x[:, 0] = 0``) would change the caller's tensor and differentiate another function at
    each evaluation (forward mode ran and returned the derivatives of a mix; the
    backward-pass engines refused it with autograd's "a leaf Variable ... in-place" error,
    which names neither ``x`` nor the op). ``check`` after each evaluation reads two version
    counters (``x``'s, shared with its views and ``detach()``-ed copies, and that of the
    tensor ``f`` got): on a write, ``x``'s values and version are put back from a
    copy-on-write backup (``torch._lazy_clone``: no copy unless ``x`` is written) and a
    ``ValueError`` names the op (found by one more evaluation of ``f``, on a copy of ``x``).
    """

    def __init__(self, fn: str, f: Callable[[torch.Tensor], Any], x: torch.Tensor) -> None:
        self.fn, self.f, self.x = fn, f, x
        self.version = x._version
        self.backup: torch.Tensor | None = None
        # (``detach`` always: inside a recording of an outer call, as the biharmonic's nested
        # Laplacian makes, the recorder follows ``x`` and would record the clone as one of
        # ``f``'s ops; ``try``, not ``contextlib.suppress``: three Python calls fewer a call)
        try:  # noqa: SIM105  # a device without copy-on-write: no backup
            self.backup = torch._lazy_clone(x.detach())  # pyright: ignore[reportPrivateImportUsage]
        except RuntimeError:
            pass

    def check(self, z: torch.Tensor, version: int, error: Exception | None = None) -> None:
        """Raise the ``ValueError`` if the evaluation of ``f`` at ``z`` (whose version was
        ``version`` before) wrote into ``x`` or ``z``, or failed on autograd's refusal to
        write into a leaf (``error``) that was ``x``."""
        refused = error is not None and "is being used in an in-place operation" in str(error)
        if self.x._version == self.version and z._version == version and not refused:
            return
        with torch._C._DisableFuncTorch(), torch.no_grad():  # inside a transform of f
            if self.x._version != self.version and self.backup is not None:
                self.x.copy_(self.backup)
                torch._C._autograd._unsafe_set_version_counter(  # pyright: ignore[reportAttributeAccessIssue]
                    (self.x,), (self.version,)
                )
            op = first_write(self.f, self.x)
        if op is None and refused:
            return  # a leaf other than x (a parameter): autograd's error stands
        # final: a torchdiv call around this one (biharmonic's) passes it on as it is
        raise mark_final(
            ValueError(
                f"{self.fn}: f writes into its input x in place ({op or 'an in-place op'}): "
                "torchdiv evaluates f on the caller's x, often more than once, and must leave "
                "x unchanged (its values are put back). Copy it first inside f "
                "(x = x.clone()) or compute out of place (x * 2 for x.mul_(2); "
                "torch.where(mask, 0, x) or x.index_put(...) for x[...] = ...)."
            )
        ) from error


class _Writes(DispatchMode):
    """The first ATen op that writes into the storage of ``target`` (``found``)."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        self.storage = target.untyped_storage().data_ptr()
        self.found: str | None = None

    def dispatch(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if self.found is None and func._schema.is_mutable:
            given = [*zip(func._schema.arguments, args, strict=False)]
            given += [(a, kwargs[a.name]) for a in func._schema.arguments if a.name in kwargs]
            for argument, value in given:
                written = argument.alias_info is not None and argument.alias_info.is_write
                if (
                    written
                    and isinstance(value, torch.Tensor)
                    and value.untyped_storage().data_ptr() == self.storage
                ):
                    self.found = str(func)
        return func(*args, **kwargs)


def first_write(f: Callable[[torch.Tensor], Any], x: torch.Tensor) -> str | None:
    """The ATen op by which ``f`` writes into its input (``"aten.mul_.Tensor"``), found by
    evaluating ``f`` on a copy of ``x``; ``None`` if it writes none (or fails first)."""
    copy = x.detach().clone()
    mode = _Writes(copy)
    with contextlib.suppress(Exception), mode:
        f(copy)
    return mode.found


def wrapping(g: F, f: Any) -> F:
    """Mark ``g`` as torchdiv's own wrapper of ``f``: ``inspect.unwrap`` finds ``f``, and so
    does ``unwrapped``, which unwraps nothing else."""
    g.__wrapped__ = f  # type: ignore[attr-defined]
    g._torchdiv_wraps = f  # type: ignore[attr-defined]
    return g


def unwrapped(f: Any) -> Any:
    """The caller's ``f`` inside torchdiv's own wrappers (``wrapping``), not unwrapped further:
    a user's ``functools.wraps`` wrapper may compute something else than what it wraps. A
    module is never one (and a missing attribute of a module costs an exception)."""
    while not isinstance(f, torch.nn.Module):
        inner = attribute(f, "_torchdiv_wraps")
        if inner is None:
            return f
        f = inner
    return f


def check_time(fn: str, name: str, t: Any, x: torch.Tensor) -> torch.Tensor:
    """A finite time given as a real number (also NumPy's: ``np.float32(1.0)`` from a config,
    which was refused) or a 0-dim real tensor -> 0-dim, dtype/device of ``x``."""
    if isinstance(t, bool) or not isinstance(t, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{fn}: {name} must be a float or a 0-dim tensor, got {type(t).__name__}")
    if isinstance(t, torch.Tensor):
        if t.dim() != 0:
            raise ValueError(
                f"{fn}: {name} must be a float or a 0-dim tensor, got a tensor of shape "
                f"{_shape(t)}; one time for the whole batch"
            )
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{fn}: {name} must be a real number, got dtype {t.dtype}")
    # straight to x's dtype: through float32 first, 0.1 became 0.10000000149 in float64
    out = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    if not torch.isfinite(out):  # once per call, before the solve
        raise ValueError(f"{fn}: {name} must be finite, got {t}")
    return out


def check_positive(fn: str, name: str, value: Any) -> None:
    """A finite number > 0 (a solver tolerance)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}")
    if not 0 < value < math.inf:
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value}")


def check_solver(fn: str, solver: Any, valid: Sequence[str]) -> None:
    """``solver`` (an ODE solver's name) must be one of ``valid``."""
    _check_choice(fn, "solver", solver, valid)


def check_options(fn: str, options: Any) -> None:
    """``options`` (the ODE solver's) must be a ``dict`` or ``None``."""
    if options is not None and not isinstance(options, dict):
        raise TypeError(
            f"{fn}: options must be a dict of solver options or None, got {type(options).__name__}"
        )


def _sample_hint(y: Any, wrapped: str) -> str:
    """The way out for a model output object whose ``.sample`` is the tensor (diffusers')."""
    if isinstance(attribute(y, "sample"), torch.Tensor):
        return f"; its .sample is one: wrap the model, e.g. {wrapped}"
    return ""


def check_velocity(fn: str, v: Any, z: torch.Tensor) -> None:
    """``f(t, z)`` must be a tensor with the shape and dtype of the state ``z``."""
    if not isinstance(v, torch.Tensor):
        hint = _sample_hint(v, "lambda t, z: unet(z, t).sample")
        raise TypeError(f"{fn}: f(t, z) must return a torch.Tensor, got {type(v).__name__}{hint}")
    if v.shape != z.shape:
        raise ValueError(
            f"{fn}: f(t, z) must return a velocity shaped like z: z has shape {_shape(z)} but "
            f"f(t, z) has shape {_shape(v)}"
        )
    if v.dtype != z.dtype:
        raise TypeError(
            f"{fn}: f(t, z) must return z's dtype {z.dtype}, got {v.dtype}; cast the model "
            "or x (e.g. model.to(x.dtype)), or, where torch.autocast runs f in another dtype, "
            "its output (lambda t, z: f(t, z).to(z.dtype))"
        )


def check_log_prob(fn: str, lp: Any, x: torch.Tensor, batch_dims: int) -> None:
    """``base_log_prob(z)`` must give one floating log-density per sample."""
    if not isinstance(lp, torch.Tensor) or not lp.is_floating_point():
        shown = lp.dtype if isinstance(lp, torch.Tensor) else type(lp).__name__
        raise TypeError(f"{fn}: base_log_prob(z) must return a floating tensor, got {shown}")
    if lp.shape != x.shape[:batch_dims]:
        raise ValueError(
            f"{fn}: base_log_prob(z) must return one log-density per sample, shape "
            f"x.shape[:batch_dims] = {_shape(x)[:batch_dims]} for x of shape {_shape(x)} and "
            f"batch_dims={batch_dims}; got shape {_shape(lp)} (sum over the event dimensions)"
        )


def _indices(given: Any) -> bool:
    """Whether ``given`` is a sequence of integer indices (Python or NumPy ints, not bools)."""
    return isinstance(given, Sequence) and all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in given
    )


def check_coordinates(fn: str, coordinates: Any, x: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """Event coordinates to differentiate along: flat event indices (ints, negative counting
    from the end, no repeats) or a boolean mask shaped like the event (or flat) -> a 1-D int64
    index tensor on ``x``'s device."""
    n, event = event_numel(x, batch_dims), _shape(x)[batch_dims:]
    if isinstance(coordinates, torch.Tensor) and coordinates.dtype == torch.bool:
        if coordinates.shape not in (torch.Size(event), torch.Size((n,))):
            raise ValueError(
                f"{fn}: a boolean coordinates mask must have the event shape {event} (or the "
                f"flat ({n},)) of x of shape {_shape(x)} with batch_dims={batch_dims}; got a mask "
                f"of shape {_shape(coordinates)}{_unbatched(x, batch_dims)}"
            )
        return coordinates.reshape(n).nonzero().squeeze(1).to(x.device)
    if isinstance(coordinates, torch.Tensor) and coordinates.dtype == torch.uint8:
        raise TypeError(
            f"{fn}: coordinates of dtype torch.uint8 are ambiguous (PyTorch's indexing reads them "
            "as a mask, a deprecated one; here they would be indices): pass a mask as a bool "
            "tensor, indices as an int64 tensor or a list of ints"
        )
    if isinstance(coordinates, torch.Tensor):
        if coordinates.is_floating_point() or coordinates.is_complex() or coordinates.dim() != 1:
            raise TypeError(
                f"{fn}: coordinates must be flat event indices (a 1-D integer tensor or a list of "
                f"ints) or a boolean mask, got a {coordinates.dtype} tensor of shape "
                f"{_shape(coordinates)}"
            )
        given = coordinates.tolist()
    elif _indices(coordinates):
        given = [int(i) for i in coordinates]
    else:
        what = type(coordinates).__name__
        if isinstance(coordinates, Sequence) and not isinstance(coordinates, str):
            what = f"a {what} of {', '.join(sorted({type(i).__name__ for i in coordinates}))}"
        raise TypeError(
            f"{fn}: coordinates must be flat event indices (a list of ints or a 1-D integer "
            f"tensor) or a boolean mask (a bool tensor), got {what}"
        )
    if not all(-n <= i < n for i in given):  # checked on Python ints: no tensor op (27 us)
        raise ValueError(
            f"{fn}: coordinates must be indices into the flattened event of {n} elements (x of "
            f"shape {_shape(x)}, batch_dims={batch_dims}), in [-{n}, {n}); got {given}"
            f"{_unbatched(x, batch_dims)}"
        )
    index = [i % n for i in given]
    if len(set(index)) != len(index):
        raise ValueError(
            f"{fn}: coordinates must not repeat an index (its second derivative would be "
            f"counted twice); got {given} for an event of {n} elements"
        )
    return torch.tensor(index, dtype=torch.int64, device=x.device)


def _unbatched(x: torch.Tensor, batch_dims: int) -> str:
    """The end of a shape error about an option sized by the event (coordinates, ``sigma``):
    where ``x`` has no event dimensions, the likely cause, an unbatched ``x``."""
    if x.dim() != batch_dims:
        return ""
    return (
        "; x has no event dimensions, so each of its elements is read as one sample: for one "
        "unbatched sample pass batch_dims=0 (or x[None])"
    )


def check_matrix(
    fn: str, name: str, matrix: Any, x: torch.Tensor, batch_dims: int, square: bool
) -> None:
    """A floating ``(n, k)`` matrix on the flattened event of ``x`` (``(n, n)`` if ``square``),
    the same for every sample or one per sample (``x.shape[:batch_dims] + (n, k)``)."""
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(matrix).__name__}")
    if not matrix.is_floating_point():
        raise TypeError(f"{fn}: {name} must have a floating dtype, got {matrix.dtype}")
    n, batch = event_numel(x, batch_dims), _shape(x)[:batch_dims]
    k = n if square else "k"
    if (
        matrix.dim() not in (2, 2 + batch_dims)
        or matrix.shape[-2] != n
        or (square and matrix.shape[-1] != n)
        or (matrix.dim() > 2 and _shape(matrix)[:-2] != batch)
    ):
        raise ValueError(
            f"{fn}: {name} must have shape ({n}, {k}) (all samples) or {batch} + ({n}, {k}) "
            f"(one per sample) for x of shape {_shape(x)} with batch_dims={batch_dims} "
            f"({n} elements per sample); got {name} of shape {_shape(matrix)}"
            f"{_unbatched(x, batch_dims)}"
        )
    if matrix.device != x.device:
        raise ValueError(f"{fn}: {name} is on {matrix.device} but x is on {x.device}")


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a lack of memory (CUDA's, or the CPU allocator's message) rather
    than an op that cannot be batched: it propagates, for the caller to take smaller chunks."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)
