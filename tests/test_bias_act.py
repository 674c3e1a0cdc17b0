"""Fused bias + leaky ReLU: the reference against the formula, the compiled backends against the
reference (forward, backward with the bias gradient, double backward) over shapes and layouts,
torch.library registration, and bad input."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _fuzz import small_tensor
import gansparse.functional as GF
from gansparse.ops.bias_act import compiled_ops


HAS_GPU = torch.cuda.is_available()
COMPILED = [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")),
            pytest.param("triton", id="triton", marks=pytest.mark.triton)]
# Triton runs CUDA tensors on a GPU, else CPU tensors in its interpreter.
DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda" if HAS_GPU else "cpu"}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}

# [N, C, *] shapes: a linear layer's output, convs' (batch 1, odd sizes), a 3-D and a 5-D one.
SHAPES = [(4, 7), (1, 1), (2, 5, 3, 3), (1, 3, 1, 1), (3, 4, 5), (2, 3, 2, 3, 2), (2, 17, 9, 11)]

LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "sliced": lambda t: torch.cat([t, t], 1)[:, ::2],
    "transposed": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),
}


def make_input(shape, layout="contiguous", dtype=torch.float32, device="cpu"):
    x = LAYOUTS[layout](torch.randn(shape, dtype=dtype, device=device))
    assert x.shape == shape
    return x.requires_grad_(True)


def test_ref_matches_the_formula():
    x, b = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    z = x + b.view(1, 4, 1, 1)
    expected = torch.where(z > 0, z, 0.1 * z) * 3.0
    torch.testing.assert_close(GF.fused_leaky_relu(x, b, 0.1, 3.0, impl="ref"), expected)
    # StyleGAN2's defaults: slope 0.2, gain sqrt(2).
    torch.testing.assert_close(GF.fused_leaky_relu(x, None, impl="ref"), torch.where(x > 0, x, 0.2 * x) * math.sqrt(2))


def assert_matches_ref(impl, x, bias, slope, scale, tol):
    expected = GF.fused_leaky_relu(x, bias, slope, scale, impl="ref")
    actual = GF.fused_leaky_relu(x, bias, slope, scale, impl=impl)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, **tol)
    leaves = [x] + ([bias] if bias is not None else [])
    upstream = torch.randn_like(expected)
    for a, e in zip(torch.autograd.grad(actual, leaves, upstream), torch.autograd.grad(expected, leaves, upstream)):
        torch.testing.assert_close(a, e, **tol)
    return actual


@pytest.mark.parametrize("impl", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_compiled_matches_ref(impl, dtype, shape, with_bias):
    x = make_input(shape, dtype=dtype, device=DEVICE[impl])
    bias = torch.randn(shape[1], dtype=dtype, device=DEVICE[impl], requires_grad=True) if with_bias else None
    assert_matches_ref(impl, x, bias, 0.2, 2 ** 0.5, TOL[dtype])
    assert_matches_ref(impl, x, bias, -0.3, 0.7, TOL[dtype])


@pytest.mark.parametrize("impl", COMPILED)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_layouts_match_ref(impl, layout):
    x = make_input((2, 6, 5, 7), layout, device=DEVICE[impl])
    bias = torch.randn(6, device=DEVICE[impl], requires_grad=True)
    out = assert_matches_ref(impl, x, bias, 0.2, 2 ** 0.5, TOL[torch.float32])
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def test_slope_at_zero_is_chosen_as_torch_does():
    """x + b == 0 exactly takes the negative slope, as torch's leaky_relu gradient does."""
    x = torch.tensor([[0.5, -0.5, 0.0]], requires_grad=True).view(1, 3, 1)
    bias = torch.tensor([-0.5, 0.5, 0.0], requires_grad=True)
    grads = {}
    for impl in ("ref", "cpu"):
        grads[impl] = torch.autograd.grad(GF.fused_leaky_relu(x, bias, 0.2, 1.0, impl=impl).sum(), x)[0]
    torch.testing.assert_close(grads["cpu"], grads["ref"])
    torch.testing.assert_close(grads["cpu"].flatten(), torch.full((3,), 0.2))


