"""Fused masked conv + (conditional) norm + affine + mask + activation.

    out = act(mask[c] * (gamma * norm(conv(x)) + beta))

PPCD-GAN puts a learnable mask before the ReLU that follows each conv with class-conditional BN;
DMAD masks each conv's output after its norm and before its ReLU. Because the mask comes after
the affine, a channel masked to 0 outputs exactly 0.

Backends:
- ref: the eager composition (conv_norm_act_ref.py), the oracle.
- cpu / cuda: the conv through at::convolution (oneDNN / cuDNN), then the compiled epilogue op
  gansparse::norm_mask_act, which computes the statistics, normalises, applies the affine, the
  mask and the activation in one pass and writes once; its backward is one fused op too. Only
  the conv output is saved for backward.
- triton: an implicit-GEMM conv with the epilogue fused in (kernels/conv_norm_act.py).

The epilogue op family, shared by the compiled and Triton backends:
    norm_mask_act(y, mask?, gamma?, beta?, mean?, invstd?, stats, eps, activation, negative_slope)
        -> (out, mean, invstd)
    stats: 'batch' computes per-channel statistics over (N, H, W) and returns mean, invstd [C];
           'instance' computes them per (n, c) and returns [N, C]; 'given' uses the mean and
           invstd passed in ([C], batch norm in eval) and returns empty tensors; 'none' does not
           normalise and returns empty tensors. invstd = 1 / sqrt(biased var + eps).
    activation: 'relu', 'leaky_relu' or 'none'.
    out has y's layout, as torch.empty_like(y) gives it; mean and invstd have y's dtype.
    norm_mask_act_backward(grad_out, y, mask?, gamma?, beta?, mean, invstd, stats, activation,
        negative_slope, output_mask[4]) -> (grad_y, grad_mask, grad_gamma, grad_beta)
        Gradients output_mask does not ask for are empty tensors.
The compiled backends also have norm_mask_act_(y, ...) -> (mean, invstd), which writes the output
over y; masked_conv_norm_act uses it for the conv output when nothing needs a gradient.
"""
from __future__ import annotations

import functools

import torch
from torch.nn.modules.utils import _pair

from .. import _dispatch, _ext
from .conv_norm_act_ref import conv_ref, norm_mask_act_ref

NORMS = ("batch", "instance", "none")
ACTIVATIONS = ("relu", "leaky_relu", None)


# --- autograd of the compiled and Triton epilogue ops --------------------------------------


def _setup_context(ctx, inputs, output):
    y, mask, gamma, beta, mean_in, invstd_in, stats, _eps, activation, negative_slope = inputs
    _out, mean_out, invstd_out = output
    mean, invstd = (mean_in, invstd_in) if stats == "given" else (mean_out, invstd_out)
    ctx.save_for_backward(y, mask, gamma, beta, mean, invstd)
    ctx.stats, ctx.activation, ctx.negative_slope = stats, activation, negative_slope


def _backward_through(backward_op):
    def backward(ctx, grad_out, _grad_mean, _grad_invstd):
        y, mask, gamma, beta, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        output_mask = [needs[0], needs[1] and mask is not None, needs[2] and gamma is not None,
                       needs[3] and beta is not None]
        grad_y, grad_mask, grad_gamma, grad_beta = backward_op(
            grad_out, y, mask, gamma, beta, mean, invstd, ctx.stats, ctx.activation,
            ctx.negative_slope, output_mask,
        )
        grads = [g if wanted else None for g, wanted in zip((grad_y, grad_mask, grad_gamma, grad_beta), output_mask)]
        return (*grads, None, None, None, None, None, None)

    return backward


STATS = ("batch", "instance", "given", "none")
OP_ACTIVATIONS = ("relu", "leaky_relu", "none")


