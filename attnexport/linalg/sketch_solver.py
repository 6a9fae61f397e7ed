"""Sketch-and-precondition least squares (Song, Yin, Zhang, arXiv 2308.14304, after Rokhlin–Tygert
and Blendenpik).

For a tall A [n, p] (n >> p): draw a sparse sign embedding S [s, n] (s = 8p rows, 8 nonzeros per
column: an OSNAP subspace embedding, so S A costs O(nnz(A))), factor the sketch S A = Q R, and solve
the preconditioned problem min_y ‖(A R⁻¹) y − b‖ with LSQR. A R⁻¹ has condition number O(1) whatever
the condition of A, so LSQR converges in O(log 1/tol) iterations, each two products with A; x = R⁻¹ y.
The sketch-and-solve answer R⁻¹ Qᵀ S b is the starting point.

When the sketch is numerically rank deficient the preconditioner is V_r Σ_r⁻¹ from the SVD of R
instead (LSRN, Meng–Saunders–Mahoney): the iterates stay in the row space, so the answer is the
minimum-norm least-squares solution, as numpy.linalg.lstsq gives.

The paper's reductions, on one factorization of the sketch:
- `power_lstsq`:       min_x ‖A (AᵀA)^j x − b‖  →  x = (AᵀA)^(−j) A⁺ b: one preconditioned
  regression, then j solves of AᵀA z = y by CG on the well-conditioned (A R⁻¹)ᵀ(A R⁻¹).
- `gram_power_solve`:  min_x ‖(AᵀA)^j x − b‖   →  x = (AᵀA)^(−j) b: j such CG solves.
- `attention_kernel_lstsq`: min_x ‖exp(s·A Aᵀ) x − b‖, the attention-kernel regression: the kernel
  is formed (shifted by its largest logit, which only rescales x) and solved by the preconditioned
  regression; it is square, so the "sketch" keeps every row and R is the kernel's own R factor —
  which is what keeps the landmark kernels of NystromAttention (condition 1e8 and worse) solvable.
  The paper's polynomial-sketch approximation of exp(A Aᵀ) (for n too large to form the kernel) is
  not implemented: the systems here are m x m with m ≤ a few hundred.

`cgls` is plain (unpreconditioned) conjugate gradient on the normal equations: the baseline that
the benchmarks and tests compare against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse

# s = 8p: κ(A R⁻¹) ≈ (1 + 1/√8) / (1 − 1/√8) ≈ 2.1 for a Gaussian-like sketch. Each LSQR step reads A
# twice (memory bound); measured on 30000 x 256: s = 2p, 4p, 8p, 12p took 51, 28, 20, 17 steps, and the
# larger QR of the sketch costs less than the steps it saves up to about 8p.
SKETCH_ROWS_PER_COLUMN = 8
SKETCH_NONZEROS = 8  # nonzeros per column of the sparse sign embedding (Tropp et al. use 8)
DEFAULT_MAX_ITER = 200


@dataclass(frozen=True)
class SolveInfo:
    """iterations: iterative steps taken (LSQR / CG; the sketch-and-solve start counts 0).
    residual: ‖A x − b‖_F / ‖b‖_F of the returned x (0 when b = 0), computed, not estimated.
    converged: the stopping test was met within max_iter (relative ‖r‖ ≤ tol, or the normal-equation
    residual ‖Bᵀr‖ ≤ tol·‖B‖·‖r‖ of the preconditioned B, i.e. x is a least-squares solution)."""

    iterations: int
    residual: float
    converged: bool


def sparse_sign_embedding(num_rows: int, n: int, *, nonzeros: int = SKETCH_NONZEROS, seed: int = 0):
    """S [num_rows, n] (scipy CSR): column c has one entry ±1/√ζ in each of ζ row blocks (OSNAP's
    block construction, so its rows are distinct); ζ = min(nonzeros, num_rows)."""
    if num_rows < 1 or n < 1:
        raise ValueError(f"sparse_sign_embedding needs positive sizes, got {num_rows} x {n}")
    zeta = max(1, min(nonzeros, num_rows))
    block = num_rows // zeta
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, block, size=(zeta, n)) + (np.arange(zeta) * block)[:, None]
    signs = rng.choice(np.array([-1.0, 1.0]), size=(zeta, n)) / math.sqrt(zeta)
    cols = np.broadcast_to(np.arange(n), (zeta, n))
    return scipy.sparse.csr_matrix((signs.ravel(), (rows.ravel(), cols.ravel())), shape=(zeta * block, n))


class _Preconditioner:
    """N [p, r] with A N well conditioned, from a sketch of A; also the sketch-and-solve start."""

    def __init__(self, A: np.ndarray, sketch_size: int | None, seed: int, rcond: float | None):
        n, p = A.shape
        s = SKETCH_ROWS_PER_COLUMN * p if sketch_size is None else int(sketch_size)
        if s < p:
            raise ValueError(f"sketch_size ({s}) must be at least the number of columns ({p})")
        # A sketch with as many rows as A saves nothing: factor A itself (S = I).
        self.sketch = None if s >= n else sparse_sign_embedding(s, n, seed=seed)
        sketched = A if self.sketch is None else np.asarray(self.sketch @ A)
        q, r = np.linalg.qr(sketched)
        rcond = 10.0 * max(sketched.shape) * np.finfo(np.float64).eps if rcond is None else rcond
        diag = np.abs(np.diag(r))
        self.triangular = bool(diag.size and diag.max() > 0 and diag.min() > rcond * diag.max())
        if self.triangular:
            # R⁻¹ once, applied by matrix products: LAPACK's triangular solves (scipy's OpenBLAS)
            # spin on busy machines, 16 ms for a 64 x 64 solve; any N with A N well conditioned is a
            # valid preconditioner, and LSQR's answer x = N y is checked by its own residual.
            self.map = np.triu(np.linalg.solve(r, np.eye(p)))
            self.q = q
        else:
            u, sigma, vt = np.linalg.svd(r)
            keep = sigma > rcond * (sigma[0] if sigma.size else 0.0)
            self.map = vt[keep].T / sigma[keep]  # V_r Σ_r⁻¹
            self.q = q @ u[:, keep]
        self.rank = p if self.triangular else int(self.map.shape[1])

    def apply(self, y: np.ndarray) -> np.ndarray:  # N y
        return self.map @ y

    def apply_t(self, z: np.ndarray) -> np.ndarray:  # Nᵀ z
        return self.map.T @ z

    def sketch_and_solve(self, b: np.ndarray) -> np.ndarray:
        sb = b if self.sketch is None else np.asarray(self.sketch @ b)
        return self.apply(self.q.T @ sb)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(np.broadcast_shapes(num.shape, den.shape)), where=den != 0)


def _lsqr(A, pre: _Preconditioner, rhs: np.ndarray, b_norm: np.ndarray, tol: float, max_iter: int):
    """LSQR (Paige–Saunders) on B = A N for every column of rhs at once; returns y, iterations,
    converged."""
    k = rhs.shape[1]
    y = np.zeros((pre.rank, k))
    u = rhs.copy()
    beta = np.linalg.norm(u, axis=0)
    u = _safe_div(u, beta)
    v = pre.apply_t(A.T @ u)
    alpha = np.linalg.norm(v, axis=0)
    v = _safe_div(v, alpha)
    w = v.copy()
    phibar, rhobar = beta.copy(), alpha.copy()
    anorm2 = np.zeros(k)
    done = (phibar <= tol * b_norm) | (alpha == 0)
    it = 0
    while not done.all() and it < max_iter:
        it += 1
        u = A @ pre.apply(v) - alpha * u
        beta = np.linalg.norm(u, axis=0)
        u = _safe_div(u, beta)
        anorm2 += alpha**2 + beta**2
        v = pre.apply_t(A.T @ u) - beta * v
        alpha = np.linalg.norm(v, axis=0)
        v = _safe_div(v, alpha)
        rho = np.hypot(rhobar, beta)
        c, s = _safe_div(rhobar, rho), _safe_div(beta, rho)
        theta, rhobar = s * alpha, -c * alpha
        phi, phibar = c * phibar, s * phibar
        active = ~done
        y[:, active] += (_safe_div(phi, rho) * w)[:, active]
        w = v - _safe_div(theta, rho) * w
        # ‖r‖ = phibar and ‖Bᵀ r‖ = phibar·alpha·|c| (LSQR's estimates, exact in exact arithmetic).
        consistent = phibar <= tol * b_norm
        optimal = alpha * np.abs(c) <= tol * np.sqrt(anorm2)
        done |= consistent | optimal | (alpha == 0)
    return y, it, bool(done.all())


def _as_matrix(A, b, name: str):
    A = np.asarray(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if A.ndim != 2:
        raise ValueError(f"{name}: A must be a matrix, got shape {A.shape}")
    if b.ndim not in (1, 2) or b.shape[0] != A.shape[0]:
        raise ValueError(f"{name}: b must have shape ({A.shape[0]},) or ({A.shape[0]}, k), got {b.shape}")
    if not (np.isfinite(A).all() and np.isfinite(b).all()):
        raise ValueError(f"{name}: A and b must be finite")
    return A, b, (b[:, None] if b.ndim == 1 else b)


def _relative(residual: np.ndarray, b: np.ndarray) -> float:
    b_norm = np.linalg.norm(b)
    return float(np.linalg.norm(residual) / b_norm) if b_norm > 0 else float(np.linalg.norm(residual))


def _lstsq_with(A, pre: _Preconditioner, b2: np.ndarray, tol: float, max_iter: int):
    x0 = pre.sketch_and_solve(b2)
    y, it, converged = _lsqr(A, pre, b2 - A @ x0, np.linalg.norm(b2, axis=0), tol, max_iter)
    return x0 + pre.apply(y), it, converged


def lstsq(A, b, *, tol: float = 1e-10, max_iter: int = DEFAULT_MAX_ITER, sketch_size: int | None = None,
          seed: int = 0, rcond: float | None = None) -> tuple[np.ndarray, SolveInfo]:
    """min_x ‖A x − b‖₂ for A [n, p] with n ≥ p, b [n] or [n, k] (each column its own problem).

    Returns x [p] or [p, k] and SolveInfo. sketch_size: rows of the sketch (default 8p; ≥ n means
    no sketch: A's own QR). Rank-deficient A gives the minimum-norm solution."""
    A, b, b2 = _as_matrix(A, b, "lstsq")
    n, p = A.shape
    if n < p:
        raise ValueError(f"lstsq: A must be tall (rows ≥ columns), got {n} x {p}")
    pre = _Preconditioner(A, sketch_size, seed, rcond)
    x, it, converged = _lstsq_with(A, pre, b2, tol, max_iter)
    info = SolveInfo(it, _relative(A @ x - b2, b2), converged)
    return (x[:, 0] if b.ndim == 1 else x), info


def _gram_inverse(A, pre: _Preconditioner, y: np.ndarray, tol: float, max_iter: int):
    """z with AᵀA z = y (z in the row space), by CG on (A N)ᵀ(A N) w = Nᵀ y, z = N w."""
    rhs = pre.apply_t(y)
    w = np.zeros_like(rhs)
    r = rhs.copy()
    d = r.copy()
    rr = np.sum(r * r, axis=0)
    target = (tol * np.linalg.norm(rhs, axis=0)) ** 2
    it = 0
    while np.any(rr > target) and it < max_iter:
        it += 1
        bd = A @ pre.apply(d)
        q = pre.apply_t(A.T @ bd)
        step = _safe_div(rr, np.sum(d * q, axis=0))
        w += step * d
        r -= step * q
        rr_new = np.sum(r * r, axis=0)
        d = r + _safe_div(rr_new, rr) * d
        rr = rr_new
    return pre.apply(w), it, bool(np.all(rr <= target))


def _check_power(j) -> int:
    if int(j) != j or j < 0:
        raise ValueError(f"the power j must be a non-negative integer, got {j}")
    return int(j)


def power_lstsq(A, b, j: int, *, tol: float = 1e-10, max_iter: int = DEFAULT_MAX_ITER,
                sketch_size: int | None = None, seed: int = 0) -> tuple[np.ndarray, SolveInfo]:
    """min_x ‖A (AᵀA)^j x − b‖₂ (A [n, p] tall): x = (AᵀA)^(−j) A⁺ b, one sketch for all steps."""
    A, b, b2 = _as_matrix(A, b, "power_lstsq")
    j = _check_power(j)
    if A.shape[0] < A.shape[1]:
        raise ValueError(f"power_lstsq: A must be tall (rows ≥ columns), got {A.shape[0]} x {A.shape[1]}")
    pre = _Preconditioner(A, sketch_size, seed, None)
    x, total, converged = _lstsq_with(A, pre, b2, tol, max_iter)
    for _ in range(j):
        x, it, ok = _gram_inverse(A, pre, x, tol, max_iter)
        total, converged = total + it, converged and ok
    image = x
    for _ in range(j):
        image = A.T @ (A @ image)
    info = SolveInfo(total, _relative(A @ image - b2, b2), converged)
    return (x[:, 0] if b.ndim == 1 else x), info


def gram_power_solve(A, b, j: int, *, tol: float = 1e-10, max_iter: int = DEFAULT_MAX_ITER,
                     sketch_size: int | None = None, seed: int = 0) -> tuple[np.ndarray, SolveInfo]:
    """min_x ‖(AᵀA)^j x − b‖₂ (A [n, p] tall, b [p] or [p, k], j ≥ 1): x = (AᵀA)^(−j) b."""
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] < A.shape[1]:
        raise ValueError(f"gram_power_solve: A must be a tall matrix, got shape {A.shape}")
    _, b, b2 = _as_matrix(A.T, b, "gram_power_solve")
    j = _check_power(j)
    if j < 1:
        raise ValueError("gram_power_solve: j must be at least 1 ((AᵀA)^0 = I needs no solve)")
    pre = _Preconditioner(A, sketch_size, seed, None)
    x, total, converged = b2, 0, True
    for _ in range(j):
        x, it, ok = _gram_inverse(A, pre, x, tol, max_iter)
        total, converged = total + it, converged and ok
    image = x
    for _ in range(j):
        image = A.T @ (A @ image)
    info = SolveInfo(total, _relative(image - b2, b2), converged)
    return (x[:, 0] if b.ndim == 1 else x), info


