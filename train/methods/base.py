"""What a method supplies to the shared training loop (train/loop.py): its networks, optimizers,
losses and hooks. Methods never run their own loop.

The loop, per step of each stage:
    for part, optimizer in method.optimizers().items():   # e.g. 'G' then 'D', in dict order
        if not method.updates(part, step): continue        # e.g. G every n_critic steps only
        optimizer.zero_grad(set_to_none=True)
        for micro_batch in split(batch, accumulation):     # gradient accumulation
            loss, logs = method.loss(part, micro_batch, step)
            (loss / accumulation).backward()
        optimizer.step(); scheduler[part].step()
    method.after_step(step)
    stop the stage early when method.stage_done(step)

Only the parameters of the part being updated require gradients during its loss (the loop
toggles requires_grad), so a G loss that runs D does not build D's weight gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["Method", "Stage"]


@dataclass(frozen=True)
class Stage:
    """One phase of a method (e.g. DMAD's 'search' then 'finetune'), run for `steps` steps."""

    name: str
    steps: int


class Method:
    """Base class of a registered method (train.methods.register)."""

    name: str = ""
    #: the dataset kind the method trains on: 'paired', 'unpaired', 'conditional' or 'unconditional'
    data_kind: str = "unpaired"
    #: option name -> default value, merged over the loop's options; presets override these
    defaults: dict = {}
    #: preset name -> option overrides; every method has at least 'smoke'
    presets: dict[str, dict] = {}

    def __init__(self, cfg: dict, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        #: every network whose weights are checkpointed, by name (e.g. {'G': ..., 'D': ..., 'G_T': ...})
        self.nets: dict[str, nn.Module] = {}

    # --- structure --------------------------------------------------------------------------

    def build(self) -> None:
        """Create self.nets (loading a teacher if the method has one)."""
        raise NotImplementedError

    def stages(self) -> list[Stage]:
        return [Stage("train", int(self.cfg["steps"]))]

    def begin_stage(self, stage: Stage) -> None:
        """Called before the first step of each stage, also when a run resumes inside it (after
        build() and before load_state_dict()). Optimizers are created after it."""

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers, by part name, in update order. The loop calls this once per stage."""
        raise NotImplementedError

    # --- training ---------------------------------------------------------------------------

    def updates(self, part: str, step: int) -> bool:
        """Whether `part` (an optimizer's name) is updated at `step` of the stage (e.g. a WGAN-GP
        generator every n_critic steps only). A function of the part and step alone, so a resumed
        run skips the same steps; each part's LR schedule runs over its own updates. Default: every
        part, every step."""
        return True

    def loss(self, part: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to minimise for `part`'s optimizer, scalars to log) on one (micro-)batch."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Hook after every optimizer update of a step (mask bounds, pruning schedules...)."""

    def stage_done(self, step: int) -> bool:
        """True ends the current stage early (e.g. a MACs budget is reached)."""
        return False

    def sparsity(self) -> dict[str, float]:
        """Per-layer sparsity of the student, for the progress bar, TensorBoard and the report."""
        return {}

    # --- results ----------------------------------------------------------------------------

    def student(self) -> nn.Module:
        """The generator being trained or compressed (exported at the end)."""
        return self.nets["G"]

    def teacher(self) -> nn.Module | None:
        return self.nets.get("G_T")

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        """Inputs of the student at the preset's resolution, for profiling and latency."""
        raise NotImplementedError

    def prepare(self, batch: dict) -> dict:
        """The data batch with the random draws the generators take (e.g. a latent), on the device.
        The loop prepares a batch once before comparing student and teacher on it."""
        return batch

    def input_image(self, batch: dict) -> torch.Tensor | None:
        """The student's input on a prepared batch as an image of its output's size, shown in
        sample grids; None when it has none."""
        return None

    def target_key(self) -> str | None:
        """The batch key of the ground truth of the student's outputs: sample grids show it and the
        evaluation measures PSNR and SSIM against it; None when the data has none."""
        return None

    def generate(self, batch: dict, net: nn.Module | None = None) -> torch.Tensor:
        """Outputs of `net` (default: the student; e.g. the teacher) on a data batch, images in
        [-1, 1], for sample grids and metrics."""
        raise NotImplementedError

    def extend_report(self, report: dict, run_dir: Path) -> None:
        """Add the method's own measurements to the report in place (and files into run_dir), at
        the end, after the evaluation, in the main process only."""

    def final_model(self) -> nn.Module:
        """The model to export at the end (compact for a compression method)."""
        return self.student()

    # --- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (safetensors): every net's state, keys prefixed by its name."""
        return {f"{name}.{key}": value for name, net in self.nets.items() for key, value in net.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, net in self.nets.items():
            prefix = name + "."
            net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def extra_state(self) -> dict:
        """Plain Python state to checkpoint beside the weights (loaded with weights_only=True)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
