// LinearAttention CPU kernel, compiled once per ISA (namespace attnexport::cpu::ATTNEXPORT_ISA).
//
// Work is split over (batch, kv head): the state S = Σ_j φ(k̃_j) ⊗ [v_j, 1] depends only on the kv
// head, and every query head of the group reads it.
#include <cmath>

#include "cpu/kernels/linear_attention.h"

namespace attnexport::cpu::ATTNEXPORT_ISA {
namespace {

int64_t FeatureCount(const LinearAttentionProblem& p) {
  switch (p.feature_map) {
    case FeatureMap::kTaylor2: return 1 + p.head_dim + p.head_dim * (p.head_dim + 1) / 2;
    case FeatureMap::kFavor: return p.num_features;
    default: return p.head_dim;
  }
}

// φ of one row x̃ (already multiplied by √scale). For taylor2 the quadratic part is the upper
// triangle of x̃x̃ᵀ with the diagonal divided by √2, so φ(q̃)·φ(k̃) = 1 + s + s²/2 with half the
// features of vec(x̃x̃ᵀ)/√2. `lead`/`slope` are the taylor2 constant and linear coefficients
// (1 and 1 for keys; 1 - c + c²/2 and 1 - c for a query expanded around c). Favor returns the log
// of the row shift it applied (its largest exponent) so the caller can rescale eps exactly.
float FeatureRow(const LinearAttentionProblem& p, const float* x, const float* w, float lead, float slope,
                 float* out) {
  const int64_t d = p.head_dim;
  switch (p.feature_map) {
    case FeatureMap::kElu1:
      for (int64_t a = 0; a < d; ++a) out[a] = x[a] > 0.f ? x[a] + 1.f : std::exp(x[a]);
      return 0.f;
    case FeatureMap::kRelu:
      for (int64_t a = 0; a < d; ++a) out[a] = x[a] > 0.f ? x[a] : 0.f;
      return 0.f;
    case FeatureMap::kTaylor2: {
      out[0] = lead;
      for (int64_t a = 0; a < d; ++a) out[1 + a] = slope * x[a];
      float* quad = out + 1 + d;
      const float inv_sqrt2 = 0.70710678118654752f;
      for (int64_t a = 0; a < d; ++a) {
        *quad++ = x[a] * x[a] * inv_sqrt2;
        for (int64_t b = a + 1; b < d; ++b) *quad++ = x[a] * x[b];
      }
      return 0.f;
    }
    case FeatureMap::kFavor: {
      const int64_t f = p.num_features;
      float norm = 0.f;
      for (int64_t a = 0; a < d; ++a) norm += x[a] * x[a];
      float peak = -INFINITY;
      for (int64_t c = 0; c < f; ++c) {
        float u = 0.f;
        for (int64_t a = 0; a < d; ++a) u += x[a] * w[a * f + c];
        out[c] = u;
        peak = u > peak ? u : peak;
      }
      const float inv_sqrt_f = 1.0f / std::sqrt(static_cast<float>(f));
      for (int64_t c = 0; c < f; ++c) out[c] = std::exp(out[c] - peak) * inv_sqrt_f;
      return peak - 0.5f * norm;
    }
  }
  return 0.f;
}

struct HeadJob {
  const LinearAttentionProblem* p;
  const LinearAttentionTensors* t;
  const Scratch* scratch;
  int64_t num_features;
};

// One (batch, kv head): key features, then each query head of the group in turn.
void RunKvHead(const HeadJob& job, int64_t task, float* key_features, float* key_shifts, float* state, float* qx,
              float* qphi) {
  const LinearAttentionProblem& p = *job.p;
  const LinearAttentionTensors& t = *job.t;
  const int64_t F = job.num_features, d = p.head_dim, dv = p.value_dim;
  const int64_t b = task / p.kv_heads, kvh = task % p.kv_heads;
  const int64_t group = p.q_heads / p.kv_heads;
  const float root = std::sqrt(p.scale);
  const float* k = t.k + (b * p.kv_heads + kvh) * p.kv_len * d;
  const float* v = t.v + (b * p.kv_heads + kvh) * p.kv_len * dv;
  const bool* kpm = t.key_padding_mask ? t.key_padding_mask + b * p.kv_len : nullptr;
  const int64_t offset = p.kv_len - p.q_len;  // causal: query i sees keys j <= i + offset

  // Key features; padded keys contribute nothing. Favor keys are rescaled to one common shift (the
  // largest log feature of any visible key), which cancels in the ratio once eps is rescaled by it.
  float key_shift = 0.f;
  float* kx = qx;  // row buffer
  for (int64_t j = 0; j < p.kv_len; ++j) {
    float* row = key_features + j * F;
    if (kpm && !kpm[j]) {
      for (int64_t c = 0; c < F; ++c) row[c] = 0.f;
      key_shifts[j] = -INFINITY;
      continue;
    }
    for (int64_t a = 0; a < d; ++a) kx[a] = root * k[j * d + a];
    key_shifts[j] = FeatureRow(p, kx, t.projection, 1.f, 1.f, row);
  }
  if (p.feature_map == FeatureMap::kFavor) {
    key_shift = -INFINITY;
    for (int64_t j = 0; j < p.kv_len; ++j) key_shift = key_shifts[j] > key_shift ? key_shifts[j] : key_shift;
    if (!std::isfinite(key_shift)) key_shift = 0.f;
    for (int64_t j = 0; j < p.kv_len; ++j) {
      if (kpm && !kpm[j]) continue;
      float* row = key_features + j * F;
      const float factor = std::exp(key_shifts[j] - key_shift);
      for (int64_t c = 0; c < F; ++c) row[c] *= factor;
    }
  }

  // Mean of visible k̃ (taylor2 expansion around the mean logit): non-causal over all, causal prefix.
  const bool taylor_mean = p.feature_map == FeatureMap::kTaylor2 && p.expansion_point == ExpansionPoint::kMean;
  const bool taylor_max = p.feature_map == FeatureMap::kTaylor2 && p.expansion_point == ExpansionPoint::kMax;

  for (int64_t g = 0; g < group; ++g) {
    const int64_t qh = kvh * group + g;
    const float* q = t.q + (b * p.q_heads + qh) * p.q_len * d;
    float* y = t.y + (b * p.q_heads + qh) * p.q_len * dv;
    for (int64_t c = 0; c < F * (dv + 1); ++c) state[c] = 0.f;
    float* key_sum = qx + d;  // Σ visible k̃ (taylor mean)
    for (int64_t a = 0; a < d; ++a) key_sum[a] = 0.f;
    int64_t key_count = 0;
    int64_t added = 0;  // keys folded into the state so far
    auto add_key = [&](int64_t j) {
      if (kpm && !kpm[j]) return;
      const float* phi = key_features + j * F;
      const float* vj = v + j * dv;
      for (int64_t c = 0; c < F; ++c) {
        float* s = state + c * (dv + 1);
        const float f = phi[c];
        for (int64_t e = 0; e < dv; ++e) s[e] += f * vj[e];
        s[dv] += f;
      }
      if (taylor_mean) {
        for (int64_t a = 0; a < d; ++a) key_sum[a] += root * k[j * d + a];
      }
      ++key_count;
    };
    if (!p.causal) {
      for (int64_t j = 0; j < p.kv_len; ++j) add_key(j);
      added = p.kv_len;
    }
    for (int64_t i = 0; i < p.q_len; ++i) {
      if (p.causal) {
        const int64_t limit = i + offset + 1 < p.kv_len ? i + offset + 1 : p.kv_len;
        for (; added < limit; ++added) add_key(added);
      }
      float* qrow = qx + 2 * d;
      for (int64_t a = 0; a < d; ++a) qrow[a] = root * q[i * d + a];
      float lead = 1.f, slope = 1.f;
      if (taylor_mean || taylor_max) {
        float center = 0.f;
        if (taylor_mean && key_count > 0) {
          for (int64_t a = 0; a < d; ++a) center += qrow[a] * key_sum[a];
          center /= static_cast<float>(key_count);
        } else if (taylor_max) {
          const int64_t limit = p.causal ? (i + offset + 1 < p.kv_len ? i + offset + 1 : p.kv_len) : p.kv_len;
          float peak = -INFINITY;
          for (int64_t j = 0; j < limit; ++j) {
            if (kpm && !kpm[j]) continue;
            float s = 0.f;
            for (int64_t a = 0; a < d; ++a) s += q[i * d + a] * k[j * d + a];
            peak = s * p.scale > peak ? s * p.scale : peak;
          }
          center = std::isfinite(peak) ? peak : 0.f;
        }
        lead = 1.f - center + 0.5f * center * center;
        slope = 1.f - center;
      }
      const float q_shift = FeatureRow(p, qrow, t.projection, lead, slope, qphi);
      float den = 0.f;
      for (int64_t e = 0; e < dv; ++e) y[i * dv + e] = 0.f;
      for (int64_t c = 0; c < F; ++c) {
        const float f = qphi[c];
        const float* s = state + c * (dv + 1);
        for (int64_t e = 0; e < dv; ++e) y[i * dv + e] += f * s[e];
        den += f * s[dv];
      }
      const float eps = p.feature_map == FeatureMap::kFavor ? p.eps * std::exp(-(q_shift + key_shift)) : p.eps;
      const float inv = 1.f / (den + eps);
      for (int64_t e = 0; e < dv; ++e) y[i * dv + e] = (den == 0.f) ? 0.f : y[i * dv + e] * inv;
    }
  }
}

}  // namespace

void LinearAttentionForward(const LinearAttentionProblem& p, const LinearAttentionTensors& t, const ThreadPool& pool,
                            const Scratch& scratch) {
  const int64_t F = FeatureCount(p);
  const int64_t tasks = p.batch * p.kv_heads;
  // Per task: key features [Skv, F] and their shifts [Skv], state [F, Dv+1], row buffers.
  const int64_t key_floats = p.kv_len * F;
  const int64_t state_floats = F * (p.value_dim + 1);
  const int64_t row_floats = 3 * p.head_dim + 1;
  float* key_features = scratch.Get<float>(static_cast<size_t>(tasks * key_floats));
  float* states = scratch.Get<float>(static_cast<size_t>(tasks * state_floats));
  float* rows = scratch.Get<float>(static_cast<size_t>(tasks * row_floats));
  float* qphi = scratch.Get<float>(static_cast<size_t>(tasks * (F + 1)));
  float* key_shifts = scratch.Get<float>(static_cast<size_t>(tasks * (p.kv_len + 1)));
  HeadJob job{&p, &t, &scratch, F};
  auto body = [&](size_t task) {
    const int64_t i = static_cast<int64_t>(task);
    RunKvHead(job, i, key_features + i * key_floats, key_shifts + i * (p.kv_len + 1), states + i * state_floats,
              rows + i * row_floats, qphi + i * (F + 1));
  };
  pool.For(static_cast<size_t>(tasks), body);
}

}  // namespace attnexport::cpu::ATTNEXPORT_ISA
