"""Parameters and multiply-accumulates (MACs) of a model, per layer, in torchprofile's convention.

    stats = gansparse.profile(model, torch.zeros(1, 3, 256, 256, device="meta"))
    print(gansparse.profile_table(stats))

What counts, as torchprofile 0.1.0 counts it (so the published figures come out):
- convolutions: output elements x (input channels / groups) x kernel size; no bias. Transposed
  convolutions by default on the output side, as torchprofile and thop count them: output
  elements x input channels / groups x kernel size; `macs_transposed_input_side` counts them as
  input elements x (output channels / groups) x kernel size, the multiplications actually done.
- linear layers, matmul / bmm / baddbmm / addmm / einsum and scaled dot-product attention:
  output elements x the contracted size; elementwise multiplications: output elements.
- norms with an affine weight (batch, instance, layer, group): output elements; without, 0.
- average pools and means: output elements; bilinear upsampling: 4 x output elements.
- everything else is free: additions, activations, padding, concatenation, softmax. (torchprofile
  counts an out-of-place leaky_relu as output elements but skips the in-place one the reference
  GANs use; activations are not multiply-accumulates, so neither counts here.)

How: operations are counted as they run (a TorchFunctionMode), and forward hooks attribute them
to the innermost module running. gansparse's fused layers run their work in compiled ops that
cannot be seen that way, so they are counted from their modules instead, as their unfused
equivalent: conv + affine norm (a mask is not a MAC). A module with a method
`profile_macs(x, out) -> (output_side, input_side)` counts itself the same way; it is taken as a
conv (its input channels read, its output channels new), unless it sets `profile_channelwise =
True` (a norm: channel c out of channel c in). profile_macs may also return parts, [(output_side,
input_side, kind)] with the kinds of _Part: StyleGAN2's modulated conv, a grouped conv with
per-sample weights, returns its style linear ('input': one style per input channel) and its conv
('conv'). Works on the 'meta' device: nothing is computed, and the full-size models profile in
milliseconds.

Masks: a row's `macs` is the layer as it is (dense). `macs_effective` counts only the channels
gansparse.export.compact would keep, followed as the model runs with its masks frozen at their
kept values (export.pruned_reference), by export's rules: channels tied by per-channel ops,
additions and concatenations go together (a residual stream channel only when every block adding
to it masks it; a depthwise conv's input and output channel together), and stay when a layer
mixing channels reads them while they are not provably 0 (or, for a conv without zero padding or
a linear layer, not provably constant: export folds those into the bias). A mask that scales kept
channels by values other than 1 (a soft mask, or a stream channel zeroed here but kept by another
block) costs one MAC per element where export cannot fold it into weights: after a norm without
affine (it becomes the affine), alone after a layer that is not a conv feeding only it. So for
the zoo's generators with binary or soft masks, macs_effective ==
profile(export.compact(model, *inputs), *inputs)['macs'] (BigGAN as biggan.exportable gives it).
Not so where export rewrites ops rather than cutting them: StyleGAN2's modulated convs count
here as the content-aware paper counts them (style linear and conv, layer by layer equal to the
compact model's), while the compact model's plain ops also count the per-sample modulation and
demodulation as multiplications; spectral norms counted in a model's forward are folded away by
export. For the compact model's own count, profile it.
macs_effective is None when the masks are on 'meta'.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from math import prod

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .layers import ConditionalBatchNorm2d, MaskedConv2d, MaskedConvNormAct, MaskedConvTranspose2d
from .export import _zero_padding_exact, effective_mask_values, pruned_reference
from .masks import Mask

__all__ = ["profile", "profile_table"]

TRANSPOSED_SIDES = ("output", "input")
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)

# --- MACs of one operation ----------------------------------------------------------------


def _conv_macs(x: torch.Tensor, weight_shape, out: torch.Tensor, groups: int, transposed: bool) -> tuple[int, int]:
    """(MACs on the output side, on the input side) of a convolution; equal unless transposed."""
    kernel = prod(weight_shape[2:])
    if not transposed:  # weight [C_out, C_in / groups, *k]
        macs = out.numel() * weight_shape[1] * kernel
        return macs, macs
    # weight [C_in, C_out / groups, *k]
    return out.numel() * (weight_shape[0] // groups) * kernel, x.numel() * weight_shape[1] * kernel


def _argument(args, kwargs, index: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _norm_weight_index(name: str) -> int:
    # batch_norm / instance_norm(input, running_mean, running_var, weight, ...),
    # layer_norm(input, normalized_shape, weight, ...), group_norm(input, num_groups, weight, ...)
    return 3 if name in ("batch_norm", "instance_norm") else 2


_MATMULS = {"matmul", "__matmul__", "bmm", "baddbmm", "addmm", "addmv", "mm", "mv"}
_MULS = {"mul", "mul_", "__mul__", "__rmul__", "__imul__"}
_MEANS = {"mean", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
          "adaptive_avg_pool3d"}


def _function_macs(name: str, args, kwargs, out) -> tuple[int, int] | None:
    """(output-side, input-side) MACs of a torch function call, or None if it costs nothing."""
    if not isinstance(out, torch.Tensor):
        return None
    if name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        transposed = name.startswith("conv_transpose")
        groups = _argument(args, kwargs, 6, "groups", 1)  # 7th in both signatures
        return _conv_macs(args[0], _argument(args, kwargs, 1, "weight").shape, out, groups, transposed)
    if name == "linear":
        macs = out.numel() * _argument(args, kwargs, 1, "weight").shape[-1]
    elif name in _MATMULS:
        # The contracted size is the last dim of the left factor (the 2nd argument of the b/add- forms).
        left = args[1] if name.startswith(("baddbmm", "addm")) else args[0]
        macs = out.numel() * left.shape[-1]
    elif name == "scaled_dot_product_attention":
        q, k, v = args[:3]
        macs = q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    elif name == "einsum":
        macs = _einsum_macs(args)
    elif name in _MULS or name in ("addcmul", "addcmul_"):  # x * y, z + x * y
        macs = out.numel()
    elif name in ("batch_norm", "instance_norm", "layer_norm", "group_norm"):
        has_weight = _argument(args, kwargs, _norm_weight_index(name), "weight") is not None
        macs = out.numel() if has_weight else 0
    elif name in _MEANS:
        macs = out.numel()
    elif name == "interpolate" and _argument(args, kwargs, 3, "mode", "nearest") == "bilinear":
        macs = 4 * out.numel()
    else:
        return None
    return macs, macs


def _einsum_macs(args) -> int:
    equation, *operands = args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    if "..." in equation:
        return 0  # as torchprofile: broadcast dims are not resolved
    sizes = {letter: size for sub, t in zip(inputs, operands) for letter, size in zip(sub, t.shape)}
    return prod(sizes.values())


# --- MACs of a gansparse fused layer -------------------------------------------------------


def _is_fused(module: nn.Module) -> bool:
    """Layers whose work runs in ops the function mode cannot see: gansparse's layers, any
    module applying a gansparse Mask, and modules that count themselves (`profile_macs`)."""
    return isinstance(module, (MaskedConv2d, MaskedConvTranspose2d, MaskedConvNormAct, ConditionalBatchNorm2d)) \
        or isinstance(getattr(module, "mask", None), Mask) or hasattr(module, "profile_macs")


def _is_depthwise(conv: nn.Module) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels > 1


def _fused_macs(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> list[tuple[int, int, str]]:
    """[(output-side MACs, input-side MACs, kind)] of a fused layer, counted as its unfused
    equivalent (the conv, then the norm if it has an affine) or as the module counts itself:
    profile_macs(x, out) returns one (output side, input side) pair, or a list of such triples.
    kind says how pruning shrinks the part (see _Part): 'conv', 'input', 'depthwise' or
    'channelwise'."""
    if hasattr(module, "profile_macs"):
        counted = module.profile_macs(x, out)
        if isinstance(counted, list):  # parts with their kinds
            return counted
        return [(*counted, "conv" if _conv_like(module) else "channelwise")]
    conv = module if isinstance(module, nn.modules.conv._ConvNd) else getattr(module, "conv", None)
    norm = module if isinstance(module, _NORMS + (ConditionalBatchNorm2d,)) else getattr(module, "norm", None)
    parts = []
    if conv is not None:
        macs = _conv_macs(x, conv.weight.shape, out, conv.groups, conv.transposed)
        parts.append((*macs, "depthwise" if _is_depthwise(conv) else "conv"))
    if isinstance(norm, ConditionalBatchNorm2d):
        # The per-sample gain multiplies every element; BigGAN's linear gains map the condition.
        affine = out.numel()
        if norm.cond_dim is not None:
            affine += 2 * out.shape[0] * norm.cond_dim * norm.num_features
    else:
        affine = out.numel() if getattr(norm, "weight", None) is not None else 0
    return parts + [(affine, affine, "channelwise")]


def _conv_like(module: nn.Module) -> bool:
    """Layers that mix channels: their input channels are read, their output channels are new.
    Modules that count themselves are taken as such, but for channel-wise ones
    (`profile_channelwise`, e.g. a norm: channel c out of channel c in)."""
    if getattr(module, "profile_channelwise", False):
        return False
    return isinstance(module, (nn.modules.conv._ConvNd, MaskedConvNormAct)) or hasattr(module, "profile_macs")


# --- which channels survive pruning ----------------------------------------------------------


def _channel_state(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value [C] of each channel (dim 1) at its first element, bool [C]: the channel holds one value)."""
    flat = t.detach().transpose(0, 1).reshape(t.shape[1], -1)  # [C, everything else]
    first = flat[:, 0]
    return first, (flat - first[:, None]).abs().amax(1) <= 1e-6 * (1 + first.abs())


