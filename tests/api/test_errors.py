"""Every validation error: type, and a message naming the argument and the shapes."""

from __future__ import annotations

import pytest
import torch

import torchdiv

x = torch.randn(4, 3)
square = torch.sin


@pytest.mark.parametrize("fn", ["divergence", "jacobian", "jacobian_diagonal"])
class TestFunctionForm:
    def test_x_not_a_tensor(self, fn):
        with pytest.raises(TypeError, match=rf"{fn}: x must be a torch.Tensor, got list"):
            getattr(torchdiv, fn)(square, [1.0, 2.0])

    def test_x_not_floating(self, fn):
        with pytest.raises(TypeError, match=rf"{fn}: x must have a floating dtype.*torch.int64"):
            getattr(torchdiv, fn)(square, torch.arange(6).reshape(2, 3))

    @pytest.mark.parametrize("bad", [-1, 3])
    def test_batch_dims_out_of_range(self, fn, bad):
        with pytest.raises(
            ValueError,
            match=rf"{fn}: batch_dims must be in \[0, x.dim\(\)\] = \[0, 2\] for x of shape "
            rf"\(4, 3\), got {bad}",
        ):
            getattr(torchdiv, fn)(square, x, batch_dims=bad)

    @pytest.mark.parametrize("bad", [1.0, True, "1"])
    def test_batch_dims_not_int(self, fn, bad):
        with pytest.raises(TypeError, match=rf"{fn}: batch_dims must be an int, got"):
            getattr(torchdiv, fn)(square, x, batch_dims=bad)

    def test_f_not_callable(self, fn):
        with pytest.raises(TypeError, match=rf"{fn}: f must be callable.*got Tensor"):
            getattr(torchdiv, fn)(x, x)

    @pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
    def test_f_changes_batch_shape(self, fn, method):
        with pytest.raises(
            ValueError,
            match=rf"{fn}: f\(x\) changed the batch shape: f\(x\) has shape \(3,\) and x has "
            r"shape \(4, 3\)",
        ):
            getattr(torchdiv, fn)(lambda z: z.sum(0), x, method=method)

    @pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
    def test_f_returns_non_tensor(self, fn, method):
        with pytest.raises(TypeError, match=rf"{fn}: f\(x\) must be a torch.Tensor, got tuple"):
            getattr(torchdiv, fn)(lambda z: (z, z), x, method=method)

    def test_f_returns_integer_tensor(self, fn):
        with pytest.raises(TypeError, match=rf"{fn}: f\(x\) must be a floating tensor.*int64"):
            getattr(torchdiv, fn)(lambda z: torch.zeros(4, 3, dtype=torch.long), x)

    def test_unknown_method_lists_valid_ones(self, fn):
        with pytest.raises(
            ValueError,
            match=rf"{fn}: unknown method 'jacrev'; valid methods are 'auto', 'forward', "
            r"'reverse'",
        ):
            getattr(torchdiv, fn)(square, x, method="jacrev")

    @pytest.mark.parametrize("bad", [0, -3])
    def test_chunk_size_below_one(self, fn, bad):
        with pytest.raises(ValueError, match=rf"{fn}: chunk_size must be at least 1.*got {bad}"):
            getattr(torchdiv, fn)(square, x, chunk_size=bad)

    def test_chunk_size_not_int(self, fn):
        with pytest.raises(TypeError, match=rf"{fn}: chunk_size must be an int or None, got float"):
            getattr(torchdiv, fn)(square, x, chunk_size=2.0)


@pytest.mark.parametrize("fn", ["divergence", "jacobian_diagonal"])
@pytest.mark.parametrize("method", ["auto", "forward", "reverse", "structured"])
def test_non_square_jacobian(fn, method):
    with pytest.raises(
        ValueError,
        match=rf"{fn}: needs a square Jacobian, but the event of f\(x\) \(shape \(2,\)\) and the "
        r"event of x \(shape \(3,\)\) differ in size; full shapes \(4, 2\) and \(4, 3\)",
    ):
        getattr(torchdiv, fn)(lambda z: z[:, :2], x, method=method)


def test_num_probes_with_exact_method():
    with pytest.raises(ValueError, match=r"divergence: num_probes is only used by stochastic"):
        torchdiv.divergence(square, x, num_probes=4)


def test_unknown_method_is_reported_before_num_probes():
    with pytest.raises(ValueError, match=r"divergence: unknown method 'hutch'; valid.*'xtrace'"):
        torchdiv.divergence(square, x, method="hutch", num_probes=4)


def test_generator_type():
    with pytest.raises(TypeError, match=r"divergence: generator must be a torch.Generator"):
        torchdiv.divergence(square, x, generator=42)


