"""The CycleGAN / pix2pix networks against an independent re-implementation of the reference
(tests/_reference_nets.py): same state_dict keys and shapes, same outputs once loaded with the
reference's weights, the published parameter counts, and the masked variants."""
import pytest
import torch

import _reference_nets as reference
from gansparse import export
from gansparse.masks import HardMask, named_masks
from gansparse.models import (
    NLayerDiscriminator,
    PixelDiscriminator,
    ResnetGenerator,
    UnetGenerator,
    load_reference_state_dict,
)

# (our class, reference class, constructor arguments, input side), at small widths and sizes.
SMALL = [
    (ResnetGenerator, reference.ResnetGenerator, dict(input_nc=3, output_nc=3, ngf=8, norm=norm, n_blocks=3,
                                                      padding_type=padding, use_dropout=dropout), 32)
    for norm, padding, dropout in (("instance", "reflect", False), ("batch", "replicate", True), ("none", "zero", False))
] + [
    (UnetGenerator, reference.UnetGenerator, dict(input_nc=3, output_nc=2, num_downs=7, ngf=8, norm=norm,
                                                  use_dropout=dropout), 128)
    for norm, dropout in (("batch", True), ("instance", False))
] + [
    (NLayerDiscriminator, reference.NLayerDiscriminator, dict(input_nc=6, ndf=8, n_layers=n, norm=norm), 64)
    for n, norm in ((3, "batch"), (2, "instance"))
] + [
    (PixelDiscriminator, reference.PixelDiscriminator, dict(input_nc=3, ndf=8, norm="batch"), 16),
]


def _id(case):
    ours, _, kwargs, _ = case
    return ours.__name__ + "-" + "-".join(str(v) for k, v in kwargs.items() if k not in ("input_nc", "output_nc"))


@pytest.mark.parametrize("case", SMALL, ids=[_id(c) for c in SMALL])
def test_same_keys_shapes_and_outputs_as_the_reference(case):
    ours_class, reference_class, kwargs, side = case
    ref = reference_class(**kwargs)
    ours = ours_class(**kwargs)
    reference.randomise_(ref)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    ours.load_state_dict(ref.state_dict())  # strict: no remapping of any kind
    x = torch.randn(2, kwargs["input_nc"], side, side)
    for train in (True, False):
        ref.train(train), ours.train(train)
        torch.manual_seed(1)  # dropout draws the same masks in both
        want = ref(x)
        torch.manual_seed(1)
        assert torch.equal(ours(x), want), f"train={train}"
    # Training updated the running statistics identically.
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


# Full size: constructing is cheap, nothing runs.
@pytest.mark.parametrize("model, params", [
    (lambda: ResnetGenerator(3, 3, 64, "instance", n_blocks=9), 11_378_179),
    (lambda: UnetGenerator(3, 3, 8, 64, "batch"), 54_413_955),
    (lambda: NLayerDiscriminator(3, 64, 3, "batch"), 2_765_633),
], ids=["resnet_9blocks", "unet_256", "basic_D"])
def test_published_parameter_counts(model, params):
    with torch.device("meta"):
        assert sum(p.numel() for p in model().parameters()) == params


@pytest.mark.parametrize("make", [
    lambda mask: ResnetGenerator(3, 3, 8, "instance", n_blocks=2, mask=mask),
    lambda mask: UnetGenerator(3, 3, 5, 8, "batch", mask=mask),
    lambda mask: ResnetGenerator(3, 3, 8, "none", n_blocks=1, mask=mask),
], ids=["resnet-instance", "unet-batch", "resnet-none"])
def test_masks_add_keys_only_and_all_ones_masks_change_nothing(make):
    plain, masked = make(None), make("hard")
    reference.randomise_(plain)
    result = load_reference_state_dict(masked, plain.state_dict())
    assert result.missing_keys and all(".mask." in key for key in result.missing_keys)
    assert set(masked.state_dict()) - set(plain.state_dict()) == set(result.missing_keys)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(masked(x), plain(x), atol=1e-5, rtol=1e-5)


def test_dmad_masks_sit_after_every_norm_of_the_resnet_generator():
    g = ResnetGenerator(3, 3, 8, "instance", n_blocks=2, mask="dmad")
    # first conv, 2 downsamplings, 2 per residual block, 2 upsamplings; not the output conv
    assert [name for name, _ in named_masks(g)] == [
        "model.2.mask", "model.5.mask", "model.8.mask",
        "model.10.conv_block.2.mask", "model.10.conv_block.6.mask",
        "model.11.conv_block.2.mask", "model.11.conv_block.6.mask",
        "model.13.mask", "model.16.mask"]


def test_a_zero_mask_zeroes_its_channels_before_the_activation():
    g = ResnetGenerator(3, 3, 8, "batch", n_blocks=1, mask="hard")
    values = torch.ones(8)
    values[:3] = 0
    g.model[2].mask = HardMask(8, values)
    features = g.model[:4](torch.randn(2, 3, 16, 16))
    assert torch.all(features[:, :3] == 0) and torch.all(features[:, 3:].abs().sum((0, 2, 3)) > 0)


def test_load_reference_state_dict_drops_legacy_instance_norm_statistics_and_rejects_strangers():
    ref = reference.ResnetGenerator(3, 3, 8, "instance", n_blocks=1)
    state = dict(ref.state_dict())
    # Older versions of the reference tracked running statistics in their instance norms.
    state["model.2.running_mean"], state["model.2.running_var"] = torch.zeros(8), torch.ones(8)
    load_reference_state_dict(ResnetGenerator(3, 3, 8, "instance", n_blocks=1), state)
    with pytest.raises(RuntimeError, match="missing keys"):
        load_reference_state_dict(ResnetGenerator(3, 3, 8, "instance", n_blocks=2), state)


@pytest.mark.parametrize("kwargs, message", [
    (dict(norm="layer"), "norm must be one of"),
    (dict(padding_type="circular"), "padding_type must be one of"),
    (dict(mask="l1"), "mask must be None or one of"),
])
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResnetGenerator(3, 3, 8, **kwargs)


@pytest.mark.parametrize("model", [
    ResnetGenerator(3, 3, 8, "instance", n_blocks=2, mask="dmad"),
    UnetGenerator(3, 3, 5, 8, mask="sigmoid"),
], ids=["resnet", "unet"])
def test_generators_give_export_their_example_inputs(model):
    """gansparse.export.compact(model) needs no inputs for the generators: they provide them."""
    model.eval()
    (example,) = model.example_inputs()
    assert example.shape[:2] == (1, 3) and example.std() > 0  # random: export reads channel values from it
    compact = export.compact(model)
    export.check_equivalence(model, compact, torch.randn(2, 3, 64, 64))
