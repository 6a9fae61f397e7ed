// LseAttention CPU kernel, compiled once per ISA (namespace attnexport::cpu::ATTNEXPORT_ISA).
//
// Notation (see lse_attention.h): per (batch, kv head) a state S [Dk, Dv], z [Dk], m [Dk] (m_d = -inf
// for a dimension that holds no key yet). Everything is exact up to float32 round-off; the only
// question is which reference each exponent is taken against, so that none overflows and nothing
// that matters underflows.
//
// Non-causal. (1) m'_d = max(m_d, max over the call's unpadded keys of k̃_jd); (2) the state is
// rescaled to m' and E_jd = exp(k̃_jd - m'_d) <= 1 is summed in: S += Eᵀ V, z += colsum(E) (partial
// sums over key ranges in parallel when there are few heads; they share m', so they just add);
// (3) every query row i takes M_i = max_d(q̃_id + m'_d): a_id = exp(q̃_id + m'_d - M_i) <= 1 with one
// entry 1, and since dimension d* = argmax holds its maximal key with weight exactly 1,
// den_i = a_i·z >= 1: the row's normaliser never underflows, and every term dropped by underflow is
// below 1e-38 of it.
//
// Causal: chunks of kChunk keys with their aligned queries (query i0 + r sees the state and chunk
// keys r' <= r). The chunk's keys get one reference, the chunk maxima mc_d = max(m_d, max_r k̃_rd),
// so P = A Eᵀ (A_rd = exp(q̃_rd + mc_d - X_r), E_r'd = exp(k̃_r'd - mc_d)) and the carried state
// (rescaled by exp(m_d - mc_d)) are matrix products. With X_r = max_d(q̃_rd + mc_d) every factor is
// <= 1, but mc may include keys *after* r, so row r's normaliser in this frame is only
// >= exp(-(X_r - M_r)), M_r = max_d(q̃_rd + pm_rd) with pm the prefix maxima over the keys r sees
// (the same argument as above, with pm). When that excess exceeds kMaxExcess for some row (keys
// that jump by more than ~40 within a chunk: inputs of magnitude 80+), the chunk is split in halves
// (recursively; a chunk of one key has no excess), so the normaliser stays >= e^-40 and the terms
// lost to underflow stay below e^-47 of it. Normal inputs never split.
//
// The state layout in memory is [Dk, Dv + 2] = [S_d | z_d | m_d] per (batch, kv head); the kernel
// works on a padded copy (S rows of DvP floats) and writes it back; m = -inf is written as 0 with
// z = 0 (the empty state is zeros).
#include <cmath>
#include <cstring>

#include "cpu/kernels/gemm.h"
#include "cpu/kernels/lse_attention.h"
#include "cpu/kernels/simd.h"

namespace attnexport::cpu::ATTNEXPORT_ISA {
namespace {

using simd::kWidth;
using simd::Vec;

#ifndef ATTNEXPORT_LSE_CHUNK
#define ATTNEXPORT_LSE_CHUNK 32
#endif
constexpr int64_t kChunk = ATTNEXPORT_LSE_CHUNK;  // causal chunk (keys and aligned queries)
constexpr int64_t kKeyBlock = 64;    // keys per block when summing keys into a state
constexpr int64_t kQueryBlock = 64;  // query rows per block when reading a state
constexpr float kMaxExcess = 40.f;   // causal: largest allowed X_r - M_r before a chunk is split
constexpr float kNegInf = -__builtin_inff();
static_assert(kKeyBlock >= kChunk, "a causal chunk is loaded into the key buffers");

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
  const LseAttentionProblem* p = nullptr;
  const LseAttentionTensors* t = nullptr;
  int64_t dk = 0, dv = 0, DvP = 0, group = 1, offset = 0;
  float root = 1.f;

