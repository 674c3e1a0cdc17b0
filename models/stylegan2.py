"""StyleGAN2's generator and discriminator with the module tree of rosinality/stylegan2-pytorch
(model.py): its checkpoints load with no key remapping (`torch.load(ckpt)['g_ema']`, or
load_rosinality_checkpoint), and given the same styles and noise every network computes what
the reference computes. The reference's custom CUDA ops are gansparse's own:
gansparse.functional.upfirdn2d (the resampling filters) and fused_leaky_relu (bias + activation),
each with a reference path and compiled CPU and CUDA kernels.

Reference conventions kept here: equalised learning rate (weights stored at unit variance and
scaled by 1/sqrt(fan_in) on every forward, lr_mul for the mapping network), weight modulation and
demodulation as one grouped conv with per-sample weights (or, with fused=False, as modulated
activations), the transposed conv + blur of the
upsampling convs, the 4x4 FIR blur [1, 3, 3, 1] before every downsampling conv, per-layer noise
buffers `noises.noise_{i}`, and the minibatch standard deviation of the discriminator.

mask (Generator only): None, or a mask kind of gansparse.masks ('sigmoid', 'dmad', 'hard') on the
output channels of every StyledConv, after its activation: the channels the content-aware paper
prunes (Sec. 3.1, l1-out and CA-l1-out). A masked channel outputs exactly 0, and the convs that read it (the next
StyledConv and the ToRGB) multiply its style by the mask too, so it also drops out of their weight
demodulation: with binary masks, the generator computes what the generator with those channels
physically removed computes, provided the narrower ToRGBs (which do not demodulate) keep the
original 1/sqrt(fan_in) weight scale. Masks only add `*.mask.*` keys.

MACs (gansparse.profile): modules count themselves through `profile_macs`, in the convention of
the content-aware paper's released FLOPs count (45.1G for the 256px generator, with
`transposed='input'`): each modulated conv as a conv with its weights given, plus its style
linear; the linear and conv layers; the FIR filters, activations, noise and the per-sample weight
(de)modulation are not counted (torchprofile does not count the reference's custom upfirdn2d and
bias-act ops either). A masked generator's macs_effective stays in that convention; profiling
the compact model export gives also counts the (de)modulation, multiplications of plain ops there.

Export: gansparse.export.compact(G) traces G.exportable(), a FixedNoiseGenerator (z -> image with
the noise buffers: forward's random style mixing cannot be traced), on z [N, style_dim] inputs
(default that module's example_inputs(), one z). A masked channel leaves its StyledConv (the conv's output
channel, its activation bias) and the layers reading it (the next modulated conv's and the ToRGB's
input channel, with its row of their style linear and its term of their demodulation); the
compact model calls gansparse's upfirdn2d and fused_leaky_relu, which export.load knows. The
Discriminator compacts as it is (its minibatch standard deviation is one recorded call).
"""
from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gansparse.functional import fused_leaky_relu, upfirdn2d
from gansparse.masks import as_mask

from .dcgan import check_latent
from .pix2pix import _example_image

# torch.fx (gansparse.export traces with it) records gansparse's ops as calls instead of tracing
# into their argument checks.
torch.fx.wrap("fused_leaky_relu")
torch.fx.wrap("upfirdn2d")

__all__ = ["Blur", "ConstantInput", "ConvLayer", "Discriminator", "Downsample", "EqualConv2d", "EqualLinear",
           "FixedNoiseGenerator", "FusedLeakyReLU", "Generator", "ModulatedConv2d", "NoiseInjection", "PixelNorm",
           "ResBlock", "StyledConv", "ToRGB", "Upsample", "channel_widths", "load_rosinality_checkpoint", "make_kernel"]


def channel_widths(channel_multiplier: int) -> dict[int, int]:
    """Feature channels per resolution, as the reference sets them."""
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}


def _widths(channel_multiplier: int, channels: dict[int, int] | None, size: int) -> dict[int, int]:
    if channels is None:
        return channel_widths(channel_multiplier)
    needed = [2 ** i for i in range(2, _log2_size(size) + 1)]
    if not isinstance(channels, dict) or any(not isinstance(channels.get(r), int) or channels[r] < 1 for r in needed):
        raise ValueError(f"channels must map every resolution in {needed} to a positive int, got {channels!r}")
    return channels


