"""Builds gansparse and its compiled extension gansparse._C.

The C++ CPU kernels are always built. The CUDA kernels are added when nvcc and a CUDA build of
torch are present. Environment switches:
  GANSPARSE_SKIP_CUDA=1    build the CPU kernels only
  TORCH_CUDA_ARCH_LIST     GPU architectures to compile for (default "8.0;9.0")
  MAX_JOBS                 parallel compile jobs (ninja)
  CUDA_HOME                the CUDA toolkit (default /usr/local/cuda when it exists)
"""
import glob
import os
import shutil

from setuptools import setup


def _default_cuda_home():
    # torch guesses the toolkit from the nvcc on PATH, which fails when that nvcc is a wrapper
    # script outside the toolkit; the conventional location is a better guess.
    if "CUDA_HOME" in os.environ or "CUDA_PATH" in os.environ:
        return
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


_default_cuda_home()
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _cuda_build_status():
    """(build the CUDA kernels?, why not)."""
    if os.environ.get("GANSPARSE_SKIP_CUDA", "0") == "1":
        return False, "GANSPARSE_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA"
    if CUDA_HOME is None or not (shutil.which("nvcc") or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))):
        return False, "nvcc was not found (set CUDA_HOME)"
    return True, ""


def _extension():
    with_cuda, why_not = _cuda_build_status()
    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3", "-fopenmp"]
    if with_cuda:
        print(f"gansparse: building the CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST="
              f"{os.environ['TORCH_CUDA_ARCH_LIST']} with the toolkit in {CUDA_HOME}")
        return CUDAExtension(
            "gansparse._C",
            sources + sorted(glob.glob("csrc/*.cu")),
            define_macros=[("GS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    print(f"gansparse: building the CPU kernels only ({why_not}); the CUDA backend will be unavailable")
    return CppExtension("gansparse._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"])


setup(
    name="gansparse",
    version="0.1.0",
    description="Fast masked and sparse kernels, and five published GAN compression methods, for PyTorch",
    python_requires=">=3.10",
    # Only gansparse goes into site-packages; the Triton kernels of kernels/ install as gansparse.kernels,
    # the networks of models/ as gansparse.models and the training code of train/ as gansparse.train.
    packages=["gansparse", "gansparse.ops", "gansparse.kernels", "gansparse.models", "gansparse.train",
              "gansparse.train.methods"],
    package_dir={"gansparse": "gansparse", "gansparse.kernels": "kernels", "gansparse.models": "models",
                 "gansparse.train": "train", "gansparse.train.methods": "train/methods"},
    entry_points={"console_scripts": ["gansparse-train = gansparse.train.run:main",
                                     "gansparse-study = gansparse.train.study:main"]},
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy",
        "tqdm",
        "safetensors",
        "lpips",
        "torch-fidelity",
        "torchprofile",
        "pyyaml",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={"test": ["pytest", "hypothesis"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
