"""Reference attention maps: plain PyTorch, differentiable, the oracle of every other backend.

For p = 2 this is exactly the eager composition of DMAD's official code, `f.pow(2).mean(1)`.
"""
from __future__ import annotations

import torch


def attention_maps_ref(features: list[torch.Tensor], p: float, mean: bool) -> list[torch.Tensor]:
    """[N, H, W] maps: the mean (or sum) over channels of |f|^p, one per [N, C, H, W] feature."""
    maps = []
    for f in features:
        # An even integer power needs no abs, which saves eager a full-size pass.
        powered = f.pow(p) if float(p).is_integer() and int(p) % 2 == 0 else f.abs().pow(p)
        maps.append(powered.mean(1) if mean else powered.sum(1))
    return maps
