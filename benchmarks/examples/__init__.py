"""Custom kernels plugged into minidiff's kernel seam; load one with ``python -m benchmarks --kernel MODULE``."""
