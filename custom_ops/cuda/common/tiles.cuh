// Small memory helpers shared by the kernels: paired float loads/stores, 16-bit pair unpacking,
// 16-byte copies, and cp.async tile loads with zero fill. Written against device.cuh only.
#pragma once
#include "cuda/common/device.cuh"

namespace attnexport::cuda::dev {

struct F2 {
  float x, y;
};

// 8-byte aligned float pairs (vectorised on the GPU; two scalar accesses in the emulator, so the host
// compiler's aliasing rules hold).
AX_DEVICE F2 Load2(const float* p) {
#if defined(ATTNEXPORT_CUDA_EMULATION)
  if (reinterpret_cast<uintptr_t>(p) % 8) emu::Fail("Load2: address not 8-byte aligned");
  return F2{p[0], p[1]};
#else
  const float2 v = *reinterpret_cast<const float2*>(p);
  return F2{v.x, v.y};
#endif
}
AX_DEVICE void Store2(float* p, float x, float y) {
#if defined(ATTNEXPORT_CUDA_EMULATION)
  if (reinterpret_cast<uintptr_t>(p) % 8) emu::Fail("Store2: address not 8-byte aligned");
  p[0] = x;
  p[1] = y;
#else
  *reinterpret_cast<float2*>(p) = make_float2(x, y);
#endif
}
AX_DEVICE void Add2(float* p, float x, float y) {
  const F2 v = Load2(p);
  Store2(p, v.x + x, v.y + y);
}

AX_HD uint32_t FloatBits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

// The two 16-bit values of an operand register as floats (x = low half).
template <typename T>
AX_HD F2 Unpack2(uint32_t r) {
  static_assert(sizeof(T) == 2, "Unpack2 is for 16-bit types");
  const uint16_t lo = static_cast<uint16_t>(r & 0xFFFFu), hi = static_cast<uint16_t>(r >> 16);
  T l, h;
  std::memcpy(&l, &lo, 2);
  std::memcpy(&h, &hi, 2);
  return F2{to_float<T>(l), to_float<T>(h)};
}

// A 4-byte store of a packed pair of 16-bit values.
template <typename T>
AX_DEVICE void Store32(T* p, uint32_t v) {
  static_assert(sizeof(T) == 2, "Store32 is for 16-bit types");
#if defined(ATTNEXPORT_CUDA_EMULATION)
  if (reinterpret_cast<uintptr_t>(p) % 4) emu::Fail("Store32: address not 4-byte aligned");
  std::memcpy(p, &v, 4);
#else
  *reinterpret_cast<uint32_t*>(p) = v;
#endif
}

// 16 bytes from src to dst (both 16-byte aligned).
AX_DEVICE void Copy16(void* dst, const void* src) {
#if defined(ATTNEXPORT_CUDA_EMULATION)
  if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16) emu::Fail("Copy16: misaligned");
  std::memcpy(dst, src, 16);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

// A ROWS x COLS tile of a 16-bit type into shared memory (row stride LD elements) by cp.async:
// tile (r, c) <- mat[(row0 + r) * ld_g + col0 + c]; rows outside [0, nrows) and columns with
// col0 + c >= ncols are zero-filled (ncols, col0, ld_g multiples of 8; mat 16-byte aligned).
template <typename T, int ROWS, int COLS, int LD, int THREADS>
AX_DEVICE void LoadTileAsync(T* tile, const T* mat, long long row0, long long nrows, int ld_g, int col0, int ncols) {
  static_assert(sizeof(T) == 2 && COLS % 8 == 0 && LD % 8 == 0, "16-byte chunks of a 16-bit type");
  constexpr int kVec = COLS / 8;
  for (int i = thread_x(); i < ROWS * kVec; i += THREADS) {
    const int r = i / kVec, c = (i % kVec) * 8;
    const long long gr = row0 + r;
    const bool valid = gr >= 0 && gr < nrows && col0 + c < ncols;
    const T* src = valid ? mat + gr * ld_g + col0 + c : mat;
    cp_async_16(tile + r * LD + c, src, valid);
  }
}

// Zeroes the rows r of a ROWS x COLS 16-bit tile for which !row_ok(r).
template <typename T, int ROWS, int COLS, int LD, int THREADS, typename RowOk>
AX_DEVICE void ZeroRows(T* tile, RowOk row_ok) {
  constexpr int kVec = COLS / 8;
  alignas(16) const uint32_t zero[4] = {0u, 0u, 0u, 0u};
  for (int i = thread_x(); i < ROWS * kVec; i += THREADS) {
    const int r = i / kVec, c = (i % kVec) * 8;
    if (!row_ok(r)) Copy16(tile + r * LD + c, zero);
  }
}

}  // namespace attnexport::cuda::dev
