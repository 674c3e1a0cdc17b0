"""The generators and discriminators of CycleGAN and pix2pix (junyanz/pytorch-CycleGAN-and-pix2pix,
models/networks.py), built from gansparse layers, with the reference's module tree: its
checkpoints load with no key remapping (load_reference_state_dict), and with masks off every
network computes exactly what the reference computes.

Reference conventions kept here: norm 'batch' is BatchNorm2d(affine=True, track_running_stats=True),
'instance' is InstanceNorm2d(affine=False, track_running_stats=False), 'none' an nn.Identity in the
norm's place; a conv followed by a norm has a bias only with instance norm (a batch norm's shift
makes it redundant).

mask (generators only): None, or a mask kind of gansparse.masks ('dmad', 'sigmoid', 'hard') put
after the norm of every conv that has one, before its activation, as DMAD does: on the
downsampling, residual-block and upsampling convs of the ResNet generator, on the down and up convs
of the U-Net. The mask lives in the norm's slot (models.norms), so the reference's keys stay the
same and masks only add `*.mask.*` keys.
"""
from __future__ import annotations

import torch
from torch import nn

from gansparse import MaskedConv2d, MaskedConvTranspose2d
from gansparse.masks import MASK_KINDS, Mask

from .norms import ChannelMask, MaskedBatchNorm2d, MaskedInstanceNorm2d

NORMS = ("batch", "instance", "none")
PADDING_TYPES = ("reflect", "replicate", "zero")

__all__ = ["NLayerDiscriminator", "PixelDiscriminator", "ResidualBlock", "ResnetBlock", "ResnetGenerator",
           "UnetGenerator", "UnetSkipConnectionBlock", "load_reference_state_dict", "residual_blocks",
           "residual_mask_groups"]


def _check_options(norm: str, mask: str | None = None) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if mask is not None and mask not in MASK_KINDS:
        raise ValueError(f"mask must be None or one of {tuple(MASK_KINDS)}, got {mask!r}")


def norm_layer(norm: str, channels: int, mask: str | None = None) -> nn.Module:
    """The reference's norm after a conv, followed by a new `mask` when one is asked for."""
    if norm == "batch":
        return nn.BatchNorm2d(channels) if mask is None else MaskedBatchNorm2d(channels, mask=mask)
    if norm == "instance":
        return nn.InstanceNorm2d(channels) if mask is None else MaskedInstanceNorm2d(channels, mask=mask)
    return nn.Identity() if mask is None else ChannelMask(channels, mask=mask)


def _conv_bias(norm: str) -> bool:
    return norm == "instance"


# --- ResNet generator (CycleGAN) -------------------------------------------------------------


def _padding(padding_type: str) -> tuple[list[nn.Module], int]:
    """(padding layers before a 3x3 conv, the conv's own padding) for a residual block."""
    if padding_type == "reflect":
        return [nn.ReflectionPad2d(1)], 0
    if padding_type == "replicate":
        return [nn.ReplicationPad2d(1)], 0
    return [], 1


class ResidualBlock(nn.Module):
    """x + conv_block(x): the residual blocks of the ResNet generators, whose conv_block ends with
    the norm (and mask) of its last conv."""

    conv_block: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetBlock(ResidualBlock):
    """x + [pad, conv 3x3, norm, ReLU, (dropout), pad, conv 3x3, norm](x)."""

    def __init__(self, dim: int, padding_type: str, norm: str, use_dropout: bool, mask: str | None = None) -> None:
        super().__init__()
        layers = []
        for second in (False, True):
            pad, p = _padding(padding_type)
            layers += pad + [MaskedConv2d(dim, dim, 3, padding=p, bias=_conv_bias(norm)), norm_layer(norm, dim, mask)]
            if not second:
                layers.append(nn.ReLU(True))
                if use_dropout:
                    layers.append(nn.Dropout(0.5))
        self.conv_block = nn.Sequential(*layers)


