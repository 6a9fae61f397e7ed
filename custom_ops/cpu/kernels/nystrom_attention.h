// NystromAttention on the CPU (float32 landmarks and factors, float64 landmark system; the glue
// converts float16 in and out). Semantics: attnexport/ops/nystrom_attention.py and
// attnexport/ops/nystrom_reference.py.
#pragma once
#include "cpu/cpu_features.h"
#include "cpu/kernels/kernel_api.h"

namespace attnexport::cpu {

enum class NystromLandmarks { kSegmentMeans = 0, kKmeans = 1 };
enum class NystromSolver { kSketch = 0, kNewtonSchulz = 1, kDirect = 2 };

struct NystromAttentionProblem {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0, value_dim = 0;
  float scale = 0.f;               // logits are scale * q.k
  int64_t num_landmarks = 64;      // m >= 1
  NystromLandmarks landmarks = NystromLandmarks::kSegmentMeans;
  int64_t iterations = 3;          // k-means Lloyd steps
  NystromSolver solver = NystromSolver::kSketch;
  int64_t newton_iterations = 6;
  double ridge = 1e-2;             // > 0 for sketch and direct
  // How many threads the pool probably has: only how finely work is split, never the result.
  int64_t parallelism = 1;
};

struct NystromAttentionTensors {
  const float* q = nullptr;                // [B, Hq, Sq, Dk]
  const float* k = nullptr;                // [B, Hkv, Skv, Dk]
  const float* v = nullptr;                // [B, Hkv, Skv, Dv]
  const bool* key_padding_mask = nullptr;  // [B, Skv], true = attend; may be null
  float* y = nullptr;                      // [B, Hq, Sq, Dv]
};

}  // namespace attnexport::cpu

ATTNEXPORT_DECLARE_ISA_KERNEL(void NystromAttentionForward(const ::attnexport::cpu::NystromAttentionProblem& problem,
                                                           const ::attnexport::cpu::NystromAttentionTensors& tensors,
                                                           const ::attnexport::cpu::ThreadPool& pool,
                                                           const ::attnexport::cpu::Scratch& scratch))
