"""Triton kernel of upfirdn2d (gansparse/ops/upfirdn2d.py); the math mirrors
csrc/stylegan2_ops_math.h.

A program computes BLOCK output pixels of BLOCK_PLANES channel planes. For every kernel tap it reads the
input sample that tap lands on, where there is one: the upsampled, padded position
o * down + t - pad0 must be a multiple of up inside the input. The kernel takes any strides, so
channels_last and sliced inputs run without a copy.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import custom_op, triton_op, wrap_triton

from gansparse.ops.upfirdn2d import fake_upfirdn2d, register

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# As in kernels/attention.py: an opaque custom op in the interpreter, a triton_op on a GPU.
define_op = custom_op if INTERPRETED else triton_op


@triton.jit
def _upfirdn2d_kernel(
    x_ptr, k_ptr, out_ptr, planes, C, H, W, OH, OW,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    o_stride_n, o_stride_c, o_stride_h, o_stride_w,
    up_x, up_y, down_x, down_y, pad_x0, pad_y0,
    KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, BLOCK_PLANES: tl.constexpr, BLOCK: tl.constexpr,
):
    plane = tl.program_id(1) * BLOCK_PLANES + tl.arange(0, BLOCK_PLANES)  # n * C + c
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = (plane[:, None] < planes) & (o < OH * OW)[None, :]
    oy, ox = o // OW, o % OW
    x_planes = x_ptr + ((plane // C) * x_stride_n + (plane % C) * x_stride_c)[:, None]
    acc = tl.zeros([BLOCK_PLANES, BLOCK], dtype=ACC)
    for ty in tl.static_range(KH):
        py = oy * down_y + ty - pad_y0  # position in the upsampled input
        row_ok = (py >= 0) & (py % up_y == 0) & (py < H * up_y)
        iy = tl.where(row_ok, py // up_y, 0)
        for tx in tl.static_range(KW):
            px = ox * down_x + tx - pad_x0
            ok = row_ok & (px >= 0) & (px % up_x == 0) & (px < W * up_x)
            ix = tl.where(ok, px // up_x, 0)
            offsets = (iy * x_stride_h + ix * x_stride_w)[None, :]
            value = tl.load(x_planes + offsets, mask=in_range & ok[None, :], other=0.0).to(ACC)
            weight = tl.load(k_ptr + (KH - 1 - ty) * KW + (KW - 1 - tx)).to(ACC)  # the flipped kernel
            acc += value * weight
    out_planes = ((plane // C) * o_stride_n + (plane % C) * o_stride_c)[:, None]
    out = out_ptr + out_planes + (oy * o_stride_h + ox * o_stride_w)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=in_range)


def _blocks(planes: int, pixels: int) -> tuple[int, int]:
    if INTERPRETED:  # about a millisecond per program: few, large ones
        return min(triton.next_power_of_2(planes), 64), min(triton.next_power_of_2(pixels), 1024)
    return 1, 256


@define_op("gansparse::upfirdn2d_triton", mutates_args=())
def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up_x: int, up_y: int, down_x: int, down_y: int, pad_x0: int,
              pad_x1: int, pad_y0: int, pad_y1: int) -> torch.Tensor:
    out = fake_upfirdn2d(x, kernel, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1)  # checks, and allocates
    N, C, H, W = x.shape
    OH, OW = out.shape[2:]
    block_planes, block = _blocks(N * C, OH * OW)
    wrap_triton(_upfirdn2d_kernel)[(triton.cdiv(OH * OW, block), triton.cdiv(N * C, block_planes))](
        x, kernel.contiguous(), out, N * C, C, H, W, OH, OW, *x.stride(), *out.stride(),
        up_x, up_y, down_x, down_y, pad_x0, pad_y0,
        KH=kernel.shape[0], KW=kernel.shape[1], ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
        BLOCK_PLANES=block_planes, BLOCK=block,
    )
    return out


register("gansparse::upfirdn2d_triton", torch.ops.gansparse.upfirdn2d_triton)
