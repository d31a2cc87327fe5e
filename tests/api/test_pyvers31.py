"""pyvers31: torchdiv on the Python versions it declares (``requires-python = ">=3.10"``), where
they differ in what it reads off the interpreter.

The error hints read the traceback's frames to tell a reentrant checkpoint's backward and a
module's full backward hook (``_api/reporting.py``): by ``code.co_qualname``, which Python 3.10
lacks. There an ``AttributeError`` from the hint replaced torchdiv's error (the checkpoint's way
out, the hook's). These tests fail on Python 3.10 without the fix and pass on 3.11+ either way
(``co_qualname`` is there), but for ``test_the_class_codes_are_the_qualified_names``, which
checks the fix's reading against ``co_qualname`` where it exists (3.11+; skipped on 3.10).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.utils.checkpoint as checkpointing
import torch.utils.hooks as hooking
from torch import nn

import torchdiv
from torchdiv._api import reporting

f64 = torch.float64


def _net(inputs: int = 3, outputs: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, 8), nn.Tanh(), nn.Linear(8, outputs)).double()


def test_a_reentrant_checkpoint_is_named_on_every_python() -> None:
    """The reentrant checkpoint's backward refuses ``autograd.grad``: the hint reads the frame of
    its ``CheckpointFunction`` (Python 3.10: ``AttributeError``, the hint's own)."""
    net = _net()

    def f(z: torch.Tensor) -> torch.Tensor:
        return checkpointing.checkpoint(net, z, use_reentrant=True)

    with pytest.raises(RuntimeError, match=r"(?s)^divergence: .*Pass use_reentrant=False"):
        torchdiv.divergence(f, torch.randn(4, 3, dtype=f64))


def test_a_full_backward_hook_is_named_on_every_python() -> None:
    """Forward over reverse refuses a module's full backward hook (an ``autograd.Function``
    without ``setup_context``): the hint reads the frame of PyTorch's ``BackwardHook``
    (Python 3.10: ``AttributeError``)."""
    net = _net(5, 1)
    net[2].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    with pytest.raises(RuntimeError, match=r"setup_context") as info:
        torchdiv.laplacian(net, torch.randn(4, 5, dtype=f64), method="forward-over-reverse")
    assert "full backward hook" in str(info.value).partition("\nHint: ")[2]


def _codes(module: types.ModuleType) -> list[types.CodeType]:
    """Every code object defined in ``module``'s file: its functions', its classes' (one level
    of nested classes) and those defined in them."""
    todo: list[types.CodeType] = []
    for value in vars(module).values():
        for v in (value, *(vars(value).values() if isinstance(value, type) else ())):
            v = getattr(v, "fget", getattr(v, "__func__", v))
            if isinstance(v, types.FunctionType) and v.__code__.co_filename == module.__file__:
                todo.append(v.__code__)
    out = []
    while todo:
        code = todo.pop()
        out.append(code)
        todo += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return out


@pytest.mark.skipif(sys.version_info < (3, 11), reason="co_qualname: Python 3.11's")
@pytest.mark.parametrize(
    ("module", "cls"),
    [(checkpointing, checkpointing.CheckpointFunction), (hooking, hooking.BackwardHook)],
)
def test_the_class_codes_are_the_qualified_names(module: types.ModuleType, cls: type) -> None:
    """``reporting._class_codes(cls)`` holds exactly the code objects of ``module`` whose
    qualified name is within ``cls`` (its methods and the functions defined in them), as
    ``co_qualname`` tells them."""
    codes = _codes(module)
    within = [c for c in codes if c.co_qualname.startswith(cls.__qualname__ + ".")]
    assert within and len(within) < len(codes)  # (the test tells something)
    assert {c for c in codes if c in reporting._class_codes(cls)} == set(within)
