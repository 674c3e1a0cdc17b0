"""Attention maps and attention distillation: every backend against the reference, the reference
against the formula, gradients, torch.library registration, and bad input."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import gansparse.functional as GF
from gansparse.ops.attention import compiled_ops
from gansparse.ops.attention_ref import attention_maps_ref

HAS_GPU = torch.cuda.is_available()

MARKS = {
    "ref": (),
    "cpu": (),
    "triton": (pytest.mark.triton,),
    "cuda": (pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU"),),
}


def backends(*impls):
    return [pytest.param(impl, marks=MARKS[impl], id=impl) for impl in impls]


BACKENDS = backends("cpu", "triton", "cuda")
# Triton runs CUDA tensors on a GPU, else CPU tensors in its interpreter.
DEVICE = {"ref": "cpu", "cpu": "cpu", "cuda": "cuda", "triton": "cuda" if HAS_GPU else "cpu"}

DTYPES = [torch.float32, torch.float64]
EXPONENTS = [1, 2, 3.5, 4]
REDUCES = ["mean", "sum"]

# Tolerance relative to the largest finite magnitude of the expected tensor: the backends differ
# from the reference only in summation order and rounding.
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5, torch.float64: 1e-12}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    finite = expected[expected.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, equal_nan=True)


# --- inputs ------------------------------------------------------------------------------------

# Each layout stores an [N, C, H, W] feature differently; the non-contiguous ones are views.
LAYOUTS = {
    "contiguous": lambda rand, n, c, h, w: rand(n, c, h, w),
    "channels_last": lambda rand, n, c, h, w: rand(n, c, h, w).contiguous(memory_format=torch.channels_last),
    "sliced_channels": lambda rand, n, c, h, w: rand(n, 2 * c, h, w)[:, 1::2],
    "sliced_width": lambda rand, n, c, h, w: rand(n, c, h, w + 3)[..., 2 : w + 2],
    "transposed_hw": lambda rand, n, c, h, w: rand(n, c, w, h).transpose(2, 3),
}


def make_feature(shape, layout="contiguous", dtype=torch.float32, device="cpu", requires_grad=True):
    """A leaf feature of `shape` stored in `layout`, drawn in its dtype so views stay views."""

    def rand(*size):
        return torch.randn(*size, dtype=dtype, device=device)

    f = LAYOUTS[layout](rand, *shape)
    assert f.shape == shape
    return f.requires_grad_(requires_grad)


def make_features(specs, dtype=torch.float32, device="cpu", requires_grad=True):
    return [make_feature(shape, layout, dtype, device, requires_grad) for shape, layout in specs]


def test_layouts_are_what_they_claim():
    shape = (2, 5, 7, 9)
    assert make_feature(shape, "contiguous").is_contiguous()
    assert make_feature(shape, "channels_last").is_contiguous(memory_format=torch.channels_last)
    for layout in ("sliced_channels", "sliced_width", "transposed_hw"):
        f = make_feature(shape, layout)
        assert f._base is not None
        assert not f.is_contiguous() and not f.is_contiguous(memory_format=torch.channels_last)


def as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def assert_backend_matches_ref(call, inputs, impl, tol=None):
    """call(impl) returns a tensor or a list of them. Compares them, and their gradients w.r.t.
    `inputs` for one shared random upstream gradient, between `impl` and 'ref'."""
    expected = as_list(call("ref"))
    upstream = [torch.randn_like(e) for e in expected]
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    actual = as_list(call(impl))
    actual_grads = torch.autograd.grad(actual, inputs, upstream)
    tol = RTOL[inputs[0].dtype] if tol is None else tol
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(a, e, tol)
    for a, e in zip(actual_grads, expected_grads):
        assert_close(a, e, tol)


# --- the reference against the formula -------------------------------------------------------


def hand_maps(f: np.ndarray, p: float, mean: bool) -> np.ndarray:
    """[N, H*W] raw maps by explicit loops: A[n, i] = (1/C) sum_c |f[n, c, i]|^p."""
    n_, c_, h_, w_ = f.shape
    maps = np.zeros((n_, h_ * w_))
    for n in range(n_):
        for h in range(h_):
            for w in range(w_):
                total = sum(abs(f[n, c, h, w]) ** p for c in range(c_))
                maps[n, h * w_ + w] = total / c_ if mean else total
    return maps


def hand_normalize(maps: np.ndarray) -> np.ndarray:
    return np.stack([row / math.sqrt(sum(v * v for v in row)) for row in maps])


def hand_loss(student: np.ndarray, target_maps: np.ndarray, reduction: str) -> float:
    squared = (hand_normalize(student) - hand_normalize(target_maps)) ** 2
    n, pixels = squared.shape
    return squared.sum() / (n * pixels) if reduction == "mean" else squared.sum() / n


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("p", [1, 2, 3.5])
def test_ref_matches_the_formula(p, reduce, reduction):
    s = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    t = torch.randn(2, 4, 2, 3, dtype=torch.float64)
    d = torch.randn(2, 5, 2, 3, dtype=torch.float64)
    mean = reduce == "mean"
    s_maps, t_maps, d_maps = (hand_maps(x.numpy(), p, mean) for x in (s, t, d))

    raw = GF.attention_maps([s], p, reduce, impl="ref")[0]
    np.testing.assert_allclose(raw.flatten(1).numpy(), s_maps, rtol=1e-12)
    flat = GF.attention_map(s, p, reduce, normalize=False, impl="ref")
    np.testing.assert_allclose(flat.numpy(), s_maps, rtol=1e-12)
    normalized = GF.attention_map(s, p, reduce, impl="ref")
    np.testing.assert_allclose(normalized.numpy(), hand_normalize(s_maps), rtol=1e-12)

    loss = GF.attention_distill_loss(s, t, p, reduce=reduce, reduction=reduction, impl="ref")
    assert loss.item() == pytest.approx(hand_loss(s_maps, t_maps, reduction), rel=1e-12)
    # DMAD co-attention: the raw maps of the teacher G and D mixed, then normalised.
    co_loss = GF.attention_distill_loss(
        [s], [(t, d)], p, teacher_mix=(0.75, 0.25), reduce=reduce, reduction=reduction, impl="ref"
    )
    expected = hand_loss(s_maps, 0.75 * t_maps + 0.25 * d_maps, reduction)
    assert co_loss.item() == pytest.approx(expected, rel=1e-12)


def test_ref_weights_and_sums_layers():
    students = [torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 2, 3, 5, dtype=torch.float64)]
    teachers = [torch.randn(2, 6, 4, 4, dtype=torch.float64), torch.randn(2, 7, 3, 5, dtype=torch.float64)]
    terms = [hand_loss(hand_maps(s.numpy(), 2, True), hand_maps(t.numpy(), 2, True), "mean")
             for s, t in zip(students, teachers)]
    loss = GF.attention_distill_loss(students, teachers, weights=(0.3, 2.0), impl="ref")
    assert loss.item() == pytest.approx(0.3 * terms[0] + 2.0 * terms[1], rel=1e-12)


def test_ref_resizes_teacher_maps():
    s = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    s_maps = hand_maps(s.numpy(), 2, True)
    big = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    small = torch.randn(2, 4, 1, 1, dtype=torch.float64)

    # Shrinking averages areas: each student pixel gets the mean of a 2x2 block of the teacher map.
    blocks = hand_maps(big.numpy(), 2, True).reshape(2, 2, 2, 2, 2).mean(axis=(2, 4)).reshape(2, 4)
    loss = GF.attention_distill_loss(s, big, impl="ref")
    assert loss.item() == pytest.approx(hand_loss(s_maps, blocks, "mean"), rel=1e-12)

    # Growing a 1x1 map spreads its single value, whatever the interpolation.
    spread = np.repeat(hand_maps(small.numpy(), 2, True), 4, axis=1)
    for resize in ("auto", "bilinear", "bicubic", "nearest", "area"):
        loss = GF.attention_distill_loss(s, small, resize=resize, impl="ref")
        assert loss.item() == pytest.approx(hand_loss(s_maps, spread, "mean"), rel=1e-12)


def test_ref_is_dmads_eager_composition():
    """For p = 2 the reference is, bit for bit, the attention code of DMAD's official release."""

    def dmad_attention(f):
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))

    s = torch.randn(4, 8, 6, 6, requires_grad=True)
    t = torch.randn(4, 16, 6, 6)
    assert torch.equal(GF.attention_map(s, 2, impl="ref"), dmad_attention(s))

    loss = GF.attention_distill_loss(s, t, 2, impl="ref")
    expected = (dmad_attention(s) - dmad_attention(t)).pow(2).mean()
    assert torch.equal(loss, expected)
    assert torch.equal(torch.autograd.grad(loss, s)[0], torch.autograd.grad(expected, s)[0])


