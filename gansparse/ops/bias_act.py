"""Fused bias + leaky ReLU, StyleGAN2's activation:

    out = scale * leaky_relu(x + bias[c], negative_slope)

Backends:
- ref: the eager composition (bias_act_ref.py), the oracle.
- cpu / cuda: the compiled op gansparse::fused_leaky_relu, one pass that reads x once and writes
  once; its backward gansparse::fused_leaky_relu_backward computes the input's gradient and the
  bias's (its sum over every dim but the channels) in one pass too. Backward saves x, not the
  output: the slope is chosen by the sign of x + bias, exactly as torch's leaky_relu chooses it.
  The backward op is linear in grad_out, so the gradient of the gradient (R1, path-length
  regularisation) is the backward op again.
- triton: gansparse::fused_leaky_relu_triton and its backward (kernels/bias_act.py), the same ops.

The compiled ops:
    fused_leaky_relu(x, bias?, negative_slope, scale) -> out
    fused_leaky_relu_backward(grad_out, x, bias?, negative_slope, scale, bias_grad)
        -> (grad_x, grad_bias)      grad_bias is empty unless bias_grad
    x [N, C, *] dense (contiguous, or channels_last when 4-D), bias [C] of x's dtype; outputs
    have x's layout.
"""
from __future__ import annotations

import functools

import torch

from .. import _dispatch, _ext
from .bias_act_ref import fused_leaky_relu_ref

BACKENDS = ("ref", "cpu", "cuda", "triton")


# --- the compiled ops: fake kernels and autograd -----------------------------------------------


def check_op_args(x, bias) -> None:
    """What the C++ ops check, for their fake kernels (see upfirdn2d._check_op_args)."""
    if x.dim() < 2 or not x.is_floating_point() or x.numel() == 0:
        raise ValueError(f"x must be a non-empty floating-point [N, C, *] tensor, got {x.dtype} {tuple(x.shape)}")
    if bias is not None and (bias.shape != (x.shape[1],) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be a [{x.shape[1]}] tensor of x's dtype ({x.dtype}) on {x.device}, "
                         f"got {bias.dtype} {tuple(bias.shape)} on {bias.device}")


def output_layout(x: torch.Tensor) -> torch.memory_format:
    """The layout every backend writes: channels_last for a channels_last 4-D input, else dense."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _fake(x, bias, negative_slope, scale):
    check_op_args(x, bias)
    return torch.empty_like(x, memory_format=output_layout(x))


def _fake_backward(grad_out, x, bias, negative_slope, scale, bias_grad):
    check_op_args(x, bias)
    if grad_out.shape != x.shape or grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise ValueError(f"grad_out must match x ({x.dtype} {tuple(x.shape)} on {x.device}), "
                         f"got {grad_out.dtype} {tuple(grad_out.shape)} on {grad_out.device}")
    grad_bias = x.new_empty((x.shape[1],) if bias_grad else (0,))
    return torch.empty_like(x, memory_format=output_layout(x)), grad_bias


def _setup_context(ctx, inputs, output):
    x, bias, negative_slope, scale = inputs
    ctx.save_for_backward(x, bias)
    ctx.negative_slope, ctx.scale = negative_slope, scale


def _setup_backward_context(ctx, inputs, output):
    _grad_out, x, bias, negative_slope, scale, _bias_grad = inputs
    ctx.save_for_backward(x, bias)
    ctx.negative_slope, ctx.scale = negative_slope, scale


def register(forward_name: str, backward_name: str, backward_op) -> None:
    """Fake kernels and autograd of a forward and backward op pair with the schemas above;
    backward_op is the backward op's callable."""

    def backward(ctx, grad_out):
        x, bias = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[1]
        grad_x, grad_bias = backward_op(grad_out.contiguous(memory_format=output_layout(x)), x, bias,
                                        ctx.negative_slope, ctx.scale, bias_grad)
        return grad_x, grad_bias if bias_grad else None, None, None

    def backward_of_backward(ctx, grad_grad_x, grad_grad_bias):
        """grad_x = grad_out * slope(x + b) * scale and grad_bias = its channel sums, both linear in
        grad_out with a derivative of 0 in x and b (almost everywhere): so grad_out's gradient is
        the backward op applied to grad_grad_x + grad_grad_bias[c]."""
        x, bias = ctx.saved_tensors
        upstream = grad_grad_x
        if grad_grad_bias is not None and grad_grad_bias.numel() > 0:
            upstream = upstream + grad_grad_bias.view(1, -1, *([1] * (x.dim() - 2)))
        grad_out, _ = backward_op(upstream.contiguous(memory_format=output_layout(x)), x, bias, ctx.negative_slope,
                                  ctx.scale, False)
        return grad_out, None, None, None, None, None

    torch.library.register_fake(forward_name)(_fake)
    torch.library.register_fake(backward_name)(_fake_backward)
    torch.library.register_autograd(forward_name, backward, setup_context=_setup_context)
    torch.library.register_autograd(backward_name, backward_of_backward, setup_context=_setup_backward_context)


@functools.cache
def compiled_ops():
    """torch.ops.gansparse.fused_leaky_relu{,_backward} with fake kernels and autograd
    registered, or None without the compiled extension."""
    if _ext.extension() is None or not hasattr(torch.ops.gansparse, "fused_leaky_relu_backward"):
        return None
    ops = torch.ops.gansparse
    register("gansparse::fused_leaky_relu", "gansparse::fused_leaky_relu_backward", ops.fused_leaky_relu_backward)
    return ops.fused_leaky_relu, ops.fused_leaky_relu_backward


@_dispatch.trace_time_constant
def _backend(device: torch.device, impl: str | None) -> str:
    backend = _dispatch.select("fused_leaky_relu", device, impl, available=BACKENDS,
                               compiled_op="fused_leaky_relu_backward")
    if backend == "triton":
        from ..kernels import bias_act  # noqa: F401  (registers gansparse::fused_leaky_relu_triton)
    elif backend != "ref":
        compiled_ops()
    return backend


# --- public API --------------------------------------------------------------------------------


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor | None = None, negative_slope: float = 0.2,
                     scale: float = 2 ** 0.5, *, impl: str | None = None) -> torch.Tensor:
    """scale * leaky_relu(x + bias[c], negative_slope) in one pass.

    x: [N, C, *] floating point (a linear layer's [N, C] or a conv's [N, C, H, W]).
    bias: [C] or None. impl: 'ref', 'cpu', 'cuda' or 'triton' (default: the fastest available).
    The output has x's layout (channels_last when x is).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or not x.is_floating_point() or x.numel() == 0:
        raise ValueError(f"x must be a non-empty floating-point [N, C, *] tensor, got {x.dtype} {tuple(x.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (x.shape[1],):
            raise ValueError(f"bias must have shape ({x.shape[1]},) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but x has dtype {x.dtype}")
    for name, value in (("negative_slope", negative_slope), ("scale", scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
    backend = _backend(x.device, impl)
    if backend == "ref":
        return fused_leaky_relu_ref(x, bias, float(negative_slope), float(scale))
    op = torch.ops.gansparse.fused_leaky_relu_triton if backend == "triton" else torch.ops.gansparse.fused_leaky_relu
    return op(x, bias, float(negative_slope), float(scale))
