// ClusteredAttention, CPU, compiled once per ISA (namespace attnexport::cpu::ATTNEXPORT_ISA).
//
// 1. Clusters, one task per (batch, kv head) (cluster=keys) or (batch, query head) (queries): the
//    deterministic k-means of clustered_reference.kmeans. Distances are |μ_c|² - 2 x·μ_c (|x|² is the
//    same for every c), x·μ by the register-blocked micro-kernel of gemm.h over chunks of kChunk
//    points against a packed μᵀ; ties go to the lowest index; means are summed in double. With the
//    centroids input the keys are only assigned. Cost O(I · n · M · d).
// 2. Per-cluster totals of V and key counts, as checkpoints every kCheck key positions (prefix sums
//    over positions; the last one is the total), so a causal row reads the totals of keys <= i' from
//    the checkpoint below and at most kCheck more keys, and a non-causal row the full totals.
// 3. Query tiles of kTq rows, handed out through an atomic counter (heaviest first). A tile reads the
//    key strips its rows' near sets reach (the global strip and the union of the windows; every key
//    for global rows), S = Q Kᵀ and C = Q μᵀ by the micro-kernel, and the base totals B_c, n_c of
//    the keys its first row sees (a checkpoint plus < kCheck keys). Then row by row:
//      n_c grows by the keys this row sees beyond the base (causal: j <= i', inside the tile's strips);
//      near keys (runs of the pattern, minus padding) keep their logits and are tallied per cluster;
//      far count f_c = n_c - near_c (exact integers): cluster c is present iff f_c > 0;
//      m = max(near logits, present centre logits); E_c = e^{s q·μ_c - m} for present c, else 0;
//      P_j = [near] e^{s q·k_j - m} + ([seen beyond the base] - [near]) E_{a(j)}, so that
//      P V + E B = Σ_near e^{..} v_j + Σ_c E_c (T_c - near share_c), the far sums as totals minus
//      the near keys' share; l = Σ_near e^{..} + Σ_c E_c f_c.
//    O = E B + P V by the micro-kernel for the whole tile. Cost O(n · (near + M) · d).
// cluster=queries runs step 1 over each head's queries, then each centre attends over every visible
// key through the same tile code (global rows: all keys near, no clusters), and every query copies
// its centre's row.
#include "cpu/kernels/clustered_attention.h"

#include <cstring>

#include "cpu/kernels/gemm.h"
#include "cpu/kernels/simd.h"