# --- every backend against the reference -----------------------------------------------------

# Lists of (shape, layout): one call computes the maps of every layer of a list.
SMALL_CASES = {
    "batch1_7x9": [((1, 5, 7, 9), "contiguous")],
    "1x1": [((2, 3, 1, 1), "contiguous")],
    "C1": [((2, 1, 7, 9), "contiguous")],
    "C3_channels_last": [((2, 3, 7, 9), "channels_last")],
    "C13_channels_last": [((2, 13, 5, 6), "channels_last")],
    "sliced_channels": [((2, 5, 7, 9), "sliced_channels")],
    "sliced_width": [((2, 5, 7, 9), "sliced_width")],
    "transposed_hw": [((2, 5, 7, 9), "transposed_hw")],
    "mixed_layers": [
        ((2, 5, 7, 9), "contiguous"),
        ((2, 3, 4, 4), "channels_last"),
        ((2, 6, 3, 5), "sliced_channels"),
        ((2, 1, 1, 1), "contiguous"),
    ],
}
# Layers of real generators, each with its own (dtype, p, reduce): too slow for the Triton
# interpreter, and for the whole grid of options.
LARGE_CASES = {
    "N4_C256_64x64": ([((4, 256, 64, 64), "contiguous")], (torch.float32, 2, "mean")),
    "N2_C64_128x128": ([((2, 64, 128, 128), "contiguous")], (torch.float32, 3.5, "sum")),
    "N8_C512_8x8_channels_last": ([((8, 512, 8, 8), "channels_last")], (torch.float64, 4, "mean")),
    "generator_stack": (
        [((4, 256, 16, 16), "contiguous"), ((4, 128, 32, 32), "channels_last"), ((4, 64, 64, 64), "contiguous")],
        (torch.float32, 1, "sum"),
    ),
}


