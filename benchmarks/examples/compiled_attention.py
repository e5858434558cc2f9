"""The readable ``math`` attention through ``torch.compile`` (inductor), registered as the attention backend
``"compiled"``: the shortest way to a generated kernel. Inductor fuses the scale, the softmax and the casts around
the two matmuls; it compiles once per new input shape (seconds each), so time it after a warm-up, as the benchmark
does: ``python -m benchmarks --level op --kernel benchmarks.examples.compiled_attention``.
"""

from __future__ import annotations

import torch

from minidiff import ops

compiled_attention = torch.compile(ops.math_attention, dynamic=False)

ops.register_backend("attention", "compiled", compiled_attention, overwrite=True)
