"""Autoregressive and attention flows as their repositories write them: TarFlow (Zhai et al.
2024; patches as a sequence, causal attention along it, an affine autoregressive step,
flips between blocks), MADE with masked linear layers (the mask a buffer multiplied into
the weight at every forward), nflows' rational-quadratic spline with linear tails (boolean
indexing of the flattened batch, in-place writes, ``searchsorted`` bins).

The Jacobian of each step is triangular in the step's order, so its diagonal and log-det are
closed forms (``exp(-a)``, the sum of log-scales); parameter gradients of losses built from
torchdiv's results are compared with the same losses of the closed forms, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, assert_same_parameter_gradients, loop_diagonal
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchdiv

f64 = torch.float64


def _perturbed(module: nn.Module, scale: float, seed: int) -> nn.Module:
    """``module`` in float64, every parameter moved by ``scale`` times a normal draw (TarFlow
    zero-initialises its output layer: the identity, whose diagonal proves little)."""
    generator = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


class _Attention(nn.Module):
    """TarFlow's attention: pre-norm, one ``qkv`` projection split into heads, and
    ``scaled_dot_product_attention`` with the block's causal mask (a float buffer, made
    boolean at the call)."""

    def __init__(self, channels: int, head_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.num_heads = channels // head_channels

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, t, 3 * self.num_heads, -1).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool())
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class _MetaBlock(nn.Module):
    """One TarFlow flow block: permute the patch sequence (``flip``: reversed), embed, a
    causal attention layer and an MLP, project to ``(a, b)`` per patch, shift them one patch
    later (patch ``i`` reads patches ``< i``), ``z = (x - b) exp(-a)``, permute back.
    Returns ``z`` and ``a`` (the log-scales, in the permuted order)."""

    def __init__(self, in_channels: int, channels: int, patches: int, flip: bool) -> None:
        super().__init__()
        self.flip = flip
        self.proj_in = nn.Linear(in_channels, channels)
        self.pos_embed = nn.Parameter(torch.randn(patches, channels) * 1e-2)
        self.attention = _Attention(channels, head_channels=4)
        self.mlp = nn.Sequential(
            nn.LayerNorm(channels),
            nn.Linear(channels, 2 * channels),
            nn.GELU(),
            nn.Linear(2 * channels, channels),
        )
        self.proj_out = nn.Linear(channels, 2 * in_channels)
        self.proj_out.weight.data.fill_(0.0)
        self.register_buffer("attn_mask", torch.tril(torch.ones(patches, patches)))

    def permute(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x.flip(dims=[dim]) if self.flip else x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.permute(x)
        h = self.proj_in(x) + self.permute(self.pos_embed, dim=0)
        h = h + self.attention(h, self.attn_mask)
        h = self.proj_out(h + self.mlp(h))
        h = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        a, b = h.chunk(2, dim=-1)
        return self.permute((x - b) * torch.exp(-a)), a


class _TarFlow(nn.Module):
    """Patchify ``(B, C, H, W)`` into ``(B, patches, C p p)`` (``F.unfold``), flow blocks
    alternately unflipped and flipped, unpatchify. ``logdet``: minus the sum of every block's
    log-scales."""

    def __init__(self, in_channels: int = 2, size: int = 4, patch: int = 2) -> None:
        super().__init__()
        self.size, self.patch = size, patch
        tokens, width = (size // patch) ** 2, in_channels * patch**2
        self.blocks = nn.ModuleList(_MetaBlock(width, 8, tokens, i % 2 == 1) for i in range(2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)
        logdet = torch.zeros(len(x), dtype=x.dtype)
        for block in self.blocks:
            z, a = block(z)
            logdet = logdet - a.sum((1, 2))
        z = F.fold(z.transpose(1, 2), (self.size, self.size), self.patch, stride=self.patch)
        return z, logdet


@pytest.mark.parametrize(
    ("method", "flip"),
    [("auto", False), ("auto", True), ("reverse", True), ("forward", True), ("structured", True)],
)
def test_tarflow_block_diagonal_is_its_scales(method: str, flip: bool) -> None:
    """A TarFlow block's Jacobian is triangular in its permuted order, with diagonal
    ``exp(-a)`` (``a`` permuted back): ``jacobian_diagonal`` and ``divergence`` against it,
    and the parameter gradients of a log-likelihood-like loss built from the diagonal."""
    torch.manual_seed(0)
    block = _perturbed(_MetaBlock(8, 8, 4, flip), 0.1, seed=1)
    x = torch.randn(3, 4, 8, dtype=f64, generator=torch.Generator().manual_seed(2))
    diagonal = torchdiv.jacobian_diagonal(lambda z: block(z)[0], x, method=method)
    want = torch.exp(-block.permute(block(x)[1]))
    assert_close(diagonal, want)
    assert_close(torchdiv.divergence(lambda z: block(z)[0], x, method=method), want.sum((1, 2)))
    loss = diagonal.log().sum() + diagonal.square().sum()
    assert_same_parameter_gradients(block, loss, want.log().sum() + want.square().sum())


@pytest.mark.parametrize("method", ["auto", "reverse", "forward"])
def test_tarflow_log_det_of_the_jacobian_is_the_sum_of_log_scales(method: str) -> None:
    """Two blocks (unflipped, flipped) on 4x4 images of 2 channels in 2x2 patches: the
    whole Jacobian is no longer triangular, its log-det still the model's closed form; the
    same for the parameter gradients of a loss of it, and a second call is the first."""
    torch.manual_seed(0)
    model = _perturbed(_TarFlow(), 0.05, seed=3)
    x = torch.randn(3, 2, 4, 4, dtype=f64, generator=torch.Generator().manual_seed(4))
    first = torchdiv.jacobian(lambda z: model(z)[0], x, method=method).reshape(3, 32, 32)
    logdet = torch.linalg.slogdet(first)[1]
    assert_close(logdet, model(x)[1])
    assert_same_parameter_gradients(model, logdet.square().sum(), model(x)[1].square().sum())
    second = torchdiv.jacobian(lambda z: model(z)[0], x, method=method).reshape(3, 32, 32)
    torch.testing.assert_close(second, first, rtol=0, atol=1e-15)


def test_attention_inside_autocast_in_every_engine() -> None:
    """TarFlow trains under ``torch.autocast(dtype=torch.bfloat16)``; an ``f`` that runs its
    attention so: PyTorch's math attention inside autocast and below ``torch.func.vjp``
    gave a pullback that raised "expected scalar type BFloat16 but found Float", so
    ``"reverse"``, ``"forward-over-reverse"`` and ``"hessian"`` refused a valid ``f``.

    The reference: a backward pass per element of plain autograd under the same autocast
    (math backend: the fused kernel has no double backward). bfloat16 keeps 8 bits (eps 2^-8 =
    3.9e-3); the batched and the per-sample evaluations round differently, measured
    6e-4 relative (values ~30) and 1.4e-2 (parameter gradients): rtol 3e-2."""
    torch.manual_seed(0)
    block = _MetaBlock(4, 8, 4, flip=True).float()
    with torch.no_grad():
        block.proj_out.weight.normal_(0, 0.05)
    x = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(5))

    def f(z: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(z)[0]
        return out.float()

    def logp(z: torch.Tensor) -> torch.Tensor:
        return -0.5 * f(z).square().sum((1, 2))

    with sdpa_kernel([SDPBackend.MATH]):
        divergence = loop_diagonal(f, x, create_graph=True).sum((1, 2))
        laplacian = loop_diagonal(_grad(logp), x).sum((1, 2))
    tolerance = {"rtol": 3e-2, "atol": 3e-2}
    got = torchdiv.divergence(f, x, method="reverse")
    torch.testing.assert_close(got, divergence, **tolerance)
    params = list(block.parameters())
    grads = torch.autograd.grad(got.sum(), params)
    for a, b in zip(grads, _grads(divergence, params), strict=True):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())
    for method in ("forward-over-reverse", "hessian"):
        got = torchdiv.laplacian(logp, x, method=method)
        torch.testing.assert_close(got, laplacian, **tolerance)


def _grads(value: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.grad(value.sum(), params)


def _grad(g):
    """``z -> d g(z).sum() / dz`` with a graph."""

    def gradient(z: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(g(z).sum(), z, create_graph=True)[0]

    return gradient


class _MaskedLinear(nn.Module):
    """pytorch-flows' ``MaskedLinear``: ``F.linear`` of the weight times a mask buffer."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.linear.weight * self.mask, self.linear.bias)