def _log2_size(size: int) -> int:
    if not isinstance(size, int) or size < 4 or size > 1024 or size & (size - 1):
        raise ValueError(f"size must be a power of two in [4, 1024], got {size!r}")
    return size.bit_length() - 1


class PixelNorm(nn.Module):
    """x / sqrt(mean_c x^2 + 1e-8): the latent normalisation before the mapping network."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


def make_kernel(k) -> torch.Tensor:
    """The 2-D FIR kernel of a 1-D (separable, outer product) or 2-D list, normalised to sum 1."""
    k = torch.tensor(k, dtype=torch.float32)
    if k.dim() == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


# --- resampling filters (upfirdn2d) --------------------------------------------------------------


class _FIRFilter(nn.Module):
    """upfirdn2d with a fixed kernel (the buffer `kernel`, as in the reference's state dict)."""

    def __init__(self, kernel: torch.Tensor, up: int, down: int, pad: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("kernel", kernel)
        self.up, self.down, self.pad = up, down, tuple(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.up, down=self.down, pad=self.pad)

    def profile_macs(self, x, out) -> tuple[int, int]:
        return 0, 0  # FIR filters are not counted (see the module docstring)


class Upsample(_FIRFilter):
    """2x (`factor`) upsampling with the FIR kernel, which is scaled by factor^2 to keep the gain."""

    def __init__(self, kernel, factor: int = 2) -> None:
        kernel = make_kernel(kernel) * factor ** 2
        p = kernel.shape[0] - factor
        super().__init__(kernel, up=factor, down=1, pad=((p + 1) // 2 + factor - 1, p // 2))
        self.factor = factor


class Downsample(_FIRFilter):
    def __init__(self, kernel, factor: int = 2) -> None:
        kernel = make_kernel(kernel)
        p = kernel.shape[0] - factor
        super().__init__(kernel, up=1, down=factor, pad=((p + 1) // 2, p // 2))
        self.factor = factor


class Blur(_FIRFilter):
    """The FIR filter alone, with explicit padding; scaled by upsample_factor^2 after a stride-2
    transposed conv."""

    def __init__(self, kernel, pad: tuple[int, int], upsample_factor: int = 1) -> None:
        super().__init__(make_kernel(kernel) * upsample_factor ** 2, up=1, down=1, pad=pad)


# --- equalised-learning-rate layers -----------------------------------------------------------------


class EqualConv2d(nn.Module):
    """A conv whose weight is stored at unit variance and scaled by 1/sqrt(fan_in) on use."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.stride, self.padding = stride, padding
        self.bias = nn.Parameter(torch.zeros(out_channel)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, bias=self.bias, stride=self.stride, padding=self.padding)

    def profile_macs(self, x, out) -> tuple[int, int]:
        macs = out.numel() * self.weight[0].numel()
        return macs, macs

    def extra_repr(self) -> str:
        out_channel, in_channel, k, _ = self.weight.shape
        return f"{in_channel}, {out_channel}, {k}, stride={self.stride}, padding={self.padding}"


class EqualLinear(nn.Module):
    """A linear layer with equalised learning rate: the weight is stored divided by lr_mul and used
    times lr_mul / sqrt(in_dim), the bias used times lr_mul; activation='fused_lrelu' (any truthy
    value, as in the reference) follows it with the bias + leaky ReLU."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0, lr_mul: float = 1,
                 activation=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.zeros(out_dim).fill_(bias_init)) if bias else None
        self.activation = activation
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias=bias)

    def profile_macs(self, x, out) -> tuple[int, int]:
        macs = out.numel() * self.weight.shape[1]  # the weight's scaling is a reparametrisation
        return macs, macs

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}"


class FusedLeakyReLU(nn.Module):
    """scale * leaky_relu(x + bias[c], negative_slope), with the reference's `bias` parameter."""

    def __init__(self, channel: int, bias: bool = True, negative_slope: float = 0.2, scale: float = 2 ** 0.5) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel)) if bias else None
        self.negative_slope, self.scale = negative_slope, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)

    def profile_macs(self, x, out) -> tuple[int, int]:
        return 0, 0  # an activation


