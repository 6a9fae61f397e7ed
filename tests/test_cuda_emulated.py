"""The CUDA kernels, run on the CPU in the host emulator (tests/cuda_emu.py), against the numpy references.

No GPU is needed: custom_ops/cuda/emu/runner.cc builds the real kernel and launch code against a host
model of the CUDA execution model (ldmatrix / mma.sync / cp.async from the PTX fragment tables), with
AddressSanitizer and UBSan. This checks the kernels' indexing, fragment layouts, masks, chunk and
segment recurrences, online softmax and edge cases; what it cannot check (timing, the real
compiler's code, races the emulator's ordering hides) is left to tests/test_cuda_ops.py on a GPU.
Outputs start as NaN bytes, so an element a kernel never writes fails the comparison.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

import cuda_emu
from attnexport.ops.reference import linear_attention, lse_attention, lse_state_parts, sparse_attention

_why = cuda_emu.unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"CUDA emulator unavailable: {_why}")

# Tolerances (relative to the output's largest magnitude) against the reference evaluated on the
# inputs as rounded to the dtype: the kernels round features / probabilities to the dtype for the
# tensor cores, and the output once more.
TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2,
       # LseAttention at magnitudes 80-300: exp of arguments in the hundreds carries |x| * 2^-24 relative error
       "float32_large": 1e-4}


@pytest.fixture(scope="module")
def runner():
    return cuda_emu.build()


def _inputs(rng, b, hq, hkv, sq, skv, dk, dv, dtype, magnitude=1.0):
    q_raw, q = cuda_emu.encode(rng.normal(size=(b, hq, sq, dk)) * magnitude, dtype)
    k_raw, k = cuda_emu.encode(rng.normal(size=(b, hkv, skv, dk)) * magnitude, dtype)
    v_raw, v = cuda_emu.encode(rng.normal(size=(b, hkv, skv, dv)), dtype)
    return {"q": q_raw, "k": k_raw, "v": v_raw}, (q, k, v)


def _mask(rng, b, skv, *, empty_row=True):
    m = rng.random((b, skv)) < 0.7
    m[0, 0] = True
    if empty_row and b > 1:
        m[-1, :] = False  # a fully padded batch row
    return m


def _check(y, ref, dtype, what):
    assert y.shape == ref.shape, what
    assert np.all(np.isfinite(y)), f"{what}: non-finite output (unwritten elements show as NaN)"
    scale = max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    err = float(np.max(np.abs(y - ref))) if ref.size else 0.0
    assert err <= TOL[dtype] * scale, f"{what}: max abs error {err:.3g} > {TOL[dtype] * scale:.3g}"


# -- the emulator itself -----------------------------------------------------------------------------

def test_emulator_exposes_missing_barriers_and_out_of_bounds_reads(runner):
    """A kernel that reads shared memory another thread writes in the same phase gives the right answer
    in thread order and a wrong one under shuffled schedules; a read past an input's end aborts."""
    import subprocess

    def race(seed):
        out = subprocess.run([str(runner), "selftest", "race", f"schedule_seed={seed}"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split("wrong=")[1])

    assert race(0) == 63  # thread order: each reader runs before its writer (but thread 63)
    assert any(race(seed) != race(0) for seed in (1, 2, 3)), "the schedule seed changed nothing"
    env = dict(__import__("os").environ, ASAN_OPTIONS="detect_leaks=0")
    out = subprocess.run([str(runner), "selftest", "oob"], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "heap-buffer-overflow" in out.stderr, out.stdout + out.stderr[-2000:]


# -- LinearAttention ---------------------------------------------------------------------------------

# (B, Hq, Hkv, Sq, Skv, Dk, Dv, causal, mask, feature_map, sm): sm = multiprocessors the plan assumes;
# many of them split short sequences into several segments (kernel 1 + scan + carried state).
LINEAR_CASES = {
    "noncausal_gqa": (2, 4, 2, 70, 130, 64, 64, 0, True, "elu1", 4),
    "noncausal_split_keys": (1, 2, 1, 33, 300, 40, 24, 0, True, "relu", 64),
    "causal_square": (1, 2, 1, 130, 130, 64, 64, 1, False, "elu1", 4),
    "causal_segments": (1, 2, 1, 300, 500, 64, 64, 1, True, "elu1", 64),
    "causal_sq_gt_skv": (2, 2, 1, 200, 150, 96, 72, 1, True, "relu", 16),
    "causal_d128_dv128": (2, 4, 2, 150, 200, 128, 128, 1, True, "elu1", 8),
    "causal_decode_sq1": (1, 2, 1, 1, 500, 64, 64, 1, False, "elu1", 64),
    "odd_dims_simt": (2, 3, 1, 45, 70, 5, 3, 1, True, "elu1", 16),
    "large_dk_simt": (1, 2, 2, 40, 50, 160, 40, 0, False, "elu1", 4),
}


# float32 runs the CUDA-core path (as do the odd shapes): three cases cover it.
LINEAR_PARAMS = [(c, d) for c in LINEAR_CASES for d in ("float16", "bfloat16")] + [
    (c, "float32") for c in ("causal_segments", "noncausal_gqa", "odd_dims_simt")]


@pytest.mark.parametrize("case,dtype", LINEAR_PARAMS)
def test_linear_attention(runner, case, dtype):
    b, hq, hkv, sq, skv, dk, dv, causal, use_mask, fm, sm = LINEAR_CASES[case]
    rng = np.random.default_rng(zlib.crc32(f"{case}/{dtype}".encode()))
    arrays, (q, k, v) = _inputs(rng, b, hq, hkv, sq, skv, dk, dv, dtype)
    mask = _mask(rng, b, skv) if use_mask else None
    if mask is not None:
        arrays["mask"] = mask
    scale = 1.0 / math.sqrt(dk)
    params = dict(dtype=dtype, B=b, Hq=hq, Hkv=hkv, Sq=sq, Skv=skv, Dk=dk, Dv=dv, scale=scale, eps=1e-6,
                  causal=causal, feature_map=fm, mask=int(mask is not None), sm=sm)
    res = cuda_emu.run(runner, "linear", arrays, params, (b, hq, sq, dv), dtype)
    ref = linear_attention(q, k, v, mask, causal=causal, feature_map=fm, scale=scale, eps=1e-6)
    _check(res.y, ref, dtype, f"LinearAttention {case} {dtype} ({res.facts})")
    tensor_cores = dtype != "float32" and dk % 8 == 0 and dv % 8 == 0 and dk <= 128
    assert res.facts["path"] == ("mma" if tensor_cores else "simt")
    if case in ("causal_segments", "noncausal_split_keys"):
        assert int(res.facts["key_segments"]) > 1, "the case should exercise the segment split"
    if causal and mask is not None and b > 1:
        assert np.all(res.y[-1] == 0), "a fully padded batch row must give exact zeros"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_linear_attention_forced_simt_matches(runner, dtype):
    """The float32 CUDA-core path (the fallback for any shape) on the same inputs as the mma path."""
    rng = np.random.default_rng(5)
    arrays, (q, k, v) = _inputs(rng, 1, 2, 1, 100, 120, 64, 64, dtype)
    params = dict(dtype=dtype, B=1, Hq=2, Hkv=1, Sq=100, Skv=120, Dk=64, Dv=64, scale=0.125, eps=1e-6, causal=1,
                  feature_map="elu1", mask=0, sm=8, simt=1)
    res = cuda_emu.run(runner, "linear", arrays, params, (1, 2, 100, 64), dtype)
    assert res.facts["path"] == "simt"
    _check(res.y, linear_attention(q, k, v, causal=1, scale=0.125), dtype, "LinearAttention forced simt")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_linear_attention_edge_cases(runner, dtype):
    """Large magnitudes (the intra-chunk products overflow float16 without the per-warp scaling),
    rows before the first key (causal, Sq > Skv), a fully padded batch row, eps = 0 with relu
    (rows whose weights all vanish give 0, not 0/0)."""
    rng = np.random.default_rng(11)
    b, h, sq, skv, d = 2, 2, 90, 70, 128
    arrays, (q, k, v) = _inputs(rng, b, h, h, sq, skv, d, d, dtype, magnitude=60.0)
    mask = _mask(rng, b, skv)
    arrays["mask"] = mask
    for fm, eps in (("elu1", 1e-6), ("relu", 0.0)):
        params = dict(dtype=dtype, B=b, Hq=h, Hkv=h, Sq=sq, Skv=skv, Dk=d, Dv=d, scale=1.0 / math.sqrt(d), eps=eps,
                      causal=1, feature_map=fm, mask=1, sm=16)
        res = cuda_emu.run(runner, "linear", arrays, params, (b, h, sq, d), dtype)
        ref = linear_attention(q, k, v, mask, causal=1, feature_map=fm, scale=1.0 / math.sqrt(d), eps=eps)
        _check(res.y, ref, dtype, f"LinearAttention edge {fm} eps={eps}")
        assert np.all(res.y[:, :, : sq - skv] == 0), "rows that see no key must be 0"
        assert np.all(res.y[-1] == 0)


def test_linear_attention_no_keys(runner):
    rng = np.random.default_rng(1)
    arrays, _ = _inputs(rng, 1, 2, 1, 5, 0, 64, 64, "float16")
    params = dict(dtype="float16", B=1, Hq=2, Hkv=1, Sq=5, Skv=0, Dk=64, Dv=64, scale=0.125, eps=1e-6, causal=0,
                  feature_map="elu1", mask=0)
    res = cuda_emu.run(runner, "linear", arrays, params, (1, 2, 5, 64), "float16")
    assert np.all(res.y == 0)


# -- SparseAttention ---------------------------------------------------------------------------------

# (B, Hq, Hkv, Sq, Skv, Dk, Dv, pattern, mask, bias shape or None)
SPARSE_CASES = {
    "window": (1, 2, 1, 100, 130, 64, 64, dict(window_left=20, window_right=10), False, None),
    "causal_full": (1, 2, 1, 130, 130, 64, 64, dict(causal=1), False, None),
    "causal_window_globals_pad": (2, 2, 1, 200, 150, 96, 72, dict(causal=1, window_left=40, num_global=3), True, None),
    "dilated_globals_gqa_d128": (2, 4, 2, 150, 200, 128, 128, dict(window_left=30, window_right=0, dilation=3,
                                                                    num_global=2), True, None),
    "random_blocks": (1, 2, 1, 33, 300, 40, 24, dict(window_left=10, window_right=10, block_size=16,
                                                      num_random_blocks=2, seed=7), False, None),
    "random_blocks_causal": (2, 2, 1, 140, 140, 64, 64, dict(causal=1, window_left=8, block_size=8,
                                                             num_random_blocks=3, seed=3, num_global=1), True, None),
    "bias_full": (1, 2, 1, 100, 100, 64, 64, dict(window_left=10, window_right=10), False, (1, 2, 100, 100)),
    "bias_broadcast_keys": (2, 2, 2, 70, 90, 64, 32, dict(window_right=5), True, (2, 1, 1, 90)),
    "all_rows_empty_causal": (2, 2, 1, 70, 10, 64, 64, dict(causal=1), True, None),
    "window_past_sequence": (1, 2, 1, 40, 40, 64, 64, dict(window_left=1000, window_right=1000), False, None),
    "long_causal_window": (1, 1, 1, 512, 512, 64, 64, dict(causal=1, window_left=64), False, None),
    "odd_dims_simt": (2, 2, 1, 77, 90, 20, 12, dict(causal=1, window_left=4, window_right=4, num_global=1,
                                                    block_size=8, num_random_blocks=3, seed=3), True, (77, 90)),
}


SPARSE_PARAMS = [(c, d) for c in SPARSE_CASES for d in ("float16", "bfloat16")] + [
    (c, "float32") for c in ("causal_window_globals_pad", "random_blocks", "odd_dims_simt")]


@pytest.mark.parametrize("case,dtype", SPARSE_PARAMS)
def test_sparse_attention(runner, case, dtype):
    b, hq, hkv, sq, skv, dk, dv, pattern, use_mask, bias_shape = SPARSE_CASES[case]
    rng = np.random.default_rng(zlib.crc32(f"{case}/{dtype}".encode()))
    arrays, (q, k, v) = _inputs(rng, b, hq, hkv, sq, skv, dk, dv, dtype)
    mask = _mask(rng, b, skv) if use_mask else None
    bias = None
    params = dict(dtype=dtype, B=b, Hq=hq, Hkv=hkv, Sq=sq, Skv=skv, Dk=dk, Dv=dv, scale=1.0 / math.sqrt(dk),
                  causal=0, window_left=-1, window_right=-1, dilation=1, num_global=0, block_size=0,
                  num_random_blocks=0, seed=0, mask=int(mask is not None))
    params.update(pattern)
    if mask is not None:
        arrays["mask"] = mask
    if bias_shape is not None:
        raw = rng.normal(size=bias_shape) * 2.0
        raw[..., 0] = -np.inf  # masking by bias: -inf logits
        arrays["bias"], bias = cuda_emu.encode(raw, dtype)
        params["bias_shape"] = "x".join(map(str, bias_shape))
    res = cuda_emu.run(runner, "sparse", arrays, params, (b, hq, sq, dv), dtype)
    ref = sparse_attention(q, k, v, mask, bias, scale=params["scale"], **pattern)
    _check(res.y, ref, dtype, f"SparseAttention {case} {dtype} ({res.facts})")
    tensor_cores = dtype != "float32" and dk % 8 == 0 and dv % 8 == 0 and max(dk, dv) <= 128
    assert res.facts["path"] == ("mma" if tensor_cores else "simt")
    if use_mask and b > 1:
        assert np.all(res.y[-1] == 0), "a fully padded batch row must give exact zeros"


def test_sparse_attention_large_logits(runner):
    """Logits in the thousands (inputs of magnitude 60, float16): the online softmax stays finite."""
    rng = np.random.default_rng(4)
    arrays, (q, k, v) = _inputs(rng, 1, 2, 1, 64, 64, 64, 64, "float16", magnitude=60.0)
    params = dict(dtype="float16", B=1, Hq=2, Hkv=1, Sq=64, Skv=64, Dk=64, Dv=64, scale=0.125, causal=1,
                  window_left=-1, window_right=-1, dilation=1, num_global=0, block_size=0, num_random_blocks=0,
                  seed=0, mask=0)
    res = cuda_emu.run(runner, "sparse", arrays, params, (1, 2, 64, 64), "float16")
    _check(res.y, sparse_attention(q, k, v, scale=0.125, causal=1), "float16", "large logits")


# -- LseAttention ------------------------------------------------------------------------------------

def _signed(rng, shape, magnitude):
    if magnitude is None:
        return rng.normal(size=shape)
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(magnitude, 1.25 * magnitude, size=shape)


# (B, Hq, Hkv, Sq, Skv, Dk, Dv, causal, mask, past: None | "state" | broadcast shape, magnitude, sm)
LSE_CASES = {
    "noncausal_segments_gqa": (2, 4, 2, 70, 130, 16, 40, 0, True, "state", None, 64),
    "causal_square": (1, 2, 1, 100, 100, 32, 32, 1, False, None, None, 4),
    "causal_segments_past": (1, 2, 1, 130, 200, 16, 8, 1, True, "state", None, 64),
    "causal_sq_gt_skv_past": (2, 2, 2, 90, 40, 8, 33, 1, True, "state", None, 16),
    "decode_sq1_past": (1, 4, 2, 1, 1, 16, 16, 1, False, "state", None, 4),
    "broadcast_zero_past": (1, 2, 1, 40, 50, 8, 8, 1, False, (1, 1), None, 4),
    "magnitude80_causal": (1, 2, 1, 90, 90, 4, 8, 1, True, None, 80.0, 8),
    "magnitude300_noncausal_past": (1, 2, 1, 50, 70, 4, 8, 0, False, "state", 300.0, 8),
    "magnitude300_causal_past": (2, 2, 1, 70, 70, 8, 8, 1, True, "state", 300.0, 16),
    "no_keys_past_only": (1, 2, 1, 5, 0, 8, 8, 1, False, "state", None, 4),
}
LSE_PARAMS = [(c, "float32") for c in LSE_CASES] + [
    (c, d) for c in ("causal_segments_past", "magnitude80_causal", "noncausal_segments_gqa") for d in ("float16", "bfloat16")]


@pytest.mark.parametrize("case,dtype", LSE_PARAMS)
def test_lse_attention(runner, case, dtype):
    b, hq, hkv, sq, skv, dk, dv, causal, use_mask, past, magnitude, sm = LSE_CASES[case]
    rng = np.random.default_rng(zlib.crc32(f"{case}/{dtype}".encode()))
    scale = 1.0 / math.sqrt(dk)
    q_raw, q = cuda_emu.encode(_signed(rng, (b, hq, sq, dk), magnitude), dtype)
    k_raw, k = cuda_emu.encode(_signed(rng, (b, hkv, skv, dk), magnitude), dtype)
    v_raw, v = cuda_emu.encode(rng.normal(size=(b, hkv, skv, dv)), dtype)
    arrays = {"q": q_raw, "k": k_raw, "v": v_raw}
    params = dict(dtype=dtype, B=b, Hq=hq, Hkv=hkv, Sq=sq, Skv=skv, Dk=dk, Dv=dv, scale=scale, causal=causal,
                  mask=int(use_mask), sm=sm)
    mask = _mask(rng, b, skv) if use_mask and skv else None
    if mask is None:
        params["mask"] = 0
    else:
        arrays["mask"] = mask
    state = None
    if past == "state":  # the state of three earlier keys (of the same magnitude)
        _, state = lse_attention(_signed(rng, (b, hq, 3, dk), magnitude), _signed(rng, (b, hkv, 3, dk), magnitude),
                                 rng.normal(size=(b, hkv, 3, dv)), scale=scale, return_state=True)
        state = state.astype(np.float32)
        arrays["past"] = state
        params["past_shape"] = "x".join(map(str, state.shape))
    elif past is not None:  # zeros of a broadcast shape: the empty state
        state = np.zeros(past, np.float32)
        arrays["past"] = state
        params["past_shape"] = "x".join(map(str, past))
    full_state = None if state is None else np.broadcast_to(state, (b, hkv, dk, dv + 2)).astype(np.float64)
    res = cuda_emu.run(runner, "lse", arrays, params, (b, hq, sq, dv), dtype, present_shape=(b, hkv, dk, dv + 2))
    ref, ref_state = lse_attention(q, k, v, mask, full_state, scale=scale, causal=causal, return_state=True)
    tol = "float32_large" if dtype == "float32" and magnitude is not None else dtype
    _check(res.y, ref, tol, f"LseAttention {case} {dtype} ({res.facts})")
    # present_state: the same state (up to the float32 round-off of the sums), compared through its parts.
    s_got, z_got, m_got = lse_state_parts(res.present, dv)
    s_ref, z_ref, m_ref = lse_state_parts(ref_state, dv)
    assert np.array_equal(np.isfinite(m_got), np.isfinite(m_ref)), "present_state: held dimensions differ"
    held = np.isfinite(m_ref)
    np.testing.assert_allclose(m_got[held], m_ref[held], rtol=1e-6, atol=1e-5, err_msg="present_state maxima")
    np.testing.assert_allclose(z_got, z_ref, rtol=2e-5, atol=1e-5, err_msg="present_state z")
    np.testing.assert_allclose(s_got, s_ref, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(s_ref).max(initial=0))),
                               err_msg="present_state S")
    if use_mask and mask is not None and b > 1 and state is None:
        assert np.all(res.y[-1] == 0), "a fully padded batch row (no past) must give exact zeros"


