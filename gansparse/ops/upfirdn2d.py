"""upfirdn2d: upsample, FIR-filter and downsample every channel of a feature map, the resampling
op of StyleGAN2 (its Upsample, Downsample and Blur layers).

    out = downsample_down(conv2d_true(pad(upsample_up(x)), kernel))

upsample_up inserts up - 1 zeros after every sample, pad pads with zeros (a negative pad crops),
the convolution is a true one (the kernel is flipped) and downsample_down keeps every down-th
sample from the first (upfirdn2d_ref.py is the specification). The kernel is a fixed filter: no
gradient flows to it.

Backends:
- ref: the eager composition (upfirdn2d_ref.py), the oracle.
- cpu / cuda: the compiled op gansparse::upfirdn2d, which reads each input sample once per tap
  that touches it and skips the inserted zeros. Its gradient is itself an upfirdn2d: of the
  upstream gradient, with the flipped kernel, up and down swapped and the complementary padding;
  so the gradient of the gradient is one too.
- triton: gansparse::upfirdn2d_triton (kernels/upfirdn2d.py), the same op for any strides, with
  the same gradient.

The compiled op:
    upfirdn2d(x, kernel, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1) -> out
    x [N, C, H, W] dense (NCHW or channels_last), kernel [kH, kW] of x's dtype; out has x's layout.
"""
from __future__ import annotations

import functools

import torch

from .. import _dispatch, _ext
from .upfirdn2d_ref import upfirdn2d_ref

BACKENDS = ("ref", "cpu", "cuda", "triton")


# --- the compiled op: fake kernel and autograd -----------------------------------------------


def output_size(in_size: int, up: int, pad0: int, pad1: int, taps: int, down: int) -> int:
    return (in_size * up + pad0 + pad1 - taps) // down + 1


def _check_op_args(x, kernel, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1) -> None:
    """What the C++ op checks, for the fake kernel: it also runs for real tensors whenever one
    input is on the meta device, where a silent result would be uninitialised memory."""
    if x.dim() != 4 or not x.is_floating_point() or x.numel() == 0:
        raise ValueError(f"x must be a non-empty floating-point [N, C, H, W] tensor, got {x.dtype} {tuple(x.shape)}")
    if kernel.dim() != 2 or kernel.numel() == 0 or kernel.dtype != x.dtype or kernel.device != x.device:
        raise ValueError(f"kernel must be a non-empty [kH, kW] tensor of x's dtype ({x.dtype}) on {x.device}, "
                         f"got {kernel.dtype} {tuple(kernel.shape)} on {kernel.device}")
    if min(up_x, up_y, down_x, down_y) < 1:
        raise ValueError(f"up and down must be >= 1, got up=({up_x}, {up_y}), down=({down_x}, {down_y})")
    out_h = output_size(x.shape[2], up_y, pad_y0, pad_y1, kernel.shape[0], down_y)
    out_w = output_size(x.shape[3], up_x, pad_x0, pad_x1, kernel.shape[1], down_x)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"the output would be empty ({out_h}x{out_w}): input {tuple(x.shape[2:])}, kernel "
                         f"{tuple(kernel.shape)}, pad ({pad_x0}, {pad_x1}, {pad_y0}, {pad_y1})")


