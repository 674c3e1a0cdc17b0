"""StyleGAN2 (rosinality/stylegan2-pytorch layout) against an independent re-implementation of the
reference (tests/_reference_stylegan2.py): same state_dict keys and shapes, same outputs given the
same styles and noise, checkpoint loading, the content-aware paper's MACs, and channel masks."""
import argparse
import random

import pytest
import torch
from torch import nn

import _reference_stylegan2 as reference
import gansparse
from gansparse import export
from gansparse.masks import HardMask, Mask
from gansparse.models import load_rosinality_checkpoint, stylegan2

# The reference's widths start at 512; narrow ones keep the tests fast (same layout, fewer channels).
NARROW = {4: 16, 8: 16, 16: 12, 32: 8}
SMALL_G = dict(size=32, style_dim=16, n_mlp=2, channels=NARROW)


def _randomise(model):
    """Non-trivial values everywhere (biases and noise weights start at 0 in both); masks untouched."""
    masks = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, Mask))
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not name.endswith("kernel") and not name.startswith(masks):
                t.copy_(torch.randn_like(t) * (0.3 if name.endswith(("bias", "noise.weight")) else 1.0))


def _randomised(model):
    _randomise(model)
    return model


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


def test_compiled_and_reference_ops_give_the_same_images(monkeypatch):
    g = stylegan2.Generator(**SMALL_G)
    _randomise(g)
    z = [torch.randn(2, 16)]
    monkeypatch.setenv("GANSPARSE_IMPL", "cpu")
    compiled, _ = g(z, randomize_noise=False)
    monkeypatch.setenv("GANSPARSE_IMPL", "ref")
    eager, _ = g(z, randomize_noise=False)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# --- MACs: the content-aware paper's count --------------------------------------------------------


@pytest.mark.parametrize("size, published", [(256, 45_124_673_536), (1024, 74_266_894_336)])
def test_macs_reproduce_the_content_aware_paper(size, published):
    """The paper's 45.1B (256px) and 74.3B (1024px) FLOPs, exactly as its released counter
    (Util/Calculators.py) gives them: channel_multiplier 2, style_dim 512, n_mlp 8, batch 1; the
    modulated convs counted as convs (the upsampling ones on their input side), plus the ToRGB
    1x1 convs, the mapping network and the style linears."""
    with torch.device("meta"):
        g = stylegan2.Generator(size, 512, 8, channel_multiplier=2)
        stats = gansparse.profile(g, [torch.zeros(1, 512)], transposed="input")
    weight_layers = sum(row["macs"] for row in stats["layers"]
                        if row["type"] in ("StyledConv", "ModulatedConv2d", "EqualLinear"))
    assert weight_layers == published
    # The rest of the total is the PixelNorm's 2 x 512 + 1 (the paper ignores it).
    assert stats["macs"] - published == 513
    assert f"{stats['macs'] / 1e9:.1f}" == f"{published / 1e9:.1f}"
    # transposed='output' (torchprofile's convention) counts the upsampling convs on their output.
    assert gansparse.profile(g, [torch.zeros(1, 512, device="meta")])["macs"] > 1.8 * published


@pytest.mark.slow
def test_effective_macs_reproduce_the_content_aware_papers_pruned_generators():
    """Tab. 1 (30% of every layer's channels removed by l1-out): 22.3B; Tab. 2 (80%): 1.9B. The
    paper's counter keeps C - floor(ratio * C) channels per layer. Runs for real at batch 1 (the
    masks must be on a real device for their values to count)."""
    g = stylegan2.Generator(256, 512, 8, mask="hard")
    for ratio, published in ((0.3, "22.3"), (0.8, "1.9")):
        for conv in _styled_convs(g):
            values = torch.zeros(conv.mask.channels)
            values[: conv.mask.channels - int(ratio * conv.mask.channels)] = 1
            conv.mask = HardMask(conv.mask.channels, values)
        stats = gansparse.profile(g, [torch.zeros(1, 512)], transposed="input")
        assert f"{stats['macs_effective'] / 1e9:.1f}" == published


# --- channel masks --------------------------------------------------------------------------------


def test_all_ones_masks_change_nothing():
    ref, _ = _pair(**SMALL_G)
    masked = stylegan2.Generator(**SMALL_G, mask="hard")
    missing, unexpected = masked.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and missing and all(".mask." in k for k in missing)
    z = [torch.randn(2, 16)]
    torch.testing.assert_close(masked(z, randomize_noise=False)[0], ref(z, randomize_noise=False)[0],
                               rtol=1e-4, atol=1e-4)


def _styled_convs(g):
    return [g.conv1, *g.convs]


