"""Learnable per-channel masks for channel pruning, and the helpers that train and binarise them.

A mask is an nn.Module with its own parameters whose `values()` is a [C] tensor multiplied with
the C output channels of a layer (after its norm and affine, before its activation, see
gansparse.functional.masked_conv_norm_act). Channels whose value ends at 0 are removed at export.

Kinds (`make_mask(kind, channels)`):
- 'sigmoid' (PPCD-GAN, Sec. 3.2, Eq. 1-3): m = sigmoid(temperature * logits), an L1 sparsity loss
  on m, and the binarization trick that snaps m to {0, 1} and freezes it once enough channels are
  near 0.
- 'dmad' (DMAD, Sec. III-B, Eq. 3-6): the quadratic mask m = f(p; b) of a learnable input p with a
  bound b that shrinks to 0 during training (Eq. 4), the sparsity loss sum |p + b| (Eq. 5), and the
  adaptive cross-block group coefficients for masks on one residual stream (Eq. 6).
- 'hard': a fixed 0/1 mask.

Every mask can be binarised and frozen (`binarize_()`): its values become a 0/1 buffer, which no
optimiser step changes, and it stops producing a sparsity loss.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

# --- DMAD: the quadratic mask and its bound schedule --------------------------------------------


def dmad_mask(p: torch.Tensor, bound: float | torch.Tensor) -> torch.Tensor:
    """The differentiable mask of DMAD Eq. 3, elementwise:

        m = 0                          if p <= -b
        m = 1/2 * ((p + b) / b)^2      if -b < p <= 0   (convex)
        m = 1 - 1/2 * ((p - b) / b)^2  if 0 < p < b     (concave)
        m = 1                          if p >= b

    The pieces meet exactly: m(-b) = 0, m(0) = 1/2, m(b) = 1, and the slope is continuous too
    (0 at -b and b, 1/b on both sides of 0). With b = 0 the first case wins at p = 0, so the mask
    is the step function m = [p > 0], which has no gradient: zero masks no longer update.

    bound: b >= 0, a number or a 0-dim tensor. It is a schedule value (Eq. 4), not learned, so no
    gradient flows into it.
    """
    b = float(bound)
    if b < 0:
        raise ValueError(f"bound must be >= 0, got {b}")
    if b == 0:
        return (p > 0).to(p.dtype)
    # q = p / b clamped to [-1, 1] covers the two saturated cases: both pieces are flat there.
    q = (p / b).clamp(-1.0, 1.0)
    return torch.where(q <= 0, 0.5 * (q + 1) ** 2, 1 - 0.5 * (1 - q) ** 2)


def dmad_bound(step: float, total_steps: float, search_end: float = 0.75, power: float = 1 / 3) -> float:
    """The bound b of DMAD Eq. 4 at training step `step`:

        b = 1 - (step / (search_end * total_steps)) ** power,  and 0 after search_end * total_steps.

    The paper writes b = 1 - (e / E)^(1/3) over the whole training (search_end=1.0). The official
    code ends the architecture search at 75% of training and fine-tunes the found architecture
    with b = 0 (the step mask) for the rest, which is the default here. power=1/3 is the paper's
    cube root: it shrinks b faster than linearly early on.
    """
    if not total_steps > 0:
        raise ValueError(f"total_steps must be positive, got {total_steps!r}")
    if not 0 < search_end <= 1:
        raise ValueError(f"search_end must be in (0, 1], got {search_end!r}")
    if not power > 0:
        raise ValueError(f"power must be positive, got {power!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    search_steps = search_end * total_steps
    if step >= search_steps:
        return 0.0
    return 1.0 - (step / search_steps) ** power


# --- mask modules --------------------------------------------------------------------------------


class Mask(nn.Module):
    """A per-channel mask over `channels` channels. Subclasses define the trainable mask.

    Once frozen (binarised), values() is the 0/1 buffer `frozen_values`, the trainable parameters
    get no gradient, and the sparsity loss is 0. Frozen-ness lives in the buffer `is_frozen` so it
    survives state_dict round trips; a Python copy of it decides the branch in values() without
    reading a device tensor on every forward.
    """

    kind = ""

    def __init__(self, channels: int, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.register_buffer("frozen_values", torch.ones(channels, device=device, dtype=dtype))
        self.register_buffer("is_frozen", torch.zeros((), dtype=torch.bool, device=device))
        self._frozen = False
        self.register_load_state_dict_post_hook(_sync_frozen_flag)

    @property
    def frozen(self) -> bool:
        return self._frozen

    def _trainable_values(self) -> torch.Tensor:
        """The values [C] while not frozen, differentiable in the mask's parameters."""
        raise NotImplementedError

    def _trainable_keep(self) -> torch.Tensor:
        """bool [C] while not frozen: the channels this kind's binarisation keeps."""
        raise NotImplementedError

    def _sparsity_terms(self) -> torch.Tensor:
        """[C] while not frozen: the per-channel terms of this kind's sparsity loss."""
        raise NotImplementedError

    def values(self) -> torch.Tensor:
        """The mask values [C]."""
        return self.frozen_values if self._frozen else self._trainable_values()

    def forward(self) -> torch.Tensor:
        return self.values()

    def keep(self) -> torch.Tensor:
        """bool [C]: the channels that survive pruning, i.e. whose value is 1 after binarize_()."""
        return self.frozen_values > 0 if self._frozen else self._trainable_keep()

    def sparsity(self) -> float:
        """The fraction of channels whose mask value is exactly 0."""
        return (self.values() == 0).float().mean().item()

    def sparsity_loss(self, coefficients: torch.Tensor | None = None) -> torch.Tensor:
        """This kind's sparsity regulariser, a sum of per-channel terms, each weighted by
        `coefficients` [C] when given (DMAD's group coefficients, Eq. 6); 0 once frozen."""
        if self._frozen:
            return self.frozen_values.new_zeros(())
        terms = self._sparsity_terms()
        if coefficients is not None:
            terms = terms * coefficients
        return terms.sum()

    @torch.no_grad()
    def binarize_(self) -> Mask:
        """Snap the values to 0/1 (1 for the channels keep() keeps) and freeze them."""
        if not self._frozen:
            self._freeze_(self.keep())
        return self

    @torch.no_grad()
    def _freeze_(self, values: torch.Tensor) -> None:
        self.frozen_values.copy_(values)
        self.is_frozen.fill_(True)
        self._frozen = True

    def extra_repr(self) -> str:
        return f"{self.channels}" + (", frozen" if self._frozen else "")


