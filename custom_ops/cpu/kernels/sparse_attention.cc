// SparseAttention, CPU, compiled once per ISA (namespace attnexport::cpu::ATTNEXPORT_ISA).
//
// Flash-style: for each tile of query rows of one head, the key intervals its rows can reach are
// computed from the pattern (global key strip, the union of the rows' windows, the BigBird random
// blocks of their query blocks; all clipped by causality), and only those keys are visited, in
// tiles of kTk keys: S = Q Kᵀ (register-blocked micro-kernel of gemm.h against a transposed,
// zero-padded copy of K), then scale, bias, the exact per-element pattern where a tile is not wholly
// visible, an online softmax (running row max and sum, vectorised exp of simd.h), and O += P V.
// Cost is O(Sq · (reached keys) · D): a window of w keys costs about w + kTq keys per row, causal
// full attention skips the upper triangle. Global query rows (0 <= i' < num_global) form their own
// tiles that read every key (a dense strip); global key columns are one more interval of every tile.
//
// Work items (batch, head, query tile) are handed out through an atomic counter to a fixed number of
// tasks on ORT's pool, heaviest tiles (the last ones, for causal) first; each task owns its scratch.
#include "cpu/kernels/sparse_attention.h"

#include <cstring>

#include "cpu/kernels/gemm.h"
#include "cpu/kernels/simd.h"

