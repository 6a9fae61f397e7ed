// LinearAttention CUDA kernels (see linear_attention.h for the algorithm and the state layout).
// Written against cuda/common/device.cuh only, so the host emulator runs this very code.
#pragma once
#include "cuda/common/device.cuh"
#include "cuda/common/tiles.cuh"
#include "cuda/kernels/linear_attention.h"

namespace attnexport::cuda::la {

using namespace ::attnexport::cuda::dev;

// φ(x̃): elu(x̃) + 1 or relu(x̃).
AX_HD float Feature(float x, int relu) {
  if (relu) return x > 0.f ? x : 0.f;
  return x > 0.f ? x + 1.f : exp_accurate(x);
}

// Can row j of the keys be seen at all (inside the sequence, not padded)?
AX_DEVICE bool KeyVisible(const Args& a, const bool* mask_row, long long j) {
  return j < a.kv_len && (mask_row == nullptr || mask_row[j]);
}

// φ(root·x) in place on a ROWS x COLS tile of a 16-bit type; rows with !row_ok(r) and columns
// >= ncols (a multiple of 8) become 0 (φ(0) is 1 for elu + 1, so padding must be cleared here).
template <typename T, int ROWS, int COLS, int LD, int THREADS, typename RowOk>
AX_DEVICE void FeatureTile(T* tile, int ncols, float root, int relu, RowOk row_ok) {
  constexpr int kVec = COLS / 8;
  for (int i = thread_x(); i < ROWS * kVec; i += THREADS) {
    const int r = i / kVec, c = (i % kVec) * 8;
    T* p = tile + r * LD + c;
    alignas(16) T v[8];
    if (c < ncols && row_ok(r)) {
      Copy16(v, p);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = from_float<T>(Feature(root * to_float<T>(v[e]), relu));
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = from_float<T>(0.f);
    }
    Copy16(p, v);
  }
}

// Start of the state slot of (batch b, kv head h, slot s).
AX_DEVICE float* StateSlot(const Args& a, int b, int h, int slot) {
  return a.states + ((static_cast<long long>(b) * a.kv_heads + h) * a.segments + slot) * a.state_stride;
}

// =====================================================================================================
// mma path: float16 / bfloat16 inputs, 64-row chunks, 4 warps; warp w owns rows 16w..16w+15 of a tile.
// =====================================================================================================
template <int DK>
struct MmaLayout {
  static constexpr int kLdQ = DK + 8;          // Q and K tile rows (elements): 16-byte padding
  static constexpr int kLdV = kMmaDvTile + 8;  // V tile rows
  static constexpr int kLdS = DK + 8;          // St rows (floats): 8 mod 32 words, so the float2 reads
                                               // of 8 rows x 4 lanes take the minimum 2 wavefronts
  static constexpr int kQ = 0;
  static constexpr int kK = kMmaChunk * kLdQ;
  static constexpr int kV = 2 * kMmaChunk * kLdQ;
  static constexpr int kCausalStage = 2 * kMmaChunk * kLdQ + kMmaChunk * kLdV;  // elements
  static constexpr int kQueryStage = kMmaChunk * kLdQ;
  static constexpr int kKeyStage = kMmaChunk * kLdQ + kMmaChunk * kLdV;
};

// Loads the state of this block's dv tile into St [64][kLdS] and z [DK] (zeros when `slot` is null).
template <int DK>
AX_DEVICE void LoadStateMma(const Args& a, const float* slot, int dv0, float* St, float* z) {
  constexpr int kLdS = MmaLayout<DK>::kLdS;
  for (int i = thread_x(); i < kMmaDvTile * DK; i += kThreads) {
    const int e = i / DK, d = i % DK;
    St[e * kLdS + d] = slot ? slot[static_cast<long long>(dv0 + e) * a.dkp + d] : 0.f;
  }
  for (int d = thread_x(); d < DK; d += kThreads) z[d] = slot ? slot[static_cast<long long>(a.dvp) * a.dkp + d] : 0.f;
}

// ΔSᵀ += Vᵀ φ(K̃) over the 64 keys of a chunk, for this warp's 16 rows of the dv tile:
// ds[nt] holds St rows 16w+g (+8), columns 8nt + 2t (+1).
template <typename T, int DK>
AX_DEVICE void StateUpdateMma(const T* Ks, const T* Vs, float (&ds)[DK / 8][4]) {
  constexpr int kLdQ = MmaLayout<DK>::kLdQ, kLdV = MmaLayout<DK>::kLdV;
  const int lane = lane_id(), w = warp_id();
#pragma unroll
  for (int kb = 0; kb < kMmaChunk / 16; ++kb) {
    // A = Vᵀ (m = dv, k = key) from V [key][dv] by transposed loads: matrices (keys 0-7 | 8-15) x (dv 0-7 | 8-15).
    uint32_t va[4];
    ldmatrix_x4_trans(va, Vs + (16 * kb + ((lane >> 4) << 3) + (lane & 7)) * kLdV + 16 * w + ((lane >> 3) & 1) * 8);
#pragma unroll
    for (int np = 0; np < DK / 16; ++np) {
      // B = φK (k = key, n = d) from K [key][d] by transposed loads.
      uint32_t kf[4];
      ldmatrix_x4_trans(kf, Ks + (16 * kb + ((lane >> 3) & 1) * 8 + (lane & 7)) * kLdQ + 16 * np + ((lane >> 4) << 3));
      const uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
      mma_16816<T>(ds[2 * np], va, b0);
      mma_16816<T>(ds[2 * np + 1], va, b1);
    }
  }
}

// Column sums of φK over a chunk (thread d < DK), float32.
template <typename T, int DK>
AX_DEVICE float ColumnSumMma(const T* Ks) {
  constexpr int kLdQ = MmaLayout<DK>::kLdQ;
  float s = 0.f;
  const int d = thread_x();
  if (d < DK) {
    for (int r = 0; r < kMmaChunk; ++r) s += to_float<T>(Ks[r * kLdQ + d]);
  }
  return s;
}

// One query tile of 64 rows (this warp's 16): y = (φQ St + P V) / (φQ·z + Σ P + eps), where P is the
// causal lower triangle of φQ φKᵀ over this chunk (INTRA) or absent. Writes the valid rows of y.
template <typename T, int DK, bool INTRA>
AX_DEVICE void QueryTileMma(const Args& a, T* Qs, const T* Ks, const T* Vs, const float* St, const float* z,
                            T* Ym, long long q0, int dv0) {
  constexpr int kLdQ = MmaLayout<DK>::kLdQ, kLdV = MmaLayout<DK>::kLdV, kLdS = MmaLayout<DK>::kLdS;
  constexpr int KS = DK / 16;
  const int lane = lane_id(), w = warp_id(), g = lane >> 2, t = lane & 3;
  const int r0 = 16 * w;
  if (q0 + r0 >= a.q_len || q0 + r0 + 16 <= 0) return;  // no valid row in this warp (warp-uniform)

  // φQ as m16n8k16 A fragments: a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..) of each 16 columns.
  uint32_t qa[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) ldmatrix_x4(qa[ks], Qs + (r0 + (lane & 15)) * kLdQ + 16 * ks + (lane >> 4) * 8);

  float acc[8][4];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
  float den0 = 0.f, den1 = 0.f;  // rows g and g+8, this lane's share

  // Inter-chunk part φQ St on tf32 tensor cores. The k order inside each 8 columns is permuted so a
  // lane's A values are the two 16-bit halves it already holds: k' = t is column 2t, k' = t+4 is 2t+1;
  // B then is St[n = g][2t], St[g][2t+1], one float2 (values from 16-bit inputs are exact in tf32).
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int kc = 16 * ks + 8 * h + 2 * t;
      const F2 xg = Unpack2<T>(qa[ks][2 * h]), xg8 = Unpack2<T>(qa[ks][2 * h + 1]);
      const uint32_t af[4] = {FloatBits(xg.x), FloatBits(xg8.x), FloatBits(xg.y), FloatBits(xg8.y)};
      const F2 zz = Load2(z + kc);
      den0 += xg.x * zz.x + xg.y * zz.y;
      den1 += xg8.x * zz.x + xg8.y * zz.y;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const F2 sv = Load2(St + (8 * nt + g) * kLdS + kc);
        const uint32_t bf[2] = {to_tf32(sv.x), to_tf32(sv.y)};
        mma_1688_tf32(acc[nt], af, bf);
      }
    }
  }

  float inv_f = 1.f;
  if constexpr (INTRA) {
    // Scores of this chunk: P = φQ φKᵀ, keys 16np..16np+15 only where some row of the warp sees them.
    float sc[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      if (np <= w) {
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
          uint32_t kf[4];  // B = φKᵀ (k = d, n = key) from K [key][d]: matrices (keys 0-7 | 8-15) x (d 0-7 | 8-15)
          ldmatrix_x4(kf, Ks + (16 * np + ((lane >> 4) << 3) + (lane & 7)) * kLdQ + 16 * ks + ((lane >> 3) & 1) * 8);
          const uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
          mma_16816<T>(sc[2 * np], qa[ks], b0);
          mma_16816<T>(sc[2 * np + 1], qa[ks], b1);
        }
      }
    }
    // Causal: row r (tile-local) sees chunk-local keys j <= r. Row sums go to the denominator.
    float mx = 0.f;
    const int ra = r0 + g, rb = r0 + g + 8;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const int j = 8 * nt + 2 * t;
      sc[nt][0] = j <= ra ? sc[nt][0] : 0.f;
      sc[nt][1] = j + 1 <= ra ? sc[nt][1] : 0.f;
      sc[nt][2] = j <= rb ? sc[nt][2] : 0.f;
      sc[nt][3] = j + 1 <= rb ? sc[nt][3] : 0.f;
      den0 += sc[nt][0] + sc[nt][1];
      den1 += sc[nt][2] + sc[nt][3];
      mx = fmax_(mx, fmax_(fmax_(sc[nt][0], sc[nt][1]), fmax_(sc[nt][2], sc[nt][3])));
    }
    // P goes through 16-bit operands: scale the warp's P down (never up) so it cannot overflow float16.
    mx = fmax_(mx, shfl_xor(mx, 16));
    mx = fmax_(mx, shfl_xor(mx, 8));
    mx = fmax_(mx, shfl_xor(mx, 4));
    mx = fmax_(mx, shfl_xor(mx, 2));
    mx = fmax_(mx, shfl_xor(mx, 1));
    const float f = mx > 16384.f ? 16384.f / mx : 1.f;
    inv_f = 1.f / f;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      acc[nt][0] *= f;
      acc[nt][1] *= f;
      acc[nt][2] *= f;
      acc[nt][3] *= f;
    }
    // P as A fragments (the accumulator layout of two n-tiles is the A layout of one k16 block).
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
      if (kb <= w) {
        const uint32_t pa[4] = {pack2<T>(sc[2 * kb][0] * f, sc[2 * kb][1] * f),
                                pack2<T>(sc[2 * kb][2] * f, sc[2 * kb][3] * f),
                                pack2<T>(sc[2 * kb + 1][0] * f, sc[2 * kb + 1][1] * f),
                                pack2<T>(sc[2 * kb + 1][2] * f, sc[2 * kb + 1][3] * f)};
#pragma unroll
        for (int np = 0; np < kMmaDvTile / 16; ++np) {
          uint32_t vf[4];  // B = V (k = key, n = dv) by transposed loads
          ldmatrix_x4_trans(vf, Vs + (16 * kb + ((lane >> 3) & 1) * 8 + (lane & 7)) * kLdV + 16 * np + ((lane >> 4) << 3));
          const uint32_t b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
          mma_16816<T>(acc[2 * np], pa, b0);
          mma_16816<T>(acc[2 * np + 1], pa, b1);
        }
      }
    }
  } else {
    (void)Ks;
    (void)Vs;
  }

  // Denominators: the four lanes of a quad hold parts of the same two rows.
  den0 += shfl_xor(den0, 1);
  den0 += shfl_xor(den0, 2);
  den1 += shfl_xor(den1, 1);
  den1 += shfl_xor(den1, 2);
  den0 += a.eps;
  den1 += a.eps;
  const float s0 = den0 > 0.f ? inv_f / den0 : 0.f;  // a row without weight (and eps = 0) gives 0
  const float s1 = den1 > 0.f ? inv_f / den1 : 0.f;

  // Stage the warp's 16 output rows in its own (no longer needed) Q rows, then 16-byte stores.
  sync_warp();
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    Store32(Qs + (r0 + g) * kLdQ + 8 * nt + 2 * t, pack2<T>(acc[nt][0] * s0, acc[nt][1] * s0));
    Store32(Qs + (r0 + g + 8) * kLdQ + 8 * nt + 2 * t, pack2<T>(acc[nt][2] * s1, acc[nt][3] * s1));
  }
  sync_warp();
  for (int i = lane; i < 16 * (kMmaDvTile / 8); i += 32) {
    const int rr = i / (kMmaDvTile / 8), c8 = (i % (kMmaDvTile / 8)) * 8;
    const long long qi = q0 + r0 + rr;
    if (qi >= 0 && qi < a.q_len && dv0 + c8 < a.dv) {
      Copy16(Ym + qi * a.dv + dv0 + c8, Qs + (r0 + rr) * kLdQ + c8);
    }
  }
}

