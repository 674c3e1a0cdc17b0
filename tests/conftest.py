"""Shared set-up of the test suite."""
import os

import torch  # torch does not import triton, so the variable below is still read in time

# Without a GPU, the Triton backend runs CPU tensors in the Triton interpreter, which triton
# configures from TRITON_INTERPRET when its kernels are defined: set it before anything imports
# triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def seed():
    """Every test draws the same random tensors, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Runs the test on one thread (tiny networks are faster so, and much faster on a busy machine)."""
    from _runs import single_thread

    with single_thread():
        yield
