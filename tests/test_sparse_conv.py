"""Sparse convolution, C++ backend: the compiled op gansparse::sparse_conv2d against the masked
dense reference (F.conv2d / F.conv_transpose2d) for every sparsity and granularity, through the
SparseConv2d / SparseConvTranspose2d layers and sparsify; the training path; torch.library
registration; bad input and fuzzing of the C++ entry point."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gansparse
import gansparse.functional as GF
from gansparse import _ext, prune
from gansparse.ops.sparse_conv import SparseWeight, compiled_op, compress
from gansparse.ops.sparse_conv_ref import densify, sparse_conv2d_ref
from gansparse.sparse import SparseConv2d, SparseConvTranspose2d, sparsify
from models.pix2pix import ResnetGenerator

pytestmark = pytest.mark.skipif(compiled_op() is None, reason="gansparse._C is not built")

TOL = 2e-5  # relative to the largest output magnitude: summation order differs only

# (layer class, constructor arguments, input [C, H, W]): the convs generators have, at odd sizes.
CONVS = {
    "k3-s1": (SparseConv2d, (8, 10, 3, 1, 1), (8, 11, 13)),
    "k3-s2": (SparseConv2d, (6, 10, 3, 2, 1), (6, 11, 13)),
    "1x1": (SparseConv2d, (8, 12, 1), (8, 9, 7)),
    "k7-reflect": (SparseConv2d, (3, 5, 7, 1, 3), (3, 13, 11)),
    "k3-dilated": (SparseConv2d, (4, 8, 3, 1, 2, 2), (4, 9, 10)),
    "convT-k3-s2": (SparseConvTranspose2d, (8, 6, 3, 2, 1, 1), (8, 5, 7)),
    "convT-k4-s2": (SparseConvTranspose2d, (8, 4, 4, 2, 1), (8, 6, 5)),
}
SPARSITIES = [0.5, 0.75, 0.9, 0.95, 1.0]
# (granularity, sparsity): N:M has one sparsity.
PRUNINGS = [(g, s) for g in ("element", "kernel", "filter") for s in SPARSITIES] + [("2:4", 0.5)]


def assert_close(actual, expected):
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=TOL, atol=TOL * scale)


def make_layer(conv: str, granularity: str = "element", sparsity: float = 0.9, bias: bool = True):
    cls, args, _ = CONVS[conv]
    kwargs = dict(padding_mode="reflect") if conv == "k7-reflect" else {}
    layer = cls(*args, bias=bias, **kwargs)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return prune.magnitude_(layer, sparsity, granularity).eval()


def masked_dense(layer, x):
    """The layer's computation as torch's own layer runs it, with the masked weight."""
    torch_layer = layer._torch_conv(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                                    padding=layer.padding, dilation=layer.dilation, bias=layer.bias is not None,
                                    padding_mode=layer.padding_mode, **(dict(output_padding=layer.output_padding)
                                                                        if layer.transposed else {}))
    torch_layer.load_state_dict({"weight": layer.weight * layer.weight_mask, **(
        {"bias": layer.bias} if layer.bias is not None else {})})
    return torch_layer(x)


def sparse_forward(layer, x):
    layer.inference = "sparse"
    with torch.no_grad():
        return layer(x)


# --- the kernel against the masked dense conv --------------------------------------------------


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("granularity, sparsity", PRUNINGS)
@pytest.mark.parametrize("conv", CONVS)
def test_sparse_layer_matches_masked_dense(conv, granularity, sparsity, batch):
    if granularity == "2:4" and CONVS[conv][2][0] % 4:
        with pytest.raises(ValueError, match="2:4 pruning groups 4 input channels"):
            make_layer(conv, granularity, sparsity)
        return
    layer = make_layer(conv, granularity, sparsity)
    x = torch.randn(batch, *CONVS[conv][2])
    expected = masked_dense(layer, x)
    assert_close(sparse_forward(layer, x), expected)


@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("conv", ["k3-s2", "convT-k3-s2"])
def test_fused_bias_and_activation_match_ref(conv, bias, activation):
    layer = make_layer(conv, sparsity=0.75, bias=bias)
    x = torch.randn(2, *CONVS[conv][2])
    weight = layer.masked_weight().detach()
    args = dict(stride=layer.stride, padding=layer.padding, transposed=layer.transposed,
                output_padding=layer.output_padding, activation=activation, negative_slope=0.3)
    expected = GF.sparse_conv2d(x, weight, layer.bias, impl="ref", **args)
    with torch.no_grad():
        actual = GF.sparse_conv2d(x, compress(weight, transposed=layer.transposed), layer.bias, impl="cpu", **args)
    assert_close(actual, expected)


@pytest.mark.parametrize("layout", ["channels_last", "non-contiguous"])
@pytest.mark.parametrize("conv", ["k3-s1", "convT-k4-s2"])
def test_input_layouts(conv, layout):
    layer = make_layer(conv)
    x = torch.randn(3, *CONVS[conv][2])
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(3, x.shape[1], x.shape[3], x.shape[2]).transpose(2, 3)
    assert_close(sparse_forward(layer, x), masked_dense(layer, x))


def test_wide_rows_cross_register_blocks_and_channel_groups():
    # 150 output pixels per row (two full 64-pixel blocks and a tail), 70 input channels (several
    # channel groups) and 70 output channels (several channel blocks).
    layer = SparseConv2d(70, 70, 3, padding=1)
    prune.magnitude_(layer, 0.8).eval()
    x = torch.randn(1, 70, 5, 150)
    assert_close(sparse_forward(layer, x), masked_dense(layer, x))


def test_baseline_instruction_set_matches_ref():
    # The non-AVX2 copy of the kernel, which the CPU picks once per process.
    code = """
