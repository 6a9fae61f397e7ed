// Helpers of the CUDA op glue (host compiler, no CUDA headers): the execution provider's device
// allocator and device, per-call scratch memory from ONNX Runtime, element types.
//
// Memory: every device buffer a kernel needs beyond its inputs and outputs comes from ONNX Runtime's
// allocator for the kernel's device: KernelContext_GetScratchBuffer (stream-ordered, from ORT's arena)
// with the allocator's own OrtMemoryInfo, freed through that allocator when the call returns (the
// arena hands the block out again only behind work queued on the same stream). Never cudaMalloc per
// call, never managed memory.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/op_base.h"
#include "common/qkv_inputs.h"
#include "cuda/kernels/entry.h"

namespace attnexport::cuda_ops {

using attnexport::Require;      // common/qkv_inputs.h
using attnexport::ShapeString;

inline bool IsPresent(Ort::KernelContext& ctx, size_t index) {
  if (index >= ctx.GetInputCount()) return false;
  return static_cast<const OrtValue*>(ctx.GetInput(index)) != nullptr;
}

inline cuda::DType DTypeOf(ONNXTensorElementDataType t, const char* what) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return cuda::DType::kFloat32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return cuda::DType::kFloat16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return cuda::DType::kBFloat16;
    default: throw InvalidArgument(std::string(what) + " must be float32, float16 or bfloat16 on CUDA");
  }
}

// The execution provider's default (device) allocator, its device and that device's properties.
class DeviceContext {
 public:
  explicit DeviceContext(const OrtKernelInfo* info) {
    const OrtApi& api = Ort::GetApi();
    Ort::ThrowOnError(api.KernelInfoGetAllocator(info, OrtMemTypeDefault, &allocator_));
    Ort::ThrowOnError(api.AllocatorGetInfo(allocator_, &memory_info_));
    Ort::ThrowOnError(api.MemoryInfoGetId(memory_info_, &device_));
    OrtMemoryInfoDeviceType type = OrtMemoryInfoDeviceType_CPU;
    api.MemoryInfoGetDeviceType(memory_info_, &type);
    if (type != OrtMemoryInfoDeviceType_GPU) {
      Release();
      throw std::runtime_error("the CUDA kernel was given a non-GPU allocator");
    }
    const std::string why = cuda::QueryDevice(device_, &device_info_);
    if (!why.empty()) {
      Release();
      throw std::runtime_error(why);
    }
  }
  ~DeviceContext() { Release(); }
  DeviceContext(const DeviceContext&) = delete;
  DeviceContext& operator=(const DeviceContext&) = delete;

  int device() const { return device_; }
  const cuda::DeviceInfo& info() const { return device_info_; }
  OrtAllocator* allocator() const { return allocator_; }
  const OrtMemoryInfo* memory_info() const { return memory_info_; }

 private:
  void Release() {
    if (allocator_) Ort::GetApi().ReleaseAllocator(allocator_);
    allocator_ = nullptr;
  }
  OrtAllocator* allocator_ = nullptr;
  const OrtMemoryInfo* memory_info_ = nullptr;
  int device_ = 0;
  cuda::DeviceInfo device_info_;
};

// Device scratch for one Compute call.
class Scratch {
 public:
  Scratch(OrtKernelContext* context, const DeviceContext& dev, size_t bytes, bool have_stream) : dev_(dev) {
    if (bytes == 0) return;
    const OrtApi& api = Ort::GetApi();
    if (have_stream) {  // ORT dereferences the compute stream here: only with one
      OrtStatus* status = api.KernelContext_GetScratchBuffer(context, dev.memory_info(), bytes, &ptr_);
      if (status != nullptr) {
        api.ReleaseStatus(status);
        ptr_ = nullptr;
      }
    }
    if (ptr_ == nullptr) ptr_ = dev.allocator()->Alloc(dev.allocator(), bytes);
    if (ptr_ == nullptr) throw std::runtime_error("could not allocate " + std::to_string(bytes) + " bytes of device scratch");
  }
  ~Scratch() {
    if (ptr_) dev_.allocator()->Free(dev_.allocator(), ptr_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* get() const { return ptr_; }

 private:
  const DeviceContext& dev_;
  void* ptr_ = nullptr;
};

// Makes the kernel's device current for the call (ORT may run it on a thread set to another one).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    std::string why = cuda::CurrentDevice(&previous_);
    if (!why.empty()) throw std::runtime_error(why);
    if (previous_ != device) {
      why = cuda::SetDevice(device);
      if (!why.empty()) throw std::runtime_error(why);
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cuda::SetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

}  // namespace attnexport::cuda_ops
