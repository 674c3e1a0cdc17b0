"""Norm layers with a channel mask right after them: norm, then mask[c], as DMAD places its masks
(after the norm of a conv, before its activation). Each keeps the state_dict keys of the torch
layer it extends (the mask adds `mask.*` keys), so reference checkpoints load unchanged. Norm and
mask run as one gansparse op."""
from __future__ import annotations

import torch
from torch import nn

from gansparse import functional as GF
from gansparse.layers import norm_arguments
from gansparse.masks import as_mask


class _MaskAfterNorm:
    """forward(x) = mask[c] * norm(x); the norm is the layer itself, or none for ChannelMask."""

    def _set_mask(self, channels: int, mask, impl: str | None) -> None:
        self.mask = as_mask(mask, channels)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self if isinstance(self, nn.modules.batchnorm._NormBase) else None
        return GF.norm_mask_act(x, self.mask(), **norm_arguments(norm, None, x.shape[0]), activation=None,
                                impl=self.impl)


class MaskedBatchNorm2d(_MaskAfterNorm, nn.BatchNorm2d):
    def __init__(self, num_features: int, *, mask, impl: str | None = None, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self._set_mask(num_features, mask, impl)


class MaskedInstanceNorm2d(_MaskAfterNorm, nn.InstanceNorm2d):
    """Without running statistics, as the fused op supports (and the reference uses)."""

    def __init__(self, num_features: int, *, mask, impl: str | None = None, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self._set_mask(num_features, mask, impl)


class ChannelMask(_MaskAfterNorm, nn.Module):
    """The mask alone, where a model has no norm (an nn.Identity in the reference)."""

    def __init__(self, num_features: int, *, mask, impl: str | None = None) -> None:
        super().__init__()
        self._set_mask(num_features, mask, impl)
