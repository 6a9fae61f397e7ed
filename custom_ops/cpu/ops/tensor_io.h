// Helpers the CPU op glue shares: input access with shape checks, float16 <-> float32 staging,
// the thread-pool and scratch adapters handed to the per-ISA kernels.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/op_base.h"
#include "cpu/kernels/kernel_api.h"

namespace attnexport::cpu {

inline std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

inline void Require(bool condition, const std::string& message) {
  if (!condition) throw InvalidArgument(message);
}

inline int64_t ElementCount(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Owns 64-byte aligned scratch blocks for the duration of one Compute call.
class ScratchArena {
 public:
  ScratchArena() = default;
  ScratchArena(const ScratchArena&) = delete;
  ScratchArena& operator=(const ScratchArena&) = delete;
  ~ScratchArena() {
    for (void* p : blocks_) std::free(p);
  }
  void* Allocate(size_t bytes) {
    size_t rounded = ((bytes + 63) / 64) * 64;
    void* p = std::aligned_alloc(64, rounded ? rounded : 64);
    if (p == nullptr) throw std::bad_alloc();
    blocks_.push_back(p);
    return p;
  }
  Scratch Handle() {
    Scratch s;
    s.context = this;
    s.allocate = [](void* self, size_t bytes) { return static_cast<ScratchArena*>(self)->Allocate(bytes); };
    return s;
  }

 private:
  std::vector<void*> blocks_;
};

inline ThreadPool PoolOf(OrtKernelContext* context) {
  ThreadPool pool;
  pool.context = context;
  pool.parallel_for = [](void* ctx, size_t total, void (*fn)(void*, size_t), void* data) {
    Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(static_cast<OrtKernelContext*>(ctx), fn, total, 0, data));
  };
  return pool;
}

// A float tensor input seen as float32: float16 inputs are converted into arena memory.
inline const float* AsFloat32(const Ort::ConstValue& value, ScratchArena& arena) {
  auto info = value.GetTensorTypeAndShapeInfo();
  const size_t count = info.GetElementCount();
  switch (info.GetElementType()) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return value.GetTensorData<float>();
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: {
      const Ort::Float16_t* src = value.GetTensorData<Ort::Float16_t>();
      float* dst = static_cast<float*>(arena.Allocate(count * sizeof(float)));
      for (size_t i = 0; i < count; ++i) dst[i] = src[i].ToFloat();
      return dst;
    }
    default:
      throw InvalidArgument("expected a float32 or float16 tensor");
  }
}

inline bool IsPresent(const Ort::KernelContext& ctx, size_t index) {
  if (index >= ctx.GetInputCount()) return false;
  return static_cast<bool>(ctx.GetInput(index));
}

}  // namespace attnexport::cpu
