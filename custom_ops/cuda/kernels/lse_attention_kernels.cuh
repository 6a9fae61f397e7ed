// LseAttention CUDA kernels (see lse_attention.h). Written against cuda/common/device.cuh only, so the
// host emulator runs this very code. float32 math on the CUDA cores; 128 threads per block; a block's
// dv tile is 32 columns. State slots: S [dk][dvp], z [dk], m [dk] (m = -inf: the dimension holds nothing).
#pragma once
#include "cuda/common/device.cuh"
#include "cuda/kernels/lse_attention.h"

namespace attnexport::cuda::lse {

using namespace ::attnexport::cuda::dev;

constexpr float kNegInf = -__builtin_huge_valf();
constexpr int kLdV = kDvTile + 1;

AX_DEVICE float* StateSlot(const Args& a, long long kv_bh, int slot) {
  return a.states + (kv_bh * a.segments + slot) * a.state_stride;
}

// The past state of (b, h) as this dv tile's S [dk][33], z, m (empty dimensions: 0, 0, -inf).
AX_DEVICE void LoadPast(const Args& a, int b, int h, int dv0, float* S, float* z, float* m) {
  const long long base = b * a.past_stride[0] + h * a.past_stride[1];
  for (int i = thread_x(); i < a.dk * kDvTile; i += kThreads) {
    const int d = i / kDvTile, e = i % kDvTile;
    float s = 0.f;
    if (a.past && dv0 + e < a.dv) {
      const long long row = base + d * a.past_stride[2];
      if (a.past[row + a.dv * a.past_stride[3]] > 0.f) s = a.past[row + (dv0 + e) * a.past_stride[3]];
    }
    S[d * kLdV + e] = s;
  }
  for (int d = thread_x(); d < a.dk; d += kThreads) {
    float zz = 0.f, mm = kNegInf;
    if (a.past) {
      const long long row = base + d * a.past_stride[2];
      zz = a.past[row + a.dv * a.past_stride[3]];
      if (zz > 0.f) {
        mm = a.past[row + (a.dv + 1) * a.past_stride[3]];
      } else {
        zz = 0.f;
      }
    }
    z[d] = zz;
    m[d] = mm;
  }
}

AX_DEVICE void LoadSlot(const Args& a, const float* slot, int dv0, float* S, float* z, float* m) {
  for (int i = thread_x(); i < a.dk * kDvTile; i += kThreads) {
    const int d = i / kDvTile, e = i % kDvTile;
    S[d * kLdV + e] = slot[static_cast<long long>(d) * a.dvp + dv0 + e];
  }
  for (int d = thread_x(); d < a.dk; d += kThreads) {
    z[d] = slot[static_cast<long long>(a.dk) * a.dvp + d];
    m[d] = slot[static_cast<long long>(a.dk) * a.dvp + a.dk + d];
  }
}

// A chunk of 32 keys: K̃ = root·k [32][dk+1] (padded or missing keys flagged 0), V [32][33].
template <typename T>
AX_DEVICE void LoadKeys(const Args& a, const T* Km, const T* Vm, const bool* mask_row, long long k0, int dv0,
                        float* Kt, float* V, float* flags) {
  const int ldk = a.dk + 1;
  for (int r = thread_x(); r < kChunk; r += kThreads) {
    const long long j = k0 + r;
    flags[r] = j < a.kv_len && (mask_row == nullptr || mask_row[j]) ? 1.f : 0.f;
  }
  for (int i = thread_x(); i < kChunk * a.dk; i += kThreads) {
    const int r = i / a.dk, d = i % a.dk;
    const long long j = k0 + r;
    Kt[r * ldk + d] = j < a.kv_len ? a.root * to_float<T>(Km[j * a.dk + d]) : 0.f;
  }
  for (int i = thread_x(); i < kChunk * kDvTile; i += kThreads) {
    const int r = i / kDvTile, e = i % kDvTile;
    const long long j = k0 + r;
    const bool ok = j < a.kv_len && (mask_row == nullptr || mask_row[j]) && dv0 + e < a.dv;
    V[r * kLdV + e] = ok ? to_float<T>(Vm[j * a.dv + dv0 + e]) : 0.f;
  }
}

template <typename T>
AX_DEVICE void LoadQueries(const Args& a, const T* Qm, long long q0, long long q_end, float* Qt) {
  const int ldk = a.dk + 1;
  for (int i = thread_x(); i < kChunk * a.dk; i += kThreads) {
    const int r = i / a.dk, d = i % a.dk;
    const long long qi = q0 + r;
    Qt[r * ldk + d] = qi >= 0 && qi < q_end ? a.root * to_float<T>(Qm[qi * a.dk + d]) : 0.f;
  }
}

// Thread (r = tid / 4, quarter eg = tid % 4) of a 32-row tile: the row's reference c_r = max_d (q̃_rd + m_d)
// over dimensions that hold keys, then a_rd = exp(q̃_rd + m_d - c_r) in place of q̃ (this quarter's d).
// Returns false when the row sees nothing (every a_rd = 0).
AX_DEVICE bool RowWeights(const Args& a, float* Qt, const float* m, int r, int eg) {
  const int ldk = a.dk + 1;
  float c = kNegInf;
  for (int d = eg; d < a.dk; d += 4) {
    if (m[d] != kNegInf) c = fmax_(c, Qt[r * ldk + d] + m[d]);
  }
  c = fmax_(c, shfl_xor(c, 1));
  c = fmax_(c, shfl_xor(c, 2));
  for (int d = eg; d < a.dk; d += 4) {
    Qt[r * ldk + d] = (c != kNegInf && m[d] != kNegInf) ? exp_accurate(Qt[r * ldk + d] + m[d] - c) : 0.f;
  }
  return c != kNegInf;
}

// y row r (quarter eg: columns 8eg..8eg+7 of the tile) = (a_r·S + Σ_j W_rj v_j) / (a_r·z + Σ_j W_rj).
template <typename T, bool INTRA>
AX_DEVICE void WriteRow(const Args& a, const float* Qt, const float* S, const float* z, const float* W,
                        const float* V, T* Ym, long long qi, int r, int eg, int dv0) {
  const int ldk = a.dk + 1;
  float num[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  float den = 0.f;
  for (int d = 0; d < a.dk; ++d) {
    const float w = Qt[r * ldk + d];
#pragma unroll
    for (int e = 0; e < 8; ++e) num[e] += w * S[d * kLdV + 8 * eg + e];
    if ((d & 3) == eg) den += w * z[d];
  }
  if constexpr (INTRA) {
    for (int j = 0; j <= r; ++j) {
      const float w = W[r * (kChunk + 1) + j];
#pragma unroll
      for (int e = 0; e < 8; ++e) num[e] += w * V[j * kLdV + 8 * eg + e];
      if ((j & 3) == eg) den += w;
    }
  }
  den += shfl_xor(den, 1);
  den += shfl_xor(den, 2);
  const float inv = den > 0.f ? 1.f / den : 0.f;
  if (qi >= 0 && qi < a.q_len) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int col = dv0 + 8 * eg + e;
      if (col < a.dv) Ym[qi * a.dv + col] = from_float<T>(num[e] * inv);
    }
  }
}

