"""Fine-grained sparse convolutions: masked dense for training, a compressed format for inference.

- SparseConv2d / SparseConvTranspose2d: nn.Conv2d / nn.ConvTranspose2d (same positional
  signature, defaults and state_dict, plus the buffer `weight_mask`) whose weight is multiplied by
  a 0/1 mask of the weight's shape. gansparse.prune sets the mask, at any granularity (element,
  kernel, filter, N:M); to the layer, a mask is a mask.
- Training runs the masked dense conv, so the gradient of every pruned weight is exactly 0. After
  each optimizer step, a post-step hook multiplies the stored weights by their masks again, so
  the pruned weights also stay exactly 0 in the parameters themselves, whatever the optimizer's
  momentum or weight decay would do to them.
- `layer.to_sparse(example_input)` / `sparsify(model, *example_inputs)` prepare inference: each
  layer compresses its masked weight (gansparse.ops.sparse_conv.SparseWeight) and keeps the
  sparse kernel only if it runs faster than the dense conv, timed on the layer's actual input
  shape. Without an example, a density threshold decides (DENSITY_THRESHOLD, from the break-even
  sparsities in BENCHMARKS.md). The choice applies in eval mode when no gradient is needed
  (torch.no_grad() or torch.inference_mode()); otherwise the layer runs masked dense. A weight or
  mask changed in place is recompressed on the next call.
"""
from __future__ import annotations

import statistics
import time
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import functional as GF
from .layers import MaskedConv2d, MaskedConvTranspose2d, _check_impl, _conv_arguments
from .ops.sparse_conv import COMPILED_DTYPE, SparseWeight, compress

# Without an example input, a layer runs the sparse kernel at or below this weight density.
DENSITY_THRESHOLD = 0.3
INFERENCE_MODES = ("dense", "sparse")
_TIMING_ROUNDS = 5

_LAYERS: weakref.WeakSet = weakref.WeakSet()


def _rezero_pruned_weights(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Optimizer post-step hook: pruned weights of the sparse layers the optimizer updates are 0 again."""
    masks = {id(layer.weight): layer.weight_mask for layer in list(_LAYERS)}
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                mask = masks.get(id(p))
                if mask is not None:
                    p.mul_(mask)


register_optimizer_step_post_hook(_rezero_pruned_weights)


class _SparseConv:
    """What SparseConv2d and SparseConvTranspose2d add to their torch conv."""

    _torch_conv: type[nn.Module]

    def _init_sparse(self, impl: str | None) -> None:
        self.register_buffer("weight_mask", torch.ones_like(self.weight, requires_grad=False))
        self.granularity = "element"  # of the mask; gansparse.prune sets it
        self.impl = _check_impl(impl)
        self.inference = "dense"
        self._cache: tuple[tuple, torch.Tensor | SparseWeight] | None = None
        _LAYERS.add(self)

    def __setstate__(self, state) -> None:
        # A deep copy or an unpickled layer is a sparse layer too (the optimizer hook finds it).
        super().__setstate__(state)
        _LAYERS.add(self)

    # --- mask ------------------------------------------------------------------------------------

    @property
    def density(self) -> float:
        """The fraction of weights the mask keeps."""
        return float(self.weight_mask.count_nonzero()) / self.weight_mask.numel()

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.weight_mask

    @torch.no_grad()
    def set_mask_(self, mask: torch.Tensor):
        """Sets the mask (nonzero entries keep their weight) and zeroes the pruned weights."""
        if not isinstance(mask, torch.Tensor) or mask.shape != self.weight.shape:
            raise ValueError(f"mask must be a tensor of the weight's shape {tuple(self.weight.shape)}, got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        self.weight_mask.copy_(mask != 0)
        self.weight.mul_(self.weight_mask)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A dense checkpoint of the torch layer has no mask: it loads as unpruned.
        state_dict.setdefault(prefix + "weight_mask", torch.ones_like(self.weight_mask))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- forward ---------------------------------------------------------------------------------

    def _dense(self, x: torch.Tensor, weight: torch.Tensor, output_size=None) -> torch.Tensor:
        """The torch layer's own forward, with `weight`."""
        if not self.transposed:
            return self._conv_forward(x, weight, self.bias)
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2,
                                              self.dilation)
        return F.conv_transpose2d(x, weight, self.bias, self.stride, self.padding, output_padding, self.groups,
                                  self.dilation)

    def _sparse(self, x: torch.Tensor, weight: SparseWeight, output_size=None) -> torch.Tensor:
        x, args = _conv_arguments(self, x, output_size)
        return GF.sparse_conv2d(x, weight, self.bias, args["stride"], args["padding"], args["dilation"],
                                transposed=self.transposed, output_padding=args.get("output_padding", 0),
                                impl=self.impl)

    def _inference_weight(self) -> torch.Tensor | SparseWeight:
        """The masked weight in the chosen inference form, recomputed when the weight or mask changed."""
        key = (self.inference, self.weight.data_ptr(), self.weight._version, self.weight_mask.data_ptr(),
               self.weight_mask._version)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                weight = self.masked_weight()
                self._cache = (key, compress(weight, transposed=self.transposed) if self.inference == "sparse"
                               else weight)
        return self._cache[1]

    def _forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or
                                                  (self.bias is not None and self.bias.requires_grad))
        if self.training or needs_grad:
            return self._dense(x, self.masked_weight(), output_size)
        weight = self._inference_weight()
        if isinstance(weight, SparseWeight):
            return self._sparse(x, weight, output_size)
        return self._dense(x, weight, output_size)

    # --- inference format ------------------------------------------------------------------------

    def sparse_unsupported(self) -> str | None:
        """Why the sparse kernel cannot run this layer, or None when it can."""
        if self.groups != 1:
            return f"groups={self.groups} (the sparse kernel runs groups=1)"
        if self.weight.dtype != COMPILED_DTYPE:
            return f"dtype {self.weight.dtype} (the sparse kernel runs {COMPILED_DTYPE})"
        return None

    @torch.no_grad()
    def to_sparse(self, example_input: torch.Tensor | None = None):
        """Chooses this layer's inference form, 'sparse' or 'dense' (the attribute `inference`):
        whichever is faster on `example_input` (timed, interleaved), or without an example the
        sparse kernel when the density is at most DENSITY_THRESHOLD. Returns the layer."""
        if self.sparse_unsupported() is not None:
            self.inference = "dense"
        elif example_input is None:
            self.inference = "sparse" if self.density <= DENSITY_THRESHOLD else "dense"
        else:
            self.inference = self._faster_form(example_input)
        self._cache = None
        return self

    def _faster_form(self, x: torch.Tensor) -> str:
        dense = self.masked_weight()
        sparse = compress(dense, transposed=self.transposed)
        candidates = {"dense": lambda: self._dense(x, dense), "sparse": lambda: self._sparse(x, sparse)}
        seconds: dict[str, list[float]] = {name: [] for name in candidates}
        for round_ in range(_TIMING_ROUNDS + 1):
            for name, run in candidates.items():
                start = time.perf_counter()
                run()
                if round_ > 0:  # the first round warms up
                    seconds[name].append(time.perf_counter() - start)
        return min(seconds, key=lambda name: statistics.median(seconds[name]))

    @classmethod
    def from_conv(cls, conv: nn.Module, *, impl: str | None = None):
        """A sparse layer running `conv` with the same Parameter objects (not copies), its mask
        keeping the weights that are nonzero."""
        if not isinstance(conv, cls._torch_conv):
            raise TypeError(f"conv must be an nn.{cls._torch_conv.__name__}, got {type(conv).__name__}")
        kwargs = dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                      stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                      bias=conv.bias is not None, padding_mode=conv.padding_mode)
        if conv.transposed:
            kwargs["output_padding"] = conv.output_padding
        layer = cls(**kwargs, device="meta", impl=impl)  # its own parameters are replaced right away
        layer.weight, layer.bias = conv.weight, conv.bias
        layer.weight_mask = (conv.weight.detach() != 0).to(conv.weight.dtype)
        return layer.train(conv.training)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", density={self.density:.3f}, granularity={self.granularity!r}, "
                f"inference={self.inference!r}"
                + (f", impl={self.impl!r}" if self.impl else ""))


