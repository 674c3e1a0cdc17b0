"""gansparse.export: compact models compute what the masked ones compute (with masks snapped to
their kept channels), lose the channels they should and only those, contain only torch layers,
and survive a save / load round trip."""
import pytest
import torch
from torch import nn

import gansparse
from gansparse import (ConditionalBatchNorm2d, MaskedConv2d, MaskedConvNormAct, MaskedConvTranspose2d, SparseConv2d,
                       export)
from gansparse.masks import DMADMask, HardMask, SigmoidMask, binarize_masks_, named_masks
from gansparse.models import NLayerDiscriminator, ResnetGenerator, UnetGenerator
from gansparse.models.norms import ChannelMask


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _assert_plain(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert type(module).__module__.startswith("torch."), f"{name} is a {type(module).__module__} module"


def _set_masks(model: nn.Module, sparsity: float, generator: torch.Generator) -> None:
    """Every mask drops round(sparsity * C) random channels; kept DMAD / sigmoid masks get values
    strictly between 0 and 1, so folding them is tested too."""
    for _, mask in named_masks(model):
        drop = torch.randperm(mask.channels, generator=generator)[:round(sparsity * mask.channels)]
        with torch.no_grad():
            if isinstance(mask, DMADMask):
                mask.p.copy_(torch.rand(mask.channels, generator=generator) * 0.8 + 0.1)  # values in (0.5, 1)
                mask.p[drop] = -0.5
            elif isinstance(mask, SigmoidMask):
                mask.logits.copy_(torch.randn(mask.channels, generator=generator) * 0.3)
                mask.logits[drop] = -5.0
            else:
                values = torch.ones(mask.channels)
                values[drop] = 0
                mask._freeze_(values)


def _randomise_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running statistics and affines, so masked channels carry non-zero constants."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
            if isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d)) and module.affine:
                module.weight.normal_(generator=generator)
                module.bias.normal_(generator=generator)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.7])
@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_resnet_generator(norm, sparsity):
    generator = torch.Generator().manual_seed(1)
    model = ResnetGenerator(3, 3, ngf=8, norm=norm, n_blocks=3, mask="dmad")
    _set_masks(model, sparsity, generator)
    _randomise_norms(model, generator)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    compact = export.compact(model, x)
    export.check_equivalence(model, compact, x)
    export.check_equivalence(model, compact, torch.randn(1, 3, 40, 24))  # other inputs, other sizes
    _assert_plain(compact)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(mask.frozen for _, mask in named_masks(model))
    if sparsity == 0:
        convs = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))}
        assert all((compact.get_submodule(name).in_channels, compact.get_submodule(name).out_channels) ==
                   (conv.in_channels, conv.out_channels) for name, conv in convs.items())
    else:  # a block's inner channels go where its mask drops them, the stream's where all 4 masks do
        inner = 32 - round(32 * sparsity)
        stream = 32 - int(torch.stack([~mask.keep() for mask in _stream_masks(model)]).all(0).sum())
        for block in (10, 11, 12):
            first, second = (compact.get_submodule(f"model.{block}.conv_block.{i}") for i in (1, 5))
            assert (first.in_channels, first.out_channels, second.in_channels, second.out_channels) == (
                stream, inner, inner, stream)


@pytest.mark.parametrize("sparsity", [0.4, 0.7])
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_unet_generator_sigmoid_masks(norm, sparsity, tmp_path):
    generator = torch.Generator().manual_seed(2)
    model = UnetGenerator(3, 2, num_downs=5, ngf=8, norm=norm, mask="sigmoid")
    _set_masks(model, sparsity, generator)
    _randomise_norms(model, generator)
    x = torch.randn(2, 3, 32, 32)
    compact = export.compact(model, x)
    export.check_equivalence(model, compact, x)
    _assert_plain(compact)
    # Every up conv reads the skip concatenation of its level: both halves lost channels.
    up = "model.model.1.model.3.model.3.model.5"  # reads [x, innermost level]
    assert compact.get_submodule(up).in_channels < model.get_submodule(up).in_channels
    path = tmp_path / "unet.safetensors"
    export.save(compact, path)
    with torch.no_grad():
        assert torch.equal(export.load(path)(x), compact(x))


