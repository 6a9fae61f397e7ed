// float16 <-> float32 conversion, compiled once per ISA (namespace attnexport::cpu::ATTNEXPORT_ISA).
// IEEE binary16 through the compiler's _Float16: round to nearest even, NaN and inf kept.
#include "cpu/kernels/convert.h"

#include <cstring>

namespace attnexport::cpu::ATTNEXPORT_ISA {

void HalfToFloat(const uint16_t* src, float* dst, size_t count) {
  const _Float16* h = reinterpret_cast<const _Float16*>(src);
  for (size_t i = 0; i < count; ++i) dst[i] = static_cast<float>(h[i]);
}

void FloatToHalf(const float* src, uint16_t* dst, size_t count) {
  _Float16* h = reinterpret_cast<_Float16*>(dst);
  for (size_t i = 0; i < count; ++i) h[i] = static_cast<_Float16>(src[i]);
}

}  // namespace attnexport::cpu::ATTNEXPORT_ISA
