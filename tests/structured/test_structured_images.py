"""Colouring the image nets people train: FFJORD's ODE nets (ConcatConv2d, squeezes, strided
and transposed convolutions), down/up sampling, padding modes, channel slices.

Three things are checked for every net, in float64 against ``torch.func.jacrev``
(``conftest.reference_*``):

* soundness of the locality analysis: the reach it finds is at least the largest distance
  between an output pixel and an input pixel it depends on (from the exact Jacobian's
  nonzeros), and equal to it where the analysis is exact (everything but bilinear);
* the divergence and Jacobian diagonal of ``method="structured"``, with the plan asserted
  (a colouring with the stated number of directions, or none);
* gradients of a weighted sum of divergences with respect to every parameter and ``x``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_close,
    central_difference,
    directional_gradient,
    laplacian_by_grad_of_grad,
    reference_divergence,
    reference_jacobian,
    shifted,
)
from torch import nn
from torch.func import jacrev, vmap
from torch.nn import functional as F

import torchdiv
from torchdiv import _structured
from torchdiv._bench.ffjord import ConcatConv2d, multiscale, odenet, squeeze, unsqueeze
from torchdiv._structured import colors, locality
from torchdiv._taylor import RULES, capture, values

f64 = torch.float64


def true_reach(jac: torch.Tensor, x: torch.Tensor) -> tuple[int, ...]:
    """Per spatial axis, the largest distance between an output pixel and an input pixel
    with a nonzero entry in any sample's Jacobian ``jac`` (channels merged)."""
    c, *spatial = x.shape[1:]
    dims = len(spatial)
    nonzero = (jac != 0).reshape(-1, c, *spatial, c, *spatial).any(0).any(0).any(dims)
    where = nonzero.nonzero()
    return tuple(int((where[:, a] - where[:, dims + a]).abs().max()) for a in range(dims))