def _made_mask(n_in: int, n_out: int, features: int, kind: str | None = None) -> torch.Tensor:
    """MADE's degrees: inputs ``0..D-1``, hidden units ``k mod (D - 1)``, outputs one less
    than their feature; a connection where the output's degree is at least the input's."""
    inputs = torch.arange(n_in) % (features if kind == "input" else features - 1)
    outputs = torch.arange(n_out) % features - 1 if kind == "output" else None
    if outputs is None:
        outputs = torch.arange(n_out) % (features - 1)
    return (outputs[:, None] >= inputs[None, :]).to(f64)


class _MADE(nn.Module):
    """pytorch-flows' ``MADE`` in its ``direct`` mode: ``u = (x - m) exp(-a)`` with ``(m, a)``
    from a masked MLP, so ``u_i`` depends on ``x_{<i}`` and ``x_i`` alone."""

    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.joiner = _MaskedLinear(_made_mask(features, hidden, features, "input"))
        self.trunk = nn.Sequential(
            nn.Tanh(),
            _MaskedLinear(_made_mask(hidden, hidden, features)),
            nn.Tanh(),
            _MaskedLinear(_made_mask(hidden, 2 * features, features, "output")),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, a = self.trunk(self.joiner(x)).chunk(2, 1)
        return (x - m) * torch.exp(-a), a


@pytest.mark.parametrize("method", ["auto", "reverse", "forward", "structured"])
def test_made_diagonal_and_its_parameter_gradients(method: str) -> None:
    """MADE's Jacobian diagonal is ``exp(-a)``; through the masked weights, the parameter
    gradients of a loss of it are those of the closed form's (a mask that let ``u_i`` read
    ``x_i`` through the net would add terms to both the values and the gradients)."""
    made = _perturbed(_MADE(5, 16), 0.2, seed=6)
    x = torch.randn(4, 5, dtype=f64, generator=torch.Generator().manual_seed(7))
    diagonal = torchdiv.jacobian_diagonal(lambda z: made(z)[0], x, method=method)
    want = torch.exp(-made(x)[1])
    assert_close(diagonal, want)
    assert_same_parameter_gradients(made, diagonal.log().square().sum(), want.log().square().sum())


def _searchsorted(bin_locations: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """nflows' ``searchsorted``: the last edge nudged up in place, then a count."""
    bin_locations[..., -1] += 1e-6
    return torch.sum(inputs[..., None] >= bin_locations, dim=-1) - 1


def _knots(unnormalized: torch.Tensor, bound: float) -> torch.Tensor:
    """Bin edges from ``softmax`` widths (at least 1e-3 each), ends set in place."""
    widths = 1e-3 + (1 - 1e-3 * unnormalized.shape[-1]) * F.softmax(unnormalized, dim=-1)
    edges = F.pad(torch.cumsum(widths, dim=-1), pad=(1, 0), mode="constant", value=0.0)
    edges = 2 * bound * edges - bound
    edges[..., 0] = -bound
    edges[..., -1] = bound
    return edges


def _rq_spline(
    x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, d: torch.Tensor, bound: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """nflows' ``unconstrained_rational_quadratic_spline`` (``tails="linear"``, forward):
    the identity outside ``[-bound, bound]``; inside, each element's bin found by
    ``searchsorted`` and the rational-quadratic map of Durkan et al. (2019). The elements
    inside are picked by a boolean mask over the whole ``(B, D)`` batch and written back
    with ``index_put``. Returns the output and ``log |dy/dx|`` per element."""
    inside = (x >= -bound) & (x <= bound)
    outputs, logabsdet = torch.zeros_like(x), torch.zeros_like(x)
    d = F.pad(d, pad=(1, 1))
    d[..., 0] = d[..., -1] = math.log(math.exp(1 - 1e-3) - 1)  # slope 1 at both ends
    outputs[~inside] = x[~inside]
    xs, w, h, d = x[inside], w[inside, :], h[inside, :], d[inside, :]
    cumwidths, cumheights = _knots(w, bound), _knots(h, bound)
    widths, heights = cumwidths.diff(dim=-1), cumheights.diff(dim=-1)
    derivatives = 1e-3 + F.softplus(d)
    k = _searchsorted(cumwidths, xs)[..., None]
    delta = (heights / widths).gather(-1, k)[..., 0]
    d0, d1 = derivatives.gather(-1, k)[..., 0], derivatives[..., 1:].gather(-1, k)[..., 0]
    theta = (xs - cumwidths.gather(-1, k)[..., 0]) / widths.gather(-1, k)[..., 0]
    between = theta * (1 - theta)
    numerator = heights.gather(-1, k)[..., 0] * (delta * theta.pow(2) + d0 * between)
    denominator = delta + (d0 + d1 - 2 * delta) * between
    outputs[inside] = cumheights.gather(-1, k)[..., 0] + numerator / denominator
    slope = delta.pow(2) * (d1 * theta.pow(2) + 2 * delta * between + d0 * (1 - theta).pow(2))
    logabsdet[inside] = torch.log(slope) - 2 * torch.log(denominator)
    return outputs, logabsdet


class _Spline(nn.Module):
    """An elementwise spline with learned knots per feature (a coupling layer's transform)."""

    def __init__(self, features: int, bins: int = 5, bound: float = 3.0) -> None:
        super().__init__()
        self.bound = bound
        self.w = nn.Parameter(torch.randn(features, bins, dtype=f64))
        self.h = nn.Parameter(torch.randn(features, bins, dtype=f64))
        self.d = nn.Parameter(torch.randn(features, bins - 1, dtype=f64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(x)
        w, h, d = (p.expand(n, *p.shape) for p in (self.w, self.h, self.d))
        return _rq_spline(x, w, h, d, self.bound)


@pytest.mark.parametrize("method", ["auto", "reverse", "forward"])
def test_spline_at_its_knots_in_its_tails_and_between(method: str) -> None:
    """The spline's slope at every interior knot (the shared derivative there: the map is
    C1), at the ends of the interval and in the linear tails (1), and between knots (checked
    against central differences too): values and parameter gradients against
    ``exp(logabsdet)``. The batch is flattened by boolean indexing and written back: not
    sample mixing, and each sample's diagonal is its own."""
    torch.manual_seed(0)
    spline = _Spline(3)
    with torch.no_grad():
        knots = _knots(spline.w, spline.bound)  # (3 features, 6 edges)
    between = torch.randn(2, 3, dtype=f64, generator=torch.Generator().manual_seed(8))
    tails = torch.tensor([[3.0, -3.0, 4.0], [-5.0, 3.0 + 1e-9, -3.0]], dtype=f64)
    x = torch.cat([knots[:, 1:-1].T, tails, between])
    diagonal = torchdiv.jacobian_diagonal(lambda z: spline(z)[0], x, method=method)
    want = spline(x)[1].exp()
    assert_close(diagonal, want)
    torch.testing.assert_close(diagonal[4:6], torch.ones(2, 3, dtype=f64), rtol=0, atol=1e-12)
    steps = [torch.zeros_like(between).index_fill_(1, torch.tensor([i]), 1e-5) for i in range(3)]
    with torch.no_grad():
        central = [(spline(between + s)[0] - spline(between - s)[0]) / 2e-5 for s in steps]
    central_diagonal = torch.stack([c[:, i] for i, c in enumerate(central)], 1)
    # (truncation ~ h^2 f''' / 6 ~ 1e-10 for these bins)
    torch.testing.assert_close(diagonal[6:], central_diagonal, rtol=1e-8, atol=1e-8)
    assert_same_parameter_gradients(spline, diagonal.log().sum(), want.log().sum())
    moved = x.clone()
    moved[6] += 0.3
    again = torchdiv.jacobian_diagonal(lambda z: spline(z)[0], moved, method=method)
    torch.testing.assert_close(again[:6], diagonal[:6], rtol=0, atol=0)
    torch.testing.assert_close(again[7], diagonal[7], rtol=0, atol=0)
