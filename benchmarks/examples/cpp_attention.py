"""A hand-written C++ attention kernel plugged into minidiff's kernel seam: copy this file to start your own.

``torch.utils.cpp_extension.load_inline`` compiles the C++ below with g++ the first time this module is imported
(about a minute; cached afterwards in ~/.cache/torch_extensions), then ``ops.register_backend`` makes it the
attention backend ``"cpp"``. Every attention of every model then runs it inside ``ops.use_backend("attention", "cpp")``
and the benchmark measures it: ``python -m benchmarks --level op --kernel benchmarks.examples.cpp_attention``.

The kernel computes ``softmax(q k^T * scale + mask) v`` one query row at a time with the online softmax
(Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; the same update as FlashAttention-2,
Dao 2023, Alg. 1): keys are visited in blocks, a running maximum ``m`` and running sum ``l`` rescale the partial
output, so the (N, M) score matrix is never stored. Rows are spread over threads with ``at::parallel_for``.
It computes in float32; bfloat16/float16 inputs are converted on the way in and out.
"""

from __future__ import annotations

import math

import torch
from torch.utils.cpp_extension import load_inline

from minidiff import ops

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

constexpr int64_t KEY_BLOCK = 64;

// q (BH, N, D), k_t (BH, D, M) (keys transposed), v (BH, M, Dv), mask (BH, N, M) or empty -> out (BH, N, Dv);
// all float32 and contiguous.
torch::Tensor attention_forward(torch::Tensor q, torch::Tensor k_t, torch::Tensor v, double scale, torch::Tensor mask) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k_t.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat,
              "cpp attention computes in float32");
  const int64_t BH = q.size(0), N = q.size(1), D = q.size(2), M = k_t.size(2), Dv = v.size(2);
  auto out = torch::empty({BH, N, Dv}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_t.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* maskp = mask.numel() ? mask.data_ptr<float>() : nullptr;
  float* outp = out.data_ptr<float>();
  const float s = static_cast<float>(scale);

  at::parallel_for(0, BH * N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(Dv), scores(KEY_BLOCK);
    for (int64_t row = begin; row < end; ++row) {  // row = (b * heads + h) * N + i
      const float* qi = qp + row * D;
      const float* kb = kp + (row / N) * M * D;
      const float* vb = vp + (row / N) * M * Dv;
      float running_max = std::numeric_limits<float>::lowest(), running_sum = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j0 = 0; j0 < M; j0 += KEY_BLOCK) {
        const int64_t len = std::min(KEY_BLOCK, M - j0);
        // scores of this key block, s_j = q_i . k_j; keys are transposed so the inner loop runs along j (vectorised)
        std::fill(scores.begin(), scores.end(), 0.f);
        for (int64_t d = 0; d < D; ++d) {
          const float qd = qi[d];
          const float* kd = kb + d * M + j0;
          for (int64_t j = 0; j < len; ++j) scores[j] += qd * kd[j];
        }
        float block_max = std::numeric_limits<float>::lowest();
        for (int64_t j = 0; j < len; ++j) {
          scores[j] = scores[j] * s + (maskp ? maskp[row * M + j0 + j] : 0.f);
          block_max = std::max(block_max, scores[j]);
        }
        const float new_max = std::max(running_max, block_max);
        const float correction = std::exp(running_max - new_max);  // rescale what was summed under the old max
        running_sum *= correction;
        for (int64_t d = 0; d < Dv; ++d) acc[d] *= correction;
        for (int64_t j = 0; j < len; ++j) {  // p_j = exp(s_j - m), its own loop so that expf is vectorised
          scores[j] = std::exp(scores[j] - new_max);
          running_sum += scores[j];
        }
        for (int64_t j = 0; j < len; ++j) {  // acc += p_j v_j
          const float* vj = vb + (j0 + j) * Dv;
          for (int64_t d = 0; d < Dv; ++d) acc[d] += scores[j] * vj[d];
        }
        running_max = new_max;
      }
      for (int64_t d = 0; d < Dv; ++d) outp[row * Dv + d] = acc[d] / running_sum;
    }
  });
  return out;
}
"""

# -fopenmp: at::parallel_for is header code that only spreads work over threads when compiled with OpenMP.
# -ffast-math: lets g++ call glibc's vectorised expf (libmvec) and reorder the sums; the kernel relies on no
# IEEE special case (running maxima start at the lowest finite float) except exp(-inf) = 0 for masked keys.
_module = load_inline(
    name="minidiff_cpp_attention",
    cpp_sources=SOURCE,
    functions=["attention_forward"],
    extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
    extra_ldflags=["-fopenmp", "-lmvec"],
)


def cpp_attention(q, k, v, *, scale: float | None = None, upcast: bool = False, mask=None) -> torch.Tensor:
    """Backend signature of ``minidiff.ops.attention``: q (B, h, N, d), k/v (B, h, M, d) -> (B, h, N, d).

    ``upcast`` is always honoured: the kernel computes in float32 whatever the input dtype."""
    batch, heads, n, d = q.shape
    m, dv = k.shape[-2], v.shape[-1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    q, v = (t.float().reshape(batch * heads, -1, t.shape[-1]).contiguous() for t in (q, v))  # (B*h, tokens, d)
    k_t = k.float().reshape(batch * heads, m, d).transpose(1, 2).contiguous()  # (B*h, M, d) -> (B*h, d, M)
    mask = torch.empty(0) if mask is None else mask.float().expand(batch, heads, n, m).reshape(batch * heads, n, m).contiguous()
    out = _module.attention_forward(q, k_t, v, scale, mask)  # (B*h, N, dv)
    return out.reshape(batch, heads, n, dv).to(q.dtype)


ops.register_backend("attention", "cpp", cpp_attention, overwrite=True)