// Kernel 1: the state of each segment of keys (own maxima) -> slot `segment`.
// grid (segments, dv tiles, batch * kv heads)
template <typename T>
AX_GLOBAL void AX_LAUNCH_BOUNDS(kThreads) LseKeys(const Args a) {
  const int ldk = a.dk + 1;
  float* Kt = reinterpret_cast<float*>(dynamic_smem());
  float* V = Kt + kChunk * ldk;
  float* S = V + kChunk * kLdV;
  float* z = S + a.dk * kLdV;
  float* m = z + a.dk;
  float* fac = m + 2 * a.dk;
  float* flags = fac + a.dk;
  const int seg = block_x(), dvt = block_y(), bh = block_z();
  const int b = bh / a.kv_heads;
  const int dv0 = dvt * kDvTile;
  const int c_begin = seg * a.chunks_per_seg;
  const int c_end = c_begin + a.chunks_per_seg < a.chunks ? c_begin + a.chunks_per_seg : a.chunks;
  const T* Km = static_cast<const T*>(a.k) + static_cast<long long>(bh) * a.kv_len * a.dk;
  const T* Vm = static_cast<const T*>(a.v) + static_cast<long long>(bh) * a.kv_len * a.dv;
  const bool* mask_row = a.mask ? a.mask + static_cast<long long>(b) * a.kv_len : nullptr;
  for (int i = thread_x(); i < a.dk * kLdV; i += kThreads) S[i] = 0.f;
  for (int d = thread_x(); d < a.dk; d += kThreads) {
    z[d] = 0.f;
    m[d] = kNegInf;
  }
  for (int c = c_begin; c < c_end; ++c) {
    sync_block();
    LoadKeys<T>(a, Km, Vm, mask_row, static_cast<long long>(c) * kChunk, dv0, Kt, V, flags);
    sync_block();
    for (int d = thread_x(); d < a.dk; d += kThreads) {
      float cm = kNegInf;
      for (int r = 0; r < kChunk; ++r) {
        if (flags[r] != 0.f) cm = fmax_(cm, Kt[r * ldk + d]);
      }
      const float nb = fmax_(m[d], cm);
      const float f = nb == kNegInf ? 1.f : exp_accurate(m[d] - nb);
      float zs = 0.f;
      for (int r = 0; r < kChunk; ++r) {
        const float e = flags[r] != 0.f ? exp_accurate(Kt[r * ldk + d] - nb) : 0.f;
        Kt[r * ldk + d] = e;
        zs += e;
      }
      z[d] = z[d] * f + zs;
      m[d] = nb;
      fac[d] = f;
    }
    sync_block();
    for (int i = thread_x(); i < a.dk * kDvTile; i += kThreads) {
      const int d = i / kDvTile, e = i % kDvTile;
      float acc = S[d * kLdV + e] * fac[d];
      for (int r = 0; r < kChunk; ++r) acc += Kt[r * ldk + d] * V[r * kLdV + e];
      S[d * kLdV + e] = acc;
    }
  }
  sync_block();
  float* out = StateSlot(a, bh, seg);
  for (int i = thread_x(); i < a.dk * kDvTile; i += kThreads) {
    const int d = i / kDvTile, e = i % kDvTile;
    out[static_cast<long long>(d) * a.dvp + dv0 + e] = S[d * kLdV + e];
  }
  if (dvt == 0) {
    for (int d = thread_x(); d < a.dk; d += kThreads) {
      out[static_cast<long long>(a.dk) * a.dvp + d] = z[d];
      out[static_cast<long long>(a.dk) * a.dvp + a.dk + d] = m[d];
    }
  }
}

