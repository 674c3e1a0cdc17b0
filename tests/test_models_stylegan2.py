"""StyleGAN2 (rosinality/stylegan2-pytorch layout) against an independent re-implementation of the
reference (tests/_reference_stylegan2.py): same state_dict keys and shapes, same outputs given the
same styles and noise, checkpoint loading, the content-aware paper's MACs, and channel masks."""
import argparse
import random

import pytest
import torch

import _reference_stylegan2 as reference
import gansparse
from gansparse.masks import HardMask
from gansparse.models import load_rosinality_checkpoint, stylegan2

# The reference's widths start at 512; narrow ones keep the tests fast (same layout, fewer channels).
NARROW = {4: 16, 8: 16, 16: 12, 32: 8}
SMALL_G = dict(size=32, style_dim=16, n_mlp=2, channels=NARROW)


def _randomise(model):
    """Non-trivial values everywhere (biases and noise weights start at 0 in both)."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not name.endswith("kernel"):
                t.copy_(torch.randn_like(t) * (0.3 if name.endswith(("bias", "noise.weight")) else 1.0))


def _pair(**kwargs):
    ref = reference.Generator(**kwargs)
    _randomise(ref)
    ours = stylegan2.Generator(**kwargs)
    ours.load_state_dict(ref.state_dict())  # strict: no remapping of any kind
    return ref, ours


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_generator_keys_shapes_and_outputs_match_the_reference():
    ref, ours = _pair(**SMALL_G)
    assert _shapes(ours) == _shapes(ref)
    z = [torch.randn(3, 16), torch.randn(3, 16)]
    noise = [torch.randn(3, 1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2)) for i in range(ours.num_layers)]
    mean = ref.style(torch.randn(64, 16)).mean(0, keepdim=True)
    cases = [
        dict(randomize_noise=False),
        dict(noise=noise, return_latents=True),
        dict(noise=noise, inject_index=3, truncation=0.7, truncation_latent=mean),
    ]
    for kwargs in cases:
        styles = z[:1] if "inject_index" not in kwargs else z
        expected, expected_latent = ref(styles, **kwargs)
        actual, actual_latent = ours(styles, **kwargs)
        assert actual.shape == (3, 3, 32, 32)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
        if kwargs.get("return_latents"):
            torch.testing.assert_close(actual_latent, expected_latent)
        else:
            assert actual_latent is None
    # w+ input, and fresh noise drawn in the same order from the same seed.
    w_plus = torch.randn(2, ours.n_latent, 16)
    torch.manual_seed(5)
    expected, _ = ref([w_plus], input_is_latent=True)
    torch.manual_seed(5)
    actual, _ = ours([w_plus], input_is_latent=True)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_style_mixing_draws_the_random_injection_point_like_the_reference():
    ref, ours = _pair(**SMALL_G)
    z = [torch.randn(2, 16), torch.randn(2, 16)]
    random.seed(3)
    expected, _ = ref(z, randomize_noise=False, return_latents=True)
    random.seed(3)
    actual, _ = ours(z, randomize_noise=False, return_latents=True)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_make_noise_matches_the_noise_buffers():
    g = stylegan2.Generator(**SMALL_G)
    noises = g.make_noise()
    assert [tuple(n.shape) for n in noises] == [tuple(getattr(g.noises, f"noise_{i}").shape)
                                                for i in range(g.num_layers)]


@pytest.mark.parametrize("batch", [1, 4, 8])
def test_discriminator_keys_shapes_and_outputs_match_the_reference(batch):
    ref = reference.Discriminator(32, channels=NARROW)
    _randomise(ref)
    ours = stylegan2.Discriminator(32, channels=NARROW)
    assert _shapes(ours) == _shapes(ref)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(batch, 3, 32, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_discriminator_gradients_and_r1_penalty_match_the_reference():
    """R1 (StyleGAN2's regulariser) differentiates the gradient: through upfirdn2d and the bias-act."""
    ref = reference.Discriminator(16, channels=NARROW)
    _randomise(ref)
    ours = stylegan2.Discriminator(16, channels=NARROW)
    ours.load_state_dict(ref.state_dict())

    def r1_grads(model):
        x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        (grad_x,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.pow(2).sum(), list(model.parameters()), materialize_grads=True)

    for actual, expected in zip(r1_grads(ours), r1_grads(ref)):
        torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4)


def test_full_size_state_dict_keys_match_the_reference():
    """The real configurations, built on the meta device."""
    with torch.device("meta"):
        for size in (256, 1024):
            assert _shapes(stylegan2.Generator(size, 512, 8)) == _shapes(reference.Generator(size, 512, 8))
        assert _shapes(stylegan2.Discriminator(256)) == _shapes(reference.Discriminator(256))
