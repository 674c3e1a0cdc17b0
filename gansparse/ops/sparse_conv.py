"""Direct sparse convolution: conv2d and conv_transpose2d whose weight is mostly zeros, computed
from the nonzeros only, with bias and activation fused.

    out = act(conv(x, W) + bias)

The compressed weight is CSR by output channel (`SparseWeight`, made by `compress`): the nonzero
values of output channel o, and for each its column, the flat index (c * kH + i) * kW + j into
o's [C_in, kH, kW] filter (c is the input channel for conv_transpose2d too).

Backends:
- ref: the dense conv of the masked weight (sparse_conv_ref.py), the oracle; differentiable.
- cpu: a direct sparse convolution after Park et al. (ICLR 2017) and XNNPACK's f32 SpMM
  (csrc/sparse_conv_cpu.cpp): output pixels on the AVX2 lanes, accumulators in registers,
  weights streamed per output channel with precomputed input offsets, fused epilogue, OpenMP
  over (sample, rows, output channels); transposed convs are split by stride phase.
- cuda: one thread per output value walking its channel's nonzeros (compiled, not run here).
- triton: a block of output pixels per program, gathering the taps (kernels/sparse_conv.py).
The compiled and Triton kernels compute float32 and the forward only. Other dtypes, and calls
that need a gradient (the training path is masked dense), run the reference when no `impl` is
given; an explicit compiled `impl` raises instead.

The compiled op:
    sparse_conv2d(x, values, columns, row_offsets, bias?, kernel_size[2], stride[2], padding[2],
                  dilation[2], transposed, output_padding[2], activation, negative_slope) -> out
    x [N, C_in, H, W] float32, any layout; values [nnz] float32; columns [nnz] int32;
    row_offsets [C_out + 1] int32; bias [C_out] float32 or None; activation one of 'none',
    'relu', 'leaky_relu', 'tanh'. out is a new contiguous [N, C_out, H_out, W_out] tensor.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch.nn.modules.utils import _pair

from .. import _dispatch, _ext
from .sparse_conv_ref import ACTIVATIONS, activate, conv_ref, sparse_conv2d_ref

OP_ACTIVATIONS = ("none", "relu", "leaky_relu", "tanh")
COMPILED_DTYPE = torch.float32


class SparseWeight(NamedTuple):
    """A conv weight in CSR form by output channel."""

    values: torch.Tensor  # [nnz]
    columns: torch.Tensor  # [nnz] int32
    row_offsets: torch.Tensor  # [C_out + 1] int32
    in_channels: int
    kernel_size: tuple[int, int]

    @property
    def out_channels(self) -> int:
        return self.row_offsets.numel() - 1

    @property
    def density(self) -> float:
        """The fraction of the dense weight's entries that are stored."""
        return self.values.numel() / (self.out_channels * self.in_channels * self.kernel_size[0] * self.kernel_size[1])


