"""An independent, minimal re-implementation of rosinality/stylegan2-pytorch's model.py for the
tests: the same module tree (so the same state_dict keys) and the same arithmetic, written from the
reference's structure, with its CUDA ops replaced by their plain PyTorch definitions below (the
reference's own CPU fallbacks compute the same: zero insertion, pad, a flipped-kernel conv, strided
slicing). Nothing here imports gansparse."""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn


def upfirdn2d(x, kernel, up=1, down=1, pad=(0, 0)):
    """Per channel: insert up-1 zeros after each sample, pad (crop when negative) by pad on both
    axes, convolve with the flipped kernel, keep every down-th sample."""
    n, c, h, w = x.shape
    planes = x.reshape(n * c, 1, h, w)
    if up > 1:
        spread = torch.zeros(n * c, 1, h * up, w * up, dtype=x.dtype, device=x.device)
        spread[:, :, ::up, ::up] = planes
        planes = spread
    p0, p1 = pad
    planes = F.pad(planes, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    hh, ww = planes.shape[2:]
    planes = planes[:, :, max(-p0, 0): hh - max(-p1, 0), max(-p0, 0): ww - max(-p1, 0)]
    out = F.conv2d(planes, torch.flip(kernel, [0, 1]).to(x.dtype)[None, None])
    out = out[:, :, ::down, ::down]
    return out.reshape(n, c, *out.shape[2:])


def fused_leaky_relu(x, bias=None, negative_slope=0.2, scale=2 ** 0.5):
    if bias is not None:
        x = x + bias.view(1, -1, *[1] * (x.dim() - 2))
    return F.leaky_relu(x, negative_slope) * scale


def make_kernel(k):
    k = torch.tensor(k, dtype=torch.float32)
    if k.dim() == 1:
        k = torch.outer(k, k)
    return k / k.sum()


class PixelNorm(nn.Module):
    def forward(self, x):
        return x / torch.sqrt((x * x).mean(1, keepdim=True) + 1e-8)


class Upsample(nn.Module):
    def __init__(self, kernel, factor=2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor * factor)
        p = len(kernel) - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class Blur(nn.Module):
    def __init__(self, kernel, pad, upsample_factor=1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(kernel) * upsample_factor ** 2)
        self.pad = pad

    def forward(self, x):
        return upfirdn2d(x, self.kernel, pad=self.pad)


class EqualConv2d(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=0, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.stride, self.padding = stride, padding

    def forward(self, x):
        fan_in = self.weight[0].numel()
        return F.conv2d(x, self.weight / math.sqrt(fan_in), self.bias, self.stride, self.padding)


class EqualLinear(nn.Module):
    def __init__(self, din, dout, bias=True, bias_init=0.0, lr_mul=1.0, activation=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dout, din) / lr_mul)
        self.bias = nn.Parameter(torch.full((dout,), float(bias_init))) if bias else None
        self.lr_mul, self.activation = lr_mul, activation

    def forward(self, x):
        weight = self.weight * (self.lr_mul / math.sqrt(self.weight.shape[1]))
        bias = self.bias * self.lr_mul
        if self.activation:
            return fused_leaky_relu(x @ weight.t(), bias)
        return x @ weight.t() + bias


class FusedLeakyReLU(nn.Module):
    def __init__(self, channel, bias=True):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel)) if bias else None

    def forward(self, x):
        return fused_leaky_relu(x, self.bias)


class ModulatedConv2d(nn.Module):
    def __init__(self, cin, cout, k, style_dim, demodulate=True, upsample=False, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.cin, self.cout, self.k = cin, cout, k
        self.upsample, self.demodulate = upsample, demodulate
        if upsample:
            p = len(blur_kernel) - 2 - (k - 1)
            self.blur = Blur(blur_kernel, ((p + 1) // 2 + 1, p // 2 + 1), upsample_factor=2)
        self.weight = nn.Parameter(torch.randn(1, cout, cin, k, k))
        self.modulation = EqualLinear(style_dim, cin, bias_init=1)

    def forward(self, x, style):
        n, _, h, w = x.shape
        s = self.modulation(style)
        weight = self.weight[0][None] / math.sqrt(self.cin * self.k ** 2) * s[:, None, :, None, None]
        if self.demodulate:
            weight = weight / torch.sqrt((weight ** 2).sum((2, 3, 4), keepdim=True) + 1e-8)
        x = x.reshape(1, n * self.cin, h, w)
        if self.upsample:
            weight = weight.permute(0, 2, 1, 3, 4).reshape(n * self.cin, self.cout, self.k, self.k)
            out = F.conv_transpose2d(x, weight, stride=2, groups=n)
            return self.blur(out.reshape(n, self.cout, *out.shape[2:]))
        out = F.conv2d(x, weight.reshape(n * self.cout, self.cin, self.k, self.k), padding=self.k // 2, groups=n)
        return out.reshape(n, self.cout, *out.shape[2:])


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x, noise=None):
        if noise is None:
            noise = x.new_empty(x.shape[0], 1, *x.shape[2:]).normal_()
        return x + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channel):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, 4, 4))

    def forward(self, latent):
        return self.input.expand(latent.shape[0], -1, -1, -1)


