"""StarGAN, multi-domain image-to-image translation as the official code trains it (yunjey/stargan,
solver.py; the StarGAN task of Self-Supervised GAN Compression), on models.stargan's networks.

Data: 'conditional' (train/data.py), an image's class is its domain (c_dim = num_classes), with
one-hot domain labels and cross-entropy classification, as the official code trains on RaFD. Each
prepared batch draws the target domains as a permutation of the batch's own labels, as the
official code does, and the gradient penalty's mixing weights, so every loss computed on it (the
original and the compressed model's, in Self-Supervised GAN Compression) sees the same draws.

Terms, each with its weight (the official lambda_cls, lambda_rec, lambda_gp):
- G: 'G_fake' -mean D_src(G(x, c_trg)); 'G_cls' lambda_cls * CE(D_cls(G(x, c_trg)), trg);
  'G_rec' lambda_rec * mean |x - G(G(x, c_trg), c_org)|.
- D: 'D_real' -mean D_src(x); 'D_fake' mean D_src(fake); 'D_cls' lambda_cls * CE(D_cls(x), org);
  'D_gp' lambda_gp * mean (||grad D_src(x_hat)||_2 - 1)^2 at x_hat = a x + (1 - a) fake.
The penalty is differentiable in the fakes (the official code detaches them, which changes nothing
for D's update, whose fakes are detached anyway), so the penalty term of L_DC (Eq. 8) can train the
compressed generator; with StarGAN's piecewise-linear D its input gradient is locally constant, so
that term's gradient in the images is zero almost everywhere and it only enters L_DC's value. The
generator is updated every n_critic steps, after n_critic updates of D (train.methods.Dense.updates).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gansparse.models import stargan

from ..config import ConfigError
from . import register
from .base import Objective

__all__ = ["StarGAN", "gradient_penalty"]


@register
class StarGAN(Objective):
    name = "stargan"
    data_kind = "conditional"
    # The official defaults (main.py).
    defaults = dict(g_conv_dim=64, d_conv_dim=64, g_repeat_num=6, d_repeat_num=6, lambda_cls=1.0, lambda_rec=10.0,
                    lambda_gp=10.0, n_critic=5)
    architecture_keys = ("g_conv_dim", "d_conv_dim", "g_repeat_num", "d_repeat_num", "num_classes", "crop_size")
    reference_files = dict(G="200000-G.ckpt", D="200000-D.ckpt")

    def __init__(self, cfg: dict, device: torch.device) -> None:
        super().__init__(cfg, device)
        for key in ("g_conv_dim", "d_conv_dim", "d_repeat_num", "n_critic"):
            if not (isinstance(cfg[key], int) and cfg[key] > 0):
                raise ConfigError(f"option {key!r} must be a positive int, got {cfg[key]!r}")
        if not (isinstance(cfg["g_repeat_num"], int) and cfg["g_repeat_num"] >= 0):
            raise ConfigError(f"option 'g_repeat_num' must be an int >= 0, got {cfg['g_repeat_num']!r}")
        for key in ("lambda_cls", "lambda_rec", "lambda_gp"):
            if cfg[key] < 0:
                raise ConfigError(f"option {key!r} must be >= 0, got {cfg[key]!r}")
        if cfg["crop_size"] % 2 ** cfg["d_repeat_num"]:
            raise ConfigError(f"option 'crop_size' must be a multiple of 2**d_repeat_num = {2 ** cfg['d_repeat_num']}"
                              f" for model 'stargan', got {cfg['crop_size']!r}")
        if cfg["num_classes"] < 2:
            raise ConfigError(f"option 'num_classes' (StarGAN's domains) must be at least 2, "
                              f"got {cfg['num_classes']!r}")
        self.c_dim = cfg["num_classes"]
        #: D updates per G update
        self.n_critic = cfg["n_critic"]

    def build(self, name: str, mask: str | None = None) -> nn.Module:
        cfg = self.cfg
        if name == "G":
            return stargan.Generator(cfg["g_conv_dim"], self.c_dim, cfg["g_repeat_num"], mask=mask)
        if name == "D":
            return stargan.Discriminator(cfg["crop_size"], cfg["d_conv_dim"], self.c_dim, cfg["d_repeat_num"])
        raise ValueError(f"model 'stargan' has networks 'G' and 'D', got {name!r}")

    # --- data -----------------------------------------------------------------------------------

    def prepare(self, batch: dict) -> dict:
        """Adds 'label_trg' (the target domains, the batch's labels permuted), the one-hot 'c_org'
        and 'c_trg' [N, c_dim] and 'gp_alpha' [N, 1, 1, 1] (the penalty's mixing weights)."""
        batch = super().prepare(batch)
        count = len(batch["image"])
        if "label_trg" not in batch:
            batch["label_trg"] = batch["label"][torch.randperm(count, device=self.device)]
        if "gp_alpha" not in batch:
            batch["gp_alpha"] = torch.rand(count, 1, 1, 1, device=self.device)
        for key, labels in (("c_org", "label"), ("c_trg", "label_trg")):
            if key not in batch:
                batch[key] = F.one_hot(batch[labels], self.c_dim).float()
        return batch

    def generator_inputs(self, batch: dict, generator: str = "G") -> tuple[torch.Tensor, ...]:
        return batch["image"], batch["c_trg"]

    def input_image(self, batch: dict) -> torch.Tensor:
        return batch["image"]

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        size = self.cfg["crop_size"]
        labels = torch.arange(batch_size, device=self.device) % self.c_dim
        return torch.randn(batch_size, 3, size, size, device=self.device), F.one_hot(labels, self.c_dim).float()

    # --- loss -----------------------------------------------------------------------------------

    def generator_terms(self, nets: dict[str, nn.Module], batch: dict
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        cfg, G = self.cfg, nets["G"]
        real = batch["image"]
        fake = G(real, batch["c_trg"])  # [N, 3, H, W]
        reconstruction = G(fake, batch["c_org"])
        src, cls = nets["D"](fake)
        return {"G_fake": -src.mean(),
                "G_cls": F.cross_entropy(cls, batch["label_trg"]) * cfg["lambda_cls"],
                "G_rec": (real - reconstruction).abs().mean() * cfg["lambda_rec"]}, {"G": fake}

    def discriminator_terms(self, nets: dict[str, nn.Module], batch: dict, fakes: dict[str, torch.Tensor]
                            ) -> dict[str, torch.Tensor]:
        cfg, D = self.cfg, nets["D"]
        real, fake = batch["image"], fakes["G"]
        src_real, cls_real = D(real)
        src_fake, _ = D(fake)
        mixed = batch["gp_alpha"] * real + (1 - batch["gp_alpha"]) * fake
        return {"D_real": -src_real.mean(),
                "D_fake": src_fake.mean(),
                "D_cls": F.cross_entropy(cls_real, batch["label"]) * cfg["lambda_cls"],
                "D_gp": gradient_penalty(lambda x: D(x)[0], mixed) * cfg["lambda_gp"]}

    def generator_weights(self) -> dict[str, float]:
        return {"G_fake": 1.0, "G_cls": self.cfg["lambda_cls"], "G_rec": self.cfg["lambda_rec"]}

    def discriminator_weights(self) -> dict[str, float]:
        return {"D_real": 1.0, "D_fake": 1.0, "D_cls": self.cfg["lambda_cls"], "D_gp": self.cfg["lambda_gp"]}


def gradient_penalty(critic, mixed: torch.Tensor) -> torch.Tensor:
    """mean over samples of (||d sum(critic(mixed)) / d mixed||_2 - 1)^2, differentiable in the
    critic's weights and in whatever `mixed` was computed from (create_graph)."""
    if not mixed.requires_grad:  # mixed of detached images: a leaf to differentiate at
        mixed = mixed.detach().requires_grad_(True)
    with torch.enable_grad():
        out = critic(mixed)
        (grad,) = torch.autograd.grad(out, mixed, torch.ones_like(out), create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
