"""Method `selfsup`: Self-Supervised GAN Compression (../shared/papers/self-supervised-gan-compression.txt),
fine-grained pruning of a trained generator supervised by its own pretrained discriminator, on any
base GAN of train/objectives (option `model`; every direction of CycleGAN is compressed).

Networks (Table 1 (b)):
- G_o, the teacher generators G_T (and G_inv_T), frozen;
- G_c, the students G (and G_inv): copies of the teacher generators with every conv and deconv a
  gansparse.SparseConv2d / SparseConvTranspose2d (a weight mask);
- D_o, the teacher's discriminators D (and D_inv), which keep training with the base objective's
  D loss on the students' samples (through its history pools, if any), as the dense method does;
  a base GAN with n_critic > 1 (StarGAN) updates the students on every n_critic-th step only, D_o
  on every step.

G's loss (Eq. 9): L = L_GC + lambda_dc * L_DC, both the weighted normalised distance
sum_t w_t |l_t(o) - l_t(c)| / |l_t(o)| (consistency_loss) between a loss term computed with the
original model and with the compressed one, on the same data and random draws:
- L_GC (Eq. 7) over the base objective's generator terms, G_o's against G_c's (e.g. the GAN terms,
  CycleGAN's cycle and identity terms, pix2pix's L1 term);
- L_DC (Eq. 8) over the base objective's discriminator terms, D_o's on G_o's samples against on
  G_c's (e.g. the real/fake loss, a classification term, a gradient penalty).
The paper weighs the terms by "the same values used in the original baseline" (alpha, beta and
delta of Eq. 7-8 are StarGAN's lambda_cls, lambda_rec and lambda_gp), so the weights are the base
objective's own (Objective.generator_weights / discriminator_weights).

Pruning (Sec. 5): magnitude pruning at `granularity` on the AGP schedule, from 5% after the first
step to `sparsity` halfway through training, every `prune_frequency` steps
(gansparse.prune.AGPPruner.self_supervised_gan_compression). An N:M granularity has one fixed
sparsity, 1 - N/M, and is pruned once when the students are built, in every layer whose input
channels split into groups of M (the others, such as a first conv on RGB images, stay dense).

Training length: 10% of the dense teacher's schedule in the paper's presets (Sec. 5). The result
(final_model) is gansparse.sparsify of the student G: each layer runs the sparse kernel where it
measured faster than the dense conv.
"""
from __future__ import annotations

import copy
import re
import torch
from torch import nn

import gansparse
from gansparse.prune import GRANULARITIES, AGPPruner, magnitude_
from gansparse.sparse import SPARSE_LAYERS, convert

from ..config import ConfigError
from ..teacher import load_teacher
from . import register
from .dense import Dense

__all__ = ["SelfSup", "consistency_loss", "sparse_student"]

#: the paper's tasks; each preset is the dense preset with a tenth of its steps
PAPER_TASKS = ("horse2zebra", "summer2winter", "edges2shoes", "cityscapes", "mnist", "rafd", "div2k")


