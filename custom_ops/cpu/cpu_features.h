// Which instruction-set variant of the CPU kernels to run. Every file in cpu/kernels/ is compiled
// for baseline x86-64, x86-64-v3 (AVX2+FMA) and x86-64-v4 (AVX-512); the best one the processor
// supports is chosen once. ATTNEXPORT_CPU_ISA=baseline|avx2|avx512 caps the choice (for tests).
#pragma once

namespace attnexport::cpu {

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

Isa SelectedIsa();
const char* IsaName(Isa isa);

// Picks the variant of a kernel function for the selected ISA.
template <typename Fn>
Fn PickIsa(Fn baseline, Fn avx2, Fn avx512) {
  switch (SelectedIsa()) {
    case Isa::kAvx512: return avx512;
    case Isa::kAvx2: return avx2;
    default: return baseline;
  }
}

}  // namespace attnexport::cpu

// Declares `signature` in the three ISA namespaces of attnexport::cpu (kernels/<file>.cc defines it
// once, in namespace attnexport::cpu::ATTNEXPORT_ISA). ISA_DISPATCH(name) yields the chosen variant.
#if defined(ATTNEXPORT_HAVE_X86_VARIANTS)
#define ATTNEXPORT_DECLARE_ISA_KERNEL(signature)     \
  namespace attnexport::cpu::baseline { signature; } \
  namespace attnexport::cpu::avx2 { signature; }     \
  namespace attnexport::cpu::avx512 { signature; }
#define ATTNEXPORT_ISA_DISPATCH(name) \
  ::attnexport::cpu::PickIsa(&::attnexport::cpu::baseline::name, &::attnexport::cpu::avx2::name, &::attnexport::cpu::avx512::name)
#else
#define ATTNEXPORT_DECLARE_ISA_KERNEL(signature) \
  namespace attnexport::cpu::baseline { signature; }
#define ATTNEXPORT_ISA_DISPATCH(name) (&::attnexport::cpu::baseline::name)
#endif
