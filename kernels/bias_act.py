"""Triton kernels of the fused bias + leaky ReLU (gansparse/ops/bias_act.py); the math mirrors
csrc/stylegan2_ops_math.h.

Both kernels are elementwise over x's dense memory (NCHW-like, or NHWC for a channels_last 4-D
tensor; any other strides are copied first), a program per BLOCK elements. The bias gradient is
the sum of the input gradient over everything but the channels.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import custom_op, triton_op, wrap_triton

from gansparse.ops.bias_act import check_op_args, output_layout, register

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# As in kernels/attention.py: an opaque custom op in the interpreter, a triton_op on a GPU.
define_op = custom_op if INTERPRETED else triton_op


@triton.jit
def _pre_activation(x_ptr, bias_ptr, idx, ok, C, inner, HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                    ACC: tl.constexpr):
    # z = x + bias[c], with c the channel of flat index idx in either layout.
    z = tl.load(x_ptr + idx, mask=ok, other=0.0).to(ACC)
    if HAS_BIAS:
        channel = idx % C if CHANNELS_LAST else (idx // inner) % C
        z += tl.load(bias_ptr + channel, mask=ok, other=0.0).to(ACC)
    return z


@triton.jit
def _gain(z, constants_ptr, ACC: tl.constexpr):
    # scale times torch's leaky_relu slope choice: 1 where z > 0, else the negative slope. The
    # constants are read from memory in the accumulation type: a float argument would be float32.
    negative_slope = tl.load(constants_ptr).to(ACC)
    scale = tl.load(constants_ptr + 1).to(ACC)
    return tl.where(z > 0, 1.0, negative_slope), scale


@triton.jit
def _forward_kernel(x_ptr, bias_ptr, out_ptr, total, C, inner, constants_ptr,
                    HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < total
    z = _pre_activation(x_ptr, bias_ptr, idx, ok, C, inner, HAS_BIAS, CHANNELS_LAST, ACC)
    slope, scale = _gain(z, constants_ptr, ACC)
    tl.store(out_ptr + idx, (z * slope * scale).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward_kernel(grad_ptr, x_ptr, bias_ptr, grad_x_ptr, total, C, inner, constants_ptr,
                     HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < total
    z = _pre_activation(x_ptr, bias_ptr, idx, ok, C, inner, HAS_BIAS, CHANNELS_LAST, ACC)
    g = tl.load(grad_ptr + idx, mask=ok, other=0.0).to(ACC)
    slope, scale = _gain(z, constants_ptr, ACC)
    tl.store(grad_x_ptr + idx, (g * (slope * scale)).to(grad_x_ptr.dtype.element_ty), mask=ok)


def _block(total: int) -> int:
    if INTERPRETED:  # about a millisecond per program: few, large ones
        return min(triton.next_power_of_2(total), 1 << 16)
    return 1024


def _launch_args(x: torch.Tensor, negative_slope: float, scale: float):
    """x in its dense layout, whether that is NHWC (channels innermost: also for [N, C]), the
    positions per channel, and the constants as a tensor."""
    layout = output_layout(x)
    x = x.contiguous(memory_format=layout)
    inner = x.numel() // (x.shape[0] * x.shape[1])
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    constants = torch.tensor([negative_slope, scale], dtype=dtype, device=x.device)
    return x, layout == torch.channels_last or inner == 1, inner, constants


@define_op("gansparse::fused_leaky_relu_triton", mutates_args=())
def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor | None, negative_slope: float,
                     scale: float) -> torch.Tensor:
    check_op_args(x, bias)
    x, channels_last, inner, constants = _launch_args(x, negative_slope, scale)
    out = torch.empty_like(x)
    block = _block(x.numel())
    wrap_triton(_forward_kernel)[(triton.cdiv(x.numel(), block),)](
        x, bias if bias is not None else x, out, x.numel(), x.shape[1], inner, constants,
        HAS_BIAS=bias is not None, CHANNELS_LAST=channels_last,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, BLOCK=block,
    )
    return out


@define_op("gansparse::fused_leaky_relu_backward_triton", mutates_args=())
def fused_leaky_relu_backward(grad_out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                              negative_slope: float, scale: float, bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    check_op_args(x, bias)
    if grad_out.shape != x.shape or grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise ValueError(f"grad_out must match x ({x.dtype} {tuple(x.shape)} on {x.device}), "
                         f"got {grad_out.dtype} {tuple(grad_out.shape)} on {grad_out.device}")
    x, channels_last, inner, constants = _launch_args(x, negative_slope, scale)
    grad_out = grad_out.contiguous(memory_format=output_layout(x))
    grad_x = torch.empty_like(x)
    block = _block(x.numel())
    wrap_triton(_backward_kernel)[(triton.cdiv(x.numel(), block),)](
        grad_out, x, bias if bias is not None else x, grad_x, x.numel(), x.shape[1], inner, constants,
        HAS_BIAS=bias is not None, CHANNELS_LAST=channels_last,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, BLOCK=block,
    )
    dims = [0, *range(2, x.dim())]
    grad_bias = grad_x.sum(dims) if bias_grad else x.new_empty((0,))
    return grad_x, grad_bias


register("gansparse::fused_leaky_relu_triton", "gansparse::fused_leaky_relu_backward_triton",
         torch.ops.gansparse.fused_leaky_relu_backward_triton)