class ResnetGenerator(nn.Module):
    """The CycleGAN generator: a 7x7 conv, two stride-2 downsamplings, n_blocks residual blocks at
    4 ngf channels, two stride-2 transposed-conv upsamplings, a 7x7 conv and tanh. 'resnet_9blocks'
    is n_blocks=9, 'resnet_6blocks' n_blocks=6."""

    def __init__(self, input_nc: int, output_nc: int, ngf: int = 64, norm: str = "batch", use_dropout: bool = False,
                 n_blocks: int = 6, padding_type: str = "reflect", *, mask: str | None = None) -> None:
        super().__init__()
        _check_options(norm, mask)
        if padding_type not in PADDING_TYPES:
            raise ValueError(f"padding_type must be one of {PADDING_TYPES}, got {padding_type!r}")
        if not (isinstance(n_blocks, int) and n_blocks >= 0):
            raise ValueError(f"n_blocks must be an int >= 0, got {n_blocks!r}")
        bias = _conv_bias(norm)
        layers = [nn.ReflectionPad2d(3), MaskedConv2d(input_nc, ngf, 7, bias=bias), norm_layer(norm, ngf, mask),
                  nn.ReLU(True)]
        for channels in (ngf, ngf * 2):  # downsampling
            layers += [MaskedConv2d(channels, channels * 2, 3, stride=2, padding=1, bias=bias),
                       norm_layer(norm, channels * 2, mask), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4, padding_type, norm, use_dropout, mask) for _ in range(n_blocks)]
        for channels in (ngf * 4, ngf * 2):  # upsampling
            layers += [MaskedConvTranspose2d(channels, channels // 2, 3, stride=2, padding=1, output_padding=1,
                                             bias=bias),
                       norm_layer(norm, channels // 2, mask), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), MaskedConv2d(ngf, output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def example_inputs(self) -> tuple[torch.Tensor]:
        """A small input (batch 1, 32x32) for tracing, e.g. by gansparse.export.compact."""
        return (_example_image(self, self.model[1].in_channels, 32),)


def residual_blocks(model: nn.Module) -> list[int]:
    """The indices of the residual blocks in a ResNet generator's `model` Sequential (this one's or
    the MobileNet-style one's, which share the layout); [] for other models."""
    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential):
        return []
    return [i for i, layer in enumerate(layers) if isinstance(layer, ResidualBlock)]


def residual_mask_groups(model: nn.Module) -> list[list[Mask]]:
    """The masks on the residual stream of a masked ResNet generator, as one group (DMAD Eq. 6): the
    mask of the layer that feeds the stream (the last downsampling conv's) and the mask after each
    residual block's last conv. Channel t of the stream can only go when it is zero in all of them.
    [] for a model without residual blocks or without masks."""
    blocks = residual_blocks(model)
    if not blocks:
        return []
    layers = list(model.model)
    # The layers before the first block end with [conv, norm + mask, ReLU]: the feeder's mask sits at -2.
    members = [layers[blocks[0] - 2]] + [layers[i].conv_block[-1] for i in blocks]
    masks = [getattr(member, "mask", None) for member in members]
    return [masks] if all(isinstance(mask, Mask) for mask in masks) else []


# --- U-Net generator (pix2pix) ---------------------------------------------------------------


class UnetSkipConnectionBlock(nn.Module):
    """One level of the U-Net: x -> cat([x, up(submodule(down(x)))]), the outermost level without
    the concatenation. down: LeakyReLU(0.2), conv 4x4 stride 2, norm (none innermost, neither
    activation nor norm outermost); up: ReLU, transposed conv 4x4 stride 2, norm (tanh outermost),
    dropout when asked (middle levels)."""

    def __init__(self, outer_nc: int, inner_nc: int, input_nc: int | None = None,
                 submodule: nn.Module | None = None, outermost: bool = False, innermost: bool = False,
                 norm: str = "batch", use_dropout: bool = False, *, mask: str | None = None) -> None:
        super().__init__()
        _check_options(norm, mask)
        self.outermost = outermost
        bias = _conv_bias(norm)
        down_conv = MaskedConv2d(input_nc or outer_nc, inner_nc, 4, stride=2, padding=1, bias=bias)
        # Every level below the outermost receives the concatenation of the skip and the up path.
        up_in = inner_nc if innermost else inner_nc * 2
        if outermost:
            layers = [down_conv, submodule, nn.ReLU(True), MaskedConvTranspose2d(up_in, outer_nc, 4, 2, 1), nn.Tanh()]
        elif innermost:
            layers = [nn.LeakyReLU(0.2, True), down_conv, nn.ReLU(True),
                      MaskedConvTranspose2d(up_in, outer_nc, 4, 2, 1, bias=bias), norm_layer(norm, outer_nc, mask)]
        else:
            layers = [nn.LeakyReLU(0.2, True), down_conv, norm_layer(norm, inner_nc, mask), submodule, nn.ReLU(True),
                      MaskedConvTranspose2d(up_in, outer_nc, 4, 2, 1, bias=bias), norm_layer(norm, outer_nc, mask)]
            if use_dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """The pix2pix generator: num_downs stride-2 levels, so the input side must be a multiple of
    2**num_downs ('unet_128' is num_downs=7 at 128x128, 'unet_256' num_downs=8 at 256x256).
    Channels: ngf, 2 ngf, 4 ngf, then 8 ngf for the remaining num_downs - 3 levels."""

    def __init__(self, input_nc: int, output_nc: int, num_downs: int, ngf: int = 64, norm: str = "batch",
                 use_dropout: bool = False, *, mask: str | None = None) -> None:
        super().__init__()
        _check_options(norm, mask)
        if not (isinstance(num_downs, int) and num_downs >= 5):
            raise ValueError(f"num_downs must be an int >= 5, got {num_downs!r}")
        options = dict(norm=norm, mask=mask)
        block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, innermost=True, **options)
        for _ in range(num_downs - 5):
            block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, submodule=block, use_dropout=use_dropout, **options)
        for outer_nc in (ngf * 4, ngf * 2, ngf):
            block = UnetSkipConnectionBlock(outer_nc, outer_nc * 2, submodule=block, **options)
        self.model = UnetSkipConnectionBlock(output_nc, ngf, input_nc, block, outermost=True, **options)
        self.num_downs = num_downs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def example_inputs(self) -> tuple[torch.Tensor]:
        """The smallest input the U-Net takes (batch 1, 2**num_downs square), for tracing."""
        return (_example_image(self, self.model.model[0].in_channels, 2 ** self.num_downs),)


