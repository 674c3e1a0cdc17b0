"""Reference sparse convolution: the CSR weight made dense again, then F.conv2d or
F.conv_transpose2d and the activation. Plain, differentiable PyTorch.

This is the specification of gansparse.functional.sparse_conv2d and the oracle every other
backend is tested against: a sparse conv is exactly the dense conv with the masked weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "relu", "leaky_relu", "tanh")


def densify(values: torch.Tensor, columns: torch.Tensor, row_offsets: torch.Tensor, in_channels: int,
            kernel_size: tuple[int, int]) -> torch.Tensor:
    """The [C_out, C_in, kH, kW] dense weight of a CSR weight (rows: output channels; columns:
    flat indices into a [C_in, kH, kW] filter). Differentiable in `values`."""
    c_out = row_offsets.numel() - 1
    filter_size = in_channels * kernel_size[0] * kernel_size[1]
    rows = torch.repeat_interleave(torch.arange(c_out, device=values.device), row_offsets.diff().long())
    dense = values.new_zeros(c_out, filter_size).index_put((rows, columns.long()), values)
    return dense.view(c_out, in_channels, *kernel_size)


def activate(y: torch.Tensor, activation: str | None, negative_slope: float) -> torch.Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    if activation == "tanh":
        return torch.tanh(y)
    return y


def conv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, stride, padding, dilation,
             transposed: bool, output_padding) -> torch.Tensor:
    """F.conv2d(x, weight) for weight [C_out, C_in, kH, kW], or the conv_transpose2d that weight
    describes (torch's transposed weight is its [C_in, C_out, kH, kW] transpose)."""
    if transposed:
        return F.conv_transpose2d(x, weight.transpose(0, 1), bias, stride, padding, output_padding, 1, dilation)
    return F.conv2d(x, weight, bias, stride, padding, dilation)


def sparse_conv2d_ref(x, values, columns, row_offsets, bias, kernel_size, stride, padding, dilation, transposed,
                      output_padding, activation, negative_slope) -> torch.Tensor:
    """act(conv(x, densify(values, columns, row_offsets)) + bias)."""
    weight = densify(values, columns, row_offsets, x.shape[1], tuple(kernel_size))
    y = conv_ref(x, weight, bias, stride=stride, padding=padding, dilation=dilation, transposed=transposed,
                 output_padding=output_padding)
    return activate(y, activation, negative_slope)
