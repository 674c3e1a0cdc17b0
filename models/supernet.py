"""GAN Compression's once-for-all super network of the MobileNet-style ResNet generator
(mit-han-lab/gan-compression, models/modules/resnet_architecture/super_mobile_resnet_generator.py
and models/modules/super_modules.py).

The super network has the full-width module tree of a sub-network (its state_dict keys are those of
MobileResnetGenerator(..., ngf)) and runs any channel configuration by taking the
first N channels of every weight: sub-networks share weights, wider ones extending narrower ones.

    net = SuperMobileResnetGenerator(3, 3, ngf=32, search_space="channels-32")
    net.configure(decode_config("16_16_32_16_32_32_16_16"))    # or net.sample()
    y = net(x)                                                  # that sub-network's output
    sub = net.extract_subnet()                                  # a standalone MobileResnetGenerator

A config is the reference's {'channels': [8 entries]} (models.mobile_resnet: entry x multiplier =
layer width). Which layers share a width follows the reference: the second downsampling conv and
the second separable conv of every block share the residual stream's width (they add up), each
third of the blocks shares one inner width, and the output conv always has output_nc channels.

The super layers (SuperConv2d, SuperConvTranspose2d, SuperBatchNorm2d, SuperInstanceNorm2d) are
torch layers with the same keys as the ones they extend; convs take their input width from their
input and their output width from `active_out_channels` (set by configure), norms both from their
input. The reference's super network runs parameter-free norms only (instance, none);
SuperBatchNorm2d adds 'batch', normalising and updating the running statistics of the first
channels only. No masks: choosing channels is this network's own pruning.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gansparse.layers import norm_arguments

from .mobile_resnet import (
    CHANNEL_MULTIPLIERS,
    Layers,
    MobileResnetBlock,
    MobileResnetGenerator,
    SeparableConv2d,
    block_groups,
    build_layout,
    check_layout,
    config_channels,
)

__all__ = ["CHANNEL_CONFIGS", "SuperBatchNorm2d", "SuperConv2d", "SuperConvTranspose2d", "SuperInstanceNorm2d",
           "SuperMobileResnetGenerator"]

# The reference's named search spaces (configs/resnet_configs.py): the choices of each config entry.
CHANNEL_CONFIGS = {
    "channels-48": [[48, 32], [48, 32], [48, 40, 32], [48, 40, 32], [48, 40, 32], [48, 40, 32],
                    [48, 32, 24, 16], [48, 32, 24, 16]],
    "channels-32": [[32, 24, 16]] * 8,
    "channels-64-cycleGAN": [[64, 48, 32, 24, 16]] * 8,
    "channels-64-pix2pix": [[64, 56, 48, 32, 24, 16]] * 8,
}

# --- super layers ----------------------------------------------------------------------------


class _ActiveOutChannels:
    """active_out_channels: how many output channels a super conv runs (None: all), checked when set."""

    @property
    def active_out_channels(self) -> int | None:
        return self._active_out_channels

    @active_out_channels.setter
    def active_out_channels(self, value: int | None) -> None:
        if value is not None and not (isinstance(value, int) and 0 < value <= self.out_channels):
            raise ValueError(f"active_out_channels must be None or an int in [1, {self.out_channels}], got {value!r}")
        self._active_out_channels = value


def _check_input(layer: nn.Module, x: torch.Tensor, full: int) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-dim tensor [N, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    if not 0 < x.shape[1] <= full:
        raise ValueError(f"x has {x.shape[1]} channels; {type(layer).__name__} runs 1 to {full}")
    return x.shape[1]


class SuperConv2d(_ActiveOutChannels, nn.Conv2d):
    """nn.Conv2d running the first channels of its weight: as many input channels as x has and
    `active_out_channels` outputs (None: all). A depthwise conv (groups == in == out channels) runs
    as many channels as x has. Zero padding only, as in the reference."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("SuperConv2d takes numeric zero padding only")
        self.depthwise = self.groups == self.in_channels == self.out_channels and self.groups > 1
        if self.groups != 1 and not self.depthwise:
            raise ValueError(f"SuperConv2d takes groups=1 or a depthwise conv, got groups={self.groups}")
        self.active_out_channels = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c_in = _check_input(self, x, self.in_channels)
        if self.depthwise:  # weight [C, 1, k, k]
            c_out, weight, groups = c_in, self.weight[:c_in], c_in
        else:  # weight [C_out, C_in, k, k]
            c_out = self.active_out_channels or self.out_channels
            weight, groups = self.weight[:c_out, :c_in], 1
        bias = None if self.bias is None else self.bias[:c_out]
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)


