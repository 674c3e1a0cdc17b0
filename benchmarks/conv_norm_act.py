"""Fused masked conv + norm + mask + activation: the compiled CPU backend (B, `impl='cpu'`: the conv
through at::convolution, then the one-pass epilogue gansparse::norm_mask_act, written over the conv
output in eval) against the eager
reference (A, `impl='ref'`: F.conv2d, F.batch_norm / F.instance_norm, torch.addcmul for the
per-sample affine, * mask, relu), the composition the tests check B against. Beside it: the conv
alone (at::convolution on the same input, the floor of any conv + epilogue that does not fuse
into the conv itself) and torch.compile of the eager reference.

Eval is one forward without autograd, with running statistics for batch norm. Training is one
step: forward, then backward of a fixed upstream gradient into x, weight, bias, mask, gamma and
beta, with the gradients reset to None first (as `optimizer.zero_grad()` does); batch norm uses
batch statistics and updates its running statistics.

Run: python -m benchmarks.conv_norm_act
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import gansparse.functional as GF
from gansparse import _ext

from . import harness

BASELINE, CANDIDATE = "ref", "cpu"
ROUNDS = 9
COMMAND = "python -m benchmarks.conv_norm_act"

# Targets, as ratios A/B ("how many times faster B is").
EVAL_VS_EAGER = 1.0  # never slower than eager
EVAL_VS_CONV = 1 / 1.10  # at most 1.10x the conv alone
TRAIN_VS_EAGER = 1.0
TRAIN_VS_EAGER_1X1 = 1.6
TRAIN_VS_CONV = 1 / 1.15
PEAK_MEMORY_RATIO = 0.75  # fused peak / eager peak, training


@dataclass(frozen=True)
class Layer:
    name: str
    n: int
    in_channels: int
    out_channels: int
    size: int  # input height and width
    kernel: int
    norm: str
    stride: int = 1
    transposed: bool = False
    per_sample_affine: bool = False  # class-conditional BN: gamma, beta [N, C]

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def output_padding(self) -> int:
        return self.stride - 1 if self.transposed else 0

    @property
    def out_size(self) -> int:
        if self.transposed:
            return (self.size - 1) * self.stride - 2 * self.padding + self.kernel + self.output_padding
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    def conv_args(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, transposed=self.transposed,
                    output_padding=self.output_padding)


LAYERS = [
    Layer("SA-GAN/BigGAN block", 8, 256, 256, 32, 3, "batch", per_sample_affine=True),
    Layer("PPCD transition 1x1", 8, 256, 256, 32, 1, "batch", per_sample_affine=True),
    Layer("CycleGAN residual", 1, 256, 256, 64, 3, "instance"),
    Layer("CycleGAN downsampling", 1, 128, 256, 128, 3, "instance", stride=2),
    Layer("CycleGAN upsampling", 1, 256, 128, 64, 3, "instance", stride=2, transposed=True),
]
LAYERS_BY_NAME = {layer.name: layer for layer in LAYERS}


# --- inputs and the calls measured ---------------------------------------------------------------


def inputs(layer: Layer, channels_last: bool, training: bool, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = randn(layer.n, layer.in_channels, layer.size, layer.size).contiguous(memory_format=memory_format)
    weight_shape = ((layer.in_channels, layer.out_channels) if layer.transposed
                    else (layer.out_channels, layer.in_channels))
    weight = randn(*weight_shape, layer.kernel, layer.kernel) / (layer.in_channels * layer.kernel**2) ** 0.5
    c = layer.out_channels
    affine_shape = (layer.n, c) if layer.per_sample_affine else (c,)
    tensors = dict(x=x, weight=weight, bias=randn(c), mask=torch.rand(c, generator=generator),
                   gamma=1 + 0.1 * randn(*affine_shape), beta=0.1 * randn(*affine_shape))
    for t in tensors.values():
        t.requires_grad_(training)
    if layer.norm == "batch":
        tensors.update(running_mean=torch.zeros(c), running_var=torch.ones(c))
    return tensors


def fused_call(layer: Layer, tensors: dict, impl: str, training: bool):
    def call():
        return GF.masked_conv_norm_act(**tensors, norm=layer.norm, training=training, activation="relu",
                                       impl=impl, **layer.conv_args())

    return call


def conv_call(layer: Layer, tensors: dict):
    """at::convolution alone, on the same tensors."""
    def call():
        return torch.ops.aten.convolution(
            tensors["x"], tensors["weight"], tensors["bias"], [layer.stride] * 2, [layer.padding] * 2, [1, 1],
            layer.transposed, [layer.output_padding] * 2, 1)

    return call


def compiled_eager_call(layer: Layer, tensors: dict, training: bool):
    torch._dynamo.reset()  # every layer compiles afresh, not as a recompile of the previous one
    compiled = torch.compile(lambda t: GF.masked_conv_norm_act(
        **t, norm=layer.norm, training=training, activation="relu", impl=BASELINE, **layer.conv_args()))
    return lambda: compiled(tensors)


def evaluation(call):
    def step():
        with torch.no_grad():
            call()

    return step


def training_step(call, tensors: dict, grad_out: torch.Tensor):
    leaves = [t for t in tensors.values() if t.requires_grad]

    def step():
        for t in leaves:
            t.grad = None
        call().backward(grad_out)

    return step


def upstream_gradient(layer: Layer, channels_last: bool) -> torch.Tensor:
    g = torch.randn(layer.n, layer.out_channels, layer.out_size, layer.out_size,
                    generator=torch.Generator().manual_seed(1))
    return g.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def peak_memory_case(layer: str, channels_last: bool, impl: str):
    """One training step for harness.peak_memory, warmed up on a small layer first."""
    small = Layer("warm-up", 2, 16, 16, 8, 3, "batch")
    warm = inputs(small, channels_last, training=True)
    training_step(fused_call(small, warm, impl, True), warm, upstream_gradient(small, channels_last))()
    big = LAYERS_BY_NAME[layer]
    tensors = inputs(big, channels_last, training=True)
    return training_step(fused_call(big, tensors, impl, True), tensors, upstream_gradient(big, channels_last))


# --- measuring -----------------------------------------------------------------------------------


def conv_flops(layer: Layer) -> float:
    pixels = layer.n * layer.out_size**2 if not layer.transposed else layer.n * layer.size**2
    return 2.0 * pixels * layer.in_channels * layer.out_channels * layer.kernel**2


def ratio_verdict(ratio: float, target: float) -> str:
    return "meets" if ratio >= target else "misses"


def measure(m: harness.Machine, layer: Layer, channels_last: bool, training: bool) -> dict[str, str]:
    """One row: B against A, plus the conv alone, torch.compile(A) (NCHW only: compiling takes
    minutes) and, in training, peak memory."""
    tensors = inputs(layer, channels_last, training)
    if training:
        grad_out = upstream_gradient(layer, channels_last)

        def step(call):
            return training_step(call, tensors, grad_out)
    else:
        step = evaluation
    eager = step(fused_call(layer, tensors, BASELINE, training))
    fused = step(fused_call(layer, tensors, CANDIDATE, training))
    conv = step(conv_call(layer, tensors))

    label = (f"{layer.name} N{layer.n} {layer.in_channels}->{layer.out_channels} {layer.size}x{layer.size} "
             f"k{layer.kernel}{' s2' if layer.stride == 2 else ''}{' transposed' if layer.transposed else ''}"
             f"{' channels_last' if channels_last else ''}, {'training' if training else 'eval'}")
    print(f"{label}:")
    versus_eager = harness.compare(eager, fused, ROUNDS)
    versus_conv = harness.compare(conv, fused, ROUNDS)
    compiled = {"torch.compile(A), ms": "-", "torch.compile(A) / B": "-"}
    if not channels_last:
        versus_compiled = harness.compare(step(compiled_eager_call(layer, tensors, training)), fused, ROUNDS)
        print(f"    torch.compile of the eager reference {versus_compiled.median_a * 1e3:.1f} ms: "
              f"fused is {versus_compiled.ratio:.2f}x faster")
        compiled = {"torch.compile(A), ms": f"{versus_compiled.median_a * 1e3:.1f}",
                    "torch.compile(A) / B": f"{versus_compiled.ratio:.2f}"}

    x_bytes = tensors["x"].numel() * 4
    w_bytes = tensors["weight"].numel() * 4
    y_bytes = layer.n * layer.out_channels * layer.out_size**2 * 4
    if training:
        eager_target = TRAIN_VS_EAGER_1X1 if layer.kernel == 1 else TRAIN_VS_EAGER
        conv_target = TRAIN_VS_CONV
        flops = 3 * conv_flops(layer)
        # Forward as in eval; the epilogue's backward reads grad_out and y and writes grad_y; the
        # conv's backward reads grad_y, x and weight and writes the gradients of x and weight.
        bytes_moved = 3 * x_bytes + 3 * w_bytes + 7 * y_bytes
        working_set = 2 * x_bytes + 2 * w_bytes + 4 * y_bytes
    else:
        eager_target, conv_target = EVAL_VS_EAGER, EVAL_VS_CONV
        flops = conv_flops(layer)
        # The conv reads x and weight and writes y; the epilogue reads y and writes the output.
        bytes_moved = x_bytes + w_bytes + 3 * y_bytes
        working_set = x_bytes + w_bytes + 2 * y_bytes

    peaks = {"peak A, MiB": "-", "peak B, MiB": "-", "peak B/A (target <= 0.75)": "-"}
    if training:
        peak = {impl: harness.peak_memory("benchmarks.conv_norm_act:peak_memory_case", layer=layer.name,
                                          channels_last=channels_last, impl=impl)
                for impl in (BASELINE, CANDIDATE)}
        peak_ratio = peak[CANDIDATE] / peak[BASELINE]
        peaks = {"peak A, MiB": f"{peak[BASELINE] / 2**20:.0f}", "peak B, MiB": f"{peak[CANDIDATE] / 2**20:.0f}",
                 "peak B/A (target <= 0.75)": f"{peak_ratio:.2f} "
                                              f"{'meets' if peak_ratio <= PEAK_MEMORY_RATIO else 'misses'}"}
        print(f"    peak memory: eager {peak[BASELINE] / 2**20:.0f} MiB, fused {peak[CANDIDATE] / 2**20:.0f} MiB, "
              f"ratio {peak_ratio:.2f} (target <= {PEAK_MEMORY_RATIO}: "
              f"{'meets' if peak_ratio <= PEAK_MEMORY_RATIO else 'misses'})")
    conv_ratio = versus_conv.ratio
    print(f"    conv alone {versus_conv.median_a * 1e3:.1f} ms: fused is {1 / conv_ratio:.2f}x the conv alone "
          f"(target <= {1 / conv_target:.2f}x: {ratio_verdict(conv_ratio, conv_target)})")
    extra = {
        "conv alone, ms": f"{versus_conv.median_a * 1e3:.1f}",
        "B / conv alone": f"{1 / conv_ratio:.2f}",
        "target B / conv": f"<= {1 / conv_target:.2f}",
        "verdict vs conv": ratio_verdict(conv_ratio, conv_target),
        **compiled,
        **peaks,
    }
    return harness.result_row(m, label, (BASELINE, CANDIDATE), versus_eager, eager_target, flops, bytes_moved,
                              working_set, extra)


def main() -> None:
    m = harness.machine()
    print(f"compiled kernels: {_ext.extension().cpu_isa} instruction set")
    rows = [measure(m, layer, channels_last, training)
            for channels_last in (False, True) for layer in LAYERS for training in (False, True)]
    harness.record(
        "conv_norm_act",
        "`masked_conv_norm_act` with mask and ReLU, float32, per layer of a generator (batch norm with a "
        "per-sample affine for the SA-GAN/BigGAN and PPCD layers, instance norm for the CycleGAN ones). "
        f"A = eager reference (`impl='{BASELINE}'`), B = conv + compiled epilogue (`impl='{CANDIDATE}'`). "
        "Eval: one forward without autograd (batch norm with running statistics); training: forward and "
        "backward into every input. Targets: B never slower than A; B at most 1.10x (eval) or 1.15x "
        "(training) the conv alone (at::convolution on the same input, with its backward in training); "
        "in training, B at least 1.6x faster than A on the 1x1 layer and peak memory at most 0.75x A's. "
        "torch.compile(A): the eager reference compiled with the default inductor backend. Peak: resident "
        "memory one training step needs on top of its inputs, in a fresh process per candidate.",
        COMMAND,
        rows,
    )


if __name__ == "__main__":
    main()
