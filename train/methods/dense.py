"""Method `dense`: train an uncompressed teacher, CycleGAN or pix2pix, as junyanz's
pytorch-CycleGAN-and-pix2pix does (the teachers of GAN Compression and DMAD).

- model 'cyclegan' (unpaired data): generators G (A->B) and G_inv (B->A), PatchGAN discriminators
  D (judges domain B) and D_inv (judges domain A); LSGAN, cycle-consistency losses weighted
  lambda_A and lambda_B, identity losses weighted lambda_identity times those, and a history pool
  of fakes for each discriminator.
- model 'pix2pix' (paired data): a U-Net G and a conditional PatchGAN D on input and output
  concatenated; vanilla GAN loss plus lambda_L1 * L1 to the target.

Both update G then D with Adam(lr, (beta1, beta2)) at every step; D's loss is halved, as the
reference does, so it learns slower than G.
"""
from __future__ import annotations

import itertools
from collections import deque

import torch
from torch.nn import functional as F

from ..losses import GANLoss, ImagePool
from ..nets import build_discriminator, build_generator
from . import register
from .base import Method

__all__ = ["Dense"]

DATA_KINDS = {"cyclegan": "unpaired", "pix2pix": "paired"}

# Paper settings shared by the presets; steps are the reference's epochs times the images per
# epoch divided by the batch size.
_CYCLEGAN = dict(model="cyclegan", netG="resnet_9blocks", norm="instance", dropout=False, gan_mode="lsgan",
                 pool_size=50, batch_size=1, load_size=286, crop_size=256)
_PIX2PIX = dict(model="pix2pix", netG="unet_256", norm="batch", dropout=True, gan_mode="vanilla", pool_size=0,
                load_size=286, crop_size=256)


