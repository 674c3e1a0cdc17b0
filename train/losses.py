"""GAN objectives and the image history pool, shared by the methods."""
from __future__ import annotations

import random

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GAN_MODES", "GANLoss", "ImagePool", "gradient_penalty"]

GAN_MODES = ("lsgan", "vanilla", "hinge", "wgangp")


class GANLoss(nn.Module):
    """The adversarial loss of a discriminator's raw output `prediction` (any shape, e.g. a PatchGAN
    map), averaged over its elements:

    - 'lsgan':   mean (prediction - target)^2, target 1 for real and 0 for fake (LSGAN, CycleGAN);
    - 'vanilla': binary cross-entropy on the logits (pix2pix);
    - 'hinge':   for D, mean relu(1 - prediction) on real and mean relu(1 + prediction) on fake;
                 for G (for_discriminator=False), -mean prediction;
    - 'wgangp':  -mean prediction on real, +mean prediction on fake (add gradient_penalty for D).
    """

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in GAN_MODES:
            raise ValueError(f"mode must be one of {GAN_MODES}, got {mode!r}")
        self.mode = mode

    def forward(self, prediction: torch.Tensor, target_is_real: bool, for_discriminator: bool = True) -> torch.Tensor:
        if self.mode == "lsgan":
            return F.mse_loss(prediction, torch.full_like(prediction, float(target_is_real)))
        if self.mode == "vanilla":
            return F.binary_cross_entropy_with_logits(prediction, torch.full_like(prediction, float(target_is_real)))
        if self.mode == "hinge" and for_discriminator:
            return F.relu(1 - prediction).mean() if target_is_real else F.relu(1 + prediction).mean()
        if self.mode == "hinge" and not target_is_real:
            raise ValueError("the hinge loss of the generator is defined for target_is_real=True only")
        return -prediction.mean() if target_is_real else prediction.mean()

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def gradient_penalty(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, weight: float = 10.0,
                     constant: float = 1.0) -> torch.Tensor:
    """WGAN-GP: weight * mean over samples of (||grad_x D(x)||_2 - constant)^2 at random points x
    between real and fake samples (Gulrajani et al. 2017)."""
    alpha = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    out = discriminator(mixed)
    (grad,) = torch.autograd.grad(out, mixed, torch.ones_like(out), create_graph=True)
    return weight * ((grad.flatten(1).norm(2, dim=1) - constant) ** 2).mean()


class ImagePool:
    """A history of generated images (Shrivastava et al. 2017, as CycleGAN uses it): D sees a mix
    of current and earlier fakes. query() returns, per image, the image itself while the pool
    fills; then, with probability 1/2, a stored image that the new one replaces, else the new one.
    size 0 returns the images unchanged. Draws use Python's `random`, whose state the loop
    checkpoints; the pool's contents are in state_dict()."""

    def __init__(self, size: int) -> None:
        if not (isinstance(size, int) and size >= 0):
            raise ValueError(f"size must be an int >= 0, got {size!r}")
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)  # [1, C, H, W]
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif random.random() > 0.5:
                index = random.randrange(self.size)
                out.append(self.images[index].to(image.device))
                self.images[index] = image
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict:
        return {"images": [image.cpu() for image in self.images]}

    def load_state_dict(self, state: dict) -> None:
        self.images = list(state["images"])  # moved to the queries' device as they are drawn
