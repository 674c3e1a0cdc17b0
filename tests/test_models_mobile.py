"""GAN Compression's MobileNet-style ResNet generator (models/mobile_resnet.py) against an
independent re-implementation of the reference layouts (tests/_reference_gan_compression.py):
the teacher and the sub-networks, same state_dict keys and shapes, same outputs; the published
parameter counts and MACs; MACs against torchprofile; masks."""
import warnings

import pytest
import torch
from torch import nn
from torchprofile import profile_macs

import _reference_gan_compression as reference
from _reference_gan_compression import random_hard_masks_
from _reference_nets import randomise_
from gansparse import export, profile
from gansparse.masks import named_masks
from gansparse.models import (
    MobileResnetGenerator,
    decode_config,
    encode_config,
    load_reference_state_dict,
    residual_mask_groups,
    sub_mobile_resnet_generator,
)

TEACHERS = [dict(ngf=8, norm=norm, n_blocks=n_blocks, padding_type=padding, dropout_rate=dropout)
            for norm, n_blocks, padding, dropout in (("instance", 3, "reflect", 0.0), ("batch", 4, "replicate", 0.5),
                                                     ("none", 2, "zero", 0.0), ("instance", 0, "reflect", 0.0))]


def _check_same_as_reference(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    randomise_(ref)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())  # strict: no remapping
    for train in (True, False):
        ref.train(train), ours.train(train)
        torch.manual_seed(1)  # dropout draws the same masks in both
        want = ref(x)
        torch.manual_seed(1)
        assert torch.equal(ours(x), want), f"train={train}"
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("kwargs", TEACHERS, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_teacher_matches_the_reference(kwargs):
    _check_same_as_reference(MobileResnetGenerator(3, 2, **kwargs), reference.MobileGenerator(3, 2, **kwargs),
                             torch.randn(2, 3, 24, 24))


@pytest.mark.parametrize("config_str, norm, n_blocks", [
    ("4_6_8_3_5_8_2_7", "batch", 5),
    ("8_4_2_2_8_1_3_5", "instance", 9),
    ("4_6_8_3_2_7", "none", 3),  # the legacy 6-entry form: one inner width for all blocks
])
def test_sub_networks_match_the_reference(config_str, norm, n_blocks):
    config = decode_config(config_str)
    channels = config["channels"]
    full = channels if len(channels) == 8 else channels[:4] + [channels[3]] * 2 + channels[4:]
    ours = sub_mobile_resnet_generator(3, 3, config, norm=norm, n_blocks=n_blocks)
    ref = reference.MobileGenerator(3, 3, norm=norm, n_blocks=n_blocks, config={"channels": full})
    # Twice the image range: the sub-networks clamp their input to [-1, 1].
    _check_same_as_reference(ours, ref, 2 * torch.randn(2, 3, 16, 20))


# --- published figures ---------------------------------------------------------------------


def test_teacher_params_and_macs_published():
    # GAN Compression, Table 4 ("only change resBlocks", ngf 64): 18.3G MACs, 1.98M parameters.
    with torch.device("meta"):
        stats = profile(MobileResnetGenerator(3, 3, 64, "instance", n_blocks=9), torch.zeros(1, 3, 256, 256))
    assert stats["params"] == 1_987_075 and int(stats["params"] / 1e4) / 100 == 1.98
    assert stats["macs"] == 18_314_428_416 and round(stats["macs"] / 1e9, 1) == 18.3


@pytest.mark.parametrize("config_str, params_m, macs_g", [
    ("16_16_32_16_32_32_16_16", 0.357, 2.55),  # CycleGAN horse->zebra
    ("32_32_48_32_48_48_16_16", 0.822, 4.99),  # pix2pix edges->shoes
], ids=["horse2zebra", "edges2shoes"])
def test_released_compressed_models_params_and_macs(config_str, params_m, macs_g):
    """The released compressed models (the README's 'Full Pipeline (Retrained)' rows, configs from
    its test scripts). Their MACs also count the affine-free instance norms, one per output
    element, as the torchprofile of their time did; ours (torchprofile 0.1.0's convention) does
    not, so those are added back to compare."""
    with torch.device("meta"):
        model = sub_mobile_resnet_generator(3, 3, decode_config(config_str))
        norm_elements = []
        for module in model.modules():
            if isinstance(module, nn.InstanceNorm2d):
                module.register_forward_hook(lambda m, args, out: norm_elements.append(out.numel()))
        stats = profile(model, torch.zeros(1, 3, 256, 256))
    assert round(stats["params"] / 1e6, 3) == params_m
    assert round((stats["macs"] + sum(norm_elements)) / 1e9, 2) == macs_g


def _torchprofile(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return profile_macs(model, x)


@pytest.mark.parametrize("make", [
    lambda: MobileResnetGenerator(3, 3, 64, "instance", n_blocks=9),
    lambda: sub_mobile_resnet_generator(3, 3, decode_config("16_16_32_16_32_32_16_16"), norm="batch"),
], ids=["mobile_resnet_9blocks", "sub-batch"])
def test_macs_agree_with_torchprofile(make):
    model = make().eval()
    x = torch.zeros(1, 3, 64, 64)
    assert profile(model, x)["macs"] == _torchprofile(model, x)


# --- masks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_masks_add_keys_only_and_all_ones_masks_change_nothing(norm):
    plain = randomise_(MobileResnetGenerator(3, 3, 4, norm, n_blocks=2)).eval()
    masked = MobileResnetGenerator(3, 3, 4, norm, n_blocks=2, mask="hard").eval()
    result = load_reference_state_dict(masked, plain.state_dict())
    assert result.missing_keys and all(".mask." in key for key in result.missing_keys)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(masked(x), plain(x), atol=1e-5, rtol=1e-5)


def test_masks_sit_after_every_norm_but_not_inside_the_separable_convs():
    g = MobileResnetGenerator(3, 3, 4, "instance", n_blocks=2, mask="dmad")
    # stem, 2 downsamplings, after both separable convs of each block, 2 upsamplings
    assert [name for name, _ in named_masks(g)] == [
        "model.2.mask", "model.5.mask", "model.8.mask",
        "model.10.conv_block.2.mask", "model.10.conv_block.7.mask",
        "model.11.conv_block.2.mask", "model.11.conv_block.7.mask",
        "model.13.mask", "model.16.mask"]


def test_the_residual_stream_masks_form_one_group():
    g = MobileResnetGenerator(3, 3, 4, "instance", n_blocks=2, mask="dmad")
    # the second downsampling's mask feeds the stream; each block's last norm adds into it
    assert residual_mask_groups(g) == [[g.model[8].mask, g.model[10].conv_block[7].mask,
                                        g.model[11].conv_block[7].mask]]


@pytest.mark.parametrize("make, sparsity", [
    (lambda: MobileResnetGenerator(3, 3, 8, "instance", n_blocks=3, mask="hard"), 0.3),
    (lambda: MobileResnetGenerator(3, 3, 8, "batch", n_blocks=3, padding_type="zero", mask="hard"), 0.7),
    (lambda: MobileResnetGenerator(3, 3, 8, "none", n_blocks=3, padding_type="replicate", mask="hard"), 0.5),
    (lambda: sub_mobile_resnet_generator(3, 3, decode_config("4_6_8_3_5_8_2_7"), "batch", n_blocks=4, mask="hard"),
     0.5),
], ids=["instance-reflect", "batch-zero", "none-replicate", "sub-batch"])
def test_export_removes_the_masked_channels_and_keeps_the_outputs(make, sparsity):
    masked = random_hard_masks_(randomise_(make()), sparsity, torch.Generator().manual_seed(3)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    compact = export.compact(masked, x)
    assert export.check_equivalence(masked, compact, x) <= 1e-5
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in masked.parameters())


# --- configs and bad input -----------------------------------------------------------------


def test_config_strings_round_trip():
    assert decode_config("16_16_32_16_32_32_16_16") == {"channels": [16, 16, 32, 16, 32, 32, 16, 16]}
    assert encode_config(decode_config("48_32_40_16_8_8_24_16")) == "48_32_40_16_8_8_24_16"


@pytest.mark.parametrize("call, message", [
    (lambda: MobileResnetGenerator(3, 3, 8, norm="layer"), "norm must be one of"),
    (lambda: MobileResnetGenerator(3, 3, 8, padding_type="circular"), "padding_type must be one of"),
    (lambda: MobileResnetGenerator(3, 3, 8, dropout_rate=1.5), "dropout_rate must be a number in"),
    (lambda: MobileResnetGenerator(3, 3, 0), "ngf must be a positive int"),
    (lambda: MobileResnetGenerator(3, 3, channels=[8] * 7), "channels must be a list of 8"),
    (lambda: MobileResnetGenerator(3, 3, channels=[8, 8, 0, 8, 8, 8, 8, 8]), "channels must hold positive ints"),
    (lambda: sub_mobile_resnet_generator(3, 3, [8] * 8), "config must be a dict with a 'channels' list"),
    (lambda: decode_config("16-16"), "config_str must be channel counts joined by '_'"),
])
def test_bad_options_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