// Kernel 1 (mma): state of each segment of keys -> slot `segment` of its head.
// grid (segments, dv tiles, batch * kv heads)
template <typename T, int DK>
AX_GLOBAL void AX_LAUNCH_BOUNDS(kThreads) LaKeysMma(const Args a) {
  using L = MmaLayout<DK>;
  T* stages = reinterpret_cast<T*>(dynamic_smem());
  const int seg = block_x(), dvt = block_y(), bh = block_z();
  const int b = bh / a.kv_heads;
  const int dv0 = dvt * kMmaDvTile;
  const int c_begin = seg * a.chunks_per_seg;
  const int c_end = c_begin + a.chunks_per_seg < a.chunks ? c_begin + a.chunks_per_seg : a.chunks;
  const T* Km = static_cast<const T*>(a.k) + static_cast<long long>(bh) * a.kv_len * a.dk;
  const T* Vm = static_cast<const T*>(a.v) + static_cast<long long>(bh) * a.kv_len * a.dv;
  const bool* mask_row = a.mask ? a.mask + static_cast<long long>(b) * a.kv_len : nullptr;

  auto issue = [&](int c, int s) {
    T* base = stages + s * L::kKeyStage;
    const long long k0 = static_cast<long long>(c) * kMmaChunk;
    LoadTileAsync<T, kMmaChunk, DK, L::kLdQ, kThreads>(base, Km, k0, a.kv_len, a.dk, 0, a.dk);
    LoadTileAsync<T, kMmaChunk, kMmaDvTile, L::kLdV, kThreads>(base + kMmaChunk * L::kLdQ, Vm, k0, a.kv_len, a.dv, dv0, a.dv);
    cp_async_commit();
  };

  float ds[DK / 8][4];
#pragma unroll
  for (int nt = 0; nt < DK / 8; ++nt) ds[nt][0] = ds[nt][1] = ds[nt][2] = ds[nt][3] = 0.f;
  float dz = 0.f;
  if (c_begin < c_end) issue(c_begin, 0);
  for (int c = c_begin; c < c_end; ++c) {
    const int s = (c - c_begin) & 1;
    cp_async_wait<0>();
    sync_block();
    if (c + 1 < c_end) issue(c + 1, s ^ 1);
    T* Ks = stages + s * L::kKeyStage;
    T* Vs = Ks + kMmaChunk * L::kLdQ;
    const long long k0 = static_cast<long long>(c) * kMmaChunk;
    auto key_ok = [&](int r) { return KeyVisible(a, mask_row, k0 + r); };
    FeatureTile<T, kMmaChunk, DK, L::kLdQ, kThreads>(Ks, a.dk, a.root, a.relu, key_ok);
    if (mask_row) ZeroRows<T, kMmaChunk, kMmaDvTile, L::kLdV, kThreads>(Vs, key_ok);
    sync_block();
    StateUpdateMma<T, DK>(Ks, Vs, ds);
    dz += ColumnSumMma<T, DK>(Ks);
  }
  float* out = a.states + (static_cast<long long>(bh) * a.segments + seg) * a.state_stride;
  const int lane = lane_id(), w = warp_id(), g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < DK / 8; ++nt) {
    Store2(out + static_cast<long long>(dv0 + 16 * w + g) * a.dkp + 8 * nt + 2 * t, ds[nt][0], ds[nt][1]);
    Store2(out + static_cast<long long>(dv0 + 16 * w + g + 8) * a.dkp + 8 * nt + 2 * t, ds[nt][2], ds[nt][3]);
  }
  if (dvt == 0 && thread_x() < DK) out[static_cast<long long>(a.dvp) * a.dkp + thread_x()] = dz;
}

