"""Functional ops: `import gansparse.functional as GF`."""
from .ops.attention import attention_distill_loss, attention_map, attention_maps
from .ops.bias_act import fused_leaky_relu
from .ops.conv_norm_act import masked_conv_cbn_relu, masked_conv_norm_act, norm_mask_act
from .ops.sparse_conv import sparse_conv2d
from .ops.upfirdn2d import upfirdn2d

__all__ = [
    "attention_distill_loss",
    "attention_map",
    "attention_maps",
    "fused_leaky_relu",
    "masked_conv_cbn_relu",
    "masked_conv_norm_act",
    "norm_mask_act",
    "sparse_conv2d",
    "upfirdn2d",
]