@dataclass
class _Track:
    """The channels (dim 1) of one tensor: a union-find slot each, and which are provably constant."""

    tensor: weakref.ref   # to the tensor: its id is its own while it lives, and it is not kept alive
    slots: list[int]
    const: torch.Tensor   # bool [C]
    value: torch.Tensor   # [C], the value of a constant channel
    from_conv: bool = False  # the output of a conv layer
    reads: int = 0        # how many ops read it

    def zero(self) -> torch.Tensor:
        return self.const & (self.value == 0)


class _Channels:
    """The channels gansparse.export.compact removes, followed as the model runs. Channels tied
    together go together: through per-channel ops (norms, activations, padding, pooling,
    resampling, depthwise convs), additions and other elementwise ops (a residual stream channel
    is one group across every block adding to it) and concatenations. A group stays when a layer
    mixing channels (a conv, a linear layer, a matmul, anything else) reads one of its channels
    while it is not provably 0 (for a layer that folds constants into its bias, not provably
    constant), or when it reaches the model's output; every tensor keeps at least one channel.
    Provably constant: set to 0 by a mask, then kept constant by per-channel ops (checked on the
    values; 0 after a ReLU, any value after a norm). What this leaves out of export's rules (so a
    channel stays here that export removes): channels followed through views to another axis, and
    through a matmul's contracted axis."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pinned: list[bool] = []
        self.tracks: dict[int, _Track] = {}

    def find(self, slot: int) -> int:
        while self.parent[slot] != slot:
            self.parent[slot] = self.parent[self.parent[slot]]
            slot = self.parent[slot]
        return slot

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            self.pinned[a] = self.pinned[a] or self.pinned[b]

    def kept(self, slots: list[int] | None, channels: int) -> int:
        return channels if slots is None else sum(self.pinned[self.find(s)] for s in slots)

    def get(self, t) -> _Track | None:
        track = self.tracks.get(id(t)) if isinstance(t, torch.Tensor) else None
        return track if track is not None and track.tensor() is t else None

    def new(self, t: torch.Tensor, zero: torch.Tensor | None = None) -> _Track:
        """Fresh channels for the output of a layer that mixes channels; `zero`: those a mask sets to 0."""
        channels = t.shape[1]
        start = len(self.parent)
        self.parent.extend(range(start, start + channels))
        self.pinned.extend([False] * channels)
        zero = torch.zeros(channels, dtype=torch.bool) if zero is None else zero
        track = _Track(weakref.ref(t), list(range(start, start + channels)), zero.clone(), torch.zeros(channels))
        self.tracks[id(t)] = track
        return track

    def read(self, t, folds: bool = False) -> None:
        """A layer mixing channels reads t: its channels that are not provably 0 stay, and, unless
        the layer `folds` constants into its bias (a conv whose padding keeps a constant constant,
        a linear layer), those that are not provably constant."""
        track = self.get(t)
        if track is not None:
            track.reads += 1
            for slot, gone in zip(track.slots, (track.const if folds else track.zero()).tolist()):
                if not gone:
                    self.pinned[self.find(slot)] = True

    def pin(self, t) -> None:
        track = self.get(t)
        if track is not None:
            for slot in track.slots:
                self.pinned[self.find(slot)] = True

    def per_channel(self, out: torch.Tensor, inputs, multiplies: bool = False, zero: torch.Tensor | None = None):
        """out's channel c depends on channel c of the inputs with out's channel count only (others
        broadcast): tie them. out's channel is constant when theirs are and its values are one;
        for a product, also when one factor's channel is 0. zero: channels a mask sets to 0."""
        channels = out.shape[1]
        same = [t for t in inputs if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] == channels]
        for other in [t for t in inputs if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] != channels]:
            if other.shape[1] != 1:  # not broadcast: channels export cannot follow
                self.read(other)
        if not same:
            return self.new(out, zero)
        tracks = [self.get(t) or self.new(t) for t in same]
        for track in tracks:
            track.reads += 1
        value, uniform = _channel_state(out)
        value, const = value.detach().float().cpu(), uniform.cpu().clone()
        for track in tracks:
            const &= track.const
        if multiplies:
            for track in tracks:
                const |= track.zero()
        if zero is not None:
            const |= zero
            value = torch.where(zero, torch.zeros(()), value)
        result = _Track(weakref.ref(out), list(tracks[0].slots), const, value)
        for track in tracks[1:]:
            for a, b in zip(result.slots, track.slots):
                self.union(a, b)
        self.tracks[id(out)] = result
        return result

    def concatenate(self, out: torch.Tensor, parts) -> None:
        tracks = [self.get(t) or self.new(t) for t in parts]
        for track in tracks:
            track.reads += 1
        self.tracks[id(out)] = _Track(weakref.ref(out), [s for t in tracks for s in t.slots],
                                      torch.cat([t.const for t in tracks]), torch.cat([t.value for t in tracks]))

    def keep_one_each(self) -> None:
        """A tensor keeps at least one channel (torch layers take no 0-channel input)."""
        for track in self.tracks.values():
            if track.slots and not any(self.pinned[self.find(s)] for s in track.slots):
                self.pinned[self.find(track.slots[0])] = True


