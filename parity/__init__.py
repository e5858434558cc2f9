"""Numerical comparison of minidiff with diffusers/transformers. `python -m parity` prints the report."""