// Kernel 3, non-causal (mma): y = φQ S / (φQ·z + eps) for the query tiles of a segment.
// grid (query segments, dv tiles, batch * q heads)
template <typename T, int DK>
AX_GLOBAL void AX_LAUNCH_BOUNDS(kThreads) LaQueryMma(const Args a) {
  using L = MmaLayout<DK>;
  T* stages = reinterpret_cast<T*>(dynamic_smem());
  float* St = reinterpret_cast<float*>(stages + 2 * L::kQueryStage);
  float* z = St + kMmaDvTile * L::kLdS;
  const int seg = block_x(), dvt = block_y(), bh = block_z();
  const int b = bh / a.q_heads, hq = bh % a.q_heads, hkv = hq / a.group;
  const int dv0 = dvt * kMmaDvTile;
  const int t_begin = seg * a.q_tiles_per_seg;
  const int t_end = t_begin + a.q_tiles_per_seg < a.q_tiles ? t_begin + a.q_tiles_per_seg : a.q_tiles;
  const T* Qm = static_cast<const T*>(a.q) + static_cast<long long>(bh) * a.q_len * a.dk;
  T* Ym = static_cast<T*>(a.y) + static_cast<long long>(bh) * a.q_len * a.dv;

  LoadStateMma<DK>(a, StateSlot(a, b, hkv, a.segments - 1), dv0, St, z);
  auto issue = [&](int tile, int s) {
    LoadTileAsync<T, kMmaChunk, DK, L::kLdQ, kThreads>(stages + s * L::kQueryStage, Qm,
                                                      static_cast<long long>(tile) * kMmaChunk, a.q_len, a.dk, 0, a.dk);
    cp_async_commit();
  };
  if (t_begin < t_end) issue(t_begin, 0);
  for (int tile = t_begin; tile < t_end; ++tile) {
    const int s = (tile - t_begin) & 1;
    cp_async_wait<0>();
    sync_block();  // this tile landed; every warp is done with the previous one (and St is loaded)
    if (tile + 1 < t_end) issue(tile + 1, s ^ 1);
    T* Qs = stages + s * L::kQueryStage;
    const long long q0 = static_cast<long long>(tile) * kMmaChunk;
    FeatureTile<T, kMmaChunk, DK, L::kLdQ, kThreads>(Qs, a.dk, a.root, a.relu,
                                                     [&](int r) { return q0 + r < a.q_len; });
    sync_block();
    QueryTileMma<T, DK, false>(a, Qs, nullptr, nullptr, St, z, Ym, q0, dv0);
  }
}