namespace attnexport::cpu::ATTNEXPORT_ISA {
namespace {

using simd::kWidth;
using simd::Vec;

constexpr int64_t kTq = 48;      // query rows per tile
constexpr int64_t kChunk = 240;  // k-means points per distance product
constexpr int64_t kCheck = 256;  // key positions between checkpoints of the per-cluster totals
constexpr int64_t kStrip = gemm::kVecs * kWidth;  // keys per packed strip of Kᵀ ([Dk][kStrip])
constexpr float kNegInf = -__builtin_inff();
constexpr float kInf = __builtin_inff();

ATTNEXPORT_INLINE int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
ATTNEXPORT_INLINE int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }
ATTNEXPORT_INLINE int64_t Max(int64_t a, int64_t b) { return a > b ? a : b; }

// x [rows, d] (row-major, ld d) times packed μᵀ [d, m_pad] into out [rows, m_pad].
void CentreProducts(const float* x, int64_t rows, int64_t d, const float* centres_t, int64_t m_pad, float* out) {
  gemm::Product g;
  g.k1 = d;
  g.a1 = x;
  g.lda1 = d;
  g.b1 = centres_t;
  g.ldb1 = m_pad;
  g.c = out;
  g.ldc = m_pad;
  gemm::Run<gemm::kStore>(g, rows, m_pad);
}

// μ [m, d] -> packed μᵀ [d, m_pad] (zero columns past m) and |μ_c|² (+inf past m: never nearest).
void PackCentres(const float* centres, int64_t m, int64_t d, int64_t m_pad, float* centres_t, float* norms) {
  for (int64_t c = 0; c < m_pad; ++c) {
    float norm = 0.f;
    for (int64_t e = 0; e < d; ++e) {
      const float x = c < m ? centres[c * d + e] : 0.f;
      centres_t[e * m_pad + c] = x;
      norm += x * x;
    }
    norms[c] = c < m ? norm : kInf;
  }
}

struct KMeansScratch {
  float* points;     // [kChunk, d] gathered points
  float* products;   // [kChunk, m_pad]
  float* centres_t;  // [d, m_pad]
  float* norms;      // [m_pad]
  double* sums;      // [m, d]
  int64_t* counts;   // [m]
  int64_t* rows;     // [n] the visible rows
  static size_t Floats(int64_t d, int64_t m_pad) { return static_cast<size_t>(kChunk * d + kChunk * m_pad + d * m_pad + m_pad); }
};

// Nearest centre of each of the n_rows points x[rows[r]] (first minimum of |μ_c|² - 2 x·μ_c) into
// assign[rows[r]]; when sums is given, also the per-cluster sums and counts of the points.
void AssignPoints(const float* x, const int64_t* rows, int64_t n_rows, int64_t d, int64_t m, int64_t m_pad,
                  const KMeansScratch& w, int32_t* assign, double* sums, int64_t* counts) {
  if (sums) {
    std::memset(sums, 0, sizeof(double) * m * d);
    std::memset(counts, 0, sizeof(int64_t) * m);
  }
  for (int64_t r0 = 0; r0 < n_rows; r0 += kChunk) {
    const int64_t count = Min(kChunk, n_rows - r0);
    for (int64_t r = 0; r < count; ++r) std::memcpy(w.points + r * d, x + rows[r0 + r] * d, sizeof(float) * d);
    CentreProducts(w.points, count, d, w.centres_t, m_pad, w.products);
    for (int64_t r = 0; r < count; ++r) {
      const float* dot = w.products + r * m_pad;
      int32_t best = 0;
      float best_score = w.norms[0] - 2.f * dot[0];
      for (int64_t c = 1; c < m; ++c) {
        const float score = w.norms[c] - 2.f * dot[c];
        if (score < best_score) {
          best_score = score;
          best = static_cast<int32_t>(c);
        }
      }
      assign[rows[r0 + r]] = best;
      if (sums) {
        const float* point = w.points + r * d;
        double* sum = sums + best * d;
        for (int64_t e = 0; e < d; ++e) sum[e] += point[e];
        ++counts[best];
      }
    }
  }
}

// clustered_reference.kmeans over the rows of x [n, d] that visible keeps (all when null): centres
// [m, d] and assign [n] (-1 for rows not visible). `given` (nullable) replaces the k-means.
void KMeans(const float* x, int64_t n, int64_t d, const bool* visible, int64_t m, int64_t iterations,
            const float* given, float* centres, int32_t* assign, const KMeansScratch& w) {
  const int64_t m_pad = RoundUp(m, kWidth);
  int64_t n_v = 0;
  for (int64_t j = 0; j < n; ++j) {
    assign[j] = -1;
    if (!visible || visible[j]) w.rows[n_v++] = j;
  }
  if (given) {
    std::memcpy(centres, given, sizeof(float) * m * d);
  } else if (n_v == 0) {
    std::memset(centres, 0, sizeof(float) * m * d);
    return;
  } else {
    for (int64_t c = 0; c < m; ++c) std::memcpy(centres + c * d, x + w.rows[c * n_v / m] * d, sizeof(float) * d);
  }
  for (int64_t it = 0; !given && it < iterations; ++it) {
    PackCentres(centres, m, d, m_pad, w.centres_t, w.norms);
    AssignPoints(x, w.rows, n_v, d, m, m_pad, w, assign, w.sums, w.counts);
    for (int64_t c = 0; c < m; ++c) {
      if (w.counts[c] == 0) continue;  // an empty cluster keeps its centre
      const double inv = 1.0 / static_cast<double>(w.counts[c]);
      for (int64_t e = 0; e < d; ++e) centres[c * d + e] = static_cast<float>(w.sums[c * d + e] * inv);
    }
  }
  PackCentres(centres, m, d, m_pad, w.centres_t, w.norms);
  AssignPoints(x, w.rows, n_v, d, m, m_pad, w, assign, nullptr, nullptr);
}

struct Tile {
  int64_t begin, end;  // query rows
  bool dense;          // global rows (or cluster centres in queries mode): every key is near
};

// Everything the tile workers read.
struct Context {
  const ClusteredAttentionProblem* p;
  int64_t q_heads, q_len, kv_len, dk, dv, shift;  // shift = Skv - Sq (0 for query-mode centres)
  int64_t wl, wr, dilation, num_global;           // unbounded windows replaced by Sq + Skv + 1
  bool causal;
  const float* q;        // [B, Hq, rows, Dk] the rows that attend
  const float* kt;       // per (batch, kv head): [strips][Dk][kStrip] Kᵀ, zero past Skv
  int64_t kt_head;       // floats per (batch, kv head)
  int64_t key_strips;    // strips of Kᵀ per (batch, kv head)
  const float* v;        // [B, Hkv, Skv, ldv] (padded with zero columns)
  int64_t ldv;
  const bool* mask;      // [B, Skv] or null
  // Clusters (cluster=keys; m = 0: none).
  int64_t m = 0, m_pad = 0;
  const float* centres_t = nullptr;  // per (batch, kv head): [Dk, m_pad]
  const int32_t* assign = nullptr;   // per (batch, kv head): [Skv], -1 for padded keys
  const float* check_sums = nullptr;  // per (batch, kv head): [checks][m][ldv] totals of keys < c * kCheck
  const int32_t* check_counts = nullptr;  // per (batch, kv head): [checks][m]
  int64_t checks = 0;
  float* y;              // [B, Hq, rows, Dv]
  const Tile* tiles;
  int64_t num_tiles;
  int64_t max_width;     // S columns per tile (whole strips)
};

struct TaskScratch {
  float* s;          // [kTq, max_width] logits, then weights P
  int64_t* strips;   // [max_width / kStrip] the strips the tile reads
  int64_t* strip_column;  // [strips of Kᵀ] first column of S of each strip the tile reads
  float* c;          // [kTq, m_pad] centre logits, then E
  float* o;          // [kTq, ldv] unnormalised output
  float* l;          // [kTq] normalisers
  float* sums;       // [m, ldv] running per-cluster totals
  int32_t* counts;   // [m] running counts
  int32_t* near_count;  // [m]
  float* logits;     // [max_width] one row of near logits being built
  float* far;        // [m_pad] far keys per cluster of the row, f_c (0 past m)
};

ATTNEXPORT_INLINE int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// The keys j < stop near to the query at position pos (the pattern; padding aside) as runs
// fn(first, end, step) of keys first, first + step, ... < end, disjoint and increasing: the global
// keys, then the window's keys, stepping by the dilation; every key for dense or global rows.
template <typename Fn>
ATTNEXPORT_INLINE void ForEachNearRun(const Context& c, int64_t pos, int64_t stop, bool dense, Fn&& fn) {
  if (dense || (pos >= 0 && pos < c.num_global)) {
    if (stop > 0) fn(int64_t{0}, stop, int64_t{1});
    return;
  }
  const int64_t globals = Min(c.num_global, stop);
  if (globals > 0) fn(int64_t{0}, globals, int64_t{1});
  const int64_t lo = Max(pos - c.wl, globals), hi = Min(pos + c.wr + 1, stop);
  const int64_t first = pos - FloorDiv(pos - lo, c.dilation) * c.dilation;  // the first j >= lo on the dilation grid
  if (first < hi) fn(first, hi, c.dilation);
}

// The strips of Kᵀ the rows of a tile reach (sorted, each once); returns how many.
int64_t TileStrips(const Context& c, const Tile& tile, int64_t* strips) {
  const int64_t p0 = tile.begin + c.shift, p1 = tile.end + c.shift;
  const int64_t stop = c.causal ? Min(c.kv_len, Max(p1, 0)) : c.kv_len;  // keys j < stop
  int64_t spans[4], n = 0;
  auto add = [&](int64_t a, int64_t b) {
    a = Max(a, 0);
    b = Min(b, stop);
    if (a < b) {
      spans[n++] = a;
      spans[n++] = b;
    }
  };
  const bool global_rows = p1 > 0 && p0 < c.num_global;
  if (tile.dense || global_rows) {
    add(0, stop);
  } else {
    add(0, c.num_global);
    add(p0 - c.wl, p1 + c.wr);
  }
  int64_t count = 0, last = -1;
  for (int64_t s = 0; s < n; s += 2) {
    for (int64_t strip = Max(spans[s] / kStrip, last + 1); strip <= (spans[s + 1] - 1) / kStrip; ++strip) {
      strips[count++] = strip;
      last = strip;
    }
  }
  return count;
}

// The per-cluster totals of V and counts of the visible keys j < target: the checkpoint below
// `target` plus at most kCheck keys.
void TotalsBelow(const Context& c, int64_t bkv, int64_t target, const TaskScratch& w) {
  const int32_t* assign = c.assign + bkv * c.kv_len;
  const float* v = c.v + bkv * c.kv_len * c.ldv;
  const int64_t check = target / kCheck;
  std::memcpy(w.sums, c.check_sums + (bkv * c.checks + check) * c.m * c.ldv, sizeof(float) * c.m * c.ldv);
  std::memcpy(w.counts, c.check_counts + (bkv * c.checks + check) * c.m, sizeof(int32_t) * c.m);
  for (int64_t upto = check * kCheck; upto < target; ++upto) {
    const int32_t a = assign[upto];
    if (a < 0) continue;
    float* sum = w.sums + a * c.ldv;
    const float* row = v + upto * c.ldv;
    for (int64_t d = 0; d < c.ldv; d += kWidth) simd::Store(sum + d, simd::Load(sum + d) + simd::Load(row + d));
    ++w.counts[a];
  }
}

void ProcessTile(const Context& c, int64_t b, int64_t h, const Tile& tile, const TaskScratch& w) {
  const ClusteredAttentionProblem& p = *c.p;
  const int64_t rows = tile.end - tile.begin;
  const int64_t hkv = h / (p.q_heads / p.kv_heads);
  const int64_t bkv = b * p.kv_heads + hkv;
  const int64_t dk = c.dk;
  const float* q = c.q + ((b * c.q_heads + h) * c.q_len + tile.begin) * dk;
  const float* kt = c.kt + bkv * c.kt_head;
  const float* v = c.v + bkv * c.kv_len * c.ldv;
  const bool* mask = c.mask ? c.mask + b * c.kv_len : nullptr;
  const int32_t* assign = c.m ? c.assign + bkv * c.kv_len : nullptr;
  const int64_t num_strips = TileStrips(c, tile, w.strips);
  const int64_t width = num_strips * kStrip;
  for (int64_t s = 0; s < num_strips; ++s) w.strip_column[w.strips[s]] = s * kStrip;
  auto column = [&](int64_t j) { return w.strip_column[j / kStrip] + j % kStrip; };

  // S = Q Kᵀ over the strips, C = Q μᵀ.
  for (int64_t s = 0; s < num_strips; ++s) {
    gemm::Product g;
    g.k1 = dk;
    g.a1 = q;
    g.lda1 = dk;
    g.b1 = kt + w.strips[s] * dk * kStrip;
    g.ldb1 = kStrip;
    g.c = w.s + s * kStrip;
    g.ldc = c.max_width;
    gemm::Run<gemm::kStore>(g, rows, kStrip);
  }
  if (c.m) CentreProducts(q, rows, dk, c.centres_t + bkv * dk * c.m_pad, c.m_pad, w.c);

  // The tile's base totals B: the keys the first row sees. A later (causal) row also sees the keys
  // [base_stop, stop), all inside the tile's strips: they count in n_c and their far share goes
  // into P (below), so that O = P V + E B for the whole tile.
  auto seen_below = [&](int64_t r) { return c.causal ? Min(c.kv_len, Max(tile.begin + r + c.shift + 1, 0)) : c.kv_len; };
  const int64_t base_stop = seen_below(0);
  if (c.m) TotalsBelow(c, bkv, base_stop, w);
  int64_t counted = base_stop;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = tile.begin + r + c.shift;
    const int64_t stop = seen_below(r);  // keys j < stop are seen
    float* srow = w.s + r * c.max_width;
    if (c.m) {
      for (; counted < stop; ++counted) {
        if (!mask || mask[counted]) ++w.counts[assign[counted]];
      }
      std::memset(w.near_count, 0, sizeof(int32_t) * c.m);
    }
    // Near logits (the pattern, padding, causality), scaled; -inf elsewhere. Within a run of keys
    // the columns of S are consecutive (a run lies inside one span of consecutive strips).
    const Vec neg_inf = simd::Splat(kNegInf), scale = simd::Splat(p.scale);
    Vec top_v = neg_inf;
    float top = kNegInf;
    for (int64_t k = 0; k < width; k += kWidth) simd::Store(w.logits + k, neg_inf);
    ForEachNearRun(c, pos, stop, tile.dense, [&](int64_t first, int64_t end, int64_t step) {
      const int64_t col = column(first);
      if (step == 1 && !mask) {
        int64_t k = 0;
        for (; k + kWidth <= end - first; k += kWidth) {
          const Vec x = simd::Load(srow + col + k) * scale;
          simd::Store(w.logits + col + k, x);
          top_v = x > top_v ? x : top_v;
        }
        for (; k < end - first; ++k) {
          const float x = srow[col + k] * p.scale;
          w.logits[col + k] = x;
          top = x > top ? x : top;
        }
        if (assign) {
          for (int64_t j = first; j < end; ++j) ++w.near_count[assign[j]];
        }
        return;
      }
      for (int64_t j = first, k = 0; j < end; j += step, k += step) {
        if (mask && !mask[j]) continue;
        const float x = srow[col + k] * p.scale;
        w.logits[col + k] = x;
        top = x > top ? x : top;
        if (assign) ++w.near_count[assign[j]];
      }
    });
    top = simd::MaxLane(top_v) > top ? simd::MaxLane(top_v) : top;
    std::memcpy(srow, w.logits, sizeof(float) * width);
    // Present clusters (far keys left in them, f_c = n_c - near_c > 0) and their logits.
    float* crow = w.c + r * c.m_pad;
    for (int64_t cl = 0; cl < c.m_pad; ++cl) {
      w.far[cl] = cl < c.m ? static_cast<float>(w.counts[cl] - w.near_count[cl]) : 0.f;
    }
    for (int64_t cl = 0; cl < c.m_pad; cl += kWidth) {
      const Vec far_v = simd::Load(w.far + cl);
      const Vec x = far_v > 0.f ? simd::Load(crow + cl) * scale : neg_inf;
      simd::Store(crow + cl, x);
      top = simd::MaxLane(x) > top ? simd::MaxLane(x) : top;
    }
    if (top == kNegInf) {  // nothing visible: no weight, row 0
      for (int64_t k = 0; k < width; ++k) srow[k] = 0.f;
      for (int64_t cl = 0; cl < c.m_pad; ++cl) crow[cl] = 0.f;
      w.l[r] = 0.f;
      continue;
    }
    const Vec mv = simd::Splat(top);
    Vec total = simd::Zero();
    for (int64_t k = 0; k < width; k += kWidth) {
      const Vec e = simd::ExpNonPositive(simd::Load(srow + k) - mv);
      total += e;
      simd::Store(srow + k, e);
    }
    // E_c = e^{s q·μ_c - m} (0 for absent clusters), kept in the row of C for O += E B; l += Σ_c E_c f_c.
    for (int64_t cl = 0; cl < c.m_pad; cl += kWidth) {
      const Vec e = simd::ExpNonPositive(simd::Load(crow + cl) - mv);
      simd::Store(crow + cl, e);
      total += e * simd::Load(w.far + cl);
    }
    const float l = simd::Sum(total);
    if (c.m) {
      // Keys seen beyond the base totals count at their centre's weight; the near keys' share comes
      // off their cluster's far term (a near key beyond the base: both, net 0).
      for (int64_t j = base_stop; j < stop; ++j) {
        if (!mask || mask[j]) srow[column(j)] += crow[assign[j]];
      }
      ForEachNearRun(c, pos, stop, tile.dense, [&](int64_t first, int64_t end, int64_t step) {
        float* prow = srow + column(first) - first;
        for (int64_t j = first; j < end; j += step) {
          if (!mask || mask[j]) prow[j] -= crow[assign[j]];
        }
      });
    }
    w.l[r] = l;
  }
  if (c.m) {
    gemm::Product eb;
    eb.k1 = c.m;
    eb.a1 = w.c;
    eb.lda1 = c.m_pad;
    eb.b1 = w.sums;
    eb.ldb1 = c.ldv;
    eb.c = w.o;
    eb.ldc = c.ldv;
    gemm::Run<gemm::kStore>(eb, rows, c.ldv);
  } else {
    std::memset(w.o, 0, sizeof(float) * rows * c.ldv);
  }
  // O = E B (the far terms of the base totals) + P V, one product per run of consecutive strips (keys past Skv have no row of V).
  for (int64_t s = 0, run = 1; s < num_strips; s += run) {
    run = 1;
    while (s + run < num_strips && w.strips[s + run] == w.strips[s] + run) ++run;
    const int64_t j0 = w.strips[s] * kStrip;
    gemm::Product pv;
    pv.k1 = Min(run * kStrip, c.kv_len - j0);
    pv.a1 = w.s + s * kStrip;
    pv.lda1 = c.max_width;
    pv.b1 = v + j0 * c.ldv;
    pv.ldb1 = c.ldv;
    pv.c = w.o;
    pv.ldc = c.ldv;
    gemm::Run<gemm::kAccumulate>(pv, rows, c.ldv);
  }
  float* y = c.y + ((b * c.q_heads + h) * c.q_len + tile.begin) * c.dv;
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = w.l[r] > 0.f ? 1.f / w.l[r] : 0.f;
    const float* orow = w.o + r * c.ldv;
    float* yrow = y + r * c.dv;
    for (int64_t d = 0; d < c.dv; ++d) yrow[d] = inv == 0.f ? 0.f : orow[d] * inv;
  }
}

