// The few device primitives the attnexport CUDA kernels use, in two implementations:
//  - CUDA (nvcc, device pass): inline PTX (ldmatrix, mma.sync, cp.async) and the usual intrinsics;
//  - host emulation (ATTNEXPORT_CUDA_EMULATION, any C++20 host compiler): the same functions
//    implemented from the PTX ISA's fragment tables on a host model of the CUDA execution model
//    (cuda/emu/emulator.h: one std::thread per CUDA thread, barriers for __syncthreads and warp
//    collectives), so the real kernel code runs on a CPU in the tests.
// Kernels are written only against this header (no threadIdx, __syncthreads, asm or __shared__ in
// kernel code): every line of a kernel is what the emulator runs.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(ATTNEXPORT_CUDA_EMULATION)
#include <atomic>
#include <cmath>

#include "cuda/emu/emulator.h"
#define AX_DEVICE inline
#define AX_GLOBAL
#define AX_HD inline
#define AX_RESTRICT
#define AX_LAUNCH_BOUNDS(n)
#define AX_NOINLINE_DEVICE inline
#else
#include <cuda_runtime.h>
#define AX_DEVICE __device__ __forceinline__
#define AX_GLOBAL __global__
#define AX_HD __host__ __device__ __forceinline__
#define AX_RESTRICT __restrict__
#define AX_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#define AX_NOINLINE_DEVICE __device__ __noinline__
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Tensor-core and async-copy primitives need sm_80. A build that also targets an older architecture
// (ATTNEXPORT_CUDA_ARCHITECTURES=75, say) compiles them to a trap there; the plans never choose the
// kernels that use them on such a device (DeviceInfo::cc).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define AX_OLD_ARCH 1
#endif