namespace attnexport::cpu::ATTNEXPORT_ISA {
namespace {

using simd::kWidth;
using simd::Vec;

constexpr int64_t kTq = 48;  // query rows per tile: a multiple of every micro-kernel row count (4, 6)
constexpr int64_t kTk = 64;  // keys per tile, tiles aligned to multiples of kTk
// Kᵀ is packed in strips of kStrip keys, [Dk, kStrip] each, the column width of one micro-kernel
// tile: a strip of Kᵀ stays in L1 while every row tile of Q runs against it.
constexpr int64_t kStrip = gemm::kVecs * kWidth;
static_assert(kTk % kStrip == 0, "key tiles are whole strips");
constexpr float kNegInf = -__builtin_inff();

ATTNEXPORT_INLINE int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
ATTNEXPORT_INLINE int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }
ATTNEXPORT_INLINE int64_t Max(int64_t a, int64_t b) { return a > b ? a : b; }

// reference.random_key_block: M = 2^31 - 1, A = 48271, round(h, v) = A * ((((h + v) mod M)^2) mod M)
// mod M, block = round(round(seed mod M, qb + 1), r + 1) mod nkb. Every value stays in [0, 2^62).
int64_t RandomKeyBlock(int64_t seed, int64_t query_block, int64_t r, int64_t num_key_blocks) {
  constexpr int64_t kM = 2147483647, kA = 48271;
  auto round = [](int64_t h, int64_t value) {
    const int64_t t = (h + value) % kM;
    return (kA * ((t * t) % kM)) % kM;
  };
  return round(round(seed % kM, query_block + 1), r + 1) % num_key_blocks;
}

struct Pattern {
  int64_t q_len, kv_len, shift;  // shift = Skv - Sq: position of query i is i + shift
  int64_t wl, wr;                // window sides, unbounded ones replaced by Sq + Skv + 1
  int64_t dilation, num_global;
  int64_t block_size, num_random, num_key_blocks, seed;
  bool causal;
  bool random() const { return num_random > 0; }
};

struct Tile {
  int64_t begin, end;  // query rows
  bool dense;          // global query rows: every key (causality aside)
};

struct TaskScratch {
  float* s;         // [kTq, kTk] logits, then probabilities
  float* o;         // [kTq, ldo] unnormalised output
  float* m;         // [kTq] running maxima
  float* l;         // [kTq] running sums
  float* colmask;   // [kTk] 0 or -inf per key (key padding)
  int64_t* spans;   // [2 * max_spans] key intervals
  int64_t* chosen;  // [kTq * R] random key blocks per row
};

struct Context {
  const SparseAttentionProblem* p;
  const SparseAttentionTensors* t;
  Pattern pat;
  const float* kt;  // per (batch, kv head): [Skv padded / kStrip strips][Dk][kStrip] Kᵀ, zero past Skv
  int64_t kt_head;  // floats per (batch, kv head)
  const float* v;   // V, or a copy padded to ldv columns
  int64_t ldv, ldo;
  const Tile* tiles;
  int64_t num_tiles, max_spans;
};

// Is key j in the pattern of the query at position pos (key padding aside)? The exact predicate,
// for tiles that are not wholly visible.
ATTNEXPORT_INLINE bool Visible(const Pattern& pat, const int64_t* chosen, int64_t pos, int64_t j, bool dense) {
  const int64_t offset = j - pos;
  if (pat.causal && offset > 0) return false;
  if (dense || j < pat.num_global) return true;
  if (offset >= -pat.wl && offset <= pat.wr && offset % pat.dilation == 0) return true;
  if (pat.random() && pos >= 0) {
    const int64_t block = j / pat.block_size;
    for (int64_t r = 0; r < pat.num_random; ++r) {
      if (chosen[r] == block) return true;
    }
  }
  return false;
}

// Is every key of [j0, j0 + count) in the pattern of the query at position pos?
ATTNEXPORT_INLINE bool RowFull(const Pattern& pat, int64_t pos, int64_t j0, int64_t count, bool dense) {
  const int64_t last = j0 + count - 1;
  if (pat.causal && last > pos) return false;
  if (dense || last < pat.num_global) return true;
  return pat.dilation == 1 && j0 >= pos - pat.wl && last <= pos + pat.wr;
}

// Sorted, merged key intervals that the rows [i0, i1) of a tile reach; returns their count.
int64_t KeySpans(const Context& c, const Tile& tile, int64_t* spans, int64_t* chosen) {
  const Pattern& pat = c.pat;
  const int64_t p0 = tile.begin + pat.shift, p1 = tile.end + pat.shift;  // positions [p0, p1)
  const int64_t stop = pat.causal ? Min(pat.kv_len, p1) : pat.kv_len;   // keys j < stop
  int64_t n = 0;
  auto add = [&](int64_t a, int64_t b) {
    a = Max(a, 0);
    b = Min(b, stop);
    if (a < b) {
      spans[2 * n] = a;
      spans[2 * n + 1] = b;
      ++n;
    }
  };
  if (tile.dense) {
    add(0, pat.kv_len);
    return n;
  }
  add(0, pat.num_global);
  add(p0 - pat.wl, p1 + pat.wr);  // p1 - 1 + wr inclusive
  if (pat.random()) {
    for (int64_t i = tile.begin; i < tile.end; ++i) {
      const int64_t pos = i + pat.shift;
      int64_t* row = chosen + (i - tile.begin) * pat.num_random;
      if (pos < 0) {
        for (int64_t r = 0; r < pat.num_random; ++r) row[r] = -1;
        continue;
      }
      const int64_t qb = pos / pat.block_size;
      const bool same = i > tile.begin && pos - 1 >= 0 && (pos - 1) / pat.block_size == qb;
      for (int64_t r = 0; r < pat.num_random; ++r) {
        row[r] = same ? row[r - pat.num_random] : RandomKeyBlock(pat.seed, qb, r, pat.num_key_blocks);
        if (!same) add(row[r] * pat.block_size, (row[r] + 1) * pat.block_size);
      }
    }
  }
  // Insertion sort by start, then merge overlapping or touching intervals.
  for (int64_t a = 1; a < n; ++a) {
    const int64_t s0 = spans[2 * a], s1 = spans[2 * a + 1];
    int64_t b = a - 1;
    while (b >= 0 && spans[2 * b] > s0) {
      spans[2 * b + 2] = spans[2 * b];
      spans[2 * b + 3] = spans[2 * b + 1];
      --b;
    }
    spans[2 * b + 2] = s0;
    spans[2 * b + 3] = s1;
  }
  int64_t merged = 0;
  for (int64_t a = 0; a < n; ++a) {
    if (merged > 0 && spans[2 * a] <= spans[2 * merged - 1]) {
      spans[2 * merged - 1] = Max(spans[2 * merged - 1], spans[2 * a + 1]);
    } else {
      spans[2 * merged] = spans[2 * a];
      spans[2 * merged + 1] = spans[2 * a + 1];
      ++merged;
    }
  }
  return merged;
}

void ProcessTile(const Context& c, int64_t b, int64_t h, const Tile& tile, const TaskScratch& w) {
  const SparseAttentionProblem& p = *c.p;
  const SparseAttentionTensors& t = *c.t;
  const Pattern& pat = c.pat;
  const int64_t rows = tile.end - tile.begin;
  const int64_t p0 = tile.begin + pat.shift;
  const int64_t hkv = h / (p.q_heads / p.kv_heads);
  const int64_t dk = p.head_dim, dv = p.value_dim;
  const float* q = t.q + ((b * p.q_heads + h) * p.q_len + tile.begin) * dk;
  const float* kt = c.kt + (b * p.kv_heads + hkv) * c.kt_head;
  const float* v = c.v + (b * p.kv_heads + hkv) * p.kv_len * c.ldv;
  const bool* key_mask = t.key_padding_mask ? t.key_padding_mask + b * p.kv_len : nullptr;
  const float* bias = t.attn_bias ? t.attn_bias + b * p.bias_stride[0] + h * p.bias_stride[1] +
                                        tile.begin * p.bias_stride[2]
                                  : nullptr;
  const bool bias_per_key = p.bias_stride[3] != 0;

  for (int64_t r = 0; r < rows; ++r) {
    w.m[r] = kNegInf;
    w.l[r] = 0.f;
  }
  std::memset(w.o, 0, sizeof(float) * rows * c.ldo);
  const int64_t num_spans = KeySpans(c, tile, w.spans, w.chosen);
  const Vec scale = simd::Splat(p.scale);
  const Vec neg_inf = simd::Splat(kNegInf);

  // The aligned key tiles the spans reach, each once (spans are sorted and disjoint).
  int64_t last_tile = -1;
  for (int64_t s = 0; s < num_spans; ++s) {
    const int64_t first = Max(w.spans[2 * s] / kTk, last_tile + 1);
    const int64_t final = (w.spans[2 * s + 1] - 1) / kTk;
    for (int64_t key_tile = first; key_tile <= final; ++key_tile) {
      last_tile = key_tile;
      const int64_t j0 = key_tile * kTk;
      const int64_t count = Min(kTk, p.kv_len - j0);
      const int64_t width = RoundUp(count, kStrip);
      // S = Q Kᵀ over the strips of the tile that some span reaches (columns [c0, c1)); strips no
      // span reaches in between (random blocks) are -inf.
      int64_t c0 = width, c1 = 0;
      for (int64_t strip = 0; strip < width / kStrip; ++strip) {
        const int64_t a = j0 + strip * kStrip, e = Min(a + kStrip, j0 + count);
        bool reached = false;
        for (int64_t s2 = 0; s2 < num_spans && !reached; ++s2) reached = w.spans[2 * s2] < e && w.spans[2 * s2 + 1] > a;
        if (!reached) {
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t k = 0; k < kStrip; ++k) w.s[r * kTk + strip * kStrip + k] = kNegInf;
          }
          continue;
        }
        c0 = Min(c0, strip * kStrip);
        c1 = strip * kStrip + kStrip;
        gemm::Product g;
        g.k1 = dk;
        g.a1 = q;
        g.lda1 = dk;
        g.b1 = kt + (j0 / kStrip + strip) * dk * kStrip;
        g.ldb1 = kStrip;
        g.c = w.s + strip * kStrip;
        g.ldc = kTk;
        if (j0 + kTk < p.kv_len) {  // the same strip of the next key tile, while this one computes
          g.prefetch = kt + (j0 / kStrip + strip + kTk / kStrip) * dk * kStrip;
          g.prefetch_bytes = dk * kStrip * static_cast<int64_t>(sizeof(float));
        }
        gemm::Run<gemm::kStore>(g, rows, kStrip);
      }
      if (c0 >= c1) continue;
      const int64_t kend = Min(count, c1);  // keys [j0 + c0, j0 + kend) are real; columns up to c1 are -inf

      bool any_padding = false;
      if (key_mask) {
        for (int64_t k = c0; k < kend; ++k) {
          const bool keep = key_mask[j0 + k];
          w.colmask[k] = keep ? 0.f : kNegInf;
          any_padding |= !keep;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* srow = w.s + r * kTk;
        const int64_t pos = p0 + r;
        const float* brow = bias ? bias + r * p.bias_stride[2] : nullptr;
        // Logits: scale, bias, key padding; -inf past the tile's keys.
        int64_t k = c0;
        for (; k + kWidth <= kend; k += kWidth) {
          Vec x = simd::Load(srow + k) * scale;
          if (brow) x += bias_per_key ? simd::Load(brow + j0 + k) : simd::Splat(brow[0]);
          if (any_padding) x += simd::Load(w.colmask + k);
          simd::Store(srow + k, x);
        }
        for (; k < kend; ++k) {
          float x = srow[k] * p.scale;
          if (brow) x += bias_per_key ? brow[j0 + k] : brow[0];
          if (any_padding) x += w.colmask[k];
          srow[k] = x;
        }
        for (; k < c1; ++k) srow[k] = kNegInf;
        // The exact pattern where this row does not see every key of [j0 + c0, j0 + kend).
        if (!RowFull(pat, pos, j0 + c0, kend - c0, tile.dense)) {
          if (tile.dense || (pat.dilation == 1 && !pat.random())) {
            // Visible: j < num_global or pos - wl <= j <= pos + wr (all j for dense rows), and j <= pos if causal.
            const int64_t stop = pat.causal ? Min(j0 + kend, pos + 1) : j0 + kend;
            const int64_t lo = tile.dense ? j0 : Max(j0, pos - pat.wl);
            const int64_t hi = tile.dense ? stop : Min(stop, pos + pat.wr + 1);
            const int64_t globals = tile.dense ? j0 : Min(stop, pat.num_global);
            for (int64_t j = j0 + c0; j < j0 + kend; ++j) {
              if (!(j < globals || (j >= lo && j < hi))) srow[j - j0] = kNegInf;
            }
          } else {
            const int64_t* chosen = w.chosen + r * pat.num_random;
            for (int64_t j = j0 + c0; j < j0 + kend; ++j) {
              if (!Visible(pat, chosen, pos, j, false)) srow[j - j0] = kNegInf;
            }
          }
        }
        // Online softmax.
        Vec mx = neg_inf;
        for (k = c0; k < c1; k += kWidth) {
          const Vec x = simd::Load(srow + k);
          mx = x > mx ? x : mx;
        }
        const float tile_max = simd::MaxLane(mx);
        const float m_old = w.m[r];
        const float m_new = tile_max > m_old ? tile_max : m_old;
        if (m_new == kNegInf) {  // nothing visible yet: no weight
          std::memset(srow + c0, 0, sizeof(float) * (c1 - c0));
          continue;
        }
        const Vec mv = simd::Splat(m_new);
        Vec sum = simd::Zero();
        for (k = c0; k < c1; k += kWidth) {
          const Vec e = simd::ExpNonPositive(simd::Load(srow + k) - mv);
          sum += e;
          simd::Store(srow + k, e);
        }
        if (m_new != m_old) {
          const float alpha = m_old == kNegInf ? 0.f : __builtin_expf(m_old - m_new);
          w.l[r] *= alpha;
          if (m_old != kNegInf) {
            float* orow = w.o + r * c.ldo;
            const Vec av = simd::Splat(alpha);
            for (int64_t d = 0; d < c.ldo; d += kWidth) simd::Store(orow + d, simd::Load(orow + d) * av);
          }
          w.m[r] = m_new;
        }
        w.l[r] += simd::Sum(sum);
      }
      // O += P V over the reached keys, one slab of kStrip value columns at a time: the slab of V
      // (kTk x kStrip) stays in L1 while every row tile of P runs against it.
      for (int64_t n0 = 0; n0 < c.ldo; n0 += kStrip) {
        gemm::Product pv;
        pv.k1 = kend - c0;
        pv.a1 = w.s + c0;
        pv.lda1 = kTk;
        pv.b1 = v + (j0 + c0) * c.ldv + n0;
        pv.ldb1 = c.ldv;
        pv.c = w.o + n0;
        pv.ldc = c.ldo;
        if (n0 == 0 && j0 + kTk < p.kv_len) {  // the next key tile's rows of V
          pv.prefetch = v + (j0 + kTk) * c.ldv;
          pv.prefetch_bytes = Min(kTk, p.kv_len - j0 - kTk) * c.ldv * static_cast<int64_t>(sizeof(float));
        }
        gemm::Run<gemm::kAccumulate>(pv, rows, Min(kStrip, c.ldo - n0));
      }
    }
  }
  float* y = t.y + ((b * p.q_heads + h) * p.q_len + tile.begin) * dv;
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = w.l[r] > 0.f ? 1.f / w.l[r] : 0.f;
    const float* orow = w.o + r * c.ldo;
    float* yrow = y + r * dv;
    if (inv == 0.f) {
      std::memset(yrow, 0, sizeof(float) * dv);
      continue;
    }
    for (int64_t d = 0; d < dv; ++d) yrow[d] = orow[d] * inv;
  }
}

}  // namespace

