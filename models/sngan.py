"""SN-GAN for 32x32 images (CIFAR-10): the ResNet generator and spectrally normalised discriminator of
Miyato et al., in the PyTorch layout of VITA-Group/AutoGAN (models/sngan_cifar10.py), whose
generator the content-aware GAN compression paper compresses (its Table 3: 4.27M parameters).
Built from gansparse layers with the reference's module tree, so its checkpoints load unchanged.

Generator: z [N, z_dim] -> linear to ch x 4 x 4 -> 3 up-blocks (BN, ReLU, nearest 2x upsampling,
conv 3x3, BN, ReLU, conv 3x3, plus a shortcut of upsampling and a 1x1 conv) -> BN, ReLU, conv 3x3
to 3 channels, tanh. mask: None, or a mask kind of gansparse.masks after each block's second BN
(the hidden channels between its two convs, before the ReLU), where channel pruning can remove them
without touching the residual sums.

Discriminator: an optimized first block (conv, ReLU, conv, 2x2 average pooling; shortcut pooling
then 1x1 conv), a downsampling block, two plain blocks (pre-activation ReLU, shortcut 1x1 conv only
where it downsamples), ReLU, a sum over space and a linear layer to one logit; every conv and the
linear layer spectrally normalised (torch.nn.utils.spectral_norm: keys weight_orig, weight_u,
weight_v), as the reference with d_spectral_norm.

MACs (gansparse.profile, torchprofile's convention): 1.68G for the generator at 32px. Table 3 of the
content-aware paper lists 1.60B FLOPs for it, a figure no counting convention of this architecture
gives (without the shortcut 1x1 convs: 1.59G; without batch norms, the linear layer or the last
conv: 1.68G), while the same table's compressed generators are reproduced exactly by this count
at uniform widths: ch 180 gives its 2.23M parameters and 0.83B, ch 128 its 1.20M and 0.42B, and
its text's "2x" and "4x" accelerations are 1.68 / 0.83 and 1.68 / 0.42. Its released code
(lychenyoko/content-aware-gan-compression) has no SN-GAN, and the paper takes GAN-Slimming's
SN-GAN rows from that paper; 1.60B most likely comes from there, counted another way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gansparse import MaskedConv2d

from .dcgan import check_latent, check_positive_ints
from .pix2pix import _check_options, _example_image, norm_layer

__all__ = ["DisBlock", "Discriminator", "GenBlock", "Generator", "OptimizedDisBlock"]


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class GenBlock(nn.Module):
    """c2(ReLU(mask(b2(c1(up(ReLU(b1(x)))))))) + c_sc(up(x))."""

    def __init__(self, in_channels: int, out_channels: int, mask: str | None = None) -> None:
        super().__init__()
        self.c1 = MaskedConv2d(in_channels, out_channels, 3, padding=1)
        self.c2 = MaskedConv2d(out_channels, out_channels, 3, padding=1)
        self.b1 = nn.BatchNorm2d(in_channels)
        self.b2 = norm_layer("batch", out_channels, mask)
        self.c_sc = MaskedConv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(_upsample(F.relu(self.b1(x))))
        h = self.c2(F.relu(self.b2(h)))
        return h + self.c_sc(_upsample(x))


class Generator(nn.Module):
    """The SN-GAN CIFAR-10 generator: z_dim 128, ch 256, bottom_width 4 (32x32 output) by default."""

    def __init__(self, z_dim: int = 128, ch: int = 256, bottom_width: int = 4, *, mask: str | None = None) -> None:
        super().__init__()
        check_positive_ints(z_dim=z_dim, ch=ch, bottom_width=bottom_width)
        _check_options("batch", mask)
        self.z_dim, self.ch, self.bottom_width = z_dim, ch, bottom_width
        self.l1 = nn.Linear(z_dim, bottom_width ** 2 * ch)
        self.block2 = GenBlock(ch, ch, mask)
        self.block3 = GenBlock(ch, ch, mask)
        self.block4 = GenBlock(ch, ch, mask)
        self.b5 = nn.BatchNorm2d(ch)
        self.c5 = MaskedConv2d(ch, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        check_latent(z, (self.z_dim,))
        h = self.l1(z).view(-1, self.ch, self.bottom_width, self.bottom_width)  # [N, ch, 4, 4]
        h = self.block4(self.block3(self.block2(h)))  # [N, ch, 32, 32]
        return torch.tanh(self.c5(F.relu(self.b5(h))))

    def example_inputs(self) -> tuple[torch.Tensor]:
        """z [1, z_dim], e.g. for gansparse.export.compact."""
        return (_example_image(self, self.z_dim, 1).view(1, -1),)


def _sn(module: nn.Module, enabled: bool) -> nn.Module:
    return nn.utils.spectral_norm(module) if enabled else module


class OptimizedDisBlock(nn.Module):
    """pool(c2(ReLU(c1(x)))) + c_sc(pool(x)): the first block, on the image itself."""

    def __init__(self, in_channels: int, out_channels: int, sn: bool = True) -> None:
        super().__init__()
        self.c1 = _sn(MaskedConv2d(in_channels, out_channels, 3, padding=1), sn)
        self.c2 = _sn(MaskedConv2d(out_channels, out_channels, 3, padding=1), sn)
        self.c_sc = _sn(MaskedConv2d(in_channels, out_channels, 1), sn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)
        return h + self.c_sc(F.avg_pool2d(x, 2))


class DisBlock(nn.Module):
    """[pool](c2(ReLU(c1(ReLU(x))))) + shortcut, the shortcut [pool](c_sc(x)) when the block
    downsamples or changes the width, else x."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool = False, sn: bool = True) -> None:
        super().__init__()
        self.downsample = downsample
        self.c1 = _sn(MaskedConv2d(in_channels, in_channels, 3, padding=1), sn)
        self.c2 = _sn(MaskedConv2d(in_channels, out_channels, 3, padding=1), sn)
        self.learnable_sc = downsample or in_channels != out_channels
        if self.learnable_sc:
            self.c_sc = _sn(MaskedConv2d(in_channels, out_channels, 1), sn)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) if self.downsample else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._pool(self.c2(F.relu(self.c1(F.relu(x)))))
        return h + (self._pool(self.c_sc(x)) if self.learnable_sc else x)


class Discriminator(nn.Module):
    """The SN-GAN CIFAR-10 discriminator: ch 128 by default; x [N, 3, H, W] -> logits [N, 1]."""

    def __init__(self, ch: int = 128, in_channels: int = 3, *, spectral_norm: bool = True) -> None:
        super().__init__()
        check_positive_ints(ch=ch, in_channels=in_channels)
        self.block1 = OptimizedDisBlock(in_channels, ch, spectral_norm)
        self.block2 = DisBlock(ch, ch, downsample=True, sn=spectral_norm)
        self.block3 = DisBlock(ch, ch, sn=spectral_norm)
        self.block4 = DisBlock(ch, ch, sn=spectral_norm)
        self.l5 = _sn(nn.Linear(ch, 1, bias=False), spectral_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block4(self.block3(self.block2(self.block1(x))))
        return self.l5(F.relu(h).sum(2).sum(2))  # [N, ch] -> [N, 1]

    def example_inputs(self) -> tuple[torch.Tensor]:
        """One image [1, in_channels, 32, 32] (CIFAR-10's size)."""
        return (_example_image(self, self.block1.c1.in_channels, 32),)
