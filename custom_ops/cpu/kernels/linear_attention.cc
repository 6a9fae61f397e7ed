// LinearAttention CPU kernel, compiled once per ISA (namespace attnexport::cpu::ATTNEXPORT_ISA).
//
//   y_i = Σ_j A_ij v_j / (Σ_j A_ij + eps),  A_ij = φ(q̃_i)·φ(k̃_j),  over the keys j that row i sees.
//
// The key side is reduced to a state per (batch, kv head): S = Σ_j φ(k̃_j) ⊗ v_j [F, Dv] and
// z = Σ_j φ(k̃_j) [F]; every query head of the group reads it (y_i = φ(q̃_i) S / (φ(q̃_i)·z + eps)).
// φ is applied to a block of rows at a time (vectorised exp) and fed straight into a
// register-blocked product (gemm.h), so K, V and Q are each read once.
//
// Non-causal: (1) partial states over key ranges, in parallel: several tasks per head when there
// are few heads; (2) partial states summed per head; (3) query blocks in parallel.
// Causal: chunks of kChunk keys in order; the queries whose last visible key falls in a chunk get
// φ(q̃) S (keys of earlier chunks, the carried state) plus the masked intra-chunk product P V with
// P = φ(Q̃) φ(K̃_c)ᵀ (lower triangle only, by row tile); then the chunk is folded into the state. With
// fewer heads than threads the sequence is also split into segments: each segment's key state is
// reduced first (in parallel), prefix-summed, and the segments then run their chunks in parallel.
//
// taylor2 uses the symmetric quadratic features [1, k̃, upper triangle of k̃k̃ᵀ (diagonal / √2)]
// (F = 1 + D + D(D+1)/2); a query expanded around c_i gets [1 - c + c²/2, (1 - c) q̃, quad(q̃)], so
// φ(q̃)·φ(k̃) = 1 + (s - c) + (s - c)²/2. Its intra-chunk weights come from the logits directly.
// favor: φ(x̃) = exp(Wᵀx̃ - |x̃|²/2)/√F is kept in the log domain until it is shifted: key feature
// f is divided by e^{m_f}, m_f the running maximum over the keys of log φ(k̃)_f (one shift per
// (batch, kv head, feature)), and query row i's features, multiplied by e^{m_f}, are divided by
// their largest, e^{s_i}. So φ'(q̃_i)·φ'(k̃_j) = A_ij e^{-s_i}, eps is multiplied by e^{-s_i} and the
// ratio is the exact one; every row's largest weight is >= 1 (the key that sets m_f for the row's
// top feature), so nothing a row depends on underflows and large inputs stay finite. Inside a
// causal chunk the shifts of later keys must not reach earlier rows: there the row shift comes
// from a max-plus product over the keys the row sees (see CausalRange).
#include <cmath>
#include <cstring>

#include "cpu/kernels/gemm.h"
#include "cpu/kernels/linear_attention.h"
#include "cpu/kernels/simd.h"

namespace attnexport::cpu::ATTNEXPORT_ISA {
namespace {

using simd::kWidth;
using simd::Vec;

constexpr int64_t kKeyBlock = 64;     // keys per φ block, non-causal key pass
constexpr int64_t kQueryBlock = 64;   // queries per φ block
#ifndef ATTNEXPORT_LA_CHUNK
#define ATTNEXPORT_LA_CHUNK 32
#endif
constexpr int64_t kChunk = ATTNEXPORT_LA_CHUNK;  // causal chunk (keys and queries)
constexpr int64_t kLogitBlock = 256;  // keys per logits block (taylor2 "max" expansion)
constexpr float kInvSqrt2 = 0.70710678118654752f;

constexpr int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }
constexpr int64_t Max(int64_t a, int64_t b) { return a > b ? a : b; }
constexpr int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
constexpr int64_t CeilDiv(int64_t x, int64_t m) { return (x + m - 1) / m; }

// Carves float buffers out of one region; a null base only counts (to size the region).
struct Bump {
  float* p = nullptr;
  int64_t used = 0;
  float* Take(int64_t n) {
    float* r = p ? p + used : nullptr;
    used += RoundUp(n < 1 ? 1 : n, 16);  // 64-byte steps keep every buffer aligned
    return r;
  }
};

struct Plan {
  const LinearAttentionProblem* p = nullptr;
  const LinearAttentionTensors* t = nullptr;
  FeatureMap fm = FeatureMap::kElu1;
  int64_t d = 0, dv = 0, F = 0, FP = 0, DvP = 0, dP = 0, group = 1, offset = 0;
  float root = 1.f, scale = 1.f;
  bool taylor = false, taylor_mean = false, taylor_max = false, favor = false;
  bool v_direct = false;         // V rows can be the right operand in place (Dv a multiple of the width)
  const float* w_rows = nullptr; // favor: √scale·W, [Dk, FP] zero padded (row form)
  const float* kt_all = nullptr; // taylor2 "max": scale·Kᵀ per (b, kv head), [Dk, SkvP]
  int64_t kt_ld = 0;

  const float* Q(int64_t b, int64_t h) const { return t->q + (b * p->q_heads + h) * p->q_len * d; }
  const float* K(int64_t b, int64_t h) const { return t->k + (b * p->kv_heads + h) * p->kv_len * d; }
  const float* V(int64_t b, int64_t h) const { return t->v + (b * p->kv_heads + h) * p->kv_len * dv; }
  float* Y(int64_t b, int64_t h) const { return t->y + (b * p->q_heads + h) * p->q_len * dv; }
  const bool* Mask(int64_t b) const { return t->key_padding_mask ? t->key_padding_mask + b * p->kv_len : nullptr; }
  const float* KT(int64_t b, int64_t h) const { return kt_all + (b * p->kv_heads + h) * d * kt_ld; }
};

// ---------------------------------------------------------------------------------------------
// State of a (batch, kv head) over some keys: S [F, DvP], z [FP], Σ k̃ [dP] (taylor2 mean), the favor
// shifts m [FP] (row f of S and z holds Σ_j e^{log φ(k̃_j)_f - m_f} (v_j, 1); -inf: no key yet) and
// the count of keys folded in.
struct State {
  float* s = nullptr;
  float* z = nullptr;
  float* ksum = nullptr;
  float* shift = nullptr;  // [FP]
  float* count = nullptr;  // one float (exact up to 2^24 keys; only the taylor2 mean divides by it)
};

State TakeState(const Plan& pl, Bump& bump) {
  State st;
  st.s = bump.Take(pl.F * pl.DvP);
  st.z = bump.Take(pl.FP);
  st.ksum = bump.Take(pl.dP);
  st.shift = bump.Take(pl.FP);
  st.count = bump.Take(1);
  return st;
}

int64_t StateFloats(const Plan& pl) {
  Bump bump;
  TakeState(pl, bump);
  return bump.used;
}

State StateAt(const Plan& pl, float* base, int64_t index) {
  Bump bump{base + index * StateFloats(pl), 0};
  return TakeState(pl, bump);
}

void ClearState(const Plan& pl, const State& st) {
  std::memset(st.s, 0, sizeof(float) * pl.F * pl.DvP);
  std::memset(st.z, 0, sizeof(float) * pl.FP);
  std::memset(st.ksum, 0, sizeof(float) * pl.dP);
  for (int64_t f = 0; f < pl.FP; ++f) st.shift[f] = f < pl.F ? -INFINITY : 0.f;
  *st.count = 0.f;
}

// st := the past state of head h (past_state [F, Dv + 2] rows), or cleared when there is none.
void InitState(const Plan& pl, int64_t h, const State& st) {
  ClearState(pl, st);
  const float* past = pl.t->past_state;
  if (past == nullptr) return;
  const int64_t width = pl.dv + 2;
  past += h * pl.F * width;
  bool any = false;
  for (int64_t f = 0; f < pl.F; ++f) {
    const float* row = past + f * width;
    if (pl.favor && !(row[pl.dv] > 0.f)) continue;  // z_f = 0: the feature holds no key
    std::memcpy(st.s + f * pl.DvP, row, sizeof(float) * pl.dv);
    st.z[f] = row[pl.dv];
    if (pl.favor) st.shift[f] = row[pl.dv + 1];
    any = true;
  }
  *st.count = any ? 1.f : 0.f;  // only marks the state as non-empty (MergeState skips empty ones)
}

// present_state rows of head h from st.
void StoreState(const Plan& pl, int64_t h, const State& st) {
  if (pl.t->present_state == nullptr) return;
  const int64_t width = pl.dv + 2;
  float* out = pl.t->present_state + h * pl.F * width;
  for (int64_t f = 0; f < pl.F; ++f) {
    float* row = out + f * width;
    const bool held = !pl.favor || st.shift[f] != -INFINITY;
    if (held) std::memcpy(row, st.s + f * pl.DvP, sizeof(float) * pl.dv);
    else std::memset(row, 0, sizeof(float) * pl.dv);
    row[pl.dv] = held ? st.z[f] : 0.f;
    row[pl.dv + 1] = pl.favor && held ? st.shift[f] : 0.f;
  }
}

void ScaleFloats(float* x, int64_t n, float factor) {
  const Vec f = simd::Splat(factor);
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) simd::Store(x + i, simd::Load(x + i) * f);
  for (; i < n; ++i) x[i] *= factor;
}

