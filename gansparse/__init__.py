"""gansparse: fast masked and sparse kernels and GAN compression methods for PyTorch.

Importing gansparse loads no compiled code, needs no compiler and never initialises CUDA; the
compiled extension is loaded by the first op that runs on it.
"""
from . import functional
from ._dispatch import IMPLS, BackendUnavailableError

__version__ = "0.1.0"

__all__ = ["IMPLS", "BackendUnavailableError", "functional", "__version__"]
