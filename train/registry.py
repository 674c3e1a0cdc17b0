"""A registry of classes by name, filled by importing every module of a package (the methods, the
base GANs), so adding one is adding a module."""
from __future__ import annotations

import difflib
import importlib
import pkgutil

__all__ = ["Registry"]


class Registry(dict):
    """name -> class, for subclasses of `base`; `what` names the option in error messages, which
    get_class raises as `error`."""

    def __init__(self, base: type, what: str, error: type[Exception] = ValueError) -> None:
        super().__init__()
        self.base, self.what, self.error = base, what, error

    def register(self, cls: type) -> type:
        """Class decorator: make `cls` available under cls.name."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"register() takes a subclass of {self.base.__module__}.{self.base.__name__}, got {cls!r}")
        if not cls.name:
            raise ValueError(f"{cls.__name__} has no `name`")
        if cls.name in self and self[cls.name] is not cls:
            raise ValueError(f"{self.what} {cls.name!r} is registered twice: {self[cls.name].__name__} and "
                             f"{cls.__name__}")
        self[cls.name] = cls
        return cls

    def get_class(self, name: str) -> type:
        """The class registered as `name`; an `error` listing the registered names otherwise."""
        if name not in self:
            close = difflib.get_close_matches(str(name), self, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise self.error(f"unknown {self.what} {name!r}{hint}; the {self.what}s are: {', '.join(sorted(self))}")
        return self[name]

    def import_all(self, package: str, path) -> None:
        """Import every module of `package` but its base, each registering its classes."""
        for module in pkgutil.iter_modules(path):
            if module.name != "base":
                importlib.import_module(f"{package}.{module.name}")