// Query tiles of one head: [0, g0), [g0, g1) (global rows), [g1, rows), each cut into kTq rows.
int64_t MakeTiles(int64_t rows, int64_t g0, int64_t g1, bool all_dense, Tile* tiles) {
  int64_t n = 0;
  const int64_t cuts[4] = {0, g0, g1, rows};
  for (int part = 0; part < 3; ++part) {
    for (int64_t i = cuts[part]; i < cuts[part + 1]; i += kTq) tiles[n++] = Tile{i, Min(cuts[part + 1], i + kTq), all_dense};
  }
  return n;
}

// Runs every (batch, head, tile) of the context on the pool.
void RunTiles(const Context& c, const ThreadPool& pool, const Scratch& scratch, int64_t parallelism) {
  const int64_t bh = c.p->batch * c.q_heads;
  const int64_t total = bh * c.num_tiles;
  if (total == 0) return;
  // Wide tiles (unbounded windows, global rows) hold a long row of logits: fewer tasks then.
  const int64_t tasks = Min(total, Max(1, parallelism) * (c.max_width > 8192 ? 1 : 4));
  const size_t floats = static_cast<size_t>(kTq * c.max_width + kTq * Max(c.m_pad, 1) + kTq * c.ldv + kTq +
                                            Max(c.m, 1) * c.ldv + 2 * Max(c.m_pad, 1) + c.max_width);
  const size_t ints = static_cast<size_t>(2 * Max(c.m, 1));
  const size_t longs = static_cast<size_t>(c.max_width / kStrip + 1 + c.key_strips);
  float* fbuf = scratch.Get<float>(floats * tasks);
  int32_t* ibuf = scratch.Get<int32_t>(ints * tasks);
  int64_t* lbuf = scratch.Get<int64_t>(longs * tasks);
  int64_t next = 0;
  auto task = [&](size_t index) {
    TaskScratch w;
    float* f = fbuf + floats * index;
    w.s = f;
    w.c = w.s + kTq * c.max_width;
    w.o = w.c + kTq * Max(c.m_pad, 1);
    w.l = w.o + kTq * c.ldv;
    w.sums = w.l + kTq;
    w.far = w.sums + Max(c.m, 1) * c.ldv;
    w.logits = w.far + Max(c.m_pad, 1);
    w.counts = ibuf + ints * index;
    w.near_count = w.counts + Max(c.m, 1);
    w.strips = lbuf + longs * index;
    w.strip_column = w.strips + c.max_width / kStrip + 1;
    for (;;) {
      const int64_t item = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
      if (item >= total) break;
      const int64_t tile = c.num_tiles - 1 - item / bh;  // heaviest (last, for causal) first
      ProcessTile(c, (item % bh) / c.q_heads, (item % bh) % c.q_heads, c.tiles[tile], w);
    }
  };
  pool.For(static_cast<size_t>(tasks), task);
}

}  // namespace