@dataclass
class _Part:
    """MACs of one operation of a row, and how pruning shrinks them: 'conv' with the kept input
    and output channels, 'input' with the kept input channels (e.g. the style linear of a
    modulated conv, one style per input channel), 'depthwise' and 'channelwise' with the kept
    output channels, 'fixed' not.
    'mask_scale': a mask after a norm without affine, or alone, free unless it scales a channel
    that stays by a value other than 1 (a soft mask; a residual stream channel this mask zeroes but
    another block keeps): export folds that scale into the norm as an affine, or, for a mask alone,
    into the conv before it if that conv feeds only the mask (`folds`), else applies it as a
    per-channel scale: one MAC per kept element."""

    output_side: int
    input_side: int
    kind: str
    slots_in: list[int] | None = None
    channels_in: int = 1
    slots_out: list[int] | None = None
    channels_out: int = 1
    mask_values: torch.Tensor | None = None  # 'mask_scale': [C]
    scaled_macs: int = 0  # 'mask_scale': the MACs of the affine it becomes
    folds: _Track | None = None  # 'mask_scale' of a mask alone: its input

    def effective(self, macs: int, channels: _Channels) -> int:
        if self.kind == "fixed":
            return macs
        if self.kind == "mask_scale":
            macs = self.scaled_macs
            kept = [c for c, s in enumerate(self.slots_out) if channels.pinned[channels.find(s)]]
            if not bool((self.mask_values[kept] != 1).any()) or (
                    self.folds is not None and self.folds.from_conv and self.folds.reads == 1):
                return 0
        if self.kind == "input":
            return (macs * channels.kept(self.slots_in, self.channels_in) + self.channels_in // 2) // self.channels_in
        whole = self.channels_out
        kept = channels.kept(self.slots_out, self.channels_out)
        if self.kind == "conv":
            whole *= self.channels_in
            kept *= channels.kept(self.slots_in, self.channels_in)
        return (macs * kept + whole // 2) // whole


# --- the profiler --------------------------------------------------------------------------


def _first_tensor(values) -> torch.Tensor | None:
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (list, tuple)):
            found = _first_tensor(value)
            if found is not None:
                return found
    return None


def _tensors(values) -> list[torch.Tensor]:
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += _tensors(value)
        elif isinstance(value, dict):
            found += _tensors(value.values())
    return found


def _shape(t) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _channels(t) -> int:
    return t.shape[1] if isinstance(t, torch.Tensor) and t.dim() >= 2 else 1


# Ops that mix channels besides the counted contractions (or move the channel axis).
_MIXING = {"layer_norm", "group_norm", "softmax", "log_softmax", "transpose", "permute", "movedim", "swapaxes",
           "t", "embedding", "flatten", "unflatten", "view", "reshape"}
_CONTRACTIONS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear",
                 "einsum", "scaled_dot_product_attention"} | _MATMULS


