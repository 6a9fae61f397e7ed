// Device queries for the ORT glue (which is compiled without CUDA headers).
#include <cuda_runtime.h>

#include "cuda/kernels/entry.h"

#ifndef ATTNEXPORT_CUDA_ARCHITECTURES_STRING
#define ATTNEXPORT_CUDA_ARCHITECTURES_STRING "?"
#endif

namespace attnexport::cuda {

namespace {
std::string Why(const char* what, cudaError_t e) { return std::string(what) + ": " + cudaGetErrorString(e); }
}  // namespace

namespace {
__global__ void AttnexportProbe() {}
}  // namespace

std::string QueryDevice(int device, DeviceInfo* info) {
  int sms = 0, smem = 0, major = 0, minor = 0;
  cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return Why("cudaDeviceGetAttribute(multiprocessors)", e);
  e = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) return Why("cudaDeviceGetAttribute(shared memory)", e);
  e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (e != cudaSuccess) return Why("cudaDeviceGetAttribute(compute capability)", e);
  info->sm_count = sms;
  info->max_smem_per_block = smem;
  info->cc = major * 10 + minor;
  // Is there code for this device in the library (SASS of its architecture, or PTX it can compile)?
  int current = 0;
  e = cudaGetDevice(&current);
  if (e != cudaSuccess) return Why("cudaGetDevice", e);
  if (current != device && (e = cudaSetDevice(device)) != cudaSuccess) return Why("cudaSetDevice", e);
  cudaFuncAttributes attributes;
  e = cudaFuncGetAttributes(&attributes, AttnexportProbe);
  if (current != device) cudaSetDevice(current);
  if (e != cudaSuccess) {
    return "the attnexport op library has no code for this GPU (compute capability " + std::to_string(major) + "." +
           std::to_string(minor) + "; built for " ATTNEXPORT_CUDA_ARCHITECTURES_STRING
           "): rebuild with ATTNEXPORT_CUDA_ARCHITECTURES including " + std::to_string(major * 10 + minor) + " (" +
           cudaGetErrorString(e) + ")";
  }
  return {};
}

std::string CurrentDevice(int* device) {
  const cudaError_t e = cudaGetDevice(device);
  return e == cudaSuccess ? std::string() : Why("cudaGetDevice", e);
}

std::string SetDevice(int device) {
  const cudaError_t e = cudaSetDevice(device);
  return e == cudaSuccess ? std::string() : Why("cudaSetDevice", e);
}

}  // namespace attnexport::cuda
