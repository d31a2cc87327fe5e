"""The linear ops written out over ``jac``'s directions (``_taylor.lifted``) against ``vmap``."""

from __future__ import annotations

import inspect

import pytest
import torch

import torchdiv
from torchdiv._taylor.jet import Context, Jet, full_jac, lifted_jac
from torchdiv._taylor.lifted import LIFTS, lifted

aten = torch.ops.aten
K = 3
INDEX = torch.tensor([2, 0, 2])
# (op, input shape, args, kwargs): negative dimensions and defaults included
CASES = [
    (aten.view.default, (4, 6), ([2, 12],), {}),
    (aten._unsafe_view.default, (4, 6), ([-1],), {}),
    (aten.reshape.default, (4, 6), ([4, 2, 3],), {}),
    (torch.reshape, (4, 6), ((24,),), {}),
    (aten.squeeze.dim, (4, 1, 6), (1,), {}),
    (aten.squeeze.dim, (4, 6), (-1,), {}),  # not of size 1: nothing squeezed
    (aten.squeeze.dims, (4, 1, 1), ([1, -1],), {}),
    (aten.squeeze.default, (1, 4, 1), (), {}),
    (torch.squeeze, (4, 1, 6), (1,), {}),
    (aten.unsqueeze.default, (4, 6), (-1,), {}),
    (aten.unsqueeze.default, (4, 6), (1,), {}),
    (aten.permute.default, (4, 5, 6), ([2, -3, 1],), {}),
    (aten.transpose.int, (4, 5, 6), (-1, 0), {}),
    (aten.movedim.int, (4, 5, 6), (0, -1), {}),
    (aten.t.default, (4, 6), (), {}),
    (aten.t.default, (4,), (), {}),
    (aten.expand.default, (4, 1, 6), ([4, 5, 6],), {}),
    (aten.expand.default, (4, 6), ([2, 4, 6],), {}),  # adds a dimension: vmap
    (aten.clone.default, (4, 6), (), {}),
    (aten.alias.default, (4, 6), (), {}),
    (aten._to_copy.default, (4, 6), (), {"dtype": torch.float64}),
    (aten.to.dtype, (4, 6), (torch.float64,), {}),
    (aten.neg.default, (4, 6), (), {}),
    (aten.sum.dim_IntList, (4, 5, 6), ([-1, 1],), {}),
    (aten.sum.dim_IntList, (4, 5, 6), ([0],), {"keepdim": True}),
    (aten.sum.dim_IntList, (4, 5, 6), ([],), {}),  # every dimension
    (torch.sum, (4, 5, 6), ((1, 2),), {"keepdim": True}),
    (aten.mean.dim, (4, 5, 6), ([-2],), {}),
    (torch.mean, (4, 5, 6), ((0,),), {"keepdim": True}),
    (aten.sum.default, (4, 5), (), {}),
    (aten.mean.default, (4, 5), (), {}),
    (aten.slice.Tensor, (4, 6), (1, 1, 5, 2), {}),
    (aten.slice.Tensor, (4, 6), (-2,), {}),
    (aten.select.int, (4, 6), (-1, 3), {}),
    (aten.narrow.default, (4, 6), (1, 2, 3), {}),
    (aten.index_select.default, (4, 6), (-1, INDEX), {}),
    (aten.cumsum.default, (4, 6), (-1,), {}),
    (aten.unfold.default, (4, 6), (1, 2, 2), {}),
    (aten.flip.default, (4, 5, 6), ([0, -1],), {}),
    (aten.diagonal.default, (4, 5, 6), (1, -1, 0), {}),
    (aten.gather.default, (4, 6), (1, INDEX.expand(4, 3)), {}),
    (aten.split.Tensor, (4, 6), (4, -1), {}),
    (aten.split_with_sizes.default, (4, 6), ([1, 3], 0), {}),
    (aten.unbind.int, (4, 5), (-1,), {}),
]


def _case_id(value) -> str:
    """A parameter's test id, the same in every process (a built-in function's ``str`` holds
    its address, which pytest-xdist's workers do not share)."""
    return f"torch.{value.__name__}" if inspect.isbuiltin(value) else str(value)


def _vmapped(op, jac: torch.Tensor, args, kwargs):
    return torch.vmap(lambda j: op(j, *args, **kwargs))(jac)


@pytest.mark.parametrize("broadcast", [False, True], ids=["full", "broadcast"])
@pytest.mark.parametrize(("op", "shape", "args", "kwargs"), CASES, ids=_case_id)
def test_lifted_jac_matches_vmap(op, shape, args, kwargs, broadcast):
    torch.manual_seed(0)
    value = torch.randn(shape, dtype=torch.float64)
    # a jac stored once for every sample (a first layer's) is broadcast along dimension 0
    jac_shape = (K, 1, *shape[1:]) if broadcast else (K, *shape)
    a = Jet(value, torch.randn(jac_shape, dtype=torch.float64), None)
    ctx = Context(K, True)
    out = op(value, *args, **kwargs)
    got = lifted_jac(ctx, op, a, out, args, kwargs)
    expected = _vmapped(op, full_jac(ctx, a).contiguous(), args, kwargs)
    pairs = zip(got, expected, strict=True) if isinstance(out, (list, tuple)) else [(got, expected)]
    for g, e in pairs:
        # a jac may stay broadcast: it must broadcast to the expected one, with its values
        assert g.dim() == e.dim()
        torch.testing.assert_close(g.expand(e.shape), e, rtol=1e-14, atol=1e-14)


def test_every_lifted_op_is_tested():
    assert {op for op, *_ in CASES} == set(LIFTS)


def test_no_lift_for_zero_dimensional_inputs():
    assert lifted(aten.sum.default, 0) is None


def test_laplacian_through_views_and_reductions_matches_the_loop():
    """A function of many view, slice and reduction ops: ``taylor`` (lifted ops) agrees with
    the loop of backward passes, values and parameter gradients."""
    torch.manual_seed(0)
    w = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)

    def f(x):
        h = torch.tanh(x @ w).unsqueeze(1).permute(0, 2, 1)  # (B, 6, 1)
        a, b = h.split([2, 4], dim=1)
        s = torch.cat([a.flip(1), b.narrow(1, 1, 2)], 1).squeeze(-1)  # (B, 4)
        s = s.cumsum(-1).movedim(0, -1).t()  # (B, 4)
        trace = s.reshape(-1, 2, 2).diagonal(0, -2, -1).sum(-1, keepdim=True)
        return (s.sin() * trace).mean(-1) + s.unbind(1)[2] ** 2

    x = torch.randn(5, 6, dtype=torch.float64)
    taylor = torchdiv.laplacian(f, x, method="taylor")
    loop = torchdiv.laplacian(f, x, method="grad-of-grad")
    torch.testing.assert_close(taylor, loop, rtol=1e-10, atol=1e-10)
    (g_taylor,) = torch.autograd.grad(taylor.sum(), w)
    (g_loop,) = torch.autograd.grad(loop.sum(), w)
    torch.testing.assert_close(g_taylor, g_loop, rtol=1e-10, atol=1e-10)
