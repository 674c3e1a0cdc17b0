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
`profile_macs(x, out) -> (output_side, input_side)` counts itself the same way (StyleGAN2's
modulated conv, a grouped conv with per-sample weights, does); its mask is taken as a conv's,
unless it sets `profile_channelwise = True` (a norm: channel c out of channel c in), whose mask,
as a masked norm's, prunes the layer that produced its input. Works on the 'meta' device: nothing
is computed, and the full-size models profile in milliseconds.

Masks: a row's `macs` is the layer as it is (dense). `macs_effective` counts only the channels
that survive pruning (Mask.keep()): input channels kept by the mask of the layer that produced the
input, output channels kept by the layer's own mask or by the mask right after it (a masked norm),
i.e. the size of the compact model export would give. It is None when the masks are on 'meta'.
"""
from __future__ import annotations

from math import prod

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .layers import ConditionalBatchNorm2d, MaskedConv2d, MaskedConvNormAct, MaskedConvTranspose2d
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
    elif name in _MULS:
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


def _fused_macs(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
    """As the unfused equivalent: the conv, then the norm if it has an affine; or as the module
    counts itself."""
    if hasattr(module, "profile_macs"):
        return module.profile_macs(x, out)
    conv = module if isinstance(module, nn.modules.conv._ConvNd) else getattr(module, "conv", None)
    norm = module if isinstance(module, _NORMS + (ConditionalBatchNorm2d,)) else getattr(module, "norm", None)
    output_side = input_side = 0
    if conv is not None:
        output_side, input_side = _conv_macs(x, conv.weight.shape, out, conv.groups, conv.transposed)
    if isinstance(norm, ConditionalBatchNorm2d):
        # The per-sample gain multiplies every element; BigGAN's linear gains map the condition.
        affine = out.numel()
        if norm.cond_dim is not None:
            affine += 2 * out.shape[0] * norm.cond_dim * norm.num_features
    else:
        affine = out.numel() if getattr(norm, "weight", None) is not None else 0
    return output_side + affine, input_side + affine


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


def _shape(t) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _channels(t: torch.Tensor) -> int:
    return t.shape[1] if t.dim() >= 2 else 1


class _Profiler(TorchFunctionMode):
    """Counts the operations that run, attributing them to the innermost module running, and
    follows which channels masks zero, from the masked layer to the layers that consume it."""

    def __init__(self, model: nn.Module, transposed: str) -> None:
        super().__init__()
        self.input_side = transposed == "input"
        self.rows: list[dict] = []
        self.stack: list[tuple[str, nn.Module, dict | None]] = []  # (name, module, its row once it counts)
        self.fused_depth = 0  # > 0 inside a fused layer: its own rule counts it
        self.effective_known = True
        # Channels kept by masks, per tensor (keyed by id, the tensor held so the id stays its own),
        # and the row that produced each tensor a masked norm may prune afterwards.
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.producer: dict[int, tuple[torch.Tensor, dict]] = {}
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
            self._add(row, *_fused_macs(module, x, y))
            self._apply_mask(module, x, y, row)
        self.fused_depth -= 1

    def _row(self, name: str, module: nn.Module, x, y) -> dict:
        row = dict(name=name, type=type(module).__name__, input_shape=_shape(x), output_shape=_shape(y),
                   params=sum(p.numel() for p in module.parameters()), macs=0, macs_effective=0,
                   macs_transposed_output_side=0, macs_transposed_input_side=0, kept_in=1.0, kept_out=1.0)
        self.rows.append(row)
        return row

    def _add(self, row: dict, output_side: int, input_side: int) -> None:
        row["macs_transposed_output_side"] += output_side
        row["macs_transposed_input_side"] += input_side

    # -- masks --

    def _keep(self, mask: Mask) -> torch.Tensor | None:
        keep = mask.keep()
        if keep.device.type == "meta":
            self.effective_known = False
            return None
        return keep.detach().cpu()

    def _kept_fraction(self, t: torch.Tensor) -> float:
        entry = self.kept.get(id(t))
        return entry[1].float().mean().item() if entry is not None else 1.0

    def _apply_mask(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, row: dict) -> None:
        if _conv_like(module):
            row["kept_in"] = self._kept_fraction(x)
        mask = getattr(module, "mask", None)
        keep = self._keep(mask) if isinstance(mask, Mask) else None
        if keep is None:
            self.producer[id(y)] = (y, row)
            return
        row["kept_out"] = keep.float().mean().item()
        self.kept[id(y)] = (y, keep)
        if not _conv_like(module):
            # A mask after a norm prunes the output channels of the layer the norm follows.
            producer = self.producer.get(id(x))
            if producer is not None and _channels(producer[0]) == keep.numel():
                producer[1]["kept_out"] = min(producer[1]["kept_out"], row["kept_out"])

    def _propagate_kept(self, name: str, args, out) -> None:
        """Zero channels stay zero through channel-wise ops (kept if kept in any input: a residual
        sum keeps what either side keeps) and line up through a concatenation along channels."""
        tensors = [a for a in (args[0] if name == "cat" else args) if isinstance(a, torch.Tensor)]
        if not isinstance(out, torch.Tensor) or not any(id(t) in self.kept for t in tensors):
            return
        def keep_of(t):
            entry = self.kept.get(id(t))
            return entry[1] if entry is not None else torch.ones(_channels(t), dtype=torch.bool)
        if name == "cat":
            if (args[1] if len(args) > 1 else 0) == 1:
                self.kept[id(out)] = (out, torch.cat([keep_of(t) for t in tensors]))
            return
        same = [keep_of(t) for t in tensors if t.dim() >= 2 and _channels(t) == _channels(out)]
        if same and out.dim() >= 2:
            self.kept[id(out)] = (out, torch.stack(same).any(0))

    # -- the function mode --

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.fused_depth > 0 or not self.stack:
            return out
        name = getattr(func, "__name__", "")
        macs = _function_macs(name, args, kwargs, out)
        if macs is None:
            self._propagate_kept(name, args, out)
            return out
        module_name, module, row = self.stack[-1]
        if row is None:
            row = self._row(module_name, module, _first_tensor(args), out)
            self.stack[-1] = (module_name, module, row)
            if name.startswith("conv") or name == "linear":
                row["kept_in"] = self._kept_fraction(args[0])
        else:
            row["output_shape"] = _shape(out)
        self.producer[id(out)] = (out, row)
        self._add(row, *macs)
        return out

    def finish(self) -> None:
        for handle in self.handles:
            handle.remove()
        for row in self.rows:
            row["macs"] = row["macs_transposed_input_side" if self.input_side else "macs_transposed_output_side"]
            kept = row.pop("kept_in") * row.pop("kept_out")
            row["macs_effective"] = round(row["macs"] * kept) if self.effective_known else None
        self.kept.clear()
        self.producer.clear()


def _conv_like(module: nn.Module) -> bool:
    """Layers whose input channels are pruned by the mask of the layer that produced the input and
    whose output channels by their own mask; modules that count themselves are taken as such,
    but for channel-wise ones (`profile_channelwise`), which are taken as masked norms."""
    if getattr(module, "profile_channelwise", False):
        return False
    return isinstance(module, (nn.modules.conv._ConvNd, MaskedConvNormAct)) or hasattr(module, "profile_macs")


def profile(model: nn.Module, *inputs, transposed: str = "output") -> dict:
    """Parameters and MACs of `model(*inputs)`, in total and per layer.

    inputs: what model.forward takes; tensors on 'meta' profile without computing anything.
    transposed: 'output' (default; torchprofile's and thop's convention, the published figures)
        or 'input': which side of a transposed convolution `macs` and the rows' `macs` count.

    Returns {'params': int (each shared parameter once), 'macs': int, 'macs_transposed_input_side':
    int, 'macs_effective': int or None, 'layers': [rows]}; a row has name, type, input_shape,
    output_shape, params, macs, macs_effective, macs_transposed_output_side and
    macs_transposed_input_side. The model runs once, in no_grad, in its current train/eval mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if transposed not in TRANSPOSED_SIDES:
        raise ValueError(f"transposed must be one of {TRANSPOSED_SIDES}, got {transposed!r}")
    profiler = _Profiler(model, transposed)
    try:
        with torch.no_grad(), profiler:
            model(*inputs)
    finally:
        profiler.finish()
    rows = profiler.rows
    return dict(
        params=sum(p.numel() for p in model.parameters()),  # parameters() yields a shared one once
        macs=sum(row["macs"] for row in rows),
        macs_transposed_input_side=sum(row["macs_transposed_input_side"] for row in rows),
        macs_effective=sum(row["macs_effective"] for row in rows) if profiler.effective_known else None,
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
