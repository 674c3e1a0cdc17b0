"""GAN Compression's MobileNet-style ResNet generator (mit-han-lab/gan-compression,
models/modules/resnet_architecture/mobile_resnet_generator.py, and the sub-networks of
sub_mobile_resnet_generator.py), built from gansparse layers with the reference's module tree, so
its checkpoints load with no key remapping.

It is CycleGAN's ResNet generator with every residual-block conv made separable: a depthwise 3x3
conv, an InstanceNorm2d (always instance, without affine, whatever `norm` is, as the reference's
SeparableConv2d) and a pointwise 1x1 conv. Each block also always holds an nn.Dropout (p=0 by
default), which the reference counts in its module indices.

Widths: `channels` is the reference's config 'channels' list (configs.decode_config('16_16_32_...')
['channels']): 8 entries, each multiplied by its layer's multiplier (CHANNEL_MULTIPLIERS): the stem
conv (x1), the two downsampling convs (x2, x4; the second sets the residual stream's width), the
inner width of the residual blocks of each third of them (x4 each), the two upsampling convs (x2,
x1). The legacy 6-entry form has one inner width for all blocks. Without `channels` every entry is
ngf: the 'mobile_resnet_9blocks' teacher.

The separable convs always have biases, as in the reference (its SeparableConv2d defaults to one and
no generator passes otherwise), whatever the norm. The sub-networks ('sub_mobile_resnet_9blocks') and
the super network clamp their input to [-1, 1], the teacher does not: `clamp_input`, which
sub_mobile_resnet_generator() sets. The reference sub-network sizes two kinds of norm by the wrong
width (the downsampling norms by the input width, the blocks' last norm by the inner width); that
only runs with parameter-free norms (instance, none), whose keys are the same either way, and here
every norm has its layer's width.

mask: None, or a mask kind of gansparse.masks put after the norm of every conv that has one,
before its activation, as on the CycleGAN generator (models/pix2pix.py): the stem, the downsampling
convs, both separable convs of every block (the first prunes the block's inner width, the second
the residual stream) and the upsampling convs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gansparse import MaskedConv2d, MaskedConvTranspose2d

from .pix2pix import PADDING_TYPES, ResidualBlock, _check_options, _conv_bias, _example_image, _padding, norm_layer

__all__ = ["CHANNEL_MULTIPLIERS", "Layers", "MobileResnetBlock", "MobileResnetGenerator", "SeparableConv2d",
           "block_groups", "build_layout", "check_layout", "config_channels", "decode_config", "encode_config",
           "sub_mobile_resnet_generator"]

# Layer width = config entry x multiplier: stem, down 1, down 2 (residual stream), the inner width of
# the blocks of each third, up 1, up 2.
CHANNEL_MULTIPLIERS = (1, 2, 4, 4, 4, 4, 2, 1)


def encode_config(config: dict) -> str:
    """The reference's config string: {'channels': [16, 16, 32]} -> '16_16_32'."""
    return "_".join(str(c) for c in config["channels"])


def decode_config(config_str: str) -> dict:
    """The reference's config string to a config: '16_16_32' -> {'channels': [16, 16, 32]}."""
    try:
        return {"channels": [int(c) for c in config_str.split("_")]}
    except (AttributeError, ValueError):
        raise ValueError(f"config_str must be channel counts joined by '_', e.g. '16_16_32_16_32_32_16_16', "
                         f"got {config_str!r}") from None


def config_channels(channels: Sequence[int]) -> list[int]:
    """The 8-entry 'channels' list of a config (the 6-entry legacy form expanded), checked."""
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or len(channels) not in (6, 8):
        raise ValueError(f"channels must be a list of 8 (or, legacy, 6) channel counts, got {channels!r}")
    if not all(isinstance(c, int) and c > 0 for c in channels):
        raise ValueError(f"channels must hold positive ints, got {list(channels)}")
    if len(channels) == 6:  # [stem, down 1, down 2, all blocks, up 1, up 2]
        channels = [*channels[:4], channels[3], channels[3], *channels[4:]]
    return list(channels)


def block_groups(n_blocks: int) -> list[int]:
    """The config group (0, 1, 2) of each residual block: the reference's thirds, n_blocks // 3
    blocks in the first two and the rest in the last."""
    third = n_blocks // 3
    return [0] * third + [1] * third + [2] * (n_blocks - 2 * third)


@dataclass(frozen=True)
class Layers:
    """The layer types a generator layout is built from: the plain generator's gansparse layers,
    or the super network's channel-slicing ones (models.supernet)."""

    conv: type[nn.Module]
    conv_transpose: type[nn.Module]
    norm: Callable[[str, int, str | None], nn.Module]  # norm(kind, channels, mask), as pix2pix.norm_layer
    inner_norm: type[nn.Module]  # the separable conv's own norm: InstanceNorm2d(channels)


GANSPARSE_LAYERS = Layers(MaskedConv2d, MaskedConvTranspose2d, norm_layer, nn.InstanceNorm2d)


