"""The sketch-and-precondition solver (attnexport.linalg): matches numpy.linalg.lstsq on
well-conditioned tall systems (several seeds, one and several right-hand sides), stays accurate on
ill-conditioned tall systems and landmark kernels (condition ≥ 1e8) where the normal equations and
unpreconditioned CGLS fail, and solves the paper's power and attention-kernel regressions."""

from __future__ import annotations

import numpy as np
import pytest

from attnexport.linalg import (
    SolveInfo,
    attention_kernel_lstsq,
    cgls,
    gram_power_solve,
    lstsq,
    power_lstsq,
    sparse_sign_embedding,
)


def tall_with_condition(rng, n, p, cond):
    u, _ = np.linalg.qr(rng.standard_normal((n, p)))
    v, _ = np.linalg.qr(rng.standard_normal((p, p)))
    return (u * np.geomspace(1.0, 1.0 / cond, p)) @ v.T


def softmax_rows(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def landmark_kernel(rng, m, n=1024, d=64, clusters=3):
    """M = softmax(L_q L_kᵀ/√d) from segment means of clustered queries and keys (as in a real
    encoder, tokens of a sentence share a few directions): its condition grows fast with m."""
    centres = 3.0 * rng.standard_normal((clusters, d))
    q = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, d))
    k = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, d))
    lq, lk = q.reshape(m, -1, d).mean(axis=1), k.reshape(m, -1, d).mean(axis=1)
    return softmax_rows(lq @ lk.T / np.sqrt(d))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [None, 1, 5])
def test_matches_numpy_lstsq_on_well_conditioned_tall_systems(seed, k):
    rng = np.random.default_rng(seed)
    n, p = 3000 + 17 * seed, 40 + seed
    a = rng.standard_normal((n, p)) * rng.uniform(0.5, 2.0, p)
    b = rng.standard_normal(n if k is None else (n, k))
    x, info = lstsq(a, b, seed=seed)
    ref = np.linalg.lstsq(a, b, rcond=None)[0]
    assert isinstance(info, SolveInfo) and info.converged and 0 < info.iterations < 60
    assert x.shape == ref.shape
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-7 * np.abs(ref).max())
    ref_res = np.linalg.norm(a @ ref - b) / np.linalg.norm(b)
    assert info.residual == pytest.approx(ref_res, rel=1e-10)


def test_consistent_system_is_solved_to_round_off():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2000, 30))
    x_true = rng.standard_normal((30, 2))
    x, info = lstsq(a, a @ x_true)
    assert info.converged and info.residual < 1e-12
    np.testing.assert_allclose(x, x_true, atol=1e-10)


def test_ill_conditioned_tall_system_is_stable_where_normal_equations_and_cgls_fail():
    rng = np.random.default_rng(4)
    a = tall_with_condition(rng, 4000, 50, 1e10)
    x_true = rng.standard_normal(50)
    b = a @ x_true
    x, info = lstsq(a, b)
    assert info.converged and info.residual < 1e-12
    assert np.linalg.norm(x - x_true) / np.linalg.norm(x_true) < 1e-4  # κ·eps ≈ 1e-6
    # The plain normal equations square the condition (1e20 > 1/eps): the answer is garbage.
    x_ne = np.linalg.solve(a.T @ a, a.T @ b)
    assert np.linalg.norm(x_ne - x_true) / np.linalg.norm(x_true) > 1e-2
    # Unpreconditioned CGLS stalls: no convergence within its budget of 10·p iterations.
    x_cg, info_cg = cgls(a, b, tol=1e-10)
    assert not info_cg.converged and info_cg.residual > 1e3 * info.residual


@pytest.mark.parametrize("m", [128, 256])
def test_ill_conditioned_landmark_kernel(m):
    rng = np.random.default_rng(m)
    kernel = landmark_kernel(rng, m)
    assert np.linalg.cond(kernel) > 1e8  # the premise of the test
    x_true = rng.standard_normal((m, 3))
    b = kernel @ x_true
    x, info = lstsq(kernel, b)
    assert info.converged and info.residual < 1e-10
    x_ne = np.linalg.solve(kernel.T @ kernel, kernel.T @ b)
    assert np.linalg.norm(kernel @ x_ne - b) / np.linalg.norm(b) > 1e3 * info.residual
    x_cg, info_cg = cgls(kernel, b, tol=1e-10)
    assert not info_cg.converged and info_cg.residual > 1e3 * info.residual


def test_rank_deficient_gives_the_minimum_norm_solution():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((1500, 20))
    a = np.concatenate([a, a[:, :3] + a[:, 3:6]], axis=1)  # three dependent columns
    b = rng.standard_normal(1500)
    x, info = lstsq(a, b)
    ref = np.linalg.lstsq(a, b, rcond=None)[0]
    assert info.converged
    np.testing.assert_allclose(x, ref, atol=1e-8 * np.abs(ref).max())


def test_sketch_is_a_subspace_embedding():
    rng = np.random.default_rng(6)
    q, _ = np.linalg.qr(rng.standard_normal((5000, 32)))
    s = sparse_sign_embedding(128, 5000, seed=1)
    assert s.shape == (128, 5000) and s.nnz == 8 * 5000
    sigma = np.linalg.svd(np.asarray(s @ q), compute_uv=False)
    assert 0.3 < sigma.min() and sigma.max() < 1.7  # s = 4p: distortion well inside (0, 2)


def test_power_regression():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3000, 12)) / np.sqrt(3000) * np.linspace(1.0, 3.0, 12)
    b = rng.standard_normal((3000, 2))
    for j in (0, 1, 2):
        x, info = power_lstsq(a, b, j)
        ref = np.linalg.lstsq(a @ np.linalg.matrix_power(a.T @ a, j), b, rcond=None)[0]
        assert info.converged
        np.testing.assert_allclose(x, ref, rtol=1e-7, atol=1e-9 * np.abs(ref).max())


def test_gram_power_solve():
    rng = np.random.default_rng(8)
    a = tall_with_condition(rng, 2000, 10, 10.0)
    b = rng.standard_normal(10)
    x, info = gram_power_solve(a, b, 2)
    g = a.T @ a
    assert info.converged and info.residual < 1e-8
    np.testing.assert_allclose(x, np.linalg.solve(g @ g, b), rtol=1e-7)


def test_attention_kernel_regression():
    rng = np.random.default_rng(9)
    a = 0.5 * rng.standard_normal((60, 8))
    b = rng.standard_normal(60)
    x, info = attention_kernel_lstsq(a, b)
    kernel = np.exp(a @ a.T)
    assert info.converged
    assert np.linalg.norm(kernel @ x - b) / np.linalg.norm(b) < 1e-9


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: lstsq(np.ones((3, 5)), np.ones(3)), "tall"),
        (lambda: lstsq(np.ones((5, 3)), np.ones(4)), "b must have shape"),
        (lambda: lstsq(np.ones(5), np.ones(5)), "must be a matrix"),
        (lambda: lstsq(np.full((5, 3), np.nan), np.ones(5)), "finite"),
        (lambda: lstsq(np.ones((50, 4)), np.ones(50), sketch_size=2), "sketch_size"),
        (lambda: power_lstsq(np.ones((5, 3)), np.ones(5), -1), "non-negative"),
        (lambda: gram_power_solve(np.ones((5, 3)), np.ones(3), 0), "at least 1"),
    ],
)
def test_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
