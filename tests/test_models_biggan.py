"""BigGAN / SA-GAN (models/biggan.py) against an independent re-implementation of
ajbrock/BigGAN-PyTorch's layout (tests/_reference_biggan.py): same state_dict keys and shapes,
same outputs, gradients and buffer updates once loaded with the reference's weights; the
published parameter counts and MACs; spectral norm; masks; input validation."""
import inspect
import warnings

import pytest
import torch
from torch import nn
from torchprofile import profile_macs

import _reference_biggan as reference
import gansparse
from gansparse import export
from gansparse.masks import HardMask, named_masks
from gansparse.models import biggan, load_reference_state_dict

N_CLASSES = 5
# Small configurations covering every option of the layout: (constructor arguments).
SMALL_G = [
    dict(G_ch=4, dim_z=14, shared_dim=8, hier=True, resolution=32, G_attn="16", n_classes=N_CLASSES),  # BigGAN-like
    dict(G_ch=2, dim_z=8, G_shared=False, resolution=64, G_attn="32", n_classes=N_CLASSES),  # SA-GAN-like
    dict(G_ch=1, dim_z=8, shared_dim=6, resolution=128, G_attn="16", n_classes=N_CLASSES, num_G_SVs=2,
         num_G_SV_itrs=2, BN_eps=1e-4, SN_eps=1e-6),
    dict(G_ch=2, dim_z=6, G_shared=False, resolution=32, G_attn="8_32", n_classes=N_CLASSES, G_param="None"),
]
SMALL_D = [
    dict(D_ch=4, resolution=32, D_attn="16", n_classes=N_CLASSES),
    dict(D_ch=8, resolution=64, D_attn="32", n_classes=N_CLASSES, D_wide=False, output_dim=2),
    dict(D_ch=4, resolution=64, D_attn="16", n_classes=N_CLASSES, num_D_SVs=2, num_D_SV_itrs=2),
]


def _id(kwargs):
    return "-".join(f"{k}={v}" for k, v in kwargs.items() if k != "n_classes")


def _randomise(model: nn.Module) -> None:
    """Non-trivial weights and statistics (gamma too), so a swapped or mis-shaped tensor shows up."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("stored_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.3)


def _reference_kwargs(kwargs):
    """The arguments the reference re-implementation takes (ours also takes the training-only ones)."""
    reference_class = reference.Generator if "G_ch" in kwargs else reference.Discriminator
    accepted = inspect.signature(reference_class).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


def _pair(ours_class, reference_class, kwargs):
    """(reference, ours) in float64, ours loaded (strictly) with the reference's random weights."""
    ref = reference_class(**_reference_kwargs(kwargs)).double()
    ours = ours_class(**kwargs).double()
    _randomise(ref)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _condition(model, ids: torch.Tensor) -> torch.Tensor:
    return model.shared(ids) if isinstance(model.shared, nn.Embedding) else ids


def _compare(ref, ours, run):
    """Same outputs and gradients in train mode (twice, so the updated u and statistics are used),
    the same buffers afterwards, and the same outputs in eval mode. In float64; the gradients are
    compared up to round-off relative to the largest one (the biases of convs followed by a batch
    norm get gradients that are 0 up to round-off)."""
    close = dict(rtol=1e-9, atol=1e-11)
    for train in (True, True, False):
        ref.train(train), ours.train(train)
        want, got = run(ref), run(ours)
        torch.testing.assert_close(got, want, **close)
        upstream = torch.randn_like(want)
        want.backward(upstream), got.backward(upstream)
        ours_params = dict(ours.named_parameters())
        scale = max(p.grad.abs().max().item() for p in ref.parameters())
        for name, a in ref.named_parameters():
            torch.testing.assert_close(ours_params[name].grad, a.grad, rtol=1e-9, atol=1e-10 * scale, msg=name)
        ref.zero_grad(), ours.zero_grad()
    ours_state = ours.state_dict()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours_state[key], value, **close, msg=key)


