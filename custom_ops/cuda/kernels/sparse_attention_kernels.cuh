// SparseAttention CUDA kernels (see sparse_attention.h). Written against cuda/common/device.cuh only,
// so the host emulator runs this very code.
#pragma once
#include "cuda/common/device.cuh"
#include "cuda/common/tiles.cuh"
#include "cuda/kernels/sparse_attention.h"

namespace attnexport::cuda::sp {

using namespace ::attnexport::cuda::dev;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -__builtin_huge_valf();

// -- the pattern (reference.py: random_key_block, sparse_pattern) -------------------------------------
AX_HD long long RandomRound(long long h, long long v) {
  const long long t = (h + v) % kRandomModulus;
  return (kRandomMultiplier * ((t * t) % kRandomModulus)) % kRandomModulus;
}
AX_HD long long RandomKeyBlock(long long seed, long long query_block, long long r, long long key_blocks) {
  const long long h = RandomRound(RandomRound(seed % kRandomModulus, query_block + 1), r + 1);
  return h % key_blocks;
}

// Is key j in one of the random blocks of the query at position p >= 0? Not inlined: only tiles that
// hold random blocks call it (64-bit hashing, inlined 32 times per kernel, costs compile time).
AX_NOINLINE_DEVICE bool InRandomBlocks(long long seed, int p, int j, int block_size, int blocks, int kv_len) {
  const long long key_blocks = (static_cast<long long>(kv_len) + block_size - 1) / block_size;
  const int qb = p / block_size, kb = j / block_size;
  for (int r = 0; r < blocks; ++r) {
    if (RandomKeyBlock(seed, qb, r, key_blocks) == kb) return true;
  }
  return false;
}

// Is key j (0 <= j < kv_len) in the pattern of the query at position p = i + kv_len - q_len?
// Key padding aside; random blocks only checked when `random` (the tile holds some). Lengths are
// below 2^30, so positions and offsets fit in int.
AX_DEVICE bool InPattern(const Args& a, int p, int j, bool random) {
  const int o = j - p;
  if (a.causal && o > 0) return false;
  bool window = a.dilation == 1 || o % a.dilation == 0;
  if (a.window_left >= 0) window = window && o >= -a.window_left;
  if (a.window_right >= 0) window = window && o <= a.window_right;
  if (window) return true;
  if (j < a.num_global) return true;
  if (p >= 0 && p < a.num_global) return true;
  return random && a.num_random_blocks > 0 && p >= 0 &&
         InRandomBlocks(a.seed, p, j, a.block_size, a.num_random_blocks, a.kv_len);
}

// Every (row position in [p_lo, p_hi], key in [k0, k1]) pair visible, with no padding mask?
AX_HD bool TileInside(const Args& a, long long p_lo, long long p_hi, long long k0, long long k1, bool has_mask) {
  if (has_mask || k1 >= a.kv_len) return false;
  if (a.causal && k1 > p_lo) return false;
  if (a.dilation == 1 && (a.window_left < 0 || p_hi - k0 <= a.window_left) &&
      (a.window_right < 0 || k1 - p_lo <= a.window_right)) {
    return true;
  }
  if (k1 < a.num_global) return true;
  return p_lo >= 0 && p_hi < a.num_global;
}

// Bits of tiles [lo, hi] that fall in bitmap word w.
AX_HD uint32_t RangeBits(int w, long long lo, long long hi) {
  const long long a = lo > 32LL * w ? lo : 32LL * w;
  const long long b = hi < 32LL * w + 31 ? hi : 32LL * w + 31;
  if (a > b) return 0u;
  const int n = static_cast<int>(b - a + 1);
  const uint32_t bits = n == 32 ? 0xFFFFFFFFu : ((1u << n) - 1u);
  return bits << static_cast<int>(a - 32LL * w);
}

AX_DEVICE bool TestBit(const uint32_t* bitmap, int t) { return (bitmap[t >> 5] >> (t & 31)) & 1u; }

// The next set tile after t (-1: none).
AX_DEVICE int NextVisit(const uint32_t* visit, int words, int t) {
  const int start = t + 1;
  int w = start >> 5;
  if (w >= words) return -1;
  uint32_t bits = visit[w] & (0xFFFFFFFFu << (start & 31));
  while (bits == 0u) {
    if (++w >= words) return -1;
    bits = visit[w];
  }
  return w * 32 + ffs_(bits) - 1;
}

// Marks the key tiles (of TILE keys) that some row of positions [p_lo, p_hi] reaches: `visit`, and
// in `rnd` those holding random blocks. Block-wide (ends with a barrier). Returns the last key any
// row may see (-1: none).
template <int TILE, int THREADS>
AX_DEVICE long long BuildVisit(const Args& a, long long p_lo, long long p_hi, uint32_t* visit, uint32_t* rnd) {
  long long last_key = a.kv_len - 1;
  if (a.causal && p_hi < last_key) last_key = p_hi;
  long long r1_lo = 0, r1_hi = -1, r2_lo = 0, r2_hi = -1;  // key ranges
  if (last_key >= 0) {
    const bool global_row = a.num_global > 0 && p_lo < a.num_global && p_hi >= 0;
    if (global_row) {
      r1_hi = last_key;
    } else {
      r1_hi = (a.num_global < a.kv_len ? a.num_global : a.kv_len) - 1;
      if (r1_hi > last_key) r1_hi = last_key;
      r2_lo = a.window_left < 0 ? 0 : p_lo - a.window_left;
      if (r2_lo < 0) r2_lo = 0;
      r2_hi = a.window_right < 0 ? last_key : p_hi + a.window_right;
      if (r2_hi > last_key) r2_hi = last_key;
    }
  }
  const long long t1_lo = r1_lo / TILE, t1_hi = r1_hi < 0 ? -1 : r1_hi / TILE;
  const long long t2_lo = r2_lo / TILE, t2_hi = r2_hi < r2_lo ? -1 : r2_hi / TILE;
  for (int w = thread_x(); w < a.bitmap_words; w += THREADS) {
    visit[w] = RangeBits(w, t1_lo, t1_hi) | (t2_hi >= t2_lo ? RangeBits(w, t2_lo, t2_hi) : 0u);
    rnd[w] = 0u;
  }
  sync_block();
  if (last_key >= 0 && a.block_size > 0 && a.num_random_blocks > 0 && p_hi >= 0) {
    const long long qb_lo = (p_lo > 0 ? p_lo : 0) / a.block_size, qb_hi = p_hi / a.block_size;
    const long long key_blocks = (a.kv_len + a.block_size - 1) / a.block_size;
    const long long pairs = (qb_hi - qb_lo + 1) * a.num_random_blocks;
    for (long long idx = thread_x(); idx < pairs; idx += THREADS) {
      const long long qb = qb_lo + idx / a.num_random_blocks, r = idx % a.num_random_blocks;
      const long long kb = RandomKeyBlock(a.seed, qb, r, key_blocks);
      const long long k_lo = kb * a.block_size;
      long long k_hi = k_lo + a.block_size - 1;
      if (k_hi > last_key) k_hi = last_key;
      for (long long t = k_lo / TILE; k_lo <= k_hi && t <= k_hi / TILE; ++t) {
        const uint32_t bit = 1u << (t & 31);
        atomic_or_shared(visit + (t >> 5), bit);
        atomic_or_shared(rnd + (t >> 5), bit);
      }
    }
    sync_block();
  }
  return last_key;
}

// =====================================================================================================
// mma path: 64 query rows per block (warp w: rows 16w..16w+15), key tiles of 64.
// =====================================================================================================
template <typename T, int D>
AX_GLOBAL void AX_LAUNCH_BOUNDS(kMmaThreads) SparseMma(const Args a) {
  constexpr int kLd = D + 8, KS = D / 16, NT = D / 8;
  T* Qs = reinterpret_cast<T*>(dynamic_smem());
  T* KV = Qs + kMmaTile * kLd;  // stage s: K at KV + 2s * 64 * kLd, V right after
  uint32_t* visit = reinterpret_cast<uint32_t*>(Qs + 5 * kMmaTile * kLd);
  uint32_t* rnd = visit + a.bitmap_words;

  const int tile = block_x(), bh = block_y();
  const int b = bh / a.q_heads, hq = bh % a.q_heads, hkv = hq / a.group;
  const long long q0 = static_cast<long long>(tile) * kMmaTile;
  const long long q_last = q0 + kMmaTile - 1 < a.q_len - 1 ? q0 + kMmaTile - 1 : a.q_len - 1;
  const long long p_lo = q0 + a.offset, p_hi = q_last + a.offset;
  const T* Qm = static_cast<const T*>(a.q) + static_cast<long long>(bh) * a.q_len * a.dk;
  const long long kv_bh = static_cast<long long>(b) * a.kv_heads + hkv;
  const T* Km = static_cast<const T*>(a.k) + kv_bh * a.kv_len * a.dk;
  const T* Vm = static_cast<const T*>(a.v) + kv_bh * a.kv_len * a.dv;
  T* Ym = static_cast<T*>(a.y) + static_cast<long long>(bh) * a.q_len * a.dv;
  const bool* mask_row = a.mask ? a.mask + static_cast<long long>(b) * a.kv_len : nullptr;
  const T* bias = a.bias ? static_cast<const T*>(a.bias) + b * a.bias_stride[0] + hq * a.bias_stride[1] : nullptr;

  LoadTileAsync<T, kMmaTile, D, kLd, kMmaThreads>(Qs, Qm, q0, a.q_len, a.dk, 0, a.dk);
  cp_async_commit();
  const long long last_key = BuildVisit<kMmaTile, kMmaThreads>(a, p_lo, p_hi, visit, rnd);
  auto issue = [&](int t, int s) {
    T* Ks = KV + 2 * s * kMmaTile * kLd;
    const long long k0 = static_cast<long long>(t) * kMmaTile;
    LoadTileAsync<T, kMmaTile, D, kLd, kMmaThreads>(Ks, Km, k0, a.kv_len, a.dk, 0, a.dk);
    LoadTileAsync<T, kMmaTile, D, kLd, kMmaThreads>(Ks + kMmaTile * kLd, Vm, k0, a.kv_len, a.dv, 0, a.dv);
    cp_async_commit();
  };

  const int lane = lane_id(), w = warp_id(), g = lane >> 2, tq = lane & 3, r0 = 16 * w;
  float o[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
  float m0 = kNegInf, m1 = kNegInf, l0 = 0.f, l1 = 0.f;
  uint32_t qa[KS][4];
  bool have_q = false;
  int t = last_key >= 0 ? NextVisit(visit, a.bitmap_words, -1) : -1;
  if (t >= 0) issue(t, 0);
  int s = 0;
  const long long ia = q0 + r0 + g, ib = ia + 8;  // this lane's two rows
  while (t >= 0) {
    const int tn = NextVisit(visit, a.bitmap_words, t);
    cp_async_wait<0>();
    sync_block();  // tile t (and Q) landed; every warp is done with the other stage
    if (tn >= 0) issue(tn, s ^ 1);
    if (!have_q) {
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) ldmatrix_x4(qa[ks], Qs + (r0 + (lane & 15)) * kLd + 16 * ks + (lane >> 4) * 8);
      have_q = true;
    }
    const T* Ks = KV + 2 * s * kMmaTile * kLd;
    const T* Vs = Ks + kMmaTile * kLd;
    float sc[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
    for (int np = 0; np < 4; ++np) {
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        uint32_t kf[4];
        ldmatrix_x4(kf, Ks + (16 * np + ((lane >> 4) << 3) + (lane & 7)) * kLd + 16 * ks + ((lane >> 3) & 1) * 8);
        const uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
        mma_16816<T>(sc[2 * np], qa[ks], b0);
        mma_16816<T>(sc[2 * np + 1], qa[ks], b1);
      }
    }
    const long long k0 = static_cast<long long>(t) * kMmaTile;
    const bool inside = TileInside(a, p_lo, p_hi, k0, k0 + kMmaTile - 1, mask_row != nullptr);
    const bool random = TestBit(rnd, t);
    float mx0 = kNegInf, mx1 = kNegInf;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const long long i = e < 2 ? ia : ib;
        const long long j = k0 + 8 * nt + 2 * tq + (e & 1);
        float x = sc[nt][e] * a.scale_log2;
        if (bias && i < a.q_len && j < a.kv_len) {
          x += to_float<T>(bias[i * a.bias_stride[2] + j * a.bias_stride[3]]) * kLog2e;
        }
        if (!inside) {
          const bool ok = i < a.q_len && j < a.kv_len && (mask_row == nullptr || mask_row[j]) &&
                          InPattern(a, static_cast<int>(i + a.offset), static_cast<int>(j), random);
          if (!ok) x = kNegInf;
        }
        sc[nt][e] = x;
      }
      mx0 = fmax_(mx0, fmax_(sc[nt][0], sc[nt][1]));
      mx1 = fmax_(mx1, fmax_(sc[nt][2], sc[nt][3]));
    }
    mx0 = fmax_(mx0, shfl_xor(mx0, 1));
    mx0 = fmax_(mx0, shfl_xor(mx0, 2));
    mx1 = fmax_(mx1, shfl_xor(mx1, 1));
    mx1 = fmax_(mx1, shfl_xor(mx1, 2));
    const float n0 = fmax_(m0, mx0), n1 = fmax_(m1, mx1);
    const float u0 = n0 == kNegInf ? 0.f : n0, u1 = n1 == kNegInf ? 0.f : n1;  // rows with nothing yet
    const float alpha0 = exp2_fast(m0 - u0), alpha1 = exp2_fast(m1 - u1);
    m0 = n0;
    m1 = n1;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      sc[nt][0] = exp2_fast(sc[nt][0] - u0);
      sc[nt][1] = exp2_fast(sc[nt][1] - u0);
      sc[nt][2] = exp2_fast(sc[nt][2] - u1);
      sc[nt][3] = exp2_fast(sc[nt][3] - u1);
      sum0 += sc[nt][0] + sc[nt][1];
      sum1 += sc[nt][2] + sc[nt][3];
    }
    l0 = l0 * alpha0 + sum0;
    l1 = l1 * alpha1 + sum1;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      o[nt][0] *= alpha0;
      o[nt][1] *= alpha0;
      o[nt][2] *= alpha1;
      o[nt][3] *= alpha1;
    }
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
      const uint32_t pa[4] = {pack2<T>(sc[2 * kb][0], sc[2 * kb][1]), pack2<T>(sc[2 * kb][2], sc[2 * kb][3]),
                              pack2<T>(sc[2 * kb + 1][0], sc[2 * kb + 1][1]),
                              pack2<T>(sc[2 * kb + 1][2], sc[2 * kb + 1][3])};
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, Vs + (16 * kb + ((lane >> 3) & 1) * 8 + (lane & 7)) * kLd + 16 * np + ((lane >> 4) << 3));
        const uint32_t b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
        mma_16816<T>(o[2 * np], pa, b0);
        mma_16816<T>(o[2 * np + 1], pa, b1);
      }
    }
    t = tn;
    s ^= 1;
  }
  cp_async_wait<0>();  // (the Q copy, when no tile was visited)
  sync_block();
  l0 += shfl_xor(l0, 1);
  l0 += shfl_xor(l0, 2);
  l1 += shfl_xor(l1, 1);
  l1 += shfl_xor(l1, 2);
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;  // no visible key: 0
  T* stage = Qs;  // this warp's own rows of the Q tile
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    Store32(stage + (r0 + g) * kLd + 8 * nt + 2 * tq, pack2<T>(o[nt][0] * inv0, o[nt][1] * inv0));
    Store32(stage + (r0 + g + 8) * kLd + 8 * nt + 2 * tq, pack2<T>(o[nt][2] * inv1, o[nt][3] * inv1));
  }
  sync_warp();
  for (int idx = lane; idx < 16 * (D / 8); idx += 32) {
    const int rr = idx / (D / 8), c8 = (idx % (D / 8)) * 8;
    const long long i = q0 + r0 + rr;
    if (i < a.q_len && c8 < a.dv) Copy16(Ym + i * a.dv + c8, stage + (r0 + rr) * kLd + c8);
  }
}