class SeparableConv2d(nn.Module):
    """conv = [depthwise k x k conv, InstanceNorm2d, pointwise 1x1 conv], the reference's keys."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True, *, layers: Layers = GANSPARSE_LAYERS) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            layers.conv(in_channels, in_channels, kernel_size, stride=stride, padding=padding, groups=in_channels,
                        bias=bias),
            layers.inner_norm(in_channels),
            layers.conv(in_channels, out_channels, 1, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class MobileResnetBlock(ResidualBlock):
    """x + [pad, separable conv dim -> inner, norm, ReLU, dropout, pad, separable conv inner -> dim,
    norm](x)."""

    def __init__(self, dim: int, inner: int, padding_type: str, norm: str, dropout_rate: float,
                 mask: str | None = None, *, layers: Layers = GANSPARSE_LAYERS) -> None:
        super().__init__()
        block = []
        for c_in, c_out, tail in ((dim, inner, [nn.ReLU(True), nn.Dropout(dropout_rate)]), (inner, dim, [])):
            pad, p = _padding(padding_type)
            block += pad + [SeparableConv2d(c_in, c_out, 3, padding=p, layers=layers),
                            layers.norm(norm, c_out, mask)] + tail
        self.conv_block = nn.Sequential(*block)


def check_layout(norm: str, dropout_rate: float, n_blocks: int, padding_type: str, mask: str | None = None) -> None:
    """A clear error for any option a generator layout cannot take."""
    _check_options(norm, mask)
    if padding_type not in PADDING_TYPES:
        raise ValueError(f"padding_type must be one of {PADDING_TYPES}, got {padding_type!r}")
    if not (isinstance(n_blocks, int) and n_blocks >= 0):
        raise ValueError(f"n_blocks must be an int >= 0, got {n_blocks!r}")
    if not (isinstance(dropout_rate, (int, float)) and 0 <= dropout_rate <= 1):
        raise ValueError(f"dropout_rate must be a number in [0, 1], got {dropout_rate!r}")


def build_layout(input_nc: int, output_nc: int, channels: Sequence[int], norm: str, dropout_rate: float,
                 n_blocks: int, padding_type: str, mask: str | None = None, *,
                 layers: Layers = GANSPARSE_LAYERS) -> nn.Sequential:
    """The reference's `model` Sequential for an 8-entry config: [pad, stem conv 7x7, norm, ReLU],
    2 x [conv 3x3 stride 2, norm, ReLU], n_blocks MobileResnetBlocks, 2 x [transposed conv 3x3
    stride 2, norm, ReLU], [pad, conv 7x7, tanh]."""
    stem, down1, stream, *inner, up1, up2 = (c * m for c, m in zip(channels, CHANNEL_MULTIPLIERS))
    bias = _conv_bias(norm)
    model = [nn.ReflectionPad2d(3), layers.conv(input_nc, stem, 7, bias=bias), layers.norm(norm, stem, mask),
             nn.ReLU(True)]
    for c_in, c_out in ((stem, down1), (down1, stream)):
        model += [layers.conv(c_in, c_out, 3, stride=2, padding=1, bias=bias), layers.norm(norm, c_out, mask),
                  nn.ReLU(True)]
    model += [MobileResnetBlock(stream, inner[group], padding_type, norm, dropout_rate, mask, layers=layers)
              for group in block_groups(n_blocks)]
    for c_in, c_out in ((stream, up1), (up1, up2)):
        model += [layers.conv_transpose(c_in, c_out, 3, stride=2, padding=1, output_padding=1, bias=bias),
                  layers.norm(norm, c_out, mask), nn.ReLU(True)]
    model += [nn.ReflectionPad2d(3), layers.conv(up2, output_nc, 7), nn.Tanh()]
    return nn.Sequential(*model)


class MobileResnetGenerator(nn.Module):
    """GAN Compression's MobileNet-style ResNet generator ('mobile_resnet_9blocks' is the default
    n_blocks=9), or one of its sub-networks when `channels` (a config's 'channels' list) is given,
    which then replaces ngf. norm 'instance' (the reference's default), 'batch' or 'none'.

    clamp_input: clamp the input to [-1, 1] first, as the sub-networks and super network do.
    """

    def __init__(self, input_nc: int, output_nc: int, ngf: int = 64, norm: str = "instance",
                 dropout_rate: float = 0.0, n_blocks: int = 9, padding_type: str = "reflect", *,
                 channels: Sequence[int] | None = None, clamp_input: bool = False,
                 mask: str | None = None) -> None:
        super().__init__()
        check_layout(norm, dropout_rate, n_blocks, padding_type, mask)
        if channels is None:
            if not (isinstance(ngf, int) and ngf > 0):
                raise ValueError(f"ngf must be a positive int, got {ngf!r}")
            channels = [ngf] * len(CHANNEL_MULTIPLIERS)
        self.channels = config_channels(channels)
        self.clamp_input = clamp_input
        self.model = build_layout(input_nc, output_nc, self.channels, norm, dropout_rate, n_blocks, padding_type,
                                  mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.clamp(-1, 1) if self.clamp_input else x)

    def example_inputs(self) -> tuple[torch.Tensor]:
        """A small input (batch 1, 32x32) for tracing, e.g. by gansparse.export.compact."""
        return (_example_image(self, self.model[1].in_channels, 32),)


def sub_mobile_resnet_generator(input_nc: int, output_nc: int, config: dict, norm: str = "instance",
                                dropout_rate: float = 0.0, n_blocks: int = 9, padding_type: str = "reflect", *,
                                mask: str | None = None) -> MobileResnetGenerator:
    """The reference's 'sub_mobile_resnet_9blocks' for a config ({'channels': [...]}, e.g.
    decode_config('16_16_32_16_32_32_16_16')): what a super network's extract_subnet returns and
    what the compressed checkpoints load into."""
    if not isinstance(config, dict) or "channels" not in config:
        raise ValueError(f"config must be a dict with a 'channels' list, got {config!r}")
    return MobileResnetGenerator(input_nc, output_nc, norm=norm, dropout_rate=dropout_rate, n_blocks=n_blocks,
                                 padding_type=padding_type, channels=config["channels"], clamp_input=True,
                                 mask=mask)
