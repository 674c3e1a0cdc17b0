"""Attention maps and attention distillation (Zagoruyko & Komodakis 2017), as PPCD-GAN (Eq. 4, 6)
and DMAD (Eq. 7-9) use them.

The attention map of a feature f[N, C, H, W] is A[n] = reduce_c |f[n, c]|^p, flattened per sample
and L2-normalised. The backends compute the raw maps of a whole list of layers in one call, each
feature read once; backward reads each feature once more and writes its gradient once. The small
[N, H*W] maps are then normalised, mixed and compared in plain PyTorch, identically for every
backend.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import _dispatch, _ext
from .attention_ref import attention_maps_ref

REDUCES = ("mean", "sum")
REDUCTIONS = ("mean", "sum")
RESIZE_MODES = ("auto", "bilinear", "bicubic", "area", "nearest")

FeatureList = torch.Tensor | Sequence[torch.Tensor]


# --- autograd of the compiled and Triton ops --------------------------------------------------


def _setup_context(ctx, inputs, output):
    features, p, mean = inputs
    ctx.save_for_backward(*features)
    ctx.p, ctx.mean = p, mean


def _backward_through(backward_op):
    def backward(ctx, grads):
        grad_features = backward_op(list(grads), list(ctx.saved_tensors), ctx.p, ctx.mean)
        return list(grad_features), None, None

    return backward


# Fake kernels of the compiled and the Triton ops. They check what the C++ kernels check: they
# also run for real tensors whenever one input is on the meta device, where a silent result
# would be uninitialised memory.


def _check_op_features(features, p: float) -> None:
    if len(features) == 0:
        raise ValueError("features must be a non-empty list of tensors")
    _check_exponent(p)
    for i, f in enumerate(features):
        _check_feature(f, f"features[{i}]")
        if f.device != features[0].device:
            raise ValueError(f"features[{i}] is on {f.device} but features[0] is on {features[0].device}")


def fake_maps(features, p, mean):
    _check_op_features(features, p)
    return [f.new_empty((f.shape[0], f.shape[2], f.shape[3])) for f in features]


def fake_maps_backward(grads, features, p, mean):
    _check_op_features(features, p)
    if len(grads) != len(features):
        raise ValueError(f"grads has {len(grads)} tensors but features has {len(features)}")
    for i, (g, f) in enumerate(zip(grads, features)):
        expected = (f.shape[0], f.shape[2], f.shape[3])
        if tuple(g.shape) != expected:
            raise ValueError(f"grads[{i}] must have shape {expected}, got {tuple(g.shape)}")
        if g.device != f.device:
            raise ValueError(f"grads[{i}] is on {g.device} but features[{i}] is on {f.device}")
    return [torch.empty(f.shape, dtype=f.dtype, device=f.device, memory_format=grad_layout(f)) for f in features]


def grad_layout(f: torch.Tensor) -> torch.memory_format:
    """The layout every backend writes a gradient in: NHWC for a channels_last feature, NCHW for
    any other (the C++ kernels copy those to NCHW first)."""
    if not f.is_contiguous() and f.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def register_autograd(forward_name: str, backward_op) -> None:
    torch.library.register_autograd(
        forward_name, _backward_through(backward_op), setup_context=_setup_context
    )


@functools.cache
def compiled_ops():
    """torch.ops.gansparse.attention_maps{,_backward} with their fake kernels and autograd, or
    None without the compiled extension."""
    if _ext.extension() is None:
        return None
    ops = torch.ops.gansparse
    torch.library.register_fake("gansparse::attention_maps")(fake_maps)
    torch.library.register_fake("gansparse::attention_maps_backward")(fake_maps_backward)
    register_autograd("gansparse::attention_maps", ops.attention_maps_backward)
    return ops.attention_maps, ops.attention_maps_backward


# --- validation -----------------------------------------------------------------------------


def _check_feature(f, name: str) -> None:
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(f).__name__}")
    if f.dim() != 4:
        raise ValueError(f"{name} must be a 4-D [N, C, H, W] tensor, got shape {tuple(f.shape)}")
    if not f.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {f.dtype}")
    if f.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(f.shape)}")


def _check_exponent(p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (1.0 <= float(p) < float("inf")):
        raise ValueError(f"p must be a finite number >= 1, got {p!r}")


def _check_options(p: float, reduce: str) -> None:
    _check_exponent(p)
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")


def _as_list(features: FeatureList, name: str) -> list[torch.Tensor]:
    if isinstance(features, torch.Tensor):
        return [features]
    if not isinstance(features, Sequence) or len(features) == 0:
        raise TypeError(f"{name} must be a tensor or a non-empty sequence of tensors")
    return list(features)


# --- public API ------------------------------------------------------------------------------


def attention_maps(
    features: FeatureList, p: float = 2.0, reduce: str = "mean", *, impl: str | None = None
) -> list[torch.Tensor]:
    """Raw (unnormalised) [N, H, W] attention maps of a list of [N, C, H, W] features.

    One backend call covers the whole list. Every feature must be on the same device.
    `impl` picks the backend: 'ref', 'cpu', 'cuda' or 'triton' (default: the fastest available).
    """
    features = _as_list(features, "features")
    _check_options(p, reduce)
    for i, f in enumerate(features):
        _check_feature(f, f"features[{i}]")
        if f.device != features[0].device:
            raise ValueError(f"features[{i}] is on {f.device} but features[0] is on {features[0].device}")
    backend = _backend(features[0].device, impl)
    mean = reduce == "mean"
    if backend == "ref":
        return attention_maps_ref(features, float(p), mean)
    ops = torch.ops.gansparse
    forward = ops.attention_maps_triton if backend == "triton" else ops.attention_maps
    return list(forward(features, float(p), mean))


@_dispatch.trace_time_constant
def _backend(device: torch.device, impl: str | None) -> str:
    """The backend for tensors on `device`, with its ops registered."""
    backend = _dispatch.select("attention_maps", device, impl)
    if backend == "triton":
        from ..kernels import attention  # noqa: F401  (registers gansparse::attention_maps_triton)
    elif backend != "ref":
        compiled_ops()
    return backend


def attention_map(
    f: torch.Tensor, p: float = 2.0, reduce: str = "mean", normalize: bool = True, *, impl: str | None = None
) -> torch.Tensor:
    """The [N, H*W] attention map of one [N, C, H, W] feature, L2-normalised per sample unless
    `normalize=False`."""
    _check_feature(f, "f")
    (raw,) = attention_maps([f], p, reduce, impl=impl)
    flat = raw.flatten(1)
    return F.normalize(flat, dim=1) if normalize else flat


def _resize(maps: torch.Tensor, size: torch.Size, mode: str) -> torch.Tensor:
    """[N, h, w] -> [N, *size]. 'auto' averages areas when shrinking and interpolates bilinearly
    otherwise, as OpenCV's INTER_AREA that DMAD's code resizes discriminator maps with."""
    if maps.shape[-2:] == size:
        return maps
    if mode == "auto":
        shrinking = maps.shape[-2] >= size[0] and maps.shape[-1] >= size[1]
        mode = "area" if shrinking else "bilinear"
    align = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode=mode, **align).squeeze(1)


def _teacher_mix(teacher_mix, counts: list[int]) -> list[list[float]]:
    """Per layer, the weight of each of that layer's teacher maps."""
    if teacher_mix is None:
        return [[1.0 / k] * k for k in counts]
    flat = all(isinstance(w, (int, float)) for w in teacher_mix)
    per_layer = [list(teacher_mix)] * len(counts) if flat else [list(w) for w in teacher_mix]
    if len(per_layer) != len(counts):
        raise ValueError(f"teacher_mix has {len(per_layer)} entries for {len(counts)} layers")
    for i, (mix, k) in enumerate(zip(per_layer, counts)):
        if len(mix) != k:
            raise ValueError(f"teacher_mix for layer {i} has {len(mix)} weights but teachers[{i}] has {k} features")
    return per_layer


