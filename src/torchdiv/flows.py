r"""Log-likelihoods of continuous normalizing flows and probability-flow ODEs.

A velocity field ``f(t, z)`` carries base samples at ``t0`` to data at ``t1``
(``dz/dt = f(t, z)``). Along a trajectory the density obeys the instantaneous change of
variables (Chen et al. 2018, FFJORD: Grathwohl et al. 2019),

    d/dt [z, log p_t(z)] = [f(t, z), -div f(t, z)],

so integrating from the data point ``x`` at ``t1`` back to ``t0`` gives

    log p_{t1}(x) = log p_{t0}(z(t0)) - integral_{t0}^{t1} div f(t, z(t)) dt.

The divergence is the library's: exact (``"auto"``, ``"forward"``, ``"reverse"``) or
estimated (``"hutchinson"``, ``"hutch++"``, ``"xtrace"``) with probes drawn **once per solve**.

Standard errors along a solve: every estimator is a mean of per-sample terms (see
``torchdiv._estimators.registry``), so the state carries the ``m`` terms' integrals next to ``z``:
``Delta_j(t0) = integral of term_j``, the estimate is their mean and its standard error their
standard error of the mean. Why that is right: the probes are fixed for the solve and the
trajectory ``z(t)`` does not depend on them, so the integral of a mean is the mean of the
integrals. Hutchinson's integrated terms are i.i.d. (one probe each). Hutch++: given the
sketch ``S``, the basis ``Q_t = orth(A_t S)`` along the trajectory is fixed and the residual
probes ``g_j`` are independent of it, so the integrated terms
``integral tr(Q_t^T A_t Q_t) + g_j^T P_t A_t P_t g_j dt`` are conditionally i.i.d. with
conditional mean ``integral tr(A_t) dt`` for every sketch: their sample variance estimates the
total variance without bias, as for one matrix (``_estimators.hutchpp``). XTrace's terms are its
left-out estimates, integrated; their spread is the paper's heuristic, as for one matrix.
(An adaptive solver picks its steps from the whole state, terms included, so the quadrature
nodes depend weakly on the probes; at solver tolerance this is below the integration error.
Fixed-step solvers have no such effect.) Exact methods carry one term and report stderr 0.

Every function evaluation computes ``f(t, z)`` and its divergence terms from the Jacobian
engine's own evaluations of ``f`` (one for the exact methods and reverse-mode estimators;
more for an estimator in forward mode, one per round of products, and for the group-norm
split), without host synchronisation, on ``z``'s device and dtype.
Results are differentiable with respect to ``x`` and the flow's parameters (maximum-likelihood
training), by backpropagation through the solver or, with ``adjoint=True``, by
``torchdiffeq.odeint_adjoint``. Hutch++ and XTrace hold their sketch basis constant for
gradients, as for one estimate (unbiased for the gradient of the exact log-likelihood, not
the derivative of the estimate), so there the adjoint and the direct gradient agree only to
about 1e-4 relative (exact and Hutchinson: to the solver's tolerance).

Needs ``torchdiffeq`` (``pip install 'torchdiv[ode]'``); ``import torchdiv`` does not.
"""

from __future__ import annotations

import contextlib
import functools
import os
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from types import ModuleType
from typing import Any, Literal, overload

import torch
from torch import nn
from torch._C._functorch import TransformType, peek_interpreter_stack
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from torchdiv._api.reporting import final_error, reported
from torchdiv._core.checks import (
    call_f,
    check_callable,
    check_chunk_size,
    check_exact_options,
    check_flag,
    check_initialized,
    check_input,
    check_log_prob,
    check_method,
    check_options,
    check_positive,
    check_solver,
    check_time,
    check_velocity,
)
from torchdiv._core.ddp import one_forward
from torchdiv._core.mixing.errors import BatchInteractionError
from torchdiv._core.modes import (
    CompiledCodeEager,
    outside_inference,
    outside_inference_mode,
    saves_apart,
)
from torchdiv._core.script import attribute, forget_plans
from torchdiv._core.walk import nodes
from torchdiv._estimators import stochastic as _stochastic
from torchdiv._estimators import trace as _trace
from torchdiv._estimators.probes import draw
from torchdiv._estimators.registry import STOCHASTIC_METHODS, num_terms, num_vectors
from torchdiv._exact import dispatch as _exact
from torchdiv._exact.autograd import UndifferentiableBackward
from torchdiv._exact.state import unchanged
from torchdiv._taylor.cache import _attributes, _contents, site

__all__ = ["AugmentedDynamics", "log_likelihood"]

FLOW_METHODS = (*_exact.EXACT_METHODS, "structured", *STOCHASTIC_METHODS)
# Their probes default to Gaussian here: Rademacher sketch vectors of a small event repeat up
# to sign (n = 3: a pair does with probability 1/4), the sketch's basis then has a column set
# by round-off, the estimate jumps between function evaluations and an adaptive solver's
# step collapses (dopri5 stalled past 1500 evaluations where 100 do)
_SKETCHING = ("hutch++", "xtrace")
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _FirstOrderOnly(torch.autograd.Function):
    """The identity on ``log_likelihood(adjoint=True)``'s result, whose backward refuses to
    run with ``create_graph=True`` (grad mode on in a backward): ``torchdiffeq``'s adjoint
    computes its gradients under ``no_grad``, so the gradients of those gradients (a
    score-matching loss on ``grad_x log p``, a gradient penalty, a Hessian-vector product)
    were silently missing: ``grad_x`` came back without a graph."""

    @staticmethod
    def forward(ctx: Any, logp: torch.Tensor) -> torch.Tensor:
        return logp.clone()  # not a view: the caller may write to the result

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        if torch.is_grad_enabled():
            raise UndifferentiableBackward(
                "log_likelihood: adjoint=True gives first derivatives only (torchdiffeq's "
                "adjoint backward runs under no_grad), but this backward pass asks for a graph "
                "(create_graph=True): its gradients would silently not be differentiable; use "
                "adjoint=False (backpropagation through the solver) for higher derivatives"
            )
        return grad_outputs[0]