def per_sample_jacobian(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each image's Jacobian, ``(B, *event, *event)``, by ``vmap(jacrev)`` of the net on one
    image: the nets here treat images independently, and 768 rows a sample cost half of the
    cross-batch Jacobian's 1536 (a quarter through transposed convolutions)."""
    return vmap(jacrev(lambda image: net(image[None])[0]))(x)


def analysed(f, x: torch.Tensor) -> tuple[tuple[int, ...] | None, int | None]:
    """The reach the analysis finds and the number of colours the plan uses (None: none)."""
    graph = capture(f, x, RULES, keep_values=True, batch_dims=1)
    kept = values(graph, x)
    coloring = colors.colors(graph, kept, x, 1)
    reach = locality.reach(graph, kept, x, 1)
    return reach, None if coloring is None else int(coloring.max()) + 1


class ChannelTricks(nn.Module):
    """Channel slices, a select, a channel sum and a time channel made from a slice."""

    def __init__(self):
        super().__init__()
        self.conv = ConcatConv2d(3, 3, 3, padding=1)

    def forward(self, x):
        h = self.conv(torch.tensor(0.3, dtype=x.dtype), x)
        gate = torch.sigmoid(h[:, 1]).unsqueeze(1)  # a select over channels
        return torch.cat([h[:, :2] * gate, h.sum(1, keepdim=True)], 1)


class Lambda(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


def conv(i, o, k=3, **kw):
    return nn.Conv2d(i, o, k, **kw)


NETS = {  # name: (net, reach on 3 x 16 x 16, colours)
    "ffjord-odenet": (lambda: odenet((4, 4, 4)), (4, 4), 75),
    "ffjord-multiscale": (lambda: multiscale((4, 4, 4)), (11, 11), 432),
    "ffjord-squeeze": (lambda: odenet((4, 4), num_squeeze=1), (7, 7), 192),
    "ffjord-strided": (lambda: odenet((4, 4, 4), strides=(1, 2, -2, 1)), (5, 5), 108),
    "pixel-shuffle": (
        lambda: nn.Sequential(nn.PixelUnshuffle(2), conv(12, 12, padding=1), nn.PixelShuffle(2)),
        (3, 3),
        48,
    ),
    "down-nearest-up": (
        lambda: nn.Sequential(
            conv(3, 4, stride=2, padding=1),
            nn.Tanh(),
            nn.Upsample(scale_factor=2),
            conv(4, 3, padding=1),
        ),
        (3, 3),
        48,
    ),
    "avgpool-bilinear": (
        lambda: nn.Sequential(
            nn.AvgPool2d(2),
            conv(3, 4, padding=1),
            nn.SiLU(),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            conv(4, 3, 1),
        ),
        (5, 5),  # true reach 4: bilinear's zero-weight neighbour is counted
        108,
    ),
    "dilated-reflect-replicate": (
        lambda: nn.Sequential(
            conv(3, 4, padding=2, dilation=2, padding_mode="reflect"),
            nn.Softplus(),
            conv(4, 3, padding=1, padding_mode="replicate"),
        ),
        (3, 3),
        48,
    ),
    "channel-tricks": (ChannelTricks, (1, 1), 12),
    "crop-and-pad": (  # a 1x1 convolution, cropped, then padded back
        lambda: nn.Sequential(
            conv(3, 3, 1), Lambda(lambda h: F.pad(h[..., 1:-1, 2:], (1, 1, 0, 2)))
        ),
        (1, 1),
        12,
    ),
    "padding-wider-than-the-kernel": (  # windows past the edge read nothing
        lambda: nn.Sequential(
            conv(3, 3, padding=4), nn.Tanh(), Lambda(lambda h: h[..., 3:-3, 3:-3])
        ),
        (1, 1),
        12,
    ),
    "subsample-and-upsample": (
        lambda: Lambda(lambda x: F.interpolate(torch.tanh(x[..., ::2, ::2]), scale_factor=2)),
        (1, 1),
        12,
    ),
    "receptive-field-of-the-whole-image": (
        lambda: nn.Sequential(*[m for _ in range(8) for m in (conv(3, 3, padding=1), nn.Tanh())]),
        (7, 7),  # every pixel of an 8 x 8 image reads every other: no colouring
        None,
    ),
}


@pytest.mark.parametrize("name", NETS)
def test_image_nets_reach_and_plan(name):
    make, reach, num_colors = NETS[name]
    torch.manual_seed(0)
    net = make().double()
    size = 8 if name.startswith("receptive") else 16
    x = torch.randn(2, 3, size, size, dtype=f64)
    found, colours = analysed(net, x)
    assert found == reach and colours == num_colors
    words = f"colours: {num_colors} directions for 768 unit vectors" if num_colors else None
    assert words is None or _structured.describe(net, x) == words
    jac = per_sample_jacobian(net, x)
    truth = true_reach(jac, x)
    assert all(t <= r for t, r in zip(truth, found, strict=True))
    if name != "avgpool-bilinear":
        assert truth == found
    diagonal = jac.reshape(2, x[0].numel(), -1).diagonal(dim1=1, dim2=2)
    kw = {"method": "structured"}
    assert_close(torchdiv.divergence(net, x, **kw), diagonal.sum(-1))
    assert_close(torchdiv.jacobian_diagonal(net, x, **kw), diagonal.reshape(x.shape))


def test_squeeze_moves_each_2x2_block_to_channels():
    x = torch.randn(2, 3, 8, 6, dtype=f64)
    assert torch.equal(squeeze(x)[:, 2 * 4 + 1 * 2 + 0, 3, 1], x[:, 2, 2 * 3 + 1, 2 * 1 + 0])
    assert torch.equal(unsqueeze(squeeze(x)), x)


@pytest.mark.parametrize(
    "make, size", [(lambda: odenet((4, 4)), 8), (lambda: multiscale((2, 2, 2)), 16)]
)
def test_gradients_wrt_parameters_and_x_match_the_reference(make, size):
    torch.manual_seed(1)
    net = make().double()
    x = torch.randn(2, 3, size, size, dtype=f64, requires_grad=True)
    assert analysed(net, x)[1] is not None
    weights = torch.randn(2, dtype=f64)
    params = [x, *net.parameters()]
    ours = torchdiv.divergence(net, x, method="structured")
    got = torch.autograd.grad((ours * weights).sum(), params, allow_unused=True)
    want = torch.autograd.grad(
        (reference_divergence(net, x) * weights).sum(), params, allow_unused=True
    )
    for g, w, p in zip(got, want, params, strict=True):  # the last bias is unused in both
        zero = torch.zeros_like(p)
        assert_close(zero if g is None else g, zero if w is None else w)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(conv(3, 4, padding=1), nn.GroupNorm(2, 4), conv(4, 3, padding=1)),
        lambda: nn.Sequential(
            conv(3, 4, padding=1), nn.LayerNorm([4, 4, 4]), conv(4, 3, padding=1)
        ),
        lambda: AttentionNet(),
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 48), nn.Unflatten(1, (3, 4, 4))),
        lambda: nn.Sequential(conv(3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Upsample(size=4)),
    ],
    ids=["group-norm", "layer-norm", "attention", "flatten-linear", "global-pool"],
)
def test_nets_that_read_the_whole_image_are_not_coloured(make):
    torch.manual_seed(2)
    net = make().double()
    x = torch.randn(2, 3, 4, 4, dtype=f64)
    assert analysed(net, x) == (None, None)
    assert not _structured.describe(net, x).startswith("colours")
    assert_close(torchdiv.divergence(net, x, method="structured"), reference_divergence(net, x))