// Kernel 2: slot s <- past ⊕ slot 0 ⊕ ... ⊕ slot s for s < count (merging rescales to the larger maximum).
// grid (dk, batch * kv heads)
AX_GLOBAL void AX_LAUNCH_BOUNDS(kThreads) LseScan(const Args a, int count) {
  const int d = block_x(), bh = block_y();
  const int b = bh / a.kv_heads, h = bh % a.kv_heads;
  float m0 = kNegInf;
  long long past_row = 0;
  if (a.past) {
    past_row = b * a.past_stride[0] + h * a.past_stride[1] + d * a.past_stride[2];
    if (a.past[past_row + a.dv * a.past_stride[3]] > 0.f) m0 = a.past[past_row + (a.dv + 1) * a.past_stride[3]];
  }
  const long long s_off = static_cast<long long>(d) * a.dvp, z_off = static_cast<long long>(a.dk) * a.dvp + d,
                  m_off = static_cast<long long>(a.dk) * a.dvp + a.dk + d;
  for (int col = thread_x(); col <= a.dvp; col += kThreads) {  // col == dvp: z
    float run_m = m0, run = 0.f;
    if (m0 != kNegInf) {
      run = col == a.dvp ? a.past[past_row + a.dv * a.past_stride[3]]
                         : (col < a.dv ? a.past[past_row + col * a.past_stride[3]] : 0.f);
    }
    for (int s = 0; s < count; ++s) {
      float* slot = StateSlot(a, bh, s);
      const float ms = slot[m_off];
      float* val = slot + (col == a.dvp ? z_off : s_off + col);
      const float nm = fmax_(run_m, ms);
      if (nm != kNegInf) {
        run = (run_m == kNegInf ? 0.f : run * exp_accurate(run_m - nm)) + (ms == kNegInf ? 0.f : *val * exp_accurate(ms - nm));
      }
      run_m = nm;
      *val = run;
    }
  }
  sync_block();  // every thread has read the maxima of every slot
  if (thread_x() == 0) {
    float run_m = m0;
    for (int s = 0; s < count; ++s) {
      float* slot = StateSlot(a, bh, s);
      run_m = fmax_(run_m, slot[m_off]);
      slot[m_off] = run_m;
    }
  }
}