class _NoGradients(torch.autograd.Function):
    """The identity on the end state of a ``solver="scipy_solver"`` solve, tied to what
    requires grad among ``x`` and the tensors and modules ``f`` holds, whose backward raises:
    torchdiffeq runs SciPy on NumPy copies under ``no_grad``, so the solve has no graph, and a
    loss through it (a learnable base density's) trained the rest while ``x`` and ``f``'s
    parameters silently got no gradient. (``adjoint=True`` differentiates by its own solves,
    evaluating the dynamics with grad: right there.)"""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, delta: torch.Tensor, *inputs: torch.Tensor) -> Any:
        return z.clone(), delta.clone()

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        raise RuntimeError(
            "log_likelihood: solver='scipy_solver' gives no gradients (torchdiffeq runs SciPy on "
            "NumPy copies of the state), so x and the parameters of f would silently get none; "
            "use adjoint=True (its backward solves evaluate the dynamics with grad) or a "
            "torchdiffeq solver ('dopri5', 'rk4', ...) to train"
        )


def _held_inputs(f: Velocity, x: torch.Tensor, times: torch.Tensor) -> list[torch.Tensor]:
    """``x``, the times and the tensors and module parameters ``f`` holds (``_reached``) that
    require grad: what a solve's gradients reach. Where the walk finds none, the leaves of the
    graph of one evaluation ``f(t1, x)`` with grad (parameters held deeper than the walk
    looks: a wrapper of a wrapper of the model, whose gradients were silently missing)."""
    found: list[torch.Tensor] = [x, times]
    for held in _reached(f, 2, set(), set()):
        found += [held] if isinstance(held, torch.Tensor) else list(held.parameters())
    needed = [t for t in found if t.requires_grad]
    if needed:
        return needed
    with torch.enable_grad():
        v = f(times[0].detach(), x.detach())  # (the solve's first point: t1, x)
    grad_fn = v.grad_fn if isinstance(v, torch.Tensor) else None
    leaves = (getattr(node, "variable", None) for node in nodes(grad_fn)) if grad_fn else ()
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.requires_grad]


def _diverged(
    fn: str, solver: str, x: torch.Tensor, batch_dims: int, error: AssertionError
) -> ValueError | None:
    """The error to raise where torchdiffeq's adaptive solvers stopped on a state that is not
    finite ("underflow in dt": its error norm was ``nan``; "non-finite values in state"),
    naming the samples of ``x`` at fault if some are, else ``f``; ``None`` for other
    assertions. They step the whole batch together: one diverged sample stopped every one."""
    if not any(what in str(error) for what in ("underflow in dt", "non-finite values")):
        return None
    bad = ~x.isfinite().reshape(x.shape[:batch_dims].numel(), -1).all(-1)
    if bool(bad.any()):
        samples = bad.nonzero().flatten().tolist()
        shown = ", ".join(map(str, samples[:8])) + (", ..." if len(samples) > 8 else "")
        where = f"x has nan or inf in samples (flattened batch index) [{shown}]"
    else:
        where = "f(t, z) or its divergence became nan or inf along the solve"
    return ValueError(
        f"{fn}: the {solver!r} solve stopped ({error}): {where}. An adaptive solver steps the "
        "whole batch together, so one sample that is not finite stops every sample: drop or "
        "replace it, or use a fixed-step solver (solver='rk4', options={'step_size': ...}), "
        "which leaves the other samples' results alone"
    )


def _sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DTensor (an FSDP2-sharded parameter)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def _module_of(f: object) -> nn.Module | None:
    """The module whose parameters ``f`` uses: ``f`` itself, or the module a bound method
    belongs to, also inside ``functools.partial`` (zuko's ``FFJTransform`` hands its velocity
    on as ``partial(self.f, c=c)``); ``None`` for other callables."""
    while isinstance(f, functools.partial):
        f = f.func
    owner = attribute(f, "__self__")
    owner = f if owner is None else owner  # (not `or`: a module without submodules is falsy)
    return owner if isinstance(owner, nn.Module) else None


def _lost_to_adjoint(f: object, module: nn.Module) -> list[str]:
    """What ``f`` holds that requires grad through tensors other than ``module``'s parameters,
    by name: a partial's arguments (zuko hands its velocity on as ``partial(self.f, c=c)``),
    the plain attributes (also in lists, tuples, dicts) and buffers of ``module``'s
    submodules (``self.context = encoder(y)``, a hypernetwork's weights), and what those and
    ``f``'s and each submodule class's ``forward`` reach (``_reached``: a context in a
    ``SimpleNamespace`` or dataclass, a ``forward`` replaced by a closure over it, a global
    context or encoder the code reads). ``odeint_adjoint`` differentiates with respect to the
    module's parameters only: such a tensor's gradient, and its sources', would be lost
    silently; so would the parameters of a module reached that is not a submodule. A tensor
    computed from the module's own parameters alone (the legacy ``weight_norm``'s ``weight``,
    set by its pre-hook) is not lost; one computed from an input that required grad (an
    activation a forward kept as ``self.h``) is named too."""
    own = {id(p) for p in module.parameters()}
    mine = {id(m) for m in module.modules()}
    held: list[tuple[str, Any]] = []
    while isinstance(f, functools.partial):
        held += [(f"argument {i} of the partial", a) for i, a in enumerate(f.args)]
        held += [(f"keyword {k!r} of the partial", a) for k, a in f.keywords.items()]
        f = f.func
    if f is not module:  # a bound method: the globals and closure of its function
        held.append(("what f reads", attribute(f, "__func__") or f))
    for name, m in module.named_modules():
        where = f"{type(m).__name__}{f' ({name})' if name else ''}"
        held += [(f"attribute {k!r} of {where}", v) for k, v in vars(m).items() if k != "_buffers"]
        held += [(f"buffer {k!r} of {where}", v) for k, v in m._buffers.items()]
        if not isinstance(m, torch.jit.ScriptModule):  # (compiled: no Python code to read;
            # its class's ``forward`` descriptor raised AttributeError, until audit29)
            held.append((f"what {type(m).__name__}.forward reads", type(m).forward))
    seen: set[int] = set()
    return [  # (in a list, tuple or dict too: self.contexts = [encoder(y)])
        what for what, v in held if any(_lost(r, own) for r in _reached(v, 2, seen, mine))
    ]