def matrix(small: dict, large: dict, *axes):
    """pytest parameters (impl, case, *options): every backend runs each small case with every
    combination of the option `axes`; the compiled backends also run each large case with its
    own options."""
    params = []
    for impl in ("cpu", "triton", "cuda"):
        runs = [(name, case, options) for name, case in small.items() for options in itertools.product(*axes)]
        if impl != "triton":
            runs += [(name, case, options) for name, (case, options) in large.items()]
        params += [
            pytest.param(impl, case, *options, marks=MARKS[impl], id="-".join([impl, name, *map(str, options)]))
            for name, case, options in runs
        ]
    return params


@pytest.mark.parametrize("impl, specs, dtype, p, reduce", matrix(SMALL_CASES, LARGE_CASES, DTYPES, EXPONENTS, REDUCES))
def test_maps_match_ref(impl, specs, dtype, p, reduce):
    features = make_features(specs, dtype, DEVICE[impl])
    assert_backend_matches_ref(lambda i: GF.attention_maps(features, p, reduce, impl=i), features, impl)


# A normalised 1x1 map is always 1: its gradient is rounding noise, nothing to compare. Channel
# means and sums differ by a factor that normalising removes: the maps test covers both.
@pytest.mark.parametrize("impl, specs, dtype, p, normalize", matrix(
    {name: case for name, case in SMALL_CASES.items() if len(case) == 1 and name != "1x1"},
    {"N4_C256_64x64": (LARGE_CASES["N4_C256_64x64"][0], (torch.float32, 3.5, True))},
    DTYPES, [2, 3.5], [True, False],
))
def test_map_matches_ref(impl, specs, dtype, p, normalize):
    (f,) = make_features(specs, dtype, DEVICE[impl])
    assert_backend_matches_ref(lambda i: GF.attention_map(f, p, normalize=normalize, impl=i), [f], impl)


@pytest.mark.parametrize("impl", BACKENDS)
def test_maps_of_unused_layers_get_zero_gradient(impl):
    used, unused = make_features([((2, 3, 4, 4), "contiguous"), ((2, 5, 3, 3), "channels_last")],
                                 device=DEVICE[impl])
    maps = GF.attention_maps([used, unused], impl=impl)
    grad_used, grad_unused = torch.autograd.grad(maps[0].sum(), [used, unused], allow_unused=True)
    (expected,) = torch.autograd.grad(GF.attention_maps(used, impl="ref")[0].sum(), used)
    assert_close(grad_used, expected, RTOL[used.dtype])
    assert grad_unused is None or not grad_unused.any()


