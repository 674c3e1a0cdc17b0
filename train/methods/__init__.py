"""The registry of training methods. Every module of this package is imported here, so a new
method only needs its own module with a @register'ed Method subclass."""
from __future__ import annotations

import difflib
import importlib
import pkgutil

from .base import Method, Stage

__all__ = ["METHODS", "Method", "Stage", "get_method", "register"]

#: method name -> Method subclass
METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available as --method cls.name."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register() takes a subclass of train.methods.Method, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice: {METHODS[cls.name].__name__} and {cls.__name__}")
    if "smoke" not in cls.presets:
        raise ValueError(f"method {cls.name!r} has no 'smoke' preset")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The registered Method subclass called `name`; a ValueError listing the methods otherwise."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; the methods are: {', '.join(sorted(METHODS))}")
    return METHODS[name]


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
