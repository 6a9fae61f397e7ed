// LinearAttention kernels compiled for the GPU; linear_attention_run.h instantiates the kernels
// (mma: float16/bfloat16 x dk 64/128; simt: float32/float16/bfloat16).
#include "cuda/kernels/entry.h"
#include "cuda/kernels/linear_attention_run.h"
#include "cuda/kernels/runtime.cuh"

namespace attnexport::cuda {

std::string LinearAttentionCuda(const la::Problem& p, const la::Buffers& buffers, void* workspace,
                                size_t workspace_bytes, void* stream, const DeviceInfo& device) {
  CudaRuntime rt;
  rt.stream = static_cast<cudaStream_t>(stream);
  return la::Run(rt, p, buffers, workspace, workspace_bytes, device);
}

}  // namespace attnexport::cuda
