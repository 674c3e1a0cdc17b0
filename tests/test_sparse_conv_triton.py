"""The Triton backend of sparse_conv2d against the masked dense reference, run in the Triton
interpreter on tiny shapes."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import gansparse.functional as GF  # noqa: E402
from gansparse.ops.sparse_conv import compress  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="the Triton tests run CPU tensors in the interpreter: TRITON_INTERPRET=1 must be set before triton is imported",
    ),
]

# (weight shape as torch's layer holds it, conv arguments, input [C, H, W])
CONVS = {
    "k3-s1": ((5, 4, 3, 3), dict(stride=1, padding=1), (4, 5, 7)),
    "k3-s2": ((5, 4, 3, 3), dict(stride=2, padding=1), (4, 7, 6)),
    "1x1": ((6, 4, 1, 1), dict(), (4, 3, 5)),
    "convT-k3-s2": ((4, 5, 3, 3), dict(stride=2, padding=1, output_padding=1, transposed=True), (4, 3, 4)),
    "convT-k4-s2": ((4, 3, 4, 4), dict(stride=2, padding=1, transposed=True), (4, 4, 3)),
}


def sparse_weight(shape, sparsity):
    weight = torch.randn(shape)
    return weight * (torch.rand(shape) >= sparsity)


def check_against_ref(conv, sparsity, activation):
    shape, args, input_shape = CONVS[conv]
    weight = sparse_weight(shape, sparsity)
    bias = torch.randn(shape[1] if args.get("transposed") else shape[0])
    x = torch.randn(2, *input_shape)
    expected = GF.sparse_conv2d(x, weight, bias, activation=activation, negative_slope=0.2, impl="ref", **args)
    with torch.no_grad():
        sparse = compress(weight, transposed=args.get("transposed", False))
        actual = GF.sparse_conv2d(x, sparse, bias, activation=activation, negative_slope=0.2, impl="triton", **args)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sparsity", [0.5, 1.0])
@pytest.mark.parametrize("conv", CONVS)
def test_triton_matches_ref(conv, sparsity):
    check_against_ref(conv, sparsity, "leaky_relu")


@pytest.mark.parametrize("activation", [None, "relu", "tanh"])
def test_triton_activations_match_ref(activation):
    check_against_ref("convT-k3-s2", 0.75, activation)


def test_triton_reads_any_input_layout():
    weight = sparse_weight((5, 4, 3, 3), 0.5)
    x = torch.randn(1, 4, 7, 6).transpose(2, 3)  # non-contiguous
    with torch.no_grad():
        actual = GF.sparse_conv2d(x, weight, padding=1, impl="triton")
    torch.testing.assert_close(actual, GF.sparse_conv2d(x, weight, padding=1, impl="ref"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("corrupt, match", [
    (lambda s: s._replace(row_offsets=s.row_offsets.flip(0)), "row_offsets must start at 0"),
    (lambda s: s._replace(columns=s.columns + 100), "columns must lie in"),
])
def test_triton_rejects_a_corrupt_weight(corrupt, match):
    sparse = corrupt(compress(sparse_weight((5, 4, 3, 3), 0.5)))
    with pytest.raises(ValueError, match=match), torch.no_grad():
        GF.sparse_conv2d(torch.randn(1, 4, 5, 5), sparse, impl="triton")
