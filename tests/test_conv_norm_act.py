"""Fused conv + norm + mask + activation, C++ backend: the compiled epilogue op
gansparse::norm_mask_act against the reference (forward, running statistics, every gradient),
through masked_conv_norm_act for the convolutions generators use, gradcheck, torch.library
registration, and bad input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import gansparse.functional as GF
from gansparse import _ext
from gansparse.ops.conv_norm_act import compiled_ops

pytestmark = pytest.mark.skipif(compiled_ops() is None, reason="gansparse._C is not built")

DTYPES = [torch.float32, torch.float64]
# Tolerance relative to the largest magnitude of the expected tensor: the backends differ from
# the reference in summation order and rounding only.
TOL = {torch.float32: 5e-5, torch.float64: 1e-11}

# (norm, training, with running statistics)
NORMS = {
    "batch-train": ("batch", True, True),
    "batch-eval": ("batch", False, True),
    "batch-no-running": ("batch", True, False),
    "batch-eval-no-running": ("batch", False, False),
    "instance": ("instance", True, False),
    "none": ("none", True, False),
}
AFFINES = ["per-channel", "per-sample", "absent", "gamma-only", "beta-only"]
ACTIVATIONS = ["relu", "leaky_relu", None]


def assert_close(actual, expected, dtype):
    if expected is None:
        assert actual is None
        return
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=TOL[dtype], atol=TOL[dtype] * scale)


# --- the epilogue op against the reference ----------------------------------------------------


def epilogue_params(n, c, affine, with_mask, dtype, generator):
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, generator=generator)

    mask = torch.rand(c, dtype=dtype, generator=generator) if with_mask else None
    shape = (n, c) if affine == "per-sample" else (c,)
    gamma = 1 + 0.5 * randn(*shape) if affine in ("per-channel", "per-sample", "gamma-only") else None
    beta = randn(*shape) if affine in ("per-channel", "per-sample", "beta-only") else None
    return mask, gamma, beta


def running_stats(c, dtype, generator):
    return torch.randn(c, dtype=dtype, generator=generator), 0.5 + torch.rand(c, dtype=dtype, generator=generator)


def run_epilogue(impl, y, mask, gamma, beta, running, grad_out, **options):
    """Output, running statistics after the call, and the gradients of y, mask, gamma, beta for
    the upstream gradient grad_out."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (y, mask, gamma, beta)]
    running = [None if t is None else t.clone() for t in running]
    out = GF.norm_mask_act(*leaves, *running, impl=impl, **options)
    out.backward(grad_out)
    return out, running, [None if t is None else t.grad for t in leaves]


