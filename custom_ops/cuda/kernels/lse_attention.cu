// LseAttention kernels compiled for the GPU (float32 math; float32, float16 and bfloat16 inputs).
#include "cuda/kernels/entry.h"
#include "cuda/kernels/lse_attention_run.h"
#include "cuda/kernels/runtime.cuh"

namespace attnexport::cuda {

std::string LseAttentionCuda(const lse::Problem& p, const lse::Buffers& buffers, void* workspace,
                             size_t workspace_bytes, void* stream, const DeviceInfo& device) {
  CudaRuntime rt;
  rt.stream = static_cast<cudaStream_t>(stream);
  return lse::Run(rt, p, buffers, workspace, workspace_bytes, device);
}

}  // namespace attnexport::cuda
