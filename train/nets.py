"""Builders of the CycleGAN / pix2pix networks (gansparse.models) from a run's options, shared by
every method that trains or compresses them.

Options read (flat keys, as in junyanz/pytorch-CycleGAN-and-pix2pix):
  netG        'resnet_<n>blocks' (e.g. 'resnet_9blocks', 'resnet_6blocks') or 'unet_<size>'
              (e.g. 'unet_256', 'unet_128': log2(size) stride-2 levels)
  mobile      the ResNet generators with separable residual blocks (GAN Compression's
              MobileNet-style 'mobile_resnet_<n>blocks')
  netD        'basic' (3-layer PatchGAN), 'n_layers' (n_layers_D layers) or 'pixel'
  ngf, ndf    widths of the first layers of G and D
  norm        'batch', 'instance' or 'none'
  dropout     dropout in the residual blocks / middle U-Net levels
  input_nc, output_nc   image channels
  init_type, init_gain  weight initialisation: 'normal', 'xavier', 'kaiming' or 'orthogonal'
"""
from __future__ import annotations

import math
import re

from torch import nn

from gansparse.models import (
    MobileResnetGenerator,
    NLayerDiscriminator,
    PixelDiscriminator,
    ResnetGenerator,
    UnetGenerator,
)

from .config import ConfigError

__all__ = ["build_discriminator", "build_generator", "init_weights"]

INIT_TYPES = ("normal", "xavier", "kaiming", "orthogonal")


def init_weights(net: nn.Module, init_type: str = "normal", gain: float = 0.02) -> nn.Module:
    """junyanz's initialisation: conv and linear weights from `init_type` scaled by `gain`, biases
    0; batch-norm weights N(1, gain), biases 0. Masks keep their own initialisation."""
    if init_type not in INIT_TYPES:
        raise ValueError(f"init_type must be one of {INIT_TYPES}, got {init_type!r}")
    for module in net.modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            if init_type == "normal":
                nn.init.normal_(module.weight, 0.0, gain)
            elif init_type == "xavier":
                nn.init.xavier_normal_(module.weight, gain=gain)
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in")
            else:
                nn.init.orthogonal_(module.weight, gain=gain)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d) and module.affine:
            nn.init.normal_(module.weight, 1.0, gain)
            nn.init.zeros_(module.bias)
    return net


def build_generator(cfg: dict, mask: str | None = None, *, input_nc: int | None = None,
                    output_nc: int | None = None) -> nn.Module:
    """The generator named by cfg['netG'], initialised; `mask` puts a channel mask of that kind
    (gansparse.masks) after every norm, as gansparse.models does."""
    name = cfg["netG"]
    input_nc = cfg.get("input_nc", 3) if input_nc is None else input_nc
    output_nc = cfg.get("output_nc", 3) if output_nc is None else output_nc
    common = dict(ngf=cfg["ngf"], norm=cfg["norm"], use_dropout=cfg["dropout"], mask=mask)
    if (match := re.fullmatch(r"resnet_(\d+)blocks", name)) and cfg.get("mobile", False):
        net = MobileResnetGenerator(input_nc, output_nc, ngf=cfg["ngf"], norm=cfg["norm"],
                                    dropout_rate=0.5 if cfg["dropout"] else 0.0, n_blocks=int(match[1]), mask=mask)
    elif match:
        net = ResnetGenerator(input_nc, output_nc, n_blocks=int(match[1]), **common)
    elif (match := re.fullmatch(r"unet_(\d+)", name)) and _power_of_two(int(match[1])):
        net = UnetGenerator(input_nc, output_nc, num_downs=int(math.log2(int(match[1]))), **common)
    elif cfg.get("mobile", False):
        raise ConfigError(f"option 'mobile' needs a ResNet netG ('resnet_<n>blocks'), got {name!r}")
    else:
        raise ValueError(f"netG must be 'resnet_<n>blocks' (e.g. 'resnet_9blocks') or 'unet_<size>' with size a "
                         f"power of two >= 32 (e.g. 'unet_256'), got {name!r}")
    return init_weights(net, cfg.get("init_type", "normal"), cfg.get("init_gain", 0.02))


def build_discriminator(cfg: dict, *, input_nc: int | None = None) -> nn.Module:
    """The discriminator named by cfg['netD'], initialised; `input_nc` overrides cfg['output_nc']
    (a conditional pix2pix D sees input and output concatenated)."""
    name = cfg["netD"]
    input_nc = cfg.get("output_nc", 3) if input_nc is None else input_nc
    if name == "basic":
        net = NLayerDiscriminator(input_nc, cfg["ndf"], n_layers=3, norm=cfg["norm"])
    elif name == "n_layers":
        net = NLayerDiscriminator(input_nc, cfg["ndf"], n_layers=cfg["n_layers_D"], norm=cfg["norm"])
    elif name == "pixel":
        net = PixelDiscriminator(input_nc, cfg["ndf"], norm=cfg["norm"])
    else:
        raise ValueError(f"netD must be 'basic', 'n_layers' or 'pixel', got {name!r}")
    return init_weights(net, cfg.get("init_type", "normal"), cfg.get("init_gain", 0.02))


def _power_of_two(n: int) -> bool:
    return n >= 32 and n & (n - 1) == 0