// Kernel 3, causal (mma): the chunks of a segment in order, carrying the state.
// grid (segments, dv tiles, batch * q heads)
template <typename T, int DK>
AX_GLOBAL void AX_LAUNCH_BOUNDS(kThreads) LaCausalMma(const Args a) {
  using L = MmaLayout<DK>;
  T* stages = reinterpret_cast<T*>(dynamic_smem());
  float* St = reinterpret_cast<float*>(stages + 2 * L::kCausalStage);
  float* z = St + kMmaDvTile * L::kLdS;
  const int seg = block_x(), dvt = block_y(), bh = block_z();
  const int b = bh / a.q_heads, hq = bh % a.q_heads, hkv = hq / a.group;
  const int dv0 = dvt * kMmaDvTile;
  const int c_begin = seg * a.chunks_per_seg;
  const int c_end = c_begin + a.chunks_per_seg < a.chunks ? c_begin + a.chunks_per_seg : a.chunks;
  // Query i sees keys j <= i + offset: its chunk is (i + offset) / 64. The first chunk with queries:
  const int first_q_chunk = a.offset > 0 ? a.offset / kMmaChunk : 0;
  if (c_end <= first_q_chunk || c_begin >= c_end) return;  // whole block: no query here

  const T* Qm = static_cast<const T*>(a.q) + static_cast<long long>(bh) * a.q_len * a.dk;
  const long long kv_bh = static_cast<long long>(b) * a.kv_heads + hkv;
  const T* Km = static_cast<const T*>(a.k) + kv_bh * a.kv_len * a.dk;
  const T* Vm = static_cast<const T*>(a.v) + kv_bh * a.kv_len * a.dv;
  T* Ym = static_cast<T*>(a.y) + static_cast<long long>(bh) * a.q_len * a.dv;
  const bool* mask_row = a.mask ? a.mask + static_cast<long long>(b) * a.kv_len : nullptr;

  LoadStateMma<DK>(a, seg > 0 ? StateSlot(a, b, hkv, seg - 1) : nullptr, dv0, St, z);
  auto issue = [&](int c, int s) {
    T* base = stages + s * L::kCausalStage;
    const long long k0 = static_cast<long long>(c) * kMmaChunk;
    LoadTileAsync<T, kMmaChunk, DK, L::kLdQ, kThreads>(base + L::kQ, Qm, k0 - a.offset, a.q_len, a.dk, 0, a.dk);
    LoadTileAsync<T, kMmaChunk, DK, L::kLdQ, kThreads>(base + L::kK, Km, k0, a.kv_len, a.dk, 0, a.dk);
    LoadTileAsync<T, kMmaChunk, kMmaDvTile, L::kLdV, kThreads>(base + L::kV, Vm, k0, a.kv_len, a.dv, dv0, a.dv);
    cp_async_commit();
  };
  issue(c_begin, 0);
  const int lane = lane_id(), w = warp_id(), g = lane >> 2, t = lane & 3;
  for (int c = c_begin; c < c_end; ++c) {
    const int s = (c - c_begin) & 1;
    cp_async_wait<0>();
    sync_block();  // (A) chunk c landed; the previous chunk is finished everywhere
    if (c + 1 < c_end) issue(c + 1, s ^ 1);
    T* Qs = stages + s * L::kCausalStage + L::kQ;
    T* Ks = stages + s * L::kCausalStage + L::kK;
    T* Vs = stages + s * L::kCausalStage + L::kV;
    const long long k0 = static_cast<long long>(c) * kMmaChunk;
    const long long q0 = k0 - a.offset;  // query of tile row 0 (its last visible key is k0)
    const bool has_q = q0 < a.q_len && q0 + kMmaChunk > 0;
    const bool last = c + 1 == c_end;  // the state after the segment's last chunk is not needed here
    auto key_ok = [&](int r) { return KeyVisible(a, mask_row, k0 + r); };
    if (has_q) {
      FeatureTile<T, kMmaChunk, DK, L::kLdQ, kThreads>(Qs, a.dk, a.root, a.relu, [&](int r) {
        return q0 + r >= 0 && q0 + r < a.q_len;
      });
    }
    FeatureTile<T, kMmaChunk, DK, L::kLdQ, kThreads>(Ks, a.dk, a.root, a.relu, key_ok);
    if (mask_row) ZeroRows<T, kMmaChunk, kMmaDvTile, L::kLdV, kThreads>(Vs, key_ok);
    sync_block();  // (B)
    if (has_q) QueryTileMma<T, DK, true>(a, Qs, Ks, Vs, St, z, Ym, q0, dv0);
    if (!last) {
      float ds[DK / 8][4];
#pragma unroll
      for (int nt = 0; nt < DK / 8; ++nt) ds[nt][0] = ds[nt][1] = ds[nt][2] = ds[nt][3] = 0.f;
      StateUpdateMma<T, DK>(Ks, Vs, ds);
      const float dz = ColumnSumMma<T, DK>(Ks);
      sync_block();  // (C) every warp has read St and z for this chunk
      float* row_a = St + (16 * w + g) * L::kLdS;
      float* row_b = St + (16 * w + g + 8) * L::kLdS;
#pragma unroll
      for (int nt = 0; nt < DK / 8; ++nt) {
        Add2(row_a + 8 * nt + 2 * t, ds[nt][0], ds[nt][1]);
        Add2(row_b + 8 * nt + 2 * t, ds[nt][2], ds[nt][3]);
      }
      if (thread_x() < DK) z[thread_x()] += dz;
    }
  }
}

