"""The lead's checks of the thirty-third session: refusals of a ``torch.library`` custom op
with a registered derivative name the op and a way out that works.

PyTorch runs ``register_autograd``'s derivative as an ``autograd.Function`` that
``torch.func``'s transforms refuse ("must override the setup_context staticmethod", which names
no op), and custom ops have no forward-mode rule: so ``method="forward"``'s way out must not be
``'reverse'`` (which runs ``torch.func.vjp``). ``method="auto"`` runs the op by plain autograd:
checked against the closed form (``f = 2 x**3``: divergence ``6 sum x**2``). A registered
backward that calls an op without a derivative (a NumPy kernel's) fails at the second
derivative in PyTorch's autograd engine: named with the call's context and the op.
"""

from __future__ import annotations

import pytest
import torch
from conftest import internal_module

import torchdiv


@torch.library.custom_op("torchdiv_lead33::cube", mutates_args=())
def _cube(x: torch.Tensor) -> torch.Tensor:
    return x**3


@_cube.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _setup(ctx: object, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])  # type: ignore[attr-defined]


def _backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
    (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
    return grad * 3 * x**2


_cube.register_autograd(_backward, setup_context=_setup)


def f(z: torch.Tensor) -> torch.Tensor:
    return 2 * _cube(z)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_forward_refusal_names_a_way_out_that_works(x: torch.Tensor) -> None:
    with pytest.raises(NotImplementedError, match="torchdiv_lead33::cube") as info:
        torchdiv.divergence(f, x, method="forward")
    assert "method='auto'" in str(info.value).splitlines()[0]  # not 'reverse': it refuses too
    with pytest.raises(RuntimeError, match="setup_context"):
        torchdiv.divergence(f, x, method="reverse")
    # the way out: float64, one op from the closed form
    torch.testing.assert_close(torchdiv.divergence(f, x, method="auto"), (6 * x**2).sum(-1))


@pytest.mark.parametrize(
    ("fn", "method"),
    [
        ("divergence", "reverse"),
        ("jacobian", "reverse"),
        ("laplacian", "hessian"),
        ("laplacian", "forward-over-reverse"),
    ],
)
def test_torch_func_refusal_names_the_custom_op(x: torch.Tensor, fn: str, method: str) -> None:
    with pytest.raises(RuntimeError, match="setup_context") as info:
        getattr(torchdiv, fn)(f, x, method=method)
    hint = str(info.value).partition("\nHint: ")[2]
    assert hint.startswith("f calls the custom op torchdiv_lead33::cube"), hint
    assert "method='auto'" in hint
    expected = (6 * x**2).sum(-1) if fn == "divergence" else None
    got = getattr(torchdiv, fn)(f, x, method="auto")
    if fn == "laplacian":  # each output's Laplacian: d2/dx_i2 (2 x_i**3) = 12 x_i
        expected = 12 * x
    if fn == "jacobian":
        expected = torch.diag_embed(6 * x**2)
    torch.testing.assert_close(got, expected)


@torch.library.custom_op("torchdiv_lead33::square", mutates_args=())
def _square(x: torch.Tensor) -> torch.Tensor:  # a NumPy kernel, as HPC codes write them
    return torch.from_numpy(x.detach().numpy() ** 2)


@torch.library.custom_op("torchdiv_lead33::square_backward", mutates_args=())
def _square_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(2 * x.detach().numpy() * grad.detach().numpy())


def _square_derivative(ctx: object, grad: torch.Tensor) -> torch.Tensor:
    (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
    return _square_backward(x, grad)  # (no derivative of its own)


_square.register_autograd(_square_derivative, setup_context=_setup)


@pytest.mark.parametrize(("fn", "method"), [("laplacian", "auto"), ("laplacian", "grad-of-grad")])
def test_backward_without_a_derivative_is_named_in_context(
    x: torch.Tensor, fn: str, method: str
) -> None:
    # first derivatives need no derivative of the backward: right (float64, the closed form)
    torch.testing.assert_close(torchdiv.divergence(_square, x), (2 * x).sum(-1))
    with pytest.raises(RuntimeError, match="no autograd formula was registered") as info:
        getattr(torchdiv, fn)(_square, x, method=method)
    text = str(info.value)
    assert text.startswith(f"{fn}: a backward pass through f(x) raised"), text
    assert "register_autograd for torchdiv_lead33.square_backward.default" in text


@torch.library.custom_op("torchdiv_lead33::centred", mutates_args=())
def _centred(x: torch.Tensor) -> torch.Tensor:  # mixes the samples inside its kernel
    return x - x.mean(0, keepdim=True)


_centred.register_fake(torch.empty_like)
_centred.register_autograd(lambda ctx, g: g - g.mean(0, keepdim=True))


def test_mixing_inside_a_custom_op_is_named_as_a_custom_op(x: torch.Tensor) -> None:
    with pytest.raises(torchdiv.BatchInteractionError) as info:
        torchdiv.divergence(_centred, x)
    assert "custom op torchdiv_lead33.centred" in str(info.value)  # not "ATen op"


def test_importing_opinfo_leaves_torch_backends_flags_settable() -> None:
    """``torch.testing._internal.common_utils`` freezes ``torch.backends``' flags at import:
    imported bare by test_opinfo33, a later test of the same worker that set
    ``torch.backends.fp32_precision`` raised (the full suite, test_merges19d)."""
    try:
        internal_module("common_methods_invocations")
    except ImportError as exc:  # (expecttest missing)
        pytest.skip(f"torch.testing._internal cannot be imported: {exc}")
    assert not torch.backends.flags_frozen()