def output_layout(x: torch.Tensor) -> torch.memory_format:
    """The layout every backend writes: channels_last for a channels_last input, else NCHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def fake_upfirdn2d(x, kernel, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1):
    _check_op_args(x, kernel, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1)
    out_h = output_size(x.shape[2], up_y, pad_y0, pad_y1, kernel.shape[0], down_y)
    out_w = output_size(x.shape[3], up_x, pad_x0, pad_x1, kernel.shape[1], down_x)
    return torch.empty((x.shape[0], x.shape[1], out_h, out_w), dtype=x.dtype, device=x.device,
                       memory_format=output_layout(x))


def gradient_padding(in_size: int, out_size: int, up: int, down: int, pad0: int, taps: int) -> tuple[int, int]:
    """The (pad0, pad1) of the upfirdn2d that maps the output's gradient to the input's: with the
    flipped kernel and up and down swapped, it has exactly in_size outputs."""
    return taps - pad0 - 1, in_size * up - out_size * down + pad0 - up + 1


def _setup_context(ctx, inputs, output):
    x, kernel, *params = inputs
    ctx.save_for_backward(kernel)
    ctx.params = params
    ctx.in_size = x.shape[2:]
    ctx.out_size = output.shape[2:]


def register(name: str, op) -> None:
    """The fake kernel and the autograd of `name`, an op with the upfirdn2d schema that `op`
    calls: its gradient is `op` again, so it has a gradient too."""

    def backward(ctx, grad_out):
        (kernel,) = ctx.saved_tensors
        up_x, up_y, down_x, down_y, pad_x0, _, pad_y0, _ = ctx.params
        (in_h, in_w), (out_h, out_w) = ctx.in_size, ctx.out_size
        gx0, gx1 = gradient_padding(in_w, out_w, up_x, down_x, pad_x0, kernel.shape[1])
        gy0, gy1 = gradient_padding(in_h, out_h, up_y, down_y, pad_y0, kernel.shape[0])
        grad_x = op(grad_out, kernel.flip(0, 1), down_x, down_y, up_x, up_y, gx0, gx1, gy0, gy1)
        return grad_x, None, None, None, None, None, None, None, None, None

    torch.library.register_fake(name)(fake_upfirdn2d)
    torch.library.register_autograd(name, backward, setup_context=_setup_context)


@functools.cache
def compiled_ops():
    """torch.ops.gansparse.upfirdn2d with its fake kernel and autograd registered, or None
    without the compiled extension."""
    if _ext.extension() is None or not hasattr(torch.ops.gansparse, "upfirdn2d"):
        return None
    register("gansparse::upfirdn2d", torch.ops.gansparse.upfirdn2d)
    return torch.ops.gansparse.upfirdn2d


@_dispatch.trace_time_constant
def _backend(device: torch.device, impl: str | None) -> str:
    backend = _dispatch.select("upfirdn2d", device, impl, available=BACKENDS)
    if backend == "triton":
        from ..kernels import upfirdn2d  # noqa: F401  (registers gansparse::upfirdn2d_triton)
    elif backend != "ref":
        compiled_ops()
    return backend


# --- public API --------------------------------------------------------------------------------


def _pair(value, name: str) -> tuple[int, int]:
    """An int or an (x, y) pair of ints, as (x, y)."""
    values = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return values


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up=1, down=1, pad=(0, 0), *,
              impl: str | None = None) -> torch.Tensor:
    """Upsample by `up`, pad by `pad`, convolve with `kernel`, downsample by `down`, per channel.

    x: [N, C, H, W] floating point. kernel: [kH, kW] (cast to x's dtype; no gradient flows to it).
    up, down: positive ints, or (x, y) pairs. pad: (p0, p1) on both axes, as the StyleGAN2
        reference's upfirdn2d takes it, or (x0, x1, y0, y1); negative values crop.
    impl: 'ref', 'cpu', 'cuda' or 'triton' (default: the fastest available for x's device).
    Returns [N, C, (H * up_y + y0 + y1 - kH) // down_y + 1, (W * up_x + x0 + x1 - kW) // down_x + 1],
    channels_last when x is.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(kernel, torch.Tensor):
        raise TypeError(f"kernel must be a torch.Tensor, got {type(kernel).__name__}")
    if x.dim() != 4 or not x.is_floating_point() or x.numel() == 0:
        raise ValueError(f"x must be a non-empty floating-point [N, C, H, W] tensor, got {x.dtype} {tuple(x.shape)}")
    if kernel.dim() != 2 or not kernel.is_floating_point() or kernel.numel() == 0:
        raise ValueError(f"kernel must be a non-empty floating-point [kH, kW] tensor, got {kernel.dtype} "
                         f"{tuple(kernel.shape)}")
    if kernel.device != x.device:
        raise ValueError(f"kernel is on {kernel.device} but x is on {x.device}")
    up_x, up_y = _pair(up, "up")
    down_x, down_y = _pair(down, "down")
    pads = tuple(pad) if isinstance(pad, (tuple, list)) else ()
    if len(pads) not in (2, 4) or not all(isinstance(p, int) and not isinstance(p, bool) for p in pads):
        raise TypeError(f"pad must be (p0, p1) or (x0, x1, y0, y1) ints, got {pad!r}")
    pads = pads * 2 if len(pads) == 2 else pads
    kernel = kernel.detach().to(x.dtype)
    _check_op_args(x, kernel, up_x, up_y, down_x, down_y, *pads)
    backend = _backend(x.device, impl)
    if backend == "ref":
        return upfirdn2d_ref(x, kernel, (up_x, up_y), (down_x, down_y), pads)
    op = torch.ops.gansparse.upfirdn2d_triton if backend == "triton" else torch.ops.gansparse.upfirdn2d
    return op(x, kernel, up_x, up_y, down_x, down_y, *pads)
