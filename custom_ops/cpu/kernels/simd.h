// SIMD helpers for the per-ISA kernel files, written with GCC/Clang vector extensions so that one
// source serves every variant: the vector is 16 floats under AVX-512, 8 under AVX2, 4 on baseline
// x86-64 (SSE2) and other targets. Everything here lives in namespace attnexport::cpu::<isa>::simd,
// so each ISA's copy has its own mangled names and the linker can never merge one variant's
// out-of-line copy into another's (see kernel_api.h).
//
// ATTNEXPORT_SIMD_WIDTH=<4|8|16> forces a vector width (a test build uses it to exercise the
// 16-wide code paths on a machine without AVX-512: GCC then splits each vector into halves).
#pragma once
#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#ifndef ATTNEXPORT_ISA
#error "simd.h is for the per-ISA kernel files (cpu/kernels/*.cc), which define ATTNEXPORT_ISA"
#endif

namespace attnexport::cpu::ATTNEXPORT_ISA::simd {

#if defined(ATTNEXPORT_SIMD_WIDTH)
#define ATTNEXPORT_VEC_FLOATS ATTNEXPORT_SIMD_WIDTH
#elif defined(__AVX512F__)
#define ATTNEXPORT_VEC_FLOATS 16
#elif defined(__AVX__)
#define ATTNEXPORT_VEC_FLOATS 8
#else
#define ATTNEXPORT_VEC_FLOATS 4
#endif
constexpr int kWidth = ATTNEXPORT_VEC_FLOATS;

typedef float Vec __attribute__((vector_size(kWidth * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kWidth * sizeof(int32_t))));
// Unaligned, aliasing views for loads and stores.
typedef float VecU __attribute__((vector_size(kWidth * sizeof(float)), aligned(4), may_alias));

#define ATTNEXPORT_INLINE inline __attribute__((always_inline))

ATTNEXPORT_INLINE Vec Load(const float* p) { return *reinterpret_cast<const VecU*>(p); }
ATTNEXPORT_INLINE void Store(float* p, Vec v) { *reinterpret_cast<VecU*>(p) = v; }
// A broadcast (through the intrinsic where there is one: `Vec{} + x` would keep the add, since +0
// is not an identity for -0, and GCC does not turn a lane loop into one broadcast).
ATTNEXPORT_INLINE Vec Splat(float x) {
#if ATTNEXPORT_VEC_FLOATS == 16 && defined(__AVX512F__)
  return (Vec)_mm512_set1_ps(x);
#elif ATTNEXPORT_VEC_FLOATS == 8 && defined(__AVX__)
  return (Vec)_mm256_set1_ps(x);
#elif ATTNEXPORT_VEC_FLOATS == 4 && defined(__SSE__)
  return (Vec)_mm_set1_ps(x);
#else
  Vec v;
  for (int i = 0; i < kWidth; ++i) v[i] = x;
  return v;
#endif
}
ATTNEXPORT_INLINE Vec Zero() { return Vec{}; }

// A store that bypasses the caches (for output written once and not read back soon): no read for
// ownership of the line. p must be aligned to the vector size. Callers end with StreamFence().
ATTNEXPORT_INLINE void StoreStream(float* p, Vec v) {
#if ATTNEXPORT_VEC_FLOATS == 16 && defined(__AVX512F__)
  _mm512_stream_ps(p, (__m512)v);
#elif ATTNEXPORT_VEC_FLOATS == 8 && defined(__AVX__)
  _mm256_stream_ps(p, (__m256)v);
#elif ATTNEXPORT_VEC_FLOATS == 4 && defined(__SSE__)
  _mm_stream_ps(p, (__m128)v);
#else
  *reinterpret_cast<Vec*>(p) = v;
#endif
}
ATTNEXPORT_INLINE void StreamFence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// Loads the first n (< kWidth) floats of p; the other lanes are 0.
ATTNEXPORT_INLINE Vec LoadPartial(const float* p, int64_t n) {
  Vec v = Zero();
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}
ATTNEXPORT_INLINE void StorePartial(float* p, Vec v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
}
// Lanes at index >= n set to `fill` (0 by default).
ATTNEXPORT_INLINE Vec KeepFirst(Vec v, int64_t n, float fill = 0.f) {
  IVec lane;
  for (int i = 0; i < kWidth; ++i) lane[i] = i;
  return lane < static_cast<int32_t>(n) ? v : Splat(fill);
}

ATTNEXPORT_INLINE float Sum(Vec v) {
  float s = 0.f;
  for (int i = 0; i < kWidth; ++i) s += v[i];
  return s;
}
// Σ_e x[e] y[e] over n entries (vector lanes, then the tail).
ATTNEXPORT_INLINE float Dot(const float* x, const float* y, int64_t n) {
  Vec acc = Zero();
  int64_t e = 0;
  for (; e + kWidth <= n; e += kWidth) acc += Load(x + e) * Load(y + e);
  float total = Sum(acc);
  for (; e < n; ++e) total += x[e] * y[e];
  return total;
}
ATTNEXPORT_INLINE float MaxLane(Vec v) {
  float m = v[0];
  for (int i = 1; i < kWidth; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// e^x for x <= 0 (every exponent the kernels take is a difference from a maximum, or the negative
// side of elu), to about 1 ulp: Cephes' polynomial on [-ln2/2, ln2/2] times 2^n built in the
// exponent bits. Results below the normal range (x < -87.33) are flushed to 0 (an absolute error
// under 1.2e-38); -inf gives 0 and NaN stays NaN (the clamp is a compare-select that NaN passes
// through, and the result is a product of the NaN polynomial). Inputs above 0 are not supported.
ATTNEXPORT_INLINE Vec ExpNonPositive(Vec x) {
  const Vec lo = Splat(-87.33654475f);
  const Vec xc = x < lo ? lo : x;
  const Vec magic = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vec t = xc * 1.44269504088896341f + magic;
  const Vec n = t - magic;
  Vec r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  Vec y = Splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  // 2^n: the low bits of t hold n + 0x400000 (t's exponent is 2^23), so (t_bits + 127 - 0x400000) << 23.
  const IVec e = ((IVec)t + (127 - 0x4B400000)) << 23;
  y = y * (Vec)e;
  return x < lo ? Zero() : y;
}

// elu(x) + 1 (x + 1 above 0, e^x otherwise) and relu; NaN in, NaN out.
ATTNEXPORT_INLINE Vec Elu1(Vec x) {
  const Vec e = ExpNonPositive(x > 0.f ? Zero() : x);
  return x > 0.f ? x + 1.0f : e;
}
ATTNEXPORT_INLINE Vec Relu(Vec x) { return x < 0.f ? Zero() : x; }

}  // namespace attnexport::cpu::ATTNEXPORT_ISA::simd
