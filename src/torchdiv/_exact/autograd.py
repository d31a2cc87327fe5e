"""Autograd-graph engines: Jacobian rows of every sample by VJPs through a built graph.

``GraphJacobian`` serves the graph-form API (``graph_jacobian``: the caller built ``y`` from
``x``) and the function form's fallbacks: plain autograd runs functions that ``torch.func``
cannot (legacy ``autograd.Function`` without ``setup_context``, ops that cannot be vmapped
in the forward pass). ``RerunJacobian``, the last resort, evaluates ``f`` afresh for every
vector, for graphs that can be walked only once or whose backward cannot be batched
(guided-diffusion's checkpoint, an ``autograd.Function`` that re-runs its block in
``backward`` and then drops its inputs). See NOTE [Batching over basis vectors] in
``_basis`` for the batching.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint as _checkpoint
from torch._C._functorch import peek_interpreter_stack

from torchdiv._core.basis import as_blocks, basis, batched
from torchdiv._core.checks import event_numel, out_of_memory
from torchdiv._core.crossover import LOOP_ROWS
from torchdiv._core.ddp import Peers
from torchdiv._core.mixing.watch import check_graph
from torchdiv._core.modes import (
    INNER_ORDER,
    InnerBackwards,
    SafeDerivatives,
    backward_passes_order,
    changed_nodes,
    math_attention,
)
from torchdiv._core.script import cached
from torchdiv._core.walk import (
    ADJOINT,
    COMPILED,
    EXPANDED,
    SCAN,
    WHILE_LOOP,
    Found,
    nodes,
    once_differentiable_functions,
    search,
    vjp,
)
from torchdiv._exact.chain import Step, chain, unit_products
from torchdiv._exact.chain import products as chain_products
from torchdiv._exact.chain import trace as chain_trace
from torchdiv._exact.state import Changes


class GraphSpent(RuntimeError):
    """A graph that one walk used up: walking it again failed (a custom ``backward`` that
    frees what it needs, or a graph already freed)."""


# graph nodes whose backward ``torch.func.vmap`` of ``autograd.grad`` batches wrong (PyTorch
# 2.13: ``_cdist_backward``'s VJPs off by O(1) against one pass per cotangent; its legacy
# ``is_grads_batched`` is right): ``GraphJacobian`` batches them by the latter
VMAP_WRONG = frozenset({"CdistBackward0"})


class _Unbatchable(RuntimeError):
    """``GraphJacobian``'s batched backward passes raised (not for a lack of memory): one
    pass per cotangent stands in for them."""


class UnderTransform(RuntimeError):
    """Plain autograd asked to evaluate ``f`` under the caller's ``torch.func`` transform (an
    ensemble's ``vmap`` over stacked parameters): its backward passes there do not see the
    transform's batching, and gave zeros where ``x`` required grad (then no leaf copy of it
    was made, whose ``requires_grad_`` PyTorch refuses there: wrapfuzz32). A
    ``RuntimeError``: ``"auto"`` takes its next engine, ``torch.func``'s."""


class UndifferentiableBackward(RuntimeError):
    """A custom ``autograd.Function`` in ``f`` whose ``backward`` returned gradients without a
    graph while it was asked for one: gradients of the products would silently lack its part
    (with respect to the parameters, in a training loss)."""


SECOND_DERIVATIVES = "a Laplacian's second derivatives"  # what the Laplacian's refusals name
# the culprit's name (its node's, less "Backward") of DTensor.from_local, which tensor parallelism
# calls on every sharded module's input: see ``_DifferentiableBackwards.message``
DTENSOR_INPUT = "_FromTorchTensor"