# --- the synthesis network ----------------------------------------------------------------------


class ModulatedConv2d(nn.Module):
    """A conv whose weight is modulated per sample by a style (an affine map of w) and, with
    `demodulate`, renormalised per output channel:

        w'[n, o, i] = scale * weight[o, i] * style[n, i]
        w''[n, o, i] = w'[n, o, i] / sqrt(sum_{i, k} w'[n, o, i]^2 + 1e-8)

    `fused` (the reference's default) runs it as one grouped conv over the batch with per-sample
    weights; otherwise the input is scaled by the style, convolved with the shared weight, and the
    output scaled by the demodulation: the same function, and on CPUs the faster one for batches
    larger than 1. upsample: a stride-2 transposed conv then the FIR blur; downsample: the FIR blur
    then a stride-2 conv. `input_mask` [C_in] multiplies the style, so a masked input channel drops
    out of the demodulation as well as the conv.
    """

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False, downsample: bool = False, blur_kernel=(1, 3, 3, 1), fused: bool = True) -> None:
        super().__init__()
        self.eps = 1e-8
        self.kernel_size, self.in_channel, self.out_channel = kernel_size, in_channel, out_channel
        self.upsample, self.downsample = upsample, downsample
        factor = 2
        if upsample:
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        if downsample:
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2, p // 2))
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        self.demodulate = demodulate
        self.fused = fused

    def extra_repr(self) -> str:
        return (f"{self.in_channel}, {self.out_channel}, {self.kernel_size}, upsample={self.upsample}, "
                f"downsample={self.downsample}")

    def forward(self, x: torch.Tensor, style: torch.Tensor, input_mask: torch.Tensor | None = None) -> torch.Tensor:
        # Sizes read one by one (no unpacking), so torch.fx can trace this.
        batch, in_channel, height, width = x.shape[0], self.in_channel, x.shape[2], x.shape[3]
        style = self.modulation(style)  # [N, C_in]
        if input_mask is not None:
            style = style * input_mask
        if not self.fused:
            weight = self.scale * self.weight[0]  # [C_out, C_in, k, k]
            out = self._conv(x * style.view(batch, in_channel, 1, 1), weight, groups=1)
            if self.demodulate:
                modulated = weight * style.view(batch, 1, in_channel, 1, 1)
                out = out * torch.rsqrt(modulated.square().sum([2, 3, 4]) + self.eps).view(batch, -1, 1, 1)
            return out
        weight = self.scale * self.weight * style.view(batch, 1, in_channel, 1, 1)  # [N, C_out, C_in, k, k]
        if self.demodulate:
            demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + self.eps)
            weight = weight * demod.view(batch, self.out_channel, 1, 1, 1)
        x = x.reshape(1, batch * in_channel, height, width)  # the batch as groups
        k = self.kernel_size
        out = self._conv(x, weight.view(batch * self.out_channel, in_channel, k, k), groups=batch)
        return out.view(batch, self.out_channel, out.shape[2], out.shape[3])

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        """x [*, groups * C_in, H, W] convolved with weight [groups * C_out, C_in, k, k] in
        `groups` groups, upsampling or downsampling as configured."""
        if self.upsample:
            k = self.kernel_size
            # conv_transpose2d wants [C_in, C_out, k, k] per group.
            weight = weight.view(groups, self.out_channel, self.in_channel, k, k).transpose(1, 2)
            out = F.conv_transpose2d(x, weight.reshape(groups * self.in_channel, self.out_channel, k, k), padding=0,
                                     stride=2, groups=groups)
            return self.blur(out)
        if self.downsample:
            return F.conv2d(self.blur(x), weight, padding=0, stride=2, groups=groups)
        return F.conv2d(x, weight, padding=self.padding, groups=groups)

    def profile_macs(self, x, out) -> list[tuple[int, int, str]]:
        """For gansparse.profile: the style linear (one style per input channel) and the conv (the
        transposed one on its output before the blur, or on its input); the per-sample weight
        (de)modulation is not counted."""
        batch, in_channel, height, width = x.shape
        taps = self.kernel_size ** 2
        style = batch * self.modulation.weight.numel()
        if self.upsample:
            conv_out = batch * self.out_channel * ((height - 1) * 2 + self.kernel_size) * (
                (width - 1) * 2 + self.kernel_size)
            conv = conv_out * in_channel * taps, x.numel() * self.out_channel * taps
        else:
            conv = (out.numel() * in_channel * taps,) * 2
        return [(style, style, "input"), (*conv, "conv")]


