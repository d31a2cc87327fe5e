"""The hand-written recipes people use (the seed threads), as baselines.

``python -m torchdiv bench`` and ``bench/`` time torchdiv against these; the tests check that
each correct recipe agrees with torchdiv and that ``ones_vjp`` is wrong. Each takes a batched
``f`` (one batch dimension) and ``x``. The ``*_jacobian`` recipes return the per-sample Jacobian
of the flattened events, shape ``(B, m, n)``; the divergence recipes (``RECIPES``) return the
per-sample trace and the Laplacian recipes (``LAPLACIAN_RECIPES``, for one scalar per sample)
the per-sample Laplacian, both shape ``(B,)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import hessian, jacfwd, jacrev, vmap

Function = Callable[[torch.Tensor], torch.Tensor]


def _per_sample(f: Function) -> Function:
    return lambda z: f(z.unsqueeze(0)).squeeze(0)


def _flat(jac: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B, *y_event, *x_event)`` -> ``(B, m, n)``."""
    return jac.reshape(x.shape[0], -1, x[0].numel())


def trace(jac: torch.Tensor) -> torch.Tensor:
    """Per-sample trace of ``(B, n, n)`` Jacobians."""
    return jac.diagonal(dim1=1, dim2=2).sum(-1)


def vmap_jacrev_jacobian(f: Function, x: torch.Tensor) -> torch.Tensor:
    """``torch.func``: ``vmap(jacrev(f_one_sample))``, shape ``(B, m, n)``."""
    return _flat(vmap(jacrev(_per_sample(f)))(x), x)


def vmap_jacfwd_jacobian(f: Function, x: torch.Tensor) -> torch.Tensor:
    """``torch.func``: ``vmap(jacfwd(f_one_sample))``, shape ``(B, m, n)``."""
    return _flat(vmap(jacfwd(_per_sample(f)))(x), x)


def functional_jacobian(f: Function, x: torch.Tensor) -> torch.Tensor:
    """``torch.autograd.functional.jacobian``: builds the ``(B, m, B, n)`` cross-batch tensor,
    ``B`` times too big, and keeps its diagonal blocks, shape ``(B, m, n)``."""
    b, n = x.shape[0], x[0].numel()
    jac: torch.Tensor = torch.autograd.functional.jacobian(f, x)
    jac = jac.reshape(b, -1, b, n)
    return jac.diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _loop_rows(f: Function, x: torch.Tensor, create_graph: bool) -> Iterator[torch.Tensor]:
    """The seed thread's loop: ``autograd.grad`` with ``e_i`` in every sample gives row ``i`` of
    every sample's Jacobian, shape ``(B, n)``, one output element at a time."""
    x = x.detach().requires_grad_(True)
    y = f(x).reshape(x.shape[0], -1)
    for i in range(y.shape[1]):
        v = torch.zeros_like(y)
        v[:, i] = 1
        (g,) = torch.autograd.grad(y, x, v, retain_graph=True, create_graph=create_graph)
        yield g.reshape(x.shape[0], -1)