  const float* Q(int64_t b, int64_t h) const { return t->q + (b * p->q_heads + h) * p->q_len * dk; }
  const float* K(int64_t b, int64_t h) const { return t->k + (b * p->kv_heads + h) * p->kv_len * dk; }
  const float* V(int64_t b, int64_t h) const { return t->v + (b * p->kv_heads + h) * p->kv_len * dv; }
  float* Y(int64_t b, int64_t h) const { return t->y + (b * p->q_heads + h) * p->q_len * dv; }
  const bool* Mask(int64_t b) const { return t->key_padding_mask ? t->key_padding_mask + b * p->kv_len : nullptr; }
  const float* Past(int64_t u) const { return t->past_state ? t->past_state + u * dk * (dv + 2) : nullptr; }
  float* Present(int64_t u) const { return t->present_state + u * dk * (dv + 2); }
};

// The working state of one (batch, kv head): S [dk, DvP] (padding columns 0), z [dk], m [dk].
struct State {
  float* s = nullptr;
  float* z = nullptr;
  float* m = nullptr;
};

void LoadState(const Plan& pl, int64_t u, const State& st) {
  const int64_t dk = pl.dk, dv = pl.dv, width = dv + 2;
  const float* past = pl.Past(u);
  for (int64_t d = 0; d < dk; ++d) {
    float* row = st.s + d * pl.DvP;
    std::memset(row, 0, sizeof(float) * pl.DvP);
    st.z[d] = 0.f;
    st.m[d] = kNegInf;
    if (past == nullptr) continue;
    const float* src = past + d * width;
    if (src[dv] > 0.f) {  // z_d = 0: the dimension holds no key
      std::memcpy(row, src, sizeof(float) * dv);
      st.z[d] = src[dv];
      st.m[d] = src[dv + 1];
    }
  }
}

void StoreState(const Plan& pl, int64_t u, const State& st) {
  const int64_t dk = pl.dk, dv = pl.dv, width = dv + 2;
  float* out = pl.Present(u);
  for (int64_t d = 0; d < dk; ++d) {
    float* dst = out + d * width;
    std::memcpy(dst, st.s + d * pl.DvP, sizeof(float) * dv);
    const bool held = st.m[d] != kNegInf && st.z[d] > 0.f;
    dst[dv] = held ? st.z[d] : 0.f;
    dst[dv + 1] = held ? st.m[d] : 0.f;
  }
}

// x * root for rows [0, rows) of x (row stride ld, dk columns), into out (row stride dk).
void ScaleRows(const float* x, int64_t ld, int64_t rows, int64_t dk, float root, float* out) {
  const Vec r = simd::Splat(root);
  for (int64_t i = 0; i < rows; ++i) {
    const float* src = x + i * ld;
    float* dst = out + i * dk;
    int64_t d = 0;
    for (; d + kWidth <= dk; d += kWidth) simd::Store(dst + d, simd::Load(src + d) * r);
    for (; d < dk; ++d) dst[d] = src[d] * root;
  }
}

// Lanes >= n of v replaced by -inf.
ATTNEXPORT_INLINE Vec TailMinusInf(Vec v, int64_t n) {
  simd::IVec lane;
  for (int i = 0; i < kWidth; ++i) lane[i] = i;
  return lane < static_cast<int32_t>(n) ? v : simd::Splat(kNegInf);
}

ATTNEXPORT_INLINE Vec VMax(Vec a, Vec b) { return a > b ? a : b; }

// out[d] = exp(x[d] * mul + add[d] - shift) for d < n; every exponent <= 0 (-inf gives 0).
void ExpRow(const float* x, float mul, const float* add, float shift, int64_t n, float* out) {
  const Vec s = simd::Splat(shift), m = simd::Splat(mul);
  int64_t d = 0;
  for (; d + kWidth <= n; d += kWidth) {
    simd::Store(out + d, simd::ExpNonPositive(simd::Load(x + d) * m + simd::Load(add + d) - s));
  }
  if (d < n) {
    const int64_t rest = n - d;
    const Vec t = simd::LoadPartial(x + d, rest) * m + simd::LoadPartial(add + d, rest) - s;
    simd::StorePartial(out + d, simd::ExpNonPositive(t), rest);
  }
}

// max_d (x[d] + add[d]) over d < n.
float MaxSum(const float* x, const float* add, int64_t n) {
  Vec best = simd::Splat(kNegInf);
  int64_t d = 0;
  for (; d + kWidth <= n; d += kWidth) best = VMax(best, simd::Load(x + d) + simd::Load(add + d));
  if (d < n) {
    const int64_t rest = n - d;
    best = VMax(best, TailMinusInf(simd::LoadPartial(x + d, rest) + simd::LoadPartial(add + d, rest), rest));
  }
  return simd::MaxLane(best);
}

// acc[d] += x[d] (d < n).
void AddRow(float* acc, const float* x, int64_t n) {
  int64_t d = 0;
  for (; d + kWidth <= n; d += kWidth) simd::Store(acc + d, simd::Load(acc + d) + simd::Load(x + d));
  for (; d < n; ++d) acc[d] += x[d];
}

// acc[d] = max(acc[d], x[d] * mul) (d < n).
void MaxRow(float* acc, const float* x, float mul, int64_t n) {
  const Vec m = simd::Splat(mul);
  int64_t d = 0;
  for (; d + kWidth <= n; d += kWidth) simd::Store(acc + d, VMax(simd::Load(acc + d), simd::Load(x + d) * m));
  for (; d < n; ++d) acc[d] = x[d] * mul > acc[d] ? x[d] * mul : acc[d];
}

// dst[c * ld + r] = src[r * cols + c] for r < rows, c < cols (8 x 8 blocks in registers under AVX).
void Transpose(const float* src, int64_t rows, int64_t cols, float* dst, int64_t ld) {
  int64_t c0 = 0;
#if defined(__AVX__)
  const int64_t rows8 = rows / 8 * 8;
  for (; c0 + 8 <= cols; c0 += 8) {
    for (int64_t r0 = 0; r0 < rows8; r0 += 8) {
      const float* s = src + r0 * cols + c0;
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * cols);
      __m256 t[8], u[8];
      for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      u[0] = _mm256_shuffle_ps(t[0], t[2], 0x44);
      u[1] = _mm256_shuffle_ps(t[0], t[2], 0xEE);
      u[2] = _mm256_shuffle_ps(t[1], t[3], 0x44);
      u[3] = _mm256_shuffle_ps(t[1], t[3], 0xEE);
      u[4] = _mm256_shuffle_ps(t[4], t[6], 0x44);
      u[5] = _mm256_shuffle_ps(t[4], t[6], 0xEE);
      u[6] = _mm256_shuffle_ps(t[5], t[7], 0x44);
      u[7] = _mm256_shuffle_ps(t[5], t[7], 0xEE);
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(dst + (c0 + i) * ld + r0, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(dst + (c0 + i + 4) * ld + r0, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
      }
    }
    for (int64_t r = rows8; r < rows; ++r) {
      for (int64_t c = c0; c < c0 + 8; ++c) dst[c * ld + r] = src[r * cols + c];
    }
  }
#endif
  for (; c0 < cols; ++c0) {
    for (int64_t r = 0; r < rows; ++r) dst[c0 * ld + r] = src[r * cols + c0];
  }
}

// ---- summing keys into a state --------------------------------------------------------------------

struct KeyBuffers {
  float* e = nullptr;    // [kKeyBlock, dk] exponentials E_rd (row form; the k-major form of Eᵀ)
  float* et = nullptr;   // [dk, kKeyBlockP] the same, transposed (causal chunks: the right operand of A Eᵀ)
  float* vc = nullptr;   // [kKeyBlock, DvP] values, zero padded (when V cannot be used in place)
  float* neg = nullptr;  // [dk] minus the reference the keys are taken against (0 where -inf)
  bool* keep = nullptr;  // [kKeyBlock]
  void Take(const Plan& pl, Bump& b) {
    e = b.Take(kKeyBlock * pl.dk);
    et = b.Take(pl.dk * RoundUp(kKeyBlock, kWidth));
    vc = b.Take(kKeyBlock * pl.DvP);
    neg = b.Take(pl.dk);
    keep = reinterpret_cast<bool*>(b.Take(CeilDiv(kKeyBlock, 4)));
  }
};

// m_out[d] = max(m_out[d], max over unpadded keys j in [j0, j1) of k̃_jd).
void MaxKeys(const Plan& pl, int64_t b, int64_t h, int64_t j0, int64_t j1, float* m_out) {
  const float* k = pl.K(b, h);
  const bool* mask = pl.Mask(b);
  for (int64_t j = j0; j < j1; ++j) {
    if (mask == nullptr || mask[j]) MaxRow(m_out, k + j * pl.dk, pl.root, pl.dk);
  }
}

void SetReference(const Plan& pl, const float* ref, float* neg) {
  for (int64_t d = 0; d < pl.dk; ++d) neg[d] = ref[d] == kNegInf ? 0.f : -ref[d];
}

// Keys [j0, j0 + n) of (b, h): keep flags, E_rd = exp(k̃_rd - ref_d) (kb.neg = -ref; padded keys 0),
// z += colsum(E). Returns the value rows to multiply (V in place, or kb.vc, padded) and their stride.
const float* KeyBlock(const Plan& pl, int64_t b, int64_t h, int64_t j0, int64_t n, const State& st,
                      const KeyBuffers& kb, int64_t* ldv) {
  const bool* mask = pl.Mask(b);
  const int64_t dk = pl.dk, dv = pl.dv;
  const float* k = pl.K(b, h) + j0 * dk;
  for (int64_t r = 0; r < n; ++r) {
    kb.keep[r] = mask == nullptr || mask[j0 + r];
    float* e = kb.e + r * dk;
    if (kb.keep[r]) {
      ExpRow(k + r * dk, pl.root, kb.neg, 0.f, dk, e);
      AddRow(st.z, e, dk);
    } else {
      std::memset(e, 0, sizeof(float) * dk);
    }
  }
  const float* v = pl.V(b, h) + j0 * dv;
  if (mask == nullptr && pl.DvP == dv) {
    *ldv = dv;
    return v;
  }
  for (int64_t r = 0; r < n; ++r) {
    float* dst = kb.vc + r * pl.DvP;
    if (kb.keep[r]) std::memcpy(dst, v + r * dv, sizeof(float) * dv);
    else std::memset(dst, 0, sizeof(float) * dv);
    std::memset(dst + dv, 0, sizeof(float) * (pl.DvP - dv));
  }
  *ldv = pl.DvP;
  return kb.vc;
}

// S += Eᵀ V over n keys (E in row form [n, dk] is the k-major form of Eᵀ).
void AccumulateKeys(const Plan& pl, const float* e, const float* v, int64_t ldv, int64_t n, const State& st) {
  if (n == 0) return;
  gemm::Product g;
  g.k1 = n;
  g.a1 = e;
  g.lda1 = pl.dk;
  g.a1_kmajor = true;
  g.b1 = v;
  g.ldb1 = ldv;
  g.c = st.s;
  g.ldc = pl.DvP;
  gemm::Run<gemm::kAccumulate>(g, pl.dk, pl.DvP);
}

// Adds keys [j0, j1) of (b, h) into st against the fixed reference ref (ref_d at least every kept
// key's k̃_jd; -inf where no key is kept).
void SumKeys(const Plan& pl, int64_t b, int64_t h, int64_t j0, int64_t j1, const float* ref, const State& st,
             const KeyBuffers& kb) {
  SetReference(pl, ref, kb.neg);
  for (int64_t j = j0; j < j1; j += kKeyBlock) {
    const int64_t n = Min(kKeyBlock, j1 - j);
    int64_t ldv = 0;
    const float* v = KeyBlock(pl, b, h, j, n, st, kb, &ldv);
    AccumulateKeys(pl, kb.e, v, ldv, n, st);
  }
}

// Multiplies state rows by exp(m_d - m_new_d) and sets m = m_new (m_new_d >= m_d; -inf stays empty).
void Rescale(const Plan& pl, const State& st, const float* m_new) {
  for (int64_t d = 0; d < pl.dk; ++d) {
    if (st.m[d] != kNegInf && m_new[d] != st.m[d]) {
      const float f = std::exp(st.m[d] - m_new[d]);
      const Vec fv = simd::Splat(f);
      float* row = st.s + d * pl.DvP;
      for (int64_t c = 0; c < pl.DvP; c += kWidth) simd::Store(row + c, simd::Load(row + c) * fv);
      st.z[d] *= f;
    }
    st.m[d] = m_new[d];
  }
}

// ---- reading a state ------------------------------------------------------------------------------

struct QueryBuffers {
  float* a = nullptr;    // [kQueryBlock, dk]
  float* num = nullptr;  // [kQueryBlock, DvP]
  float* inv = nullptr;  // [kQueryBlock]
  void Take(const Plan& pl, Bump& b) {
    a = b.Take(kQueryBlock * pl.dk);
    num = b.Take(kQueryBlock * pl.DvP);
    inv = b.Take(kQueryBlock);
  }
};

// y rows [i0, i0 + n) (n <= kQueryBlock) of query head hq read the state alone (every key it holds
// is visible to them): a_id = exp(q̃_id + m_d - M_i), y_i = a_i S / a_i·z.
void ReadState(const Plan& pl, int64_t b, int64_t hq, int64_t i0, int64_t n, const State& st, const QueryBuffers& qb) {
  const int64_t dk = pl.dk, dv = pl.dv;
  const float* q = pl.Q(b, hq) + i0 * dk;
  for (int64_t r = 0; r < n; ++r) {
    float* a = qb.a + r * dk;
    ScaleRows(q + r * dk, dk, 1, dk, pl.root, a);
    const float top = MaxSum(a, st.m, dk);
    if (top == kNegInf) {  // the state holds no key
      std::memset(a, 0, sizeof(float) * dk);
      qb.inv[r] = 0.f;
      continue;
    }
    ExpRow(a, 1.f, st.m, top, dk, a);
    const float den = simd::Dot(a, st.z, dk);
    qb.inv[r] = den > 0.f ? 1.f / den : 0.f;
  }
  float* y = pl.Y(b, hq) + i0 * dv;
  const bool direct = pl.DvP == dv;
  gemm::Product g;
  g.k1 = dk;
  g.a1 = qb.a;
  g.lda1 = dk;
  g.b1 = st.s;
  g.ldb1 = pl.DvP;
  g.c = direct ? y : qb.num;
  g.ldc = direct ? dv : pl.DvP;
  g.row_scale = qb.inv;
  gemm::Run<gemm::kScaleStore>(g, n, pl.DvP);
  if (!direct) {
    for (int64_t r = 0; r < n; ++r) std::memcpy(y + r * dv, qb.num + r * pl.DvP, sizeof(float) * dv);
  }
}

// ---- causal chunks --------------------------------------------------------------------------------

struct ChunkBuffers {
  KeyBuffers keys;       // the chunk's keys (kKeyBlock >= kChunk rows)
  float* kt = nullptr;   // [kChunk, dk] scaled keys
  float* ktt = nullptr;  // [dk, kChunkP] the same, transposed (padded keys -inf)
  float* pm = nullptr;   // [kChunk, dk] prefix maxima
  float* mc = nullptr;   // [dk] scratch maxima
  float* zc = nullptr;   // [dk] the chunk's Σ_r' E_r'd
  float* qt = nullptr;   // [G * kChunk, dk] scaled queries, row g * kChunk + r
  float* a = nullptr;    // [G * kChunk, dk]
  float* top = nullptr;  // [G * kChunk] X_r
  float* p = nullptr;    // [G * kChunk, kChunkP] intra-chunk weights
  float* num = nullptr;  // [G * kChunk, DvP]
  float* inv = nullptr;  // [G * kChunk]
  bool* live = nullptr;  // [G * kChunk]: the row sees some key
  void Take(const Plan& pl, Bump& b) {
    keys.Take(pl, b);
    const int64_t rows = pl.group * kChunk;
    kt = b.Take(kChunk * pl.dk);
    ktt = b.Take(pl.dk * RoundUp(kChunk, kWidth));
    pm = b.Take(kChunk * pl.dk);
    mc = b.Take(pl.dk);
    zc = b.Take(pl.dk);
    qt = b.Take(rows * pl.dk);
    a = b.Take(rows * pl.dk);
    top = b.Take(rows);
    p = b.Take(rows * RoundUp(kChunk, kWidth));
    num = b.Take(rows * pl.DvP);
    inv = b.Take(rows);
    live = reinterpret_cast<bool*>(b.Take(CeilDiv(rows, 4)));
  }
};

// Rows [r0, r1) of the loaded chunk (keys kt/keep/vc, queries qt): key r' is visible to query row r
// iff r0 <= r' <= r (plus the state). Reads them, writes y, folds the keys into the state.
void CausalRows(const Plan& pl, int64_t b, int64_t hkv, int64_t q0, int64_t r0, int64_t r1, const float* vrows,
                int64_t ldv, const State& st, const ChunkBuffers& cb) {
  const int64_t dk = pl.dk, dv = pl.dv, G = pl.group, n = r1 - r0;
  const int64_t ldp = RoundUp(kChunk, kWidth);
  // Prefix maxima over the keys each row sees; the chunk maxima are the last row's.
  for (int64_t r = r0; r < r1; ++r) {
    float* cur = cb.pm + r * dk;
    std::memcpy(cur, r == r0 ? st.m : cb.pm + (r - 1) * dk, sizeof(float) * dk);
    if (cb.keys.keep[r]) MaxRow(cur, cb.kt + r * dk, 1.f, dk);
  }
  const float* mc = cb.pm + (r1 - 1) * dk;  // -inf where no key is held yet
  // Row references; split when some row's normaliser could fall below e^-kMaxExcess in this frame.
  bool split = false;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t row = g * kChunk + r;
      const float* q = cb.qt + row * dk;
      const float seen = MaxSum(q, cb.pm + r * dk, dk);
      cb.live[row] = seen != kNegInf;
      if (!cb.live[row]) continue;
      cb.top[row] = MaxSum(q, mc, dk);
      if (cb.top[row] - seen > kMaxExcess) split = true;
    }
  }
  if (split && n > 1) {
    const int64_t mid = r0 + n / 2;
    CausalRows(pl, b, hkv, q0, r0, mid, vrows, ldv, st, cb);
    CausalRows(pl, b, hkv, q0, mid, r1, vrows, ldv, st, cb);
    return;
  }
  // The carried state in the chunk's frame; the chunk's key exponentials E_r'd = exp(k̃_r'd - mc_d),
  // transposed (et [dk, ldp], columns r' - r0; padded keys are -inf in ktt, so 0 here), and their
  // sums Σ_r' E (added to z once the rows have read the state).
  Rescale(pl, st, mc);
  float* et = cb.keys.et;
  const int64_t nP = RoundUp(n, kWidth);
  for (int64_t d = 0; d < dk; ++d) {
    const float* src = cb.ktt + d * ldp + r0;
    float* row = et + d * ldp;
    const Vec shift = simd::Splat(mc[d] == kNegInf ? 0.f : mc[d]);
    Vec sum = simd::Zero();
    int64_t c = 0;
    for (; c + kWidth <= n; c += kWidth) {
      const Vec x = simd::ExpNonPositive(simd::Load(src + c) - shift);
      simd::Store(row + c, x);
      sum += x;
    }
    if (c < n) {
      const Vec x = simd::ExpNonPositive(TailMinusInf(simd::LoadPartial(src + c, n - c), n - c) - shift);
      simd::Store(row + c, x);
      sum += x;
      c += kWidth;
    }
    for (; c < nP; c += kWidth) simd::Store(row + c, simd::Zero());
    cb.zc[d] = simd::Sum(sum);
  }
  // Query weights a_rd = exp(q̃_rd + mc_d - X_r), rows of all G heads stacked (g * n + r - r0).
  float* a = cb.a;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t row = g * kChunk + r;
      float* dst = a + (g * n + (r - r0)) * dk;
      if (cb.live[row]) ExpRow(cb.qt + row * dk, 1.f, mc, cb.top[row], dk, dst);
      else std::memset(dst, 0, sizeof(float) * dk);
    }
  }
  // Per tile of rows: P = A Eᵀ up to the diagonal; den = Σ_{r' <= r} P + a·z; y = (A S + P V) / den.
  gemm::Product pg;
  pg.k1 = dk;
  pg.a1 = a;
  pg.lda1 = dk;
  pg.b1 = et;
  pg.ldb1 = ldp;
  pg.c = cb.p;
  pg.ldc = ldp;
  const bool direct = pl.DvP == dv;
  gemm::Product yg;
  yg.k1 = dk;
  yg.a1 = a;
  yg.lda1 = dk;
  yg.b1 = st.s;
  yg.ldb1 = pl.DvP;
  yg.a2 = cb.p;
  yg.lda2 = ldp;
  yg.b2 = vrows + r0 * ldv;
  yg.ldb2 = ldv;
  yg.k2 = n;
  yg.c = cb.num;
  yg.ldc = pl.DvP;
  yg.row_scale = cb.inv;
  for (int64_t g = 0; g < G; ++g) {
    // Head g's rows of the stacked A: P rows, normalisers and outputs of its n rows.
    gemm::Product pgg = pg, out = yg;
    float* prows = cb.p + g * n * ldp;
    float* inv = cb.inv + g * n;
    pgg.a1 = out.a1 = a + g * n * dk;
    pgg.c = prows;
    out.a2 = prows;
    out.row_scale = inv;
    out.c = direct ? pl.Y(b, hkv * G + g) + (q0 + r0) * dv : cb.num + g * n * pl.DvP;
    out.ldc = direct ? dv : pl.DvP;
    for (int64_t i0 = 0; i0 < n; i0 += gemm::kRows) {
      const int rows = static_cast<int>(Min(gemm::kRows, n - i0));
      const int64_t last = i0 + rows;  // keys [0, last) reach this tile
      gemm::Rows<gemm::kStore>(pgg, i0, rows, RoundUp(last, kWidth), 0);
      for (int64_t rl = i0; rl < last; ++rl) {
        // Keys after the row are masked out (zeroed up to the tile's last key, which the output
        // product reads); the row's sum over the keys it sees joins the state's share a·z.
        float* prow = prows + rl * ldp;
        const int64_t diag = rl / kWidth * kWidth;  // the vector holding the diagonal
        Vec seen = simd::Zero();
        for (int64_t c = 0; c < diag; c += kWidth) seen += simd::Load(prow + c);
        const Vec edge = simd::KeepFirst(simd::Load(prow + diag), rl + 1 - diag);
        simd::Store(prow + diag, edge);
        for (int64_t c = diag + kWidth; c < last; c += kWidth) simd::Store(prow + c, simd::Zero());
        const float den = simd::Dot(pgg.a1 + rl * dk, st.z, dk) + simd::Sum(seen + edge);
        inv[rl] = den > 0.f ? 1.f / den : 0.f;
      }
      gemm::Rows<gemm::kScaleStore>(out, i0, rows, pl.DvP, last);
    }
    if (!direct) {
      float* y = pl.Y(b, hkv * G + g) + (q0 + r0) * dv;
      for (int64_t rl = 0; rl < n; ++rl) std::memcpy(y + rl * dv, cb.num + (g * n + rl) * pl.DvP, sizeof(float) * dv);
    }
  }
  // Fold the keys into the state (already in the frame of mc): S += Eᵀ V, z += Σ_r' E.
  for (int64_t d = 0; d < dk; ++d) st.z[d] += cb.zc[d];
  gemm::Product sg;
  sg.k1 = n;
  sg.a1 = et;
  sg.lda1 = ldp;
  sg.b1 = vrows + r0 * ldv;
  sg.ldb1 = ldv;
  sg.c = st.s;
  sg.ldc = pl.DvP;
  gemm::Run<gemm::kAccumulate>(sg, dk, pl.DvP);
}

