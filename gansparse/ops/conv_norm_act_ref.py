"""Reference masked conv + norm + affine + mask + activation: plain, differentiable PyTorch.

This is the specification of gansparse.functional.masked_conv_norm_act and norm_mask_act and the
oracle every other backend is tested against. Written as the best eager composition: conv, then
F.batch_norm / F.instance_norm, then the affine with torch.addcmul, the mask, and the activation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    """[C] -> [1, C, 1, 1]; [N, C] (per-sample, as class-conditional BN) -> [N, C, 1, 1]."""
    return t.view(1, -1, 1, 1) if t.dim() == 1 else t[:, :, None, None]


def norm_mask_act_ref(
    y: torch.Tensor,
    mask: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    norm: str,
    training: bool,
    momentum: float,
    eps: float,
    activation: str | None,
    negative_slope: float,
) -> torch.Tensor:
    """act(mask[c] * (gamma * norm(y) + beta)) for y [N, C, H, W]. Updates the running statistics
    in place exactly as nn.BatchNorm2d does."""
    if norm == "batch":
        use_batch_stats = training or running_mean is None
        y = F.batch_norm(y, running_mean, running_var, None, None, use_batch_stats, momentum, eps)
    elif norm == "instance":
        y = F.instance_norm(y, eps=eps)
    if gamma is not None or beta is not None:
        scale = _per_channel(gamma) if gamma is not None else torch.ones((), dtype=y.dtype, device=y.device)
        shift = _per_channel(beta) if beta is not None else torch.zeros((), dtype=y.dtype, device=y.device)
        y = torch.addcmul(shift, y, scale)
    if mask is not None:
        y = y * _per_channel(mask)
    if activation == "relu":
        y = F.relu(y)
    elif activation == "leaky_relu":
        y = F.leaky_relu(y, negative_slope)
    return y


def conv_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    stride,
    padding,
    dilation,
    groups: int,
    transposed: bool,
    output_padding,
) -> torch.Tensor:
    if transposed:
        return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
