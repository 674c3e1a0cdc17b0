"""Hypothesis strategies shared by the fuzz tests of the compiled ops."""
import torch
from hypothesis import strategies as st


@st.composite
def small_tensor(draw, dtypes):
    """A tensor of rank 0 to 5 with sides 0 to 4 (so sometimes empty), of one of `dtypes`, and
    channels_last half of the time when it is 4-D."""
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=5))
    t = torch.randn(shape).to(draw(st.sampled_from(dtypes)))
    if t.dim() == 4 and draw(st.booleans()):
        t = t.contiguous(memory_format=torch.channels_last)
    return t