// One (batch, kv head), causal: prefix keys (seen by every query), queries that see only the past,
// then the aligned chunks.
void CausalUnit(const Plan& pl, int64_t u, const State& st, const ChunkBuffers& cb, const QueryBuffers& qb) {
  const LseAttentionProblem& p = *pl.p;
  const int64_t b = u / p.kv_heads, hkv = u % p.kv_heads, G = pl.group, dk = pl.dk, dv = pl.dv;
  LoadState(pl, u, st);
  const int64_t prefix = Max(0, pl.offset);     // keys every query sees
  const int64_t first_q = Max(0, -pl.offset);   // queries before it see only the past state
  if (prefix > 0) {
    std::memcpy(cb.mc, st.m, sizeof(float) * dk);
    MaxKeys(pl, b, hkv, 0, prefix, cb.mc);
    Rescale(pl, st, cb.mc);
    SumKeys(pl, b, hkv, 0, prefix, st.m, st, cb.keys);
  }
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t i = 0; i < first_q; i += kQueryBlock) ReadState(pl, b, hkv * G + g, i, Min(kQueryBlock, first_q - i), st, qb);
  }
  const int64_t aligned = p.q_len - first_q;  // == kv_len - prefix
  const bool* mask = pl.Mask(b);
  for (int64_t c0 = 0; c0 < aligned; c0 += kChunk) {
    const int64_t n = Min(kChunk, aligned - c0), j0 = prefix + c0;
    ScaleRows(pl.K(b, hkv) + j0 * dk, dk, n, dk, pl.root, cb.kt);
    const float* v = pl.V(b, hkv) + j0 * dv;
    int64_t ldv = dv;
    for (int64_t r = 0; r < n; ++r) cb.keys.keep[r] = mask == nullptr || mask[j0 + r];
    Transpose(cb.kt, n, dk, cb.ktt, RoundUp(kChunk, kWidth));
    for (int64_t r = 0; r < n; ++r) {
      if (!cb.keys.keep[r]) {
        for (int64_t d = 0; d < dk; ++d) cb.ktt[d * RoundUp(kChunk, kWidth) + r] = kNegInf;
      }
    }
    if (mask != nullptr || pl.DvP != dv) {
      for (int64_t r = 0; r < n; ++r) {
        float* dst = cb.keys.vc + r * pl.DvP;
        if (cb.keys.keep[r]) std::memcpy(dst, v + r * dv, sizeof(float) * dv);
        else std::memset(dst, 0, sizeof(float) * dv);
        std::memset(dst + dv, 0, sizeof(float) * (pl.DvP - dv));
      }
      v = cb.keys.vc;
      ldv = pl.DvP;
    }
    for (int64_t g = 0; g < G; ++g) {
      ScaleRows(pl.Q(b, hkv * G + g) + (first_q + c0) * dk, dk, n, dk, pl.root, cb.qt + g * kChunk * dk);
    }
    CausalRows(pl, b, hkv, first_q + c0, 0, n, v, ldv, st, cb);
  }
  StoreState(pl, u, st);
}

