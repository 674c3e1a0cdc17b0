"""A minimal, independent re-implementation of ajbrock/BigGAN-PyTorch's Generator and
Discriminator (BigGAN.py, layers.py), written from their structure with plain torch.nn. It is the
oracle models/biggan.py is checked against: same state_dict keys, same outputs.

Covered: spectral norm with its u0.. / sv0.. buffers and Gram-Schmidt power iteration, the
class-conditional BN (norm_style 'bn', linear gains from a shared embedding or embedding gains),
the plain BN of the output layer, the self-attention block, G and D residual blocks, the
projection discriminator. Not covered: cross-replica / mybn batch norms, other norm styles.
"""
import torch
import torch.nn.functional as F
from torch import nn


def _orthogonalise(x, basis):
    for b in basis:  # subtract the projection of x on each row vector b, all [1, n]
        x = x - (x @ b.t()) * b / (b @ b.t())
    return x


class SpectralNorm:
    """Mixin: weight / sigma, sigma from power iteration on weight viewed as [out, -1]."""

    def _init_sn(self, num_svs, num_itrs, num_outputs, eps):
        self.num_svs, self.num_itrs, self.sn_eps = num_svs, num_itrs, eps
        for i in range(num_svs):
            self.register_buffer(f"u{i}", torch.randn(1, num_outputs))
            self.register_buffer(f"sv{i}", torch.ones(1))

    def sn_weight(self):
        w = self.weight.view(self.weight.shape[0], -1)
        for _ in range(self.num_itrs):
            us, vs, svs = [], [], []
            for i in range(self.num_svs):
                u_buffer = getattr(self, f"u{i}")
                with torch.no_grad():
                    v = F.normalize(_orthogonalise(u_buffer @ w, vs), eps=self.sn_eps)
                    vs.append(v)
                    u = F.normalize(_orthogonalise(v @ w.t(), us), eps=self.sn_eps)
                    us.append(u)
                    if self.training:
                        u_buffer[:] = u
                svs.append(((v @ w.t()) @ u.t()).squeeze())
        if self.training:
            with torch.no_grad():
                for i, sv in enumerate(svs):
                    getattr(self, f"sv{i}")[:] = sv
        return self.weight / svs[0]


class SNConv2d(nn.Conv2d, SpectralNorm):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0, bias=True, num_svs=1, num_itrs=1, eps=1e-12):
        nn.Conv2d.__init__(self, cin, cout, kernel_size, stride, padding, bias=bias)
        self._init_sn(num_svs, num_itrs, cout, eps)

    def forward(self, x):
        return F.conv2d(x, self.sn_weight(), self.bias, self.stride, self.padding)


class SNLinear(nn.Linear, SpectralNorm):
    def __init__(self, fin, fout, bias=True, num_svs=1, num_itrs=1, eps=1e-12):
        nn.Linear.__init__(self, fin, fout, bias)
        self._init_sn(num_svs, num_itrs, fout, eps)

    def forward(self, x):
        return F.linear(x, self.sn_weight(), self.bias)


class SNEmbedding(nn.Embedding, SpectralNorm):
    def __init__(self, num, dim, num_svs=1, num_itrs=1, eps=1e-12):
        nn.Embedding.__init__(self, num, dim)
        self._init_sn(num_svs, num_itrs, num, eps)

    def forward(self, y):
        return F.embedding(y, self.sn_weight())