def test_bias_gradient_is_exact_for_many_positions():
    """The bias gradient sums N * H * W values per channel; accumulated in double, it stays exact."""
    x = torch.randn(4, 3, 64, 64, requires_grad=True)
    bias = torch.zeros(3, requires_grad=True)
    upstream = torch.randn(4, 3, 64, 64)
    (grad_bias,) = torch.autograd.grad(GF.fused_leaky_relu(x, bias, impl="cpu"), bias, upstream)
    expected = (upstream.double() * torch.where(x.double() > 0, 1.0, 0.2) * math.sqrt(2)).sum((0, 2, 3))
    torch.testing.assert_close(grad_bias.double(), expected, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("impl", [pytest.param("ref", id="ref")] + COMPILED)
def test_gradcheck_and_gradgradcheck(impl):
    device = DEVICE.get(impl, "cpu")
    for shape, layout in (((2, 3, 2, 3), "channels_last"), ((3, 4), "contiguous")):
        # Away from the kink at x + b = 0, where the derivative jumps.
        x = make_input(shape, layout, torch.float64, device)
        with torch.no_grad():
            x += torch.sign(x) * 0.1
        bias = torch.zeros(shape[1], dtype=torch.float64, device=device, requires_grad=True)
        fn = lambda x, b: GF.fused_leaky_relu(x, b, 0.2, 1.5, impl=impl)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, bias), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (x, bias), fast_mode=True)


def test_half_precision_is_widened_on_cpu():
    x, bias = torch.randn(2, 3, 4, 4), torch.randn(3)
    out = GF.fused_leaky_relu(x.half(), bias.half(), impl="cpu")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, GF.fused_leaky_relu(x.half(), bias.half(), impl="ref"), rtol=2e-3, atol=2e-3)


def test_opcheck():
    compiled_ops()
    for shape, layout, with_bias in (((2, 3, 4, 5), "channels_last", True), ((3, 4), "contiguous", False)):
        x = make_input(shape, layout)
        bias = torch.randn(shape[1], requires_grad=True) if with_bias else None
        torch.library.opcheck(torch.ops.gansparse.fused_leaky_relu.default, (x, bias, 0.2, 1.4))
        grad = torch.randn(shape)
        torch.library.opcheck(torch.ops.gansparse.fused_leaky_relu_backward.default,
                              (grad, x.detach(), bias.detach() if with_bias else None, 0.2, 1.4, with_bias),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.triton
def test_opcheck_triton_ops():
    import gansparse.kernels.bias_act  # noqa: F401  (registers the ops)

    x = make_input((2, 3, 4, 5), "channels_last", device=DEVICE["triton"])
    bias = torch.randn(3, device=DEVICE["triton"], requires_grad=True)
    torch.library.opcheck(torch.ops.gansparse.fused_leaky_relu_triton.default, (x, bias, 0.2, 1.4))
    torch.library.opcheck(torch.ops.gansparse.fused_leaky_relu_backward_triton.default,
                          (torch.randn_like(x), x.detach(), bias.detach(), 0.2, 1.4, True),
                          test_utils=("test_schema", "test_faketensor"))


# --- bad input ---------------------------------------------------------------------------------------

X = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=torch.randn(3)), ValueError, r"x must be a non-empty floating-point \[N, C, \*\]"),
    (dict(x=X.long()), ValueError, "x must be a non-empty floating-point"),
    (dict(x=X[:0]), ValueError, "x must be a non-empty"),
    (dict(x="x"), TypeError, "x must be a torch.Tensor"),
    (dict(bias=torch.zeros(4)), ValueError, r"bias must have shape \(3,\)"),
    (dict(bias=torch.zeros(1, 3)), ValueError, r"bias must have shape \(3,\)"),
    (dict(bias=torch.zeros(3).double()), TypeError, "bias has dtype torch.float64"),
    (dict(bias=torch.zeros(3, device="meta")), ValueError, "bias is on meta"),
    (dict(bias=[0.0] * 3), TypeError, "bias must be a torch.Tensor or None"),
    (dict(negative_slope="0.2"), TypeError, "negative_slope must be a number"),
    (dict(scale=None), TypeError, "scale must be a number"),
    (dict(impl="numpy"), ValueError, "impl must be one of"),
])
@pytest.mark.parametrize("impl", ["ref", "cpu"])
def test_bad_input_raises_naming_the_argument(kwargs, error, match, impl):
    args = dict(x=X, bias=torch.zeros(3), negative_slope=0.2, scale=1.0, impl=impl) | kwargs
    with pytest.raises(error, match=match):
        GF.fused_leaky_relu(**args)


