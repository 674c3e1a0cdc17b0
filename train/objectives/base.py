"""The contract of a base GAN's objective, shared by every method (dense trains it, the compression
methods reuse its networks and its loss terms).

A method holds one objective and, per micro-batch:

    batch = objective.prepare(batch)                        # on the device, with the step's draws
    g_terms, fakes = objective.generator_terms(nets, batch)  # G's loss = sum(g_terms.values())
    d_terms = objective.discriminator_terms(nets, batch, objective.pool(detached fakes))

The terms are named and each is already multiplied by its weight (generator_weights /
discriminator_weights say by how much), so a method can compare them term by term, as Self-Supervised
GAN Compression does between the original and the compressed generator.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Objective", "SynthesisObjective"]


class Objective:
    """A base GAN: how to build its networks and its loss, split into named terms."""

    #: the value of option 'model' that selects it
    name: str = ""
    #: the data it trains on: 'paired', 'unpaired', 'conditional' or 'unconditional' (train/data.py)
    data_kind: str = ""
    #: its options (architecture, loss weights), offered by every method built on it; an option
    #: shared with another objective must have the same default
    defaults: dict = {}
    #: options a teacher run's config.yaml fixes (the architecture), copied by train.teacher
    architecture_keys: tuple[str, ...] = ()
    #: (generator, discriminator that judges it) per direction
    directions: tuple[tuple[str, str], ...] = (("G", "D"),)
    #: discriminator updates per generator update (e.g. a WGAN-GP critic's 5)
    n_critic: int = 1
    #: network name -> file of the reference implementation's checkpoint, or a tuple of names to try
    #: in order (train.teacher loads them)
    reference_files: dict[str, str | tuple[str, ...]] = {}

    def __init__(self, cfg: dict, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device

    # --- networks -------------------------------------------------------------------------------

    def build(self, name: str, mask: str | None = None) -> nn.Module:
        """A fresh, initialised network `name` (a generator or discriminator of `directions`), on the
        CPU; `mask` (a kind of gansparse.masks) puts channel masks in a generator where its model
        supports them."""
        raise NotImplementedError

    def unwrap_reference(self, name: str, state: dict) -> dict:
        """The state_dict of network `name` in the loaded content of its reference checkpoint file
        (train.teacher), for references that save it inside a dict of their own."""
        return state

    def generators(self) -> list[str]:
        return [g for g, _ in self.directions]

    # --- data -----------------------------------------------------------------------------------

    def prepare(self, batch: dict) -> dict:
        """The micro-batch on the device with this step's random draws added (e.g. a latent 'z').
        Idempotent: keys already present are kept, so one prepared batch gives a student and its
        teacher the same draws."""
        return {key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                for key, value in batch.items()}

    def generator_inputs(self, batch: dict, generator: str = "G") -> tuple[torch.Tensor, ...]:
        """The positional inputs of `generator` on a prepared batch."""
        raise NotImplementedError

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        """Inputs of G at the run's resolution, on the device (profiling, latency, export)."""
        raise NotImplementedError

    def input_image(self, batch: dict) -> torch.Tensor | None:
        """G's input on a prepared batch as an image of its output's size, shown beside the output
        in sample grids (an image-to-image model's 'A'); None when G's input is no image."""
        return batch.get("A")

    @property
    def target_key(self) -> str | None:
        """The batch key of the ground truth of G's output (paired data's 'B'), or None: sample grids
        show it and the evaluation measures PSNR and SSIM against it."""
        return "B" if self.data_kind == "paired" else None

    # --- loss -----------------------------------------------------------------------------------

    def generator_terms(self, nets: dict[str, nn.Module], batch: dict
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(G's loss terms by name, each multiplied by its weight; {generator: its output on its own
        inputs, with its graph}) on a prepared batch. `nets` maps the direction names to networks,
        so a method can swap in teacher generators to get the original model's terms."""
        raise NotImplementedError

    def discriminator_terms(self, nets: dict[str, nn.Module], batch: dict, fakes: dict[str, torch.Tensor]
                            ) -> dict[str, torch.Tensor]:
        """D's loss terms by name, each multiplied by its weight, on the prepared batch's real data
        and the generators' outputs `fakes`."""
        raise NotImplementedError

    def generator_weights(self) -> dict[str, float]:
        """The weight already in each generator term."""
        raise NotImplementedError

    def discriminator_weights(self) -> dict[str, float]:
        """The weight already in each discriminator term."""
        raise NotImplementedError

    def pool(self, fakes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The fakes the discriminators train on (e.g. from a history of fakes); `fakes` itself here."""
        return fakes

    # --- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain Python state to checkpoint (e.g. history pools)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SynthesisObjective(Objective):
    """noise (and class) -> image. prepare() draws a latent 'z' ~ N(0, 1) [N, dim_z] and, when the
    model is class-conditional, class ids 'y' [N] uniformly over `n_classes` (the data's 'label' are
    the real images' classes). Subclasses set `dim_z`, `n_classes` (0: unconditional) and
    `resolution` in __init__, and define build() and the terms."""

    data_kind = "unconditional"
    dim_z: int
    n_classes: int = 0

    def prepare(self, batch: dict) -> dict:
        batch = super().prepare(batch)
        count = len(batch["image"])
        if "z" not in batch:
            batch["z"] = torch.randn(count, self.dim_z, device=self.device)
        if self.n_classes and "y" not in batch:
            batch["y"] = torch.randint(self.n_classes, (count,), device=self.device)
        return batch

    def generator_inputs(self, batch: dict, generator: str = "G") -> tuple[torch.Tensor, ...]:
        return (batch["z"], batch["y"]) if self.n_classes else (batch["z"],)

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        z = torch.randn(batch_size, self.dim_z, device=self.device)
        if not self.n_classes:
            return (z,)
        return z, torch.arange(batch_size, device=self.device) % self.n_classes
