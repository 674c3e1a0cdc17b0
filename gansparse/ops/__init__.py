"""Ops with a reference twin and compiled and Triton backends, one family per module."""