// Kernel 2: inclusive scan over the first `count` slots of every head (in place).
// grid (ceil(stride / 256), batch * kv heads), 256 threads
AX_GLOBAL void AX_LAUNCH_BOUNDS(256) LaScan(float* states, int count, int slots, long long stride) {
  const long long e = static_cast<long long>(block_x()) * 256 + thread_x();
  if (e >= stride) return;
  float* base = states + static_cast<long long>(block_y()) * slots * stride + e;
  float run = 0.f;
  for (int s = 0; s < count; ++s) {
    run += base[s * stride];
    base[s * stride] = run;
  }
}

// =====================================================================================================
// simt path: float32 math on CUDA cores, any dk <= 256, any dv; 32-row chunks, dv tiles of 32.
// Shared: φQ [32][dk+1], St [32][dk+1], z [dk] (+ causal: φK [32][dk+1], V [32][33], A [32][33]).
// =====================================================================================================
struct SimtLayout {
  int ld;  // dk + 1
  float* phiq;
  float* st;
  float* z;
  float* phik;
  float* vt;
  float* at;
  AX_DEVICE SimtLayout(int dk, bool causal, char* smem) {
    ld = dk + 1;
    float* p = reinterpret_cast<float*>(smem);
    phiq = p;
    p += kSimtChunk * ld;
    st = p;
    p += kSimtDvTile * ld;
    z = p;
    p += dk;
    phik = vt = at = nullptr;
    if (causal) {
      phik = p;
      p += kSimtChunk * ld;
      vt = p;
      p += kSimtChunk * (kSimtDvTile + 1);
      at = p;
    }
  }
};

