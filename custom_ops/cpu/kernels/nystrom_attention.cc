// NystromAttention, CPU, compiled once per ISA (namespace attnexport::cpu::ATTNEXPORT_ISA).
//
// One work item is a (batch, kv head): the visible keys are listed once, the key landmarks L_k
// (segment means or k-means) computed once, then for every query head of the group: the query
// landmarks L_q, M = softmax(s L_q L_kᵀ) and F3 V = softmax(s L_q K_visᵀ) V_vis (float64, m_q x m_k
// and m_q x Dv), the landmark system solved in float64, and Y = softmax(s Q L_kᵀ) X row by row.
// Cost O((Sq + n_v) · m · D) per head plus the m x m solve: linear in the sequence.
//
// The solvers (nystrom_attention.py has the definitions):
//   sketch: the stacked tall system A = [M; √ridge·I] preconditioned by its R factor, started at the QR
//     solution and refined by LSQR on A R⁻¹ to a relative 1e-10. The kernel never sketches: the system has
//     at most 2m rows (a few hundred), which is the identity sketch attnexport.linalg.lstsq takes whenever
//     its 8·m_k sketch rows reach the system's rows (it may sketch when m_q > 7·m_k; same solution).
//   direct: Cholesky of MᵀM + ridge·I (the normal equations).
//   newton_schulz: Nyströmformer's iteration, Z₀ = Mᵀ / (|M|₁ |M|∞).
// Items are split into contiguous ranges, one task per range, each with its own scratch.
#include "cpu/kernels/nystrom_attention.h"

#include <cmath>
#include <cstring>

#include "cpu/kernels/simd.h"