def check_against_ref(y, mask, gamma, beta, running, dtype, **options):
    grad_out = torch.randn(y.shape, dtype=dtype)
    out, running_after, grads = run_epilogue("cpu", y, mask, gamma, beta, running, grad_out, **options)
    ref_out, ref_running, ref_grads = run_epilogue("ref", y, mask, gamma, beta, running, grad_out, **options)
    assert_close(out, ref_out, dtype)
    for actual, expected in zip(running_after, ref_running):
        assert_close(actual, expected, dtype)
    for actual, expected in zip(grads, ref_grads):
        assert_close(actual, expected, dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("norm_case", NORMS)
def test_epilogue_matches_ref(norm_case, affine, with_mask, activation, dtype):
    norm, training, with_running = NORMS[norm_case]
    generator = torch.Generator().manual_seed(0)
    n, c = 3, 6
    y = 1.5 + 2 * torch.randn(n, c, 5, 7, dtype=dtype, generator=generator)
    mask, gamma, beta = epilogue_params(n, c, affine, with_mask, dtype, generator)
    running = running_stats(c, dtype, generator) if with_running else (None, None)
    check_against_ref(y, mask, gamma, beta, running, dtype, norm=norm, training=training, activation=activation)


def layouts(shape, dtype, generator):
    """y in every layout the op meets: NCHW, channels_last, and views that are neither."""
    n, c, h, w = shape
    base = torch.randn(n, c, h, w, dtype=dtype, generator=generator)
    return {
        "nchw": base,
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "sliced": torch.randn(n, c, h, 2 * w, dtype=dtype, generator=generator)[..., ::2],
        "transposed": base.transpose(2, 3).contiguous().transpose(2, 3),
        "sliced-channels_last": torch.randn(n, 2 * c, h, w, dtype=dtype, generator=generator)
        .contiguous(memory_format=torch.channels_last)[:, ::2],
        "expanded": torch.randn(1, c, 1, w, dtype=dtype, generator=generator).expand(n, c, h, w),
    }


LAYOUTS = ["nchw", "channels_last", "sliced", "transposed", "sliced-channels_last", "expanded"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 5, 7, 9), (4, 3, 1, 1), (2, 40, 6, 6), (1, 2, 33, 65)], ids=str)
@pytest.mark.parametrize("norm_case", ["batch-train", "batch-eval", "instance", "none"])
def test_epilogue_layouts_match_ref(norm_case, shape, layout, dtype):
    norm, training, with_running = NORMS[norm_case]
    if norm == "instance" and shape[2] * shape[3] == 1:
        pytest.skip("instance norm needs more than one pixel")
    generator = torch.Generator().manual_seed(1)
    y = layouts(shape, dtype, generator)[layout]
    mask, gamma, beta = epilogue_params(shape[0], shape[1], "per-sample", True, dtype, generator)
    running = running_stats(shape[1], dtype, generator) if with_running else (None, None)
    out = check_against_ref(y, mask, gamma, beta, running, dtype, norm=norm, training=training, activation="relu")
    assert out.stride() == torch.empty_like(y).stride()


def test_masked_channel_outputs_exact_zero():
    generator = torch.Generator().manual_seed(2)
    y = 10 * torch.randn(2, 4, 6, 6, generator=generator)
    mask = torch.tensor([1.0, 0.0, 0.5, 0.0])
    gamma, beta = torch.randn(2, 4, generator=generator), torch.randn(2, 4, generator=generator)
    for norm in ("batch", "instance", "none"):
        for activation in ACTIVATIONS:
            for memory_format in (torch.contiguous_format, torch.channels_last):
                out = GF.norm_mask_act(y.contiguous(memory_format=memory_format), mask, gamma, beta, norm=norm,
                                       activation=activation, impl="cpu")
                assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
                assert torch.equal(out[:, 3], torch.zeros_like(out[:, 3]))


