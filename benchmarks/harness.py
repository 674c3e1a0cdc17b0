"""Measuring and recording rules shared by every benchmark.

The machines are shared and noisy, so a benchmark compares a baseline A with a candidate B in one
process and reports their ratio:

- 2 threads (`torch.set_num_threads(2)`), printed with the results;
- each candidate warmed up at least twice (JIT compiles, oneDNN primitives, allocator growth);
- A and B interleaved for at least 7 rounds; the medians of each and the median of the
  per-round ratios A/B are reported;
- the load average is read before starting; above 0.5 the figures are flagged "suspect";
- next to each result, its distance from the machine's physical limits: compute time
  FLOPs / (2 cores x 32 FP32 FLOP/cycle x clock from /proc/cpuinfo) and memory time
  bytes moved / 14 GB/s from DRAM (35 GB/s when the working set fits in the 32 MB L3);
- the target is printed next to the measurement with "meets" or "misses"; speed is never
  asserted in a unit test;
- the rows go into a section of BENCHMARKS.md (replacing that benchmark's previous section) with
  the command that reproduces them, and into benchmarks/results/<benchmark>.csv.

`peak_memory` measures the peak resident memory of one call in a fresh process.
"""
from __future__ import annotations

import csv
import ctypes
import datetime
import gc
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

THREADS = 2
WARMUP_CALLS = 2
MIN_ROUNDS = 7
SUSPECT_LOAD = 0.5

CORES = 2
FP32_FLOP_PER_CYCLE = 32  # per core: two 256-bit FMA pipes x 8 lanes x 2 FLOP
DRAM_BYTES_PER_S = 14e9
L3_BYTES_PER_S = 35e9
L3_BYTES = 32 * 2**20

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
RESULTS_DIR = REPO / "benchmarks" / "results"
MD_PREAMBLE = """# Benchmarks

Written by the scripts in `benchmarks/`: each section is replaced when its script runs again, and
the same rows are in `benchmarks/results/<benchmark>.csv`. A is the baseline (the reference the
tests compare with), B the candidate; times are medians over interleaved rounds on 2 threads, and
the ratio is the median of the per-round ratios A/B. A load above 0.5 marks the figures suspect.
GB/s is the candidate's minimum memory traffic divided by its median time; the bandwidth limit is
14 GB/s from DRAM, or 35 GB/s when the working set fits in the 32 MB L3. The commit is the code
measured ("-dirty": with uncommitted changes to tracked files).
"""


@dataclass
class Machine:
    threads: int
    load: float
    clock_ghz: float
    date: str
    commit: str

    @property
    def suspect(self) -> bool:
        return self.load > SUSPECT_LOAD

    @property
    def load_label(self) -> str:
        return f"{self.load:.2f}" + (" suspect" if self.suspect else "")


def cpu_clock_ghz() -> float:
    """The highest core clock /proc/cpuinfo reports."""
    text = Path("/proc/cpuinfo").read_text()
    return max(float(mhz) for mhz in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)) / 1000


def git_commit() -> str:
    """Short hash of HEAD, "-dirty" when tracked files differ from it. The files the benchmarks
    write are left out, so recording one benchmark does not mark the next one dirty."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        changes = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      ":!BENCHMARKS.md", ":!benchmarks/results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if changes.strip() else "")


def machine(threads: int = THREADS) -> Machine:
    """Sets the thread count, reads the load before any work starts, and prints both."""
    load = os.getloadavg()[0]
    torch.set_num_threads(threads)
    m = Machine(
        threads=torch.get_num_threads(),
        load=load,
        clock_ghz=cpu_clock_ghz(),
        date=datetime.date.today().isoformat(),
        commit=git_commit(),
    )
    warning = f" -- suspect: above {SUSPECT_LOAD}, something else is running" if m.suspect else ""
    print(f"threads {m.threads}, load average {m.load:.2f}{warning}")
    print(f"clock {m.clock_ghz:.2f} GHz, commit {m.commit}, torch {torch.__version__}")
    return m


@dataclass
class Comparison:
    seconds_a: list[float]
    seconds_b: list[float]

    @property
    def median_a(self) -> float:
        return statistics.median(self.seconds_a)

    @property
    def median_b(self) -> float:
        return statistics.median(self.seconds_b)

    @property
    def ratio(self) -> float:
        """Median of the per-round ratios A/B: how many times faster B is."""
        return statistics.median(a / b for a, b in zip(self.seconds_a, self.seconds_b))


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(a: Callable[[], object], b: Callable[[], object], rounds: int = 9) -> Comparison:
    """Times A and B alternately, one call each per round, after warming each up."""
    if rounds < MIN_ROUNDS:
        raise ValueError(f"at least {MIN_ROUNDS} rounds are needed, got {rounds}")
    for _ in range(WARMUP_CALLS):
        a()
        b()
    gc.collect()
    result = Comparison([], [])
    for _ in range(rounds):
        result.seconds_a.append(_seconds(a))
        result.seconds_b.append(_seconds(b))
    return result


@dataclass
class Limits:
    """How fast the machine could run a computation, at best."""

    compute_s: float
    memory_s: float
    bandwidth: float  # bytes/s assumed for memory_s

    @classmethod
    def of(cls, m: Machine, flops: float, bytes_moved: float, working_set: float) -> Limits:
        bandwidth = L3_BYTES_PER_S if working_set <= L3_BYTES else DRAM_BYTES_PER_S
        peak_flops = CORES * FP32_FLOP_PER_CYCLE * m.clock_ghz * 1e9
        return cls(flops / peak_flops, bytes_moved / bandwidth, bandwidth)


def result_row(
    m: Machine,
    label: str,
    names: tuple[str, str],
    comparison: Comparison,
    target_ratio: float,
    flops: float,
    bytes_moved: float,
    working_set: float,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Prints one measurement next to its target and limits, and returns its table row.

    bytes_moved is B's minimum memory traffic, working_set the bytes it touches per call.
    """
    limits = Limits.of(m, flops, bytes_moved, working_set)
    achieved = bytes_moved / comparison.median_b
    verdict = "meets" if comparison.ratio >= target_ratio else "misses"
    name_a, name_b = names
    print(
        f"{label}: {name_a} {comparison.median_a * 1e3:.1f} ms, {name_b} {comparison.median_b * 1e3:.1f} ms, "
        f"ratio {comparison.ratio:.2f}x (target >= {target_ratio:g}x: {verdict})"
    )
    print(
        f"    {name_b} moves at least {bytes_moved / 1e6:.0f} MB: {achieved / 1e9:.1f} GB/s, "
        f"{100 * achieved / limits.bandwidth:.0f}% of {limits.bandwidth / 1e9:.0f} GB/s "
        f"(memory limit {limits.memory_s * 1e3:.1f} ms, compute limit {limits.compute_s * 1e3:.2f} ms)"
    )
    return {
        "shape": label,
        "threads": str(m.threads),
        "load": m.load_label,
        f"median A ({name_a}), ms": f"{comparison.median_a * 1e3:.1f}",
        f"median B ({name_b}), ms": f"{comparison.median_b * 1e3:.1f}",
        "ratio A/B": f"{comparison.ratio:.2f}",
        "target": f">= {target_ratio:g}",
        "verdict": verdict,
        "GB/s": f"{achieved / 1e9:.1f}",
        "% of bandwidth limit": f"{100 * achieved / limits.bandwidth:.0f}",
        **(extra or {}),
        "date": m.date,
        "commit": m.commit,
    }


