"""Reference fused bias + leaky ReLU: plain, differentiable PyTorch, the oracle of every other
backend.

    out = scale * leaky_relu(x + bias[c], negative_slope)

StyleGAN2 uses it after every conv and mapping layer with negative_slope 0.2 and scale sqrt(2),
which keeps the activations' second moment (the "gain" of its equalised learning rate).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_leaky_relu_ref(x: torch.Tensor, bias: torch.Tensor | None, negative_slope: float,
                         scale: float) -> torch.Tensor:
    """x [N, C, *]; bias [C] or None."""
    if bias is not None:
        x = x + bias.view(1, -1, *([1] * (x.dim() - 2)))
    return F.leaky_relu(x, negative_slope) * scale