def test_half_precision_is_widened_on_cpu():
    generator = torch.Generator().manual_seed(3)
    y = torch.randn(2, 8, 5, 5, generator=generator)
    mask, gamma, beta = epilogue_params(2, 8, "per-sample", True, torch.float32, generator)
    for dtype in (torch.float16, torch.bfloat16):
        params = [t.to(dtype) for t in (mask, gamma, beta)]
        out = GF.norm_mask_act(y.to(dtype), *params, impl="cpu")
        expected = GF.norm_mask_act(y.to(dtype).float(), *[t.float() for t in params], impl="ref")
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=3e-2)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("stats", ["batch", "instance"])
def test_statistics_stay_accurate_for_large_counts(stats, channels_last):
    """Float32 statistics of a million values per channel, far from zero: accurate to float32."""
    generator = torch.Generator().manual_seed(4)
    y = 1000 + torch.randn(4, 3, 512, 512, generator=generator) * torch.tensor([1e-2, 1.0, 30.0]).view(1, 3, 1, 1)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    forward, _ = compiled_ops()
    _, mean, invstd = forward(y, None, None, None, None, None, stats, 1e-5, "none", 0.0)
    dims = (0, 2, 3) if stats == "batch" else (2, 3)
    exact_var, exact_mean = torch.var_mean(y.double(), dim=dims, correction=0)
    torch.testing.assert_close(mean.double(), exact_mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(invstd.double(), (exact_var + 1e-5).rsqrt(), rtol=1e-5, atol=0)


# --- through masked_conv_norm_act ----------------------------------------------------------------

# (name, in_channels, out_channels, input size, conv keyword arguments)
CONVS = [
    ("1x1", 6, 8, (7, 9), dict(kernel=1)),
    ("3x3", 6, 8, (7, 9), dict(kernel=3, padding=1)),
    ("3x3-stride2", 6, 8, (9, 8), dict(kernel=3, stride=2, padding=1)),
    ("4x4-stride2", 6, 8, (8, 8), dict(kernel=4, stride=2, padding=1)),
    ("7x7", 3, 8, (11, 11), dict(kernel=7, padding=3)),
    ("3x3-dilated", 6, 8, (9, 9), dict(kernel=3, padding=2, dilation=2)),
    ("3x3-groups", 6, 8, (7, 7), dict(kernel=3, padding=1, groups=2)),
    ("3x3-depthwise", 8, 8, (7, 7), dict(kernel=3, padding=1, groups=8)),
    ("transposed-3x3", 8, 6, (5, 5), dict(kernel=3, stride=2, padding=1, output_padding=1, transposed=True)),
    ("transposed-4x4", 8, 6, (5, 5), dict(kernel=4, stride=2, padding=1, transposed=True)),
]


def conv_inputs(in_channels, out_channels, size, kernel, groups=1, transposed=False, *, n, dtype, generator, **_):
    x = torch.randn(n, in_channels, *size, dtype=dtype, generator=generator)
    shape = (in_channels, out_channels // groups) if transposed else (out_channels, in_channels // groups)
    weight = torch.randn(*shape, kernel, kernel, dtype=dtype, generator=generator) / kernel
    bias = torch.randn(out_channels, dtype=dtype, generator=generator)
    return x, weight, bias


def run_conv(impl, x, weight, bias, mask, gamma, beta, running, grad_out, **options):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias, mask, gamma, beta)]
    running = [None if t is None else t.clone() for t in running]
    out = GF.masked_conv_norm_act(*leaves, *running, impl=impl, **options)
    out.backward(grad_out)
    return out, running, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("norm_case", ["batch-train", "batch-eval", "instance"])