def test_binarised_masks_equal_the_model_itself():
    generator = torch.Generator().manual_seed(3)
    model = ResnetGenerator(3, 3, ngf=8, norm="instance", n_blocks=2, mask="sigmoid")
    _set_masks(model, 0.5, generator)
    binarize_masks_(model).eval()
    x = torch.randn(1, 3, 32, 32)
    compact = export.compact(model, x)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), atol=1e-5, rtol=0)


def _zoo_case(name: str):
    """(masked model, inputs) of another zoo generator, small."""
    from gansparse.models import MobileResnetGenerator, biggan, dcgan, sngan, stylegan2

    if name == "mobile_resnet":
        return MobileResnetGenerator(3, 3, ngf=8, n_blocks=3, mask="dmad"), (torch.randn(1, 3, 32, 32),)
    if name == "sngan":
        return sngan.Generator(z_dim=16, ch=32, mask="dmad"), (torch.randn(2, 16),)
    if name == "dcgan":
        return dcgan.Generator(nz=16, ngf=8, mask="sigmoid"), (torch.randn(2, 16, 1, 1),)
    if name == "stylegan2":  # compacted as its exportable(), z -> image
        g = stylegan2.Generator(32, 16, 2, channels={4: 16, 8: 16, 16: 12, 32: 8}, mask="dmad")
        return g, (torch.randn(2, 16),)
    big = biggan.Generator(G_ch=8, dim_z=16, shared_dim=8, resolution=32, G_attn="16", n_classes=5, hier=True,
                           mask="dmad")
    return big, (torch.randn(2, 16), big.shared(torch.tensor([1, 3])).detach())


@pytest.mark.parametrize("sparsity", [0.3, 0.6])
@pytest.mark.parametrize("name", ["mobile_resnet", "sngan", "dcgan", "biggan", "stylegan2"])
def test_other_zoo_generators(name, sparsity):
    from gansparse.models import biggan

    model, inputs = _zoo_case(name)
    _set_masks(model, sparsity, torch.Generator().manual_seed(8))
    _randomise_norms(model, torch.Generator().manual_seed(9))
    if name == "biggan":  # spectral norm and BigGAN's norms as torch / gansparse layers
        model = biggan.exportable(model)
    compact = export.compact(model, *inputs)
    export.check_equivalence(model, compact, *inputs)
    _assert_plain(compact)
    assert _n_params(compact) < (1 - sparsity / 2) * _n_params(model)


def _zoo_models():
    """Every model of the zoo but BigGAN's (its G and D get their example inputs with BigGAN's own
    changes), the generators with masks."""
    from gansparse.models import MobileResnetGenerator, PixelDiscriminator, dcgan, sngan, stylegan2

    narrow = {4: 16, 8: 16, 16: 12, 32: 8}
    return {
        "resnet": ResnetGenerator(3, 3, ngf=8, n_blocks=2, mask="hard"),
        "unet": UnetGenerator(3, 3, 5, ngf=8, mask="hard"),
        "mobile_resnet": MobileResnetGenerator(3, 3, ngf=8, n_blocks=3, mask="hard"),
        "sngan-G": sngan.Generator(16, 16, mask="hard"),
        "dcgan-G": dcgan.Generator(16, 8, mask="hard"),
        "stylegan2-G": stylegan2.Generator(32, 16, 2, channels=narrow, mask="hard"),
        "nlayer-D": NLayerDiscriminator(3, 8),
        "pixel-D": PixelDiscriminator(3, 8),
        "sngan-D": sngan.Discriminator(8),
        "dcgan-D": dcgan.Discriminator(3, 8),
        "stylegan2-D": stylegan2.Discriminator(32, channels=narrow),
    }


@pytest.mark.parametrize("name", list(_zoo_models()))
def test_every_zoo_model_compacts_without_inputs(name):
    model = _zoo_models()[name]
    _set_masks(model, 0.5, torch.Generator().manual_seed(10))
    inputs = model.example_inputs()  # forward's: StyleGAN2's generator takes a list of z
    first = inputs[0][0] if isinstance(inputs[0], list) else inputs[0]
    assert isinstance(inputs, tuple) and first.shape[0] == 1
    compact = export.compact(model)
    traced = model.exportable() if hasattr(model, "exportable") else model  # and its inputs
    export.check_equivalence(model, compact, *traced.example_inputs())
    _assert_plain(compact)
    if name.endswith("-D"):
        assert _n_params(compact) == _n_params(model)
    else:
        assert _n_params(compact) < _n_params(model)


