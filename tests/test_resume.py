"""A run killed with SIGKILL and resumed with --resume logs the same losses, and ends with the same
weights, as an uninterrupted run; a corrupt checkpoint is reported clearly."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train import checkpoint
from train.run import main

ROOT = Path(__file__).resolve().parents[1]
# Tiny, deterministic, CPU; dropout and the image pool exercise the RNG and extra-state restore.
OPTIONS = ["--method", "dense", "--preset", "smoke", "--device", "cpu", "--deterministic", "true",
           "--netG", "resnet_1blocks", "--ngf", "4", "--ndf", "4", "--crop_size", "32", "--load_size", "32",
           "--batch_size", "2", "--dropout", "true", "--pool_size", "3", "--log_every", "1",
           "--checkpoint_every", "4", "--sample_every", "1000", "--eval", "false", "--export", "false",
           "--tensorboard", "false"]


STEPS = 24


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks run faster on one thread, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "train.run", *OPTIONS, "--steps", str(STEPS), *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _final_state(run_dir: Path):
    return checkpoint.load(checkpoint.latest(run_dir))


def test_sigkill_and_resume_gives_the_uninterrupted_losses(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    process = subprocess.Popen(_command("--out", str(killed)), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (killed / "checkpoints" / "step_00000008").exists():
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        process.kill()
    interrupted_at = int(checkpoint.latest(killed).name.split("_")[1])
    assert 8 <= interrupted_at < STEPS

    # The same run uninterrupted, and the resumed one, in this process (one thread, like the killed one).
    assert main(_command("--out", str(full))[3:]) == 0
    assert main(["--resume", str(killed)]) == 0
    full_tensors, full_state = _final_state(full)
    resumed_tensors, resumed_state = _final_state(killed)
    assert full_state["global_step"] == resumed_state["global_step"] == STEPS
    assert resumed_state["history"] == full_state["history"]  # every step's losses, exactly
    assert len(full_state["history"]["G_gan"]) == STEPS
    assert full_tensors.keys() == resumed_tensors.keys()
    for name, tensor in full_tensors.items():
        assert torch.equal(tensor, resumed_tensors[name]), name
    # The resumed run appended to the log of the killed one.
    log = (killed / "log.txt").read_text()
    assert f"resuming {killed} from step_{interrupted_at:08d}" in log


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main([*OPTIONS, "--steps", "2", "--out", str(run_dir)]) == 0
    weights = checkpoint.latest(run_dir) / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    assert main(["--resume", str(run_dir)]) == 1
    error = capsys.readouterr().err
    assert str(weights) in error and "truncated or corrupt" in error


def test_resume_of_a_folder_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["--resume", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
