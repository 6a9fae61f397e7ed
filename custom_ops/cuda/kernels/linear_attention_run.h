// The host side of LinearAttention on CUDA: plan, then the kernel launches. A template over the
// runtime R, so the same code launches on a GPU (linear_attention.cu: CUDA streams) and in the host
// emulator (cuda/emu/runner.cc). R provides
//   Launch(kernel, Grid, threads, dynamic smem bytes, args...)  and  Zero2D(ptr, pitch, width, height).
#pragma once
#include <algorithm>
#include <cmath>
#include <string>

#include "cuda/kernels/grid.h"
#include "cuda/kernels/linear_attention.h"
#include "cuda/kernels/linear_attention_kernels.cuh"

namespace attnexport::cuda {
namespace la {

inline size_t ElementSize(DType t) { return t == DType::kFloat32 ? 4 : 2; }

template <typename R>
void LaunchScan(R& rt, const Args& a, int count, int kv_bh) {
  if (count <= 1) return;
  const unsigned blocks = static_cast<unsigned>((a.state_stride + 255) / 256);
  rt.Launch(LaScan, Grid{blocks, static_cast<unsigned>(kv_bh), 1}, 256, 0, a.states, count, a.segments,
            a.state_stride);
}

template <typename R, typename T, int DK>
void RunMma(R& rt, const Args& a, const Plan& pl, bool causal, unsigned kv_bh, unsigned q_bh) {
  const unsigned dvt = static_cast<unsigned>(pl.dv_tiles);
  if (causal) {
    if (pl.key_segments > 1) {  // states of all segments but the last, then their prefix sums
      rt.Launch(LaKeysMma<T, DK>, Grid{static_cast<unsigned>(pl.key_segments - 1), dvt, kv_bh}, kThreads,
                pl.smem_keys, a);
      LaunchScan(rt, a, pl.key_segments - 1, static_cast<int>(kv_bh));
    }
    rt.Launch(LaCausalMma<T, DK>, Grid{static_cast<unsigned>(pl.key_segments), dvt, q_bh}, kThreads, pl.smem_query, a);
  } else {
    rt.Launch(LaKeysMma<T, DK>, Grid{static_cast<unsigned>(pl.key_segments), dvt, kv_bh}, kThreads, pl.smem_keys, a);
    LaunchScan(rt, a, pl.key_segments, static_cast<int>(kv_bh));
    rt.Launch(LaQueryMma<T, DK>, Grid{static_cast<unsigned>(pl.q_segments), dvt, q_bh}, kThreads, pl.smem_query, a);
  }
}

template <typename R, typename T>
void RunSimt(R& rt, const Args& a, const Plan& pl, bool causal, unsigned kv_bh, unsigned q_bh) {
  const unsigned dvt = static_cast<unsigned>(pl.dv_tiles);
  if (causal) {
    if (pl.key_segments > 1) {
      rt.Launch(LaKeysSimt<T>, Grid{static_cast<unsigned>(pl.key_segments - 1), dvt, kv_bh}, kThreads, pl.smem_keys, a);
      LaunchScan(rt, a, pl.key_segments - 1, static_cast<int>(kv_bh));
    }
    rt.Launch(LaCausalSimt<T>, Grid{static_cast<unsigned>(pl.key_segments), dvt, q_bh}, kThreads, pl.smem_query, a);
  } else {
    rt.Launch(LaKeysSimt<T>, Grid{static_cast<unsigned>(pl.key_segments), dvt, kv_bh}, kThreads, pl.smem_keys, a);
    LaunchScan(rt, a, pl.key_segments, static_cast<int>(kv_bh));
    rt.Launch(LaQuerySimt<T>, Grid{static_cast<unsigned>(pl.q_segments), dvt, q_bh}, kThreads, pl.smem_query, a);
  }
}

// Returns "" or the reason nothing was launched. `workspace` must hold plan.workspace_bytes.
template <typename R>
std::string Run(R& rt, const Problem& p, const Buffers& buf, void* workspace, size_t workspace_bytes,
                const DeviceInfo& dev) {
  const size_t es = ElementSize(p.dtype);
  if (p.batch == 0 || p.q_heads == 0 || p.q_len == 0 || p.value_dim == 0) return {};
  const size_t y_row_bytes = static_cast<size_t>(p.value_dim) * es;
  if (p.kv_len == 0) {  // no key at all: every row is 0
    rt.Zero2D(buf.y, y_row_bytes * p.q_len, y_row_bytes * p.q_len, static_cast<size_t>(p.batch * p.q_heads));
    return {};
  }
  Plan pl;
  std::string why = MakePlan(p, dev, &pl);
  if (!why.empty()) return why;
  if (workspace_bytes < pl.workspace_bytes) return "workspace too small";
  Args a{};
  a.q = buf.q;
  a.k = buf.k;
  a.v = buf.v;
  a.mask = buf.mask;
  a.y = buf.y;
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
  a.eps = p.eps;
  a.relu = p.feature_map == FeatureMap::kRelu ? 1 : 0;
  a.chunks = pl.chunks;
  a.chunks_per_seg = pl.chunks_per_seg;
  a.segments = pl.key_segments;
  a.q_tiles = pl.q_tiles;
  a.q_tiles_per_seg = pl.q_tiles_per_seg;
  a.dkp = pl.dkp;
  a.dvp = pl.dvp;
  a.state_stride = pl.state_stride;
  if (p.causal && a.offset < 0) {  // rows i < -offset see no key
    const size_t rows = static_cast<size_t>(std::min<int64_t>(-a.offset, p.q_len));
    rt.Zero2D(buf.y, y_row_bytes * p.q_len, y_row_bytes * rows, static_cast<size_t>(p.batch * p.q_heads));
  }
  const unsigned kv_bh = static_cast<unsigned>(p.batch * p.kv_heads), q_bh = static_cast<unsigned>(p.batch * p.q_heads);
  if (pl.path == Path::kMma) {
    if (p.dtype == DType::kFloat16) {
      if (pl.dk_tile == 64) RunMma<R, __half, 64>(rt, a, pl, p.causal, kv_bh, q_bh);
      else RunMma<R, __half, 128>(rt, a, pl, p.causal, kv_bh, q_bh);
    } else {
      if (pl.dk_tile == 64) RunMma<R, __nv_bfloat16, 64>(rt, a, pl, p.causal, kv_bh, q_bh);
      else RunMma<R, __nv_bfloat16, 128>(rt, a, pl, p.causal, kv_bh, q_bh);
    }
  } else {
    switch (p.dtype) {
      case DType::kFloat32: RunSimt<R, float>(rt, a, pl, p.causal, kv_bh, q_bh); break;
      case DType::kFloat16: RunSimt<R, __half>(rt, a, pl, p.causal, kv_bh, q_bh); break;
      case DType::kBFloat16: RunSimt<R, __nv_bfloat16>(rt, a, pl, p.causal, kv_bh, q_bh); break;
    }
  }
  return rt.Error();
}

}  // namespace la
}  // namespace attnexport::cuda