@dataclass
class DistillCase:
    students: list  # (shape, layout) per layer
    teachers: list  # per layer: one (shape, layout), or a tuple of them to mix
    teacher_mix: tuple | list | None = None
    weights: tuple | None = None
    # Normalising removes the 1/C of a channel mean, except between teachers of different widths
    # mixed before normalising.
    reduce: str = "mean"


DISTILL_SMALL = {
    "same_size": DistillCase([((2, 5, 7, 9), "contiguous")], [((2, 8, 7, 9), "contiguous")]),
    "teacher_upsampled": DistillCase([((2, 5, 8, 8), "contiguous")], [((2, 8, 4, 4), "contiguous")]),
    "teacher_downsampled": DistillCase([((2, 5, 4, 4), "channels_last")], [((2, 8, 8, 8), "contiguous")]),
    "teacher_downsampled_odd": DistillCase([((1, 3, 5, 7), "contiguous")], [((1, 4, 9, 11), "sliced_width")]),
    "mixed_layers_weighted": DistillCase(
        [((2, 5, 7, 9), "contiguous"), ((2, 3, 4, 4), "channels_last"), ((2, 6, 3, 5), "sliced_channels")],
        [((2, 8, 7, 9), "contiguous"), ((2, 4, 8, 8), "channels_last"), ((2, 2, 3, 5), "transposed_hw")],
        weights=(1.0, 0.5, 2.0),
    ),
    "dmad_co_attention": DistillCase(
        [((2, 5, 8, 8), "contiguous")],
        [(((2, 8, 8, 8), "contiguous"), ((2, 16, 4, 4), "contiguous"))],
        teacher_mix=(0.5, 0.5),
    ),
    "dmad_co_attention_channel_sum": DistillCase(
        [((2, 5, 8, 8), "contiguous")],
        [(((2, 8, 8, 8), "contiguous"), ((2, 16, 4, 4), "contiguous"))],
        teacher_mix=(0.5, 0.5),
        reduce="sum",
    ),
    "dmad_three_teachers": DistillCase(
        [((2, 5, 8, 8), "contiguous")],
        [(((2, 8, 8, 8), "contiguous"), ((2, 16, 4, 4), "channels_last"), ((2, 16, 16, 16), "contiguous"))],
        teacher_mix=(0.5, 0.25, 0.25),
    ),
    "dmad_mix_per_layer": DistillCase(
        [((2, 5, 8, 8), "contiguous"), ((2, 3, 4, 4), "contiguous")],
        [(((2, 8, 8, 8), "contiguous"), ((2, 16, 4, 4), "contiguous")),
         (((2, 8, 4, 4), "contiguous"), ((2, 16, 8, 8), "contiguous"))],
        teacher_mix=[(0.5, 0.5), (0.7, 0.3)],
        weights=(1.0, 0.25),
    ),
}
DISTILL_LARGE = {
    "generator_layers": (
        DistillCase(
            [((4, 128, 32, 32), "contiguous"), ((4, 64, 64, 64), "channels_last")],
            [((4, 256, 32, 32), "contiguous"), ((4, 128, 64, 64), "channels_last")],
        ),
        (torch.float32, 2, "sum"),
    ),
}


def make_teachers(case: DistillCase, dtype, device, requires_grad=False):
    def make(spec):
        if isinstance(spec[0][0], tuple):  # several teacher features to mix
            return tuple(make_features(spec, dtype, device, requires_grad))
        return make_feature(*spec, dtype, device, requires_grad)

    return [make(spec) for spec in case.teachers]


@pytest.mark.parametrize("impl, case, dtype, p, reduction", matrix(
    DISTILL_SMALL, DISTILL_LARGE, DTYPES, [2, 3.5], ["mean", "sum"]
))
def test_distill_loss_matches_ref(impl, case, dtype, p, reduction):
    students = make_features(case.students, dtype, DEVICE[impl])
    teachers = make_teachers(case, dtype, DEVICE[impl])

    def loss(i):
        return GF.attention_distill_loss(
            students, teachers, p, case.weights, case.teacher_mix, reduce=case.reduce, reduction=reduction, impl=i
        )

    assert_backend_matches_ref(loss, students, impl)