class StyledConv(nn.Module):
    def __init__(self, cin, cout, k, style_dim, upsample=False):
        super().__init__()
        self.conv = ModulatedConv2d(cin, cout, k, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(cout)

    def forward(self, x, style, noise=None):
        return self.activate(self.noise(self.conv(x, style), noise))


class ToRGB(nn.Module):
    def __init__(self, cin, style_dim, upsample=True):
        super().__init__()
        if upsample:
            self.upsample = Upsample((1, 3, 3, 1))
        self.conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.conv(x, style) + self.bias
        return out if skip is None else out + self.upsample(skip)


def widths(cm):
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm, 256: 64 * cm, 512: 32 * cm,
            1024: 16 * cm}


class Generator(nn.Module):
    def __init__(self, size, style_dim, n_mlp, channel_multiplier=2, lr_mlp=0.01, channels=None):
        """channels: widths per resolution instead of the reference's (narrow test models)."""
        super().__init__()
        self.style_dim = style_dim
        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp,
                                                              activation="fused_lrelu") for _ in range(n_mlp)])
        ch = channels or widths(channel_multiplier)
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, style_dim)
        self.to_rgb1 = ToRGB(ch[4], style_dim, upsample=False)
        log_size = int(math.log2(size))
        self.num_layers = 2 * (log_size - 2) + 1
        self.convs, self.upsamples, self.to_rgbs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.noises = nn.Module()
        for i in range(self.num_layers):
            side = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, side, side))
        cin = ch[4]
        for res in range(3, log_size + 1):
            cout = ch[2 ** res]
            self.convs.append(StyledConv(cin, cout, 3, style_dim, upsample=True))
            self.convs.append(StyledConv(cout, cout, 3, style_dim))
            self.to_rgbs.append(ToRGB(cout, style_dim))
            cin = cout
        self.n_latent = 2 * log_size - 2

    def forward(self, styles, return_latents=False, inject_index=None, truncation=1, truncation_latent=None,
                input_is_latent=False, noise=None, randomize_noise=True):
        if not input_is_latent:
            styles = [self.style(s) for s in styles]
        if noise is None:
            noise = [None if randomize_noise else getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]
        if truncation < 1:
            styles = [truncation_latent + truncation * (s - truncation_latent) for s in styles]
        if len(styles) == 1:
            latent = styles[0] if styles[0].dim() == 3 else styles[0][:, None].expand(-1, self.n_latent, -1)
        else:
            if inject_index is None:
                inject_index = random.randint(1, self.n_latent - 1)
            latent = torch.cat([styles[0][:, None].expand(-1, inject_index, -1),
                                styles[1][:, None].expand(-1, self.n_latent - inject_index, -1)], 1)
        out = self.conv1(self.input(latent), latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        for j, to_rgb in enumerate(self.to_rgbs):
            out = self.convs[2 * j](out, latent[:, 2 * j + 1], noise[2 * j + 1])
            out = self.convs[2 * j + 1](out, latent[:, 2 * j + 2], noise[2 * j + 2])
            skip = to_rgb(out, latent[:, 2 * j + 3], skip)
        return skip, (latent if return_latents else None)


class ConvLayer(nn.Sequential):
    def __init__(self, cin, cout, k, downsample=False, bias=True, activate=True):
        layers = []
        if downsample:
            p = 2 + (k - 1)
            layers.append(Blur((1, 3, 3, 1), ((p + 1) // 2, p // 2)))
        layers.append(EqualConv2d(cin, cout, k, stride=2 if downsample else 1, padding=0 if downsample else k // 2,
                                  bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(cout, bias=bias))
        super().__init__(*layers)


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = ConvLayer(cin, cin, 3)
        self.conv2 = ConvLayer(cin, cout, 3, downsample=True)
        self.skip = ConvLayer(cin, cout, 1, downsample=True, activate=False, bias=False)

    def forward(self, x):
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class Discriminator(nn.Module):
    def __init__(self, size, channel_multiplier=2, channels=None):
        super().__init__()
        ch = channels or widths(channel_multiplier)
        blocks = [ConvLayer(3, ch[size], 1)]
        cin = ch[size]
        for res in range(int(math.log2(size)), 2, -1):
            blocks.append(ResBlock(cin, ch[2 ** (res - 1)]))
            cin = ch[2 ** (res - 1)]
        self.convs = nn.Sequential(*blocks)
        self.final_conv = ConvLayer(cin + 1, ch[4], 3)
        self.final_linear = nn.Sequential(EqualLinear(ch[4] * 16, ch[4], activation="fused_lrelu"),
                                          EqualLinear(ch[4], 1))

    def forward(self, x):
        out = self.convs(x)
        n, c, h, w = out.shape
        group = min(n, 4)
        grouped = out.view(group, n // group, 1, c, h, w)
        std = torch.sqrt(grouped.var(0, unbiased=False) + 1e-8).mean([2, 3, 4], keepdim=True).squeeze(2)
        out = torch.cat([out, std.repeat(group, 1, h, w)], 1)
        return self.final_linear(self.final_conv(out).view(n, -1))
