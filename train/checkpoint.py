"""Checkpoints of a run: weights in safetensors, the rest (optimizer, scheduler and RNG states, the
data position...) in a torch.save file that loads with weights_only=True, so loading a checkpoint
never executes pickled code.

    run_dir/checkpoints/step_00001000/weights.safetensors   tensors, with a checksum of each
    run_dir/checkpoints/step_00001000/state.pt              tensors and plain Python values

A checkpoint directory appears complete or not at all: it is written under a temporary name in the
same folder, flushed to disk, then renamed. A run killed mid-save leaves only a temporary directory,
which the next save removes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "save", "latest", "load", "checkpoint_dirs"]

WEIGHTS = "weights.safetensors"
STATE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TEMP_PREFIX = ".incomplete-"
# what torch.load(weights_only=True) can rebuild, besides containers
_PLAIN = (torch.Tensor, str, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupt; the message names the file and the problem."""


# --- save ---------------------------------------------------------------------------------


def save(run_dir, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int | None = 3) -> Path:
    """Write the checkpoint of `step` atomically; keep only the newest `keep` ones (None keeps all).

    tensors: name -> tensor (e.g. Method.state_dict()); copied to the CPU.
    state: tensors, numbers, strings, None, dtypes/devices and dicts/lists/tuples of them (optimizer
        and scheduler state_dicts qualify; numpy arrays do not: convert them to tensors or lists).
    Returns the checkpoint directory. Saving a step that already has a checkpoint replaces it.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint.save: step must be a non-negative int, got {step!r}")
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise ValueError(f"checkpoint.save: keep must be a positive int or None (keep all), got {keep!r}")
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise TypeError("checkpoint.save: tensors must be a dict of str -> torch.Tensor")
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint.save: state must be a dict, got {type(state).__name__}")
    _check_plain(state, "state")

    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    _remove_incomplete(folder)
    final = folder / f"step_{step:08d}"
    temp = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=folder))
    try:
        # Own contiguous CPU copies: safetensors refuses views and tensors sharing memory (tied weights).
        cpu = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
        metadata = {"step": str(step), "sha256": json.dumps({name: _digest(t) for name, t in cpu.items()})}
        save_file(cpu, temp / WEIGHTS, metadata=metadata)
        with open(temp / STATE, "wb") as f:
            torch.save(state, f)
        for name in (WEIGHTS, STATE):
            _fsync(temp / name)
        _fsync(temp)
        if final.exists():  # a directory cannot be renamed over a non-empty one: move the old one aside
            old = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=folder))
            os.replace(final, old / final.name)
            os.replace(temp, final)
            shutil.rmtree(old)
        else:
            os.replace(temp, final)
        _fsync(folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if keep is not None:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def _check_plain(value, where: str) -> None:
    """Raise TypeError naming the first value torch.load(weights_only=True) could not rebuild."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise TypeError(f"checkpoint.save: {where} has a key of type {type(key).__name__}; "
                                "keys must be str, int, float, bool or None")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"checkpoint.save: {where} is a {type(value).__module__}.{type(value).__name__}, which "
                        "torch.load(weights_only=True) cannot load; store tensors, numbers, strings or "
                        "containers of them")


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.reshape(-1).view(torch.uint8).numpy()  # the raw bytes, whatever the dtype
    return hashlib.sha256(data.tobytes()).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_incomplete(folder: Path) -> None:
    """Temporary directories left by a save that was killed (only the main process saves)."""
    for path in folder.glob(_TEMP_PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)


# --- find and load ------------------------------------------------------------------------


def checkpoint_dirs(run_dir) -> list[Path]:
    """The complete checkpoint directories of a run, oldest step first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest(run_dir) -> Path | None:
    """The checkpoint directory of the highest step in run_dir, or None when there is none."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def load(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors on the CPU, state) of a checkpoint directory, or of the latest checkpoint when `path`
    is a run directory. Raises CheckpointError naming the file on anything missing or corrupt."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a directory holding {WEIGHTS} "
                              f"and {STATE}, or a run directory with checkpoints/)")
    if not (path / WEIGHTS).exists() and not (path / STATE).exists():
        found = latest(path)
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoint: neither {WEIGHTS} and {STATE} nor "
                                  "checkpoints/step_*/")
        path = found
    return _load_weights(path / WEIGHTS), _load_state(path / STATE)


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        tensors = load_file(file, device="cpu")
        with open(file, "rb") as f:  # the header: 8-byte little-endian length, then JSON
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        digests = header.get("__metadata__", {}).get("sha256")
        if digests is None:
            raise CheckpointError(f"{file} has no checksums: it was not written by train.checkpoint.save")
        digests = json.loads(digests)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{file} is truncated or corrupt: {error}") from error
    if set(digests) != set(tensors):
        raise CheckpointError(f"{file} is corrupt: its tensor names do not match the checksums written with them")
    for name, tensor in tensors.items():
        if _digest(tensor) != digests[name]:
            raise CheckpointError(f"{file} is corrupt: the data of tensor {name!r} does not match its checksum")
    return tensors


def _load_state(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # zip, unpickling and weights_only errors have no common base class
        raise CheckpointError(f"{file} is truncated or corrupt, or holds values weights_only loading "
                              f"refuses: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} is corrupt: it holds a {type(state).__name__}, not a dict")
    return state
