"""Choice of backend for each op call.

Order: the op's `impl=` argument, then the GANSPARSE_IMPL environment variable, then the fastest
backend available for the tensors' device. An explicit `impl=` that cannot run is an error. A
GANSPARSE_IMPL or automatic choice that cannot run falls back to the next backend with a one-time
warning, or raises when GANSPARSE_STRICT=1.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from . import _ext

IMPLS = ("ref", "cpu", "cuda", "triton")

# Fastest first.
_AUTO_ORDER = {"cpu": ("cpu", "ref"), "cuda": ("cuda", "triton", "ref")}

_warned: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run these tensors here."""


def strict() -> bool:
    return os.environ.get("GANSPARSE_STRICT", "0") == "1"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(impl: str, device: torch.device) -> str | None:
    """Why `impl` cannot run tensors on `device`, or None when it can."""
    if impl == "ref":
        return None
    if impl == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs CPU tensors, these are on {device}"
        return None if _ext.extension() is not None else _ext.load_error()
    if impl == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors, these are on {device}"
        if _ext.extension() is None:
            return _ext.load_error()
        return None if _ext.with_cuda() else "gansparse._C was built without CUDA kernels"
    if impl == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpreted():
            return "Triton runs CPU tensors only in its interpreter (set TRITON_INTERPRET=1 before importing triton)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not run tensors on {device}"
        return None
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _fall_back(op: str, message: str) -> None:
    if strict():
        raise BackendUnavailableError(f"{op}: {message} (GANSPARSE_STRICT=1 forbids falling back)")
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"gansparse {op}: {message}; falling back", RuntimeWarning, stacklevel=4)


def select(op: str, device: torch.device, impl: str | None = None, available: tuple[str, ...] = IMPLS) -> str:
    """The backend that runs `op` on tensors on `device`."""
    if impl is not None:
        if impl not in available:
            raise ValueError(f"{op}: impl must be one of {available}, got {impl!r}")
        reason = unavailable_reason(impl, device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: impl={impl!r} cannot run: {reason}")
        return impl
    requested = os.environ.get("GANSPARSE_IMPL", "")
    if requested:
        if requested not in IMPLS:
            raise ValueError(f"GANSPARSE_IMPL must be one of {IMPLS}, got {requested!r}")
        reason = unavailable_reason(requested, device) if requested in available else f"{op} has no {requested} backend"
        if reason is None:
            return requested
        _fall_back(op, f"GANSPARSE_IMPL={requested} cannot run: {reason}")
    order = [name for name in _AUTO_ORDER.get(device.type, ("ref",)) if name in available]
    for name in order:
        reason = unavailable_reason(name, device)
        if reason is None:
            return name
        if name != "ref":
            _fall_back(op, f"the {name} backend is unavailable: {reason}")
    return "ref"
