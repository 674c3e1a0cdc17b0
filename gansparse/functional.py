"""Functional ops: `import gansparse.functional as GF`."""
from .ops.attention import attention_distill_loss, attention_map, attention_maps
from .ops.conv_norm_act import masked_conv_cbn_relu, masked_conv_norm_act, norm_mask_act

__all__ = [
    "attention_distill_loss",
    "attention_map",
    "attention_maps",
    "masked_conv_cbn_relu",
    "masked_conv_norm_act",
    "norm_mask_act",
]
