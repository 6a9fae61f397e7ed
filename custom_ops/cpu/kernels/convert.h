// float16 <-> float32 conversion of whole tensors (the CPU glue stages float16 inputs as float32),
// per ISA: F16C instructions where the variant has them (x86-64-v3 and up).
#pragma once
#include <cstddef>
#include <cstdint>

#include "cpu/cpu_features.h"

ATTNEXPORT_DECLARE_ISA_KERNEL(void HalfToFloat(const uint16_t* src, float* dst, size_t count))
ATTNEXPORT_DECLARE_ISA_KERNEL(void FloatToHalf(const float* src, uint16_t* dst, size_t count))