class AttentionNet(nn.Module):
    """Self-attention over the pixels after a convolution (positions merged by a reshape)."""

    def __init__(self):
        super().__init__()
        self.conv = conv(3, 9, padding=1)

    def forward(self, x):
        q, k, v = self.conv(x).flatten(2).chunk(3, dim=1)
        weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k), dim=-1)
        return torch.einsum("bts,bcs->bct", weights, v).reshape(x.shape)


def test_unbatched_and_one_dimensional_events():
    torch.manual_seed(3)
    net = odenet((3, 3)).double()
    x = torch.randn(3, 12, 12, dtype=f64)
    one = lambda z: net(z[None])[0]  # noqa: E731
    graph = capture(one, x, RULES, keep_values=True, batch_dims=0)
    assert int(colors.colors(graph, values(graph, x), x, 0).max()) + 1 == 3 * 4 * 4
    assert_close(
        torchdiv.divergence(one, x, batch_dims=0, method="structured"),
        reference_divergence(net, x[None])[0],
    )
    line = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1, stride=2),
        nn.Tanh(),
        nn.ConvTranspose1d(3, 2, 4, stride=2, padding=1),
    ).double()
    z = torch.randn(2, 2, 20, dtype=f64)
    reach = true_reach(reference_jacobian(line, z), z)
    assert analysed(line, z) == (reach, 2 * (reach[0] + 1))
    assert_close(torchdiv.divergence(line, z, method="structured"), reference_divergence(line, z))


@pytest.mark.parametrize("rows", [slice(-100, None), slice(-100, 5), slice(2, 100)])
def test_slices_past_the_edges_keep_their_reach(rows):
    """A slice whose start lies before the first row (``x[..., -100:, :]``) or whose end lies
    past the last: clipped to the image, never read from the back (the reach came out 0, so
    the colouring merged neighbours and the divergence was wrong)."""
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 3, padding=1))
    conv = conv.to(f64)

    def f(x: torch.Tensor) -> torch.Tensor:
        y = conv(x[:, :, rows, :])
        return F.pad(y, (0, 0, 0, x.shape[2] - y.shape[2]))

    x = torch.randn(2, 2, 8, 8, dtype=f64)
    for method in ("structured", "auto"):
        assert_close(torchdiv.divergence(f, x, method=method), reference_divergence(f, x))


def test_instance_norm_is_planned_per_sample() -> None:
    """``F.instance_norm`` is a training-mode batch norm of ``(1, N*C, H, W)`` without running
    statistics: per sample. The Taylor rules refused it as one that "mixes samples", so
    ``"structured"`` raised and ``"taylor"`` fell back; now both run it, and a batch norm
    over the samples is still refused by the mixing watch. The Laplacian's weight gradient is
    checked by differences: PyTorch's triple backward through ``native_batch_norm`` (the
    grad-of-grad loop's) is wrong here (4.62 where differences and torchdiv read -2.05)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True), nn.SiLU(),
        nn.Conv2d(4, 2, 3, padding=1),
    ).double()  # fmt: skip
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    expected = reference_jacobian(net, x).reshape(3, 50, 50).diagonal(dim1=1, dim2=2)
    assert_close(torchdiv.jacobian_diagonal(net, x, method="structured").reshape(3, 50), expected)

    def g(z: torch.Tensor) -> torch.Tensor:
        return net(z).square().sum((1, 2, 3))

    got = torchdiv.laplacian(g, x, method="taylor")
    assert_close(got, laplacian_by_grad_of_grad(g, x))
    weight = net[0].weight
    direction = torch.randn_like(weight)

    def moved(t: float) -> torch.Tensor:
        with shifted([weight], [direction], t):
            return laplacian_by_grad_of_grad(g, x).sum().detach()

    along = directional_gradient(got, [weight], [direction])
    assert along == pytest.approx(central_difference(moved).item(), rel=1e-7)
    batch_norm = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)).double()
    with pytest.raises(torchdiv.BatchInteractionError, match="batch norm in train mode"):
        torchdiv.divergence(batch_norm, x, method="structured")
