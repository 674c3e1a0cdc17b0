"""Magnitude pruning of the sparse layers, one-shot or on the gradual AGP schedule.

Granularities (the Self-Supervised GAN Compression paper's study, coarse to fine, plus N:M):
- 'element' (0D): single weights, scored by |w|;
- 'kernel' (2D): the kH x kW kernel of one (output, input) channel pair, scored by its mean |w|;
- 'filter' (3D): all the weights of one output channel, scored by their mean |w|;
- 'N:M' such as '2:4': in every group of M consecutive input channels at one (output channel,
  kernel position), the N largest |w| are kept, the layout sparse tensor cores accelerate. Its
  sparsity is always 1 - N/M.
Scores are taken from the masked weight, so pruned weights (score 0) stay pruned.

AGP (Zhu & Gupta, "To prune, or not to prune", 2017): from begin_step to end_step, every
`frequency` steps, the sparsity is raised to
    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt)) ** 3,
fast at first, when there are many redundant weights, and slowly near the target.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .sparse import SPARSE_LAYERS

GRANULARITIES = ("element", "kernel", "filter", "N:M (such as '2:4')")
SCOPES = ("layer", "global")


def sparse_layers(model: nn.Module) -> list[nn.Module]:
    """The SparseConv2d / SparseConvTranspose2d layers of `model` (or `model` itself)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, SPARSE_LAYERS)]
    if not layers:
        raise ValueError("model has no SparseConv2d or SparseConvTranspose2d layers; "
                         "convert its convs with gansparse.sparse.convert(model)")
    return layers


def _n_m(granularity: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"(\d+):(\d+)", granularity)
    if match is None:
        return None
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ValueError(f"granularity 'N:M' needs 0 < N < M, got {granularity!r}")
    return n, m


def _check_granularity(granularity) -> None:
    if not isinstance(granularity, str) or (granularity not in GRANULARITIES[:3] and _n_m(granularity) is None):
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def _filters(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The weight as [C_out, C_in, kH, kW] (a view; a transposed conv stores [C_in, C_out, kH, kW])."""
    return weight.transpose(0, 1) if layer.transposed else weight


def _scores(layer: nn.Module, granularity: str) -> torch.Tensor:
    """The score of each pruning group, shaped so that it broadcasts against _filters(weight):
    [C_out, C_in, kH, kW], [C_out, C_in, 1, 1] or [C_out, 1, 1, 1]."""
    magnitude = _filters(layer, layer.masked_weight().detach().abs())
    if granularity == "kernel":
        return magnitude.mean(dim=(2, 3), keepdim=True)
    if granularity == "filter":
        return magnitude.mean(dim=(1, 2, 3), keepdim=True)
    return magnitude


def _set_group_mask(layer: nn.Module, keep: torch.Tensor) -> None:
    """Sets the layer's mask from a keep mask over its groups (broadcast to the weight)."""
    filters = _filters(layer, layer.weight_mask)
    mask = keep.to(filters.dtype).expand_as(filters)
    layer.set_mask_(mask.transpose(0, 1) if layer.transposed else mask)


def _prune_n_m(layer: nn.Module, n: int, m: int) -> None:
    magnitude = _filters(layer, layer.masked_weight().detach().abs())  # [C_out, C_in, kH, kW]
    c_out, c_in, kh, kw = magnitude.shape
    if c_in % m:
        raise ValueError(f"{n}:{m} pruning groups {m} input channels, but a layer has {c_in} input channels")
    groups = magnitude.permute(0, 2, 3, 1).reshape(-1, m)  # [C_out * kH * kW * C_in / M, M]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(n, dim=1).indices, True)
    keep = keep.reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2)
    _set_group_mask(layer, keep)


def _lowest(scores: torch.Tensor, sizes: torch.Tensor, pruned_weights: float) -> torch.Tensor:
    """Which groups to prune (a bool per group): the lowest-scored ones, as many as hold
    `pruned_weights` weights, rounded to the nearest group."""
    order = torch.argsort(scores, stable=True)
    covered = torch.cumsum(sizes[order], 0)
    # Group k is pruned when the groups up to it cover at most the target, rounded to the nearest.
    count = int(torch.searchsorted(covered - sizes[order] / 2, torch.tensor(pruned_weights, dtype=covered.dtype),
                                   right=True))
    prune = torch.zeros_like(scores, dtype=torch.bool)
    prune[order[:count]] = True
    return prune