void AddScaledFloats(float* dst, const float* src, int64_t n, float factor) {
  const Vec f = simd::Splat(factor);
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) simd::Store(dst + i, simd::Load(dst + i) + simd::Load(src + i) * f);
  for (; i < n; ++i) dst[i] += src[i] * factor;
}

// favor: raises the state's shifts to max(m_f, top_f) (rows whose shift grows are rescaled).
void RaiseShifts(const Plan& pl, const State& st, const float* top) {
  for (int64_t f = 0; f < pl.F; ++f) {
    if (!(top[f] > st.shift[f])) continue;
    if (st.shift[f] != -INFINITY) {
      const float factor = std::exp(st.shift[f] - top[f]);
      ScaleFloats(st.s + f * pl.DvP, pl.DvP, factor);
      st.z[f] *= factor;
    }
    st.shift[f] = top[f];
  }
}

// dst += src (favor: at the larger shift of each feature).
void MergeState(const Plan& pl, const State& dst, const State& src) {
  if (*src.count == 0.f) return;
  if (pl.favor) {
    RaiseShifts(pl, dst, src.shift);
    for (int64_t f = 0; f < pl.F; ++f) {
      const float factor = src.shift[f] == -INFINITY ? 0.f : std::exp(src.shift[f] - dst.shift[f]);
      AddScaledFloats(dst.s + f * pl.DvP, src.s + f * pl.DvP, pl.DvP, factor);
      dst.z[f] += src.z[f] * factor;
    }
  } else {
    AddScaledFloats(dst.s, src.s, pl.F * pl.DvP, 1.f);
    AddScaledFloats(dst.z, src.z, pl.FP, 1.f);
  }
  AddScaledFloats(dst.ksum, src.ksum, pl.dP, 1.f);
  *dst.count += *src.count;
}

// favor: the per-feature maximum of n rows of log features (stride ld) into top [FP].
void ColumnMax(const float* rows, int64_t n, int64_t ld, int64_t width, float* top) {
  for (int64_t f = 0; f < width; f += kWidth) {
    Vec m = simd::Splat(-INFINITY);
    for (int64_t i = 0; i < n; ++i) {
      const Vec x = simd::Load(rows + i * ld + f);
      m = x > m ? x : m;
    }
    simd::Store(top + f, m);
  }
}

// favor: x[i, f] = e^{x[i, f] - shift[f]} for n rows of log features (0 where x is -inf).
void ExpShifted(float* rows, int64_t n, int64_t ld, int64_t width, const float* shift) {
  for (int64_t i = 0; i < n; ++i) {
    float* r = rows + i * ld;
    for (int64_t f = 0; f < width; f += kWidth) simd::Store(r + f, simd::ExpNonPositive(simd::Load(r + f) - simd::Load(shift + f)));
  }
}

// ---------------------------------------------------------------------------------------------
// Features, row form: out[i, :F] = φ(√scale · x[i]) for n rows of x (row stride ldx), padded with
// zeros to FP. center (taylor2, may be null): the expansion point of each row. favor: without
// key_shift (keys), the log features log φ(k̃)_f (-inf in the padding); with key_shift m (queries),
// e^{log φ(q̃)_f + m_f - s_i} with s_i the row's largest exponent, and shift[i] = s_i (a row with
// no finite m gets zeros and shift 0).
void FeatureRows(const Plan& pl, const float* x, int64_t ldx, int64_t n, const float* center, float* out,
                 float* shift, float* tmp, const float* key_shift = nullptr) {
  const int64_t d = pl.d, F = pl.F, FP = pl.FP;
  switch (pl.fm) {
    case FeatureMap::kElu1:
    case FeatureMap::kRelu: {
      const bool elu = pl.fm == FeatureMap::kElu1;
      const Vec root = simd::Splat(pl.root);
      for (int64_t i = 0; i < n; ++i) {
        const float* xr = x + i * ldx;
        float* o = out + i * FP;
        int64_t a = 0;
        if (elu) {
          for (; a + kWidth <= d; a += kWidth) simd::Store(o + a, simd::Elu1(simd::Load(xr + a) * root));
        } else {
          for (; a + kWidth <= d; a += kWidth) simd::Store(o + a, simd::Relu(simd::Load(xr + a) * root));
        }
        if (a < d) {
          const Vec v = simd::LoadPartial(xr + a, d - a) * root;
          simd::Store(o + a, simd::KeepFirst(elu ? simd::Elu1(v) : simd::Relu(v), d - a));
          a += kWidth;
        }
        for (; a < FP; a += kWidth) simd::Store(o + a, simd::Zero());
      }
      return;
    }
    case FeatureMap::kTaylor2: {
      for (int64_t i = 0; i < n; ++i) {
        const float* xr = x + i * ldx;
        float* o = out + i * FP;
        for (int64_t a = 0; a < d; ++a) tmp[a] = pl.root * xr[a];
        const float c = center ? center[i] : 0.f;
        const float slope = 1.f - c;
        o[0] = 1.f - c + 0.5f * c * c;
        for (int64_t a = 0; a < d; ++a) o[1 + a] = slope * tmp[a];
        float* quad = o + 1 + d;
        for (int64_t a = 0; a < d; ++a) {
          const float xa = tmp[a];
          quad[0] = xa * xa * kInvSqrt2;
          const int64_t len = d - a - 1;
          const float* src = tmp + a + 1;
          float* dst = quad + 1;
          const Vec va = simd::Splat(xa);
          int64_t b = 0;
          for (; b + kWidth <= len; b += kWidth) simd::Store(dst + b, simd::Load(src + b) * va);
          for (; b < len; ++b) dst[b] = src[b] * xa;
          quad += len + 1;
        }
        for (int64_t f = F; f < FP; ++f) o[f] = 0.f;
      }
      return;
    }
    case FeatureMap::kFavor: {
      gemm::Product g;
      g.k1 = d;
      g.a1 = x;
      g.lda1 = ldx;
      g.b1 = pl.w_rows;
      g.ldb1 = FP;
      g.c = out;
      g.ldc = FP;
      gemm::Run<gemm::kStore>(g, n, FP);
      const float log_f = 0.5f * std::log(static_cast<float>(F));  // log √F
      const float half_scale = 0.5f * pl.scale;                    // |x̃|²/2 = scale |x|²/2
      for (int64_t i = 0; i < n; ++i) {
        float* o = out + i * FP;
        const float* xr = x + i * ldx;
        float norm = 0.f;
        for (int64_t a = 0; a < d; ++a) norm += xr[a] * xr[a];
        const float offset = half_scale * norm + log_f;  // log φ = Wᵀx̃ - offset
        if (key_shift == nullptr) {
          const Vec off = simd::Splat(offset);
          for (int64_t f = 0; f < FP; f += kWidth) {
            const Vec u = simd::Load(o + f) - off;
            simd::Store(o + f, f + kWidth > F ? simd::KeepFirst(u, F - f, -INFINITY) : u);
          }
          continue;
        }
        Vec peak = simd::Splat(-INFINITY);
        for (int64_t f = 0; f < FP; f += kWidth) {
          Vec t = simd::Load(o + f) + simd::Load(key_shift + f);
          if (f + kWidth > F) t = simd::KeepFirst(t, F - f, -INFINITY);
          simd::Store(o + f, t);
          peak = t > peak ? t : peak;
        }
        const float top = simd::MaxLane(peak);
        if (!(top > -INFINITY)) {  // no key folded in yet (or NaN: kept)
          for (int64_t f = 0; f < FP; f += kWidth) simd::Store(o + f, top != top ? simd::Splat(top) : simd::Zero());
          shift[i] = 0.f;
          continue;
        }
        const Vec vtop = simd::Splat(top);
        for (int64_t f = 0; f < FP; f += kWidth) simd::Store(o + f, simd::ExpNonPositive(simd::Load(o + f) - vtop));
        shift[i] = top - offset;  // s_i = max_f (log φ(q̃_i)_f + m_f)
      }
      return;
    }
  }
}

