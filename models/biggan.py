"""BigGAN and SA-GAN as in ajbrock/BigGAN-PyTorch (BigGAN.py, layers.py), built from gansparse
layers, with the reference's module tree and state_dict keys: its checkpoints (G.pth, G_ema.pth,
D.pth) load with no key remapping, and without masks every network computes what the reference
computes.

    G = Generator(**BIGGAN_128)                      # or SAGAN_128, or the reference's keywords
    G.load_state_dict(torch.load("G_ema.pth", weights_only=True))
    ids = torch.randint(0, 1000, (8,))
    images = G(torch.randn(8, G.dim_z), G.shared(ids))   # [8, 3, 128, 128]; SA-GAN: G(z, ids)
    logits = Discriminator(D_ch=96)(images, ids)     # [8, 1]

The interface is the reference's: G(z, y) takes y = G.shared(class ids), the shared class
embedding, when G_shared (so callers can interpolate between classes), and the class ids
themselves otherwise (G.shared is then an identity). D(x, y) takes class ids. As a convenience,
a G_shared G also takes class ids, which it embeds itself (not while traced by torch.fx).
G.example_inputs() and D.example_inputs() give batch-1 inputs in these forms.

Pieces, each with the reference's keys:
- spectral norm (SNConv2d, SNLinear, SNEmbedding): buffers u0.. (the left singular vector
  estimates, [1, out]) and sv0.. (the singular values, for logging); every forward runs num_itrs
  power iterations with Gram-Schmidt over num_svs vectors, updating u and sv in training, and
  divides the weight by the first singular value. fold_spectral_norm bakes it into plain layers.
- class-conditional BN (ClassConditionalBatchNorm, the reference's `ccbn`): batch norm without an
  affine, then gain = 1 + gain(y) and bias(y), per sample; gain/bias are bias-free (SN) linear
  maps of the shared embedding (concatenated with a chunk of z when hier), or embeddings of the
  class ids without G_shared. Statistics in stored_mean / stored_var, momentum 0.1.
- the plain BN before G's output conv (BatchNorm, the reference's `bn`): gain, bias, stored_*.
- self-attention (Attention): 1x1 theta, phi (C/8), g (C/2) and o convs without bias, 2x2 max
  pooling on phi and g, out = x + gamma * o(g softmax(theta^T phi)^T), gamma starting at 0.
- the projection discriminator: sum-pooled ReLU features h, out = linear(h) + <embed(y), h>.

mask (Generator): None, or a mask kind of gansparse.masks ('sigmoid', 'dmad', 'hard') after the
second CBN of every G block, i.e. on the channels between conv1 and conv2, after the
class-conditional affine and before the ReLU, where PPCD-GAN puts its learnable masks; the masks
are built with `mask_options` (keywords of the mask's class, e.g. a sigmoid mask's temperature).
The mask adds `blocks.<i>.0.bn2.mask.*` keys only: gansparse.models.load_reference_state_dict(G,
checkpoint) loads a reference checkpoint into a masked G. The norms run as gansparse's fused
norm + mask + ReLU op.

ppres (Generator): PPCD-GAN's PP-Res blocks (Sec. 3.2, see GBlock): with a mask, conv2's outputs
are masked too (`blocks.<i>.0.conv2.mask.*`), and every block gets a 1x1 transition conv on its
residual branch before the sum (`blocks.<i>.0.transition.*`, starting as the identity), so pruning
inside a block never changes the channels between blocks. Off, the layout and keys are the
reference's.

Inference and export: fold_spectral_norm(model) bakes spectral norm into plain layers, in place;
exportable(model) returns an eval-mode copy made of torch and gansparse layers only, which
gansparse.export.compact(exportable(G)) (on G.example_inputs(), or given inputs) turns into a
compact model without the masked channels (conv1's outputs, bn2's statistics and gain / bias rows,
conv2's inputs; with PP-Res also conv2's outputs and the transition's inputs).

Resolutions 32, 64, 128 and 256, as the reference's tables. Not supported (a clear error):
cross_replica and mybn batch norms, norm styles other than 'bn',
activations other than ReLU, kernel sizes other than 3 (the reference ignores G_kernel_size and
D_kernel_size: its convs are 3x3).
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import fx, nn

from gansparse import functional as GF
from gansparse import ConditionalBatchNorm2d, MaskedConv2d
from gansparse.masks import MASK_KINDS, as_mask, make_mask

from .norms import ChannelMask, MaskedBatchNorm2d

__all__ = ["Attention", "BatchNorm", "BIGGAN_128", "ClassConditionalBatchNorm", "DBlock", "Discriminator", "GBlock",
           "Generator", "SAGAN_128", "SNConv2d", "SNEmbedding", "SNLinear", "SpectralNorm", "exportable",
           "fold_spectral_norm"]

# The published configurations (BigGAN-PyTorch's launch scripts; PPCD-GAN's baselines).
# BigGAN 128: 70,433,988 parameters in G. SA-GAN 128 as PPCD-GAN counts it (42,017,412 in G):
# G_ch 64, dim_z 128, class embeddings in every CBN, no shared embedding, no hierarchical z.
BIGGAN_128 = dict(G_ch=96, dim_z=120, shared_dim=128, G_shared=True, hier=True, resolution=128, G_attn="64")
SAGAN_128 = dict(G_ch=64, dim_z=128, G_shared=False, hier=False, resolution=128, G_attn="64")

# Width multipliers of the blocks per resolution: G (in, out), each block upsampling 2x from
# 4x4; D (in after the RGB input, out, downsampling).
G_WIDTHS = {32: ([4, 4, 4], [4, 4, 4]),
            64: ([16, 16, 8, 4], [16, 8, 4, 2]),
            128: ([16, 16, 8, 4, 2], [16, 8, 4, 2, 1]),
            256: ([16, 16, 8, 8, 4, 2], [16, 8, 8, 4, 2, 1])}
D_WIDTHS = {32: ([4, 4, 4], [4, 4, 4, 4], [True, True, False, False]),
            64: ([1, 2, 4, 8], [1, 2, 4, 8, 16], [True] * 4 + [False]),
            128: ([1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 16], [True] * 5 + [False]),
            256: ([1, 2, 4, 8, 8, 16], [1, 2, 4, 8, 8, 16, 16], [True] * 6 + [False])}
INITS = ("ortho", "N02", "glorot", "xavier")


# --- spectral norm -------------------------------------------------------------------------


def _orthogonalise(x: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    """Gram-Schmidt: x [1, n] minus its projections on the rows b [1, n] of `basis`."""
    for b in basis:
        x = x - torch.mm(b, x.t()) * b / torch.mm(b, b.t())
    return x


class SpectralNorm:
    """What SNConv2d, SNLinear and SNEmbedding add to their torch layer: the weight, viewed as a
    matrix W [rows, -1] (rows: output channels, features or embeddings), is divided by its
    largest singular value, estimated by power iteration from the buffer u0 [1, rows]."""

    def _init_spectral_norm(self, num_svs: int, num_itrs: int, eps: float) -> None:
        for name, value in (("num_svs", num_svs), ("num_itrs", num_itrs)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.num_svs, self.num_itrs, self.sn_eps = num_svs, num_itrs, eps
        rows = self.weight.shape[0]
        for i in range(num_svs):
            self.register_buffer(f"u{i}", torch.randn(1, rows))
            self.register_buffer(f"sv{i}", torch.ones(1))

    def spectral_weight(self) -> torch.Tensor:
        """weight / sigma_0. In training the power iteration updates u0.. and sv0.. in place.
        The gradient flows through sigma = v W^T u^T with the singular vectors held fixed."""
        w = self.weight.view(self.weight.shape[0], -1)  # [rows, K]
        for _ in range(self.num_itrs):
            us, vs, svs = [], [], []
            for i in range(self.num_svs):
                stored_u = getattr(self, f"u{i}")
                with torch.no_grad():
                    v = F.normalize(_orthogonalise(torch.matmul(stored_u, w), vs), eps=self.sn_eps)  # [1, K]
                    u = F.normalize(_orthogonalise(torch.matmul(v, w.t()), us), eps=self.sn_eps)  # [1, rows]
                    vs.append(v)
                    us.append(u)
                    if self.training:
                        stored_u[:] = u
                svs.append(torch.matmul(torch.matmul(v, w.t()), u.t()).squeeze())
        if self.training:
            with torch.no_grad():
                for i, sv in enumerate(svs):
                    getattr(self, f"sv{i}")[:] = sv
        return self.weight / svs[0]

    def power_iteration_macs(self) -> int:
        """The MACs of spectral_weight() as gansparse.profile counts its operations (torchprofile
        counts the same with num_svs=1; it skips the torch.mm of Gram-Schmidt): per iteration and
        singular vector i, three products with W and i projections of an n-vector (3n each)."""
        rows, k = self.weight.shape[0], self.weight[0].numel()
        return self.num_itrs * sum(3 * rows * k + rows + 3 * i * (rows + k) for i in range(self.num_svs))

    def _spectral_repr(self) -> str:
        return f"num_svs={self.num_svs}, num_itrs={self.num_itrs}, eps={self.sn_eps}"


class SNConv2d(SpectralNorm, MaskedConv2d):
    """BigGAN-PyTorch's SNConv2d on gansparse.MaskedConv2d: an optional `mask` on its output
    channels (out = mask[c] * conv(x)[c]); keys weight, bias, u0.., sv0.. (and mask.*)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, num_svs: int = 1, num_itrs: int = 1, eps: float = 1e-12, *,
                 mask=None) -> None:
        MaskedConv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                              mask=mask)
        self._init_spectral_norm(num_svs, num_itrs, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.spectral_weight()
        if self.mask is None:
            return self._conv_forward(x, weight, self.bias)
        return GF.masked_conv_norm_act(x, weight, self.bias, self.mask(), norm="none", activation=None,
                                       stride=self.stride, padding=self.padding, dilation=self.dilation,
                                       groups=self.groups, impl=self.impl)

    def profile_macs(self, x: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
        """For gansparse.profile: the convolution (output elements x weight[0] size) and the power iteration."""
        macs = out.numel() * self.weight[0].numel() + self.power_iteration_macs()
        return macs, macs

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._spectral_repr()


class SNLinear(SpectralNorm, nn.Linear):
    """BigGAN-PyTorch's SNLinear; keys weight, bias, u0.., sv0..."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, num_svs: int = 1, num_itrs: int = 1,
                 eps: float = 1e-12) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_spectral_norm(num_svs, num_itrs, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.spectral_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._spectral_repr()


class SNEmbedding(SpectralNorm, nn.Embedding):
    """BigGAN-PyTorch's SNEmbedding (the class embedding of the projection discriminator): the
    rows of W are the embeddings, so u has num_embeddings entries. The spectral-norm arguments are
    keyword-only: the reference has nn.Embedding's optional arguments (unused here) before them."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, num_svs: int = 1, num_itrs: int = 1,
                 eps: float = 1e-12) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim)
        self._init_spectral_norm(num_svs, num_itrs, eps)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.embedding(y, self.spectral_weight())

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._spectral_repr()