namespace attnexport::cuda::dev {

// -- where am I ----------------------------------------------------------------------------------
#if defined(ATTNEXPORT_CUDA_EMULATION)
AX_DEVICE int thread_x() { return emu::This().thread; }
AX_DEVICE int block_x() { return emu::This().block.x; }
AX_DEVICE int block_y() { return emu::This().block.y; }
AX_DEVICE int block_z() { return emu::This().block.z; }
AX_DEVICE void sync_block() { emu::SyncBlock(); }
AX_DEVICE void sync_warp() { emu::SyncWarp(); }
AX_DEVICE char* dynamic_smem() { return emu::This().smem; }
#else
AX_DEVICE int thread_x() { return static_cast<int>(threadIdx.x); }
AX_DEVICE int block_x() { return static_cast<int>(blockIdx.x); }
AX_DEVICE int block_y() { return static_cast<int>(blockIdx.y); }
AX_DEVICE int block_z() { return static_cast<int>(blockIdx.z); }
AX_DEVICE void sync_block() { __syncthreads(); }
AX_DEVICE void sync_warp() { __syncwarp(); }
AX_DEVICE char* dynamic_smem() {
  extern __shared__ __align__(128) char attnexport_dynamic_smem[];
  return attnexport_dynamic_smem;
}
#endif
AX_DEVICE int lane_id() { return thread_x() & 31; }
AX_DEVICE int warp_id() { return thread_x() >> 5; }

// -- warp shuffles ---------------------------------------------------------------------------------
AX_DEVICE float shfl_xor(float v, int mask) {
#if defined(ATTNEXPORT_CUDA_EMULATION)
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = emu::ShuffleXor(bits, mask);
  std::memcpy(&v, &bits, 4);
  return v;
#else
  return __shfl_xor_sync(0xffffffffu, v, mask);
#endif
}

// -- math ------------------------------------------------------------------------------------------
AX_DEVICE float exp_fast(float x) {  // e^x; -inf -> 0
#if defined(ATTNEXPORT_CUDA_EMULATION)
  return std::exp(x);
#else
  return __expf(x);
#endif
}
AX_DEVICE float exp2_fast(float x) {  // 2^x; -inf -> 0
#if defined(ATTNEXPORT_CUDA_EMULATION)
  return std::exp2(x);
#else
  return exp2f(x);
#endif
}
AX_HD float log_accurate(float x) {
#if defined(ATTNEXPORT_CUDA_EMULATION)
  return std::log(x);
#else
  return logf(x);
#endif
}
AX_HD float exp_accurate(float x) {
#if defined(ATTNEXPORT_CUDA_EMULATION)
  return std::exp(x);
#else
  return expf(x);
#endif
}
// 1-based index of the lowest set bit (0 when none), as __ffs.
AX_DEVICE int ffs_(uint32_t x) {
#if defined(ATTNEXPORT_CUDA_EMULATION)
  return __builtin_ffs(static_cast<int>(x));
#else
  return __ffs(static_cast<int>(x));
#endif
}
// *p |= bits on shared memory, atomically.
AX_DEVICE void atomic_or_shared(uint32_t* p, uint32_t bits) {
#if defined(ATTNEXPORT_CUDA_EMULATION)
  std::atomic_ref<uint32_t>(*p).fetch_or(bits);
#else
  atomicOr(p, bits);
#endif
}
AX_HD float fmax_(float a, float b) { return a > b ? a : b; }
AX_HD float fmin_(float a, float b) { return a < b ? a : b; }

// -- shared-memory tile loads for the tensor cores (PTX ldmatrix) -----------------------------------
// x4: lanes 8m..8m+7 give the row addresses of 8x8 matrix m (16-byte rows of b16); r[m] receives, in
// lane l, row l/4, columns 2(l%4) and 2(l%4)+1 of matrix m. trans: row 2(l%4) and 2(l%4)+1 of column l/4.
AX_DEVICE void ldmatrix_x4(uint32_t r[4], const void* row_address) {
#if defined(ATTNEXPORT_CUDA_EMULATION)
  emu::LdMatrix(r, 4, row_address, false);
#elif defined(AX_OLD_ARCH)
  __trap();
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}
AX_DEVICE void ldmatrix_x4_trans(uint32_t r[4], const void* row_address) {
#if defined(ATTNEXPORT_CUDA_EMULATION)
  emu::LdMatrix(r, 4, row_address, true);
#elif defined(AX_OLD_ARCH)
  __trap();
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

// -- tensor-core products (PTX mma.sync), D = A B + C, float32 accumulators ----------------------------
// m16n8k16, A row-major 16x16 (4 regs of 2 x b16), B column-major 16x8 (2 regs), C/D 16x8 (4 floats).
// Fragments (g = lane/4, t = lane%4): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..);
// b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g); c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1).
template <typename T>
AX_DEVICE void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(ATTNEXPORT_CUDA_EMULATION)
  emu::Mma16816(d, a, b, std::is_same_v<T, __nv_bfloat16>);
#elif defined(AX_OLD_ARCH)
  __trap();
#else
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// float -> tf32 (cvt.rna: round to nearest, ties away from zero), kept in a 32-bit register.
AX_DEVICE uint32_t to_tf32(float x) {
#if defined(ATTNEXPORT_CUDA_EMULATION)
  return emu::RoundTf32(x);
#elif defined(AX_OLD_ARCH)
  __trap();
  return 0;
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#endif
}

// m16n8k8 tf32: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); b0 (k = t, n = g), b1 (k = t+4, n = g);
// c as in m16n8k16.
AX_DEVICE void mma_1688_tf32(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(ATTNEXPORT_CUDA_EMULATION)
  emu::Mma1688Tf32(d, a, b);
#elif defined(AX_OLD_ARCH)
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// -- asynchronous global -> shared copies (PTX cp.async, 16 bytes; zero-filled when !valid) ------------
AX_DEVICE void cp_async_16(void* smem, const void* gmem, bool valid) {
#if defined(ATTNEXPORT_CUDA_EMULATION)
  emu::CpAsync16(smem, gmem, valid);
#elif defined(AX_OLD_ARCH)
  __trap();
#else
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
#endif
}
AX_DEVICE void cp_async_commit() {
#if defined(ATTNEXPORT_CUDA_EMULATION)
  emu::CpAsyncCommit();
#elif defined(AX_OLD_ARCH)
  __trap();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
AX_DEVICE void cp_async_wait() {
#if defined(ATTNEXPORT_CUDA_EMULATION)
  emu::CpAsyncWait(pending);
#elif defined(AX_OLD_ARCH)
  __trap();
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
#endif
}

// -- element types ---------------------------------------------------------------------------------
template <typename T>
AX_HD float to_float(T x);
template <>
AX_HD float to_float<float>(float x) { return x; }
template <>
AX_HD float to_float<__half>(__half x) { return __half2float(x); }
template <>
AX_HD float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
AX_HD T from_float(float x);
template <>
AX_HD float from_float<float>(float x) { return x; }
template <>
AX_HD __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
AX_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Two 16-bit values packed as a tensor-core operand register (lo = lower column / k index).
template <typename T>
AX_HD uint32_t pack2(float lo, float hi) {
  const T l = from_float<T>(lo), h = from_float<T>(hi);
  uint16_t lb, hb;
  static_assert(sizeof(T) == 2, "pack2 is for 16-bit types");
  std::memcpy(&lb, &l, 2);
  std::memcpy(&hb, &h, 2);
  return static_cast<uint32_t>(lb) | (static_cast<uint32_t>(hb) << 16);
}

// 16 bytes of T (8 half/bf16 or 4 float) as floats, and back.
template <typename T>
struct Vec16 {
  static constexpr int kCount = 16 / static_cast<int>(sizeof(T));
  T v[kCount];
};

}  // namespace attnexport::cuda::dev