def _check_op_args(y, mask, gamma, beta, stats, activation, statistics=()) -> None:
    """What the compiled epilogue ops check, for their fake kernels: those also run for real
    tensors whenever one input is on the meta device, where a silent result would be garbage."""
    if y.dim() != 4 or not y.is_floating_point() or y.numel() == 0:
        raise ValueError(f"y must be a non-empty floating-point [N, C, H, W] tensor, got {y.dtype} {tuple(y.shape)}")
    if stats not in STATS:
        raise ValueError(f"stats must be one of {STATS}, got {stats!r}")
    if activation not in OP_ACTIVATIONS:
        raise ValueError(f"activation must be one of {OP_ACTIVATIONS}, got {activation!r}")
    c = y.shape[1]
    for name, t in (("mask", mask), ("gamma", gamma), ("beta", beta), *statistics):
        if t is None:
            continue
        if t.device != y.device:
            raise ValueError(f"{name} is on {t.device} but y is on {y.device}")
        if t.dim() not in (1, 2) or t.shape[-1] != c:
            raise ValueError(f"{name} must have {c} channels in its last dim, got shape {tuple(t.shape)}")


def _check_forward_args(y, mask, gamma, beta, mean, invstd, stats, activation) -> None:
    if stats == "given" and (mean is None or invstd is None):
        raise ValueError("stats='given' needs mean and invstd")
    _check_op_args(y, mask, gamma, beta, stats, activation, statistics=(("mean", mean), ("invstd", invstd)))


def _fake_statistics(y, stats):
    """The (mean, invstd) an epilogue op returns."""
    n, c = y.shape[0], y.shape[1]
    shape = {"batch": (c,), "instance": (n, c)}.get(stats, (0,))
    return y.new_empty(shape), y.new_empty(shape)


def register_epilogue(forward_name: str, backward_op) -> None:
    """Fake kernel and autograd of an epilogue op with the norm_mask_act schema."""

    def fake(y, mask, gamma, beta, mean, invstd, stats, eps, activation, negative_slope):
        _check_forward_args(y, mask, gamma, beta, mean, invstd, stats, activation)
        return torch.empty_like(y), *_fake_statistics(y, stats)

    torch.library.register_fake(forward_name)(fake)
    torch.library.register_autograd(forward_name, _backward_through(backward_op), setup_context=_setup_context)


@functools.cache
def compiled_ops():
    """torch.ops.gansparse.norm_mask_act{,_backward} with fake kernels and autograd registered
    (and the fake kernel of norm_mask_act_), or None without the compiled extension."""
    if _ext.extension() is None or not hasattr(torch.ops.gansparse, "norm_mask_act_"):
        return None
    ops = torch.ops.gansparse

    def fake_inplace(y, mask, gamma, beta, mean, invstd, stats, eps, activation, negative_slope):
        _check_forward_args(y, mask, gamma, beta, mean, invstd, stats, activation)
        return _fake_statistics(y, stats)

    def fake_backward(grad_out, y, mask, gamma, beta, mean, invstd, stats, activation, negative_slope, output_mask):
        # Without normalisation the saved statistics are empty tensors.
        statistics = (("mean", mean), ("invstd", invstd)) if stats != "none" else ()
        _check_op_args(y, mask, gamma, beta, stats, activation, statistics)
        if grad_out.shape != y.shape or grad_out.device != y.device:
            raise ValueError(f"grad_out must match y ({tuple(y.shape)} on {y.device}), "
                             f"got {tuple(grad_out.shape)} on {grad_out.device}")
        # Gradients not asked for in output_mask are empty tensors.
        def like(t, wanted):
            return torch.empty_like(t) if wanted and t is not None else y.new_empty((0,))

        return tuple(like(t, wanted) for t, wanted in zip((y, mask, gamma, beta), output_mask))

    torch.library.register_fake("gansparse::norm_mask_act_")(fake_inplace)
    torch.library.register_fake("gansparse::norm_mask_act_backward")(fake_backward)
    register_epilogue("gansparse::norm_mask_act", ops.norm_mask_act_backward)
    return ops.norm_mask_act, ops.norm_mask_act_backward


@_dispatch.trace_time_constant
def _backend(op: str, device: torch.device, impl: str | None) -> str:
    """The backend that runs `op` for tensors on `device`, with its ops registered."""
    backend = _dispatch.select(op, device, impl, compiled_op="norm_mask_act_")  # the newest compiled op
    if backend == "triton":
        from ..kernels import conv_norm_act  # noqa: F401  (registers the Triton ops)
    elif backend != "ref":
        compiled_ops()
    return backend