// present_state [B, Hkv, Dk, Dv + 2] from the last scanned slot (or the past when there are no keys);
// empty dimensions as zeros. grid (dk, batch * kv heads)
AX_GLOBAL void AX_LAUNCH_BOUNDS(kThreads) LsePresent(const Args a, int count) {
  const int d = block_x(), bh = block_y();
  const int b = bh / a.kv_heads, h = bh % a.kv_heads;
  float* out = a.present + (static_cast<long long>(bh) * a.dk + d) * (a.dv + 2);
  float z = 0.f, m = 0.f;
  const float* slot = count > 0 ? StateSlot(a, bh, count - 1) : nullptr;
  long long past_row = 0;
  if (slot) {
    z = slot[static_cast<long long>(a.dk) * a.dvp + d];
    m = slot[static_cast<long long>(a.dk) * a.dvp + a.dk + d];
  } else if (a.past) {
    past_row = b * a.past_stride[0] + h * a.past_stride[1] + d * a.past_stride[2];
    z = a.past[past_row + a.dv * a.past_stride[3]];
    m = a.past[past_row + (a.dv + 1) * a.past_stride[3]];
  }
  const bool held = z > 0.f;
  for (int col = thread_x(); col < a.dv + 2; col += kThreads) {
    float x = 0.f;
    if (held) {
      if (col == a.dv) {
        x = z;
      } else if (col == a.dv + 1) {
        x = m;
      } else {
        x = slot ? slot[static_cast<long long>(d) * a.dvp + col] : a.past[past_row + col * a.past_stride[3]];
      }
    }
    out[col] = x;
  }
}

// Kernel 3, non-causal (and rows that see only the past): y for rows [row_begin, row_end) from the
// state of slot `slot` (-1: the past). grid (query segments, dv tiles, batch * q heads)
template <typename T>
AX_GLOBAL void AX_LAUNCH_BOUNDS(kThreads) LseQuery(const Args a, int slot) {
  const int ldk = a.dk + 1;
  float* Qt = reinterpret_cast<float*>(dynamic_smem());
  float* S = Qt + kChunk * ldk;
  float* z = S + a.dk * kLdV;
  float* m = z + a.dk;
  const int seg = block_x(), dvt = block_y(), bh = block_z();
  const int b = bh / a.q_heads, hq = bh % a.q_heads, hkv = hq / a.group;
  const int dv0 = dvt * kDvTile;
  const T* Qm = static_cast<const T*>(a.q) + static_cast<long long>(bh) * a.q_len * a.dk;
  T* Ym = static_cast<T*>(a.y) + static_cast<long long>(bh) * a.q_len * a.dv;
  if (slot >= 0) {
    LoadSlot(a, StateSlot(a, static_cast<long long>(b) * a.kv_heads + hkv, slot), dv0, S, z, m);
  } else {
    LoadPast(a, b, hkv, dv0, S, z, m);
  }
  const int t_begin = seg * a.q_tiles_per_seg;
  const int t_end = t_begin + a.q_tiles_per_seg < a.q_tiles ? t_begin + a.q_tiles_per_seg : a.q_tiles;
  const int r = thread_x() >> 2, eg = thread_x() & 3;
  for (int tile = t_begin; tile < t_end; ++tile) {
    const long long q0 = a.row_begin + static_cast<long long>(tile) * kChunk;
    sync_block();
    LoadQueries<T>(a, Qm, q0, a.row_end, Qt);
    sync_block();
    RowWeights(a, Qt, m, r, eg);
    sync_warp();
    if (q0 + r < a.row_end) WriteRow<T, false>(a, Qt, S, z, nullptr, nullptr, Ym, q0 + r, r, eg, dv0);
    else WriteRow<T, false>(a, Qt, S, z, nullptr, nullptr, Ym, -1, r, eg, dv0);  // (keeps the quad's shuffles together)
  }
}

