"""Intermediate features for distillation: forward hooks that keep chosen modules' outputs, and
the layers the papers distill by default on the CycleGAN / pix2pix networks."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gansparse.models import NLayerDiscriminator, UnetGenerator
from gansparse.models.pix2pix import residual_blocks

__all__ = ["FeatureTaps", "default_attention_layers", "default_discriminator_layers", "parse_layers"]


class FeatureTaps:
    """Keeps the outputs of `model`'s modules named in `names` ('' is the model itself; a name
    ending in ':in' keeps that module's first input instead) from the first forward after reset(),
    so a loss that runs a network several times (CycleGAN's cycle and identity passes) reads the
    features of the pass it distills.

    Only modules that run as modules can be tapped: in a compact model (a torch.fx GraphModule from
    gansparse.export) those are the leaf layers, which keep their names. So a residual block's
    output is tapped as the input of the layer after it.

        taps = FeatureTaps(G, ["model.9", "model.12"])
        taps.reset(); G(x); G(y); features = taps.outputs()   # of G(x): [model.9, model.12]

    The outputs are the modules' own tensors, so gradients flow through them; close() removes the
    hooks.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        missing = [name for name in names if name.removesuffix(":in") not in modules]
        if missing:
            raise ValueError(f"{type(model).__name__} has no module named {missing}; its modules are "
                             f"{[n for n in modules if n][:40]}...")
        self.names = list(names)
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = [self._tap(modules[name.removesuffix(":in")], name) for name in self.names]

    def _tap(self, module: nn.Module, name: str):
        if name.endswith(":in"):
            def keep_input(_module, inputs):
                self._outputs.setdefault(name, inputs[0])
            return module.register_forward_pre_hook(keep_input)

        def keep_output(_module, _inputs, output):
            self._outputs.setdefault(name, output)
        return module.register_forward_hook(keep_output)

    def reset(self) -> None:
        """Forget the kept outputs: the next forward's are kept."""
        self._outputs.clear()

    def outputs(self) -> list[torch.Tensor]:
        """The outputs of the first forward since reset(), in the order of `names`."""
        missing = [name for name in self.names if name not in self._outputs]
        if missing:
            raise RuntimeError(f"no output recorded for {missing}: run the model after reset()")
        return [self._outputs[name] for name in self.names]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._outputs.clear()


def parse_layers(option: str) -> list[str] | None:
    """A comma-separated option of module names; None when empty (the default layers apply)."""
    names = [name.strip() for name in option.split(",") if name.strip()]
    return names or None


def _first_leaf(model: nn.Module, name: str) -> str:
    """The first module without children at or under `name`: the first layer to run in it."""
    return next(n for n, m in model.named_modules() if (n == name or n.startswith(name + ".")) and
                not any(True for _ in m.children()))


def _convs(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]


def default_attention_layers(generator: nn.Module) -> list[str]:
    """DMAD's generator layers (Sec. IV-A3 and its official code):

    - ResnetGenerator and MobileResnetGenerator: the input of the residual stream (the ReLU after
      the last downsampling) and the outputs of the residual blocks closing each third of them (with 9 blocks: the 3rd,
      6th and 9th; 'model.9', 'model.12', 'model.15', 'model.18' in the reference's layout), each
      block's output tapped as the input of the first layer after it;
    - UnetGenerator: convolutions 2, 4, 12 and 14 of unet_256 in forward order, i.e. the 2nd,
      4th, 5th-from-last and 3rd-from-last for any depth.
    """
    blocks = residual_blocks(generator)
    if blocks:
        thirds = sorted({blocks[max(round(k * len(blocks) / 3) - 1, 0)] for k in (1, 2, 3)})
        return [f"model.{blocks[0] - 1}"] + [_first_leaf(generator, f"model.{i + 1}") + ":in" for i in thirds]
    if isinstance(generator, UnetGenerator):
        convs = _convs(generator)  # named_modules order is the forward order in the U-Net
        return [convs[i] for i in (1, 3, len(convs) - 5, len(convs) - 3)]
    raise ValueError(f"no default attention layers for {type(generator).__name__}: name them explicitly")


def default_discriminator_layers(discriminator: nn.Module) -> tuple[list[str], str]:
    """(attention layers, feature layer) of a PatchGAN teacher, as DMAD's official code takes them:
    the outputs of the 2nd and of the last LeakyReLU ('model.4' and 'model.10' of the 3-layer
    PatchGAN) for co-attention, and the last one, the features the output conv reads, for the
    discriminator feature distillation of Eq. 10."""
    if not isinstance(discriminator, NLayerDiscriminator):
        raise ValueError(f"no default layers for {type(discriminator).__name__}: name them explicitly")
    activations = [f"model.{i}" for i, m in enumerate(discriminator.model) if isinstance(m, nn.LeakyReLU)]
    return sorted({activations[1], activations[-1]}, key=activations.index), activations[-1]