@pytest.mark.parametrize("conv", CONVS, ids=[c[0] for c in CONVS])
def test_masked_conv_norm_act_matches_ref(conv, norm_case, channels_last, dtype):
    _, in_channels, out_channels, size, conv_args = conv
    norm, training, with_running = NORMS[norm_case]
    generator = torch.Generator().manual_seed(5)
    n = 1 if norm == "instance" else 3
    x, weight, bias = conv_inputs(in_channels, out_channels, size, n=n, dtype=dtype, generator=generator, **conv_args)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mask, gamma, beta = epilogue_params(n, out_channels, "per-sample", True, dtype, generator)
    running = running_stats(out_channels, dtype, generator) if with_running else (None, None)
    conv_options = {key: value for key, value in conv_args.items() if key != "kernel"}
    conv_out = GF.masked_conv_norm_act(x, weight, bias, norm="none", activation=None, impl="ref", **conv_options)
    grad_out = torch.randn(conv_out.shape, dtype=dtype, generator=generator)
    options = dict(conv_options, norm=norm, training=training, activation="leaky_relu")
    out, running_after, grads = run_conv("cpu", x, weight, bias, mask, gamma, beta, running, grad_out, **options)
    ref_out, ref_running, ref_grads = run_conv("ref", x, weight, bias, mask, gamma, beta, running, grad_out, **options)
    assert_close(out, ref_out, dtype)
    assert out.stride() == conv_out.stride()  # the layout of the conv's output
    for actual, expected in zip(running_after, ref_running):
        assert_close(actual, expected, dtype)
    for actual, expected in zip(grads, ref_grads):  # x, weight, bias, mask, gamma, beta
        assert_close(actual, expected, dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("norm_case", ["batch-train", "batch-eval", "instance", "none"])
@pytest.mark.parametrize("conv", CONVS, ids=[c[0] for c in CONVS])
def test_inference_matches_ref(conv, norm_case, channels_last):
    """Without autograd the epilogue writes over the conv output (norm_mask_act_)."""
    _, in_channels, out_channels, size, conv_args = conv
    norm, training, with_running = NORMS[norm_case]
    generator = torch.Generator().manual_seed(11)
    x, weight, bias = conv_inputs(in_channels, out_channels, size, n=2, dtype=torch.float32, generator=generator,
                                  **conv_args)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mask, gamma, beta = epilogue_params(2, out_channels, "per-sample", True, torch.float32, generator)
    running = running_stats(out_channels, torch.float32, generator) if with_running else (None, None)
    options = {key: value for key, value in conv_args.items() if key != "kernel"}
    options.update(norm=norm, training=training, activation="relu")
    results = {}
    for impl in ("cpu", "ref"):
        stats = [None if t is None else t.clone() for t in running]
        with torch.no_grad():
            out = GF.masked_conv_norm_act(x, weight, bias, mask, gamma, beta, *stats, impl=impl, **options)
        results[impl] = out, stats
    (out, stats), (ref_out, ref_stats) = results["cpu"], results["ref"]
    assert_close(out, ref_out, torch.float32)
    for actual, expected in zip(stats, ref_stats):
        assert_close(actual, expected, torch.float32)


def test_frozen_conv_with_learnable_mask_gets_mask_gradients():
    """A mask search with frozen weights: only the mask needs a gradient, through the epilogue."""
    generator = torch.Generator().manual_seed(12)
    x, weight, bias = conv_inputs(4, 6, (5, 5), 3, n=2, dtype=torch.float64, generator=generator)
    grads = {}
    for impl in ("cpu", "ref"):
        mask = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(13)).requires_grad_()
        GF.masked_conv_norm_act(x, weight, bias, mask, padding=1, impl=impl).sum().backward()
        grads[impl] = mask.grad
    assert_close(grads["cpu"], grads["ref"], torch.float64)


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def test_inference_overwrites_the_conv_output_only():
    x, weight = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    with torch.no_grad(), RecordOps() as recorded:
        GF.masked_conv_norm_act(x, weight, None, torch.rand(4), padding=1, impl="cpu")
    assert "gansparse::norm_mask_act_" in recorded.names
    y = torch.randn(2, 4, 6, 6)
    y_before = y.clone()
    with torch.no_grad():
        GF.norm_mask_act(y, impl="cpu")
    assert torch.equal(y, y_before)  # norm_mask_act never writes over its input


def test_cpu_backend_runs_the_compiled_epilogue():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3)
    with RecordOps() as recorded:
        GF.masked_conv_norm_act(x, weight, None, torch.rand(4), padding=1, impl="cpu").sum().backward()
    assert "gansparse::norm_mask_act" in recorded.names
    assert "gansparse::norm_mask_act_backward" in recorded.names
    assert not any(name.startswith("aten::batch_norm") or name.startswith("aten::native_batch_norm")
                   for name in recorded.names)


def test_backward_computes_only_the_gradients_asked_for():
    generator = torch.Generator().manual_seed(6)
    y = torch.randn(2, 4, 5, 5, generator=generator)
    mask, gamma, beta = epilogue_params(2, 4, "per-sample", True, torch.float32, generator)
    forward, backward = compiled_ops()
    for stats in ("batch", "instance", "none"):
        _, mean, invstd = forward(y, mask, gamma, beta, None, None, stats, 1e-5, "relu", 0.0)
        args = (torch.randn(y.shape, generator=generator), y, mask, gamma, beta, mean, invstd, stats, "relu", 0.0)
        full = backward(*args, [True, True, True, True])
        for i in range(4):
            output_mask = [j == i for j in range(4)]
            partial = backward(*args, output_mask)
            torch.testing.assert_close(partial[i], full[i])
            assert all(partial[j].numel() == 0 for j in range(4) if j != i)


