"""The drop-in layers: masked convolutions, conditional batch norm and the fused conv + norm + mask +
activation module, against the torch modules they replace.

The layers run on the 'ref' backend here, and also on the compiled one once it provides the epilogue
op; the backends themselves are checked against each other in test_conv_norm_act.py.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gansparse import ConditionalBatchNorm2d, MaskedConv2d, MaskedConvNormAct, MaskedConvTranspose2d
from gansparse.masks import DMADMask, HardMask, SigmoidMask, dmad_mask
from gansparse.ops.conv_norm_act import compiled_ops

IMPLS = ["ref"] + (["cpu"] if compiled_ops() is not None else [])

# torch's own note on nn.Conv2d(padding='same') with an even kernel, one of the cases below.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


def assert_same_grads(a: nn.Module, b: nn.Module, atol=1e-6):
    assert len(list(a.parameters())) == len(list(b.parameters()))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=atol), name


# --- MaskedConv2d / MaskedConvTranspose2d --------------------------------------------------------

CONV_ARGS = [
    (3, 8, 3),
    (4, 6, (3, 1), 2, 1, 1, 2, False),
    (3, 5, 3, 1, 2, 2, 1, True, "reflect"),
    (3, 4, 3, 1, "same", 1, 1, True, "circular"),
    (2, 4, 4, 1, "same"),  # an even kernel: 'same' pads asymmetrically
]


@pytest.mark.parametrize("args", CONV_ARGS)
def test_masked_conv2d_without_mask_is_conv2d(args):
    torch.manual_seed(0)
    reference = nn.Conv2d(*args)
    torch.manual_seed(0)
    layer = MaskedConv2d(*args)
    assert list(layer.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value)
    x = torch.randn(2, args[0], 9, 8, requires_grad=True)
    out, expected = layer(x), reference(x)
    assert torch.equal(out, expected)
    (grad_x,) = torch.autograd.grad((out * out).sum(), x)
    (expected_grad_x,) = torch.autograd.grad((expected * expected).sum(), x)
    assert torch.equal(grad_x, expected_grad_x)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("args", CONV_ARGS)
def test_masked_conv2d_scales_channels(args, impl):
    torch.manual_seed(0)
    layer = MaskedConv2d(*args, mask="dmad", impl=impl)
    x = torch.randn(2, args[0], 9, 8)
    scale = dmad_mask(layer.mask.p, 1.0).detach()
    expected = nn.Conv2d.forward(layer, x) * scale[:, None, None]
    assert torch.allclose(layer(x), expected, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_channel_outputs_exactly_zero(impl):
    torch.manual_seed(0)
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0])
    layer = MaskedConv2d(3, 4, 3, padding=1, mask=HardMask(4, keep), impl=impl)
    x = torch.randn(2, 3, 6, 6)
    out = layer(x)
    assert torch.all(out[:, 1] == 0) and torch.all(out[:, 3] == 0)
    assert torch.allclose(out[:, 0::2], nn.Conv2d.forward(layer, x)[:, 0::2], atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_conv2d_trains_its_mask(impl):
    torch.manual_seed(0)
    layer = MaskedConv2d(3, 4, 3, mask="sigmoid", impl=impl)
    layer(torch.randn(2, 3, 5, 5)).square().sum().backward()
    assert layer.mask.logits.grad is not None and layer.mask.logits.grad.abs().sum() > 0
    assert layer.weight.grad is not None


TRANSPOSED_ARGS = [
    (3, 6, 3),
    (4, 6, 3, 2, 1, 1),
    (4, 6, (3, 2), 2, 1, 0, 2, False, 2),
]


@pytest.mark.parametrize("args", TRANSPOSED_ARGS)
def test_masked_conv_transpose2d_without_mask_is_conv_transpose2d(args):
    torch.manual_seed(0)
    reference = nn.ConvTranspose2d(*args)
    torch.manual_seed(0)
    layer = MaskedConvTranspose2d(*args)
    assert list(layer.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, args[0], 5, 4)
    assert torch.equal(layer(x), reference(x))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("args", TRANSPOSED_ARGS)
def test_masked_conv_transpose2d_scales_channels(args, impl):
    torch.manual_seed(0)
    layer = MaskedConvTranspose2d(*args, mask="dmad", impl=impl)
    x = torch.randn(2, args[0], 5, 4, requires_grad=True)
    scale = dmad_mask(layer.mask.p, 1.0)[:, None, None]
    out, expected = layer(x), nn.ConvTranspose2d.forward(layer, x) * scale
    assert torch.allclose(out, expected, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), (x, layer.weight, layer.mask.p))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, layer.weight, layer.mask.p))
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad, expected_grad, atol=1e-5)


@pytest.mark.parametrize("mask", [None, "hard"])
def test_masked_conv_transpose2d_output_size(mask):
    torch.manual_seed(0)
    layer = MaskedConvTranspose2d(3, 4, 3, stride=2, padding=1, mask=mask, impl="ref")
    x = torch.randn(1, 3, 5, 5)
    out = layer(x, output_size=[10, 10])
    assert out.shape == (1, 4, 10, 10)
    assert torch.allclose(out, nn.ConvTranspose2d.forward(layer, x, output_size=[10, 10]), atol=1e-6)


@pytest.mark.parametrize("cls, torch_cls", [(MaskedConv2d, nn.Conv2d), (MaskedConvTranspose2d, nn.ConvTranspose2d)])
def test_from_conv_shares_parameters(cls, torch_cls):
    torch.manual_seed(0)
    conv = torch_cls(3, 4, 3, stride=2, padding=1, bias=True)
    layer = cls.from_conv(conv, mask="sigmoid", impl="ref")
    assert layer.weight is conv.weight and layer.bias is conv.bias
    assert isinstance(layer.mask, SigmoidMask) and layer.mask.logits.device == conv.weight.device
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(layer(x), conv(x) * 0.5, atol=1e-6)
    unmasked = cls.from_conv(conv)
    assert torch.equal(unmasked(x), conv(x))
    assert list(unmasked.state_dict()) == list(conv.state_dict())
    with pytest.raises(TypeError, match="conv must be"):
        cls.from_conv(nn.Linear(3, 4))


def test_masked_conv_repr_shows_the_mask():
    assert "mask='dmad'" in repr(MaskedConv2d(3, 4, 3, mask="dmad"))
    assert "mask=None" in repr(MaskedConvTranspose2d(3, 4, 3))


def test_masked_conv_rejects_bad_masks():
    with pytest.raises(ValueError, match="mask must be None, one of"):
        MaskedConv2d(3, 4, 3, mask="l1")
    with pytest.raises(TypeError, match="mask must be None, one of"):
        MaskedConv2d(3, 4, 3, mask=torch.ones(4))
    with pytest.raises(ValueError, match="mask has 5 channels but the layer has 4 output channels"):
        MaskedConv2d(3, 4, 3, mask=DMADMask(5))
    with pytest.raises(ValueError, match="impl must be"):
        MaskedConv2d(3, 4, 3, mask="dmad", impl="gpu")


# --- ConditionalBatchNorm2d ----------------------------------------------------------------------


def reference_cbn(x, gain, bias, running_mean, running_var, training, eps=1e-5, momentum=0.1):
    out = F.batch_norm(x, running_mean, running_var, None, None, training, momentum, eps)
    return out * gain[:, :, None, None] + bias[:, :, None, None]


@pytest.mark.parametrize("impl", IMPLS)
def test_conditional_batch_norm_embedding(impl):
    torch.manual_seed(0)
    norm = ConditionalBatchNorm2d(4, num_classes=3, impl=impl)
    assert torch.equal(norm.gain.weight, torch.ones(3, 4)) and torch.equal(norm.bias.weight, torch.zeros(3, 4))
    with torch.no_grad():
        norm.gain.weight.normal_()
        norm.bias.weight.normal_()
    x, y = torch.randn(5, 4, 3, 3), torch.tensor([0, 2, 1, 2, 0])
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    expected = reference_cbn(x, norm.gain.weight[y], norm.bias.weight[y], running_mean, running_var, True)
    assert torch.allclose(norm(x, y), expected, atol=1e-5)
    assert torch.allclose(norm.running_mean, running_mean) and torch.allclose(norm.running_var, running_var)
    norm.eval()
    expected = reference_cbn(x, norm.gain.weight[y], norm.bias.weight[y], running_mean, running_var, False)
    assert torch.allclose(norm(x, y), expected, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_conditional_batch_norm_linear_like_biggan_ccbn(impl):
    torch.manual_seed(0)
    norm = ConditionalBatchNorm2d(4, cond_dim=6, eps=1e-4, impl=impl)
    assert isinstance(norm.gain, nn.Linear) and isinstance(norm.bias, nn.Linear)
    assert {"gain.weight", "gain.bias", "bias.weight", "bias.bias"} <= set(norm.state_dict())
    x, y = torch.randn(3, 4, 5, 5, requires_grad=True), torch.randn(3, 6)
    gain = 1 + y @ norm.gain.weight.T + norm.gain.bias
    bias = y @ norm.bias.weight.T + norm.bias.bias
    expected = reference_cbn(x, gain, bias, None, None, True, eps=1e-4)
    out = norm(x, y)
    assert torch.allclose(out, expected, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (x, norm.gain.weight, norm.bias.bias))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, norm.gain.weight, norm.bias.bias))
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad, expected_grad, atol=1e-4)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_conditional_batch_norm_running_stats_match_batch_norm(momentum):
    torch.manual_seed(0)
    norm = ConditionalBatchNorm2d(4, num_classes=2, momentum=momentum, impl="ref")
    reference = nn.BatchNorm2d(4, momentum=momentum, affine=False)
    y = torch.tensor([0, 1, 1])
    for _ in range(3):
        x = torch.randn(3, 4, 4, 4) * 2 + 1
        assert torch.allclose(norm(x, y), reference(x), atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(norm, name), getattr(reference, name)), name
    norm.eval(), reference.eval()
    x = torch.randn(3, 4, 4, 4)
    assert torch.allclose(norm(x, y), reference(x), atol=1e-5)


def test_conditional_batch_norm_without_running_stats():
    norm = ConditionalBatchNorm2d(2, num_classes=2, track_running_stats=False, impl="ref").eval()
    assert norm.running_mean is None
    x = torch.randn(4, 2, 3, 3)
    assert torch.allclose(norm(x, torch.tensor([0, 1, 0, 1])), F.batch_norm(x, None, None, training=True), atol=1e-5)


def test_conditional_batch_norm_errors():
    with pytest.raises(ValueError, match="exactly one of num_classes .* and cond_dim"):
        ConditionalBatchNorm2d(4)
    with pytest.raises(ValueError, match="exactly one of num_classes .* and cond_dim"):
        ConditionalBatchNorm2d(4, num_classes=3, cond_dim=8)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        ConditionalBatchNorm2d(4, num_classes=0)
    by_class = ConditionalBatchNorm2d(4, num_classes=3, impl="ref")
    by_vector = ConditionalBatchNorm2d(4, cond_dim=5, impl="ref")
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="y must be class indices"):
        by_class(x, torch.randn(2))
    with pytest.raises(ValueError, match="y has 3 samples but the input has 2"):
        by_class(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"y must be a floating-point condition of shape \[N, 5\]"):
        by_vector(x, torch.randn(2, 4))
    with pytest.raises(ValueError, match="x has 3 channels"):
        by_vector(torch.randn(2, 3, 3, 3), torch.randn(2, 5))


# --- MaskedConvNormAct ---------------------------------------------------------------------------

SEQUENTIALS = {
    "conv-bn-relu": lambda: (nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()),
    "conv-bn(no affine, cumulative)-leaky": lambda: (
        nn.Conv2d(3, 6, 3, stride=2, bias=False), nn.BatchNorm2d(6, affine=False, momentum=None), nn.LeakyReLU(0.1)),
    "conv-bn(no running stats)-relu": lambda: (
        nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6, track_running_stats=False), nn.ReLU(inplace=True)),
    "convT-in(affine)-relu": lambda: (
        nn.ConvTranspose2d(3, 6, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(6, affine=True),
        nn.ReLU()),
    "reflect conv-in-none": lambda: (nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"), nn.InstanceNorm2d(6),
                                     None),
    "conv-none-leaky": lambda: (nn.Conv2d(3, 6, 3), None, nn.LeakyReLU(0.2)),
    "convT-bn-identity": lambda: (nn.ConvTranspose2d(3, 6, 4, stride=2, padding=1), nn.BatchNorm2d(6), nn.Identity()),
}


def perturb_affine(norm):
    if norm is not None and getattr(norm, "weight", None) is not None:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(SEQUENTIALS))
def test_from_modules_equals_the_sequential_modules(case, impl):
    torch.manual_seed(0)
    conv, norm, act = SEQUENTIALS[case]()
    perturb_affine(norm)
    sequential = nn.Sequential(*[m for m in (conv, norm, act) if m is not None])
    fused = MaskedConvNormAct.from_modules(*copy.deepcopy((conv, norm, act)), impl=impl)
    for step in range(3):
        x = torch.randn(4, 3, 7, 7) * 2 + step
        out, expected = fused(x), sequential(x)
        assert torch.allclose(out, expected, atol=1e-5), step
        out.square().sum().backward()
        expected.square().sum().backward()
    assert_same_grads(fused, sequential, atol=1e-3)
    assert len(fused.state_dict()) == len(sequential.state_dict())
    for (name, value), expected_value in zip(fused.state_dict().items(), sequential.state_dict().values()):
        assert torch.allclose(value.double(), expected_value.double(), atol=1e-6), name
    fused.eval(), sequential.eval()
    x = torch.randn(2, 3, 7, 7)
    assert torch.allclose(fused(x), sequential(x), atol=1e-5)


def test_from_modules_uses_the_given_modules():
    conv, norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    fused = MaskedConvNormAct.from_modules(conv, norm, nn.ReLU(), impl="ref")
    assert fused.conv is conv and fused.norm is norm
    fused(torch.randn(2, 3, 5, 5))
    assert norm.num_batches_tracked.item() == 1 and norm.running_mean.abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_from_modules_with_conditional_norm_and_mask(impl):
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(3, 4, 3, padding=1), ConditionalBatchNorm2d(4, num_classes=3, impl="ref")
    with torch.no_grad():
        norm.bias.weight.normal_()
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0])
    fused = MaskedConvNormAct.from_modules(copy.deepcopy(conv), copy.deepcopy(norm), nn.ReLU(), HardMask(4, keep),
                                           impl=impl)
    x, y = torch.randn(3, 3, 5, 5), torch.tensor([2, 0, 1])
    expected = F.relu(norm(conv(x), y) * keep[:, None, None])
    out = fused(x, y)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.all(out[:, 1] == 0)
    with pytest.raises(ValueError, match="y .* is required"):
        fused(x)


@pytest.mark.parametrize("impl", IMPLS)
def test_constructed_directly(impl):
    torch.manual_seed(0)
    layer = MaskedConvNormAct(3, 8, 3, padding=1, cond_dim=5, mask="sigmoid", impl=impl)
    assert isinstance(layer.norm, ConditionalBatchNorm2d) and isinstance(layer.mask, SigmoidMask)
    x, y = torch.randn(2, 3, 6, 6), torch.randn(2, 5)
    out = layer(x, y)
    expected = F.relu(layer.norm(layer.conv(x), y) * 0.5)
    assert torch.allclose(out, expected, atol=1e-5)
    out.sum().backward()
    assert layer.mask.logits.grad is not None and layer.norm.gain.weight.grad is not None

    layer = MaskedConvNormAct(4, 2, 4, stride=2, padding=1, transposed=True, norm="instance", affine=False,
                              activation="leaky_relu", negative_slope=0.1, impl=impl)
    x = torch.randn(2, 4, 3, 3)
    expected = F.leaky_relu(F.instance_norm(layer.conv(x)), 0.1)
    assert layer(x).shape == (2, 2, 6, 6)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert isinstance(MaskedConvNormAct(3, 4, 3, norm="none").norm, type(None))


def test_masked_conv_norm_act_errors():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="mask must be None, one of"):
        MaskedConvNormAct.from_modules(conv, mask="topk")
    with pytest.raises(ValueError, match="mask has 3 channels but the layer has 4"):
        MaskedConvNormAct.from_modules(conv, mask=DMADMask(3))
    with pytest.raises(ValueError, match="norm has 5 features but conv has 4 output channels"):
        MaskedConvNormAct.from_modules(conv, nn.BatchNorm2d(5))
    with pytest.raises(TypeError, match="norm must be"):
        MaskedConvNormAct.from_modules(conv, nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match="track_running_stats"):
        MaskedConvNormAct.from_modules(conv, nn.InstanceNorm2d(4, track_running_stats=True))
    with pytest.raises(TypeError, match="act must be"):
        MaskedConvNormAct.from_modules(conv, act=nn.Tanh())
    with pytest.raises(TypeError, match="conv must be"):
        MaskedConvNormAct.from_modules(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="conv already has a mask"):
        MaskedConvNormAct.from_modules(MaskedConv2d(3, 4, 3, mask="dmad"))
    with pytest.raises(ValueError, match="norm must be one of"):
        MaskedConvNormAct(3, 4, 3, norm="group")
    with pytest.raises(ValueError, match="activation must be one of"):
        MaskedConvNormAct(3, 4, 3, activation="gelu")
    with pytest.raises(ValueError, match="norm='instance'"):
        MaskedConvNormAct(3, 4, 3, norm="instance", num_classes=10)
    with pytest.raises(ValueError, match="x has 2 channels"):
        MaskedConvNormAct(3, 4, 3, impl="ref")(torch.randn(2, 2, 5, 5))
