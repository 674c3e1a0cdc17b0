"""Method `ppcd`: PPCD-GAN, progressive pruning and class-aware distillation of a class-conditional
GAN (../shared/papers/ppcd-gan.txt), on the 'biggan' base GAN (train/objectives/biggan.py).

Networks. The student G is an SA-GAN generator (option biggan_config 'sagan', widths G_ch) whose
residual blocks are PP-Res blocks (Sec. 3.2, models.biggan.GBlock with ppres): a learnable sigmoid
mask after conv1's class-conditional BN (before its ReLU, in the fused norm + mask + ReLU op) and
one on conv2's outputs, then a 1x1 transition conv (starting as the identity) before the residual
sum. The teacher G_T is a BigGAN generator (option `teacher`: a `--method dense --model biggan` run,
one of its checkpoints, or a directory with BigGAN-PyTorch's G_ema.pth and D.pth), frozen in eval
mode. D is a fresh SA-GAN projection discriminator (widths D_ch): the paper trains every network
from scratch except the teacher, and BigGAN's D (D_ch 96) is not SA-GAN's (D_ch 64). Student and
teacher read the same z and class ids; the student's dim_z is the teacher's (the paper's SA-GAN
takes 128 and BigGAN 120, but attention maps only compare on the same latent).

Loss of G (Eq. 8): L_adv (Eq. 7, the hinge loss of the objective) + lambda_pp L_pp + lambda_cad L_cad.
- L_pp (Eq. 2, 5): the L1 norm of every mask still training (sum of the sigmoid values). Its weight
  is small so the masks do not converge too quickly; the value is unreadable in the paper, ours is
  a choice (lambda_pp).
- L_cad (Eq. 4, 6): at the outputs of blocks `distill_blocks` (1-based; the paper's 2 to 5 of 5),
  the mean over those blocks of || A_S / ||A_S|| - A_T / ||A_T|| ||^2 per image, averaged over the
  batch, with A = sum over channels of f^2 (Zagoruyko & Komodakis) and A_T taken on the teacher's
  block output after class-conditional normalisation. The paper does not say which normalisation:
  we take the teacher's own, the class-conditional BN that reads that feature in the teacher (the
  next block's bn1, in eval mode, without its ReLU), and BigGAN's output BN after the last block,
  which has no class-conditional one (option cad_norm 'teacher'; 'none' distils the raw maps).
  Squared and summed over pixels is our reading of the lost Eq. 4.

Masks (Eq. 1, 3; gansparse.masks.SigmoidMask): m = sigmoid(temperature * logits), logits from 0.
The temperature is unreadable in the paper; 5 (the mask's default) takes m from the pivot 0.005 to
0.995 over logits in [-1.06, 1.06]. After every step the binarization trick runs on each mask:
once the fraction r of its values <= pivot exceeds `ratio`, the values above the pivot become 1,
the others 0, and the mask stops updating (its logits get no more gradient). The paper trains a
fixed schedule, and so does this method by default; stop_when_pruned ends the run as soon as every
mask is binarised (the smoke preset). The masks train at mask_lr (0: lr).

Result: final_model() is gansparse.export.compact of the student with every mask binarised (those
that never reached the ratio by the pivot rule): the masked channels and the mask layers are gone.
The report adds Table 1's other measures: the CPU time of teacher and student per batch of
`latency_batch` images (64), and their LPIPS diversity (mean LPIPS between images of one class,
averaged over the classes) when the backbone weights are there; IS and FID come from the loop's
evaluation (torch-fidelity, with the Inception weights). Class-conditional sample grids of both
(one row per class, one latent per column) go to samples/classes_{teacher,student}.png.

Schedule (Sec. 4.2): Adam, 100 epochs with the learning rate divided by 10 at epochs 30, 60 and 90,
batch 128 with 2 gradient accumulations (256). The paper's initial learning rate reads 0.1, which
no Adam-trained SA-GAN survives; the imagenet128 preset takes BigGAN-PyTorch's 1e-4 and betas
(0, 0.999) instead.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from gansparse import export
from gansparse.functional import attention_distill_loss
from gansparse.masks import SigmoidMask, binarize_masks_, mask_losses, named_masks
from gansparse.metrics import cpu_latency_ms, lpips_distance
from gansparse.models import biggan

from ..config import ConfigError
from ..distill import FeatureTaps
from ..objectives import get_objective
from ..report import save_image_grid
from ..teacher import load_teacher
from . import register
from .dense import Dense

__all__ = ["PPCD", "ClassAwareTaps", "block_output_readers", "class_aware_distill_loss", "class_grid",
           "lpips_diversity", "parse_blocks"]

# ImageNet: 1,281,167 training images; an epoch is 5005 steps of 256.
_IMAGENET_EPOCH = 1_281_167 // 256 + 1


@register
class PPCD(Dense):
    name = "ppcd"
    defaults = dict(
        Dense.defaults,
        model="biggan",
        biggan_config="sagan",
        G_ch=64,
        D_ch=64,
        teacher="",
        teacher_G_ch=96,
        teacher_D_ch=96,
        ratio=0.5,
        pivot=0.005,
        temperature=5.0,
        mask_lr=0.0,
        lambda_pp=1e-3,
        lambda_cad=1.0,
        distill_blocks="2,3,4,5",
        cad_norm="teacher",
        stop_when_pruned=False,
        latency_batch=64,
    )
    presets = {
        # Tiny SA-GAN student of a smoke_biggan teacher (`--method dense --preset smoke_biggan`) on
        # the synthetic class-conditional set at 32x32 (3 blocks). A run of tens of steps needs a
        # far larger mask learning rate and pruning weight than the paper's to reach the ratio.
        "smoke": dict(crop_size=32, load_size=32, preprocess="none", G_ch=4, D_ch=4, G_attn="16", D_attn="16",
                      distill_blocks="2,3", steps=200, batch_size=8, accumulation=2, lr=2e-4, beta1=0.0,
                      lr_policy="constant", mask_lr=0.1, lambda_pp=0.5, stop_when_pruned=True, log_every=10,
                      sample_every=100, checkpoint_every=50, eval_size=16),
        # The paper's setting: ImageNet at 128x128, SA-GAN student (G_ch 64), BigGAN teacher; the
        # data path (an ImageNet train/ folder of class folders) is the user's --dataroot.
        "imagenet128": dict(crop_size=128, load_size=128, preprocess="resize_and_crop", num_classes=1000,
                            G_ch=64, D_ch=64, G_attn="64", D_attn="64", distill_blocks="2,3,4,5",
                            steps=100 * _IMAGENET_EPOCH, batch_size=256, accumulation=2, lr=1e-4, beta1=0.0,
                            beta2=0.999, lr_policy="step", lr_step_size=30 * _IMAGENET_EPOCH, lr_gamma=0.1,
                            checkpoint_every=2000, sample_every=2000, log_every=100),
    }

    def __init__(self, cfg: dict, device: torch.device) -> None:
        if cfg["model"] != "biggan":
            raise ConfigError(f"ppcd compresses model 'biggan' only, got model={cfg['model']!r}")
        if cfg["cad_norm"] not in ("teacher", "none"):
            raise ConfigError(f"option 'cad_norm' must be 'teacher' or 'none', got {cfg['cad_norm']!r}")
        for name in ("lambda_pp", "lambda_cad", "mask_lr", "latency_batch"):
            if cfg[name] < 0:
                raise ConfigError(f"option {name!r} must be >= 0, got {cfg[name]!r}")
        if not 0 <= cfg["ratio"] < 1:
            raise ConfigError(f"option 'ratio' (the compression ratio threshold) must be in [0, 1), "
                              f"got {cfg['ratio']!r}")
        if not 0 < cfg["pivot"] < 1:
            raise ConfigError(f"option 'pivot' must be in (0, 1), got {cfg['pivot']!r}")
        if not cfg["temperature"] > 0:
            raise ConfigError(f"option 'temperature' must be positive, got {cfg['temperature']!r}")
        super().__init__(cfg, device)

    # --- structure --------------------------------------------------------------------------

    def build(self) -> None:
        cfg = self.cfg
        # The teacher's architecture: its run's config.yaml, else BigGAN with the teacher_* widths.
        teacher_cfg = dict(cfg, biggan_config="biggan", G_ch=cfg["teacher_G_ch"], D_ch=cfg["teacher_D_ch"])
        teacher = load_teacher(teacher_cfg, self.device, names=("G",))["G"]  # D is trained afresh
        teacher_objective = get_objective("biggan")(teacher_cfg, self.device)
        cfg.update(teacher_G_ch=teacher_cfg["G_ch"], teacher_D_ch=teacher_cfg["D_ch"], dim_z=teacher_objective.dim_z,
                   crop_size=teacher_cfg["crop_size"], num_classes=teacher_cfg["num_classes"],
                   shared_dim=teacher_cfg["shared_dim"])
        self.objective = get_objective("biggan")(cfg, self.device)  # the student's, on the settled options
        distilled = parse_blocks(cfg["distill_blocks"], len(teacher.blocks))
        mask_options = dict(temperature=cfg["temperature"], pivot=cfg["pivot"], compression_threshold=cfg["ratio"])
        self.nets["G"] = biggan.Generator(**self.objective.generator_kwargs(), mask="sigmoid",
                                          mask_options=mask_options, ppres=True).to(self.device)
        self.nets["D"] = self.objective.build("D").to(self.device)
        self.nets["G_T"] = teacher.eval()
        readers = [block_output_readers(net) for net in (self.nets["G"], teacher)]
        self.student_taps = FeatureTaps(self.nets["G"], [readers[0][i] + ":in" for i in distilled])
        self.teacher_taps = ClassAwareTaps(teacher, [readers[1][i] for i in distilled],
                                           normalise=cfg["cad_norm"] == "teacher")

    def parameter_groups(self, part: str) -> list[dict]:
        """G's weights at lr, its masks' logits at mask_lr (0: lr); D as the dense method."""
        groups = super().parameter_groups(part)
        if part != "G":
            return groups
        return self.masks_apart(groups, [mask.logits for _, mask in named_masks(self.nets["G"])])

    # --- losses -----------------------------------------------------------------------------

    def loss(self, part: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if part != "G":
            return super().loss(part, batch, step)
        batch = self.prepare(batch)  # the student's and the teacher's z and classes
        self.student_taps.reset()
        adversarial, logs = super().loss(part, batch, step)
        with torch.no_grad():
            self.teacher_taps.reset()
            self.nets["G_T"](*self.objective.generator_inputs(batch))
        terms = {"cad": self.cfg["lambda_cad"] * class_aware_distill_loss(self.student_taps.outputs(),
                                                                          self.teacher_taps.outputs()),
                 "pp": self.cfg["lambda_pp"] * mask_losses(self.nets["G"])}
        logs.update({name: value.item() for name, value in terms.items()})
        return adversarial + sum(terms.values()), logs

    # --- hooks ------------------------------------------------------------------------------

    def _masks(self) -> list[SigmoidMask]:
        return [mask for _, mask in named_masks(self.nets["G"])]

    def after_step(self, step: int) -> None:
        for mask in self._masks():
            mask.apply_binarization_trick_()

    def stage_done(self, step: int) -> bool:
        return self.cfg["stop_when_pruned"] and all(mask.frozen for mask in self._masks())

    def sparsity(self) -> dict[str, float]:
        """Per mask, its compression ratio r (the fraction of values <= pivot; once binarised, the
        fraction of removed channels), and 'overall' over every channel."""
        masks = dict(named_masks(self.nets["G"]))
        ratios = {name: mask.compression_ratio() for name, mask in masks.items()}
        channels = sum(mask.channels for mask in masks.values())
        ratios["overall"] = sum(ratios[name] * mask.channels for name, mask in masks.items()) / channels
        return ratios

    # --- results ----------------------------------------------------------------------------

    def final_model(self) -> nn.Module:
        """The compact student: a copy with every mask binarised (by the pivot rule if it has not
        reached the ratio), without the masked channels and the mask layers (on the CPU)."""
        student = binarize_masks_(copy.deepcopy(self.nets["G"])).cpu()
        return export.compact(biggan.exportable(student), *(x.cpu() for x in self.example_inputs(1)))

    def extend_report(self, report: dict, run_dir: Path) -> None:
        """Table 1's measures beside the loop's: the CPU time in seconds of teacher and student (the
        final model) per batch of latency_batch images ('cpu_s_per_batch_64' in both entries), the
        LPIPS diversity of each (with cfg eval and eval_lpips, when the backbone weights are
        there), and class-conditional sample grids of both (samples/classes_{teacher,student}.png)."""
        cfg = self.cfg
        nets = {"teacher": copy.deepcopy(self.nets["G_T"]).cpu().eval(), "student": self.final_model()}
        if cfg["latency_batch"] > 0:
            key = f"cpu_s_per_batch_{cfg['latency_batch']}"
            inputs = tuple(x.cpu() for x in self.objective.example_inputs(cfg["latency_batch"]))
            for name, net in nets.items():
                report[name][key] = cpu_latency_ms(net, *inputs, threads=cfg["latency_threads"], warmup=1,
                                                   repeats=3) / 1000
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg["seed"])
            z = torch.randn(8, self.objective.dim_z)
            report["class_grids"] = {}
            for name, net in nets.items():
                path = run_dir / "samples" / f"classes_{name}.png"
                path.parent.mkdir(exist_ok=True)
                save_image_grid(class_grid(net, z, self.objective.n_classes), path, nrow=len(z))
                report["class_grids"][name] = str(path)
            if cfg["eval"] and cfg["eval_lpips"]:
                for name, net in nets.items():
                    diversity = lpips_diversity(net, self.objective.dim_z, self.objective.n_classes, cfg["eval_size"])
                    metrics = report["metrics"] if name == "student" else report[name].setdefault("metrics", {})
                    if diversity is not None:
                        metrics["lpips_diversity"] = diversity


# --- pieces ---------------------------------------------------------------------------------


def parse_blocks(option: str, count: int) -> list[int]:
    """0-based indices of the distilled blocks from option distill_blocks, 1-based ('2,3,4,5')."""
    try:
        blocks = sorted({int(part) for part in option.split(",") if part.strip()})
    except ValueError:
        blocks = []
    if not blocks or not all(1 <= b <= count for b in blocks):
        raise ConfigError(f"option 'distill_blocks' must list block numbers in [1, {count}] (the generator has "
                          f"{count} blocks), such as '2,3', got {option!r}")
    return [b - 1 for b in blocks]


def block_output_readers(G: biggan.Generator) -> list[str]:
    """Per block of G, the module whose first input is that block's output (after its
    self-attention, if any): the next block's class-conditional BN bn1, and G's output BN after
    the last block. In the teacher, that module is the (class-conditional) normalisation of the
    feature."""
    return [f"blocks.{i + 1}.0.bn1" for i in range(len(G.blocks) - 1)] + ["output_layer.0"]


class ClassAwareTaps:
    """The teacher side of class-aware distillation: the inputs of the modules named `readers`
    (each a norm called as norm(x, y, ...) or norm(x)) on the first forward after reset(), and
    outputs() = norm(x, y) without activation, i.e. the feature normalised with the condition the
    model gives it there (normalise=False: x itself). Call under torch.no_grad(): the targets
    carry no gradient."""

    def __init__(self, model: nn.Module, readers: list[str], normalise: bool = True) -> None:
        modules = dict(model.named_modules())
        missing = [name for name in readers if name not in modules]
        if missing:
            raise ValueError(f"{type(model).__name__} has no module named {missing}")
        self.readers, self.normalise = [modules[name] for name in readers], normalise
        self._inputs: dict[int, tuple] = {}
        self._handles = [module.register_forward_pre_hook(self._keeper(index))
                         for index, module in enumerate(self.readers)]

    def _keeper(self, index: int):
        def keep(_module, args):
            self._inputs.setdefault(index, args)
        return keep

    def reset(self) -> None:
        self._inputs.clear()

    def outputs(self) -> list[torch.Tensor]:
        if len(self._inputs) != len(self.readers):
            raise RuntimeError("no input recorded for some readers: run the model after reset()")
        return [reader(*self._inputs[i]) if self.normalise else self._inputs[i][0]
                for i, reader in enumerate(self.readers)]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._inputs.clear()


def class_aware_distill_loss(students: list[torch.Tensor], teachers: list[torch.Tensor]) -> torch.Tensor:
    """L_cad (Eq. 4, 6) over K blocks: 1/K sum_k of || A(s_k) - A(t_k) ||^2 per image (summed over
    pixels), averaged over the batch, A(f) = sum_c f_c^2 flattened and L2-normalised per image.
    `teachers` are the teacher's features already class-conditionally normalised (ClassAwareTaps)."""
    if not students:
        raise ValueError("students must hold at least one feature")
    weights = [1.0 / len(students)] * len(students)
    return attention_distill_loss(students, list(teachers), p=2.0, weights=weights, reduce="sum", reduction="sum")