def attention_kernel(A, *, scale: float = 1.0) -> tuple[np.ndarray, float]:
    """exp(scale·A Aᵀ − c) and the shift c (the largest logit): the kernel up to the factor e^c."""
    logits = scale * (A @ A.T)
    shift = float(logits.max()) if logits.size else 0.0
    return np.exp(logits - shift), shift


def attention_kernel_lstsq(A, b, *, scale: float = 1.0, tol: float = 1e-10, max_iter: int = DEFAULT_MAX_ITER,
                           seed: int = 0) -> tuple[np.ndarray, SolveInfo]:
    """min_x ‖exp(scale·A Aᵀ) x − b‖₂ for A [n, d], b [n] or [n, k] (the attention-kernel regression).

    Solved on the shifted kernel K' = e^(−c)·exp(scale·A Aᵀ), so x = e^(−c)·x'."""
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2:
        raise ValueError(f"attention_kernel_lstsq: A must be a matrix, got shape {A.shape}")
    kernel, shift = attention_kernel(A, scale=scale)
    x, info = lstsq(kernel, b, tol=tol, max_iter=max_iter, seed=seed)
    return x * math.exp(-shift), info


def cgls(A, b, *, tol: float = 1e-10, max_iter: int | None = None) -> tuple[np.ndarray, SolveInfo]:
    """Plain conjugate gradient on the normal equations (CGLS), no preconditioner: the baseline.
    Stops when ‖Aᵀr‖ ≤ tol·‖A‖_F·‖r‖ or ‖r‖ ≤ tol·‖b‖ (per column); max_iter defaults to 10·p."""
    A, b, b2 = _as_matrix(A, b, "cgls")
    max_iter = 10 * A.shape[1] if max_iter is None else max_iter
    a_norm = np.linalg.norm(A)
    b_norm = np.linalg.norm(b2, axis=0)
    x = np.zeros((A.shape[1], b2.shape[1]))
    r = b2.copy()
    s = A.T @ r
    d = s.copy()
    gamma = np.sum(s * s, axis=0)

    def met(r, gamma):
        r_norm = np.linalg.norm(r, axis=0)
        return (r_norm <= tol * b_norm) | (np.sqrt(gamma) <= tol * a_norm * r_norm)

    it = 0
    while not met(r, gamma).all() and it < max_iter:
        it += 1
        q = A @ d
        step = _safe_div(gamma, np.sum(q * q, axis=0))
        x += step * d
        r -= step * q
        s = A.T @ r
        gamma_new = np.sum(s * s, axis=0)
        d = s + _safe_div(gamma_new, gamma) * d
        gamma = gamma_new
    info = SolveInfo(it, _relative(A @ x - b2, b2), bool(met(r, gamma).all()))
    return (x[:, 0] if b.ndim == 1 else x), info
