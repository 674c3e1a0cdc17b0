"""gansparse.profile: the published MACs at full size (on 'meta', nothing computed), agreement with
torchprofile on the same models, the transposed-conv sides, functional ops, shared parameters and
the effective MACs of masked models."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchprofile import profile_macs

from _reference_gan_compression import random_hard_masks_
from _reference_nets import randomise_
from gansparse import ConditionalBatchNorm2d, MaskedConv2d, MaskedConvNormAct, export, profile, profile_table
from gansparse.masks import HardMask, named_masks
from gansparse.models import NLayerDiscriminator, ResnetGenerator, UnetGenerator
from gansparse.models.norms import ChannelMask

FULL_SIZE = {
    "resnet_9blocks": (lambda: ResnetGenerator(3, 3, 64, "instance", n_blocks=9), 11_378_179, 56_799_264_768),
    "unet_256": (lambda: UnetGenerator(3, 3, 8, 64, "batch"), 54_413_955, 18_143_334_400),
    "basic_D": (lambda: NLayerDiscriminator(3, 64, 3, "batch"), 2_765_633, 3_148_087_808),
}


@pytest.mark.parametrize("name", FULL_SIZE)
def test_published_params_and_macs_at_256(name):
    make, params, macs = FULL_SIZE[name]
    with torch.device("meta"):
        stats = profile(make(), torch.zeros(1, 3, 256, 256))
    assert stats["params"] == params
    assert stats["macs"] == macs  # 56.80 G, 18.14 G, 3.15 G
    assert round(macs / 1e9, 2) == {"resnet_9blocks": 56.80, "unet_256": 18.14, "basic_D": 3.15}[name]
    assert stats["macs_effective"] == macs  # no masks
    assert sum(row["params"] for row in stats["layers"]) == params


def _torchprofile(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notes on the ops it skips (padding, in-place leaky_relu)
        return profile_macs(model, x)


# Traced by torchprofile, so small: full width at 64x64; unet_256 needs 256x256, so at ngf 16.
@pytest.mark.parametrize("make, side", [
    (lambda: ResnetGenerator(3, 3, 64, "instance", n_blocks=9), 64),
    (lambda: UnetGenerator(3, 3, 8, 16, "batch"), 256),
    (lambda: NLayerDiscriminator(3, 64, 3, "batch"), 64),
], ids=["resnet_9blocks", "unet_256", "basic_D"])
def test_agrees_with_torchprofile(make, side):
    model = make().eval()
    x = torch.zeros(1, 3, side, side)
    assert profile(model, x)["macs"] == _torchprofile(model, x)


def test_transposed_convolutions_count_either_side():
    conv = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
    stats = profile(conv, torch.zeros(2, 8, 5, 5))
    output_side, input_side = 2 * 4 * 10 * 10 * 8 * 9, 2 * 8 * 5 * 5 * 4 * 9
    assert (stats["macs"], stats["macs_transposed_input_side"]) == (output_side, input_side)
    assert profile(conv, torch.zeros(2, 8, 5, 5), transposed="input")["macs"] == input_side
    # The ResNet generator's upsampling convs: 7.25 G fewer multiplications than the published figure.
    with torch.device("meta"):
        stats = profile(ResnetGenerator(3, 3, 64, "instance", n_blocks=9), torch.zeros(1, 3, 256, 256))
    assert stats["macs_transposed_input_side"] == 49_551_507_456


class SelfAttention(nn.Module):
    """SA-GAN style attention: functional matmuls and a scalar gate, no leaf module for them."""

    def __init__(self, c):
        super().__init__()
        self.query, self.key, self.value = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c, c // 2, 1), nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.zeros(()))
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = self.query(x).flatten(2), self.key(x).flatten(2), self.value(x).flatten(2)
        attention = torch.softmax(torch.bmm(q.transpose(1, 2), k), -1)
        x = x + self.gamma * torch.bmm(v, attention.transpose(1, 2)).view(n, c, h, w)
        x = F.avg_pool2d(F.group_norm(x, 2), 2)
        return self.head(x.mean((2, 3)))


def test_functional_ops_count_as_torchprofile_counts_them():
    model, x = SelfAttention(8).eval(), torch.randn(2, 8, 6, 6)
    stats = profile(model, x)
    assert stats["macs"] == _torchprofile(model, x)
    # The matmuls and the gate are attributed to the module that ran them.
    assert [row["name"] for row in stats["layers"]] == ["query", "key", "value", "(model)", "head"]


def test_shared_parameters_count_once():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    stats = profile(model, torch.zeros(1, 4, 8, 8))
    assert stats["params"] == 4 * 4 * 9 + 4
    assert stats["macs"] == 2 * 64 * 4 * 4 * 9


def test_fused_layers_count_as_their_unfused_equivalent():
    fused = MaskedConvNormAct(4, 6, 3, padding=1, norm="batch", activation="relu", mask="hard")
    plain = nn.Sequential(fused.conv, fused.norm, nn.ReLU())
    x = torch.randn(2, 4, 8, 8)
    assert profile(fused, x)["macs"] == profile(plain, x)["macs"] == 2 * 6 * 64 * (4 * 9 + 1)


def test_effective_macs_count_the_channels_masks_keep():
    g = ResnetGenerator(3, 3, 8, "instance", n_blocks=1, mask="hard")
    keep_half = torch.tensor([1, 0] * 4, dtype=torch.bool)
    g.model[2].mask = HardMask(8, keep_half)  # the first conv keeps 4 of its 8 output channels
    stats = profile(g, torch.zeros(1, 3, 32, 32))
    rows = {row["name"]: row for row in stats["layers"]}
    assert rows["model.1"]["macs_effective"] == rows["model.1"]["macs"] // 2  # its own outputs
    assert rows["model.4"]["macs_effective"] == rows["model.4"]["macs"] // 2  # the next conv's inputs
    assert rows["model.7"]["macs_effective"] == rows["model.7"]["macs"]
    assert stats["macs_effective"] == sum(row["macs_effective"] for row in stats["layers"]) < stats["macs"]
    # Masks on 'meta' have no values to read.
    on_meta = ResnetGenerator(3, 3, 8, mask="dmad").to("meta")
    assert profile(on_meta, torch.zeros(1, 3, 32, 32, device="meta"))["macs_effective"] is None


def _zoo_generator(name: str, mask: str):
    """(masked generator, inputs), small."""
    from gansparse.models import MobileResnetGenerator, biggan, dcgan, sngan

    image = (torch.randn(1, 3, 32, 32),)
    if name.startswith("resnet"):
        return ResnetGenerator(3, 3, 8, name.removeprefix("resnet_"), n_blocks=3, mask=mask), image
    if name == "unet":
        return UnetGenerator(3, 3, 5, 8, "batch", mask=mask), image
    if name == "mobile_resnet":
        return MobileResnetGenerator(3, 3, 8, n_blocks=3, mask=mask), image
    if name == "sngan":
        return sngan.Generator(16, 16, mask=mask), (torch.randn(2, 16),)
    if name == "dcgan":
        return dcgan.Generator(16, 4, mask=mask), (torch.randn(2, 16, 1, 1),)
    g = biggan.Generator(G_ch=8, dim_z=16, shared_dim=8, resolution=32, G_attn="16", n_classes=5, hier=True,
                         mask=mask)
    return g, (torch.randn(2, 16), g.shared(torch.tensor([1, 3])).detach())


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
@pytest.mark.parametrize("mask", ["hard", "sigmoid"])
@pytest.mark.parametrize("name", ["resnet_batch", "resnet_instance", "resnet_none", "unet", "mobile_resnet", "sngan",
                                  "dcgan", "biggan"])
def test_effective_macs_are_those_of_the_compact_model(name, mask, sparsity):
    """Residual streams (a channel goes when every block masks it), skip concatenations, depthwise
    convs, constants folded, soft masks folded into weights or affines: macs_effective is what the
    compact model export gives counts. (StyleGAN2: layer by layer, see its tests.)"""
    model, inputs = _zoo_generator(name, mask)
    generator = torch.Generator().manual_seed(int(sparsity * 10))
    if name != "biggan":  # (randomise_ knows running_var, not BigGAN's stored_var)
        randomise_(model)
    if mask == "hard":
        random_hard_masks_(model, sparsity, generator)
    else:  # soft masks: the kept channels at values in (0, 1)
        for _, soft in named_masks(model):
            with torch.no_grad():
                soft.logits.copy_(torch.randn(soft.channels, generator=generator) - sparsity)
    if name == "biggan":  # as export takes it: spectral norms folded, the norms' masks alone
        from gansparse.models import biggan
        model = biggan.exportable(model)
    stats = profile(model, *inputs)
    compact = export.compact(model, *inputs)
    assert stats["macs_effective"] == profile(compact, *inputs)["macs"] < stats["macs"]
    assert stats["macs_effective"] == sum(row["macs_effective"] for row in stats["layers"])


def test_effective_macs_through_a_masked_depthwise_conv():
    """conv -> masked depthwise conv -> ReLU -> 1x1 conv: a channel the depthwise conv's mask
    zeroes goes from all three convs."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), MaskedConv2d(8, 8, 3, padding=1, groups=8),
                          nn.ReLU(), nn.Conv2d(8, 4, 1))
    model[1].mask = HardMask(8, torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 1]))
    x = torch.randn(2, 3, 8, 8)
    rows = profile(model, x)["layers"]
    assert [row["macs_effective"] / row["macs"] for row in rows] == [5 / 8, 5 / 8, 5 / 8]
    assert sum(row["macs_effective"] for row in rows) == profile(export.compact(model, x), x)["macs"]


