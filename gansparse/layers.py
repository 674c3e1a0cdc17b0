"""Drop-in layers on the fused masked conv + norm + activation op.

- MaskedConv2d / MaskedConvTranspose2d: nn.Conv2d / nn.ConvTranspose2d with an optional
  per-output-channel mask (gansparse.masks); without a mask they are exactly the torch layers.
- ConditionalBatchNorm2d: batch norm whose affine comes per sample from a class (embedding) or
  from a condition vector (BigGAN's ccbn).
- MaskedConvNormAct: conv + norm + mask + activation as one module and one op call, built
  directly or from existing torch modules (MaskedConvNormAct.from_modules).

Backend: every layer has an `impl` attribute (constructor argument, default None) passed to the
op as its `impl=`: None lets the op choose (GANSPARSE_IMPL, then the fastest backend available),
'ref' / 'cpu' / 'cuda' / 'triton' force one.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as GF
from ._dispatch import IMPLS
from .masks import Mask, as_mask

# --- shared pieces ---------------------------------------------------------------------------


def _conv_arguments(conv: nn.Conv2d | nn.ConvTranspose2d, x: torch.Tensor, output_size=None):
    """(input, conv keyword arguments of masked_conv_norm_act) running `conv` exactly as its own
    forward does."""
    common = dict(stride=conv.stride, dilation=conv.dilation, groups=conv.groups)
    if conv.transposed:
        output_padding = conv._output_padding(x, output_size, conv.stride, conv.padding, conv.kernel_size, 2,
                                              conv.dilation)
        return x, dict(common, padding=conv.padding, transposed=True, output_padding=output_padding)
    if output_size is not None:
        raise ValueError("output_size is only meaningful for transposed convolutions")
    padding = conv.padding
    if conv.padding_mode != "zeros" or isinstance(padding, str):
        # nn.Conv2d pads explicitly for the non-zero padding modes; 'same' / 'valid' become the same
        # explicit padding, since the op takes numbers only.
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    return x, dict(common, padding=padding)


def _running_stats_arguments(bn: nn.Module) -> dict:
    """running_mean, running_var, training, momentum of the op for a batch norm, advancing
    num_batches_tracked exactly as nn.BatchNorm2d.forward does (momentum None: cumulative average)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    # As nn.BatchNorm2d: batch statistics in training or without running statistics; the running
    # statistics are passed when they are used (eval) or updated (training while tracking).
    use_running = not bn.training or bn.track_running_stats
    return dict(
        running_mean=bn.running_mean if use_running else None,
        running_var=bn.running_var if use_running else None,
        training=bn.training or bn.running_mean is None,
        momentum=momentum,
    )


def norm_arguments(norm: nn.Module | None, y: torch.Tensor | None, batch: int) -> dict:
    """The norm keyword arguments of the op for a norm module (or None)."""
    if norm is None:
        return dict(norm="none")
    if isinstance(norm, ConditionalBatchNorm2d):
        gamma, beta = norm.gain_and_bias(y, batch)
        return dict(norm="batch", gamma=gamma, beta=beta, eps=norm.eps, **_running_stats_arguments(norm))
    if isinstance(norm, nn.BatchNorm2d):
        return dict(norm="batch", gamma=norm.weight, beta=norm.bias, eps=norm.eps, **_running_stats_arguments(norm))
    # nn.InstanceNorm2d, without running statistics (checked when the module is built).
    return dict(norm="instance", gamma=norm.weight, beta=norm.bias, eps=norm.eps)


def _check_impl(impl: str | None) -> str | None:
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be None or one of {IMPLS}, got {impl!r}")
    return impl


# --- masked convolutions -------------------------------------------------------------------------


