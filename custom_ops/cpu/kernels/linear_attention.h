// LinearAttention on the CPU (float32 math; the glue converts float16 in and out).
// Semantics: DESIGN.md / attnexport/ops/reference.py::linear_attention.
#pragma once
#include "cpu/cpu_features.h"
#include "cpu/kernels/kernel_api.h"

namespace attnexport::cpu {

enum class FeatureMap { kElu1 = 0, kRelu = 1, kTaylor2 = 2, kFavor = 3 };
enum class ExpansionPoint { kZero = 0, kMean = 1, kMax = 2 };

struct LinearAttentionProblem {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0, value_dim = 0;
  int64_t num_features = 0;  // favor: columns of the projection W [Dk, F]
  float scale = 0.f;         // logits are scale * q.k
  float eps = 1e-6f;
  bool causal = false;       // bottom-right aligned: query i sees key j iff j <= i + (Skv - Sq)
  FeatureMap feature_map = FeatureMap::kElu1;
  ExpansionPoint expansion_point = ExpansionPoint::kZero;  // taylor2 only
  // How many threads the pool probably has (the C API cannot tell a kernel). Only a scheduling
  // hint: how finely work is split; any value gives the same result.
  int64_t parallelism = 1;
};

struct LinearAttentionTensors {
  const float* q = nullptr;                 // [B, Hq, Sq, Dk]
  const float* k = nullptr;                 // [B, Hkv, Skv, Dk]
  const float* v = nullptr;                 // [B, Hkv, Skv, Dv]
  const bool* key_padding_mask = nullptr;   // [B, Skv], true = attend; may be null
  const float* projection = nullptr;        // [Dk, F] for favor
  float* y = nullptr;                       // [B, Hq, Sq, Dv]
  // Recurrent state [B, Hkv, F, Dv + 2] = [S_f | z_f | m_f] per feature (m_f: favor's shift, else 0;
  // favor: z_f = 0 means no key). past_state: the keys of earlier calls, seen by every query (null =
  // none; not with taylor2 mean / max); present_state: past plus this call's unpadded keys (null = not
  // wanted).
  const float* past_state = nullptr;
  float* present_state = nullptr;
};

}  // namespace attnexport::cpu

ATTNEXPORT_DECLARE_ISA_KERNEL(void LinearAttentionForward(const ::attnexport::cpu::LinearAttentionProblem& problem,
                                                          const ::attnexport::cpu::LinearAttentionTensors& tensors,
                                                          const ::attnexport::cpu::ThreadPool& pool,
                                                          const ::attnexport::cpu::Scratch& scratch))