class _MaskBeforeConditionalNorm(nn.Module):
    """masked conv -> class-conditional batch norm -> 1x1 conv: a masked channel becomes, after the
    norm, one value per sample, which the 1x1 conv cannot fold into its bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = MaskedConv2d(3, 6, 3, padding=1, mask=HardMask(6, torch.tensor([1.0, 0, 1, 0, 1, 1])))
        self.norm = ConditionalBatchNorm2d(6, num_classes=3)
        self.out = nn.Conv2d(6, 2, 1)
        with torch.no_grad():
            self.norm.running_mean.normal_()
            self.norm.bias.weight.normal_()

    def forward(self, x, y):
        return self.out(self.norm(self.conv(x), y))


def test_effective_macs_keep_channels_a_conditional_norm_makes_per_sample():
    model, x, y = _MaskBeforeConditionalNorm().eval(), torch.randn(1, 3, 8, 8), torch.tensor([1])
    stats = profile(model, x, y)  # batch 1: the values alone cannot tell a per-sample constant
    assert stats["macs_effective"] == stats["macs"] == profile(export.compact(model, x, y), x, y)["macs"]


class _SoftMaskAlone(nn.Module):
    """conv -> soft mask -> ReLU -> 1x1 conv; with `second_reader`, the conv's output read again."""

    def __init__(self, second_reader: bool) -> None:
        super().__init__()
        self.conv, self.out, self.second_reader = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1), second_reader
        self.mask = ChannelMask(8, mask="sigmoid")
        with torch.no_grad():
            self.mask.mask.logits.copy_(torch.linspace(-1, 1, 8))  # 4 channels kept at values in (0.5, 1)

    def forward(self, x):
        h = self.conv(x)
        out = self.out(torch.relu(self.mask(h)))
        return out + h.mean(1, keepdim=True) if self.second_reader else out