template <typename T>
AX_DEVICE void LoadFeaturesSimt(const Args& a, const T* mat, long long row0, float* out, int ld,
                                const bool* mask_row, bool keys) {
  for (int i = thread_x(); i < kSimtChunk * a.dk; i += kThreads) {
    const int r = i / a.dk, d = i % a.dk;
    const long long row = row0 + r;
    const bool ok = keys ? KeyVisible(a, mask_row, row) : (row >= 0 && row < a.q_len);
    out[r * ld + d] = ok ? Feature(a.root * to_float<T>(mat[row * a.dk + d]), a.relu) : 0.f;
  }
}

template <typename T>
AX_DEVICE void LoadValuesSimt(const Args& a, const T* Vm, long long k0, int dv0, float* vt, const bool* mask_row) {
  for (int i = thread_x(); i < kSimtChunk * kSimtDvTile; i += kThreads) {
    const int r = i / kSimtDvTile, e = i % kSimtDvTile;
    const long long j = k0 + r;
    const bool ok = KeyVisible(a, mask_row, j) && dv0 + e < a.dv;
    vt[r * (kSimtDvTile + 1) + e] = ok ? to_float<T>(Vm[j * a.dv + dv0 + e]) : 0.f;
  }
}

// St[e][d] += Σ_j φK[j][d] V[j][e]; z[d] += Σ_j φK[j][d].
AX_DEVICE void StateUpdateSimt(const Args& a, const SimtLayout& L, const float* phik, const float* vt) {
  for (int i = thread_x(); i < kSimtDvTile * a.dk; i += kThreads) {
    const int e = i / a.dk, d = i % a.dk;
    float s = 0.f;
    for (int j = 0; j < kSimtChunk; ++j) s += phik[j * L.ld + d] * vt[j * (kSimtDvTile + 1) + e];
    L.st[e * L.ld + d] += s;
  }
  for (int d = thread_x(); d < a.dk; d += kThreads) {
    float s = 0.f;
    for (int j = 0; j < kSimtChunk; ++j) s += phik[j * L.ld + d];
    L.z[d] += s;
  }
}

