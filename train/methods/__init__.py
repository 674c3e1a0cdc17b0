"""The registry of training methods. Every module of this package is imported here, so a new
method only needs its own module with a @register'ed Method subclass."""
from __future__ import annotations

from ..registry import Registry
from .base import Method, Stage

__all__ = ["METHODS", "Method", "Stage", "get_method", "register"]

#: method name -> Method subclass
METHODS = Registry(Method, "method")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available as --method cls.name (it needs a 'smoke' preset)."""
    if isinstance(cls, type) and "smoke" not in getattr(cls, "presets", {}):
        raise ValueError(f"method {cls.name!r} has no 'smoke' preset")
    return METHODS.register(cls)


get_method = METHODS.get_class

METHODS.import_all(__name__, __path__)
