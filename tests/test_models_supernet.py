"""The once-for-all super network (models/supernet.py): under any configuration it computes what
the reference's super network computes (tests/_reference_gan_compression.super_forward, slicing the
same weights), its extracted sub-networks compute the same outputs standalone, its MACs are the
sub-network's, and its super layers slice exactly the first channels."""
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchprofile import profile_macs

import _reference_gan_compression as reference
from _reference_nets import randomise_
from gansparse import profile
from gansparse.models import MobileResnetGenerator, SuperMobileResnetGenerator, decode_config
from gansparse.models.supernet import CHANNEL_CONFIGS, SuperBatchNorm2d, SuperConv2d, SuperConvTranspose2d

NGF = 8
CONFIGS = ["8_8_8_8_8_8_8_8", "4_6_8_3_5_8_2_7", "1_2_3_4_5_6_7_8", "2_8_4_1_3_8"]  # the last in the legacy form


def _pair(norm: str, n_blocks: int = 4) -> tuple[SuperMobileResnetGenerator, reference.MobileGenerator]:
    """A super network with random weights, and the reference full-width network holding them."""
    net = randomise_(SuperMobileResnetGenerator(3, 2, NGF, norm, n_blocks=n_blocks))
    ref = reference.MobileGenerator(3, 2, norm=norm, n_blocks=n_blocks, config={"channels": [NGF] * 8})
    ref.load_state_dict(net.state_dict())
    return net, ref


def _eight(channels: list[int]) -> list[int]:
    return channels if len(channels) == 8 else channels[:4] + [channels[3]] * 2 + channels[4:]


def test_keys_are_those_of_the_full_width_sub_network():
    net = SuperMobileResnetGenerator(3, 2, NGF, "batch", n_blocks=4)
    sub = MobileResnetGenerator(3, 2, NGF, "batch", n_blocks=4)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in sub.state_dict().items()}


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
@pytest.mark.parametrize("config_str", CONFIGS)
def test_configured_outputs_match_the_reference_and_the_extracted_subnet(norm, config_str):
    net, ref = _pair(norm)
    config = decode_config(config_str)
    net.configure(config)
    assert net.config == config
    x = 2 * torch.randn(2, 3, 16, 12)  # beyond [-1, 1]: both clamp
    for train in (True, False):
        net.train(train), ref.train(train)
        y = net(x)
        assert torch.equal(y, reference.super_forward(ref, x, _eight(config["channels"]))), f"train={train}"
        sub = net.extract_subnet()
        assert isinstance(sub, MobileResnetGenerator) and sub.training == train
        # In training a batch norm normalises with the batch's statistics: the same in the sub-network.
        assert torch.equal(sub(x), y), f"train={train}"
    # Training updated the first channels' running statistics as the reference does.
    for key, value in ref.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key


def test_the_largest_config_is_the_full_width_sub_network():
    net = randomise_(SuperMobileResnetGenerator(3, 3, NGF, "instance", n_blocks=3)).eval()
    full = MobileResnetGenerator(3, 3, NGF, "instance", n_blocks=3, clamp_input=True).eval()
    full.load_state_dict(net.state_dict())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(net(x), full(x))


def test_extracted_weights_are_copies_of_the_first_channels():
    net = randomise_(SuperMobileResnetGenerator(3, 3, NGF, "batch", n_blocks=3))
    sub = net.extract_subnet(decode_config("4_6_8_3_5_8_2_7"))
    stem = sub.model[1].weight
    assert stem.shape == (4, 3, 7, 7) and torch.equal(stem, net.model[1].weight[:4])
    assert sub.model[10].conv_block[1].conv[2].weight.shape == (3 * 4, 8 * 4, 1, 1)  # block 1: inner 12, stream 32
    with torch.no_grad():
        stem.zero_()
    assert net.model[1].weight.abs().sum() > 0
    assert net.config == {"channels": [NGF] * 8}  # extracting another config does not reconfigure


def test_only_the_configured_channels_get_gradients():
    net = SuperMobileResnetGenerator(3, 3, NGF, "instance", n_blocks=3).configure(decode_config("4_6_8_3_5_8_2_7"))
    net(torch.rand(2, 3, 16, 16)).square().mean().backward()
    stem = net.model[1].weight.grad
    assert stem[:4].abs().sum() > 0 and torch.all(stem[4:] == 0)
    up1 = net.model[-9].weight.grad  # transposed [C_in, C_out, k, k]: 2 * 2 outputs
    assert up1[:, :4].abs().sum() > 0 and torch.all(up1[:, 4:] == 0)