@pytest.mark.parametrize("impl", backends("ref", "cpu", "triton", "cuda"))
def test_no_gradient_flows_to_teachers(impl):
    case = DISTILL_SMALL["dmad_co_attention"]
    students = make_features(case.students, device=DEVICE[impl])
    teachers = make_teachers(case, torch.float32, DEVICE[impl], requires_grad=True)
    loss = GF.attention_distill_loss(students, teachers, teacher_mix=case.teacher_mix, impl=impl)
    grads = torch.autograd.grad(loss, [*students, *teachers[0]], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert all(g is None for g in grads[1:])


@pytest.mark.parametrize("impl", backends("cpu", "cuda"))
def test_compiled_float64_is_float64_accurate(impl):
    f = make_feature((2, 3, 5, 5), dtype=torch.float64, device=DEVICE[impl])
    assert_backend_matches_ref(lambda i: GF.attention_maps(f, 1.1, "mean", impl=i), [f], impl, RTOL[torch.float64])


# --- gradcheck, opcheck, torch.compile ---------------------------------------------------------


@pytest.mark.parametrize("p", EXPONENTS)
@pytest.mark.parametrize("impl", ["ref", "cpu"])
def test_gradcheck_maps(impl, p):
    a, b, c = make_features([((2, 2, 3, 3), "contiguous"), ((1, 3, 2, 3), "channels_last"),
                             ((1, 2, 2, 2), "sliced_channels")], torch.float64)
    assert torch.autograd.gradcheck(lambda *f: tuple(GF.attention_maps(f, p, "sum", impl=impl)), (a, b, c))
    assert torch.autograd.gradcheck(lambda a: GF.attention_map(a, p, impl=impl), (a,))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("impl", ["ref", "cpu"])
def test_gradcheck_distill_loss(impl, reduction):
    s1 = make_feature((2, 3, 4, 4), dtype=torch.float64)
    s2 = make_feature((2, 2, 3, 5), "channels_last", torch.float64)
    teachers = [torch.randn(2, 5, 8, 8, dtype=torch.float64),
                (torch.randn(2, 4, 3, 5, dtype=torch.float64), torch.randn(2, 6, 2, 2, dtype=torch.float64))]

    def loss(s1, s2):
        return GF.attention_distill_loss(
            [s1, s2], teachers, 3.5, (1.0, 0.5), [(1.0,), (0.5, 0.5)], reduction=reduction, impl=impl
        )

    assert torch.autograd.gradcheck(loss, (s1, s2))


def op_samples(requires_grad: bool):
    return {
        "contiguous": ([make_feature((2, 3, 4, 5), requires_grad=requires_grad)], 2.0, True),
        "channels_last": ([make_feature((2, 3, 4, 5), "channels_last", requires_grad=requires_grad)], 3.5, False),
        "mixed_layers": (make_features([((1, 5, 3, 3), "sliced_channels"), ((1, 2, 1, 1), "contiguous"),
                                       ((1, 4, 2, 3), "transposed_hw")], requires_grad=requires_grad), 1.0, True),
    }


@pytest.mark.parametrize("sample", op_samples(True).keys())
def test_opcheck_compiled_ops(sample):
    compiled_ops()
    features, p, mean = op_samples(True)[sample]
    torch.library.opcheck(torch.ops.gansparse.attention_maps.default, (features, p, mean))
    grads = [torch.randn(f.shape[0], f.shape[2], f.shape[3]) for f in features]
    detached = [f.detach() for f in features]
    torch.library.opcheck(torch.ops.gansparse.attention_maps_backward.default, (grads, detached, p, mean))


@pytest.mark.triton
def test_opcheck_triton_op():
    import gansparse.kernels.attention  # noqa: F401  (registers the op)

    f = make_feature((1, 2, 3, 3), "channels_last", device=DEVICE["triton"])
    torch.library.opcheck(torch.ops.gansparse.attention_maps_triton.default, ([f], 2.0, True))


def test_torch_compile_fullgraph_matches_eager():
    case = DISTILL_SMALL["dmad_mix_per_layer"]
    students = make_features(case.students)
    teachers = make_teachers(case, torch.float32, "cpu")

    def loss(students):
        return GF.attention_distill_loss(
            students, teachers, 3.5, case.weights, case.teacher_mix, reduction="sum", impl="cpu"
        )

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    actual, expected = compiled(students), loss(students)
    assert_close(actual, expected, RTOL[torch.float32])
    for a, e in zip(torch.autograd.grad(actual, students), torch.autograd.grad(expected, students)):
        assert_close(a, e, RTOL[torch.float32])


# --- bad input ---------------------------------------------------------------------------------


def _x(*shape, **kwargs):
    return torch.randn(*shape, **kwargs)


BAD_CALLS = {
    "3-D feature": (lambda: GF.attention_map(_x(2, 3, 4)), ValueError, r"f must be a 4-D \[N, C, H, W\] tensor"),
    "3-D feature in a list": (lambda: GF.attention_maps([_x(2, 3, 4, 4), _x(2, 3, 4)]), ValueError,
                              r"features\[1\] must be a 4-D"),
    "3-D student": (lambda: GF.attention_distill_loss(_x(2, 3, 4), _x(2, 3, 4, 4)), ValueError,
                    r"students\[0\] must be a 4-D"),
    "5-D teacher": (lambda: GF.attention_distill_loss(_x(2, 3, 4, 4), _x(2, 3, 4, 4, 1)), ValueError,
                    r"teachers\[0\] must be a 4-D"),
    "batch mismatch": (lambda: GF.attention_distill_loss(_x(2, 3, 4, 4), _x(3, 3, 4, 4)), ValueError,
                       r"teachers\[0\] has batch 3 but students\[0\] has batch 2"),
    "batch mismatch in a mix": (lambda: GF.attention_distill_loss([_x(2, 3, 4, 4)], [(_x(2, 3, 4, 4), _x(1, 3, 4, 4))]),
                                ValueError, r"teachers\[0\]\[1\] has batch 1 but students\[0\] has batch 2"),
    "integer dtype": (lambda: GF.attention_map(torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError,
                      r"f must be a floating-point tensor, got dtype torch.int64"),
    "integer teacher": (lambda: GF.attention_distill_loss(_x(2, 3, 4, 4), torch.ones(2, 3, 4, 4, dtype=torch.int32)),
                        TypeError, r"teachers\[0\] must be a floating-point tensor"),
    "not a tensor": (lambda: GF.attention_map(np.ones((2, 3, 4, 4))), TypeError, r"f must be a torch.Tensor"),
    "empty list": (lambda: GF.attention_maps([]), TypeError, r"features must be a tensor or a non-empty sequence"),
    "empty batch": (lambda: GF.attention_map(_x(0, 3, 4, 4)), ValueError, r"f must not be empty"),
    "empty student batch": (lambda: GF.attention_distill_loss(_x(0, 3, 4, 4), _x(0, 3, 4, 4)), ValueError,
                            r"students\[0\] must not be empty"),
    "student on another device": (lambda: GF.attention_distill_loss(_x(2, 3, 4, 4, device="meta"), _x(2, 3, 4, 4)),
                                  ValueError, r"teachers\[0\] is on cpu but students\[0\] is on meta"),
    "students on two devices": (lambda: GF.attention_distill_loss([_x(2, 3, 4, 4), _x(2, 3, 4, 4, device="meta")],
                                                                  [_x(2, 3, 4, 4), _x(2, 3, 4, 4)]),
                                ValueError, r"students\[1\] is on meta but students\[0\] is on cpu"),
    "features on two devices": (lambda: GF.attention_maps([_x(2, 3, 4, 4), _x(2, 3, 4, 4, device="meta")]),
                                ValueError, r"features\[1\] is on meta but features\[0\] is on cpu"),
    "p below 1": (lambda: GF.attention_map(_x(2, 3, 4, 4), p=0.5), ValueError, r"p must be a finite number >= 1, got 0.5"),
    "p negative": (lambda: GF.attention_distill_loss(_x(2, 3, 4, 4), _x(2, 3, 4, 4), p=-2), ValueError, r"p must be"),
    "p nan": (lambda: GF.attention_maps(_x(2, 3, 4, 4), p=float("nan")), ValueError, r"p must be a finite number"),
    "p inf": (lambda: GF.attention_maps(_x(2, 3, 4, 4), p=float("inf")), ValueError, r"p must be a finite number"),
    "p a string": (lambda: GF.attention_maps(_x(2, 3, 4, 4), p="2"), ValueError, r"p must be a finite number"),
    "p a bool": (lambda: GF.attention_maps(_x(2, 3, 4, 4), p=True), ValueError, r"p must be a finite number"),
    "bad reduce": (lambda: GF.attention_map(_x(2, 3, 4, 4), reduce="max"), ValueError, r"reduce must be one of"),
    "bad reduction": (lambda: GF.attention_distill_loss(_x(2, 3, 4, 4), _x(2, 3, 4, 4), reduction="none"),
                      ValueError, r"reduction must be one of"),
    "bad resize": (lambda: GF.attention_distill_loss(_x(2, 3, 4, 4), _x(2, 3, 8, 8), resize="linear"), ValueError,
                   r"resize must be one of"),
    "too few teachers": (lambda: GF.attention_distill_loss([_x(2, 3, 4, 4)] * 2, [_x(2, 3, 4, 4)]), ValueError,
                         r"teachers must hold one entry per student layer: 2 students, got 1"),
    "too many teachers": (lambda: GF.attention_distill_loss([_x(2, 3, 4, 4)], [_x(2, 3, 4, 4)] * 3), ValueError,
                          r"teachers must hold one entry per student layer: 1 students, got 3"),
    "wrong number of weights": (lambda: GF.attention_distill_loss([_x(2, 3, 4, 4)] * 2, [_x(2, 3, 4, 4)] * 2,
                                                                  weights=(1.0,)),
                                ValueError, r"weights has 1 entries for 2 layers"),
    "wrong teacher_mix length": (lambda: GF.attention_distill_loss(_x(2, 3, 4, 4), [(_x(2, 3, 4, 4), _x(2, 3, 4, 4))],
                                                                   teacher_mix=(0.5, 0.25, 0.25)),
                                 ValueError, r"teacher_mix for layer 0 has 3 weights but teachers\[0\] has 2 features"),
    "wrong teacher_mix layers": (lambda: GF.attention_distill_loss([_x(2, 3, 4, 4)] * 2, [_x(2, 3, 4, 4)] * 2,
                                                                   teacher_mix=[(1.0,)]),
                                 ValueError, r"teacher_mix has 1 entries for 2 layers"),
    "unknown impl": (lambda: GF.attention_maps(_x(2, 3, 4, 4), impl="numpy"), ValueError,
                     r"impl must be one of \('ref', 'cpu', 'cuda', 'triton'\), got 'numpy'"),
}


@pytest.mark.parametrize("call, error, match", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _maps_op(features, p=2.0, mean=True):
    compiled_ops()
    return torch.ops.gansparse.attention_maps(features, p, mean)


def _backward_op(grads, features, p=2.0, mean=True):
    compiled_ops()
    return torch.ops.gansparse.attention_maps_backward(grads, features, p, mean)


# The compiled ops check their input too: they are reachable without the Python wrappers.
BAD_OP_CALLS = {
    "3-D feature": (lambda: _maps_op([_x(2, 3, 4)]), r"features\[0\] must be a 4-D"),
    "bool feature": (lambda: _maps_op([_x(2, 3, 4, 4), torch.ones(2, 3, 4, 4, dtype=torch.bool)]),
                     r"features\[1\] must be a floating-point tensor"),
    "empty feature": (lambda: _maps_op([_x(2, 0, 4, 4)]), r"features\[0\] must not be empty"),
    "p below 1": (lambda: _maps_op([_x(2, 3, 4, 4)], 0.5), r"p must be a finite number >= 1"),
    "features on two devices": (lambda: _maps_op([_x(2, 3, 4, 4), _x(2, 3, 4, 4, device="meta")]),
                                r"features\[1\] is on meta"),
    "grads of the wrong shape": (lambda: _backward_op([_x(2, 4, 5)], [_x(2, 3, 4, 4)]),
                                 r"grads\[0\] must have shape \[2, 4, 4\], got \[2, 4, 5\]"),
    "too many grads": (lambda: _backward_op([_x(2, 4, 4)] * 2, [_x(2, 3, 4, 4)]),
                       r"grads has 2 tensors but features has 1"),
    "grads on another device": (lambda: _backward_op([_x(2, 4, 4, device="meta")], [_x(2, 3, 4, 4)]),
                                r"grads\[0\] is on meta but features\[0\] is on cpu"),
}


@pytest.mark.parametrize("call, match", BAD_OP_CALLS.values(), ids=BAD_OP_CALLS.keys())
def test_bad_input_to_compiled_ops_raises_naming_the_argument(call, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        call()


# --- fuzzing the compiled ops ------------------------------------------------------------------

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FUZZ_DTYPES = [*FLOAT_DTYPES, torch.int32, torch.int64, torch.bool, torch.complex64]
FUZZ_EXPONENTS = st.one_of(
    st.floats(1.0, 8.0),
    st.sampled_from([1.0, 2.0, 4.0]),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -2.0, 0.0, 0.5, 0.999]),
)
# Where a fuzzed call may fail, it must fail with one of these, never crash or return garbage.
CLEAN_ERRORS = (RuntimeError, ValueError, TypeError)


@st.composite
def fuzz_tensors(draw, dims=st.integers(0, 5), dtypes=st.sampled_from(FUZZ_DTYPES), allow_empty=True):
    """A tensor of random shape, dtype and strides, with NaN and infinity sometimes."""
    ndim = draw(dims)
    shape = draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim))
    if allow_empty and ndim and draw(st.integers(0, 3)) == 0:
        shape[draw(st.integers(0, ndim - 1))] = 0
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    t = torch.randn(shape, generator=generator, dtype=torch.float64) * 2
    if t.numel() and draw(st.booleans()):
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([0.0, float("nan"), float("inf")]))
    t = t.to(draw(dtypes))
    view = draw(st.sampled_from(["none", "permute", "slice", "channels_last"]))
    if view == "permute" and t.dim() > 1:
        t = t.permute(draw(st.permutations(range(t.dim()))))
    elif view == "slice" and t.dim() > 0:
        index = [slice(None)] * t.dim()
        index[draw(st.integers(0, t.dim() - 1))] = slice(None, None, 2)
        t = t[tuple(index)]
    elif view == "channels_last" and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


