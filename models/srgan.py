"""SRGAN's networks as BasicSR trains them (XPixelGroup/BasicSR, the baseline implementation
Self-Supervised GAN Compression compresses), built from gansparse layers with BasicSR's module
names, so its checkpoints (the state_dict under 'params' in its net_g_*.pth / net_d_*.pth) load
unchanged.

Generator: BasicSR's SRGAN config (options/train/SRResNet_SRGAN/train_MSRGAN_x4.yml) uses
`MSRResNet`, the "modified SRResNet" of basicsr/archs/srresnet_arch.py, not the original SRResNet
of Ledig et al. (9x9 convs, PReLU, batch norms in the residual blocks): every conv is 3x3,
activations are LeakyReLU(0.1), the residual blocks have no batch norm
(x + conv2(relu(conv1(x)))), and the output adds the bilinear upsampling of the input:

    conv_first, lrelu -> num_block residual blocks (`body`) -> upsampling -> conv_hr, lrelu -> conv_last
    + bilinear(x, upscale)

The upsampling is conv to 4x the channels, PixelShuffle(2), lrelu, twice for x4 (upconv1,
upconv2), once with upscale**2 channels for x2 and x3 (upconv1). It computes on images in [0, 1],
as BasicSR does; with `signed=True` it takes and returns images in [-1, 1] (the training loop's
range) by mapping them to [0, 1] and back, around the same computation.

mask (generator): None, or a mask kind of gansparse.masks on the channels of each residual block's
first conv (`body.<i>.mask`, before its ReLU) and of conv_hr (`mask_hr`, before its LeakyReLU):
the channels only one conv reads. Masks add `*.mask.*` keys only. The residual stream and the
channels PixelShuffle regroups stay whole (gansparse.export keeps the channels of layers it does
not know, such as PixelShuffle).

Discriminator: BasicSR's `VGGStyleDiscriminator` (basicsr/archs/discriminator_arch.py), not the
SRGAN paper's (8 convs, dense 1024): per stage i a 3x3 stride-1 conv (`conv{i}_0`) and a 4x4
stride-2 conv (`conv{i}_1`), each followed by a batch norm (`bn{i}_0`, `bn{i}_1`; none after
conv0_0, the only conv with a bias) and LeakyReLU(0.2), widths num_feat * (1, 2, 4, 8, 8, ...);
then linear1 to 100 features, LeakyReLU(0.2), linear2 to one logit [N, 1]. BasicSR takes 128x128
(5 stages) or 256x256 (6 stages) inputs; here any power of two input_size >= 8 has log2(input_size)
- 2 stages, so the map before linear1 is 4x4 (small sizes for smoke runs).
"""
from __future__ import annotations

import math

import torch
from torch import fx, nn
from torch.nn import functional as F

from gansparse import MaskedConv2d

from .dcgan import check_positive_ints
from .norms import ChannelMask
from .pix2pix import _check_options, _example_image

__all__ = ["MSRResNet", "ResidualBlockNoBN", "VGGStyleDiscriminator"]

UPSCALES = (2, 3, 4)


def _mask_or_identity(channels: int, mask: str | None) -> nn.Module:
    """A channel mask, or an nn.Identity (no keys) without one."""
    return nn.Identity() if mask is None else ChannelMask(channels, mask=mask)


def _default_init_(convs: list[nn.Module], scale: float = 0.1) -> None:
    """BasicSR's default_init_weights: Kaiming-normal weights times `scale`, zero biases."""
    with torch.no_grad():
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight)
            conv.weight.mul_(scale)
            if conv.bias is not None:
                conv.bias.zero_()


class ResidualBlockNoBN(nn.Module):
    """x + conv2(relu(mask(conv1(x)))): 3x3 convs with biases, no batch norm (BasicSR's
    ResidualBlockNoBN with res_scale 1)."""

    def __init__(self, num_feat: int, *, mask: str | None = None) -> None:
        super().__init__()
        self.conv1 = MaskedConv2d(num_feat, num_feat, 3, 1, 1)
        self.conv2 = MaskedConv2d(num_feat, num_feat, 3, 1, 1)
        self.mask = _mask_or_identity(num_feat, mask)
        self.relu = nn.ReLU()
        _default_init_([self.conv1, self.conv2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.mask(self.conv1(x))))


