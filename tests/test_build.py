"""The compiled extension: what importing gansparse loads, which kernels the build holds, the
AVX2 and baseline x86-64 code paths, and the JIT build that replaces a missing extension."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gansparse import _ext

TESTS = Path(__file__).resolve().parent


def run_python(code: str, *args: str, cwd=None, **env: str) -> dict:
    """Runs `code` in a fresh interpreter with `env` added to the environment; returns the JSON
    object it prints last."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env={**os.environ, **env},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


IMPORT_CHECK = """
import json, sys
import torch
import gansparse
import gansparse.functional as GF

def loaded():
    names = ("triton", "torch.utils.cpp_extension", "gansparse._C")
    return {"cuda_initialized": torch.cuda.is_initialized(), "modules": [m for m in names if m in sys.modules]}

report = {"after_import": loaded()}
x = torch.randn(2, 3, 5, 4)
same = torch.allclose(GF.attention_maps(x, impl="cpu")[0], GF.attention_maps(x, impl="ref")[0])
report["after_cpu_op"] = {**loaded(), "matches_ref": same}
print(json.dumps(report))
"""


def test_import_loads_nothing_compiled_and_needs_no_compiler(tmp_path):
    # No compiler on PATH or in CC/CXX, another working directory, and no fallback allowed.
    report = run_python(IMPORT_CHECK, cwd=tmp_path, PATH=str(tmp_path), CC="/bin/false", CXX="/bin/false",
                        GANSPARSE_STRICT="1", GANSPARSE_NO_JIT="1")
    assert report["after_import"] == {"cuda_initialized": False, "modules": []}
    after_op = report["after_cpu_op"]
    assert after_op["matches_ref"] and not after_op["cuda_initialized"]
    assert "gansparse._C" in after_op["modules"]
    assert "torch.utils.cpp_extension" not in after_op["modules"]


def setup_builds_cuda() -> bool:
    """setup.py's decision to compile the CUDA kernels, in this environment."""
    if os.environ.get("GANSPARSE_SKIP_CUDA", "0") == "1" or torch.version.cuda is None:
        return False
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))


@pytest.mark.parametrize("op", ["gansparse::attention_maps", "gansparse::attention_maps_backward"])
def test_extension_has_cuda_kernels_exactly_when_setup_builds_them(op):
    ext = _ext.extension()
    assert ext is not None, _ext.load_error()
    assert bool(ext.with_cuda) == setup_builds_cuda()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") == bool(ext.with_cuda)


def isa_inputs():
    """(feature, map gradient, p, mean) with channel and pixel counts that leave vector remainders."""
    cases = []
    for dtype in (torch.float32, torch.float64):
        for shape, channels_last in [((2, 13, 7, 9), False), ((2, 13, 7, 9), True), ((3, 8, 16, 16), True),
                                     ((1, 5, 1, 33), False), ((2, 64, 32, 32), False)]:
            f = torch.randn(shape, dtype=dtype)
            if channels_last:
                f = f.contiguous(memory_format=torch.channels_last)
            grad = torch.randn(shape[0], shape[2], shape[3], dtype=dtype)
            cases += [(f, grad, p, p < 3) for p in (1.0, 2.0, 3.5, 4.0)]
    return cases


def maps_and_grads(cases):
    """What the C++ kernels compute for each of `cases`."""
    from gansparse.ops.attention import compiled_ops

    forward, backward = compiled_ops()
    return [(forward([f], p, mean)[0], backward([g], [f], p, mean)[0]) for f, g, p, mean in cases]


ISA_RUN = f"""
import json, sys
import torch
sys.path.insert(0, {str(TESTS)!r})
from test_build import maps_and_grads
from gansparse import _ext

torch.save(maps_and_grads(torch.load(sys.argv[1])), sys.argv[2])
print(json.dumps({{"isa": _ext.extension().cpu_isa}}))
"""


def test_baseline_x86_64_path_matches_the_avx2_path(tmp_path):
    if _ext.extension().cpu_isa != "avx2":
        pytest.skip("this CPU runs the baseline path already")
    cases = isa_inputs()
    torch.save(cases, tmp_path / "inputs.pt")
    report = run_python(ISA_RUN, str(tmp_path / "inputs.pt"), str(tmp_path / "results.pt"), GANSPARSE_CPU_ISA="default")
    assert report["isa"] == "default"
    baseline = torch.load(tmp_path / "results.pt")
    for (maps, grads), (base_maps, base_grads) in zip(maps_and_grads(cases), baseline, strict=True):
        torch.testing.assert_close(maps, base_maps)
        torch.testing.assert_close(grads, base_grads)


JIT_RUN = """
import json, sys
import torch
from gansparse import _ext
from gansparse.ops.attention_ref import attention_maps_ref

module = _ext._jit_build()
f = torch.randn(2, 13, 7, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
g = torch.randn(2, 7, 9, dtype=torch.float64)
leaf = f.clone().requires_grad_()
(expected_map,) = attention_maps_ref([leaf], 3.5, True)
(expected_grad,) = torch.autograd.grad(expected_map, leaf, g)
(actual_map,) = torch.ops.gansparse.attention_maps([f], 3.5, True)
(actual_grad,) = torch.ops.gansparse.attention_maps_backward([g], [f], 3.5, True)
print(json.dumps({
    "module": module.__name__,
    "with_cuda": module.with_cuda,
    "installed_extension_loaded": "gansparse._C" in sys.modules,
    "maps_match": torch.allclose(actual_map, expected_map, rtol=1e-6),
    "grads_match": torch.allclose(actual_grad, expected_grad, rtol=1e-6),
}))
"""


@pytest.mark.slow
def test_jit_build_replaces_a_missing_extension(tmp_path):
    report = run_python(JIT_RUN, GANSPARSE_BUILD_DIR=str(tmp_path))
    assert report.pop("module").startswith("gansparse_jit_")
    assert report == {"with_cuda": 0, "installed_extension_loaded": False, "maps_match": True, "grads_match": True}
    (build_dir,) = tmp_path.iterdir()
    assert build_dir.name.startswith("jit-") and list(build_dir.glob("gansparse_jit_*.so"))
