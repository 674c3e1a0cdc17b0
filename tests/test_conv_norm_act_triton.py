"""The Triton backend of norm_mask_act and masked_conv_norm_act against the reference, forward and
every gradient, run in the Triton interpreter on tiny shapes."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import gansparse.functional as GF  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="the Triton tests run CPU tensors in the interpreter: TRITON_INTERPRET=1 must be set before triton is imported",
    ),
]

# atol covers gradients that cancel to about 0 (the conv bias under batch norm): their rounding
# error is that of a sum over N*H*W terms.
TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-9, atol=1e-10)}

# (norm, training, with running statistics): batch norm in training (updating the running
# statistics), in eval (the running statistics), without running statistics, instance norm, none.
NORMS = {
    "batch_train": ("batch", True, True),
    "batch_eval": ("batch", False, True),
    "batch_no_running": ("batch", True, False),
    "instance": ("instance", True, False),
    "none": ("none", True, False),
}
AFFINES = ("none", "per_channel", "per_sample")
ACTIVATIONS = ("relu", "leaky_relu", None)


def _epilogue_inputs(n: int, c: int, affine: str, with_mask: bool, dtype: torch.dtype, generator) -> dict:
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, generator=generator)

    shape = {"none": None, "per_channel": (c,), "per_sample": (n, c)}[affine]
    mask = torch.rand(c, dtype=dtype, generator=generator) if with_mask else None
    if mask is not None:
        mask[0] = 0.0  # a pruned channel
    return dict(mask=mask, gamma=randn(*shape) if shape else None, beta=randn(*shape) if shape else None)


def _running_stats(c: int, dtype: torch.dtype, generator) -> dict:
    return dict(running_mean=torch.randn(c, dtype=dtype, generator=generator),
                running_var=torch.rand(c, dtype=dtype, generator=generator) + 0.5)


def _run(op, tensors: dict, options: dict, impl: str, upstream_seed: int | None):
    """op's output, the gradients of its tensor arguments and the running statistics after the
    call, on fresh copies of the inputs. The upstream gradient is drawn from `upstream_seed`, so
    both backends get the same one; None backpropagates out.sum(), a broadcast gradient."""
    leaves = {name: t.detach().clone().requires_grad_(not name.startswith("running"))
              for name, t in tensors.items() if t is not None}
    out = op(**leaves, **options, impl=impl)
    if upstream_seed is None:
        out.sum().backward()
    else:
        out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(upstream_seed)))
    grads = {name: t.grad for name, t in leaves.items() if not name.startswith("running")}
    running = {name: t for name, t in leaves.items() if name.startswith("running")}
    return out, grads, running


def _check_against_reference(op, tensors: dict, options: dict, dtype: torch.dtype, upstream_seed: int | None = 0):
    ref_out, ref_grads, ref_running = _run(op, tensors, options, "ref", upstream_seed)
    out, grads, running = _run(op, tensors, options, "triton", upstream_seed)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref_out, **tol)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=lambda m, name=name: f"grad of {name}: {m}")
    for name in running:
        torch.testing.assert_close(running[name], ref_running[name], **tol, msg=lambda m, name=name: f"{name}: {m}")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("norm_case", NORMS)
def test_norm_mask_act_matches_reference(norm_case, affine, dtype):
    norm, training, with_running = NORMS[norm_case]
    # Spread the masks and activations over the norm x affine grid.
    index = list(NORMS).index(norm_case) + AFFINES.index(affine)
    generator = torch.Generator().manual_seed(index)
    n, c = 2, 5
    tensors = dict(y=3 * torch.randn(n, c, 5, 7, dtype=dtype, generator=generator) + 1,
                   **_epilogue_inputs(n, c, affine, index % 2 == 0, dtype, generator))
    if with_running:
        tensors.update(_running_stats(c, dtype, generator))
    options = dict(norm=norm, training=training, activation=ACTIVATIONS[index % 3], negative_slope=0.1)
    _check_against_reference(GF.norm_mask_act, tensors, options, dtype)


def test_norm_mask_act_channels_last_batch_one_and_broadcast_gradient():
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(1, 6, 5, 7, generator=generator).to(memory_format=torch.channels_last)
    tensors = dict(y=y, **_epilogue_inputs(1, 6, "per_sample", True, torch.float32, generator))
    for norm in ("batch", "instance"):
        options = dict(norm=norm, activation="leaky_relu")
        out = _check_against_reference(GF.norm_mask_act, tensors, options, torch.float32, upstream_seed=None)
        assert out.is_contiguous(memory_format=torch.channels_last)


# name: (x shape, weight shape, conv options)
CONVS = {
    "k3_pad1": ((2, 3, 5, 7), (4, 3, 3, 3), dict(padding=1)),
    "k1": ((2, 5, 5, 7), (6, 5, 1, 1), dict()),
    "stride2": ((2, 4, 5, 7), (8, 4, 3, 3), dict(stride=2, padding=1)),
    "dilation2": ((2, 3, 5, 7), (4, 3, 3, 3), dict(padding=2, dilation=2)),
    "groups2": ((2, 4, 5, 7), (6, 2, 3, 3), dict(padding=1, groups=2)),
    "groups2_wide": ((2, 4, 5, 7), (32, 2, 3, 3), dict(padding=1, groups=2)),
    "depthwise_stride2": ((2, 6, 5, 7), (6, 1, 3, 3), dict(stride=2, padding=1, groups=6)),
    "transposed_k4_stride2": ((2, 6, 5, 7), (6, 4, 4, 4), dict(stride=2, padding=1, transposed=True)),
    "transposed_k3_output_padding": ((2, 6, 5, 7), (6, 4, 3, 3),
                                     dict(stride=2, padding=1, output_padding=1, transposed=True)),
    "transposed_groups_dilation": ((2, 6, 5, 7), (6, 3, 3, 3),
                                   dict(stride=2, padding=1, dilation=2, output_padding=1, groups=2, transposed=True)),
    "batch1": ((1, 3, 5, 7), (4, 3, 3, 3), dict(padding=1)),
    "channels_last": ((2, 8, 5, 7), (4, 8, 3, 3), dict(stride=2, padding=1)),
}


def _conv_inputs(conv: str, affine: str, with_mask: bool, with_running: bool, dtype, generator) -> tuple[dict, dict]:
    x_shape, w_shape, conv_options = CONVS[conv]
    groups, transposed = conv_options.get("groups", 1), conv_options.get("transposed", False)
    c_out = w_shape[1] * groups if transposed else w_shape[0]
    x = torch.randn(x_shape, dtype=dtype, generator=generator)
    if conv == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    tensors = dict(x=x, weight=torch.randn(w_shape, dtype=dtype, generator=generator) / 3,
                   bias=torch.randn(c_out, dtype=dtype, generator=generator),
                   **_epilogue_inputs(x_shape[0], c_out, affine, with_mask, dtype, generator))
    if with_running:
        tensors.update(_running_stats(c_out, dtype, generator))
    return tensors, conv_options


@pytest.mark.parametrize("norm_case", ["batch_train", "batch_eval", "instance", "none"])
@pytest.mark.parametrize("conv", CONVS)
def test_masked_conv_norm_act_matches_reference(conv, norm_case):
    norm, training, with_running = NORMS[norm_case]
    # Spread the affines, masks and activations over the conv x norm grid.
    index = list(CONVS).index(conv) + list(NORMS).index(norm_case)
    generator = torch.Generator().manual_seed(index)
    tensors, conv_options = _conv_inputs(conv, AFFINES[index % 3], index % 4 != 3, with_running,
                                         torch.float32, generator)
    options = dict(norm=norm, training=training, activation=ACTIVATIONS[index // 3 % 3], **conv_options)
    out = _check_against_reference(GF.masked_conv_norm_act, tensors, options, torch.float32)
    if conv == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("conv", ["stride2", "depthwise_stride2", "transposed_k4_stride2"])
def test_masked_conv_norm_act_float64(conv):
    generator = torch.Generator().manual_seed(1)
    tensors, conv_options = _conv_inputs(conv, "per_sample", True, True, torch.float64, generator)
    options = dict(norm="batch", training=True, activation="leaky_relu", **conv_options)
    _check_against_reference(GF.masked_conv_norm_act, tensors, options, torch.float64)


@pytest.mark.parametrize("norm_case", ["batch_train", "none"])
def test_masked_conv_norm_act_float16_forward(norm_case):
    """float16 tensors, float32 accumulation: within float16 rounding of the float32 reference."""
    norm, training, with_running = NORMS[norm_case]
    generator = torch.Generator().manual_seed(6)
    tensors, conv_options = _conv_inputs("stride2", "per_sample", True, with_running, torch.float32, generator)
    options = dict(norm=norm, training=training, activation="leaky_relu", **conv_options)
    halves = {name: t.half() for name, t in tensors.items() if t is not None}
    upcast = {name: t.float() for name, t in halves.items()}
    out = GF.masked_conv_norm_act(**halves, **options, impl="triton")
    ref = GF.masked_conv_norm_act(**upcast, **options, impl="ref")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    for name in ("running_mean", "running_var") if with_running else ():
        torch.testing.assert_close(halves[name].float(), upcast[name], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("norm_case", ["batch_eval", "none"])
def test_masked_conv_norm_act_inference_in_one_pass(norm_case):
    """Without autograd, fixed statistics take the one-pass path that keeps no conv output."""
    norm, training, with_running = NORMS[norm_case]
    generator = torch.Generator().manual_seed(2)
    tensors, conv_options = _conv_inputs("stride2", "per_channel", True, with_running, torch.float32, generator)
    options = dict(norm=norm, training=training, activation="relu", **conv_options)
    with torch.no_grad():
        out = GF.masked_conv_norm_act(**tensors, **options, impl="triton")
        ref = GF.masked_conv_norm_act(**tensors, **options, impl="ref")
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.float32])


def test_masked_channel_is_exactly_zero():
    generator = torch.Generator().manual_seed(3)
    tensors, conv_options = _conv_inputs("k3_pad1", "per_channel", True, False, torch.float32, generator)
    out = GF.masked_conv_norm_act(**tensors, norm="instance", activation="leaky_relu", **conv_options, impl="triton")
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))


def test_triton_ops_pass_opcheck():
    import gansparse.kernels.conv_norm_act as kernels

    # The interpreter's kernels cannot be traced, so the AOT-dispatch check of opcheck cannot run here.
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    generator = torch.Generator().manual_seed(4)
    y = torch.randn(2, 4, 3, 5, generator=generator, requires_grad=True)
    gamma = torch.randn(2, 4, generator=generator, requires_grad=True)
    mask = torch.rand(4, generator=generator, requires_grad=True)
    torch.library.opcheck(kernels.norm_mask_act, (y, mask, gamma, None, None, None, "instance", 1e-5, "relu", 0.0),
                          test_utils=checks)
    mean, invstd = torch.randn(4, generator=generator), torch.rand(4, generator=generator) + 0.5
    torch.library.opcheck(kernels.norm_mask_act_backward, (
        torch.randn(2, 4, 3, 5, generator=generator), y.detach(), mask, gamma, None, mean, invstd, "batch",
        "leaky_relu", 0.2, [True, True, True, False]), test_utils=checks)
    x = torch.randn(2, 3, 5, 7, generator=generator, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, generator=generator, requires_grad=True)
    torch.library.opcheck(kernels.conv_norm_mask_act, (
        x, weight, None, mask, gamma, None, None, None, "batch", 1e-5, "leaky_relu", 0.2,
        [2, 1], [1, 1], [1, 1], 1, False, [0, 0], True), test_utils=checks)


def test_bad_epilogue_arguments_raise():
    generator = torch.Generator().manual_seed(5)
    tensors, conv_options = _conv_inputs("k3_pad1", "none", False, False, torch.float32, generator)
    with pytest.raises(ValueError, match="norm must be one of"):
        GF.masked_conv_norm_act(**tensors, norm="group", **conv_options, impl="triton")
    with pytest.raises(ValueError, match="mask must have 4 channels"):
        GF.masked_conv_norm_act(**tensors | dict(mask=torch.ones(3)), **conv_options, impl="triton")