// y rows of a 32-row tile: thread (r = tid / 4, columns 8(tid % 4) .. +7 of the dv tile).
template <typename T, bool INTRA>
AX_DEVICE void QueryTileSimt(const Args& a, const SimtLayout& L, T* Ym, long long q0, int dv0) {
  const int tid = thread_x(), r = tid >> 2, eg = tid & 3;
  float num[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  float den = 0.f;
  const float* q = L.phiq + r * L.ld;
  for (int d = 0; d < a.dk; ++d) {
    const float x = q[d];
#pragma unroll
    for (int e = 0; e < 8; ++e) num[e] += x * L.st[(8 * eg + e) * L.ld + d];
    if ((d & 3) == eg) den += x * L.z[d];
  }
  if constexpr (INTRA) {
    const float* arow = L.at + r * (kSimtChunk + 1);
    for (int j = 0; j <= r; ++j) {
      const float w = arow[j];
#pragma unroll
      for (int e = 0; e < 8; ++e) num[e] += w * L.vt[j * (kSimtDvTile + 1) + 8 * eg + e];
      if ((j & 3) == eg) den += w;
    }
  }
  den += shfl_xor(den, 1);
  den += shfl_xor(den, 2);
  den += a.eps;
  const float inv = den > 0.f ? 1.f / den : 0.f;
  const long long qi = q0 + r;
  if (qi >= 0 && qi < a.q_len) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int col = dv0 + 8 * eg + e;
      if (col < a.dv) Ym[qi * a.dv + col] = from_float<T>(num[e] * inv);
    }
  }
}

template <typename T>
AX_GLOBAL void AX_LAUNCH_BOUNDS(kThreads) LaKeysSimt(const Args a) {
  SimtLayout L(a.dk, /*causal=*/true, dynamic_smem());  // φK, V in the causal slots; St accumulates
  const int seg = block_x(), dvt = block_y(), bh = block_z();
  const int b = bh / a.kv_heads;
  const int dv0 = dvt * kSimtDvTile;
  const int c_begin = seg * a.chunks_per_seg;
  const int c_end = c_begin + a.chunks_per_seg < a.chunks ? c_begin + a.chunks_per_seg : a.chunks;
  const T* Km = static_cast<const T*>(a.k) + static_cast<long long>(bh) * a.kv_len * a.dk;
  const T* Vm = static_cast<const T*>(a.v) + static_cast<long long>(bh) * a.kv_len * a.dv;
  const bool* mask_row = a.mask ? a.mask + static_cast<long long>(b) * a.kv_len : nullptr;
  for (int i = thread_x(); i < kSimtDvTile * L.ld; i += kThreads) L.st[i] = 0.f;
  for (int d = thread_x(); d < a.dk; d += kThreads) L.z[d] = 0.f;
  for (int c = c_begin; c < c_end; ++c) {
    const long long k0 = static_cast<long long>(c) * kSimtChunk;
    sync_block();
    LoadFeaturesSimt<T>(a, Km, k0, L.phik, L.ld, mask_row, true);
    LoadValuesSimt<T>(a, Vm, k0, dv0, L.vt, mask_row);
    sync_block();
    StateUpdateSimt(a, L, L.phik, L.vt);
  }
  sync_block();
  float* out = a.states + (static_cast<long long>(bh) * a.segments + seg) * a.state_stride;
  for (int i = thread_x(); i < kSimtDvTile * a.dk; i += kThreads) {
    const int e = i / a.dk, d = i % a.dk;
    out[static_cast<long long>(dv0 + e) * a.dkp + d] = L.st[e * L.ld + d];
  }
  if (dvt == 0) {
    for (int d = thread_x(); d < a.dk; d += kThreads) out[static_cast<long long>(a.dvp) * a.dkp + d] = L.z[d];
  }
}