def _differentiates_others(
    f: Any, x: torch.Tensor, times: torch.Tensor, module: nn.Module
) -> bool | None:
    """Whether ``f(t, z)``, evaluated at the solve's ends ``times`` (its changes to state put
    back: buffers, random numbers, its modules' plain values), differentiates into a leaf
    that requires grad other than ``module``'s parameters and ``z``: what ``odeint_adjoint``
    would lose. ``_lost_to_adjoint`` names what ``f`` holds that could be; this says whether
    ``f`` uses it (a frozen feature net read under ``no_grad``, a submodule's back-reference
    to its parent, an EMA copy kept in a list: held, not differentiated, were refused) and
    finds what is held deeper than it looks. ``None`` where an evaluation raises (the refusal
    by what ``f`` holds stands, or the solve reports the error). The times are detached: the
    adjoint gives them their gradients (torchdiffeq's time VJPs), so a learned end time
    (FFJORD's ``train_T``, ``T = sqrt_end_time ** 2``), reached through ``t``, is not lost
    (it was refused)."""
    own = {id(p) for p in module.parameters()}
    z = x.detach().requires_grad_(True)
    try:
        with unchanged(f, z), torch.enable_grad():
            outputs = [f(t, z) for t in times.detach()]
    except Exception:
        return None
    own.add(id(z))
    return any(
        not isinstance(y, torch.Tensor) or (y.grad_fn is not None and not _from(y, own))
        for y in outputs
    )


def _check_adjoint(fn: str, f: Any, x: torch.Tensor, times: torch.Tensor) -> None:
    """Refuse ``adjoint=True`` where torchdiffeq's adjoint would fail or be wrong: ``f`` not a
    module or a bound method of one, parameters sharded by FSDP2, under the caller's
    ``torch.func`` transform, or ``f`` differentiating into tensors other than its module's
    parameters (``_lost_to_adjoint``, ``_differentiates_others``: their gradients would be
    lost silently)."""
    module = _module_of(f)
    if module is None:
        raise TypeError(
            f"{fn}: adjoint=True computes gradients for the parameters of f, so f must be an "
            f"nn.Module or a bound method of one, got {type(f).__name__}; wrap it in a module "
            "or use adjoint=False"
        )
    if any(_sharded(p) for p in module.parameters()):
        raise ValueError(
            f"{fn}: adjoint=True with parameters sharded by FSDP2 (fully_shard): torchdiffeq's "
            "adjoint concatenates the parameters with plain tensors, which sharded ones "
            "refuse; use adjoint=False (backpropagation through the solver)"
        )
    if peek_interpreter_stack() is not None:
        raise _under_transform(fn, "adjoint=True")
    lost = _lost_to_adjoint(f, module)
    others = _differentiates_others(f, x, times, module)
    if others:
        lost = lost or ["a tensor its output depends on (found in the autograd graph of f(t, z))"]
    elif others is not None:  # held, not differentiated: a frozen net under no_grad, a parent
        lost = []
    if lost:
        raise ValueError(
            f"{fn}: adjoint=True gives gradients to the parameters of f's module "
            f"({type(module).__name__}) only (torchdiffeq's adjoint_params), but f also reads "
            f"{', '.join(lost)}, which requires grad through other tensors (a context "
            "encoder's output, a hypernetwork's weights): their gradients would be lost "
            "silently; use adjoint=False (backpropagation through the solver), or make them "
            "parameters of the module"
        )


def _stopped(f: Any, x: torch.Tensor, t: torch.Tensor, batch_dims: int) -> list[int]:
    """The components of ``f(t, z)`` at ``z = x`` (indices into the flattened event) that have
    no autograd path from ``z`` because ``f`` stops it (``_Stops``: computed under
    ``torch.no_grad()`` or ``torch.inference_mode()``, a sampling wrapper's, flow_matching's
    ``CFGScaledModel``, or detached), although their values change with ``z`` (at ``z + h
    u``, a small random step): every method takes such a value for a constant (its terms of
    the divergence 0). A component constant in ``z`` (``ones_like(z) * t``) is not stopped,
    nor a piecewise constant one made by comparisons, integer casts or quantisation under
    grad (``(z > 0).to(z.dtype)``: derivative 0 is right there): a stopped value moves
    about equally at ``z + h u`` and ``z - h u`` (``v(z + h u) - v ≈ v - v(z - h u) ≠ 0``, a
    first-order change) at some sample, a piecewise constant one jumps on one side only
    (a sample near a boundary: 0 elsewhere). Autograd's derivative along ``u`` (``J u``, by
    a reverse pass of a reverse pass) is 0 at every sample for a stopped component.
    Evaluated with its changes to state put back, the bindings of ``f``'s closure too (an
    evaluation counter, ``nonlocal nfe``, a number or a tensor); none where an evaluation
    raises (the solve ran it: not this check's error)."""
    z = x.detach().clone().requires_grad_(True)
    cells = _closure_cells(f)
    try:
        with unchanged(f, z), torch.inference_mode(False), torch.enable_grad():
            with _Stops() as stops:
                v = f(t, z)
            if not stops.seen or not isinstance(v, torch.Tensor) or v.shape != z.shape:
                return []
            if not v.is_floating_point():
                return []
            u = torch.randn(z.shape, generator=torch.Generator().manual_seed(0)).to(z)
            along = _along(v, z, u)
            if along is None:  # a backward pass that is not differentiable: cannot tell
                return []
            dead = (along == 0).flatten(batch_dims).flatten(0, -2).all(0)
            if not bool(dead.any()):
                return []
            step = 1e-3 * (1 + float(z.detach().abs().max()))
            ahead, behind = f(t, z.detach() + step * u), f(t, z.detach() - step * u)
            if not all(isinstance(m, torch.Tensor) and m.shape == v.shape for m in (ahead, behind)):
                return []
            rise, fall = ahead.detach() - v.detach(), v.detach() - behind.detach()
            moves: torch.Tensor = (rise != 0) & ((rise - fall).abs() <= (rise + fall).abs() / 4)
            changed = moves.flatten(batch_dims).flatten(0, -2).any(0)
    except Exception:
        return []
    finally:
        for cell, value in cells:
            cell.cell_contents = value
    return (dead & changed).nonzero().flatten().tolist()


