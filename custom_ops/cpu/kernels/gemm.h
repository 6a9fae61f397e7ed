// A small register-blocked matrix-product micro-kernel for the per-ISA kernel files.
//
//   C[i, n] (=, +=, = row_scale[i] *)  Σ_{k<k1} A1(i, k) B1[k, n]  +  Σ_{k<k2} A2[i, k] B2[k, n]
//
// Two products summed before one epilogue let the causal LinearAttention add the carried-state term
// (φ(Q) S) and the intra-chunk term (P V) in registers, then normalise once. A1 is either row-major
// (A1(i, k) = a1[i * lda1 + k]) or "k-major" (A1(i, k) = a1[k * lda1 + i], i.e. the transpose of
// a row-major matrix, which is how key features φ(K) enter the state update φ(K)ᵀ V without being
// transposed). A2 is row-major. B1, B2 and C are row-major and the column count n is a multiple of
// the vector width (callers pad). Each output tile of kRows x (kVecs vectors) lives in registers
// for the whole reduction: one vector load of B per k and vector, one broadcast of A per k and row.
#pragma once
#include <cstdint>

#include "cpu/kernels/simd.h"

namespace attnexport::cpu::ATTNEXPORT_ISA::gemm {

using simd::kWidth;
using simd::Vec;

#if defined(ATTNEXPORT_GEMM_ROWS) && defined(ATTNEXPORT_GEMM_VECS)
constexpr int kRows = ATTNEXPORT_GEMM_ROWS, kVecs = ATTNEXPORT_GEMM_VECS;  // test builds: another ISA's blocking
#elif defined(ATTNEXPORT_SIMD_WIDTH)
constexpr int kRows = 4, kVecs = 2;  // forced-width test builds: correctness, not speed
#elif defined(__AVX512F__)
constexpr int kRows = 6, kVecs = 4;  // 24 accumulators of 32 zmm registers; d = 64 is 4 vectors
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kRows = 6, kVecs = 2;  // 12 accumulators of 16 ymm registers (the classic 6x16)
#else
constexpr int kRows = 4, kVecs = 2;  // SSE2: no FMA, a product needs a temporary register
#endif

// Epilogues, as flags: kAccumulate adds to C instead of overwriting it, kScale multiplies row i by
// row_scale[i], kStream writes with streaming stores (C and ldc aligned to the vector size; the
// caller fences with simd::StreamFence() before another thread reads the result).
enum Mode {
  kStore = 0,
  kAccumulate = 1,
  kScaleStore = 2,
  kAccumulateScaleStore = 3,
  kScaleStreamStore = 6,
  kAccumulateScaleStreamStore = 7,
};
constexpr int kScale = 2, kStream = 4;
// Reduction block of the first product when it is long (taylor2's F = 1 + D + D(D+1)/2): the
// matching rows of B (kBlockK x n floats) stay in L2 while every row tile uses them.
constexpr int64_t kBlockK = 256;

struct Product {
  int64_t k1 = 0;
  const float* a1 = nullptr;
  int64_t lda1 = 0;
  bool a1_kmajor = false;
  const float* b1 = nullptr;
  int64_t ldb1 = 0;
  int64_t k2 = 0;  // 0: no second product
  const float* a2 = nullptr;
  int64_t lda2 = 0;
  const float* b2 = nullptr;
  int64_t ldb2 = 0;
  float* c = nullptr;
  int64_t ldc = 0;
  const float* row_scale = nullptr;  // kScaleStore
  // Optional: memory the caller reads next (the following block of K, V or Q). Its cache lines are
  // prefetched a slice per row tile, so the loads from DRAM overlap this product's arithmetic.
  const void* prefetch = nullptr;
  int64_t prefetch_bytes = 0;
  const void* prefetch2 = nullptr;
  int64_t prefetch2_bytes = 0;
};

// Prefetches cache lines [first, first + count) of p (64-byte lines) into L1.
ATTNEXPORT_INLINE void PrefetchLines(const void* p, int64_t first, int64_t count) {
  const char* base = static_cast<const char*>(p) + first * 64;
  for (int64_t l = 0; l < count; ++l) __builtin_prefetch(base + l * 64, 0, 3);
}

// Spreads the prefetch of `bytes` at p over `parts` calls (part = 0 .. parts-1).
struct PrefetchPlan {
  const void* p = nullptr;
  int64_t lines = 0, per_part = 0;
  PrefetchPlan() = default;
  PrefetchPlan(const void* ptr, int64_t bytes, int64_t parts)
      : p(ptr), lines(ptr ? (bytes + 63) / 64 : 0), per_part(ptr && parts > 0 ? ((bytes + 63) / 64 + parts - 1) / parts : 0) {}
  ATTNEXPORT_INLINE void Part(int64_t part) const {
    const int64_t first = part * per_part;
    if (first < lines) PrefetchLines(p, first, lines - first < per_part ? lines - first : per_part);
  }
};

template <int R, int NV, int kMode, bool kKMajor>
ATTNEXPORT_INLINE void Tile(const Product& g, int64_t i0, int64_t n0, int64_t k2) {
  Vec acc[R][NV];
  float* c = g.c + i0 * g.ldc + n0;
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = (kMode & kAccumulate) ? simd::Load(c + r * g.ldc + v * kWidth) : simd::Zero();
  }
  {
    const float* a = kKMajor ? g.a1 + i0 : g.a1 + i0 * g.lda1;
    const float* b = g.b1 + n0;
    const int64_t lda = g.lda1, ldb = g.ldb1;
    for (int64_t k = 0; k < g.k1; ++k) {
      Vec bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = simd::Load(b + v * kWidth);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const Vec av = simd::Splat(kKMajor ? a[r] : a[r * lda]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
      }
      a += kKMajor ? lda : 1;
      b += ldb;
    }
  }
  if (k2 > 0) {
    const float* a = g.a2 + i0 * g.lda2;
    const float* b = g.b2 + n0;
    const int64_t lda = g.lda2, ldb = g.ldb2;
    for (int64_t k = 0; k < k2; ++k) {
      Vec bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = simd::Load(b + v * kWidth);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const Vec av = simd::Splat(a[r * lda]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
      }
      a += 1;
      b += ldb;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if constexpr ((kMode & kScale) != 0) {
      const Vec s = simd::Splat(g.row_scale[i0 + r]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        if constexpr ((kMode & kStream) != 0) simd::StoreStream(c + r * g.ldc + v * kWidth, acc[r][v] * s);
        else simd::Store(c + r * g.ldc + v * kWidth, acc[r][v] * s);
      }
    } else {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) simd::Store(c + r * g.ldc + v * kWidth, acc[r][v]);
    }
  }
}