def attention_distill_loss(
    students: FeatureList,
    teachers: Sequence[FeatureList] | torch.Tensor,
    p: float = 2.0,
    weights: Sequence[float] | None = None,
    teacher_mix: Sequence[float] | Sequence[Sequence[float]] | None = None,
    *,
    reduce: str = "mean",
    reduction: str = "mean",
    resize: str = "auto",
    impl: str | None = None,
) -> torch.Tensor:
    """Attention distillation: sum over layers i of weights[i] * || A(s_i) - A(t_i) ||^2, with
    A the L2-normalised attention map.

    students: a [N, C, H, W] tensor or a list of them, one per distilled layer.
    teachers: per layer, a feature or a sequence of features whose raw maps are mixed into the
        target with `teacher_mix`, resized to the student's map size first, then normalised.
        DMAD's co-attention (Eq. 8) is `teachers[i] = (g_t[i], d_t)`, `teacher_mix=(0.5, 0.5)`;
        its official code mixes two discriminator layers with (0.5, 0.25, 0.25). Teachers are
        targets: no gradient flows to them.
    teacher_mix: one weight per teacher feature, either the same for every layer (a flat
        sequence) or per layer; default an equal share.
    reduce: 'mean' or 'sum' over channels in the map.
    reduction: 'mean' over pixels and samples, as the official code of attention transfer and of
        DMAD computes it, or 'sum' over pixels and mean over samples, the squared L2 distance
        per image of DMAD Eq. 9 and PPCD-GAN Eq. 4.
    resize: how a teacher map of another size is resized: 'auto' (area when shrinking, else
        bilinear), 'bilinear', 'bicubic', 'area' or 'nearest'.
    """
    students = _as_list(students, "students")
    if isinstance(teachers, torch.Tensor):
        teachers = [teachers]
    if not isinstance(teachers, Sequence) or len(teachers) != len(students):
        count = len(teachers) if isinstance(teachers, Sequence) else type(teachers).__name__
        raise ValueError(f"teachers must hold one entry per student layer: {len(students)} students, got {count}")
    teacher_groups = [_as_list(t, f"teachers[{i}]") for i, t in enumerate(teachers)]
    _check_options(p, reduce)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    weights = [1.0] * len(students) if weights is None else list(weights)
    if len(weights) != len(students):
        raise ValueError(f"weights has {len(weights)} entries for {len(students)} layers")
    mixes = _teacher_mix(teacher_mix, [len(g) for g in teacher_groups])

    for i, s in enumerate(students):
        _check_feature(s, f"students[{i}]")
        if s.device != students[0].device:
            raise ValueError(f"students[{i}] is on {s.device} but students[0] is on {students[0].device}")
        for j, t in enumerate(teacher_groups[i]):
            name = f"teachers[{i}]" if isinstance(teachers[i], torch.Tensor) else f"teachers[{i}][{j}]"
            _check_feature(t, name)
            if t.device != s.device:
                raise ValueError(f"{name} is on {t.device} but students[{i}] is on {s.device}")
            if t.shape[0] != s.shape[0]:
                raise ValueError(f"{name} has batch {t.shape[0]} but students[{i}] has batch {s.shape[0]}")

    student_maps = attention_maps(students, p, reduce, impl=impl)
    with torch.no_grad():
        flat_teachers = [t.detach() for group in teacher_groups for t in group]
        teacher_maps = iter(attention_maps(flat_teachers, p, reduce, impl=impl))

    loss = student_maps[0].new_zeros(())
    for s_map, group, mix, weight in zip(student_maps, teacher_groups, mixes, weights):
        target = sum(w * _resize(next(teacher_maps), s_map.shape[-2:], resize) for w, _ in zip(mix, group))
        s_norm = F.normalize(s_map.flatten(1), dim=1)
        t_norm = F.normalize(target.flatten(1).to(s_norm.dtype), dim=1)
        squared = (s_norm - t_norm).pow(2)
        term = squared.mean() if reduction == "mean" else squared.sum(1).mean()
        loss = loss + weight * term
    return loss
