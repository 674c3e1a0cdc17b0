"""StarGAN's generator and discriminator against an independent re-implementation of the official
layout (tests/_reference_stargan.py): the official keys, the same outputs with the same weights
(the official networks in training mode, the mode the official code computes every output in),
the same parameter counts at full size; masks and the compact export."""
import pytest
import torch

import _reference_stargan as reference
from _reference_gan_compression import random_hard_masks_
from _reference_nets import randomise_
from gansparse import export
from gansparse.masks import named_masks
from gansparse.models import load_reference_state_dict, stargan

RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _inputs(n, c_dim=3, side=16):
    labels = torch.arange(n) % c_dim
    return torch.randn(n, 3, side, side), torch.nn.functional.one_hot(labels, c_dim).float()


def test_generator_has_the_official_keys_and_outputs():
    ref, ours = randomise_(reference.Generator(8, 3, 2)), stargan.Generator(8, 3, 2)
    official = {k: v.shape for k, v in ref.state_dict().items()}
    # Every official key but the instance norms' unused running statistics (see models/stargan.py).
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: shape for k, shape in official.items() if not k.endswith(RUNNING_STATS)}
    assert any(k.endswith(RUNNING_STATS) for k in official)
    load_reference_state_dict(ours, ref.state_dict())
    x, c = _inputs(3)
    ref.train()
    expected = ref(x, c)
    for train in (True, False):
        ours.train(train)
        assert torch.equal(ours(x, c), expected), f"train={train}"


def test_discriminator_has_the_official_keys_and_outputs():
    ref, ours = randomise_(reference.Discriminator(32, 4, 3, 3)), stargan.Discriminator(32, 4, 3, 3)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())  # strict: no remapping
    x = torch.randn(2, 3, 32, 32)
    (src, cls), (ref_src, ref_cls) = ours(x), ref(x)
    assert src.shape == (2, 1, 4, 4) and cls.shape == (2, 3)
    assert torch.equal(src, ref_src) and torch.equal(cls, ref_cls)


@pytest.mark.parametrize("ours, ref, params", [(stargan.Generator, reference.Generator, 8_430_528),
                                               (stargan.Discriminator, reference.Discriminator, 44_762_048)],
                         ids=["G", "D"])
def test_full_size_parameters_equal_the_official(ours, ref, params):
    # params: what the official code prints for its CelebA networks (c_dim 5, 128x128).
    with torch.device("meta"):
        count = sum(p.numel() for p in ours().parameters())
        assert count == sum(p.numel() for p in ref().parameters()) == params


def test_masks_sit_after_every_norm_and_all_ones_masks_change_nothing():
    plain, masked = randomise_(stargan.Generator(8, 3, 2)), stargan.Generator(8, 3, 2, mask="hard")
    assert [name for name, _ in named_masks(masked)] == [
        "main.1.mask", "main.4.mask", "main.7.mask", "main.9.main.1.mask", "main.9.main.4.mask",
        "main.10.main.1.mask", "main.10.main.4.mask", "main.12.mask", "main.15.mask"]
    result = load_reference_state_dict(masked, plain.state_dict())
    assert result.missing_keys and all(".mask." in key for key in result.missing_keys)
    x, c = _inputs(2)
    torch.testing.assert_close(masked.eval()(x, c), plain.eval()(x, c), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_export_removes_the_masked_channels_and_keeps_the_outputs(sparsity):
    masked = random_hard_masks_(randomise_(stargan.Generator(8, 3, 2, mask="hard")), sparsity,
                                torch.Generator().manual_seed(3)).eval()
    compact = export.compact(masked)  # the generator's own example_inputs()
    x, c = _inputs(2)
    assert export.check_equivalence(masked, compact, x, c) <= 1e-5
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in masked.parameters())


@pytest.mark.parametrize("call, message", [
    (lambda: stargan.Generator(8, 3, 1)(*_inputs(2, c_dim=4)), r"c must be a tensor \[N, c_dim\] = \[2, 3\]"),
    (lambda: stargan.Generator(8, 3, 1)(torch.randn(2, 4, 8, 8), torch.zeros(2, 3)), r"x must be a tensor \[N, 3"),
    (lambda: stargan.Generator(conv_dim=0), "conv_dim must be a positive int"),
    (lambda: stargan.Generator(repeat_num=-1), "repeat_num must be an int >= 0"),
    (lambda: stargan.Generator(mask="l1"), "mask must be None or one of"),
    (lambda: stargan.Discriminator(image_size=100), "image_size must be a multiple of 2\\*\\*repeat_num = 64"),
    (lambda: stargan.Discriminator(32, 4, 3, 3)(torch.randn(1, 3, 64, 64)), r"x must be a tensor \[N, 3, 32, 32\]"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