def _sync_frozen_flag(module: Mask, _incompatible_keys) -> None:
    module._frozen = bool(module.is_frozen)


class SigmoidMask(Mask):
    """The learnable mask of PPCD-GAN (Sec. 3.2).

    Eq. 1: m = sigmoid(temperature * logits), a continuous relaxation of a 0/1 mask.
    Eq. 2: the sparsity loss is the L1 norm of m, sum_c m_c (m > 0), pushing every value to 0.
    Eq. 3, the binarization trick (apply_binarization_trick_): with r the fraction of values
    <= pivot, once r > compression_threshold the values above the pivot become 1, the others 0,
    and the mask stops updating.

    Defaults. The paper leaves the temperature unstated; 5 makes m go from the pivot 0.005 to
    0.995 over logits in [-1.06, 1.06], the same range DMAD's mask works over at its initial bound
    (p in [-1, 1]), so both kinds move at comparable speed under the same optimiser. logits start
    at 0, i.e. m = 0.5, where the sigmoid is steepest and every channel still passes signal (DMAD
    likewise starts its masks around m = 0.5). pivot = 0.005 is the paper's. The paper studies
    compression thresholds from 0.5 to 0.8; the default 0.5 is the mildest.
    """

    kind = "sigmoid"

    def __init__(self, channels: int, *, temperature: float = 5.0, initial_logit: float = 0.0,
                 pivot: float = 0.005, compression_threshold: float = 0.5, device=None, dtype=None) -> None:
        super().__init__(channels, device=device, dtype=dtype)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if not 0 < pivot < 1:
            raise ValueError(f"pivot must be in (0, 1), got {pivot!r}")
        if not 0 <= compression_threshold < 1:
            raise ValueError(f"compression_threshold must be in [0, 1), got {compression_threshold!r}")
        self.temperature = float(temperature)
        self.pivot = float(pivot)
        self.compression_threshold = float(compression_threshold)
        self.logits = nn.Parameter(torch.full((channels,), float(initial_logit), device=device, dtype=dtype))

    def _trainable_values(self) -> torch.Tensor:
        return torch.sigmoid(self.temperature * self.logits)

    def _trainable_keep(self) -> torch.Tensor:
        return self._trainable_values().detach() > self.pivot

    def _sparsity_terms(self) -> torch.Tensor:
        # The L1 norm of m: m is positive, so |m| = m.
        return self._trainable_values()

    def compression_ratio(self) -> float:
        """r of the binarization trick: the fraction of values <= pivot."""
        return (self.values() <= self.pivot).float().mean().item()

    @torch.no_grad()
    def apply_binarization_trick_(self) -> bool:
        """PPCD-GAN Eq. 3: binarise and freeze when the compression ratio exceeds the threshold.
        Call once per training step, after the optimiser step. Returns whether the mask is frozen."""
        if not self._frozen and self.compression_ratio() > self.compression_threshold:
            self.binarize_()
        return self._frozen

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, temperature={self.temperature}, pivot={self.pivot}, "
                f"compression_threshold={self.compression_threshold}")