class Attention(nn.Module):
    def __init__(self, ch, conv):
        super().__init__()
        self.ch = ch
        self.theta = conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.phi = conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.g = conv(ch, ch // 2, kernel_size=1, padding=0, bias=False)
        self.o = conv(ch // 2, ch, kernel_size=1, padding=0, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x, y=None):
        n, _, h, w = x.shape
        theta = self.theta(x).view(n, self.ch // 8, h * w)
        phi = F.max_pool2d(self.phi(x), 2).view(n, self.ch // 8, h * w // 4)
        g = F.max_pool2d(self.g(x), 2).view(n, self.ch // 2, h * w // 4)
        beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(n, self.ch // 2, h, w))
        return self.gamma * o + x


class ccbn(nn.Module):
    def __init__(self, channels, cond_size, linear, eps):
        super().__init__()
        self.gain, self.bias, self.eps = linear(cond_size, channels), linear(cond_size, channels), eps
        self.register_buffer("stored_mean", torch.zeros(channels))
        self.register_buffer("stored_var", torch.ones(channels))

    def forward(self, x, y):
        gain = (1 + self.gain(y)).view(y.shape[0], -1, 1, 1)
        bias = self.bias(y).view(y.shape[0], -1, 1, 1)
        out = F.batch_norm(x, self.stored_mean, self.stored_var, None, None, self.training, 0.1, self.eps)
        return out * gain + bias


class bn(nn.Module):
    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.gain, self.bias, self.eps = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels)), eps
        self.register_buffer("stored_mean", torch.zeros(channels))
        self.register_buffer("stored_var", torch.ones(channels))

    def forward(self, x, y=None):
        return F.batch_norm(x, self.stored_mean, self.stored_var, self.gain, self.bias, self.training, 0.1, self.eps)


class GBlock(nn.Module):
    def __init__(self, cin, cout, conv, norm):
        super().__init__()
        self.conv1, self.conv2 = conv(cin, cout), conv(cout, cout)
        self.conv_sc = conv(cin, cout, kernel_size=1, padding=0)  # always learnable: every G block upsamples
        self.bn1, self.bn2 = norm(cin), norm(cout)

    def forward(self, x, y):
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2)
        x = F.interpolate(x, scale_factor=2)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        return h + self.conv_sc(x)


class DBlock(nn.Module):
    def __init__(self, cin, cout, conv, wide, preactivation, downsample):
        super().__init__()
        hidden = cout if wide else cin
        self.conv1, self.conv2 = conv(cin, hidden), conv(hidden, cout)
        self.preactivation, self.downsample = preactivation, downsample
        self.learnable_sc = cin != cout or downsample
        if self.learnable_sc:
            self.conv_sc = conv(cin, cout, kernel_size=1, padding=0)

    def forward(self, x):
        h = self.conv2(F.relu(self.conv1(F.relu(x) if self.preactivation else x)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        if self.preactivation:
            sc = self.conv_sc(x) if self.learnable_sc else x
            sc = F.avg_pool2d(sc, 2) if self.downsample else sc
        else:
            sc = F.avg_pool2d(x, 2) if self.downsample else x
            sc = self.conv_sc(sc) if self.learnable_sc else sc
        return h + sc


# (in multipliers, out multipliers) of the blocks, and D's downsampling, per resolution
G_CHANNELS = {32: ([4, 4, 4], [4, 4, 4]), 64: ([16, 16, 8, 4], [16, 8, 4, 2]),
              128: ([16, 16, 8, 4, 2], [16, 8, 4, 2, 1]), 256: ([16, 16, 8, 8, 4, 2], [16, 8, 8, 4, 2, 1])}
D_CHANNELS = {32: ([4, 4, 4], [4, 4, 4, 4], [True, True, False, False]),
              64: ([1, 2, 4, 8], [1, 2, 4, 8, 16], [True] * 4 + [False]),
              128: ([1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 16], [True] * 5 + [False]),
              256: ([1, 2, 4, 8, 8, 16], [1, 2, 4, 8, 8, 16, 16], [True] * 6 + [False])}


def _sn_layers(num_svs, num_itrs, eps):
    def conv(cin, cout, kernel_size=3, padding=1, bias=True):
        return SNConv2d(cin, cout, kernel_size, padding=padding, bias=bias, num_svs=num_svs, num_itrs=num_itrs,
                        eps=eps)

    def linear(fin, fout, bias=True):
        return SNLinear(fin, fout, bias, num_svs, num_itrs, eps)
    return conv, linear


class Generator(nn.Module):
    def __init__(self, G_ch=64, dim_z=128, resolution=128, G_attn="64", n_classes=1000, num_G_SVs=1,
                 num_G_SV_itrs=1, G_shared=True, shared_dim=0, hier=False, BN_eps=1e-5, SN_eps=1e-12, G_param="SN"):
        super().__init__()
        ins, outs = ([G_ch * m for m in ms] for ms in G_CHANNELS[resolution])
        shared_dim = shared_dim if shared_dim > 0 else dim_z
        self.hier = hier
        self.chunk = dim_z // (len(ins) + 1) if hier else 0
        if G_param == "SN":
            conv, linear = _sn_layers(num_G_SVs, num_G_SV_itrs, SN_eps)
        else:
            def conv(cin, cout, kernel_size=3, padding=1, bias=True):
                return nn.Conv2d(cin, cout, kernel_size, padding=padding, bias=bias)
            linear = nn.Linear
        if G_shared:
            def norm(c):
                return ccbn(c, shared_dim + self.chunk, lambda i, o: linear(i, o, bias=False), BN_eps)
            self.shared = nn.Embedding(n_classes, shared_dim)
        else:
            def norm(c):
                return ccbn(c, n_classes, nn.Embedding, BN_eps)
            self.shared = nn.Identity()
        self.linear = linear(self.chunk if hier else dim_z, ins[0] * 16)
        attention = [int(r) for r in G_attn.split("_")]
        blocks = []
        for index, (cin, cout) in enumerate(zip(ins, outs)):
            block = [GBlock(cin, cout, conv, norm)]
            if 8 * 2 ** index in attention:
                block.append(Attention(cout, conv))
            blocks.append(nn.ModuleList(block))
        self.blocks = nn.ModuleList(blocks)
        self.output_layer = nn.Sequential(bn(outs[-1]), nn.ReLU(), conv(outs[-1], 3))

    def forward(self, z, y):
        if self.hier:
            z, *chunks = torch.split(z, self.chunk, 1)
            ys = [torch.cat([y, c], 1) for c in chunks]
        else:
            ys = [y] * len(self.blocks)
        h = self.linear(z).view(z.shape[0], -1, 4, 4)
        for blocklist, y_block in zip(self.blocks, ys):
            for block in blocklist:
                h = block(h, y_block)
        return torch.tanh(self.output_layer(h))


class Discriminator(nn.Module):
    def __init__(self, D_ch=64, D_wide=True, resolution=128, D_attn="64", n_classes=1000, num_D_SVs=1, num_D_SV_itrs=1,
                 SN_eps=1e-12, output_dim=1):
        super().__init__()
        in_mults, out_mults, downsample = D_CHANNELS[resolution]
        ins, outs = [3] + [D_ch * m for m in in_mults], [D_ch * m for m in out_mults]
        resolutions = [16] * 4 if resolution == 32 else [resolution // 2 ** (i + 1) for i in range(len(outs) - 1)] + [4]
        conv, linear = _sn_layers(num_D_SVs, num_D_SV_itrs, SN_eps)
        attention = [int(r) for r in D_attn.split("_")]
        blocks = []
        for index, (cin, cout) in enumerate(zip(ins, outs)):
            block = [DBlock(cin, cout, conv, D_wide, index > 0, downsample[index])]
            if resolutions[index] in attention:
                block.append(Attention(cout, conv))
            blocks.append(nn.ModuleList(block))
        self.blocks = nn.ModuleList(blocks)
        self.linear = linear(outs[-1], output_dim)
        self.embed = SNEmbedding(n_classes, outs[-1], num_D_SVs, num_D_SV_itrs, SN_eps)

    def forward(self, x, y):
        h = x
        for blocklist in self.blocks:
            for block in blocklist:
                h = block(h)
        h = torch.sum(F.relu(h), [2, 3])
        return self.linear(h) + torch.sum(self.embed(y) * h, 1, keepdim=True)
