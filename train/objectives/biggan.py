"""BigGAN and SA-GAN, class-conditional image synthesis as ajbrock/BigGAN-PyTorch trains them (the
teacher and the student of PPCD-GAN), on models.biggan's networks.

Option `biggan_config` picks the layout: 'biggan' (a shared class embedding of `shared_dim` into
every class-conditional BN, with z split hierarchically over the blocks) or 'sagan' (class
embeddings in every class-conditional BN, the whole z into the first linear map). The widths,
latent size and self-attention resolutions are options of their own (G_ch, D_ch, dim_z,
shared_dim, G_attn, D_attn, BigGAN-PyTorch's names); the resolution is the data's crop_size and
the classes its num_classes. G takes (z, class ids); D judges (image, class ids) with its
projection head.

The loss is the hinge loss of both (BigGAN-PyTorch's loss_hinge_dis / loss_hinge_gen): G minimises
-D(G(z, y), y) with y drawn uniformly over the classes, D minimises relu(1 - D(x, label)) on real
images and relu(1 + D(G(z, y), y)) on fakes, each term with weight 1.
"""
from __future__ import annotations

import torch
from torch import nn

from gansparse.models import biggan

from ..config import ConfigError
from ..losses import GANLoss
from . import register
from .base import SynthesisObjective

__all__ = ["BigGAN"]

#: option biggan_config -> the Generator keywords it fixes
CONFIGS = {"biggan": dict(G_shared=True, hier=True), "sagan": dict(G_shared=False, hier=False)}


@register
class BigGAN(SynthesisObjective):
    name = "biggan"
    data_kind = "conditional"
    # BigGAN at 128x128 (BigGAN-PyTorch's launch_BigGAN_bs256x8.sh).
    defaults = dict(biggan_config="biggan", G_ch=96, D_ch=96, dim_z=120, shared_dim=128, G_attn="64", D_attn="64")
    architecture_keys = ("biggan_config", "G_ch", "D_ch", "dim_z", "shared_dim", "G_attn", "D_attn", "crop_size",
                         "num_classes")
    # BigGAN-PyTorch's weights: the EMA generator is the one it samples and evaluates with.
    reference_files = dict(G=("G_ema.pth", "G.pth"), D="D.pth")  # BigGAN-PyTorch: the EMA G first

    def __init__(self, cfg: dict, device: torch.device) -> None:
        super().__init__(cfg, device)
        if cfg["biggan_config"] not in CONFIGS:
            raise ConfigError(f"option 'biggan_config' must be one of {tuple(CONFIGS)}, got {cfg['biggan_config']!r}")
        self.resolution, self.n_classes = cfg["crop_size"], cfg["num_classes"]
        if self.resolution not in biggan.G_WIDTHS:
            raise ConfigError(f"option 'crop_size' must be one of {tuple(biggan.G_WIDTHS)} for model 'biggan', got "
                             f"{self.resolution!r}")
        # The generator keeps the largest multiple of its z chunks with hier (models.biggan).
        chunks = len(biggan.G_WIDTHS[self.resolution][0]) + 1 if CONFIGS[cfg["biggan_config"]]["hier"] else 1
        self.dim_z = cfg["dim_z"] // chunks * chunks
        self.gan_loss = GANLoss("hinge")

    def generator_kwargs(self) -> dict:
        """The keywords of models.biggan.Generator for the run's options."""
        cfg = self.cfg
        return dict(G_ch=cfg["G_ch"], dim_z=cfg["dim_z"], shared_dim=cfg["shared_dim"], resolution=self.resolution,
                    G_attn=cfg["G_attn"], n_classes=self.n_classes, **CONFIGS[cfg["biggan_config"]])

    def build(self, name: str, mask: str | None = None) -> nn.Module:
        if name == "G":
            return biggan.Generator(**self.generator_kwargs(), mask=mask)
        if name == "D":
            return biggan.Discriminator(D_ch=self.cfg["D_ch"], resolution=self.resolution, D_attn=self.cfg["D_attn"],
                                        n_classes=self.n_classes)
        raise ValueError(f"model 'biggan' has networks 'G' and 'D', got {name!r}")

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        """(z, y). With a shared class embedding, y is an embedding vector [N, shared_dim] (random:
        what the reference's G takes, and what a traced, exported G takes), else class ids."""
        z, ids = super().example_inputs(batch_size)
        if CONFIGS[self.cfg["biggan_config"]]["G_shared"]:
            return z, torch.randn(batch_size, self.cfg["shared_dim"], device=self.device)
        return z, ids

    def generator_terms(self, nets: dict[str, nn.Module], batch: dict
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        fake = nets["G"](batch["z"], batch["y"])  # [N, 3, H, W]
        return {"G_gan": self.gan_loss(nets["D"](fake, batch["y"]), True, for_discriminator=False)}, {"G": fake}

    def discriminator_terms(self, nets: dict[str, nn.Module], batch: dict, fakes: dict[str, torch.Tensor]
                            ) -> dict[str, torch.Tensor]:
        D = nets["D"]
        return {"D_real": self.gan_loss(D(batch["image"], batch["label"]), True),
                "D_fake": self.gan_loss(D(fakes["G"], batch["y"]), False)}

    def generator_weights(self) -> dict[str, float]:
        return {"G_gan": 1.0}

    def discriminator_weights(self) -> dict[str, float]:
        return {"D_real": 1.0, "D_fake": 1.0}
