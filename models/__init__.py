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
from . import dcgan, sngan  # dcgan.Generator / Discriminator, sngan.Generator / Discriminator
from . import biggan  # biggan.Generator / Discriminator (ajbrock/BigGAN-PyTorch)
from . import stargan  # stargan.Generator / Discriminator (yunjey/stargan)
from . import srgan  # srgan.MSRResNet / VGGStyleDiscriminator (XPixelGroup/BasicSR)
from .mobile_resnet import MobileResnetGenerator, decode_config, encode_config, sub_mobile_resnet_generator
from .supernet import SuperMobileResnetGenerator
from .stylegan2 import load_rosinality_checkpoint

__all__ = ["MobileResnetGenerator", "NLayerDiscriminator", "PixelDiscriminator", "ResnetGenerator",
           "SuperMobileResnetGenerator", "UnetGenerator", "biggan", "dcgan", "decode_config", "encode_config",
           "load_reference_state_dict", "load_rosinality_checkpoint", "residual_mask_groups", "sngan", "srgan",
           "stargan", "stylegan2", "sub_mobile_resnet_generator"]
