"""Fine-grained sparse convolution: the direct sparse CPU kernel (B, `impl='cpu'` on the compressed
weight) against the dense conv of the masked weight (A, `impl='ref'`: F.conv2d /
F.conv_transpose2d, oneDNN), the computation the tests check B against; weights pruned by element
magnitude (gansparse.prune.magnitude_). Beside it: the layer after `to_sparse(example)`, which
dispatches to whichever of the two is faster, against A; the break-even sparsity of each shape;
and the CycleGAN ResNet generator at 256x256 pruned to 90% and sparsified, against the dense one.

Run: python -m benchmarks.sparse_conv
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

import gansparse.functional as GF
from gansparse import profile, prune
from gansparse.ops.sparse_conv import compress
from gansparse.sparse import SparseConv2d, SparseConvTranspose2d, sparsify
from models.pix2pix import ResnetGenerator

from . import harness

ROUNDS = 9
SWEEP_ROUNDS = 7
COMMAND = "python -m benchmarks.sparse_conv"
# The targets, as ratios A/B: 3x at 90% on the k3 and 1x1 shapes (so at 95% too), 1.3x at 75%.
# It sets none for the transposed conv beyond 75%; the 75% figure is its floor there.
KERNEL_TARGETS = {0.75: 1.3, 0.9: 3.0, 0.95: 3.0}
TRANSPOSED_KERNEL_TARGET = 1.3
DISPATCH_TARGET = 0.95  # a converted layer is never more than 5% slower than dense
GENERATOR_TARGET = 2.0
SWEEP = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    in_channels: int
    out_channels: int
    size: int
    kernel: int
    stride: int = 1
    transposed: bool = False

    @property
    def label(self) -> str:
        return (f"{self.name}: N{self.n} {self.in_channels}->{self.out_channels} {self.size}x{self.size} "
                f"k{self.kernel}{f' s{self.stride}' if self.stride > 1 else ''}")

    def layer(self, sparsity: float):
        padding = self.kernel // 2
        if self.transposed:
            layer = SparseConvTranspose2d(self.in_channels, self.out_channels, self.kernel, self.stride, padding,
                                          output_padding=self.stride - 1)
        else:
            layer = SparseConv2d(self.in_channels, self.out_channels, self.kernel, self.stride, padding)
        return prune.magnitude_(layer, sparsity).eval()

    def input(self) -> torch.Tensor:
        return torch.randn(self.n, self.in_channels, self.size, self.size, generator=torch.Generator().manual_seed(0))


SHAPES = [
    Shape("CycleGAN residual conv", 1, 256, 256, 64, 3),
    Shape("1x1 conv", 4, 256, 256, 64, 1),
    Shape("CycleGAN upsampling ConvTranspose", 1, 256, 128, 64, 3, stride=2, transposed=True),
]


def calls(shape: Shape, sparsity: float):
    """(dense A, sparse kernel B, dispatched layer) calls on one input, all without autograd."""
    layer = shape.layer(sparsity)
    x = shape.input()
    weight = layer.masked_weight().detach()
    sparse = compress(weight, transposed=shape.transposed)
    args = dict(stride=layer.stride, padding=layer.padding, transposed=shape.transposed,
                output_padding=layer.output_padding if shape.transposed else 0)
    layer.to_sparse(x)

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn()

        return call

    return (no_grad(lambda: GF.sparse_conv2d(x, weight, layer.bias, impl="ref", **args)),
            no_grad(lambda: GF.sparse_conv2d(x, sparse, layer.bias, impl="cpu", **args)),
            no_grad(lambda: layer(x)), layer, sparse)


def traffic(shape: Shape, sparse) -> tuple[float, float, float]:
    """(FLOPs, bytes moved, working set) of B."""
    out_size = shape.size * shape.stride if shape.transposed else shape.size
    pixels = shape.n * (shape.size**2 if shape.transposed else out_size**2)
    flops = 2.0 * pixels * sparse.values.numel()
    tensors = (shape.n * shape.in_channels * shape.size**2 + shape.n * shape.out_channels * out_size**2) * 4
    moved = tensors + sparse.values.numel() * 8
    return flops, moved, moved


def break_even(shape: Shape) -> str:
    """The sparsity from which the sparse kernel is faster than dense at every measured sparsity,
    interpolated between the two measured sparsities around it."""
    ratios = []
    for sparsity in SWEEP:
        dense, kernel, *_ = calls(shape, sparsity)
        ratios.append(harness.compare(dense, kernel, SWEEP_ROUNDS).ratio)
        print(f"    {sparsity:.0%}: {ratios[-1]:.2f}x")
    first = len(SWEEP)  # the first sparsity from which every ratio is >= 1
    while first > 0 and ratios[first - 1] >= 1:
        first -= 1
    if first == 0:
        return f"<= {SWEEP[0]:.0%}"
    if first == len(SWEEP):
        return f"> {SWEEP[-1]:.0%}"
    (s0, r0), (s1, r1) = (SWEEP[first - 1], ratios[first - 1]), (SWEEP[first], ratios[first])
    return f"{s0 + (1 - r0) / (r1 - r0) * (s1 - s0):.0%}"


def shape_rows(m: harness.Machine, shape: Shape) -> list[dict[str, str]]:
    print(f"{shape.label}; break-even sweep:")
    even = break_even(shape)
    print(f"    break-even sparsity {even}")
    rows = []
    for sparsity in (0.5, 0.75, 0.9, 0.95):
        dense, kernel, dispatched, layer, sparse = calls(shape, sparsity)
        flops, moved, working_set = traffic(shape, sparse)
        extra = {"break-even sparsity": even}
        label = f"{shape.label}, {sparsity:.0%}"
        if sparsity in KERNEL_TARGETS:
            target = TRANSPOSED_KERNEL_TARGET if shape.transposed else KERNEL_TARGETS[sparsity]
            rows.append(harness.result_row(
                m, f"{label}, kernel", ("dense", "sparse"), harness.compare(dense, kernel, ROUNDS),
                target, flops, moved, working_set, extra))
        rows.append(harness.result_row(
            m, f"{label}, layer chose {layer.inference}", ("dense", "sparse"),
            harness.compare(dense, dispatched, ROUNDS), DISPATCH_TARGET, flops, moved, working_set, extra))
    return rows


def generator_row(m: harness.Machine) -> dict[str, str]:
    dense = ResnetGenerator(3, 3, ngf=64, norm="instance", n_blocks=9).eval()
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    pruned = sparsify(copy.deepcopy(dense))  # sparse layers, still dense weights
    prune.magnitude_(pruned, 0.9)
    sparsify(pruned, x)
    layers = [layer for layer in pruned.modules() if isinstance(layer, (SparseConv2d, SparseConvTranspose2d))]
    chosen = sum(layer.inference == "sparse" for layer in layers)
    print(f"CycleGAN ResnetGenerator 256x256, 90% element sparsity: {chosen} of {len(layers)} layers sparse")

    def run(model):
        def call():
            with torch.inference_mode():
                return model(x)

        return call

    # Every layer keeps 10% of its weights, so it does 10% of its dense multiply-adds.
    density = sum(layer.density * layer.weight.numel() for layer in layers) / sum(l.weight.numel() for l in layers)
    flops = 2.0 * profile(dense, x)["macs"] * density
    comparison = harness.compare(run(dense), run(pruned), ROUNDS)
    return harness.result_row(
        m, "CycleGAN ResnetGenerator N1 256x256, 90% element sparsity, sparsify()", ("dense", "sparse"),
        comparison, GENERATOR_TARGET, flops, 1, 1, {"break-even sparsity": f"{chosen}/{len(layers)} layers sparse"})


def main() -> None:
    m = harness.machine()
    rows = [row for shape in SHAPES for row in shape_rows(m, shape)]
    rows.append(generator_row(m))
    harness.record(
        "sparse_conv",
        """Fine-grained sparse convolution, float32, weights pruned by element magnitude. A = dense conv of the
masked weight (`impl='ref'`: F.conv2d / F.conv_transpose2d, oneDNN). "kernel" rows: B = the direct sparse CPU
kernel on the compressed weight (`impl='cpu'`); targets from the issue: at least 3x at 90% (k3 and 1x1), 1.3x at
75% (and for the transposed conv, which the issue sets no higher target for, at 90% and 95% too).
"layer" rows: B = the SparseConv layer after `to_sparse(example)`, which times both forms on the input and keeps
the faster (the form it chose is in the label); target: never more than 5% slower than dense (ratio >= 0.95).
Break-even: the sparsity from which the kernel beats dense, interpolated over 50-95%. Last row: the CycleGAN
ResNet generator (ngf 64, 9 blocks, instance norm) pruned to 90% in every conv, after `sparsify(model, x)`,
against the dense generator, both under torch.inference_mode(); its GB/s column is not meaningful.""",
        COMMAND,
        rows,
    )


if __name__ == "__main__":
    main()
