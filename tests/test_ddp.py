"""Data parallelism: two CPU processes under torchrun (gloo), each with half of every global batch,
train to the same weights and log the same losses as one process with the whole batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import checkpoint, distributed
from train.run import main

ROOT = Path(__file__).resolve().parents[1]
# No norm, pool or dropout: every loss is a mean over samples, so the mean of the two halves'
# gradients is the whole batch's gradient.
OPTIONS = ["--method", "dense", "--preset", "smoke", "--device", "cpu", "--netG", "resnet_1blocks", "--ngf", "4",
           "--ndf", "4", "--norm", "none", "--pool_size", "0", "--dropout", "false", "--crop_size", "32",
           "--batch_size", "4", "--steps", "3", "--log_every", "1", "--sample_every", "1000", "--eval", "false",
           "--export", "false", "--tensorboard", "false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*torchrun, "-m", "train.run", *OPTIONS, "--out", str(tmp_path / "two")], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in (tmp_path / "two" / "log.txt").read_text()
    assert main([*OPTIONS, "--out", str(tmp_path / "one")]) == 0

    one_tensors, one_state = checkpoint.load(checkpoint.latest(tmp_path / "one"))
    two_tensors, two_state = checkpoint.load(checkpoint.latest(tmp_path / "two"))
    assert one_tensors.keys() == two_tensors.keys()
    for name, tensor in one_tensors.items():
        torch.testing.assert_close(two_tensors[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    for name, points in one_state["history"].items():  # the losses, averaged over the processes
        steps, values = zip(*points)
        two_steps, two_values = zip(*two_state["history"][name])
        assert two_steps == steps
        assert two_values == pytest.approx(values, rel=1e-4, abs=1e-6), name
    # a run on half of the batch would differ: the comparison can fail
    assert main([*OPTIONS, "--batch_size", "2", "--out", str(tmp_path / "half")]) == 0
    half = checkpoint.load(checkpoint.latest(tmp_path / "half"))[0]
    assert not torch.allclose(half["G.model.1.weight"], one_tensors["G.model.1.weight"], atol=1e-5)


def test_a_single_process_needs_no_process_group():
    context, device = distributed.init("cpu")
    assert (context.rank, context.world_size, context.distributed, context.is_main) == (0, 1, False, True)
    assert device == torch.device("cpu")
    grad = torch.ones(3)
    parameter = torch.nn.Parameter(torch.zeros(3))
    parameter.grad = grad.clone()
    distributed.average_gradients([parameter])  # no-op without a process group
    assert torch.equal(parameter.grad, grad)
    assert distributed.mean_over_processes({"loss": 2.0}) == {"loss": 2.0}


def test_bad_devices_are_clear_errors():
    with pytest.raises(ValueError, match="option 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:<n>', got 'gpu'"):
        distributed.init("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
            distributed.init("cuda")
