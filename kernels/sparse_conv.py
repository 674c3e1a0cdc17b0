"""Triton kernel of the direct sparse convolution. The op's contract is the docstring of
gansparse/ops/sparse_conv.py.

A program computes a block of BLOCK_P output pixels of one output channel of one sample: it walks
the channel's nonzeros in the CSR weight and, for each, gathers the input pixels the tap reads
(the same tap geometry as the fused conv kernel, so zero padding and the gaps of a transposed
conv are masked-off loads) and accumulates value * input in float32. Bias and the activation
follow before the store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from gansparse._dispatch import triton_interpreted
from gansparse.ops.sparse_conv import _fake, check_csr

from .conv_norm_act import _activation, _input_coordinate

ACTIVATION_CODES = {"none": 0, "relu": 1, "leaky_relu": 2, "tanh": 3}


@triton.jit
def _sparse_conv_kernel(
    x_ptr, values_ptr, columns_ptr, row_offsets_ptr, bias_ptr, out_ptr,
    H, W, OH, OW, C_OUT, KH, KW,
    stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    negative_slope,
    TRANSPOSED: tl.constexpr, ACT: tl.constexpr, BLOCK_P: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    o = tl.program_id(1)
    n = tl.program_id(2)
    p_valid = p < OH * OW
    oh = p // OW
    ow = p % OW
    acc = tl.zeros([BLOCK_P], tl.float32)
    for k in range(tl.load(row_offsets_ptr + o), tl.load(row_offsets_ptr + o + 1)):
        value = tl.load(values_ptr + k)
        column = tl.load(columns_ptr + k)
        c, kh, kw = column // (KH * KW), (column // KW) % KH, column % KW
        ih, h_exists = _input_coordinate(oh, kh, stride_h, padding_h, dilation_h, H, TRANSPOSED)
        iw, w_exists = _input_coordinate(ow, kw, stride_w, padding_w, dilation_w, W, TRANSPOSED)
        x = tl.load(x_ptr + n * x_stride_n + c * x_stride_c + ih * x_stride_h + iw * x_stride_w,
                    mask=p_valid & h_exists & w_exists, other=0.0)
        acc += value * x
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + o)
    if ACT == 3:
        acc = 2.0 * tl.sigmoid(2.0 * acc) - 1.0  # tanh
    else:
        acc = _activation(acc, negative_slope, ACT)
    tl.store(out_ptr + (n * C_OUT + o) * OH * OW + p, acc, mask=p_valid)


@triton_op("gansparse::sparse_conv2d_triton", mutates_args=())
def sparse_conv2d(
    x: torch.Tensor,
    values: torch.Tensor,
    columns: torch.Tensor,
    row_offsets: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    transposed: bool,
    output_padding: list[int],
    activation: str,
    negative_slope: float,
) -> torch.Tensor:
    """The Triton twin of gansparse::sparse_conv2d (same arguments, same checks)."""
    out = _fake(x, values, columns, row_offsets, bias, kernel_size, stride, padding, dilation, transposed,
                output_padding, activation, negative_slope)
    check_csr(columns, row_offsets, x.shape[1] * kernel_size[0] * kernel_size[1])
    n, c_out, oh, ow = out.shape
    block_p = min(triton.next_power_of_2(oh * ow), 1024 if triton_interpreted() else 128)
    wrap_triton(_sparse_conv_kernel)[(triton.cdiv(oh * ow, block_p), c_out, n)](
        x, values, columns, row_offsets, bias, out, x.shape[2], x.shape[3], oh, ow, c_out, *kernel_size,
        *stride, *padding, *dilation, *x.stride(), negative_slope,
        TRANSPOSED=transposed, ACT=ACTIVATION_CODES[activation], BLOCK_P=block_p,
    )
    return out


# Explicit fake kernel: under TRITON_INTERPRET=1 wrap_triton cannot trace, so the fake that
# triton_op derives by running the function would launch the interpreter on fake tensors.
sparse_conv2d.register_fake(_fake)
