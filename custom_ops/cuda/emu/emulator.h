// A host model of the CUDA execution model, for running the attnexport kernels on a CPU in tests
// (no GPU on the development machines). Only what cuda/common/device.cuh needs:
//  - a grid of blocks, run one block at a time in a scrambled order (kernels must not depend on
//    block order); each CUDA thread of the block is a fiber (its own stack, ucontext), run on the
//    calling OS thread and switched only at barriers: cheap enough for thousands of blocks in a test;
//  - between two barriers the threads run one after another in an order drawn afresh each round
//    (SetScheduleSeed; seed 0: thread order), so a thread that reads shared memory another thread
//    writes in the same phase (a missing barrier) sees it written or not depending on the seed: run
//    with several seeds, such a race changes the result;
//  - __syncthreads as a barrier of the block, warp collectives (shuffle, ldmatrix, mma.sync) as a
//    barrier of the 32 lanes around an exchange of registers; threads that wait at barriers that
//    can never complete (a __syncthreads in divergent code) abort the run as a deadlock;
//  - ldmatrix and mma.sync built from the fragment tables of the PTX ISA (m8n8 b16 matrices;
//    m16n8k16 f16/bf16 and m16n8k8 tf32 with float32 accumulators);
//  - cp.async: the copy happens when the issuing thread waits for its group (so a read before the
//    wait sees stale shared memory, as it may on a GPU), zero-filled when the source is invalid;
//  - dynamic shared memory of exactly the requested size (AddressSanitizer sees overruns), filled
//    with 0xFF bytes (NaN in every float format) so reads of unwritten shared memory show as NaN.
// Misuse (misaligned or out-of-range shared addresses, cp.async never waited for, partial warps,
// deadlocks) aborts with a message.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <csetjmp>
#include <ucontext.h>
#include <tuple>
#include <utility>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

[[noreturn]] inline void Fail(const char* what) {
  std::fprintf(stderr, "cuda emulator: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// A barrier of cooperative fibers: the last to arrive releases the others (and goes on at once).
struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

struct Warp {
  Barrier bar;
  uint32_t slot[32][8] = {};
  const void* addr[32] = {};
};

struct PendingCopy {
  void* dst;
  const void* src;
  bool valid;
};

struct Block;

struct ThreadCtx {
  int thread = 0;
  Dim3 block;
  char* smem = nullptr;
  Block* blk = nullptr;
  std::vector<std::vector<PendingCopy>> groups;  // committed groups, oldest first
  std::vector<PendingCopy> open;                 // issued, not yet committed
  // fiber: started with makecontext/setcontext, then switched with _setjmp/_longjmp (no system calls)
  ucontext_t context;
  jmp_buf jump;
  char* stack = nullptr;
  bool started = false;
  bool finished = false;
  void* fake_stack = nullptr;  // AddressSanitizer's per-fiber bookkeeping
};

struct Block {
  Block(int threads, size_t smem_bytes) : smem_size(smem_bytes), threads(threads) {
    bar.expected = threads;
    smem = static_cast<char*>(std::malloc(smem_bytes ? smem_bytes : 1));
    std::memset(smem, 0xFF, smem_bytes);
    for (int w = 0; w < threads / 32; ++w) {
      warps.push_back(std::make_unique<Warp>());
      warps.back()->bar.expected = 32;
    }
  }
  ~Block() { std::free(smem); }
  Barrier bar;
  char* smem;
  size_t smem_size;
  int threads;
  std::vector<std::unique_ptr<Warp>> warps;
  jmp_buf scheduler;
  uint64_t progress = 0;  // barrier releases and thread exits
};

inline ThreadCtx*& Current() {
  static ThreadCtx* ctx = nullptr;
  return ctx;
}
inline ThreadCtx& This() { return *Current(); }
inline Warp& ThisWarp() { return *This().blk->warps[This().thread / 32]; }
inline int Lane() { return This().thread & 31; }

constexpr size_t kFiberStack = 512 * 1024;

// AddressSanitizer must be told about stack switches (fiber annotations); no-ops without it.
struct MainStack {
  const void* bottom = nullptr;
  size_t size = 0;
  void* fake = nullptr;
};
inline MainStack& Main() {
  static MainStack m;
  return m;
}
inline void AsanStartSwitch(void** fake, const void* bottom, size_t size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}
inline void AsanFinishSwitch(void* fake, const void** old_bottom, size_t* old_size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake, old_bottom, old_size);
#else
  (void)fake, (void)old_bottom, (void)old_size;
#endif
}

// Back to the scheduler (the fiber resumes here later).
inline void Yield() {
  ThreadCtx& t = This();
  if (_setjmp(t.jump) == 0) {
    AsanStartSwitch(&t.fake_stack, Main().bottom, Main().size);
    _longjmp(t.blk->scheduler, 1);
  }
  AsanFinishSwitch(t.fake_stack, &Main().bottom, &Main().size);
}

inline void Wait(Barrier& b) {
  const uint64_t g = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    ++This().blk->progress;
    return;
  }
  while (b.generation == g) Yield();
}

