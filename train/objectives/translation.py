"""Image-to-image base GANs, as junyanz's pytorch-CycleGAN-and-pix2pix trains them (the teachers of
GAN Compression, DMAD and Self-Supervised GAN Compression):

- 'cyclegan' (unpaired data): generators G (A->B) and G_inv (B->A), PatchGAN discriminators D
  (judges domain B) and D_inv (judges domain A); LSGAN, cycle-consistency losses weighted lambda_A
  and lambda_B, identity losses weighted lambda_identity times those, and a history pool of fakes
  for each discriminator.
- 'pix2pix' (paired data): a U-Net G and a conditional PatchGAN D on input and output
  concatenated; vanilla GAN loss plus lambda_L1 * L1 to the target.

D's loss is halved, as the reference does, so it learns slower than G.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..losses import GANLoss, ImagePool
from ..nets import build_discriminator, build_generator
from . import register
from .base import Objective

__all__ = ["CycleGAN", "Pix2Pix"]

#: the options shared by both (junyanz's names); see train/nets.py for the architecture ones
_DEFAULTS = dict(
    netG="resnet_9blocks",
    mobile=False,
    netD="basic",
    ngf=64,
    ndf=64,
    n_layers_D=3,
    norm="instance",
    dropout=False,
    init_type="normal",
    init_gain=0.02,
    input_nc=3,
    output_nc=3,
    gan_mode="lsgan",
)
_ARCHITECTURE = ("netG", "mobile", "netD", "ngf", "ndf", "n_layers_D", "norm", "dropout", "input_nc", "output_nc")


class _Translation(Objective):
    architecture_keys = _ARCHITECTURE

    def __init__(self, cfg: dict, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.gan_loss = GANLoss(cfg["gan_mode"])

    def generator_inputs(self, batch: dict, generator: str = "G") -> tuple[torch.Tensor, ...]:
        return (batch["B"] if generator == "G_inv" else batch["A"],)

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        size = self.cfg["crop_size"]
        return (torch.randn(batch_size, self.cfg["input_nc"], size, size, device=self.device),)

    def _d_loss(self, D: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.gan_loss(D(real), True) + self.gan_loss(D(fake), False))


@register
class CycleGAN(_Translation):
    name = "cyclegan"
    data_kind = "unpaired"
    defaults = dict(_DEFAULTS, pool_size=50, lambda_A=10.0, lambda_B=10.0, lambda_identity=0.5)
    directions = (("G", "D"), ("G_inv", "D_inv"))
    reference_files = dict(G="latest_net_G_A.pth", G_inv="latest_net_G_B.pth", D="latest_net_D_A.pth",
                           D_inv="latest_net_D_B.pth")

    def __init__(self, cfg: dict, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.pools = {"G": ImagePool(cfg["pool_size"]), "G_inv": ImagePool(cfg["pool_size"])}

    def build(self, name: str, mask: str | None = None) -> nn.Module:
        cfg = self.cfg
        a, b = cfg["input_nc"], cfg["output_nc"]
        if name in ("G", "G_inv"):
            return build_generator(cfg, mask, **(dict(input_nc=b, output_nc=a) if name == "G_inv" else {}))
        return build_discriminator(cfg, input_nc=a if name == "D_inv" else b)

    def generator_terms(self, nets, batch):
        G, G_inv, D, D_inv = (nets[name] for name in ("G", "G_inv", "D", "D_inv"))
        cfg, real_A, real_B = self.cfg, batch["A"], batch["B"]
        fake_B, fake_A = G(real_A), G_inv(real_B)  # [N, C, H, W]
        terms = {
            "G_gan": self.gan_loss(D(fake_B), True, for_discriminator=False),
            "G_inv_gan": self.gan_loss(D_inv(fake_A), True, for_discriminator=False),
            "cycle_A": F.l1_loss(G_inv(fake_B), real_A) * cfg["lambda_A"],
            "cycle_B": F.l1_loss(G(fake_A), real_B) * cfg["lambda_B"],
        }
        if cfg["lambda_identity"] > 0:
            # G maps into domain B, so it should leave a real B unchanged (and G_inv a real A).
            terms["idt_B"] = F.l1_loss(G(real_B), real_B) * cfg["lambda_B"] * cfg["lambda_identity"]
            terms["idt_A"] = F.l1_loss(G_inv(real_A), real_A) * cfg["lambda_A"] * cfg["lambda_identity"]
        return terms, {"G": fake_B, "G_inv": fake_A}

    def discriminator_terms(self, nets, batch, fakes):
        return {"D": self._d_loss(nets["D"], batch["B"], fakes["G"]),
                "D_inv": self._d_loss(nets["D_inv"], batch["A"], fakes["G_inv"])}

    def generator_weights(self):
        cfg = self.cfg
        weights = {"G_gan": 1.0, "G_inv_gan": 1.0, "cycle_A": cfg["lambda_A"], "cycle_B": cfg["lambda_B"]}
        if cfg["lambda_identity"] > 0:
            weights.update(idt_A=cfg["lambda_A"] * cfg["lambda_identity"],
                           idt_B=cfg["lambda_B"] * cfg["lambda_identity"])
        return weights

    def discriminator_weights(self):
        return {"D": 1.0, "D_inv": 1.0}

    def pool(self, fakes):
        return {g: self.pools[g].query(fake) for g, fake in fakes.items()}

    def state_dict(self) -> dict:
        return {"pools": [self.pools[g].state_dict() for g in ("G", "G_inv")]}

    def load_state_dict(self, state: dict) -> None:
        for g, pool_state in zip(("G", "G_inv"), state["pools"], strict=True):
            self.pools[g].load_state_dict(pool_state)


@register
class Pix2Pix(_Translation):
    name = "pix2pix"
    data_kind = "paired"
    defaults = dict(_DEFAULTS, lambda_L1=100.0)
    reference_files = dict(G="latest_net_G.pth", D="latest_net_D.pth")

    def build(self, name: str, mask: str | None = None) -> nn.Module:
        if name == "G":
            return build_generator(self.cfg, mask)
        # D judges (input, output) pairs.
        return build_discriminator(self.cfg, input_nc=self.cfg["input_nc"] + self.cfg["output_nc"])

    def generator_terms(self, nets, batch):
        fake_B = nets["G"](batch["A"])
        prediction = nets["D"](torch.cat([batch["A"], fake_B], 1))
        return {"G_gan": self.gan_loss(prediction, True, for_discriminator=False),
                "G_L1": F.l1_loss(fake_B, batch["B"]) * self.cfg["lambda_L1"]}, {"G": fake_B}

    def discriminator_terms(self, nets, batch, fakes):
        real_A = batch["A"]
        return {"D": self._d_loss(nets["D"], torch.cat([real_A, batch["B"]], 1), torch.cat([real_A, fakes["G"]], 1))}

    def generator_weights(self):
        return {"G_gan": 1.0, "G_L1": self.cfg["lambda_L1"]}

    def discriminator_weights(self):
        return {"D": 1.0}
