#include "cpu/cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace attnexport::cpu {
namespace {

Isa DetectIsa() {
#if defined(ATTNEXPORT_HAVE_X86_VARIANTS) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // x86-64-v4 as GCC targets it: AVX-512 F, BW, CD, DQ, VL (and everything in v3).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi2")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
      __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kBaseline;
}

Isa CapFromEnvironment(Isa detected) {
  const char* cap = std::getenv("ATTNEXPORT_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return detected;
  Isa wanted = detected;
  if (std::strcmp(cap, "baseline") == 0) wanted = Isa::kBaseline;
  else if (std::strcmp(cap, "avx2") == 0) wanted = Isa::kAvx2;
  else if (std::strcmp(cap, "avx512") == 0) wanted = Isa::kAvx512;
  return static_cast<int>(wanted) < static_cast<int>(detected) ? wanted : detected;
}

}  // namespace

Isa SelectedIsa() {
  static const Isa isa = CapFromEnvironment(DetectIsa());
  return isa;
}

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace attnexport::cpu