// Columns [n0, n0 + rest vectors) of a tile of R rows, in tiles of NV, NV-1, ... vectors.
template <int R, int NV, int kMode, bool kKMajor>
ATTNEXPORT_INLINE void ColumnTail(const Product& g, int64_t i0, int64_t n0, int64_t rest, int64_t k2) {
  if (rest >= NV) {
    Tile<R, NV, kMode, kKMajor>(g, i0, n0, k2);
    n0 += NV * kWidth;
    rest -= NV;
  }
  if constexpr (NV > 1) ColumnTail<R, NV - 1, kMode, kKMajor>(g, i0, n0, rest, k2);
}

// One tile of R rows across columns [0, n) (n a multiple of kWidth).
template <int R, int kMode, bool kKMajor>
inline void RowTile(const Product& g, int64_t i0, int64_t n, int64_t k2) {
  int64_t n0 = 0;
  for (; n0 + kVecs * kWidth <= n; n0 += kVecs * kWidth) Tile<R, kVecs, kMode, kKMajor>(g, i0, n0, k2);
  if constexpr (kVecs > 1) ColumnTail<R, kVecs - 1, kMode, kKMajor>(g, i0, n0, (n - n0) / kWidth, k2);
}

template <int kMode, bool kKMajor, int R = kRows>
inline void RowsLayout(const Product& g, int64_t i0, int rows, int64_t n, int64_t k2) {
  if (rows == R) {
    RowTile<R, kMode, kKMajor>(g, i0, n, k2);
  } else if constexpr (R > 1) {
    RowsLayout<kMode, kKMajor, R - 1>(g, i0, rows, n, k2);
  }
}

// Rows [i0, i0 + rows) with rows <= kRows, columns [0, n), second product over its first k2 terms.
template <int kMode>
inline void Rows(const Product& g, int64_t i0, int rows, int64_t n, int64_t k2) {
  if (g.a1_kmajor) RowsLayout<kMode, true>(g, i0, rows, n, k2);
  else RowsLayout<kMode, false>(g, i0, rows, n, k2);
}

template <int kMode>
inline void RunFlat(const Product& g, int64_t m, int64_t n) {
  const int64_t tiles = (m + kRows - 1) / kRows;
  const PrefetchPlan first(g.prefetch, g.prefetch_bytes, tiles), second(g.prefetch2, g.prefetch2_bytes, tiles);
  for (int64_t i0 = 0, tile = 0; i0 < m; i0 += kRows, ++tile) {
    const int rows = static_cast<int>(m - i0 < kRows ? m - i0 : kRows);
    Rows<kMode>(g, i0, rows, n, g.k2);
    first.Part(tile);
    second.Part(tile);
  }
}

inline void RunMode(int mode, const Product& g, int64_t m, int64_t n) {
  switch (mode) {
    case kStore: RunFlat<kStore>(g, m, n); break;
    case kAccumulate: RunFlat<kAccumulate>(g, m, n); break;
    case kScaleStore: RunFlat<kScaleStore>(g, m, n); break;
    case kAccumulateScaleStore: RunFlat<kAccumulateScaleStore>(g, m, n); break;
    case kScaleStreamStore: RunFlat<kScaleStreamStore>(g, m, n); break;
    case kAccumulateScaleStreamStore: RunFlat<kAccumulateScaleStreamStore>(g, m, n); break;
    default: break;
  }
}

// All rows [0, m), columns [0, n), both products in full. A long first product (k1 > kBlockK, no
// second one) is reduced in blocks of kBlockK, C accumulating between them.
template <int kMode>
inline void Run(const Product& g, int64_t m, int64_t n) {
  if (g.k1 <= kBlockK || g.k2 > 0) {
    RunFlat<kMode>(g, m, n);
    return;
  }
  for (int64_t k0 = 0; k0 < g.k1; k0 += kBlockK) {
    Product part = g;
    part.k1 = g.k1 - k0 < kBlockK ? g.k1 - k0 : kBlockK;
    part.a1 = g.a1 + (g.a1_kmajor ? k0 * g.lda1 : k0);
    part.b1 = g.b1 + k0 * g.ldb1;
    const bool first = k0 == 0, last = k0 + kBlockK >= g.k1;
    if (!last) part.prefetch = part.prefetch2 = nullptr;
    const int mode = (first ? (kMode & kAccumulate) : kAccumulate) | (last ? (kMode & (kScale | kStream)) : 0);
    RunMode(mode, part, m, n);
  }
}

}  // namespace attnexport::cpu::ATTNEXPORT_ISA::gemm