def _along(v: torch.Tensor, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    """Autograd's derivative of ``v`` along ``u`` (``J u``, shaped like ``v``): the reverse
    pass of the reverse pass ``J^T r`` with respect to ``r``: 0 where a stop cut the path.
    ``None`` where ``v``'s graph holds a custom ``autograd.Function``, whose backward pass
    need not be differentiable (guided-diffusion's legacy checkpoint recomputes its block
    and returns gradients without a graph: ``J u`` silently lacks that path): unknown."""
    none = torch.zeros_like(v)
    if not v.requires_grad:
        return none
    if any(isinstance(node, BackwardCFunction) for node in nodes(v.grad_fn)):
        return None
    r = torch.zeros_like(v, requires_grad=True)
    (back,) = torch.autograd.grad(v, z, r, create_graph=True, allow_unused=True)
    if back is None or not back.requires_grad:
        return none
    (along,) = torch.autograd.grad(back, r, u, allow_unused=True)
    return none if along is None else along


def _closure_cells(f: Any) -> list[tuple[Any, Any]]:
    """The cells of ``f``'s closure (a partial's or bound method's function's) with what
    they hold: an evaluation counter (a number or a tensor) the check's evaluations rebind."""
    f = getattr(f, "func", f)
    f = getattr(f, "__func__", f)
    cells = getattr(f, "__closure__", None) or ()
    out = []
    for cell in cells:
        try:
            value = cell.cell_contents
        except ValueError:  # (an empty cell)
            continue
        out.append((cell, value))
    return out


# the dynamics' evaluations watched for a stop (a recording engine's first one runs f on a
# tensor that requires no grad, where a ``detach`` stops nothing)
_WATCHED = 2

# the ops that read a tensor off its autograd graph
_OFF_GRAPH = {
    torch.Tensor.detach,
    torch.detach,
    torch.Tensor.data.__get__,  # type: ignore[attr-defined]  # (a property read off the class)
    torch.Tensor.item,
    torch.Tensor.tolist,
}


class _Stops(TorchFunctionMode):
    """Notes whether ``f`` stops the gradient of a tensor that requires grad (``seen``): an op
    on one under ``torch.no_grad()`` or ``torch.inference_mode()``, or one of ``_OFF_GRAPH``
    on any floating tensor (forward mode's state, and an adjoint's forward solve, require no
    grad: a ``z.detach()`` there was not seen; ``_stopped`` then looks with grad).
    An op under grad that has no derivative (a comparison, an integer cast, ``bucketize``,
    ``quantize_per_tensor``) is not a stop: its value is piecewise constant in ``z``."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        off = func in _OFF_GRAPH
        if not self.seen and (not torch.is_grad_enabled() or off):
            leaves = tree_leaves((args, kwargs))
            self.seen = any(
                isinstance(a, torch.Tensor) and (a.requires_grad or (off and a.is_floating_point()))
                for a in leaves
            )
        return func(*args, **kwargs)


def _lost(held: torch.Tensor | nn.Module, own: set[int]) -> bool:
    """Whether a tensor requires grad through tensors other than ``own`` (by ``id``), or a
    module has a parameter that requires grad outside ``own``."""
    if isinstance(held, torch.Tensor):
        return held.requires_grad and not _from(held, own)
    return any(p.requires_grad and id(p) not in own for p in held.parameters())


def _reached(value: Any, depth: int, seen: set[int], mine: set[int]) -> Iterator[Any]:
    """The tensors and the modules (other than ``mine``, by ``id``) that ``value`` holds: the
    leaves of a list, tuple or dict, and, ``depth`` levels down, what a function names (its
    closure, defaults and the globals its code reads), a partial's function and arguments, a
    bound method's object and a plain object's attributes (``_contents``, ``_attributes``).
    Each object once across calls sharing ``seen``; classes and Python modules not looked
    into."""
    for leaf in tree_leaves(value):
        if id(leaf) in seen or isinstance(leaf, (type, ModuleType)):
            continue
        seen.add(id(leaf))
        if isinstance(leaf, torch.Tensor) or (isinstance(leaf, nn.Module) and id(leaf) not in mine):
            yield leaf
        elif depth and not isinstance(leaf, nn.Module):
            inner = _contents(leaf) if callable(leaf) else _attributes(leaf)
            for v in inner:
                yield from _reached(v, depth - 1, seen, mine)


def _from(t: torch.Tensor, own: set[int]) -> bool:
    """Whether every leaf that ``t``'s autograd graph reaches (``t`` itself if a leaf) is
    among the tensors ``own`` (by ``id``)."""
    if t.grad_fn is None:
        return id(t) in own
    leaves = (getattr(node, "variable", None) for node in nodes(t.grad_fn))  # AccumulateGrad's
    return all(leaf is None or id(leaf) in own for leaf in leaves)


def _solver_under_transform(fn: str, error: RuntimeError) -> ValueError | None:
    """The error to raise for ``error``, raised by torchdiffeq's own code (not ``f``'s) inside
    the caller's ``torch.func`` transform; ``None`` elsewhere.

    Inside ``vmap`` (an ensemble of flows by ``functional_call`` over stacked parameters, or
    a ``vmap`` over stacks of inputs) every solver failed at its first write, the initial
    state into a solution tensor made unbatched (``solution[0] = y0``): PyTorch's "vmap:
    inplace arithmetic ... is not possible", which names no way out. Inside ``grad`` or
    ``jacrev`` the fixed-grid solvers (``"rk4"``, ``"euler"``, ``"midpoint"``) run, with the
    gradients of backpropagation through them; the adaptive ones failed in torchdiffeq's
    ``autograd.Function`` without ``setup_context``.

    >>> _solver_under_transform("log_likelihood", RuntimeError("f's own")) is None
    True
    """
    if peek_interpreter_stack() is None or not _raised_in_torchdiffeq(error):
        return None
    return _under_transform(fn, "PyTorch: '" + str(error).splitlines()[0].split(". ")[0] + "'")


def _under_transform(fn: str, why: str) -> ValueError:
    """The refusal of a solve inside the caller's ``torch.func`` transform, ``why`` said:
    under ``vmap`` what runs instead (a batch dimension more, a loop), under the others the
    fixed-grid solvers without the adjoint (whose ``requires_grad_`` they refuse)."""
    if any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters()):
        return ValueError(
            f"{fn}: torchdiffeq's solvers cannot run inside torch.func.vmap: they write the "
            f"states into a solution tensor they make unbatched ({why}); for one f over "
            "stacks of inputs, pass the stack as one more batch dimension (batch_dims=2, or "
            "the stack flattened into the batch), and for an ensemble of flows, call it for "
            "each member in a Python loop"
        )
    return ValueError(
        f"{fn}: inside a torch.func transform (grad, jacrev, jvp) torchdiffeq runs only its "
        "fixed-grid solvers (solver='rk4', 'euler' or 'midpoint' with options={'step_size': "
        "...}) with adjoint=False: its adaptive solvers use an autograd.Function without "
        f"setup_context, and the adjoint calls requires_grad_ ({why}); or take the gradients "
        "with torch.autograd outside the transform"
    )


def _raised_in_torchdiffeq(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback outside PyTorch is torchdiffeq's
    (its solver, not ``f`` it evaluates)."""
    frames = traceback.extract_tb(error.__traceback__)
    outside = [f.filename for f in frames if not f.filename.startswith(_TORCH_DIR)]
    return bool(outside) and f"{os.sep}torchdiffeq{os.sep}" in outside[-1]


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _torchdiffeq(fn: str) -> tuple[ModuleType, tuple[str, ...]]:
    """``torchdiffeq`` and its solvers' names, imported when a solve needs them."""
    try:
        import torchdiffeq
        from torchdiffeq._impl.odeint import SOLVERS
    except ImportError as error:
        raise ImportError(
            f"{fn}: torchdiv.flows solves ODEs with torchdiffeq, which is not installed; "
            "install the extra: pip install 'torchdiv[ode]' (or pip install torchdiffeq)"
        ) from error
    return torchdiffeq, tuple(SOLVERS)


