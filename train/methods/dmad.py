"""Method `dmad`: DMAD, differentiable masks and co-attention distillation (../shared/papers/dmad.txt),
on CycleGAN (both directions) and pix2pix.

Stage 'search' (cfg steps): the students G and G_inv start as copies of the teacher generators
with a DMAD mask after the norm of every conv, before its activation (Eq. 3); D and D_inv start
as the teacher discriminators and keep training. The bound shrinks as Eq. 4 (to 0 at
`search_end` of the stage, the official code's 75%). G's loss is the dense method's (LSGAN +
cycle + identity, or vanilla GAN + L1; lambda_A / lambda_B / lambda_L1 are the paper's
lambda_SPE) plus
- L_SPA (Eq. 5) * lambda_spa; the masks on a residual stream take Eq. 6's group coefficients;
- L_co-ATT (Eq. 7-9) * lambda_coatt: the student's attention maps at `attention_layers` against
  the co-attention of the teacher, 1/2 (A of G_T + the mean of D_T's maps), D_T's maps resized to
  the generator's;
- L_FEA (Eq. 10) * lambda_fea: || D_T~(G_T(x)) - D_T~(G_S(x)) ||^2 per image at D_T's
  `feature_layer`, averaged over the batch.
The search ends early once the compact generators would have at most `target_macs` MACs.

Stage 'finetune' (cfg finetune_steps): the masks are binarised and gansparse.export.compact removes
the zero-masked channels; the compact students are fine-tuned with the same losses minus L_SPA
(Table IV's "Finetune") and the compact G is the method's result.

Where the paper is silent, the official code decides: D_T's co-attention maps are of the
student's output, with D_T layers weighted 1/4 each; the discriminators start from the teacher's.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import nn

import gansparse
from gansparse import export
from gansparse.functional import attention_distill_loss
from gansparse.masks import DMADMask, binarize_masks_, dmad_bound, mask_losses, mask_sparsity, set_dmad_bound_
from gansparse.models import load_reference_state_dict, residual_mask_groups
from gansparse.models.pix2pix import residual_blocks

from ..config import ConfigError
from ..distill import FeatureTaps, default_attention_layers, default_discriminator_layers, parse_layers
from ..teacher import load_teacher
from . import register
from .base import Stage
from .dense import Dense

__all__ = ["DMAD", "coattention_loss", "compact_student", "parse_macs"]

# The paper's hyper-parameters (Sec. IV-A3) per task family.
_CYCLEGAN = dict(model="cyclegan", netG="resnet_9blocks", norm="instance", dropout=False, gan_mode="lsgan",
                 pool_size=50, batch_size=1, load_size=286, crop_size=256,
                 lambda_A=10.0, lambda_B=10.0, lambda_spa=1e-3, lambda_coatt=100.0, lambda_fea=1e-4)
_PIX2PIX = dict(model="pix2pix", netG="unet_256", norm="batch", dropout=True, gan_mode="vanilla", pool_size=0,
                load_size=286, crop_size=256, lambda_L1=100.0, lambda_spa=1e-2, lambda_coatt=50.0, lambda_fea=1e-4)


@register
class DMAD(Dense):
    name = "dmad"
    defaults = dict(
        Dense.defaults,
        teacher="",
        lambda_spa=1e-3,
        lambda_coatt=100.0,
        lambda_fea=1e-4,
        search_end=0.75,
        mask_lr=0.0,
        finetune_steps=1000,
        target_macs="",
        macs_every=50,
        updown_loss="sparsity",
        updown_coeff=1.0,
        attention_layers="",
        d_attention_layers="",
        feature_layer="",
        coatt_reduction="sum",
    )
    presets = {
        # Tiny CycleGAN on the synthetic unpaired set, searched down to a quarter of the teacher's
        # MACs. Adam moves each mask parameter by about its learning rate per step, and the paper's
        # searches run hundreds of thousands of steps: a search of tens of steps needs a larger
        # mask learning rate and sparsity weight to get there.
        "smoke": dict(model="cyclegan", netG="resnet_3blocks", ngf=16, ndf=16, crop_size=32, load_size=32,
                      preprocess="none", steps=200, finetune_steps=100, batch_size=4, pool_size=16,
                      lambda_spa=0.1, mask_lr=0.05, target_macs="25%", macs_every=10, log_every=10,
                      sample_every=100, checkpoint_every=100, eval_size=32),
        # The same on the synthetic paired set, with pix2pix's U-Net (a smoke_pix2pix teacher).
        "smoke_pix2pix": dict(model="pix2pix", netG="unet_32", norm="batch", dropout=True, gan_mode="vanilla",
                              pool_size=0, ngf=16, ndf=16, crop_size=32, load_size=32, preprocess="none",
                              steps=200, finetune_steps=100, batch_size=4, lambda_spa=0.1, mask_lr=0.05,
                              lambda_coatt=50.0, target_macs="25%", macs_every=10, log_every=10, sample_every=100,
                              checkpoint_every=100, eval_size=32),
        # The paper's tasks; steps as the dense teacher's presets (the reference's epochs).
        "horse2zebra": dict(_CYCLEGAN, steps=266_800, finetune_steps=266_800),
        "summer2winter": dict(_CYCLEGAN, steps=246_200, finetune_steps=246_200),
        "edges2shoes": dict(_PIX2PIX, batch_size=4, steps=186_844, finetune_steps=186_844, no_flip=True),
        "cityscapes": dict(_PIX2PIX, batch_size=1, steps=595_000, finetune_steps=595_000, direction="BtoA"),
    }

    def __init__(self, cfg: dict, device: torch.device) -> None:
        if cfg["model"] not in ("cyclegan", "pix2pix"):
            raise ConfigError(f"dmad compresses the image-to-image models: option 'model' must be 'cyclegan' or "
                             f"'pix2pix', got {cfg['model']!r}")
        if cfg["updown_loss"] not in ("sparsity", "bound"):
            raise ConfigError(f"option 'updown_loss' must be 'sparsity' or 'bound', got {cfg['updown_loss']!r}")
        if not 0 < cfg["search_end"] <= 1:
            raise ConfigError(f"option 'search_end' must be in (0, 1], got {cfg['search_end']!r}")
        super().__init__(cfg, device)
        self.stage = "search"

    # --- structure --------------------------------------------------------------------------

    def build(self) -> None:
        teacher = load_teacher(self.cfg, self.device)
        self.objective = type(self.objective)(self.cfg, self.device)  # with the teacher's architecture
        for g, d in self.directions():
            # A copy of the teacher generator with a DMAD mask after the norm of every conv (Eq. 3).
            self.nets[g] = self.objective.build(g, mask="dmad")
            load_reference_state_dict(self.nets[g], teacher[g].state_dict())
            self.nets[g].to(self.device).train()
            self.nets[d] = copy.deepcopy(teacher[d]).requires_grad_(True)
            self.nets[g + "_T"], self.nets[d + "_T"] = teacher[g].eval(), teacher[d].eval()
        if self.cfg["updown_loss"] == "bound" and not residual_blocks(self.nets["G"]):
            raise ConfigError("option updown_loss='bound' applies to the ResNet generators only")
        self.teacher_macs = gansparse.profile(self.nets["G_T"], *self.example_inputs())["macs"]
        self.target_macs = parse_macs(self.cfg["target_macs"], self.teacher_macs)
        self._set_up_distillation()

    def _set_up_distillation(self) -> None:
        cfg = self.cfg
        for taps in getattr(self, "taps", {}).values():
            taps.close()
        self.taps = {}
        for g, d in self.directions():
            layers = parse_layers(cfg["attention_layers"]) or default_attention_layers(self.nets[g + "_T"])
            d_layers, feature_layer = default_discriminator_layers(self.nets[d + "_T"])
            d_layers = parse_layers(cfg["d_attention_layers"]) or d_layers
            feature_layer = cfg["feature_layer"] or feature_layer
            self.taps[g] = FeatureTaps(self.nets[g], layers + [""])  # '' keeps G's output too
            self.taps[g + "_T"] = FeatureTaps(self.nets[g + "_T"], layers)
            self.taps[d + "_T"] = FeatureTaps(self.nets[d + "_T"], d_layers + [feature_layer])

    def stages(self) -> list[Stage]:
        return [Stage("search", int(self.cfg["steps"])), Stage("finetune", int(self.cfg["finetune_steps"]))]

    def begin_stage(self, stage: Stage) -> None:
        self.stage = stage.name
        if stage.name != "finetune":
            return
        # The searched architecture is kept as a file, so a run resumed in this stage rebuilds it.
        searched = Path(self.cfg["out"]) / "search"
        searched.mkdir(parents=True, exist_ok=True)
        for g, _ in self.directions():
            path = searched / f"{g}.safetensors"
            if not path.exists():
                export.save(compact_student(self.nets[g], *self.example_inputs()), path)
            self.nets[g] = export.load(path).to(self.device).train()
        self._set_up_distillation()

    def parameter_groups(self, part: str) -> list[dict]:
        """Dense's, with the generators' masks in a group of their own at mask_lr (0: lr)."""
        groups = super().parameter_groups(part)
        if part != "G":
            return groups
        return self.masks_apart(groups, [p for g, _ in self.directions() for m in self.nets[g].modules()
                                         if isinstance(m, DMADMask) for p in m.parameters()])

    # --- losses -----------------------------------------------------------------------------

    def loss(self, part: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if part != "G":
            return super().loss(part, batch, step)
        for taps in self.taps.values():
            taps.reset()
        batch = self.prepare(batch)
        total, logs = super().loss(part, batch, step)  # runs each student on its input first
        terms = {}
        for g, d in self.directions():
            (real,) = self.objective.generator_inputs(batch, g)
            coatt, fea = self._distillation(g, d, real)
            terms[f"{g}_coatt"], terms[f"{g}_fea"] = coatt, fea
            if self.stage == "search":
                terms[f"{g}_spa"] = self._sparsity_loss(self.nets[g])
        for name, value in terms.items():
            logs[name] = value.item()
        return total + sum(terms.values()), logs

    def _distillation(self, g: str, d: str, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda_coatt L_co-ATT, lambda_fea L_FEA) of one direction, after the student's forward."""
        *student_features, fake = self.taps[g].outputs()
        with torch.no_grad():
            teacher_fake = self.nets[g + "_T"](real)
            g_teacher = self.taps[g + "_T"].outputs()
            *_, teacher_d_features = self._discriminator_features(d, real, teacher_fake)
        *d_features, student_d_features = self._discriminator_features(d, real, fake)
        coatt = coattention_loss(student_features, g_teacher, [f.detach() for f in d_features],
                                 self.cfg["coatt_reduction"])
        fea = (student_d_features - teacher_d_features).pow(2).flatten(1).sum(1).mean()
        return coatt * self.cfg["lambda_coatt"], fea * self.cfg["lambda_fea"]

    def _discriminator_features(self, d: str, real: torch.Tensor, fake: torch.Tensor) -> list[torch.Tensor]:
        """D_T's attention-layer outputs and feature-layer output on a generated image (conditioned
        on the input for pix2pix)."""
        taps = self.taps[d + "_T"]
        taps.reset()
        self.nets[d + "_T"](fake if self.cfg["model"] == "cyclegan" else torch.cat([real, fake], 1))
        return taps.outputs()

    def _sparsity_loss(self, G: nn.Module) -> torch.Tensor:
        """lambda_spa L_SPA (Eq. 5, Eq. 6 on residual groups); with updown_loss 'bound', the first
        conv's and the upsampling convs' masks take the official code's bound loss instead."""
        cfg = self.cfg
        spa = cfg["lambda_spa"] * mask_losses(G, residual_mask_groups(G))
        if cfg["updown_loss"] == "sparsity":
            return spa
        updown = _updown_masks(G)
        return (spa - cfg["lambda_spa"] * sum(m.sparsity_loss() for m in updown)
                + cfg["updown_coeff"] * sum(_bound_loss(m) for m in updown))

    # --- hooks ------------------------------------------------------------------------------

    def after_step(self, step: int) -> None:
        if self.stage != "search":
            return
        # The bound of the next step, Eq. 4 with e = step + 1 of the search's E steps.
        bound = dmad_bound(step + 1, max(int(self.cfg["steps"]), 1), self.cfg["search_end"])
        for g, _ in self.directions():
            set_dmad_bound_(self.nets[g], bound)

    def stage_done(self, step: int) -> bool:
        if self.stage != "search" or self.target_macs is None or (step + 1) % self.cfg["macs_every"]:
            return False
        return max(self.compact_macs(g) for g, _ in self.directions()) <= self.target_macs

    def compact_macs(self, g: str = "G") -> int:
        """MACs of the compact generator the masks of `g` give now."""
        inputs = self.example_inputs()
        return gansparse.profile(compact_student(self.nets[g], *inputs), *inputs)["macs"]

    def sparsity(self) -> dict[str, float]:
        return {f"{g}.{name}": value for g, _ in self.directions()
                for name, value in mask_sparsity(self.nets[g]).items()} if self.stage == "search" else {}

    def final_model(self) -> nn.Module:
        if self.stage == "finetune":
            return self.nets["G"]
        return compact_student(self.nets["G"], *self.example_inputs())

    # --- checkpoints ------------------------------------------------------------------------

    def extra_state(self) -> dict:
        return dict(super().extra_state(), stage=self.stage)

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.stage = state["stage"]