@register
class Dense(Method):
    name = "dense"
    data_kind = "unpaired"  # per run: DATA_KINDS[cfg['model']]
    defaults = dict(
        model="cyclegan",
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
        pool_size=50,
        lambda_A=10.0,
        lambda_B=10.0,
        lambda_identity=0.5,
        lambda_L1=100.0,
    )
    presets = {
        # Tiny CycleGAN on the synthetic unpaired set: a couple of minutes on 2 CPU cores.
        "smoke": dict(model="cyclegan", netG="resnet_3blocks", ngf=16, ndf=16, crop_size=32, load_size=32,
                      preprocess="none", steps=300, batch_size=4, pool_size=16, log_every=10, sample_every=100,
                      checkpoint_every=100, eval_size=32),
        # Tiny pix2pix on the synthetic paired set.
        "smoke_pix2pix": dict(model="pix2pix", netG="unet_32", norm="batch", dropout=True, gan_mode="vanilla",
                              pool_size=0, ngf=16, ndf=16, crop_size=32, load_size=32, preprocess="none", steps=300,
                              batch_size=4, log_every=10, sample_every=100, checkpoint_every=100, eval_size=32),
        # horse2zebra: 1334 images per epoch (the larger domain), 100 + 100 epochs.
        "horse2zebra": dict(_CYCLEGAN, steps=266_800),
        # summer2winter_yosemite: 1231 images per epoch, 100 + 100 epochs.
        "summer2winter": dict(_CYCLEGAN, steps=246_200),
        # edges2shoes: 49,825 pairs, 15 epochs at batch 4 (pix2pix paper).
        "edges2shoes": dict(_PIX2PIX, batch_size=4, steps=186_844),
        # cityscapes labels -> photo (BtoA of the reference's photo|label pairs): 2975 pairs,
        # 100 + 100 epochs at batch 1.
        "cityscapes": dict(_PIX2PIX, batch_size=1, steps=595_000, direction="BtoA"),
    }

    def __init__(self, cfg: dict, device: torch.device) -> None:
        super().__init__(cfg, device)
        if cfg["model"] not in DATA_KINDS:
            raise ValueError(f"option 'model' must be one of {tuple(DATA_KINDS)}, got {cfg['model']!r}")
        self.data_kind = DATA_KINDS[cfg["model"]]
        self.cyclegan = cfg["model"] == "cyclegan"
        self.gan_loss = GANLoss(cfg["gan_mode"])
        # Fakes of each G loss, consumed in the same order by the D losses that follow it (one
        # entry per micro-batch), so D judges the images G was updated on, as the reference does.
        self._fakes: deque[tuple[torch.Tensor, ...]] = deque()

    def build(self) -> None:
        cfg = self.cfg
        self.nets["G"] = build_generator(cfg)
        if self.cyclegan:
            self.nets["D"] = build_discriminator(cfg)
            self.nets["G_inv"] = build_generator(cfg, input_nc=cfg["output_nc"], output_nc=cfg["input_nc"])
            self.nets["D_inv"] = build_discriminator(cfg, input_nc=cfg["input_nc"])
            self.pools = [ImagePool(cfg["pool_size"]), ImagePool(cfg["pool_size"])]  # fakes of B, fakes of A
        else:
            self.nets["D"] = build_discriminator(cfg, input_nc=cfg["input_nc"] + cfg["output_nc"])
        for net in self.nets.values():
            net.to(self.device)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        def adam(*names):
            params = itertools.chain.from_iterable(self.nets[name].parameters() for name in names)
            return torch.optim.Adam(params, lr=self.cfg["lr"], betas=(self.cfg["beta1"], self.cfg["beta2"]))

        if self.cyclegan:
            return {"G": adam("G", "G_inv"), "D": adam("D", "D_inv")}
        return {"G": adam("G"), "D": adam("D")}

    def loss(self, part: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        real_A, real_B = batch["A"].to(self.device), batch["B"].to(self.device)
        if part == "G":
            g_losses = self._cyclegan_g if self.cyclegan else self._pix2pix_g
            losses = g_losses(real_A, real_B)
        elif part == "D":
            if not self._fakes:
                raise RuntimeError("dense: the D loss judges the fakes of the G loss on the same batch; call "
                                   "loss('G', batch, step) first")
            d_losses = self._cyclegan_d if self.cyclegan else self._pix2pix_d
            losses = d_losses(real_A, real_B, *self._fakes.popleft())
        else:
            raise ValueError(f"part must be 'G' or 'D', got {part!r}")
        total = sum(losses.values())
        return total, {name: value.item() for name, value in losses.items()}

    # --- CycleGAN ---------------------------------------------------------------------------

    def _cyclegan_g(self, real_A: torch.Tensor, real_B: torch.Tensor) -> dict[str, torch.Tensor]:
        G, G_inv, D, D_inv = (self.nets[name] for name in ("G", "G_inv", "D", "D_inv"))
        cfg = self.cfg
        fake_B, fake_A = G(real_A), G_inv(real_B)  # [N, C, H, W]
        self._fakes.append((fake_B.detach(), fake_A.detach()))
        losses = {
            "G_gan": self.gan_loss(D(fake_B), True, for_discriminator=False),
            "G_inv_gan": self.gan_loss(D_inv(fake_A), True, for_discriminator=False),
            "cycle_A": F.l1_loss(G_inv(fake_B), real_A) * cfg["lambda_A"],
            "cycle_B": F.l1_loss(G(fake_A), real_B) * cfg["lambda_B"],
        }
        if cfg["lambda_identity"] > 0:
            # G maps into domain B, so it should leave a real B unchanged (and G_inv a real A).
            losses["idt_B"] = F.l1_loss(G(real_B), real_B) * cfg["lambda_B"] * cfg["lambda_identity"]
            losses["idt_A"] = F.l1_loss(G_inv(real_A), real_A) * cfg["lambda_A"] * cfg["lambda_identity"]
        return losses

    def _cyclegan_d(self, real_A: torch.Tensor, real_B: torch.Tensor, fake_B: torch.Tensor,
                    fake_A: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"D": self._d_loss(self.nets["D"], real_B, self.pools[0].query(fake_B)),
                "D_inv": self._d_loss(self.nets["D_inv"], real_A, self.pools[1].query(fake_A))}

    def _d_loss(self, D, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.gan_loss(D(real), True) + self.gan_loss(D(fake), False))

    # --- pix2pix ----------------------------------------------------------------------------

    def _pix2pix_g(self, real_A: torch.Tensor, real_B: torch.Tensor) -> dict[str, torch.Tensor]:
        fake_B = self.nets["G"](real_A)
        self._fakes.append((fake_B.detach(),))
        prediction = self.nets["D"](torch.cat([real_A, fake_B], 1))  # D judges (input, output) pairs
        return {"G_gan": self.gan_loss(prediction, True, for_discriminator=False),
                "G_L1": F.l1_loss(fake_B, real_B) * self.cfg["lambda_L1"]}

    def _pix2pix_d(self, real_A: torch.Tensor, real_B: torch.Tensor, fake_B: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"D": self._d_loss(self.nets["D"], torch.cat([real_A, real_B], 1), torch.cat([real_A, fake_B], 1))}

    # --- results and state ------------------------------------------------------------------

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        size = self.cfg["crop_size"]
        return (torch.randn(batch, self.cfg["input_nc"], size, size, device=self.device),)

    def generate(self, batch: dict) -> torch.Tensor:
        # In the nets' current mode: pix2pix is evaluated with batch statistics and dropout, as
        # its paper does.
        return self.student()(batch["A"].to(self.device))

    def extra_state(self) -> dict:
        return {"pools": [pool.state_dict() for pool in self.pools]} if self.cyclegan else {}

    def load_extra_state(self, state: dict) -> None:
        if self.cyclegan:
            for pool, pool_state in zip(self.pools, state["pools"]):
                pool.load_state_dict(pool_state)
