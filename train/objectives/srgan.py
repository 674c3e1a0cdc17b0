"""SRGAN, x4 single-image super-resolution as BasicSR trains it (XPixelGroup/BasicSR's SRGANModel
with options/train/SRResNet_SRGAN/train_MSRGAN_x4.yml: the baseline Self-Supervised GAN
Compression compresses), on models.srgan's networks.

Data: high-resolution images ('unconditional' data, 'image'); prepare() makes G's input 'lr', the
bicubic downsampling of 'image' by `upscale` with antialiasing (as MATLAB's imresize, which made
DIV2K's LR images), clamped to [-1, 1]. The crop_size is the HR side, a multiple of upscale and,
for the discriminator, a power of two (BasicSR: 128).

G: models.srgan.MSRResNet(num_feat, num_block, upscale) on the [-1, 1] images (signed=True). D:
models.srgan.VGGStyleDiscriminator(num_feat_D) at the HR side. Loss terms, each with its weight
(BasicSR's names and defaults):
- G_pix: pixel_weight * pixel_criterion ('l1' or 'mse') between SR and HR;
- G_percep: percep_weight * L1 between the VGG19 features of SR and of HR at conv5_4 before its
  ReLU, on images in [0, 1] normalised with ImageNet's mean and std (BasicSR's PerceptualLoss);
  torchvision's ImageNet VGG19 weights are read from the torch.hub cache, never downloaded;
- G_gan: gan_weight * the vanilla GAN loss (BCE on D's logits) of D(SR) as real;
- D_real, D_fake: the vanilla GAN loss of D on HR as real and on SR as fake, weight 1 (BasicSR
  weighs only G's adversarial term).
A term whose weight is 0 is left out.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gansparse.metrics import weights_file
from gansparse.models import srgan

from ..config import ConfigError
from ..losses import GANLoss
from . import register
from .base import Objective

__all__ = ["SRGAN", "VGG19_URL", "VGGFeatures"]

#: torchvision's ImageNet VGG19, the network of the perceptual loss
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
PIXEL_CRITERIA = {"l1": F.l1_loss, "mse": F.mse_loss}


class VGGFeatures(nn.Module):
    """VGG19's features up to conv5_4, before its ReLU, of images in [-1, 1] (mapped to [0, 1] and
    normalised with ImageNet's mean and std, as BasicSR's VGGFeatureExtractor does); frozen, in eval
    mode. The weights come from torchvision's file in the torch.hub cache."""

    CONV5_4 = 34  # index of conv5_4 in torchvision's vgg19().features

    def __init__(self) -> None:
        super().__init__()
        path = weights_file(VGG19_URL)
        if not path.is_file():
            raise FileNotFoundError(
                f"the perceptual loss of model 'srgan' needs torchvision's ImageNet VGG19 weights: {path} is missing. "
                f"Download {VGG19_URL} and put it at {path} (the torch.hub cache; set TORCH_HOME to move it), or "
                "train without the perceptual term: --percep_weight 0")
        from torchvision.models import vgg19  # here: only this loss needs torchvision

        with torch.device("meta"):  # no memory or init for the weights loaded next, nor the classifier
            self.features = vgg19().features[:self.CONV5_4 + 1]
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # reads the features only
        prefix = "features."
        kept = {key[len(prefix):]: value for key, value in state.items()
                if key.startswith(prefix) and int(key.split(".")[1]) <= self.CONV5_4}
        self.features.load_state_dict(kept, assign=True)
        self.features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(((x + 1) / 2 - self.mean) / self.std)  # [N, 512, H / 16, W / 16]