def compress(weight: torch.Tensor, *, transposed: bool = False) -> SparseWeight:
    """The nonzeros of a conv weight [C_out, C_in, kH, kW], or of torch's conv_transpose2d weight
    [C_in, C_out, kH, kW] with `transposed`. Not differentiable."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 4-D floating-point tensor, got {_describe(weight)}")
    w = weight.detach()
    if transposed:
        w = w.transpose(0, 1)
    c_out, c_in, kh, kw = w.shape
    flat = w.reshape(c_out, c_in * kh * kw)  # [C_out, C_in * kH * kW]
    rows, columns = (flat != 0).nonzero(as_tuple=True)  # row-major: grouped by output channel
    counts = torch.bincount(rows, minlength=c_out)
    row_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()
    return SparseWeight(flat[rows, columns].contiguous(), columns.int(), row_offsets, c_in, (kh, kw))


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
    return f"a {type(t).__name__}"


# --- the compiled op -----------------------------------------------------------------------


def _check_op_args(x, values, columns, row_offsets, bias, activation) -> None:
    """What the compiled op checks without reading data, for its fake kernel: that also runs for
    real tensors whenever one input is on the meta device, where a silent result would be garbage."""
    if x.dim() != 4 or x.dtype != COMPILED_DTYPE or x.numel() == 0:
        raise ValueError(f"x must be a non-empty float32 [N, C, H, W] tensor, got {_describe(x)}")
    if activation not in OP_ACTIVATIONS:
        raise ValueError(f"activation must be one of {OP_ACTIVATIONS}, got {activation!r}")
    for name, t, dtype in (("values", values, torch.float32), ("columns", columns, torch.int32),
                           ("row_offsets", row_offsets, torch.int32), ("bias", bias, torch.float32)):
        if t is None:
            continue
        if t.dim() != 1 or t.dtype != dtype or t.device != x.device:
            raise ValueError(f"{name} must be a 1-D {dtype} tensor on {x.device}, got {_describe(t)}")
    if row_offsets.numel() < 2 or columns.numel() != values.numel():
        raise ValueError("row_offsets must have C_out + 1 >= 2 entries and columns one per value")
    if bias is not None and bias.numel() != row_offsets.numel() - 1:
        raise ValueError(f"bias must have C_out = {row_offsets.numel() - 1} entries, got {bias.numel()}")


def _check_geometry(kernel_size, stride, padding, dilation, transposed, output_padding) -> None:
    for name, pair, minimum in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                                ("dilation", dilation, 1), ("output_padding", output_padding, 0)):
        if len(pair) != 2 or min(pair) < minimum:
            raise ValueError(f"{name} must have 2 values >= {minimum}, got {list(pair)}")
    for d in range(2):
        limit = max(stride[d], dilation[d]) if transposed else 1
        if output_padding[d] >= limit:
            raise ValueError(f"output_padding must be smaller than {'stride or dilation' if transposed else 1}, "
                             f"got {list(output_padding)}")


def check_csr(columns: torch.Tensor, row_offsets: torch.Tensor, filter_size: int) -> None:
    """What the compiled op checks of the CSR structure by reading it."""
    nnz = columns.numel()
    if int(row_offsets[0]) != 0 or int(row_offsets[-1]) != nnz or bool((row_offsets.diff() < 0).any()):
        raise ValueError(f"row_offsets must start at 0, be non-decreasing and end at the number of values ({nnz})")
    if nnz and (int(columns.min()) < 0 or int(columns.max()) >= filter_size):
        raise ValueError(f"columns must lie in [0, C_in * kH * kW) = [0, {filter_size})")


def _output_size(size, k, stride, padding, dilation, transposed, output_padding) -> int:
    if transposed:
        return (size - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _fake(x, values, columns, row_offsets, bias, kernel_size, stride, padding, dilation, transposed, output_padding,
          activation, negative_slope):
    _check_op_args(x, values, columns, row_offsets, bias, activation)
    _check_geometry(kernel_size, stride, padding, dilation, transposed, output_padding)
    size = [_output_size(x.shape[2 + d], kernel_size[d], stride[d], padding[d], dilation[d], transposed,
                         output_padding[d]) for d in range(2)]
    if min(size) <= 0:
        raise ValueError(f"the output would be empty: {size}")
    return x.new_empty(x.shape[0], row_offsets.shape[0] - 1, *size)


@functools.cache
def compiled_op():
    """torch.ops.gansparse.sparse_conv2d with its fake kernel registered, or None without the
    compiled extension."""
    if _ext.extension() is None or not hasattr(torch.ops.gansparse, "sparse_conv2d"):
        return None
    torch.library.register_fake("gansparse::sparse_conv2d")(_fake)
    return torch.ops.gansparse.sparse_conv2d


@_dispatch.trace_time_constant
def _backend(device: torch.device, impl: str | None) -> str:
    backend = _dispatch.select("sparse_conv2d", device, impl)
    if backend in ("cpu", "cuda"):
        compiled_op()
    return backend


# --- public API ----------------------------------------------------------------------------


def _check_args(x, weight, bias, activation, transposed):
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a 4-D floating-point [N, C, H, W] tensor, got {_describe(x)}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    if isinstance(weight, SparseWeight):
        in_channels, out_channels, params = weight.in_channels, weight.out_channels, weight.values
    elif isinstance(weight, torch.Tensor) and weight.dim() == 4 and weight.is_floating_point():
        in_channels, out_channels = weight.shape[:2] if transposed else weight.shape[1::-1]
        params = weight
    else:
        raise ValueError(f"weight must be a 4-D floating-point tensor or a SparseWeight, got {_describe(weight)}")
    if params.device != x.device or params.dtype != x.dtype:
        raise ValueError(f"weight must have x's dtype and device ({x.dtype}, {x.device}), got {_describe(params)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"x has {x.shape[1]} channels but the weight expects {in_channels}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (out_channels,)
                             or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be a [{out_channels}] {x.dtype} tensor on {x.device}, got {_describe(bias)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def sparse_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor | SparseWeight,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    *,
    transposed: bool = False,
    output_padding=0,
    activation: str | None = None,
    negative_slope: float = 0.01,
    impl: str | None = None,
) -> torch.Tensor:
    """act(conv2d(x, weight) + bias), or conv_transpose2d with `transposed`, from the weight's
    nonzeros. groups = 1; padding is zeros (pad x first for other modes).

    weight: a SparseWeight (see `compress`), or a dense weight as torch.nn's layers hold it
        ([C_out, C_in, kH, kW], or [C_in, C_out, kH, kW] when transposed), compressed per call.
    activation: None, 'relu', 'leaky_relu' (with negative_slope) or 'tanh'.
    """
    _check_args(x, weight, bias, activation, transposed)
    conv_args = dict(stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation), transposed=transposed,
                     output_padding=_pair(output_padding))
    params = weight.values if isinstance(weight, SparseWeight) else weight
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, params, bias))
    if impl is None and (needs_grad or x.dtype != COMPILED_DTYPE):
        impl = "ref"
    elif impl not in (None, "ref") and needs_grad:
        raise ValueError(f"impl={impl!r} computes the forward only, but a gradient is needed; use impl='ref' "
                         "(the masked dense training path) or torch.no_grad()")
    backend = _backend(x.device, impl)
    if backend == "ref" and not isinstance(weight, SparseWeight):
        w = weight.transpose(0, 1) if transposed else weight
        return activate(conv_ref(x, w, bias, **conv_args), activation, negative_slope)
    sparse = weight if isinstance(weight, SparseWeight) else compress(weight, transposed=transposed)
    args = (x, sparse.values, sparse.columns, sparse.row_offsets, bias, sparse.kernel_size, *conv_args.values())
    if backend == "ref":
        return sparse_conv2d_ref(*args, activation, negative_slope)
    if backend == "triton":
        from ..kernels import sparse_conv as triton_kernels

        return triton_kernels.sparse_conv2d(*args, activation or "none", float(negative_slope))
    return torch.ops.gansparse.sparse_conv2d(*args, activation or "none", float(negative_slope))
