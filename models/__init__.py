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
from . import stylegan2  # stylegan2.Generator, stylegan2.Discriminator (rosinality/stylegan2-pytorch)
from .stylegan2 import load_rosinality_checkpoint

__all__ = ["NLayerDiscriminator", "PixelDiscriminator", "ResnetGenerator", "UnetGenerator",
           "load_reference_state_dict", "load_rosinality_checkpoint", "residual_mask_groups", "stylegan2"]