// ---- the kernel -----------------------------------------------------------------------------------

void NonCausal(const Plan& pl, const ThreadPool& pool, const Scratch& scratch) {
  const LseAttentionProblem& p = *pl.p;
  const int64_t units = p.batch * p.kv_heads, dk = pl.dk, G = pl.group;
  // Key parts per unit: enough tasks for the threads when there are few heads.
  const int64_t parts = Max(1, Min(CeilDiv(p.parallelism * 2, units), CeilDiv(p.kv_len, 4 * kKeyBlock)));
  const int64_t tasks = units * parts;
  const int64_t state_floats = dk * pl.DvP + 2 * RoundUp(dk, 16);
  const int64_t slots = Min(tasks, Max(1, p.parallelism * 4));
  Bump key_count;
  KeyBuffers().Take(pl, key_count);
  const int64_t key_floats = key_count.used;

  float* states = scratch.Get<float>(tasks * state_floats);  // partial states, then (part 0) the unit's
  float* maxima = scratch.Get<float>(units * RoundUp(dk, 16));
  float* work = scratch.Get<float>(slots * key_floats);
  auto state_of = [&](int64_t task) {
    State s;
    s.s = states + task * state_floats;
    s.z = s.s + dk * pl.DvP;
    s.m = s.z + RoundUp(dk, 16);
    return s;
  };
  auto range = [&](int64_t part, int64_t& j0, int64_t& j1) {
    j0 = p.kv_len * part / parts;
    j1 = p.kv_len * (part + 1) / parts;
  };

  // (1) the past state (part 0's slot) and the new maxima.
  auto load = [&](size_t i) {
    const int64_t u = static_cast<int64_t>(i);
    const State st = state_of(u * parts);
    LoadState(pl, u, st);
    float* m_new = maxima + u * RoundUp(dk, 16);
    std::memcpy(m_new, st.m, sizeof(float) * dk);
    MaxKeys(pl, u / p.kv_heads, u % p.kv_heads, 0, p.kv_len, m_new);
    Rescale(pl, st, m_new);
  };
  pool.For(static_cast<size_t>(units), load);
  // (2) partial sums of the keys, all against the unit's new maxima.
  auto sum = [&](size_t slot) {
    float* base = work + static_cast<int64_t>(slot) * key_floats;
    Bump bump{base, 0};
    KeyBuffers kb;
    kb.Take(pl, bump);
    for (int64_t task = static_cast<int64_t>(slot); task < tasks; task += slots) {
      const int64_t u = task / parts, part = task % parts;
      const State st = state_of(task);
      const float* m_new = maxima + u * RoundUp(dk, 16);
      if (part != 0) {
        std::memset(st.s, 0, sizeof(float) * dk * pl.DvP);
        std::memset(st.z, 0, sizeof(float) * dk);
      }
      int64_t j0, j1;
      range(part, j0, j1);
      SumKeys(pl, u / p.kv_heads, u % p.kv_heads, j0, j1, m_new, st, kb);
    }
  };
  pool.For(static_cast<size_t>(slots), sum);
  // (3) the unit's state = the sum of its parts; present_state.
  auto reduce = [&](size_t i) {
    const int64_t u = static_cast<int64_t>(i);
    const State st = state_of(u * parts);
    for (int64_t part = 1; part < parts; ++part) {
      const State other = state_of(u * parts + part);
      for (int64_t x = 0; x < dk * pl.DvP; ++x) st.s[x] += other.s[x];
      for (int64_t d = 0; d < dk; ++d) st.z[d] += other.z[d];
    }
    StoreState(pl, u, st);
  };
  pool.For(static_cast<size_t>(units), reduce);
  // (4) every query block reads its unit's state.
  if (p.q_len == 0) return;
  const int64_t blocks = CeilDiv(p.q_len, kQueryBlock);
  const int64_t jobs = p.batch * p.q_heads * blocks;
  const int64_t qslots = Min(jobs, Max(1, p.parallelism * 4));
  Bump count;
  QueryBuffers probe;
  probe.Take(pl, count);
  const int64_t query_floats = count.used;
  float* qwork = scratch.Get<float>(qslots * query_floats);
  auto read = [&](size_t slot) {
    Bump bump{qwork + static_cast<int64_t>(slot) * query_floats, 0};
    QueryBuffers qb;
    qb.Take(pl, bump);
    for (int64_t job = static_cast<int64_t>(slot); job < jobs; job += qslots) {
      const int64_t block = job % blocks, bh = job / blocks;
      const int64_t b = bh / p.q_heads, hq = bh % p.q_heads;
      const int64_t u = b * p.kv_heads + hq / G;
      const int64_t i0 = block * kQueryBlock;
      ReadState(pl, b, hq, i0, Min(kQueryBlock, p.q_len - i0), state_of(u * parts), qb);
    }
  };
  pool.For(static_cast<size_t>(qslots), read);
}