class DMADMask(Mask):
    """The differentiable mask of DMAD (Sec. III-B): values dmad_mask(p, bound) (Eq. 3).

    p starts ~ N(0, 0.2) as in the official code, so masks start around 1/2 with the initial bound
    1. The training loop sets the bound from dmad_bound (Eq. 4) with set_bound_ (or set_dmad_bound_
    on a whole model). The bound is a buffer, so checkpoints keep it.
    """

    kind = "dmad"

    def __init__(self, channels: int, *, bound: float = 1.0, init_std: float = 0.2, device=None, dtype=None) -> None:
        super().__init__(channels, device=device, dtype=dtype)
        self.p = nn.Parameter(torch.randn(channels, device=device, dtype=dtype) * init_std)
        self.register_buffer("bound", torch.zeros((), device=device, dtype=dtype))
        self._bound = 0.0
        self.set_bound_(bound)
        # Runs after the base class hook: both copy a buffer into its Python mirror.
        self.register_load_state_dict_post_hook(_sync_bound)

    def set_bound_(self, bound: float) -> DMADMask:
        bound = float(bound)
        if bound < 0:
            raise ValueError(f"bound must be >= 0, got {bound}")
        self.bound.fill_(bound)
        # The mirror holds the buffer's rounded value, so a reloaded checkpoint computes the same masks.
        self._bound = float(torch.tensor(bound, dtype=self.bound.dtype, device="cpu"))
        return self

    def _trainable_values(self) -> torch.Tensor:
        return dmad_mask(self.p, self._bound)

    def _trainable_keep(self) -> torch.Tensor:
        # The value at bound 0, where the search ends: the official code prunes p <= 0.
        return self.p.detach() > 0

    def _sparsity_terms(self) -> torch.Tensor:
        """DMAD Eq. 5 per channel: |p + b|, pushing p towards -b, where the mask is 0.

        As in the official code only in-bound inputs, -b < p < b, count: the others have a
        saturated mask and no gradient through it, and those at -b or below are already zero.
        For in-bound p, |p + b| = p + b. With b = 0 nothing is in bound and the loss is 0.
        """
        b = self._bound
        in_bound = (self.p > -b) & (self.p < b)
        return (self.p + b) * in_bound

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bound={self._bound:.4g}"


def _sync_bound(module: DMADMask, _incompatible_keys) -> None:
    module._bound = float(module.bound)


class HardMask(Mask):
    """A fixed 0/1 mask: always frozen, no parameters, no sparsity loss. values: [C] of 0/1 or
    bool; all ones when None."""

    kind = "hard"

    def __init__(self, channels: int, values: torch.Tensor | None = None, *, device=None, dtype=None) -> None:
        super().__init__(channels, device=device, dtype=dtype)
        if values is None:
            values = torch.ones(channels)
        values = torch.as_tensor(values)
        if values.shape != (channels,):
            raise ValueError(f"values must have shape ({channels},), got {tuple(values.shape)}")
        if not bool(((values == 0) | (values == 1)).all()):
            raise ValueError("values must be 0 or 1")
        self._freeze_(values)


MASK_KINDS: dict[str, type[Mask]] = {"sigmoid": SigmoidMask, "dmad": DMADMask, "hard": HardMask}


def make_mask(kind: str, channels: int, **kwargs) -> Mask:
    """A new mask of `kind` ('sigmoid', 'dmad' or 'hard') over `channels` channels; kwargs go to
    its class (SigmoidMask, DMADMask, HardMask)."""
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {tuple(MASK_KINDS)}, got {kind!r}")
    return MASK_KINDS[kind](channels, **kwargs)