def _stream_masks(model: ResnetGenerator) -> list:
    """The masks on the residual stream: the last downsampling's and each block's second one."""
    blocks = [m for m in model.model if type(m).__name__ == "ResnetBlock"]
    return [model.model[8].mask] + [block.conv_block[6].mask for block in blocks]


def test_residual_stream_channel_goes_only_if_masked_in_every_block():
    model = ResnetGenerator(3, 3, ngf=4, norm="instance", n_blocks=3, mask="hard")
    gone, stays = 5, 9
    for i, mask in enumerate(_stream_masks(model)):
        values = torch.ones(16)
        values[gone] = 0
        if i != 2:  # the second block keeps `stays`
            values[stays] = 0
        mask._freeze_(values)
    x = torch.randn(1, 3, 32, 32)
    compact = export.compact(model, x)
    export.check_equivalence(model, compact, x)
    for name in ("model.7", "model.11.conv_block.5"):  # the stream's producers
        assert compact.get_submodule(name).out_channels == 15, name
    for name in ("model.10.conv_block.1", "model.12.conv_block.1", "model.13"):  # and its readers
        assert compact.get_submodule(name).in_channels == 15, name


def test_fully_masked_layer():
    model = ResnetGenerator(3, 3, ngf=8, norm="batch", n_blocks=1, mask="hard")
    model.model[2].mask._freeze_(torch.zeros(8))  # the first conv's channels are all masked
    _randomise_norms(model, torch.Generator().manual_seed(4))
    x = torch.randn(2, 3, 32, 32)
    compact = export.compact(model, x)
    export.check_equivalence(model, compact, x)
    assert compact.get_submodule("model.1").out_channels == 1  # a tensor keeps one (zero) channel


def test_no_masks_gives_an_equal_plain_copy():
    model = ResnetGenerator(3, 3, ngf=8, norm="batch", n_blocks=2).eval()
    x = torch.randn(1, 3, 32, 32)
    compact = export.compact(model, x)
    _assert_plain(compact)
    assert _n_params(compact) == _n_params(model)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), atol=1e-5, rtol=0)


def test_example_inputs_from_the_model():
    class WithExample(nn.Sequential):
        def example_inputs(self):
            return torch.randn(1, 3, 8, 8)

    model = WithExample(MaskedConv2d(3, 4, 3, mask="hard"), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model[0].mask._freeze_(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert export.compact(model).get_submodule("2").in_channels == 3


# --- hand-built user models -------------------------------------------------------------------


def _hard(channels: int, dropped) -> HardMask:
    values = torch.ones(channels)
    values[list(dropped)] = 0
    return HardMask(channels, values)


@pytest.mark.parametrize("padding_mode", ["reflect", "zeros"])
def test_constant_of_a_masked_channel_is_folded_only_where_exact(padding_mode):
    """conv -> batch norm -> ReLU gives relu(beta - gamma * mean / sqrt(var + eps)) on a masked
    channel: folded into the next conv's bias with reflection padding, kept with zero padding."""
    model = nn.Sequential(MaskedConv2d(3, 8, 3, padding=1, mask=_hard(8, [1, 4])), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, padding=1, padding_mode=padding_mode), nn.Tanh())
    with torch.no_grad():
        model[1].bias.copy_(torch.linspace(0.5, 1.5, 8))  # every masked channel gives a positive constant
        model[1].running_mean.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 16, 16)
    compact = export.compact(model, x)
    export.check_equivalence(model, compact, x)
    expected = 6 if padding_mode == "reflect" else 8
    assert compact.get_submodule("0").out_channels == compact.get_submodule("3").in_channels == expected
    assert compact.get_submodule("1").num_features == expected