@torch.no_grad()
def magnitude_(model: nn.Module, sparsity: float, granularity: str = "element", scope: str = "layer") -> nn.Module:
    """Prunes the sparse layers of `model` (or the layer `model`) in place to `sparsity`, the
    fraction of weights set to zero: the lowest-scored groups of the granularity are masked and
    their weights zeroed. scope 'layer' prunes every layer to `sparsity`; 'global' ranks the
    groups of all layers together (scores are means, comparable across layers), so the total
    fraction is `sparsity`. With an 'N:M' granularity, `sparsity` must be 1 - N/M. Returns model."""
    _check_granularity(granularity)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity <= 1:
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    layers = sparse_layers(model)
    for layer in layers:
        layer.granularity = granularity
    n_m = _n_m(granularity)
    if n_m is not None:
        n, m = n_m
        if abs(sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(f"{granularity} pruning has sparsity {1 - n / m:g}, got sparsity={sparsity!r}")
        for layer in layers:
            _prune_n_m(layer, n, m)
        return model
    scores = [_scores(layer, granularity) for layer in layers]
    if scope == "layer":
        for layer, score in zip(layers, scores):
            sizes = torch.full((score.numel(),), layer.weight.numel() / score.numel(), dtype=torch.float64)
            prune = _lowest(score.flatten().double(), sizes, sparsity * layer.weight.numel())
            _set_group_mask(layer, ~prune.view(score.shape))
        return model
    flat = torch.cat([score.flatten().double().cpu() for score in scores])
    sizes = torch.cat([torch.full((score.numel(),), layer.weight.numel() / score.numel(), dtype=torch.float64)
                       for layer, score in zip(layers, scores)])
    prune = _lowest(flat, sizes, sparsity * float(sizes.sum()))
    for layer, score, layer_prune in zip(layers, scores, prune.split([s.numel() for s in scores])):
        _set_group_mask(layer, ~layer_prune.view(score.shape).to(score.device))
    return model


def agp_sparsity(step: int, begin_step: int, end_step: int, initial_sparsity: float, final_sparsity: float) -> float:
    """Zhu & Gupta's AGP sparsity at `step`: initial_sparsity up to begin_step, final_sparsity from
    end_step on, and s_f + (s_i - s_f) * (1 - (step - begin_step) / (end_step - begin_step)) ** 3
    in between."""
    if not end_step > begin_step:
        raise ValueError(f"end_step must be greater than begin_step, got begin_step={begin_step}, end_step={end_step}")
    for name, value in (("initial_sparsity", initial_sparsity), ("final_sparsity", final_sparsity)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    progress = min(max((step - begin_step) / (end_step - begin_step), 0.0), 1.0)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3


class AGPPruner:
    """Prunes a model gradually on the AGP schedule: call `step()` once per training step, after
    the optimizer step. At begin_step and every `frequency` steps after it, up to end_step, the
    sparse layers are magnitude-pruned (magnitude_) to agp_sparsity(step, ...); the last pruning
    is at end_step exactly. state_dict() / load_state_dict() carry the step, for resuming.

    `AGPPruner.self_supervised_gan_compression(model, total_steps)` is the schedule of the
    Self-Supervised GAN Compression paper: 5% at the start to the target halfway through training.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, *, end_step: int, begin_step: int = 0,
                 initial_sparsity: float = 0.05, frequency: int = 100, granularity: str = "element",
                 scope: str = "layer") -> None:
        sparse_layers(model)
        _check_granularity(granularity)
        if _n_m(granularity) is not None:
            raise ValueError(f"granularity {granularity!r} has one fixed sparsity; prune it once with magnitude_")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"frequency must be a positive int, got {frequency!r}")
        agp_sparsity(begin_step, begin_step, end_step, initial_sparsity, final_sparsity)  # checks the schedule
        self.model = model
        self.final_sparsity, self.initial_sparsity = final_sparsity, initial_sparsity
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency
        self.granularity, self.scope = granularity, scope
        self.step_count = 0

    @classmethod
    def self_supervised_gan_compression(cls, model: nn.Module, total_steps: int, final_sparsity: float = 0.5,
                                        **kwargs) -> AGPPruner:
        """From 5% at step 0 to final_sparsity (the paper's default: 50%) at total_steps // 2."""
        return cls(model, final_sparsity, begin_step=0, end_step=max(1, total_steps // 2), initial_sparsity=0.05,
                   **kwargs)

    def sparsity(self, step: int) -> float:
        return agp_sparsity(step, self.begin_step, self.end_step, self.initial_sparsity, self.final_sparsity)

    def prunes_at(self, step: int) -> bool:
        in_range = self.begin_step <= step <= self.end_step
        return in_range and ((step - self.begin_step) % self.frequency == 0 or step == self.end_step)

    def step(self) -> float | None:
        """Prunes if the current step is a pruning step, then advances; returns the sparsity
        pruned to, or None."""
        step, self.step_count = self.step_count, self.step_count + 1
        if not self.prunes_at(step):
            return None
        sparsity = self.sparsity(step)
        magnitude_(self.model, sparsity, self.granularity, self.scope)
        return sparsity

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