@torch.no_grad()
def fold_spectral_norm(model: nn.Module) -> nn.Module:
    """Replace, in place, every SNConv2d / SNLinear / SNEmbedding of `model` by a MaskedConv2d
    (keeping its mask) / nn.Linear / nn.Embedding whose weight is the spectrally normalised weight
    the layer uses in eval mode (one power iteration from the stored u, which is not updated).
    For inference and export: the folded model in eval mode computes what `model` computes in
    eval mode, without the power iterations, and has no u / sv buffers. Returns `model`."""
    for parent in list(model.modules()):
        for name, layer in list(parent.named_children()):
            if not isinstance(layer, SpectralNorm):
                continue
            training = layer.training
            weight = layer.eval().spectral_weight()
            layer.train(training)
            if isinstance(layer, SNConv2d):
                plain = MaskedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                     layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                                     device="meta", mask=layer.mask, impl=layer.impl)
            elif isinstance(layer, SNLinear):
                plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
            else:
                plain = nn.Embedding(layer.num_embeddings, layer.embedding_dim, device="meta")
            plain.weight = nn.Parameter(weight.detach().clone(), requires_grad=layer.weight.requires_grad)
            if getattr(layer, "bias", None) is not None:
                plain.bias = layer.bias
            setattr(parent, name, plain.train(training))
    return model


