"""A minimal, independent re-implementation, in plain torch.nn, of StarGAN's networks in the
official layout (yunjey/stargan, model.py), written from its architecture description: the oracle
for models/stargan.py (same keys, same outputs)."""
import torch
from torch import nn


def _in(channels):
    return nn.InstanceNorm2d(channels, affine=True, track_running_stats=True)


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), _in(dim), nn.ReLU(),
                                  nn.Conv2d(dim, dim, 3, padding=1, bias=False), _in(dim))

    def forward(self, x):
        return self.main(x) + x


class Generator(nn.Module):
    def __init__(self, conv_dim=64, c_dim=5, repeat_num=6):
        super().__init__()
        d = conv_dim
        seq = [nn.Conv2d(3 + c_dim, d, 7, padding=3, bias=False), _in(d), nn.ReLU()]
        for _ in range(2):
            seq += [nn.Conv2d(d, 2 * d, 4, 2, 1, bias=False), _in(2 * d), nn.ReLU()]
            d *= 2
        seq += [Block(d) for _ in range(repeat_num)]
        for _ in range(2):
            seq += [nn.ConvTranspose2d(d, d // 2, 4, 2, 1, bias=False), _in(d // 2), nn.ReLU()]
            d //= 2
        seq += [nn.Conv2d(d, 3, 7, padding=3, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*seq)

    def forward(self, x, c):
        tiled = c.view(len(c), -1, 1, 1).repeat(1, 1, x.size(2), x.size(3))
        return self.main(torch.cat((x, tiled), dim=1))


class Discriminator(nn.Module):
    def __init__(self, image_size=128, conv_dim=64, c_dim=5, repeat_num=6):
        super().__init__()
        seq, d = [nn.Conv2d(3, conv_dim, 4, 2, 1), nn.LeakyReLU(0.01)], conv_dim
        for _ in range(repeat_num - 1):
            seq += [nn.Conv2d(d, 2 * d, 4, 2, 1), nn.LeakyReLU(0.01)]
            d *= 2
        self.main = nn.Sequential(*seq)
        self.conv1 = nn.Conv2d(d, 1, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(d, c_dim, image_size >> repeat_num, bias=False)

    def forward(self, x):
        h = self.main(x)
        return self.conv1(h), self.conv2(h).view(len(x), -1)
