"""``check_batch_independence``: does sample ``b`` of ``f(x)`` depend on other samples of ``x``?"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from torchdiv._api.reporting import control_flow, in_context
from torchdiv._core.checks import (
    check_callable,
    check_generator,
    check_initialized,
    check_input,
    check_output,
    check_untransformed,
)
from torchdiv._core.mixing.errors import BatchInteractionError
from torchdiv._core.modes import outside_inference_mode
from torchdiv._exact.attributes import PlainAttributes
from torchdiv._exact.autograd import GraphJacobian
from torchdiv._exact.state import Changes

TRIALS = 32


@outside_inference_mode
def check_batch_independence(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    batch_dims: int = 1,
    rtol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> None:
    r"""Raise if some sample of ``f(x)`` depends on another sample of ``x``.

    Every operator in torchdiv probes the batched ``f`` with one vector broadcast across the
    batch and reads off per-sample results (NOTE [Batching over basis vectors] in
    ``torchdiv._core.basis``). That is right only when the Jacobian of the batched ``f`` is block
    diagonal: ``d f(x)_b / d x_c = 0`` for ``b != c``.

    The test takes ``TRIALS = 32`` random VJPs in one batched backward pass (one pass each where
    ``f``'s backward cannot be batched: a GroupNorm met by channels-last strides, as in
    diffusers' attention blocks). Each puts Gaussian noise on the outputs of a random half
    ``S`` of the samples and zero elsewhere; for independent samples the gradient on every
    input outside ``S`` is then exactly zero (no rounding: those
    entries are sums of exact zeros). A pair ``b != c`` with ``d f_b / d x_c != 0`` shows up in
    a trial with probability 1/4 (``b`` in ``S``, ``c`` not), so it escapes all trials with
    probability ``(3/4)**32 ≈ 1.0e-4``, whatever the dtype. ``f`` is called once (what it
    changes is put back, below).

    The operators themselves raise ``BatchInteractionError`` when they see ``f`` mix samples
    in the ops they already watch (``torchdiv._core.mixing``: train-mode batch norm, products and
    reductions over a batch dimension), but not everywhere: not for the explicit
    ``"forward"``/``"reverse"`` methods, tiny ``"auto"`` problems or ops the analysis does not
    follow (indexing, fused attention). This test needs none of that: run it once per model.

    Args:
        f: the batched function to test.
        x: a representative input; its first ``batch_dims`` dimensions index samples.
        batch_dims: number of leading batch dimensions.
        rtol: a cross-sample gradient counts when it exceeds ``rtol`` times the largest
            gradient entry (independent samples give exactly zero). Gradients that are not
            finite at a sample with a nan or inf in its ``x`` or ``f(x)`` are left out;
            elsewhere (a square root of a batch sum at zero) they count as a leak.
        generator: random source for the subsets and the noise; default: a fixed seed, so the
            check is reproducible.

    The check leaves ``f`` as it found it: buffers ``f`` updates (a batch norm's running
    statistics), the random state it draws from, and the plain values and tensors its
    modules set (a data-dependent initialisation's flag, a kept activation) are put back.
    Lists, dictionaries and other objects are not copied, nor is state outside the modules
    ``f`` reaches: a cache ``f`` fills, or a count it keeps in a dictionary, moves as one
    evaluation of ``f`` moves it.
    A lazy module that has not seen an input yet is refused (``ValueError``), as the
    operators refuse it: call ``f(x)`` once first.

    Returns:
        ``None`` if no interaction is found.

    Raises:
        BatchInteractionError: (a ``ValueError``) naming the samples whose inputs reach other
            samples' outputs, the size of the leak and the usual causes (train-mode BatchNorm,
            attention or pooling over the batch dimension).
        TypeError, ValueError: bad ``f``, ``x``, ``batch_dims``, ``rtol`` or ``generator``;
            ``ValueError`` too where no gradient of ``f(x)`` is finite (nor any sample).

    Examples:
        >>> check_batch_independence(torch.nn.Linear(3, 3), torch.randn(4, 3))
        >>> bn = torch.nn.BatchNorm1d(3)  # train mode: normalises with batch statistics
        >>> check_batch_independence(bn, torch.randn(4, 3))
        Traceback (most recent call last):
        ...
        torchdiv.BatchInteractionError: check_batch_independence: ...
    """
    fn = "check_batch_independence"
    check_callable(fn, f)
    check_input(fn, x, batch_dims)
    check_generator(fn, generator)
    check_untransformed(fn, "it", "call it outside, once per model")
    # a lazy module's first forward here would initialise it (class and parameters changed)
    # from random numbers the put-back below draws again: refused, as the operators refuse it
    check_initialized(fn, f)
    if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not 0 <= rtol < math.inf:
        raise ValueError(f"{fn}: rtol must be a finite number >= 0, got {rtol!r}")
    num = x.shape[:batch_dims].numel()
    # the modules f reaches, whose plain values Changes keeps with the tensors: without them
    # a data-dependent initialisation's flag (FrEIA's ActNorm, ``init_on_next_batch``) stayed
    # set while its parameters were put back, and the layer never initialised
    call = PlainAttributes(f)
    changes = Changes(x)  # f's own changes (batch norm statistics, random draws), undone
    try:
        with torch.enable_grad(), changes:
            x_in = x.detach().requires_grad_(True)
            y = f(x_in)
        check_output(fn, y, x, batch_dims)
        if num < 2 or not y.requires_grad:
            return
        leak, scale = _leaks(y, x_in, batch_dims, generator or torch.Generator().manual_seed(0))
    except Exception as exc:
        if control_flow(exc) is None:
            raise
        # torch.cond / torch.while_loop refuse the dispatch mode that undoes f's changes:
        # named with the way out, as the operators name them
        raise in_context(fn, "f(x)", exc, {"f": f, "x": x, "batch_dims": batch_dims}) from exc
    finally:  # after the backward pass, which may need the statistics as f left them
        changes.undo()
        call.close()
    receivers = (leak > rtol * scale).nonzero().flatten().tolist()
    if receivers:
        raise BatchInteractionError(_message(fn, f, receivers, float(leak.max()), scale))


def _leaks(
    y: torch.Tensor, x_in: torch.Tensor, batch_dims: int, generator: torch.Generator
) -> tuple[torch.Tensor, float]:
    """Per input sample, the largest gradient it got from a trial that left it out; and the
    largest gradient entry overall. The ``TRIALS`` VJPs go by ``GraphJacobian``: one batched
    backward pass, or one pass each where ``y``'s graph cannot be batched."""
    num = x_in.shape[:batch_dims].numel()
    inside = torch.rand(TRIALS, num, 1, generator=generator) < 0.5
    noise = torch.randn(TRIALS, num, y.numel() // num, generator=generator)
    cotangents = (noise * inside).to(y).reshape(TRIALS, *y.shape)
    grad = GraphJacobian(y, x_in, batch_dims, create_graph=False).apply(cotangents)
    size = grad.reshape(TRIALS, num, -1).abs().amax(-1).cpu().double()  # (trials, samples)
    # a non-finite gradient at a sample whose x or f(x) is not finite (0 * nan in any
    # backward) says nothing of a leak, and its nan hid every other sample's (all comparisons
    # false); at a finite sample it is one (``sqrt`` of a batch sum at 0: inf), counted so
    bad = ~(_finite_rows(x_in, num) & _finite_rows(y, num)).cpu()
    finite = size.isfinite()
    if not bool(finite.any()) and bool(bad.all()):
        raise ValueError(
            "check_batch_independence: every gradient of f(x) is nan or inf, so nothing can "
            "be checked: pass an x (and parameters) for which f is finite"
        )
    size = torch.where(finite, size, torch.where(bad, 0, math.inf))
    outside = torch.where(inside.squeeze(-1), 0, size)  # (not a product: inf * 0 is nan)
    return outside.amax(0), float(torch.where(finite, size, 0).max())


def _finite_rows(t: torch.Tensor, num: int) -> torch.Tensor:
    """Per sample of the ``num`` leading ones of ``t``, whether all its entries are finite."""
    return t.detach().reshape(num, -1).isfinite().all(-1)


def _message(fn: str, f: object, receivers: list[int], leak: float, scale: float) -> str:
    shown = ", ".join(map(str, receivers[:8])) + (", ..." if len(receivers) > 8 else "")
    msg = (
        f"{fn}: samples interact: the inputs of samples [{shown}] reach the outputs of other "
        f"samples (largest cross-sample gradient {leak:.3g}, largest gradient {scale:.3g}). "
        "Per-sample Jacobians, divergences and Laplacians of this f would be wrong. Usual "
        "causes: BatchNorm in train mode (call model.eval()), attention, pooling or "
        "normalisation across the batch dimension, or batch_dims set too low."
    )
    if isinstance(f, torch.nn.Module):
        norms = [
            name or type(f).__name__
            for name, m in f.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
        ]
        if norms:
            msg += f" Train-mode BatchNorm modules in f: {', '.join(norms)}."
    return msg