class _Profiler(TorchFunctionMode):
    """Counts the operations that run, attributing them to the innermost module running, and
    (when `channels` is given) follows which channels survive pruning (_Channels)."""

    def __init__(self, model: nn.Module, transposed: str, channels: _Channels | None) -> None:
        super().__init__()
        self.input_side = transposed == "input"
        self.channels = channels
        self.rows: list[dict] = []
        self.stack: list[tuple[str, nn.Module, dict | None]] = []  # (name, module, its row once it counts)
        self.fused_depth = 0  # > 0 inside a fused layer: its own rule counts it
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave))

    # -- module hooks --

    def _enter(self, name: str):
        def hook(module, args):
            self.stack.append((name or "(model)", module, None))
            if _is_fused(module):
                self.fused_depth += 1
        return hook

    def _leave(self, module, args, out):
        name, _, row = self.stack.pop()
        if not _is_fused(module):
            return
        if self.fused_depth == 1:  # the outermost fused layer; its bookkeeping runs uncounted
            x, y = _first_tensor(args), _first_tensor([out])
            row = self._row(name, module, x, y)
            slots_in, slots_out = self._follow_fused(module, x, y)
            for output_side, input_side, kind in _fused_macs(module, x, y):
                row["parts"].append(_Part(output_side, input_side, kind, slots_in, _channels(x), slots_out,
                                          _channels(y)))
            mask = getattr(module, "mask", None)
            alone = not (_conv_like(module) or isinstance(module, _NORMS) or hasattr(module, "profile_macs"))
            if slots_out is not None and isinstance(mask, Mask) and (
                    alone or isinstance(module, _NORMS) and module.weight is None):
                row["parts"].append(_Part(0, 0, "mask_scale", None, 1, slots_out, _channels(y),
                                          effective_mask_values(mask).cpu(), y.numel(),
                                          self.channels.get(x) if alone else None))
        self.fused_depth -= 1

    def _row(self, name: str, module: nn.Module, x, y) -> dict:
        row = dict(name=name, type=type(module).__name__, input_shape=_shape(x), output_shape=_shape(y),
                   params=sum(p.numel() for p in module.parameters()), parts=[])
        self.rows.append(row)
        return row

    # -- channels --

    def _follow_fused(self, module: nn.Module, x, y) -> tuple[list[int] | None, list[int] | None]:
        """(slots of x, slots of y) once a fused layer ran: a conv-like one reads x and makes y's
        channels, with those its mask sets to 0; a channel-wise one ties y to x, a depthwise conv too."""
        if self.channels is None or not isinstance(y, torch.Tensor) or y.dim() < 2:
            return None, None
        mask = getattr(module, "mask", None)
        zero = (~mask.keep()).cpu() if isinstance(mask, Mask) and mask.channels == y.shape[1] else None
        conv = module if isinstance(module, nn.modules.conv._ConvNd) else None
        if _conv_like(module) and not (conv is not None and _is_depthwise(conv)):
            self.channels.read(x, folds=conv is not None and _zero_padding_exact(conv))
            track_in = self.channels.get(x)
            track_out = self.channels.new(y, zero)
            track_out.from_conv = conv is not None and (conv.groups == 1 or not conv.transposed)
        else:
            track_out = self.channels.per_channel(y, [x], zero=zero)
            track_in = track_out
            if isinstance(module, ConditionalBatchNorm2d):  # a per-sample affine: constant only where masked
                track_out.const = zero.clone() if zero is not None else torch.zeros_like(track_out.const)
        return (track_in.slots if track_in is not None else None), track_out.slots

    def _follow_function(self, name: str, args, kwargs, out, depthwise: bool):
        """(slots of the op's first input, slots of its output) after a torch function ran."""
        outputs = [out] if isinstance(out, torch.Tensor) else _tensors([out])
        if self.channels is None or not outputs:
            return None, None
        inputs = _tensors(args) + _tensors(kwargs.values())
        tracked = any(self.channels.get(t) is not None for t in inputs)
        if name in ("cat", "concat", "concatenate") and _argument(args, kwargs, 1, "dim", 0) in (1, -3) and \
                all(t.dim() == 4 for t in inputs) and tracked:
            self.channels.concatenate(out, inputs)
        elif (name in _CONTRACTIONS and not depthwise) or name in _MIXING or len(outputs) != 1 or \
                outputs[0].dim() < 2:
            # As export: a linear layer, or a conv without zero padding, folds a constant input channel.
            folds = name == "linear" or (name.startswith("conv") and not name.startswith("conv_transpose") and
                                         _argument(args, kwargs, 4, "padding", 0) in (0, (0, 0), "valid"))
            first = args[0] if args else None
            self.channels.read(first, folds)
            for t in inputs:
                if t is not first:
                    self.channels.read(t)
            if name in _CONTRACTIONS and isinstance(out, torch.Tensor) and out.dim() >= 2:
                track_in, track_out = self.channels.get(first), self.channels.new(out)
                # A conv layer's output (export folds a mask after it into its weights).
                track_out.from_conv = isinstance(self.stack[-1][1], nn.modules.conv._ConvNd) and (
                    name.startswith("conv") and _argument(args, kwargs, 6, "groups", 1) == 1)
                return (track_in.slots if track_in is not None else None), track_out.slots
        elif tracked or depthwise:
            multiplies = name in _MULS
            if depthwise:
                inputs = inputs[:1]
            return None, self.channels.per_channel(outputs[0], inputs, multiplies).slots
        return None, None

    # -- the function mode --

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.fused_depth > 0 or not self.stack:
            return out
        name = getattr(func, "__name__", "")
        depthwise = name.startswith("conv") and isinstance(out, torch.Tensor) and \
            _argument(args, kwargs, 6, "groups", 1) == _channels(args[0]) == _channels(out) > 1
        slots_in, slots_out = self._follow_function(name, args, kwargs, out, depthwise)
        macs = _function_macs(name, args, kwargs, out)
        if macs is None:
            return out
        module_name, module, row = self.stack[-1]
        if row is None:
            row = self._row(module_name, module, _first_tensor(args), out)
            self.stack[-1] = (module_name, module, row)
        else:
            row["output_shape"] = _shape(out)
        if depthwise:
            kind = "depthwise"
        elif name.startswith("conv") or name == "linear":
            kind = "conv"
        else:
            kind = "fixed" if name in _CONTRACTIONS else "channelwise"
        row["parts"].append(_Part(*macs, kind, slots_in, _channels(args[0]), slots_out, _channels(out)))
        return out

    def finish(self, outputs) -> None:
        for handle in self.handles:
            handle.remove()
        if self.channels is not None:
            for t in _tensors([outputs]):
                self.channels.pin(t)
            self.channels.keep_one_each()
        for row in self.rows:
            parts = row.pop("parts")
            row["macs_transposed_output_side"] = sum(part.output_side for part in parts)
            row["macs_transposed_input_side"] = sum(part.input_side for part in parts)
            row["macs"] = row["macs_transposed_input_side" if self.input_side else "macs_transposed_output_side"]
            row["macs_effective"] = None if self.channels is None else sum(
                part.effective(part.input_side if self.input_side else part.output_side, self.channels)
                for part in parts)
        self.channels = None