@pytest.mark.parametrize("kwargs", SMALL_G, ids=[_id(k) for k in SMALL_G])
def test_generator_matches_the_reference_layout(kwargs):
    ref, ours = _pair(biggan.Generator, reference.Generator, kwargs)
    z = torch.randn(2, ours.dim_z, dtype=torch.float64)
    ids = torch.tensor([4, 2])
    _compare(ref, ours, lambda g: g(z, _condition(g, ids)))
    assert ours(z, _condition(ours, ids)).shape == (2, 3, kwargs["resolution"], kwargs["resolution"])


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_full_width_keys_and_shapes_at_every_resolution(resolution):
    attention = "16" if resolution == 32 else "64"
    with torch.device("meta"):
        pairs = [(biggan.Generator(**dict(biggan.BIGGAN_128, resolution=resolution, G_attn=attention)),
                  reference.Generator(**dict(biggan.BIGGAN_128, resolution=resolution, G_attn=attention))),
                 (biggan.Discriminator(D_ch=96, resolution=resolution, D_attn=attention),
                  reference.Discriminator(D_ch=96, resolution=resolution, D_attn=attention))]
    for ours, ref in pairs:
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
            {k: tuple(v.shape) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("kwargs", SMALL_D, ids=[_id(k) for k in SMALL_D])
def test_discriminator_matches_the_reference_layout(kwargs):
    ref, ours = _pair(biggan.Discriminator, reference.Discriminator, kwargs)
    side = kwargs["resolution"]
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    ids = torch.tensor([1, 3])
    _compare(ref, ours, lambda d: d(x, ids))
    assert ours(x, ids).shape == (2, kwargs.get("output_dim", 1))


def test_float32_generator_matches_the_reference():
    ref, ours = _pair(biggan.Generator, reference.Generator, SMALL_G[0])
    ref.float(), ours.float()
    z, ids = torch.randn(2, ours.dim_z), torch.tensor([1, 2])
    for train in (True, False):
        ref.train(train), ours.train(train)
        torch.testing.assert_close(ours(z, ref.shared(ids)), ref(z, ref.shared(ids)), rtol=1e-4, atol=1e-5)


# --- published figures ------------------------------------------------------------------------

ATTENTION_BLOCKS = 1  # both published generators have one attention block, at 64x64


def _published(config):
    """gansparse.profile of the generator at batch 1, on the meta device."""
    with torch.device("meta"):
        g = biggan.Generator(**config).eval()
        z = torch.zeros(1, g.dim_z)
        y = _condition(g, torch.zeros(1, dtype=torch.long))
    return gansparse.profile(g, z, y)


@pytest.mark.parametrize("config, params, giga_macs", [
    (biggan.BIGGAN_128, 70_433_988, 21.34),
    (biggan.SAGAN_128, 42_017_412, 9.61),
], ids=["BigGAN-128", "SA-GAN-128"])
def test_published_parameters_and_macs(config, params, giga_macs):
    stats = _published(config)
    assert stats["params"] == params
    assert round(stats["macs"] / 1e9, 2) == giga_macs


@pytest.mark.parametrize("config", [biggan.BIGGAN_128, biggan.SAGAN_128], ids=["BigGAN-128", "SA-GAN-128"])
def test_macs_agree_with_torchprofile_on_the_reference(config):
    """torchprofile traces the reference (its ops run, at full size); gansparse.profile counts ours
    on the meta device. torchprofile also counts the traced shape arithmetic of each attention
    block (x.shape[2] * x.shape[3], three times) as one MAC per multiplication; nothing else differs,
    spectral norm's power iterations included."""
    stats = _published(config)
    ref = reference.Generator(**config).eval()
    z = torch.zeros(1, ref.chunk * (len(ref.blocks) + 1) if ref.hier else config["dim_z"])
    y = _condition(ref, torch.zeros(1, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchprofile warns about the ops it does not count
        traced = profile_macs(ref, (z, y))
    assert traced - stats["macs"] == 3 * ATTENTION_BLOCKS


@pytest.mark.parametrize("kwargs", [SMALL_G[0], SMALL_G[1], SMALL_D[0], SMALL_D[1]],
                         ids=["G-shared-hier", "G-class-embeddings", "D-32", "D-64-narrow"])
def test_small_model_macs_agree_with_torchprofile_on_the_reference(kwargs):
    generator = "G_ch" in kwargs
    ours = (biggan.Generator if generator else biggan.Discriminator)(**kwargs).eval()
    ref = (reference.Generator if generator else reference.Discriminator)(**_reference_kwargs(kwargs)).eval()
    ids = torch.tensor([0, 1])
    if generator:
        args = (torch.randn(2, ours.dim_z), _condition(ref, ids))
    else:
        args = (torch.randn(2, 3, kwargs["resolution"], kwargs["resolution"]), ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = profile_macs(ref, args)
    attention_blocks = sum(isinstance(m, biggan.Attention) for m in ours.modules())
    assert traced - gansparse.profile(ours, *args)["macs"] == 3 * attention_blocks


# --- spectral norm ----------------------------------------------------------------------------


def test_spectral_norm_finds_the_largest_singular_value_and_updates_u_only_in_training():
    layer = biggan.SNConv2d(6, 5, 3, padding=1).double()
    for _ in range(60):  # each call in training runs one more power iteration
        weight = layer.spectral_weight()
    sigma = torch.linalg.matrix_norm(layer.weight.view(5, -1), ord=2)
    torch.testing.assert_close(layer.sv0, sigma.view(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.linalg.matrix_norm(weight.view(5, -1), ord=2), torch.ones((), dtype=torch.float64),
                               rtol=1e-6, atol=0)
    layer.eval()
    u, sv = layer.u0.clone(), layer.sv0.clone()
    layer(torch.randn(1, 6, 4, 4, dtype=torch.float64))
    assert torch.equal(layer.u0, u) and torch.equal(layer.sv0, sv)


@pytest.mark.parametrize("num_svs, num_itrs", [(1, 1), (3, 2)])
def test_power_iteration_macs_are_what_the_profiler_counts(num_svs, num_itrs):
    """SNLinear runs its power iteration in plain torch ops, which gansparse.profile counts one by
    one; power_iteration_macs (used where a fused layer counts itself) must say the same."""
    layer = biggan.SNLinear(7, 5, num_svs=num_svs, num_itrs=num_itrs)
    stats = gansparse.profile(layer, torch.randn(2, 7))
    assert stats["macs"] == 2 * 7 * 5 + layer.power_iteration_macs()


def test_a_masked_sn_conv_scales_its_output_channels_and_folds_with_its_mask():
    conv = biggan.SNConv2d(4, 6, 3, padding=1, mask="sigmoid")
    with torch.no_grad():
        conv.mask.logits.copy_(torch.tensor([3.0, -2.0, 0.0, 0.5, -0.1, 1.0]))
    values = conv.mask().detach()
    plain = biggan.SNConv2d(4, 6, 3, padding=1)
    plain.load_state_dict(conv.state_dict(), strict=False)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(conv(x), plain(x) * values.view(1, 6, 1, 1), rtol=1e-5, atol=1e-6)
    assert torch.equal(conv.u0, plain.u0)  # both ran one training power iteration from the same u
    conv.eval()
    want = conv(x)
    model = biggan.fold_spectral_norm(nn.Sequential(conv))
    assert type(model[0]) is gansparse.MaskedConv2d and model[0].mask is conv.mask
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_fold_spectral_norm_keeps_the_eval_outputs():
    g = biggan.Generator(**SMALL_G[0], mask="sigmoid").eval()
    d = biggan.Discriminator(**SMALL_D[0]).eval()
    z, ids = torch.randn(2, g.dim_z), torch.tensor([1, 3])
    x = torch.randn(2, 3, 32, 32)
    want_g, want_d = g(z, g.shared(ids)), d(x, ids)
    masks = [m for _, m in named_masks(g)]
    for model in (biggan.fold_spectral_norm(g), biggan.fold_spectral_norm(d)):
        assert not any(isinstance(m, biggan.SpectralNorm) for m in model.modules())
        assert not any(key.rpartition(".")[2].startswith(("u", "sv")) for key in model.state_dict())
    assert [m for _, m in named_masks(g)] == masks
    assert isinstance(g.blocks[0][0].conv1, gansparse.MaskedConv2d) and g.training is False
    torch.testing.assert_close(g(z, g.shared(ids)), want_g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d(x, ids), want_d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask, dtype", [(None, torch.float32), ("sigmoid", torch.float64)])
def test_exportable_norms_are_torch_and_gansparse_layers_with_the_same_outputs(mask, dtype):
    norms = nn.ModuleList([biggan.BatchNorm(6, eps=1e-3, mask=mask),
                           biggan.ClassConditionalBatchNorm(6, N_CLASSES, nn.Embedding, mask=mask),
                           biggan.ClassConditionalBatchNorm(6, 3, biggan.SNLinear, mask=mask)]).to(dtype)
    _randomise(norms)
    x, ids, y = torch.randn(2, 6, 4, 4, dtype=dtype), torch.tensor([0, 3]), torch.randn(2, 3, dtype=dtype)
    norms.eval()
    want = [norms[0](x), norms[1](x, ids, activation="relu"), norms[2](x, y)]
    plain = biggan.exportable(norms)
    assert type(plain[0]) is (nn.BatchNorm2d if mask is None else gansparse.models.norms.MaskedBatchNorm2d)
    assert all(type(p.norm) is gansparse.ConditionalBatchNorm2d for p in plain[1:])
    got = [plain[0](x), plain[1](x, ids, activation="relu"), plain[2](x, y)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- masks --------------------------------------------------------------------------------------


def test_masks_sit_after_the_second_cbn_of_every_block_and_add_keys_only():
    plain = biggan.Generator(**SMALL_G[0])
    masked = biggan.Generator(**SMALL_G[0], mask="hard")
    assert [name for name, _ in named_masks(masked)] == [f"blocks.{i}.0.bn2.mask" for i in range(3)]
    _randomise(plain)
    result = load_reference_state_dict(masked, plain.state_dict())  # a reference checkpoint into a masked G
    assert not result.unexpected_keys and result.missing_keys
    assert all(".bn2.mask." in key for key in result.missing_keys)
    z, y = torch.randn(2, plain.dim_z), plain.shared(torch.tensor([0, 4]))
    for train in (True, False):  # all-ones masks change nothing (training updates both alike)
        plain.train(train), masked.train(train)
        torch.testing.assert_close(masked(z, y), plain(z, y), rtol=1e-5, atol=1e-6)


def test_a_zero_mask_zeroes_its_channels_before_the_relu_and_masks_learn():
    g = biggan.Generator(**SMALL_G[1], mask="sigmoid")
    block = g.blocks[0][0]
    channels = block.bn2.num_features
    values = torch.ones(channels)
    values[:3] = 0
    block.bn2.mask = HardMask(channels, values)
    seen = {}
    block.conv2.register_forward_pre_hook(lambda module, args: seen.update(h=args[0]))
    out = g(torch.randn(2, g.dim_z), torch.tensor([0, 2]))
    assert torch.all(seen["h"][:, :3] == 0) and torch.all(seen["h"][:, 3:].abs().sum((0, 2, 3)) > 0)
    out.square().mean().backward()
    for name, mask in named_masks(g):
        if name != "blocks.0.0.bn2.mask":
            assert mask.logits.grad is not None and mask.logits.grad.abs().sum() > 0, name


def test_effective_macs_count_the_channels_a_mask_keeps():
    g = biggan.Generator(**SMALL_G[1], mask="hard").eval()
    bn2 = g.blocks[1][0].bn2
    values = torch.zeros(bn2.num_features)
    values[: bn2.num_features // 4] = 1
    bn2.mask = HardMask(bn2.num_features, values)
    rows = {row["name"]: row for row in gansparse.profile(g, torch.randn(1, g.dim_z), torch.tensor([1]))["layers"]}
    for name in ("blocks.1.0.conv1", "blocks.1.0.conv2"):  # conv1's outputs, conv2's inputs
        assert rows[name]["macs_effective"] == round(rows[name]["macs"] / 4)
    assert rows["blocks.1.0.conv_sc"]["macs_effective"] == rows["blocks.1.0.conv_sc"]["macs"]


@pytest.mark.parametrize("sparsity", [0.3, 0.8])
@pytest.mark.parametrize("kwargs", [SMALL_G[0], SMALL_G[1]], ids=["shared-hier", "class-embeddings"])
def test_export_removes_the_masked_channels_and_keeps_the_outputs(kwargs, sparsity):
    g = biggan.Generator(**kwargs, mask="hard")
    _randomise(g)
    generator = torch.Generator().manual_seed(int(sparsity * 10))
    kept = {}
    for index, blocklist in enumerate(g.blocks):
        bn2 = blocklist[0].bn2
        channels = bn2.num_features
        removed = min(max(round(sparsity * channels), 1), channels - 1)
        values = torch.ones(channels)
        values[torch.randperm(channels, generator=generator)[:removed]] = 0
        bn2.mask = HardMask(channels, values)
        kept[f"blocks.{index}.0"] = int(values.sum())
    g.eval()
    z, ids = torch.randn(2, g.dim_z), torch.tensor([1, 3])
    want = g(z, _condition(g, ids))
    plain = biggan.exportable(g)
    torch.testing.assert_close(plain(z, _condition(plain, ids)), want, rtol=1e-5, atol=1e-6)
    compact = export.compact(plain, z, _condition(plain, ids))
    assert (compact(z, _condition(plain, ids)) - want).abs().max().item() <= 1e-5
    for block, channels in kept.items():
        conv1, conv2 = compact.get_submodule(f"{block}.conv1"), compact.get_submodule(f"{block}.conv2")
        assert conv1.out_channels == conv2.in_channels == channels < g.get_submodule(f"{block}.conv1").out_channels


# --- PP-Res blocks (PPCD-GAN) -------------------------------------------------------------------


def test_ppres_adds_a_conv2_mask_and_an_identity_transition_and_starts_as_the_plain_block():
    plain = biggan.Generator(**SMALL_G[1])
    pp = biggan.Generator(**SMALL_G[1], mask="sigmoid", mask_options=dict(temperature=2.0, pivot=0.01), ppres=True)
    assert [name for name, _ in named_masks(pp)] == [f"blocks.{i}.0.{layer}.mask" for i in range(4)
                                                      for layer in ("conv2", "bn2")]
    assert all(m.temperature == 2.0 and m.pivot == 0.01 for _, m in named_masks(pp))
    extra = set(pp.state_dict()) - set(plain.state_dict())
    assert all(".mask." in key or ".transition." in key for key in extra)
    assert {f"blocks.{i}.0.transition.weight" for i in range(4)} <= extra
    assert set(plain.state_dict()) <= set(pp.state_dict())
    _randomise(plain)
    pp.load_state_dict(plain.state_dict(), strict=False)
    for name, mask in list(named_masks(pp)):  # all-ones masks: only the transitions remain
        pp.get_submodule(name.rpartition(".")[0]).mask = HardMask(mask.channels)
    z, ids = torch.randn(3, pp.dim_z), torch.tensor([0, 4, 2])
    for train in (True, False):
        plain.train(train), pp.train(train)
        torch.testing.assert_close(pp(z, ids), plain(z, ids), rtol=1e-5, atol=1e-6)


def _prune_randomly(g: nn.Module, fraction: float, seed: int) -> None:
    """Sigmoid masks with random logits, binarised so that about `fraction` of each is 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mask in named_masks(g):
            mask.logits.copy_(torch.randn(mask.channels, generator=generator))
            order = torch.randperm(mask.channels, generator=generator)[:max(1, round(fraction * mask.channels))]
            mask.logits[order] = -10.0  # sigmoid(temperature * -10) is below the pivot
            mask.binarize_()


@pytest.mark.parametrize("kwargs", [SMALL_G[0], SMALL_G[1]], ids=["shared-hier", "class-embeddings"])
def test_ppres_export_removes_both_masks_channels_and_keeps_the_outputs(kwargs):
    g = biggan.Generator(**kwargs, mask="sigmoid", ppres=True)
    _randomise(g)
    _prune_randomly(g, 0.4, seed=len(kwargs))
    g.train()
    g(*g.example_inputs())  # batch statistics and power iterations move once
    g.eval()
    z, ids = torch.randn(3, g.dim_z), torch.tensor([1, 3, 0])
    want = g(z, ids)
    compact = export.compact(biggan.exportable(g))  # on G.example_inputs()
    assert (compact(z, _condition(g, ids)) - want).abs().max().item() <= 1e-5
    for index, blocklist in enumerate(g.blocks):
        block = blocklist[0]
        kept_1, kept_2 = int(block.bn2.mask.keep().sum()), int(block.conv2.mask.keep().sum())
        small = {name: compact.get_submodule(f"blocks.{index}.0.{name}") for name in ("conv1", "conv2", "transition")}
        assert small["conv1"].out_channels == small["conv2"].in_channels == kept_1 < block.conv1.out_channels
        assert small["conv2"].out_channels == small["transition"].in_channels == kept_2 < block.conv2.out_channels
        # the transition keeps the block's output width, so the next block and the shortcut still fit
        assert small["transition"].out_channels == block.conv_sc.out_channels
    params = sum(p.numel() for p in compact.parameters())
    assert params < sum(p.numel() for n, p in g.named_parameters() if ".mask." not in n)


def test_a_shared_generator_takes_class_ids_and_both_provide_example_inputs():
    g = biggan.Generator(**SMALL_G[0]).eval()
    ids = torch.tensor([4, 0])
    z = torch.randn(2, g.dim_z)
    torch.testing.assert_close(g(z, ids), g(z, g.shared(ids)))
    z1, y1 = g.example_inputs()
    assert z1.shape == (1, g.dim_z) and y1.shape == (1, g.shared_dim) and not y1.requires_grad
    z1, y1 = CLASS_IDS.example_inputs()
    assert z1.shape == (1, CLASS_IDS.dim_z) and y1.dtype == torch.int64 and y1.shape == (1,)
    x1, y1 = D32.example_inputs()
    assert x1.shape == (1, 3, 32, 32) and D32(x1, y1).shape == (1, 1)


# --- arguments and inputs -----------------------------------------------------------------------


def test_training_only_keywords_are_accepted_and_init_follows_G_init():
    g = biggan.Generator(**SMALL_G[1], G_lr=1e-4, G_B1=0.0, G_B2=0.999, adam_eps=1e-6, G_mixed_precision=False,
                         G_fp16=False, no_optim=True, G_init="ortho")
    w = g.blocks[0][0].conv1.weight.view(g.blocks[0][0].conv1.out_channels, -1)  # [out, in * 9], out < in * 9
    torch.testing.assert_close(w @ w.t(), torch.eye(w.shape[0]), rtol=0, atol=1e-5)
    biggan.Discriminator(**SMALL_D[0], D_lr=1e-4, D_B1=0.0, D_B2=0.999, adam_eps=1e-6, D_mixed_precision=False,
                         D_fp16=False, D_init="N02")


@pytest.mark.parametrize("make, error, message", [
    (lambda: biggan.Generator(G_ch=4, resolution=32, G_batch_size=8), TypeError, "unexpected keyword argument"),
    (lambda: biggan.Discriminator(D_ch=4, resolution=32, D_attn="16", G_ch=4), TypeError, "unexpected keyword"),
    (lambda: biggan.Generator(G_ch=4, resolution=32, cross_replica=True), ValueError, "cross_replica=True is not"),
    (lambda: biggan.Generator(G_ch=4, resolution=32, mybn=True), ValueError, "mybn=True is not supported"),
    (lambda: biggan.Generator(G_ch=4, resolution=32, norm_style="in"), ValueError, "norm_style must be 'bn'"),
    (lambda: biggan.Generator(G_ch=4, resolution=32, G_param="SVD"), ValueError, "G_param must be"),
    (lambda: biggan.Generator(G_ch=4, resolution=48), ValueError, "resolution must be one of"),
    (lambda: biggan.Generator(G_ch=4, resolution=32, G_attn="sixty"), ValueError, "G_attn must be resolutions"),
    (lambda: biggan.Generator(G_ch=4, resolution=32, G_activation=nn.LeakyReLU()), ValueError,
     "G_activation must be an nn.ReLU"),
    (lambda: biggan.Generator(G_ch=4, resolution=32, G_kernel_size=5), ValueError, "G_kernel_size must be 3"),
    (lambda: biggan.Generator(G_ch=4, resolution=32, G_init="kaiming"), ValueError, "G_init must be one of"),
    (lambda: biggan.Generator(G_ch=4, resolution=32, mask="l1"), ValueError, "mask must be None or one of"),
    (lambda: biggan.Generator(G_ch=4, resolution=32, mask_options=dict(temperature=2.0)), ValueError,
     "mask_options must be None or, with a mask"),
    (lambda: biggan.Generator(G_ch=4, dim_z=3, resolution=32, hier=True), ValueError, "dim_z must be at least 4"),
    (lambda: biggan.Generator(G_ch=1, resolution=32, G_attn="32"), ValueError, "ch must be an int >= 8"),
    (lambda: biggan.Generator(G_ch=4, resolution=32, G_shared=False, hier=True), ValueError, "hier=True needs G_sh"),
    (lambda: biggan.Discriminator(D_ch=4, resolution=32, D_param="None"), ValueError, "D_param must be 'SN'"),
    (lambda: biggan.SNLinear(3, 4, num_svs=0), ValueError, "num_svs must be an int >= 1"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_options_are_named(make, error, message):
    with pytest.raises(error, match=message):
        make()


SHARED = biggan.Generator(**SMALL_G[0], skip_init=True)  # shared_dim 8, dim_z 12
CLASS_IDS = biggan.Generator(**SMALL_G[1], skip_init=True)  # dim_z 8, class ids in [0, 5)
D32 = biggan.Discriminator(**SMALL_D[0], skip_init=True)


@pytest.mark.parametrize("call, message", [
    (lambda: SHARED(torch.randn(2, 13), torch.randn(2, 8)), r"z must be a floating-point tensor \[N, dim_z=12\]"),
    (lambda: SHARED(torch.ones(2, 12, dtype=torch.long), torch.randn(2, 8)), "z must be a floating-point"),
    (lambda: SHARED(torch.randn(2, 12), torch.randn(2, 7)), r"y must be G.shared\(class ids\).*or the class ids"),
    (lambda: SHARED(torch.randn(2, 12), torch.ones(2, 8, dtype=torch.long)), "y must be class ids"),
    (lambda: SHARED(torch.randn(2, 12), torch.tensor([0, 5])), r"class ids in \[0, 5\)"),
    (lambda: SHARED(torch.randn(2, 12), torch.randn(3, 8)), "y has 3 samples but z has 2"),
    (lambda: CLASS_IDS(torch.randn(2, 8), torch.randn(2, 8)), "y must be class ids"),
    (lambda: CLASS_IDS(torch.randn(2, 8), torch.tensor([0, 5])), r"class ids in \[0, 5\), got values in \[0, 5\]"),
    (lambda: CLASS_IDS(torch.randn(2, 8), torch.tensor([-1, 2])), r"class ids in \[0, 5\)"),
    (lambda: D32(torch.randn(2, 3, 64, 64), torch.tensor([0, 1])), r"x must be images \[N, 3, 32, 32\]"),
    (lambda: D32(torch.randn(2, 3, 32, 32), torch.tensor([0, 7])), r"class ids in \[0, 5\)"),
    (lambda: D32(torch.randn(2, 3, 32, 32), torch.tensor([[0, 1]])), "y must be class ids"),
    (lambda: SHARED.blocks[0][0].bn1(torch.randn(2, 15, 4, 4), torch.randn(2, 11)), r"x must be a tensor \[N, 16"),
], ids=range(13))
def test_bad_inputs_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