def _torchprofile(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return profile_macs(model, x)


def test_macs_are_the_sub_network_macs_and_agree_with_torchprofile():
    net = SuperMobileResnetGenerator(3, 3, 32, search_space="channels-32").eval()
    net.configure(decode_config("16_16_32_16_32_32_16_16"))
    x = torch.zeros(1, 3, 32, 32)
    macs = profile(net, x)["macs"]
    assert macs == profile(net.extract_subnet(), x)["macs"] == _torchprofile(net, x)
    assert macs < profile(net.configure({"channels": [32] * 8}), x)["macs"]


# --- search space and configs ----------------------------------------------------------------


def test_search_spaces():
    assert SuperMobileResnetGenerator(3, 3, 64).search_space() == {"channels": [[64, 56, 48, 40, 32, 24, 16]] * 8}
    net = SuperMobileResnetGenerator(3, 3, 48, search_space="channels-48")
    space = net.search_space()["channels"]
    assert space == CHANNEL_CONFIGS["channels-48"] and space[6] == [48, 32, 24, 16]
    rng = random.Random(0)
    for _ in range(5):
        config = net.sample(rng)
        assert all(c in choices for c, choices in zip(config["channels"], space))
        net.configure(config)


@pytest.mark.parametrize("call, message", [
    (lambda net: net.configure({"channels": [NGF + 1] * 8}), "config entries must be at most ngf=8"),
    (lambda net: net.configure({"channels": [NGF] * 7}), "channels must be a list of 8"),
    (lambda net: net.configure([NGF] * 8), "config must be a dict with a 'channels' list"),
    (lambda net: net.extract_subnet({"channels": [0] * 8}), "channels must hold positive ints"),
    (lambda net: SuperMobileResnetGenerator(3, 3, 32, search_space="channels-48"),
     r"search_space must hold 8 non-empty lists of channel counts in \[1, ngf=32\]"),
    (lambda net: SuperMobileResnetGenerator(3, 3, 32, search_space="channels-16"), "search_space must be one of"),
    (lambda net: net(torch.zeros(1, 4, 8, 8)), "x has 4 channels; SuperConv2d runs 1 to 3"),
])
def test_bad_configs_and_inputs_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(SuperMobileResnetGenerator(3, 3, NGF, n_blocks=1))


# --- the super layers --------------------------------------------------------------------------


def test_super_convs_run_the_first_channels():
    conv = SuperConv2d(6, 5, 3, padding=1)
    conv.active_out_channels = 2
    x = torch.randn(2, 4, 7, 7)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight[:2, :4], conv.bias[:2], padding=1))
    depthwise = SuperConv2d(6, 6, 3, groups=6, bias=False)
    assert torch.equal(depthwise(x), F.conv2d(x, depthwise.weight[:4], groups=4))
    up = SuperConvTranspose2d(6, 5, 3, stride=2, padding=1, output_padding=1)
    up.active_out_channels = 3
    assert torch.equal(up(x), F.conv_transpose2d(x, up.weight[:4, :3], up.bias[:3], 2, 1, 1))
    with pytest.raises(ValueError, match="active_out_channels"):
        conv.active_out_channels = 6
        conv(x)
    with pytest.raises(ValueError, match="groups=1 or a depthwise conv"):
        SuperConv2d(6, 4, 3, groups=2)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_super_batch_norm_is_a_batch_norm_of_the_first_channels(momentum):
    full = randomise_(SuperBatchNorm2d(6, momentum=momentum))
    untouched = full.running_mean[4:].clone(), full.running_var[4:].clone()
    plain = nn.BatchNorm2d(4, momentum=momentum)
    plain.load_state_dict({k: v[:4] if v.dim() else v for k, v in full.state_dict().items()})
    x = torch.randn(3, 4, 5, 5)
    for train in (True, True, False):
        full.train(train), plain.train(train)
        assert torch.equal(full(x), plain(x))
    assert torch.equal(full.running_mean[:4], plain.running_mean)
    assert torch.equal(full.running_var[:4], plain.running_var)
    assert torch.equal(full.num_batches_tracked, plain.num_batches_tracked)
    assert torch.equal(full.running_mean[4:], untouched[0]) and torch.equal(full.running_var[4:], untouched[1])
