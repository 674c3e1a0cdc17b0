"""Reference upfirdn2d: plain, differentiable PyTorch, the oracle of every other backend.

upfirdn2d upsamples each channel by inserting up - 1 zeros after every sample, pads it (a negative
pad crops), convolves it with a 2-D FIR kernel (a true convolution: the kernel is flipped, as in
scipy.signal.upfirdn and the StyleGAN2 reference) and keeps every down-th sample, starting at the
first. Written as the eager composition: zero insertion, F.pad, and a depthwise strided conv2d.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def upfirdn2d_ref(x: torch.Tensor, kernel: torch.Tensor, up: tuple[int, int], down: tuple[int, int],
                  pad: tuple[int, int, int, int]) -> torch.Tensor:
    """x [N, C, H, W], kernel [kH, kW]; up, down (x, y); pad (x0, x1, y0, y1).
    Returns [N, C, (H * up_y + y0 + y1 - kH) // down_y + 1, (W * up_x + x0 + x1 - kW) // down_x + 1]."""
    (up_x, up_y), (down_x, down_y), (x0, x1, y0, y1) = up, down, pad
    n, c, h, w = x.shape
    if up_x > 1 or up_y > 1:
        upsampled = x.new_zeros(n, c, h, up_y, w, up_x)
        upsampled[:, :, :, 0, :, 0] = x
        x = upsampled.view(n, c, h * up_y, w * up_x)
    x = F.pad(x, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)])
    x = x[:, :, max(-y0, 0): x.shape[2] - max(-y1, 0), max(-x0, 0): x.shape[3] - max(-x1, 0)]
    weight = kernel.flip(0, 1).to(x.dtype).expand(c, 1, *kernel.shape)  # [C, 1, kH, kW]
    return F.conv2d(x, weight, stride=(down_y, down_x), groups=c)