# --- batch norms with BigGAN's keys ----------------------------------------------------------


class _StoredStatsBatchNorm(nn.Module):
    """Batch norm with running statistics in `stored_mean` / `stored_var` (momentum 0.1, no
    num_batches_tracked), an optional channel mask after the affine, running as gansparse's
    fused norm + mask + activation op."""

    profile_channelwise = True  # for gansparse.profile: a mask here prunes the producing layer's outputs

    def __init__(self, num_features: int, eps: float, mask) -> None:
        super().__init__()
        if not (isinstance(num_features, int) and num_features > 0):
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.num_features, self.eps, self.momentum = num_features, eps, 0.1
        self.register_buffer("stored_mean", torch.zeros(num_features))
        self.register_buffer("stored_var", torch.ones(num_features))
        self.mask = as_mask(mask, num_features)

    def _normalize(self, x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor, activation: str | None):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"x must be a tensor [N, {self.num_features}, H, W], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        return GF.norm_mask_act(x, self.mask() if self.mask is not None else None, gain, bias, self.stored_mean,
                                self.stored_var, norm="batch", training=self.training, momentum=self.momentum,
                                eps=self.eps, activation=activation)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class ClassConditionalBatchNorm(_StoredStatsBatchNorm):
    """BigGAN-PyTorch's `ccbn`: out = act(mask * ((1 + gain(y)) * bn(x) + bias(y))), per sample.

    gain, bias: `linear(cond_size, num_features)` each: bias-free (SN) linear maps of a condition
    vector y [N, cond_size] (G_shared), or nn.Embedding(n_classes, num_features) of class ids y [N].
    """

    def __init__(self, num_features: int, cond_size: int, linear, eps: float = 1e-5, *, mask=None) -> None:
        super().__init__(num_features, eps, mask)
        self.cond_size = cond_size
        self.gain = linear(cond_size, num_features)
        self.bias = linear(cond_size, num_features)

    def forward(self, x: torch.Tensor, y: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """activation: None, as the reference's ccbn, or 'relu' to fuse the ReLU that follows it."""
        if isinstance(self.gain, nn.Embedding):
            _check_class_ids(y, "y", self.cond_size)
        elif not (isinstance(y, torch.Tensor) and y.dim() == 2 and y.shape[1] == self.cond_size
                  and y.is_floating_point()):
            raise ValueError(f"y must be a floating-point condition [N, {self.cond_size}], got "
                             f"{getattr(y, 'shape', type(y).__name__)}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y has {y.shape[0]} samples but x has {x.shape[0]}")
        return self._normalize(x, 1 + self.gain(y), self.bias(y), activation)

    def profile_macs(self, x: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
        """For gansparse.profile, as torchprofile counts the reference: the per-sample gain
        multiply, and the gain / bias linear maps with their power iterations (embeddings are free)."""
        macs = out.numel()
        for linear in (self.gain, self.bias):
            if isinstance(linear, nn.Linear):
                macs += out.shape[0] * linear.weight.numel()
            if isinstance(linear, SpectralNorm):
                macs += linear.power_iteration_macs()
        return macs, macs

    def extra_repr(self) -> str:
        return super().extra_repr() + f", cond_size={self.cond_size}"


class BatchNorm(_StoredStatsBatchNorm):
    """BigGAN-PyTorch's `bn` (before G's output conv): batch norm with a per-channel affine
    `gain` (ones) and `bias` (zeros)."""

    def __init__(self, num_features: int, eps: float = 1e-5, *, mask=None) -> None:
        super().__init__(num_features, eps, mask)
        self.gain = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """y is ignored, as in the reference."""
        return self._normalize(x, self.gain, self.bias, None)

    def profile_macs(self, x: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
        """For gansparse.profile: an affine batch norm is one MAC per output element."""
        return out.numel(), out.numel()


def _check_class_ids(y, name: str, n_classes: int) -> None:
    if not (isinstance(y, torch.Tensor) and y.dim() == 1 and y.dtype in (torch.int64, torch.int32)):
        raise ValueError(f"{name} must be class ids, an integer tensor [N], got "
                         f"{getattr(y, 'dtype', type(y).__name__)} of shape {tuple(getattr(y, 'shape', ()))}")
    if y.device.type != "meta" and y.numel() and not (0 <= int(y.min()) and int(y.max()) < n_classes):
        raise ValueError(f"{name} must be class ids in [0, {n_classes}), got values in "
                         f"[{int(y.min())}, {int(y.max())}]")


# --- blocks ----------------------------------------------------------------------------------


class Attention(nn.Module):
    """The SA-GAN non-local block: out = x + gamma * o(g . softmax(theta^T phi)^T), with phi and
    g max-pooled 2x2. `conv(in, out, kernel_size=1, padding=0, bias=False)` builds the projections."""

    def __init__(self, ch: int, conv) -> None:
        super().__init__()
        if not (isinstance(ch, int) and ch >= 8):
            raise ValueError(f"ch must be an int >= 8 (theta and phi have ch // 8 channels), got {ch!r}")
        self.ch = ch
        self.theta = conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.phi = conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.g = conv(ch, ch // 2, kernel_size=1, padding=0, bias=False)
        self.o = conv(ch // 2, ch, kernel_size=1, padding=0, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """y is ignored (the block sits in G's and D's block lists, which pass it)."""
        n, _, h, w = x.shape
        if not isinstance(x, fx.Proxy) and (h % 2 or w % 2):  # torch.fx tracing (export): no sizes
            raise ValueError(f"x must have even height and width (2x2 pooling), got {tuple(x.shape)}")
        theta = self.theta(x).view(n, self.ch // 8, h * w)
        phi = F.max_pool2d(self.phi(x), [2, 2]).view(n, self.ch // 8, h * w // 4)
        g = F.max_pool2d(self.g(x), [2, 2]).view(n, self.ch // 2, h * w // 4)
        beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)  # [N, HW, HW/4]
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(n, self.ch // 2, h, w))
        return self.gamma * o + x


class GBlock(nn.Module):
    """x -> conv2(relu(bn2(conv1(up(relu(bn1(x, y)))), y))) + conv_sc(up(x)), up: nearest 2x.
    bn2 carries the block's mask (before its ReLU).

    ppres (PPCD-GAN's PP-Res block, Sec. 3.2): conv2 masks its outputs too, and a 1x1
    `transition` conv maps them back to out_channels on the residual branch, before the sum:
    x -> transition(conv2(...)) + conv_sc(up(x)). The residual stream is thus never masked, and
    both masks prune freely: bn2's mask conv1's outputs and conv2's inputs, conv2's mask conv2's
    outputs and the transition's inputs. The transition is built like the block's other convs
    (spectral-normalised with G_param 'SN') and starts as the identity (zero bias), so a PP-Res
    block starts as the plain block with its masks applied.

    make_mask: None, or a callable channels -> Mask (a new mask for each masked layer).
    """

    def __init__(self, in_channels: int, out_channels: int, conv, norm, make_mask=None, ppres: bool = False) -> None:
        super().__init__()
        self.conv1 = conv(in_channels, out_channels)
        self.conv2 = conv(out_channels, out_channels, mask=make_mask(out_channels) if ppres and make_mask else None)
        self.conv_sc = conv(in_channels, out_channels, kernel_size=1, padding=0)
        self.bn1 = norm(in_channels)
        self.bn2 = norm(out_channels, mask=make_mask(out_channels) if make_mask else None)
        self.transition = conv(out_channels, out_channels, kernel_size=1, padding=0) if ppres else None

    @torch.no_grad()
    def reset_transition_(self) -> None:
        """The transition conv as the identity (weight eye, bias 0). A spectral-norm transition is
        then unchanged by its normalisation: the identity's singular values are all 1."""
        weight = self.transition.weight  # [C, C, 1, 1]
        weight.copy_(torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)[:, :, None, None])
        self.transition.bias.zero_()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(self.bn1(x, y, activation="relu"), scale_factor=2)
        x = F.interpolate(x, scale_factor=2)
        h = self.conv2(self.bn2(self.conv1(h), y, activation="relu"))
        if self.transition is not None:
            h = self.transition(h)
        return h + self.conv_sc(x)


class DBlock(nn.Module):
    """h = conv2(relu(conv1(relu?(x)))), average-pooled 2x2 when downsampling, plus a shortcut:
    conv_sc then pool with preactivation, pool then conv_sc without; conv_sc only when the
    channels change or the block downsamples. The hidden width is out_channels when wide."""

    def __init__(self, in_channels: int, out_channels: int, conv, wide: bool = True, preactivation: bool = False,
                 downsample: bool = False) -> None:
        super().__init__()
        hidden = out_channels if wide else in_channels
        self.conv1 = conv(in_channels, hidden)
        self.conv2 = conv(hidden, out_channels)
        self.preactivation, self.downsample = preactivation, downsample
        self.learnable_sc = in_channels != out_channels or downsample
        if self.learnable_sc:
            self.conv_sc = conv(in_channels, out_channels, kernel_size=1, padding=0)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) if self.downsample else x

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.preactivation:
            return self._pool(self.conv_sc(x) if self.learnable_sc else x)
        x = self._pool(x)
        return self.conv_sc(x) if self.learnable_sc else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self._pool(self.conv2(F.relu(self.conv1(h))))
        return h + self._shortcut(x)


# --- arguments -------------------------------------------------------------------------------


def _check_options(resolution, attn: str, name: str, activation, kernel_size, kernel_name, init, init_name) -> None:
    if resolution not in G_WIDTHS:  # the same resolutions as D_WIDTHS
        raise ValueError(f"resolution must be one of {tuple(G_WIDTHS)}, got {resolution!r}")
    if not (isinstance(attn, str) and all(part.isdigit() for part in attn.split("_"))):
        raise ValueError(f"{name} must be resolutions joined by '_' such as '64' or '32_64', got {attn!r}")
    if not isinstance(activation, nn.ReLU):
        raise ValueError(f"{name[0]}_activation must be an nn.ReLU (the fused norm + mask + activation runs ReLU), "
                         f"got {activation!r}")
    if kernel_size != 3:
        raise ValueError(f"{kernel_name} must be 3 (the reference ignores it: its convs are 3x3), got {kernel_size!r}")
    if init not in INITS:
        raise ValueError(f"{init_name} must be one of {INITS}, got {init!r}")


def _unsupported(**options) -> None:
    for name, value in options.items():
        if value:
            raise ValueError(f"{name}={value!r} is not supported (single-device batch norm only); pass {name}=False")


def _sn_layers(num_svs: int, num_itrs: int, eps: float):
    """BigGAN's which_conv (3x3, padding 1 by default) and which_linear with spectral norm."""
    conv = functools.partial(SNConv2d, kernel_size=3, padding=1, num_svs=num_svs, num_itrs=num_itrs, eps=eps)
    linear = functools.partial(SNLinear, num_svs=num_svs, num_itrs=num_itrs, eps=eps)
    return conv, linear


@torch.no_grad()
def _init_weights(model: nn.Module, init: str) -> None:
    """The reference's init_weights: every conv, linear and embedding weight (biases keep torch's
    defaults); meta tensors are skipped."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)) and module.weight.device.type != "meta":
            if init == "ortho":
                nn.init.orthogonal_(module.weight)
            elif init == "N02":
                nn.init.normal_(module.weight, 0, 0.02)
            else:
                nn.init.xavier_uniform_(module.weight)


# --- the generator ----------------------------------------------------------------------------


class Generator(nn.Module):
    """BigGAN-PyTorch's Generator: a linear map of z (or of its first chunk when hier) to a
    bottom_width^2 grid with 16 G_ch channels (4 G_ch at resolution 32), G blocks that each
    upsample 2x, self-attention after the blocks at the resolutions in G_attn, then bn, ReLU, a
    3-channel conv and tanh.

    Keywords and defaults are the reference's. forward(z, y): z [N, dim_z]; y [N, shared_dim]
    from G.shared(class ids) with G_shared, else class ids [N]. With hier, z is cut into
    len(blocks) + 1 chunks of dim_z // (len(blocks) + 1) (dim_z is rounded down to a multiple):
    the first feeds the linear map, block i gets cat([y, chunk i + 1]).

    Keyword-only, not the reference's: mask, mask_options and ppres (the masks and PPCD-GAN's
    PP-Res blocks, see the module docstring).

    Accepted and ignored, as the optimiser and precision belong to the training loop here:
    G_lr, G_B1, G_B2, adam_eps, G_mixed_precision, G_fp16, no_optim. Unknown keywords raise.
    """

    def __init__(self, G_ch=64, dim_z=128, bottom_width=4, resolution=128, G_kernel_size=3, G_attn="64",
                 n_classes=1000, num_G_SVs=1, num_G_SV_itrs=1, G_shared=True, shared_dim=0, hier=False,
                 cross_replica=False, mybn=False, G_activation=None, G_lr=5e-5, G_B1=0.0, G_B2=0.999,
                 adam_eps=1e-8, BN_eps=1e-5, SN_eps=1e-12, G_mixed_precision=False, G_fp16=False, G_init="ortho",
                 skip_init=False, no_optim=False, G_param="SN", norm_style="bn", *, mask=None, mask_options=None,
                 ppres=False) -> None:
        super().__init__()
        activation = nn.ReLU(inplace=False) if G_activation is None else G_activation
        _check_options(resolution, G_attn, "G_attn", activation, G_kernel_size, "G_kernel_size", G_init, "G_init")
        _unsupported(cross_replica=cross_replica, mybn=mybn)
        if norm_style != "bn":
            raise ValueError(f"norm_style must be 'bn', got {norm_style!r}")
        if G_param not in ("SN", "None"):
            raise ValueError(f"G_param must be 'SN' (spectral norm) or 'None', got {G_param!r}")
        if mask is not None and mask not in MASK_KINDS:
            raise ValueError(f"mask must be None or one of {tuple(MASK_KINDS)}, got {mask!r}")
        if mask_options is not None and not (mask is not None and isinstance(mask_options, dict)):
            raise ValueError(f"mask_options must be None or, with a mask, a dict of keywords of the mask's class, "
                             f"got {mask_options!r} with mask={mask!r}")
        if hier and not G_shared:
            raise ValueError("hier=True needs G_shared=True: the z chunks are concatenated to the shared embedding")
        for name, value in (("G_ch", G_ch), ("dim_z", dim_z), ("bottom_width", bottom_width),
                            ("n_classes", n_classes)):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        in_widths, out_widths = ([G_ch * m for m in widths] for widths in G_WIDTHS[resolution])
        self.ch, self.resolution, self.bottom_width, self.n_classes = G_ch, resolution, bottom_width, n_classes
        self.G_shared, self.hier = G_shared, hier
        self.shared_dim = shared_dim if shared_dim > 0 else dim_z
        self.num_slots = len(in_widths) + 1 if hier else 1
        self.z_chunk_size = dim_z // self.num_slots if hier else 0
        if hier and self.z_chunk_size == 0:
            raise ValueError(f"dim_z must be at least {self.num_slots} with hier (one z chunk per block and one "
                             f"for the linear map), got {dim_z}")
        self.dim_z = self.z_chunk_size * self.num_slots if hier else dim_z
        self.activation = activation

        if G_param == "SN":
            conv, linear = _sn_layers(num_G_SVs, num_G_SV_itrs, SN_eps)
        else:
            conv, linear = functools.partial(MaskedConv2d, kernel_size=3, padding=1), nn.Linear
        # Conditions of the CBNs: the shared embedding (and a z chunk), or class ids into their
        # own embeddings; G's embeddings have no spectral norm, as in the reference.
        if G_shared:
            norm = functools.partial(ClassConditionalBatchNorm, cond_size=self.shared_dim + self.z_chunk_size,
                                     linear=functools.partial(linear, bias=False), eps=BN_eps)
            self.shared = nn.Embedding(n_classes, self.shared_dim)
        else:
            norm = functools.partial(ClassConditionalBatchNorm, cond_size=n_classes, linear=nn.Embedding, eps=BN_eps)
            self.shared = nn.Identity()
        self.linear = linear(self.dim_z // self.num_slots, in_widths[0] * bottom_width ** 2)
        new_mask = functools.partial(make_mask, mask, **(mask_options or {})) if mask is not None else None
        attention = {int(r) for r in G_attn.split("_")}
        blocks = []
        for index, (cin, cout) in enumerate(zip(in_widths, out_widths)):
            block = [GBlock(cin, cout, conv, norm, new_mask, ppres)]
            if 8 * 2 ** index in attention:  # the block's output resolution, as the reference's table
                block.append(Attention(cout, conv))
            blocks.append(nn.ModuleList(block))
        self.blocks = nn.ModuleList(blocks)
        self.output_layer = nn.Sequential(BatchNorm(out_widths[-1]), activation, conv(out_widths[-1], 3))
        if not skip_init:
            _init_weights(self, G_init)
            for blocklist in self.blocks if ppres else ():
                blocklist[0].reset_transition_()

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, fx.Proxy):  # torch.fx tracing (export) passes proxies without shapes
            self._check_inputs(z, y)
            if self.G_shared and not y.is_floating_point():  # class ids: embedded here
                y = self.shared(y)
        if self.hier:
            zs = torch.split(z, self.z_chunk_size, 1)
            z = zs[0]
            ys = [torch.cat([y, zs[i]], 1) for i in range(1, self.num_slots)]
        else:
            ys = [y] * len(self.blocks)
        h = self.linear(z).view(z.shape[0], -1, self.bottom_width, self.bottom_width)
        for blocklist, y_block in zip(self.blocks, ys):
            for block in blocklist:
                h = block(h, y_block)
        return torch.tanh(self.output_layer(h))

    def exportable(self) -> nn.Module:
        """exportable(G): the eval-mode copy of torch and gansparse layers that
        gansparse.export.compact(G) traces in G's place."""
        return exportable(self)

    def example_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [1, dim_z], y) of class 0 for tracing, e.g. by gansparse.export.compact; y as forward
        takes it once traced: G.shared(class ids) with G_shared, else the class ids."""
        weight = self.linear.weight
        z = torch.randn(1, self.dim_z, dtype=weight.dtype, device=weight.device)
        ids = torch.zeros(1, dtype=torch.int64, device=weight.device)
        with torch.no_grad():
            return z, self.shared(ids).to(weight.dtype) if self.G_shared else ids

    def _check_inputs(self, z, y) -> None:
        if not (isinstance(z, torch.Tensor) and z.dim() == 2 and z.shape[1] == self.dim_z and z.is_floating_point()):
            raise ValueError(f"z must be a floating-point tensor [N, dim_z={self.dim_z}], got "
                             f"{getattr(z, 'shape', type(z).__name__)}")
        if self.G_shared and isinstance(y, torch.Tensor) and not y.is_floating_point():
            _check_class_ids(y, "y", self.n_classes)
        elif self.G_shared:
            if not (isinstance(y, torch.Tensor) and y.dim() == 2 and y.shape[1] == self.shared_dim
                    and y.is_floating_point()):
                raise ValueError(f"y must be G.shared(class ids), a floating-point tensor [N, shared_dim="
                                 f"{self.shared_dim}], or the class ids [N], got "
                                 f"{getattr(y, 'dtype', type(y).__name__)} of shape {tuple(getattr(y, 'shape', ()))}")
        else:
            _check_class_ids(y, "y", self.n_classes)
        if y.shape[0] != z.shape[0]:
            raise ValueError(f"y has {y.shape[0]} samples but z has {z.shape[0]}")


# --- the discriminator ------------------------------------------------------------------------


class Discriminator(nn.Module):
    """BigGAN-PyTorch's Discriminator: D blocks (the first without preactivation), self-attention
    after the blocks at the resolutions in D_attn, a ReLU and sum pooling to h [N, C], then the
    projection out = linear(h) + <embed(y), h>, all with spectral norm.

    Keywords and defaults are the reference's. forward(x, y): images x [N, 3, resolution,
    resolution], class ids y [N]; returns [N, output_dim]. Accepted and ignored: D_lr, D_B1, D_B2,
    adam_eps, D_mixed_precision, D_fp16. Unknown keywords raise.
    """

    def __init__(self, D_ch=64, D_wide=True, resolution=128, D_kernel_size=3, D_attn="64", n_classes=1000,
                 num_D_SVs=1, num_D_SV_itrs=1, D_activation=None, D_lr=2e-4, D_B1=0.0, D_B2=0.999, adam_eps=1e-8,
                 SN_eps=1e-12, output_dim=1, D_mixed_precision=False, D_fp16=False, D_init="ortho", skip_init=False,
                 D_param="SN") -> None:
        super().__init__()
        activation = nn.ReLU(inplace=False) if D_activation is None else D_activation
        _check_options(resolution, D_attn, "D_attn", activation, D_kernel_size, "D_kernel_size", D_init, "D_init")
        if D_param != "SN":
            raise ValueError(f"D_param must be 'SN' (the reference's D always has spectral norm), got {D_param!r}")
        for name, value in (("D_ch", D_ch), ("n_classes", n_classes), ("output_dim", output_dim)):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        in_widths, out_widths, downsample = D_WIDTHS[resolution]
        in_widths, out_widths = [3] + [D_ch * m for m in in_widths], [D_ch * m for m in out_widths]
        # Output resolution of each block, as the reference's table: every block halves the
        # resolution but the last; at 32 the table says 16 for all four.
        halvings = [resolution >> (i + 1) for i in range(len(out_widths) - 1)]
        resolutions = [16] * 4 if resolution == 32 else halvings + [4]
        self.ch, self.resolution, self.n_classes = D_ch, resolution, n_classes
        self.activation = activation
        conv, linear = _sn_layers(num_D_SVs, num_D_SV_itrs, SN_eps)
        attention = {int(r) for r in D_attn.split("_")}
        blocks = []
        for index, (cin, cout) in enumerate(zip(in_widths, out_widths)):
            block = [DBlock(cin, cout, conv, D_wide, preactivation=index > 0, downsample=downsample[index])]
            if resolutions[index] in attention:
                block.append(Attention(cout, conv))
            blocks.append(nn.ModuleList(block))
        self.blocks = nn.ModuleList(blocks)
        self.linear = linear(out_widths[-1], output_dim)
        self.embed = SNEmbedding(n_classes, out_widths[-1], num_svs=num_D_SVs, num_itrs=num_D_SV_itrs, eps=SN_eps)
        if not skip_init:
            _init_weights(self, D_init)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, fx.Proxy):  # torch.fx tracing (export) passes proxies without shapes
            self._check_inputs(x, y)
        h = x
        for blocklist in self.blocks:
            for block in blocklist:
                h = block(h)
        h = torch.sum(self.activation(h), [2, 3])  # [N, C]
        return self.linear(h) + torch.sum(self.embed(y) * h, 1, keepdim=True)

    def example_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [1, 3, resolution, resolution], class ids [1] of class 0) for tracing."""
        weight = self.linear.weight
        x = torch.randn(1, 3, self.resolution, self.resolution, dtype=weight.dtype, device=weight.device)
        return x, torch.zeros(1, dtype=torch.int64, device=weight.device)

    def _check_inputs(self, x, y) -> None:
        side = self.resolution
        if not (isinstance(x, torch.Tensor) and x.dim() == 4 and tuple(x.shape[1:]) == (3, side, side)):
            raise ValueError(f"x must be images [N, 3, {side}, {side}], got {getattr(x, 'shape', type(x).__name__)}")
        _check_class_ids(y, "y", self.n_classes)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y has {y.shape[0]} samples but x has {x.shape[0]}")


# --- inference and export -------------------------------------------------------------------


class _NormThenMask(nn.Module):
    """A ClassConditionalBatchNorm as gansparse layers: `norm` (a gansparse
    ConditionalBatchNorm2d) then `mask` (a ChannelMask, or None), called as the original."""

    def __init__(self, norm: ConditionalBatchNorm2d, mask: ChannelMask | None) -> None:
        super().__init__()
        self.norm, self.mask = norm, mask

    def forward(self, x: torch.Tensor, y: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        h = self.norm(x, y)
        h = self.mask(h) if self.mask is not None else h
        return F.relu(h) if activation == "relu" else h


@torch.no_grad()
def _as_gansparse_norm(norm: ClassConditionalBatchNorm | BatchNorm) -> nn.Module:
    """The same norm, statistics and mask as gansparse / torch layers."""
    mask = norm.mask
    if isinstance(norm, BatchNorm):
        plain = (nn.BatchNorm2d(norm.num_features, norm.eps, norm.momentum) if mask is None
                 else MaskedBatchNorm2d(norm.num_features, mask=mask, eps=norm.eps, momentum=norm.momentum))
        plain.weight.copy_(norm.gain)
        plain.bias.copy_(norm.bias)
    elif isinstance(norm.gain, nn.Embedding):
        # gansparse's embedding gains are the gains themselves: BigGAN's 1 + gain(y), precomputed.
        plain = ConditionalBatchNorm2d(norm.num_features, num_classes=norm.cond_size, eps=norm.eps,
                                       momentum=norm.momentum)
        plain.gain.weight.copy_(1 + norm.gain.weight)
        plain.bias = norm.bias
    else:  # gansparse's linear gains are 1 + gain(y) too: the (spectral-norm folded) maps as they are
        plain = ConditionalBatchNorm2d(norm.num_features, cond_dim=norm.cond_size, eps=norm.eps,
                                       momentum=norm.momentum, linear=functools.partial(nn.Linear, device="meta"))
        plain.gain, plain.bias = norm.gain, norm.bias
    plain.running_mean.copy_(norm.stored_mean)
    plain.running_var.copy_(norm.stored_var)
    plain.to(norm.stored_mean)  # the device and dtype of the model
    if isinstance(norm, BatchNorm):
        return plain.eval()
    return _NormThenMask(plain, ChannelMask(norm.num_features, mask=mask) if mask is not None else None).eval()


def exportable(model: nn.Module) -> nn.Module:
    """A copy of `model` (a Generator, Discriminator or any module holding their layers) in eval
    mode, built from torch and gansparse layers only, for inference and gansparse.export.compact:
    spectral norms folded (fold_spectral_norm), each ClassConditionalBatchNorm a gansparse
    ConditionalBatchNorm2d followed by its mask as a ChannelMask, each BatchNorm an nn.BatchNorm2d
    (a MaskedBatchNorm2d when masked), with the same parameters, statistics and masks. It computes
    what `model` computes in eval mode.

        compact = gansparse.export.compact(exportable(G), z, G.shared(y))
    """
    model = fold_spectral_norm(copy.deepcopy(model).eval())
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (ClassConditionalBatchNorm, BatchNorm)):
                setattr(parent, name, _as_gansparse_norm(child))
    return model
