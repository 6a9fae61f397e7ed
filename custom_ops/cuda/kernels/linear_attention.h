// LinearAttention on CUDA: the problem, the plan (which kernels, how the sequence is split) and the
// entry point. Plain C++ (no CUDA headers): the ORT glue (cuda/ops/*.cc, a host compiler) and the
// host emulator test include it too. Semantics: DESIGN.md / attnexport/ops/reference.py.
//
//   y_i = Σ_j A_ij v_j / (Σ_j A_ij + eps),  A_ij = φ(q̃_i)·φ(k̃_j),  over the keys j that row i sees.
//
// Every path keeps the key side as a state per (batch, kv head, segment of the sequence): the
// transposed S = Σ_j φ(k̃_j) v_jᵀ, stored St [dv, dk] (float32) and z = Σ_j φ(k̃_j) [dk]:
//   kernel 1 (keys)   state of each segment of keys                    (parallel over segments)
//   kernel 2 (scan)   inclusive scan over the segments                 (non-causal: the total)
//   kernel 3 (query)  non-causal: y = φ(Q̃) S / (φ(Q̃)·z + eps), per tile of queries;
//                     causal: per segment, chunks of keys in order: the queries whose last visible
//                     key is in the chunk get φ(Q̃) S (earlier chunks) + lower-triangular P V (this
//                     chunk), then the chunk is folded into the state.
// Two implementations of the three kernels:
//   mma  (float16 / bfloat16, dk and dv multiples of 8, dk <= 128): 64-row chunks, tensor cores
//        (mma.sync m16n8k16 for QKᵀ, PV and the state update, tf32 m16n8k8 against the float32 state),
//        cp.async double buffering, float32 state;
//   simt (float32, and any other shape up to dk = 256): 32-row chunks in float32 on the CUDA cores.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