void Causal(const Plan& pl, const ThreadPool& pool, const Scratch& scratch) {
  const LseAttentionProblem& p = *pl.p;
  const int64_t units = p.batch * p.kv_heads, dk = pl.dk;
  const int64_t slots = Min(units, Max(1, p.parallelism * 2));
  Bump count;
  {
    ChunkBuffers cb;
    cb.Take(pl, count);
    QueryBuffers qb;
    qb.Take(pl, count);
    count.Take(dk * pl.DvP + 2 * RoundUp(dk, 16));
  }
  const int64_t slot_floats = count.used;
  float* work = scratch.Get<float>(slots * slot_floats);
  auto body = [&](size_t slot) {
    Bump bump{work + static_cast<int64_t>(slot) * slot_floats, 0};
    ChunkBuffers cb;
    cb.Take(pl, bump);
    QueryBuffers qb;
    qb.Take(pl, bump);
    State st;
    st.s = bump.Take(dk * pl.DvP);
    st.z = bump.Take(dk);
    st.m = bump.Take(dk);
    for (int64_t u = static_cast<int64_t>(slot); u < units; u += slots) CausalUnit(pl, u, st, cb, qb);
  };
  pool.For(static_cast<size_t>(slots), body);
}

}  // namespace

void LseAttentionForward(const LseAttentionProblem& problem, const LseAttentionTensors& tensors, const ThreadPool& pool,
                         const Scratch& scratch) {
  Plan pl;
  pl.p = &problem;
  pl.t = &tensors;
  pl.dk = problem.head_dim;
  pl.dv = problem.value_dim;
  pl.DvP = RoundUp(Max(problem.value_dim, 1), kWidth);
  pl.group = problem.q_heads / problem.kv_heads;
  pl.offset = problem.kv_len - problem.q_len;
  pl.root = std::sqrt(problem.scale);
  if (problem.batch == 0 || problem.kv_heads == 0) return;
  if (problem.causal) Causal(pl, pool, scratch);
  else NonCausal(pl, pool, scratch);
}

}  // namespace attnexport::cpu::ATTNEXPORT_ISA
