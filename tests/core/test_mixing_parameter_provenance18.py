"""paramonly18: a factorization of a tensor built from parameters, buffers and numbers
alone keeps the sample-mixing watch's pass, as one of a parameter itself does.

rev-watch18 counted ``cholesky``/``inv``/``solve``/``lu_factor``/``ldl_factor``/``lstsq`` as
raising on values (a ``try:`` whose ``except`` branch mixes samples). On a matrix built from
parameters (Glow's LU 1x1 map run inverse, ``inverse(P @ L @ U)``; ``orthogonal(...,
orthogonal_map="cayley")``'s solve; ``cholesky(W @ W.T + eps * I)``) every call was then
watched. The watch now follows which tensors are built from tensors held before the call
(``BatchAxes.built``) and keeps the pass while those, and the numbers the modules hold
(``Numbers``), are the same. The attacks: a matrix built from ``x`` too, from a module's
number that changes between calls, from a tensor ``f`` writes in place, from a random draw or
from values no op made (``torch.tensor(...)``): each must be watched again, the ``except``
branch refused, not served by the first call's pass.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator

import pytest
import torch

import torchdiv
from tests.conftest import assert_same_parameter_gradients, reference_divergence
from torchdiv import BatchInteractionError

f64 = torch.float64


class InvertibleLU(torch.nn.Module):
    """Glow's invertible 1x1 map with an LU-decomposed weight ``W = P L (U + diag(s e^w))``
    (Kingma and Dhariwal, 2018) on vectors: ``P``, the masks, the signs and the identity as
    buffers, ``L``, ``U`` and ``log|s|`` as parameters. ``reverse`` runs it inverse."""

    def __init__(self, d: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(d, d, dtype=f64))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        u_mask = torch.ones(d, d, dtype=f64).triu(1)
        self.register_buffer("w_p", p)
        self.register_buffer("u_mask", u_mask)
        self.register_buffer("l_mask", u_mask.T.clone())
        self.register_buffer("s_sign", torch.sign(s))
        self.register_buffer("l_eye", torch.eye(d, dtype=f64))
        self.w_l = torch.nn.Parameter(lower)
        self.w_s = torch.nn.Parameter(s.abs().log())
        self.w_u = torch.nn.Parameter(upper.triu(1))

    def weight(self) -> torch.Tensor:
        lower = self.w_l * self.l_mask + self.l_eye
        upper = self.w_u * self.u_mask + torch.diag(self.s_sign * torch.exp(self.w_s))
        return self.w_p @ lower @ upper

    def reverse(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight().inverse().T


class GlowInverse(torch.nn.Module):
    """A flow's inverse direction: the LU map run inverse, then a tanh MLP."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lu = InvertibleLU(d)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(d, 8), torch.nn.Tanh(), torch.nn.Linear(8, d)
        )
        self.to(f64)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.lu.reverse(z))