def record(benchmark: str, description: str, command: str, rows: list[dict[str, str]]) -> None:
    """Replaces the `## benchmark` section of BENCHMARKS.md, keeping the others, and writes the
    rows to benchmarks/results/<benchmark>.csv."""
    columns = list(rows[0])
    table = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(row[c] for c in columns) + " |" for row in rows),
    ]
    section = f"## {benchmark}\n\n{description.strip()}\n\nReproduce: `{command}`\n\n"
    section += "\n".join(table) + "\n"

    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else MD_PREAMBLE
    preamble, *sections = re.split(r"^(?=## )", text, flags=re.M)
    kept = [s.rstrip() + "\n" for s in sections if s.split(None, 2)[1] != benchmark]
    BENCHMARKS_MD.write_text("\n".join([preamble.rstrip() + "\n", *sorted(kept + [section])]))

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_DIR / f"{benchmark}.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"recorded in {BENCHMARKS_MD.name} and {(RESULTS_DIR / benchmark).relative_to(REPO)}.csv")


# --- peak memory -------------------------------------------------------------------------------


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _resident_high_water_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s*(\d+) kB", status, re.M).group(1)) * 1024


def peak_memory(factory: str, threads: int = THREADS, **kwargs) -> int:
    """Peak resident memory, in bytes, that one call of a callable needs on top of its inputs,
    measured in a fresh Python process per candidate, so that one candidate's allocator caches
    stay out of the other's figure.

    `factory` names a function "module:function"; the child process calls function(**kwargs)
    (kwargs must be JSON values), which builds the inputs and returns the zero-argument callable
    to measure. The factory should warm the code up on small inputs, so that one-time library
    loading is not counted.

    Just before the call, the child returns the memory the set-up freed to the system (glibc's
    malloc_trim; the call would otherwise reuse it unseen), resets its resident high-water mark
    (writing 5 to /proc/self/clear_refs) and reads its resident size. The figure is the
    high-water mark after the call (VmHWM) minus that size: every page the call's temporaries
    and outputs touched, even those freed before it returned. `resource.getrusage().ru_maxrss`
    would not do: Linux carries the parent's high-water mark over into a child across fork and
    exec, and it cannot be reset after the set-up.
    """
    command = [sys.executable, "-m", "benchmarks.harness", factory, json.dumps(kwargs), str(threads)]
    child = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"peak memory of {factory}({kwargs}) failed:\n{child.stderr}")
    return int(child.stdout.split()[-1])


def _measure_peak_memory(factory: str, kwargs: dict, threads: int) -> int:
    """The child side of peak_memory."""
    torch.set_num_threads(threads)
    module, name = factory.split(":")
    call = getattr(importlib.import_module(module), name)(**kwargs)
    gc.collect()
    # Memory the set-up freed but the C allocator kept would be reused by the call unseen.
    ctypes.CDLL(None).malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    resident_before = _resident_bytes()
    call()
    return _resident_high_water_bytes() - resident_before


if __name__ == "__main__":
    _factory, _kwargs, _threads = sys.argv[1:]
    print(_measure_peak_memory(_factory, json.loads(_kwargs), int(_threads)))