def test_masks_equal_removing_the_channels():
    """A generator with binary masks computes what the generator with those channels physically
    removed computes: the masked channels output 0 and leave the next layers' demodulation."""
    widths = {4: 8, 8: 8, 16: 6}
    g = stylegan2.Generator(16, 16, 2, channels=widths, mask="hard")
    _randomise(g)
    # conv1 keeps all (its width is the constant input's); the others keep 5 of 8 and 4 of 6, each
    # StyledConv its own channels.
    keeps = [torch.arange(8)] + [torch.randperm(widths[2 ** (3 + i // 2)])[:(5, 4)[i // 2]].sort().values
                                 for i in range(len(g.convs))]
    for conv, keep in zip(_styled_convs(g), keeps):
        values = torch.zeros(conv.mask.channels)
        values[keep] = 1
        conv.mask = HardMask(conv.mask.channels, values)
    compact = stylegan2.Generator(16, 16, 2, channels={4: 8, 8: 5, 16: 4})
    state = {k: v for k, v in g.state_dict().items() if ".mask." not in k}
    for i, (conv, keep) in enumerate(zip(_styled_convs(compact), keeps)):
        name = "conv1" if i == 0 else f"convs.{i - 1}"
        keep_in = keeps[i - 1] if i > 0 else torch.arange(8)
        state[f"{name}.conv.weight"] = state[f"{name}.conv.weight"][:, keep][:, :, keep_in]
        for p in ("weight", "bias"):
            state[f"{name}.conv.modulation.{p}"] = state[f"{name}.conv.modulation.{p}"][keep_in]
        state[f"{name}.activate.bias"] = state[f"{name}.activate.bias"][keep]
    for j, keep in enumerate(keeps[2::2]):
        # A narrower layer scales its weight by 1 / sqrt(its own fan-in) (equalised learning rate):
        # the ToRGB, which does not demodulate, keeps the original scale by rescaling its weight.
        rescale = (len(keep) / g.to_rgbs[j].conv.in_channel) ** 0.5
        state[f"to_rgbs.{j}.conv.weight"] = state[f"to_rgbs.{j}.conv.weight"][:, :, keep] * rescale
        for p in ("weight", "bias"):
            state[f"to_rgbs.{j}.conv.modulation.{p}"] = state[f"to_rgbs.{j}.conv.modulation.{p}"][keep]
    compact.load_state_dict(state)
    z = [torch.randn(2, 16)]
    masked_image, _ = g(z, randomize_noise=False)
    torch.testing.assert_close(compact(z, randomize_noise=False)[0], masked_image, rtol=1e-5, atol=1e-5)
    # And the masked channels are exactly 0 on the way.
    out = g.conv1(g.input(torch.zeros(1, 1, 16)), torch.randn(1, 16))
    masked_out = g.convs[0](out, torch.randn(1, 16))
    assert (masked_out[:, g.convs[0].mask.values() == 0] == 0).all()


@pytest.mark.parametrize("kind", ["sigmoid", "dmad"])
def test_trainable_masks_get_gradients(kind):
    g = stylegan2.Generator(**SMALL_G, mask=kind)
    image, _ = g([torch.randn(2, 16)])
    image.square().mean().backward()
    for conv in _styled_convs(g):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.mask.parameters())


# --- checkpoints and bad input ----------------------------------------------------------------


def test_load_rosinality_checkpoint(tmp_path):
    g, d = stylegan2.Generator(**SMALL_G), stylegan2.Discriminator(32, channels=NARROW)
    _randomise(g)
    optim = torch.optim.Adam(g.parameters())
    g([torch.randn(2, 16)])[0].mean().backward()
    optim.step()
    # What rosinality's train.py saves, argparse.Namespace included.
    path = tmp_path / "010000.pt"
    torch.save({"g": g.state_dict(), "d": d.state_dict(), "g_ema": g.state_dict(), "g_optim": optim.state_dict(),
                "d_optim": optim.state_dict(), "args": argparse.Namespace(size=32, latent=16), "ada_aug_p": 0.0}, path)
    ckpt = load_rosinality_checkpoint(path)
    assert ckpt["args"].size == 32
    loaded = stylegan2.Generator(**SMALL_G)
    loaded.load_state_dict(ckpt["g_ema"])
    z = [torch.randn(1, 16)]
    torch.testing.assert_close(loaded(z, randomize_noise=False)[0], g(z, randomize_noise=False)[0])


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_load_rosinality_checkpoint_refuses_pickled_code_and_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no StyleGAN2 checkpoint at .*missing.pt"):
        load_rosinality_checkpoint(tmp_path / "missing.pt")
    path = tmp_path / "evil.pt"
    torch.save({"g_ema": {}, "extra": _Payload()}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_rosinality_checkpoint(path)


@pytest.mark.parametrize("call, error, match", [
    (lambda: stylegan2.Generator(48, 16, 2), ValueError, "size must be a power of two"),
    (lambda: stylegan2.Generator(32, 16, 2, channels={4: 8}), ValueError, "channels must map every resolution"),
    (lambda: stylegan2.Generator(32, 16, 2, channels=NARROW, mask="l1"), ValueError, "mask must be None"),
    (lambda: stylegan2.Discriminator(2048), ValueError, "size must be a power of two"),
    (lambda: stylegan2.Generator(**SMALL_G)(torch.randn(2, 16)), TypeError, "styles must be a list"),
    (lambda: stylegan2.Generator(**SMALL_G)([torch.randn(2, 16)], noise=[None]), ValueError, "noise must hold 7"),
    (lambda: stylegan2.Generator(**SMALL_G).exportable()([torch.randn(2, 16)]), ValueError,
     r"z must be a tensor \[N, 16\], got list"),
    (lambda: stylegan2.Discriminator(16, channels=NARROW)(torch.randn(6, 3, 16, 16)), ValueError,
     "must be a multiple of the stddev group"),
])
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_effective_macs_are_the_compact_generators_layer_by_layer():
    """Each modulated conv's effective MACs (the paper's count: its style linear, one style per
    kept input channel, and its conv) are those of the compact generator's style linear and conv.
    (The compact model's total also counts the per-sample modulation and demodulation, elementwise
    multiplies in plain layers, which the paper's count leaves out.)"""
    g = _random_masks_(_randomised(stylegan2.Generator(**SMALL_G, mask="hard")), 0.5)
    for conv in g.modules():  # unfused: export then gives each modulated conv a plain conv layer
        if isinstance(conv, stylegan2.ModulatedConv2d):
            conv.fused = False
    z = torch.randn(2, 16)
    stats = gansparse.profile(g.exportable(), z, transposed="input")
    compact_model = export.compact(g)
    assert export.check_equivalence(g.exportable(), compact_model, z) <= 1e-5
    compact = {}
    for row in gansparse.profile(compact_model, z, transposed="input")["layers"]:
        compact[row["name"]] = compact.get(row["name"], 0) + row["macs"]
    rows = {row["name"]: row for row in stats["layers"]}
    # (row of the masked generator, the compact modulated conv): a StyledConv counts as its conv.
    styled = ["conv1"] + [f"convs.{i}" for i in range(len(g.convs))]
    to_rgbs = ["to_rgb1"] + [f"to_rgbs.{j}" for j in range(len(g.to_rgbs))]
    pairs = [(f"generator.{n}", f"generator.{n}.conv") for n in styled] + [
        (f"generator.{n}.conv", f"generator.{n}.conv") for n in to_rgbs]
    for name, plain in pairs:
        assert rows[name]["macs_effective"] == compact[f"{plain}.conv"] + compact[f"{plain}.modulation"], name
        assert rows[name]["macs_effective"] < rows[name]["macs"], name


@pytest.mark.parametrize("sampling", [dict(), dict(upsample=True), dict(downsample=True)])
@pytest.mark.parametrize("demodulate", [True, False])
def test_unfused_modulated_conv_computes_the_fused_one(sampling, demodulate):
    fused = stylegan2.ModulatedConv2d(6, 5, 3, 8, demodulate=demodulate, **sampling)
    unfused = stylegan2.ModulatedConv2d(6, 5, 3, 8, demodulate=demodulate, fused=False, **sampling)
    unfused.load_state_dict(fused.state_dict())
    x, style, mask = torch.randn(3, 6, 8, 8), torch.randn(3, 8), (torch.rand(6) > 0.5).float()
    torch.testing.assert_close(unfused(x, style, mask), fused(x, style, mask), rtol=1e-5, atol=1e-5)


# --- export ---------------------------------------------------------------------------------------


def _random_masks_(g, sparsity: float, kind: str = "hard"):
    """Every StyledConv drops round(sparsity * C) random channels; with kind 'sigmoid' the kept ones
    get values in (0, 1), which export folds into the layers."""
    generator = torch.Generator().manual_seed(int(sparsity * 100))
    for conv in _styled_convs(g):
        channels = conv.mask.channels
        drop = torch.randperm(channels, generator=generator)[:round(sparsity * channels)]
        with torch.no_grad():
            if kind == "sigmoid":
                conv.mask.logits.copy_(torch.randn(channels, generator=generator) * 0.3)
                conv.mask.logits[drop] = -5.0
            else:
                values = torch.ones(channels)
                values[drop] = 0
                conv.mask = HardMask(channels, values)
    return g


@pytest.mark.parametrize("sparsity, kind", [(0.25, "hard"), (0.5, "hard"), (0.75, "hard"), (0.5, "sigmoid")])
def test_export_removes_the_masked_channels_and_matches_the_masked_generator(sparsity, kind, tmp_path):
    g = _random_masks_(_randomised(stylegan2.Generator(**SMALL_G, mask=kind)), sparsity, kind)
    compact = export.compact(g)  # traces g.exportable() on its example_inputs()' z
    z = torch.randn(3, 16)
    assert export.check_equivalence(g, compact, z) <= 1e-5  # g as g.exportable()
    if kind == "hard":  # binary masks: the compact model computes what the generator computes
        with torch.no_grad():
            torch.testing.assert_close(compact(z), g([z], randomize_noise=False)[0], rtol=0, atol=1e-5)
    # Each StyledConv keeps the channels its mask keeps: its conv's outputs and its activation's
    # bias, the next conv's and the ToRGB's inputs (with their rows of the style linear).
    kept_in = NARROW[4]  # conv1 reads the constant input, which has no mask
    for name, conv in zip(["conv1"] + [f"convs.{i}" for i in range(len(g.convs))], _styled_convs(g)):
        kept = int(conv.mask.keep().sum())
        plain = compact.get_submodule(f"generator.{name}.conv")
        assert plain.weight.shape[:3] == (1, kept, kept_in) and plain.modulation.out_features == kept_in
        assert compact.get_submodule(f"generator.{name}.activate").bias.numel() == kept
        kept_in = kept
    for j in range(len(g.to_rgbs)):
        kept = int(g.convs[2 * j + 1].mask.keep().sum())
        assert compact.get_submodule(f"generator.to_rgbs.{j}.conv.modulation").out_features == kept
    assert not any(isinstance(m, (stylegan2.ModulatedConv2d, Mask)) for m in compact.modules())
    # Fewer parameters and MACs than the same generator exported without masks.
    dense = export.compact(stylegan2.Generator(**SMALL_G))
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in dense.parameters())
    assert gansparse.profile(compact, z)["macs"] < gansparse.profile(dense, z)["macs"]
    # Saved and loaded with torch and gansparse's own ops only.
    path = tmp_path / "g.safetensors"
    export.save(compact, path)
    with torch.no_grad():
        assert torch.equal(export.load(path)(z), compact(z))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("sampling, demodulate", [(dict(), True), (dict(upsample=True), True),
                                                  (dict(downsample=True), True), (dict(), False)])
def test_export_of_a_modulated_conv_folds_its_input_mask(sampling, demodulate, fused):
    """A modulated conv alone, input channels masked: they leave the conv, the modulation's rows and
    the demodulation; with demodulation, a zero input channel that is not masked stays in (it
    still counts in the demodulation)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mask = HardMask(6, torch.tensor([1.0, 0, 1, 1, 0, 1]))
            self.zero = HardMask(6, torch.tensor([1.0, 1, 1, 0, 1, 1]))  # channel 3 is 0, not masked
            self.pre = nn.Conv2d(3, 6, 1)
            self.conv = stylegan2.ModulatedConv2d(6, 4, 3, 8, demodulate=demodulate, fused=fused, **sampling)

        def forward(self, x, w):
            x = self.pre(x) * self.zero().view(1, -1, 1, 1) * self.mask().view(1, -1, 1, 1)
            return self.conv(x, w, self.mask())

    model, x, w = _randomised(Net()), torch.randn(2, 3, 8, 8), torch.randn(2, 8)
    compact = export.compact(model, x, w)
    assert export.check_equivalence(model, compact, x, w) <= 1e-5
    kept = 4 if demodulate else 3
    conv = compact.get_submodule("conv")
    assert conv.modulation.out_features == compact.pre.out_channels == kept
    if fused:
        assert conv.weight.shape[1:3] == (4, kept)
    else:
        assert (conv.conv.in_channels, conv.conv.out_channels) == (kept, 4)
        assert hasattr(conv, "demodulation") == demodulate and (not demodulate or conv.demodulation.in_features == kept)


def test_export_of_the_discriminator_without_inputs():
    d = stylegan2.Discriminator(32, channels=NARROW)
    compact = export.compact(d)
    (image,) = d.example_inputs()
    assert image.shape == (1, 3, 32, 32)
    assert export.check_equivalence(d, compact, torch.randn(4, 3, 32, 32)) <= 1e-5