@pytest.mark.parametrize("second_reader", [False, True])
def test_effective_macs_of_a_soft_mask_alone(second_reader):
    """Export folds the mask's values into the conv before it, unless another layer reads that
    conv's output (here all its channels, so they all stay): then the mask stays, a per-channel
    scale, one MAC per kept element."""
    model, x = _SoftMaskAlone(second_reader).eval(), torch.randn(2, 3, 8, 8)
    rows = {row["name"]: row for row in profile(model, x)["layers"]}
    assert rows["mask"]["macs"] == 0 and rows["mask"]["macs_effective"] == (2 * 8 * 64 if second_reader else 0)
    assert sum(row["macs_effective"] for row in rows.values()) == profile(export.compact(model, x), x)["macs"]


def test_profile_table_lists_every_layer_and_the_total():
    stats = profile(NLayerDiscriminator(3, 8), torch.zeros(1, 3, 64, 64))
    table = profile_table(stats).splitlines()
    assert len(table) == len(stats["layers"]) + 2
    assert table[1].split()[:4] == ["model.0", "MaskedConv2d", "1x3x64x64", "1x8x32x32"]
    assert table[-1].split()[:2] == ["total", f"{stats['params']:,}"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="transposed must be one of"):
        profile(nn.Conv2d(1, 1, 1), torch.zeros(1, 1, 2, 2), transposed="both")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        profile(lambda x: x, torch.zeros(1))