void SparseAttentionForward(const SparseAttentionProblem& p, const SparseAttentionTensors& t, const ThreadPool& pool,
                            const Scratch& scratch) {
  const int64_t far = p.q_len + p.kv_len + 1;
  Context c;
  c.p = &p;
  c.t = &t;
  Pattern& pat = c.pat;
  pat.q_len = p.q_len;
  pat.kv_len = p.kv_len;
  pat.shift = p.kv_len - p.q_len;
  pat.wl = p.window_left < 0 ? far : Min(p.window_left, far);
  pat.wr = p.window_right < 0 ? far : Min(p.window_right, far);
  pat.dilation = p.dilation;
  pat.num_global = Min(p.num_global, far);
  pat.causal = p.causal;
  pat.seed = p.seed;
  pat.block_size = p.block_size;
  pat.num_random = p.block_size > 0 && p.kv_len > 0 ? p.num_random_blocks : 0;
  pat.num_key_blocks = p.block_size > 0 ? (p.kv_len + p.block_size - 1) / p.block_size : 0;

  const int64_t bh_kv = p.batch * p.kv_heads;
  const int64_t dk = p.head_dim, dv = p.value_dim;
  if (p.kv_len == 0) {  // no key: every row is 0
    std::memset(t.y, 0, sizeof(float) * p.batch * p.q_heads * p.q_len * dv);
    return;
  }

  // Kᵀ per (batch, kv head) in strips of kStrip keys ([Dk][kStrip] each), zero past Skv.
  const int64_t strips = (p.kv_len + kTk - 1) / kTk * (kTk / kStrip);
  c.kt_head = strips * dk * kStrip;
  float* kt = scratch.Get<float>(static_cast<size_t>(bh_kv * c.kt_head));
  auto transpose = [&](size_t index) {
    const float* src = t.k + static_cast<int64_t>(index) * p.kv_len * dk;
    float* dst = kt + static_cast<int64_t>(index) * c.kt_head;
    for (int64_t strip = 0; strip < strips; ++strip) {
      float* panel = dst + strip * dk * kStrip;
      const int64_t j0 = strip * kStrip, n = Max(0, Min(kStrip, p.kv_len - j0));
      for (int64_t d = 0; d < dk; ++d) {
        float* out = panel + d * kStrip;
        for (int64_t j = 0; j < n; ++j) out[j] = src[(j0 + j) * dk + d];
        for (int64_t j = n; j < kStrip; ++j) out[j] = 0.f;
      }
    }
  };
  pool.For(static_cast<size_t>(bh_kv), transpose);
  c.kt = kt;

  // V as is when its rows are whole vectors, else a copy padded with zeros.
  c.ldv = RoundUp(dv, kWidth);
  c.ldo = c.ldv;
  if (c.ldv == dv) {
    c.v = t.v;
  } else {
    float* vp = scratch.Get<float>(static_cast<size_t>(bh_kv * p.kv_len * c.ldv));
    auto pad = [&](size_t index) {
      const float* src = t.v + static_cast<int64_t>(index) * p.kv_len * dv;
      float* dst = vp + static_cast<int64_t>(index) * p.kv_len * c.ldv;
      for (int64_t j = 0; j < p.kv_len; ++j) {
        std::memcpy(dst + j * c.ldv, src + j * dv, sizeof(float) * dv);
        std::memset(dst + j * c.ldv + dv, 0, sizeof(float) * (c.ldv - dv));
      }
    };
    pool.For(static_cast<size_t>(bh_kv), pad);
    c.v = vp;
  }

  // Query tiles of one head: [0, g0), [g0, g1) (global rows, dense), [g1, Sq), each cut into kTq rows.
  const int64_t g0 = Min(Max(-pat.shift, 0), p.q_len);
  const int64_t g1 = Min(Max(pat.num_global - pat.shift, g0), p.q_len);
  Tile* tiles = scratch.Get<Tile>(static_cast<size_t>(p.q_len / kTq + 4));
  int64_t num_tiles = 0;
  const int64_t cuts[4] = {0, g0, g1, p.q_len};
  for (int part = 0; part < 3; ++part) {
    for (int64_t i = cuts[part]; i < cuts[part + 1]; i += kTq) {
      tiles[num_tiles++] = Tile{i, Min(cuts[part + 1], i + kTq), part == 1};
    }
  }
  c.tiles = tiles;
  c.num_tiles = num_tiles;
  // Spans per tile: the global strip, the window, and R random blocks per query block the tile touches.
  const int64_t blocks_per_tile = pat.random() ? kTq / pat.block_size + 2 : 0;
  c.max_spans = 2 + blocks_per_tile * pat.num_random;

  const int64_t bh_q = p.batch * p.q_heads;
  const int64_t total = bh_q * num_tiles;
  const int64_t tasks = Min(total, Max(1, p.parallelism) * 4);
  const size_t floats_per_task = static_cast<size_t>(kTq * kTk + kTq * c.ldo + 2 * kTq + kTk);
  const size_t ints_per_task = static_cast<size_t>(2 * c.max_spans + kTq * pat.num_random);
  float* fbuf = scratch.Get<float>(floats_per_task * static_cast<size_t>(tasks));
  int64_t* ibuf = scratch.Get<int64_t>(ints_per_task * static_cast<size_t>(tasks) + 1);
  int64_t next = 0;
  auto task = [&](size_t index) {
    TaskScratch w;
    float* f = fbuf + floats_per_task * index;
    w.s = f;
    w.o = w.s + kTq * kTk;
    w.m = w.o + kTq * c.ldo;
    w.l = w.m + kTq;
    w.colmask = w.l + kTq;
    w.spans = ibuf + ints_per_task * index;
    w.chosen = w.spans + 2 * c.max_spans;
    for (;;) {
      const int64_t item = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
      if (item >= total) break;
      // Heaviest first: the last tiles of every head (causal rows see the most keys) go out first.
      const int64_t tile = num_tiles - 1 - item / bh_q;
      const int64_t bh = item % bh_q;
      ProcessTile(c, bh / p.q_heads, bh % p.q_heads, tiles[tile], w);
    }
  };
  pool.For(static_cast<size_t>(tasks), task);
}

}  // namespace attnexport::cpu::ATTNEXPORT_ISA
