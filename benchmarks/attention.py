"""Attention distillation, forward and backward: the compiled CPU kernels (B) against the eager
reference (A), `attention_distill_loss(..., impl='ref')`, the composition DMAD's official code
runs (`f.pow(2).mean(1)`, `F.normalize`, squared difference).

One call is one training step of the distillation loss: the students' gradients are reset to
None (as `optimizer.zero_grad()` does), the loss over 4 layer pairs is computed and
`loss.backward()` runs to the student features; the teachers need no gradient.

Run: python -m benchmarks.attention
"""
from __future__ import annotations

import math

import torch

import gansparse.functional as GF
from gansparse import _ext

from . import harness

# Generator feature maps: [N, C, H, W].
SHAPES = [(4, 256, 64, 64), (1, 64, 256, 256), (8, 512, 32, 32)]
LAYERS = 4
P = 2.0
TARGET_RATIO = 5.0
ROUNDS = 9
BASELINE, CANDIDATE = "ref", "cpu"
COMMAND = "python -m benchmarks.attention"


def features(shape, channels_last: bool, seed: int = 0):
    """LAYERS student features that require grad and LAYERS teacher features, all of `shape`."""
    generator = torch.Generator().manual_seed(seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def feature():
        return torch.empty(shape, memory_format=memory_format).normal_(generator=generator)

    students = [feature().requires_grad_() for _ in range(LAYERS)]
    teachers = [feature() for _ in range(LAYERS)]
    return students, teachers


def training_step(students, teachers, impl: str):
    def step():
        for s in students:
            s.grad = None
        GF.attention_distill_loss(students, teachers, p=P, impl=impl).backward()

    return step


def peak_memory_case(shape, channels_last: bool, impl: str):
    """The training step for harness.peak_memory, warmed up on a small shape first."""
    training_step(*features((1, 8, 8, 8), channels_last), impl)()
    return training_step(*features(tuple(shape), channels_last), impl)


def label(shape, channels_last: bool) -> str:
    n, c, h, w = shape
    return f"N{n} C{c} {h}x{w}" + (" channels_last" if channels_last else "")


def compare(shape, channels_last: bool) -> harness.Comparison:
    students, teachers = features(shape, channels_last)
    baseline = training_step(students, teachers, BASELINE)
    candidate = training_step(students, teachers, CANDIDATE)
    return harness.compare(baseline, candidate, ROUNDS)


def peak_memory(shape, channels_last: bool) -> dict[str, str]:
    peaks = {}
    for name, impl in (("A", BASELINE), ("B", CANDIDATE)):
        peak = harness.peak_memory(
            "benchmarks.attention:peak_memory_case", shape=shape, channels_last=channels_last, impl=impl
        )
        peaks[f"peak {name}, MiB"] = f"{peak / 2**20:.0f}"
    return peaks


def result_row(m: harness.Machine, shape, channels_last: bool, comparison: harness.Comparison) -> dict[str, str]:
    elements = math.prod(shape)
    feature_bytes = elements * 4  # float32
    return harness.result_row(
        m,
        label(shape, channels_last),
        (BASELINE, CANDIDATE),
        comparison,
        TARGET_RATIO,
        # Forward: a square and an add per element of the 2 x LAYERS maps; backward: a multiply
        # per gradient element.
        flops=(2 * 2 + 1) * LAYERS * elements,
        # Read students and teachers, read the students again, write their gradients.
        bytes_moved=4 * LAYERS * feature_bytes,
        # The features and the gradients.
        working_set=3 * LAYERS * feature_bytes,
        extra=peak_memory(shape, channels_last),
    )


def main() -> None:
    m = harness.machine()
    print(f"compiled kernels: {_ext.extension().cpu_isa} instruction set")
    cases = [(shape, channels_last) for channels_last in (False, True) for shape in SHAPES]
    # All timings first, under the load just read; the peak-memory processes come after.
    comparisons = [compare(*case) for case in cases]
    rows = [result_row(m, *case, comparison) for case, comparison in zip(cases, comparisons)]
    harness.record(
        "attention",
        f"`attention_distill_loss` forward + backward over {LAYERS} layer pairs of the shape given, "
        f"float32, p = {P:g}, reduction 'mean'. A = eager reference (`impl='{BASELINE}'`), "
        f"B = compiled CPU kernels (`impl='{CANDIDATE}'`). Peak: resident memory one step needs on top "
        "of its inputs, measured in a fresh process per candidate. Times include the page faults of "
        "fresh memory: when the C allocator has given the previous step's gradients back to the "
        "system, B faults its 4 new gradients in again, which on this machine can cost more than its "
        "kernels, so B's time depends on the allocator's state. 14 GB/s is the nominal DRAM figure; "
        "a plain streaming read on the 2 cores of this machine reaches about 32 GB/s, hence "
        "percentages above 100.",
        COMMAND,
        rows,
    )


if __name__ == "__main__":
    main()