// Features, column form (causal key chunks): kt [d, ld] holds √scale·kᵀ of nc keys in columns
// (columns >= nc and masked keys are zero), vis[j] is 1 for a key that may be seen, else 0.
// out [F, ld] = φ(k̃_j) in column j, masked and padding columns 0 (favor: the log features, -inf
// in masked and padding columns).
void FeatureColumns(const Plan& pl, const float* kt, int64_t ld, int64_t nc, const float* vis, float* out) {
  const int64_t d = pl.d, F = pl.F;
  const int64_t ncv = RoundUp(nc, kWidth);
  switch (pl.fm) {
    case FeatureMap::kElu1:
    case FeatureMap::kRelu: {
      const bool elu = pl.fm == FeatureMap::kElu1;
      for (int64_t a = 0; a < d; ++a) {
        const float* src = kt + a * ld;
        float* dst = out + a * ld;
        for (int64_t j = 0; j < ncv; j += kWidth) {
          const Vec x = simd::Load(src + j);
          const Vec phi = elu ? simd::Elu1(x) * simd::Load(vis + j) : simd::Relu(x);
          simd::Store(dst + j, phi);
        }
      }
      return;
    }
    case FeatureMap::kTaylor2: {
      for (int64_t j = 0; j < ncv; j += kWidth) simd::Store(out + j, simd::Load(vis + j));
      std::memcpy(out + ld, kt, sizeof(float) * d * ld);
      float* row = out + (1 + d) * ld;
      for (int64_t a = 0; a < d; ++a) {
        const float* xa = kt + a * ld;
        for (int64_t j = 0; j < ncv; j += kWidth) simd::Store(row + j, simd::Load(xa + j) * simd::Load(xa + j) * kInvSqrt2);
        row += ld;
        for (int64_t b = a + 1; b < d; ++b) {
          const float* xb = kt + b * ld;
          for (int64_t j = 0; j < ncv; j += kWidth) simd::Store(row + j, simd::Load(xa + j) * simd::Load(xb + j));
          row += ld;
        }
      }
      return;
    }
    case FeatureMap::kFavor: {
      // Uᵀ = Wᵀ K̃ᵀ: W [d, F] read as a k-major left operand.
      gemm::Product g;
      g.k1 = d;
      g.a1 = pl.t->projection;
      g.lda1 = F;
      g.a1_kmajor = true;
      g.b1 = kt;
      g.ldb1 = ld;
      g.c = out;
      g.ldc = ld;
      gemm::Run<gemm::kStore>(g, F, ncv);
      const float log_f = 0.5f * std::log(static_cast<float>(F));
      for (int64_t j = 0; j < ncv; j += kWidth) {
        Vec norm = simd::Zero();
        for (int64_t a = 0; a < d; ++a) {
          const Vec x = simd::Load(kt + a * ld + j);
          norm += x * x;
        }
        const Vec offset = 0.5f * norm + log_f;
        const Vec on = simd::Load(vis + j);
        for (int64_t f = 0; f < F; ++f) {
          const Vec u = simd::Load(out + f * ld + j) - offset;
          simd::Store(out + f * ld + j, on > 0.f ? u : simd::Splat(-INFINITY));
        }
      }
      return;
    }
  }
}

// Σ_i rows[i, :] added into acc (n rows of stride ld, FP wide).
void AddColumnSums(const float* rows, int64_t n, int64_t ld, int64_t width, float* acc) {
  for (int64_t f = 0; f < width; f += kWidth) {
    Vec s = simd::Load(acc + f);
    for (int64_t i = 0; i < n; ++i) s += simd::Load(rows + i * ld + f);
    simd::Store(acc + f, s);
  }
}