// A thread exits: it no longer counts at its barriers (as on the GPU).
inline void Drop(Barrier& b, Block& blk) {
  --b.expected;
  if (b.arrived > 0 && b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    ++blk.progress;
  }
}

inline void SyncBlock() { Wait(This().blk->bar); }
inline void SyncWarp() { Wait(ThisWarp().bar); }

inline void CheckShared(const void* p, size_t bytes, size_t align, const char* what) {
  const ThreadCtx& t = This();
  const char* c = static_cast<const char*>(p);
  if (c < t.smem || c + bytes > t.smem + t.blk->smem_size) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "%s: shared address %p outside the block's %zu bytes", what, p, t.blk->smem_size);
    Fail(buf);
  }
  if (reinterpret_cast<uintptr_t>(p) % align) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "%s: shared address %p not %zu-byte aligned", what, p, align);
    Fail(buf);
  }
}

inline uint32_t ShuffleXor(uint32_t v, int mask) {
  Warp& w = ThisWarp();
  const int lane = Lane();
  w.slot[lane][0] = v;
  Wait(w.bar);
  const uint32_t r = w.slot[lane ^ mask][0];
  Wait(w.bar);
  return r;
}

inline uint16_t LoadB16(const void* row, int col) {
  uint16_t v;
  std::memcpy(&v, static_cast<const char*>(row) + 2 * col, 2);
  return v;
}