class _MaskedConv:
    """What MaskedConv2d and MaskedConvTranspose2d add to their torch conv: the mask, the backend,
    from_conv and the repr."""

    _torch_conv: type[nn.Module]

    def _set_mask(self, mask, impl, device, dtype) -> None:
        self.mask = as_mask(mask, self.out_channels, device=device, dtype=dtype)
        self.impl = _check_impl(impl)

    def _masked_forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        x, conv_args = _conv_arguments(self, x, output_size)
        return GF.masked_conv_norm_act(x, self.weight, self.bias, self.mask(), norm="none", activation=None,
                                       impl=self.impl, **conv_args)

    @classmethod
    def from_conv(cls, conv: nn.Module, *, mask: str | Mask | None = None, impl: str | None = None):
        """A masked layer running `conv` with the same Parameter objects (not copies)."""
        if not isinstance(conv, cls._torch_conv):
            raise TypeError(f"conv must be an nn.{cls._torch_conv.__name__}, got {type(conv).__name__}")
        if getattr(conv, "mask", None) is not None:
            raise ValueError("conv already has a mask")
        kwargs = dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                      stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                      bias=conv.bias is not None, padding_mode=conv.padding_mode)
        if conv.transposed:
            kwargs["output_padding"] = conv.output_padding
        # Built on the meta device: its own parameters are replaced right away, never allocated.
        layer = cls(**kwargs, device="meta")
        layer.weight, layer.bias = conv.weight, conv.bias
        layer._set_mask(mask, impl, conv.weight.device, conv.weight.dtype)
        return layer.train(conv.training)

    def extra_repr(self) -> str:
        kind = self.mask.kind if self.mask is not None else None
        return super().extra_repr() + f", mask={kind!r}" + (f", impl={self.impl!r}" if self.impl else "")


class MaskedConv2d(_MaskedConv, nn.Conv2d):
    """nn.Conv2d with an optional mask on its output channels: out = mask[c] * conv(x)[c].

    Same positional signature and defaults as nn.Conv2d, plus keyword-only `mask` (None, 'sigmoid',
    'dmad', 'hard' or a gansparse.masks.Mask over out_channels) and `impl` (the op's backend).
    With mask=None it is nn.Conv2d: same state_dict, same outputs. A channel whose mask is 0
    outputs exactly 0.
    """

    _torch_conv = nn.Conv2d

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, mask=None, impl=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._set_mask(mask, impl, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return super().forward(x)
        return self._masked_forward(x)


class MaskedConvTranspose2d(_MaskedConv, nn.ConvTranspose2d):
    """nn.ConvTranspose2d with an optional mask on its output channels; see MaskedConv2d.
    forward(x, output_size=None) as nn.ConvTranspose2d."""

    _torch_conv = nn.ConvTranspose2d

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, padding_mode="zeros", device=None, dtype=None, *, mask=None,
                 impl=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, padding_mode, device, dtype)
        self._set_mask(mask, impl, device, dtype)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.mask is None:
            return super().forward(x, output_size)
        return self._masked_forward(x, output_size)


