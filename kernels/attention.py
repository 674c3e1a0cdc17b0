"""Triton kernels of the attention-map op family. The math mirrors csrc/attention_math.h.

The kernels take any strides, so channels_last and sliced views run without a copy. Forward: a
program sums BLOCK_C channels at a time over BLOCK_HW pixels of one sample. Backward: a program
writes the gradient of a [BLOCK_C, BLOCK_HW] tile.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import custom_op, triton_op, wrap_triton

from gansparse.ops.attention import fake_maps, fake_maps_backward, grad_layout, register_autograd

# Triton reads this when it defines the kernels below.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# triton_op shows torch.compile the kernels inside the op, through wrap_triton. In the interpreter
# wrap_triton hands kernels back unwrapped, and tracing would run them on fake tensors, so there
# the op is an opaque custom op instead.
define_op = custom_op if INTERPRETED else triton_op


@triton.jit
def _pow_abs(x, p, P: tl.constexpr):
    # |x|^p; P is p when it is 1, 2 or 4, else 0 and p is read at run time.
    if P == 1:
        y = tl.abs(x)
    elif P == 2:
        y = x * x
    elif P == 4:
        s = x * x
        y = s * s
    else:
        ax = tl.abs(x)
        y = tl.where(ax == 0, 0.0, tl.exp2(p * tl.log2(tl.where(ax == 0, 1.0, ax))))
    return y


@triton.jit
def _pow_abs_grad(x, p, P: tl.constexpr):
    # p |x|^(p-1) sign(x), 0 at x = 0.
    if P == 1:
        y = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    elif P == 2:
        y = 2.0 * x
    elif P == 4:
        y = 4.0 * x * x * x
    else:
        ax = tl.abs(x)
        mag = p * tl.exp2((p - 1.0) * tl.log2(tl.where(ax == 0, 1.0, ax)))
        y = tl.where(x == 0, 0.0, tl.where(x < 0, -mag, mag))
    return y


@triton.jit
def _maps_forward_kernel(
    f_ptr, out_ptr, C, H, W,
    stride_n, stride_c, stride_h, stride_w,
    p, scale,
    P: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(1)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < H * W
    hw_offsets = (hw // W) * stride_h + (hw % W) * stride_w
    base = f_ptr + n * stride_n
    acc = tl.zeros([BLOCK_HW], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c[:, None] < C) & hw_mask[None, :]
        x = tl.load(base + c[:, None] * stride_c + hw_offsets[None, :], mask=mask, other=0.0)
        acc += tl.sum(_pow_abs(x.to(ACC), p, P), axis=0)
    tl.store(out_ptr + n * H * W + hw, (acc * scale).to(out_ptr.dtype.element_ty), mask=hw_mask)


@triton.jit
def _maps_backward_kernel(
    grad_maps_ptr, f_ptr, grad_f_ptr, C, H, W,
    f_stride_n, f_stride_c, f_stride_h, f_stride_w,
    g_stride_n, g_stride_c, g_stride_h, g_stride_w,
    p, scale,
    P: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(2)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < H * W
    mask = (c[:, None] < C) & hw_mask[None, :]
    h, w = hw // W, hw % W
    g = tl.load(grad_maps_ptr + n * H * W + hw, mask=hw_mask, other=0.0).to(ACC) * scale
    f_offsets = n * f_stride_n + c[:, None] * f_stride_c + (h * f_stride_h + w * f_stride_w)[None, :]
    x = tl.load(f_ptr + f_offsets, mask=mask, other=0.0).to(ACC)
    y = g[None, :] * _pow_abs_grad(x, p, P)
    g_offsets = n * g_stride_n + c[:, None] * g_stride_c + (h * g_stride_h + w * g_stride_w)[None, :]
    tl.store(grad_f_ptr + g_offsets, y.to(grad_f_ptr.dtype.element_ty), mask=mask)


def _exponent(p: float) -> int:
    return int(p) if p in (1.0, 2.0, 4.0) else 0


def _blocks(channels: int, pixels: int) -> tuple[int, int]:
    if INTERPRETED:
        # The interpreter costs about a millisecond per program: few, large programs.
        return min(triton.next_power_of_2(channels), 64), min(triton.next_power_of_2(pixels), 1024)
    return 32, 128


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@define_op("gansparse::attention_maps_triton", mutates_args=())
def attention_maps(features: list[torch.Tensor], p: float, mean: bool) -> list[torch.Tensor]:
    maps = []
    for f in features:
        N, C, H, W = f.shape
        out = torch.empty((N, H, W), device=f.device, dtype=f.dtype)
        block_c, block_hw = _blocks(C, H * W)
        wrap_triton(_maps_forward_kernel)[(triton.cdiv(H * W, block_hw), N)](
            f, out, C, H, W, *f.stride(), p, (1.0 / C) if mean else 1.0,
            P=_exponent(p), ACC=_acc_dtype(f.dtype), BLOCK_C=block_c, BLOCK_HW=block_hw,
        )
        maps.append(out)
    return maps


@define_op("gansparse::attention_maps_backward_triton", mutates_args=())
def attention_maps_backward(
    grads: list[torch.Tensor], features: list[torch.Tensor], p: float, mean: bool
) -> list[torch.Tensor]:
    result = []
    for g, f in zip(grads, features):
        N, C, H, W = f.shape
        g = g.to(f.dtype).contiguous()
        grad_f = torch.empty(f.shape, dtype=f.dtype, device=f.device, memory_format=grad_layout(f))
        block_c, block_hw = _blocks(C, H * W)
        wrap_triton(_maps_backward_kernel)[(triton.cdiv(H * W, block_hw), triton.cdiv(C, block_c), N)](
            g, f, grad_f, C, H, W, *f.stride(), *grad_f.stride(), p, (1.0 / C) if mean else 1.0,
            P=_exponent(p), ACC=_acc_dtype(f.dtype), BLOCK_C=block_c, BLOCK_HW=block_hw,
        )
        result.append(grad_f)
    return result


# The fake kernels of the compiled ops: the same outputs, the same checks.
attention_maps.register_fake(fake_maps)
attention_maps_backward.register_fake(fake_maps_backward)
register_autograd("gansparse::attention_maps_triton", attention_maps_backward)
