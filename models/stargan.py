"""StarGAN (Choi et al. 2018) in the layout of the official code (yunjey/stargan, model.py), built
from gansparse layers with its module tree (`main.<index>`, `main.<index>.main.<index>` in the
residual blocks, the discriminator's heads `conv1` and `conv2`), so its checkpoints (e.g.
200000-G.ckpt, a plain state_dict) load with models.load_reference_state_dict.

Generator(conv_dim, c_dim, repeat_num): the target domain label c [N, c_dim] is tiled over the image
and concatenated to it as c_dim extra input channels; a 7x7 conv to conv_dim, two stride-2 4x4 convs
(2 and 4 conv_dim), repeat_num residual blocks of two 3x3 convs at 4 conv_dim, two stride-2 4x4
transposed convs back to conv_dim, a 7x7 conv to RGB and tanh. No conv biases; every conv but the
last is followed by InstanceNorm2d(affine=True) and ReLU (none after a residual block's second norm).
mask: None, or a mask kind of gansparse.masks after each norm, before its ReLU, as in the other
zoo generators.

Running statistics: the official norms are InstanceNorm2d(affine=True, track_running_stats=True),
but the official code never switches its networks to eval mode, so every output it computes (in
training and in its test script) is normalised by the instance's own statistics; the running
statistics are updated and never read. Here the norms have no running statistics, so a model in
eval mode (exported, timed, evaluated) computes exactly what the official code does; the official
checkpoints' running-statistics keys are the only ones dropped on loading
(load_reference_state_dict), and state_dict() has every other official key unchanged.

Discriminator(image_size, conv_dim, c_dim, repeat_num): repeat_num stride-2 4x4 convs with biases
and LeakyReLU(0.01), from conv_dim doubling each time, then two heads on the features: `conv1` a
3x3 conv to one channel (the PatchGAN real/fake map, [N, 1, image_size / 2**repeat_num, same]) and
`conv2` a conv over the whole feature map to c_dim domain logits ([N, c_dim]).
"""
from __future__ import annotations

import torch
from torch import fx, nn

from gansparse import MaskedConv2d, MaskedConvTranspose2d

from .dcgan import check_positive_ints
from .norms import MaskedInstanceNorm2d
from .pix2pix import _check_options, _example_image

__all__ = ["Discriminator", "Generator", "ResidualBlock"]


def _norm(channels: int, mask: str | None) -> nn.Module:
    """The official InstanceNorm2d(affine=True), normalising by instance statistics in every mode
    (see the module docstring), with a `mask` after it when one is asked for."""
    if mask is None:
        return nn.InstanceNorm2d(channels, affine=True)
    return MaskedInstanceNorm2d(channels, mask=mask, affine=True)


class ResidualBlock(nn.Module):
    """x + [conv 3x3, norm, ReLU, conv 3x3, norm](x), at a constant width."""

    def __init__(self, dim: int, mask: str | None = None) -> None:
        super().__init__()
        self.main = nn.Sequential(MaskedConv2d(dim, dim, 3, 1, 1, bias=False), _norm(dim, mask), nn.ReLU(True),
                                  MaskedConv2d(dim, dim, 3, 1, 1, bias=False), _norm(dim, mask))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.main(x)


class Generator(nn.Module):
    def __init__(self, conv_dim: int = 64, c_dim: int = 5, repeat_num: int = 6, *, mask: str | None = None) -> None:
        super().__init__()
        check_positive_ints(conv_dim=conv_dim, c_dim=c_dim)
        if not (isinstance(repeat_num, int) and repeat_num >= 0):
            raise ValueError(f"repeat_num must be an int >= 0, got {repeat_num!r}")
        _check_options("instance", mask)
        self.c_dim = c_dim
        layers = [MaskedConv2d(3 + c_dim, conv_dim, 7, 1, 3, bias=False), _norm(conv_dim, mask), nn.ReLU(True)]
        for channels in (conv_dim, conv_dim * 2):  # downsampling
            layers += [MaskedConv2d(channels, channels * 2, 4, 2, 1, bias=False), _norm(channels * 2, mask),
                       nn.ReLU(True)]
        layers += [ResidualBlock(conv_dim * 4, mask) for _ in range(repeat_num)]
        for channels in (conv_dim * 4, conv_dim * 2):  # upsampling
            layers += [MaskedConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False),
                       _norm(channels // 2, mask), nn.ReLU(True)]
        layers += [MaskedConv2d(conv_dim, 3, 7, 1, 3, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [N, 3, H, W] (H and W multiples of 4), c [N, c_dim] the target domain label (one-hot,
        or 0/1 per attribute) -> [N, 3, H, W]."""
        if not isinstance(x, fx.Proxy):  # gansparse.export traces the model with proxies
            if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == 3):
                raise ValueError(f"x must be a tensor [N, 3, H, W], got {getattr(x, 'shape', type(x).__name__)}")
            if not (isinstance(c, torch.Tensor) and tuple(c.shape) == (x.shape[0], self.c_dim)):
                raise ValueError(f"c must be a tensor [N, c_dim] = [{x.shape[0]}, {self.c_dim}], "
                                 f"got {getattr(c, 'shape', type(c).__name__)}")
        c = c.to(x.dtype)[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])  # [N, c_dim, H, W]
        return self.main(torch.cat([x, c], 1))

    def example_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed random 32x32 image and the first domain's one-hot label, e.g. for
        gansparse.export.compact."""
        image = _example_image(self, 3, 32)
        c = torch.zeros(1, self.c_dim, device=image.device, dtype=image.dtype)
        c[:, 0] = 1
        return image, c


class Discriminator(nn.Module):
    def __init__(self, image_size: int = 128, conv_dim: int = 64, c_dim: int = 5, repeat_num: int = 6) -> None:
        super().__init__()
        check_positive_ints(image_size=image_size, conv_dim=conv_dim, c_dim=c_dim, repeat_num=repeat_num)
        if image_size % 2 ** repeat_num:
            raise ValueError(f"image_size must be a multiple of 2**repeat_num = {2 ** repeat_num}, got {image_size}")
        self.image_size = image_size
        layers = [MaskedConv2d(3, conv_dim, 4, 2, 1), nn.LeakyReLU(0.01)]
        channels = conv_dim
        for _ in range(1, repeat_num):
            layers += [MaskedConv2d(channels, channels * 2, 4, 2, 1), nn.LeakyReLU(0.01)]
            channels *= 2
        self.main = nn.Sequential(*layers)
        self.conv1 = MaskedConv2d(channels, 1, 3, 1, 1, bias=False)
        self.conv2 = MaskedConv2d(channels, c_dim, image_size // 2 ** repeat_num, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, 3, image_size, image_size] -> (real/fake map [N, 1, s, s] with s = image_size /
        2**repeat_num, domain logits [N, c_dim])."""
        if not isinstance(x, fx.Proxy) and tuple(x.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"x must be a tensor [N, 3, {self.image_size}, {self.image_size}], got {tuple(x.shape)}")
        h = self.main(x)
        return self.conv1(h), self.conv2(h).flatten(1)

    def example_inputs(self) -> tuple[torch.Tensor]:
        """One image [1, 3, image_size, image_size]."""
        return (_example_image(self, 3, self.image_size),)