def profile(model: nn.Module, *inputs, transposed: str = "output") -> dict:
    """Parameters and MACs of `model(*inputs)`, in total and per layer.

    inputs: what model.forward takes; tensors on 'meta' profile without computing anything.
    transposed: 'output' (default; torchprofile's and thop's convention, the published figures)
        or 'input': which side of a transposed convolution `macs` and the rows' `macs` count.

    Returns {'params': int (each shared parameter once), 'macs': int, 'macs_transposed_input_side':
    int, 'macs_effective': int or None, 'layers': [rows]}; a row has name, type, input_shape,
    output_shape, params, macs, macs_effective, macs_transposed_output_side and
    macs_transposed_input_side. The model runs once, in no_grad, in its current train/eval mode;
    a model with masks (not on 'meta') runs as export.pruned_reference(model), a copy in eval mode
    with its masks frozen at their kept values, for macs_effective (see the module docstring).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if transposed not in TRANSPOSED_SIDES:
        raise ValueError(f"transposed must be one of {TRANSPOSED_SIDES}, got {transposed!r}")
    masks = [m for m in model.modules() if isinstance(m, Mask)]
    on_meta = any(t.device.type == "meta" for t in _tensors(inputs) + [b for m in masks for b in m.buffers()])
    channels = _Channels() if masks and not on_meta else None
    # Channels are followed on the values compact sees: the masks frozen at their kept values.
    run = pruned_reference(model) if channels is not None else model
    profiler = _Profiler(run, transposed, channels)
    outputs = None
    try:
        with torch.no_grad(), profiler:
            outputs = run(*inputs)
    finally:
        profiler.finish(outputs)
    rows = profiler.rows
    if not masks:  # nothing to prune
        for row in rows:
            row["macs_effective"] = row["macs"]
    effective_known = not masks or not on_meta
    return dict(
        params=sum(p.numel() for p in model.parameters()),  # parameters() yields a shared one once
        macs=sum(row["macs"] for row in rows),
        macs_transposed_input_side=sum(row["macs_transposed_input_side"] for row in rows),
        macs_effective=sum(row["macs_effective"] for row in rows) if effective_known else None,
        layers=rows,
    )


def _giga(macs: int | None) -> str:
    return "-" if macs is None else f"{macs / 1e9:.3f}G"


def profile_table(stats: dict) -> str:
    """The rows of profile(...) as a fixed-width text table, with the totals at the end."""
    header = ("layer", "type", "input", "output", "params", "MACs", "effective")
    lines = [header]
    for row in stats["layers"]:
        shape = lambda s: "x".join(map(str, s)) if s else "-"  # noqa: E731
        lines.append((row["name"], row["type"], shape(row["input_shape"]), shape(row["output_shape"]),
                      f"{row['params']:,}", _giga(row["macs"]), _giga(row["macs_effective"])))
    lines.append(("total", "", "", "", f"{stats['params']:,}", _giga(stats["macs"]), _giga(stats["macs_effective"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))).rstrip() for line in lines)