class _DifferentiableBackwards:
    """While torchdiv's products are built with ``create_graph=True``, watch every custom
    ``autograd.Function`` that ``y`` was computed through, and note (``culprits``) each whose
    ``backward`` receives gradients that carry a graph but returns some without one (a legacy
    gradient checkpoint that re-runs its block and calls ``autograd.grad`` without
    ``create_graph``). A ``backward`` given constant gradients is not judged: nothing tells a
    constant answer from a dropped graph there; ``GraphJacobian`` gives every one gradients
    with a graph (``_marked`` cotangents). Nor is a zero answer: a piecewise-constant
    op's (a step, a rounding ``Function`` whose ``backward`` returns ``zeros_like``), whose
    gradient's derivative is zero too (refused, its Laplacian and the gradients of its
    divergence were right: 0 and the rest)."""

    def __init__(self, nodes: list[Any]) -> None:
        self.nodes = nodes
        self.handles: list[Any] = []
        self.culprits: list[str] = []

    def __enter__(self) -> _DifferentiableBackwards:
        for node in self.nodes:
            self.handles.append(node.register_hook(self._hook(node)))
        return self

    def _hook(self, node: Any) -> Callable[..., None]:
        def check(grad_inputs: tuple[Any, ...], grad_outputs: tuple[Any, ...]) -> None:
            if any(isinstance(g, torch.Tensor) and g.requires_grad for g in grad_outputs) and any(
                isinstance(g, torch.Tensor) and not g.requires_grad and bool(g.any())
                for g in grad_inputs
            ):
                self.culprits.append(node.name().removesuffix("Backward"))

        return check

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def guarded(self, out: torch.Tensor, once: list[str], y: torch.Tensor) -> torch.Tensor:
        """``out`` as it is, or, if a culprit was seen or ``once`` names the ``Function``s of
        the graph whose ``backward`` is ``@once_differentiable``, ``out`` whose backward pass
        raises ``UndifferentiableBackward``: its values are right, its gradients would not
        be. A result left without a graph by such a backward gets one that raises, from the
        tensors ``y``'s graph reaches that require grad (the parameters): on a leaf of its
        own, ``autograd.grad(loss, params, allow_unused=True)`` never reached it and gave
        zeros."""
        if once:
            message = once_differentiable_error("gradients of this result", once)
        elif self.culprits:
            message = self.message("the gradients of this result (its values are right)")
        else:
            return out
        reached = [] if out.requires_grad else _reached_leaves(y)
        held = out if out.requires_grad or reached else out.detach().requires_grad_(True)
        return _refused(held, message, *reached)

    def message(self, what: str) -> str:
        """Why ``what`` (derivatives through the ``culprits``) is refused, and the way out."""
        if DTENSOR_INPUT in self.culprits:
            return (
                "torchdiv: f computes through DTensor.from_local (tensor parallelism: "
                "parallelize_module's ColwiseParallel, RowwiseParallel or SequenceParallel), "
                "whose backward drops the graph of the gradient where it changes its placement "
                "(a Partial gradient made Replicate: PyTorch's _FromTorchTensor.backward): "
                f"{what} would silently miss its part, so they are refused. Pass x as a DTensor "
                "on the module's mesh (distribute_tensor(x, mesh, [Replicate()]), or [Shard(0)]) "
                "to the function form's exact methods (method='auto'; the stochastic methods "
                "and the graph form take plain tensors only) where f's modules all take "
                "DTensors: they then redistribute it, which is differentiable twice; or run "
                "f's modules unsharded (DistributedDataParallel, FSDP2's fully_shard without "
                "tensor parallelism)"
            )
        names = ", ".join(sorted(set(self.culprits)))
        return (
            f"torchdiv: f computes through the custom autograd.Function {names}, whose "
            "backward returns gradients without a graph (as legacy gradient checkpoints do, "
            f"calling autograd.grad without create_graph): {what} would silently miss its "
            "part, so they are refused. Use torch.utils.checkpoint.checkpoint(..., "
            "use_reentrant=False) or no checkpoint, or make its backward differentiable"
        )


_UNWATCHED = contextlib.nullcontext()


def graphs_kept(custom: list[Any], what: str) -> contextlib.AbstractContextManager[None]:
    """Raise ``UndifferentiableBackward`` after the block if a custom ``autograd.Function``
    among ``custom`` (``Found.custom``) dropped the graph of gradients it was given in the
    block's backward passes (``_DifferentiableBackwards``): ``what``, the derivatives built on
    them, would be wrong (a Laplacian's second derivatives through DTensor.from_local were
    zero: values 0.2 off). Without any (the usual case), a context that does nothing: the
    watch's cost 1-3 us a call, once per output in ``probed``'s loop."""
    return _graphs_kept(custom, what) if custom else _UNWATCHED


@contextlib.contextmanager
def _graphs_kept(custom: list[Any], what: str) -> Iterator[None]:
    with _DifferentiableBackwards(custom) as watch:
        yield
    if watch.culprits:
        raise UndifferentiableBackward(watch.message(what))


@torch.compiler.disable(recursive=True)
def _refused(out: torch.Tensor, message: str, *reached: torch.Tensor) -> torch.Tensor:
    """``out`` (on the graph of ``reached`` too) whose backward pass raises
    ``UndifferentiableBackward(message)``; run eagerly where Dynamo traces the call: traced,
    the ``Function``'s raising ``backward`` was lost (a compiled loss whose ``f`` breaks the
    graph took parameter gradients through ``f``'s compiled graph twice: 100% off, no
    error)."""
    refused: torch.Tensor = _Refused.apply(out, message, *reached)
    return refused


def _marked(cotangents: torch.Tensor) -> torch.Tensor:
    """``cotangents`` with a graph (a leaf of their own), so that every custom ``Function``'s
    ``backward`` receives gradients that carry one and ``_DifferentiableBackwards`` judges it:
    given constant cotangents, one right at ``y`` went unjudged (normflows' residual block,
    ``x + g(x)`` with ``g`` from ``MemoryEfficientLogDetEstimator``, whose backward calls
    ``autograd.grad`` without ``create_graph``: the divergence came back without a graph and
    a loss's parameter gradients silently missed its part). Cotangents with a graph already
    (the caller's) are kept."""
    return cotangents if cotangents.requires_grad else cotangents.detach().requires_grad_(True)


def _unmarked(out: torch.Tensor, marker: torch.Tensor) -> torch.Tensor:
    """``out`` computed from ``_marked`` cotangents ``marker``, detached where its graph reaches
    no other leaf (a Jacobian that depends on no parameter comes back without a graph, as
    unmarked cotangents left it); the edge to ``marker`` is otherwise harmless."""
    others = any(getattr(node, "variable", marker) is not marker for node in nodes(out.grad_fn))
    return out if others else out.detach()


def _reached_leaves(y: torch.Tensor) -> list[torch.Tensor]:
    """The leaves requiring grad that ``y``'s graph reaches (its ``AccumulateGrad`` nodes'),
    each once."""
    return [node.variable for node in nodes(y.grad_fn) if hasattr(node, "variable")]


