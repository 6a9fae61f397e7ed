// The host side of SparseAttention on CUDA (plan, launch), a template over the runtime R as in
// linear_attention_run.h: the GPU (sparse_attention.cu) and the host emulator run the same code.
#pragma once
#include <algorithm>
#include <cmath>
#include <string>

#include "cuda/kernels/grid.h"
#include "cuda/kernels/sparse_attention.h"
#include "cuda/kernels/sparse_attention_kernels.cuh"

namespace attnexport::cuda::sp {

template <typename R>
std::string Run(R& rt, const Problem& p, const Buffers& buf, const DeviceInfo& dev) {
  const size_t es = p.dtype == DType::kFloat32 ? 4 : 2;
  if (p.batch == 0 || p.q_heads == 0 || p.q_len == 0 || p.value_dim == 0) return {};
  if (p.kv_len == 0) {  // no key at all: every row is 0
    const size_t bytes = static_cast<size_t>(p.q_len * p.value_dim) * es;
    rt.Zero2D(buf.y, bytes, bytes, static_cast<size_t>(p.batch * p.q_heads));
    return {};
  }
  Plan pl;
  std::string why = MakePlan(p, dev, &pl);
  if (!why.empty()) return why;
  Args a{};
  a.q = buf.q;
  a.k = buf.k;
  a.v = buf.v;
  a.mask = buf.mask;
  a.bias = buf.bias;
  a.y = buf.y;
  for (int i = 0; i < 4; ++i) a.bias_stride[i] = p.bias_stride[i];
  a.batch = static_cast<int>(p.batch);
  a.q_heads = static_cast<int>(p.q_heads);
  a.kv_heads = static_cast<int>(p.kv_heads);
  a.q_len = static_cast<int>(p.q_len);
  a.kv_len = static_cast<int>(p.kv_len);
  a.dk = static_cast<int>(p.head_dim);
  a.dv = static_cast<int>(p.value_dim);
  a.group = static_cast<int>(p.q_heads / p.kv_heads);
  a.offset = static_cast<int>(p.kv_len - p.q_len);
  a.scale_log2 = p.scale * 1.4426950408889634f;
  a.causal = p.causal ? 1 : 0;
  a.window_left = p.window_left < 0 ? -1 : Clamp30(p.window_left);
  a.window_right = p.window_right < 0 ? -1 : Clamp30(p.window_right);
  a.dilation = Clamp30(p.dilation);
  a.num_global = Clamp30(p.num_global);
  a.block_size = Clamp30(p.block_size);
  a.num_random_blocks = p.block_size > 0 ? Clamp30(p.num_random_blocks) : 0;
  a.seed = p.seed;
  a.key_tiles = pl.key_tiles;
  a.bitmap_words = pl.bitmap_words;
  const Grid grid{static_cast<unsigned>(pl.q_tiles), static_cast<unsigned>(p.batch * p.q_heads), 1};
  if (pl.path == Path::kMma) {
    if (p.dtype == DType::kFloat16) {
      if (pl.dim == 64) rt.Launch(SparseMma<__half, 64>, grid, kMmaThreads, pl.smem, a);
      else rt.Launch(SparseMma<__half, 128>, grid, kMmaThreads, pl.smem, a);
    } else {
      if (pl.dim == 64) rt.Launch(SparseMma<__nv_bfloat16, 64>, grid, kMmaThreads, pl.smem, a);
      else rt.Launch(SparseMma<__nv_bfloat16, 128>, grid, kMmaThreads, pl.smem, a);
    }
  } else {
    switch (p.dtype) {
      case DType::kFloat32: rt.Launch(SparseSimt<float>, grid, kSimtThreads, pl.smem, a); break;
      case DType::kFloat16: rt.Launch(SparseSimt<__half>, grid, kSimtThreads, pl.smem, a); break;
      case DType::kBFloat16: rt.Launch(SparseSimt<__nv_bfloat16>, grid, kSimtThreads, pl.smem, a); break;
    }
  }
  return rt.Error();
}

}  // namespace attnexport::cuda::sp
