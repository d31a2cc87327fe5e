"""The PyTorch versions torchdiv runs on.

torchdiv reads PyTorch internals that older releases lack or spell differently (the saved-tensor
hooks stack, Dynamo's dispatch-mode checks, FSDP2's pre-backward function, ...): on torch 2.4
to 2.10 ``import torchdiv`` failed deep inside with an ``ImportError`` on a private name, and
on 2.11 and 2.12 ``torch.compile`` around a call, FSDP2 modules and DTensors failed
(``docs/guide/limitations.md``). ``pyproject.toml`` asks for ``MINIMUM``; a build installed beside
it (``--no-deps``, conda) is refused here by name, at import.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _disable_current_modes

MINIMUM = (2, 13)  # keep pyproject.toml's ``torch>=`` the same


def release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a PyTorch version string (a local or pre-release part ignored).

    Example:
        >>> release("2.13.0+cpu"), release("2.14.0a0+git1234")
        ((2, 13), (2, 14))
    """
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:  # (a build whose version names no release: taken as recent)
        return MINIMUM
    return int(found.group(1)), int(found.group(2))


def slope(op: Callable[[torch.Tensor], torch.Tensor], at: float) -> float | None:
    """``op``'s derivative at ``at`` by the running PyTorch's backward (``None``: it has none).
    For what a release changed, where its version cannot tell: a nightly or source build
    (``2.15.0.dev...``, ``2.15.0a0+git...``) names its coming release, with or without the
    change. Run outside any mode of the caller's (``import torchdiv`` under a fake tensor
    mode).

    Example:
        >>> slope(torch.sin, 0.0), slope(torch.special.airy_ai, 0.0)
        (1.0, None)
    """
    with (
        _disable_current_modes(),
        torch._C.DisableTorchFunction(),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        x = torch.tensor(at, dtype=torch.float64, requires_grad=True)
        y = op(x)
        return None if y.grad_fn is None else torch.autograd.grad(y, x)[0].item()


def check_torch(version: str = torch.__version__) -> None:
    """Raise ``ImportError`` where ``version`` is older than ``MINIMUM``.

    Example:
        >>> check_torch("2.4.1+cu121")
        Traceback (most recent call last):
        ImportError: torchdiv needs PyTorch >= 2.13 (found 2.4.1+cu121): pip install 'torch>=2.13'
    """
    if release(version) < MINIMUM:
        need = ".".join(map(str, MINIMUM))
        raise ImportError(
            f"torchdiv needs PyTorch >= {need} (found {version}): pip install 'torch>={need}'"
        )


check_torch()  # (``torchdiv/__init__.py`` imports this module first)
