"""The hand-written divergence and Laplacian recipes people use (the seed threads), as baselines.

The demo and ``bench/`` time torchdiv against these; the tests check that each correct recipe
agrees with torchdiv and that ``ones_vjp`` is wrong. Each takes a batched ``f`` (one batch
dimension) and ``x`` and returns the per-sample divergence, shape ``(B,)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import hessian, jacfwd, jacrev, vmap

Function = Callable[[torch.Tensor], torch.Tensor]


def _per_sample(f: Function) -> Function:
    return lambda z: f(z.unsqueeze(0)).squeeze(0)


def _trace(jac: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    n = x[0].numel()
    return jac.reshape(x.shape[0], n, n).diagonal(dim1=1, dim2=2).sum(-1)


def vmap_jacrev(f: Function, x: torch.Tensor) -> torch.Tensor:
    """``torch.func``: ``vmap(jacrev(f_one_sample))`` then the trace."""
    return _trace(vmap(jacrev(_per_sample(f)))(x), x)


def vmap_jacfwd(f: Function, x: torch.Tensor) -> torch.Tensor:
    """``torch.func``: ``vmap(jacfwd(f_one_sample))`` then the trace."""
    return _trace(vmap(jacfwd(_per_sample(f)))(x), x)


def loop_grad(f: Function, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """The seed thread's loop: one ``autograd.grad`` per event element, keep entry ``i``.

    ``create_graph=True`` keeps the result differentiable (what a training loss needs).
    """
    x = x.detach().requires_grad_(True)
    y = f(x).reshape(x.shape[0], -1)
    total = torch.zeros(x.shape[0], dtype=x.dtype)
    for i in range(y.shape[1]):
        v = torch.zeros_like(y)
        v[:, i] = 1
        (g,) = torch.autograd.grad(y, x, v, retain_graph=True, create_graph=create_graph)
        total = total + g.reshape(x.shape[0], -1)[:, i]
    return total


def batched_grad(f: Function, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """``autograd.grad(..., is_grads_batched=True)`` over the whole identity basis at once."""
    x = x.detach().requires_grad_(True)
    y = f(x).reshape(x.shape[0], -1)
    n = y.shape[1]
    eye = torch.eye(n, dtype=y.dtype).unsqueeze(1).expand(n, *y.shape)
    (g,) = torch.autograd.grad(y, x, eye, is_grads_batched=True, create_graph=create_graph)
    return g.reshape(n, x.shape[0], n).diagonal(dim1=0, dim2=2).sum(-1)


def functional_jacobian(f: Function, x: torch.Tensor) -> torch.Tensor:
    """``torch.autograd.functional.jacobian``: the (B, n, B, n) cross-batch tensor, B x too big."""
    b, n = x.shape[0], x[0].numel()
    jac = torch.autograd.functional.jacobian(f, x).reshape(b, n, b, n)
    return jac.diagonal(dim1=0, dim2=2).diagonal(dim1=0, dim2=1).sum(-1)


def ones_vjp(f: Function, x: torch.Tensor) -> torch.Tensor:
    """WRONG, but common: ``grad(y, x, ones_like(y))`` gives column sums of J, not its trace."""
    x = x.detach().requires_grad_(True)
    y = f(x)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return g.reshape(x.shape[0], -1).sum(-1)


RECIPES: dict[str, Callable[[Function, torch.Tensor], torch.Tensor]] = {
    "torch.func vmap(jacrev)": vmap_jacrev,
    "torch.func vmap(jacfwd)": vmap_jacfwd,
    "loop of autograd.grad": loop_grad,
    "autograd.grad(is_grads_batched)": batched_grad,
    "autograd.functional.jacobian": functional_jacobian,
    "grad(y, x, ones) [wrong]": ones_vjp,
}


def vmap_hessian_trace(f: Function, x: torch.Tensor) -> torch.Tensor:
    """``torch.func``: ``vmap(hessian(f_one_sample))`` then the trace; ``f`` gives one scalar
    per sample, shape ``(B,)`` or ``(B, 1)``."""
    n = x[0].numel()
    h = vmap(hessian(lambda z: _per_sample(f)(z).sum()))(x)
    return h.reshape(x.shape[0], n, n).diagonal(dim1=1, dim2=2).sum(-1)


def grad_of_grad(f: Function, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """The PINN loop: the gradient with ``create_graph=True``, then one more ``autograd.grad``
    per input element, keeping entry ``i`` (``f``: one scalar per sample)."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    g = g.reshape(x.shape[0], -1)
    total = torch.zeros(x.shape[0], dtype=x.dtype)
    for i in range(g.shape[1]):
        (h,) = torch.autograd.grad(g[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        total = total + h.reshape(x.shape[0], -1)[:, i]
    return total


LAPLACIAN_RECIPES: dict[str, Callable[[Function, torch.Tensor], torch.Tensor]] = {
    "torch.func vmap(hessian)": vmap_hessian_trace,
    "loop of grad-of-grad": grad_of_grad,
}