def test_lse_attention_keys_jumping_within_a_chunk(runner):
    """Keys whose values jump by far more than the chunk's single reference can carry (kJump): the
    chunk runs key by key; early rows must not lose their weights to a later key's maximum."""
    rng = np.random.default_rng(3)
    b, h, n, dk, dv = 1, 1, 64, 4, 8
    q = rng.normal(size=(b, h, n, dk))
    k = rng.normal(size=(b, h, n, dk))
    k[:, :, 20] += 150.0  # one key far above the others, in the middle of the first chunk
    k[:, :, 45] -= 150.0
    v = rng.normal(size=(b, h, n, dv))
    q_raw, q = cuda_emu.encode(q, "float32")
    k_raw, k = cuda_emu.encode(k, "float32")
    v_raw, v = cuda_emu.encode(v, "float32")
    params = dict(dtype="float32", B=b, Hq=h, Hkv=h, Sq=n, Skv=n, Dk=dk, Dv=dv, scale=0.5, causal=1, mask=0, sm=4)
    res = cuda_emu.run(runner, "lse", {"q": q_raw, "k": k_raw, "v": v_raw}, params, (b, h, n, dv), "float32",
                       present_shape=(b, h, dk, dv + 2))
    ref = lse_attention(q, k, v, scale=0.5, causal=1)
    _check(res.y, ref, "float32", "LseAttention with jumping keys")
