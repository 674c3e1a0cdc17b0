"""DCGAN, unconditional image synthesis at 64x64 as the PyTorch example trains it (pytorch/examples,
dcgan/main.py; the image-synthesis task of Self-Supervised GAN Compression), on models.dcgan's
networks.

G maps z ~ N(0, 1) [N, nz] to an image; D ends in a sigmoid, so the loss is the binary cross-entropy
on its probabilities, as the example's nn.BCELoss: G minimises BCE(D(G(z)), 1) ('G_gan'), D
minimises BCE(D(x), 1) on real images ('D_real') and BCE(D(G(z)), 0) on fakes ('D_fake'), each term
with weight 1. Weights are initialised as the example's weights_init: convs N(0, 0.02), batch-norm
scales N(1, 0.02) and shifts 0.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gansparse.models import dcgan

from ..config import ConfigError
from ..nets import init_weights
from . import register
from .base import SynthesisObjective

__all__ = ["DCGAN"]


@register
class DCGAN(SynthesisObjective):
    name = "dcgan"
    # The example's option names and defaults; ngf and ndf share the translation models' defaults.
    defaults = dict(nz=100, ngf=64, ndf=64)
    architecture_keys = ("nz", "ngf", "ndf")
    # The example's checkpoints after its 25 epochs (netG_epoch_%d.pth, counted from 0).
    reference_files = dict(G="netG_epoch_24.pth", D="netD_epoch_24.pth")

    def __init__(self, cfg: dict, device: torch.device) -> None:
        super().__init__(cfg, device)
        if cfg["crop_size"] != 64:
            raise ConfigError(f"option 'crop_size' must be 64 for model 'dcgan' (its networks are 64x64), "
                              f"got {cfg['crop_size']!r}")
        for key in self.architecture_keys:
            if not (isinstance(cfg[key], int) and cfg[key] > 0):
                raise ConfigError(f"option {key!r} must be a positive int, got {cfg[key]!r}")
        self.dim_z, self.resolution = cfg["nz"], 64

    def build(self, name: str, mask: str | None = None) -> nn.Module:
        if name == "G":
            return init_weights(dcgan.Generator(self.cfg["nz"], self.cfg["ngf"], 3, mask=mask))
        if name == "D":
            return init_weights(dcgan.Discriminator(3, self.cfg["ndf"]))
        raise ValueError(f"model 'dcgan' has networks 'G' and 'D', got {name!r}")

    def generator_terms(self, nets: dict[str, nn.Module], batch: dict
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        fake = nets["G"](batch["z"])  # [N, 3, 64, 64]
        return {"G_gan": _bce(nets["D"](fake), 1.0)}, {"G": fake}

    def discriminator_terms(self, nets: dict[str, nn.Module], batch: dict, fakes: dict[str, torch.Tensor]
                            ) -> dict[str, torch.Tensor]:
        D = nets["D"]
        return {"D_real": _bce(D(batch["image"]), 1.0), "D_fake": _bce(D(fakes["G"]), 0.0)}

    def generator_weights(self) -> dict[str, float]:
        return {"G_gan": 1.0}

    def discriminator_weights(self) -> dict[str, float]:
        return {"D_real": 1.0, "D_fake": 1.0}


def _bce(probability: torch.Tensor, target: float) -> torch.Tensor:
    """Binary cross-entropy of D's probabilities [N] against a constant label."""
    return F.binary_cross_entropy(probability, torch.full_like(probability, target))