@pytest.mark.parametrize("call, match", [
    (lambda: torch.ops.gansparse.fused_leaky_relu(X, torch.zeros(2), 0.2, 1.0), r"bias must have shape \[C\] = \[3\]"),
    (lambda: torch.ops.gansparse.fused_leaky_relu(X, torch.zeros(3).double(), 0.2, 1.0), "bias has dtype"),
    (lambda: torch.ops.gansparse.fused_leaky_relu(X.int(), None, 0.2, 1.0), "x must be a floating-point"),
    (lambda: torch.ops.gansparse.fused_leaky_relu(torch.randn(3), None, 0.2, 1.0), r"x must be an \[N, C, \*\]"),
    (lambda: torch.ops.gansparse.fused_leaky_relu_backward(X[:1], X, None, 0.2, 1.0, False),
     "grad_out must have x's shape"),
    (lambda: torch.ops.gansparse.fused_leaky_relu_backward(X.double(), X, None, 0.2, 1.0, False),
     "grad_out has dtype"),
])
def test_bad_input_to_the_compiled_ops_raises_naming_the_argument(call, match):
    compiled_ops()
    with pytest.raises(RuntimeError, match=match):
        call()


def test_fake_kernels_check_like_the_compiled_ops():
    compiled_ops()
    with pytest.raises(ValueError, match="bias must be a"):
        torch.ops.gansparse.fused_leaky_relu(X.to("meta"), torch.zeros(3), 0.2, 1.0)
    with pytest.raises(ValueError, match="grad_out must match x"):
        torch.ops.gansparse.fused_leaky_relu_backward(X.to("meta")[:1], X.to("meta"), None, 0.2, 1.0, False)


def fuzz_tensor():
    return small_tensor([torch.float32, torch.float64, torch.float16, torch.int64])


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_compiled_ops(data):
    """Whatever arrives, the C++ ops raise or return tensors of the documented shapes."""
    compiled_ops()
    x = data.draw(st.one_of(fuzz_tensor(), st.just(torch.randn(2, 3, 4))))
    bias = data.draw(st.one_of(st.none(), fuzz_tensor(), st.just(torch.randn(3))))
    slope, scale = (data.draw(st.sampled_from([0.2, 0.0, -1.0, float("nan"), float("inf")])) for _ in range(2))
    try:
        if data.draw(st.booleans()):
            grad = data.draw(st.one_of(fuzz_tensor(), st.just(torch.randn(x.shape) if x.dim() else torch.randn(1))))
            bias_grad = data.draw(st.booleans())
            grad_x, grad_bias = torch.ops.gansparse.fused_leaky_relu_backward(grad, x, bias, slope, scale, bias_grad)
            assert grad_x.shape == x.shape
            assert grad_bias.shape == ((x.shape[1],) if bias_grad else (0,))
        else:
            assert torch.ops.gansparse.fused_leaky_relu(x, bias, slope, scale).shape == x.shape
    except RuntimeError:
        return