template <typename T>
AX_DEVICE void LoadStateSimt(const Args& a, const SimtLayout& L, const float* slot, int dv0) {
  for (int i = thread_x(); i < kSimtDvTile * a.dk; i += kThreads) {
    const int e = i / a.dk, d = i % a.dk;
    L.st[e * L.ld + d] = slot ? slot[static_cast<long long>(dv0 + e) * a.dkp + d] : 0.f;
  }
  for (int d = thread_x(); d < a.dk; d += kThreads) L.z[d] = slot ? slot[static_cast<long long>(a.dvp) * a.dkp + d] : 0.f;
}

template <typename T>
AX_GLOBAL void AX_LAUNCH_BOUNDS(kThreads) LaQuerySimt(const Args a) {
  SimtLayout L(a.dk, /*causal=*/false, dynamic_smem());
  const int seg = block_x(), dvt = block_y(), bh = block_z();
  const int b = bh / a.q_heads, hq = bh % a.q_heads, hkv = hq / a.group;
  const int dv0 = dvt * kSimtDvTile;
  const int t_begin = seg * a.q_tiles_per_seg;
  const int t_end = t_begin + a.q_tiles_per_seg < a.q_tiles ? t_begin + a.q_tiles_per_seg : a.q_tiles;
  const T* Qm = static_cast<const T*>(a.q) + static_cast<long long>(bh) * a.q_len * a.dk;
  T* Ym = static_cast<T*>(a.y) + static_cast<long long>(bh) * a.q_len * a.dv;
  LoadStateSimt<T>(a, L, StateSlot(a, b, hkv, a.segments - 1), dv0);
  for (int tile = t_begin; tile < t_end; ++tile) {
    const long long q0 = static_cast<long long>(tile) * kSimtChunk;
    sync_block();
    LoadFeaturesSimt<T>(a, Qm, q0, L.phiq, L.ld, nullptr, false);
    sync_block();
    QueryTileSimt<T, false>(a, L, Ym, q0, dv0);
  }
}

template <typename T>
AX_GLOBAL void AX_LAUNCH_BOUNDS(kThreads) LaCausalSimt(const Args a) {
  SimtLayout L(a.dk, /*causal=*/true, dynamic_smem());
  const int seg = block_x(), dvt = block_y(), bh = block_z();
  const int b = bh / a.q_heads, hq = bh % a.q_heads, hkv = hq / a.group;
  const int dv0 = dvt * kSimtDvTile;
  const int c_begin = seg * a.chunks_per_seg;
  const int c_end = c_begin + a.chunks_per_seg < a.chunks ? c_begin + a.chunks_per_seg : a.chunks;
  const int first_q_chunk = a.offset > 0 ? a.offset / kSimtChunk : 0;
  if (c_end <= first_q_chunk || c_begin >= c_end) return;
  const T* Qm = static_cast<const T*>(a.q) + static_cast<long long>(bh) * a.q_len * a.dk;
  const long long kv_bh = static_cast<long long>(b) * a.kv_heads + hkv;
  const T* Km = static_cast<const T*>(a.k) + kv_bh * a.kv_len * a.dk;
  const T* Vm = static_cast<const T*>(a.v) + kv_bh * a.kv_len * a.dv;
  T* Ym = static_cast<T*>(a.y) + static_cast<long long>(bh) * a.q_len * a.dv;
  const bool* mask_row = a.mask ? a.mask + static_cast<long long>(b) * a.kv_len : nullptr;
  LoadStateSimt<T>(a, L, seg > 0 ? StateSlot(a, b, hkv, seg - 1) : nullptr, dv0);
  for (int c = c_begin; c < c_end; ++c) {
    const long long k0 = static_cast<long long>(c) * kSimtChunk, q0 = k0 - a.offset;
    const bool has_q = q0 < a.q_len && q0 + kSimtChunk > 0;
    sync_block();
    LoadFeaturesSimt<T>(a, Km, k0, L.phik, L.ld, mask_row, true);
    LoadValuesSimt<T>(a, Vm, k0, dv0, L.vt, mask_row);
    if (has_q) LoadFeaturesSimt<T>(a, Qm, q0, L.phiq, L.ld, nullptr, false);
    sync_block();
    if (has_q) {
      for (int i = thread_x(); i < kSimtChunk * kSimtChunk; i += kThreads) {
        const int r = i / kSimtChunk, j = i % kSimtChunk;
        float s = 0.f;
        if (j <= r) {
          for (int d = 0; d < a.dk; ++d) s += L.phiq[r * L.ld + d] * L.phik[j * L.ld + d];
        }
        L.at[r * (kSimtChunk + 1) + j] = s;
      }
      sync_block();
      QueryTileSimt<T, true>(a, L, Ym, q0, dv0);
    }
    if (c + 1 < c_end) {
      sync_block();  // St, z read by every row
      StateUpdateSimt(a, L, L.phik, L.vt);
    }
  }
}

}  // namespace attnexport::cuda::la