float Dot(const float* a, const float* b, int64_t n) {
  Vec s0 = simd::Zero(), s1 = simd::Zero();
  int64_t i = 0;
  for (; i + 2 * kWidth <= n; i += 2 * kWidth) {
    s0 += simd::Load(a + i) * simd::Load(b + i);
    s1 += simd::Load(a + i + kWidth) * simd::Load(b + i + kWidth);
  }
  float s = simd::Sum(s0 + s1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// dst[a, j] = factor · src[j, a] for n rows of width d (row stride d), columns [n, RoundUp(n, kWidth))
// zero; a column whose vis[j] is 0 is zero whatever the row holds (vis may be null: all visible).
void TransposeRows(const float* src, int64_t d, int64_t n, float factor, const float* vis, float* dst, int64_t ld) {
  const int64_t nv = RoundUp(n, kWidth);
  int64_t a0 = 0;
#if defined(__AVX__)
  const int64_t n8 = n / 8 * 8;
  const __m256 f = _mm256_set1_ps(factor), zero = _mm256_setzero_ps();
  for (; a0 + 8 <= d; a0 += 8) {
    for (int64_t j0 = 0; j0 < n8; j0 += 8) {
      const float* s = src + j0 * d + a0;
      const __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + d), r2 = _mm256_loadu_ps(s + 2 * d),
                   r3 = _mm256_loadu_ps(s + 3 * d), r4 = _mm256_loadu_ps(s + 4 * d), r5 = _mm256_loadu_ps(s + 5 * d),
                   r6 = _mm256_loadu_ps(s + 6 * d), r7 = _mm256_loadu_ps(s + 7 * d);
      const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
                   t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                   t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                   u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                   u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                   u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      __m256 c[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                     _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                     _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                     _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
      const __m256 on = vis ? _mm256_cmp_ps(_mm256_loadu_ps(vis + j0), zero, _CMP_GT_OQ) : _mm256_cmp_ps(zero, zero, _CMP_EQ_OQ);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (a0 + i) * ld + j0, _mm256_blendv_ps(zero, _mm256_mul_ps(c[i], f), on));
    }
    for (int64_t a = a0; a < a0 + 8; ++a) {
      for (int64_t j = n8; j < n; ++j) dst[a * ld + j] = !vis || vis[j] != 0.f ? factor * src[j * d + a] : 0.f;
      for (int64_t j = n; j < nv; ++j) dst[a * ld + j] = 0.f;
    }
  }
#endif
  for (int64_t a = a0; a < d; ++a) {
    for (int64_t j = 0; j < n; ++j) dst[a * ld + j] = !vis || vis[j] != 0.f ? factor * src[j * d + a] : 0.f;
    for (int64_t j = n; j < nv; ++j) dst[a * ld + j] = 0.f;
  }
}

// taylor2 "max": center[i] = max of scale·q_i·k_j over the keys j <= limit[i] that the mask lets
// row i see, 0 when none. Quadratic by nature (it is exact, not fast): logits in blocks.
void MaxLogits(const Plan& pl, int64_t b, int64_t kvh, const float* q, int64_t m, const int64_t* limit, float* center,
               float* logits) {
  const bool* mask = pl.Mask(b);
  const float* kt = pl.KT(b, kvh);
  int64_t end = 0;
  for (int64_t i = 0; i < m; ++i) {
    center[i] = -INFINITY;
    end = Max(end, limit[i] + 1);
  }
  end = Min(end, pl.p->kv_len);
  for (int64_t j0 = 0; j0 < end; j0 += kLogitBlock) {
    const int64_t nb = Min(kLogitBlock, end - j0);
    gemm::Product g;
    g.k1 = pl.d;
    g.a1 = q;
    g.lda1 = pl.d;
    g.b1 = kt + j0;
    g.ldb1 = pl.kt_ld;
    g.c = logits;
    g.ldc = kLogitBlock;
    gemm::Run<gemm::kStore>(g, m, RoundUp(nb, kWidth));
    for (int64_t i = 0; i < m; ++i) {
      const int64_t stop = Min(nb, limit[i] + 1 - j0);
      float best = center[i];
      for (int64_t j = 0; j < stop; ++j) {
        if (mask && !mask[j0 + j]) continue;
        const float s = logits[i * kLogitBlock + j];
        best = s > best ? s : best;
      }
      center[i] = best;
    }
  }
  for (int64_t i = 0; i < m; ++i) center[i] = center[i] == -INFINITY ? 0.f : center[i];
}

// ---------------------------------------------------------------------------------------------
// Non-causal key pass: folds the keys [j0, j1) of (b, kvh) into st (row-form features, masked keys
// skipped).
struct KeyWork {
  float *kbuf, *vbuf, *phi, *shift, *tmp;
};

KeyWork TakeKeyWork(const Plan& pl, Bump& bump) {
  KeyWork w;
  w.kbuf = bump.Take(kKeyBlock * pl.d);
  w.vbuf = bump.Take(kKeyBlock * pl.DvP);
  w.phi = bump.Take(kKeyBlock * pl.FP);
  w.shift = bump.Take(Max(kKeyBlock, pl.FP));
  w.tmp = bump.Take(pl.dP + kWidth);
  return w;
}

void CopyRowPadded(const float* src, int64_t n, int64_t padded, float* dst) {
  std::memcpy(dst, src, sizeof(float) * n);
  for (int64_t i = n; i < padded; ++i) dst[i] = 0.f;
}

void AccumulateKeys(const Plan& pl, int64_t b, int64_t kvh, int64_t j0, int64_t j1, const State& st, const KeyWork& w) {
  const int64_t d = pl.d, dv = pl.dv;
  const float* k = pl.K(b, kvh);
  const float* v = pl.V(b, kvh);
  const bool* mask = pl.Mask(b);
  for (int64_t j = j0; j < j1;) {
    const float* kb;
    const float* vb;
    int64_t ldv, n = 0;
    if (mask) {
      for (; j < j1 && n < kKeyBlock; ++j) {
        if (!mask[j]) continue;
        std::memcpy(w.kbuf + n * d, k + j * d, sizeof(float) * d);
        CopyRowPadded(v + j * dv, dv, pl.DvP, w.vbuf + n * pl.DvP);
        ++n;
      }
      kb = w.kbuf;
      vb = w.vbuf;
      ldv = pl.DvP;
    } else {
      n = Min(kKeyBlock, j1 - j);
      kb = k + j * d;
      if (pl.v_direct) {
        vb = v + j * dv;
        ldv = dv;
      } else {
        for (int64_t r = 0; r < n; ++r) CopyRowPadded(v + (j + r) * dv, dv, pl.DvP, w.vbuf + r * pl.DvP);
        vb = w.vbuf;
        ldv = pl.DvP;
      }
      j += n;
    }
    if (n == 0) continue;
    FeatureRows(pl, kb, d, n, nullptr, w.phi, w.shift, w.tmp);
    if (pl.favor) {  // log features -> shifted features
      ColumnMax(w.phi, n, pl.FP, pl.FP, w.shift);
      RaiseShifts(pl, st, w.shift);
      ExpShifted(w.phi, n, pl.FP, pl.FP, st.shift);
    }
    AddColumnSums(w.phi, n, pl.FP, pl.FP, st.z);
    if (pl.taylor_mean) {
      for (int64_t r = 0; r < n; ++r) AddScaledFloats(st.ksum, kb + r * d, d, pl.root);
    }
    *st.count += static_cast<float>(n);
    gemm::Product g;  // S += φ(K)ᵀ V
    if (!mask && j < j1) {  // the next block's keys and values
      g.prefetch = k + j * d;
      g.prefetch_bytes = static_cast<int64_t>(sizeof(float)) * Min(kKeyBlock, j1 - j) * d;
      g.prefetch2 = v + j * dv;
      g.prefetch2_bytes = static_cast<int64_t>(sizeof(float)) * Min(kKeyBlock, j1 - j) * dv;
    }
    g.k1 = n;
    g.a1 = w.phi;
    g.lda1 = pl.FP;
    g.a1_kmajor = true;
    g.b1 = vb;
    g.ldb1 = ldv;
    g.c = st.s;
    g.ldc = pl.DvP;
    gemm::Run<gemm::kAccumulate>(g, pl.F, pl.DvP);
  }
}

// ---------------------------------------------------------------------------------------------
// Non-causal query pass: rows [i0, i1) of (b, qh) from the finished state of its kv head.
struct QueryWork {
  float *phi, *shift, *inv, *center, *ybuf, *tmp, *logits;
  int64_t* limit;
};

QueryWork TakeQueryWork(const Plan& pl, Bump& bump, int64_t rows) {
  QueryWork w;
  w.phi = bump.Take(rows * pl.FP);
  w.shift = bump.Take(rows);
  w.inv = bump.Take(rows);
  w.center = bump.Take(rows);
  w.ybuf = bump.Take(rows * pl.DvP);
  w.tmp = bump.Take(pl.dP + kWidth);
  w.logits = pl.taylor_max ? bump.Take(rows * kLogitBlock) : nullptr;
  w.limit = reinterpret_cast<int64_t*>(bump.Take(2 * rows));
  return w;
}

// Whether rows of width ld starting at p can take streaming stores (vector-aligned).
inline bool Streamable(const float* p, int64_t ld) {
  constexpr int64_t kBytes = kWidth * static_cast<int64_t>(sizeof(float));
  return reinterpret_cast<uintptr_t>(p) % kBytes == 0 && (ld * static_cast<int64_t>(sizeof(float))) % kBytes == 0;
}

// 1 / (den + eps) for a row whose features total den against the keys it sees; 0 when it sees
// none (den == 0), so such rows come out as exact zeros. log_shift (favor): the log of the factor
// the weights were divided by; eps is divided by it as well.
inline float InverseDenominator(const Plan& pl, float den, float log_shift) {
  if (den == 0.f) return 0.f;
  float eps = pl.p->eps;
  if (pl.favor && eps != 0.f) eps *= std::exp(-log_shift);
  return 1.f / (den + eps);
}

void QueryRows(const Plan& pl, int64_t b, int64_t qh, int64_t i0, int64_t i1, const State& st, const QueryWork& w) {
  const int64_t d = pl.d, dv = pl.dv;
  const int64_t kvh = qh / pl.group;
  const float* q = pl.Q(b, qh);
  float* y = pl.Y(b, qh);
  const float count = *st.count;
  for (int64_t r0 = i0; r0 < i1; r0 += kQueryBlock) {
    const int64_t m = Min(kQueryBlock, i1 - r0);
    const float* qb = q + r0 * d;
    float* yb = y + r0 * dv;
    if (count == 0.f) {  // no visible key at all
      std::memset(yb, 0, sizeof(float) * m * dv);
      continue;
    }
    const float* center = nullptr;
    if (pl.taylor_mean) {
      for (int64_t i = 0; i < m; ++i) w.center[i] = pl.root * Dot(qb + i * d, st.ksum, d) / count;
      center = w.center;
    } else if (pl.taylor_max) {
      for (int64_t i = 0; i < m; ++i) w.limit[i] = pl.p->kv_len - 1;
      MaxLogits(pl, b, kvh, qb, m, w.limit, w.center, w.logits);
      center = w.center;
    }
    FeatureRows(pl, qb, d, m, center, w.phi, w.shift, w.tmp, st.shift);
    for (int64_t i = 0; i < m; ++i) {
      const float den = Dot(w.phi + i * pl.FP, st.z, pl.FP);
      w.inv[i] = InverseDenominator(pl, den, pl.favor ? w.shift[i] : 0.f);
    }
    const bool direct = pl.DvP == dv;
    gemm::Product g;  // y = φ(Q) S / den
    if (r0 + m < i1) {  // the next block's queries
      g.prefetch = qb + m * d;
      g.prefetch_bytes = static_cast<int64_t>(sizeof(float)) * Min(kQueryBlock, i1 - r0 - m) * d;
    }
    g.k1 = pl.F;
    g.a1 = w.phi;
    g.lda1 = pl.FP;
    g.b1 = st.s;
    g.ldb1 = pl.DvP;
    g.c = direct ? yb : w.ybuf;
    g.ldc = direct ? dv : pl.DvP;
    g.row_scale = w.inv;
    if (direct && Streamable(yb, dv)) gemm::Run<gemm::kScaleStreamStore>(g, m, pl.DvP);
    else gemm::Run<gemm::kScaleStore>(g, m, pl.DvP);
    if (!direct) {
      for (int64_t i = 0; i < m; ++i) std::memcpy(yb + i * dv, w.ybuf + i * pl.DvP, sizeof(float) * dv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Causal pass over the key chunks [k_begin, k_end) of (b, kvh), starting from state st (the keys
// before k_begin), writing every query whose last visible key lies in that range.
struct ChunkWork {
  float *kt, *phit, *vbuf, *vis, *kshift, *phiq, *qshift, *inv, *center, *p, *ybuf, *tmp, *logits;
  float *kc, *beta, *qa, *qf, *alpha, *mx;  // favor: log features, features over their own largest, ...
  int64_t* limit;
};

constexpr int64_t kChunkPad = RoundUp(kChunk, 16);

ChunkWork TakeChunkWork(const Plan& pl, Bump& bump) {
  ChunkWork w;
  w.kt = bump.Take(pl.d * kChunkPad);
  w.phit = bump.Take(pl.F * kChunkPad);
  w.vbuf = bump.Take(kChunk * pl.DvP);
  w.vis = bump.Take(kChunkPad);
  w.kshift = bump.Take(pl.FP);
  w.phiq = bump.Take(kChunk * pl.FP);
  w.qshift = bump.Take(kChunk);
  w.inv = bump.Take(kChunk);
  w.center = bump.Take(kChunk);
  w.p = bump.Take(kChunk * kChunkPad);
  w.ybuf = bump.Take(kChunk * pl.DvP);
  w.tmp = bump.Take(pl.dP + kWidth);
  w.logits = pl.taylor_max ? bump.Take(kChunk * kLogitBlock) : nullptr;
  w.limit = reinterpret_cast<int64_t*>(bump.Take(2 * kChunk));
  w.kc = pl.favor ? bump.Take(pl.F * kChunkPad) : nullptr;
  w.beta = pl.favor ? bump.Take(kChunkPad) : nullptr;
  w.qf = pl.favor ? bump.Take(kChunk * pl.FP) : nullptr;
  w.qa = pl.favor ? bump.Take(kChunk * pl.FP) : nullptr;
  w.alpha = pl.favor ? bump.Take(kChunk) : nullptr;
  w.mx = pl.favor ? bump.Take(kChunk * kChunkPad) : nullptr;
  return w;
}

// Zeroes P[i, j] for the columns j > limit (the keys after row i's last visible key), in [0, width).
inline void MaskRowTail(float* row, int64_t limit, int64_t width) {
  int64_t j = (limit + 1) / kWidth * kWidth;
  if (j < width && limit + 1 > j) {
    simd::Store(row + j, simd::KeepFirst(simd::Load(row + j), limit + 1 - j));
    j += kWidth;
  }
  for (; j < width; j += kWidth) simd::Store(row + j, simd::Zero());
}

void CausalRange(const Plan& pl, int64_t b, int64_t kvh, int64_t k_begin, int64_t k_end, const State& st,
                 const ChunkWork& w) {
  const LinearAttentionProblem& p = *pl.p;
  const int64_t d = pl.d, dv = pl.dv, F = pl.F, ld = kChunkPad;
  const float* k = pl.K(b, kvh);
  const float* v = pl.V(b, kvh);
  const bool* mask = pl.Mask(b);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kChunk) {
    const int64_t nc = Min(kChunk, k_end - k0);
    const int64_t ncv = RoundUp(nc, kWidth);
    // Keys of the chunk, transposed: kt[a, j] = √scale·k[k0 + j, a] (0 for masked / padding keys).
    int64_t visible = 0;
    for (int64_t j = 0; j < ld; ++j) {
      const bool on = j < nc && (!mask || mask[k0 + j]);
      w.vis[j] = on ? 1.f : 0.f;
      visible += on ? 1 : 0;
    }
    TransposeRows(k + k0 * d, d, nc, pl.root, mask ? w.vis : nullptr, w.kt, ld);
    FeatureColumns(pl, w.kt, ld, nc, w.vis, w.phit);
    if (pl.favor) {
      // phit holds log φ(k̃_j) (-inf for masked / padding keys). For the intra-chunk weights each key
      // is divided by its own largest feature: kc = e^{log φ - β_j}, β_j = max_f log φ(k̃_j)_f.
      for (int64_t j = 0; j < ncv; j += kWidth) {
        Vec m = simd::Splat(-INFINITY);
        for (int64_t f = 0; f < F; ++f) {
          const Vec x = simd::Load(w.phit + f * ld + j);
          m = x > m ? x : m;
        }
        simd::Store(w.beta + j, m);
      }
      for (int64_t f = 0; f < F; ++f) {
        for (int64_t j = 0; j < ncv; j += kWidth) {
          const Vec b = simd::Load(w.beta + j);
          const Vec x = simd::Load(w.phit + f * ld + j) - (b > -INFINITY ? b : simd::Zero());
          simd::Store(w.kc + f * ld + j, simd::ExpNonPositive(x));
        }
      }
    }
    // Values of the chunk: in place, or copied (padded; masked rows zero so they cannot carry NaN).
    const float* vc = v + k0 * dv;
    int64_t ldv = dv;
    if (mask || !pl.v_direct) {
      for (int64_t j = 0; j < nc; ++j) {
        if (w.vis[j] != 0.f) CopyRowPadded(v + (k0 + j) * dv, dv, pl.DvP, w.vbuf + j * pl.DvP);
        else std::memset(w.vbuf + j * pl.DvP, 0, sizeof(float) * pl.DvP);
      }
      vc = w.vbuf;
      ldv = pl.DvP;
    }

    // Queries whose last visible key i + offset lies in this chunk.
    const int64_t qa = Max(0, k0 - pl.offset), qb = Min(p.q_len, k0 + nc - pl.offset);
    for (int64_t g = 0; qa < qb && g < pl.group; ++g) {
      const int64_t qh = kvh * pl.group + g;
      const int64_t m = qb - qa;
      const float* qrows = pl.Q(b, qh) + qa * d;
      float* yrows = pl.Y(b, qh) + qa * dv;
      const int64_t first = qa + pl.offset - k0;  // last visible column of row 0
      if (pl.taylor) {
        // Logits of the chunk (row tiles only as wide as their lower triangle), then the expansion
        // points, then P = 1 + t + t²/2 with t = s - c on the visible part.
        gemm::Product lg;
        lg.k1 = d;
        lg.a1 = qrows;
        lg.lda1 = d;
        lg.b1 = w.kt;
        lg.ldb1 = ld;
        lg.c = w.p;
        lg.ldc = ld;
        for (int64_t r0 = 0; r0 < m; r0 += gemm::kRows) {
          const int rows = static_cast<int>(Min(gemm::kRows, m - r0));
          gemm::Rows<gemm::kStore>(lg, r0, rows, RoundUp(first + r0 + rows, kWidth), 0);
        }
        if (pl.taylor_mean) {
          const float base = *st.count;
          for (int64_t i = 0; i < m; ++i) {
            const int64_t last = first + i;
            float total = pl.root * Dot(qrows + i * d, st.ksum, d), count = base;
            const float* row = w.p + i * ld;
            for (int64_t j = 0; j <= last; ++j) {
              total += w.vis[j] * pl.root * row[j];
              count += w.vis[j];
            }
            w.center[i] = count > 0.f ? total / count : 0.f;
          }
        } else if (pl.taylor_max) {
          for (int64_t i = 0; i < m; ++i) w.limit[i] = k0 + first + i;
          MaxLogits(pl, b, kvh, qrows, m, w.limit, w.center, w.logits);
        } else {
          for (int64_t i = 0; i < m; ++i) w.center[i] = 0.f;
        }
        for (int64_t i = 0; i < m; ++i) {
          float* row = w.p + i * ld;
          const int64_t r0 = i / gemm::kRows * gemm::kRows;
          const int64_t width = RoundUp(first + r0 + Min(gemm::kRows, m - r0), kWidth);  // as its row tile
          const Vec c = simd::Splat(w.center[i]), root = simd::Splat(pl.root);
          for (int64_t j = 0; j < width; j += kWidth) {
            const Vec t = simd::Load(row + j) * root - c;
            const Vec a = 1.0f + t + 0.5f * t * t;
            simd::Store(row + j, simd::Load(w.vis + j) > 0.f ? a : simd::Zero());
          }
          MaskRowTail(row, first + i, width);
        }
        FeatureRows(pl, qrows, d, m, w.center, w.phiq, w.qshift, w.tmp);
      } else if (pl.favor) {
        // With a = log φ(q̃) and l = log φ(k̃) (phit), the intra weight is A_ij = Σ_f e^{a_if + l_jf}.
        // Row i is divided by e^{s_i}, s_i = max(max_f (a_if + m_f), max_{j<=last} M_ij) with
        // M_ij = max_f (a_if + l_jf) (a max-plus product) and m the state's shifts (the keys before
        // the chunk): every term is then at most F and the row's largest is at least 1. Intra weights
        // come from G = e^{a - α} (e^{l - β})ᵀ, α_i / β_j the largest feature of the row / key, as
        // G_ij e^{α_i + β_j - s_i}; a pair whose features are so misaligned (α_i + β_j - M_ij > 60)
        // that G_ij would lose it to underflow is summed directly instead.
        FeatureRows(pl, qrows, d, m, nullptr, w.qa, w.qshift, w.tmp);  // a (log features)
        for (int64_t i = 0; i < m; ++i) {
          const float* a = w.qa + i * pl.FP;
          const int64_t last = first + i;
          const int64_t width = RoundUp(last + 1, kWidth);
          Vec peak = simd::Splat(-INFINITY), inter = simd::Splat(-INFINITY);
          for (int64_t f = 0; f < pl.FP; f += kWidth) {
            const Vec x = simd::Load(a + f);
            peak = x > peak ? x : peak;
            const Vec t = x + simd::Load(st.shift + f);
            inter = t > inter ? t : inter;
          }
          float* mrow = w.mx + i * ld;
          for (int64_t j = 0; j < width; j += kWidth) simd::Store(mrow + j, simd::Splat(-INFINITY));
          for (int64_t f = 0; f < F; ++f) {
            const Vec af = simd::Splat(a[f]);
            const float* lrow = w.phit + f * ld;
            for (int64_t j = 0; j < width; j += kWidth) {
              const Vec t = af + simd::Load(lrow + j);
              const Vec cur = simd::Load(mrow + j);
              simd::Store(mrow + j, t > cur ? t : cur);
            }
          }
          float s_i = simd::MaxLane(inter);
          for (int64_t j = 0; j <= last; ++j) s_i = mrow[j] > s_i ? mrow[j] : s_i;
          if (!(s_i > -INFINITY)) s_i = 0.f;  // sees no key (its weights are all 0); NaN stays
          w.qshift[i] = s_i;
          const float alpha = simd::MaxLane(peak);
          w.alpha[i] = alpha;
          const Vec va = simd::Splat(alpha > -INFINITY ? alpha : 0.f), vs = simd::Splat(s_i);
          for (int64_t f = 0; f < pl.FP; f += kWidth) {
            const Vec x = simd::Load(a + f);
            simd::Store(w.qf + i * pl.FP + f, simd::ExpNonPositive(x - va));
            simd::Store(w.phiq + i * pl.FP + f, simd::ExpNonPositive(x + simd::Load(st.shift + f) - vs));
          }
        }
        gemm::Product pg;  // G = e^{a - α} (e^{l - β})ᵀ, lower triangle by row tile
        pg.k1 = F;
        pg.a1 = w.qf;
        pg.lda1 = pl.FP;
        pg.b1 = w.kc;
        pg.ldb1 = ld;
        pg.c = w.p;
        pg.ldc = ld;
        for (int64_t r0 = 0; r0 < m; r0 += gemm::kRows) {
          const int rows = static_cast<int>(Min(gemm::kRows, m - r0));
          const int64_t width = RoundUp(first + r0 + rows, kWidth);
          gemm::Rows<gemm::kStore>(pg, r0, rows, width, 0);
          for (int64_t i = r0; i < r0 + rows; ++i) {
            float* row = w.p + i * ld;
            const float* mrow = w.mx + i * ld;
            const float alpha = w.alpha[i], s_i = w.qshift[i];
            for (int64_t j = 0; j <= first + i; ++j) {
              if (!(w.beta[j] > -INFINITY)) {
                row[j] = 0.f;  // masked key
              } else if (alpha + w.beta[j] - mrow[j] <= 60.f) {
                row[j] *= std::exp(alpha + w.beta[j] - s_i);
              } else {
                const float* a = w.qa + i * pl.FP;
                float sum = 0.f;
                for (int64_t f = 0; f < F; ++f) sum += std::exp(a[f] + w.phit[f * ld + j] - s_i);
                row[j] = sum;
              }
            }
            MaskRowTail(row, first + i, width);
          }
        }
      } else {
        FeatureRows(pl, qrows, d, m, nullptr, w.phiq, w.qshift, w.tmp, st.shift);
        gemm::Product pg;  // P = φ(Q) φ(K_c)ᵀ, lower triangle by row tile
        pg.k1 = F;
        pg.a1 = w.phiq;
        pg.lda1 = pl.FP;
        pg.b1 = w.phit;
        pg.ldb1 = ld;
        pg.c = w.p;
        pg.ldc = ld;
        for (int64_t r0 = 0; r0 < m; r0 += gemm::kRows) {
          const int rows = static_cast<int>(Min(gemm::kRows, m - r0));
          const int64_t width = RoundUp(first + r0 + rows, kWidth);
          gemm::Rows<gemm::kStore>(pg, r0, rows, width, 0);
          for (int64_t i = r0; i < r0 + rows; ++i) MaskRowTail(w.p + i * ld, first + i, width);
        }
      }
      for (int64_t i = 0; i < m; ++i) {
        const int64_t width = RoundUp(first + i + 1, kWidth);
        float den = Dot(w.phiq + i * pl.FP, st.z, pl.FP);
        const float* row = w.p + i * ld;
        Vec acc = simd::Zero();
        for (int64_t j = 0; j < width; j += kWidth) acc += simd::Load(row + j);
        den += simd::Sum(acc);
        w.inv[i] = InverseDenominator(pl, den, pl.favor ? w.qshift[i] : 0.f);
      }
      const bool direct = pl.DvP == dv;
      gemm::Product yg;  // y = (φ(Q) S + P V_c) / den
      yg.k1 = F;
      yg.a1 = w.phiq;
      yg.lda1 = pl.FP;
      yg.b1 = st.s;
      yg.ldb1 = pl.DvP;
      yg.a2 = w.p;
      yg.lda2 = ld;
      yg.b2 = vc;
      yg.ldb2 = ldv;
      yg.c = direct ? yrows : w.ybuf;
      yg.ldc = direct ? dv : pl.DvP;
      yg.row_scale = w.inv;
      // While this head's rows are computed, fetch its queries of the next chunk.
      const int64_t next_rows = Min(kChunk, p.q_len - qb);
      const float* next_q = pl.Q(b, qh) + qb * d;
      const gemm::PrefetchPlan fetch(next_rows > 0 ? next_q : nullptr, next_rows * d * static_cast<int64_t>(sizeof(float)),
                                     CeilDiv(m, gemm::kRows));
      const bool stream = direct && Streamable(yrows, dv);
      bool carried = false;  // the state term already in C
      if (F > gemm::kBlockK) {  // long feature vectors (taylor2): the state term first, reduced in blocks
        gemm::Product state = yg;
        state.k2 = 0;
        gemm::Run<gemm::kStore>(state, m, pl.DvP);
        yg.k1 = 0;
        carried = true;
      }
      for (int64_t r0 = 0, tile = 0; r0 < m; r0 += gemm::kRows, ++tile) {
        const int rows = static_cast<int>(Min(gemm::kRows, m - r0));
        if (carried) {
          if (stream) gemm::Rows<gemm::kAccumulateScaleStreamStore>(yg, r0, rows, pl.DvP, first + r0 + rows);
          else gemm::Rows<gemm::kAccumulateScaleStore>(yg, r0, rows, pl.DvP, first + r0 + rows);
        } else {
          if (stream) gemm::Rows<gemm::kScaleStreamStore>(yg, r0, rows, pl.DvP, first + r0 + rows);
          else gemm::Rows<gemm::kScaleStore>(yg, r0, rows, pl.DvP, first + r0 + rows);
        }
        fetch.Part(tile);
      }
      if (!direct) {
        for (int64_t i = 0; i < m; ++i) std::memcpy(yrows + i * dv, w.ybuf + i * pl.DvP, sizeof(float) * dv);
      }
    }

    // Fold the chunk into the state: S += φ(K_c)ᵀ V_c, z += Σ φ(k̃_j).
    if (pl.favor && visible > 0) {  // log features -> features at the raised per-feature shifts
      for (int64_t f = 0; f < F; ++f) {
        const float* row = w.phit + f * ld;
        Vec top = simd::Splat(-INFINITY);
        for (int64_t j = 0; j < ncv; j += kWidth) {
          const Vec x = simd::Load(row + j);
          top = x > top ? x : top;
        }
        w.kshift[f] = simd::MaxLane(top);
      }
      RaiseShifts(pl, st, w.kshift);
      for (int64_t f = 0; f < F; ++f) {
        float* row = w.phit + f * ld;
        const Vec shift = simd::Splat(st.shift[f]);
        for (int64_t j = 0; j < ncv; j += kWidth) simd::Store(row + j, simd::ExpNonPositive(simd::Load(row + j) - shift));
      }
    }
    if (visible > 0) {
      gemm::Product sg;
      sg.k1 = nc;
      sg.a1 = w.phit;
      sg.lda1 = ld;
      sg.b1 = vc;
      sg.ldb1 = ldv;
      sg.c = st.s;
      sg.ldc = pl.DvP;
      if (k0 + nc < k_end) {  // the next chunk's keys and values
        const int64_t next = Min(kChunk, k_end - k0 - nc);
        sg.prefetch = k + (k0 + nc) * d;
        sg.prefetch_bytes = next * d * static_cast<int64_t>(sizeof(float));
        sg.prefetch2 = v + (k0 + nc) * dv;
        sg.prefetch2_bytes = next * dv * static_cast<int64_t>(sizeof(float));
      }
      gemm::Run<gemm::kAccumulate>(sg, F, pl.DvP);
      for (int64_t f = 0; f < F; ++f) {
        const float* row = w.phit + f * ld;
        Vec acc = simd::Zero();
        for (int64_t j = 0; j < ncv; j += kWidth) acc += simd::Load(row + j);
        st.z[f] += simd::Sum(acc);
      }
      if (pl.taylor_mean) {
        for (int64_t a = 0; a < d; ++a) {
          const float* row = w.kt + a * ld;
          Vec acc = simd::Zero();
          for (int64_t j = 0; j < ncv; j += kWidth) acc += simd::Load(row + j);
          st.ksum[a] += simd::Sum(acc);
        }
      }
      *st.count += static_cast<float>(visible);
    }
  }
}

// ---------------------------------------------------------------------------------------------
int64_t FeatureCount(const LinearAttentionProblem& p) {
  switch (p.feature_map) {
    case FeatureMap::kTaylor2: return 1 + p.head_dim + p.head_dim * (p.head_dim + 1) / 2;
    case FeatureMap::kFavor: return p.num_features;
    default: return p.head_dim;
  }
}

// Splits `items` work items over at most `max_tasks` tasks of contiguous ranges.
struct Split {
  int64_t items = 0, tasks = 0;
  int64_t Begin(int64_t task) const { return task * items / tasks; }
  int64_t End(int64_t task) const { return (task + 1) * items / tasks; }
};

Split MakeSplit(int64_t items, int64_t max_tasks) {
  Split s;
  s.items = items;
  s.tasks = Max(1, Min(items, max_tasks));
  return s;
}

}  // namespace

void LinearAttentionForward(const LinearAttentionProblem& p, const LinearAttentionTensors& t, const ThreadPool& pool,
                            const Scratch& scratch) {
  Plan pl;
  pl.p = &p;
  pl.t = &t;
  pl.fm = p.feature_map;
  pl.d = p.head_dim;
  pl.dv = p.value_dim;
  pl.F = FeatureCount(p);
  pl.FP = RoundUp(pl.F, kWidth);
  pl.DvP = RoundUp(pl.dv, kWidth);
  pl.dP = RoundUp(pl.d, kWidth);
  pl.group = p.q_heads / p.kv_heads;
  pl.offset = p.kv_len - p.q_len;
  pl.scale = p.scale;
  pl.root = std::sqrt(p.scale);
  pl.taylor = p.feature_map == FeatureMap::kTaylor2;
  pl.taylor_mean = pl.taylor && p.expansion_point == ExpansionPoint::kMean;
  pl.taylor_max = pl.taylor && p.expansion_point == ExpansionPoint::kMax;
  pl.favor = p.feature_map == FeatureMap::kFavor;
  pl.v_direct = pl.DvP == pl.dv;

  const int64_t heads = p.batch * p.kv_heads;
  const int64_t threads = Max(1, p.parallelism);
  const int64_t y_rows = p.batch * p.q_heads;
  if (p.kv_len == 0 && t.past_state == nullptr) {
    std::memset(t.y, 0, sizeof(float) * y_rows * p.q_len * pl.dv);
    if (t.present_state) std::memset(t.present_state, 0, sizeof(float) * heads * pl.F * (pl.dv + 2));
    return;
  }
  // Without keys every query sees just the past state, causal or not.
  const bool causal = p.causal && p.kv_len > 0;

  if (pl.favor) {  // √scale·W, padded rows
    float* w = scratch.Get<float>(static_cast<size_t>(pl.d * pl.FP));
    for (int64_t a = 0; a < pl.d; ++a) {
      for (int64_t f = 0; f < pl.FP; ++f) w[a * pl.FP + f] = f < pl.F ? pl.root * t.projection[a * pl.F + f] : 0.f;
    }
    pl.w_rows = w;
  }
  if (pl.taylor_max) {  // scale·Kᵀ per (b, kv head), for the logits of the maximum
    pl.kt_ld = RoundUp(p.kv_len, kWidth);
    float* kt = scratch.Get<float>(static_cast<size_t>(heads * pl.d * pl.kt_ld));
    auto body = [&](size_t task) {
      const int64_t h = static_cast<int64_t>(task);
      TransposeRows(t.k + h * p.kv_len * pl.d, pl.d, p.kv_len, p.scale, nullptr, kt + h * pl.d * pl.kt_ld, pl.kt_ld);
    };
    pool.For(static_cast<size_t>(heads), body);
    pl.kt_all = kt;
  }

  if (!causal) {
    // (1) Partial states over key ranges: enough tasks for the pool to balance dynamically (a shared
    // machine's threads do not run at one speed), each at least a few blocks.
    const int64_t want = 8 * threads;
    const int64_t min_keys = Max(4 * kKeyBlock, pl.F);
    const int64_t ksplit = Max(1, Min(CeilDiv(want, heads), p.kv_len / min_keys));
    float* states = scratch.Get<float>(static_cast<size_t>(heads * ksplit * StateFloats(pl)));
    const Split key_split = MakeSplit(heads * ksplit, 8 * threads);
    Bump key_bump;
    TakeKeyWork(pl, key_bump);
    float* key_work = scratch.Get<float>(static_cast<size_t>(key_split.tasks * key_bump.used));
    auto key_body = [&](size_t task) {
      Bump bump{key_work + static_cast<int64_t>(task) * key_bump.used, 0};
      const KeyWork w = TakeKeyWork(pl, bump);
      for (int64_t item = key_split.Begin(task); item < key_split.End(task); ++item) {
        const int64_t h = item / ksplit, part = item % ksplit;
        const State st = StateAt(pl, states, item);
        if (part == 0) InitState(pl, h, st);  // the past state, if any, goes into part 0
        else ClearState(pl, st);
        AccumulateKeys(pl, h / p.kv_heads, h % p.kv_heads, part * p.kv_len / ksplit, (part + 1) * p.kv_len / ksplit,
                       st, w);
      }
    };
    pool.For(static_cast<size_t>(key_split.tasks), key_body);
    // (2) One state per head.
    if (ksplit > 1) {
      auto merge_body = [&](size_t task) {
        const int64_t h = static_cast<int64_t>(task);
        const State dst = StateAt(pl, states, h * ksplit);
        for (int64_t part = 1; part < ksplit; ++part) MergeState(pl, dst, StateAt(pl, states, h * ksplit + part));
      };
      pool.For(static_cast<size_t>(heads), merge_body);
    }
    for (int64_t h = 0; h < heads && t.present_state; ++h) StoreState(pl, h, StateAt(pl, states, h * ksplit));
    // (3) Queries.
    const int64_t min_queries = 2 * kQueryBlock;
    const int64_t qsplit = Max(1, Min(CeilDiv(want, y_rows), p.q_len / min_queries));
    const Split query_split = MakeSplit(y_rows * qsplit, 8 * threads);
    Bump query_bump;
    TakeQueryWork(pl, query_bump, kQueryBlock);
    float* query_work = scratch.Get<float>(static_cast<size_t>(query_split.tasks * query_bump.used));
    auto query_body = [&](size_t task) {
      Bump bump{query_work + static_cast<int64_t>(task) * query_bump.used, 0};
      const QueryWork w = TakeQueryWork(pl, bump, kQueryBlock);
      for (int64_t item = query_split.Begin(task); item < query_split.End(task); ++item) {
        const int64_t row = item / qsplit, part = item % qsplit;
        const int64_t b = row / p.q_heads, qh = row % p.q_heads;
        const State st = StateAt(pl, states, (b * p.kv_heads + qh / pl.group) * ksplit);
        QueryRows(pl, b, qh, part * p.q_len / qsplit, (part + 1) * p.q_len / qsplit, st, w);
      }
      simd::StreamFence();
    };
    pool.For(static_cast<size_t>(query_split.tasks), query_body);
    return;
  }

  // Causal. Queries that see no key of the call (i + Skv - Sq < 0) are zeros, or read the past state.
  if (pl.offset < 0) {
    const int64_t blind = Min(-pl.offset, p.q_len);
    if (t.past_state == nullptr) {
      for (int64_t r = 0; r < y_rows; ++r) std::memset(t.y + r * p.q_len * pl.dv, 0, sizeof(float) * blind * pl.dv);
    } else {
      const int64_t state_floats = StateFloats(pl);
      Bump query_bump;
      TakeQueryWork(pl, query_bump, kQueryBlock);
      float* work = scratch.Get<float>(static_cast<size_t>(heads * (state_floats + query_bump.used)));
      auto blind_body = [&](size_t task) {
        const int64_t h = static_cast<int64_t>(task);
        float* base = work + h * (state_floats + query_bump.used);
        Bump bump{base, 0};
        const State st = TakeState(pl, bump);
        const QueryWork w = TakeQueryWork(pl, bump, kQueryBlock);
        InitState(pl, h, st);
        for (int64_t g = 0; g < pl.group; ++g) {
          for (int64_t i0 = 0; i0 < blind; i0 += kQueryBlock) {
            QueryRows(pl, h / p.kv_heads, (h % p.kv_heads) * pl.group + g, i0, Min(blind, i0 + kQueryBlock), st, w);
          }
        }
        simd::StreamFence();
      };
      pool.For(static_cast<size_t>(heads), blind_body);
    }
  }
  // Segments: with fewer heads than threads, split each sequence so every thread has work.
  const int64_t chunks = CeilDiv(p.kv_len, kChunk);
  int64_t segments = 1;
  if (heads < threads) segments = Max(1, Min(CeilDiv(2 * threads, heads), chunks / 2));
  auto seg_begin = [&](int64_t s) { return Min(p.kv_len, (s * chunks / segments) * kChunk); };
  float* states = scratch.Get<float>(static_cast<size_t>(heads * segments * StateFloats(pl)));
  if (segments > 1) {
    // Key states of segments 0 .. T-2 (slot s), then inclusive prefix sums: slot s-1 becomes the
    // state before segment s; segment 0 starts from slot T-1, cleared.
    const Split split = MakeSplit(heads * (segments - 1), 8 * threads);
    Bump key_bump;
    TakeKeyWork(pl, key_bump);
    float* key_work = scratch.Get<float>(static_cast<size_t>(split.tasks * key_bump.used));
    auto key_body = [&](size_t task) {
      Bump bump{key_work + static_cast<int64_t>(task) * key_bump.used, 0};
      const KeyWork w = TakeKeyWork(pl, bump);
      for (int64_t item = split.Begin(task); item < split.End(task); ++item) {
        const int64_t h = item / (segments - 1), s = item % (segments - 1);
        const State st = StateAt(pl, states, h * segments + s);
        ClearState(pl, st);
        AccumulateKeys(pl, h / p.kv_heads, h % p.kv_heads, seg_begin(s), seg_begin(s + 1), st, w);
      }
    };
    pool.For(static_cast<size_t>(split.tasks), key_body);
    auto prefix_body = [&](size_t task) {
      const int64_t h = static_cast<int64_t>(task);
      // Segment 0 starts from the past state (slot T-1); every prefix includes it.
      InitState(pl, h, StateAt(pl, states, h * segments + segments - 1));
      MergeState(pl, StateAt(pl, states, h * segments), StateAt(pl, states, h * segments + segments - 1));
      for (int64_t s = 1; s + 1 < segments; ++s) {
        MergeState(pl, StateAt(pl, states, h * segments + s), StateAt(pl, states, h * segments + s - 1));
      }
    };
    pool.For(static_cast<size_t>(heads), prefix_body);
  }
  const Split split = MakeSplit(heads * segments, 8 * threads);
  Bump chunk_bump;
  TakeChunkWork(pl, chunk_bump);
  float* chunk_work = scratch.Get<float>(static_cast<size_t>(split.tasks * chunk_bump.used));
  auto causal_body = [&](size_t task) {
    Bump bump{chunk_work + static_cast<int64_t>(task) * chunk_bump.used, 0};
    const ChunkWork w = TakeChunkWork(pl, bump);
    for (int64_t item = split.Begin(task); item < split.End(task); ++item) {
      const int64_t h = item / segments, s = item % segments;
      const int64_t slot = segments == 1 ? h : h * segments + (s == 0 ? segments - 1 : s - 1);
      const State st = StateAt(pl, states, slot);
      if (segments == 1) InitState(pl, h, st);
      CausalRange(pl, h / p.kv_heads, h % p.kv_heads, seg_begin(s), seg_begin(s + 1), st, w);
    }
    simd::StreamFence();
  };
  pool.For(static_cast<size_t>(split.tasks), causal_body);
  // The last segment's state has folded in every key: present_state.
  for (int64_t h = 0; h < heads && t.present_state; ++h) {
    StoreState(pl, h, StateAt(pl, states, segments == 1 ? h : h * segments + segments - 2));
  }
}

}  // namespace attnexport::cpu::ATTNEXPORT_ISA