def loop_grad_jacobian(f: Function, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """The loop's rows stacked: the per-sample Jacobian, shape ``(B, m, n)``."""
    return torch.stack(list(_loop_rows(f, x, create_graph)), dim=1)


def loop_grad_diagonal(f: Function, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """The loop keeping only entry ``i`` of row ``i``, shape ``(B, n)`` (copied out of the row,
    so each row is freed as the loop goes on)."""
    rows = _loop_rows(f, x, create_graph)
    return torch.stack([row[:, i].clone() for i, row in enumerate(rows)], dim=1)


def vmap_jacrev(f: Function, x: torch.Tensor) -> torch.Tensor:
    """``torch.func``: ``vmap(jacrev(f_one_sample))`` then the trace."""
    return trace(vmap_jacrev_jacobian(f, x))


def vmap_jacfwd(f: Function, x: torch.Tensor) -> torch.Tensor:
    """``torch.func``: ``vmap(jacfwd(f_one_sample))`` then the trace."""
    return trace(vmap_jacfwd_jacobian(f, x))


def loop_grad(f: Function, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """The seed thread's loop: one ``autograd.grad`` per event element, keep entry ``i``.

    ``create_graph=True`` keeps the result differentiable (what a training loss needs).
    """
    return loop_grad_diagonal(f, x, create_graph).sum(-1)


def batched_grad(f: Function, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """``autograd.grad(..., is_grads_batched=True)`` over the whole identity basis at once."""
    x = x.detach().requires_grad_(True)
    y = f(x).reshape(x.shape[0], -1)
    n = y.shape[1]
    eye = torch.eye(n, dtype=y.dtype, device=y.device).unsqueeze(1).expand(n, *y.shape)
    (g,) = torch.autograd.grad(y, x, eye, is_grads_batched=True, create_graph=create_graph)
    return g.reshape(n, x.shape[0], n).diagonal(dim1=0, dim2=2).sum(-1)


def zuko_trace(f: Function, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """zuko's exact trace (its free-form Jacobian transform): one ``autograd.grad`` whose
    cotangents are the identity of the event expanded over the batch and moved to the front
    (``is_grads_batched=True``), then the trace of the first and last dimensions."""
    x = x.detach().requires_grad_(True)
    y = f(x).reshape(x.shape[0], -1)
    n = y.shape[-1]
    eye = torch.eye(n, dtype=y.dtype, device=y.device).expand(*y.shape, n).movedim(-1, 0)
    (rows,) = torch.autograd.grad(y, x, eye, create_graph=create_graph, is_grads_batched=True)
    return torch.einsum("i...i", rows.reshape(n, x.shape[0], n))


def torchdyn_trace(f: Function, x: torch.Tensor) -> torch.Tensor:
    """torchdyn's ``autograd_trace``: for each event element ``i``, the gradient of the batch's
    sum of output ``i``, entry ``i`` kept; always ``create_graph=True``, as in torchdyn."""
    x = x.detach().requires_grad_(True)
    y = f(x).reshape(x.shape[0], -1)
    total = x.new_zeros(x.shape[0])
    for i in range(y.shape[1]):
        (g,) = torch.autograd.grad(y[:, i].sum(), x, create_graph=True)
        total = total + g.reshape(x.shape[0], -1)[:, i]
    return total


def functional_divergence(f: Function, x: torch.Tensor) -> torch.Tensor:
    """``torch.autograd.functional.jacobian`` then the trace of each diagonal block."""
    return trace(functional_jacobian(f, x))


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
    "autograd.functional.jacobian": functional_divergence,
    "grad(y, x, ones) [wrong]": ones_vjp,
}


def vmap_hessian_trace(f: Function, x: torch.Tensor) -> torch.Tensor:
    """``torch.func``: ``vmap(hessian(f_one_sample))`` then the trace; ``f`` gives one scalar
    per sample, shape ``(B,)`` or ``(B, 1)``."""
    n = x[0].numel()
    h: torch.Tensor = vmap(hessian(lambda z: _per_sample(f)(z).sum()))(x)
    return h.reshape(x.shape[0], n, n).diagonal(dim1=1, dim2=2).sum(-1)


def grad_of_grad(f: Function, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """The PINN loop: the gradient with ``create_graph=True``, then one more ``autograd.grad``
    per input element, keeping entry ``i`` (``f``: one scalar per sample)."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    g = g.reshape(x.shape[0], -1)
    total = x.new_zeros(x.shape[0])
    for i in range(g.shape[1]):
        (h,) = torch.autograd.grad(g[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        total = total + h.reshape(x.shape[0], -1)[:, i]
    return total


def dual_grad_loop(f: Function, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Forward over reverse with ``torch.autograd`` alone (``forward_ad``, no ``torch.func``):
    the gradient at the dual input ``x + eps e_i`` has Hessian column ``i`` as its tangent; one
    backward pass per input element, keeping entry ``i`` (``f``: one scalar per sample). It
    differentiates PyTorch's own formulas: values are right, but its gradients (a third
    derivative) are not for ``slogdet``, ``det``, ``solve`` (see ``torchdiv._core.modes``)."""
    primal = x.detach().requires_grad_(True)
    flat = primal.new_zeros(x.shape[0], x[0].numel())
    total = x.new_zeros(x.shape[0])
    for i in range(flat.shape[1]):
        tangent = flat.clone()
        tangent[:, i] = 1
        with fwAD.dual_level():
            dual = fwAD.make_dual(primal, tangent.view_as(x))
            (g,) = torch.autograd.grad(f(dual).sum(), primal, create_graph=True)
            column = fwAD.unpack_dual(g).tangent  # None: the gradient is constant along e_i
        entry = x.new_zeros(x.shape[0]) if column is None else column.reshape(x.shape[0], -1)[:, i]
        total = total + (entry if create_graph else entry.detach())
    return total


LAPLACIAN_RECIPES: dict[str, Callable[[Function, torch.Tensor], torch.Tensor]] = {
    "torch.func vmap(hessian)": vmap_hessian_trace,
    "loop of grad-of-grad": grad_of_grad,
    "forward-over-reverse (autograd.forward_ad)": dual_grad_loop,
}