class MSRResNet(nn.Module):
    """BasicSR's modified SRResNet (see the module docstring): [N, num_in_ch, h, w] ->
    [N, num_out_ch, upscale * h, upscale * w]."""

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_block: int = 16,
                 upscale: int = 4, *, mask: str | None = None, signed: bool = False) -> None:
        super().__init__()
        check_positive_ints(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat)
        if not (isinstance(num_block, int) and num_block >= 0):
            raise ValueError(f"num_block must be an int >= 0, got {num_block!r}")
        if upscale not in UPSCALES:
            raise ValueError(f"upscale must be one of {UPSCALES}, got {upscale!r}")
        _check_options("none", mask)
        self.upscale, self.signed = upscale, signed
        self.conv_first = MaskedConv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(ResidualBlockNoBN(num_feat, mask=mask) for _ in range(num_block)))
        shuffle = 2 if upscale == 4 else upscale
        self.upconv1 = MaskedConv2d(num_feat, num_feat * shuffle ** 2, 3, 1, 1)
        upconvs = [self.upconv1]
        if upscale == 4:
            self.upconv2 = MaskedConv2d(num_feat, num_feat * 4, 3, 1, 1)
            upconvs.append(self.upconv2)
        self.pixel_shuffle = nn.PixelShuffle(shuffle)
        self.conv_hr = MaskedConv2d(num_feat, num_feat, 3, 1, 1)
        self.mask_hr = _mask_or_identity(num_feat, mask)
        self.conv_last = MaskedConv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.1)
        _default_init_([self.conv_first, *upconvs, self.conv_hr, self.conv_last])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, fx.Proxy) and (x.dim() != 4 or x.shape[1] != self.conv_first.in_channels):
            raise ValueError(f"x must be a tensor [N, {self.conv_first.in_channels}, h, w], got {tuple(x.shape)}")
        if self.signed:
            x = (x + 1) / 2  # [-1, 1] -> BasicSR's [0, 1]
        out = self.body(self.lrelu(self.conv_first(x)))  # [N, num_feat, h, w]
        out = self.lrelu(self.pixel_shuffle(self.upconv1(out)))
        if self.upscale == 4:
            out = self.lrelu(self.pixel_shuffle(self.upconv2(out)))  # [N, num_feat, 4h, 4w]
        out = self.conv_last(self.lrelu(self.mask_hr(self.conv_hr(out))))
        out = out + F.interpolate(x, scale_factor=self.upscale, mode="bilinear", align_corners=False)
        return out * 2 - 1 if self.signed else out

    def example_inputs(self) -> tuple[torch.Tensor]:
        """A small low-resolution image [1, num_in_ch, 8, 8], e.g. for gansparse.export.compact."""
        return (_example_image(self, self.conv_first.in_channels, 8),)


class VGGStyleDiscriminator(nn.Module):
    """BasicSR's VGG-style discriminator (see the module docstring): [N, num_in_ch, input_size,
    input_size] -> logits [N, 1]."""

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64, input_size: int = 128) -> None:
        super().__init__()
        check_positive_ints(num_in_ch=num_in_ch, num_feat=num_feat)
        if not (isinstance(input_size, int) and input_size >= 8 and input_size & (input_size - 1) == 0):
            raise ValueError(f"input_size must be a power of two >= 8, got {input_size!r}")
        self.input_size = input_size
        self.stages = int(math.log2(input_size)) - 2  # each halves the side, down to 4x4
        width = num_in_ch
        for i in range(self.stages):
            previous, width = width, num_feat * min(2 ** i, 8)
            setattr(self, f"conv{i}_0", MaskedConv2d(previous, width, 3, 1, 1, bias=i == 0))
            if i > 0:
                setattr(self, f"bn{i}_0", nn.BatchNorm2d(width))
            setattr(self, f"conv{i}_1", MaskedConv2d(width, width, 4, 2, 1, bias=False))
            setattr(self, f"bn{i}_1", nn.BatchNorm2d(width))
        self.linear1 = nn.Linear(width * 4 * 4, 100)
        self.linear2 = nn.Linear(100, 1)
        self.lrelu = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.conv0_0.in_channels, self.input_size, self.input_size)
        if not isinstance(x, fx.Proxy) and (x.dim() != 4 or tuple(x.shape[1:]) != expected):
            raise ValueError(f"x must be a tensor [N, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
        feat = self.lrelu(self.conv0_0(x))
        for i in range(self.stages):
            if i > 0:
                feat = self.lrelu(getattr(self, f"bn{i}_0")(getattr(self, f"conv{i}_0")(feat)))
            feat = self.lrelu(getattr(self, f"bn{i}_1")(getattr(self, f"conv{i}_1")(feat)))  # side / 2
        feat = self.lrelu(self.linear1(feat.flatten(1)))  # [N, width * 4 * 4] -> [N, 100]
        return self.linear2(feat)  # [N, 1]

    def example_inputs(self) -> tuple[torch.Tensor]:
        """One image [1, num_in_ch, input_size, input_size]."""
        return (_example_image(self, self.conv0_0.in_channels, self.input_size),)
