"""Helpers of the tests that run the training command line: one thread, a tiny teacher, and a run
killed with SIGKILL, resumed, and compared with an uninterrupted one."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from train import checkpoint
from train.run import main

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def single_thread():
    """Tiny networks run faster on one thread, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_teacher(out: Path, *options: str) -> Path:
    """A dense teacher trained for 4 steps with `options` (e.g. --preset and widths) into `out`."""
    with single_thread():
        assert main(["--method", "dense", *options, "--steps", "4", "--eval", "false", "--export", "false",
                     "--out", str(out)]) == 0
    return out


def kill_at_checkpoint(command: list[str], run_dir: Path, step: int) -> int:
    """Run `python -m train.run <command>` (writing into run_dir) in a subprocess, SIGKILL it once
    the checkpoint of `step` exists, and return the step of the latest checkpoint it left."""
    process = subprocess.Popen([sys.executable, "-m", "train.run", *command], cwd=ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / f"step_{step:08d}").exists():
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        process.kill()
    return int(checkpoint.latest(run_dir).name.split("_")[1])


def assert_same_run(full: Path, resumed: Path, steps: int) -> tuple[dict, dict]:
    """The latest checkpoints of two runs hold the same step count, logged losses, sparsities and
    bit-identical tensors; returns their states (uninterrupted, resumed) for further checks."""
    full_tensors, full_state = checkpoint.load(checkpoint.latest(full))
    resumed_tensors, resumed_state = checkpoint.load(checkpoint.latest(resumed))
    assert resumed_state["global_step"] == full_state["global_step"] == steps
    assert resumed_state["history"] == full_state["history"]  # every step's losses, exactly
    assert resumed_state["sparsity_history"] == full_state["sparsity_history"]
    assert resumed_tensors.keys() == full_tensors.keys()
    for name, tensor in full_tensors.items():
        assert torch.equal(tensor, resumed_tensors[name]), name
    return full_state, resumed_state