def _sampling(
    fn: str,
    f: Any,
    x: Any,
    batch_dims: int,
    method: str,
    num_probes: int | None,
    probe: str | None,
    probes: torch.Tensor | None,
    generator: torch.Generator | None,
    chunk_size: int | None,
) -> _trace.Sampling | None:
    """Check the options of the dynamics; for a stochastic method, the probes of the solve
    (drawn here, once, unless given). ``None`` for an exact method. Probes made under
    ``torch.inference_mode()`` (given, or drawn for dynamics made there) are cloned into
    normal ones: a training solve saves them for its backward pass, which refused them
    ("Inference tensors cannot be saved for backward")."""
    check_callable(fn, f)
    check_initialized(fn, f)
    check_input(fn, x, batch_dims)
    check_method(fn, method, FLOW_METHODS)
    check_chunk_size(fn, chunk_size)
    if method not in STOCHASTIC_METHODS:
        check_exact_options(fn, method, num_probes, generator, probe, probes)
        return None
    if probe is None and probes is None and method in _SKETCHING:
        probe = "gaussian"  # see _SKETCHING
    s = _trace.sampling(fn, x, batch_dims, method, num_probes, probe, probes, generator)
    if s.probes is None:  # drawn as draw_probes draws them: at least float32, then x's dtype
        dtype = torch.promote_types(x.dtype, torch.float32)
        count = num_vectors(method, s.num_probes)
        v = draw(s.probe, count, x, batch_dims, s.generator, dtype, fn).to(x.dtype)
        s = _trace.Sampling(fn, method, s.num_probes, s.probe, v, None)
    if s.probes is not None and s.probes.is_inference():
        with torch.inference_mode(False):
            s = replace(s, probes=s.probes.clone())
    return s


