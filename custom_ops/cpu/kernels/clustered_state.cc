// ClusteredAttention in state mode, CPU, compiled once per ISA (namespace attnexport::cpu::ATTNEXPORT_ISA).
// Semantics: clustered_reference.clustered_attention_step (a bounded KV cache plus per-cluster sums).
//
// One task per (batch, kv head) walks the call's tokens in order, as a decoder would:
//   1. token at position p enters: p < G -> its global row; else the window ring slot p mod R, whose
//      previous occupant (position p - R, just out of the window) is added, if kept, to its nearest
//      centroid's sum and count (|μ_c|² - 2 k·μ_c, ties to the lowest c);
//   2. each query head of the group reads the globals (<= p), the ring (positions p - W .. p, all
//      near) and every non-empty cluster as count_c copies of μ_c with values summing to sum_c:
//      one max-stabilised softmax, O((G + R + M) · d).
// Then the ring is written back oldest first, the sums, and the counter P + S. Sums are float32, as
// the state that carries them between calls (the reference rounds only there: they differ by
// float32 round-off of the in-call additions).
#include <cmath>
#include <cstring>

#include "cpu/kernels/clustered_attention.h"
#include "cpu/kernels/simd.h"

namespace attnexport::cpu::ATTNEXPORT_ISA {
namespace {

using simd::kWidth;
using simd::Vec;
using simd::Dot;

constexpr float kNegInf = -__builtin_inff();

// acc[e] += w * x[e] over n entries.
void Axpy(float* acc, float w, const float* x, int64_t n) {
  const Vec wv = simd::Splat(w);
  int64_t e = 0;
  for (; e + kWidth <= n; e += kWidth) simd::Store(acc + e, simd::Load(acc + e) + wv * simd::Load(x + e));
  for (; e < n; ++e) acc[e] += w * x[e];
}

struct Layout {
  int64_t g, r, m, dk, dv, cols, rows;  // G, R, M, Dk, Dv, C = Dk + Dv + 1, G + R + M + 1
};

// The unit's working copy: global rows [G, C], ring [R, C] (slot = position mod R), sums [M, Dv],
// counts [M], |μ_c|² [M], logits [G + R + M], an output row [Dv].
struct Work {
  float *globals, *ring, *sums, *counts, *norms, *logits, *acc;
};

int64_t Nearest(const float* key, const float* mu, const float* norms, int64_t m, int64_t dk) {
  int64_t best = 0;
  float best_score = norms[0] - 2.f * Dot(key, mu, dk);
  for (int64_t c = 1; c < m; ++c) {
    const float score = norms[c] - 2.f * Dot(key, mu + c * dk, dk);
    if (score < best_score) {
      best_score = score;
      best = c;
    }
  }
  return best;
}

void RunUnit(const ClusteredAttentionProblem& p, const ClusteredAttentionTensors& t, const Layout& l, int64_t unit,
             const Work& w) {
  const int64_t b = unit / p.kv_heads, h = unit % p.kv_heads, s = p.q_len, group = p.q_heads / p.kv_heads;
  const int64_t state_size = l.rows * l.cols;
  const float* past = t.past_state ? t.past_state + unit * state_size : nullptr;
  const float* mu = t.centroids + h * l.m * l.dk;
  const float* keys = t.k + unit * s * l.dk;
  const float* values = t.v + unit * s * l.dv;
  const bool* keep = t.key_padding_mask ? t.key_padding_mask + b * s : nullptr;
  const int64_t seen = past ? static_cast<int64_t>(past[(l.rows - 1) * l.cols]) : 0;  // P (checked by the glue)

  // Load: globals, the window rows into their ring slots (positions P - R + r >= 0), sums, counts.
  std::memset(w.ring, 0, sizeof(float) * l.r * l.cols);
  if (past) {
    std::memcpy(w.globals, past, sizeof(float) * l.g * l.cols);
    for (int64_t r = 0; r < l.r; ++r) {
      const int64_t pos = seen - l.r + r;
      if (pos >= 0) std::memcpy(w.ring + (pos % l.r) * l.cols, past + (l.g + r) * l.cols, sizeof(float) * l.cols);
    }
    for (int64_t c = 0; c < l.m; ++c) {
      const float* row = past + (l.g + l.r + c) * l.cols;
      std::memcpy(w.sums + c * l.dv, row + l.dk, sizeof(float) * l.dv);
      w.counts[c] = row[l.dk + l.dv];
    }
  } else {
    std::memset(w.globals, 0, sizeof(float) * l.g * l.cols);
    std::memset(w.sums, 0, sizeof(float) * l.m * l.dv);
    std::memset(w.counts, 0, sizeof(float) * l.m);
  }
  for (int64_t c = 0; c < l.m; ++c) w.norms[c] = Dot(mu + c * l.dk, mu + c * l.dk, l.dk);

  for (int64_t i = 0; i < s; ++i) {
    const int64_t pos = seen + i;
    const bool kept = keep == nullptr || keep[i];
    float* slot = pos < l.g ? w.globals + pos * l.cols : w.ring + (pos % l.r) * l.cols;
    if (pos >= l.g && slot[l.cols - 1] > 0.f) {  // the occupant at pos - R leaves the window (flagged: >= G, kept)
      const int64_t c = Nearest(slot, mu, w.norms, l.m, l.dk);
      Axpy(w.sums + c * l.dv, 1.f, slot + l.dk, l.dv);
      w.counts[c] += 1.f;
    }
    if (kept) {
      std::memcpy(slot, keys + i * l.dk, sizeof(float) * l.dk);
      std::memcpy(slot + l.dk, values + i * l.dv, sizeof(float) * l.dv);
      slot[l.cols - 1] = 1.f;
    } else {
      std::memset(slot, 0, sizeof(float) * l.cols);
    }

    // Every near row (globals, ring) with a flag, every cluster with a count: one softmax.
    const int64_t near_rows = l.g + l.r;
    for (int64_t qh = h * group; qh < (h + 1) * group; ++qh) {
      const float* q = t.q + ((b * p.q_heads + qh) * s + i) * l.dk;
      float top = kNegInf;
      for (int64_t j = 0; j < near_rows; ++j) {
        const float* row = j < l.g ? w.globals + j * l.cols : w.ring + (j - l.g) * l.cols;
        w.logits[j] = row[l.cols - 1] > 0.f ? p.scale * Dot(q, row, l.dk) : kNegInf;
        top = w.logits[j] > top ? w.logits[j] : top;
      }
      for (int64_t c = 0; c < l.m; ++c) {
        w.logits[near_rows + c] = w.counts[c] > 0.f ? p.scale * Dot(q, mu + c * l.dk, l.dk) : kNegInf;
        top = w.logits[near_rows + c] > top ? w.logits[near_rows + c] : top;
      }
      float* y = t.y + ((b * p.q_heads + qh) * s + i) * l.dv;
      if (top == kNegInf) {  // nothing visible
        std::memset(y, 0, sizeof(float) * l.dv);
        continue;
      }
      std::memset(w.acc, 0, sizeof(float) * l.dv);
      float total = 0.f;
      for (int64_t j = 0; j < near_rows; ++j) {
        if (w.logits[j] == kNegInf) continue;
        const float* row = j < l.g ? w.globals + j * l.cols : w.ring + (j - l.g) * l.cols;
        const float e = std::exp(w.logits[j] - top);
        Axpy(w.acc, e, row + l.dk, l.dv);
        total += e;
      }
      for (int64_t c = 0; c < l.m; ++c) {
        if (w.logits[near_rows + c] == kNegInf) continue;
        const float e = std::exp(w.logits[near_rows + c] - top);
        Axpy(w.acc, e, w.sums + c * l.dv, l.dv);
        total += e * w.counts[c];
      }
      const float inv = 1.f / total;
      for (int64_t e = 0; e < l.dv; ++e) y[e] = w.acc[e] * inv;
    }
  }

  if (t.present_state == nullptr) return;
  float* out = t.present_state + unit * state_size;
  std::memset(out, 0, sizeof(float) * state_size);
  std::memcpy(out, w.globals, sizeof(float) * l.g * l.cols);
  const int64_t end = seen + s;
  for (int64_t r = 0; r < l.r; ++r) {
    const int64_t pos = end - l.r + r;
    if (pos >= l.g) std::memcpy(out + (l.g + r) * l.cols, w.ring + (pos % l.r) * l.cols, sizeof(float) * l.cols);
  }
  for (int64_t c = 0; c < l.m; ++c) {
    float* row = out + (l.g + l.r + c) * l.cols;
    std::memcpy(row + l.dk, w.sums + c * l.dv, sizeof(float) * l.dv);
    row[l.dk + l.dv] = w.counts[c];
  }
  out[(l.rows - 1) * l.cols] = static_cast<float>(end);
}

}  // namespace

void ClusteredAttentionStateForward(const ClusteredAttentionProblem& p, const ClusteredAttentionTensors& t,
                                    const ThreadPool& pool, const Scratch& scratch) {
  Layout l;
  l.g = p.num_global;
  l.r = p.window_left + 1;
  l.m = p.num_clusters;
  l.dk = p.head_dim;
  l.dv = p.value_dim;
  l.cols = l.dk + l.dv + 1;
  l.rows = l.g + l.r + l.m + 1;
  const int64_t units = p.batch * p.kv_heads;
  const int64_t per_unit = l.g * l.cols + l.r * l.cols + l.m * l.dv + 3 * l.m + l.g + l.r + l.dv;
  float* buffer = scratch.Get<float>(static_cast<size_t>(units * per_unit));
  auto task = [&](size_t index) {
    const int64_t unit = static_cast<int64_t>(index);
    float* base = buffer + unit * per_unit;
    Work w;
    w.globals = base;
    w.ring = w.globals + l.g * l.cols;
    w.sums = w.ring + l.r * l.cols;
    w.counts = w.sums + l.m * l.dv;
    w.norms = w.counts + l.m;
    w.logits = w.norms + l.m;
    w.acc = w.logits + l.g + l.r + l.m;
    RunUnit(p, t, l, unit, w);
  };
  pool.For(static_cast<size_t>(units), task);
}

}  // namespace attnexport::cpu::ATTNEXPORT_ISA