class SparseConv2d(_SparseConv, nn.Conv2d):
    """nn.Conv2d with a weight mask; see the module docstring. Same positional signature and
    defaults as nn.Conv2d, plus keyword-only `impl` (the sparse op's backend)."""

    _torch_conv = nn.Conv2d

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, impl=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_sparse(impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)


class SparseConvTranspose2d(_SparseConv, nn.ConvTranspose2d):
    """nn.ConvTranspose2d with a weight mask; see SparseConv2d. forward(x, output_size=None) as
    nn.ConvTranspose2d."""

    _torch_conv = nn.ConvTranspose2d

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, padding_mode="zeros", device=None, dtype=None, *, impl=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, padding_mode, device, dtype)
        self._init_sparse(impl)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return self._forward(x, output_size)


SPARSE_LAYERS = (SparseConv2d, SparseConvTranspose2d)


def convert(model: nn.Module) -> nn.Module:
    """Replaces, in place, every plain conv of `model` by the sparse layer sharing its parameters,
    its mask keeping the nonzero weights: nn.Conv2d and nn.ConvTranspose2d (the exact classes, not
    other subclasses) and gansparse's MaskedConv2d / MaskedConvTranspose2d without a channel mask,
    which compute the same. Returns the model (the new layer when `model` itself is a conv)."""
    replacements = {nn.Conv2d: SparseConv2d, nn.ConvTranspose2d: SparseConvTranspose2d,
                    MaskedConv2d: SparseConv2d, MaskedConvTranspose2d: SparseConvTranspose2d}
    if type(model) in replacements and getattr(model, "mask", None) is None:
        return replacements[type(model)].from_conv(model)
    for name, child in model.named_children():
        setattr(model, name, convert(child))
    return model


@torch.no_grad()
def sparsify(model: nn.Module, *example_inputs, **example_kwargs) -> nn.Module:
    """Prepares `model` for sparse inference, in place, and returns it.

    Plain convs become sparse layers (see `convert`). With example inputs, the model runs once in
    eval mode while forward pre-hooks record each sparse layer's input shape; each layer then
    times its sparse kernel against the dense conv on an input of that shape and keeps the faster
    (a layer the example does not reach, and every layer without an example, decides by its
    density). Run the model in eval mode without gradients to use the chosen forms.
    """
    model = convert(model)
    layers = [m for m in model.modules() if isinstance(m, SPARSE_LAYERS)]
    inputs: dict[nn.Module, dict] = {}  # the shape, dtype and device each layer's input had
    if example_inputs or example_kwargs:
        def record(layer, args):
            x = args[0]
            inputs.setdefault(layer, dict(size=x.shape, dtype=x.dtype, device=x.device))

        hooks = [layer.register_forward_pre_hook(record) for layer in layers]
        was_training = model.training
        try:
            model.eval()
            model(*example_inputs, **example_kwargs)
        finally:
            model.train(was_training)
            for hook in hooks:
                hook.remove()
    for layer in layers:
        example = inputs.get(layer)
        layer.to_sparse(None if example is None else torch.randn(**example))
    return model
