// ClusteredAttention on the CPU (float32 math; the glue converts float16 in and out).
// Semantics: schema.CLUSTERED_ATTENTION / attnexport/ops/clustered_reference.py.
#pragma once
#include "cpu/cpu_features.h"
#include "cpu/kernels/kernel_api.h"

namespace attnexport::cpu {

struct ClusteredAttentionProblem {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0, value_dim = 0;
  float scale = 0.f;           // logits are scale * q.k
  bool causal = false;         // key j visible to query i only if j <= i' = i + (Skv - Sq)
  int64_t window_left = -1;    // near window, -1 = unbounded
  int64_t window_right = -1;   // near window, -1 = unbounded
  int64_t dilation = 1;        // >= 1
  int64_t num_global = 0;      // >= 0
  int64_t num_clusters = 1;    // M >= 1
  int64_t iterations = 0;      // Lloyd steps (unused with centroids)
  bool cluster_queries = false;  // false: cluster=keys; true: cluster=queries (no pattern, non-causal)
  // How many threads the pool probably has: only how finely work is split, never the result.
  int64_t parallelism = 1;
};

struct ClusteredAttentionTensors {
  const float* q = nullptr;                // [B, Hq, Sq, Dk]
  const float* k = nullptr;                // [B, Hkv, Skv, Dk]
  const float* v = nullptr;                // [B, Hkv, Skv, Dv]
  const bool* key_padding_mask = nullptr;  // [B, Skv], true = attend; may be null
  const float* centroids = nullptr;        // [Hkv, M, Dk] given key centres (cluster=keys); may be null
  float* y = nullptr;                      // [B, Hq, Sq, Dv]
  // State mode (clustered_state.cc): [B, Hkv, G + R + M + 1, Dk + Dv + 1], R = window_left + 1.
  const float* past_state = nullptr;       // may be null: the empty state
  float* present_state = nullptr;          // may be null: not asked for
};

}  // namespace attnexport::cpu

// State mode: causal, cluster=keys, centroids given, window_left >= 0, dilation 1, q_len == kv_len (the
// call's tokens, positions P .. P + S - 1 with P read from the state).
ATTNEXPORT_DECLARE_ISA_KERNEL(void ClusteredAttentionStateForward(
    const ::attnexport::cpu::ClusteredAttentionProblem& problem, const ::attnexport::cpu::ClusteredAttentionTensors& tensors,
    const ::attnexport::cpu::ThreadPool& pool, const ::attnexport::cpu::Scratch& scratch))

ATTNEXPORT_DECLARE_ISA_KERNEL(void ClusteredAttentionForward(const ::attnexport::cpu::ClusteredAttentionProblem& problem,
                                                             const ::attnexport::cpu::ClusteredAttentionTensors& tensors,
                                                             const ::attnexport::cpu::ThreadPool& pool,
                                                             const ::attnexport::cpu::Scratch& scratch))
