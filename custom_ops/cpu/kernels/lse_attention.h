// LseAttention on the CPU (float32 math; the glue stages float16 in and out).
// Semantics: attnexport/ops/lse_attention.py and attnexport/ops/reference.py::lse_attention.
//
// The weight of key j for query i is w_ij = Σ_d exp(q̃_id + k̃_jd) (q̃ = √scale·q, k̃ = √scale·k). It
// factorises per key dimension, so the keys are summarised per (batch, kv head) by a state of fixed
// size, with per-dimension maxima m_d keeping every exponent <= 0:
//
//   S_d = Σ_j exp(k̃_jd - m_d) v_j   [Dk x Dv],   z_d = Σ_j exp(k̃_jd - m_d)   [Dk],   m_d = max_j k̃_jd.
//
// A query reads it with one reference M_i per row: a_id = exp(q̃_id + m_d - M_i), y_i = (a_i·S) / (a_i·z).
// All sums are matrix products; exponentials are taken once per (token, key dimension), never per
// (token, Dk, Dv) element. When a maximum grows (a new chunk of keys), the carried rows of S and z
// are multiplied by exp(m_old - m_new) <= 1: the same numbers with a new reference, exact up to
// round-off. State layout in memory: [B, Hkv, Dk, Dv + 2] = [S_d | z_d | m_d] per d.
#pragma once
#include "cpu/cpu_features.h"
#include "cpu/kernels/kernel_api.h"

namespace attnexport::cpu {

struct LseAttentionProblem {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0, value_dim = 0;
  float scale = 0.f;      // q̃ = √scale·q, k̃ = √scale·k
  bool causal = false;    // bottom-right aligned: query i sees key j iff j <= i + (Skv - Sq)
  int64_t parallelism = 1;  // scheduling hint only (how finely work is split); results never depend on it
};

struct LseAttentionTensors {
  const float* q = nullptr;                // [B, Hq, Sq, Dk]
  const float* k = nullptr;                // [B, Hkv, Skv, Dk]
  const float* v = nullptr;                // [B, Hkv, Skv, Dv]
  const bool* key_padding_mask = nullptr;  // [B, Skv], true = attend; may be null
  const float* past_state = nullptr;       // [B, Hkv, Dk, Dv + 2]; null = empty
  float* y = nullptr;                      // [B, Hq, Sq, Dv]
  float* present_state = nullptr;          // [B, Hkv, Dk, Dv + 2]; always written (scratch when unused)
};

}  // namespace attnexport::cpu

ATTNEXPORT_DECLARE_ISA_KERNEL(void LseAttentionForward(const ::attnexport::cpu::LseAttentionProblem& problem,
                                                       const ::attnexport::cpu::LseAttentionTensors& tensors,
                                                       const ::attnexport::cpu::ThreadPool& pool,
                                                       const ::attnexport::cpu::Scratch& scratch))
