"""minidiff vs diffusers benchmarks: ``python -m benchmarks`` (see benchmarks/README.md)."""