import torch
from gansparse import _ext
from gansparse.ops.sparse_conv import sparse_conv2d
assert _ext.extension().cpu_isa == "default"
torch.manual_seed(0)
for transposed, stride in ((False, 1), (False, 2), (True, 2)):
    x = torch.randn(2, 5, 9, 70)
    shape = (5, 6, 3, 3) if transposed else (6, 5, 3, 3)
    w = torch.randn(shape) * (torch.rand(shape) < 0.3)
    args = dict(stride=stride, padding=1, transposed=transposed, output_padding=stride - 1 if transposed else 0)
    with torch.no_grad():
        out = sparse_conv2d(x, w, None, impl="cpu", **args)
    ref = sparse_conv2d(x, w, None, impl="ref", **args)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
"""
    env = dict(os.environ, GANSPARSE_CPU_ISA="default")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr


# --- the reference -------------------------------------------------------------------------------


def test_compress_round_trips():
    weight = torch.randn(5, 4, 3, 2) * (torch.rand(5, 4, 3, 2) < 0.4)
    sparse = compress(weight)
    assert sparse.values.numel() == int((weight != 0).sum())
    assert sparse.density == pytest.approx((weight != 0).float().mean().item())
    torch.testing.assert_close(densify(*sparse[:3], 4, (3, 2)), weight, rtol=0, atol=0)
    transposed = compress(weight, transposed=True)  # [C_in=5, C_out=4, 3, 2]
    torch.testing.assert_close(densify(*transposed[:3], 5, (3, 2)), weight.transpose(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("transposed", [False, True])
def test_gradcheck_ref(transposed):
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    shape = (2, 3, 3, 3) if transposed else (3, 2, 3, 3)
    weight = torch.randn(shape, dtype=torch.float64) * (torch.rand(shape) < 0.5)
    sparse = compress(weight, transposed=transposed)
    values = sparse.values.clone().requires_grad_()
    bias = torch.randn(sparse.out_channels, dtype=torch.float64, requires_grad=True)

    def f(x, values, bias):
        return sparse_conv2d_ref(x, values, sparse.columns, sparse.row_offsets, bias, (3, 3), (2, 2), (1, 1),
                                 (1, 1), transposed, (1, 1) if transposed else (0, 0), "leaky_relu", 0.2)

    assert torch.autograd.gradcheck(f, (x, values, bias), fast_mode=True)


# --- the layers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, torch_cls", [(SparseConv2d, nn.Conv2d), (SparseConvTranspose2d, nn.ConvTranspose2d)])
def test_layers_are_drop_ins(cls, torch_cls):
    ours = [p for p in inspect.signature(cls).parameters.values() if p.kind != p.KEYWORD_ONLY]
    theirs = list(inspect.signature(torch_cls).parameters.values())
    assert [(p.name, p.default) for p in ours] == [(p.name, p.default) for p in theirs]
    conv = torch_cls(4, 6, 3, 2, 1)
    layer = cls.from_conv(conv)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(layer(x), conv(x))
    # A dense checkpoint of the torch layer loads, unpruned.
    fresh = cls(4, 6, 3, 2, 1)
    fresh.load_state_dict(conv.state_dict())
    assert fresh.density == 1.0


@pytest.mark.parametrize("conv", ["k3-s2", "convT-k3-s2"])
def test_training_path_is_masked_dense_with_masked_gradients(conv):
    layer = make_layer(conv, sparsity=0.75).train()
    x = torch.randn(2, *CONVS[conv][2], requires_grad=True)
    grad_out = torch.randn_like(masked_dense(layer, x))
    layer(x).backward(grad_out)
    weight = layer.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    reference = layer._dense(x_ref, weight * layer.weight_mask)
    reference.backward(grad_out)
    torch.testing.assert_close(layer.weight.grad, weight.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert layer.weight.grad[layer.weight_mask == 0].abs().max() == 0


def test_inference_form_follows_weight_changes():
    layer = make_layer("k3-s1", sparsity=0.9)
    x = torch.randn(1, *CONVS["k3-s1"][2])
    before = sparse_forward(layer, x)
    with torch.no_grad():
        layer.weight.mul_(2)
    assert_close(sparse_forward(layer, x), 2 * before - layer.bias.view(1, -1, 1, 1).detach())


def test_to_sparse_chooses_by_density_without_example():
    layer = make_layer("k3-s1", sparsity=0.95).to_sparse()
    assert layer.inference == "sparse"
    assert make_layer("k3-s1", sparsity=0.5).to_sparse().inference == "dense"
    grouped = SparseConv2d(4, 4, 3, groups=2)
    assert grouped.sparse_unsupported() is not None and grouped.to_sparse().inference == "dense"


def test_to_sparse_with_example_keeps_the_output():
    layer = make_layer("convT-k4-s2", sparsity=0.9)
    x = torch.randn(2, *CONVS["convT-k4-s2"][2])
    layer.to_sparse(x)
    assert layer.inference in ("sparse", "dense")
    with torch.no_grad():
        assert_close(layer(x), masked_dense(layer, x))


def test_sparsify_converts_a_generator_and_keeps_its_output():
    model = ResnetGenerator(3, 3, ngf=8, norm="instance", n_blocks=2).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        sparsify(model)  # converts the plain convs; a dense model stays dense
        prune.magnitude_(model, 0.9)
        expected = model(x)
        sparsify(model, x)
        for layer in model.modules():
            if isinstance(layer, (SparseConv2d, SparseConvTranspose2d)):
                layer.inference = "sparse"
        assert_close(model(x), expected)
    assert not any(type(m) in (nn.Conv2d, nn.ConvTranspose2d) for m in model.modules())


# --- the op's contract ---------------------------------------------------------------------------


def test_explicit_compiled_impl_refuses_gradients():
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="forward only"):
        GF.sparse_conv2d(x, torch.randn(3, 2, 3, 3), impl="cpu")


def test_float64_runs_the_reference():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(GF.sparse_conv2d(x, weight, padding=1), F.conv2d(x, weight, padding=1))


def op_args(x=None, weight=None, bias=None, transposed=False):
    x = torch.randn(2, 3, 6, 5) if x is None else x
    sparse = compress(torch.randn(4, 3, 3, 3) * (torch.rand(4, 3, 3, 3) < 0.5) if weight is None else weight,
                      transposed=transposed)
    return [x, sparse.values, sparse.columns, sparse.row_offsets, bias, [3, 3], [1, 1], [1, 1], [1, 1], transposed,
            [0, 0], "relu", 0.01]


@pytest.mark.parametrize("case", ["conv", "transposed"])
def test_opcheck(case):
    if case == "conv":
        args = op_args(bias=torch.randn(4))
    else:
        args = op_args(weight=torch.randn(3, 4, 3, 3), transposed=True)
        args[6], args[10] = [2, 2], [1, 1]
    torch.library.opcheck(compiled_op().default, tuple(args))


def test_cuda_kernel_is_registered_when_built_with_cuda():
    if not _ext.with_cuda():
        pytest.skip("gansparse._C was built without CUDA kernels")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("gansparse::sparse_conv2d", "CUDA")


def with_arg(index, value):
    args = op_args()
    args[index] = value
    return args


BAD_OP_CALLS = [
    (with_arg(0, torch.randn(2, 3, 6)), "x must be a 4-D"),
    (with_arg(0, torch.randn(2, 3, 6, 5, dtype=torch.float64)), "x must be float32"),
    (with_arg(0, torch.randn(0, 3, 6, 5)), "x must not be empty"),
    (with_arg(0, torch.randn(2, 2, 6, 5)), "columns must lie in"),
    (with_arg(1, torch.randn(3)), "columns must have one entry per value"),
    (with_arg(2, torch.zeros(5, dtype=torch.int64)), "columns must have dtype Int"),
    (with_arg(3, torch.tensor([0, 3, 2, 5, 5], dtype=torch.int32)), "row_offsets must"),
    (with_arg(3, torch.tensor([0], dtype=torch.int32)), "row_offsets must have C_out"),
    (with_arg(4, torch.randn(5)), "bias must have C_out = 4"),
    (with_arg(5, [3]), "kernel_size must have 2 values"),
    (with_arg(6, [0, 1]), "stride must be >= 1"),
    (with_arg(7, [-1, 1]), "padding must be >= 0"),
    (with_arg(10, [1, 0]), "output_padding must be 0"),
    (with_arg(5, [9, 9]), "the output would be empty"),
    (with_arg(11, "gelu"), "activation must be one of"),
    (with_arg(12, float("nan")), "negative_slope must be finite"),
]


@pytest.mark.parametrize("args, match", BAD_OP_CALLS)
def test_bad_input_to_the_compiled_op(args, match):
    with pytest.raises(RuntimeError, match=match):
        compiled_op()(*args)


BAD_CALLS = [
    (lambda: GF.sparse_conv2d(torch.randn(3, 6, 5), torch.randn(4, 3, 3, 3)), "x must be a 4-D"),
    (lambda: GF.sparse_conv2d(torch.randn(1, 2, 6, 5), torch.randn(4, 3, 3, 3)), "x has 2 channels"),
    (lambda: GF.sparse_conv2d(torch.randn(1, 3, 6, 5), torch.randn(4, 3, 3)), "weight must be a 4-D"),
    (lambda: GF.sparse_conv2d(torch.randn(1, 3, 6, 5), torch.randn(4, 3, 3, 3), torch.randn(3)), "bias must be"),
    (lambda: GF.sparse_conv2d(torch.randn(1, 3, 6, 5), torch.randn(4, 3, 3, 3), activation="gelu"), "activation"),
    (lambda: GF.sparse_conv2d(torch.randn(1, 3, 6, 5), torch.randn(4, 3, 3, 3).double()), "dtype and device"),
    (lambda: SparseConv2d(2, 2, 3).set_mask_(torch.ones(2, 2, 3)), "mask must be a tensor of the weight's shape"),
]


@pytest.mark.parametrize("call, match", BAD_CALLS)
def test_bad_input_raises_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_fake_kernel_checks_like_the_op():
    args = op_args()
    args[0] = args[0].to("meta")
    with pytest.raises(ValueError, match="values must be a 1-D"):
        compiled_op()(*args)
    args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in op_args()]
    assert compiled_op()(*args).shape == (2, 4, 6, 5)


# --- fuzzing the C++ entry point -------------------------------------------------------------------

FUZZ_DTYPES = [torch.float32, torch.float64, torch.int32, torch.int64, torch.bool]


@st.composite
def fuzz_tensor(draw, max_rank=5):
    rank = draw(st.integers(0, max_rank))
    shape = draw(st.lists(st.integers(0, 5), min_size=rank, max_size=rank))
    t = (torch.randn(shape) * 4).to(draw(st.sampled_from(FUZZ_DTYPES)))
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, -1)
    return t


@st.composite
def int_pair(draw):
    return draw(st.lists(st.integers(-2, 4), min_size=1, max_size=3))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_compiled_op(data):
    args = op_args(bias=torch.randn(4))
    # Replace some arguments with anything.
    for index in data.draw(st.sets(st.integers(0, 12), max_size=3)):
        if index in (0, 1, 2, 3, 4):
            args[index] = data.draw(fuzz_tensor())
        elif index in (5, 6, 7, 8, 10):
            args[index] = data.draw(int_pair())
        elif index == 9:
            args[index] = data.draw(st.booleans())
        elif index == 11:
            args[index] = data.draw(st.sampled_from(["none", "relu", "tanh", "sigmoid", ""]))
        else:
            args[index] = data.draw(st.sampled_from([0.2, -1.0, float("inf"), float("nan")]))
    try:
        out = compiled_op()(*args)
    except (RuntimeError, ValueError, TypeError):
        return
    assert out.dim() == 4 and out.shape[0] == args[0].shape[0] and torch.isfinite(out).all()


def test_sparse_weight_is_a_public_name():
    assert isinstance(compress(torch.ones(1, 1, 1, 1)), SparseWeight)
    assert gansparse.SparseConv2d is SparseConv2d and gansparse.sparsify is sparsify