# --- gradcheck and torch.library ----------------------------------------------------------------


@pytest.mark.parametrize("impl, channels_last", [("ref", False), ("cpu", False), ("cpu", True)],
                         ids=["ref", "cpu-nchw", "cpu-nhwc"])
@pytest.mark.parametrize("norm_case", ["batch-train", "batch-eval", "instance", "none"])
def test_gradcheck(impl, channels_last, norm_case):
    norm, training, with_running = NORMS[norm_case]
    generator = torch.Generator().manual_seed(7)
    y = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=generator)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    mask, gamma, beta = epilogue_params(2, 3, "per-sample", True, torch.float64, generator)
    running = running_stats(3, torch.float64, generator) if with_running else (None, None)

    def fn(y, mask, gamma, beta):
        # Fresh running statistics for every evaluation: training mode updates them in place.
        fresh = [None if t is None else t.clone() for t in running]
        return GF.norm_mask_act(y, mask, gamma, beta, *fresh, norm=norm, training=training,
                                activation="leaky_relu", impl=impl)

    inputs = [t.requires_grad_() for t in (y, mask, gamma, beta)]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("impl", ["ref", "cpu"])
def test_gradcheck_through_conv(impl):
    generator = torch.Generator().manual_seed(8)
    x, weight, bias = conv_inputs(3, 4, (5, 5), 3, n=2, dtype=torch.float64, generator=generator)
    mask, gamma, beta = epilogue_params(2, 4, "per-channel", True, torch.float64, generator)
    inputs = [t.requires_grad_() for t in (x, weight, bias, mask, gamma, beta)]
    assert torch.autograd.gradcheck(
        lambda *t: GF.masked_conv_norm_act(*t, padding=1, stride=2, activation="leaky_relu", impl=impl), inputs)


OPCHECK_CASES = {
    "batch": dict(stats="batch"),
    "instance": dict(stats="instance"),
    "given": dict(stats="given"),
    "none": dict(stats="none"),
    "batch-channels_last-per-sample": dict(stats="batch", channels_last=True, per_sample=True),
    "instance-no-params": dict(stats="instance", params=False),
}


@pytest.mark.parametrize("inplace", [False, True], ids=["functional", "inplace"])
@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case, inplace):
    options = OPCHECK_CASES[case]
    stats = options["stats"]
    generator = torch.Generator().manual_seed(9)
    y = torch.randn(2, 3, 4, 5, generator=generator)
    if options.get("channels_last"):
        y = y.contiguous(memory_format=torch.channels_last)
    affine = "per-sample" if options.get("per_sample") else "per-channel"
    mask, gamma, beta = epilogue_params(2, 3, affine, options.get("params", True), torch.float32, generator)
    if not options.get("params", True):
        gamma = beta = None
    mean, invstd = (torch.randn(3), torch.rand(3) + 0.5) if stats == "given" else (None, None)
    args = (mean, invstd, stats, 1e-5, "leaky_relu", 0.2)
    if inplace:  # no autograd: the in-place op serves inference only
        torch.library.opcheck(torch.ops.gansparse.norm_mask_act_.default, (y, mask, gamma, beta, *args))
        return
    leaves = [None if t is None else t.requires_grad_() for t in (y, mask, gamma, beta)]
    forward, _ = compiled_ops()
    torch.library.opcheck(forward.default, (*leaves, *args))


def test_cuda_kernels_are_registered_when_built_with_cuda():
    if not _ext.with_cuda():
        pytest.skip("gansparse._C was built without CUDA kernels")
    for name in ("gansparse::norm_mask_act", "gansparse::norm_mask_act_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")


