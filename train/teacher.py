"""Loading the trained networks a compression method starts from (its teacher), for any base GAN
(train/objectives)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gansparse.models import load_reference_state_dict

from . import checkpoint
from .config import load_yaml
from .objectives import OBJECTIVES, get_objective

__all__ = ["load_teacher"]


def load_teacher(cfg: dict, device: torch.device, names: tuple[str, ...] | None = None) -> dict[str, nn.Module]:
    """The teacher's networks, frozen, on `device`: `names`, by default every generator and
    discriminator of the base GAN's directions (e.g. {'G', 'D'}, and 'G_inv', 'D_inv' for CycleGAN).

    cfg['teacher'] is either a run directory of `--method dense` (its config.yaml fixes the
    architecture, which is copied into cfg, and its latest checkpoint the weights) or one of its
    checkpoints (run/checkpoints/step_*), or a directory of the reference implementation's
    checkpoint files (the objective's reference_files, e.g. latest_net_G.pth and latest_net_D.pth
    for pix2pix; the first of a tuple of names that exists), with the architecture given by cfg's
    options.
    """
    path = Path(cfg["teacher"]) if cfg["teacher"] else None
    if path is None or not path.is_dir():
        files = "; ".join(f"{name}: {', '.join(' or '.join(_as_tuple(f)) for f in cls.reference_files.values())}"
                          for name, cls in OBJECTIVES.items() if cls.reference_files)
        raise FileNotFoundError(
            f"option 'teacher' must be a directory, got {cfg['teacher']!r}: either the run directory of "
            f"`python -m train.run --method dense` or a directory of reference checkpoints ({files}). "
            "`python -m train.run` with no arguments trains one first.")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
    from_run = (run_dir / "config.yaml").exists()
    if from_run:
        teacher_cfg = load_yaml(run_dir / "config.yaml")
        cfg["model"] = teacher_cfg.get("model", cfg["model"])
    objective = get_objective(cfg["model"])(cfg, device)
    names = names or [name for direction in objective.directions for name in direction]
    if from_run:
        cfg.update({key: teacher_cfg[key] for key in objective.architecture_keys if key in teacher_cfg})
        tensors, _ = checkpoint.load(path)
        state = {name: {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
                 for name in names}
    else:
        state = {}
        for name in names:
            candidates = _as_tuple(objective.reference_files.get(name, f"{name}.pth"))
            file = next((path / c for c in candidates if (path / c).exists()), None)
            if file is None:
                raise FileNotFoundError(f"teacher checkpoint {' or '.join(str(path / c) for c in candidates)} "
                                        f"is missing")
            state[name] = objective.unwrap_reference(name, torch.load(file, map_location="cpu", weights_only=True))
    nets = {}
    for name in names:
        if not state.get(name):
            raise ValueError(f"the teacher in {path} has no weights for {name}")
        nets[name] = objective.build(name)
        load_reference_state_dict(nets[name], state[name])
        nets[name].to(device).requires_grad_(False)
    return nets


def _as_tuple(files: str | tuple[str, ...]) -> tuple[str, ...]:
    return (files,) if isinstance(files, str) else tuple(files)