class NoiseInjection(nn.Module):
    """x + weight * noise, with one scalar weight; fresh N(0, 1) noise [N, 1, H, W] when none is given."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            batch, _, height, width = image.shape
            noise = image.new_empty(batch, 1, height, width).normal_()
        return image + self.weight * noise


class ConstantInput(nn.Module):
    """The learned constant [1, C, size, size] the synthesis starts from, repeated over the batch."""

    def __init__(self, channel: int, size: int = 4) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.input.repeat(latent.shape[0], 1, 1, 1)


class StyledConv(nn.Module):
    """Modulated conv, noise, bias + leaky ReLU, and with `mask` a channel mask on the output."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int, upsample: bool = False,
                 blur_kernel=(1, 3, 3, 1), demodulate: bool = True, mask=None) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, upsample=upsample,
                                    blur_kernel=blur_kernel, demodulate=demodulate)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)
        self.mask = as_mask(mask, out_channel)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None,
                input_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_mask [C_in]: the mask of the layer that produced x (see ModulatedConv2d)."""
        out = self.activate(self.noise(self.conv(x, style, input_mask), noise=noise))
        if self.mask is not None:
            out = out * self.mask().view(1, -1, 1, 1)
        return out

    def profile_macs(self, x, out) -> list[tuple[int, int, str]]:
        return self.conv.profile_macs(x, out)


class ToRGB(nn.Module):
    """A 1x1 modulated conv to RGB (no demodulation) plus a bias, added to the upsampled skip image."""

    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True, blur_kernel=(1, 3, 3, 1)) -> None:
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None,
                input_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style, input_mask) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class Generator(nn.Module):
    """The StyleGAN2 generator: an n_mlp-layer mapping network z -> w, then the synthesis network
    from a 4x4 constant up to size x size, two StyledConvs and one ToRGB per resolution (skip
    architecture). Arguments and forward() as the reference's."""

    def __init__(self, size: int, style_dim: int, n_mlp: int, channel_multiplier: int = 2, blur_kernel=(1, 3, 3, 1),
                 lr_mlp: float = 0.01, *, channels: dict[int, int] | None = None, mask=None) -> None:
        """channels: feature channels per resolution, to build narrow variants (tests, demos);
        default the reference's, channel_widths(channel_multiplier)."""
        super().__init__()
        self.log_size = _log2_size(size)
        self.size, self.style_dim = size, style_dim
        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp,
                                                              activation="fused_lrelu") for _ in range(n_mlp)])
        self.channels = _widths(channel_multiplier, channels, size)
        self.input = ConstantInput(self.channels[4])
        self.conv1 = StyledConv(self.channels[4], self.channels[4], 3, style_dim, blur_kernel=blur_kernel, mask=mask)
        self.to_rgb1 = ToRGB(self.channels[4], style_dim, upsample=False)
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.convs = nn.ModuleList()
        self.upsamples = nn.ModuleList()  # empty, as in the reference
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_idx in range(self.num_layers):
            res = (layer_idx + 5) // 2
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, 2 ** res, 2 ** res))
        in_channel = self.channels[4]
        for i in range(3, self.log_size + 1):
            out_channel = self.channels[2 ** i]
            self.convs.append(StyledConv(in_channel, out_channel, 3, style_dim, upsample=True,
                                         blur_kernel=blur_kernel, mask=mask))
            self.convs.append(StyledConv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel, mask=mask))
            self.to_rgbs.append(ToRGB(out_channel, style_dim))
            in_channel = out_channel
        self.n_latent = self.log_size * 2 - 2

    def example_inputs(self) -> tuple[list[torch.Tensor]]:
        """forward's inputs for one image: ([z [1, style_dim]],)."""
        return ([_example_image(self, self.style_dim, 1).view(1, -1)],)

    def exportable(self) -> FixedNoiseGenerator:
        """What gansparse.export.compact(generator) traces: z -> image with the noise buffers, a
        deterministic forward torch.fx can trace (forward's style mixing draws a random index)."""
        return FixedNoiseGenerator(self)

    def make_noise(self) -> list[torch.Tensor]:
        device = self.input.input.device
        return [torch.randn(1, 1, 2 ** (2 + (i + 1) // 2), 2 ** (2 + (i + 1) // 2), device=device)
                for i in range(self.num_layers)]

    def mean_latent(self, n_latent: int) -> torch.Tensor:
        latent_in = torch.randn(n_latent, self.style_dim, device=self.input.input.device)
        return self.style(latent_in).mean(0, keepdim=True)

    def get_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.style(z)

    def forward(self, styles, return_latents: bool = False, inject_index: int | None = None, truncation: float = 1,
                truncation_latent: torch.Tensor | None = None, input_is_latent: bool = False, noise=None,
                randomize_noise: bool = True):
        """styles: a list of one or two [N, style_dim] z (or w with input_is_latent; or one
        [N, n_latent, style_dim] w+). Two styles mix at inject_index (random when None).
        noise: one [*, 1, H, W] tensor per layer, or None: fresh noise (randomize_noise) or the
        `noises` buffers. Returns (image [N, 3, size, size], the latent [N, n_latent, style_dim]
        with return_latents, else None)."""
        if not isinstance(styles, (list, tuple)) or not 1 <= len(styles) <= 2:
            raise TypeError("styles must be a list of one or two tensors")
        if not input_is_latent:
            styles = [self.style(s) for s in styles]
        if noise is None:
            noise = ([None] * self.num_layers if randomize_noise
                     else [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)])
        if len(noise) != self.num_layers:
            raise ValueError(f"noise must hold {self.num_layers} tensors, got {len(noise)}")
        if truncation < 1:
            styles = [truncation_latent + truncation * (s - truncation_latent) for s in styles]
        if len(styles) == 1:
            latent = styles[0] if styles[0].dim() == 3 else styles[0].unsqueeze(1).repeat(1, self.n_latent, 1)
        else:
            if inject_index is None:
                inject_index = random.randint(1, self.n_latent - 1)
            latent = torch.cat([styles[0].unsqueeze(1).repeat(1, inject_index, 1),
                                styles[1].unsqueeze(1).repeat(1, self.n_latent - inject_index, 1)], 1)

        image = self.synthesize(latent, noise)
        return (image, latent) if return_latents else (image, None)

    def synthesize(self, latent: torch.Tensor, noise) -> torch.Tensor:
        """The synthesis network alone: the image [N, 3, size, size] of w+ latents
        [N, n_latent, style_dim], with one noise tensor (or None for fresh noise) per layer."""
        out = self.conv1(self.input(latent), latent[:, 0], noise=noise[0])
        mask = _values(self.conv1.mask)
        skip = self.to_rgb1(out, latent[:, 1], input_mask=mask)
        for i, (conv_up, conv, to_rgb) in enumerate(zip(self.convs[::2], self.convs[1::2], self.to_rgbs)):
            out = conv_up(out, latent[:, 2 * i + 1], noise=noise[2 * i + 1], input_mask=mask)
            out = conv(out, latent[:, 2 * i + 2], noise=noise[2 * i + 2], input_mask=_values(conv_up.mask))
            mask = _values(conv.mask)
            skip = to_rgb(out, latent[:, 2 * i + 3], skip, input_mask=mask)
        return skip


class FixedNoiseGenerator(nn.Module):
    """generator([z], randomize_noise=False)[0]: the image [N, 3, size, size] of z [N, style_dim]
    with the generator's noise buffers, no style mixing and no truncation."""

    def __init__(self, generator: Generator) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        g = self.generator
        check_latent(z, (g.style_dim,))
        latent = g.style(z).unsqueeze(1).repeat(1, g.n_latent, 1)  # [N, n_latent, style_dim]
        return g.synthesize(latent, [getattr(g.noises, f"noise_{i}") for i in range(g.num_layers)])

    def example_inputs(self) -> tuple[torch.Tensor]:
        """z [1, style_dim]."""
        return (_example_image(self, self.generator.style_dim, 1).view(1, -1),)


def _values(mask) -> torch.Tensor | None:
    return None if mask is None else mask()


# --- the discriminator ------------------------------------------------------------------------------


class ConvLayer(nn.Sequential):
    """[Blur, ] EqualConv2d [, FusedLeakyReLU]: with `downsample`, the blur then a stride-2 conv."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, downsample: bool = False,
                 blur_kernel=(1, 3, 3, 1), bias: bool = True, activate: bool = True) -> None:
        layers = []
        if downsample:
            p = (len(blur_kernel) - 2) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channel, out_channel, kernel_size, padding=padding, stride=stride,
                                  bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channel, bias=bias))
        super().__init__(*layers)
        self.padding = padding


class ResBlock(nn.Module):
    """(conv3x3, downsampling conv3x3)(x) + downsampling conv1x1(x), over sqrt(2)."""

    def __init__(self, in_channel: int, out_channel: int, blur_kernel=(1, 3, 3, 1)) -> None:
        super().__init__()
        self.conv1 = ConvLayer(in_channel, in_channel, 3)
        self.conv2 = ConvLayer(in_channel, out_channel, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(in_channel, out_channel, 1, downsample=True, activate=False, bias=False,
                              blur_kernel=blur_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class Discriminator(nn.Module):
    """The StyleGAN2 residual discriminator with the minibatch standard deviation feature."""

    def __init__(self, size: int, channel_multiplier: int = 2, blur_kernel=(1, 3, 3, 1), *,
                 channels: dict[int, int] | None = None) -> None:
        """channels: as Generator's."""
        super().__init__()
        log_size = _log2_size(size)
        self.size = size
        channels = _widths(channel_multiplier, channels, size)
        convs = [ConvLayer(3, channels[size], 1)]
        in_channel = channels[size]
        for i in range(log_size, 2, -1):
            out_channel = channels[2 ** (i - 1)]
            convs.append(ResBlock(in_channel, out_channel, blur_kernel))
            in_channel = out_channel
        self.convs = nn.Sequential(*convs)
        self.stddev_group = 4
        self.stddev_feat = 1
        self.final_conv = ConvLayer(in_channel + 1, channels[4], 3)
        self.final_linear = nn.Sequential(EqualLinear(channels[4] * 4 * 4, channels[4], activation="fused_lrelu"),
                                          EqualLinear(channels[4], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs(x)
        out = self.final_conv(torch.cat([out, _minibatch_stddev(out, self.stddev_group, self.stddev_feat)], 1))
        return self.final_linear(out.flatten(1))

    def example_inputs(self) -> tuple[torch.Tensor]:
        """One image [1, 3, size, size]."""
        return (_example_image(self, 3, self.size),)


def _minibatch_stddev(out: torch.Tensor, group_size: int, features: int) -> torch.Tensor:
    """[N, features, H, W]: the standard deviation of out [N, C, H, W] over groups of min(N,
    group_size) samples, averaged over the channels of each of `features` slices and over pixels.
    (A call torch.fx records as one node: its sizes depend on the batch.)"""
    batch, channel, height, width = out.shape
    group = min(batch, group_size)
    if batch % group:
        raise ValueError(f"the batch ({batch}) must be a multiple of the stddev group ({group})")
    stddev = out.view(group, -1, features, channel // features, height, width)
    stddev = torch.sqrt(stddev.var(0, unbiased=False) + 1e-8)
    stddev = stddev.mean([2, 3, 4], keepdim=True).squeeze(2)
    return stddev.repeat(group, 1, height, width)


torch.fx.wrap("_minibatch_stddev")


# --- checkpoints ------------------------------------------------------------------------------------


def load_rosinality_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint of rosinality/stylegan2-pytorch (train.py's {'g', 'd', 'g_ema', 'g_optim',
    'd_optim', 'args', ...}, or convert_weight.py's {'g_ema', 'latent_avg'}), loaded without
    executing pickled code: torch.load(weights_only=True), with the argparse.Namespace of
    train.py's 'args' allowed. Load a network with `Generator(...).load_state_dict(ckpt['g_ema'])`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no StyleGAN2 checkpoint at {path}: download one trained with rosinality/stylegan2-pytorch "
            "(e.g. its converted FFHQ 256px or 1024px weights) and pass its path")
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location=map_location, weights_only=True)