# --- validation ----------------------------------------------------------------------------


def _check_tensor(t, name: str, dims: tuple[int, ...], *, channels: int | None = None,
                  batch: int | None = None, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {like.device}")
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the input has dtype {like.dtype}")
    if channels is not None and t.shape[-1] != channels:
        raise ValueError(f"{name} must have {channels} channels in its last dim, got shape {tuple(t.shape)}")
    if batch is not None and t.dim() == 2 and t.shape[0] != batch:
        raise ValueError(f"{name} is per-sample with {t.shape[0]} rows but the batch has {batch} samples")


def _check_epilogue_args(y, mask, gamma, beta, running_mean, running_var, norm, training, momentum, eps, activation):
    _check_tensor(y, "input", (4,))
    if y.numel() == 0:
        raise ValueError(f"input must not be empty, got shape {tuple(y.shape)}")
    n, c = y.shape[0], y.shape[1]
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if mask is not None:
        _check_tensor(mask, "mask", (1,), channels=c, like=y)
    for name, t in (("gamma", gamma), ("beta", beta)):
        if t is not None:
            _check_tensor(t, name, (1, 2), channels=c, batch=n, like=y)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if running_mean is not None:
        if norm != "batch":
            raise ValueError(f"running statistics are only used with norm='batch', got norm={norm!r}")
        _check_tensor(running_mean, "running_mean", (1,), channels=c, like=y)
        _check_tensor(running_var, "running_var", (1,), channels=c, like=y)
        if not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
            raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    if norm == "batch" and (training or running_mean is None) and y.numel() // c <= 1:
        raise ValueError(f"batch norm needs more than one value per channel in training, got input shape {tuple(y.shape)}")


# --- running statistics --------------------------------------------------------------------


@torch.no_grad()
def _update_running_stats(running_mean, running_var, mean, invstd, eps, momentum, count):
    """nn.BatchNorm2d's update: the unbiased batch variance enters running_var."""
    var = (invstd.double().pow(-2) - eps).clamp_min_(0)
    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    running_var.lerp_((var * count / (count - 1)).to(running_var.dtype), momentum)


# --- public API ----------------------------------------------------------------------------


def norm_mask_act(
    y: torch.Tensor,
    mask: torch.Tensor | None = None,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    *,
    norm: str = "batch",
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | None = "relu",
    negative_slope: float = 0.2,
    impl: str | None = None,
) -> torch.Tensor:
    """act(mask[c] * (gamma * norm(y) + beta)) for y [N, C, H, W], in one pass.

    norm: 'batch' (batch statistics in training, or when there are no running statistics;
        running statistics in eval, updated in training exactly as nn.BatchNorm2d), 'instance'
        or 'none'.
    gamma, beta: per channel [C], or per sample [N, C] (class-conditional BN); None for 1 and 0.
    mask: per channel [C], applied after the affine; None for no mask.
    activation: 'relu', 'leaky_relu' (with negative_slope) or None.
    """
    _check_epilogue_args(y, mask, gamma, beta, running_mean, running_var, norm, training, momentum, eps, activation)
    backend = _backend("norm_mask_act", y.device, impl)
    return _epilogue(backend, y, mask, gamma, beta, running_mean, running_var, norm=norm, training=training,
                     momentum=momentum, eps=eps, activation=activation, negative_slope=negative_slope)


def _epilogue(backend, y, mask, gamma, beta, running_mean, running_var, *, norm, training, momentum, eps,
              activation, negative_slope, overwrite=False):
    """norm_mask_act of checked arguments on `backend`. With `overwrite`, a compiled backend writes
    the output over y, which the caller owns and which nothing needs a gradient through."""
    if backend == "ref":
        return norm_mask_act_ref(
            y, mask, gamma, beta, running_mean, running_var, norm=norm, training=training,
            momentum=momentum, eps=eps, activation=activation, negative_slope=negative_slope,
        )
    stats, mean, invstd = _stats_mode(norm, training, running_mean, running_var, eps)
    args = (mask, gamma, beta, mean, invstd, stats, float(eps), activation or "none", float(negative_slope))
    if backend == "triton":
        from ..kernels import conv_norm_act as triton_kernels

        out, batch_mean, batch_invstd = triton_kernels.norm_mask_act(y, *args)
    elif overwrite:
        out = y
        batch_mean, batch_invstd = torch.ops.gansparse.norm_mask_act_(y, *args)
    else:
        out, batch_mean, batch_invstd = torch.ops.gansparse.norm_mask_act(y, *args)
    if stats == "batch" and running_mean is not None:
        _update_running_stats(running_mean, running_var, batch_mean, batch_invstd, eps, momentum, y.numel() // y.shape[1])
    return out


def _stats_mode(norm, training, running_mean, running_var, eps):
    """(stats, mean, invstd) arguments of the epilogue op."""
    if norm == "instance":
        return "instance", None, None
    if norm == "none":
        return "none", None, None
    if training or running_mean is None:
        return "batch", None, None
    return "given", running_mean, torch.rsqrt(running_var + eps)


def masked_conv_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    *,
    norm: str = "batch",
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    transposed: bool = False,
    output_padding=0,
    activation: str | None = "relu",
    negative_slope: float = 0.2,
    impl: str | None = None,
) -> torch.Tensor:
    """act(mask[c] * (gamma * norm(conv(x)) + beta)): conv2d, or conv_transpose2d when
    `transposed`, followed by norm_mask_act (see there). weight is [C_out, C_in/groups, kH, kW],
    or [C_in, C_out/groups, kH, kW] when transposed, as in torch.nn."""
    _check_tensor(x, "x", (4,))
    _check_tensor(weight, "weight", (4,), like=x)
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    in_channels = weight.shape[0] if transposed else weight.shape[1] * groups
    if x.shape[1] != in_channels:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects {in_channels} (groups={groups})")
    out_channels = weight.shape[1] * groups if transposed else weight.shape[0]
    if bias is not None:
        _check_tensor(bias, "bias", (1,), channels=out_channels, like=x)
    conv_args = dict(stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation), groups=groups,
                     transposed=transposed, output_padding=_pair(output_padding))
    backend = _backend("masked_conv_norm_act", x.device, impl)
    if backend == "triton":
        from ..kernels import conv_norm_act as triton_kernels

        # The Triton kernel fuses the conv, so the epilogue's arguments are checked against the
        # shape the conv output will have (a meta conv also checks the conv's own arguments).
        y_shape = conv_ref(x.detach().to("meta"), weight.detach().to("meta"), None, **conv_args).shape
        _check_epilogue_args(x.new_empty(()).expand(y_shape), mask, gamma, beta, running_mean, running_var,
                             norm, training, momentum, eps, activation)
        return triton_kernels.masked_conv_norm_act(
            x, weight, bias, mask, gamma, beta, running_mean, running_var, norm=norm, training=training,
            momentum=momentum, eps=eps, activation=activation, negative_slope=negative_slope, **conv_args,
        )
    y = conv_ref(x, weight, bias, **conv_args)
    _check_epilogue_args(y, mask, gamma, beta, running_mean, running_var, norm, training, momentum, eps, activation)
    # y is this call's own temporary: when nothing needs a gradient (inference), the epilogue
    # writes over it instead of allocating the output.
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (y, mask, gamma, beta))
    return _epilogue(backend, y, mask, gamma, beta, running_mean, running_var, norm=norm, training=training,
                     momentum=momentum, eps=eps, activation=activation, negative_slope=negative_slope,
                     overwrite=not needs_grad)


def masked_conv_cbn_relu(x, weight, bias, mask, gamma, beta, running_mean=None, running_var=None, **kwargs):
    """masked_conv_norm_act with batch norm and ReLU, the PPCD-GAN block: gamma and beta [N, C]
    from a class embedding make it class-conditional."""
    return masked_conv_norm_act(x, weight, bias, mask, gamma, beta, running_mean, running_var, **kwargs)
