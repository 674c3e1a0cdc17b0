"""train/checkpoint.py: round trip, atomic writes, pruning, and clear errors on damaged files."""
import os
import random

import numpy as np
import pytest
import torch

from train import checkpoint
from train.checkpoint import CheckpointError


def _contents():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    scheduler.step()
    tensors = {f"G.{k}": v for k, v in net.state_dict().items()}
    tensors["G.half"] = torch.randn(3, 2).to(torch.bfloat16)
    tensors["G.scalar"] = torch.tensor(1.5)
    state = {
        "step": 7,
        "optimizers": {"G": optimizer.state_dict()},
        "schedulers": {"G": scheduler.state_dict()},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "stage": "search",
        "dtype": torch.float32,
    }
    return tensors, state


def test_round_trip(tmp_path):
    tensors, state = _contents()
    path = checkpoint.save(tmp_path, 7, tensors, state)
    assert path == tmp_path / "checkpoints" / "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == ["state.pt", "weights.safetensors"]
    loaded_tensors, loaded_state = checkpoint.load(path)
    assert loaded_tensors.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded_tensors[name].dtype == tensor.dtype
        assert torch.equal(loaded_tensors[name], tensor)
    assert loaded_state["step"] == 7 and loaded_state["stage"] == "search"
    assert loaded_state["dtype"] is torch.float32
    assert torch.equal(loaded_state["rng"]["torch"], state["rng"]["torch"])
    assert loaded_state["rng"]["python"] == state["rng"]["python"]
    # the optimizer and scheduler restore from it
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    optimizer.load_state_dict(loaded_state["optimizers"]["G"])
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], state["optimizers"]["G"]["state"][0]["exp_avg"])
    # a run directory loads its latest checkpoint
    checkpoint.save(tmp_path, 9, {"x": torch.ones(2)}, {"step": 9})
    assert checkpoint.load(tmp_path)[1]["step"] == 9


def test_shared_and_non_contiguous_tensors(tmp_path):
    weight = torch.randn(4, 6)
    tensors = {"a": weight, "tied": weight, "view": weight.t(), "cuda_free": weight[:, ::2]}
    loaded, _ = checkpoint.load(checkpoint.save(tmp_path, 0, tensors, {}))
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


def test_keep_latest_and_replace(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, step, {"w": torch.full((2,), float(step))}, {"step": step}, keep=2)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step_00000030", "step_00000040"]
    assert checkpoint.latest(tmp_path).name == "step_00000040"
    # saving the same step again replaces it
    checkpoint.save(tmp_path, 40, {"w": torch.zeros(2)}, {"step": 40}, keep=2)
    assert torch.equal(checkpoint.load(checkpoint.latest(tmp_path))[0]["w"], torch.zeros(2))
    # sorted by step, not by name: step 100000000 has more digits
    checkpoint.save(tmp_path, 100_000_000, {"w": torch.zeros(1)}, {}, keep=None)
    assert checkpoint.latest(tmp_path).name == "step_100000000"
    assert len(checkpoint.checkpoint_dirs(tmp_path)) == 3
    assert checkpoint.latest(tmp_path / "nothing") is None


def test_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, {"w": torch.ones(1)}, {})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, {"w": torch.ones(1)}, {})
    monkeypatch.undo()
    assert checkpoint.latest(tmp_path).name == "step_00000001"
    assert os.listdir(tmp_path / "checkpoints") == ["step_00000001"]
    # a temporary directory left by a killed process is cleaned by the next save
    (tmp_path / "checkpoints" / ".incomplete-dead").mkdir()
    checkpoint.save(tmp_path, 3, {"w": torch.ones(1)}, {})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000001", "step_00000003"]


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match=r"state\['rng'\]\[0\] is a numpy.ndarray"):
        checkpoint.save(tmp_path, 0, {}, {"rng": [np.zeros(3)]})
    with pytest.raises(TypeError, match=r"state\['fn'\] is a builtins.function"):
        checkpoint.save(tmp_path, 0, {}, {"fn": lambda: 0})
    with pytest.raises(TypeError, match="tensors must be a dict"):
        checkpoint.save(tmp_path, 0, {"w": [1.0]}, {})
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        checkpoint.save(tmp_path, -1, {}, {})
    with pytest.raises(ValueError, match="keep must be a positive int"):
        checkpoint.save(tmp_path, 0, {}, {}, keep=0)
    assert checkpoint.latest(tmp_path) is None


@pytest.fixture
def saved(tmp_path):
    tensors, state = _contents()
    return checkpoint.save(tmp_path, 5, tensors, state)


def _truncate(file, keep_fraction):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep_fraction)])


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        checkpoint.load(tmp_path)


@pytest.mark.parametrize("name", ["weights.safetensors", "state.pt"])
def test_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name} is missing"):
        checkpoint.load(saved)


@pytest.mark.parametrize("name", ["weights.safetensors", "state.pt"])
@pytest.mark.parametrize("keep_fraction", [0.0, 0.003, 0.5, 0.99])
def test_truncated_file(saved, name, keep_fraction):
    _truncate(saved / name, keep_fraction)
    with pytest.raises(CheckpointError, match=f"{name} is truncated or corrupt"):
        checkpoint.load(saved)


def test_flipped_weight_byte(saved):
    file = saved / "weights.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's data; the header is intact
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="weights.safetensors is corrupt: the data of tensor .* checksum"):
        checkpoint.load(saved)


def test_foreign_files(saved):
    from safetensors.torch import save_file
    save_file({"w": torch.ones(1)}, saved / "weights.safetensors")
    with pytest.raises(CheckpointError, match="has no checksums"):
        checkpoint.load(saved)
    # pickled code is refused, not run
    torch.save({"object": CheckpointError("x")}, saved / "state.pt")
    with pytest.raises(CheckpointError, match="state.pt"):
        checkpoint._load_state(saved / "state.pt")
    torch.save([1, 2], saved / "state.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a dict"):
        checkpoint._load_state(saved / "state.pt")