def test_torch_compile_matches_eager():
    generator = torch.Generator().manual_seed(10)
    y = torch.randn(2, 4, 5, 5, generator=generator)
    mask, gamma, beta = epilogue_params(2, 4, "per-sample", True, torch.float32, generator)

    def fn(y):
        return GF.norm_mask_act(y, mask, gamma, beta, impl="cpu")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(y), fn(y))


# --- bad input -----------------------------------------------------------------------------------


def _y():
    return torch.randn(2, 3, 4, 4)


BAD_FUNCTIONAL_CALLS = [
    (lambda: GF.norm_mask_act(torch.randn(3, 4, 4)), ValueError, "input must have 4 dims"),
    (lambda: GF.norm_mask_act(torch.zeros(0, 3, 4, 4)), ValueError, "input must not be empty"),
    (lambda: GF.norm_mask_act(torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "input must be a floating-point"),
    (lambda: GF.norm_mask_act(_y(), torch.ones(4)), ValueError, "mask must have 3 channels"),
    (lambda: GF.norm_mask_act(_y(), None, torch.ones(5, 3)), ValueError, "gamma is per-sample with 5 rows"),
    (lambda: GF.norm_mask_act(_y(), None, None, torch.ones(3, dtype=torch.float64)), TypeError, "beta has dtype"),
    (lambda: GF.norm_mask_act(_y(), None, None, None, torch.zeros(3)), ValueError, "running_mean and running_var"),
    (lambda: GF.norm_mask_act(_y(), None, None, None, torch.zeros(3), torch.ones(3), norm="instance"), ValueError,
     "running statistics are only used with norm='batch'"),
    (lambda: GF.norm_mask_act(_y(), norm="group"), ValueError, "norm must be one of"),
    (lambda: GF.norm_mask_act(_y(), activation="gelu"), ValueError, "activation must be one of"),
    (lambda: GF.norm_mask_act(_y(), eps=0.0), ValueError, "eps must be a positive number"),
    (lambda: GF.norm_mask_act(torch.randn(1, 3, 1, 1)), ValueError, "more than one value per channel"),
    (lambda: GF.norm_mask_act(_y(), impl="gpu"), ValueError, "impl must be one of"),
    (lambda: GF.masked_conv_norm_act(_y(), torch.randn(4, 2, 3, 3)), ValueError,
     "x has 3 channels but weight expects 2"),
    (lambda: GF.masked_conv_norm_act(_y(), torch.randn(4, 3, 3, 3), torch.ones(5)), ValueError,
     "bias must have 4 channels"),
    (lambda: GF.masked_conv_norm_act(_y(), torch.randn(4, 3, 3, 3), None, torch.ones(3)), ValueError,
     "mask must have 4 channels"),
    (lambda: GF.masked_conv_norm_act(_y(), "weight"), TypeError, "weight must be a torch.Tensor"),
    (lambda: GF.masked_conv_norm_act(_y(), torch.randn(4, 3, 3, 3), groups=0), ValueError, "groups must be a positive"),
]


@pytest.mark.parametrize("call, error, match", BAD_FUNCTIONAL_CALLS)
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _op(*args):
    forward, _ = compiled_ops()
    return forward(*args)


def _backward_op(*args):
    _, backward = compiled_ops()
    return backward(*args)


BAD_OP_CALLS = [
    (lambda: _op(torch.randn(3, 4, 4), None, None, None, None, None, "batch", 1e-5, "relu", 0.0), "y must be a 4-D"),
    (lambda: _op(torch.zeros(2, 3, 0, 4), None, None, None, None, None, "batch", 1e-5, "relu", 0.0),
     "y must not be empty"),
    (lambda: _op(torch.ones(2, 3, 4, 4, dtype=torch.int32), None, None, None, None, None, "batch", 1e-5, "relu", 0.0),
     "y must be a floating-point"),
    (lambda: _op(_y(), torch.ones(2, 3), None, None, None, None, "batch", 1e-5, "relu", 0.0),
     r"mask must have shape \[C\]"),
    (lambda: _op(_y(), None, torch.ones(3, 2), None, None, None, "batch", 1e-5, "relu", 0.0), "gamma must have shape"),
    (lambda: _op(_y(), None, None, torch.ones(4), None, None, "batch", 1e-5, "relu", 0.0), "beta must have shape"),
    (lambda: _op(_y(), torch.ones(3, dtype=torch.int64), None, None, None, None, "batch", 1e-5, "relu", 0.0),
     "mask must be a floating-point"),
    (lambda: _op(_y(), None, None, None, None, None, "layer", 1e-5, "relu", 0.0), "stats must be one of"),
    (lambda: _op(_y(), None, None, None, None, None, "batch", 1e-5, "tanh", 0.0), "activation must be one of"),
    (lambda: _op(_y(), None, None, None, None, None, "given", 1e-5, "relu", 0.0),
     "stats='given' needs both mean and invstd"),
    (lambda: _op(_y(), None, None, None, torch.ones(3), torch.ones(3), "batch", 1e-5, "relu", 0.0),
     "mean and invstd are only read with stats='given'"),
    (lambda: _op(_y(), None, None, None, torch.ones(4), torch.ones(3), "given", 1e-5, "relu", 0.0),
     r"mean must have shape \[C\]"),
    (lambda: _op(_y(), None, None, None, None, None, "batch", -1.0, "relu", 0.0), "eps must be a positive finite"),
    (lambda: _op(_y(), None, None, None, None, None, "batch", 1e-5, "leaky_relu", float("nan")),
     "negative_slope must be finite"),
    (lambda: _backward_op(torch.randn(2, 3, 4, 5), _y(), None, None, None, torch.ones(3), torch.ones(3), "batch",
                          "relu", 0.0, [True, False, False, False]), "grad_out must have y's shape"),
    (lambda: _backward_op(_y(), _y(), None, None, None, torch.ones(3), torch.ones(3), "instance", "relu", 0.0,
                          [True, False, False, False]), r"mean must have shape \[N, C\]"),
    (lambda: _backward_op(_y(), _y(), None, None, None, torch.ones(3), torch.ones(3), "batch", "relu", 0.0,
                          [True, True, False, False]), r"output_mask\[1\] asks for the gradient of mask"),
]


@pytest.mark.parametrize("call, match", BAD_OP_CALLS)
def test_bad_input_to_compiled_ops_raises_naming_the_argument(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# --- fuzzing the C++ entry points -----------------------------------------------------------------

STATS = ["batch", "instance", "given", "none", "Batch", ""]
ACTIVATION_NAMES = ["relu", "leaky_relu", "none", "sigmoid"]
FUZZ_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.bool]


@st.composite
def fuzz_tensor(draw, dims=None):
    """A small tensor of any rank, dtype and layout, sometimes empty, sometimes a view."""
    rank = draw(st.integers(0, 5)) if dims is None else dims
    shape = draw(st.lists(st.integers(0, 4), min_size=rank, max_size=rank))
    dtype = draw(st.sampled_from(FUZZ_DTYPES))
    t = torch.randn(shape).to(dtype)
    layout = draw(st.sampled_from(["dense", "channels_last", "transposed", "expanded"]))
    if layout == "channels_last" and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed" and t.dim() >= 2:
        t = t.transpose(0, -1)
    elif layout == "expanded" and t.dim() >= 1 and t.shape[0] == 1:
        t = t.expand(3, *t.shape[1:])
    return t


@st.composite
def fuzz_feature(draw):
    """Mostly a valid 4-D float y, sometimes anything."""
    if draw(st.booleans()):
        return draw(fuzz_tensor())
    n, c, h, w = (draw(st.integers(1, 3)) for _ in range(4))
    y = torch.randn(n, c, h, w)
    return y.contiguous(memory_format=torch.channels_last) if draw(st.booleans()) else y


def optional_param(y):
    """None, a valid [C] or [N, C] tensor for y, or anything."""
    c = y.shape[1] if y.dim() == 4 else 1
    n = y.shape[0] if y.dim() == 4 else 1
    return st.one_of(st.none(), st.just(torch.rand(c)), st.just(torch.rand(n, c)), fuzz_tensor())


FLOATS = st.sampled_from([1e-5, 0.0, -1.0, 0.2, float("nan"), float("inf")])


def check_outputs_are_valid(outputs, y):
    for t in outputs:
        assert isinstance(t, torch.Tensor)
    if y.dim() == 4:
        assert outputs[0].numel() in (0, y.numel())


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_forward_ops(data):
    y = data.draw(fuzz_feature())
    mask, gamma, beta, mean, invstd = (data.draw(optional_param(y)) for _ in range(5))
    stats = data.draw(st.sampled_from(STATS))
    activation = data.draw(st.sampled_from(ACTIVATION_NAMES))
    eps, slope = data.draw(FLOATS), data.draw(FLOATS)
    inplace = data.draw(st.booleans())
    try:
        if inplace:
            torch.ops.gansparse.norm_mask_act_(y, mask, gamma, beta, mean, invstd, stats, eps, activation, slope)
            return
        outputs = _op(y, mask, gamma, beta, mean, invstd, stats, eps, activation, slope)
    except (RuntimeError, ValueError, TypeError):
        return
    check_outputs_are_valid(outputs, y)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_backward_op(data):
    y = data.draw(fuzz_feature())
    grad_out = data.draw(st.one_of(st.just(torch.randn(y.shape)), fuzz_tensor()))
    mask, gamma, beta = (data.draw(optional_param(y)) for _ in range(3))
    mean, invstd = (data.draw(st.one_of(optional_param(y).filter(lambda t: t is not None), st.just(torch.empty(0))))
                    for _ in range(2))
    stats = data.draw(st.sampled_from(STATS))
    activation = data.draw(st.sampled_from(ACTIVATION_NAMES))
    output_mask = data.draw(st.lists(st.booleans(), min_size=4, max_size=4))
    try:
        outputs = _backward_op(grad_out, y, mask, gamma, beta, mean, invstd, stats, activation,
                               data.draw(FLOATS), output_mask)
    except (RuntimeError, ValueError, TypeError):
        return
    check_outputs_are_valid(outputs, y)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_functional_api(data):
    y = data.draw(fuzz_feature())
    mask, gamma, beta, running_mean, running_var = (data.draw(optional_param(y)) for _ in range(5))
    norm = data.draw(st.sampled_from(["batch", "instance", "none", "group"]))
    activation = data.draw(st.sampled_from(["relu", "leaky_relu", None, "gelu"]))
    try:
        GF.norm_mask_act(y, mask, gamma, beta, running_mean, running_var, norm=norm,
                         training=data.draw(st.booleans()), activation=activation, eps=data.draw(FLOATS),
                         impl="cpu")
    except (RuntimeError, ValueError, TypeError):
        return


def test_fake_kernels_reject_mixed_devices():
    # A meta input sends a call to the fake kernel, which must check like the C++ kernel rather
    # than return uninitialised memory for the real tensors.
    forward, backward = compiled_ops()
    y = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="mask is on meta"):
        forward(y, torch.ones(3, device="meta"), None, None, None, None, "batch", 1e-5, "relu", 0.2)
    with pytest.raises(ValueError, match="stats must be one of"):
        forward(y.to("meta"), None, None, None, None, None, "bogus", 1e-5, "relu", 0.2)
    with pytest.raises(ValueError, match="grad_out must match y"):
        backward(torch.randn(2, 3, 4, 4, device="meta"), y.to("meta")[:1], None, None, None,
                 torch.zeros(3, device="meta"), torch.ones(3, device="meta"), "batch", "relu", 0.2,
                 [True, False, False, False])