void ClusteredAttentionForward(const ClusteredAttentionProblem& p, const ClusteredAttentionTensors& t,
                               const ThreadPool& pool, const Scratch& scratch) {
  const int64_t dk = p.head_dim, dv = p.value_dim, m = p.num_clusters;
  const int64_t bh_kv = p.batch * p.kv_heads, bh_q = p.batch * p.q_heads;
  if (p.kv_len == 0) {  // no key: every row is 0
    std::memset(t.y, 0, sizeof(float) * bh_q * p.q_len * dv);
    return;
  }
  const int64_t m_pad = RoundUp(m, kWidth);
  const int64_t far = p.q_len + p.kv_len + 1;

  Context c;
  c.p = &p;
  c.kv_len = p.kv_len;
  c.dk = dk;
  c.dv = dv;
  c.mask = t.key_padding_mask;

  // Kᵀ per (batch, kv head) in strips of kStrip keys, zero past Skv; V padded to whole vectors.
  const int64_t strips = RoundUp(p.kv_len, kStrip) / kStrip;
  c.kt_head = strips * dk * kStrip;
  c.key_strips = strips;
  float* kt = scratch.Get<float>(static_cast<size_t>(bh_kv * c.kt_head));
  c.ldv = RoundUp(dv, kWidth);
  float* vp = scratch.Get<float>(static_cast<size_t>(bh_kv * p.kv_len * c.ldv));
  auto pack = [&](size_t index) {
    const float* src = t.k + static_cast<int64_t>(index) * p.kv_len * dk;
    float* dst = kt + static_cast<int64_t>(index) * c.kt_head;
    for (int64_t strip = 0; strip < strips; ++strip) {
      float* panel = dst + strip * dk * kStrip;
      const int64_t j0 = strip * kStrip, n = Min(kStrip, p.kv_len - j0);
      for (int64_t d = 0; d < dk; ++d) {
        float* out = panel + d * kStrip;
        for (int64_t j = 0; j < n; ++j) out[j] = src[(j0 + j) * dk + d];
        for (int64_t j = n; j < kStrip; ++j) out[j] = 0.f;
      }
    }
    const float* vs = t.v + static_cast<int64_t>(index) * p.kv_len * dv;
    float* vd = vp + static_cast<int64_t>(index) * p.kv_len * c.ldv;
    for (int64_t j = 0; j < p.kv_len; ++j) {
      std::memcpy(vd + j * c.ldv, vs + j * dv, sizeof(float) * dv);
      std::memset(vd + j * c.ldv + dv, 0, sizeof(float) * (c.ldv - dv));
    }
  };
  pool.For(static_cast<size_t>(bh_kv), pack);
  c.kt = kt;
  c.v = vp;

  // Step 1: clusters of the keys of each (batch, kv head), or of the queries of each (batch, query head).
  const int64_t groups = p.cluster_queries ? bh_q : bh_kv;
  const int64_t points = p.cluster_queries ? p.q_len : p.kv_len;
  float* centres = scratch.Get<float>(static_cast<size_t>(groups * m * dk));
  int32_t* assign = scratch.Get<int32_t>(static_cast<size_t>(groups * points));
  float* centres_t = scratch.Get<float>(static_cast<size_t>(groups * dk * m_pad));
  const size_t km_floats = KMeansScratch::Floats(dk, m_pad);
  float* km_f = scratch.Get<float>(km_floats * groups);
  double* km_d = scratch.Get<double>(static_cast<size_t>(m * dk * groups));
  int64_t* km_i = scratch.Get<int64_t>(static_cast<size_t>((m + points) * groups));
  auto cluster = [&](size_t index) {
    const int64_t g = static_cast<int64_t>(index);
    KMeansScratch w;
    w.points = km_f + km_floats * g;
    w.products = w.points + kChunk * dk;
    w.centres_t = centres_t + g * dk * m_pad;  // kept: the tiles read the final packed centres
    w.norms = w.products + kChunk * m_pad;
    w.sums = km_d + m * dk * g;
    w.counts = km_i + (m + points) * g;
    w.rows = w.counts + m;
    const float* x = p.cluster_queries ? t.q + g * p.q_len * dk : t.k + g * p.kv_len * dk;
    const bool* visible = p.cluster_queries || !t.key_padding_mask ? nullptr : t.key_padding_mask + (g / p.kv_heads) * p.kv_len;
    const float* given = t.centroids && !p.cluster_queries ? t.centroids + (g % p.kv_heads) * m * dk : nullptr;
    KMeans(x, points, dk, visible, m, p.iterations, given, centres + g * m * dk, assign + g * points, w);
  };
  pool.For(static_cast<size_t>(groups), cluster);

  Tile* tiles = scratch.Get<Tile>(static_cast<size_t>((Max(p.q_len, m) + kTq - 1) / kTq + 4));
  if (p.cluster_queries) {
    // Each centre attends over every visible key (dense rows, no clusters), then queries copy their centre's row.
    float* rows = scratch.Get<float>(static_cast<size_t>(bh_q * m * dv));
    c.q_heads = p.q_heads;
    c.q_len = m;
    c.shift = 0;
    c.wl = c.wr = far;
    c.dilation = 1;
    c.num_global = 0;
    c.causal = false;
    c.q = centres;
    c.y = rows;
    c.tiles = tiles;
    c.num_tiles = MakeTiles(m, 0, 0, true, tiles);
    c.max_width = strips * kStrip;
    RunTiles(c, pool, scratch, p.parallelism);
    auto gather = [&](size_t index) {
      const int64_t g = static_cast<int64_t>(index);
      for (int64_t i = 0; i < p.q_len; ++i) {
        std::memcpy(t.y + (g * p.q_len + i) * dv, rows + (g * m + assign[g * p.q_len + i]) * dv, sizeof(float) * dv);
      }
    };
    pool.For(static_cast<size_t>(bh_q), gather);
    return;
  }

  // Step 2: per-cluster totals of V and counts at every kCheck key positions (and at Skv).
  c.m = m;
  c.m_pad = m_pad;
  c.centres_t = centres_t;
  c.assign = assign;
  c.checks = p.kv_len / kCheck + 1;
  float* check_sums = scratch.Get<float>(static_cast<size_t>(bh_kv * c.checks * m * c.ldv));
  int32_t* check_counts = scratch.Get<int32_t>(static_cast<size_t>(bh_kv * c.checks * m));
  auto prefix = [&](size_t index) {
    const int64_t g = static_cast<int64_t>(index);
    float* sums = check_sums + g * c.checks * m * c.ldv;
    int32_t* counts = check_counts + g * c.checks * m;
    std::memset(sums, 0, sizeof(float) * m * c.ldv);
    std::memset(counts, 0, sizeof(int32_t) * m);
    const float* v = vp + g * p.kv_len * c.ldv;
    for (int64_t check = 1; check < c.checks; ++check) {
      float* s = sums + check * m * c.ldv;
      int32_t* n = counts + check * m;
      std::memcpy(s, s - m * c.ldv, sizeof(float) * m * c.ldv);
      std::memcpy(n, n - m, sizeof(int32_t) * m);
      for (int64_t j = (check - 1) * kCheck; j < check * kCheck; ++j) {
        const int32_t a = assign[g * p.kv_len + j];
        if (a < 0) continue;
        for (int64_t d = 0; d < c.ldv; d += kWidth) {
          simd::Store(s + a * c.ldv + d, simd::Load(s + a * c.ldv + d) + simd::Load(v + j * c.ldv + d));
        }
        ++n[a];
      }
    }
  };
  pool.For(static_cast<size_t>(bh_kv), prefix);
  c.check_sums = check_sums;
  c.check_counts = check_counts;

  // Step 3: the query tiles.
  c.q_heads = p.q_heads;
  c.q_len = p.q_len;
  c.shift = p.kv_len - p.q_len;
  c.wl = p.window_left < 0 ? far : Min(p.window_left, far);
  c.wr = p.window_right < 0 ? far : Min(p.window_right, far);
  c.dilation = p.dilation;
  c.num_global = Min(p.num_global, far);
  c.causal = p.causal;
  c.q = t.q;
  c.y = t.y;
  const int64_t g0 = Min(Max(-c.shift, 0), p.q_len);
  const int64_t g1 = Min(Max(c.num_global - c.shift, g0), p.q_len);
  c.tiles = tiles;
  c.num_tiles = MakeTiles(p.q_len, g0, g1, false, tiles);
  int64_t max_strips = 1;
  int64_t* strip_list = scratch.Get<int64_t>(static_cast<size_t>(strips + 1));
  for (int64_t i = 0; i < c.num_tiles; ++i) max_strips = Max(max_strips, TileStrips(c, tiles[i], strip_list));
  c.max_width = max_strips * kStrip;
  RunTiles(c, pool, scratch, p.parallelism);
}

}  // namespace attnexport::cpu::ATTNEXPORT_ISA
