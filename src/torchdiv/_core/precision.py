"""The precision float32 products run at, as PyTorch's settings give it.

``torch.set_float32_matmul_precision("medium")`` makes oneDNN's CPU matrix products bfloat16
ones where the CPU has them (AMX, AVX512-BF16: 0.19 off for the product of two 256 x 256
Gaussian matrices, against ``4e-5``), ``"high"`` TensorFloat-32 ones on CUDA, and cuDNN's
convolutions are TensorFloat-32 by default. PyTorch 2.9 and later keep these as
``fp32_precision`` settings per backend and op (``torch.backends.mkldnn.matmul
.fp32_precision``: ``"ieee"``, ``"tf32"``, ``"bf16"``, or ``"none"`` for the parent's), and
the legacy reads (``torch.backends.cuda.matmul.allow_tf32``,
``torch.get_float32_matmul_precision()``) raise ``RuntimeError`` once those are set
directly; before 2.9 only the legacy flags exist.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# the unit roundoff of the reduced precisions float32 products may run at: TensorFloat-32
# keeps 10 bits of the mantissa, bfloat16 7
_REDUCED = {"tf32": 2.0**-10, "bf16": 2.0**-7}
# the backends that run float32 matrix products, convolutions and recurrent layers, by device
_BACKENDS = {"cuda": ("cuda", "cudnn"), "cpu": ("mkldnn",)}
_OPS = ("matmul", "conv", "rnn")
_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")  # PyTorch >= 2.9


def _setting(backend: str, op: str) -> str:
    """``torch.backends.<backend>.<op>.fp32_precision`` (about 5 us)."""
    return str(getattr(getattr(getattr(torch.backends, backend), op, None), "fp32_precision", ""))


def float32_eps(device: torch.device, ops: tuple[str, ...]) -> float:
    """The coarsest unit roundoff among ``device``'s float32 ``ops`` (matrix products,
    convolutions, recurrent layers): ``_REDUCED``'s where one is set to a reduced precision,
    else 0.

    Example:
        >>> float32_eps(torch.device("cpu"), ("matmul",))
        0.0
    """
    if not _NEW_API:
        legacy = (
            torch.backends.cuda.matmul.allow_tf32
            or torch.backends.cudnn.allow_tf32
            or torch.get_float32_matmul_precision() != "highest"
        )
        return _REDUCED["tf32"] if device.type == "cuda" and legacy else 0.0
    return max(
        (_REDUCED.get(_setting(b, op), 0.0) for b in _BACKENDS.get(device.type, ()) for op in ops),
        default=0.0,
    )


@contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """Run ``device``'s float32 matrix products, convolutions and recurrent layers at full
    precision inside, putting back the settings after: for evaluations whose round-off
    must be float32's (the mixing check's VJPs: at bfloat16's a coupling of ``0.1`` of the
    batch mean is round-off). Only the settings reduced now are written (about 15 us read)."""
    if not _NEW_API:
        flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        legacy = torch.get_float32_matmul_precision()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
            torch.set_float32_matmul_precision(legacy)
        return
    reduced = []  # (leaf, the value to put back: "none" where it inherited its backend's)
    for b in _BACKENDS.get(device.type, ()):
        backend = getattr(torch.backends, b)
        for op in _OPS:
            leaf = getattr(backend, op, None)
            value = str(getattr(leaf, "fp32_precision", ""))
            if leaf is not None and value in _REDUCED:
                inherited = value == str(getattr(backend, "fp32_precision", ""))
                reduced.append((leaf, "none" if inherited else value))
    for leaf, _ in reduced:
        leaf.fp32_precision = "ieee"
    try:
        yield
    finally:
        # (a leaf reads its backend's value where it is "none": written back as read, it
        # kept bfloat16 after the caller set torch.backends.fp32_precision back to "none")
        for leaf, value in reduced:
            leaf.fp32_precision = value