// =====================================================================================================
// simt path: one warp, 32 query rows (lane = row), key tiles of 32, float32.
// =====================================================================================================
template <typename T>
AX_GLOBAL void AX_LAUNCH_BOUNDS(kSimtThreads) SparseSimt(const Args a) {
  const int ldk = a.dk + 1, ldv = a.dv + 1;
  float* Qs = reinterpret_cast<float*>(dynamic_smem());  // [32][dk+1], pre-scaled by scale * log2(e)
  float* Ks = Qs + kSimtTile * ldk;
  float* Vs = Ks + kSimtTile * ldk;  // [32][dv+1]
  float* Os = Vs + kSimtTile * ldv;
  uint32_t* visit = reinterpret_cast<uint32_t*>(Os + kSimtTile * ldv);
  uint32_t* rnd = visit + a.bitmap_words;

  const int tile = block_x(), bh = block_y(), lane = thread_x();
  const int b = bh / a.q_heads, hq = bh % a.q_heads, hkv = hq / a.group;
  const long long q0 = static_cast<long long>(tile) * kSimtTile;
  const long long q_last = q0 + kSimtTile - 1 < a.q_len - 1 ? q0 + kSimtTile - 1 : a.q_len - 1;
  const long long p_lo = q0 + a.offset, p_hi = q_last + a.offset;
  const T* Qm = static_cast<const T*>(a.q) + static_cast<long long>(bh) * a.q_len * a.dk;
  const long long kv_bh = static_cast<long long>(b) * a.kv_heads + hkv;
  const T* Km = static_cast<const T*>(a.k) + kv_bh * a.kv_len * a.dk;
  const T* Vm = static_cast<const T*>(a.v) + kv_bh * a.kv_len * a.dv;
  T* Ym = static_cast<T*>(a.y) + static_cast<long long>(bh) * a.q_len * a.dv;
  const bool* mask_row = a.mask ? a.mask + static_cast<long long>(b) * a.kv_len : nullptr;
  const T* bias = a.bias ? static_cast<const T*>(a.bias) + b * a.bias_stride[0] + hq * a.bias_stride[1] : nullptr;

  for (int idx = lane; idx < kSimtTile * a.dk; idx += kSimtThreads) {
    const int r = idx / a.dk, d = idx % a.dk;
    const long long i = q0 + r;
    Qs[r * ldk + d] = i < a.q_len ? to_float<T>(Qm[i * a.dk + d]) * a.scale_log2 : 0.f;
  }
  for (int idx = lane; idx < kSimtTile * ldv; idx += kSimtThreads) Os[idx] = 0.f;
  const long long last_key = BuildVisit<kSimtTile, kSimtThreads>(a, p_lo, p_hi, visit, rnd);
  const long long i = q0 + lane, p = i + a.offset;
  const bool row_ok = i < a.q_len;
  float m = kNegInf, l = 0.f;
  for (int t = last_key >= 0 ? NextVisit(visit, a.bitmap_words, -1) : -1; t >= 0;
       t = NextVisit(visit, a.bitmap_words, t)) {
    const long long k0 = static_cast<long long>(t) * kSimtTile;
    sync_block();
    for (int idx = lane; idx < kSimtTile * a.dk; idx += kSimtThreads) {
      const int r = idx / a.dk, d = idx % a.dk;
      Ks[r * ldk + d] = k0 + r < a.kv_len ? to_float<T>(Km[(k0 + r) * a.dk + d]) : 0.f;
    }
    for (int idx = lane; idx < kSimtTile * a.dv; idx += kSimtThreads) {
      const int r = idx / a.dv, e = idx % a.dv;
      Vs[r * ldv + e] = k0 + r < a.kv_len ? to_float<T>(Vm[(k0 + r) * a.dv + e]) : 0.f;
    }
    sync_block();
    float sc[kSimtTile];
#pragma unroll
    for (int jj = 0; jj < kSimtTile; ++jj) sc[jj] = 0.f;
    for (int d = 0; d < a.dk; ++d) {
      const float qd = Qs[lane * ldk + d];
#pragma unroll
      for (int jj = 0; jj < kSimtTile; ++jj) sc[jj] += qd * Ks[jj * ldk + d];
    }
    const bool inside = TileInside(a, p_lo, p_hi, k0, k0 + kSimtTile - 1, mask_row != nullptr);
    const bool random = TestBit(rnd, t);
    float mx = kNegInf;
#pragma unroll
    for (int jj = 0; jj < kSimtTile; ++jj) {
      const long long j = k0 + jj;
      float x = sc[jj];
      if (bias && row_ok && j < a.kv_len) x += to_float<T>(bias[i * a.bias_stride[2] + j * a.bias_stride[3]]) * kLog2e;
      if (!inside && !(row_ok && j < a.kv_len && (mask_row == nullptr || mask_row[j]) && InPattern(a, static_cast<int>(p), static_cast<int>(j), random))) {
        x = kNegInf;
      }
      sc[jj] = x;
      mx = fmax_(mx, x);
    }
    const float n = fmax_(m, mx), u = n == kNegInf ? 0.f : n;
    const float alpha = exp2_fast(m - u);
    m = n;
    float sum = 0.f;
#pragma unroll
    for (int jj = 0; jj < kSimtTile; ++jj) {
      sc[jj] = exp2_fast(sc[jj] - u);
      sum += sc[jj];
    }
    l = l * alpha + sum;
    for (int e = 0; e < a.dv; ++e) {
      float acc = Os[lane * ldv + e] * alpha;
#pragma unroll
      for (int jj = 0; jj < kSimtTile; ++jj) acc += sc[jj] * Vs[jj * ldv + e];
      Os[lane * ldv + e] = acc;
    }
  }
  if (row_ok) {
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int e = 0; e < a.dv; ++e) Ym[i * a.dv + e] = from_float<T>(Os[lane * ldv + e] * inv);
  }
}

}  // namespace attnexport::cuda::sp