def test_pooled_features_into_a_linear_layer():
    """The constants of masked channels (after batch norm) pass the pooling and flattening and
    fold into the linear layer's bias."""
    model = nn.Sequential(MaskedConv2d(3, 8, 3, mask=_hard(8, [2, 5])), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        model[1].bias.fill_(0.5)
    x = torch.randn(2, 3, 8, 8)
    compact = export.compact(model, x)
    export.check_equivalence(model, compact, x)
    assert compact.get_submodule("5").in_features == 6


def test_parameter_counts_of_a_user_model():
    model = nn.Sequential(
        MaskedConv2d(3, 16, 3, padding=1, mask=_hard(16, range(6))), nn.ReLU(),
        MaskedConv2d(16, 32, 3, stride=2, padding=1, mask=_hard(32, range(0, 32, 2))), nn.LeakyReLU(0.2),
        MaskedConvTranspose2d(32, 8, 4, 2, 1, mask=_hard(8, [7])), nn.ReLU(),
        nn.Conv2d(8, 3, 1))
    x = torch.randn(2, 3, 16, 16)
    compact = export.compact(model, x)
    export.check_equivalence(model, compact, x)
    expected = (10 * 3 * 9 + 10) + (16 * 10 * 9 + 16) + (16 * 7 * 16 + 7) + (3 * 7 + 3)
    assert _n_params(compact) == expected


def test_sparse_conv_with_pruned_filters():
    conv = SparseConv2d(3, 8, 3, padding=1)
    mask = (torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(7)) < 0.5).float()
    mask[[2, 5]] = 0  # two filters pruned whole: their channels are relu(bias), constants
    conv.set_mask_(mask)
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Tanh())
    x = torch.randn(2, 3, 8, 8)
    compact = export.compact(model, x)
    export.check_equivalence(model, compact, x)
    _assert_plain(compact)
    assert compact.get_submodule("0").out_channels == compact.get_submodule("2").in_channels == 6


class _ConditionalNet(nn.Module):
    """A conv + CBN + mask + ReLU block, then conv, CBN, mask after the norm, ReLU, conv."""

    def __init__(self, conditional: dict) -> None:
        super().__init__()
        self.block = MaskedConvNormAct(4, 8, 3, padding=1, mask=_hard(8, [0, 3, 5]), **conditional)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.cbn = ConditionalBatchNorm2d(6, **conditional)
        self.mask = ChannelMask(6, mask=_hard(6, [1]))
        self.out = nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, x, y):
        return self.out(torch.relu(self.mask(self.cbn(self.conv(self.block(x, y)), y))))


@pytest.mark.parametrize("conditional", [dict(num_classes=5), dict(cond_dim=6)])
def test_conditional_batch_norm(conditional, tmp_path):
    model = _ConditionalNet(conditional)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in (model.block.norm, model.cbn):
            module.running_mean.normal_(generator=generator)
            for part in (module.gain, module.bias):
                part.weight.normal_(generator=generator)
    x = torch.randn(3, 4, 8, 8)
    y = torch.tensor([0, 4, 2]) if "num_classes" in conditional else torch.randn(3, 6)
    compact = export.compact(model, x, y)
    export.check_equivalence(model, compact, x, y)
    _assert_plain(compact)
    # Masked channels go with their CBN statistics and their rows of the embeddings / linear maps.
    assert compact.get_submodule("block.conv").out_channels == compact.conv.in_channels == 5
    assert compact.get_submodule("block.norm").num_features == _out_features(compact.get_submodule("block.beta")) == 5
    assert compact.conv.out_channels == compact.get_submodule("cbn.norm").num_features == 5
    assert _out_features(compact.get_submodule("cbn.gamma")) == compact.out.in_channels == 5
    path = tmp_path / "conditional.safetensors"
    export.save(compact, path)
    with torch.no_grad():
        assert torch.equal(export.load(path)(x, y), compact(x, y))


def _out_features(module: nn.Module) -> int:
    return module.embedding_dim if isinstance(module, nn.Embedding) else module.out_features


