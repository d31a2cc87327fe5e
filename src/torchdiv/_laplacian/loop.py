"""The Laplacian by a loop of backward passes: what PINN codes write, and the fastest way at
one to three inputs when the function's ops are small.

One forward pass of ``f`` with a graph, one backward pass per output component for the
per-sample gradients (kept differentiable), then one backward pass per output component and
input coordinate, keeping the diagonal entry: ``1 + m (1 + n)`` passes, no ``vmap``, no
recording. The Taylor engine's fixed costs per op (recording ``f``, replaying it with rules in
Python) are paid back by its fewer passes from about three inputs on, earlier where the ops
are large (``bench/laplacian_small.py``; ``"auto"``'s rule is ``_laplacian.methods.loops_for``);
below that, and for functions it has no rules for, this loop is the faster exact method.

With ``Settings.batched`` the ``n`` second-level passes of an output are one backward pass
with the ``n`` unit cotangents batched (``autograd.grad(..., is_grads_batched=True)``):
``1 + 2m`` passes, each op's backward called once for all ``n`` directions. Where ``f`` is
many small ops (a Chebyshev KAN at batch 256: 18 elementwise ops and small ``einsum``s)
that per-op cost dominates and one batched pass is 10-25% faster than ``n`` plain ones;
where its few ops are large (a tanh FNN's matrix products) it is up to 8% slower
(``_laplacian.methods.BATCHED_WORK``). A backward pass that cannot be batched (an op
PyTorch's batching cannot run, a custom backward that reads values) raises, and that output
runs the plain passes.

As in the other nested-autodiff methods, ``f`` runs with attention on the math backend and
under ``torchdiv._core.modes.SafeDerivatives(3, forward_mode=False)``: the result's own gradient
is a third derivative, which PyTorch gets wrong for fused layer norm and ``cdist``; the
linear-algebra ops it gets wrong only through forward mode are left alone. With
``Settings.plain`` (the loop ``"auto"`` remembers) ``f`` runs under them only where its
autograd graph shows an op they change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch._C._autograd import _top_saved_tensors_default_hooks
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.checkpoint import CheckpointError

from torchdiv._core.basis import accumulated
from torchdiv._core.checks import event_numel, out_of_memory
from torchdiv._core.mixing.watch import check_graph, watched
from torchdiv._core.modes import (
    UNDER_MODES,
    SafeDerivatives,
    changed_nodes,
    dual_nodes,
    math_attention,
    plain_derivatives,
    saves_apart,
    subclass_like,
    svd_formula_unstable,
)
from torchdiv._core.subclass import attributes_of
from torchdiv._core.tie import detached
from torchdiv._core.walk import Found, batched_vjp, nodes, search, vjp
from torchdiv._exact.autograd import (
    SECOND_DERIVATIVES,
    graphs_kept,
    refuse_once_differentiable,
)
from torchdiv._exact.state import Once
from torchdiv._laplacian.chain import chain_laplacian

Function = Callable[[torch.Tensor], torch.Tensor]
Check = Literal["watch", "graph"] | None  # how the loop checks f for sample mixing


@dataclass
class Settings:
    """How the loop runs at one structure of ``f`` and ``x`` (``"auto"`` keeps one per
    structure, ``_laplacian.methods``): ``batched``, its second-level passes batched;
    ``plain``, ``f`` evaluated outside ``math_attention`` and ``SafeDerivatives``, whose
    dispatch costs a few microseconds per op of ``f`` (5-10% of the loop at two inputs and
    batch 256). The ops they change leave their own nodes in the autograd graph
    (``GUARDED``, the fused attention kernels); a plain evaluation whose graph holds one is
    discarded and ``f`` evaluated again under the modes, and ``plain`` is turned off for the
    calls that follow. The first plain evaluation at a structure (``tried`` still false) is
    watched (``_exact.state.Once``), so that one run again starts from the state it found: the
    same function (dropout masks, buffers), and ``f``'s state changed once. Later ones are not
    (a watch costs ~10 us an op): an op that shows only at a later call (``f`` branching on
    ``x``'s values) makes ``f`` run twice, its state changed twice. ``chain``: a Laplacian
    alone (no Jacobian, every coordinate) is taken by the forward Laplacian along ``f``'s
    graph where that is a chain of products and listed activations (``_laplacian.chain``,
    read at every call; 0.7-0.85x the recipe's passes at two or three inputs, batch 256)
    instead of the backward passes. ``chain_only``: the loop was remembered for that chain
    alone (a frozen chain beyond ``"auto"``'s loop rule, ``_laplacian.methods.chained``): where
    it gives way, ``chain`` is turned off, and later calls take the Taylor engine again."""

    batched: bool = False
    plain: bool = False
    tried: bool = False
    chain: bool = False
    chain_only: bool = False


# the autograd nodes of the ops whose derivatives the loop's SafeDerivatives changes (those of
# REPLACEMENTS right in reverse over reverse are left alone); the fused attention kernels that
# math_attention avoids show as ``fused``. ``GUARDED_PLAIN``: where its passes take PyTorch's
# derivatives as for plain tensors (``_lookup``), without det's, which the mode leaves there
GUARDED = changed_nodes(3, forward_mode=False)
GUARDED_PLAIN = changed_nodes(3, forward_mode=False, plain=True)


def _lookup(y: torch.Tensor, x: torch.Tensor, batched: bool, plain: bool) -> Found:
    """``search`` of ``y = f(x)``'s graph; for a ``plain`` evaluation, for the nodes that send
    it to ``SafeDerivatives``: ``GUARDED``, but not ``det``'s where ``SafeDerivatives`` would
    keep it: the loop's backward passes take PyTorch's derivatives as for plain tensors
    (second-level passes not ``batched``, no dispatch mode on the stack, ``x`` no tensor
    subclass: ``plain_derivatives``; the loop never runs inside ``torch.func``'s transforms,
    which refuse its ``requires_grad_``) and PyTorch's SVD formula is not off at its matrices
    (``svd_formula_unstable``). Under a caller's dispatch mode, or batched, a plain
    evaluation's ``det`` had ``nan`` third derivatives (parameter gradients of the Laplacian);
    at equal singular values below ``100 eps``, ``nan`` second ones (rev-merges26b). A second
    and third walk only where ``GUARDED`` shows."""
    if not plain:
        return search(y, x)
    if fwAD._current_level >= 0:  # the caller's tangents: one order more, through forward mode
        return search(y, x, GUARDED + dual_nodes(3))
    found = search(y, x, GUARDED)
    if found.guarded and not batched and plain_derivatives(x) and not _unstable_det(y, x):
        return search(y, x, GUARDED_PLAIN)
    return found


def _unstable_det(y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a ``det`` node of ``f``'s graph (``y``'s, down to ``x``) is at a matrix where
    PyTorch's own derivatives are off (``svd_formula_unstable``)."""
    return any(
        type(node).__name__.startswith(UNDER_MODES)
        and svd_formula_unstable(node._saved_A, node._saved_result)
        for node in nodes(y.grad_fn, x.grad_fn)
    )


def grad_of_grad(
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
    check: Check = None,
    settings: Settings | None = None,
) -> torch.Tensor:
    """Every sample's Laplacian of every output component, shape ``f(x).shape``. Its backward
    passes' saves kept apart from a checkpoint region's around the call (``saves_apart``:
    under a selective checkpoint PyTorch refused a second backward pass through the region)."""
    with saves_apart():
        return _looped(f, x, batch_dims, check, settings or Settings(), jacobian=False)[2]


def value_grad_laplacian(
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
    check: Check = None,
    settings: Settings | None = None,
    coordinates: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``f(x)``, every sample's Jacobian ``(N, m, n)`` (the loop's first level) and Laplacian (shape
    ``f(x).shape``), summed over the flat event indices ``coordinates`` only (``None``: all; the
    Jacobian has every column either way). The loop's one evaluation of ``f`` is checked for sample
    mixing (``BatchInteractionError``) as ``check`` says: ``"watch"``, watched op by op
    (``torchdiv._core.mixing.watch.watched``); ``"graph"``, its autograd graph searched for a
    train-mode batch norm (``torchdiv._core.mixing.watch.check_graph``); ``None``, not at all.

    They keep a graph exactly when the caller has grad mode on and ``f(x)`` depends on something
    that requires grad (``x`` itself, parameters, closed-over tensors)."""
    settings = settings or Settings()
    with saves_apart():  # (as grad_of_grad's)
        y, rows, laplacian, create_graph = _looped(f, x, batch_dims, check, settings, coordinates)
    samples, n = x.shape[:batch_dims].numel(), event_numel(x, batch_dims)
    jacobian = torch.stack(rows, 1) if rows else x.new_zeros(samples, 0, n)
    if not create_graph:
        y, jacobian = detached(y), detached(jacobian)
    return y, jacobian, laplacian


def _looped(
    f: Function,
    x: torch.Tensor,
    batch_dims: int,
    check: Check,
    settings: Settings,
    coordinates: list[int] | None = None,
    jacobian: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, bool]:
    """``f(x)``, the rows of every sample's Jacobian ``(N, n)``, one per output component
    (none unless ``jacobian``), the Laplacian (over ``coordinates``, ``None``: all) and whether
    they keep a graph."""
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        # torch.Tensor's own methods, not a subclass's overrides (PINA's LabelTensor's read
        # labels that its tensors made by ops lack); x's attributes given back to the view
        if x.requires_grad:
            x_in = attributes_of(x, torch.Tensor.view_as(x, x))
        else:
            x_in = attributes_of(x, torch.Tensor.requires_grad_(torch.Tensor.detach(x), True))
        once = Once(x, several=settings.plain and not settings.tried)
        batched = settings.batched
        y = _evaluated(once(f), x_in, batch_dims, check, safe=not settings.plain, batched=batched)
        # a tensor subclass y (a DTensor): the passes' cotangents are too, and PyTorch takes
        # det's formula for subclasses from them (its argument plain: kept under the modes)
        subclass = not batched and subclass_like(y)
        found = _lookup(y, x_in, batched or subclass, settings.plain or subclass)
        settings.tried = True
        if found.guarded or (settings.plain and found.fused):
            settings.plain = False
            y = _evaluated(once(f), x_in, batch_dims, check, True, batched or subclass)
            found = search(y, x_in)
        refuse_once_differentiable(found, y, x_in)
        if check == "graph":
            empty = x.dim() == batch_dims
            check_graph(None, y, x_in, batch_dims, empty, found.batch_norms)
        create_graph = outer and found.others
        one_axis = batch_dims == 1 and coordinates is None  # (chain_laplacian: x is (N, n))
        # (a chain_only plan is for a frozen f: one whose call needs a graph, trained through
        # what the structure key does not read, a functional_call's dict, leaves it: 1.8x; at
        # one input a trained call's two passes beat the chain's graph: 1.1x, a 1-D Poisson
        # residual's step, against 0.6-0.75x frozen)
        single = event_numel(x, batch_dims) == 1
        chain = settings.chain and not ((settings.chain_only or single) and create_graph)
        if chain and one_axis and not jacobian and not found.unchained:
            laplacian = chain_laplacian(y, x_in, create_graph)
            if laplacian is not None:
                return y, [], laplacian.to(x.dtype).reshape(y.shape), create_graph
        if settings.chain_only and not _debugging(x):  # the chain gave way for f itself:
            settings.chain = False  # later calls take the Taylor engine
        try:
            with graphs_kept(found.custom, SECOND_DERIVATIVES):
                rows, laplacian = _loop(y, x_in, batch_dims, create_graph, batched, coordinates)
        except CheckpointError as error:
            if settings.plain:  # (f evaluated as the checkpoint recomputes it: not ours)
                raise
            raise CheckpointError(f"{CHECKPOINTED_REPLACEMENT} ({error})") from error
    return y, rows, laplacian, create_graph


# f evaluated under SafeDerivatives, a non-reentrant checkpoint in it recomputing its region in
# the backward passes with PyTorch's ops: another number of saved tensors (qmc27)
CHECKPOINTED_REPLACEMENT = (
    "torchdiv: f runs an op that the loop of backward passes evaluates by its own equivalent "
    "(a norm, layer_norm, det, attention on the math backend: PyTorch's derivatives of it are "
    "wrong at the order taken, or missing) inside a "
    "non-reentrant torch.utils.checkpoint, which recomputes its region in the backward passes "
    "with PyTorch's op; use method='taylor' (or 'auto'), or take the op out of the checkpoint"
)


def _debugging(x: torch.Tensor) -> bool:
    """Whether this call runs under a mode the chain gives way to whatever ``f`` is (anomaly
    detection, saved-tensor hooks, autocast): a later call without it takes the chain again
    (until rev-left24 one such call turned the chain off for good at that structure)."""
    hooks = _top_saved_tensors_default_hooks(True)
    return (
        torch.is_anomaly_enabled() or hooks is not None or torch.is_autocast_enabled(x.device.type)
    )


def _evaluated(
    f: Function, x: torch.Tensor, batch_dims: int, check: Check, safe: bool, batched: bool = False
) -> torch.Tensor:
    """``f(x)``, watched for sample mixing if ``check`` says so, under the modes if ``safe``
    (``batched``: for second-level passes batched, or cotangents a tensor subclass,
    ``SafeDerivatives``')."""
    if not safe:
        return watched(f, x, batch_dims) if check == "watch" else f(x)
    with math_attention(), SafeDerivatives(3, "method='taylor'", False, batched=batched):
        return watched(f, x, batch_dims) if check == "watch" else f(x)


def _loop(
    y: torch.Tensor,
    x: torch.Tensor,
    batch_dims: int,
    create_graph: bool,
    batched: bool = False,
    coordinates: list[int] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The loop itself, on ``y`` computed from the tensor ``x`` that requires grad: the Jacobian's
    rows and the Laplacian, over the flat event indices ``coordinates`` (``None``: all; second-level
    passes are taken along those only). Written as lean as PINN codes write it (no reshape, slice,
    sum or stack in the graph where none is needed): at two inputs and a small batch, each costs a
    few percent."""
    samples, n = x.shape[:batch_dims].numel(), event_numel(x, batch_dims)
    m = y.shape[batch_dims:].numel()
    chosen = range(n) if coordinates is None else coordinates
    outputs = y if m == 1 else y.reshape(samples, m)
    rows, columns = [], []
    for i in range(m):
        gradient = _grad(outputs if m == 1 else outputs[:, i], x, create_graph=True)
        if gradient is None:
            rows.append(x.new_zeros(samples, n))
            columns.append(x.new_zeros(samples))
            continue
        gradient = _flat(gradient, samples, n)
        rows.append(gradient)
        several = batched and len(chosen) > 1
        total = _batched_trace(gradient, x, create_graph, coordinates) if several else None
        if total is None:
            for j in chosen:
                second = _grad(gradient[:, j], x, create_graph=create_graph)
                if second is not None:
                    total = accumulated(total, _flat(second, samples, n)[:, j])
        columns.append(x.new_zeros(samples) if total is None else total.to(x.dtype))
    if m == 1:
        return rows, columns[0].reshape(y.shape)
    return rows, (torch.stack(columns, 1) if columns else x.new_zeros(samples, 0)).reshape(y.shape)


def _batched_trace(
    gradient: torch.Tensor,
    x: torch.Tensor,
    create_graph: bool,
    coordinates: list[int] | None = None,
) -> torch.Tensor | None:
    """``Σ_j ∂gradient_j / ∂x_j`` per sample (``gradient``: ``(N, n)``; ``j`` over the flat
    event indices ``coordinates``, ``None``: all) from one backward pass with the ``k`` unit
    cotangents batched, or ``None`` where that pass cannot be batched (or ``gradient`` has no
    graph): the caller then takes ``k`` plain passes."""
    samples, n = gradient.shape
    if not gradient.requires_grad:
        return None
    eye = torch.eye(n, dtype=gradient.dtype, device=gradient.device)
    if coordinates is not None:
        eye = eye[coordinates]
    k = len(eye)
    try:
        second = batched_vjp(gradient, x, eye.unsqueeze(1).expand(k, samples, n), create_graph)
    except RuntimeError as error:  # an op without a batching rule for its backward
        if out_of_memory(error):
            raise
        return None
    if second is None:  # f is linear in x: its gradient has a graph, but not to x
        return gradient.new_zeros(samples)
    second = second.reshape(k, samples, n)
    if coordinates is not None:  # (k, samples, k): entry (c, b, c) is ∂²/∂x_j² at j = c's
        second = second[..., coordinates]
    return second.diagonal(dim1=0, dim2=2).sum(-1)


def _flat(t: torch.Tensor, samples: int, n: int) -> torch.Tensor:
    """``t`` as ``(samples, n)``, itself if it has that shape already."""
    return t if t.shape == (samples, n) else t.reshape(samples, n)


def _grad(out: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor | None:
    """``∂(Σ out)/∂x`` (a VJP with ones), or ``None`` where ``out`` does not depend on ``x``."""
    if not out.requires_grad:
        return None
    return vjp(out, x, torch.ones_like(out), create_graph)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite, read off its sum: one reduction and one read
    (4 us at batch 256, against 13 us for ``isfinite().all()``, on a 2-core CPU). A NaN or
    infinite entry makes the sum NaN or infinite; a finite ``t`` whose sum overflows reads as
    not finite, which only sends the caller to its other exact method. A tensor without
    values (meta, ``FakeTensorMode``'s: shape-only tracing) reads as finite."""
    if t.device.type == "meta" or isinstance(t, FakeTensor):
        return True
    return math.isfinite(t.detach().sum().item())


def probed(
    f: Function, x: torch.Tensor, batch_dims: int, probes: torch.Tensor, check: Check = None
) -> torch.Tensor:
    """Hutchinson's ``(1/r) Σ_j v_jᵀ H v_j`` per sample and output component (shape
    ``f(x).shape``; ``probes``: ``(r,) + x.shape``) by backward passes only: one evaluation of
    ``f``, per output component its per-sample gradient ``g`` (kept differentiable), then per
    probe ``∂(g · v_j)/∂x · v_j``: ``1 + m (1 + r)`` passes. For an ``f`` that forward mode
    cannot run (``grid_sample``), where the Hessian-vector products by forward over reverse
    raise. ``f`` runs under the loop's modes (``_evaluated``), checked for sample mixing as
    ``check`` says (``None``: the caller's recording watched it at this call)."""
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        x_in = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
        y = _evaluated(f, x_in, batch_dims, check, safe=True)
        found = search(y, x_in)
        refuse_once_differentiable(found, y, x_in)
        create_graph = outer and found.others
        samples, n = x.shape[:batch_dims].numel(), event_numel(x, batch_dims)
        m = y.shape[batch_dims:].numel()
        outputs = y.reshape(samples, m)
        vs = probes.reshape(len(probes), samples, n)
        columns = []
        for i in range(m):
            total = None
            with graphs_kept(found.custom, SECOND_DERIVATIVES):
                gradient = _grad(outputs[:, i], x_in, create_graph=True)
            if gradient is not None:
                gradient = _flat(gradient, samples, n)
                for v in vs:
                    second = _grad(gradient * v, x_in, create_graph)
                    if second is not None:
                        total = accumulated(total, (_flat(second, samples, n) * v).sum(-1))
            columns.append(x.new_zeros(samples) if total is None else total.to(x.dtype))
    out = torch.stack(columns, 1) if columns else x.new_zeros(samples, 0)
    return (out / len(probes)).reshape(y.shape)