# Valid features, of random strides and with NaN and infinity sometimes.
good_features = fuzz_tensors(dims=st.just(4), dtypes=st.sampled_from(FLOAT_DTYPES), allow_empty=False)


@st.composite
def feature_lists(draw):
    """Lists of valid features, half of the time with one replaced by an arbitrary tensor."""
    features = draw(st.lists(good_features, max_size=3))
    if features and draw(st.booleans()):
        features[draw(st.integers(0, len(features) - 1))] = draw(fuzz_tensors())
    return features


def valid_features(features, p) -> bool:
    return (
        len(features) > 0
        and math.isfinite(p)
        and p >= 1
        and all(f.dim() == 4 and f.is_floating_point() and f.numel() > 0 for f in features)
    )


@settings(max_examples=200, deadline=None)
@given(features=feature_lists(), p=FUZZ_EXPONENTS, mean=st.booleans())
def test_fuzz_maps_op(features, p, mean):
    try:
        maps = _maps_op(features, p, mean)
    except CLEAN_ERRORS:
        assert not valid_features(features, p)
        return
    assert valid_features(features, p), "invalid input was accepted"
    expected = attention_maps_ref([f.double() for f in features], p, mean)
    for m, e, f in zip(maps, expected, features, strict=True):
        assert m.dtype == f.dtype and m.shape == e.shape
        assert_close(m.double(), e.to(f.dtype).double(), RTOL[f.dtype])