# --- conditional batch norm ----------------------------------------------------------------------


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm with a per-sample affine from a condition y: out = gain(y) * bn(x) + bias(y).

    Exactly one of:
    - num_classes: y is a class index [N]; `gain` and `bias` are nn.Embedding(num_classes,
      num_features), gains initialised to 1 and biases to 0.
    - cond_dim: y is a vector [N, cond_dim] (BigGAN's ccbn: a shared class embedding, possibly
      concatenated with a chunk of z); gain = 1 + gain(y), bias = bias(y), where `gain` and `bias`
      are linear(cond_dim, num_features) (nn.Linear by default; pass BigGAN's SNLinear to match
      its checkpoints, whose keys are gain.* and bias.*).
    The normalisation has no affine of its own. Running statistics as nn.BatchNorm2d(affine=False):
    running_mean, running_var, num_batches_tracked; momentum=None is a cumulative average.
    (BigGAN names them stored_mean / stored_var and has no num_batches_tracked.)
    """

    def __init__(self, num_features: int, num_classes: int | None = None, cond_dim: int | None = None,
                 eps: float = 1e-5, momentum: float | None = 0.1, *, track_running_stats: bool = True,
                 linear: Callable[[int, int], nn.Module] = nn.Linear, impl: str | None = None) -> None:
        super().__init__()
        if (num_classes is None) == (cond_dim is None):
            raise ValueError("pass exactly one of num_classes (class-embedding gains) and cond_dim (gains linear in a "
                             f"condition vector), got num_classes={num_classes!r}, cond_dim={cond_dim!r}")
        for name, value in (("num_features", num_features), ("num_classes", num_classes), ("cond_dim", cond_dim)):
            if value is not None and not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_features, self.num_classes, self.cond_dim = num_features, num_classes, cond_dim
        self.eps, self.momentum, self.track_running_stats = eps, momentum, track_running_stats
        self.impl = _check_impl(impl)
        if num_classes is not None:
            self.gain = nn.Embedding(num_classes, num_features)
            self.bias = nn.Embedding(num_classes, num_features)
            nn.init.ones_(self.gain.weight)
            nn.init.zeros_(self.bias.weight)
        else:
            self.gain = linear(cond_dim, num_features)
            self.bias = linear(cond_dim, num_features)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def gain_and_bias(self, y: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-sample affine (gamma, beta), each [N, num_features], for a batch of N samples."""
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a torch.Tensor (the condition), got {type(y).__name__}")
        if self.num_classes is not None:
            if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"y must be class indices of shape [N] and an integer dtype, got shape "
                                 f"{tuple(y.shape)} and dtype {y.dtype}")
        elif y.dim() != 2 or y.shape[1] != self.cond_dim or not y.is_floating_point():
            raise ValueError(f"y must be a floating-point condition of shape [N, {self.cond_dim}], got shape "
                             f"{tuple(y.shape)} and dtype {y.dtype}")
        if y.shape[0] != batch:
            raise ValueError(f"y has {y.shape[0]} samples but the input has {batch}")
        if self.num_classes is not None:
            return self.gain(y), self.bias(y)
        return 1 + self.gain(y), self.bias(y)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a 4-dim tensor [N, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"x has {x.shape[1]} channels but the norm has num_features={self.num_features}")
        args = norm_arguments(self, y, x.shape[0])
        return GF.norm_mask_act(x, activation=None, impl=self.impl, **args)

    def extra_repr(self) -> str:
        condition = f"num_classes={self.num_classes}" if self.num_classes is not None else f"cond_dim={self.cond_dim}"
        return (f"{self.num_features}, {condition}, eps={self.eps}, momentum={self.momentum}, "
                f"track_running_stats={self.track_running_stats}" + (f", impl={self.impl!r}" if self.impl else ""))


# --- conv + norm + mask + activation -------------------------------------------------------------

NORM_TYPES = (nn.BatchNorm2d, nn.InstanceNorm2d, ConditionalBatchNorm2d)