namespace attnexport::cpu::ATTNEXPORT_ISA {
namespace {

constexpr double kLsqrTolerance = 1e-10;
constexpr int kLsqrMaxIterations = 50;

inline int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t Max(int64_t a, int64_t b) { return a > b ? a : b; }

float Dot(const float* a, const float* b, int64_t n) {  // vectorised: the compiler may not reorder a float sum
  simd::Vec acc = simd::Zero();
  int64_t i = 0;
  for (; i + simd::kWidth <= n; i += simd::kWidth) acc += simd::Load(a + i) * simd::Load(b + i);
  float s = simd::Sum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

double Norm(const double* x, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  return std::sqrt(s);
}

// Landmarks [count, d] of n rows (row r at rows + index[r] * d, or r * d when index is null).
// Segment c holds rows floor(c·n/count) .. floor((c+1)·n/count) − 1, i.e. c = ((r+1)·count − 1) / n.
struct Rows {
  const float* base;
  const int64_t* index;
  int64_t n, d;
  const float* row(int64_t r) const { return base + (index ? index[r] : r) * d; }
};

void SegmentMeans(const Rows& x, int64_t count, float* out, double* sums, double* counts) {
  std::memset(sums, 0, sizeof(double) * count * x.d);
  std::memset(counts, 0, sizeof(double) * count);
  for (int64_t r = 0; r < x.n; ++r) {
    const int64_t c = ((r + 1) * count - 1) / x.n;
    const float* row = x.row(r);
    double* s = sums + c * x.d;
    for (int64_t i = 0; i < x.d; ++i) s[i] += row[i];
    counts[c] += 1.0;
  }
  for (int64_t c = 0; c < count; ++c)
    for (int64_t i = 0; i < x.d; ++i) out[c * x.d + i] = static_cast<float>(sums[c * x.d + i] / counts[c]);
}

// Lloyd steps from the rows floor(c·n/count); nearest centre by |μ|² − 2 x·μ (float, as the ONNX
// function computes it), ties to the lowest index; an empty cluster keeps its centre.
void Kmeans(const Rows& x, int64_t count, int64_t iterations, float* centres, double* sums, double* counts,
            float* norms) {
  for (int64_t c = 0; c < count; ++c) std::memcpy(centres + c * x.d, x.row(c * x.n / count), sizeof(float) * x.d);
  for (int64_t it = 0; it < iterations; ++it) {
    for (int64_t c = 0; c < count; ++c) norms[c] = Dot(centres + c * x.d, centres + c * x.d, x.d);
    std::memset(sums, 0, sizeof(double) * count * x.d);
    std::memset(counts, 0, sizeof(double) * count);
    for (int64_t r = 0; r < x.n; ++r) {
      const float* row = x.row(r);
      int64_t best = 0;
      float best_score = 0.f;
      for (int64_t c = 0; c < count; ++c) {
        const float score = norms[c] - 2.f * Dot(row, centres + c * x.d, x.d);
        if (c == 0 || score < best_score) best = c, best_score = score;
      }
      double* s = sums + best * x.d;
      for (int64_t i = 0; i < x.d; ++i) s[i] += row[i];
      counts[best] += 1.0;
    }
    for (int64_t c = 0; c < count; ++c)
      if (counts[c] > 0)
        for (int64_t i = 0; i < x.d; ++i) centres[c * x.d + i] = static_cast<float>(sums[c * x.d + i] / counts[c]);
  }
}

void Landmarks(const NystromAttentionProblem& p, const Rows& x, int64_t count, float* out, double* sums,
               double* counts, float* norms) {
  if (p.landmarks == NystromLandmarks::kKmeans) Kmeans(x, count, p.iterations, out, sums, counts, norms);
  else SegmentMeans(x, count, out, sums, counts);
}

// Softmax of logits[0..n) in place (float64 weights out); returns nothing, n >= 1.
void SoftmaxInto(const float* logits, int64_t n, double* weights) {
  float top = logits[0];
  for (int64_t i = 1; i < n; ++i) top = logits[i] > top ? logits[i] : top;
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += (weights[i] = std::exp(static_cast<double>(logits[i] - top)));
  for (int64_t i = 0; i < n; ++i) weights[i] /= total;
}

// -- the landmark system: M [rq, ck] X [ck, dv] ≈ B [rq, dv] ---------------------------------------

// Householder QR of a [rows, cols] (rows >= cols, row-major, in place: R in the upper triangle);
// reflector j (length rows, zero above j) in reflectors + j·rows, its 2/|v|² in betas[j].
void HouseholderQr(double* a, int64_t rows, int64_t cols, double* reflectors, double* betas) {
  for (int64_t j = 0; j < cols; ++j) {
    double* v = reflectors + j * rows;
    double norm = 0.0;
    for (int64_t i = j; i < rows; ++i) norm += a[i * cols + j] * a[i * cols + j];
    norm = std::sqrt(norm);
    const double alpha = a[j * cols + j] >= 0 ? -norm : norm;
    for (int64_t i = 0; i < rows; ++i) v[i] = i < j ? 0.0 : a[i * cols + j];
    v[j] -= alpha;
    const double vv = Norm(v + j, rows - j);
    betas[j] = vv > 0 ? 2.0 / (vv * vv) : 0.0;
    for (int64_t c = j; c < cols; ++c) {
      double t = 0.0;
      for (int64_t i = j; i < rows; ++i) t += v[i] * a[i * cols + c];
      t *= betas[j];
      for (int64_t i = j; i < rows; ++i) a[i * cols + c] -= t * v[i];
    }
  }
}

void ApplyQt(const double* reflectors, const double* betas, int64_t rows, int64_t cols, double* x) {
  for (int64_t j = 0; j < cols; ++j) {
    const double* v = reflectors + j * rows;
    double t = 0.0;
    for (int64_t i = j; i < rows; ++i) t += v[i] * x[i];
    t *= betas[j];
    for (int64_t i = j; i < rows; ++i) x[i] -= t * v[i];
  }
}

// x = R⁻¹ x (upper triangular R = the first n rows of r, row stride ld), in place.
void SolveUpper(const double* r, int64_t ld, int64_t n, double* x) {
  for (int64_t i = n - 1; i >= 0; --i) {
    double s = x[i];
    for (int64_t j = i + 1; j < n; ++j) s -= r[i * ld + j] * x[j];
    x[i] = s / r[i * ld + i];
  }
}

// x = R⁻ᵀ x, in place.
void SolveUpperTransposed(const double* r, int64_t ld, int64_t n, double* x) {
  for (int64_t i = 0; i < n; ++i) {
    double s = x[i];
    for (int64_t j = 0; j < i; ++j) s -= r[j * ld + i] * x[j];
    x[i] = s / r[i * ld + i];
  }
}

void MatVec(const double* a, int64_t rows, int64_t cols, const double* x, double* y) {  // y = A x
  for (int64_t i = 0; i < rows; ++i) {
    double s = 0.0;
    for (int64_t j = 0; j < cols; ++j) s += a[i * cols + j] * x[j];
    y[i] = s;
  }
}

void MatTVec(const double* a, int64_t rows, int64_t cols, const double* x, double* y) {  // y = Aᵀ x
  for (int64_t j = 0; j < cols; ++j) y[j] = 0.0;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) y[j] += a[i * cols + j] * x[i];
}

// The sketch solver on A = [M; √ridge·I] (rows = rq + ck, cols = ck): QR preconditioner, then LSQR on
// A R⁻¹ per right-hand side (attnexport.linalg.sketch_solver, with S = I).
void SolveSketch(const double* m, int64_t rq, int64_t ck, const double* b, int64_t dv, double ridge, double* x,
                 double* work) {
  const int64_t rows = rq + ck, cols = ck;
  double* a = work;                  // [rows, cols] original
  double* r = a + rows * cols;       // [rows, cols] factored
  double* refl = r + rows * cols;    // [cols, rows]
  double* betas = refl + cols * rows;
  double* target = betas + cols;     // [rows]
  double* u = target + rows;         // [rows]
  double* v = u + rows;              // [cols]
  double* w = v + cols;              // [cols]
  double* y = w + cols;              // [cols]
  double* t = y + cols;              // [rows]
  double* z = t + rows;              // [cols]
  std::memcpy(a, m, sizeof(double) * rq * ck);
  const double root = std::sqrt(ridge);
  for (int64_t i = 0; i < ck; ++i)
    for (int64_t j = 0; j < ck; ++j) a[(rq + i) * cols + j] = i == j ? root : 0.0;
  std::memcpy(r, a, sizeof(double) * rows * cols);
  HouseholderQr(r, rows, cols, refl, betas);

  auto apply = [&](const double* in, double* out) {  // out = A R⁻¹ in   ([cols] -> [rows])
    std::memcpy(z, in, sizeof(double) * cols);
    SolveUpper(r, cols, cols, z);
    MatVec(a, rows, cols, z, out);
  };
  auto apply_t = [&](const double* in, double* out) {  // out = R⁻ᵀ Aᵀ in   ([rows] -> [cols])
    MatTVec(a, rows, cols, in, out);
    SolveUpperTransposed(r, cols, cols, out);
  };

  for (int64_t col = 0; col < dv; ++col) {
    for (int64_t i = 0; i < rows; ++i) target[i] = i < rq ? b[i * dv + col] : 0.0;
    const double b_norm = Norm(target, rows);
    // Start: the QR solution R⁻¹ (Qᵀ b)[:cols].
    std::memcpy(u, target, sizeof(double) * rows);
    ApplyQt(refl, betas, rows, cols, u);
    double* x0 = w;  // borrowed until LSQR starts
    std::memcpy(x0, u, sizeof(double) * cols);
    SolveUpper(r, cols, cols, x0);
    for (int64_t i = 0; i < cols; ++i) x[i * dv + col] = x0[i];
    MatVec(a, rows, cols, x0, t);
    for (int64_t i = 0; i < rows; ++i) u[i] = target[i] - t[i];
    // LSQR on B = A R⁻¹ for the correction (Paige–Saunders; same stopping tests as the Python solver).
    double beta = Norm(u, rows);
    if (beta <= kLsqrTolerance * b_norm || beta == 0.0) continue;
    for (int64_t i = 0; i < rows; ++i) u[i] /= beta;
    apply_t(u, v);
    double alpha = Norm(v, cols);
    if (alpha == 0.0) continue;
    for (int64_t i = 0; i < cols; ++i) v[i] /= alpha, w[i] = v[i], y[i] = 0.0;
    double phibar = beta, rhobar = alpha, anorm2 = 0.0;
    for (int it = 0; it < kLsqrMaxIterations; ++it) {
      apply(v, t);
      for (int64_t i = 0; i < rows; ++i) u[i] = t[i] - alpha * u[i];
      beta = Norm(u, rows);
      if (beta > 0) for (int64_t i = 0; i < rows; ++i) u[i] /= beta;
      anorm2 += alpha * alpha + beta * beta;
      double* vt = t;  // [cols] part of t
      apply_t(u, vt);
      for (int64_t i = 0; i < cols; ++i) v[i] = vt[i] - beta * v[i];
      alpha = Norm(v, cols);
      if (alpha > 0) for (int64_t i = 0; i < cols; ++i) v[i] /= alpha;
      const double rho = std::hypot(rhobar, beta);
      if (rho == 0.0) break;
      const double c = rhobar / rho, s = beta / rho, theta = s * alpha, phi = c * phibar;
      rhobar = -c * alpha;
      phibar = s * phibar;
      for (int64_t i = 0; i < cols; ++i) {
        y[i] += (phi / rho) * w[i];
        w[i] = v[i] - (theta / rho) * w[i];
      }
      if (phibar <= kLsqrTolerance * b_norm || alpha * std::fabs(c) <= kLsqrTolerance * std::sqrt(anorm2) ||
          alpha == 0.0)
        break;
    }
    SolveUpper(r, cols, cols, y);
    for (int64_t i = 0; i < cols; ++i) x[i * dv + col] += y[i];
  }
}

// Cholesky of G = MᵀM + ridge·I, X = G⁻¹ Mᵀ B.
void SolveDirect(const double* m, int64_t rq, int64_t ck, const double* b, int64_t dv, double ridge, double* x,
                 double* work) {
  double* g = work;  // [ck, ck], lower triangle becomes L
  for (int64_t i = 0; i < ck; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      double s = i == j ? ridge : 0.0;
      for (int64_t k = 0; k < rq; ++k) s += m[k * ck + i] * m[k * ck + j];
      g[i * ck + j] = s;
    }
  for (int64_t j = 0; j < ck; ++j) {
    double d = g[j * ck + j];
    for (int64_t k = 0; k < j; ++k) d -= g[j * ck + k] * g[j * ck + k];
    d = std::sqrt(d > 0 ? d : ridge);  // G is positive definite (ridge > 0); guard round-off
    g[j * ck + j] = d;
    for (int64_t i = j + 1; i < ck; ++i) {
      double s = g[i * ck + j];
      for (int64_t k = 0; k < j; ++k) s -= g[i * ck + k] * g[j * ck + k];
      g[i * ck + j] = s / d;
    }
  }
  for (int64_t col = 0; col < dv; ++col) {
    for (int64_t i = 0; i < ck; ++i) {  // Mᵀ b, then L z = Mᵀ b
      double s = 0.0;
      for (int64_t k = 0; k < rq; ++k) s += m[k * ck + i] * b[k * dv + col];
      for (int64_t k = 0; k < i; ++k) s -= g[i * ck + k] * x[k * dv + col];
      x[i * dv + col] = s / g[i * ck + i];
    }
    for (int64_t i = ck - 1; i >= 0; --i) {  // Lᵀ x = z
      double s = x[i * dv + col];
      for (int64_t k = i + 1; k < ck; ++k) s -= g[k * ck + i] * x[k * dv + col];
      x[i * dv + col] = s / g[i * ck + i];
    }
  }
}

void MatMul(const double* a, const double* b, int64_t n, int64_t k, int64_t p, double* c) {  // C = A B
  for (int64_t i = 0; i < n; ++i) {
    double* row = c + i * p;
    for (int64_t j = 0; j < p; ++j) row[j] = 0.0;
    for (int64_t l = 0; l < k; ++l) {
      const double f = a[i * k + l];
      const double* brow = b + l * p;
      for (int64_t j = 0; j < p; ++j) row[j] += f * brow[j];
    }
  }
}

// Z ← ¼ Z (13I − MZ (15I − MZ (7I − MZ))), Z₀ = Mᵀ / (|M|₁ |M|∞); X = Z B.
void SolveNewtonSchulz(const double* m, int64_t rq, int64_t ck, const double* b, int64_t dv, int64_t iterations,
                       double* x, double* work) {
  double* z = work;               // [ck, rq]
  double* mz = z + ck * rq;       // [rq, rq]
  double* t1 = mz + rq * rq;      // [rq, rq]
  double* t2 = t1 + rq * rq;      // [rq, rq]
  double* znew = t2 + rq * rq;    // [ck, rq]
  double norm1 = 0.0, norm_inf = 0.0;
  for (int64_t j = 0; j < ck; ++j) {
    double s = 0.0;
    for (int64_t i = 0; i < rq; ++i) s += std::fabs(m[i * ck + j]);
    norm1 = s > norm1 ? s : norm1;
  }
  for (int64_t i = 0; i < rq; ++i) {
    double s = 0.0;
    for (int64_t j = 0; j < ck; ++j) s += std::fabs(m[i * ck + j]);
    norm_inf = s > norm_inf ? s : norm_inf;
  }
  const double denominator = norm1 * norm_inf > 0 ? norm1 * norm_inf : 1.0;
  for (int64_t j = 0; j < ck; ++j)
    for (int64_t i = 0; i < rq; ++i) z[j * rq + i] = m[i * ck + j] / denominator;
  for (int64_t it = 0; it < iterations; ++it) {
    MatMul(m, z, rq, ck, rq, mz);
    for (int64_t i = 0; i < rq * rq; ++i) t1[i] = -mz[i];
    for (int64_t i = 0; i < rq; ++i) t1[i * rq + i] += 7.0;
    MatMul(mz, t1, rq, rq, rq, t2);
    for (int64_t i = 0; i < rq * rq; ++i) t2[i] = -t2[i];
    for (int64_t i = 0; i < rq; ++i) t2[i * rq + i] += 15.0;
    MatMul(mz, t2, rq, rq, rq, t1);
    for (int64_t i = 0; i < rq * rq; ++i) t1[i] = -t1[i];
    for (int64_t i = 0; i < rq; ++i) t1[i * rq + i] += 13.0;
    MatMul(z, t1, ck, rq, rq, znew);
    for (int64_t i = 0; i < ck * rq; ++i) z[i] = 0.25 * znew[i];
  }
  MatMul(z, b, ck, rq, dv, x);
}

struct Buffers {
  float *lk, *lq, *logits, *norms, *xf;
  int64_t* index;
  double *sums, *counts, *weights, *kernel, *rhs, *x, *work;
};

int64_t FloatsPerTask(const NystromAttentionProblem& p, int64_t padded) {
  const int64_t n = Max(p.q_len, p.kv_len);
  return 2 * padded * p.head_dim + Max(n, padded) + padded + padded * p.value_dim;
}

int64_t DoublesPerTask(const NystromAttentionProblem& p, int64_t padded) {
  const int64_t n = Max(p.q_len, p.kv_len);
  const int64_t work = 6 * padded * padded + 16 * padded + 16;  // the sketch solver's, the largest
  return padded * p.head_dim + padded + Max(n, padded) + padded * padded + 2 * padded * p.value_dim + work;
}

void RunItem(const NystromAttentionProblem& p, const NystromAttentionTensors& t, int64_t item, const Buffers& s) {
  const int64_t b = item / p.kv_heads, kvh = item % p.kv_heads, group = p.q_heads / p.kv_heads;
  const int64_t dk = p.head_dim, dv = p.value_dim;
  const float* keys = t.k + (b * p.kv_heads + kvh) * p.kv_len * dk;
  const float* values = t.v + (b * p.kv_heads + kvh) * p.kv_len * dv;
  int64_t n_visible = 0;
  for (int64_t j = 0; j < p.kv_len; ++j)
    if (t.key_padding_mask == nullptr || t.key_padding_mask[b * p.kv_len + j]) s.index[n_visible++] = j;
  const int64_t ck = Min(p.num_landmarks, n_visible), rq = Min(p.num_landmarks, p.q_len);
  if (ck == 0 || rq == 0) {  // no visible key: Y = 0
    for (int64_t g = 0; g < group; ++g)
      std::memset(t.y + (b * p.q_heads + kvh * group + g) * p.q_len * dv, 0, sizeof(float) * p.q_len * dv);
    return;
  }
  Landmarks(p, Rows{keys, s.index, n_visible, dk}, ck, s.lk, s.sums, s.counts, s.norms);
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = kvh * group + g;
    const float* queries = t.q + (b * p.q_heads + h) * p.q_len * dk;
    float* out = t.y + (b * p.q_heads + h) * p.q_len * dv;
    Landmarks(p, Rows{queries, nullptr, p.q_len, dk}, rq, s.lq, s.sums, s.counts, s.norms);
    for (int64_t c = 0; c < rq; ++c) {
      const float* lq = s.lq + c * dk;
      // Row c of M = softmax(s L_q L_kᵀ).
      for (int64_t l = 0; l < ck; ++l) s.logits[l] = p.scale * Dot(lq, s.lk + l * dk, dk);
      SoftmaxInto(s.logits, ck, s.kernel + c * ck);
      // Row c of F3 V = softmax(s L_q K_visᵀ) V_vis.
      for (int64_t j = 0; j < n_visible; ++j) s.logits[j] = p.scale * Dot(lq, keys + s.index[j] * dk, dk);
      SoftmaxInto(s.logits, n_visible, s.weights);
      double* rhs = s.rhs + c * dv;
      for (int64_t i = 0; i < dv; ++i) rhs[i] = 0.0;
      for (int64_t j = 0; j < n_visible; ++j) {
        const float* vrow = values + s.index[j] * dv;
        const double w = s.weights[j];
        for (int64_t i = 0; i < dv; ++i) rhs[i] += w * vrow[i];
      }
    }
    switch (p.solver) {
      case NystromSolver::kSketch: SolveSketch(s.kernel, rq, ck, s.rhs, dv, p.ridge, s.x, s.work); break;
      case NystromSolver::kDirect: SolveDirect(s.kernel, rq, ck, s.rhs, dv, p.ridge, s.x, s.work); break;
      case NystromSolver::kNewtonSchulz:
        SolveNewtonSchulz(s.kernel, rq, ck, s.rhs, dv, p.newton_iterations, s.x, s.work);
        break;
    }
    // Y = softmax(s Q L_kᵀ) X, row by row (X in float32, rows accumulated along Dv: vectorised).
    for (int64_t i = 0; i < ck * dv; ++i) s.xf[i] = static_cast<float>(s.x[i]);
    for (int64_t i = 0; i < p.q_len; ++i) {
      const float* qi = queries + i * dk;
      for (int64_t l = 0; l < ck; ++l) s.logits[l] = p.scale * Dot(qi, s.lk + l * dk, dk);
      SoftmaxInto(s.logits, ck, s.weights);
      float* yi = out + i * dv;
      for (int64_t e = 0; e < dv; ++e) yi[e] = 0.f;
      for (int64_t l = 0; l < ck; ++l) {
        const float w = static_cast<float>(s.weights[l]);
        const float* xrow = s.xf + l * dv;
        for (int64_t e = 0; e < dv; ++e) yi[e] += w * xrow[e];
      }
    }
  }
}

}  // namespace