class _SelfAttention(nn.Module):
    """SA-GAN's attention block shape: theta, phi, g 1x1 projections, softmax(theta^T phi), o."""

    def __init__(self, channels: int, theta_mask, phi_mask, g_mask) -> None:
        super().__init__()
        self.theta = MaskedConv2d(channels, channels // 2, 1, bias=False, mask=theta_mask)
        self.phi = MaskedConv2d(channels, channels // 2, 1, bias=False, mask=phi_mask)
        self.g = MaskedConv2d(channels, channels // 2, 1, bias=False, mask=g_mask)
        self.o = nn.Conv2d(channels // 2, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        n, c, h, w = x.shape
        theta = self.theta(x).view(n, -1, h * w)
        phi = nn.functional.max_pool2d(self.phi(x), 2).view(n, -1, h * w // 4)
        g = nn.functional.max_pool2d(self.g(x), 2).view(n, -1, h * w // 4)
        beta = torch.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)  # [N, HW, HW / 4]
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(n, -1, h, w))
        return x + self.gamma * o


def test_self_attention_projections(tmp_path):
    # theta drops 1 and 2, phi drops 2 and 6: channels 1, 2, 6 leave the query-key product.
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1),
                          _SelfAttention(16, _hard(8, [1, 2]), _hard(8, [2, 6]), _hard(8, [0])), nn.Tanh())
    x = torch.randn(2, 3, 8, 8)
    compact = export.compact(model, x)
    export.check_equivalence(model, compact, x)
    assert compact.get_submodule("1.theta").out_channels == compact.get_submodule("1.phi").out_channels == 5
    assert compact.get_submodule("1.g").out_channels == compact.get_submodule("1.o").in_channels == 7
    path = tmp_path / "attention.safetensors"
    export.save(compact, path)
    with torch.no_grad():
        assert torch.equal(export.load(path)(x), compact(x))


# --- save / load ------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(6)
    model = ResnetGenerator(3, 3, ngf=8, norm="batch", n_blocks=2, mask="dmad")
    _set_masks(model, 0.5, generator)
    _randomise_norms(model, generator)
    x = torch.randn(1, 3, 32, 32)
    compact = export.compact(model, x)
    path = tmp_path / "g.safetensors"
    export.save(compact, path)
    loaded = export.load(path)
    assert not loaded.training and _n_params(loaded) == _n_params(compact)
    _assert_plain(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x), compact(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.safetensors"]  # no temporary file left


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a model saved by gansparse.export.save"):
        export.load(path)


def test_load_calls_only_the_functions_it_knows(tmp_path):
    """A graph may call gansparse's upfirdn2d and fused_leaky_relu by name, no other gansparse
    function (nor anything outside torch, torch.nn.functional and operator)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    graph = torch.fx.Graph()
    graph.output(graph.call_function(gansparse.functional.fused_leaky_relu, (graph.placeholder("x"),)))
    path = tmp_path / "act.safetensors"
    export.save(torch.fx.GraphModule(nn.Module(), graph), path)
    x = torch.randn(2, 3)
    torch.testing.assert_close(export.load(path)(x), gansparse.functional.fused_leaky_relu(x))
    with safe_open(path, framework="pt") as file:
        architecture = json.loads(file.metadata()["gansparse.export"])
    for name in ("gansparse.functional.sparse_conv2d", "os.system"):
        for node in architecture["graph"]:
            if node["op"] == "call_function":
                node["target"] = name
        save_file({}, path, metadata={"gansparse.export": json.dumps(architecture)})
        with pytest.raises(ValueError, match=f"unknown function '{name}'"):
            export.load(path)


def test_save_needs_a_compact_model(tmp_path):
    model = nn.Sequential(MaskedConv2d(3, 4, 3, mask="hard"))
    with pytest.raises(ValueError, match="call gansparse.export.compact first"):
        export.save(model, tmp_path / "m.safetensors")


# --- bad input --------------------------------------------------------------------------------


def test_untraceable_model():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = MaskedConv2d(3, 4, 3, mask="hard")

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="could not trace DataDependent with torch.fx"):
        export.compact(DataDependent(), torch.randn(1, 3, 8, 8))


def test_unknown_gansparse_module_is_named():
    class MyConv(MaskedConv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(3, 3, 1), MyConv(3, 4, 3, mask="hard"))
    with pytest.raises(NotImplementedError, match="module '1' of type .*MyConv"):
        export.compact(model, torch.randn(1, 3, 8, 8))


def test_gansparse_module_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = MaskedConv2d(4, 4, 3, padding=1, mask="hard")

        def forward(self, x):
            return self.conv(self.conv(x))

    with pytest.raises(NotImplementedError, match="module 'conv' .* is called more than once"):
        export.compact(Twice(), torch.randn(1, 4, 8, 8))


def test_missing_example_inputs_and_bad_model():
    with pytest.raises(ValueError, match="compact needs example inputs for Sequential"):
        export.compact(nn.Sequential(MaskedConv2d(3, 4, 3)))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        export.compact("generator")


def test_check_equivalence_reports_a_difference():
    model = nn.Sequential(MaskedConv2d(3, 4, 3, mask=_hard(4, [0])))
    x = torch.randn(1, 3, 8, 8)
    compact = export.compact(model, x)
    with torch.no_grad():
        compact.get_submodule("0").bias.add_(1e-3)
    with pytest.raises(AssertionError, match="differs from the masked one"):
        export.check_equivalence(model, compact, x)