class SuperConvTranspose2d(_ActiveOutChannels, nn.ConvTranspose2d):
    """nn.ConvTranspose2d running the first channels of its weight, as SuperConv2d (groups=1)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.groups != 1 or self.padding_mode != "zeros":
            raise ValueError("SuperConvTranspose2d takes groups=1 and zero padding only")
        self.active_out_channels = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c_in = _check_input(self, x, self.in_channels)
        c_out = self.active_out_channels or self.out_channels
        weight = self.weight[:c_in, :c_out]  # [C_in, C_out, k, k]
        bias = None if self.bias is None else self.bias[:c_out]
        return F.conv_transpose2d(x, weight, bias, self.stride, self.padding, self.output_padding, 1, self.dilation)


class SuperBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d on the first x.shape[1] channels: their affine, and their running statistics
    (used in eval, updated in training exactly as nn.BatchNorm2d updates its own); the other
    channels' statistics stay as they are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = _check_input(self, x, self.num_features)
        args = norm_arguments(self, None, x.shape[0])  # advances num_batches_tracked as nn.BatchNorm2d
        # A slice of a 1-dim buffer is a view: batch_norm updates the first running statistics in place.
        mean, var, gamma, beta = (None if t is None else t[:c] for t in
                                  (args["running_mean"], args["running_var"], args["gamma"], args["beta"]))
        return F.batch_norm(x, mean, var, gamma, beta, args["training"], args["momentum"], args["eps"])


class SuperInstanceNorm2d(nn.InstanceNorm2d):
    """nn.InstanceNorm2d (without running statistics, as the reference's) on any number of channels
    up to num_features; with affine, the first channels' weight and bias."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = False,
                 track_running_stats: bool = False) -> None:
        if track_running_stats:
            raise ValueError("SuperInstanceNorm2d has no running statistics: track_running_stats must be False")
        super().__init__(num_features, eps, momentum, affine, track_running_stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = _check_input(self, x, self.num_features)
        weight, bias = (self.weight[:c], self.bias[:c]) if self.affine else (None, None)
        return F.instance_norm(x, weight=weight, bias=bias, eps=self.eps)


def super_norm_layer(norm: str, channels: int, mask: str | None = None) -> nn.Module:
    """The super network's norm of a kind; masks have no place in it."""
    if mask is not None:
        raise ValueError("the super network takes no masks")
    if norm == "batch":
        return SuperBatchNorm2d(channels)
    if norm == "instance":
        return SuperInstanceNorm2d(channels)
    return nn.Identity()


SUPER_LAYERS = Layers(SuperConv2d, SuperConvTranspose2d, super_norm_layer, SuperInstanceNorm2d)

# --- the super network -------------------------------------------------------------------------


class SuperMobileResnetGenerator(nn.Module):
    """The once-for-all super network of MobileResnetGenerator at width ngf ('super_mobile_resnet_9blocks'
    is n_blocks=9). It runs the configuration set by configure(config) (at first the largest, all
    entries ngf); forward clamps the input to [-1, 1] as the reference does.

    search_space: the choices of each of the 8 config entries, a name of CHANNEL_CONFIGS (the
    reference's sets) or 8 lists of channel counts in [1, ngf]; None: ngf and the multiples of 8
    from 16 below it (the paper's "multiples of 8").
    """

    def __init__(self, input_nc: int, output_nc: int, ngf: int = 64, norm: str = "instance",
                 dropout_rate: float = 0.0, n_blocks: int = 9, padding_type: str = "reflect", *,
                 search_space: str | Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        check_layout(norm, dropout_rate, n_blocks, padding_type)
        if not (isinstance(ngf, int) and ngf > 0):
            raise ValueError(f"ngf must be a positive int, got {ngf!r}")
        self.options = dict(input_nc=input_nc, output_nc=output_nc, norm=norm, dropout_rate=dropout_rate,
                            n_blocks=n_blocks, padding_type=padding_type)
        self.ngf = ngf
        self._search_space = self._check_search_space(search_space)
        self.model = build_layout(input_nc, output_nc, [ngf] * len(CHANNEL_MULTIPLIERS), norm, dropout_rate,
                                  n_blocks, padding_type, layers=SUPER_LAYERS)
        self.configure({"channels": [ngf] * len(CHANNEL_MULTIPLIERS)})

    # -- configurations --

    def _check_search_space(self, space) -> list[list[int]]:
        if space is None:
            return [sorted({self.ngf, *range(16, self.ngf, 8)}, reverse=True)] * len(CHANNEL_MULTIPLIERS)
        if isinstance(space, str):
            if space not in CHANNEL_CONFIGS:
                raise ValueError(f"search_space must be one of {tuple(CHANNEL_CONFIGS)} or lists of channel counts, "
                                 f"got {space!r}")
            space = CHANNEL_CONFIGS[space]
        if not (isinstance(space, Sequence) and len(space) == len(CHANNEL_MULTIPLIERS)
                and all(isinstance(choices, Sequence) and len(choices) > 0 and
                        all(isinstance(c, int) and 0 < c <= self.ngf for c in choices) for choices in space)):
            raise ValueError(f"search_space must hold 8 non-empty lists of channel counts in [1, ngf={self.ngf}], "
                             f"got {space!r}")
        return [list(choices) for choices in space]

    def _check_config(self, config: dict) -> list[int]:
        if not isinstance(config, dict) or "channels" not in config:
            raise ValueError(f"config must be a dict with a 'channels' list, got {config!r}")
        channels = config_channels(config["channels"])
        if max(channels) > self.ngf:
            raise ValueError(f"config entries must be at most ngf={self.ngf}, got {config['channels']}")
        return channels

    def configure(self, config: dict) -> SuperMobileResnetGenerator:
        """Run the sub-network of `config` ({'channels': [8 entries]}, or the legacy 6) from now on."""
        channels = self._check_config(config)
        stem, down1, stream, *inner, up1, up2 = (c * m for c, m in zip(channels, CHANNEL_MULTIPLIERS))
        convs = [m for m in self.model if isinstance(m, (SuperConv2d, SuperConvTranspose2d))]
        # stem, down 1, down 2, up 1, up 2, and the output conv, which keeps output_nc
        for conv, width in zip(convs, (stem, down1, stream, up1, up2, None)):
            conv.active_out_channels = width
        blocks = [m for m in self.model if isinstance(m, MobileResnetBlock)]
        for block, group in zip(blocks, block_groups(len(blocks))):
            first, second = (m for m in block.conv_block if isinstance(m, SeparableConv2d))
            first.conv[2].active_out_channels = inner[group]
            second.conv[2].active_out_channels = stream  # back to the residual stream
        self._config = {"channels": list(config["channels"])}
        return self

    @property
    def config(self) -> dict:
        """The configuration running now."""
        return {"channels": list(self._config["channels"])}

    def search_space(self) -> dict:
        """{'channels': the choices of each config entry}, as the reference's ChannelConfigs."""
        return {"channels": [list(choices) for choices in self._search_space]}

    def sample(self, rng: random.Random | None = None) -> dict:
        """A configuration drawn uniformly from the search space (not applied: pass it to configure)."""
        rng = rng or random
        return {"channels": [rng.choice(choices) for choices in self._search_space]}

    # -- running and extracting --

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.clamp(-1, 1))

    @torch.no_grad()
    def extract_subnet(self, config: dict | None = None) -> MobileResnetGenerator:
        """A standalone MobileResnetGenerator (the reference's sub-network layout) holding copies of
        the first channels of every weight and running statistic, computing what this network
        computes under `config` (default: the configuration running now), in the same train/eval
        mode, on the same device and dtype."""
        config = self.config if config is None else config
        channels = self._check_config(config)
        options = dict(self.options)
        sub = MobileResnetGenerator(options.pop("input_nc"), options.pop("output_nc"), channels=channels,
                                    clamp_input=True, **options)
        weight = self.model[1].weight
        sub.to(weight.device, weight.dtype)
        state = self.state_dict()
        # The two module trees are the same: each sub-network tensor is the start of the super network's.
        sub.load_state_dict({key: state[key][tuple(slice(0, n) for n in t.shape)]
                             for key, t in sub.state_dict().items()})
        return sub.train(self.training)
