"""Method `dense`: train an uncompressed base GAN (a teacher for the compression methods), as its
reference implementation does. Option `model` picks the base GAN (train/objectives): 'cyclegan'
and 'pix2pix' as junyanz's pytorch-CycleGAN-and-pix2pix, and the others registered there.

Every step updates the generators, then the discriminators, with Adam(lr, (beta1, beta2)) and
Adam(lr_D or lr, (beta1, beta2)); a base GAN with n_critic > 1 (StarGAN) updates its generators on
every n_critic-th step only, after n_critic discriminator updates, as its reference does. G's loss
is the sum of the objective's generator terms, D's the sum of its discriminator terms on the fakes
of the same micro-batch (through the objective's history pool, if it has one), or on fresh fakes
where G is not updated.
"""
from __future__ import annotations

import itertools
from collections import deque

import torch
from torch import nn

from ..objectives import get_objective, merged_defaults
from . import register
from .base import Method

__all__ = ["Dense"]

# Paper settings shared by the presets; steps are the reference's epochs times the images per
# epoch divided by the batch size.
_CYCLEGAN = dict(model="cyclegan", netG="resnet_9blocks", norm="instance", dropout=False, gan_mode="lsgan",
                 pool_size=50, batch_size=1, load_size=286, crop_size=256)
_PIX2PIX = dict(model="pix2pix", netG="unet_256", norm="batch", dropout=True, gan_mode="vanilla", pool_size=0,
                load_size=286, crop_size=256)