@register
class SRGAN(Objective):
    name = "srgan"
    data_kind = "unconditional"
    # BasicSR's train_MSRGAN_x4.yml.
    defaults = dict(num_feat=64, num_block=16, num_feat_D=64, upscale=4, pixel_criterion="l1", pixel_weight=1e-2,
                    percep_weight=1.0, gan_weight=5e-3)
    architecture_keys = ("num_feat", "num_block", "num_feat_D", "upscale", "crop_size")
    # BasicSR's experiments/<name>/models/ (each file a dict holding the state_dict, see unwrap_reference).
    reference_files = dict(G="net_g_latest.pth", D="net_d_latest.pth")
    target_key = "image"

    def __init__(self, cfg: dict, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.upscale, side = cfg["upscale"], cfg["crop_size"]
        if self.upscale not in srgan.UPSCALES:
            raise ConfigError(f"option 'upscale' must be one of {srgan.UPSCALES}, got {self.upscale!r}")
        if not (isinstance(side, int) and side >= 8 and side & (side - 1) == 0 and side % self.upscale == 0):
            raise ConfigError(f"option 'crop_size' (the HR side) must be a power of two >= 8 and a multiple of "
                              f"upscale={self.upscale} for model 'srgan', got {side!r}")
        if cfg["pixel_criterion"] not in PIXEL_CRITERIA:
            raise ConfigError(f"option 'pixel_criterion' must be one of {tuple(PIXEL_CRITERIA)}, got "
                              f"{cfg['pixel_criterion']!r}")
        for key in ("pixel_weight", "percep_weight", "gan_weight"):
            if cfg[key] < 0:
                raise ConfigError(f"option {key!r} must be >= 0, got {cfg[key]!r}")
        self.gan_loss = GANLoss("vanilla")
        self.vgg = VGGFeatures().to(device) if cfg["percep_weight"] > 0 else None

    def build(self, name: str, mask: str | None = None) -> nn.Module:
        cfg = self.cfg
        if name == "G":
            return srgan.MSRResNet(num_feat=cfg["num_feat"], num_block=cfg["num_block"], upscale=self.upscale,
                                   mask=mask, signed=True)
        if name == "D":
            return srgan.VGGStyleDiscriminator(num_feat=cfg["num_feat_D"], input_size=cfg["crop_size"])
        raise ValueError(f"model 'srgan' has networks 'G' and 'D', got {name!r}")

    def unwrap_reference(self, name: str, state: dict) -> dict:
        """BasicSR saves {'params': state_dict} (and 'params_ema' for a G trained with an EMA, the
        one it tests with)."""
        keys = ("params_ema", "params") if name == "G" else ("params",)
        return next((state[key] for key in keys if key in state), state)

    # --- data -----------------------------------------------------------------------------------

    def prepare(self, batch: dict) -> dict:
        batch = super().prepare(batch)
        if "lr" not in batch:
            hr = batch["image"]  # [N, 3, H, W]
            lr = F.interpolate(hr, scale_factor=1 / self.upscale, mode="bicubic", align_corners=False,
                               antialias=True)
            batch["lr"] = lr.clamp(-1, 1)  # [N, 3, H / upscale, W / upscale]
        return batch

    def generator_inputs(self, batch: dict, generator: str = "G") -> tuple[torch.Tensor, ...]:
        return (batch["lr"],)

    def input_image(self, batch: dict) -> torch.Tensor:
        """The LR input upsampled (bicubic) to the HR side."""
        return F.interpolate(batch["lr"], scale_factor=self.upscale, mode="bicubic", align_corners=False).clamp(-1, 1)

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        side = self.cfg["crop_size"] // self.upscale
        return (torch.randn(batch_size, 3, side, side, device=self.device),)

    # --- loss -----------------------------------------------------------------------------------

    def generator_terms(self, nets: dict[str, nn.Module], batch: dict
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        weights, hr = self.generator_weights(), batch["image"]
        sr = nets["G"](batch["lr"])  # [N, 3, H, W]
        terms = {}
        if "G_pix" in weights:
            terms["G_pix"] = PIXEL_CRITERIA[self.cfg["pixel_criterion"]](sr, hr) * weights["G_pix"]
        if "G_percep" in weights:
            with torch.no_grad():
                target = self.vgg(hr)
            terms["G_percep"] = F.l1_loss(self.vgg(sr), target) * weights["G_percep"]
        if "G_gan" in weights:
            terms["G_gan"] = self.gan_loss(nets["D"](sr), True, for_discriminator=False) * weights["G_gan"]
        return terms, {"G": sr}

    def discriminator_terms(self, nets: dict[str, nn.Module], batch: dict, fakes: dict[str, torch.Tensor]
                            ) -> dict[str, torch.Tensor]:
        D = nets["D"]
        return {"D_real": self.gan_loss(D(batch["image"]), True), "D_fake": self.gan_loss(D(fakes["G"]), False)}

    def generator_weights(self) -> dict[str, float]:
        cfg = self.cfg
        weights = {"G_pix": cfg["pixel_weight"], "G_percep": cfg["percep_weight"], "G_gan": cfg["gan_weight"]}
        return {term: weight for term, weight in weights.items() if weight > 0}

    def discriminator_weights(self) -> dict[str, float]:
        return {"D_real": 1.0, "D_fake": 1.0}