// ldmatrix .m8n8 .x{count} .b16 [.trans]
inline void LdMatrix(uint32_t* r, int count, const void* row_address, bool trans) {
  Warp& w = ThisWarp();
  const int lane = Lane();
  if (lane < 8 * count) CheckShared(row_address, 16, 16, "ldmatrix");
  w.addr[lane] = row_address;
  Wait(w.bar);
  for (int m = 0; m < count; ++m) {
    uint16_t lo, hi;
    if (!trans) {  // row lane/4, columns 2(lane%4), +1
      const void* row = w.addr[8 * m + lane / 4];
      lo = LoadB16(row, 2 * (lane % 4));
      hi = LoadB16(row, 2 * (lane % 4) + 1);
    } else {  // rows 2(lane%4), +1 of column lane/4
      lo = LoadB16(w.addr[8 * m + 2 * (lane % 4)], lane / 4);
      hi = LoadB16(w.addr[8 * m + 2 * (lane % 4) + 1], lane / 4);
    }
    r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  Wait(w.bar);
}

inline float B16ToFloat(uint16_t bits, bool bf16) {
  if (bf16) {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

inline float BitsToFloat(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline uint32_t RoundTf32(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  if (std::isfinite(x)) b = (b + 0x1000u) & 0xFFFFE000u;  // nearest, ties away from zero
  return b;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C (in place on d).
inline void Mma16816(float* d, const uint32_t* a, const uint32_t* b, bool bf16) {
  Warp& w = ThisWarp();
  const int lane = Lane();
  for (int i = 0; i < 4; ++i) w.slot[lane][i] = a[i];
  for (int i = 0; i < 2; ++i) w.slot[lane][4 + i] = b[i];
  Wait(w.bar);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const uint32_t* s = w.slot[l];
    auto lo = [&](uint32_t v) { return B16ToFloat(static_cast<uint16_t>(v & 0xFFFF), bf16); };
    auto hi = [&](uint32_t v) { return B16ToFloat(static_cast<uint16_t>(v >> 16), bf16); };
    A[g][2 * t] = lo(s[0]);
    A[g][2 * t + 1] = hi(s[0]);
    A[g + 8][2 * t] = lo(s[1]);
    A[g + 8][2 * t + 1] = hi(s[1]);
    A[g][2 * t + 8] = lo(s[2]);
    A[g][2 * t + 9] = hi(s[2]);
    A[g + 8][2 * t + 8] = lo(s[3]);
    A[g + 8][2 * t + 9] = hi(s[3]);
    B[2 * t][g] = lo(s[4]);
    B[2 * t + 1][g] = hi(s[4]);
    B[2 * t + 8][g] = lo(s[5]);
    B[2 * t + 9][g] = hi(s[5]);
  }
  Wait(w.bar);
  const int g = lane / 4, t = lane % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int i = 0; i < 4; ++i) {
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[rows[i]][k] * B[k][cols[i]];
    d[i] += acc;
  }
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: operands read as tf32 (low 13 bits ignored).
inline void Mma1688Tf32(float* d, const uint32_t* a, const uint32_t* b) {
  Warp& w = ThisWarp();
  const int lane = Lane();
  for (int i = 0; i < 4; ++i) w.slot[lane][i] = a[i];
  for (int i = 0; i < 2; ++i) w.slot[lane][4 + i] = b[i];
  Wait(w.bar);
  float A[16][8], B[8][8];
  auto tf = [](uint32_t v) { return BitsToFloat(v & 0xFFFFE000u); };
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const uint32_t* s = w.slot[l];
    A[g][t] = tf(s[0]);
    A[g + 8][t] = tf(s[1]);
    A[g][t + 4] = tf(s[2]);
    A[g + 8][t + 4] = tf(s[3]);
    B[t][g] = tf(s[4]);
    B[t + 4][g] = tf(s[5]);
  }
  Wait(w.bar);
  const int g = lane / 4, t = lane % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int i = 0; i < 4; ++i) {
    float acc = 0.f;
    for (int k = 0; k < 8; ++k) acc += A[rows[i]][k] * B[k][cols[i]];
    d[i] += acc;
  }
}

inline void CpAsync16(void* smem, const void* gmem, bool valid) {
  CheckShared(smem, 16, 16, "cp.async destination");
  if (valid && reinterpret_cast<uintptr_t>(gmem) % 16) Fail("cp.async: global source not 16-byte aligned");
  This().open.push_back({smem, gmem, valid});
}
inline void CpAsyncCommit() {
  ThreadCtx& t = This();
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}
inline void CpAsyncWait(int pending) {
  ThreadCtx& t = This();
  while (static_cast<int>(t.groups.size()) > pending) {
    for (const PendingCopy& c : t.groups.front()) {
      if (c.valid) {
        std::memcpy(c.dst, c.src, 16);
      } else {
        std::memset(c.dst, 0, 16);
      }
    }
    t.groups.erase(t.groups.begin());
  }
}

inline uint64_t& ScheduleSeed() {
  static uint64_t seed = 0;
  return seed;
}
inline void SetScheduleSeed(uint64_t seed) { ScheduleSeed() = seed; }

struct LaunchStats {
  long launches = 0;
  long blocks = 0;
};
inline LaunchStats& Stats() {
  static LaunchStats s;
  return s;
}

template <typename F>
struct FiberEntry {
  static F*& Body() {
    static F* body = nullptr;
    return body;
  }
  static void Run() {
    ThreadCtx& t = This();
    AsanFinishSwitch(nullptr, &Main().bottom, &Main().size);
    (*Body())();
    if (!t.open.empty() || !t.groups.empty()) Fail("a thread exited with cp.async copies it never waited for");
    Block& blk = *t.blk;
    Drop(blk.warps[t.thread / 32]->bar, blk);
    Drop(blk.bar, blk);
    t.finished = true;
    ++blk.progress;
    AsanStartSwitch(nullptr, Main().bottom, Main().size);  // this fiber's stack is done
    _longjmp(blk.scheduler, 2);
  }
};

// Runs kernel(args...) over the grid; blocks one at a time in a scrambled order.
template <typename... Params, typename... Args>
void Launch(Dim3 grid, int threads, size_t smem_bytes, void (*kernel)(Params...), Args&&... args) {
  if (threads <= 0 || threads % 32 != 0 || threads > 1024) Fail("launch: threads per block must be a multiple of 32, <= 1024");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) Fail("launch: empty grid");
  if (grid.y > 65535 || grid.z > 65535) Fail("launch: grid.y / grid.z above 65535");
  std::tuple<Params...> params(std::forward<Args>(args)...);
  auto body = [&] { std::apply(kernel, params); };
  using Entry = FiberEntry<decltype(body)>;
  Entry::Body() = &body;
  const long total = static_cast<long>(grid.x) * grid.y * grid.z;
  Stats().launches += 1;
  Stats().blocks += total;
  std::vector<ThreadCtx> ctx(threads);
  for (ThreadCtx& t : ctx) t.stack = static_cast<char*>(std::malloc(kFiberStack));
  // A fixed permutation of the blocks: stride coprime with the count.
  long stride = total > 2 ? total / 2 + 1 : 1;
  while (total > 1 && std::__gcd(stride, total) != 1) ++stride;
  for (long n = 0; n < total; ++n) {
    const long id = (n * stride + total / 3) % total;
    Dim3 b;
    b.x = static_cast<unsigned>(id % grid.x);
    b.y = static_cast<unsigned>((id / grid.x) % grid.y);
    b.z = static_cast<unsigned>(id / (static_cast<long>(grid.x) * grid.y));
    Block block(threads, smem_bytes);
    for (int t = 0; t < threads; ++t) {
      ThreadCtx& c = ctx[t];
      c.thread = t;
      c.block = b;
      c.smem = block.smem;
      c.blk = &block;
      c.groups.clear();
      c.open.clear();
      c.finished = false;
      c.started = false;
      getcontext(&c.context);
      c.context.uc_stack.ss_sp = c.stack;
      c.context.uc_stack.ss_size = kFiberStack;
      c.context.uc_link = nullptr;
      makecontext(&c.context, &Entry::Run, 0);
    }
    int running = threads;
    std::vector<int> order(threads);
    for (int t = 0; t < threads; ++t) order[t] = t;
    uint64_t rng = ScheduleSeed() * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(id);
    while (running > 0) {
      const uint64_t before = block.progress;
      if (ScheduleSeed() != 0) {  // a fresh order each round (Fisher-Yates, splitmix64)
        for (int i = threads - 1; i > 0; --i) {
          rng += 0x9E3779B97F4A7C15ull;
          uint64_t z = rng;
          z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
          z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
          z ^= z >> 31;
          std::swap(order[i], order[static_cast<int>(z % static_cast<uint64_t>(i + 1))]);
        }
      }
      for (int t : order) {
        if (ctx[t].finished) continue;
        Current() = &ctx[t];
        if (_setjmp(block.scheduler) == 0) {
          AsanStartSwitch(&Main().fake, ctx[t].stack, kFiberStack);
          if (!ctx[t].started) {
            ctx[t].started = true;
            setcontext(&ctx[t].context);
          }
          _longjmp(ctx[t].jump, 1);
        }
        AsanFinishSwitch(Main().fake, nullptr, nullptr);
        Current() = nullptr;
        if (ctx[t].finished) --running;
      }
      if (running > 0 && block.progress == before) {
        Fail("deadlock: the block's threads wait at barriers that cannot complete (a barrier in divergent code?)");
      }
    }
  }
  for (ThreadCtx& t : ctx) std::free(t.stack);
}

}  // namespace emu