class MaskedConvNormAct(nn.Module):
    """act(mask[c] * norm(conv(x))[c]) as one module running one fused op.

    Submodules: `conv` (nn.Conv2d or nn.ConvTranspose2d), `norm` (nn.BatchNorm2d, nn.InstanceNorm2d,
    ConditionalBatchNorm2d or None) and `mask` (a gansparse.masks.Mask or None); `activation` is
    'relu', 'leaky_relu' (with `negative_slope`) or None. forward(x, y=None): y is the condition of a
    ConditionalBatchNorm2d. The mask comes after the norm's affine and before the activation, where
    PPCD-GAN and DMAD put it, so a channel masked to 0 outputs exactly act(0).

    Built directly (norm 'batch', 'instance' or 'none'; num_classes or cond_dim make 'batch'
    conditional; affine is the per-channel affine of 'batch' and 'instance'), or with
    from_modules(conv, norm, act, mask) around existing torch modules, whose parameters and
    running statistics it then uses and updates exactly as they would.
    Transposed convolutions run with their output_padding; forward takes no output_size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, transposed: bool = False,
                 output_padding=0, norm: str = "batch", affine: bool = True, num_classes: int | None = None,
                 cond_dim: int | None = None, eps: float = 1e-5, momentum: float | None = 0.1,
                 mask: str | Mask | None = None, activation: str | None = "relu", negative_slope: float = 0.2,
                 impl: str | None = None) -> None:
        super().__init__()
        if transposed:
            conv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups,
                                      bias, dilation, padding_mode)
        else:
            conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                             padding_mode)
        conditional = num_classes is not None or cond_dim is not None
        if conditional and norm != "batch":
            raise ValueError(f"num_classes / cond_dim make a conditional batch norm, but norm={norm!r}")
        if norm == "batch":
            norm_module = (ConditionalBatchNorm2d(out_channels, num_classes, cond_dim, eps, momentum, impl=impl)
                           if conditional else nn.BatchNorm2d(out_channels, eps, momentum, affine))
        elif norm == "instance":
            norm_module = nn.InstanceNorm2d(out_channels, eps, affine=affine)
        elif norm == "none":
            norm_module = None
        else:
            raise ValueError(f"norm must be one of ('batch', 'instance', 'none'), got {norm!r}")
        if activation not in ("relu", "leaky_relu", None):
            raise ValueError(f"activation must be one of ('relu', 'leaky_relu', None), got {activation!r}")
        self._attach(conv, norm_module, activation, negative_slope, mask, impl)

    @classmethod
    def from_modules(cls, conv: nn.Module, norm: nn.Module | None = None, act: nn.Module | None = None,
                     mask: str | Mask | None = None, *, impl: str | None = None) -> MaskedConvNormAct:
        """The fused equivalent of nn.Sequential(conv, norm, act), using those very modules (and
        so their parameters and buffers), with `mask` between the norm and the activation.

        conv: nn.Conv2d or nn.ConvTranspose2d. norm: nn.BatchNorm2d, nn.InstanceNorm2d without
        running statistics, ConditionalBatchNorm2d, or None. act: nn.ReLU, nn.LeakyReLU,
        nn.Identity or None.
        """
        if isinstance(act, nn.ReLU):
            activation, negative_slope = "relu", 0.2
        elif isinstance(act, nn.LeakyReLU):
            activation, negative_slope = "leaky_relu", act.negative_slope
        elif act is None or isinstance(act, nn.Identity):
            activation, negative_slope = None, 0.2
        else:
            raise TypeError(f"act must be nn.ReLU, nn.LeakyReLU, nn.Identity or None, got {type(act).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._attach(conv, norm, activation, negative_slope, mask, impl)
        return layer

    def _attach(self, conv, norm, activation, negative_slope, mask, impl) -> None:
        if not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
            raise TypeError(f"conv must be an nn.Conv2d or nn.ConvTranspose2d, got {type(conv).__name__}")
        if getattr(conv, "mask", None) is not None:
            raise ValueError("conv already has a mask: pass it as mask= instead")
        if norm is not None:
            if not isinstance(norm, NORM_TYPES):
                raise TypeError("norm must be nn.BatchNorm2d, nn.InstanceNorm2d, ConditionalBatchNorm2d or None, "
                                f"got {type(norm).__name__}")
            if norm.num_features != conv.out_channels:
                raise ValueError(f"norm has {norm.num_features} features but conv has {conv.out_channels} output "
                                 "channels")
            if isinstance(norm, nn.InstanceNorm2d) and norm.track_running_stats:
                raise ValueError("norm: nn.InstanceNorm2d with track_running_stats=True is not supported")
        self.conv, self.norm = conv, norm
        self.mask = as_mask(mask, conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)
        self.activation, self.negative_slope = activation, float(negative_slope)
        self.impl = _check_impl(impl)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self.norm, ConditionalBatchNorm2d) and y is None:
            raise ValueError("y (the condition of the conditional batch norm) is required")
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a 4-dim tensor [N, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
        x, conv_args = _conv_arguments(self.conv, x)
        mask = self.mask() if self.mask is not None else None
        return GF.masked_conv_norm_act(
            x, self.conv.weight, self.conv.bias, mask, **norm_arguments(self.norm, y, x.shape[0]), **conv_args,
            activation=self.activation, negative_slope=self.negative_slope, impl=self.impl,
        )

    def extra_repr(self) -> str:
        activation = self.activation + (f"({self.negative_slope})" if self.activation == "leaky_relu" else "") \
            if self.activation else None
        return f"activation={activation!r}" + (f", impl={self.impl!r}" if self.impl else "")
