// What the ORT glue (host compiler, no CUDA headers) calls in the CUDA part of the library.
#pragma once
#include <cstddef>
#include <string>

#include "cuda/kernels/linear_attention.h"
#include "cuda/kernels/lse_attention.h"
#include "cuda/kernels/sparse_attention.h"

namespace attnexport::cuda {

// Device properties the plans need; "" or the CUDA error.
std::string QueryDevice(int device, DeviceInfo* info);
// The calling thread's current device; "" or the CUDA error.
std::string CurrentDevice(int* device);
std::string SetDevice(int device);

// LinearAttention: workspace bytes for the problem (0 when it cannot run: MakePlan says why), and
// the launches on `stream` (a cudaStream_t). Returns "" or the reason.
std::string LinearAttentionCuda(const la::Problem& p, const la::Buffers& buffers, void* workspace,
                                size_t workspace_bytes, void* stream, const DeviceInfo& device);

// SparseAttention (no workspace): launches on `stream`; "" or the reason.
std::string SparseAttentionCuda(const sp::Problem& p, const sp::Buffers& buffers, void* stream,
                                const DeviceInfo& device);

// LseAttention: workspace = MakePlan's workspace_bytes; writes Y and present_state on `stream`.
std::string LseAttentionCuda(const lse::Problem& p, const lse::Buffers& buffers, void* workspace,
                             size_t workspace_bytes, void* stream, const DeviceInfo& device);

}  // namespace attnexport::cuda
