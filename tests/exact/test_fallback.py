"""method="auto" falls back when torch.func cannot run f; explicit methods do not."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    LegacyCube,
    assert_close,
    assert_same_parameter_gradients,
    laplacian_by_grad_of_grad,
    loop_diagonal,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from unets import Recompute

import torchdiv


class CubeWithoutJvp(torch.autograd.Function):
    """New-style Function with a vmap rule but no jvp: no forward-mode rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


@pytest.mark.parametrize("cube", [LegacyCube, CubeWithoutJvp])
def test_auto_falls_back_for_custom_functions(cube):
    W = torch.randn(4, 4, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)

    def f(z):
        return cube.apply(z) @ W.T

    expected = (3 * x**2 * W.diagonal()).sum(-1)
    assert_close(torchdiv.divergence(f, x), expected)
    assert_close(torchdiv.jacobian_diagonal(f, x), 3 * x**2 * W.diagonal())
    assert_close(torchdiv.jacobian(f, x), W * (3 * x**2).unsqueeze(1))
    with pytest.raises(RuntimeError):
        torchdiv.divergence(f, x, method="forward")


@pytest.mark.parametrize("cube", [LegacyCube, CubeWithoutJvp])
def test_auto_falls_back_from_forward_mode(cube):
    """More outputs than inputs: auto prefers forward mode, which cannot run ``cube``."""
    x = torch.randn(3, 4, dtype=torch.float64)
    jac = torchdiv.jacobian(lambda z: torch.cat([cube.apply(z), z], -1), x)
    expected = torch.cat([torch.diag_embed(3 * x**2), torch.eye(4).double().expand(3, 4, 4)], 1)
    assert_close(jac, expected)


def test_auto_fallback_for_a_function_that_ignores_x():
    c = torch.randn(3, 4, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(
        torchdiv.divergence(lambda z: LegacyCube.apply(c), x), torch.zeros(3).double()
    )


def test_auto_fallback_keeps_results_differentiable():
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, dtype=torch.float64)
    div = torchdiv.divergence(lambda z: LegacyCube.apply(z) * w, x)
    (g,) = torch.autograd.grad(div.sum(), w)
    assert_close(g, (3 * x**2).sum(0))
    with torch.no_grad():
        assert not torchdiv.divergence(lambda z: LegacyCube.apply(z) * w, x).requires_grad
    frozen = torchdiv.divergence(lambda z: LegacyCube.apply(z) * w.detach(), x)
    assert not frozen.requires_grad


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("batch", [5, 300])  # tiny problems (plain autograd) and larger ones
def test_every_method_handles_fused_attention_and_its_gradients(batch: int):
    """CPU ``scaled_dot_product_attention``'s fused kernel has no forward-mode rule and no
    double backward in PyTorch: the forward engine raised, and the gradients of the reverse
    and plain-autograd engines' results ("auto" on small attention models in training)."""
    torch.manual_seed(0)
    proj = (torch.randn(8, 8, dtype=torch.float64) / 3).requires_grad_(True)

    def attention(x):  # x (B, 4 tokens * 2 features): attention within each sample
        q = (x @ proj).reshape(-1, 1, 4, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q).reshape(x.shape)

    x = torch.randn(batch, 8, dtype=torch.float64)
    jac = torchdiv.jacobian(attention, x)
    xg = x.clone().requires_grad_(True)
    assert_close(jac, torchdiv.graph_jacobian(attention(xg), xg))
    with sdpa_kernel([SDPBackend.MATH]):  # the reference: a grad-of-grad loop, no torchdiv
        y = attention(xg)
        rows = [torch.autograd.grad(y[:, i].sum(), xg, create_graph=True)[0] for i in range(8)]
        want = sum(row[:, i] for i, row in enumerate(rows))
        (want_grad,) = torch.autograd.grad(want.square().sum(), proj)
    assert_close(jac.diagonal(dim1=1, dim2=2).sum(-1), want)
    for method in ("auto", "reverse", "forward", "structured"):
        div = torchdiv.divergence(attention, x, method=method)
        assert_close(div, want)
        assert_close(torch.autograd.grad(div.square().sum(), proj)[0], want_grad)


def test_auto_handles_in_place_writes_and_control_flow():
    def f(x):
        out = torch.zeros_like(x)
        out[:, 0] = x[:, 1] ** 2  # in-place write of a dual tensor into a plain one
        if x.sum() > -1e9:  # data-dependent Python control flow
            out = out + x
        return out

    x = torch.randn(3, 2, dtype=torch.float64)
    assert_close(torchdiv.divergence(f, x), torch.full((3,), 2.0, dtype=torch.float64))