def _example_image(model: nn.Module, channels: int, side: int) -> torch.Tensor:
    """A fixed random image: export reads channel values from a run, and a constant image would
    make every channel look constant."""
    weight = next(model.parameters())
    image = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(0))
    return image.to(device=weight.device, dtype=weight.dtype)


# --- discriminators --------------------------------------------------------------------------


class NLayerDiscriminator(nn.Module):
    """The PatchGAN discriminator: 4x4 convs with LeakyReLU(0.2), n_layers of them stride 2 (the
    first without a norm), then a stride-1 one and a 1-channel stride-1 output conv; channels ndf
    times 1, 2, 4, 8, 8, ... ('basic' is n_layers=3, a 70x70 receptive field)."""

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        _check_options(norm)
        bias = _conv_bias(norm)
        layers = [MaskedConv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            previous, mult = mult, min(2 ** n, 8)
            layers += [MaskedConv2d(ndf * previous, ndf * mult, 4, stride=2 if n < n_layers else 1, padding=1,
                                    bias=bias),
                       norm_layer(norm, ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(MaskedConv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        self.n_layers = n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def example_inputs(self) -> tuple[torch.Tensor]:
        """A small input (batch 1, 2**(n_layers + 2) square: a 2x2 patch map) for tracing."""
        return (_example_image(self, self.model[0].in_channels, 2 ** (self.n_layers + 2)),)


class PixelDiscriminator(nn.Module):
    """The 1x1 PatchGAN ('pixel'): 1x1 convs ndf, 2 ndf (with a norm), 1, with LeakyReLU(0.2)."""

    def __init__(self, input_nc: int, ndf: int = 64, norm: str = "batch") -> None:
        super().__init__()
        _check_options(norm)
        bias = _conv_bias(norm)
        self.net = nn.Sequential(
            MaskedConv2d(input_nc, ndf, 1), nn.LeakyReLU(0.2, True),
            MaskedConv2d(ndf, ndf * 2, 1, bias=bias), norm_layer(norm, ndf * 2), nn.LeakyReLU(0.2, True),
            MaskedConv2d(ndf * 2, 1, 1, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def example_inputs(self) -> tuple[torch.Tensor]:
        """A small input (batch 1, 32x32) for tracing."""
        return (_example_image(self, self.net[0].in_channels, 32),)


# --- checkpoints ---------------------------------------------------------------------------


def load_reference_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]):
    """Load a reference checkpoint (e.g. torch.load('latest_net_G.pth', weights_only=True)) into
    `model`: every reference key must match, the model's mask keys may be absent (the masks keep
    their initial values), and the running statistics that older versions of the reference saved
    for InstanceNorm2d are dropped, as the reference's own loader does. Returns load_state_dict's
    result."""
    instance_norms = {name for name, m in model.named_modules()
                      if isinstance(m, nn.InstanceNorm2d) and not m.track_running_stats}
    legacy = {key for key in state_dict if key.rpartition(".")[0] in instance_norms
              and key.rpartition(".")[2] in ("running_mean", "running_var", "num_batches_tracked")}
    result = model.load_state_dict({k: v for k, v in state_dict.items() if k not in legacy}, strict=False)
    mask_prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, Mask))
    missing = [key for key in result.missing_keys if not key.startswith(mask_prefixes)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"the checkpoint does not fit {type(model).__name__}: missing keys {missing}, "
                           f"unexpected keys {result.unexpected_keys}")
    return result