// Kernel 3, causal: the chunks of a segment in order, carrying the state.
// grid (segments, dv tiles, batch * q heads)
template <typename T>
AX_GLOBAL void AX_LAUNCH_BOUNDS(kThreads) LseCausal(const Args a) {
  const int ldk = a.dk + 1;
  float* Kt = reinterpret_cast<float*>(dynamic_smem());
  float* V = Kt + kChunk * ldk;
  float* S = V + kChunk * kLdV;
  float* z = S + a.dk * kLdV;
  float* m = z + a.dk;
  float* nb = m + a.dk;  // the chunk's maxima
  float* fac = nb + a.dk;
  float* flags = fac + a.dk;
  float* Qt = flags + kChunk;
  float* W = Qt + kChunk * ldk;
  float* red = W + kChunk * (kChunk + 1) + kChunk;
  const int seg = block_x(), dvt = block_y(), bh = block_z();
  const int b = bh / a.q_heads, hq = bh % a.q_heads, hkv = hq / a.group;
  const int dv0 = dvt * kDvTile;
  const int c_begin = seg * a.chunks_per_seg;
  const int c_end = c_begin + a.chunks_per_seg < a.chunks ? c_begin + a.chunks_per_seg : a.chunks;
  const int first_q_chunk = a.offset > 0 ? a.offset / kChunk : 0;
  if (c_end <= first_q_chunk || c_begin >= c_end) return;  // whole block: no query here
  const long long kv_bh = static_cast<long long>(b) * a.kv_heads + hkv;
  const T* Qm = static_cast<const T*>(a.q) + static_cast<long long>(bh) * a.q_len * a.dk;
  const T* Km = static_cast<const T*>(a.k) + kv_bh * a.kv_len * a.dk;
  const T* Vm = static_cast<const T*>(a.v) + kv_bh * a.kv_len * a.dv;
  T* Ym = static_cast<T*>(a.y) + static_cast<long long>(bh) * a.q_len * a.dv;
  const bool* mask_row = a.mask ? a.mask + static_cast<long long>(b) * a.kv_len : nullptr;
  if (seg > 0) {
    LoadSlot(a, StateSlot(a, kv_bh, seg - 1), dv0, S, z, m);
  } else {
    LoadPast(a, b, hkv, dv0, S, z, m);
  }
  const int tid = thread_x(), r4 = tid >> 2, eg = tid & 3, lane = lane_id();
  for (int c = c_begin; c < c_end; ++c) {
    const long long k0 = static_cast<long long>(c) * kChunk, q0 = k0 - a.offset;
    const bool has_q = q0 < a.q_len && q0 + kChunk > 0;
    const bool last = c + 1 == c_end;
    sync_block();
    LoadKeys<T>(a, Km, Vm, mask_row, k0, dv0, Kt, V, flags);
    if (has_q) LoadQueries<T>(a, Qm, q0, a.q_len, Qt);
    sync_block();
    // The chunk's maxima, and how far they rise above what a row's visible prefix holds.
    float jump = 0.f;
    for (int d = tid; d < a.dk; d += kThreads) {
      float cm = kNegInf, first = kNegInf;
      for (int r = 0; r < kChunk; ++r) {
        if (flags[r] != 0.f) {
          const float x = Kt[r * ldk + d];
          if (first == kNegInf) first = x;
          cm = fmax_(cm, x);
        }
      }
      const float n = fmax_(m[d], cm);
      nb[d] = n;
      const float ref = m[d] != kNegInf ? m[d] : first;
      if (n != kNegInf) jump = fmax_(jump, n - ref);
    }
    jump = fmax_(jump, shfl_xor(jump, 16));
    jump = fmax_(jump, shfl_xor(jump, 8));
    jump = fmax_(jump, shfl_xor(jump, 4));
    jump = fmax_(jump, shfl_xor(jump, 2));
    jump = fmax_(jump, shfl_xor(jump, 1));
    if (lane == 0) red[warp_id()] = jump;
    sync_block();
    jump = fmax_(fmax_(red[0], red[1]), fmax_(red[2], red[3]));
    if (jump <= kJump) {
      // One reference per dimension for the whole chunk: the carried state is rescaled to it.
      for (int d = tid; d < a.dk; d += kThreads) {
        const float n = nb[d];
        const float f = n == kNegInf ? 1.f : exp_accurate(m[d] - n);
        fac[d] = f;
        z[d] *= f;
        m[d] = n;
        for (int r = 0; r < kChunk; ++r) {
          Kt[r * ldk + d] = flags[r] != 0.f ? exp_accurate(Kt[r * ldk + d] - n) : 0.f;
        }
      }
      sync_block();
      for (int i = tid; i < a.dk * kDvTile; i += kThreads) S[(i / kDvTile) * kLdV + i % kDvTile] *= fac[i / kDvTile];
      sync_block();
      if (has_q) {
        RowWeights(a, Qt, m, r4, eg);
        sync_block();
        for (int i = tid; i < kChunk * kChunk; i += kThreads) {
          const int r = i / kChunk, j = i % kChunk;
          float w = 0.f;
          if (j <= r && flags[j] != 0.f) {
            for (int d = 0; d < a.dk; ++d) w += Qt[r * ldk + d] * Kt[j * ldk + d];
          }
          W[r * (kChunk + 1) + j] = w;
        }
        sync_block();
        WriteRow<T, true>(a, Qt, S, z, W, V, Ym, q0 + r4, r4, eg, dv0);
      }
      if (!last) {
        sync_block();
        for (int i = tid; i < a.dk * kDvTile; i += kThreads) {
          const int d = i / kDvTile, e = i % kDvTile;
          float acc = S[d * kLdV + e];
          for (int r = 0; r < kChunk; ++r) acc += Kt[r * ldk + d] * V[r * kLdV + e];
          S[d * kLdV + e] = acc;
        }
        for (int d = tid; d < a.dk; d += kThreads) {
          float zs = 0.f;
          for (int r = 0; r < kChunk; ++r) zs += Kt[r * ldk + d];
          z[d] += zs;
        }
      }
    } else {
      // Keys jump too far within the chunk: the exact recurrence, one key at a time.
      for (int r = 0; r < kChunk && k0 + r < a.kv_len; ++r) {
        sync_block();
        const bool valid = flags[r] != 0.f;
        if (valid) {
          for (int d = tid; d < a.dk; d += kThreads) {
            const float x = Kt[r * ldk + d];
            const float n = fmax_(m[d], x);
            const float f = exp_accurate(m[d] - n), gk = exp_accurate(x - n);
            z[d] = z[d] * f + gk;
            m[d] = n;
            fac[d] = f;
            Kt[r * ldk + d] = gk;
          }
        }
        sync_block();
        if (valid) {
          for (int i = tid; i < a.dk * kDvTile; i += kThreads) {
            const int d = i / kDvTile, e = i % kDvTile;
            S[d * kLdV + e] = S[d * kLdV + e] * fac[d] + Kt[r * ldk + d] * V[r * kLdV + e];
          }
        }
        sync_block();
        const long long qi = q0 + r;
        if (warp_id() == 0 && qi >= 0 && qi < a.q_len) {  // the query whose last key is r: lane = column
          const float* q = Qt + r * ldk;
          float cmax = kNegInf;
          for (int d = 0; d < a.dk; ++d) {
            if (m[d] != kNegInf) cmax = fmax_(cmax, q[d] + m[d]);
          }
          float num = 0.f, den = 0.f;
          if (cmax != kNegInf) {
            for (int d = 0; d < a.dk; ++d) {
              if (m[d] == kNegInf) continue;
              const float w = exp_accurate(q[d] + m[d] - cmax);
              num += w * S[d * kLdV + lane];
              den += w * z[d];
            }
          }
          if (dv0 + lane < a.dv) Ym[qi * a.dv + dv0 + lane] = from_float<T>(den > 0.f ? num / den : 0.f);
        }
      }
    }
  }
}

}  // namespace attnexport::cuda::lse
