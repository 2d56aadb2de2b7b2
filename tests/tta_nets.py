"""Small networks for runtime tests: every BatchNorm flavour, and one without normalisation."""
from __future__ import annotations

import torch
from torch import nn


def conv_net(num_classes: int = 4, seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU x2, pooled, Linear: a miniature CNN whose BN layers have non-trivial running statistics."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
    _randomise_bn(net)
    return net.eval()


def mlp_bn1d(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    _randomise_bn(net)
    return net.eval()


def conv3d_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3))
    _randomise_bn(net)
    return net.eval()


def tiny_vit(num_classes: int = 4, seed: int = 0) -> nn.Module:
    """A randomly initialised timm ViT of the vit_tiny family, shrunk (2 blocks, width 32, 8-pixel patches on
    32 x 32 images): LayerNorm only, no BatchNorm."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=32, num_heads=2, num_classes=num_classes).eval()


def gn_resnet(num_classes: int = 4, seed: int = 0) -> nn.Module:
    """A randomly initialised timm ResNet (BasicBlock, one block per stage, narrow) with GroupNorm instead of BN."""
    import functools

    from timm.layers import GroupNorm
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(seed)
    return ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(8, 16, 16, 16), stem_width=8,
                  norm_layer=functools.partial(GroupNorm, num_groups=4), num_classes=num_classes).eval()


def no_norm_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _randomise_bn(net: nn.Module) -> None:
    """Give BN layers source statistics and affine values far from the defaults, so tests can tell them apart."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, cloned (for bitwise comparisons)."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"
