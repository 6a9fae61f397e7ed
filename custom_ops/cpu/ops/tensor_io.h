// Helpers the CPU op glue shares: input access with shape checks, float16 <-> float32 staging,
// the thread-pool and scratch adapters handed to the per-ISA kernels.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/op_base.h"
#include "common/qkv_inputs.h"
#include "cpu/kernels/convert.h"
#include "cpu/kernels/kernel_api.h"

namespace attnexport::cpu {

using attnexport::Require;      // common/qkv_inputs.h
using attnexport::ShapeString;

inline int64_t ElementCount(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Owns 64-byte aligned scratch blocks for the duration of one Compute call. Constructed with the
// kernel context, it takes them from ONNX Runtime's CPU allocator (an arena: memory is reused from
// call to call instead of being mapped and zeroed by the OS each time); default-constructed, from
// aligned_alloc. Allocate is not thread-safe: call it outside parallel regions.
class ScratchArena {
 public:
  ScratchArena() = default;
  explicit ScratchArena(OrtKernelContext* context) {
    const OrtApi& api = Ort::GetApi();
    OrtMemoryInfo* info = nullptr;
    if (OrtStatus* status = api.CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &info)) {
      api.ReleaseStatus(status);
      return;
    }
    if (OrtStatus* status = api.KernelContext_GetAllocator(context, info, &allocator_)) {
      api.ReleaseStatus(status);
      allocator_ = nullptr;
    }
    api.ReleaseMemoryInfo(info);
  }
  ScratchArena(const ScratchArena&) = delete;
  ScratchArena& operator=(const ScratchArena&) = delete;
  ~ScratchArena() {
    for (void* p : blocks_) {
      if (allocator_) allocator_->Free(allocator_, p);
      else std::free(p);
    }
    if (allocator_) Ort::GetApi().ReleaseAllocator(allocator_);
  }
  void* Allocate(size_t bytes) {
    size_t rounded = ((bytes + 63) / 64) * 64;
    if (rounded == 0) rounded = 64;
    if (allocator_) {
      void* raw = allocator_->Alloc(allocator_, rounded + 64);
      if (raw == nullptr) throw std::bad_alloc();
      blocks_.push_back(raw);
      const uintptr_t address = reinterpret_cast<uintptr_t>(raw);
      return reinterpret_cast<void*>((address + 63) / 64 * 64);
    }
    void* p = std::aligned_alloc(64, rounded);
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
  OrtAllocator* allocator_ = nullptr;
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

// How many threads ORT's intra-op pool probably has: the C API does not tell a kernel, so this is
// the machine's hardware concurrency (ORT's default pool size). Kernels use it only to decide how
// finely to split work; results never depend on it.
inline int64_t ParallelismHint() {
  static const int64_t hint = [] {
    const unsigned n = std::thread::hardware_concurrency();
    return static_cast<int64_t>(n == 0 ? 1 : n);
  }();
  return hint;
}

// float16 <-> float32 of `count` elements, in blocks on the pool (ISA variant: F16C where present).
inline void ConvertHalfToFloat(const uint16_t* src, float* dst, size_t count, const ThreadPool& pool) {
  constexpr size_t kBlock = size_t{1} << 16;
  const size_t blocks = (count + kBlock - 1) / kBlock;
  const auto convert = ATTNEXPORT_ISA_DISPATCH(HalfToFloat);
  auto body = [&](size_t b) {
    const size_t begin = b * kBlock, n = count - begin < kBlock ? count - begin : kBlock;
    convert(src + begin, dst + begin, n);
  };
  pool.For(blocks, body);
}

inline void ConvertFloatToHalf(const float* src, uint16_t* dst, size_t count, const ThreadPool& pool) {
  constexpr size_t kBlock = size_t{1} << 16;
  const size_t blocks = (count + kBlock - 1) / kBlock;
  const auto convert = ATTNEXPORT_ISA_DISPATCH(FloatToHalf);
  auto body = [&](size_t b) {
    const size_t begin = b * kBlock, n = count - begin < kBlock ? count - begin : kBlock;
    convert(src + begin, dst + begin, n);
  };
  pool.For(blocks, body);
}

// A float tensor input seen as float32: float16 inputs are converted into arena memory (on the
// pool when one is given).
inline const float* AsFloat32(const Ort::ConstValue& value, ScratchArena& arena, const ThreadPool& pool) {
  auto info = value.GetTensorTypeAndShapeInfo();
  const size_t count = info.GetElementCount();
  switch (info.GetElementType()) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return value.GetTensorData<float>();
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: {
      static_assert(sizeof(Ort::Float16_t) == sizeof(uint16_t), "Ort::Float16_t is 16 bits");
      const uint16_t* src = reinterpret_cast<const uint16_t*>(value.GetTensorData<Ort::Float16_t>());
      float* dst = static_cast<float*>(arena.Allocate(count * sizeof(float)));
      ConvertHalfToFloat(src, dst, count, pool);
      return dst;
    }
    default:
      throw InvalidArgument("expected a float32 or float16 tensor");
  }
}

inline const float* AsFloat32(const Ort::ConstValue& value, ScratchArena& arena) {
  return AsFloat32(value, arena, ThreadPool{});
}

// A float tensor as a full float32 array of shape `full`: the input itself when it has that shape and
// is float32, otherwise converted and numpy-broadcast into arena memory (a recurrent state input may be
// the [1, 1] zeros attach_functions gives a node without a state). Throws InvalidArgument naming `what`
// when the shape does not broadcast.
inline const float* BroadcastToFloat32(const Ort::ConstValue& value, const std::vector<int64_t>& full, const char* what,
                                       ScratchArena& arena, const ThreadPool& pool) {
  const auto shape = value.GetTensorTypeAndShapeInfo().GetShape();
  const float* data = AsFloat32(value, arena, pool);
  if (shape == full) return data;
  const std::string message = std::string(what) + " " + ShapeString(shape) + " does not broadcast to " + ShapeString(full);
  Require(shape.size() <= full.size(), message);
  std::vector<int64_t> dims(full.size() - shape.size(), 1);
  dims.insert(dims.end(), shape.begin(), shape.end());
  for (size_t i = 0; i < full.size(); ++i) Require(dims[i] == 1 || dims[i] == full[i], message);
  const int64_t count = ElementCount(full);
  float* out = static_cast<float*>(arena.Allocate(static_cast<size_t>(count) * sizeof(float)));
  std::vector<int64_t> strides(full.size(), 0);
  for (int64_t i = static_cast<int64_t>(full.size()) - 1, stride = 1; i >= 0; --i) {
    strides[i] = dims[i] == 1 ? 0 : stride;
    stride *= dims[i];
  }
  std::vector<int64_t> index(full.size(), 0);
  for (int64_t flat = 0; flat < count; ++flat) {
    int64_t src = 0;
    for (size_t i = 0; i < full.size(); ++i) src += index[i] * strides[i];
    out[flat] = data[src];
    for (int64_t i = static_cast<int64_t>(full.size()) - 1; i >= 0; --i) {
      if (++index[i] < full[i]) break;
      index[i] = 0;
    }
  }
  return out;
}

inline bool IsPresent(const Ort::KernelContext& ctx, size_t index) {
  if (index >= ctx.GetInputCount()) return false;
  return static_cast<bool>(ctx.GetInput(index));
}

// An optional float32 output (a present_state): its buffer, or null when the node does not produce it.
inline float* OptionalFloat32Output(Ort::KernelContext& ctx, size_t index, const std::vector<int64_t>& shape) {
  if (ctx.GetOutputCount() <= index) return nullptr;
  return ctx.GetOutput(index, shape).GetTensorMutableData<float>();
}

// An output of Q's element type that a float32 kernel writes: the output's own memory when it is
// float32, else a float32 staging buffer that Finish() converts into the float16 output.
class Float32Output {
 public:
  Float32Output(Ort::KernelContext& ctx, size_t index, const std::vector<int64_t>& shape, ONNXTensorElementDataType dtype,
                ScratchArena& arena)
      : value_(ctx.GetOutput(index, shape)), count_(ElementCount(shape)), dtype_(dtype) {
    data_ = dtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
                ? value_.GetTensorMutableData<float>()
                : static_cast<float*>(arena.Allocate(static_cast<size_t>(count_) * sizeof(float)));
  }
  float* data() const { return data_; }
  int64_t count() const { return count_; }
  void Finish(const ThreadPool& pool) {
    if (dtype_ != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) return;
    uint16_t* out = reinterpret_cast<uint16_t*>(value_.GetTensorMutableData<Ort::Float16_t>());
    ConvertFloatToHalf(data_, out, static_cast<size_t>(count_), pool);
  }

 private:
  Ort::UnownedValue value_;
  int64_t count_;
  ONNXTensorElementDataType dtype_;
  float* data_;
};

}  // namespace attnexport::cpu
