// SparseAttention kernels compiled for the GPU (mma: float16/bfloat16 x 64/128; simt: 3 dtypes).
#include "cuda/kernels/entry.h"
#include "cuda/kernels/runtime.cuh"
#include "cuda/kernels/sparse_attention_run.h"

namespace attnexport::cuda {

std::string SparseAttentionCuda(const sp::Problem& p, const sp::Buffers& buffers, void* stream,
                                const DeviceInfo& device) {
  CudaRuntime rt;
  rt.stream = static_cast<cudaStream_t>(stream);
  return sp::Run(rt, p, buffers, device);
}

}  // namespace attnexport::cuda
