"""gansparse: fast masked and sparse kernels and GAN compression methods for PyTorch.

Importing gansparse loads no compiled code, needs no compiler and never initialises CUDA; the
compiled extension is loaded by the first op that runs on it.
"""
from . import functional, masks
from ._dispatch import IMPLS, BackendUnavailableError
from .layers import ConditionalBatchNorm2d, MaskedConv2d, MaskedConvNormAct, MaskedConvTranspose2d

__version__ = "0.1.0"

__all__ = [
    "IMPLS",
    "BackendUnavailableError",
    "ConditionalBatchNorm2d",
    "MaskedConv2d",
    "MaskedConvNormAct",
    "MaskedConvTranspose2d",
    "functional",
    "masks",
    "__version__",
]