class AugmentedDynamics(nn.Module):
    r"""The dynamics ``d/dt [z, Delta] = [f(t, z), -div f(t, z)]`` for ``torchdiffeq``.

    The state is the tuple ``(z, Delta)``: ``z`` shaped like ``x``, ``Delta`` of shape
    ``(num_terms,) + x.shape[:batch_dims]``, one row per divergence term (one for the exact
    methods; for the estimators, the terms whose mean is the estimate: see the module
    docstring); with one term, ``Delta`` may also be shaped like the batch or the batch and a
    trailing 1 (FFJORD's ``(B, 1)``); other shapes raise (``torchdiffeq`` would cut the terms
    by them and hand each sample others' terms). The probes are drawn once, here, and every
    evaluation uses them, so one instance is one solve's noise; draw new ones (a new
    instance) for the next solve.
    ``f`` is registered as a submodule when it is an ``nn.Module``; the parameters of the
    module of a bound method (``flow.transform.f``, also inside ``functools.partial``) are the
    dynamics' ``parameters()`` too, read from the module at every call: ``odeint_adjoint``
    finds the parameters the module has at the solve. Any other callable (a lambda) leaves
    the dynamics without parameters, and ``odeint_adjoint`` then gives none of them a
    gradient, silently: pass them as ``odeint_adjoint(..., adjoint_params=...)``.

    Args:
        f: velocity field ``f(t, z) -> dz/dt`` shaped like ``z`` (``t`` a 0-dim tensor); its
            samples must be independent (see ``torchdiv.check_batch_independence``).
        x: a tensor shaped like the state ``z`` (batch and event), for the probes.
        batch_dims: number of leading batch dimensions of ``x``.
        method: as in ``torchdiv.divergence``.
        num_probes: as in ``torchdiv.divergence``.
        probe: as in ``torchdiv.divergence``.
        probes: as in ``torchdiv.divergence``: drawn by ``torchdiv.draw_probes``, they replace
            ``probe``/``generator``.
        generator: as in ``torchdiv.divergence``.
        chunk_size: as in ``torchdiv.divergence``.

    Raises:
        TypeError, ValueError: as ``torchdiv.divergence`` for the options; when called, if
            ``f(t, z)`` is not a tensor shaped like ``z`` with its dtype, or the state is not
            the pair ``(z, Delta)`` with ``Delta`` shaped as above.

    Examples:
        >>> from torchdiffeq import odeint
        >>> A = torch.tensor([[0.5, 1.0], [0.0, -2.0]], dtype=torch.float64)
        >>> x = torch.randn(3, 2, dtype=torch.float64)
        >>> dynamics = AugmentedDynamics(lambda t, z: z @ A.T, x)
        >>> times = torch.tensor([1.0, 0.0], dtype=torch.float64)  # from t1 = 1 back to t0 = 0
        >>> z, delta = odeint(dynamics, dynamics.initial_state(x), times)
        >>> delta[-1]  # integral of div f from t0 to t1: log p(x) = log p0(z[-1]) - delta[-1]
        tensor([[-1.5000, -1.5000, -1.5000]], dtype=torch.float64)
    """

    _owner: nn.Module | None  # a bound method's module (``named_parameters``)

    def __init__(
        self,
        f: Velocity,
        x: torch.Tensor,
        *,
        batch_dims: int = 1,
        method: str = "auto",
        num_probes: int | None = None,
        probe: str | None = None,
        probes: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.sampling = _sampling(
            "AugmentedDynamics",
            f,
            x,
            batch_dims,
            method,
            num_probes,
            probe,
            probes,
            generator,
            chunk_size,
        )
        self.f, self.batch_dims, self.method, self.chunk_size = f, batch_dims, method, chunk_size
        owner = _module_of(f)
        # a bound method's module, for odeint_adjoint's parameters (``named_parameters``): not
        # a submodule, which would make a module that keeps its dynamics its own descendant
        object.__setattr__(self, "_owner", owner if owner is not f else None)
        self._register_owner_parameters()
        self.fn = "AugmentedDynamics"  # named in errors; log_likelihood's own dynamics: its name
        # log_likelihood's adjoint: its call was one forward of f's DDP modules, so the adjoint
        # solve's evaluations in the caller's backward pass run them bare (_core.ddp.one_forward)
        self.announced = False
        s = self.sampling
        self.num_terms = 1 if s is None else num_terms(method, s.num_probes)
        # whether one of f's first ``_WATCHED`` evaluations stopped a gradient (``_Stops``:
        # ``log_likelihood`` then checks which components of f it left without one)
        self.stops, self._watched = False, 0

    def _register_owner_parameters(self) -> None:
        """Registers the parameters the bound method's module has now as ``owner_0``,
        ``owner_1``, ... (those of an earlier call dropped): a module holding the dynamics
        (a wrapper, torchdyn's ``DEFunc``, ``nn.Sequential``) reads its children's
        registered parameters, not their ``named_parameters``, and without them gave
        ``odeint_adjoint`` none of the module's parameters: no gradient, silently."""
        if self._owner is None:
            return
        for name in [n for n in self._parameters if n.startswith("owner_")]:
            del self._parameters[name]
        for i, p in enumerate(self._owner.parameters()):
            self.register_parameter(f"owner_{i}", p)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """Those of ``f``, a module, or of the module of a bound method (as ``owner_i``),
        read from the module at every call: ``odeint_adjoint`` differentiates with respect
        to them. Copies of a bound method's parameters made when the dynamics was built went
        stale when the module's parameters were replaced later (a swapped layer,
        ``to_empty`` from the meta device, ``.double()`` under
        ``overwrite_module_params_on_conversion``): the new ones got no gradient, silently.
        (A module holding the dynamics reads the registered ones: those of the dynamics'
        last call, or of its construction.)"""
        self._register_owner_parameters()
        return super().named_parameters(prefix, recurse, remove_duplicate)

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, zeros)``: the state at the data end, ``Delta`` of shape
        ``(num_terms,) + x.shape[:batch_dims]``."""
        return x, x.new_zeros((self.num_terms, *x.shape[: self.batch_dims]))

    @CompiledCodeEager()
    def forward(
        self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(t, z), -terms of div f(t, z))`` from the engine's evaluations of ``f``. Under
        inference mode (an ``odeint`` in ``torch.inference_mode()``) outside it, as
        ``torchdiv.divergence`` (``outside_inference``): the engines that hand over to plain
        autograd found no graph there, and gave a zero divergence."""
        forget_plans(self.f)  # TorchScript in f: run as written (``_core.script``)
        z, shape = self._state(state)
        v, terms = outside_inference(self._evaluated, t, z)
        return v, terms if terms.shape == shape else terms.reshape(shape)

    def _state(self, state: Any) -> tuple[torch.Tensor, torch.Size]:
        """``z`` and the shape of ``Delta`` the terms are returned in: ``initial_state``'s
        ``(num_terms,) + batch``, or for one term the batch's alone or with a trailing 1
        (FFJORD's ``(B, 1)``). Another shape is refused: ``torchdiffeq`` flattens a tuple
        state and cuts the outputs by its shapes, so a ``(B, m)`` ``Delta`` where the terms are
        ``(m, B)`` gave each sample a mean of other samples' terms, silently."""
        pair = isinstance(state, (tuple, list)) and len(state) == 2
        if not pair or not all(isinstance(s, torch.Tensor) for s in state):
            got = type(state).__name__
            got = f"a {got} of {len(state)}" if isinstance(state, (tuple, list)) else got
            raise TypeError(
                f"{self.fn}: the state must be the pair (z, Delta) of tensors that "
                f"initial_state(x) makes, got {got}"
            )
        z, delta = state
        probes = None if self.sampling is None else self.sampling.probes
        if probes is not None and z.shape != probes.shape[1:]:
            raise ValueError(
                f"{self.fn}: the probes were drawn for x of shape {tuple(probes.shape[1:])}, "
                f"but the state z has shape {tuple(z.shape)}; make the dynamics with an x "
                "shaped like the state (one probe set per sample)"
            )
        batch = z.shape[: self.batch_dims]
        shape = torch.Size((self.num_terms, *batch))
        if delta.shape == shape or (
            self.num_terms == 1 and delta.shape in (batch, torch.Size((*batch, 1)))
        ):
            return z, delta.shape
        raise ValueError(
            f"{self.fn}: Delta (the state's second tensor) must have the shape of "
            f"initial_state(x)[1], (num_terms,) + z.shape[:batch_dims] = {tuple(shape)}, got "
            f"{tuple(delta.shape)}: torchdiffeq would cut the terms by Delta's shape and give "
            "each sample other samples' terms; start from dynamics.initial_state(x) and "
            "average Delta over its first dimension"
        )

    def _evaluated(self, t: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def velocity(z: torch.Tensor) -> torch.Tensor:
            watched = self._watched < _WATCHED and not self.stops
            with _Stops() if watched else contextlib.nullcontext() as stops:
                v: torch.Tensor = call_f(self.f, t, z)  # check_velocity raises if it is not
            if stops is not None:
                self._watched, self.stops = self._watched + 1, stops.seen
            check_velocity(self.fn, v, z)
            return v

        try:
            with one_forward(bare=True) if self.announced else contextlib.nullcontext():
                return self._dynamics(velocity, z)
        except Exception as exc:
            options = {"f": self.f, "evaluate": velocity, "x": z, "batch_dims": self.batch_dims}
            final = final_error(self.fn, "f(t, z)", exc, {**options, "method": self.method})
            if final is None:
                raise
            raise final from (None if isinstance(exc, BatchInteractionError) else exc)

    def _dynamics(
        self, velocity: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sampling is None:
            trace, v = self._exact(velocity, z)
            terms = trace[None].to(z.dtype)
        else:
            terms, v = _stochastic.terms_of_function(
                velocity, z, self.batch_dims, self.sampling, self.chunk_size, self.f
            )
        if not torch.is_grad_enabled():  # a solve without autograd keeps no graph
            v, terms = v.detach(), terms.detach()
        return v, -terms

    def _exact(
        self, velocity: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(div f, f)`` at ``z``: the structured engine where it runs (``"auto"``, and
        ``"structured"``, which raises otherwise), else the generic ones."""
        trace, v = _exact.diagonal_and_output(
            self.fn,
            velocity,
            z,
            self.batch_dims,
            self.method,
            self.chunk_size,
            trace=True,
            where=site(self.f),
        )
        return trace.reshape(z.shape[: self.batch_dims]), v


@overload
def log_likelihood(
    f: Velocity,
    x: torch.Tensor,
    t0: float | torch.Tensor,
    t1: float | torch.Tensor,
    base_log_prob: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_dims: int = 1,
    method: str = "auto",
    num_probes: int | None = None,
    generator: torch.Generator | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "dopri5",
    return_stderr: Literal[False] = False,
    probe: str | None = None,
    probes: torch.Tensor | None = None,
    chunk_size: int | None = None,
    adjoint: bool = False,
    options: dict[str, Any] | None = None,
) -> torch.Tensor: ...


@overload
def log_likelihood(
    f: Velocity,
    x: torch.Tensor,
    t0: float | torch.Tensor,
    t1: float | torch.Tensor,
    base_log_prob: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_dims: int = 1,
    method: str = "auto",
    num_probes: int | None = None,
    generator: torch.Generator | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "dopri5",
    return_stderr: Literal[True],
    probe: str | None = None,
    probes: torch.Tensor | None = None,
    chunk_size: int | None = None,
    adjoint: bool = False,
    options: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def log_likelihood(
    f: Velocity,
    x: torch.Tensor,
    t0: float | torch.Tensor,
    t1: float | torch.Tensor,
    base_log_prob: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_dims: int = 1,
    method: str = "auto",
    num_probes: int | None = None,
    generator: torch.Generator | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "dopri5",
    return_stderr: bool,
    probe: str | None = None,
    probes: torch.Tensor | None = None,
    chunk_size: int | None = None,
    adjoint: bool = False,
    options: dict[str, Any] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


@outside_inference_mode
@reported("log_likelihood", call="f(t, z)")
def log_likelihood(
    f: Velocity,
    x: torch.Tensor,
    t0: float | torch.Tensor,
    t1: float | torch.Tensor,
    base_log_prob: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_dims: int = 1,
    method: str = "auto",
    num_probes: int | None = None,
    generator: torch.Generator | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "dopri5",
    return_stderr: bool = False,
    probe: str | None = None,
    probes: torch.Tensor | None = None,
    chunk_size: int | None = None,
    adjoint: bool = False,
    options: dict[str, Any] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Log-density of ``x`` under the flow of ``f``: a CNF, or a diffusion model's PF-ODE.

    ``f(t, z)`` carries base samples at ``t0`` (density ``exp(base_log_prob)``) to data at
    ``t1``. The ODE ``dz/dt = f(t, z)`` is solved from ``z(t1) = x`` back to ``t0`` together
    with ``dDelta/dt = -div f(t, z)``, ``Delta(t1) = 0``, and

        log p(x) = base_log_prob(z(t0)) - Delta(t0)
                 = base_log_prob(z(t0)) - integral_{t0}^{t1} div f(t, z(t)) dt.

    ``t0 > t1`` works too (diffusion models: noise at ``t0 = T``, data at ``t1 = 0``). With a
    stochastic ``method``, the probes are drawn once for the solve (from ``generator``), so
    the result is an unbiased estimate up to the solver's error, and its standard error comes
    from the integrated terms (see the module docstring). For bits per dimension:
    ``-log_likelihood(...) / (n * log 2)`` plus the data's dequantisation offset.

    Args:
        f: velocity field ``f(t, z) -> dz/dt`` shaped like ``z``, ``t`` a 0-dim tensor of
            ``x``'s dtype; for ``adjoint=True`` an ``nn.Module`` or a bound method of one
            (``flow.transform.f``, also inside ``functools.partial``). Samples must be
            independent.
        x: data points, a floating tensor with ``batch_dims`` leading batch dimensions and any
            event shape (vectors, images ``(B, C, H, W)``, ...).
        t0: the base time (of ``base_log_prob``): a float or a 0-dim tensor.
        t1: the data time (of ``x``): a float or a 0-dim tensor (``t1 == t0`` gives
            ``base_log_prob(x)``; times that require grad, learned, their first
            derivatives there too, ``d/dt1 log p = -grad base_log_prob(x) . f(t1, x) -
            div f(t1, x)``, by one Euler step of length 0: second ones in the times, not).
        base_log_prob: ``z -> log p_{t0}(z)`` per sample, shape ``x.shape[:batch_dims]``.
        batch_dims: number of leading batch dimensions of ``x``.
        method: ``"auto"``, ``"structured"``, ``"forward"``, ``"reverse"`` (exact
            divergence, as in ``torchdiv.divergence``: ``"auto"`` takes the structured
            engine where it runs, a few forward passes for MLP fields) or ``"hutchinson"``,
            ``"hutch++"``, ``"xtrace"``.
        num_probes: Jacobian-vector products per sample and function evaluation (stochastic).
        generator: ``torch.Generator`` for the probes (same state, same result).
        rtol: the solver's relative tolerance (adaptive solvers).
        atol: the solver's absolute tolerance (adaptive solvers).
        solver: a ``torchdiffeq`` method: ``"dopri5"``, ``"rk4"``, ``"euler"``, ...
        return_stderr: also return the standard error of the estimate.
        probe: probe distribution, ``"rademacher"``, ``"gaussian"`` or ``"sphere"``; default
            Rademacher for Hutchinson, Gaussian for Hutch++ and XTrace (repeated Rademacher
            sketch vectors make their estimate jump between evaluations, stalling adaptive
            solvers on small events).
        probes: probes drawn by ``torchdiv.draw_probes(x, num_probes, method=...)``, used for
            the whole solve, instead of ``probe``/``generator``.
        chunk_size: at most this many Jacobian-vector products in flight (bounds memory).
        adjoint: gradients by ``torchdiffeq.odeint_adjoint`` (memory independent of the
            number of steps) instead of backpropagation through the solver; gradients reach
            ``x`` and ``f``'s parameters (not other tensors ``f`` closes over, nor the
            arguments a ``functools.partial`` binds). Under
            ``DistributedDataParallel`` the adjoint's evaluations in the backward pass run the
            wrapped module bare (this call was its one forward: buffers broadcast once).
            First derivatives only: a backward pass with ``create_graph=True`` raises.
        options: ``torchdiffeq`` solver options, e.g. ``{"step_size": 0.05}`` for ``"rk4"``.

    Returns:
        ``log p(x)`` of shape ``x.shape[:batch_dims]``, dtype and device of ``x``; with
        ``return_stderr``, ``(value, stderr)``: stderr 0 for the exact methods, ``nan`` for
        one term (no spread to measure: Hutchinson with one probe, Hutch++ with 3 products,
        XTrace with 2), not differentiable.

    Raises:
        ImportError: ``torchdiffeq`` is not installed (``pip install 'torchdiv[ode]'``).
        TypeError, ValueError: bad arguments (named, with shapes), ``f(t, z)`` not shaped
            like ``z``, ``base_log_prob(z)`` not of shape ``x.shape[:batch_dims]``; ``f``'s
            output computed from ``z`` under ``no_grad``/``inference_mode`` (no autograd path
            from ``z``: every divergence 0; checked where a solve's terms are all exactly 0).
        BatchInteractionError: ``f`` mixes samples (see ``torchdiv.jacobian``).

    Examples:
        >>> import math
        >>> A = torch.tensor([[0.5, 1.0], [0.0, -2.0]], dtype=torch.float64)
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> normal = lambda z: -0.5 * (z**2).sum(-1) - math.log(2 * math.pi)
        >>> logp = log_likelihood(lambda t, z: z @ A.T, x, 0.0, 1.0, normal, rtol=1e-9, atol=1e-9)
        >>> z0 = x @ torch.linalg.matrix_exp(-A).T  # x = exp(A) z0: log p = log N(z0) - tr(A)
        >>> torch.allclose(logp, normal(z0) + 1.5)
        True
    """
    fn = "log_likelihood"
    ode, solvers = _torchdiffeq(fn)
    s = _sampling(fn, f, x, batch_dims, method, num_probes, probe, probes, generator, chunk_size)
    check_callable(fn, base_log_prob, "base_log_prob")
    times = torch.stack([check_time(fn, "t1", t1, x), check_time(fn, "t0", t0, x)])
    check_positive(fn, "rtol", rtol)
    check_positive(fn, "atol", atol)
    check_solver(fn, solver, solvers)
    check_flag(fn, "return_stderr", return_stderr)
    check_flag(fn, "adjoint", adjoint)
    check_options(fn, options)
    if adjoint:
        _check_adjoint(fn, f, x, times)
    dynamics = AugmentedDynamics(
        f, x, batch_dims=batch_dims, method=method, probes=None if s is None else s.probes,
        chunk_size=chunk_size,
    )  # fmt: skip
    dynamics.fn, dynamics.announced = fn, adjoint
    state = dynamics.initial_state(x)
    if times[0] != times[1] and x.numel():  # one synchronisation per solve; else no motion
        odeint = ode.odeint_adjoint if adjoint else ode.odeint
        try:
            z, delta = odeint(dynamics, state, times, rtol=rtol, atol=atol, method=solver,
                              options=options)  # fmt: skip
        except AssertionError as error:  # torchdiffeq's checks of the whole state and step
            diverged = _diverged(fn, solver, x, batch_dims, error)
            if diverged is None:
                raise
            raise diverged from error
        except RuntimeError as error:  # torchdiffeq's own code under the caller's torch.func
            transformed = _solver_under_transform(fn, error)
            if transformed is None:
                raise
            raise transformed from error
        state = z[-1], delta[-1]
        graphless = solver == "scipy_solver" and not adjoint and torch.is_grad_enabled()
        held = _held_inputs(f, x, times) if graphless else []
        if held:  # no graph: a backward pass through it raises (the adjoint's has its own)
            state = _NoGradients.apply(*state, *held)  # type: ignore[no-untyped-call]
        # every term exactly 0 (one synchronisation per solve): a stop-gradient field's look;
        # or a stop met in the solve's first evaluations (a component under no_grad)
        zero = not bool(state[1].detach().ne(0).any())
        with saves_apart():  # (its backward passes inside a caller's checkpoint region)
            stopped = _stopped(f, x, times[0], batch_dims) if zero or dynamics.stops else []
        if stopped and not zero:
            raise ValueError(
                f"{fn}: components {stopped[:8]} of f(t, z) (indices into its flattened event) "
                "do not depend on z through autograd (computed under torch.no_grad() or "
                "torch.inference_mode(), or detached), though their values change with z: every "
                "method takes them for constants, so their terms of the divergence were left "
                "out of log p(x). Evaluate them with grad enabled in f"
            )
        if stopped:
            raise ValueError(
                f"{fn}: f(t, z) does not depend on z through autograd (its output was computed "
                "under torch.no_grad() or torch.inference_mode(), or detached), though its values "
                "change with z: every method takes such a value for a constant, so the divergence "
                "came out 0 and log p(x) would be base_log_prob of the transported points alone. "
                "Evaluate the model with grad enabled in f (a sampling wrapper such as "
                "flow_matching's CFGScaledModel runs it under no_grad: write the guidance without)"
            )
    elif x.numel() and times.requires_grad and torch.is_grad_enabled():
        # no interval, but a learned time has a derivative there: one Euler step of zero
        # length (value x, 0) gives it, d/dt1 log p = -grad base . f(t1, x) - div f(t1, x)
        step = times[1] - times[0]
        velocity, change = dynamics(times[0].detach(), state)
        state = x + step * velocity, step * change
    base = base_log_prob(state[0])
    check_log_prob(fn, base, x, batch_dims)
    value, stderr = _trace.summary(state[1])
    logp = base.to(x.dtype) - value
    if adjoint and logp.requires_grad:
        logp = _FirstOrderOnly.apply(logp)  # type: ignore[no-untyped-call]
    if not return_stderr:
        return logp
    return logp, (torch.zeros_like(stderr) if s is None else stderr)