def once_differentiable_error(what: str, names: list[str]) -> str:
    """The message for ``what`` (a derivative) through the custom ``autograd.Function``s
    ``names``, whose ``backward`` is ``@once_differentiable`` or a compiled graph's."""
    if COMPILED in names:
        return (
            f"torchdiv: y was computed by a torch.compile'd graph, whose backward AOTAutograd "
            f"cannot differentiate again: {what} would silently miss its part (its backward "
            "returns constants), so they are refused. Use the function form (torchdiv."
            "divergence(model, x) with the compiled model: torchdiv traces the call), or "
            "compute y with the uncompiled module; in a compiled loss whose f breaks the "
            "graph (compiled apart), method='reverse' or 'forward', or f without the break "
            "(torchdiv breaks it itself at a pow of a tensor to a tensor exponent f holds, "
            "h[..., None] ** self.powers, which it runs eagerly: raise to Python numbers, "
            "torch.stack([h ** k for k in range(4)], -1))"
        )
    if EXPANDED in names:
        return (
            "torchdiv: f computes through torch's ExpandedWeights (call_for_per_sample_grads, "
            "Opacus's grad_sample_mode='ew'), whose backward writes each backward pass's "
            "per-sample gradients into grad_sample and is not differentiated again: torchdiv's "
            f"own passes would fill grad_sample and {what} would be wrong per sample, so they "
            "are refused. Take per-sample gradients of the loss by torch.func: "
            "vmap(grad(loss), in_dims=(None, 0))(params, x) with each sample as a batch of one "
            "(functional_call inside f; torchdiv's method='auto' runs there)"
        )
    if WHILE_LOOP in names:
        return (
            f"torchdiv: f runs torch.while_loop, whose backward (outside torch.compile) "
            f"differentiates its steps again without the forward's carries' graph: {what} would "
            "silently miss their part, so they are refused. Write the loop as a Python loop "
            "(for or while over its steps: differentiated through, and its Python condition "
            "watched for sample mixing at every call)"
        )
    if SCAN in names:
        return (
            f"torchdiv: f runs torch._higher_order_ops.scan, whose backward (outside "
            f"torch.compile) records no graph: {what} would silently miss its part, so they are "
            "refused. Write the scan as a Python loop over its steps (differentiated through)"
        )
    if ADJOINT in names:
        return (
            f"torchdiv: f solves an ODE by torchdiffeq's odeint_adjoint, whose backward (the "
            f"adjoint ODE, solved under no_grad) cannot be differentiated again: {what} would "
            "silently miss its part (it returns constants), so they are refused. Use "
            "torchdiffeq.odeint inside f (backpropagation through the solver's steps)"
        )
    return (
        f"torchdiv: f computes through the custom autograd.Function {', '.join(names)}, whose "
        f"backward is @once_differentiable: {what} would silently miss its part (its backward "
        "returns constants), so they are refused. Give it a backward written in differentiable "
        "torch ops (without @once_differentiable), or compute f without it"
    )


def refuse_once_differentiable(found: Found, y: torch.Tensor, x: torch.Tensor) -> None:
    """Raise ``UndifferentiableBackward`` if a second derivative of ``y`` with respect to ``x``
    would go through a custom ``autograd.Function`` whose ``backward`` is
    ``@once_differentiable`` (``found``: ``search``'s walk of ``y``'s graph; nothing more is
    walked when it holds no custom ``Function``), or whose ``backward`` drops the graph of
    the gradients it is given (``graphs_kept``, judged on one pass with ``_marked`` ones: the
    loop's first passes give a ``Function`` right at ``y`` constant ones, and the Laplacian
    through a backward computed under ``no_grad`` came out zero, silently)."""
    names = once_differentiable_functions(found.custom, y, x)
    if names:
        raise UndifferentiableBackward(once_differentiable_error(SECOND_DERIVATIVES, names))
    if found.custom and y.requires_grad:
        with graphs_kept(found.custom, SECOND_DERIVATIVES):
            vjp(y, x, _marked(torch.ones_like(y)), create_graph=True)


class _Refused(torch.autograd.Function):
    """The identity, whose backward raises ``UndifferentiableBackward`` with a message."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, message: str, *reached: torch.Tensor) -> torch.Tensor:
        ctx.message = message
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> tuple[None, ...]:
        raise UndifferentiableBackward(ctx.message)


def _custom_functions(y: torch.Tensor, x: torch.Tensor) -> list[Any]:
    """The custom ``autograd.Function`` nodes of ``y``'s graph above ``x`` (not ``x``'s
    producer nor its history, which the products never pass through: the graph forms walked
    an ODE solve's every earlier step at every evaluation until rev-scoresde20)."""
    return [
        node
        for node in nodes(y.grad_fn, x.grad_fn)
        if isinstance(node, torch.autograd.function.BackwardCFunction) and node is not x.grad_fn
    ]


_BATCH_NORM = "NativeBatchNormBackward"  # instance norm's node, a batch norm's
_NOTHING = contextlib.nullcontext()  # (no context: one object for every call, reentrant)


def _searched(
    y: torch.Tensor, x_in: torch.Tensor, guarded: tuple[str, ...] = ()
) -> tuple[Found, list[tuple[Step, Any]] | None]:
    """``walk.search(y, x_in, guarded)``, and the steps of ``y``'s graph where it is a chain
    (``_exact.chain``), whose walk then finds what the search would (an MLP's graph walked
    once, not twice, at every call of a small problem)."""
    found = Found()
    steps = chain(y, x_in, found, guarded)
    return (found, steps) if steps else (search(y, x_in, guarded), None)


