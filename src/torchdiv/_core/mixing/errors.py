"""The error of the sample-mixing watch, its message, and the switch that turns the watch off.

``BatchInteractionError`` (a ``ValueError``) is raised when ``f`` mixes samples; ``explain``
writes its message: what mixed them, where (``_module_in_stack``: the innermost running
``nn.Module``), and the way out (``model.eval()``, a lower ``batch_dims``, a batch split in
order passed as more batch dimensions, ``allow_batch_interaction()``). ``allowed`` reads the
switch (this thread's ``allow_batch_interaction()``, or Dynamo tracing the call).
``_SPLIT_WHAT``, ``_PUT_WHAT``, ``_PRODUCT_WHAT`` and ``_COLLECTIVE_WHAT`` start the
messages the rules write for the four refusals whose way out ``explain`` spells out (a
product over a flattened graph batch: ``torch.bmm`` over a ``(B, N, N)`` adjacency; a
collective over the ranks: ``allow_batch_interaction()`` under tensor parallelism);
``_KERNEL_WHAT`` marks an op inside a GPyTorch kernel, whose centring by the points' mean is a
false refusal for per-point outputs.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch

from torchdiv._core.script import instance


class _State(threading.local):
    """This thread's switches, ``False`` until set (set in each thread's ``__init__``: a plain
    ``threading.local`` read with ``getattr(..., False)`` raised and caught an
    ``AttributeError`` inside, ~0.7 us, two or three times a call; class defaults, read
    while absent from the instance, made Dynamo guard on their absence, which the first
    ``watched()`` or ``allow_batch_interaction()`` of a trace ended: an ``AssertionError``)."""

    def __init__(self) -> None:
        self.allowed = False  # allow_batch_interaction() is active
        self.watched = False  # watched(): detection on while Dynamo traces


_state = _State()


class BatchInteractionError(ValueError):
    """``f`` mixes samples, so per-sample derivatives of the batched ``f`` would be wrong.

    Raised (a ``ValueError``) by every operator that sees ``f`` combine samples, and by
    ``check_batch_independence``; the message starts with the function's name and names the
    op, the module and the fix (``model.eval()``, ``batch_dims=0``). Opt out with
    ``allow_batch_interaction()``.

    Examples:
        >>> import torch, torchdiv
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
        >>> x = torch.randn(8, 3)
        >>> try:
        ...     torchdiv.divergence(net, x)  # train mode: the batch's statistics
        ... except torchdiv.BatchInteractionError as error:
        ...     print(str(error)[:40])
        divergence: f mixes samples: a batch nor
        >>> torchdiv.divergence(net.eval(), x).shape  # running statistics: per sample
        torch.Size([8])
    """


def unnamed(message: str) -> str:
    """A ``BatchInteractionError`` message without the names of the public calls it passed
    through (``"laplacian: f mixes samples: ..."`` from a call nested in ``biharmonic``)."""
    at = message.find("f mixes samples")
    return message[at:] if at > 0 else message


@contextlib.contextmanager
def allow_batch_interaction() -> Iterator[None]:
    """Turn off torchdiv's sample-mixing detection inside the ``with`` block (this thread).

    Every operator assumes that sample ``b`` of ``f(x)`` depends only on sample ``b`` of
    ``x``, and raises ``BatchInteractionError`` when it sees ``f`` combine samples (a
    train-mode batch norm, a matrix product or reduction over a batch dimension). Inside
    this block it computes what it computes without looking: the probes of the batched
    ``f`` then measure cross-sample terms too (e.g. column sums of the whole batch's
    Jacobian for an empty event), which is what you want only if you know why.

    Examples:
        >>> import torchdiv
        >>> bn = torch.nn.BatchNorm1d(3)  # train mode: normalises with batch statistics
        >>> torchdiv.divergence(bn, torch.randn(4, 3))
        Traceback (most recent call last):
        ...
        torchdiv.BatchInteractionError: divergence: f mixes samples: a batch norm...
        >>> with torchdiv.allow_batch_interaction():
        ...     div = torchdiv.divergence(bn, torch.randn(4, 3))
        >>> div.shape
        torch.Size([4])
    """
    before = _state.allowed  # (not allowed(): True while Dynamo traces, kept after the block)
    _state.allowed = True
    try:
        yield
    finally:
        _state.allowed = before


def allowed() -> bool:
    """Whether ``allow_batch_interaction()`` is active in this thread, or Dynamo traces the
    call (``torch.compile``) outside ``watched``: detection watches the dispatcher, which a
    compiled graph has not got."""
    if _state.allowed:
        return True
    return torch.compiler.is_compiling() and not _state.watched


@contextlib.contextmanager
def watched() -> Iterator[None]:
    """Watch for sample mixing while Dynamo traces too (this thread), even inside
    ``allow_batch_interaction()``: for a recording made eagerly during tracing whose plan
    the compiled graph then replays unwatched and unguarded by the switch
    (``torchdiv._structured.replay``: a plan recorded inside the block was served outside it
    to a net that mixes samples, where the eager call raises)."""
    before = _state.watched, _state.allowed
    _state.watched, _state.allowed = True, False
    try:
        yield
    finally:
        _state.watched, _state.allowed = before


def explain(what: str, x: torch.Tensor, batch_dims: int) -> str:
    """The message of a ``BatchInteractionError``: what mixes samples, and the way out."""
    b = batch_dims
    text = (
        f"f mixes samples: {what}. With batch_dims={b}, dimensions {list(range(b))} of x "
        f"(shape {tuple(x.shape)}) index samples, and every sample's derivatives are read from "
        "one probe of the whole batch, so they would silently include other samples' terms. "
    )
    if "train mode" in what:
        fix = (
            "Call model.eval() before differentiating (batch norm then uses its running "
            "statistics), or normalise per sample (LayerNorm, GroupNorm)."
        )
    elif x.dim() == b:
        fix = (
            f"x has no event dimensions: each of its {x.shape[:b].numel()} elements is read as "
            "one sample of one element. For one unbatched sample pass batch_dims=0 (or x[None] "
            "with batch_dims=1); if only the first k dimensions index samples, pass batch_dims=k."
        )
    else:
        fix = (
            "If that dimension belongs to each sample's event, lower batch_dims; if f really "
            "combines samples, per-sample derivatives do not exist."
        )
        fix += _model_hints(what)
    return (
        text + fix + " To compute it anyway, wrap the call in torchdiv.allow_batch_interaction()."
    )


def _model_hints(what: str) -> str:
    """The ways out ``explain`` adds for the models whose mixing ``what`` names: a batch split
    inside ``f``, message passing along dimension 0, a GPyTorch kernel, a collective, a graph
    net's adjacency over flattened samples ("" for none)."""
    hints = ""
    if _SPLIT_WHAT in what:  # x.reshape(F, P, D) inside f, read by einsum or bmm
        hints += (
            " Where f splits the batch in order (x.reshape(F, P, D), points grouped per "
            "function) and keeps each sample apart, pass x in that shape with batch_dims "
            "set to the number of leading dimensions the batch was split into (batch_dims=2 "
            "for (F, P, D)): the watch follows batch dimensions through einsum, bmm and "
            "transposes, but not a batch split inside f."
        )
    if what.startswith(_PUT_WHAT):  # message passing along dimension 0
        hints += (
            " A batch of graphs with its nodes along dimension 0 (PyTorch Geometric's "
            "batch vector) makes each node a sample: give f a padded batch (B, N, ...) "
            "with node masks, or sum torchdiv.jacobian_diagonal(f, x, batch_dims=0) over "
            "each graph's nodes."
        )
    if _KERNEL_WHAT in what:  # sq_dist's and MaternKernel's x1 - x1.mean(-2)
        hints += (
            " GPyTorch's kernels subtract the mean of their first input over the points "
            "(dimension -2) before taking distances, which cancel it: a posterior mean or "
            "variance of each point is per sample all the same. Give each point its own GP "
            "batch of one, f = lambda z: model.posterior(z.unsqueeze(-2)).mean.squeeze(-2) "
            "(BoTorch's (b, q, d) candidates: (b, q, 1, d)); a covariance or joint samples "
            "across the points have no per-sample derivatives."
        )
    if what.startswith(_COLLECTIVE_WHAT):  # c10d's or the functional collectives
        hints += (
            " Under tensor parallelism every rank holds the same samples and a collective "
            "combines the features of each (Megatron-style autograd.Functions that "
            "all-reduce a row-parallel layer's partial sums or gather a column-parallel "
            "layer's outputs): f is per sample there, and its backward gives each rank the "
            "derivatives; call it inside torchdiv.allow_batch_interaction(). Under data "
            "parallelism (other samples on other ranks) it has none."
        )
    if what.startswith(_PRODUCT_WHAT):  # a graph's adjacency over flattened samples
        hints += (
            " A graph net over a batch flattened to (B * N, F) with one adjacency "
            "(torch.block_diag(*adj) @ h, torch.sparse.mm(adj, h)) sums over samples "
            "wherever an entry joins two: give f the per-sample adjacency as (B, N, N) and "
            "use torch.bmm(adj, h) or torch.einsum('bij,bjf->bif', adj, h), per sample."
        )
    return hints


def _module_in_stack() -> str | None:
    """The innermost ``nn.Module`` whose ``forward`` is running, as ``"Linear"`` or
    ``"BatchNorm1d in train mode"``: who called the op that mixes samples."""
    frame = sys._getframe(1)
    while frame is not None:
        module: Any = frame.f_locals.get("self")
        if frame.f_code.co_name == "forward" and instance(module, torch.nn.Module):
            name = type(module).__name__
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training:
                name += " in train mode"
            if _gpytorch_kernel(module):
                name += _KERNEL_WHAT
            return name
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _gpytorch_kernel(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a ``gpytorch.kernels.Kernel`` (told without importing GPyTorch)."""
    return any(
        c.__name__ == "Kernel" and c.__module__ == "gpytorch.kernels.kernel"
        for c in type(module).__mro__
    )


_KERNEL_WHAT = ", a GPyTorch kernel"


_COLLECTIVE_WHAT = "a collective over the ranks' samples"

_SPLIT_WHAT = "the batch split in order across the leading dimensions"


_PUT_WHAT = "values written into other samples' places"


_PRODUCT_WHAT = "a matrix product summing over samples"  # (combining._contraction's)
