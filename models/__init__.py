"""Generators and discriminators built from gansparse layers, with the state_dict layouts of the
reference implementations; installed as gansparse.models."""
from .pix2pix import (
    NLayerDiscriminator,
    PixelDiscriminator,
    ResnetGenerator,
    UnetGenerator,
    load_reference_state_dict,
    residual_mask_groups,
)

__all__ = ["NLayerDiscriminator", "PixelDiscriminator", "ResnetGenerator", "UnetGenerator",
           "load_reference_state_dict", "residual_mask_groups"]
