"""A minimal, independent re-implementation of GAN Compression's ResNet-style generators
(mit-han-lab/gan-compression, models/modules/resnet_architecture/), written from the architecture
description with plain torch.nn. The oracle for models/mobile_resnet.py and models/supernet.py:

- MobileGenerator: 'mobile_resnet_9blocks' (widths from ngf) or 'sub_mobile_resnet_9blocks' (widths
  from a config's 'channels' list, input clamped to [-1, 1]); separable convs always with a bias;
- super_forward: the super network's forward over a full-width sub-network's modules, slicing every
  weight to its first channels the way the reference's Super* layers do, for a config.

Norm sizes here are always the layer's width (see models/mobile_resnet.py about the reference's
sub-network quirk, which only parameter-free norms can run).

Also the helpers the model-zoo tests of this family share: randomise_ (non-trivial weights) and
random_hard_masks_ (random 0/1 channel masks for export).
"""
import torch
import torch.nn.functional as F
from torch import nn


def norm_layer(norm, channels):
    return {"batch": lambda: nn.BatchNorm2d(channels), "instance": lambda: nn.InstanceNorm2d(channels),
            "none": nn.Identity}[norm]()


def pad_and_padding(padding_type):
    pads = {"reflect": nn.ReflectionPad2d, "replicate": nn.ReplicationPad2d}
    return ([pads[padding_type](1)], 0) if padding_type in pads else ([], 1)


class SeparableConv2d(nn.Module):
    def __init__(self, cin, cout, padding):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cin, 3, padding=padding, groups=cin),
                                  nn.InstanceNorm2d(cin), nn.Conv2d(cin, cout, 1))

    def forward(self, x):
        return self.conv(x)


class MobileBlock(nn.Module):
    def __init__(self, dim, inner, norm, dropout_rate, padding_type):
        super().__init__()
        pad, p = pad_and_padding(padding_type)
        layers = pad + [SeparableConv2d(dim, inner, p), norm_layer(norm, inner), nn.ReLU(True),
                        nn.Dropout(dropout_rate)]
        pad, p = pad_and_padding(padding_type)
        layers += pad + [SeparableConv2d(inner, dim, p), norm_layer(norm, dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv_block(x)


def group_of_block(i, n_blocks):
    third = n_blocks // 3
    return min(i // third, 2) if third else 2


class MobileGenerator(nn.Module):
    def __init__(self, input_nc, output_nc, ngf=64, norm="instance", dropout_rate=0.0, n_blocks=9,
                 padding_type="reflect", config=None):
        super().__init__()
        self.sub = config is not None
        c = config["channels"] if self.sub else [ngf] * 8
        bias = norm == "instance"
        stream = c[2] * 4
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, c[0], 7, bias=bias), norm_layer(norm, c[0]),
                  nn.ReLU(True),
                  nn.Conv2d(c[0], c[1] * 2, 3, 2, 1, bias=bias), norm_layer(norm, c[1] * 2), nn.ReLU(True),
                  nn.Conv2d(c[1] * 2, stream, 3, 2, 1, bias=bias), norm_layer(norm, stream), nn.ReLU(True)]
        for i in range(n_blocks):
            inner = c[3 + group_of_block(i, n_blocks)] * 4
            layers.append(MobileBlock(stream, inner, norm, dropout_rate, padding_type))
        layers += [nn.ConvTranspose2d(stream, c[6] * 2, 3, 2, 1, 1, bias=bias), norm_layer(norm, c[6] * 2),
                   nn.ReLU(True),
                   nn.ConvTranspose2d(c[6] * 2, c[7], 3, 2, 1, 1, bias=bias), norm_layer(norm, c[7]), nn.ReLU(True),
                   nn.ReflectionPad2d(3), nn.Conv2d(c[7], output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x.clamp(-1, 1) if self.sub else x)


# --- the super network's forward ---------------------------------------------------------------


def _conv(conv, x, out_nc):
    if conv.groups > 1:  # depthwise: as many channels as come in
        n = x.shape[1]
        return F.conv2d(x, conv.weight[:n], None if conv.bias is None else conv.bias[:n], conv.stride, conv.padding,
                        conv.dilation, n)
    w = conv.weight[:out_nc, :x.shape[1]]
    b = None if conv.bias is None else conv.bias[:out_nc]
    return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation)


def _conv_transpose(conv, x, out_nc):
    w = conv.weight[:x.shape[1], :out_nc]
    b = None if conv.bias is None else conv.bias[:out_nc]
    return F.conv_transpose2d(x, w, b, conv.stride, conv.padding, conv.output_padding)


def _norm(norm, x):
    """A norm on the first x.shape[1] channels (batch norm: in training, updating those statistics)."""
    n = x.shape[1]
    if isinstance(norm, nn.BatchNorm2d):
        if norm.training:
            norm.num_batches_tracked += 1
        rm, rv = norm.running_mean[:n], norm.running_var[:n]
        out = F.batch_norm(x, rm, rv, norm.weight[:n], norm.bias[:n], norm.training, norm.momentum, norm.eps)
        return out
    if isinstance(norm, nn.InstanceNorm2d):
        return F.instance_norm(x, eps=norm.eps)
    return x


def _run(module, x, out_nc):
    if isinstance(module, nn.ConvTranspose2d):
        return _conv_transpose(module, x, out_nc)
    if isinstance(module, nn.Conv2d):
        return _conv(module, x, out_nc)
    if isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d)):
        return _norm(module, x)
    if isinstance(module, SeparableConv2d):
        x = _conv(module.conv[0], x, None)
        return _conv(module.conv[2], F.instance_norm(x), out_nc)
    return module(x)


def super_forward(net: MobileGenerator, x, channels):
    """The reference super network's forward for a config: widths config x multiplier, the blocks'
    inner width from their third, their output the residual stream's width."""
    x = x.clamp(-1, 1)
    c = channels
    widths = {1: c[0], 4: c[1] * 2, 7: c[2] * 4}
    ups = [c[6] * 2, c[7]]
    layers = list(net.model)
    n_blocks = sum(isinstance(m, MobileBlock) for m in layers)
    block = 0
    for i, module in enumerate(layers):
        if isinstance(module, MobileBlock):
            inner = c[3 + group_of_block(block, n_blocks)] * 4
            h = x
            seps = 0
            for sub in module.conv_block:
                if isinstance(sub, SeparableConv2d):
                    h = _run(sub, h, inner if seps == 0 else x.shape[1])
                    seps += 1
                else:
                    h = _run(sub, h, None)
            x = x + h
            block += 1
        elif isinstance(module, nn.ConvTranspose2d):
            x = _run(module, x, ups.pop(0))
        elif isinstance(module, nn.Conv2d):
            x = _run(module, x, widths.get(i, module.out_channels))
        else:
            x = _run(module, x, None)
    return x


def random_hard_masks_(model: nn.Module, sparsity: float, generator: torch.Generator) -> nn.Module:
    """Replace every mask of `model` by a 0/1 mask zeroing each channel with probability `sparsity`."""
    from gansparse.masks import HardMask, named_masks

    for name, mask in list(named_masks(model)):
        channels = mask.values().numel()
        values = (torch.rand(channels, generator=generator) >= sparsity).float()
        setattr(model.get_submodule(name.rpartition(".")[0]), "mask", HardMask(channels, values))
    return model