@st.composite
def fuzz_backward_args(draw):
    """Valid features and their map gradients, of any dtype; half of the time one gradient is an
    arbitrary tensor instead, a quarter of the time there is one gradient too many or too few."""
    features = draw(st.lists(good_features, min_size=1, max_size=3))
    dtypes = st.sampled_from([*FLOAT_DTYPES, torch.int64, torch.bool])
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    grads = [torch.randn(f.shape[0], f.shape[2], f.shape[3], generator=generator).to(draw(dtypes)) for f in features]
    if draw(st.booleans()):
        grads[draw(st.integers(0, len(grads) - 1))] = draw(fuzz_tensors())
    elif draw(st.booleans()):
        grads = grads[:-1] if draw(st.booleans()) else grads + grads[:1]
    return grads, features


@settings(max_examples=200, deadline=None)
@given(args=fuzz_backward_args(), p=FUZZ_EXPONENTS, mean=st.booleans())
def test_fuzz_maps_backward_op(args, p, mean):
    grads, features = args
    valid = valid_features(features, p) and len(grads) == len(features) and all(
        g.shape == (f.shape[0], f.shape[2], f.shape[3]) for g, f in zip(grads, features))
    try:
        result = _backward_op(grads, features, p, mean)
    except CLEAN_ERRORS:
        assert not valid
        return
    assert valid, "invalid input was accepted"
    for g, f, r in zip(grads, features, result, strict=True):
        leaf = f.double().requires_grad_()
        (expected,) = torch.autograd.grad(attention_maps_ref([leaf], p, mean), [leaf], [g.double()])
        assert r.dtype == f.dtype and r.shape == f.shape
        assert_close(r.double(), expected.to(f.dtype).double(), RTOL[f.dtype])
