"""A run killed with SIGKILL and resumed with --resume logs the same losses, and ends with the same
weights, as an uninterrupted run; a corrupt checkpoint is reported clearly."""

import pytest

from _runs import assert_same_run, kill_at_checkpoint
from train import checkpoint
from train.run import main

# Tiny, deterministic, CPU; dropout and the image pool exercise the RNG and extra-state restore.
OPTIONS = ["--method", "dense", "--preset", "smoke", "--device", "cpu", "--deterministic", "true",
           "--netG", "resnet_1blocks", "--ngf", "4", "--ndf", "4", "--crop_size", "32", "--load_size", "32",
           "--batch_size", "2", "--dropout", "true", "--pool_size", "3", "--log_every", "1",
           "--checkpoint_every", "4", "--sample_every", "1000", "--eval", "false", "--export", "false",
           "--tensorboard", "false"]


STEPS = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def test_sigkill_and_resume_gives_the_uninterrupted_losses(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    command = [*OPTIONS, "--steps", str(STEPS)]
    interrupted_at = kill_at_checkpoint([*command, "--out", str(killed)], killed, 8)
    assert 8 <= interrupted_at < STEPS

    # The same run uninterrupted, and the resumed one, in this process (one thread, like the killed one).
    assert main([*command, "--out", str(full)]) == 0
    assert main(["--resume", str(killed)]) == 0
    full_state, _ = assert_same_run(full, killed, STEPS)
    assert len(full_state["history"]["G_gan"]) == STEPS
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
