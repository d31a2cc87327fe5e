"""The lead's checks of the thirty-fourth session: refusals name a way out that runs.

- ``laplacian(method="taylor")`` refuses a ``torch.library`` custom op with a registered
  derivative (the Taylor engine has no rule for it); its way out, ``"auto"``, differentiates
  the op by its loop of backward passes: the message must not name forward over reverse,
  which refuses custom ops (``torch.func``'s ``setup_context`` error).
- Forward over reverse refuses ``eigvalsh`` at the Laplacian's parameter gradients (PyTorch's
  forward-mode derivatives are ``nan`` there) naming ``'taylor' or 'grad-of-grad'``; of a
  complex matrix, ``"taylor"`` refuses too (no complex rules): only ``'grad-of-grad'`` is
  named, and it runs.
- ``graph_divergence`` through an op without a derivative (``geqrf``): the batched backward
  pass raises, then the first pass per product; that was reported as a graph that "cannot be
  walked twice", though no walk had gone through (rev-late33): now what happened.
"""

from __future__ import annotations

import pytest
import torch
from test_lead33 import f

import torchdiv


def test_laplacian_taylor_refusal_of_a_custom_op_names_a_way_out_that_runs() -> None:
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(NotImplementedError, match="torchdiv_lead33") as info:
        torchdiv.laplacian(f, x, method="taylor")
    way = str(info.value).partition("; use ")[2]
    assert way.startswith("method='auto'") and "forward-over-reverse" not in way, way
    with pytest.raises(RuntimeError, match="setup_context"):  # the engine not to name
        torchdiv.laplacian(f, x, method="forward-over-reverse")
    # the way out: each output's Laplacian of 2 x_i**3 is 12 x_i (float64, a few ops)
    torch.testing.assert_close(torchdiv.laplacian(f, x, method="auto"), 12 * x)


def hermitian_spectrum(z: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of ``c c^H + c c^H^H + diag(0, 1, 2, 3)``, ``c`` the complex 4-vector
    of the sample's 8 real inputs (distinct eigenvalues: smooth there)."""
    c = torch.view_as_complex(z.reshape(*z.shape[:-1], 4, 2))
    a = c[..., :, None] * c.conj()[..., None, :]
    shift = torch.diag(torch.arange(4.0, dtype=z.dtype)).to(a.dtype)
    return torch.linalg.eigvalsh(a + a.mH + shift)


@pytest.mark.parametrize("method", ["forward-over-reverse", "hessian"])
def test_complex_eigvalsh_refusal_names_only_a_way_out_that_runs(method: str) -> None:
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with pytest.raises(NotImplementedError, match="eigvalsh") as info:
        torchdiv.laplacian(hermitian_spectrum, x, method=method)
    assert str(info.value).endswith("use method='grad-of-grad'"), str(info.value)
    with pytest.raises(NotImplementedError, match="no propagation rule"):  # what it left out
        torchdiv.laplacian(hermitian_spectrum, x, method="taylor")
    got = torchdiv.laplacian(hermitian_spectrum, x, method="grad-of-grad")
    # reference: the per-sample Hessians' traces by a float64 loop of autograd.grad
    expected = torch.tensor(
        [
            [
                torch.autograd.functional.hessian(
                    lambda z, i=i: hermitian_spectrum(z)[i], sample
                ).trace()
                for i in range(4)
            ]
            for sample in x
        ],
        dtype=x.dtype,
    )
    torch.testing.assert_close(got, expected)


def test_a_graph_whose_backward_always_raises_is_not_called_walked_twice() -> None:
    x = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.geqrf(x)[0]
    with pytest.raises(RuntimeError, match="derivative for 'geqrf' is not implemented") as info:
        torchdiv.graph_divergence(y, x)
    assert "walked twice" not in str(info.value)
    assert "raised in a batched backward pass and again one product at a time" in str(info.value)


class _RaisingBackward(torch.autograd.Function):
    """A per-sample forward whose backward raises the user's own error."""

    @staticmethod
    def forward(ctx: object, z: torch.Tensor) -> torch.Tensor:
        return 2 * z

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        raise ValueError("my backward bug")


@pytest.mark.parametrize("fn", ["divergence", "laplacian"])
def test_a_custom_backwards_own_error_keeps_its_type(fn: str) -> None:
    """The watch's check of a custom Function's backward (mixsweep34) runs it: the user's
    ``ValueError`` came out as a ``RuntimeError`` that blamed an old-style checkpoint from the
    Laplacian (rev-late34); now of its own type, its message first."""
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^my backward bug"):
        getattr(torchdiv, fn)(lambda z: _RaisingBackward.apply(z).tanh(), x)
