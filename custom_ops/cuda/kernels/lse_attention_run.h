// The host side of LseAttention on CUDA (plan, launches), a template over the runtime R as in
// linear_attention_run.h: the GPU (lse_attention.cu) and the host emulator run the same code.
#pragma once
#include <algorithm>
#include <cmath>
#include <string>

#include "cuda/kernels/grid.h"
#include "cuda/kernels/lse_attention.h"
#include "cuda/kernels/lse_attention_kernels.cuh"

namespace attnexport::cuda::lse {

template <typename R, typename T>
void Launches(R& rt, Args a, const Plan& pl, const Problem& p, const DeviceInfo& dev) {
  const unsigned dvt = static_cast<unsigned>(pl.dv_tiles);
  const unsigned kv_bh = static_cast<unsigned>(p.batch * p.kv_heads), q_bh = static_cast<unsigned>(p.batch * p.q_heads);
  const unsigned dk = static_cast<unsigned>(p.head_dim);
  if (pl.segments > 0) {  // every key of the call, per segment; then past ⊕ the prefixes
    rt.Launch(LseKeys<T>, Grid{static_cast<unsigned>(pl.segments), dvt, kv_bh}, kThreads, pl.smem_keys, a);
    rt.Launch(LseScan, Grid{dk, kv_bh, 1}, kThreads, 0, a, pl.segments);
  }
  rt.Launch(LsePresent, Grid{dk, kv_bh, 1}, kThreads, 0, a, pl.segments);
  if (p.q_len == 0 || p.value_dim == 0) return;
  // Rows that see the past only (causal rows before this call's first key), or every row (non-causal).
  const int64_t past_rows = p.causal ? std::min<int64_t>(std::max<int64_t>(p.q_len - p.kv_len, 0), p.q_len) : p.q_len;
  if (past_rows > 0) {
    Args b = a;
    b.row_begin = 0;
    b.row_end = static_cast<int>(past_rows);
    b.q_tiles = CeilDiv64(past_rows, kChunk);
    const int64_t q_units = static_cast<int64_t>(q_bh) * dvt;
    const int64_t target = 2 * static_cast<int64_t>(std::max(1, dev.sm_count));
    const int qsegs = static_cast<int>(std::clamp<int64_t>((target + q_units - 1) / q_units, 1, std::max(1, b.q_tiles)));
    b.q_tiles_per_seg = std::max(1, CeilDiv64(b.q_tiles, qsegs));
    const unsigned segs = static_cast<unsigned>(CeilDiv64(b.q_tiles, b.q_tiles_per_seg));
    const int slot = p.causal || pl.segments == 0 ? -1 : pl.segments - 1;
    rt.Launch(LseQuery<T>, Grid{segs, dvt, q_bh}, kThreads, pl.smem_query, b, slot);
  }
  if (p.causal && pl.segments > 0) {
    rt.Launch(LseCausal<T>, Grid{static_cast<unsigned>(pl.segments), dvt, q_bh}, kThreads, pl.smem_causal, a);
  }
}

// Returns "" or the reason nothing was launched. `workspace` must hold plan.workspace_bytes.
template <typename R>
std::string Run(R& rt, const Problem& p, const Buffers& buf, void* workspace, size_t workspace_bytes,
                const DeviceInfo& dev) {
  if (p.batch == 0 || p.kv_heads == 0 || p.head_dim == 0) return {};
  Plan pl;
  std::string why = MakePlan(p, dev, &pl);
  if (!why.empty()) return why;
  if (workspace_bytes < pl.workspace_bytes) return "workspace too small";
  Args a{};
  a.q = buf.q;
  a.k = buf.k;
  a.v = buf.v;
  a.mask = buf.mask;
  a.past = buf.past;
  for (int i = 0; i < 4; ++i) a.past_stride[i] = p.past_stride[i];
  a.y = buf.y;
  a.present = buf.present;
  a.states = static_cast<float*>(workspace);
  a.batch = static_cast<int>(p.batch);
  a.q_heads = static_cast<int>(p.q_heads);
  a.kv_heads = static_cast<int>(p.kv_heads);
  a.q_len = static_cast<int>(p.q_len);
  a.kv_len = static_cast<int>(p.kv_len);
  a.dk = static_cast<int>(p.head_dim);
  a.dv = static_cast<int>(p.value_dim);
  a.group = static_cast<int>(p.q_heads / p.kv_heads);
  a.offset = static_cast<int>(p.kv_len - p.q_len);
  a.root = std::sqrt(p.scale);
  a.chunks = pl.chunks;
  a.chunks_per_seg = pl.chunks_per_seg;
  a.segments = pl.segments;
  a.q_tiles = pl.q_tiles;
  a.q_tiles_per_seg = pl.q_tiles_per_seg;
  a.row_begin = 0;
  a.row_end = static_cast<int>(p.q_len);
  a.dvp = pl.dvp;
  a.state_stride = pl.state_stride;
  switch (p.dtype) {
    case DType::kFloat32: Launches<R, float>(rt, a, pl, p, dev); break;
    case DType::kFloat16: Launches<R, __half>(rt, a, pl, p, dev); break;
    case DType::kBFloat16: Launches<R, __nv_bfloat16>(rt, a, pl, p, dev); break;
  }
  return rt.Error();
}

}  // namespace attnexport::cuda::lse
