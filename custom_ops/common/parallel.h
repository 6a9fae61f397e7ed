// Parallel loops run on ONNX Runtime's intra-op thread pool (KernelContext_ParallelFor), so the
// library never starts threads of its own and honours the session's intra_op_num_threads.
#pragma once
#include <cstddef>
#include <exception>
#include <mutex>

#include "common/ort_api.h"

namespace attnexport {

template <typename Fn>
void ParallelFor(OrtKernelContext* context, size_t total, Fn&& fn) {
  if (total == 0) return;
  if (total == 1 || context == nullptr) {
    for (size_t i = 0; i < total; ++i) fn(i);
    return;
  }
  struct Job {
    Fn* fn;
    std::exception_ptr error;
    std::mutex lock;
  } job{&fn, nullptr, {}};
  auto trampoline = [](void* data, size_t index) {
    Job* j = static_cast<Job*>(data);
    try {
      (*j->fn)(index);
    } catch (...) {
      std::lock_guard<std::mutex> guard(j->lock);
      if (!j->error) j->error = std::current_exception();
    }
  };
  Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(context, trampoline, total, 0, &job));
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace attnexport
