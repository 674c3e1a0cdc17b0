"""Speed comparisons of gansparse's kernels against their references.

Each benchmark is a module run as `python -m benchmarks.<name>`; the shared measuring and
recording rules live in `benchmarks.harness`.
"""
