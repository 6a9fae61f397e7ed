// What the per-ISA kernel files see of the outside world: plain structs and a thread-pool handle.
// They include no ONNX Runtime or standard-library container headers, because each of them is
// compiled three times with different -march flags and out-of-line copies of shared inline code
// could otherwise be merged across variants by the linker.
#pragma once
#include <cstddef>
#include <cstdint>

namespace attnexport::cpu {

// ONNX Runtime's intra-op pool, reached through a function pointer set by the op glue.
struct ThreadPool {
  void* context = nullptr;
  void (*parallel_for)(void* context, size_t total, void (*fn)(void*, size_t), void* data) = nullptr;

  template <typename Fn>
  void For(size_t total, Fn& fn) const {
    if (total == 0) return;
    if (parallel_for == nullptr || total == 1) {
      for (size_t i = 0; i < total; ++i) fn(i);
      return;
    }
    parallel_for(context, total, [](void* data, size_t i) { (*static_cast<Fn*>(data))(i); }, &fn);
  }
};

// A scratch allocator supplied by the glue (64-byte aligned, freed by the glue after the call).
struct Scratch {
  void* context = nullptr;
  void* (*allocate)(void* context, size_t bytes) = nullptr;
  template <typename T>
  T* Get(size_t count) const { return static_cast<T*>(allocate(context, count * sizeof(T))); }
};

}  // namespace attnexport::cpu
