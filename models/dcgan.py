"""DCGAN (Radford et al.) in the layout of the PyTorch example (pytorch/examples, dcgan/main.py),
built from gansparse layers with the example's module tree (`main.<index>`), so its checkpoints load
unchanged. 64x64 images.

Generator: z [N, nz, 1, 1] (or [N, nz]) -> transposed conv 4x4 to ngf*8 x 4 x 4, then three stride-2
transposed convs 4x4 to ngf*4, ngf*2, ngf (each with BN and ReLU), and one to nc at 64x64 with tanh;
no conv biases. mask: None, or a mask kind of gansparse.masks after each BN, before its ReLU.

Discriminator: stride-2 convs 4x4 nc -> ndf -> ndf*2 -> ndf*4 -> ndf*8 with LeakyReLU(0.2) (BN
from the second on), a 4x4 conv to one channel and a sigmoid; no conv biases; returns [N].
"""
from __future__ import annotations

import torch
from torch import fx, nn

from gansparse import MaskedConv2d, MaskedConvTranspose2d

from .pix2pix import _check_options, _example_image, norm_layer

__all__ = ["Discriminator", "Generator", "check_latent", "check_positive_ints"]


def check_positive_ints(**values) -> None:
    for name, value in values.items():
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_latent(z, *shapes: tuple[int, ...]) -> None:
    """z must be a tensor [N, *shape] for one of `shapes`. Not checked while torch.fx traces the
    model (gansparse.export does), when z is a proxy with no shape."""
    if isinstance(z, fx.Proxy):
        return
    if not (isinstance(z, torch.Tensor) and any(tuple(z.shape[1:]) == shape for shape in shapes)):
        expected = " or ".join(f"[N, {', '.join(map(str, shape))}]" for shape in shapes)
        raise ValueError(f"z must be a tensor {expected}, got {getattr(z, 'shape', type(z).__name__)}")


class Generator(nn.Module):
    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3, *, mask: str | None = None) -> None:
        super().__init__()
        check_positive_ints(nz=nz, ngf=ngf, nc=nc)
        _check_options("batch", mask)
        self.nz = nz
        widths = [ngf * 8, ngf * 4, ngf * 2, ngf]
        layers = [MaskedConvTranspose2d(nz, widths[0], 4, 1, 0, bias=False), norm_layer("batch", widths[0], mask),
                  nn.ReLU(True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [MaskedConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), norm_layer("batch", c_out, mask),
                       nn.ReLU(True)]
        layers += [MaskedConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        check_latent(z, (self.nz, 1, 1), (self.nz,))
        return self.main(z.reshape(-1, self.nz, 1, 1))  # [N, nc, 64, 64]

    def example_inputs(self) -> tuple[torch.Tensor]:
        """z [1, nz, 1, 1], e.g. for gansparse.export.compact."""
        return (_example_image(self, self.nz, 1),)


class Discriminator(nn.Module):
    def __init__(self, nc: int = 3, ndf: int = 64) -> None:
        super().__init__()
        check_positive_ints(nc=nc, ndf=ndf)
        widths = [ndf, ndf * 2, ndf * 4, ndf * 8]
        layers = [MaskedConv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [MaskedConv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers += [MaskedConv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid()]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1, 1).squeeze(1)  # [N, 1, 1, 1] -> [N]

    def example_inputs(self) -> tuple[torch.Tensor]:
        """One image [1, nc, 64, 64]."""
        return (_example_image(self, self.main[0].in_channels, 64),)
