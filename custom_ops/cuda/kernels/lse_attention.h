// LseAttention on CUDA (Heinsen 2024): problem and plan (plain C++; the glue and the emulator include
// it). Semantics: attnexport/ops/reference.py::lse_attention. w_ij = Σ_d exp(q̃_id + k̃_jd), so the keys
// reduce to a state per (batch, kv head) with per-dimension maxima (the CPU kernel's layout):
//   S_d = Σ_j exp(k̃_jd - m_d) v_j [Dk, Dv],  z_d = Σ_j exp(k̃_jd - m_d),  m_d = max_j k̃_jd,
// and a query reads it with one reference per row, c_i = max_d (q̃_id + m_d):
//   y_i = Σ_d a_id S_d / Σ_d a_id z_d,  a_id = exp(q̃_id + m_d - c_i) <= 1.
// Exponentials are per (token, key dim) only; when a maximum grows, the carried S_d, z_d are multiplied
// by exp(m_old - m_new) <= 1 (exact). All float32 on the CUDA cores, any input dtype:
//   kernel 1 (keys)   the state of each segment of keys, maxima per chunk of 32 keys
//   kernel 2 (scan)   past_state ⊕ segment 0 ⊕ ... (merging two states rescales to the larger max)
//   present_state     past ⊕ every unpadded key of the call (the last scanned slot)
//   kernel 3 (query)  non-causal: y from the full state, per tile of 32 queries;
//                     causal: per segment, chunks of 32 keys in order, each with one maximum per
//                     dimension (queries get the rescaled carried state + the chunk's lower triangle,
//                     as matrix products), except a chunk whose keys jump by more than kJump over a
//                     row's visible prefix: it runs key by key (the exact recurrence), so no row's
//                     normaliser can underflow whatever the magnitudes.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "cuda/kernels/linear_attention.h"  // DType, DeviceInfo

namespace attnexport::cuda::lse {

constexpr int kThreads = 128;
constexpr int kChunk = 32;
constexpr int kDvTile = 32;
constexpr int kMaxDk = 256;
constexpr float kJump = 40.f;  // largest max-growth within a chunk handled by one reference per dimension

struct Problem {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0, value_dim = 0;
  float scale = 0.f;
  bool causal = false;
  int64_t past_stride[4] = {0, 0, 0, 0};  // past_state broadcast to [B, Hkv, Dk, Dv + 2] (0: broadcast axis)
};

struct Buffers {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const bool* mask = nullptr;   // [B, Skv] or null
  const float* past = nullptr;  // past_state (float32, strided by past_stride) or null = empty
  void* y = nullptr;            // [B, Hq, Sq, Dv]
  float* present = nullptr;     // [B, Hkv, Dk, Dv + 2]
};

struct Args {
  const void* q;
  const void* k;
  const void* v;
  const bool* mask;
  const float* past;
  long long past_stride[4];
  void* y;
  float* present;
  float* states;  // [B*Hkv][segments][state_stride]: S [dk][dvp], z [dk], m [dk]
  int batch, q_heads, kv_heads, q_len, kv_len, dk, dv, group, offset;
  float root;
  int chunks, chunks_per_seg, segments;
  int q_tiles, q_tiles_per_seg;
  int row_begin, row_end;  // query kernel: the rows it answers
  int dvp;
  long long state_stride;
};

struct Plan {
  int dv_tiles = 0, dvp = 0;
  int chunks = 0, segments = 0, chunks_per_seg = 1;
  int q_tiles = 0, q_segments = 1, q_tiles_per_seg = 1;
  long long state_stride = 0;
  size_t workspace_bytes = 0;
  size_t smem_keys = 0, smem_query = 0, smem_causal = 0;
};

inline int CeilDiv64(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Shared memory (floats): keys: K̃ [32][dk+1], V [32][33], S [dk][33], z, m, b, f [dk], flags [32].
inline size_t SmemKeys(int dk) { return (kChunk * (dk + 1) + kChunk * (kDvTile + 1) + dk * (kDvTile + 1) + 4 * dk + kChunk) * 4; }
// query: Q̃ [32][dk+1], S [dk][33], z, m [dk], c [32]
inline size_t SmemQuery(int dk) { return (kChunk * (dk + 1) + dk * (kDvTile + 1) + 2 * dk + kChunk) * 4; }
// causal: keys' + Q̃ [32][dk+1] + W [32][33] + c [32] + reduction scratch [8]
inline size_t SmemCausal(int dk) { return SmemKeys(dk) + (kChunk * (dk + 1) + kChunk * (kChunk + 1) + kChunk + 8) * 4; }

inline std::string MakePlan(const Problem& p, const DeviceInfo& dev, Plan* out) {
  Plan pl;
  if (p.head_dim > kMaxDk) return "head dim above " + std::to_string(kMaxDk) + " is not supported by the CUDA kernel";
  if (p.batch * p.q_heads > 65535) return "batch * heads > 65535 is not supported by the CUDA kernel";
  if (p.q_len > (int64_t{1} << 30) || p.kv_len > (int64_t{1} << 30)) return "sequence longer than 2^30";
  const int dk = static_cast<int>(p.head_dim);
  pl.smem_keys = SmemKeys(dk);
  pl.smem_query = SmemQuery(dk);
  pl.smem_causal = SmemCausal(dk);
  if (pl.smem_causal > static_cast<size_t>(dev.max_smem_per_block)) {
    return "needs " + std::to_string(pl.smem_causal) + " bytes of shared memory per block; the device allows " +
           std::to_string(dev.max_smem_per_block);
  }
  pl.dv_tiles = std::max(1, CeilDiv64(p.value_dim, kDvTile));
  pl.dvp = pl.dv_tiles * kDvTile;
  pl.chunks = CeilDiv64(p.kv_len, kChunk);
  const int64_t target = 2 * static_cast<int64_t>(std::max(1, dev.sm_count));
  const int64_t units = (p.causal ? p.batch * p.q_heads : p.batch * p.kv_heads) * pl.dv_tiles;
  const int segs = static_cast<int>(std::clamp<int64_t>((target + units - 1) / units, 1, std::max(1, pl.chunks)));
  pl.chunks_per_seg = std::max(1, CeilDiv64(pl.chunks, segs));
  pl.segments = pl.chunks == 0 ? 0 : CeilDiv64(pl.chunks, pl.chunks_per_seg);
  pl.q_tiles = CeilDiv64(p.q_len, kChunk);
  const int64_t q_units = p.batch * p.q_heads * pl.dv_tiles;
  const int qsegs = static_cast<int>(std::clamp<int64_t>((target + q_units - 1) / q_units, 1, std::max(1, pl.q_tiles)));
  pl.q_tiles_per_seg = std::max(1, CeilDiv64(pl.q_tiles, qsegs));
  pl.q_segments = std::max(1, CeilDiv64(pl.q_tiles, pl.q_tiles_per_seg));
  pl.state_stride = static_cast<long long>(dk) * pl.dvp + 2LL * dk;
  pl.workspace_bytes = static_cast<size_t>(p.batch * p.kv_heads) * std::max(1, pl.segments) *
                       static_cast<size_t>(pl.state_stride) * sizeof(float);
  *out = pl;
  return {};
}

}  // namespace attnexport::cuda::lse
