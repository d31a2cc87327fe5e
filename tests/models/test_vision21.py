"""Image classifiers of timm and torchvision used as score heads ``R^{C,H,W} -> R^{C,H,W}``
(their logits of ``C H W`` classes reshaped to an image), at tiny widths on 4x4-8x8 images.

torchvision's Swin and ConvNeXt pool a permuted ``(B, H, W, C)`` tensor with
``AdaptiveAvgPool2d(1)``: for a channels-last input PyTorch takes the mean and restrides it
by ``as_strided_`` (the same elements, channels-last strides), which the recording engines
(``"structured"``, the Laplacian's ``"taylor"``) refused until rev-vision21, ``"auto"``
taking the generic engines. The timm models (skipped where timm cannot be imported: it
needs torchvision) check values, parameter gradients and the refusal of train-mode batch
norm on the real code; references are per-sample loops of plain autograd in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_close,
    assert_same_parameter_gradients,
    laplacian_alone,
    loop_diagonal,
)
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchdiv


class SwinLikeHead(nn.Module):
    """Patch embedding, tokens ``(B, H, W, C)`` through a pre-norm MLP with a residual, then
    torchvision's Swin ending: norm, ``permute(0, 3, 1, 2)``, ``AdaptiveAvgPool2d(1)``,
    ``flatten``, a linear head whose ``C H W`` logits are the output image."""

    def __init__(self, channels: int = 2, size: int = 4, width: int = 6):
        super().__init__()
        self.embed = nn.Conv2d(channels, width, 2, stride=2)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        hidden = 2 * width
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, channels * size * size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).permute(0, 2, 3, 1)
        tokens = tokens + self.mlp(self.norm1(tokens))
        pooled = self.avgpool(self.norm2(tokens).permute(0, 3, 1, 2))
        return self.head(torch.flatten(pooled, 1)).reshape(x.shape)


def swin_like() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return SwinLikeHead(channels=1).double(), torch.randn(2, 1, 4, 4, dtype=torch.float64)


@pytest.mark.parametrize("method", ["structured", "auto"])
def test_a_channels_last_average_pool_is_recorded(method):
    model, x = swin_like()
    diagonal = loop_diagonal(model, x, create_graph=True)
    divergence = torchdiv.divergence(model, x, method=method)
    assert_close(divergence, diagonal.flatten(1).sum(1))
    weights = torch.linspace(0.5, 1.5, len(x), dtype=x.dtype)
    expected = (weights * diagonal.flatten(1).sum(1)).sum()
    assert_same_parameter_gradients(model, (weights * divergence).sum(), expected)
    ours = torchdiv.jacobian_diagonal(model, x, method=method)
    assert_close(ours, diagonal)


def test_the_laplacian_through_a_channels_last_average_pool_by_taylor():
    model, x = swin_like()
    energy = lambda z: model(z).flatten(1).square().sum(1) / 2  # noqa: E731
    assert_close(torchdiv.laplacian(energy, x, method="taylor"), laplacian_alone(energy, x))


def timm_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A timm classifier of tiny width, one input channel, random weights (moved off their
    zero/identity initialisation: layer scales, heads) and running statistics, its logits of
    ``H W`` classes as the output image, float64 and in eval mode; and a batch of 2."""
    timm = pytest.importorskip("timm")
    size = 4 if name in ("vit", "mixer") else 8
    common = {"in_chans": 1, "num_classes": size * size}
    torch.manual_seed(0)
    if name == "convnext":  # LayerNorm2d in the stem and downsampling, channels-last in blocks
        args = {"depths": (1,) * 4, "dims": (2, 2, 4, 4), "patch_size": 1, "ls_init_value": 0.5}
        net = timm.models.convnext.ConvNeXt(**args, **common)
    elif name == "vit":  # class token, layer scale, drop path (eval), fused attention
        args = {"patch_size": 2, "embed_dim": 8, "depth": 2, "num_heads": 2}
        net = timm.models.vision_transformer.VisionTransformer(
            img_size=size, init_values=0.3, drop_path_rate=0.1, **args, **common
        )
    elif name == "swin":  # window attention, shifted windows by torch.roll
        args = {"patch_size": 2, "embed_dim": 4, "depths": (2,), "num_heads": (2,)}
        net = timm.models.swin_transformer.SwinTransformer(
            img_size=size, window_size=2, **args, **common
        )
    elif name == "mixer":
        args = {"patch_size": 2, "num_blocks": 2, "embed_dim": 8}
        net = timm.models.mlp_mixer.MlpMixer(img_size=size, **args, **common)
    elif name == "efficientnet":  # depthwise convs, SiLU, squeeze-excite, batch norm
        net = timm.models.efficientnet._gen_efficientnet(
            "efficientnet_b0", channel_multiplier=0.25, depth_multiplier=0.25, **common
        )
    else:  # the same with hardswish and a hardsigmoid gate
        net = timm.create_model("mobilenetv3_small_050", pretrained=False, **common)
    net = net.double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 1.5)
    return ImageHead(net, size), torch.randn(2, 1, size, size, dtype=torch.float64)


TIMM_NAMES = ("convnext", "vit", "swin", "mixer", "efficientnet")


class ImageHead(nn.Module):
    """A classifier's logits of ``H W`` classes reshaped to a one-channel image."""

    def __init__(self, net: nn.Module, size: int):
        super().__init__()
        self.net, self.size = net, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(len(x), 1, self.size, self.size)


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_NAMES)
def test_timm_models_divergence_and_parameter_gradients(name):
    model, x = timm_model(name)
    with sdpa_kernel([SDPBackend.MATH]):  # (the fused kernel has no double backward)
        diagonal = loop_diagonal(model, x, create_graph=True)
    for method in ("auto", "structured"):
        divergence = torchdiv.divergence(model, x, method=method)
        torch.testing.assert_close(divergence, diagonal.flatten(1).sum(1), rtol=1e-9, atol=1e-9)
        loss = divergence.square().sum()
        assert_same_parameter_gradients(model, loss, diagonal.flatten(1).sum(1).square().sum())


@pytest.mark.parametrize("name", [*TIMM_NAMES, "mobilenetv3"])
def test_timm_models_in_train_mode_are_refused_only_with_batch_norm(name):
    model, x = timm_model(name)
    model.train()
    for module in model.modules():  # drop path: random per sample, not mixing
        if type(module).__name__ in ("DropPath", "Dropout"):
            module.eval()
    modes = [m.training for m in model.modules()]
    for method in ("auto", "reverse", "forward", "structured"):
        if name in ("efficientnet", "mobilenetv3"):
            with pytest.raises(torchdiv.BatchInteractionError):
                torchdiv.divergence(model, x, method=method)
        else:
            torchdiv.divergence(model, x, method=method)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