@register
class SelfSup(Dense):
    name = "selfsup"
    defaults = dict(
        Dense.defaults,
        teacher="",
        sparsity=0.5,
        granularity="element",
        prune_frequency=100,
        lambda_dc=0.5,
    )
    presets = {
        # Tiny CycleGAN on the synthetic unpaired set (a `--method dense --preset smoke` teacher),
        # at its target sparsity after 30 of 60 steps.
        "smoke": dict(model="cyclegan", netG="resnet_3blocks", ngf=16, ndf=16, crop_size=32, load_size=32,
                      preprocess="none", steps=60, batch_size=4, pool_size=16, prune_frequency=5, log_every=10,
                      sample_every=100, checkpoint_every=30, eval_size=32),
        # The same with pix2pix's U-Net on the synthetic paired set (a smoke_pix2pix teacher).
        "smoke_pix2pix": dict(model="pix2pix", netG="unet_32", norm="batch", dropout=True, gan_mode="vanilla",
                              pool_size=0, ngf=16, ndf=16, crop_size=32, load_size=32, preprocess="none", steps=60,
                              batch_size=4, prune_frequency=5, log_every=10, sample_every=100, checkpoint_every=30,
                              eval_size=32),
        # Tiny DCGAN on the synthetic unconditional set (a smoke_dcgan teacher).
        "smoke_dcgan": dict(model="dcgan", nz=16, ngf=8, ndf=8, crop_size=64, load_size=64, preprocess="none",
                            steps=60, batch_size=8, lr=2e-4, beta1=0.5, lr_policy="constant", prune_frequency=5,
                            log_every=10, sample_every=100, checkpoint_every=30, eval_size=32),
        # Tiny StarGAN on the synthetic class-conditional set (a smoke_stargan teacher); G is
        # updated every 5th step (n_critic), the pruning schedule runs over every step.
        "smoke_stargan": dict(model="stargan", g_conv_dim=8, d_conv_dim=8, g_repeat_num=2, d_repeat_num=3,
                              crop_size=32, load_size=32, preprocess="none", num_classes=4, n_critic=5, steps=60,
                              batch_size=4, lr=1e-4, beta1=0.5, prune_frequency=5, log_every=10, sample_every=100,
                              checkpoint_every=30, eval_size=32),
        # Tiny SRGAN x4 on the synthetic unconditional set (a smoke_srgan teacher), its weights.
        "smoke_srgan": dict(model="srgan", num_feat=16, num_block=4, num_feat_D=16, crop_size=32, load_size=32,
                            preprocess="none", pixel_weight=1.0, percep_weight=0.0, steps=60, batch_size=4, lr=1e-4,
                            beta1=0.9, beta2=0.99, lr_policy="constant", prune_frequency=5, log_every=10,
                            sample_every=100, checkpoint_every=30, eval_size=32),
        **{task: dict(Dense.presets[task], steps=Dense.presets[task]["steps"] // 10) for task in PAPER_TASKS},
    }

    def __init__(self, cfg: dict, device: torch.device) -> None:
        granularity = cfg["granularity"]
        n_m = re.fullmatch(r"(\d+):(\d+)", granularity)
        if granularity not in ("element", "kernel", "filter") and n_m is None:
            raise ConfigError(f"option 'granularity' must be one of {GRANULARITIES}, got {granularity!r}")
        if not 0 <= cfg["sparsity"] < 1:
            raise ConfigError(f"option 'sparsity' must be in [0, 1), got {cfg['sparsity']!r}")
        if n_m is not None and abs(cfg["sparsity"] - (1 - int(n_m[1]) / int(n_m[2]))) > 1e-9:
            fixed = 1 - int(n_m[1]) / int(n_m[2])
            raise ConfigError(f"granularity {granularity!r} prunes to sparsity 1 - N/M = {fixed:g}; pass "
                             f"--sparsity {fixed:g}, got sparsity={cfg['sparsity']!r}")
        if cfg["prune_frequency"] < 1:
            raise ConfigError(f"option 'prune_frequency' must be >= 1, got {cfg['prune_frequency']!r}")
        if cfg["lambda_dc"] < 0:
            raise ConfigError(f"option 'lambda_dc' must be >= 0, got {cfg['lambda_dc']!r}")
        super().__init__(cfg, device)
        #: M of an N:M granularity, pruned once; None for the granularities pruned on the AGP schedule
        self.group_size = int(n_m[2]) if n_m else None

    # --- structure --------------------------------------------------------------------------

    def build(self) -> None:
        cfg = self.cfg
        model = cfg["model"]
        teacher = load_teacher(cfg, self.device)  # copies the teacher run's architecture into cfg
        if cfg["model"] != model:
            raise ConfigError(f"the teacher in {cfg['teacher']} is a {cfg['model']} model, but the options are "
                             f"for {model}: pass the matching --preset (e.g. smoke_{cfg['model']}) or --model")
        self.objective = type(self.objective)(cfg, self.device)  # with the teacher's architecture
        for g, d in self.directions():
            # The teacher runs in the students' (training) mode: pix2pix's generators are defined
            # with batch statistics and dropout, so that is the model whose loss terms G_c matches.
            self.nets[g + "_T"] = teacher[g].train()
            self.nets[g] = sparse_student(teacher[g]).to(self.device)
            self.nets[d] = teacher[d].requires_grad_(True).train()
        students = [self.nets[g] for g, _ in self.directions()]
        if self.group_size is not None:
            self.pruners = []
            for layer in (m for student in students for m in student.modules() if _n_m_fits(m, self.group_size)):
                magnitude_(layer, cfg["sparsity"], cfg["granularity"])
        else:
            self.pruners = [AGPPruner.self_supervised_gan_compression(
                student, int(cfg["steps"]), cfg["sparsity"], frequency=cfg["prune_frequency"],
                granularity=cfg["granularity"]) for student in students]

    def original_nets(self) -> dict[str, nn.Module]:
        """The base GAN with the teacher's generators (and the same, training, discriminators)."""
        return dict(self.nets, **{g: self.nets[g + "_T"] for g, _ in self.directions()})

    # --- losses -----------------------------------------------------------------------------

    def loss(self, part: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if part != "G":
            return super().loss(part, batch, step)  # D_o's own loss on the students' samples
        batch = self.prepare(batch)  # the original and the compressed model see the same draws
        objective = self.objective
        g_compressed, fakes_compressed = objective.generator_terms(self.nets, batch)
        self._fakes.append((batch, {g: fake.detach() for g, fake in fakes_compressed.items()}))  # for D's loss
        with torch.no_grad():
            g_original, fakes_original = objective.generator_terms(self.original_nets(), batch)
        # Eq. 8 compares D's loss terms on the two models' samples; D's weights get no gradient here
        # (the loop updates G's parameters only), but G_c's samples do.
        with torch.enable_grad():
            d_original = {t: v.detach() for t, v in
                          objective.discriminator_terms(self.nets, batch, fakes_original).items()}
        d_compressed = objective.discriminator_terms(self.nets, batch, fakes_compressed)
        gc = consistency_loss(g_original, g_compressed, objective.generator_weights())
        dc = consistency_loss(d_original, d_compressed, objective.discriminator_weights())
        logs = {"GC": gc.item(), "DC": dc.item(), **{name: value.item() for name, value in g_compressed.items()}}
        return gc + self.cfg["lambda_dc"] * dc, logs

    # --- hooks ------------------------------------------------------------------------------

    def after_step(self, step: int) -> None:
        for pruner in self.pruners:
            pruner.step()

    def sparsity(self) -> dict[str, float]:
        """{'<generator>.<layer>': fraction of the layer's weights pruned} over the students, plus
        'overall' over all their weights."""
        report, pruned, total = {}, 0, 0
        for g, _ in self.directions():
            for name, layer in self.nets[g].named_modules():
                if isinstance(layer, SPARSE_LAYERS):
                    kept = int(layer.weight_mask.count_nonzero())
                    report[f"{g}.{name}"] = 1 - kept / layer.weight_mask.numel()
                    pruned += layer.weight_mask.numel() - kept
                    total += layer.weight_mask.numel()
        report["overall"] = pruned / total
        return report

    def final_model(self) -> nn.Module:
        """The student G prepared for sparse inference (gansparse.sparsify on a copy, each layer's
        form timed at the preset's resolution), in eval mode."""
        return gansparse.sparsify(copy.deepcopy(self.nets["G"]), *self.example_inputs()).eval()

    # --- checkpoints ------------------------------------------------------------------------

    def extra_state(self) -> dict:
        return dict(super().extra_state(), pruners=[pruner.state_dict() for pruner in self.pruners])

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        for pruner, pruner_state in zip(self.pruners, state["pruners"], strict=True):
            pruner.load_state_dict(pruner_state)


# --- the loss ----------------------------------------------------------------------------------


def consistency_loss(losses_original: dict[str, torch.Tensor], losses_compressed: dict[str, torch.Tensor],
                     weights: dict[str, float], eps: float = 1e-8) -> torch.Tensor:
    """The weighted normalised distance of Eq. 7 (L_GC, on generator terms) and Eq. 8 (L_DC, on
    discriminator terms): sum over the terms t of `weights` of
        weights[t] * |losses_original[t] - losses_compressed[t]| / |losses_original[t]|,
    each loss a scalar tensor. The denominator is at least `eps`, so an original term of exactly 0
    gives a large but finite distance."""
    missing = [t for t in weights if t not in losses_original or t not in losses_compressed]
    if missing:
        raise ValueError(f"consistency_loss: no loss term {missing} in both the original losses "
                         f"{sorted(losses_original)} and the compressed ones {sorted(losses_compressed)}")
    if not weights:
        raise ValueError("consistency_loss: weights is empty; it names the loss terms to compare")
    return sum(weight * (losses_original[t] - losses_compressed[t]).abs() / losses_original[t].abs().clamp_min(eps)
               for t, weight in weights.items())


def _n_m_fits(layer: nn.Module, m: int) -> bool:
    """Whether `layer` is a sparse layer whose input channels split into groups of M (N:M pruning
    leaves the others, e.g. a first conv reading 3 image channels, dense)."""
    return isinstance(layer, SPARSE_LAYERS) and layer.weight.shape[0 if layer.transposed else 1] % m == 0


def sparse_student(generator: nn.Module) -> nn.Module:
    """G_c: a trainable copy of `generator` with every conv and deconv a gansparse sparse layer
    (mask all ones for a dense generator)."""
    return convert(copy.deepcopy(generator)).requires_grad_(True).train()
