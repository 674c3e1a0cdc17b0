"""Triton kernels, installed as gansparse.kernels. Imported only when the triton backend runs."""
