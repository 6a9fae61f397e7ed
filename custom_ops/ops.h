// Every operator of the attnexport domain, per execution provider. register.cc adds them all.
#pragma once
#include "common/ort_api.h"

namespace attnexport {

// CPU kernels (cpu/ops/*.cc)
const OrtCustomOp* LinearAttentionCpuOp();
const OrtCustomOp* SparseAttentionCpuOp();
const OrtCustomOp* LseAttentionCpuOp();
const OrtCustomOp* NystromAttentionCpuOp();

#if defined(ATTNEXPORT_WITH_CUDA)
// CUDA kernels (cuda/*.cu)
const OrtCustomOp* LinearAttentionCudaOp();
const OrtCustomOp* SparseAttentionCudaOp();
const OrtCustomOp* LseAttentionCudaOp();
#endif

}  // namespace attnexport
