"""The base GANs the methods train and compress, one *objective* per module: how to build the
networks of a base GAN and its loss, split into named terms (base.py has the contract). Every module
of this package is imported here, so a new base GAN only needs its own module with a @register'ed
Objective subclass; option `model` selects it."""
from __future__ import annotations

from ..config import ConfigError
from ..registry import Registry
from .base import Objective, SynthesisObjective

__all__ = ["OBJECTIVES", "Objective", "SynthesisObjective", "get_objective", "merged_defaults", "register"]

#: value of option 'model' -> Objective subclass
OBJECTIVES = Registry(Objective, "model", ConfigError)
register = OBJECTIVES.register
get_objective = OBJECTIVES.get_class


def merged_defaults() -> dict:
    """The options of every objective in one dict (a method that takes any base GAN offers them
    all). Objectives that share an option must agree on its default."""
    merged: dict = {}
    for cls in OBJECTIVES.values():
        for key, value in cls.defaults.items():
            if key in merged and merged[key] != value:
                raise ValueError(f"objectives disagree on the default of option {key!r}: {merged[key]!r} and "
                                 f"{value!r} ({cls.__name__}); give one of them its own option name")
            merged[key] = value
    return merged


OBJECTIVES.import_all(__name__, __path__)