class TestGraphForm:
    def test_x_does_not_require_grad(self):
        y = x.sin()
        for fn in (torchdiv.graph_divergence, torchdiv.graph_jacobian):
            with pytest.raises(ValueError, match=r"graph_\w+: x does not require grad"):
                fn(y, x)

    def test_y_not_computed_from_x(self):
        xg = x.clone().requires_grad_(True)
        other = torch.randn(4, 3, requires_grad=True)
        for fn in (torchdiv.graph_divergence, torchdiv.graph_jacobian):
            with pytest.raises(ValueError, match=r"graph_\w+: y was not computed from x"):
                fn(other * 2, xg)

    def test_y_from_flattened_copy(self):
        """The seed thread's mistake: differentiating w.r.t. x.flatten(1) made after y."""
        xg = torch.randn(2, 3, 2, requires_grad=True)
        y = (xg**2).flatten(1)
        with pytest.raises(ValueError, match=r"graph_divergence: y was not computed from x"):
            torchdiv.graph_divergence(y, xg.flatten(1))

    def test_y_not_a_tensor(self):
        xg = x.clone().requires_grad_(True)
        with pytest.raises(TypeError, match=r"graph_jacobian: y must be a torch.Tensor"):
            torchdiv.graph_jacobian([xg], xg)

    def test_batch_shape_mismatch(self):
        xg = x.clone().requires_grad_(True)
        with pytest.raises(
            ValueError,
            match=r"graph_jacobian: y changed the batch shape: y has "
            r"shape \(3,\) and x has shape \(4, 3\)",
        ):
            torchdiv.graph_jacobian(xg.sum(0), xg)

    def test_non_square(self):
        xg = x.clone().requires_grad_(True)
        with pytest.raises(ValueError, match=r"graph_divergence: needs a square Jacobian.*\(2,\)"):
            torchdiv.graph_divergence(xg[:, :2], xg)

    def test_unknown_method(self):
        xg = x.clone().requires_grad_(True)
        with pytest.raises(
            ValueError,
            match=r"graph_divergence: unknown method 'forward'; "
            r"valid methods are 'auto', 'reverse'",
        ):
            torchdiv.graph_divergence(xg.sin(), xg, method="forward")

    def test_chunk_size(self):
        xg = x.clone().requires_grad_(True)
        with pytest.raises(ValueError, match=r"graph_jacobian: chunk_size must be at least 1"):
            torchdiv.graph_jacobian(xg.sin(), xg, chunk_size=0)

    def test_create_graph_must_be_a_bool(self):
        xg = x.clone().requires_grad_(True)
        for fn in (torchdiv.graph_divergence, torchdiv.graph_jacobian):
            with pytest.raises(TypeError, match=r"graph_\w+: create_graph must be True or False"):
                fn(xg.sin(), xg, create_graph="yes")

    def test_sibling_output_is_not_x(self):
        """a and b come out of one node (chunk): y built from b does not depend on a."""
        h = torch.randn(4, 6, requires_grad=True) * 1.0
        a, b = h.chunk(2, dim=1)
        with pytest.raises(ValueError, match=r"graph_divergence: y was not computed from x"):
            torchdiv.graph_divergence(b.sin(), a)
        assert torch.allclose(torchdiv.graph_divergence(a.sin(), a), a.detach().cos().sum(-1))

    def test_num_probes_with_exact_method(self):
        xg = x.clone().requires_grad_(True)
        with pytest.raises(ValueError, match=r"graph_divergence: num_probes is only used"):
            torchdiv.graph_divergence(xg.sin(), xg, num_probes=3)


@pytest.mark.parametrize("fn", ["divergence", "jacobian", "jacobian_diagonal", "laplacian"])
def test_dual_x_is_refused_and_jvp_of_the_call_is_the_way(fn):
    """A tangent the caller put on ``x`` with ``forward_ad.make_dual`` came back dropped (no
    tangent on the result, or one only on a tiny problem's first call): refused, naming
    ``torch.func.jvp``, whose tangent is checked against float64 central differences."""
    import torch.autograd.forward_ad as forward_ad

    w = torch.randn(3, 3, dtype=torch.float64)
    f = (lambda z: torch.tanh(z @ w).sum(-1)) if fn == "laplacian" else lambda z: torch.tanh(z @ w)
    x64, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    call = getattr(torchdiv, fn)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x64, v)
        with pytest.raises(ValueError, match=rf"{fn}: x carries a forward-mode tangent.*jvp"):
            call(f, dual)
    _, tangent = torch.func.jvp(lambda z: call(f, z), (x64,), (v,))
    eps = 1e-6
    want = (call(f, x64 + eps * v) - call(f, x64 - eps * v)) / (2 * eps)
    torch.testing.assert_close(tangent.detach(), want.detach(), rtol=1e-6, atol=1e-8)
