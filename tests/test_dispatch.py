"""Backend choice: the impl= argument, then GANSPARSE_IMPL, then the fastest available backend."""
import warnings

import pytest
import torch

import gansparse
import gansparse.functional as GF
from gansparse import _dispatch, _ext
from gansparse.ops import attention
from gansparse.ops.attention_ref import attention_maps_ref

CPU = torch.device("cpu")
OP = "attention_maps"  # an op the extension has: the compiled backends need it


@pytest.fixture(autouse=True)
def clean_dispatch_state(monkeypatch):
    """No backend settings from the caller's environment, and no fallback warned about yet."""
    for name in ("GANSPARSE_IMPL", "GANSPARSE_STRICT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_dispatch, "_warned", set())


@pytest.fixture
def ref_calls(monkeypatch):
    """The calls attention_maps makes to the reference backend."""
    calls = []

    def spy(*args):
        calls.append(args)
        return attention_maps_ref(*args)

    monkeypatch.setattr(attention, "attention_maps_ref", spy)
    return calls


@pytest.fixture
def no_extension(monkeypatch):
    """gansparse._C as if it had never been built, with no JIT build to replace it."""

    def missing():
        raise ImportError("No module named 'gansparse._C'")

    monkeypatch.setattr(_ext, "_import_compiled", missing)
    monkeypatch.setattr(_ext, "_errors", [])
    monkeypatch.setenv("GANSPARSE_NO_JIT", "1")
    _ext.extension.cache_clear()
    yield
    # Runs before monkeypatch restores the importer, so the next call loads the real extension.
    _ext.extension.cache_clear()


def fallback_warnings(call, times=3):
    """The RuntimeWarnings of `times` calls, duplicates included."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(times):
            call()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def maps(**kwargs):
    return GF.attention_maps(torch.randn(2, 3, 4, 4), **kwargs)


def test_auto_picks_the_cpu_backend_for_cpu_tensors(ref_calls):
    assert _dispatch.select(OP, CPU) == "cpu"
    assert fallback_warnings(maps) == []
    assert ref_calls == []


def test_auto_runs_the_reference_on_devices_without_a_backend(ref_calls):
    assert _dispatch.select(OP, torch.device("meta")) == "ref"
    assert fallback_warnings(lambda: GF.attention_maps(torch.randn(2, 3, 4, 4, device="meta")), 1) == []
    assert len(ref_calls) == 1


@pytest.mark.parametrize("env, impl, runs_ref", [("cpu", "ref", True), ("ref", "cpu", False)])
def test_impl_argument_wins_over_the_environment(monkeypatch, ref_calls, env, impl, runs_ref):
    monkeypatch.setenv("GANSPARSE_IMPL", env)
    assert _dispatch.select(OP, CPU, impl) == impl
    maps(impl=impl)
    assert bool(ref_calls) == runs_ref


def test_environment_is_honoured(monkeypatch, ref_calls):
    monkeypatch.setenv("GANSPARSE_IMPL", "ref")
    assert _dispatch.select(OP, CPU) == "ref"
    maps()
    assert len(ref_calls) == 1


@pytest.mark.parametrize("call", [
    lambda: maps(impl="cuda"),
    lambda: GF.attention_distill_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), impl="cuda"),
], ids=["attention_maps", "attention_distill_loss"])
def test_explicit_impl_that_cannot_run_raises(call):
    with pytest.raises(gansparse.BackendUnavailableError, match="impl='cuda' cannot run: the cuda backend runs CUDA tensors"):
        call()


def test_unknown_impl_raises():
    with pytest.raises(ValueError, match=r"impl must be one of \('ref', 'cpu', 'cuda', 'triton'\), got 'gpu'"):
        _dispatch.select(OP, CPU, "gpu")


def test_unknown_environment_impl_raises(monkeypatch):
    monkeypatch.setenv("GANSPARSE_IMPL", "gpu")
    with pytest.raises(ValueError, match="GANSPARSE_IMPL must be one of"):
        maps()


def test_environment_impl_that_cannot_run_falls_back_warning_once(monkeypatch, ref_calls):
    monkeypatch.setenv("GANSPARSE_IMPL", "cuda")
    (warning,) = fallback_warnings(maps)
    assert "GANSPARSE_IMPL=cuda cannot run" in warning
    assert _dispatch.select(OP, CPU) == "cpu"
    assert ref_calls == []


def test_environment_impl_that_cannot_run_raises_when_strict(monkeypatch):
    monkeypatch.setenv("GANSPARSE_IMPL", "cuda")
    monkeypatch.setenv("GANSPARSE_STRICT", "1")
    with pytest.raises(gansparse.BackendUnavailableError, match="GANSPARSE_IMPL=cuda cannot run.*GANSPARSE_STRICT=1"):
        maps()


def test_environment_impl_the_op_lacks_falls_back(monkeypatch):
    monkeypatch.setenv("GANSPARSE_IMPL", "triton")
    with pytest.warns(RuntimeWarning, match="attention_maps has no triton backend"):
        assert _dispatch.select(OP, CPU, available=("ref", "cpu")) == "cpu"
    with pytest.raises(ValueError, match=r"impl must be one of \('ref', 'cpu'\)"):
        _dispatch.select(OP, CPU, "triton", available=("ref", "cpu"))


def test_extension_without_the_op_falls_back_to_ref():
    (warning,) = fallback_warnings(lambda: _dispatch.select("new_op", CPU))
    assert "gansparse._C lacks gansparse::new_op" in warning
    assert _dispatch.select("new_op", CPU) == "ref"


def test_missing_extension_falls_back_to_ref_warning_once(no_extension, ref_calls):
    (warning,) = fallback_warnings(maps)
    assert "the cpu backend is unavailable: gansparse._C is not built" in warning
    assert "GANSPARSE_NO_JIT=1" in warning
    assert len(ref_calls) == 3
    assert _ext.extension() is None


def test_missing_extension_raises_when_strict(no_extension, monkeypatch):
    monkeypatch.setenv("GANSPARSE_STRICT", "1")
    with pytest.raises(gansparse.BackendUnavailableError, match="the cpu backend is unavailable.*not built"):
        maps()


def test_missing_extension_makes_explicit_cpu_unavailable(no_extension):
    with pytest.raises(gansparse.BackendUnavailableError, match="impl='cpu' cannot run: gansparse._C is not built"):
        maps(impl="cpu")


def test_triton_runs_cpu_tensors_only_in_its_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(gansparse.BackendUnavailableError, match="impl='triton' cannot run"):
        _dispatch.select(OP, CPU, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    assert _dispatch.select(OP, CPU, "triton") == "triton"
