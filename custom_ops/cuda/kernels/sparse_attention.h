// SparseAttention on CUDA: problem, plan and the pattern (plain C++; the glue and the emulator test
// include it). Semantics: DESIGN.md / attnexport/ops/reference.py::sparse_pattern, sparse_attention.
//
// One block per tile of queries. It first marks, in a bitmap in shared memory, the key tiles the
// pattern reaches from any of its rows (window range, global keys, BigBird random blocks; every key
// tile up to the causal limit when a row of the tile is a global query), then visits only those,
// flash style: S = Q Kᵀ, mask (skipped when the whole tile is inside the pattern), additive bias,
// online softmax in base 2 with a guard for rows that have seen only -inf so far, O += P V.
//   mma  (float16 / bfloat16, dk and dv multiples of 8, <= 128): 64-row tiles, 4 warps, mma.sync
//        m16n8k16 with float32 accumulators, K/V tiles double-buffered with cp.async;
//   simt (float32, and other shapes up to 256): one warp per 32 query rows (a lane per row), key
//        tiles of 32 in shared memory, float32.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "cuda/kernels/linear_attention.h"  // DType, DeviceInfo

namespace attnexport::cuda::sp {

enum class Path { kMma = 0, kSimt = 1 };

constexpr int kMmaTile = 64;
constexpr int kMmaThreads = 128;
constexpr int kSimtTile = 32;
constexpr int kSimtThreads = 32;
constexpr int kSimtMaxDim = 256;
constexpr long long kRandomModulus = 2147483647LL;  // reference.py RANDOM_BLOCK_MODULUS
constexpr long long kRandomMultiplier = 48271LL;    // RANDOM_BLOCK_MULTIPLIER

struct Problem {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0, value_dim = 0;
  float scale = 0.f;
  bool causal = false;
  int64_t window_left = -1, window_right = -1, dilation = 1, num_global = 0;
  int64_t block_size = 0, num_random_blocks = 0, seed = 0;
  int64_t bias_stride[4] = {0, 0, 0, 0};  // attn_bias broadcast to [B, Hq, Sq, Skv]
  bool force_simt = false;
};

struct Buffers {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const bool* mask = nullptr;  // [B, Skv] or null
  const void* bias = nullptr;  // Q's dtype, strided by bias_stride, or null
  void* y = nullptr;
};

struct Args {
  const void* q;
  const void* k;
  const void* v;
  const bool* mask;
  const void* bias;
  void* y;
  long long bias_stride[4];
  int batch, q_heads, kv_heads, q_len, kv_len, dk, dv, group, offset;
  float scale_log2;  // scale * log2(e): softmax in base 2
  int causal;
  int window_left, window_right;  // -1 = unbounded (values past the sequence are clamped)
  int dilation, num_global, block_size, num_random_blocks;
  long long seed;
  int key_tiles;     // ceil(kv_len / tile)
  int bitmap_words;  // ceil(key_tiles / 32)
};

struct Plan {
  Path path = Path::kSimt;
  int dim = 0;  // mma: dk and dv padded to 64 or 128; simt: unused
  int tile = 0;
  int q_tiles = 0;
  int key_tiles = 0;
  int bitmap_words = 0;
  size_t smem = 0;
};

inline size_t MmaSmem(int dim, int bitmap_words) {
  const size_t ld = dim + 8;
  return 5 * static_cast<size_t>(kMmaTile) * ld * 2 + 2 * static_cast<size_t>(bitmap_words) * 4;
}
inline size_t SimtSmem(int dk, int dv, int bitmap_words) {
  return (2 * static_cast<size_t>(kSimtTile) * (dk + 1) + 2 * static_cast<size_t>(kSimtTile) * (dv + 1)) * 4 +
         2 * static_cast<size_t>(bitmap_words) * 4;
}

inline int Clamp30(int64_t x) { return static_cast<int>(std::min<int64_t>(x, int64_t{1} << 30)); }

inline std::string MakePlan(const Problem& p, const DeviceInfo& dev, Plan* out) {
  Plan pl;
  const bool half = p.dtype != DType::kFloat32;
  const bool mma_shape = p.head_dim % 8 == 0 && p.value_dim % 8 == 0 && p.head_dim <= 128 && p.value_dim <= 128;
  pl.path = half && mma_shape && !p.force_simt && dev.cc >= 80 ? Path::kMma : Path::kSimt;
  if (pl.path == Path::kSimt && (p.head_dim > kSimtMaxDim || p.value_dim > kSimtMaxDim)) {
    return "head dims above " + std::to_string(kSimtMaxDim) + " are not supported by the CUDA kernel";
  }
  if (p.q_len > (int64_t{1} << 30) || p.kv_len > (int64_t{1} << 30)) return "sequence longer than 2^30";
  if (p.batch * p.q_heads > 65535) return "batch * heads > 65535 is not supported by the CUDA kernel";
  pl.tile = pl.path == Path::kMma ? kMmaTile : kSimtTile;
  pl.dim = pl.path == Path::kMma ? (std::max(p.head_dim, p.value_dim) <= 64 ? 64 : 128) : 0;
  pl.q_tiles = static_cast<int>((p.q_len + pl.tile - 1) / pl.tile);
  pl.key_tiles = static_cast<int>((p.kv_len + pl.tile - 1) / pl.tile);
  pl.bitmap_words = std::max(1, (pl.key_tiles + 31) / 32);
  pl.smem = pl.path == Path::kMma ? MmaSmem(pl.dim, pl.bitmap_words)
                                  : SimtSmem(static_cast<int>(p.head_dim), static_cast<int>(p.value_dim), pl.bitmap_words);
  if (pl.smem > static_cast<size_t>(dev.max_smem_per_block)) {
    return "needs " + std::to_string(pl.smem) + " bytes of shared memory per block (sequence or head dims too "
           "large); the device allows " + std::to_string(dev.max_smem_per_block);
  }
  *out = pl;
  return {};
}

}  // namespace attnexport::cuda::sp