def test_fallback_under_inference_mode_is_exact():
    """inference_mode disables autograd even inside enable_grad(): not zeros, the real answer."""
    lin = torch.nn.Linear(3, 3).double()
    x = torch.randn(4, 3, dtype=torch.float64)

    def f(z):
        return lin(LegacyCube.apply(z))

    expected = torchdiv.divergence(f, x)
    with torch.inference_mode():
        got = torchdiv.divergence(f, x)
        jac = torchdiv.jacobian(f, x)
        inference_x = x.clone()
    assert_close(got, expected.detach())
    assert_close(jac, lin.weight.detach() * (3 * x**2).unsqueeze(1))
    assert_close(torchdiv.divergence(f, inference_x), expected)  # an inference tensor as x
    assert not got.requires_grad


def test_fallback_keeps_the_planned_chunk(monkeypatch):
    """The plain-autograd engine bounds memory like the planned one: chunk x widest ~ 2M."""
    from torchdiv._exact.autograd import GraphJacobian

    sizes = []
    block = GraphJacobian.block
    monkeypatch.setattr(
        GraphJacobian, "block", lambda self, a, b: sizes.append(b - a) or block(self, a, b)
    )
    net = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 256)
    )
    x = torch.randn(64, 256)
    div = torchdiv.divergence(lambda z: net(LegacyCube.apply(z)), x)
    assert max(sizes) == (1 << 21) // (64 * 1024) and sum(sizes) == 256
    assert_close(div, torchdiv.divergence(lambda z: net(z**3), x))


def test_re_running_engine_changes_state_once_and_redraws_the_same_mask():
    """A checkpoint that can be walked once leaves only the engine that re-runs ``f`` per
    vector; every evaluation must see the same dropout mask (else each row comes from another
    function), and the counter and the random number generator move as in one evaluation."""
    lin = torch.nn.Linear(128, 128).double()
    calls = torch.zeros((), dtype=torch.float64)

    def f(x):
        calls.add_(1)
        h = Recompute.apply(lambda z: torch.tanh(lin(z)), 1, x, *lin.parameters())
        return torch.nn.functional.dropout(h, 0.5)

    x = torch.randn(4, 128, dtype=torch.float64)
    torch.manual_seed(0)
    got = torchdiv.divergence(f, x, chunk_size=32).detach()  # the second walk fails
    assert calls.item() == 1
    rng_after = torch.get_rng_state()
    torch.manual_seed(0)
    f(x)
    assert torch.equal(torch.get_rng_state(), rng_after)

    def seeded(z):
        torch.manual_seed(0)
        return f(z)

    assert_close(got, loop_diagonal(seeded, x).sum(1).detach())


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_engine_handed_over_draws_the_same_probes(method):
    """Forward mode (planned: f convolves) fails after the probes were drawn; reverse mode
    must use the same probes: equal to the graph form's rows (products with J^T)."""
    conv = torch.nn.Conv2d(2, 2, 3, padding=1).double()

    def f(x):
        return CubeWithoutJvp.apply(conv(x))

    x = torch.randn(4, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    options = {"method": method, "num_probes": 6}
    handed_over = torchdiv.divergence(f, x, **options, generator=torch.Generator().manual_seed(0))
    rows = torchdiv.graph_divergence(f(x), x, **options, generator=torch.Generator().manual_seed(0))
    assert_close(handed_over, rows)


class _TanhWalkedOnce(torch.autograd.Function):
    """Legacy tanh (no ``setup_context``: ``torch.func`` cannot run it) whose backward frees
    what it saved: its graph can be walked once."""

    @staticmethod
    def forward(ctx, z):
        ctx.out = torch.tanh(z)
        return ctx.out.clone()

    @staticmethod
    def backward(ctx, grad):
        out = ctx.out
        del ctx.out
        return grad * (1 - out**2)


def test_a_batched_pass_that_failed_after_a_backward_freed_its_state_hands_over():
    """The batched pass over a graph ``vmap`` cannot batch (GroupNorm on channels-last strides)
    fails after ``_TanhWalkedOnce``'s backward ran: its per-row replacement cannot walk the
    graph again, and "auto" re-runs f per vector rather than raising its AttributeError."""
    gn = torch.nn.GroupNorm(2, 4).double()

    def g(z):  # GroupNorm met by channels-last strides, as in diffusers' attention blocks
        return gn(z.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2))

    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    div = torchdiv.divergence(lambda z: _TanhWalkedOnce.apply(g(z)), x)
    want = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda s: torch.tanh(g(s[None]))[0], xb)
            .reshape(16, 16)
            .trace()
            for xb in x
        ]
    )
    assert_close(div.detach(), want.detach())