def coattention_loss(students: list[torch.Tensor], g_teachers: list[torch.Tensor], d_teachers: list[torch.Tensor],
                     reduction: str = "sum") -> torch.Tensor:
    """L_co-ATT / lambda_co-ATT (Eq. 7-9): sum over layers i of || A_S,i / ||A_S,i|| - A_T,i / ||A_T,i|| ||^2,
    with the co-attention A_T,i = 1/2 A(G_T layer i) + 1/2 mean over k of A(D_T layer k) (Eq. 8; the
    official code's weights 1/2, 1/4, 1/4 for two D layers), each D map resized to layer i's size.
    `reduction` 'sum' is Eq. 9's squared L2 distance per image, averaged over the batch; 'mean'
    averages over pixels too, as the official code does."""
    share = 0.5 / len(d_teachers)
    return attention_distill_loss(students, [[t, *d_teachers] for t in g_teachers],
                                  teacher_mix=[0.5] + [share] * len(d_teachers), reduction=reduction)


# --- MACs budget and compaction ---------------------------------------------------------------


def parse_macs(option: str, teacher_macs: int) -> int | None:
    """The MACs budget of option target_macs: '' (none), a count with an optional K/M/G suffix
    ('2.5G'), or a percentage of the teacher's MACs ('25%')."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([KMG%]?)\s*", option, re.IGNORECASE)
    if not option.strip():
        return None
    if match is None or float(match[1]) <= 0:
        raise ConfigError(f"option 'target_macs' must be a positive MAC count such as '2.5G' or '400M', or a "
                         f"percentage of the teacher's MACs such as '25%', got {option!r}")
    value, unit = float(match[1]), match[2].upper()
    if unit == "%":
        return int(teacher_macs * value / 100)
    return int(value * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[unit])


def compact_student(G: nn.Module, *example_inputs: torch.Tensor) -> nn.Module:
    """The compact generator of a masked student: masks binarised (on a copy), zero-masked channels
    removed (gansparse.export.compact, which traces G on the example inputs)."""
    return export.compact(binarize_masks_(copy.deepcopy(G)), *example_inputs)


def _updown_masks(G: nn.Module) -> list[DMADMask]:
    """The masks the official code gives its bound loss on a ResNet generator: the first conv's and
    the upsampling convs' (after the last residual block)."""
    layers = list(G.model)
    last_block = residual_blocks(G)[-1]
    return [m for layer in [layers[2], *layers[last_block + 1:]] for m in layer.modules() if isinstance(m, DMADMask)]


def _bound_loss(mask: DMADMask) -> torch.Tensor:
    """The official code's loss for the up/down masks: || b - |p| ||_2 over the in-bound p, pushing
    each mask towards 0 or 1 rather than towards 0."""
    b = mask._bound
    in_bound = (mask.p > -b) & (mask.p < b)  # none when b = 0: the loss is then 0
    return torch.linalg.vector_norm((b - mask.p.abs())[in_bound])