@cached()
def _changed(order: int, forward_mode: bool) -> tuple[str, ...]:
    """The nodes of the ops ``SafeDerivatives`` changes at ``backward_passes_order``, searched
    for in a plain evaluation's graph; not ``NativeBatchNormBackward``, which batch norms in
    eval mode leave too (``_input_statistics`` tells them apart)."""
    return tuple(node for node in changed_nodes(order, forward_mode) if node != _BATCH_NORM)


def _input_statistics(batch_norms: list[Any]) -> bool:
    """Whether a plain evaluation's batch-norm nodes (``Found.batch_norms``) call for its
    evaluation again under ``SafeDerivatives``: one normalised by its input's statistics (in
    train mode, or without running statistics: an instance norm too), which the mode
    replaces at ``backward_passes_order`` (``_core.modes._batch_norm``, ``_instance_norm``);
    eval mode's affine map is left as it is. ``_saved_*``: attributes of the C++ node."""
    if not batch_norms or _BATCH_NORM not in changed_nodes(*backward_passes_order()):
        return False
    return any(node._saved_training or node._saved_running_mean is None for node in batch_norms)


class GraphJacobian:
    """``U @ J`` for ``y`` computed from ``x``, by ``autograd.grad`` batched over the vectors.

    The graph is retained between products and never freed, so the caller can still
    backpropagate through ``y`` afterwards.
    """

    blocks_are_rows = True

    def __init__(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        batch_dims: int,
        create_graph: bool,
        custom: list[Any] | None = None,
        batches: bool = True,
    ):
        """``custom``: the custom ``autograd.Function`` nodes of ``y``'s graph, if a walk of
        the caller's found them already; ``batches=False``: one backward pass per product."""
        self.y, self.x, self.batch_dims, self.create_graph = y, x, batch_dims, create_graph
        self.num_basis = event_numel(y, batch_dims)
        self.y_shape = y.shape
        self._peers = Peers(y, x.grad_fn)  # DDP or FSDP2 above x: see torchdiv._core.ddp
        self._custom = (
            [] if not create_graph else _custom_functions(y, x) if custom is None else custom
        )
        self._once = once_differentiable_functions(self._custom, y, x)
        if EXPANDED in self._once:  # refused before any pass writes grad_sample
            raise UndifferentiableBackward(once_differentiable_error("their gradients", [EXPANDED]))
        self._walked = False  # a pass went through, or a batched one raised (a walk's start)
        self._completed = False  # a pass went through
        # False once a batched pass raised that it cannot batch y's graph, or if not ``batches``
        self._batches = batches
        self._vmap_checked: bool | None = None  # ``_vmap_wrong``'s answer, once walked
        self.batch_norms: list[Any] | None = None  # the graph's, if of_function walked it
        self.guarded = False  # of_function: a plain evaluation shows (would) an op the mode changes
        # of_function: f took a backward pass with a graph under the caller's no_grad and was
        # evaluated again (``_evaluated``): "auto" keeps watching it (not ``Passed``)
        self.inner_again = False
        # of_function: torchdiv evaluated f itself, so a gradient hook f registers on a tensor
        # is refused (``refuse_gradient_hook``), and y's graph is a chain: its steps, which may
        # stand in for the engine (``_exact.chain``); a caller's graph (the graph form) may
        # hold hooks: the engine
        self.steps: list[tuple[Step, Any]] | None = None

    @classmethod
    def of_function(
        cls,
        f: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        batch_dims: int,
        plain: bool = False,
        own: bool = False,
        changes: Changes | None = None,
    ) -> GraphJacobian:
        """Evaluate ``y = f(x)`` with a graph; keep results differentiable only where needed.

        The products are built with ``create_graph=True`` exactly when the caller has grad mode
        on and ``y`` depends on a tensor that requires grad other than our own copy of ``x``
        (``x`` itself if it requires grad, parameters, closed-over tensors). Where they are
        and the graph holds a fused attention kernel (no double backward), ``f`` is evaluated
        once more with attention on the math backend (its state, a random generator, then
        moves twice).

        ``f`` runs under ``SafeDerivatives`` (``backward_passes_order``: order 3 under grad
        mode, whose results may be differentiated twice more), or, with ``plain``, outside it
        (its dispatch costs a few microseconds per op of ``f``: 3-10% of a tiny problem); a plain
        evaluation whose graph holds an op the mode changes (``changed_nodes``) is evaluated
        again under it (together with the fused kernel's, if any), and the engine is
        ``guarded``: the caller starts there next time (``torchdiv._taylor.mixing.Passed``).

        ``own``: ``x`` is the caller's leaf copy (``leaf``), made for this evaluation, on which
        ``f`` then runs as it is: a watch that follows ``x``'s samples (``_core.mixing``)
        follows them into ``f``, which it cannot through a copy made here.

        A ``guarded`` plain evaluation is made again with what it wrote put back (a train-mode
        batch norm's running statistics move once): before it, if ``changes`` (a watch's
        ``Changes``) noted its writes, so that the evaluation again starts from the caller's
        state and leaves it as one evaluation (a spectral norm's power iteration, which reads
        what it wrote, runs once); else after it (``written_once``: read one evaluation
        further). A safe evaluation that shows a batch norm by its input's statistics (the
        mode's composite) is ``guarded`` too: a plain one there would be made again.
        """
        outer_grad = torch.is_grad_enabled()
        y, x_in, inner = _evaluated(f, x, None, not plain, own, changes)
        found, steps = _searched(y, x_in, _changed(*backward_passes_order()) if plain else ())
        guarded = found.guarded or (plain and _input_statistics(found.batch_norms))
        fused = found.fused and outer_grad and found.others
        checkpointed = _checkpointed_attention(found.attention) if fused else None
        if guarded or fused:  # (fused attention kernels have no double backward)
            attention = math_attention() if fused else None
            if guarded and changes is not None:
                changes.undo_writes()
            again = guarded and changes is None
            with written_once(x) if again else contextlib.nullcontext():
                y, x_in, again_inner = _evaluated(f, x, attention, safe=True, own=own)
            inner = inner or again_inner
            found, steps = _searched(y, x_in)
            if checkpointed and checkpointed - set(found.attention):  # (f's: made anew)
                raise UndifferentiableBackward(CHECKPOINTED_ATTENTION)
        elif not plain:
            guarded = _input_statistics(found.batch_norms)
        engine = cls(y, x_in, batch_dims, outer_grad and found.others, found.custom)
        engine.batch_norms = found.batch_norms
        engine.guarded = guarded
        engine.inner_again = inner
        engine.steps = steps
        return engine

    def apply(self, cotangents: torch.Tensor) -> torch.Tensor:
        """VJPs: ``(k,) + y.shape`` cotangents -> ``(k,) + x.shape`` products."""
        out = None
        watch = _DifferentiableBackwards(self._custom)
        if self.y.requires_grad and not self._custom and self._peers.inert:  # (the usual case)
            out = self._vjps(cotangents)
        elif self.y.requires_grad:
            marked = _marked(cotangents) if self._custom else cotangents
            with self._peers.inner_backward(), watch:
                out = self._vjps(marked)
            if out is not None and marked is not cotangents:
                out = _unmarked(out, marked)
        if out is None:  # y does not depend on x: the Jacobian is zero
            return self.x.new_zeros((cotangents.shape[0], *self.x.shape), dtype=self.y.dtype)
        return self._peers.attach(watch.guarded(out, self._once, self.y))

    def _vjps(self, cotangents: torch.Tensor) -> torch.Tensor | None:
        """The products, ``None`` if ``y`` does not depend on ``x``: one backward pass per
        cotangent when there are at most ``LOOP_ROWS`` (a probe, or the rows of a 2-D
        event: a batched pass, measured with ``is_grads_batched``, cost more than a second one)
        or when the batched passes raised that they cannot batch ``y``'s graph (an op of its
        backward that ``vmap`` does not support: ``GroupNorm``'s on a channels-last tensor,
        ``NYI: querying is_contiguous inside of vmap``; then for every later call too), else
        one batched pass. Where custom ``Function``s are watched, the first product takes a
        pass of its own before the batched one: the watch's hooks see no graph on a batched
        pass's gradients (``is_grads_batched``'s legacy batched tensors report
        ``requires_grad=False``), so a ``backward`` that dropped it went unseen (the
        gradients of a divergence at D = 3 through one computed under ``no_grad``: 50% off).
        Where torchdiv evaluated ``f`` itself, nothing is watched or wrapped and ``y``'s graph
        is a chain (an MLP), all the products at once by its formulas instead, without the
        engine (``_exact.chain``)."""
        if self.steps and not self._custom and self._peers.inert:
            return chain_products(self.steps, cotangents, self.create_graph)
        products: list[torch.Tensor] = []
        if cotangents.shape[0] > LOOP_ROWS and self._batches:  # (``len``: Tensor.__len__'s Python)
            if self._custom:
                first = self._vjp(cotangents[0], batched=False)
                if first is None:
                    return None
                products, cotangents = [first], cotangents[1:]
            try:
                out = self._vjp(cotangents, batched=True)
                return out if out is None or not products else torch.cat([products[0][None], out])
            except _Unbatchable:  # (its custom backwards may have freed what they need)
                self._batches, self._walked = False, True
        for v in cotangents.unbind():
            product = self._vjp(v, batched=False)
            if product is None:
                return None
            products.append(product)
        return products[0][None] if len(products) == 1 else torch.stack(products)

    def _vjp(self, cotangents: torch.Tensor, batched: bool) -> torch.Tensor | None:
        out: torch.Tensor | None
        try:
            if batched:
                out = self._batched_vjp(cotangents)
            else:
                out = vjp(self.y, self.x, cotangents, self.create_graph)
        except (_Unbatchable, UndifferentiableBackward):  # (the latter its own message)
            raise
        except Exception as error:  # the same walk went through before: not the caller's
            if self._walked and not out_of_memory(error):
                raise GraphSpent(f"the graph of f(x) {self._spent()}: {error}") from error
            raise
        self._walked = self._completed = True
        return out

    def _spent(self) -> str:
        """What the walk before a failed one did: went through, or only raised batched (then
        the error may be the graph's own, an op without a derivative, or a custom backward's
        that freed what it needs)."""
        if self._completed:
            return "cannot be walked twice"
        return "raised in a batched backward pass and again one product at a time"

    def _batched_vjp(self, cotangents: torch.Tensor) -> torch.Tensor | None:
        """One backward pass for all ``(k,) + y.shape`` cotangents: ``torch.func.vmap`` of
        ``autograd.grad`` in the usual case (nothing for the DDP/FSDP2 hooks or the custom
        ``Function`` watch to do, not compiling), else where ``vmap`` raises (an op without a
        batching rule that its loop cannot stand in for), ``autograd.grad``'s own
        ``is_grads_batched``, whose legacy ``vmap`` costs more (a tanh MLP D -> 64 -> 64 -> D
        at batch 256, D = 8-64, one thread: ``torch.func.vmap`` took 0.7-0.96x its time).
        Raises ``_Unbatchable`` where that raises too, but not for a lack of memory."""
        usual = not self._custom and self._peers.inert and not torch.compiler.is_compiling()
        if usual and not self._vmap_wrong():
            try:
                found = batched(self._product, cotangents)  # () where y does not depend on x
                return found[0] if found else None
            except RuntimeError as error:  # (a lack of memory would meet the fallback too)
                if out_of_memory(error):
                    raise
        try:
            (out,) = torch.autograd.grad(
                self.y,
                self.x,
                cotangents,
                retain_graph=True,
                create_graph=self.create_graph,
                is_grads_batched=True,
                allow_unused=True,
            )
        except RuntimeError as error:  # (NotImplementedError included)
            if out_of_memory(error):
                raise
            raise _Unbatchable(str(error)) from error
        return out

    def _vmap_wrong(self) -> bool:
        """Whether ``y``'s graph holds a node whose backward ``torch.func.vmap`` batches wrong
        (``VMAP_WRONG``: ``_cdist_backward``, its VJPs off by O(1), found in a caller's
        graph, ``graph_jacobian``, or ``check_batch_independence``'s plain evaluation: where
        torchdiv evaluates ``f`` itself, ``SafeDerivatives`` replaces ``cdist``); then the
        batched pass is ``is_grads_batched``'s, right for it. Walked once per engine."""
        if self._vmap_checked is None:
            found = nodes(self.y.grad_fn, self.x.grad_fn)
            self._vmap_checked = any(type(n).__name__ in VMAP_WRONG for n in found)
        return self._vmap_checked

    def _product(self, cotangent: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One VJP as a tuple for ``vmap``: empty where ``y`` does not depend on ``x``."""
        out = vjp(self.y, self.x, cotangent, self.create_graph)
        return () if out is None else (out,)

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start..stop-1`` of every sample's Jacobian, shape ``(k, N, n)``: a chain's
        from its top layer's rows where ``unit_rows`` can, else the products of a basis."""
        rows = self.unit_rows(start, stop)
        if rows is None:
            rows = self.apply(basis(start, stop, self.y, self.batch_dims))
        return as_blocks(rows, self.batch_dims)

    def unit_rows(self, start: int, stop: int) -> torch.Tensor | None:
        """The products of the unit cotangents ``e_start .. e_{stop-1}``, ``(k, N, n)``, by
        the chain's formulas from its top layer's rows (``_exact.chain.unit_products``: no
        basis, and no product with it, a third of a D -> 64 -> 64 -> D MLP's flops), where
        ``apply`` would take the chain too (torchdiv evaluated ``f``: nothing watched or
        wrapped) and the top layer's rows are an event's (one batch dimension); else
        ``None``."""
        if not (self.steps and self.batch_dims == 1 and self._usual()):
            return None
        return unit_products(self.steps, start, stop, self.y, self.create_graph)

    def _usual(self) -> bool:
        """Whether ``apply`` takes its usual case: this very engine (not one that re-runs
        ``f``), no custom ``Function`` watched, no DDP/FSDP2 peers, ``y`` depending on ``x``
        (nothing to watch or wrap)."""
        return (
            type(self) is GraphJacobian
            and not self._custom
            and self._peers.inert
            and self.y.requires_grad
        )

    def trace(self) -> torch.Tensor | None:
        """Every sample's trace, ``(N,)``, by the chain's cyclicity (``_exact.chain.trace``:
        one product for all rows, no basis) where ``y``'s graph is a chain of at most two
        activations above an ``(N, n)`` ``x`` (``n >= 2``: one row costs as much), in the
        usual case of ``entries``; else ``None``."""
        if (
            not (self.steps and self.batch_dims == 1 and self._usual())
            or self.x.dim() != 2
            or self.x.shape[1] < 2
            or self.y.shape != self.x.shape
        ):
            return None
        create_graph = self.create_graph
        if torch.is_grad_enabled() is create_graph:  # (no set_grad_enabled object)
            return chain_trace(self.steps, self.y)
        torch._C._set_grad_enabled(create_graph)  # (the switch itself: ``chain.products``)
        try:
            return chain_trace(self.steps, self.y)
        finally:
            torch._C._set_grad_enabled(not create_graph)

    def entries(self, start: int, stop: int, summed: bool) -> torch.Tensor | None:
        """Entries ``(i, i)`` of every sample's square Jacobian for ``i`` in ``start..stop-1``,
        ``(N, k)`` (``summed``: their sum, ``(N,)``), a new tensor, or ``None`` where ``apply``
        takes its general path.

        Where ``apply`` takes one backward pass per row anyway (at most ``LOOP_ROWS`` rows,
        nothing to watch or wrap: its usual case), each row's entry is read off its product:
        a 2-D event's trace is then two passes, two reads and a sum, without the stack,
        reshapes and diagonal of the ``(k, N, n)`` block (each an autograd node in
        training: 10-15 us of a 0.5 ms call). A chain's rows come as one ``(k, N, n)`` block:
        its diagonal, one copy (not ``k`` reads and a stack: 8 ops of a D = 2 call's 86)."""
        if not 0 < stop - start <= LOOP_ROWS or not self._usual():
            return None
        samples, n = self.x.shape[: self.batch_dims].numel(), event_numel(self.x, self.batch_dims)
        steps = self.steps
        if steps:  # every row in one go, without the engine (``_exact.chain``), as (k, N, n)
            rows = self.unit_rows(start, stop)
            if rows is None:
                vectors = basis(start, stop, self.y, self.batch_dims)
                rows = chain_products(steps, vectors, self.create_graph)
            flat = rows if rows.shape[1:] == (samples, n) else rows.reshape(-1, samples, n)
            if summed:  # (N, k) entries (start+j, start+j), summed, or copied (one op)
                return flat.diagonal(start, dim1=0, dim2=2).sum(-1)
            return torch.diagonal_copy(flat, start, 0, 2)
        out = []
        vectors = basis(start, stop, self.y, self.batch_dims)
        for i, v in enumerate(vectors.unbind(), start):
            product = self._vjp(v, batched=False)
            if product is None:  # y does not depend on x: the general path's zeros
                return None
            flat = product if product.shape == (samples, n) else product.reshape(samples, n)
            out.append(self._peers.attach(flat[:, i]))
        if summed:  # (a new tensor: no view of a product handed out)
            return out[0].clone() if len(out) == 1 else sum(out[1:], out[0])
        return torch.stack(out, -1)


def unwatched(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_dims: int, plain: bool = False
) -> GraphJacobian:
    """The plain-autograd engine of ``f`` at ``x`` with no dispatch mode watching ``f`` (that
    would cost about 10 us an op): its graph is checked for the sample mixing that shows
    there (``check_graph``: a train-mode batch norm; for an empty event, one signed
    VJP). For one-product estimates and tiny exact problems, where the watch would be a large
    part of the cost. ``plain``: as in ``GraphJacobian.of_function``."""
    engine = GraphJacobian.of_function(f, x, batch_dims, plain)
    empty = x.dim() == batch_dims
    check_graph(None, engine.y, engine.x, batch_dims, empty, engine.batch_norms)
    return engine


class RerunJacobian(GraphJacobian):
    """``U @ J`` by a fresh evaluation of ``f`` and one ``autograd.grad`` per vector.

    Each vector costs a forward and a backward pass, and walks its own graph once. ``f(x)``
    (``y``) comes from an evaluation of its own, whose graph stays unwalked for the caller.
    ``f`` should put back what it changes outside itself between evaluations
    (``_state.Changes.again``).
    """

    def __init__(
        self, f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_dims: int
    ) -> None:
        first = GraphJacobian.of_function(f, x, batch_dims)
        super().__init__(first.y, first.x, batch_dims, first.create_graph)
        self.f, self.x_given = f, x

    def apply(self, cotangents: torch.Tensor) -> torch.Tensor:
        """VJPs: ``(k,) + y.shape`` cotangents -> ``(k,) + x.shape`` products, one at a time."""
        products = []
        for v in cotangents:
            fresh = GraphJacobian.of_function(self.f, self.x_given, self.batch_dims)
            products.append(fresh.apply(v[None]))
        return torch.cat(products) if products else self.x.new_zeros((0, *self.x.shape))


CHECKPOINTED_ATTENTION = (
    "torchdiv: f runs F.scaled_dot_product_attention's fused kernel inside a non-reentrant "
    "torch.utils.checkpoint. Derivatives that stay differentiable (parameter gradients of a "
    "divergence) need attention on PyTorch's math backend, which torchdiv sets for its own "
    "evaluation, but the checkpoint recomputes its region in each backward pass (torchdiv's, "
    "then yours) on the backend set there, the fused kernel (PyTorch's CheckpointError). Make "
    "the call and your backward pass inside torch.nn.attention.sdpa_kernel(SDPBackend.MATH), "
    "or (divergences, diagonals) use method='structured'"
)


def _checkpointed_attention(attention: list[Any]) -> set[Any]:
    """The fused attention nodes of ``f``'s graph (``attention``: ``search``'s, not ``x``'s
    history) that saved their query through a non-reentrant checkpoint's hooks (plain or
    selective): the recomputation of one that ``f`` made runs under the backend of the
    backward pass that unpacks it. One made before the call (a checkpointed text encoder whose
    output ``f`` closes over) is in the graph of ``f``'s evaluation on the math backend too:
    not ``f``'s, its recomputation runs on the backend it was made on. (Read off ``search``'s
    walks: a walk of its own cost a transformer block's ``jacobian_diagonal`` +535 Python
    calls, +24 %.)"""
    found = set()
    for node in attention:
        hook = getattr(getattr(node, "_raw_saved_query", None), "unpack_hook", None)
        if getattr(hook, "__module__", None) == _checkpoint.__name__:
            found.add(node)
    return found


def _graph_edges(y: torch.Tensor) -> Iterator[tuple[Any, int]]:
    """Every ``(node, output_nr)`` that ``y`` was computed through, starting with ``y``'s own;
    each node (``walk.nodes``) is expanded once."""
    yield y.grad_fn, y.output_nr
    for node in nodes(y.grad_fn):
        yield from node.next_functions


def leaf(x: torch.Tensor) -> torch.Tensor:
    """``x`` as plain autograd evaluates ``f`` on it: ``x`` itself where it requires grad, else
    a leaf copy that does (``GraphJacobian.of_function``'s ``own``)."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _evaluated(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    attention: Any,
    safe: bool,
    own: bool = False,
    changes: Changes | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``f(x_in)`` with a graph, ``x_in``, and whether ``f`` was evaluated again at
    ``INNER_ORDER``: ``x_in`` is ``x`` itself (a view) where it requires grad, else a leaf copy
    of it that does (``x`` as it is with ``own``: the caller's copy); under the context
    ``attention`` (``None``: none), and under ``SafeDerivatives`` if ``safe`` (of the order
    ``backward_passes_order`` gives under the caller's grad mode). Below ``INNER_ORDER`` (the
    caller's ``no_grad``), an ``f`` that takes a backward pass with a graph itself (a force
    field ``-grad(E(x).sum(), x, create_graph=True)``) is evaluated again under
    ``SafeDerivatives`` of ``INNER_ORDER`` (``again_from``: from the caller's state where
    ``changes``, a watch's, noted the first evaluation's writes): the engine's first
    derivatives are second ones of ``E``'s ops (a norm of a zero vector gave ``nan``)."""
    # (the engine falls to the next: torch.func's; not where Dynamo traces the call, which
    # models the transforms itself: there the check sent "auto" to torch.func's reverse mode,
    # whose trace through a graph break in f raised Dynamo's internal error; told first:
    # Dynamo does not trace ``peek_interpreter_stack``)
    if not torch.compiler.is_compiling() and peek_interpreter_stack() is not None:
        raise UnderTransform(
            "torchdiv: plain autograd does not differentiate f under a torch.func transform "
            "around the call (vmap, grad, jvp)"
        )
    order, forward_mode = backward_passes_order()  # (the caller's grad mode)
    if torch.is_grad_enabled():  # (the usual case: no enable_grad object, entered and left)
        return _graphed(f, x, attention, safe, own, changes, order, forward_mode)
    with torch.enable_grad():
        return _graphed(f, x, attention, safe, own, changes, order, forward_mode)


def _graphed(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    attention: Any,
    safe: bool,
    own: bool,
    changes: Changes | None,
    order: int,
    forward_mode: bool,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``_evaluated`` under grad mode (``order``, ``forward_mode``: the caller's
    ``backward_passes_order``). ``f`` runs under no context where none is asked for (a plain
    evaluation at order 3, a tiny problem's usual one): two ``nullcontext``s made, entered and
    left were 9 Python calls of every such call."""
    x_in = x if own else x.view_as(x) if x.requires_grad else leaf(x)
    low = order < INNER_ORDER[0] and not torch.compiler.is_compiling()
    mode = SafeDerivatives(order, "method='forward'", forward_mode) if safe else None
    watch = mode or (InnerBackwards() if low else None)
    if attention is None and watch is None:
        y = f(x_in)
    else:
        with _NOTHING if attention is None else attention, _NOTHING if watch is None else watch:
            y = f(x_in)
    inner = low and getattr(watch, "backward_inside", False)
    if inner:
        with (
            _NOTHING if attention is None else attention,
            again_from(changes, x),
            SafeDerivatives(INNER_ORDER[0], "method='forward'", INNER_ORDER[1]),
        ):
            y = f(x_in)
    return y, x_in, inner


def again_from(changes: Changes | None, x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """The context of an evaluation of ``f`` made again after one that took a backward pass
    with a graph (``INNER_ORDER``). Where a watch's ``changes`` noted the first evaluation's
    writes and draws, they are put back first (``Changes.undo``): the second starts from the
    caller's state (its value one evaluation's: a spectral norm's power iteration run once,
    the same dropout mask) and leaves the state and the generators as one evaluation does.
    Else (an unwatched evaluation: a dispatch mode on every plain one cost 20-25% of a tiny
    problem) its own writes are put back (``written_once``): it reads the first's. ``"auto"``
    keeps such an ``f`` watched (``inner_again``: not ``Passed``)."""
    if changes is None:
        return written_once(x)
    changes.undo()
    return contextlib.nullcontext()


@contextlib.contextmanager
def written_once(x: torch.Tensor) -> Iterator[None]:
    """An evaluation of ``f`` again, after a plain one that was not watched: what it writes to
    tensors ``f`` did not make is put back afterwards (``_state.Changes``), so that they
    change once (a train-mode batch norm's statistics), as in one PyTorch forward."""
    changes = Changes(x)
    with changes:
        yield
    changes.undo_writes()


def depends_on(y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``y`` is ``x`` or was computed from it (``x`` a leaf or an intermediate tensor).

    An intermediate ``x`` is the output ``x.output_nr`` of the node ``x.grad_fn``: matching the
    pair, not the node, tells ``x`` from its siblings (``a, b = h.chunk(2)``).
    """
    if y is x:
        return True
    if x.grad_fn is not None:
        return any(node is x.grad_fn and nr == x.output_nr for node, nr in _graph_edges(y))
    if any(getattr(node, "variable", None) is x for node, _ in _graph_edges(y)):
        return True
    if not x.requires_grad or torch.is_inference_mode_enabled():  # (no accumulator there)
        return False
    # another Python tensor of the same leaf (the recomputation of a checkpoint nested in
    # another: the graph forms refused such a ``y`` as "not computed from x"): its gradient
    # accumulator is the leaf's
    accumulator = torch.autograd.graph.get_gradient_edge(x).node
    return any(node is accumulator for node, _ in _graph_edges(y))
