"""SRGAN's networks (models/srgan.py) against an independent re-implementation of BasicSR's
MSRResNet and VGGStyleDiscriminator written here with plain torch.nn from the architecture
description: the same state_dict keys, the same outputs with the same weights, the same parameter
counts at full size; masks, the compact export and the sparse conversion."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gansparse
from _reference_gan_compression import random_hard_masks_
from _reference_nets import randomise_
from gansparse import export
from gansparse.masks import named_masks
from gansparse.models import load_reference_state_dict, srgan
from gansparse.sparse import SPARSE_LAYERS, convert


class ReferenceBlock(nn.Module):
    def __init__(self, nf):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1), nn.Conv2d(nf, nf, 3, 1, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


class ReferenceMSRResNet(nn.Module):
    def __init__(self, nf=64, nb=16, upscale=4):
        super().__init__()
        self.upscale = upscale
        self.conv_first = nn.Conv2d(3, nf, 3, 1, 1)
        self.body = nn.Sequential(*[ReferenceBlock(nf) for _ in range(nb)])
        if upscale == 4:
            self.upconv1, self.upconv2 = nn.Conv2d(nf, nf * 4, 3, 1, 1), nn.Conv2d(nf, nf * 4, 3, 1, 1)
        else:
            self.upconv1 = nn.Conv2d(nf, nf * upscale * upscale, 3, 1, 1)
        self.conv_hr, self.conv_last = nn.Conv2d(nf, nf, 3, 1, 1), nn.Conv2d(nf, 3, 3, 1, 1)

    def forward(self, x):
        act = lambda t: F.leaky_relu(t, 0.1)  # noqa: E731
        out = self.body(act(self.conv_first(x)))
        if self.upscale == 4:
            out = act(F.pixel_shuffle(self.upconv1(out), 2))
            out = act(F.pixel_shuffle(self.upconv2(out), 2))
        else:
            out = act(F.pixel_shuffle(self.upconv1(out), self.upscale))
        out = self.conv_last(act(self.conv_hr(out)))
        return out + F.interpolate(x, scale_factor=self.upscale, mode="bilinear", align_corners=False)


class ReferenceVGGStyleDiscriminator(nn.Module):
    """For 128x128 (five stride-2 stages) or 256x256 (six) inputs."""

    def __init__(self, nf=64, input_size=128):
        super().__init__()
        self.stages = 5 if input_size == 128 else 6
        widths = [nf, nf * 2, nf * 4, nf * 8, nf * 8, nf * 8][:self.stages]
        self.conv0_0 = nn.Conv2d(3, nf, 3, 1, 1, bias=True)
        self.conv0_1, self.bn0_1 = nn.Conv2d(nf, nf, 4, 2, 1, bias=False), nn.BatchNorm2d(nf)
        for i in range(1, self.stages):
            setattr(self, f"conv{i}_0", nn.Conv2d(widths[i - 1], widths[i], 3, 1, 1, bias=False))
            setattr(self, f"bn{i}_0", nn.BatchNorm2d(widths[i]))
            setattr(self, f"conv{i}_1", nn.Conv2d(widths[i], widths[i], 4, 2, 1, bias=False))
            setattr(self, f"bn{i}_1", nn.BatchNorm2d(widths[i]))
        self.linear1, self.linear2 = nn.Linear(nf * 8 * 16, 100), nn.Linear(100, 1)

    def forward(self, x):
        act = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
        feat = act(self.bn0_1(self.conv0_1(act(self.conv0_0(x)))))
        for i in range(1, self.stages):
            feat = act(getattr(self, f"bn{i}_0")(getattr(self, f"conv{i}_0")(feat)))
            feat = act(getattr(self, f"bn{i}_1")(getattr(self, f"conv{i}_1")(feat)))
        return self.linear2(act(self.linear1(feat.view(feat.size(0), -1))))


def _shapes(model):
    return {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("upscale", [2, 3, 4])
def test_generator_has_basicsr_keys_and_outputs(upscale):
    ref = randomise_(ReferenceMSRResNet(8, 2, upscale))
    ours = srgan.MSRResNet(num_feat=8, num_block=2, upscale=upscale)
    assert _shapes(ours) == _shapes(ref)
    ours.load_state_dict(ref.state_dict())  # strict: no remapping
    x = torch.rand(2, 3, 7, 5)  # odd sizes
    out = ours(x)
    assert out.shape == (2, 3, 7 * upscale, 5 * upscale)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=1e-6)


def test_signed_generator_computes_on_unit_range_images():
    ours = randomise_(srgan.MSRResNet(num_feat=8, num_block=1))
    signed = srgan.MSRResNet(num_feat=8, num_block=1, signed=True)
    signed.load_state_dict(ours.state_dict())
    x = torch.rand(1, 3, 6, 6) * 2 - 1
    torch.testing.assert_close(signed(x), ours((x + 1) / 2) * 2 - 1, rtol=0, atol=1e-6)


@pytest.mark.parametrize("input_size", [128, 256])
def test_discriminator_has_basicsr_keys_and_outputs(input_size):
    ref = randomise_(ReferenceVGGStyleDiscriminator(4, input_size)).eval()
    ours = srgan.VGGStyleDiscriminator(num_feat=4, input_size=input_size).eval()
    assert _shapes(ours) == _shapes(ref)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, input_size, input_size)
    out = ours(x)
    assert out.shape == (2, 1)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=1e-6)


def test_small_discriminators_end_on_a_4x4_map():
    d = srgan.VGGStyleDiscriminator(num_feat=4, input_size=32)
    assert [name for name, _ in d.named_children() if name.startswith("conv")] == [
        "conv0_0", "conv0_1", "conv1_0", "conv1_1", "conv2_0", "conv2_1"]
    assert d.linear1.in_features == 16 * 4 * 4
    assert d(torch.randn(3, 3, 32, 32)).shape == (3, 1)


@pytest.mark.parametrize("ours, ref", [(srgan.MSRResNet, ReferenceMSRResNet),
                                       (srgan.VGGStyleDiscriminator, ReferenceVGGStyleDiscriminator)], ids=["G", "D"])
def test_full_size_parameters_equal_basicsr(ours, ref):
    with torch.device("meta"):
        count = sum(p.numel() for p in ours().parameters())
        assert count == sum(p.numel() for p in ref().parameters())
    if ours is srgan.MSRResNet:
        assert count == 1_517_571  # BasicSR's MSRResNet x4, 64 features, 16 blocks


def test_masks_sit_inside_the_blocks_and_all_ones_masks_change_nothing():
    plain = randomise_(srgan.MSRResNet(num_feat=8, num_block=2))
    masked = srgan.MSRResNet(num_feat=8, num_block=2, mask="hard")
    assert [name for name, _ in named_masks(masked)] == ["body.0.mask.mask", "body.1.mask.mask", "mask_hr.mask"]
    result = load_reference_state_dict(masked, plain.state_dict())
    assert result.missing_keys and all(".mask." in key for key in result.missing_keys)
    x = torch.rand(2, 3, 6, 6)
    torch.testing.assert_close(masked(x), plain(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_export_removes_the_masked_channels_and_keeps_the_outputs(sparsity):
    masked = random_hard_masks_(randomise_(srgan.MSRResNet(num_feat=8, num_block=2, mask="hard")), sparsity,
                                torch.Generator().manual_seed(3)).eval()
    compact = export.compact(masked)  # the generator's own example_inputs()
    x = torch.rand(2, 3, 5, 7)
    assert export.check_equivalence(masked, compact, x) <= 1e-5
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in masked.parameters())


def test_export_runs_through_pixel_shuffle_and_keeps_its_channels():
    model = randomise_(srgan.MSRResNet(num_feat=8, num_block=1)).eval()
    compact = export.compact(model)
    assert export.check_equivalence(model, compact, torch.rand(1, 3, 6, 6)) <= 1e-5
    assert sum(p.numel() for p in compact.parameters()) == sum(p.numel() for p in model.parameters())


def test_sparse_conversion_and_sparsify_compute_the_pruned_generator():
    model = randomise_(srgan.MSRResNet(num_feat=8, num_block=2, signed=True))
    sparse = convert(copy.deepcopy(model))
    layers = {name: m for name, m in sparse.named_modules() if isinstance(m, SPARSE_LAYERS)}
    assert len(layers) == 9  # every conv
    with torch.no_grad():
        for name, layer in layers.items():
            layer.weight_mask.copy_(torch.rand_like(layer.weight_mask) > 0.5)
            model.get_submodule(name).weight.mul_(layer.weight_mask)  # the plain model, pruned
        x = torch.rand(2, 3, 6, 6) * 2 - 1
        expected = model(x)
        torch.testing.assert_close(sparse(x), expected, rtol=1e-5, atol=1e-5)
        fast = gansparse.sparsify(sparse, x[:1])
        torch.testing.assert_close(fast(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda: srgan.MSRResNet(upscale=8), r"upscale must be one of \(2, 3, 4\), got 8"),
    (lambda: srgan.MSRResNet(num_block=-1), r"num_block must be an int >= 0"),
    (lambda: srgan.MSRResNet(mask="bogus"), r"mask must be None or one of"),
    (lambda: srgan.MSRResNet(num_feat=4, num_block=0)(torch.rand(1, 1, 4, 4)), r"x must be a tensor \[N, 3, h, w\]"),
    (lambda: srgan.VGGStyleDiscriminator(input_size=96), r"input_size must be a power of two >= 8, got 96"),
    (lambda: srgan.VGGStyleDiscriminator(num_feat=2, input_size=16)(torch.rand(1, 3, 32, 32)),
     r"x must be a tensor \[N, 3, 16, 16\]"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
