"""Minimal, independent re-implementations, in plain torch.nn, of the SN-GAN CIFAR-10 networks in
VITA-Group/AutoGAN's layout (models/sngan_cifar10.py) and of the PyTorch example's DCGAN
(pytorch/examples, dcgan/main.py), written from their architecture descriptions: the oracles for
models/sngan.py and models/dcgan.py (same keys, same outputs)."""
import torch
from torch import nn
from torch.nn.utils import spectral_norm


class SNGenBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.b1 = nn.BatchNorm2d(cin)
        self.b2 = nn.BatchNorm2d(cout)
        self.c_sc = nn.Conv2d(cin, cout, 1)
        self.up = nn.UpsamplingNearest2d(scale_factor=2)
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.c2(self.act(self.b2(self.c1(self.up(self.act(self.b1(x)))))))
        return h + self.c_sc(self.up(x))


class SNGenerator(nn.Module):
    def __init__(self, z_dim=128, ch=256, bottom_width=4):
        super().__init__()
        self.ch, self.bw = ch, bottom_width
        self.l1 = nn.Linear(z_dim, bottom_width * bottom_width * ch)
        self.block2, self.block3, self.block4 = (SNGenBlock(ch, ch) for _ in range(3))
        self.b5 = nn.BatchNorm2d(ch)
        self.c5 = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, z):
        h = self.l1(z).view(-1, self.ch, self.bw, self.bw)
        h = self.block4(self.block3(self.block2(h)))
        return nn.Tanh()(self.c5(nn.ReLU()(self.b5(h))))


class SNDisBlock(nn.Module):
    def __init__(self, cin, cout, downsample, optimized=False):
        super().__init__()
        self.optimized, self.downsample = optimized, downsample
        self.c1 = spectral_norm(nn.Conv2d(cin, cout if optimized else cin, 3, padding=1))
        self.c2 = spectral_norm(nn.Conv2d(cout if optimized else cin, cout, 3, padding=1))
        self.has_sc = optimized or downsample or cin != cout
        if self.has_sc:
            self.c_sc = spectral_norm(nn.Conv2d(cin, cout, 1))

    def forward(self, x):
        pool = nn.AvgPool2d(2)
        h = x if self.optimized else nn.ReLU()(x)
        h = self.c2(nn.ReLU()(self.c1(h)))
        if self.downsample:
            h = pool(h)
        if self.optimized:
            return h + self.c_sc(pool(x))
        if not self.has_sc:
            return h + x
        s = self.c_sc(x)
        return h + (pool(s) if self.downsample else s)


class SNDiscriminator(nn.Module):
    def __init__(self, ch=128):
        super().__init__()
        self.block1 = SNDisBlock(3, ch, True, optimized=True)
        self.block2 = SNDisBlock(ch, ch, True)
        self.block3 = SNDisBlock(ch, ch, False)
        self.block4 = SNDisBlock(ch, ch, False)
        self.l5 = spectral_norm(nn.Linear(ch, 1, bias=False))

    def forward(self, x):
        h = nn.ReLU()(self.block4(self.block3(self.block2(self.block1(x)))))
        return self.l5(h.sum(2).sum(2))


class DCGANGenerator(nn.Module):
    def __init__(self, nz=100, ngf=64, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, z):
        return self.main(z)


class DCGANDiscriminator(nn.Module):
    def __init__(self, nc=3, ndf=64):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, x):
        return torch.flatten(self.main(x))