@torch.no_grad()
def lpips_diversity(G: nn.Module, dim_z: int, n_classes: int, samples: int, max_classes: int = 100) -> float | None:
    """The paper's diversity score: per class, the mean LPIPS distance between pairs of images of
    that class from independent latents, averaged over the classes (the first max_classes), with
    about `samples` images in all (at least one pair per class). None when the LPIPS backbone
    weights are missing (gansparse.metrics.lpips_distance warns once)."""
    classes = min(n_classes, max_classes)
    pairs = max(1, samples // (2 * classes))
    scores = []
    for c in range(classes):
        ids = torch.full((pairs,), c, dtype=torch.int64)
        first, second = G(torch.randn(pairs, dim_z), ids), G(torch.randn(pairs, dim_z), ids)
        distance = lpips_distance(first.clamp(-1, 1), second.clamp(-1, 1))
        if distance is None:
            return None
        scores.append(distance.item())
    return sum(scores) / len(scores)


@torch.no_grad()
def class_grid(G: nn.Module, z: torch.Tensor, n_classes: int, max_classes: int = 16) -> torch.Tensor:
    """Images [rows * columns, 3, H, W] in [-1, 1] of G in eval mode: row c holds class c
    (the first max_classes classes), column j the latent z[j], so rows compare classes at the same
    latents."""
    was_training = G.training
    G.eval()
    try:
        rows = [G(z, torch.full((len(z),), c, dtype=torch.int64)) for c in range(min(n_classes, max_classes))]
    finally:
        G.train(was_training)
    return torch.cat(rows).clamp(-1, 1)
