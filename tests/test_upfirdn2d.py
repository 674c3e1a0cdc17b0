"""upfirdn2d: the reference against the definition and the StyleGAN2 reference's formulation, the
compiled backends against the reference (forward, backward, double backward) over odd shapes and
layouts, torch.library registration, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _reference_stylegan2 as reference
from _fuzz import small_tensor
import gansparse.functional as GF
from gansparse.ops.upfirdn2d import compiled_ops, output_size
from gansparse.ops.upfirdn2d_ref import upfirdn2d_ref


HAS_GPU = torch.cuda.is_available()
COMPILED = [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")),
            pytest.param("triton", id="triton", marks=pytest.mark.triton)]
# Triton runs CUDA tensors on a GPU, else CPU tensors in its interpreter.
DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda" if HAS_GPU else "cpu"}

# (up, down, pad (x0, x1, y0, y1), kernel shape): StyleGAN2's uses first, then odd ones.
CASES = [
    (2, 1, (2, 1, 2, 1), (4, 4)),    # Upsample
    (1, 2, (1, 1, 1, 1), (4, 4)),    # Downsample
    (1, 1, (2, 2, 2, 2), (4, 4)),    # Blur after a transposed conv
    (1, 1, (1, 1, 1, 1), (4, 4)),    # Blur before a stride-2 conv
    ((3, 2), (1, 2), (0, 3, -1, 2), (3, 5)),
    (2, 3, (-2, 1, 3, -1), (5, 2)),
    (1, 1, (0, 0, 0, 0), (1, 1)),
    (4, 4, (3, 3, 3, 3), (6, 6)),
]

# Each layout stores an [N, C, H, W] tensor differently; the non-contiguous ones are views.
LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "sliced": lambda t: torch.cat([t, t], 1)[:, ::2],
    "transposed_hw": lambda t: t.transpose(2, 3).contiguous().transpose(2, 3),
}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _pad4(pad):
    return pad if len(pad) == 4 else pad * 2


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def upfirdn_by_definition(x: np.ndarray, k: np.ndarray, up, down, pad) -> np.ndarray:
    """out[o] = sum_t u[o * down + t] * k[kh - 1 - t] over the zero-inserted, padded signal u."""
    (ux, uy), (dx, dy), (x0, x1, y0, y1) = _pair(up), _pair(down), _pad4(pad)
    n, c, h, w = x.shape
    kh, kw = k.shape
    uh, uw = h * uy + y0 + y1, w * ux + x0 + x1
    u = np.zeros((n, c, uh, uw))
    for i in range(h):
        for j in range(w):
            pi, pj = i * uy + y0, j * ux + x0
            if 0 <= pi < uh and 0 <= pj < uw:
                u[:, :, pi, pj] = x[:, :, i, j]
    oh, ow = (uh - kh) // dy + 1, (uw - kw) // dx + 1
    out = np.zeros((n, c, oh, ow))
    for oy in range(oh):
        for ox in range(ow):
            window = u[:, :, oy * dy: oy * dy + kh, ox * dx: ox * dx + kw]
            out[:, :, oy, ox] = (window * k[::-1, ::-1]).sum((2, 3))
    return out


def make_input(shape, layout="contiguous", dtype=torch.float32, device="cpu"):
    x = LAYOUTS[layout](torch.randn(shape, dtype=dtype, device=device))
    assert x.shape == shape
    return x.requires_grad_(True)


def test_layouts_are_what_they_claim():
    assert make_input((2, 3, 5, 4), "channels_last").is_contiguous(memory_format=torch.channels_last)
    for layout in ("sliced", "transposed_hw"):
        x = make_input((2, 3, 5, 4), layout)
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)


# --- the reference --------------------------------------------------------------------------------


@pytest.mark.parametrize("up, down, pad, kernel_shape", CASES)
def test_ref_matches_the_definition(up, down, pad, kernel_shape):
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    k = torch.randn(kernel_shape, dtype=torch.float64)
    expected = upfirdn_by_definition(x.numpy(), k.numpy(), up, down, pad)
    actual = GF.upfirdn2d(x, k, up=up, down=down, pad=pad, impl="ref")
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("up, down, pad", [(2, 1, (2, 1)), (1, 2, (1, 1)), (1, 1, (2, 2)), (2, 2, (-1, 3))])
def test_ref_matches_the_stylegan2_formulation(up, down, pad):
    x, k = torch.randn(2, 3, 9, 9), reference.make_kernel([1, 3, 3, 1])
    torch.testing.assert_close(GF.upfirdn2d(x, k, up=up, down=down, pad=pad, impl="ref"),
                               reference.upfirdn2d(x, k, up=up, down=down, pad=pad))


def test_gradcheck_ref():
    x = make_input((1, 2, 4, 3), dtype=torch.float64)
    k = torch.randn(3, 4, dtype=torch.float64)
    for up, down, pad, _ in (CASES[0], CASES[1], CASES[4], CASES[5]):
        assert torch.autograd.gradcheck(lambda x: upfirdn2d_ref(x, k, _pair(up), _pair(down), _pad4(pad)), (x,),
                                        fast_mode=True)


# --- compiled backends against the reference ----------------------------------------------------


def assert_matches_ref(impl, x, k, up, down, pad, tol):
    expected = GF.upfirdn2d(x, k, up=up, down=down, pad=pad, impl="ref")
    actual = GF.upfirdn2d(x, k, up=up, down=down, pad=pad, impl=impl)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, **tol)
    upstream = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, upstream)
    (actual_grad,) = torch.autograd.grad(actual, x, upstream)
    torch.testing.assert_close(actual_grad, expected_grad, **tol)
    return actual


@pytest.mark.parametrize("impl", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("up, down, pad, kernel_shape", CASES)
def test_compiled_matches_ref(impl, dtype, up, down, pad, kernel_shape):
    k = torch.randn(kernel_shape, dtype=dtype, device=DEVICE[impl])
    (ux, uy), (dx, dy), (x0, x1, y0, y1) = _pair(up), _pair(down), _pad4(pad)
    # The Triton interpreter costs milliseconds per operation: one shape there.
    shapes = ((2, 3, 7, 5),) if impl == "triton" else ((2, 3, 7, 5), (1, 1, 2, 3), (1, 4, 6, 6))
    for shape in shapes:
        if output_size(shape[2], uy, y0, y1, kernel_shape[0], dy) < 1 or \
                output_size(shape[3], ux, x0, x1, kernel_shape[1], dx) < 1:
            continue
        x = make_input(shape, dtype=dtype, device=DEVICE[impl])
        assert_matches_ref(impl, x, k, up, down, pad, TOL[dtype])


@pytest.mark.parametrize("impl", COMPILED)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("up, down, pad, kernel_shape", CASES[:5])
def test_compiled_layouts_match_ref(impl, layout, up, down, pad, kernel_shape):
    x = make_input((2, 5, 6, 7), layout, device=DEVICE[impl])
    k = torch.randn(kernel_shape, device=DEVICE[impl])
    out = assert_matches_ref(impl, x, k, up, down, pad, TOL[torch.float32])
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("impl", COMPILED)
def test_gradcheck_and_gradgradcheck_compiled(impl):
    """The gradient is an upfirdn2d with the flipped kernel, and so is its gradient."""
    k = torch.randn(3, 4, dtype=torch.float64, device=DEVICE[impl])
    for up, down, pad, _ in (CASES[4],) if impl == "triton" else (CASES[0], CASES[4], CASES[5]):
        x = make_input((1, 1, 4, 3), dtype=torch.float64, device=DEVICE[impl])
        fn = lambda x: GF.upfirdn2d(x, k, up=up, down=down, pad=pad, impl=impl)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


def test_half_precision_is_widened_on_cpu():
    x = torch.randn(2, 3, 6, 6)
    k = torch.randn(4, 4)
    out = GF.upfirdn2d(x.half(), k, up=2, pad=(2, 1), impl="cpu")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), GF.upfirdn2d(x.half().float(), k, up=2, pad=(2, 1), impl="ref"),
                               rtol=2e-3, atol=2e-3)


def test_kernel_gets_no_gradient():
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    k = torch.randn(3, 3, requires_grad=True)
    for impl in ("ref", "cpu"):
        GF.upfirdn2d(x, k, impl=impl).sum().backward()
        assert k.grad is None


def test_opcheck():
    compiled_ops()
    for (up, down, pad, kernel_shape), layout in ((CASES[0], "channels_last"), (CASES[4], "contiguous")):
        x = make_input((2, 3, 5, 6), layout)
        k = torch.randn(kernel_shape)
        (ux, uy), (dx, dy) = _pair(up), _pair(down)
        torch.library.opcheck(torch.ops.gansparse.upfirdn2d.default, (x, k, ux, uy, dx, dy, *_pad4(pad)))


@pytest.mark.triton
def test_opcheck_triton_op():
    import gansparse.kernels.upfirdn2d  # noqa: F401  (registers the op)

    x = make_input((1, 2, 5, 4), "channels_last", device=DEVICE["triton"])
    k = torch.randn(4, 4, device=DEVICE["triton"])
    torch.library.opcheck(torch.ops.gansparse.upfirdn2d_triton.default, (x, k, 2, 2, 1, 1, 2, 1, 2, 1))


def test_torch_compile_matches_eager():
    compiled_ops()
    x, k = torch.randn(2, 3, 8, 8), torch.randn(4, 4)
    fn = torch.compile(lambda x: GF.upfirdn2d(x, k, up=2, pad=(2, 1), impl="cpu") * 2, fullgraph=True)
    torch.testing.assert_close(fn(x), GF.upfirdn2d(x, k, up=2, pad=(2, 1), impl="ref") * 2)


# --- bad input ---------------------------------------------------------------------------------------

X, K = torch.randn(1, 2, 4, 4), torch.ones(2, 2)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=X[0]), ValueError, "x must be a non-empty floating-point"),
    (dict(x=X.long()), ValueError, "x must be a non-empty floating-point"),
    (dict(x=X[:0]), ValueError, "x must be a non-empty"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(kernel=torch.ones(4)), ValueError, "kernel must be a non-empty floating-point"),
    (dict(kernel=torch.ones(2, 0)), ValueError, "kernel must be a non-empty"),
    (dict(kernel=torch.ones(2, 2, device="meta")), ValueError, "kernel is on meta"),
    (dict(up=0), ValueError, "up and down must be >= 1"),
    (dict(down=-1), ValueError, "up and down must be >= 1"),
    (dict(up=1.5), TypeError, "up must be an int or a pair of ints"),
    (dict(down=(1, 2, 3)), TypeError, "down must be an int or a pair of ints"),
    (dict(pad=(1, 2, 3)), TypeError, r"pad must be \(p0, p1\) or \(x0, x1, y0, y1\)"),
    (dict(pad=(-3, -3)), ValueError, "the output would be empty"),
    (dict(impl="numpy"), ValueError, "impl must be one of"),
])
@pytest.mark.parametrize("impl", ["ref", "cpu"])
def test_bad_input_raises_naming_the_argument(kwargs, error, match, impl):
    args = dict(x=X, kernel=K, up=1, down=1, pad=(0, 0), impl=impl) | kwargs
    with pytest.raises(error, match=match):
        GF.upfirdn2d(**args)


@pytest.mark.parametrize("args, match", [
    ((X, K.double(), 1, 1, 1, 1, 0, 0, 0, 0), "kernel has dtype"),
    ((X, K, 0, 1, 1, 1, 0, 0, 0, 0), "up and down must be >= 1"),
    ((X, K, 1, 1, 1, 1, -4, 0, 0, 0), "the output would be empty"),
    ((X[0], K, 1, 1, 1, 1, 0, 0, 0, 0), "x must be a 4-D"),
    ((X.int(), K.int(), 1, 1, 1, 1, 0, 0, 0, 0), "x must be a floating-point"),
    ((X, K[0], 1, 1, 1, 1, 0, 0, 0, 0), "kernel must be a non-empty"),
])
def test_bad_input_to_the_compiled_op_raises_naming_the_argument(args, match):
    compiled_ops()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.gansparse.upfirdn2d(*args)


def test_fake_kernel_checks_like_the_compiled_op():
    compiled_ops()
    with pytest.raises(ValueError, match="kernel must be a non-empty"):
        torch.ops.gansparse.upfirdn2d(X.to("meta"), K, 1, 1, 1, 1, 0, 0, 0, 0)  # kernel on another device
    out = torch.ops.gansparse.upfirdn2d(X.to("meta"), K.to("meta"), 2, 2, 1, 1, 1, 0, 1, 0)
    assert out.shape == (1, 2, 8, 8)


SMALL_INTS = st.integers(-3, 4)


def fuzz_tensor():
    return small_tensor([torch.float32, torch.float64, torch.float16, torch.int32])


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_compiled_op(data):
    """Whatever arrives, the C++ op raises or returns a tensor of the documented shape."""
    compiled_ops()
    x = data.draw(st.one_of(fuzz_tensor(), st.just(torch.randn(2, 3, 4, 5))))
    kernel = data.draw(st.one_of(fuzz_tensor(), st.just(torch.randn(3, 2))))
    ints = [data.draw(SMALL_INTS) for _ in range(8)]
    try:
        out = torch.ops.gansparse.upfirdn2d(x, kernel, *ints)
    except RuntimeError:
        return
    ux, uy, dx, dy, x0, x1, y0, y1 = ints
    expected_h = (x.shape[2] * uy + y0 + y1 - kernel.shape[0]) // dy + 1
    expected_w = (x.shape[3] * ux + x0 + x1 - kernel.shape[1]) // dx + 1
    assert out.shape == (x.shape[0], x.shape[1], expected_h, expected_w)
    assert torch.isfinite(out).all() or not torch.isfinite(x).all()