namespace attnexport::cuda {

enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* DTypeName(DType t) {
  return t == DType::kFloat32 ? "float32" : t == DType::kFloat16 ? "float16" : "bfloat16";
}

struct DeviceInfo {
  int sm_count = 1;
  int max_smem_per_block = 48 * 1024;  // opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin)
  int cc = 80;                         // compute capability, major * 10 + minor
};

namespace la {

enum class FeatureMap { kElu1 = 0, kRelu = 1 };
enum class Path { kMma = 0, kSimt = 1 };

constexpr int kThreads = 128;
constexpr int kMmaChunk = 64;   // rows per chunk (keys, and queries of a tile)
constexpr int kMmaDvTile = 64;  // columns of V per block
constexpr int kSimtChunk = 32;
constexpr int kSimtDvTile = 32;
constexpr int kSimtMaxDk = 256;

struct Problem {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0, value_dim = 0;
  float scale = 0.f;  // logits are scale * q.k (resolved: never NaN here)
  float eps = 1e-6f;
  bool causal = false;  // bottom-right aligned
  FeatureMap feature_map = FeatureMap::kElu1;
  bool force_simt = false;  // tests: the float32 CUDA-core path for any dtype
};

struct Buffers {
  const void* q = nullptr;     // [B, Hq, Sq, Dk] of dtype, device memory
  const void* k = nullptr;     // [B, Hkv, Skv, Dk]
  const void* v = nullptr;     // [B, Hkv, Skv, Dv]
  const bool* mask = nullptr;  // [B, Skv] or null
  void* y = nullptr;           // [B, Hq, Sq, Dv]
};

// Everything the kernels need, by value (a kernel parameter).
struct Args {
  const void* q;
  const void* k;
  const void* v;
  const bool* mask;
  void* y;
  float* states;  // [B*Hkv][segments][state_stride]: St [dvp][dkp] then z [dkp]
  int batch, q_heads, kv_heads, q_len, kv_len, dk, dv;
  int group;   // q_heads / kv_heads
  int offset;  // kv_len - q_len: query i sees keys j <= i + offset (causal)
  float root;  // sqrt(scale): q̃ = root q, k̃ = root k
  float eps;
  int relu;            // 1: relu, 0: elu + 1
  int chunks;          // key chunks (ceil(kv_len / chunk))
  int chunks_per_seg;  // key chunks per segment (kernel 1; causal kernel 3)
  int segments;        // key segments (state slots per head)
  int q_tiles;         // non-causal kernel 3: query tiles (ceil(q_len / chunk))
  int q_tiles_per_seg;
  int dkp, dvp;        // padded state dims
  long long state_stride;  // floats per (head, segment)
};

struct Plan {
  Path path = Path::kSimt;
  int dk_tile = 0;      // mma: 64 or 128 (dk padded); simt: dk
  int chunk = 0;        // rows per chunk
  int dv_tile = 0;      // columns of V per block
  int dv_tiles = 0;
  int chunks = 0;       // key chunks
  int key_segments = 1;
  int chunks_per_seg = 1;
  int q_tiles = 0;      // non-causal
  int q_segments = 1;
  int q_tiles_per_seg = 1;
  int dkp = 0, dvp = 0;
  long long state_stride = 0;
  size_t workspace_bytes = 0;
  size_t smem_keys = 0, smem_query = 0;  // dynamic shared memory of kernels 1 and 3
};

inline int CeilDiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

inline size_t MmaSmemQuery(int dk_tile, bool causal) {
  const size_t ld = dk_tile + 8, ldv = kMmaDvTile + 8;
  const size_t stage = causal ? (2 * kMmaChunk * ld + kMmaChunk * ldv) * 2 : kMmaChunk * ld * 2;
  const size_t st = static_cast<size_t>(kMmaDvTile) * (dk_tile + 8) * 4;  // St [64][dk + 8] float
  return 2 * stage + st + static_cast<size_t>(dk_tile) * 4;
}
inline size_t MmaSmemKeys(int dk_tile) {
  const size_t ld = dk_tile + 8, ldv = kMmaDvTile + 8;
  return 2 * (kMmaChunk * ld + kMmaChunk * ldv) * 2;
}
inline size_t SimtSmemQuery(int dk, bool causal) {
  const size_t row = dk + 1;
  size_t floats = kSimtChunk * row            // φQ
                  + kSimtDvTile * row         // St
                  + dk;                       // z
  if (causal) floats += kSimtChunk * row + kSimtChunk * (kSimtDvTile + 1) * 2;  // φK, V, A
  return floats * 4;
}
inline size_t SimtSmemKeys(int dk) { return SimtSmemQuery(dk, /*causal=*/true); }  // same layout

// Returns an empty string, or why the problem cannot run on CUDA.
inline std::string MakePlan(const Problem& p, const DeviceInfo& dev, Plan* out) {
  Plan pl;
  const bool half = p.dtype != DType::kFloat32;
  const bool mma_shape = p.head_dim % 8 == 0 && p.value_dim % 8 == 0 && p.head_dim <= 128;
  pl.path = half && mma_shape && !p.force_simt && dev.cc >= 80 ? Path::kMma : Path::kSimt;
  if (pl.path == Path::kSimt && p.head_dim > kSimtMaxDk) {
    return "head dim " + std::to_string(p.head_dim) + " > " + std::to_string(kSimtMaxDk) +
           " is not supported by the CUDA kernel";
  }
  if (p.batch * p.q_heads > 65535) return "batch * heads > 65535 is not supported by the CUDA kernel";
  if (p.q_len > (int64_t{1} << 30) || p.kv_len > (int64_t{1} << 30)) return "sequence longer than 2^30";
  if (pl.path == Path::kMma) {
    pl.dk_tile = p.head_dim <= 64 ? 64 : 128;
    pl.chunk = kMmaChunk;
    pl.dv_tile = kMmaDvTile;
    pl.smem_keys = MmaSmemKeys(pl.dk_tile);
    pl.smem_query = MmaSmemQuery(pl.dk_tile, p.causal);
  } else {
    pl.dk_tile = static_cast<int>(p.head_dim);
    pl.chunk = kSimtChunk;
    pl.dv_tile = kSimtDvTile;
    pl.smem_keys = SimtSmemKeys(pl.dk_tile);
    pl.smem_query = SimtSmemQuery(pl.dk_tile, p.causal);
  }
  if (std::max(pl.smem_keys, pl.smem_query) > static_cast<size_t>(dev.max_smem_per_block)) {
    return "needs " + std::to_string(std::max(pl.smem_keys, pl.smem_query)) +
           " bytes of shared memory per block; the device allows " + std::to_string(dev.max_smem_per_block);
  }
  pl.dv_tiles = std::max(1, CeilDiv(p.value_dim, pl.dv_tile));
  pl.chunks = CeilDiv(p.kv_len, pl.chunk);
  pl.dkp = pl.dk_tile;
  pl.dvp = pl.dv_tiles * pl.dv_tile;
  pl.state_stride = static_cast<long long>(pl.dkp) * pl.dvp + pl.dkp;
  // Enough blocks to fill the device twice over: split the sequence when there are few heads.
  const int64_t target = 2 * static_cast<int64_t>(std::max(1, dev.sm_count));
  if (p.causal) {
    const int64_t units = p.batch * p.q_heads * pl.dv_tiles;
    int segs = static_cast<int>(std::clamp<int64_t>((target + units - 1) / units, 1, std::max(1, pl.chunks)));
    pl.chunks_per_seg = std::max(1, CeilDiv(pl.chunks, segs));
    pl.key_segments = std::max(1, CeilDiv(pl.chunks, pl.chunks_per_seg));
  } else {
    const int64_t key_units = p.batch * p.kv_heads * pl.dv_tiles;
    int segs = static_cast<int>(std::clamp<int64_t>((target + key_units - 1) / key_units, 1, std::max(1, pl.chunks)));
    pl.chunks_per_seg = std::max(1, CeilDiv(pl.chunks, segs));
    pl.key_segments = std::max(1, CeilDiv(pl.chunks, pl.chunks_per_seg));
    pl.q_tiles = CeilDiv(p.q_len, pl.chunk);
    const int64_t q_units = p.batch * p.q_heads * pl.dv_tiles;
    int qsegs = static_cast<int>(std::clamp<int64_t>((target + q_units - 1) / q_units, 1, std::max(1, pl.q_tiles)));
    pl.q_tiles_per_seg = std::max(1, CeilDiv(pl.q_tiles, qsegs));
    pl.q_segments = std::max(1, CeilDiv(pl.q_tiles, pl.q_tiles_per_seg));
  }
  const bool need_states = !p.causal || pl.key_segments > 1;
  pl.workspace_bytes = need_states ? static_cast<size_t>(p.batch * p.kv_heads) * pl.key_segments *
                                         static_cast<size_t>(pl.state_stride) * sizeof(float)
                                   : 0;
  *out = pl;
  return {};
}

}  // namespace la
}  // namespace attnexport::cuda