@register
class Dense(Method):
    name = "dense"
    defaults = dict(model="cyclegan", lr_D=0.0, **merged_defaults())
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
        # Tiny BigGAN on the synthetic class-conditional set at 32x32 (PPCD-GAN's smoke teacher).
        "smoke_biggan": dict(model="biggan", biggan_config="biggan", G_ch=8, D_ch=4, dim_z=16, shared_dim=8,
                             G_attn="16", D_attn="16", crop_size=32, load_size=32, preprocess="none", steps=300,
                             batch_size=8, lr=2e-4, beta1=0.0, lr_policy="constant", log_every=10, sample_every=100,
                             checkpoint_every=100, eval_size=32),
        # BigGAN on ImageNet at 128x128 (BigGAN-PyTorch's launch_BigGAN_bs256x8.sh: batch 256 x 8
        # accumulations, 150k iterations, EMA of G); the data path is the user's --dataroot.
        "imagenet128": dict(model="biggan", biggan_config="biggan", G_ch=96, D_ch=96, dim_z=120, shared_dim=128,
                            G_attn="64", D_attn="64", crop_size=128, load_size=128, num_classes=1000,
                            batch_size=2048, accumulation=8, steps=150_000, lr=1e-4, lr_D=4e-4, beta1=0.0, beta2=0.999,
                            lr_policy="constant", ema=0.9999, checkpoint_every=2000, sample_every=2000,
                            log_every=100),
        # Tiny DCGAN on the synthetic unconditional set (64x64, the networks' only size).
        "smoke_dcgan": dict(model="dcgan", nz=16, ngf=8, ndf=8, crop_size=64, load_size=64, preprocess="none",
                            steps=200, batch_size=8, lr=2e-4, beta1=0.5, lr_policy="constant", log_every=10,
                            sample_every=100, checkpoint_every=100, eval_size=32),
        # DCGAN on MNIST as the PyTorch example trains it: 64x64, batch 128, 25 epochs of 469 batches,
        # Adam(2e-4, (0.5, 0.999)), no decay, no flips; the data path is the user's --dataroot.
        "mnist": dict(model="dcgan", nz=100, ngf=64, ndf=64, crop_size=64, load_size=64, no_flip=True,
                      steps=25 * 469, batch_size=128, lr=2e-4, beta1=0.5, lr_policy="constant"),
        # Tiny StarGAN on the synthetic class-conditional set (4 domains) at 32x32.
        "smoke_stargan": dict(model="stargan", g_conv_dim=8, d_conv_dim=8, g_repeat_num=2, d_repeat_num=3,
                              crop_size=32, load_size=32, preprocess="none", num_classes=4, n_critic=5, steps=200,
                              batch_size=4, lr=1e-4, beta1=0.5, log_every=10, sample_every=100, checkpoint_every=100,
                              eval_size=32),
        # StarGAN on RaFD's 8 expressions (one class folder each) as the official code trains it:
        # 128x128, batch 16, 200k iterations with n_critic 5, Adam(1e-4, (0.5, 0.999)) decaying
        # linearly over the second half; the data path is the user's --dataroot.
        "rafd": dict(model="stargan", crop_size=128, load_size=128, preprocess="scale_width_and_crop",
                     num_classes=8, batch_size=16, steps=200_000, lr=1e-4, beta1=0.5, beta2=0.999,
                     lr_policy="linear", decay_start=0.5, checkpoint_every=10_000, sample_every=1000,
                     log_every=100),
        # Tiny SRGAN x4 on the synthetic unconditional set: 32x32 HR crops (8x8 LR), no perceptual
        # term (it needs no VGG19 weights) and pixel weight 1 (BasicSR's 1e-2 expects a G pretrained
        # with L1 and the perceptual term to hold it).
        "smoke_srgan": dict(model="srgan", num_feat=16, num_block=4, num_feat_D=16, crop_size=32, load_size=32,
                            preprocess="none", pixel_weight=1.0, percep_weight=0.0, steps=300, batch_size=4,
                            lr=1e-4, beta1=0.9, beta2=0.99, lr_policy="constant", log_every=10, sample_every=100,
                            checkpoint_every=100, eval_size=32),
        # SRGAN x4 on DIV2K's HR images as BasicSR's train_MSRGAN_x4.yml trains it: 128x128 crops, batch
        # 16, 400k iterations, Adam(1e-4, (0.9, 0.99)) for G and D, EMA 0.999 of G. BasicSR halves the LR
        # at 50k, 100k, 200k and 300k; 'step' halves it every 100k (no 50k step), and flips only (no
        # rotations). BasicSR starts G from an L1-trained MSRResNet, a step outside this preset. The
        # data path is the user's --dataroot.
        "div2k": dict(model="srgan", num_feat=64, num_block=16, num_feat_D=64, crop_size=128, load_size=128,
                      preprocess="crop", batch_size=16, steps=400_000, lr=1e-4, beta1=0.9, beta2=0.99,
                      lr_policy="step", lr_step_size=100_000, lr_gamma=0.5, ema=0.999, checkpoint_every=5000,
                      sample_every=5000, log_every=100),
    }

    def __init__(self, cfg: dict, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.objective = get_objective(cfg["model"])(cfg, device)
        self.data_kind = self.objective.data_kind
        # (prepared micro-batch, detached fakes) of each G loss, consumed in the same order by the
        # D losses that follow it, so D judges the images G was updated on, as the references do.
        self._fakes: deque[tuple[dict, dict[str, torch.Tensor]]] = deque()

    def directions(self) -> tuple[tuple[str, str], ...]:
        """(generator, discriminator that judges it) of each direction of the base GAN."""
        return self.objective.directions

    def build(self) -> None:
        for g, d in self.directions():
            self.nets[g] = self.objective.build(g).to(self.device)
            self.nets[d] = self.objective.build(d).to(self.device)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Adam for the generators at lr, and for the discriminators at lr_D (0: lr)."""
        return {"G": self.adam(self.parameter_groups("G")),
                "D": self.adam(self.parameter_groups("D"), lr=self.cfg["lr_D"] or self.cfg["lr"])}

    def parameter_groups(self, part: str) -> list[dict]:
        """The optimizer's parameter groups of `part` ('G': every generator, 'D': every
        discriminator); methods add groups of their own (e.g. masks at their own learning rate)."""
        index = 0 if part == "G" else 1
        nets = [self.nets[direction[index]] for direction in self.directions()]
        return [{"params": list(itertools.chain.from_iterable(net.parameters() for net in nets))}]

    def masks_apart(self, groups: list[dict], masks: list[nn.Parameter]) -> list[dict]:
        """`groups` with the mask parameters `masks` taken out into a group of their own, at option
        mask_lr (0: lr) of a method that has it."""
        if not masks:
            return groups
        is_mask = {id(p) for p in masks}
        kept = [dict(group, params=[p for p in group["params"] if id(p) not in is_mask]) for group in groups]
        return kept + [{"params": masks, "lr": self.cfg.get("mask_lr") or self.cfg["lr"]}]

    def adam(self, groups: list[dict], lr: float | None = None) -> torch.optim.Optimizer:
        return torch.optim.Adam(groups, lr=lr or self.cfg["lr"], betas=(self.cfg["beta1"], self.cfg["beta2"]))

    # --- losses ---------------------------------------------------------------------------------

    def updates(self, part: str, step: int) -> bool:
        """The generators on every n_critic-th step of the base GAN (the last of each n_critic),
        everything else on every step."""
        return part != "G" or (step + 1) % self.objective.n_critic == 0

    def loss(self, part: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if part == "G":
            batch = self.prepare(batch)
            terms, fakes = self.objective.generator_terms(self.nets, batch)
            self._fakes.append((batch, {g: fake.detach() for g, fake in fakes.items()}))
        elif part == "D":
            if self._fakes:
                batch, fakes = self._fakes.popleft()
            elif not self.updates("G", step):
                batch = self.prepare(batch)
                with torch.no_grad():
                    fakes = {g: self.nets[g](*self.objective.generator_inputs(batch, g))
                             for g in self.objective.generators()}
            else:
                raise RuntimeError(f"{self.name}: the D loss judges the fakes of the G loss on the same batch; "
                                   "call loss('G', batch, step) first")
            terms = self.objective.discriminator_terms(self.nets, batch, self.objective.pool(fakes))
        else:
            raise ValueError(f"part must be 'G' or 'D', got {part!r}")
        return sum(terms.values()), {name: value.item() for name, value in terms.items()}

    # --- results and state ----------------------------------------------------------------------

    def prepare(self, batch: dict) -> dict:
        return self.objective.prepare(batch)

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        return self.objective.example_inputs(batch)

    def input_image(self, batch: dict) -> torch.Tensor | None:
        return self.objective.input_image(batch)

    def target_key(self) -> str | None:
        return self.objective.target_key

    def generate(self, batch: dict, net: nn.Module | None = None) -> torch.Tensor:
        # In the nets' current mode: pix2pix is evaluated with batch statistics and dropout, as
        # its paper does.
        net = self.student() if net is None else net
        return net(*self.objective.generator_inputs(self.prepare(batch)))

    def extra_state(self) -> dict:
        return {"objective": self.objective.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.objective.load_state_dict(state["objective"])