class _SelfScaled(torch.nn.Module):
    """An MLP whose hidden features are scaled in place by a function of themselves (a gate
    written ``h.mul_(torch.tanh(h))``), whole or through views of a transposed copy (rows
    2-3 of ``h.t()``); ``lgamma`` has no Taylor rule, so ``"auto"``'s Laplacian falls back."""

    def __init__(self, view: bool) -> None:
        super().__init__()
        self.a, self.b, self.view = torch.nn.Linear(4, 6), torch.nn.Linear(6, 4), view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.view:
            h = h.t() * 1
            gate = h[2:4]
            gate.mul_(torch.tanh(gate))
            h = h.t()
        else:
            h = h * 1
            h.mul_(torch.tanh(h))
        return self.b(torch.lgamma(h.abs() + 1.5))


@pytest.mark.parametrize("view", [False, True], ids=["whole", "views"])
def test_auto_falls_back_to_backward_passes_for_a_write_reading_itself(view: bool):
    """Forward mode's tangent formulas save the tangent of the tensor read, then write it in
    place: forward over reverse (``"auto"``'s fallback at this size) gave the right values,
    but the parameter gradients raised PyTorch's "modified by an inplace operation"
    (``torch.func.jvp`` alike). ``"auto"`` now takes the loop of backward passes there:
    values and parameter gradients of grad of grad (float64)."""
    torch.manual_seed(0)
    net = _SelfScaled(view).double()
    x = torch.rand(3, 4, dtype=torch.float64)
    got = torchdiv.laplacian(net, x)  # (4 inputs times 4 outputs: above the loop's 10)
    expected = torch.stack(
        [laplacian_by_grad_of_grad(lambda z, k=k: net(z)[:, k], x) for k in range(4)], 1
    )
    assert_close(got, expected)
    assert_same_parameter_gradients(net, got.square().sum(), expected.square().sum())


class _SpectralConv(torch.nn.Module):
    """An FNO layer as neural operators write it: ``rfft2``, the lowest modes times complex
    weights written into a slice of a zeros tensor (``out[..., :m, :m] = ...``), ``irfft2``,
    plus a pointwise convolution, GELU."""

    def __init__(self, channels: int = 2, modes: int = 2) -> None:
        super().__init__()
        self.modes = modes
        w = torch.randn(channels, channels, modes, modes, dtype=torch.complex128) / channels
        self.w = torch.nn.Parameter(w)
        self.skip = torch.nn.Conv2d(channels, channels, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, m = torch.fft.rfft2(x), self.modes
        out = torch.zeros_like(f)
        out[..., :m, :m] = torch.einsum("bixy,ioxy->boxy", f[..., :m, :m], self.w)
        y = torch.fft.irfft2(out, s=x.shape[-2:]) + self.skip(x)
        return torch.nn.functional.gelu(y).square().sum((1, 2, 3))


def test_a_write_into_a_slice_of_a_fresh_tensor_keeps_forward_mode(monkeypatch) -> None:
    """A slice made of a tensor reads none of its values: writing values computed from ``x``
    into it (an FNO's spectral weights) is no write reading what it writes, and ``"auto"``'s
    Laplacian keeps its forward-mode engines (it took the loop of backward passes, 11x
    slower on an FNO layer: ``bench/watch_regressions.py``); values and parameter gradients
    against grad of grad (float64)."""
    from torchdiv._laplacian import methods

    taken: list[bool] = []
    loop_only = methods._backward_passes_only
    monkeypatch.setattr(
        methods, "_backward_passes_only", lambda g: taken.append(loop_only(g)) or taken[-1]
    )
    torch.manual_seed(0)
    net = _SpectralConv(channels=1)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    got = torchdiv.laplacian(net, x)
    expected = laplacian_by_grad_of_grad(net, x)
    assert taken and not any(taken)
    assert_close(got, expected)
    assert_same_parameter_gradients(net, got.square().sum(), expected.square().sum())


def test_a_write_reading_a_view_of_what_it_writes_still_falls_back() -> None:
    """A view of the written tensor read by the write itself (``h.mul_(h[:, :1])``: only a
    slice read ``h`` before) reads what it writes: recorded as such (forward mode's
    parameter gradients would raise)."""
    from torchdiv._taylor import RULES, capture

    def f(z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(z) * 1
        h.mul_(h[:, :1])
        return h.sum(1)

    assert capture(f, torch.randn(3, 4, dtype=torch.float64), RULES).reads_written
