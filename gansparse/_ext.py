"""The compiled extension gansparse._C, loaded on first use, never at import.

`pip install -e . --no-build-isolation` builds it. When it is missing, the CPU kernels are
compiled once from csrc/ with ninja into a build directory keyed by a hash of the sources (unless
GANSPARSE_NO_JIT=1). When that fails too, `extension()` returns None and `load_error()` says why;
the dispatcher then runs the reference path and warns once.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).resolve().parent.parent / "csrc"
JIT_CFLAGS = ["-O3", "-fopenmp"]

_errors: list[str] = []


def _import_compiled() -> ModuleType:
    return importlib.import_module("gansparse._C")


def jit_build_dir() -> Path:
    """Where the JIT build goes: a directory named by a hash of the sources, flags and torch."""
    import torch

    digest = hashlib.sha256()
    for path in sorted(CSRC.glob("*")):
        if path.suffix in (".h", ".cpp"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    digest.update(" ".join(JIT_CFLAGS).encode())
    digest.update(torch.__version__.encode())
    root = Path(os.environ.get("GANSPARSE_BUILD_DIR", Path.home() / ".cache" / "gansparse"))
    return root / f"jit-{digest.hexdigest()[:16]}"


def _jit_build() -> ModuleType:
    """Compiles the CPU kernels of csrc/ (the CUDA ones take minutes; build those with pip)."""
    if not (CSRC / "module.cpp").exists():
        raise FileNotFoundError(f"no C++ sources at {CSRC} (an installed wheel does not ship them)")
    from torch.utils import cpp_extension

    build_dir = jit_build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    print(f"gansparse: compiling the CPU kernels into {build_dir} (once; about a minute)", file=sys.stderr)
    return cpp_extension.load(
        name=f"gansparse_jit_{build_dir.name[4:]}",
        sources=[str(p) for p in sorted(CSRC.glob("*.cpp"))],
        extra_cflags=JIT_CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
    )


@functools.cache
def extension() -> ModuleType | None:
    """The compiled extension, or None when neither the installed nor a JIT build is available."""
    try:
        return _import_compiled()
    except ImportError as error:
        _errors.append(f"gansparse._C is not built ({error})")
    if os.environ.get("GANSPARSE_NO_JIT", "0") == "1":
        _errors.append("the JIT build is disabled by GANSPARSE_NO_JIT=1")
        return None
    try:
        return _jit_build()
    except Exception as error:  # a failed compile must leave the reference path usable
        _errors.append(f"the JIT build failed: {error}")
        return None


def load_error() -> str:
    """Why `extension()` returned None ('' when it did not)."""
    return "; ".join(_errors)


def with_cuda() -> bool:
    ext = extension()
    return bool(getattr(ext, "with_cuda", False))