def as_mask(mask: str | Mask | None, channels: int, *, device=None, dtype=None) -> Mask | None:
    """The `mask=` argument of the layers: None, a kind for make_mask, or a Mask over `channels`."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask not in MASK_KINDS:
            raise ValueError(f"mask must be None, one of {tuple(MASK_KINDS)} or a Mask, got {mask!r}")
        return make_mask(mask, channels, device=device, dtype=dtype)
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be None, one of {tuple(MASK_KINDS)} or a Mask, got {type(mask).__name__}")
    if mask.channels != channels:
        raise ValueError(f"mask has {mask.channels} channels but the layer has {channels} output channels")
    return mask


# --- DMAD adaptive cross-block group sparsity (Eq. 6) ------------------------------------------


def _check_group(masks: Sequence[DMADMask]) -> None:
    if len(masks) == 0:
        raise ValueError("masks must be a non-empty list of DMAD masks")
    for i, mask in enumerate(masks):
        if not isinstance(mask, DMADMask):
            raise TypeError(f"masks[{i}] must be a DMADMask, got {type(mask).__name__}")
        if mask.channels != masks[0].channels:
            raise ValueError(f"masks[{i}] has {mask.channels} channels but masks[0] has {masks[0].channels}")


@torch.no_grad()
def dmad_group_coefficients(masks: Sequence[DMADMask], lambda_spa: float = 1.0) -> torch.Tensor:
    """DMAD Eq. 6 for the s masks of one group (the last masked conv of each residual block
    adding into the same stream, whose channel t forms the group g_t):

        lambda_GSPA_t = 0                              if ||g_t||_0 = 0
                      = lambda_spa * s / ||g_t||_0     otherwise,

    ||g_t||_0 being the number of masks whose channel t is non-zero. The sparser a group, the
    stronger its push, until the whole group is zero and the channel can go from every block.
    Returns [C], computed without gradient afresh at each step.
    (The official code differs: it counts in-bound inputs and skips groups with a saturated 1.)
    """
    _check_group(masks)
    nonzero = torch.stack([mask.values() != 0 for mask in masks]).sum(0)
    coefficients = lambda_spa * len(masks) / nonzero.clamp_min(1).to(masks[0].p.dtype)
    return torch.where(nonzero > 0, coefficients, torch.zeros_like(coefficients))


def dmad_group_sparsity_loss(masks: Sequence[DMADMask], lambda_spa: float = 1.0) -> torch.Tensor:
    """Eq. 5 over a group with Eq. 6's lambda_GSPA_t in place of lambda_spa."""
    coefficients = dmad_group_coefficients(masks, lambda_spa)
    return sum(mask.sparsity_loss(coefficients) for mask in masks)


# --- whole-model helpers -------------------------------------------------------------------------


def named_masks(model: nn.Module) -> Iterable[tuple[str, Mask]]:
    """(module name, mask) for every Mask in `model`, each once."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, Mask))


def mask_losses(model: nn.Module, groups: Sequence[Sequence[DMADMask]] = ()) -> torch.Tensor:
    """The total sparsity loss of every mask in `model`, each kind its own (unweighted: multiply
    by lambda_SPA, or by PPCD-GAN's mask-loss weight). Masks in `groups` (DMAD residual groups)
    take the group loss with Eq. 6 coefficients instead, lambda_SPA factored out."""
    grouped = {id(mask) for group in groups for mask in group}
    losses = [mask.sparsity_loss() for _, mask in named_masks(model) if id(mask) not in grouped]
    losses += [dmad_group_sparsity_loss(group) for group in groups]
    return sum(losses) if losses else torch.zeros(())


def mask_sparsity(model: nn.Module) -> dict[str, float]:
    """{mask module name: fraction of its channels at exactly 0}, plus 'overall' over all masks."""
    report, zeros, total = {}, 0, 0
    for name, mask in named_masks(model):
        report[name] = mask.sparsity()
        zeros += int((mask.values() == 0).sum())
        total += mask.channels
    report["overall"] = zeros / total if total else 0.0
    return report


def binarize_masks_(model: nn.Module) -> nn.Module:
    """Binarise and freeze every mask in `model` in place: sigmoid masks by the pivot rule, DMAD
    masks at their bound-0 value [p > 0]. Returns the model."""
    for _, mask in named_masks(model):
        mask.binarize_()
    return model


def set_dmad_bound_(model: nn.Module, bound: float) -> nn.Module:
    """Set the bound of every DMAD mask in `model`, e.g. to dmad_bound(step, total_steps)."""
    for _, mask in named_masks(model):
        if isinstance(mask, DMADMask):
            mask.set_bound_(bound)
    return model
