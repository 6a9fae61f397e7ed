// SparseAttention on the CPU (float32 math; the glue converts float16 in and out).
// Semantics: DESIGN.md / attnexport/ops/reference.py::sparse_pattern and sparse_attention.
#pragma once
#include "cpu/cpu_features.h"
#include "cpu/kernels/kernel_api.h"

namespace attnexport::cpu {

struct SparseAttentionProblem {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0, value_dim = 0;
  float scale = 0.f;            // logits are scale * q.k (+ attn_bias)
  bool causal = false;          // key j visible to query i only if j <= i' = i + (Skv - Sq)
  int64_t window_left = -1;     // -1 = unbounded
  int64_t window_right = -1;    // -1 = unbounded
  int64_t dilation = 1;         // >= 1
  int64_t num_global = 0;       // >= 0
  int64_t block_size = 0;       // BigBird random blocks: 0 = none
  int64_t num_random_blocks = 0;
  int64_t seed = 0;             // >= 0
  // Strides (in elements) of attn_bias broadcast to [B, Hq, Sq, Skv]: 0 along broadcast axes.
  int64_t bias_stride[4] = {0, 0, 0, 0};
  // How many threads the pool probably has: only how finely work is split, never the result.
  int64_t parallelism = 1;
};

struct SparseAttentionTensors {
  const float* q = nullptr;                // [B, Hq, Sq, Dk]
  const float* k = nullptr;                // [B, Hkv, Skv, Dk]
  const float* v = nullptr;                // [B, Hkv, Skv, Dv]
  const bool* key_padding_mask = nullptr;  // [B, Skv], true = attend; may be null
  const float* attn_bias = nullptr;        // strided by problem.bias_stride; may be null
  float* y = nullptr;                      // [B, Hq, Sq, Dv]
};

}  // namespace attnexport::cpu

ATTNEXPORT_DECLARE_ISA_KERNEL(void SparseAttentionForward(const ::attnexport::cpu::SparseAttentionProblem& problem,
                                                          const ::attnexport::cpu::SparseAttentionTensors& tensors,
                                                          const ::attnexport::cpu::ThreadPool& pool,
                                                          const ::attnexport::cpu::Scratch& scratch))
