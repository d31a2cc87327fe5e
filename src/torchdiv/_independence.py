"""``check_batch_independence``: does sample ``b`` of ``f(x)`` depend on other samples of ``x``?"""

from __future__ import annotations

from collections.abc import Callable

import torch

from torchdiv._checks import check_callable, check_input, check_output


class BatchInteractionError(ValueError):
    """``f`` mixes samples, so per-sample derivatives of the batched ``f`` would be wrong."""


def check_batch_independence(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    batch_dims: int = 1,
    rtol: float | None = None,
    generator: torch.Generator | None = None,
) -> None:
    r"""Raise if some sample of ``f(x)`` depends on another sample of ``x``.

    Every operator in torchdiv probes the batched ``f`` with one vector broadcast across the
    batch and reads off per-sample results (NOTE [Batching over basis vectors] in
    ``torchdiv._basis``). That is right only when the Jacobian of the batched ``f`` is block
    diagonal. This test takes, for the first and the last sample ``b``, two random VJPs:

    * cotangent on sample ``b`` only: the gradient on every other sample must vanish
      (``f(x)_b`` does not read other samples);
    * cotangent on every sample but ``b``: the gradient on sample ``b`` must vanish
      (no other output reads sample ``b``).

    With random Gaussian cotangents an interaction escapes with probability zero. ``f`` is called
    once (so a train-mode BatchNorm updates its running statistics once, as in any forward).

    Args:
        f: the batched function to test.
        x: a representative input; its first ``batch_dims`` dimensions index samples.
        batch_dims: number of leading batch dimensions.
        rtol: leakage counts when it exceeds ``rtol`` times the largest gradient entry;
            default ``100 * eps`` of the dtype of ``x``.
        generator: random source for the cotangents.

    Returns:
        ``None`` if no interaction is found.

    Raises:
        BatchInteractionError: (a ``ValueError``) naming the samples involved, the size of the
            leak and the usual causes (train-mode BatchNorm, attention or pooling over the
            batch dimension, in-place writes across samples).

    Example:
        >>> check_batch_independence(torch.nn.Linear(3, 3), torch.randn(4, 3))
        >>> bn = torch.nn.BatchNorm1d(3)  # train mode: normalises with batch statistics
        >>> check_batch_independence(bn, torch.randn(4, 3))
        Traceback (most recent call last):
        ...
        torchdiv._independence.BatchInteractionError: check_batch_independence: ...
    """
    fn = "check_batch_independence"
    check_callable(fn, f)
    check_input(fn, x, batch_dims)
    num = x.shape[:batch_dims].numel()
    if num < 2:
        return
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        y = f(x_in)
    check_output(fn, y, x, batch_dims)
    if not y.requires_grad:
        return
    tol = rtol if rtol is not None else 100 * torch.finfo(x.dtype).eps
    for b in sorted({0, num - 1}):
        for own in (True, False):
            leak, scale = _leak(y, x_in, num, b, own, generator)
            if leak > tol * scale:
                raise BatchInteractionError(_message(fn, f, b, own, leak, scale))


def _leak(
    y: torch.Tensor,
    x_in: torch.Tensor,
    num: int,
    b: int,
    own: bool,
    generator: torch.Generator | None,
) -> tuple[float, float]:
    """Largest gradient entry on the samples the cotangent should not reach, and the largest."""
    flat_y = y.reshape(num, -1)
    mask = torch.zeros(num, 1, dtype=y.dtype, device=y.device)
    mask[b] = 1
    if not own:
        mask = 1 - mask
    noise = torch.randn(flat_y.shape, generator=generator, dtype=y.dtype, device="cpu")
    cot = (noise.to(y.device) * mask).reshape(y.shape)
    (grad,) = torch.autograd.grad(y, x_in, cot, retain_graph=True, allow_unused=True)
    if grad is None:
        return 0.0, 0.0
    grad = grad.reshape(num, -1).abs()
    outside = grad * (1 - mask)
    return float(outside.max()), float(grad.max())


def _message(fn: str, f: object, b: int, own: bool, leak: float, scale: float) -> str:
    if own:
        what = f"output of sample {b} depends on the inputs of other samples"
    else:
        what = f"input of sample {b} influences the outputs of other samples"
    msg = (
        f"{fn}: samples interact: the {what} (largest cross-sample gradient {leak:.3g}, largest "
        f"gradient {scale:.3g}). Per-sample Jacobians, divergences and Laplacians of this f "
        "would be wrong. Usual causes: BatchNorm in train mode (call model.eval()), attention, "
        "pooling or normalisation across the batch dimension, or batch_dims set too low."
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
