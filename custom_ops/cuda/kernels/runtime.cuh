// The CUDA-runtime side of a launch (nvcc only): the R of the *_run.h templates. Kernels go on the
// given stream (ONNX Runtime's compute stream); the first error is kept and reported.
#pragma once
#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "cuda/kernels/grid.h"

namespace attnexport::cuda {

struct CudaRuntime {
  cudaStream_t stream = nullptr;
  std::string error;

  template <typename... P, typename... A>
  void Launch(void (*kernel)(P...), Grid g, int threads, size_t smem, A&&... args) {
    if (!error.empty()) return;
    if (smem > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (e != cudaSuccess) {
        error = std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(e);
        return;
      }
    }
    kernel<<<dim3(g.x, g.y, g.z), threads, smem, stream>>>(std::forward<A>(args)...);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) error = std::string("kernel launch: ") + cudaGetErrorString(e);
  }

  void Zero2D(void* ptr, size_t pitch, size_t width, size_t height) {
    if (!error.empty() || width == 0 || height == 0) return;
    const cudaError_t e = cudaMemset2DAsync(ptr, pitch, 0, width, height, stream);
    if (e != cudaSuccess) error = std::string("cudaMemset2DAsync: ") + cudaGetErrorString(e);
  }

  std::string Error() const { return error; }
};

}  // namespace attnexport::cuda
