"""gansparse: fast masked and sparse kernels and GAN compression methods for PyTorch.

Importing gansparse loads no compiled code, needs no compiler and never initialises CUDA; the
compiled extension is loaded by the first op that runs on it.
"""
from . import export, functional, masks, metrics, prune
from ._dispatch import IMPLS, BackendUnavailableError
from .layers import ConditionalBatchNorm2d, MaskedConv2d, MaskedConvNormAct, MaskedConvTranspose2d
from .sparse import SparseConv2d, SparseConvTranspose2d, sparsify
# The function shadows its module as an attribute of gansparse: gansparse.profile(model, x).
from .profile import profile, profile_table

__version__ = "0.1.0"

__all__ = [
    "IMPLS",
    "BackendUnavailableError",
    "ConditionalBatchNorm2d",
    "MaskedConv2d",
    "MaskedConvNormAct",
    "MaskedConvTranspose2d",
    "SparseConv2d",
    "SparseConvTranspose2d",
    "export",
    "functional",
    "masks",
    "metrics",
    "profile",
    "profile_table",
    "prune",
    "sparsify",
    "__version__",
]
