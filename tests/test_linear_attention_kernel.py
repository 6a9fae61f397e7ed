"""The LinearAttention CPU kernel (ONNX Runtime with the op library) against the float64 numpy
reference `attnexport.ops.reference.linear_attention`, which is the operator's contract.

Shapes are chosen around the kernel's blocking (causal chunks of 32 keys, key and query blocks of
64, key ranges split over tasks, causal sequences split into segments when there are fewer heads
than threads): lengths 1, chunk +-1, Sq != Skv both ways, GQA 4:1 and 2:1, Dk != Dv, odd head dims,
padding that hides whole rows or whole batches, large-magnitude inputs for favor and taylor2,
float16, every ISA variant (a subprocess per ATTNEXPORT_CPU_ISA, which is read once per process),
and a seeded grid of random configurations.

Error measure: max |y - ref| / max(max |ref|, 1e-3 max |v|), i.e. relative to the output's scale
(outputs are weighted averages of V rows; the floor keeps rows that eps drives to ~0 from dividing
by nothing). float32: 2e-5 (measured <= 7e-6: float32 products over <= a few hundred terms).
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from attnexport.ops.reference import linear_attention as reference
from ortutil import session

TOL = 2e-5
# Large |x| (30-100): favor's and taylor2's log-domain quantities reach |x̃|²/2 ~ 1e3-1e4, whose
# float32 rounding (2^-24 relative) is amplified by exp into the weights: up to ~1e-4 relative.
TOL_LARGE = 2e-4
# float16 in and out: the output is rounded to 11 significant bits (4.9e-4 relative).
TOL_HALF = 2e-3
CHUNK = 32  # the kernel's causal chunk (custom_ops/cpu/kernels/linear_attention.cc, kChunk)


@dataclass(frozen=True)
class Case:
    batch: int = 1
    q_heads: int = 2
    kv_heads: int = 1
    q_len: int = 8
    kv_len: int = 8
    head_dim: int = 8
    value_dim: int = 8
    causal: int = 0
    feature_map: str = "elu1"
    expansion_point: str = "zero"
    num_features: int = 16  # favor
    mask: str = "none"  # none | random | batch (last batch fully padded) | prefix (first keys padded)
    magnitude: float = 1.0
    scale: float = float("nan")
    eps: float = 1e-6
    dtype: str = "float32"
    seed: int = 0

    @property
    def name(self) -> str:
        fm = self.feature_map + ("" if self.feature_map != "taylor2" else f"-{self.expansion_point}")
        return (f"{fm}-{'causal' if self.causal else 'full'}-B{self.batch}H{self.q_heads}:{self.kv_heads}"
                f"-S{self.q_len}x{self.kv_len}-D{self.head_dim}x{self.value_dim}-mask:{self.mask}"
                + (f"-x{self.magnitude:g}" if self.magnitude != 1 else "") + (f"-eps{self.eps:g}" if self.eps != 1e-6 else "")
                + ("" if math.isnan(self.scale) else f"-scale{self.scale:g}") + ("" if self.dtype == "float32" else "-f16"))


def feeds_of(case: Case) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(case.seed)
    dtype = np.float16 if case.dtype == "float16" else np.float32
    b, hq, hk, sq, sk, d, dv = (case.batch, case.q_heads, case.kv_heads, case.q_len, case.kv_len, case.head_dim,
                                case.value_dim)
    feeds = {
        "Q": (rng.standard_normal((b, hq, sq, d)) * case.magnitude).astype(dtype),
        "K": (rng.standard_normal((b, hk, sk, d)) * case.magnitude).astype(dtype),
        "V": rng.standard_normal((b, hk, sk, dv)).astype(dtype),
    }
    if case.mask != "none":
        mask = rng.random((b, sk)) > 0.3
        if case.mask == "batch":
            mask[-1] = False
        elif case.mask == "prefix":
            mask[:, : min(sk, 40)] = False
        feeds["M"] = mask
    if case.feature_map == "favor":
        feeds["W"] = rng.standard_normal((d, case.num_features)).astype(dtype)
    return feeds


@functools.lru_cache(maxsize=None)
def model_of(case: Case) -> bytes:
    elem = TensorProto.FLOAT16 if case.dtype == "float16" else TensorProto.FLOAT
    b, hq, hk, sq, sk, d, dv = (case.batch, case.q_heads, case.kv_heads, case.q_len, case.kv_len, case.head_dim,
                                case.value_dim)
    inputs = [helper.make_tensor_value_info("Q", elem, [b, hq, sq, d]),
              helper.make_tensor_value_info("K", elem, [b, hk, sk, d]),
              helper.make_tensor_value_info("V", elem, [b, hk, sk, dv])]
    names = ["Q", "K", "V"]
    if case.mask != "none":
        inputs.append(helper.make_tensor_value_info("M", TensorProto.BOOL, [b, sk]))
        names.append("M")
    if case.feature_map == "favor":
        if case.mask == "none":
            names.append("")
        inputs.append(helper.make_tensor_value_info("W", elem, [d, case.num_features]))
        names.append("W")
    attrs = dict(causal=case.causal, feature_map=case.feature_map, expansion_point=case.expansion_point, eps=case.eps)
    if not math.isnan(case.scale):
        attrs["scale"] = case.scale
    node = helper.make_node("LinearAttention", names, ["Y"], domain="attnexport", **attrs)
    graph = helper.make_graph([node], "linear_attention", inputs, [helper.make_tensor_value_info("Y", elem, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("attnexport", 1)])
    return model.SerializeToString()


def kernel(case: Case, feeds: dict[str, np.ndarray], threads: int = 2) -> np.ndarray:
    return session(model_of(case), with_library=True, threads=threads).run(None, feeds)[0]


def expected(case: Case, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        return reference(feeds["Q"], feeds["K"], feeds["V"], feeds.get("M"), feeds.get("W"),
                         scale=None if math.isnan(case.scale) else case.scale, causal=case.causal,
                         feature_map=case.feature_map, eps=case.eps, expansion_point=case.expansion_point)


def error(case: Case, y: np.ndarray, ref: np.ndarray, v: np.ndarray) -> float:
    if ref.size == 0:
        return 0.0
    scale = max(float(np.abs(ref).max()), 1e-3 * float(np.abs(v.astype(np.float64)).max()), 1e-30)
    return float(np.abs(y.astype(np.float64) - ref).max()) / scale


def check(case: Case, tol: float = TOL, threads: int = 2) -> float:
    feeds = feeds_of(case)
    y = kernel(case, feeds, threads)
    ref = expected(case, feeds)
    assert y.shape == ref.shape
    assert np.isfinite(y).all(), f"{case.name}: non-finite output"
    err = error(case, y, ref, feeds["V"])
    assert err <= tol, f"{case.name}: relative error {err:.3g} > {tol:g}"
    return err


# --- edge cases of the blocking, every feature map ------------------------------------------------

CONFIGS = [("elu1", "zero"), ("relu", "zero"), ("taylor2", "zero"), ("taylor2", "mean"), ("taylor2", "max"),
           ("favor", "zero")]

SHAPES = {
    "sq1": Case(batch=2, q_heads=4, kv_heads=2, q_len=1, kv_len=50, head_dim=16, value_dim=16),
    "skv1": Case(batch=2, q_heads=2, kv_heads=2, q_len=5, kv_len=1, head_dim=8, value_dim=8),
    "sq1_skv1": Case(batch=1, q_heads=1, kv_heads=1, q_len=1, kv_len=1, head_dim=4, value_dim=4),
    "chunk-1": Case(q_len=CHUNK - 1, kv_len=CHUNK - 1, head_dim=16, value_dim=16),
    "chunk+1": Case(q_len=CHUNK + 1, kv_len=CHUNK + 1, head_dim=16, value_dim=16),
    "odd_len": Case(batch=2, q_heads=4, kv_heads=2, q_len=130, kv_len=130, head_dim=8, value_dim=8),
    "sq<skv": Case(q_heads=4, kv_heads=1, q_len=37, kv_len=100, head_dim=8, value_dim=12),
    "sq>skv": Case(q_heads=2, kv_heads=2, q_len=100, kv_len=37, head_dim=12, value_dim=8),
    "gqa4": Case(batch=2, q_heads=8, kv_heads=2, q_len=45, kv_len=45, head_dim=8, value_dim=8),
    "dk!=dv": Case(q_heads=2, kv_heads=1, q_len=40, kv_len=70, head_dim=17, value_dim=5),
    "d3": Case(q_heads=3, kv_heads=3, q_len=70, kv_len=70, head_dim=3, value_dim=3),
    "d80": Case(q_heads=2, kv_heads=2, q_len=50, kv_len=50, head_dim=80, value_dim=80),
    "bh>threads": Case(batch=3, q_heads=3, kv_heads=3, q_len=66, kv_len=66, head_dim=8, value_dim=8),
    # one head, long enough that the key range is split over tasks (non-causal) and the causal
    # sequence into segments whose states are prefix-summed
    "one_head_long": Case(batch=1, q_heads=2, kv_heads=1, q_len=700, kv_len=700, head_dim=8, value_dim=8),
}
# taylor2 has 1 + D + D(D+1)/2 features: keep its head dims small in the big shapes
TAYLOR_SKIP = {"d80"}


def edge_cases():
    for shape_name, base in SHAPES.items():
        for fm, ep in CONFIGS:
            if fm == "taylor2" and shape_name in TAYLOR_SKIP:
                continue
            for causal in (0, 1):
                for mask in ("none", "random"):
                    yield pytest.param(replace(base, feature_map=fm, expansion_point=ep, causal=causal, mask=mask),
                                       id=f"{shape_name}-{fm}-{ep}-{'causal' if causal else 'full'}-{mask}")


@pytest.mark.parametrize("case", list(edge_cases()))
def test_edge_shapes(case):
    check(case)


@pytest.mark.parametrize("fm", ["elu1", "relu", "taylor2", "favor"])
@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("mask", ["batch", "prefix"])
def test_rows_that_see_nothing_are_zero(fm, causal, mask):
    """A fully padded batch, or (causal) rows whose visible keys are all padded, or (Sq > Skv) rows
    before the first key: exact zeros, never NaN."""
    case = Case(batch=2, q_heads=2, kv_heads=1, q_len=90 if causal else 60, kv_len=60, head_dim=8, value_dim=8,
                causal=causal, feature_map=fm, mask=mask)
    feeds = feeds_of(case)
    y = kernel(case, feeds)
    check(case)
    if mask == "batch":
        assert not y[-1].any()
    else:
        blind = min(40, case.kv_len) - (case.kv_len - case.q_len) if causal else 0  # rows whose keys are all padded
        assert not y[:, :, :max(blind, 0)].any()
        if not causal:
            assert np.abs(y).max() > 0


def test_causal_sq_greater_than_skv_early_rows_are_zero():
    case = Case(q_heads=2, kv_heads=1, q_len=100, kv_len=37, causal=1)
    feeds = feeds_of(case)
    y = kernel(case, feeds)
    assert not y[:, :, : 100 - 37].any()
    assert np.abs(y[:, :, 100 - 37:]).min(axis=-1).max() > 0
    check(case)


@pytest.mark.parametrize("head_dim,value_dim", [(3, 3), (17, 17), (80, 80), (128, 128), (64, 3), (5, 128)])
@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("fm", ["elu1", "relu", "favor"])
def test_head_dims(head_dim, value_dim, causal, fm):
    check(Case(batch=1, q_heads=2, kv_heads=1, q_len=75, kv_len=75, head_dim=head_dim, value_dim=value_dim,
               causal=causal, feature_map=fm, num_features=24))


@pytest.mark.parametrize("ep", ["zero", "mean", "max"])
@pytest.mark.parametrize("causal", [0, 1])
def test_taylor2_head_dims(ep, causal):
    for d in (17, 33, 64):  # F = 172, 595, 2145: the state product reduced in 1, 3, 9 blocks
        check(Case(q_heads=2, kv_heads=1, q_len=45, kv_len=45, head_dim=d, value_dim=7, causal=causal,
                   feature_map="taylor2", expansion_point=ep))


# --- large magnitudes: finite and matching ----------------------------------------------------------

@pytest.mark.parametrize("magnitude", [30.0, 100.0])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("fm,ep", [("favor", "zero"), ("taylor2", "zero"), ("taylor2", "mean"), ("taylor2", "max")])
@pytest.mark.parametrize("shape", ["small", "segments"])
def test_large_magnitude(fm, ep, causal, eps, magnitude, shape):
    """|x| ~ 30-100. With eps = 1e-6, favor's weights (e^{-|x̃|²/2}) are far below eps and the output
    is ~0; eps = 0 is the demanding case: the ratio must come out right however small the weights."""
    base = (Case(batch=2, q_heads=2, kv_heads=1, q_len=70, kv_len=90, head_dim=8, value_dim=8)
            if shape == "small" else Case(batch=1, q_heads=1, kv_heads=1, q_len=300, kv_len=300, head_dim=8, value_dim=8))
    check(replace(base, feature_map=fm, expansion_point=ep, causal=causal, eps=eps, magnitude=magnitude,
                  mask="random", num_features=16), tol=TOL_LARGE)


# --- attributes, threads, float16 ---------------------------------------------------------------------

@pytest.mark.parametrize("fm", ["elu1", "relu", "taylor2", "favor"])
@pytest.mark.parametrize("causal", [0, 1])
def test_scale_and_eps(fm, causal):
    for scale, eps in ((0.3, 1e-6), (2.0, 0.0), (float("nan"), 1e-2)):
        check(Case(q_heads=2, kv_heads=2, q_len=50, kv_len=50, causal=causal, feature_map=fm, scale=scale, eps=eps))


@pytest.mark.parametrize("fm", ["elu1", "favor", "taylor2"])
@pytest.mark.parametrize("causal", [0, 1])
def test_threads_do_not_change_the_result(fm, causal):
    """Work is split by the machine's size, never by the pool's: 1, 2 and 3 threads agree bitwise."""
    case = Case(batch=1, q_heads=4, kv_heads=2, q_len=600, kv_len=600, causal=causal, feature_map=fm,
                mask="random", head_dim=8 if fm == "taylor2" else 16, value_dim=16)
    feeds = feeds_of(case)
    outs = [kernel(case, feeds, threads) for threads in (1, 2, 3)]
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("causal", [0, 1])
def test_padded_keys_never_leak(causal):
    """Whatever padded positions hold (NaN, inf), rows read only visible keys."""
    case = Case(batch=2, q_heads=2, kv_heads=1, q_len=80, kv_len=80, causal=causal, mask="random")
    feeds = feeds_of(case)
    hidden = ~feeds["M"]
    clean = {k: v.copy() for k, v in feeds.items()}
    dirty = {k: v.copy() for k, v in feeds.items()}
    for name in ("K", "V"):
        clean[name][np.broadcast_to(hidden[:, None, :, None], clean[name].shape)] = 0
        dirty[name][np.broadcast_to(hidden[:, None, :, None], dirty[name].shape)] = np.nan
    dirty["K"][0, 0, np.nonzero(hidden[0])[0][:1]] = np.inf
    y_clean, y_dirty = kernel(case, clean), kernel(case, dirty)
    assert np.isfinite(y_dirty).all()
    assert np.array_equal(y_clean, y_dirty)


@pytest.mark.parametrize("fm", ["elu1", "relu", "taylor2", "favor"])
@pytest.mark.parametrize("causal", [0, 1])
def test_float16(fm, causal):
    """float16 in and out, float32 inside: against the reference on the same (float16) inputs."""
    case = Case(batch=2, q_heads=4, kv_heads=2, q_len=70, kv_len=70, causal=causal, feature_map=fm, mask="random",
                dtype="float16")
    feeds = feeds_of(case)
    y = kernel(case, feeds)
    assert y.dtype == np.float16
    ref = expected(case, {k: v.astype(np.float64) if v.dtype == np.float16 else v for k, v in feeds.items()})
    err = error(case, y, ref, feeds["V"])
    assert np.isfinite(y).all() and err <= TOL_HALF, f"{case.name}: {err:.3g}"


# --- a seeded grid of random configurations ----------------------------------------------------------

def random_cases(count: int = 40, seed: int = 2024):
    rng = np.random.default_rng(seed)
    for i in range(count):
        fm, ep = CONFIGS[rng.integers(len(CONFIGS))]
        kv_heads = int(rng.integers(1, 4))
        group = int(rng.choice([1, 2, 4]))
        head_dim = int(rng.integers(1, 12 if fm == "taylor2" else 40))
        yield Case(batch=int(rng.integers(1, 4)), q_heads=kv_heads * group, kv_heads=kv_heads,
                   q_len=int(rng.integers(1, 160)), kv_len=int(rng.integers(1, 160)), head_dim=head_dim,
                   value_dim=int(rng.integers(1, 40)), causal=int(rng.integers(2)), feature_map=fm,
                   expansion_point=ep, num_features=int(rng.integers(1, 40)),
                   mask=str(rng.choice(["none", "random", "batch"])),
                   scale=float(rng.choice([float("nan"), 0.5, 0.1])), eps=float(rng.choice([1e-6, 1e-3, 0.0])),
                   seed=i)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in random_cases()])
def test_random_grid(case):
    check(case)


# --- every ISA variant ------------------------------------------------------------------------------

ISA_CASES = [
    Case(batch=2, q_heads=4, kv_heads=2, q_len=77, kv_len=77, head_dim=17, value_dim=13, causal=c, feature_map=fm,
         expansion_point=ep, mask="random", num_features=20)
    for c in (0, 1) for fm, ep in CONFIGS
] + [
    Case(batch=1, q_heads=2, kv_heads=1, q_len=300, kv_len=300, head_dim=64, value_dim=64, causal=c, feature_map="elu1")
    for c in (0, 1)
] + [Case(batch=1, q_heads=1, kv_heads=1, q_len=70, kv_len=90, head_dim=8, value_dim=8, causal=1,
          feature_map="favor", magnitude=30.0, eps=0.0, mask="random")]


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isa_available(isa: str) -> bool:
    flags = _cpu_flags()
    if isa == "avx512":
        return {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags
    if isa == "avx2":
        return {"avx2", "fma", "bmi2", "f16c"} <= flags
    return True


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_isa_variant(isa):
    if not _isa_available(isa):
        pytest.skip(f"this CPU cannot run the {isa} variant (ATTNEXPORT_CPU_ISA={isa} would run a lower one)")
    here = Path(__file__).resolve().parent
    script = (
        "import json, sys\n"
        "import test_linear_attention_kernel as t\n"
        "cases = [t.Case(**c) for c in json.loads(sys.argv[1])]\n"
        "print(json.dumps([t.check(c, tol=t.TOL_LARGE if c.magnitude > 1 else t.TOL) for c in cases]))\n"
    )
    env = dict(os.environ, ATTNEXPORT_CPU_ISA=isa)
    # The tests folder only: the package is the installed one (-P keeps the working directory, the
    # source tree under CI, off sys.path too).
    # (An empty entry would mean the working directory: leave none.)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(here), env.get("PYTHONPATH", "")] if p)
    cases = json.dumps([asdict(c) for c in ISA_CASES])
    done = subprocess.run([sys.executable, "-P", "-c", script, cases], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(errors) == len(ISA_CASES)
