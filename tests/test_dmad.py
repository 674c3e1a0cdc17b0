"""DMAD (`--method dmad`): its pieces against the paper's formulas on hand-built examples, and
small end-to-end runs (search to a MACs target, compact export, fine-tuning, resume)."""
import copy

import pytest
import torch

from gansparse.masks import DMADMask, binarize_masks_, dmad_group_coefficients
from gansparse.models import NLayerDiscriminator, ResnetGenerator, UnetGenerator, residual_mask_groups
from train.distill import FeatureTaps, default_attention_layers, default_discriminator_layers
from train.methods.dmad import coattention_loss, compact_student, parse_macs


def test_residual_group_is_the_stream_feeder_and_each_blocks_last_mask():
    G = ResnetGenerator(3, 3, ngf=4, norm="instance", n_blocks=9, mask="dmad")
    (group,) = residual_mask_groups(G)
    names = {id(m): n for n, m in G.named_modules()}
    # The reference layout's model.11 and model.13..21.conv_block.8 of the official code.
    assert [names[id(m)] for m in group] == ["model.8.mask"] + [f"model.{i}.conv_block.6.mask" for i in range(10, 19)]
    assert residual_mask_groups(ResnetGenerator(3, 3, ngf=4, n_blocks=2)) == []  # no masks
    assert residual_mask_groups(UnetGenerator(3, 3, 5, ngf=4, mask="dmad")) == []


def test_group_coefficients_on_a_hand_built_group():
    # Three blocks, four channels; channel t is zero in (0, 1, 2, 3) of the masks.
    group = [DMADMask(4, bound=0.0) for _ in range(3)]
    with torch.no_grad():
        group[0].p.copy_(torch.tensor([1.0, -1.0, -1.0, -1.0]))
        group[1].p.copy_(torch.tensor([1.0, 1.0, -1.0, -1.0]))
        group[2].p.copy_(torch.tensor([1.0, 1.0, 1.0, -1.0]))
    # lambda_GSPA_t = lambda * s / ||g_t||_0: s = 3 masks, non-zero counts 3, 2, 1, 0.
    expected = torch.tensor([0.1 * 3 / 3, 0.1 * 3 / 2, 0.1 * 3 / 1, 0.0])
    torch.testing.assert_close(dmad_group_coefficients(group, 0.1), expected)


def test_default_layers_are_the_papers():
    G9 = ResnetGenerator(3, 3, ngf=4, norm="instance", n_blocks=9)
    assert default_attention_layers(G9) == ["model.9", "model.12", "model.15", "model.18"]
    assert default_attention_layers(ResnetGenerator(3, 3, ngf=4, n_blocks=3)) == [
        "model.9", "model.10", "model.11", "model.12"]
    U = UnetGenerator(3, 3, 8, ngf=4)  # unet_256: 16 convolutions
    convs = [n for n, m in U.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    assert default_attention_layers(U) == [convs[1], convs[3], convs[11], convs[13]]
    assert default_discriminator_layers(NLayerDiscriminator(3, 4, n_layers=3)) == (["model.4", "model.10"],
                                                                                 "model.10")


def test_feature_taps_keep_the_first_forward_since_reset():
    G = ResnetGenerator(3, 3, ngf=4, norm="instance", n_blocks=3)
    taps = FeatureTaps(G, ["model.9", ""])
    x, y = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    taps.reset()
    out = G(x)
    G(y)
    feature, kept = taps.outputs()
    assert torch.equal(kept, out)
    assert feature.shape == (1, 16, 4, 4)
    taps.reset()
    with pytest.raises(RuntimeError, match="no output recorded"):
        taps.outputs()
    with pytest.raises(ValueError, match="no module named"):
        FeatureTaps(G, ["model.99"])


def test_coattention_target_on_a_hand_built_example():
    # One layer: student and teacher G maps at 2x2, two teacher D maps at 2x2 and 4x4.
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).sqrt().view(1, 1, 2, 2)  # A_S = s^2
    g = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).sqrt().view(1, 1, 2, 2)
    d1 = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).sqrt().view(1, 1, 2, 2)
    d2 = torch.zeros(1, 1, 4, 4)
    d2[..., :2, :2] = 4.0 ** 0.5  # its area average to 2x2 is 4 at the top-left pixel only
    a_t = 0.5 * torch.tensor([1.0, 1.0, 0.0, 0.0]) + 0.25 * torch.tensor([0.0, 0.0, 1.0, 1.0]) \
        + 0.25 * torch.tensor([4.0, 0.0, 0.0, 0.0])
    a_s = torch.tensor([1.0, 0.0, 0.0, 1.0])
    expected = ((a_s / a_s.norm() - a_t / a_t.norm()) ** 2).sum()
    torch.testing.assert_close(coattention_loss([s], [g], [d1, d2], "sum"), expected)
    torch.testing.assert_close(coattention_loss([s], [g], [d1, d2], "mean"), expected / 4)


def test_parse_macs():
    assert parse_macs("", 1000) is None
    assert parse_macs("25%", 1000) == 250
    assert parse_macs("2.5G", 1) == 2_500_000_000
    assert parse_macs("400m", 1) == 400_000_000
    for bad in ("-1G", "abc", "0"):
        with pytest.raises(ValueError, match="target_macs"):
            parse_macs(bad, 1000)


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_compact_student_matches_the_binarised_masked_student(norm):
    torch.manual_seed(1)
    G = ResnetGenerator(3, 3, ngf=8, norm=norm, n_blocks=3, mask="dmad").eval()
    with torch.no_grad():
        for _, m in G.named_modules():
            if isinstance(m, DMADMask):
                m.p.copy_(torch.randn(m.channels))
    compact = compact_student(G, torch.randn(1, 3, 32, 32)).eval()
    binary = binarize_masks_(copy.deepcopy(G))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), binary(x), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in G.parameters())
    assert not any(m.frozen for m in G.modules() if isinstance(m, DMADMask))  # the student is untouched
