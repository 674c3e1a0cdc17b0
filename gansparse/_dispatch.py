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


def trace_time_constant(fn):
    """Marks `fn` as returning a constant for torch.compile: Dynamo calls it once while tracing,
    in plain Python, and bakes the result into the graph. Choosing a backend loads the extension
    and registers ops, which Dynamo cannot trace. This is what torch.compiler.assume_constant_result
    does; calling that here would import torch._dynamo, and with it triton, on `import gansparse`."""
    fn._dynamo_marked_constant = True
    return fn


def strict() -> bool:
    return os.environ.get("GANSPARSE_STRICT", "0") == "1"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _compiled_reason(compiled_op: str | None) -> str | None:
    if _ext.extension() is None:
        return _ext.load_error()
    if compiled_op is not None and not hasattr(torch.ops.gansparse, compiled_op):
        return f"gansparse._C lacks gansparse::{compiled_op}; it is older than this code, rebuild it"
    return None


def unavailable_reason(impl: str, device: torch.device, compiled_op: str | None = None) -> str | None:
    """Why `impl` cannot run tensors on `device`, or None when it can. `compiled_op` names the
    torch.ops.gansparse op that the cpu and cuda backends call."""
    if impl == "ref":
        return None
    if impl == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs CPU tensors, these are on {device}"
        return _compiled_reason(compiled_op)
    if impl == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors, these are on {device}"
        if not _ext.with_cuda():
            return _ext.load_error() or "gansparse._C was built without CUDA kernels"
        return _compiled_reason(compiled_op)
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


def select(
    op: str,
    device: torch.device,
    impl: str | None = None,
    available: tuple[str, ...] = IMPLS,
    compiled_op: str | None = None,
) -> str:
    """The backend that runs `op` on tensors on `device`; `compiled_op` (default `op`) is the
    torch.ops.gansparse op its cpu and cuda backends call."""
    compiled_op = compiled_op or op
    if impl is not None:
        if impl not in available:
            raise ValueError(f"{op}: impl must be one of {available}, got {impl!r}")
        reason = unavailable_reason(impl, device, compiled_op)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: impl={impl!r} cannot run: {reason}")
        return impl
    requested = os.environ.get("GANSPARSE_IMPL", "")
    if requested:
        if requested not in IMPLS:
            raise ValueError(f"GANSPARSE_IMPL must be one of {IMPLS}, got {requested!r}")
        reason = unavailable_reason(requested, device, compiled_op) if requested in available else f"{op} has no {requested} backend"
        if reason is None:
            return requested
        _fall_back(op, f"GANSPARSE_IMPL={requested} cannot run: {reason}")
    order = [name for name in _AUTO_ORDER.get(device.type, ("ref",)) if name in available]
    for name in order:
        reason = unavailable_reason(name, device, compiled_op)
        if reason is None:
            return name
        if name != "ref":
            _fall_back(op, f"the {name} backend is unavailable: {reason}")
    return "ref"
