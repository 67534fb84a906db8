"""Small UNet2D and UNet3D baselines (paper section 3.5, Table 4), same classes and head.

Both follow the uniform window interface of :mod:`lungburden.segmentation.networks`: input
``(B, 2·context+1, S, S)``, output the logits of the centre slice ``(B, num_classes, S, S)``.
UNet2D has ``context=0`` (one slice); UNet3D reads a slab of ``2·context+1`` slices with 3-D
convolutions, pools in-plane only (the slab is thin) and keeps the centre slice's features for
the final segmentation head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lungburden.segmentation.networks.convlstm import SegmentationHead, conv_bn_act
from lungburden.segmentation.preprocess import DEFAULT_SIZE


def _kaiming(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, a=0.01, mode="fan_out", nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def conv3d_bn_act(cin: int, cout: int) -> nn.Sequential:
    """3×3×3 conv → BatchNorm → LeakyReLU."""
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout),
                         nn.LeakyReLU(0.01, inplace=True))


def _unet_blocks(conv: Callable[[int, int], nn.Module], base: int, depth: int
                 ) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The encoder (``depth + 1`` levels of two convs, ``base·2^level`` channels) and decoder
    (two convs per level on [upsampled, skip]) of a UNet, built from ``conv(cin, cout)``."""
    chans = [base * 2**i for i in range(depth + 1)]
    down = nn.ModuleList(nn.Sequential(conv(cin, c), conv(c, c))
                         for cin, c in zip([1, *chans[:-1]], chans, strict=True))
    up = nn.ModuleList(nn.Sequential(conv(chans[i + 1] + chans[i], chans[i]), conv(chans[i], chans[i]))
                       for i in reversed(range(depth)))
    return down, up


def _unet_pass(x: torch.Tensor, down: nn.ModuleList, up: nn.ModuleList,
               pool: Callable[[torch.Tensor], torch.Tensor], mode: str) -> torch.Tensor:
    """Encoder with ``pool`` between levels, decoder with ``mode`` interpolation and skips."""
    skips = []
    for i, block in enumerate(down):
        x = block(x if i == 0 else pool(x))
        skips.append(x)
    for block, skip in zip(up, reversed(skips[:-1]), strict=True):
        x = F.interpolate(x, size=skip.shape[2:], mode=mode, align_corners=False)
        x = block(torch.cat([x, skip], 1))
    return x


class UNet2D(nn.Module):
    """UNet (Ronneberger et al. 2015) on one slice: ``depth`` poolings, ``base·2^level`` channels."""

    name = "unet2d"

    def __init__(self, num_classes: int = 4, input_size: int = DEFAULT_SIZE, base: int = 16, depth: int = 3):
        super().__init__()
        self.hparams = dict(num_classes=num_classes, input_size=input_size, base=base, depth=depth)
        self.num_classes = num_classes
        self.context = 0
        self.input_size = input_size
        self.down, self.up = _unet_blocks(conv_bn_act, base, depth)
        self.head = SegmentationHead(base, base, num_classes)
        _kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1:
            raise ValueError(f"UNet2D takes one slice per window, got {x.shape[1]}")
        return self.head(_unet_pass(x, self.down, self.up, lambda t: F.max_pool2d(t, 2), "bilinear"))


class UNet3D(nn.Module):
    """3-D UNet (Çiçek et al. 2016) on a slab of ``2·context+1`` slices; in-plane pooling only."""

    name = "unet3d"

    def __init__(self, num_classes: int = 4, context: int = 2, input_size: int = DEFAULT_SIZE, base: int = 8,
                 depth: int = 3):
        super().__init__()
        self.hparams = dict(num_classes=num_classes, context=context, input_size=input_size, base=base,
                            depth=depth)
        self.num_classes = num_classes
        self.context = context
        self.input_size = input_size
        self.down, self.up = _unet_blocks(conv3d_bn_act, base, depth)
        self.head = SegmentationHead(base, base, num_classes)
        _kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 2 * self.context + 1:
            raise ValueError(f"expected {2 * self.context + 1} slices per window, got {x.shape[1]}")
        x = _unet_pass(x[:, None], self.down, self.up, lambda t: F.max_pool3d(t, (1, 2, 2)), "trilinear")
        return self.head(x[:, :, self.context])