void NystromAttentionForward(const NystromAttentionProblem& p, const NystromAttentionTensors& t,
                             const ThreadPool& pool, const Scratch& scratch) {
  const int64_t items = p.batch * p.kv_heads;
  if (items == 0 || p.q_len == 0) return;
  const int64_t padded = Max(1, Min(p.num_landmarks, Max(p.q_len, p.kv_len)));
  const int64_t tasks = Max(1, Min(items, p.parallelism));
  const int64_t floats = FloatsPerTask(p, padded), doubles = DoublesPerTask(p, padded);
  const int64_t n = Max(p.q_len, p.kv_len);
  float* float_pool = scratch.Get<float>(static_cast<size_t>(tasks * floats));
  double* double_pool = scratch.Get<double>(static_cast<size_t>(tasks * doubles));
  int64_t* index_pool = scratch.Get<int64_t>(static_cast<size_t>(tasks * Max(p.kv_len, 1)));
  auto task = [&](size_t index) {
    const int64_t i = static_cast<int64_t>(index);
    Buffers s;
    s.lk = float_pool + i * floats;
    s.lq = s.lk + padded * p.head_dim;
    s.logits = s.lq + padded * p.head_dim;
    s.norms = s.logits + Max(n, padded);
    s.xf = s.norms + padded;
    s.index = index_pool + i * Max(p.kv_len, 1);
    s.sums = double_pool + i * doubles;
    s.counts = s.sums + padded * p.head_dim;
    s.weights = s.counts + padded;
    s.kernel = s.weights + Max(n, padded);
    s.rhs = s.kernel + padded * padded;
    s.x = s.rhs + padded * p.value_dim;
    s.work = s.x + padded * p.value_dim;
    const int64_t begin = items * i / tasks, end = items * (i + 1) / tasks;
    for (int64_t item = begin; item < end; ++item) RunItem(p, t, item, s);
  };
  pool.For(static_cast<size_t>(tasks), task);
}

}  // namespace attnexport::cpu::ATTNEXPORT_ISA