class Regularised(torch.nn.Module):
    """``tanh(x) @ chol(M)`` with ``M = W W^T + eps I`` (``matrix``: how ``M`` is made; one
    per sample, ``(B, 3, 3)``, or one for all), or, where the factorization fails, a fallback
    that scales each sample by the batch mean (mixes samples)."""

    def __init__(self, matrix: Callable[[Regularised, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(3, 3, dtype=f64))
        self.register_buffer("M", torch.eye(3, dtype=f64))
        self.eps, self.scale, self.matrix = 1e-3, 1, matrix
        self.config = types.SimpleNamespace(eps=0.0)
        self.schedule: Iterator[float] = iter(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x)
        try:
            return torch.einsum("...i,...ij->...j", h, torch.linalg.cholesky(self.matrix(self, x)))
        except RuntimeError:
            return h * h.mean(0)


def _eps_literal(net: Regularised, x: torch.Tensor) -> torch.Tensor:
    return net.W @ net.W.T + 1e-3 * torch.eye(3, dtype=f64)


def test_glow_s_lu_map_run_inverse_is_watched_once(watches: list[int]) -> None:
    """``z @ inverse(P L U)^T``: watched once over new ``z`` (per-sample float64 divergences
    and parameter gradients against ``torch.func``'s whole-batch Jacobian), again after a
    step writes ``log|s|``."""
    torch.manual_seed(0)
    net = GlowInverse(3)
    for _ in range(3):
        z = torch.randn(4, 3, dtype=f64)
        div = torchdiv.divergence(net, z)
        want = reference_divergence(net, z)
        torch.testing.assert_close(div, want, rtol=1e-12, atol=1e-12)
        assert_same_parameter_gradients(net, div.square().sum(), want.square().sum())
    assert len(watches) == 1
    with torch.no_grad():
        net.lu.w_s.add_(0.1)
    torchdiv.divergence(net, z)
    assert len(watches) == 2


def test_a_cayley_orthogonal_layer_is_watched_once(watches: list[int]) -> None:
    """``orthogonal(lin, orthogonal_map="cayley")`` solves with ``I - A / 2`` built from the
    parameter (and the ``base`` buffer): watched once (per-sample float64 values)."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(3, 3).to(f64)
    torch.nn.utils.parametrizations.orthogonal(lin, orthogonal_map="cayley")
    net = torch.nn.Sequential(lin, torch.nn.Tanh())
    for _ in range(3):
        x = torch.randn(4, 3, dtype=f64)
        want = reference_divergence(net, x).detach()
        torch.testing.assert_close(torchdiv.divergence(net, x), want, rtol=1e-12, atol=1e-12)
    assert len(watches) == 1


@pytest.mark.parametrize("eps", ["literal", "attribute"])
def test_a_cholesky_of_w_w_t_plus_eps_i_is_watched_once(eps: str, watches: list[int]) -> None:
    """``cholesky(W @ W.T + eps * I)``, ``eps`` written in the code or a module's ``float``
    that stays: watched once (per-sample float64 values)."""
    torch.manual_seed(2)
    attribute = lambda net, x: net.W @ net.W.T + net.eps * torch.eye(3, dtype=f64)  # noqa: E731
    net = Regularised(_eps_literal if eps == "literal" else attribute)
    for _ in range(3):
        x = torch.randn(4, 3, dtype=f64)
        want = reference_divergence(net, x).detach()
        torch.testing.assert_close(torchdiv.divergence(net, x), want, rtol=1e-12, atol=1e-12)
    assert len(watches) == 1


def test_a_matrix_built_from_parameters_and_x_is_watched_at_every_call(
    watches: list[int],
) -> None:
    """``W W^T`` plus a per-sample outer product of ``x``: each call is watched, and a later
    ``x`` that makes one sample's matrix indefinite takes the fallback, refused."""

    def matrix(net: Regularised, x: torch.Tensor) -> torch.Tensor:
        return net.W @ net.W.T + x[:, :, None] * x[:, None, :] * x[:, :1, None]

    torch.manual_seed(3)
    net = Regularised(matrix)
    net.W.data = torch.eye(3, dtype=f64)
    x = torch.rand(4, 3, dtype=f64) * 0.1
    for _ in range(2):
        torchdiv.divergence(net, x)
    assert len(watches) == 2
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(net, torch.cat([x[:3], -2 * torch.ones(1, 3, dtype=f64)]))


@pytest.mark.parametrize("number", ["eps", "scale", "config"])
def test_a_module_s_number_that_changes_is_watched_again(number: str) -> None:
    """``cholesky(W W^T + eps I)`` with ``eps`` a module's ``float`` (or ``scale`` its
    ``int``, or a configuration object's ``eps``), which the structure key does not hold:
    set negative after a passed call, the fallback is refused, not served by the pass."""

    def matrix(net: Regularised, x: torch.Tensor) -> torch.Tensor:
        eps = net.eps + net.scale + net.config.eps
        return net.W @ net.W.T + eps * torch.eye(3, dtype=f64)

    torch.manual_seed(4)
    net = Regularised(matrix)
    x = torch.randn(4, 3, dtype=f64)
    torchdiv.divergence(net, x)
    if number == "config":
        net.config.eps = -100.0
    else:
        setattr(net, number, -100.0 if number == "eps" else -100)
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(net, x)


def _written_buffer(net: Regularised, x: torch.Tensor) -> torch.Tensor:
    net.M.data = torch.eye(3, dtype=f64) * next(net.schedule)  # (no version counts it)
    return net.W @ net.W.T + net.M


def _written_view(net: Regularised, x: torch.Tensor) -> torch.Tensor:
    m = net.W @ net.W.T + torch.eye(3, dtype=f64)
    m.diagonal().copy_(torch.tensor(next(net.schedule), dtype=f64).expand(3))
    return m


@pytest.mark.parametrize("matrix", [_written_buffer, _written_view], ids=["buffer", "view"])
def test_a_matrix_written_in_place_by_f_is_watched_again(
    matrix: Callable[[Regularised, torch.Tensor], torch.Tensor],
) -> None:
    """``f`` writes the buffer ``M`` (from a schedule, through ``.data =``) before building
    ``W W^T + M``, or writes the built matrix's diagonal from a Python number: at each call's
    start the buffer holds the last call's value; the third call's write makes the matrix
    indefinite."""
    torch.manual_seed(5)
    net = Regularised(matrix)
    net.W.data = 0.1 * torch.eye(3, dtype=f64)
    net.schedule = iter([1.0, 1.0, -100.0])  # (state no key or pass holds)
    x = torch.randn(4, 3, dtype=f64)
    for _ in range(2):
        torchdiv.divergence(net, x)
    with pytest.raises(BatchInteractionError):
        torchdiv.divergence(net, x)


def _drawn(net: Regularised, x: torch.Tensor) -> torch.Tensor:
    return net.W @ net.W.T + torch.randn(3, 3, dtype=f64).abs()


def _made_without_an_op(net: Regularised, x: torch.Tensor) -> torch.Tensor:
    return net.W @ net.W.T + torch.tensor([1.0, 2.0, 3.0], dtype=f64).diag()


@pytest.mark.parametrize("matrix", [_drawn, _made_without_an_op], ids=["randn", "tensor"])
def test_a_matrix_built_from_values_no_held_tensor_holds_is_watched_at_every_call(
    matrix: Callable[[Regularised, torch.Tensor], torch.Tensor], watches: list[int]
) -> None:
    """A random draw (other values at every call) or ``torch.tensor`` of a list (state the
    key does not hold) in the matrix: watched at every call."""
    torch.manual_seed(6)
    net = Regularised(matrix)
    x = torch.randn(4, 3, dtype=f64)
    for _ in range(3):
        torchdiv.divergence(net, x)
    assert len(watches) == 3
