"""Tests of the reverse-scan family (rlkernels.returns): linear_scan, discounted_returns, gae, vtrace.

The CPU kernels are checked against the NumPy oracle (rlkernels.reference) on random (hypothesis) and
fixed cases, on the chunked long-sequence path of the CPU engine, and for their gradients (gradcheck, a
plain torch autograd re-implementation, and chunked vs non-chunked runs); the custom ops pass opcheck and
compile with torch.compile(fullgraph=True). docs/design.md §3-§5 is the specification.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import numpy as np
import pytest
import torch
from conftest import (
    DIFF_INPUTS,
    DTYPES,
    LOW_PRECISION,
    NUM_OUTPUTS,
    OPS,
    OUTPUT_NAMES,
    assert_close,
    assert_outputs_close,
    backward_op_args,
    canonical_samples,
    clamp_open,
    make_inputs,
    op_args,
    output_dtype,
    to_numpy,
)
from hypothesis import given
from hypothesis import strategies as st

import rlkernels
from rlkernels import reference
from rlkernels.bench.trainers import verl_gae as _verl_gae

F64 = torch.float64
SCAN_OPS = ("discounted_returns", "gae", "vtrace")


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _check_against_reference(sample, *, names=None):
    out = _tuple(sample.call("cpu"))
    exp = _tuple(sample.reference())
    assert len(out) == NUM_OUTPUTS[sample.op]
    in_shape = sample.tensors["b" if sample.op == "linear_scan" else "rewards"].shape
    for o in out:
        assert o.dtype == output_dtype(sample.dtype), f"{sample.op}: output dtype {o.dtype}"
        assert o.shape == in_shape
    assert_outputs_close(out, exp, sample.dtype, names or list(OUTPUT_NAMES[sample.op]))
    return out


# ====================================================================================================
# Property-based agreement with the reference
# ====================================================================================================

_GAMMAS = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]), st.floats(0.0, 1.0))
_PROBS = st.sampled_from([0.0, 0.1, 0.5])
_MASK_PROBS = st.sampled_from([0.0, 0.3, 0.9])
_FLAG_DTYPES = st.sampled_from([torch.bool, torch.uint8, "float"])
_LAYOUTS = st.sampled_from(["contiguous", "transposed", "strided"])


@st.composite
def scan_cases(draw, op):
    dtype = draw(st.sampled_from(DTYPES))
    packed = op != "linear_scan" and draw(st.integers(0, 3)) == 0
    kw = {"dtype": dtype, "seed": draw(st.integers(0, 2**31 - 1)), "layout": draw(_LAYOUTS)}
    if packed:
        lengths = draw(
            st.lists(st.one_of(st.just(0), st.integers(1, 40), st.just(97)), min_size=1, max_size=5)
        )
        kw["cu_seqlens"] = lengths
        kw["cu_dtype"] = draw(st.sampled_from([torch.int32, torch.int64]))
    else:
        T = draw(st.one_of(st.sampled_from([1, 2, 3, 17, 97, 1025]), st.integers(1, 64)))
        batch = draw(st.lists(st.sampled_from([1, 2, 3, 5]), min_size=0, max_size=2))
        if T > 100:
            batch = batch[:1]
        pos = draw(st.integers(0, len(batch)))
        shape = tuple(batch[:pos]) + (T,) + tuple(batch[pos:])
        negative = draw(st.booleans())
        kw["shape"] = shape
        kw["time_dim"] = pos - len(shape) if negative else pos
    if op == "linear_scan":
        kw["reverse"] = draw(st.booleans())
        kw["initial"] = draw(st.sampled_from(["none", "scalar", "tensor"]))
        return make_inputs(op, **kw)
    kw["terminated"] = draw(_PROBS)
    kw["truncated"] = draw(_PROBS)
    kw["next_values"] = kw["truncated"] > 0 or draw(st.booleans())
    kw["mask"] = draw(_MASK_PROBS)
    kw["bootstrap"] = draw(st.sampled_from(["none", "scalar", "tensor"]))
    kw["flag_dtype"] = draw(_FLAG_DTYPES)
    kw["gamma"] = draw(_GAMMAS)
    kw["lam"] = draw(_GAMMAS)
    if op == "vtrace":
        kw["rho_clip"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
        kw["c_clip"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
        kw["pg_rho_clip"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
    return make_inputs(op, **kw)


@pytest.mark.parametrize("op", OPS)
@given(data=st.data())
def test_property_matches_reference(op, data):
    sample = data.draw(scan_cases(op))
    _check_against_reference(sample)


# A deterministic grid over the same axes, so that every named case runs on every run (hypothesis picks
# a few at random): lengths 1, 97, 1025; several leading dims; time_dim 0 / -1 / middle; every dtype;
# flag dtypes; non-contiguous layouts; packed sequences with empty segments.
GRID = {
    "T1": {"shape": (1, 4)},
    "T97_tmajor": {"shape": (97, 5), "terminated": 0.05, "truncated": 0.05, "bootstrap": "tensor"},
    # >= 16 adjacent sequences: the engine's vector-load path for the time-major layout, plus a ragged rest
    "T97_wide": {
        "shape": (97, 37),
        "terminated": 0.05,
        "truncated": 0.05,
        "mask": 0.2,
        "bootstrap": "tensor",
    },
    "T1025_bmajor": {
        "shape": (2, 1025),
        "time_dim": -1,
        "terminated": 0.01,
        "mask": 0.3,
        "bootstrap": "tensor",
    },
    "lead_dims_middle": {
        "shape": (3, 17, 2),
        "time_dim": 1,
        "terminated": 0.2,
        "truncated": 0.1,
        "mask": 0.2,
        "flag_dtype": torch.uint8,
        "bootstrap": "tensor",
    },
    "lead_dims_last": {
        "shape": (2, 3, 33),
        "time_dim": -1,
        "truncated": 0.1,
        "flag_dtype": "float",
        "layout": "transposed",
        "bootstrap": "scalar",
    },
    "lead_dims_first": {
        "shape": (31, 2, 3),
        "time_dim": 0,
        "terminated": 0.1,
        "mask": 0.5,
        "layout": "strided",
        "next_values": True,
    },
    "one_dim": {"shape": (40,), "terminated": 0.1, "bootstrap": "tensor"},
    "packed": {
        "cu_seqlens": [5, 0, 97, 1, 0, 13],
        "terminated": 0.1,
        "truncated": 0.1,
        "mask": 0.2,
        "bootstrap": "tensor",
        "layout": "strided",
    },
    "packed_mask_bootstrap": {
        "cu_seqlens": [0, 7, 9],
        "terminated": 0.2,
        "mask": 0.4,
        "bootstrap": "tensor",
        "flag_dtype": torch.uint8,
        "cu_dtype": torch.int32,
    },
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GRID))
@pytest.mark.parametrize("op", OPS)
def test_grid_matches_reference(op, case, dtype):
    kw = dict(GRID[case])
    if op == "linear_scan":
        if "cu_seqlens" in kw:
            pytest.skip("linear_scan takes no cu_seqlens")
        kw = {k: v for k, v in kw.items() if k in ("shape", "time_dim", "layout")}
        kw["initial"] = "tensor"
        kw["reverse"] = case.endswith("last")  # both directions over the grid
    _check_against_reference(make_inputs(op, dtype=dtype, seed=list(GRID).index(case), **kw))


@pytest.mark.parametrize("op", SCAN_OPS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_accumulates_in_float32(op, dtype):
    # docs/design.md §3: 16-bit inputs are read as they are and accumulated in float32, output float32. Against the
    # reference on the rounded inputs the error is then float32 round-off, far inside the 2e-2 budget.
    sample = make_inputs(
        op, (300, 4), dtype=dtype, gamma=0.99, lam=0.95, terminated=0.02, mask=0.2, bootstrap="tensor", seed=5
    )
    out = _tuple(sample.call("cpu"))
    for o, e in zip(out, _tuple(sample.reference())):
        assert o.dtype == torch.float32
        assert_close(o, e, torch.float32, rtol=1e-5, atol=2e-5)


def test_mixed_dtypes_promote():
    # rewards float32, values float64: computed (and returned) in float64; gradients come back per input dtype.
    s = make_inputs("gae", (20, 3), dtype=F64, terminated=0.2, seed=3)
    r32 = s.tensors["rewards"].float().requires_grad_()
    v64 = s.tensors["values"].clone().requires_grad_()
    adv, ret = rlkernels.gae(r32, v64, terminated=s.tensors["terminated"], gamma=0.9, lam=0.8)
    assert adv.dtype == ret.dtype == F64
    ea, er = reference.gae(r32.double(), v64, terminated=s.tensors["terminated"], gamma=0.9, lam=0.8)
    assert_close(adv, ea)
    assert_close(ret, er)
    gr, gv = torch.autograd.grad((adv + ret).sum(), (r32, v64))
    assert gr.dtype == torch.float32 and gv.dtype == F64
    # d sum(A + R) / d r_t does not depend on the dtype path: compare with the float64 run
    r64 = r32.detach().double().requires_grad_()
    a2, r2 = rlkernels.gae(r64, v64, terminated=s.tensors["terminated"], gamma=0.9, lam=0.8)
    gr64, gv64 = torch.autograd.grad((a2 + r2).sum(), (r64, v64))
    assert_close(gr, gr64, torch.float32)
    assert_close(gv, gv64)


def test_non_contiguous_per_sequence_values():
    # bootstrap_value / initial as strided and transposed views
    s = make_inputs("gae", (3, 11, 4), time_dim=1, terminated=0.2, seed=6)
    boot = torch.randn(4, 3, dtype=F64).T  # [3, 4], transposed storage
    out = s.call("cpu", bootstrap_value=boot)
    assert_outputs_close(out, reference.gae(*s.args, **{**s.kwargs, "bootstrap_value": boot}), F64)
    a, b = torch.rand(20, 3, dtype=F64), torch.randn(20, 3, dtype=F64)
    init = torch.randn(3, 2, dtype=F64)[:, 1]
    assert_close(rlkernels.linear_scan(a, b, initial=init), reference.linear_scan(a, b, initial=init))


def test_expanded_inputs():
    # stride-0 (broadcast) views are valid inputs
    T, B = 13, 4
    r = torch.randn(T, 1, dtype=F64).expand(T, B)
    v = torch.randn(1, B, dtype=F64).expand(T, B)
    term = (torch.rand(T, 1) < 0.3).expand(T, B)
    out = rlkernels.gae(r, v, terminated=term, bootstrap_value=torch.ones(B, dtype=F64))
    exp = reference.gae(r, v, terminated=term, bootstrap_value=np.ones(B))
    assert_outputs_close(out, exp, F64)


# ====================================================================================================
# Long sequences: the chunked path of the CPU engine (T >= 16384 with <= 256 sequences, kChunk = 4096)
# ====================================================================================================

LONG_T = (16383, 16384, 40961)


@pytest.mark.parametrize("T", LONG_T)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["time_major", "batch_major"])
def test_long_sequences_match_reference(op, T, layout):
    B = {16383: 1, 16384: 2, 40961: 3}[T]
    shape, time_dim = ((T, B), 0) if layout == "time_major" else ((B, T), -1)
    kw = {"shape": shape, "time_dim": time_dim, "dtype": F64, "seed": T + B}
    if op == "linear_scan":
        # |a| close to 1 so that the carry crosses chunk boundaries with weight
        s = make_inputs(op, initial="tensor", reverse=T != 16384, **kw)
        a = s.tensors["a"]
        s = s.with_tensors(a=0.999 + 0.001 * a)
    else:
        # sparse flags so that episodes span chunk boundaries; gamma/lam near 1 so the carry matters
        s = make_inputs(
            op,
            terminated=2e-4,
            truncated=2e-4 if T != 16384 else 0.0,
            next_values=T != 16384,
            mask=0.1,
            bootstrap="tensor",
            gamma=0.9995,
            lam=0.999,
            flag_dtype=torch.uint8,
            **kw,
        )
    _check_against_reference(s)


@pytest.mark.parametrize("op", OPS)
def test_long_sequences_many_lanes(op):
    # 17 sequences x 4 chunks = 68 lanes: several lane groups on the chunked path, with a ragged last group
    kw = (
        {"initial": "tensor"}
        if op == "linear_scan"
        else {"terminated": 1e-3, "mask": 0.1, "bootstrap": "tensor", "gamma": 0.999, "lam": 0.99}
    )
    s = make_inputs(op, (16384, 17), dtype=F64, seed=9, **kw)
    if op == "linear_scan":
        s = s.with_tensors(a=0.999 + 0.001 * s.tensors["a"])
    _check_against_reference(s)


@pytest.mark.parametrize("op", SCAN_OPS)
def test_long_sequence_with_fully_masked_chunks(op):
    # Whole chunks with mask 0 are identity maps: the carry must pass through them unchanged.
    T = 3 * 4096 + 4096 + 17
    s = make_inputs(
        op, (T, 2), dtype=F64, mask=0.05, terminated=1e-4, bootstrap="tensor", gamma=0.9999, lam=1.0, seed=7
    )
    mask = s.tensors["mask"].clone()
    mask[100 : 4096 * 3 + 5, 0] = False  # chunks 0-2 of sequence 0 almost entirely masked
    mask[4096:8192, 1] = False  # exactly chunk 1 of sequence 1
    _check_against_reference(s.with_tensors(mask=mask))


@pytest.mark.parametrize("op", SCAN_OPS)
def test_long_sequence_float32(op):
    s = make_inputs(
        op,
        (40961, 2),
        dtype=torch.float32,
        terminated=1e-3,
        mask=0.1,
        bootstrap="tensor",
        gamma=0.99,
        lam=0.95,
        seed=8,
    )
    _check_against_reference(s)


# Past kWindowChunks = 64 chunks the chunked passes run window by window (csrc/cpu/scan_engine.h): 68 chunks
# here, two windows, the second ragged; the carry crosses the window boundary.
WINDOWED_T = 64 * 4096 + 3 * 4096 + 5


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["time_major", "batch_major"])
def test_windowed_long_sequences_match_reference(op, layout):
    shape, time_dim = ((WINDOWED_T, 2), 0) if layout == "time_major" else ((2, WINDOWED_T), -1)
    kw = {"shape": shape, "time_dim": time_dim, "dtype": F64, "seed": 71}
    if op == "linear_scan":
        s = make_inputs(op, initial="tensor", reverse=layout == "time_major", **kw)
        s = s.with_tensors(a=0.9999 + 0.0001 * s.tensors["a"])
    else:
        s = make_inputs(op, terminated=2e-5, truncated=1e-5, next_values=True, mask=0.1, bootstrap="tensor",
                        gamma=0.99995, lam=0.9999, **kw)
    _check_against_reference(s)


def test_windowed_discounted_returns_gradient():
    # d <w, G> / d rewards is the adjoint scan y_t = w_t + gamma (1 - term_{t-1}) y_{t-1}: a forward scan on
    # the windowed path, checked against that loop in NumPy.
    T, gamma = WINDOWED_T, 0.99995
    g = torch.Generator().manual_seed(72)
    r = torch.randn(T, dtype=F64, generator=g).requires_grad_()
    term = torch.rand(T, generator=g) < 2e-5
    w = torch.randn(T, dtype=F64, generator=g)
    (grad,) = torch.autograd.grad((rlkernels.discounted_returns(r, gamma=gamma, terminated=term) * w).sum(), [r])
    wn, tn = w.numpy(), term.numpy()
    expected = np.empty(T)
    y = 0.0
    for t in range(T):
        y = wn[t] + (gamma * (1.0 - tn[t - 1]) * y if t > 0 else 0.0)
        expected[t] = y
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("op", ["discounted_returns", "gae"])
def test_windowed_path_inf_falls_back_like_reference(op):
    # +inf in the last window (in scan order the first): the windowed compose meets a non-finite carry and the
    # engine starts over with whole-sequence walks, which propagate Inf as the sequential formula does.
    r = torch.zeros(WINDOWED_T, 1, dtype=F64)
    r[-1] = float("inf")
    if op == "gae":
        out = rlkernels.gae(r, torch.zeros_like(r), gamma=0.5, lam=1.0)[0]
        expected = reference.gae(r, torch.zeros_like(r), gamma=0.5, lam=1.0)[0]
    else:
        out = rlkernels.discounted_returns(r, gamma=0.5)
        expected = reference.discounted_returns(r, gamma=0.5)
    assert np.isposinf(expected).all()
    assert torch.isposinf(out).all()


# Time-major rows narrower than 1 KiB on a CPU whose L2 prefetcher completes 128-byte line pairs (Intel) are
# split in time from 2^17 to 2^18 elements (and beyond for rows of 128 bytes at most): chunks of about 2^15
# elements, walked by the three passes of the long sequences (csrc/cpu/scan_engine.h kSplitElements).
# Chunked time-major sequences are walked as groups of adjacent sequences at the same steps, padded to whole
# tiles. `_cpu_line_pairs` walks as on either CPU.
_SPLIT_SHAPES = {
    "64 sequences": ((2100, 64), torch.float32),
    "40 sequences, a padded group": ((3300, 40), torch.float32),
    "200 sequences, two tiles a chunk": ((700, 200), torch.float32),
    "100 sequences float64": ((1400, 100), F64),
    "long, 8 sequences": ((16400, 8), F64),
    "long, 17 sequences": ((16384, 17), torch.float32),
    "below the split": ((2000, 64), torch.float32),
    "above the split": ((4500, 64), torch.float32),
    "above, one line pair a row": ((9000, 32), torch.float32),
}


@pytest.fixture(params=["on", "off"], ids=["line_pairs", "single_lines"])
def line_pairs(request):
    torch.ops.rlkernels._cpu_line_pairs(request.param)
    yield request.param
    torch.ops.rlkernels._cpu_line_pairs("auto")


@pytest.mark.parametrize("case", list(_SPLIT_SHAPES))
@pytest.mark.parametrize("op", OPS)
def test_narrow_time_major_rows_split_in_time(op, case, line_pairs):
    shape, dtype = _SPLIT_SHAPES[case]
    kw = {"shape": shape, "dtype": dtype, "seed": 81}
    if op == "linear_scan":
        s = make_inputs(op, initial="tensor", reverse=True, **kw)
        s = s.with_tensors(a=0.995 + 0.005 * s.tensors["a"])
    else:
        s = make_inputs(op, terminated=1e-3, truncated=1e-3, next_values=True, mask=0.1, bootstrap="tensor",
                        gamma=0.999, lam=0.99, **kw)
    _check_against_reference(s)


@pytest.mark.parametrize("op", ["discounted_returns", "gae"])
def test_split_rows_with_inf_fall_back_like_reference(op, line_pairs):
    # (gamma lam)^chunk underflows to 0 in the chunk maps; sequences whose carry becomes +inf are walked
    # whole, next to sequences still walked in chunks.
    r = torch.zeros(2100, 64, dtype=torch.float32)
    r[-1, ::3] = float("inf")
    r[:-1] = torch.randn(2099, 64, generator=torch.Generator().manual_seed(82))
    v = torch.zeros_like(r)
    if op == "gae":
        out = rlkernels.gae(r, v, gamma=0.5, lam=1.0)[0]
        expected = reference.gae(r, v, gamma=0.5, lam=1.0)[0]
    else:
        out = rlkernels.discounted_returns(r, gamma=0.5)
        expected = reference.discounted_returns(r, gamma=0.5)
    finite = [c for c in range(64) if c % 3]
    assert np.isposinf(expected[:, ::3]).all() and np.isfinite(expected[:, finite]).all()
    assert torch.isposinf(out[:, ::3]).all()
    assert_close(out[:, finite], torch.as_tensor(expected[:, finite]), torch.float32, name=op)


# The in-place CPU walks are compiled again for common input sets (kGaeSets etc. in csrc/cpu/scan_types.h,
# float32 only), with absent inputs folded to constants, and write outputs of 16 MiB or more with streaming
# stores where each lane's lines are aligned (RLKERNELS_STREAMING_STORES=always forces them at any size). Each
# set, in every walk layout, forward and backward, against the reference and the float64 run (which takes the
# walk for any inputs): time-major groups, batch-major rows with line-aligned (T=128) and unaligned (T=100)
# lanes, and chunks of long rows (ragged, or every lane aligned).
_SPECIALIZED_SETS = {
    "terminated": {"terminated": 0.05, "bootstrap": "tensor"},
    "terminated+truncated+next_values": {"terminated": 0.05, "truncated": 0.05, "next_values": True},
    "mask": {"mask": 0.3, "bootstrap": "tensor"},
    "none (generic walk)": {"bootstrap": "scalar"},
}
_WALK_SHAPES = {
    "time-major": ((70, 37), 0),
    # fewer sequences than the engine's 16 lanes: rows of 5 (lanes past them read the next rows, never stored;
    # the last rows stop at the input's end), one sequence (walked lane by lane), and a group of 16 plus one
    "time-major narrow": ((70, 5), 0),
    "time-major one": ((70, 1), 0),
    "time-major 17": ((33, 17), 0),
    "batch-major narrow": ((5, 70), -1),
    "batch-major aligned": ((37, 128), -1),
    "batch-major unaligned": ((37, 100), -1),
    "chunked rows": ((3, 6 * 4096 - 40), -1),  # (a time-major [T, 3] is chunked too, but walked through buffers)
    "chunked aligned rows": ((2, 8 * 4096), -1),
}


@pytest.mark.parametrize("streaming", ["always", "0"])
@pytest.mark.parametrize("walk", list(_WALK_SHAPES))
@pytest.mark.parametrize("inputs", list(_SPECIALIZED_SETS))
@pytest.mark.parametrize("op", ["discounted_returns", "gae"])
def test_specialized_walks_and_streaming_stores(op, inputs, walk, streaming, monkeypatch):
    monkeypatch.setenv("RLKERNELS_STREAMING_STORES", streaming)
    # The engine's walks: float32 GAE on long time-contiguous rows would otherwise take the time-vectorized
    # path (csrc/cpu/gae_rows.h, tested in the rows section below).
    monkeypatch.setenv("RLKERNELS_GAE_ROWS", "0")
    shape, time_dim = _WALK_SHAPES[walk]
    s32 = make_inputs(op, shape, time_dim=time_dim, dtype=torch.float32, gamma=0.97, lam=0.9, seed=5,
                      **_SPECIALIZED_SETS[inputs])
    out32 = _check_against_reference(s32)
    s64 = s32.with_tensors(**{k: v.double() for k, v in s32.tensors.items() if v.is_floating_point()})
    out32, g32 = _grads(s32, seed=3)
    out64, g64 = _grads(s64, seed=3)
    assert set(g32) == set(g64) and g32
    for n in g32:
        assert_close(g32[n], g64[n], torch.float32, name=f"grad {n}")


def test_windowed_float32_streaming_stores(monkeypatch):
    # Two windows of chunks with float32 inputs and terminated flags: the specialized transposed walks, outputs
    # by streaming stores, the ragged last chunk (5 steps, not a whole line) by ordinary ones. (The engine's
    # walk: RLKERNELS_GAE_ROWS=0, else this shape takes gae_rows.h.)
    monkeypatch.setenv("RLKERNELS_GAE_ROWS", "0")
    monkeypatch.setenv("RLKERNELS_STREAMING_STORES", "always")
    s = make_inputs("gae", (WINDOWED_T, 1), dtype=torch.float32, terminated=1e-3, bootstrap="tensor", gamma=0.99,
                    lam=0.95, seed=73)
    out = _check_against_reference(s)
    monkeypatch.setenv("RLKERNELS_STREAMING_STORES", "0")
    for a, b in zip(out, _tuple(s.call("cpu"))):
        assert torch.equal(a, b)  # the store instruction never changes a value


def _grads(sample, seed=0, names=None):
    """Outputs and d(sum_i <w_i, out_i>)/d inputs, with random weights w (fixed by seed)."""
    s = sample.requiring_grad(names)
    out = _tuple(s.call("cpu"))
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(o.shape, generator=g, dtype=F64).to(o.dtype) for o in out]
    loss = sum((o * w).sum() for o, w in zip(out, ws))
    names = s.diff_names() if names is None else names
    grads = torch.autograd.grad(loss, [s.tensors[n] for n in names])
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("op", OPS)
def test_long_sequence_gradients_match_unchunked(op):
    # [T, 3] is chunked (3 <= 256 sequences); the same 3 sequences padded to [T, 257] are walked whole.
    # Both backward passes must agree (float64, different summation order only).
    T, B, PAD = 16385, 3, 257
    kw = {"dtype": F64, "seed": 21}
    if op == "linear_scan":
        big = make_inputs(op, (T, PAD), initial="tensor", **kw)
        big = big.with_tensors(a=0.999 + 0.001 * big.tensors["a"])
    else:
        big = make_inputs(
            op,
            (T, PAD),
            terminated=3e-4,
            truncated=3e-4,
            mask=0.1,
            bootstrap="tensor",
            gamma=0.9995,
            lam=0.999,
            **kw,
        )
        # bootstrap is ignored with next_values: make one run without them so its gradient is exercised
        if op == "gae":
            big = big.with_tensors(truncated=None, next_values=None)
    small = big.with_tensors(
        **{k: (v[:, :B].contiguous() if v.dim() == 2 else v[:B].contiguous()) for k, v in big.tensors.items()}
    )
    out_s, g_s = _grads(small, seed=1)
    # the padded run uses the same upstream weights on the first B columns
    s = big.requiring_grad()
    out_b = _tuple(s.call("cpu"))
    gen = torch.Generator().manual_seed(1)
    ws = [torch.randn((T, B), generator=gen, dtype=F64) for _ in out_b]
    ws = [torch.cat([w, torch.randn(T, PAD - B, dtype=F64)], 1) for w in ws]
    loss = sum((o * w).sum() for o, w in zip(out_b, ws))
    names = s.diff_names()
    g_b = dict(zip(names, torch.autograd.grad(loss, [s.tensors[n] for n in names])))
    for o_s, o_b in zip(out_s, out_b):
        assert_close(o_s, o_b[:, :B], F64, rtol=1e-9, atol=1e-9)
    assert set(g_s) == set(names)
    for n in names:
        gb = g_b[n][:, :B] if g_b[n].dim() == 2 else g_b[n][:B]
        assert_close(g_s[n], gb, F64, name=f"grad {n}", rtol=1e-9, atol=1e-9)


# ====================================================================================================
# Fixed cases checked by hand
# ====================================================================================================


def _t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def _b(x):
    return torch.tensor(x, dtype=torch.bool)


def test_linear_scan_by_hand():
    a, b = _t([0.5, 0.5, 0.5]), _t([1.0, 2.0, 3.0])
    # reverse: x2 = 3 + .5*4 = 5; x1 = 2 + .5*5 = 4.5; x0 = 1 + .5*4.5 = 3.25
    assert_close(rlkernels.linear_scan(a, b, initial=4.0), [3.25, 4.5, 5.0])
    # forward: x0 = 1 + .5*4 = 3; x1 = 2 + .5*3 = 3.5; x2 = 3 + .5*3.5 = 4.75
    assert_close(rlkernels.linear_scan(a, b, initial=_t(4.0), reverse=False), [3.0, 3.5, 4.75])
    # no initial: x2 = 3; x1 = 2 + 1.5 = 3.5; x0 = 1 + 1.75 = 2.75
    assert_close(rlkernels.linear_scan(a, b), [2.75, 3.5, 3.0])


def test_discounted_returns_by_hand():
    r = _t([1.0, 2.0, 3.0])
    # G2 = 3; G1 = 2 + .5*3 = 3.5; G0 = 1 + .5*3.5 = 2.75
    assert_close(rlkernels.discounted_returns(r, gamma=0.5), [2.75, 3.5, 3.0])
    # bootstrap 4: G2 = 3 + 2 = 5; G1 = 2 + 2.5 = 4.5; G0 = 1 + 2.25 = 3.25
    assert_close(rlkernels.discounted_returns(r, gamma=0.5, bootstrap_value=4.0), [3.25, 4.5, 5.0])
    assert_close(rlkernels.discounted_returns(r, gamma=0.5, bootstrap_value=_t(4.0)), [3.25, 4.5, 5.0])
    # gamma 0: the rewards themselves; gamma 1: plain sums (6, 5, 3)
    assert_close(rlkernels.discounted_returns(r, gamma=0.0, bootstrap_value=4.0), [1.0, 2.0, 3.0])
    assert_close(rlkernels.discounted_returns(r, gamma=1.0), [6.0, 5.0, 3.0])


def test_discounted_returns_terminated_vs_truncated_by_hand():
    r = _t([1.0, 2.0, 3.0])
    nv = _t([10.0, 6.0, 4.0])
    flag = _b([False, True, False])
    # terminated at 1 (bootstrap 4): G2 = 3 + .5*4 = 5; G1 = 2 (no future); G0 = 1 + .5*2 = 2
    assert_close(
        rlkernels.discounted_returns(r, gamma=0.5, terminated=flag, bootstrap_value=4.0), [2.0, 2.0, 5.0]
    )
    # truncated at 1 (next_values): G2 = 3 + .5*nv2 = 5; G1 = 2 + .5*nv1 = 5; G0 = 1 + .5*5 = 3.5
    assert_close(rlkernels.discounted_returns(r, gamma=0.5, truncated=flag, next_values=nv), [3.5, 5.0, 5.0])
    # next_values without flags: only the last step reads them: G2 = 5, G1 = 2 + 2.5 = 4.5, G0 = 3.25;
    # a bootstrap_value is then ignored
    assert_close(
        rlkernels.discounted_returns(r, gamma=0.5, next_values=nv, bootstrap_value=100.0), [3.25, 4.5, 5.0]
    )
    # terminated and truncated at once: terminated wins (G1 = 2)
    assert_close(
        rlkernels.discounted_returns(r, gamma=0.5, terminated=flag, truncated=flag, next_values=nv),
        [2.0, 2.0, 5.0],
    )
    # terminated at the last step: its next value does not count: G2 = 3, G1 = 3.5, G0 = 2.75
    last = _b([False, False, True])
    assert_close(
        rlkernels.discounted_returns(r, gamma=0.5, terminated=last, next_values=nv), [2.75, 3.5, 3.0]
    )


def test_discounted_returns_mask_by_hand():
    r = _t([1.0, 100.0, 3.0, 100.0])
    m = _t([1.0, 0.0, 1.0, 0.0])
    # valid steps 0 and 2; bootstrap 4 after step 2: G2 = 3 + .5*4 = 5; G0 = 1 + .5*5 = 3.5; masked -> 0
    assert_close(
        rlkernels.discounted_returns(r, gamma=0.5, mask=m, bootstrap_value=4.0), [3.5, 0.0, 5.0, 0.0]
    )
    # with next_values, the last *valid* step (2) bootstraps from next_values[2] = 6: G2 = 6, G0 = 4
    nv = _t([50.0, 50.0, 6.0, 50.0])
    assert_close(rlkernels.discounted_returns(r, gamma=0.5, mask=m, next_values=nv), [4.0, 0.0, 6.0, 0.0])


def test_discounted_returns_packed_by_hand():
    r = _t([1.0, 2.0, 3.0, 4.0, 5.0])
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    # seg 0 (boot 10): G1 = 2 + 5 = 7, G0 = 1 + 3.5 = 4.5; seg 1 empty;
    # seg 2 (boot 30): G4 = 5 + 15 = 20, G3 = 4 + 10 = 14, G2 = 3 + 7 = 10
    G = rlkernels.discounted_returns(r, gamma=0.5, cu_seqlens=cu, bootstrap_value=_t([10.0, 20.0, 30.0]))
    assert_close(G, [4.5, 7.0, 10.0, 14.0, 20.0])
    # with next_values, each segment's last step bootstraps from them: G1 = 2 + .5*8 = 6, G0 = 4;
    # G4 = 5 + .5*8 = 9, G3 = 8.5, G2 = 7.25
    G = rlkernels.discounted_returns(
        r, gamma=0.5, cu_seqlens=cu, next_values=torch.full((5,), 8.0, dtype=F64)
    )
    assert_close(G, [4.0, 6.0, 7.25, 8.5, 9.0])


def test_gae_by_hand():
    r, v = _t([1.0, 1.0, 1.0]), _t([0.5, 1.0, 2.0])
    # gamma = lam = .5, bootstrap 4: delta2 = 1 + 2 - 2 = 1; delta1 = 1 + 1 - 1 = 1; delta0 = 1 + .5 - .5 = 1
    # A2 = 1; A1 = 1 + .25*1 = 1.25; A0 = 1 + .25*1.25 = 1.3125; returns = A + V
    adv, ret = rlkernels.gae(r, v, gamma=0.5, lam=0.5, bootstrap_value=4.0)
    assert_close(adv, [1.3125, 1.25, 1.0])
    assert_close(ret, [1.8125, 2.25, 3.0])
    # terminated at 1: delta1 = 1 - 1 = 0, A1 = 0; A0 = 1 + .25*0 = 1
    adv, ret = rlkernels.gae(r, v, gamma=0.5, lam=0.5, bootstrap_value=4.0, terminated=_b([0, 1, 0]))
    assert_close(adv, [1.0, 0.0, 1.0])
    assert_close(ret, [1.5, 1.0, 3.0])
    # truncated at 1 with next_values [1, 3, 4]: delta0 = 1 + .5 - .5 = 1; delta1 = 1 + 1.5 - 1 = 1.5;
    # delta2 = 1 + 2 - 2 = 1. A2 = 1; A1 = 1.5 (cut); A0 = 1 + .25*1.5 = 1.375
    adv, ret = rlkernels.gae(
        r, v, gamma=0.5, lam=0.5, truncated=_b([0, 1, 0]), next_values=_t([1.0, 3.0, 4.0])
    )
    assert_close(adv, [1.375, 1.5, 1.0])
    assert_close(ret, [1.875, 2.5, 3.0])
    # lam = 0: one-step TD errors
    adv, _ = rlkernels.gae(r, v, gamma=0.5, lam=0.0, bootstrap_value=4.0)
    assert_close(adv, [1.0, 1.0, 1.0])


def test_gae_lam_one_is_discounted_returns():
    # lam = 1: A_t + V_t telescopes to r_t + .5 r_{t+1} + ... + .5^k bootstrap, the discounted return:
    # G2 = 1 + .5*4 = 3, G1 = 1 + .5*3 = 2.5, G0 = 1 + .5*2.5 = 2.25
    r, v = _t([1.0, 1.0, 1.0]), _t([0.5, 1.0, 2.0])
    _, ret = rlkernels.gae(r, v, gamma=0.5, lam=1.0, bootstrap_value=4.0)
    assert_close(ret, [2.25, 2.5, 3.0])
    assert_close(ret, rlkernels.discounted_returns(r, gamma=0.5, bootstrap_value=4.0))


def test_gae_mask_by_hand():
    r, v = _t([1.0, 9.0, 1.0]), _t([0.5, 9.0, 2.0])
    m = _b([True, False, True])
    # valid steps 0 and 2: delta2 = 1 + .5*4 - 2 = 1, A2 = 1; delta0 = 1 + .5*V2 - .5 = 1.5 (the next value
    # is the next *valid* one), A0 = 1.5 + .25*1 = 1.75; masked position -> 0 in both outputs
    adv, ret = rlkernels.gae(r, v, gamma=0.5, lam=0.5, bootstrap_value=4.0, mask=m)
    assert_close(adv, [1.75, 0.0, 1.0])
    assert_close(ret, [2.25, 0.0, 3.0])


def test_gae_mask_is_verl_semantics():
    # LLM layout [B, T], time_dim=-1: equal to verl where mask is 1, zeros where mask is 0 (verl leaves carries)
    g = torch.Generator().manual_seed(0)
    B, T = 4, 37
    r = torch.randn(B, T, generator=g, dtype=F64)
    v = torch.randn(B, T, generator=g, dtype=F64)
    m = (torch.rand(B, T, generator=g) < 0.6).to(F64)
    m[:, :5] = 0  # prompt
    m[1] = 0  # a fully masked sequence
    adv, ret = rlkernels.gae(r, v, mask=m, gamma=0.99, lam=0.95, time_dim=-1)
    ea, er = _verl_gae(r, v, m, 0.99, 0.95)
    on = m.bool()
    assert_close(adv[on], ea[on])
    assert_close(ret[on], er[on])
    assert torch.all(adv[~on] == 0) and torch.all(ret[~on] == 0)
    assert (adv[~on].numel() > 0) and not torch.all(ea[~on] == 0)  # verl does leave carries there


def test_vtrace_by_hand():
    r, v = _t([1.0, 1.0]), _t([0.0, 0.0])
    lr = _t([math.log(2.0), math.log(0.5)])
    # gamma .5, bootstrap 2, clips 1: t=1: rho = c = .5, delta1 = 1 + .5*2 = 2, x1 = 1, vs1 = 1,
    # pg1 = .5*(1 + .5*2) = 1.  t=0: rho = c = min(1, 2) = 1, delta0 = 1 + .5*V1 = 1, x0 = 1 + .5*1*1 = 1.5,
    # vs0 = 1.5, pg0 = 1*(1 + .5*vs1) = 1.5
    vs, pg = rlkernels.vtrace(r, v, lr, gamma=0.5, bootstrap_value=2.0)
    assert_close(vs, [1.5, 1.0])
    assert_close(pg, [1.5, 1.0])
    # rho_clip 2: rho0 = 2 -> x0 = 2*1 + .5*1*1 = 2.5; pg keeps pg_rho_clip 1 -> 1.5
    vs, pg = rlkernels.vtrace(r, v, lr, gamma=0.5, bootstrap_value=2.0, rho_clip=2.0)
    assert_close(vs, [2.5, 1.0])
    assert_close(pg, [1.5, 1.0])
    # pg_rho_clip 2: pg0 = 2 * 1.5 = 3
    _, pg = rlkernels.vtrace(r, v, lr, gamma=0.5, bootstrap_value=2.0, pg_rho_clip=2.0)
    assert_close(pg, [3.0, 1.0])
    # lam .5: c0 = .5 -> x0 = 1 + .5*.5*1 = 1.25 (and c1 = .25 has nothing after it)
    vs, _ = rlkernels.vtrace(r, v, lr, gamma=0.5, bootstrap_value=2.0, lam=0.5)
    assert_close(vs, [1.25, 1.0])
    # c_clip .25: c0 = .25 -> x0 = 1 + .5*.25*1 = 1.125
    vs, _ = rlkernels.vtrace(r, v, lr, gamma=0.5, bootstrap_value=2.0, c_clip=0.25)
    assert_close(vs, [1.125, 1.0])


def test_vtrace_flags_by_hand():
    r, v = _t([1.0, 1.0]), _t([0.0, 0.0])
    lr = _t([math.log(2.0), math.log(0.5)])
    # terminated at 0: delta0 = 1, x0 = 1 (cut), vs0 = 1; pg0 = 1*(1 + 0) = 1
    vs, pg = rlkernels.vtrace(r, v, lr, gamma=0.5, bootstrap_value=2.0, terminated=_b([1, 0]))
    assert_close(vs, [1.0, 1.0])
    assert_close(pg, [1.0, 1.0])
    # truncated at 0, next_values [3, 2]: delta0 = 1 + 1.5 = 2.5, x0 = 2.5 (cut), pg0 uses V'0 = 3: 2.5;
    # t=1 as before (next_values[1] = 2 = the old bootstrap)
    vs, pg = rlkernels.vtrace(r, v, lr, gamma=0.5, truncated=_b([1, 0]), next_values=_t([3.0, 2.0]))
    assert_close(vs, [2.5, 1.0])
    assert_close(pg, [2.5, 1.0])
    # mask [1, 0, 1]: the middle step is skipped, the result is the unmasked 2-step one with a 0 between
    m = _b([1, 0, 1])
    vs, pg = rlkernels.vtrace(
        _t([1.0, 7.0, 1.0]),
        _t([0.0, 7.0, 0.0]),
        _t([math.log(2.0), 3.0, math.log(0.5)]),
        gamma=0.5,
        bootstrap_value=2.0,
        mask=m,
    )
    assert_close(vs, [1.5, 0.0, 1.0])
    assert_close(pg, [1.5, 0.0, 1.0])


def test_vtrace_on_policy_is_gae_lambda_one():
    # log_rhos = 0 and clips >= 1: vs = GAE(lam=1) returns, and pg = r + gamma * vs_next - V
    s = make_inputs("gae", (30, 3), terminated=0.1, bootstrap="tensor", gamma=0.9, seed=4)
    r, v = s.tensors["rewards"], s.tensors["values"]
    kw = {
        "terminated": s.tensors["terminated"],
        "bootstrap_value": s.tensors["bootstrap_value"],
        "gamma": 0.9,
    }
    vs, pg = rlkernels.vtrace(r, v, torch.zeros_like(r), **kw)
    _, ret = rlkernels.gae(r, v, lam=1.0, **kw)
    assert_close(vs, ret)
    # pg_t = r_t + gamma (1 - term_t) vs_{t+1} - V_t, with the bootstrap value after the last step
    term = s.tensors["terminated"].double()
    vs_next = torch.cat([vs[1:], s.tensors["bootstrap_value"][None]])
    assert_close(pg, r + 0.9 * (1 - term) * vs_next - v)


# ====================================================================================================
# Gradients
# ====================================================================================================

GRAD_CASES = {
    "plain": {"shape": (6, 2), "bootstrap": "tensor"},
    "flags_next_values": {
        "shape": (7, 2),
        "terminated": 0.25,
        "truncated": 0.25,
        "mask": 0.3,
        "bootstrap": "tensor",
    },
    "mask_bootstrap_bmajor": {
        "shape": (2, 3, 6),
        "time_dim": -1,
        "terminated": 0.2,
        "mask": 0.3,
        "bootstrap": "tensor",
        "layout": "transposed",
    },
    "packed": {"cu_seqlens": [3, 0, 5, 1], "terminated": 0.2, "mask": 0.2, "bootstrap": "tensor"},
    "packed_next_values": {"cu_seqlens": [4, 2, 0], "truncated": 0.3, "mask": 0.2},
}
SCAN_GRAD_CASES = {
    "reverse_initial": {"shape": (6, 3), "initial": "tensor"},
    "forward_initial_time_middle": {"shape": (2, 5, 2), "time_dim": 1, "initial": "tensor", "reverse": False},
    "forward_no_initial": {"shape": (4, 7), "time_dim": -1, "reverse": False, "layout": "strided"},
}


def _grad_samples():
    for case, kw in SCAN_GRAD_CASES.items():
        yield pytest.param("linear_scan", kw, id=f"linear_scan-{case}")
    for op in SCAN_OPS:
        for case, kw in GRAD_CASES.items():
            yield pytest.param(op, kw, id=f"{op}-{case}")


@pytest.mark.parametrize("op,kw", list(_grad_samples()))
def test_gradcheck(op, kw):
    s = make_inputs(op, dtype=F64, gamma=0.9, lam=0.8, rho_clip=1.2, c_clip=0.9, seed=31, **kw)
    s = s.requiring_grad()
    names = s.diff_names()
    assert names, "nothing to check"

    def fn(*xs):
        return s.with_tensors(**dict(zip(names, xs))).call("cpu")

    assert torch.autograd.gradcheck(fn, tuple(s.tensors[n] for n in names), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("subset", [("rewards", "values"), ("log_rhos",), ("values", "bootstrap_value")])
def test_vtrace_gradcheck_input_subsets(subset):
    # log_rhos not requiring grad skips the saved carries (another backward path); only log_rhos likewise.
    s = make_inputs("vtrace", (7, 2), terminated=0.2, mask=0.2, bootstrap="tensor", seed=32, rho_clip=1.3)
    s = s.requiring_grad(list(subset))

    def fn(*xs):
        return s.with_tensors(**dict(zip(subset, xs))).call("cpu")

    assert torch.autograd.gradcheck(fn, tuple(s.tensors[n] for n in subset), eps=1e-6, atol=1e-7)


# --- a plain torch autograd re-implementation of docs/design.md §4.1-4.2, on [T, N], float64 ---------------------


def _torch_scan(a, b, initial, reverse):
    T = a.shape[0]
    x = initial
    out = [None] * T
    for t in reversed(range(T)) if reverse else range(T):
        x = b[t] + a[t] * x
        out[t] = x
    return torch.stack(out)


def _torch_family(
    op, r, v, lr, nv, boot, term, trunc, mask, gamma, lam=1.0, rho_clip=1.0, c_clip=1.0, pg_rho_clip=1.0
):
    T, N = r.shape
    zero = torch.zeros(N, dtype=r.dtype)
    term = term.to(r.dtype)
    done = (term.bool() | trunc).to(r.dtype)
    carry_g, carry_a, carry_x = boot, zero, zero
    carry_v = boot  # V of the next valid step (or the bootstrap value)
    carry_vs = zero  # vs of the next valid step
    seen = torch.zeros(N, dtype=torch.bool)  # a valid step exists after t
    outs0, outs1 = [None] * T, [None] * T
    for t in reversed(range(T)):
        m = mask[t]
        last = ~seen
        if op == "discounted_returns":
            if nv is not None:
                tail = torch.where(trunc[t] | last, nv[t], carry_g)
            else:
                tail = carry_g
            g = r[t] + gamma * (1 - term[t]) * tail
            carry_g = torch.where(m, g, carry_g)
            outs0[t] = torch.where(m, g, zero)
        else:
            vnext = nv[t] if nv is not None else carry_v
            delta = r[t] + gamma * (1 - term[t]) * vnext - v[t]
            if op == "gae":
                adv = delta + gamma * lam * (1 - done[t]) * carry_a
                carry_a = torch.where(m, adv, carry_a)
                outs0[t] = torch.where(m, adv, zero)
                outs1[t] = torch.where(m, adv + v[t], zero)
            else:
                e = torch.exp(lr[t])
                rho, c = clamp_open(e, max=rho_clip), lam * clamp_open(e, max=c_clip)
                pgr = clamp_open(e, max=pg_rho_clip)
                x = rho * delta + gamma * (1 - done[t]) * c * carry_x
                vs = v[t] + x
                vprime = torch.where(done[t].bool() | last, vnext, carry_vs)
                pg = pgr * (r[t] + gamma * (1 - term[t]) * vprime - v[t])
                carry_x = torch.where(m, x, carry_x)
                carry_vs = torch.where(m, vs, carry_vs)
                outs0[t] = torch.where(m, vs, zero)
                outs1[t] = torch.where(m, pg, zero)
            carry_v = torch.where(m, v[t], carry_v)
        seen = seen | m
    if op == "discounted_returns":
        return torch.stack(outs0)
    return torch.stack(outs0), torch.stack(outs1)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("with_next", [False, True])
def test_gradients_match_torch_reimplementation(op, with_next):
    T, N = 23, 4
    if op == "linear_scan":
        s = make_inputs(op, (T, N), initial="tensor", reverse=with_next, seed=41)
    else:
        s = make_inputs(
            op,
            (T, N),
            terminated=0.15,
            truncated=0.15 if with_next else 0.0,
            next_values=with_next,
            mask=0.3,
            bootstrap="tensor",
            gamma=0.9,
            lam=0.7,
            rho_clip=1.1,
            c_clip=0.8,
            pg_rho_clip=1.2,
            seed=41,
        )
    out, grads = _grads(s, seed=2)
    # the same with torch autograd on the formula
    t = {k: (v.detach().clone().requires_grad_(True) if k in grads else v) for k, v in s.tensors.items()}
    if op == "linear_scan":
        ref_out = (_torch_scan(t["a"], t["b"], t["initial"], s.scalars["reverse"]),)
    else:
        r_ = t["rewards"]
        flags = {
            k: (t[k].bool() if k in t else torch.zeros_like(r_, dtype=torch.bool))
            for k in ("terminated", "truncated")
        }
        mask = t["mask"].bool() if "mask" in t else torch.ones_like(r_, dtype=torch.bool)
        kw = {
            k: s.scalars[k] for k in ("gamma", "lam", "rho_clip", "c_clip", "pg_rho_clip") if k in s.scalars
        }
        ref_out = _tuple(
            _torch_family(
                op,
                r_,
                t.get("values"),
                t.get("log_rhos"),
                t.get("next_values"),
                t["bootstrap_value"],
                flags["terminated"],
                flags["truncated"],
                mask,
                **kw,
            )
        )
    for o, e in zip(out, ref_out):
        assert_close(o, e.detach(), F64)
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(o.shape, generator=g, dtype=F64) for o in out]
    names = list(grads)
    ref_grads = torch.autograd.grad(
        sum((o * w).sum() for o, w in zip(ref_out, ws)), [t[n] for n in names], allow_unused=True
    )
    for n, rg in zip(names, ref_grads):
        rg = torch.zeros_like(t[n]) if rg is None else rg
        assert_close(grads[n], rg, F64, name=f"grad {n}")


def _torch_reimplementation(s, t):
    """Outputs of the torch re-implementation for sample `s` ([T, N], time_dim 0) on tensors `t`."""
    if s.op == "linear_scan":
        init = t.get("initial", torch.zeros(t["a"].shape[1:], dtype=t["a"].dtype))
        return (_torch_scan(t["a"], t["b"], init, s.scalars["reverse"]),)
    r_ = t["rewards"]
    flags = {
        k: (t[k] != 0 if k in t else torch.zeros_like(r_, dtype=torch.bool))
        for k in ("terminated", "truncated")
    }
    mask = t["mask"] != 0 if "mask" in t else torch.ones_like(r_, dtype=torch.bool)
    boot = t.get("bootstrap_value", torch.zeros(r_.shape[1:], dtype=r_.dtype))
    kw = {k: s.scalars[k] for k in ("gamma", "lam", "rho_clip", "c_clip", "pg_rho_clip") if k in s.scalars}
    return _tuple(
        _torch_family(
            s.op,
            r_,
            t.get("values"),
            t.get("log_rhos"),
            t.get("next_values"),
            boot,
            flags["terminated"],
            flags["truncated"],
            mask,
            **kw,
        )
    )


@pytest.mark.parametrize("op", OPS)
@given(data=st.data())
def test_property_gradients_match_torch_reimplementation(op, data):
    T = data.draw(st.integers(1, 12))
    N = data.draw(st.integers(1, 4))
    if op == "linear_scan":
        s = make_inputs(
            op,
            (T, N),
            initial=data.draw(st.sampled_from(["none", "tensor"])),
            reverse=data.draw(st.booleans()),
            seed=data.draw(st.integers(0, 10**6)),
        )
    else:
        trunc = data.draw(_PROBS)
        s = make_inputs(
            op,
            (T, N),
            terminated=data.draw(_PROBS),
            truncated=trunc,
            next_values=trunc > 0 or data.draw(st.booleans()),
            mask=data.draw(_MASK_PROBS),
            bootstrap=data.draw(st.sampled_from(["none", "tensor"])),
            gamma=data.draw(_GAMMAS),
            lam=data.draw(_GAMMAS),
            rho_clip=data.draw(st.sampled_from([0.5, 1.0, 2.0])),
            c_clip=data.draw(st.sampled_from([0.5, 1.0, 2.0])),
            pg_rho_clip=data.draw(st.sampled_from([0.5, 1.0, 2.0])),
            flag_dtype=data.draw(_FLAG_DTYPES),
            seed=data.draw(st.integers(0, 10**6)),
        )
    out, grads = _grads(s, seed=4)
    t = {k: (v.detach().clone().requires_grad_(True) if k in grads else v) for k, v in s.tensors.items()}
    ref_out = _torch_reimplementation(s, t)
    for o, e in zip(out, ref_out):
        assert_close(o, e.detach(), F64)
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(o.shape, generator=g, dtype=F64) for o in out]
    names = list(grads)
    ref_grads = torch.autograd.grad(
        sum((o * w).sum() for o, w in zip(ref_out, ws)), [t[n] for n in names], allow_unused=True
    )
    for n, rg in zip(names, ref_grads):
        assert_close(grads[n], torch.zeros_like(t[n]) if rg is None else rg, F64, name=f"grad {n}")


@pytest.mark.parametrize("op", SCAN_OPS)
@given(data=st.data())
def test_property_packed_equals_separate_calls(op, data):
    # Packed varlen = each segment on its own (forward and backward), including empty segments.
    lengths = data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=5))
    trunc = data.draw(_PROBS)
    s = make_inputs(
        op,
        cu_seqlens=lengths,
        cu_dtype=data.draw(st.sampled_from([torch.int32, torch.int64])),
        terminated=data.draw(_PROBS),
        truncated=trunc,
        next_values=trunc > 0 or data.draw(st.booleans()),
        mask=data.draw(_MASK_PROBS),
        bootstrap="tensor",
        seed=data.draw(st.integers(0, 10**6)),
    )
    _check_packed_equals_separate_calls(s, lengths)


@pytest.mark.parametrize("next_values", [False, True])
@pytest.mark.parametrize("op", SCAN_OPS)
def test_many_packed_segments_equal_separate_calls(op, next_values):
    # More segments than the CPU engine's 16 lanes, of varied lengths (empty ones too): the engine lays them
    # in lanes by length, alternates groups of long and short ones between tiles and puts the partial group
    # last. Each segment must still give what its own call gives, forward and backward, its bootstrap value
    # (read without next_values) and that value's gradient included.
    lengths = torch.randint(0, 90, (37,), generator=torch.Generator().manual_seed(37)).tolist()
    lengths[3] = lengths[20] = 0
    lengths[30] = 250
    s = make_inputs(op, cu_seqlens=lengths, terminated=0.05, truncated=0.05 if next_values else 0.0,
                    next_values=next_values, mask=0.1, bootstrap="tensor", seed=38)
    _check_packed_equals_separate_calls(s, lengths)


def _check_packed_equals_separate_calls(s, lengths):
    out, grads = _grads(s, seed=6)
    cu = s.scalars["cu_seqlens"].tolist()
    g = torch.Generator().manual_seed(6)
    ws = [torch.randn(o.shape, generator=g, dtype=F64) for o in out]
    for i in range(len(lengths)):
        a, b = cu[i], cu[i + 1]
        if a == b:  # an empty segment: nothing out, and no gradient for its bootstrap value
            assert torch.equal(grads["bootstrap_value"][i], torch.zeros((), dtype=F64))
            continue
        seg = {k: (v[i] if k == "bootstrap_value" else v[a:b]) for k, v in s.tensors.items()}
        scalars = {k: v for k, v in s.scalars.items() if k != "cu_seqlens"}
        p = dataclasses.replace(s, tensors=seg, scalars=scalars).requiring_grad()
        p_out = _tuple(p.call("cpu"))
        for o, po in zip(out, p_out):
            assert_close(o[a:b], po, F64)
        loss = sum((po * w[a:b]).sum() for po, w in zip(p_out, ws))
        names = p.diff_names()
        p_grads = dict(zip(names, torch.autograd.grad(loss, [p.tensors[n] for n in names])))
        for n in names:
            full = grads[n][i] if n == "bootstrap_value" else grads[n][a:b]
            assert_close(full, p_grads[n], F64, name=f"grad {n} segment {i}")


@pytest.mark.parametrize("op", ["gae", "vtrace"])
@pytest.mark.parametrize("used", [0, 1])
def test_gradients_with_one_output_unused(op, used):
    # Only one of the two outputs in the loss: the other's upstream gradient arrives as None.
    s = make_inputs(
        op, (15, 3), terminated=0.2, truncated=0.2, mask=0.2, bootstrap="tensor", seed=45, rho_clip=1.3
    ).requiring_grad()
    names = s.diff_names()
    out = s.call("cpu")
    w = torch.randn(out[used].shape, dtype=F64)
    got = torch.autograd.grad((out[used] * w).sum(), [s.tensors[n] for n in names], allow_unused=True)
    t = {k: (v.detach().clone().requires_grad_(True) if k in names else v) for k, v in s.tensors.items()}
    ref_out = _torch_reimplementation(s, t)
    exp = torch.autograd.grad((ref_out[used] * w).sum(), [t[n] for n in names], allow_unused=True)
    for n, g, e in zip(names, got, exp):
        g = torch.zeros_like(t[n]) if g is None else g
        e = torch.zeros_like(t[n]) if e is None else e
        assert_close(g, e, F64, name=f"grad {n}")


def test_vtrace_gradient_at_clip_boundary():
    # log_rhos = 0 with clips 1: e^0 sits exactly on every clip. The kernel's convention is torch 2.14's clamp
    # (no gradient at equality; conftest.clamp_open, since torch 2.11's passes it); compare with the
    # re-implementation.
    s = make_inputs("vtrace", (9, 2), terminated=0.2, bootstrap="tensor", seed=46)
    s = s.with_tensors(log_rhos=torch.zeros(9, 2, dtype=F64))
    out, grads = _grads(s, seed=7)
    t = {k: (v.detach().clone().requires_grad_(True) if k in grads else v) for k, v in s.tensors.items()}
    ref_out = _torch_reimplementation(s, t)
    g = torch.Generator().manual_seed(7)
    ws = [torch.randn(o.shape, generator=g, dtype=F64) for o in out]
    exp = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ref_out, ws)), [t[n] for n in grads])
    for (n, gr), e in zip(grads.items(), exp):
        assert_close(gr, e, F64, name=f"grad {n}")
    # Every weight sits on its clip, so under clamp's convention log_rhos gets exactly no gradient, while
    # rewards and values still do.
    assert torch.equal(grads["log_rhos"], torch.zeros_like(grads["log_rhos"]))
    assert grads["rewards"].abs().sum() > 0


@pytest.mark.parametrize("op", SCAN_OPS)
@pytest.mark.parametrize("dtype", LOW_PRECISION + (torch.float32,), ids=str)
def test_gradients_low_precision(op, dtype):
    # Gradients come back in each input's dtype and match the float64 gradients of the rounded inputs.
    s = make_inputs(op, (40, 3), dtype=dtype, terminated=0.1, mask=0.2, bootstrap="tensor", seed=43)
    _out, grads = _grads(s, seed=3)
    s64 = dataclasses.replace(
        s.with_tensors(**{k: v.double() for k, v in s.tensors.items() if v.is_floating_point()}), dtype=F64
    )
    _, grads64 = _grads(s64, seed=3)
    for n, gr in grads.items():
        assert gr.dtype == dtype, n
        assert_close(gr, grads64[n], dtype, name=f"grad {n}")


def test_gradient_of_bootstrap_is_zero_with_next_values():
    # next_values replace the bootstrap value (docs/design.md §4.2): its gradient is 0, the next_values' is not.
    s = make_inputs("gae", (9, 2), next_values=True, bootstrap="tensor", seed=44).requiring_grad()
    adv, ret = s.call("cpu")
    gb, gn = torch.autograd.grad((adv + ret).sum(), (s.tensors["bootstrap_value"], s.tensors["next_values"]))
    assert torch.equal(gb, torch.zeros_like(gb))
    assert gn.abs().sum() > 0


# ====================================================================================================
# opcheck of the custom ops
# ====================================================================================================


def _opcheck_params():
    for op in OPS:
        for i, dtype in enumerate((F64, torch.bfloat16)):
            for rg in (False, True):
                if dtype != F64 and rg:
                    continue
                yield pytest.param(op, dtype, rg, id=f"{op}-{str(dtype)[6:]}-{'grad' if rg else 'nograd'}")


@pytest.mark.parametrize("op,dtype,requires_grad", list(_opcheck_params()))
def test_opcheck_forward(op, dtype, requires_grad):
    fn = getattr(torch.ops.rlkernels, op).default
    for sample in canonical_samples(op, dtype=dtype, requires_grad=requires_grad):
        torch.library.opcheck(fn, op_args(sample))


@pytest.mark.parametrize("op", SCAN_OPS)
def test_opcheck_backward(op):
    fn = getattr(torch.ops.rlkernels, f"{op}_backward").default
    for sample in canonical_samples(op):
        torch.library.opcheck(fn, backward_op_args(sample))
    for sample in canonical_samples(op, dtype=torch.bfloat16)[:2]:
        torch.library.opcheck(fn, backward_op_args(sample))


@pytest.mark.parametrize("op", OPS)
def test_raw_op_matches_public(op):
    # The raw op on canonical tensors gives the same numbers as the public function.
    for sample in canonical_samples(op):
        if op in ("discounted_returns", "vtrace") and sample.tensors.get("next_values") is not None:
            continue  # the wrapper also marks the last valid step truncated there
        raw = _tuple(getattr(torch.ops.rlkernels, op)(*op_args(sample)))[: NUM_OUTPUTS[op]]
        pub = _tuple(sample.call("cpu"))
        for a, b in zip(raw, pub):
            assert torch.equal(a, b)


# ====================================================================================================
# torch.compile
# ====================================================================================================


def _all_four(r, v, lr, nv, term, trunc, m, boot, cu, r1, v1, lr1, nv1):
    x = rlkernels.linear_scan(torch.sigmoid(v), r, initial=boot)
    g = rlkernels.discounted_returns(r, terminated=term, mask=m, gamma=0.9, bootstrap_value=boot)
    adv, ret = rlkernels.gae(
        r, v, terminated=term, truncated=trunc, next_values=nv, mask=m, gamma=0.9, lam=0.8
    )
    vs, pg = rlkernels.vtrace(
        r, v, lr, terminated=term, mask=m, bootstrap_value=boot, gamma=0.9, rho_clip=1.5
    )
    # LLM layout and packed sequences (with next_values, exercising the wrapper's last-step marking)
    g2 = rlkernels.discounted_returns(r.T, mask=m.T, next_values=nv.T, time_dim=-1, gamma=0.95)
    vs2, pg2 = rlkernels.vtrace(r1, v1, lr1, next_values=nv1, cu_seqlens=cu, gamma=0.95)
    return x, g, adv, ret, vs, pg, g2, vs2, pg2


def _compile_inputs(requires_grad=False, T=11):
    g = torch.Generator().manual_seed(T)
    B = 3
    r, v, lr, nv = (torch.randn(T, B, generator=g) for _ in range(4))
    term, trunc = torch.rand(T, B, generator=g) < 0.2, torch.rand(T, B, generator=g) < 0.2
    m = torch.rand(T, B, generator=g) < 0.8
    boot = torch.randn(B, generator=g)
    cu = torch.tensor([0, 4, 4, 9, 12], dtype=torch.int32)
    r1, v1, lr1, nv1 = (torch.randn(12, generator=g) for _ in range(4))
    floats = [r, v, lr, nv, boot, r1, v1, lr1, nv1]
    if requires_grad:
        for x in floats:
            x.requires_grad_(True)
    return (r, v, lr, nv, term, trunc, m, boot, cu, r1, v1, lr1, nv1), floats


def test_torch_compile_fullgraph_forward():
    torch._dynamo.reset()
    args, _ = _compile_inputs()
    eager = _all_four(*args)
    compiled = torch.compile(_all_four, fullgraph=True)(*args)
    for e, c in zip(eager, compiled):
        assert c.dtype == e.dtype and c.shape == e.shape
        assert_close(c, e, torch.float32, rtol=1e-6, atol=1e-6)


def test_torch_compile_fullgraph_backward():
    torch._dynamo.reset()

    def loss_fn(*args):
        return sum((o * (i + 1)).sum() for i, o in enumerate(_all_four(*args)))

    args, floats = _compile_inputs(requires_grad=True)
    eager_grads = torch.autograd.grad(loss_fn(*args), floats)
    args, floats = _compile_inputs(requires_grad=True)
    # aot_eager: dynamo (fullgraph: no graph break) and AOTAutograd over the fake kernels and the registered
    # autograd, forward and backward graphs; inductor's C++ code generation is left to the forward test, as
    # it costs a minute per graph on a 2-core CI machine.
    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*args)
    compiled_grads = torch.autograd.grad(loss, floats)
    for e, c in zip(eager_grads, compiled_grads):
        assert_close(c, e, torch.float32, rtol=1e-5, atol=1e-5)


def _dynamic_fn(r, v, nv, term, m):
    adv, ret = rlkernels.gae(r.T, v.T, terminated=term.T, mask=m.T, time_dim=-1, gamma=0.9, lam=0.8)
    g = rlkernels.discounted_returns(r, next_values=nv, mask=m, gamma=0.95)  # last valid step marked in torch
    return adv, ret, g


def test_torch_compile_dynamic_shapes():
    # The fake kernels and the wrapper trace with symbolic sizes: one compiled function, several lengths.
    torch._dynamo.reset()
    compiled = torch.compile(_dynamic_fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for T in (5, 17):
        r, v, _, nv, term, _, m, *_ = _compile_inputs(T=T)[0]
        args = (r, v, nv, term, m)
        for e, c in zip(_dynamic_fn(*args), compiled(*args)):
            assert c.shape == e.shape
            assert_close(c, e, torch.float32, rtol=1e-6, atol=1e-6)


# ====================================================================================================
# Determinism, empty inputs, NaN / Inf
# ====================================================================================================


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(40961, 2), (100, 300)], ids=["chunked", "many_sequences"])
def test_deterministic(op, shape):
    kw = (
        {"initial": "tensor"}
        if op == "linear_scan"
        else {"terminated": 1e-3, "mask": 0.1, "bootstrap": "tensor"}
    )
    s = make_inputs(op, shape, dtype=torch.float32, seed=51, **kw)
    out1, g1 = _grads(s, seed=5)
    out2, g2 = _grads(s, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the work split must not change the numbers either
        out3, g3 = _grads(s, seed=5)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(out1, out2, out3):
        assert torch.equal(a, b) and torch.equal(a, c)
    for n in g1:
        assert torch.equal(g1[n], g2[n]) and torch.equal(g1[n], g3[n]), n


def _empty_samples():
    for op in OPS:
        for shape in [(0, 3), (5, 0), (0,), (2, 0, 4)]:
            yield pytest.param(
                op, {"shape": shape, "time_dim": 1 if len(shape) == 3 else 0}, id=f"{op}-{shape}"
            )
        if op != "linear_scan":
            yield pytest.param(op, {"cu_seqlens": []}, id=f"{op}-packed-none")
            yield pytest.param(op, {"cu_seqlens": [0, 0, 0]}, id=f"{op}-packed-empty-segments")
            for mask in (0.0, 0.5):  # with and without a mask: two ways of marking the last valid step
                for shape in [(0, 3), (0,), (3, 0)]:
                    yield pytest.param(
                        op,
                        {"shape": shape, "next_values": True, "mask": mask},
                        id=f"{op}-{shape}-next_values-mask{mask}",
                    )
                yield pytest.param(
                    op,
                    {"cu_seqlens": [0, 0], "next_values": True, "mask": mask},
                    id=f"{op}-packed-next_values-mask{mask}",
                )


@pytest.mark.parametrize("op,kw", list(_empty_samples()))
def test_empty_inputs(op, kw):
    extra = (
        {"initial": "tensor"}
        if op == "linear_scan"
        else {"terminated": 0.5, "bootstrap": "tensor", "mask": 0.5}
    )
    s = make_inputs(op, seed=52, **{**extra, **kw})
    out = _tuple(s.call("cpu"))
    exp = _tuple(s.reference())
    assert_outputs_close(out, exp, F64)
    # backward on empty inputs: empty gradients, and zero gradients for the per-sequence values
    s = s.requiring_grad()
    out = _tuple(s.call("cpu"))
    names = s.diff_names()
    grads = torch.autograd.grad(sum(o.sum() for o in out), [s.tensors[n] for n in names], allow_unused=True)
    for n, gr in zip(names, grads):
        x = s.tensors[n]
        gr = torch.zeros_like(x) if gr is None else gr
        assert gr.shape == x.shape
        assert torch.equal(gr, torch.zeros_like(x)), n


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("T", [20, 16384], ids=["short", "chunked"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nan_inf_propagate_like_reference(op, T, bad):
    B = 3
    if op == "linear_scan":
        s = make_inputs(op, (T, B), initial="tensor", seed=61)
        s = s.with_tensors(a=0.9995 + 0.0004 * s.tensors["a"])  # a > 0 and products over a chunk stay > 0
        name = "b"
    else:
        # gamma * lam near 1: products over a 4096-step chunk do not underflow (that case is the test below)
        s = make_inputs(
            op,
            (T, B),
            terminated=0.1 if T < 100 else 1e-3,
            mask=0.2,
            bootstrap="tensor",
            gamma=0.999,
            lam=0.999,
            seed=61,
        )
        name = "values" if op != "discounted_returns" else "rewards"
    x = s.tensors[name].clone()
    x[T - 3, 0] = bad
    x[T // 2, 1] = bad
    s = s.with_tensors(**{name: x})
    _check_against_reference(s)


@pytest.mark.parametrize(
    "op,dtype,gamma,lam",
    [
        ("discounted_returns", F64, 0.5, None),
        ("gae", torch.float32, 0.99, 0.95),  # the usual PPO settings
        ("gae", F64, 0.5, 1.0),
    ],
)
def test_inf_propagates_on_chunked_path(op, dtype, gamma, lam):
    # docs/design.md §3: Inf propagates. With r_{T-1} = +inf and nothing else, G_t = r_t + gamma G_{t+1} and
    # A_t = delta_t + gamma lam A_{t+1} are +inf for every t: the literal formula, the reference and the
    # unchunked kernel (T = 16383) agree. On the chunked path (T = 16384) the chunk maps carry a coefficient
    # (gamma lam)^4096 that underflows to 0, and 0 * inf = NaN turned the earlier chunks into NaN.
    for T in (16383, 16384):
        r = torch.zeros(T, 1, dtype=dtype)
        r[-1] = float("inf")
        if op == "gae":
            v = torch.zeros(T, 1, dtype=dtype)
            out = rlkernels.gae(r, v, gamma=gamma, lam=lam)[0]
            expected = reference.gae(r, v, gamma=gamma, lam=lam)[0]
        else:
            out = rlkernels.discounted_returns(r, gamma=gamma)
            expected = reference.discounted_returns(r, gamma=gamma)
        assert np.isposinf(expected).all()
        assert not torch.isnan(out).any(), f"T={T}: {int(torch.isnan(out).sum())} NaN where +inf is expected"
        assert torch.isposinf(out).all()


@pytest.mark.parametrize("op", SCAN_OPS)
def test_nan_at_masked_position_does_not_leak(op):
    # Masked positions are never read (docs/design.md §4.2): a NaN there must not reach any output.
    for T in (30, 16384):
        s = make_inputs(op, (T, 2), terminated=0.05, mask=0.2, bootstrap="tensor", next_values=True, seed=62)
        mask = s.tensors["mask"].clone()
        mask[T // 2, :] = False
        poisoned = {}
        for name in ("rewards", "values", "log_rhos", "next_values"):
            if name in s.tensors:
                x = s.tensors[name].clone()
                x[T // 2, :] = float("nan")
                poisoned[name] = x
        s = s.with_tensors(mask=mask, **poisoned)
        out = _check_against_reference(s)
        for o in out:
            assert torch.isfinite(o).all()


# ====================================================================================================
# Backend selection
# ====================================================================================================


@pytest.mark.parametrize("op", OPS)
def test_backends_cpu_and_reference_agree(op):
    kw = {"initial": "tensor"} if op == "linear_scan" else {"terminated": 0.1, "truncated": 0.1, "mask": 0.2}
    s = make_inputs(op, (33, 2, 2), time_dim=1, dtype=torch.float32, seed=71, **kw)
    cpu = _tuple(s.call("cpu"))
    ref = _tuple(s.call("reference"))
    for a, b in zip(cpu, ref):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
        assert_close(a, b, torch.float32)


def test_available_backends():
    bk = rlkernels.available_backends()
    assert bk[0] == "cpu" and bk[-1] == "reference"
    assert set(bk) <= set(rlkernels.BACKENDS)
    if not torch.cuda.is_available():
        assert "cuda" not in bk


def test_backend_choice_reads_no_install_facts_at_call_time(monkeypatch):
    # Which ops have CUDA kernels and whether Triton is installed are read once, at import: choosing a backend
    # for CUDA tensors must not query the dispatcher or importlib per call, which torch 2.11's dynamo cannot
    # trace (torch.compile(fullgraph=True) of any op on CUDA tensors failed there in backend selection).
    from rlkernels import _backend

    def refuse(*args, **kwargs):
        raise AssertionError("queried at call time")

    cuda = torch.device("cuda")
    with monkeypatch.context() as m:
        m.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", refuse)
        m.setattr(_backend.importlib.util, "find_spec", refuse)
        for op in ("gae", "vtrace", "gather_logprobs", "ppo_policy_loss", "td_loss", "value_iteration"):
            try:
                chosen = _backend.resolve(None, cuda, op)
            except RuntimeError as exc:  # no GPU backend installed here: said, not crashed
                assert "no GPU backend" in str(exc)
            else:
                assert chosen in ("cuda", "triton")
            for backend in ("cuda", "triton"):
                try:
                    assert _backend.resolve(backend, cuda, op) == backend
                except RuntimeError as exc:
                    assert "is not available" in str(exc)
        assert _backend.available_backends()[0] == "cpu"
    fn = torch.compile(lambda x: x + len(_backend.resolve("triton", cuda, "gae")), fullgraph=True)
    if _backend._triton_installed():
        assert torch.equal(fn(torch.zeros(2)), torch.full((2,), 6.0))


def test_env_var_selects_backend(monkeypatch):
    s = make_inputs("gae", (8, 2), seed=72)
    calls = []
    real = reference.gae

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "gae", spy)
    monkeypatch.setenv("RLKERNELS_BACKEND", "reference")
    adv, _ = s.call(backend=None)
    assert calls == [1]
    assert_close(adv, real(*s.args, **s.kwargs)[0])
    # an explicit backend wins over the environment
    s.call(backend="cpu")
    assert calls == [1]
    monkeypatch.delenv("RLKERNELS_BACKEND")
    s.call(backend=None)
    assert calls == [1]
    # an unusable backend from the environment is reported, not ignored
    monkeypatch.setenv("RLKERNELS_BACKEND", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            s.call(backend=None)
    monkeypatch.setenv("RLKERNELS_BACKEND", "no-such-backend")
    with pytest.raises(RuntimeError, match="no-such-backend"):
        s.call(backend=None)


@pytest.mark.parametrize("op", OPS)
def test_cuda_backend_on_cpu_tensors_says_why(op):
    s = make_inputs(op, (4, 2), seed=73)
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not available: .*(CUDA|nvcc)"):
        s.call(backend="cuda")


@pytest.mark.parametrize("op", OPS)
def test_triton_backend_on_cpu_tensors_says_why(op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    s = make_inputs(op, (4, 2), seed=74)
    with pytest.raises(
        RuntimeError, match=r"backend='triton' is not available: .*(TRITON_INTERPRET|pip install triton)"
    ):
        s.call(backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("op", OPS)
def test_cuda_matches_reference(op):
    s = make_inputs(
        op,
        (97, 5),
        dtype=torch.float32,
        seed=81,
        **({"initial": "tensor"} if op == "linear_scan" else {"terminated": 0.1, "mask": 0.2}),
    )
    s = s.with_tensors(**{k: v.cuda() for k, v in s.tensors.items()})
    out = _tuple(s.call(backend=None))
    for o, e in zip(out, _tuple(s.reference())):
        assert o.is_cuda
        assert_close(o, e, torch.float32)


def test_every_differentiable_input_is_covered():
    # guards the tables the tests above iterate over
    assert DIFF_INPUTS["vtrace"] == ("rewards", "values", "log_rhos", "next_values", "bootstrap_value")
    for op in OPS:
        s = make_inputs(op, (5, 2), next_values=True, bootstrap="tensor", initial="tensor")
        assert set(s.diff_names()) == set(DIFF_INPUTS[op]), op
        out = _tuple(s.call("cpu"))
        assert not torch.equal(out[0], torch.zeros_like(out[0]))
        assert to_numpy(out[0]).shape == (5, 2)


# The CPU engine walks lanes in place when no dtype conversion is needed: time-major groups read whole rows,
# lanes contiguous in time (batch-major rows, chunks of a long sequence) go through in-register transposes,
# and ragged blocks fall back to the staging buffers. Every path, forward (reverse scan) and backward
# (forward scan), against the reference.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,time_dim", [((37, 16), 0), ((64, 48), 0), ((5, 96), -1), ((16, 103), -1),
                                            ((2, 20000), -1), ((20000, 17), 0)])
def test_in_place_walks_match_reference(dtype, shape, time_dim):
    g = torch.Generator().manual_seed(sum(shape))
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    term = torch.rand(shape, generator=g) < 0.02
    mask = torch.rand(shape, generator=g) < 0.9
    rq, vq = r.clone().requires_grad_(), v.clone().requires_grad_()
    adv, ret = rlkernels.gae(rq, vq, gamma=0.99, lam=0.95, terminated=term, mask=mask, time_dim=time_dim)
    e_adv, e_ret = reference.gae(r.double(), v.double(), gamma=0.99, lam=0.95, terminated=term, mask=mask,
                                 time_dim=time_dim)
    assert_close(adv, e_adv, dtype, name="advantages")
    assert_close(ret, e_ret, dtype, name="returns")
    # backward: against autograd of the float64 reverse loop on the same (rounded) inputs
    ga = torch.randn(shape, generator=g, dtype=torch.float64)
    (adv.double() * ga).sum().backward()
    r64, v64 = r.double().requires_grad_(), v.double().requires_grad_()
    a64, _ = rlkernels.gae(r64, v64, gamma=0.99, lam=0.95, terminated=term, mask=mask, time_dim=time_dim,
                           backend="cpu")
    (a64 * ga).sum().backward()
    assert_close(rq.grad, r64.grad, dtype, name="grad rewards")
    assert_close(vq.grad, v64.grad, dtype, name="grad values")


def _vm_flags_at(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    return []


@pytest.mark.skipif(
    not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")
    or "[never]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    or os.environ.get("RLKERNELS_HUGE_PAGES") == "0",
    reason="no transparent huge pages here",
)
def test_large_outputs_are_marked_for_huge_pages():
    # csrc/cpu/alloc.h: outputs of 4 MiB or more are mapped by the output cache and madvise(MADV_HUGEPAGE)d before
    # the kernel writes them (first-touch faults of fresh memory cost more than the GAE kernel on millions of
    # steps). (Smaller ones are not marked: below 128 KiB torch's allocator, in memory whose flags other code
    # of the process may have set, and up to 4 MiB the cache's buffers of 4 KiB pages.)
    T = 3 * 2**20  # 12 MiB per float32 output
    r, v = torch.randn(T, 1), torch.randn(T, 1)
    adv, ret = rlkernels.gae(r, v, gamma=0.99, lam=0.95)
    for out in (adv, ret):
        middle = out.data_ptr() + out.nbytes // 2
        assert "hg" in _vm_flags_at(middle), "a 12 MiB output not marked for huge pages"
    np.testing.assert_allclose(adv[-5:, 0].numpy(), reference.gae(r[-5:], v[-5:], gamma=0.99, lam=0.95)[0][:, 0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the output cache is Linux-only")
def test_large_outputs_reuse_freed_buffers_and_hold_correct_values():
    import resource

    T = 2**20 + 2**16  # 4.25 MiB per float32 output: from the output cache
    g = torch.Generator().manual_seed(11)
    r, v = torch.randn(T, 1, generator=g), torch.randn(T, 1, generator=g)
    term = torch.rand(T, 1, generator=g) < 1e-3
    term[1000] = True  # steps 0..1000 depend on nothing later: checked against the reference below
    cached = torch.ops.rlkernels._output_cache_bytes
    adv, ret = rlkernels.gae(r, v, terminated=term, gamma=0.99, lam=0.95)
    held = cached()
    del adv, ret
    assert cached() >= held + 2 * 4 * T  # both buffers kept (whole 2 MiB pages) ...
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    adv, ret = rlkernels.gae(r, v, terminated=term, gamma=0.99, lam=0.95)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert cached() == held  # ... and taken again
    assert faults < 200, f"{faults} page faults writing outputs into reused buffers"
    exp_adv, exp_ret = reference.gae(r[:1001], v[:1001], terminated=term[:1001], gamma=0.99, lam=0.95)
    np.testing.assert_allclose(adv[:1001].numpy(), exp_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret[:1001].numpy(), exp_ret, rtol=1e-5, atol=1e-5)
    # the same values as the float64 run (not from the cache of float32 buffers of this size)
    adv64, _ = rlkernels.gae(r.double(), v.double(), terminated=term, gamma=0.99, lam=0.95)
    np.testing.assert_allclose(adv.numpy(), adv64.numpy(), rtol=1e-4, atol=1e-4)
    # outputs are ordinary tensors: views, in-place ops, autograd inputs, resize_ (tests/test_reliability.py)
    adv.mul_(2.0)
    assert adv.is_contiguous() and adv.device.type == "cpu"
    fresh, _ = rlkernels.gae(r, v, terminated=term, gamma=0.99, lam=0.95)
    fresh.resize_(T + 1, 1)  # (not adv: .numpy() above made its storage non-resizable, as torch does for any)
    torch.testing.assert_close(fresh[:1001], adv[:1001] / 2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the output cache is Linux-only")
def test_mid_size_outputs_reuse_freed_buffers():
    # Outputs from 128 KiB (glibc's first mmap threshold) up come from the output cache too: glibc may map
    # such a block afresh at every call, and its first writes then fault on every 4 KiB page (2 MiB outputs:
    # 512 faults each, more than the kernel's time).
    import resource

    r, v = torch.randn(512, 256), torch.randn(512, 256)  # 512 KiB float32 outputs
    cached = torch.ops.rlkernels._output_cache_bytes
    adv, ret = rlkernels.gae(r, v, gamma=0.99, lam=0.95)
    held = cached()
    del adv, ret
    assert cached() >= held + 2 * r.nbytes
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    adv, ret = rlkernels.gae(r, v, gamma=0.99, lam=0.95)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert cached() == held
    assert faults < 40, f"{faults} page faults writing outputs into reused buffers"
    exp_adv, exp_ret = reference.gae(r, v, gamma=0.99, lam=0.95)
    np.testing.assert_allclose(adv.numpy(), exp_adv, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ret.numpy(), exp_ret, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(37, 5), (512, 64), (3, 1000), (2**20 + 2**16, 1)])
def test_outputs_start_on_128_byte_boundaries(shape):
    # csrc/cpu/alloc.h: every CPU output starts on a pair of cache lines, the unit the threads split rows at.
    r, v = torch.randn(shape), torch.randn(shape)
    outs = [*rlkernels.gae(r, v, gamma=0.99, lam=0.95), rlkernels.discounted_returns(r, gamma=0.9)]
    for out in outs:
        assert out.data_ptr() % 128 == 0, f"{shape}: output at {out.data_ptr() % 128} mod 128"
    np.testing.assert_allclose(outs[0][-3:].numpy(), reference.gae(r, v, gamma=0.99, lam=0.95)[0][-3:],
                               rtol=1e-4, atol=1e-4)


# ====================================================================================================
# The CPU fast path: time-first [T, B] / [T] tensors passed to the op as they are
# ====================================================================================================


@pytest.mark.parametrize("op", ["gae", "discounted_returns"])
@pytest.mark.parametrize("shape", [(37, 5), (37,), (1, 3), (0, 4)])
@pytest.mark.parametrize("with_boot", [False, True])
def test_time_first_fast_path_matches_canonical(op, shape, with_boot):
    # [T, B] and [T] CPU tensors skip the wrapper's reshapes; values and gradients must equal those of the
    # general path (the same data as [1, T, B] with time_dim=1), bootstrap_value shaped [B] / [] or None.
    g = torch.Generator().manual_seed(len(shape) * 10 + shape[0])
    r = torch.randn(shape, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(shape, generator=g, dtype=F64, requires_grad=True)
    term = torch.rand(shape, generator=g) < 0.2
    boot = torch.randn(shape[1:], generator=g, dtype=F64, requires_grad=True) if with_boot else None

    def call(r, v, term, boot, **kw):
        if op == "gae":
            return torch.cat([x.reshape(-1) for x in rlkernels.gae(r, v, gamma=0.9, lam=0.8, terminated=term,
                                                                   bootstrap_value=boot, **kw)])
        return rlkernels.discounted_returns(r, gamma=0.9, terminated=term, bootstrap_value=boot, **kw).reshape(-1)

    fast = call(r, v, term, boot)
    canon = lambda x: None if x is None else x.reshape(1, *shape) if len(shape) == 2 else x.reshape(1, -1, 1)  # noqa: E731
    canon_boot = None if boot is None else boot.reshape(1, -1) if len(shape) == 2 else boot.reshape(1, 1)
    slow = call(canon(r), canon(v), canon(term), canon_boot, time_dim=1)
    assert torch.equal(fast, slow)
    if fast.numel() == 0:
        return
    w = torch.randn(fast.shape, generator=g, dtype=F64)
    inputs = [x for x in (r, v, boot) if x is not None]
    g_fast = torch.autograd.grad((fast * w).sum(), inputs, allow_unused=True)
    g_slow = torch.autograd.grad((slow * w).sum(), inputs, allow_unused=True)
    for a, b in zip(g_fast, g_slow):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and torch.equal(a, b)


def test_time_first_fast_path_opcheck():
    g = torch.Generator().manual_seed(3)
    for shape in [(9, 3), (9,)]:
        r = torch.randn(shape, generator=g, dtype=F64, requires_grad=True)
        v = torch.randn(shape, generator=g, dtype=F64, requires_grad=True)
        term = torch.rand(shape, generator=g) < 0.3
        boot = torch.randn(shape[1:], generator=g, dtype=F64, requires_grad=True)
        torch.library.opcheck(torch.ops.rlkernels.gae.default, (r, v, None, boot, term, None, None, None, 0.9, 0.8))
        torch.library.opcheck(torch.ops.rlkernels.discounted_returns.default,
                              (r, None, boot, term, None, None, None, 0.9))


def test_time_first_fast_path_bad_bootstrap_still_named():
    r = torch.randn(10, 3)
    with pytest.raises(ValueError, match="bootstrap_value"):
        rlkernels.gae(r, r, bootstrap_value=torch.zeros(4))
    with pytest.raises(ValueError, match="bootstrap_value"):
        torch.ops.rlkernels.gae(r, r, None, torch.zeros(4), None, None, None, None, 0.9, 0.9)


# ----------------------------------------------------------------------------------------------------
# GAE on float32 sequences contiguous in time (csrc/cpu/gae_rows.h): vectorized along time, each thread one
# chunk of a sequence, later chunks' carries added by a fix-up that stops where the carry's weight is 0.
# Oracles: `rlkernels.reference` (NumPy, float64) for sizes its loops handle, and the engine's float64 walk
# (the rows path is float32 only) for multi-chunk sequences; the float32 engine (RLKERNELS_GAE_ROWS=0) for
# where NaN and inf must spread.
# ----------------------------------------------------------------------------------------------------


def _rows_inputs(B, T, seed, p_term, has_next):
    """float32 [B, T] GAE inputs from conftest.make_inputs: terminated at rate p_term, and either next_values
    with truncated (rate p_term) or a bootstrap value per sequence."""
    x = make_inputs("gae", (B, T), dtype=torch.float32, time_dim=1, seed=seed, terminated=p_term,
                    truncated=p_term if has_next else 0.0, next_values=has_next,
                    bootstrap="none" if has_next else "tensor").tensors
    none = torch.zeros(B, T, dtype=torch.bool)
    kw = {"terminated": x.get("terminated", none)}
    if has_next:
        kw.update(next_values=x["next_values"], truncated=x.get("truncated", none))
    else:
        kw["bootstrap_value"] = x["bootstrap_value"]
    return x["rewards"], x["values"], kw


def _rows_layout(x, layout):
    """[B, T] batch-major data as the caller passes it: ("batch_major", time_dim=1), ("time_major" [T, B],
    time_dim=0), or ("1d" [T], B = 1)."""
    if x is None or x.dim() == 1 and layout != "1d":
        return x
    if layout == "time_major":
        return x.t().contiguous() if x.dim() == 2 else x
    if layout == "1d":
        return x.reshape(-1) if x.dim() == 2 else x.reshape(())
    return x


def _rows_call(r, v, kw, layout, gamma, lam):
    time_dim = 1 if layout == "batch_major" else 0
    args = {k: _rows_layout(x, layout) for k, x in kw.items()}
    adv, ret = rlkernels.gae(_rows_layout(r, layout), _rows_layout(v, layout), gamma=gamma, lam=lam, time_dim=time_dim, **args)
    back = (lambda x: x.t()) if layout == "time_major" else (lambda x: x.reshape(r.shape))
    return back(adv), back(ret)


def _rows_engine64(r, v, kw, gamma, lam):
    """The engine's float64 walk: the oracle for sequences too long for the NumPy loops."""
    args = {k: (x.double() if x.is_floating_point() else x) for k, x in kw.items()}
    return rlkernels.gae(r.double(), v.double(), gamma=gamma, lam=lam, time_dim=1, **args)


@pytest.mark.parametrize("B,T,layout", [(1, 1024, "1d"), (1, 1031, "time_major"), (3, 4099, "batch_major"),
                                        (64, 256, "batch_major"), (2, 257, "batch_major"), (1, 8200, "1d")])
@pytest.mark.parametrize("has_next", [False, True])
@pytest.mark.parametrize("p_term", [0.0, 0.02, 0.5])
def test_rows_match_reference(B, T, layout, has_next, p_term):
    r, v, kw = _rows_inputs(B, T, seed=B * T + int(has_next), p_term=p_term, has_next=has_next)
    adv, ret = _rows_call(r, v, kw, layout, 0.99, 0.95)
    exp_adv, exp_ret = reference.gae(r.double(), v.double(), gamma=0.99, lam=0.95, time_dim=1,
                                     **{k: (x.double() if x.is_floating_point() else x) for k, x in kw.items()})
    assert adv.dtype == torch.float32
    assert_close(adv, exp_adv, torch.float32, name="advantages")
    assert_close(ret, exp_ret, torch.float32, name="returns")


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("has_next", [False, True])
@pytest.mark.parametrize("gamma,lam,p_term", [(0.99, 0.95, 0.01), (1.0, 1.0, 0.0), (0.999, 1.0, 1e-4)])
def test_rows_chunked_carries(threads, has_next, gamma, lam, p_term):
    # One sequence of 300,007 steps: 9 chunks (32,768 steps or more, boundaries on multiples of 8), whose
    # carries chain through 8 fix-ups, shared by 1, 2 or 4 threads; gamma lam = 1 without flags makes each
    # fix-up run its whole chunk. The chunks depend on the shape only: every thread count gives the same bits.
    r, v, kw = _rows_inputs(1, 300_007, seed=7, p_term=p_term, has_next=has_next)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        adv, ret = _rows_call(r, v, kw, "batch_major", gamma, lam)
        torch.set_num_threads(1)
        one = _rows_call(r, v, kw, "batch_major", gamma, lam)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(adv, one[0]) and torch.equal(ret, one[1])
    exp_adv, exp_ret = _rows_engine64(r, v, kw, gamma, lam)
    # float32 sums over up to 300K steps at gamma lam = 1: rounding grows with the length (both paths).
    tol = 2e-5 if gamma * lam < 1 else 2e-4
    torch.testing.assert_close(adv.double(), exp_adv, rtol=0, atol=tol * max(1.0, exp_adv.abs().max().item()))
    torch.testing.assert_close(ret.double(), exp_ret, rtol=0, atol=tol * max(1.0, exp_ret.abs().max().item()))


def test_rows_nan_and_inf_spread_like_the_engine(monkeypatch):
    # A NaN reward in the last chunk and an inf value in an earlier one: through the chunk carries and the
    # fix-ups (which must not stop at a zero weight when the carry is not finite), NaN lands where the
    # step-by-step recurrence puts it (0 * NaN is NaN, so it crosses terminated steps).
    T = 200_003
    r, v, kw = _rows_inputs(1, T, seed=5, p_term=0.01, has_next=False)
    r[0, 180_000] = math.nan
    v[0, 70_000] = math.inf
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        rows = _rows_call(r, v, kw, "batch_major", 0.99, 0.95)
        monkeypatch.setenv("RLKERNELS_GAE_ROWS", "0")
        engine = _rows_call(r, v, kw, "batch_major", 0.99, 0.95)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(rows, engine):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        assert torch.isnan(a).sum() > 100_000  # the NaN crossed the chunk boundaries
        fin = torch.isfinite(b)
        torch.testing.assert_close(a[fin], b[fin], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("T", [70_000, 70_001])  # outputs 16-byte aligned rows (T % 4 == 0) or not
@pytest.mark.parametrize("streaming", ["always", "0"])
def test_rows_streaming_stores(T, streaming, monkeypatch):
    monkeypatch.setenv("RLKERNELS_STREAMING_STORES", streaming)
    r, v, kw = _rows_inputs(3, T, seed=T, p_term=0.01, has_next=False)
    adv, ret = _rows_call(r, v, kw, "batch_major", 0.99, 0.95)
    exp_adv, exp_ret = _rows_engine64(r, v, kw, 0.99, 0.95)
    assert_close(adv, exp_adv, torch.float32, name="advantages")
    assert_close(ret, exp_ret, torch.float32, name="returns")


def test_rows_and_engine_agree(monkeypatch):
    r, v, kw = _rows_inputs(4, 5000, seed=3, p_term=0.05, has_next=True)
    rows = _rows_call(r, v, kw, "batch_major", 0.97, 0.9)
    monkeypatch.setenv("RLKERNELS_GAE_ROWS", "0")
    engine = _rows_call(r, v, kw, "batch_major", 0.97, 0.9)
    for a, b in zip(rows, engine):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@given(B=st.integers(1, 3), T=st.integers(256, 2500), has_next=st.booleans(),
       p_term=st.sampled_from([0.0, 0.01, 0.2, 1.0]), gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16), layout=st.sampled_from(["batch_major", "time_major"]))
def test_rows_property(B, T, has_next, p_term, gamma, lam, seed, layout):
    r, v, kw = _rows_inputs(B, T, seed, p_term, has_next)
    adv, ret = _rows_call(r, v, kw, layout, gamma, lam)
    exp_adv, exp_ret = reference.gae(r.double(), v.double(), gamma=gamma, lam=lam, time_dim=1,
                                     **{k: (x.double() if x.is_floating_point() else x) for k, x in kw.items()})
    # float32 sums over the effective horizon min(T, 1 / (1 - gamma lam)): their rounding grows with it (gamma =
    # lam = 0.99999 over 878 steps leaves 1e-5 of the largest advantage), and returns = advantages + values carry
    # the advantages' error
    horizon = T if gamma * lam >= 1.0 - 1.0 / T else 1.0 / (1.0 - gamma * lam)
    atol = max(1e-5, 2 * 2.0**-23 * horizon)  # (1e-5: the float32 tolerance of conftest)
    scale = max(1.0, float(np.abs(exp_adv).max()), float(np.abs(exp_ret).max()))
    assert_close(adv, exp_adv, torch.float32, atol=atol, scale=scale, name="advantages")
    assert_close(ret, exp_ret, torch.float32, atol=atol, scale=scale, name="returns")
    assert np.isfinite(adv.numpy()).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_of_long_rows(dtype):
    # The rows path reads float32 only: other dtypes of the same long shapes must not be read as float32 (a
    # past bug read float16 data through it) and still match the reference.
    r, v, kw = _rows_inputs(2, 3000, seed=11, p_term=0.02, has_next=False)
    r, v = r.to(dtype), v.to(dtype)
    kw["bootstrap_value"] = kw["bootstrap_value"].to(dtype)
    adv, ret = _rows_call(r, v, kw, "batch_major", 0.99, 0.95)
    exp_adv, exp_ret = reference.gae(r.double(), v.double(), gamma=0.99, lam=0.95, time_dim=1,
                                     **{k: (x.double() if x.is_floating_point() else x) for k, x in kw.items()})
    assert_close(adv, exp_adv, dtype, name="advantages")
    assert_close(ret, exp_ret, dtype, name="returns")


# ----------------------------------------------------------------------------------------------------
# The Triton backend against the CPU backend and the reference (rlkernels/triton/returns.py), on small
# shapes under the interpreter. Both regimes of the Triton engine are run: one lane per sequence, and the
# chunked three-pass scan, forced on small shapes by lowering the module's thresholds.
# ----------------------------------------------------------------------------------------------------

import itertools

from conftest import backends, gpu_backends

SMALL_TRITON = backends(*OPS, include=("triton",), cpu_tensors=True)


def _tr():
    from rlkernels.triton import returns

    return returns

ESTIMATORS = ("discounted_returns", "gae", "vtrace")
GAMMA, LAM = 0.9, 0.8
VTRACE_CLIPS = {"rho_clip": 1.2, "c_clip": 0.9, "pg_rho_clip": 1.1}
PACKED_LENGTHS = (5, 0, 8, 1, 3)  # an empty segment, a single step, ragged ends
STEPS, BATCH = 8, 5  # chunked: chunks of 3, 3 and 2 steps


# ----------------------------------------------------------------------------------------------------
# Regimes
# ----------------------------------------------------------------------------------------------------


def force_chunks_of_3(monkeypatch):
    # Every sequence of 6 steps or more is cut into chunks of 3: several chunks and a ragged last one.
    monkeypatch.setattr(_tr(), "MANY_SEQUENCES", 10**9)
    monkeypatch.setattr(_tr(), "TARGET_LANES", 10**9)
    monkeypatch.setattr(_tr(), "MIN_CHUNK_STEPS", 3)


@pytest.fixture(params=["lanes", "chunked"])
def regime(request, monkeypatch):
    """Runs a test in one regime of the engine, and checks afterwards that it was the one used."""
    chunked = request.param == "chunked"
    if chunked:
        force_chunks_of_3(monkeypatch)
    used = []
    choose = _tr()._chunk_steps

    def spy(num_seqs, steps):
        chunk = choose(num_seqs, steps)
        used.append(chunk < steps)
        return chunk

    monkeypatch.setattr(_tr(), "_chunk_steps", spy)
    yield request.param
    assert used, "the Triton engine never ran"
    assert any(used) if chunked else not any(used), f"expected the {request.param} regime, got {used}"


@pytest.mark.parametrize("backend", SMALL_TRITON)
def test_triton_regime_heuristic(backend):
    import triton

    choose = _tr()._chunk_steps
    # Many sequences, or short ones: one lane per sequence walks the whole sequence.
    assert choose(100_000, 1_000_000) == 1_000_000
    assert choose(8, 100) == 100
    assert choose(3, 0) == 1
    # Few long sequences: chunks, at least MIN_CHUNK_STEPS long, sized for about TARGET_LANES lanes.
    chunk = choose(8, 1 << 20)
    assert _tr().MIN_CHUNK_STEPS <= chunk < 1 << 20
    assert 8 * triton.cdiv(1 << 20, chunk) <= 2 * _tr().TARGET_LANES
    assert choose(1, 1 << 24) < choose(1, 1 << 26)


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


class Case:
    """Inputs of one layout with every optional tensor, from conftest.make_inputs; float64, cast per test."""

    def __init__(self, layout, seed, steps=STEPS, batch=BATCH):
        self.layout = layout
        self.cu_seqlens = None
        self.time_dim = 0
        shape, packed = None, None
        if layout == "time_major":
            shape = (steps, batch)
        elif layout == "batch_major":
            shape, self.time_dim = (batch, steps), -1
        elif layout == "middle":  # [O, T, I] with O and I both > 1
            shape, self.time_dim = (2, steps, 3), 1
        elif layout == "packed":
            packed = list(PACKED_LENGTHS)
        else:
            raise ValueError(layout)
        geometry = {"cu_seqlens": packed, "cu_dtype": torch.int32} if packed else {"time_dim": self.time_dim}
        # Both sides of every clip (log_rhos of spread 0.7); 15% terminated and truncated, 25% masked.
        sample = make_inputs("vtrace", shape, terminated=0.15, truncated=0.15, mask=0.25, bootstrap="tensor",
                             seed=seed, **geometry)
        x = sample.tensors
        scan = make_inputs("linear_scan", shape, initial="tensor", seed=seed + 1, **geometry).tensors
        self.cu_seqlens = sample.scalars.get("cu_seqlens")
        for name in ("rewards", "values", "next_values", "log_rhos", "bootstrap_value", "terminated", "truncated",
                     "mask"):
            setattr(self, name, x[name])
        self.a = scan["a"].abs()  # decays in [0, 1)
        self.initial = scan["initial"]
        g = torch.Generator().manual_seed(seed + 2)
        # A loss mixing every output, for gradients.
        self.weights = tuple(torch.randn(self.rewards.shape, generator=g, dtype=torch.float64) for _ in range(2))

    def floats(self, dtype, requires_grad=False):
        names = ("rewards", "values", "next_values", "log_rhos", "a", "bootstrap_value", "initial")
        return {n: getattr(self, n).to(dtype).requires_grad_(requires_grad) for n in names}


# Flag combinations: terminated x mask x {nothing, bootstrap_value, next_values, truncated + next_values}
# (bootstrap_value is not used when next_values are given).
COMBOS = [
    tuple(name for name, on in zip(("terminated", "mask"), (term, mask)) if on) + nxt
    for term, mask, nxt in itertools.product(
        (False, True), (False, True),
        ((), ("bootstrap_value",), ("next_values",), ("truncated", "next_values")))
]
ALL_FLAGS = ("terminated", "truncated", "next_values", "mask")
BOOTSTRAPPED = ("terminated", "mask", "bootstrap_value")


def run(op, backend, case, combo, floats):
    """Calls the public function `op` with the options in `combo`; returns its outputs as a tuple."""
    kw = {"gamma": GAMMA, "cu_seqlens": case.cu_seqlens, "time_dim": case.time_dim, "backend": backend}
    for name in combo:
        kw[name] = floats[name] if name in floats else getattr(case, name)
    args = [floats["rewards"]]
    if op in ("gae", "vtrace"):
        args.append(floats["values"])
        kw["lam"] = LAM
    if op == "vtrace":
        args.append(floats["log_rhos"])
        kw.update(VTRACE_CLIPS)
    out = getattr(rlkernels, op)(*args, **kw)
    return out if isinstance(out, tuple) else (out,)


def leaf_names(op, combo):
    names = ["rewards"] + (["values"] if op != "discounted_returns" else [])
    names += ["log_rhos"] if op == "vtrace" else []
    return names + [n for n in ("next_values", "bootstrap_value") if n in combo]


def leaves(op, combo, floats):
    return [floats[n] for n in leaf_names(op, combo)]


def accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", SMALL_TRITON)
@pytest.mark.parametrize("layout", ["time_major", "batch_major", "packed"])
@pytest.mark.parametrize("op", ESTIMATORS)
def test_backend_every_flag_combination_matches_cpu_and_reference(op, layout, regime, backend):
    case = Case(layout, seed=10 * ESTIMATORS.index(op) + len(layout))
    floats = case.floats(torch.float64)
    for combo in COMBOS:
        got = run(op, backend, case, combo, floats)
        want = run(op, "cpu", case, combo, floats)
        ref = run(op, "reference", case, combo, floats)
        for i, (g, w, r) in enumerate(zip(got, want, ref)):
            assert g.dtype == torch.float64 and g.shape == case.rewards.shape
            assert_close(g, w, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name=f"{op} output {i} with {combo} vs cpu")
            assert_close(g, r, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name=f"{op} output {i} with {combo} vs reference")
        if "mask" in combo:
            assert all((g[~case.mask] == 0).all() for g in got), f"{op} with {combo}: masked outputs not 0"


TOLERANCES = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-5, torch.float16: 1e-5}
DTYPE_LAYOUTS = [(dtype, layout) for dtype in TOLERANCES for layout in ("time_major", "batch_major")]
DTYPE_LAYOUTS.append((torch.float64, "middle"))


@pytest.mark.parametrize("backend", SMALL_TRITON)
@pytest.mark.parametrize("dtype, layout", DTYPE_LAYOUTS)
@pytest.mark.parametrize("op", ESTIMATORS)
def test_backend_dtypes_match_cpu(op, dtype, layout, regime, backend):
    # 16-bit inputs are read as they are and accumulated in float32 by both backends: the results agree to
    # float32 rounding (the chunked regime only reorders operations).
    tol = TOLERANCES[dtype]
    case = Case(layout, seed=7)
    floats = case.floats(dtype)
    for combo in (ALL_FLAGS, BOOTSTRAPPED):
        got = run(op, backend, case, combo, floats)
        want = run(op, "cpu", case, combo, floats)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == accumulate_dtype(dtype)
            assert_close(g, w, rtol=tol, atol=tol, scale=1.0, same_dtype=True, name=f"{op} output {i} {dtype} {combo}")


@pytest.mark.parametrize("backend", SMALL_TRITON)
@pytest.mark.parametrize("dtype, layout", DTYPE_LAYOUTS)
def test_backend_linear_scan_matches_cpu(dtype, layout, regime, backend):
    tol = TOLERANCES[dtype]
    case = Case(layout, seed=11)
    f = case.floats(dtype)
    for reverse, initial in itertools.product((True, False), (None, f["initial"])):
        kw = {"reverse": reverse, "initial": initial, "time_dim": case.time_dim}
        got = rlkernels.linear_scan(f["a"], f["rewards"], backend=backend, **kw)
        want = rlkernels.linear_scan(f["a"], f["rewards"], backend="cpu", **kw)
        assert got.dtype == accumulate_dtype(dtype)
        assert_close(got, want, rtol=tol, atol=tol, scale=1.0, same_dtype=True, name=f"linear_scan reverse={reverse} initial={initial is not None}")


@pytest.mark.parametrize("backend", SMALL_TRITON)
def test_backend_flags_as_uint8_and_bool_agree(backend):
    # The wrappers hand bool flags over; the ops read uint8 ones the same way.
    case = Case("time_major", seed=3)
    canon = (1, STEPS, BATCH)
    r, v = case.rewards.reshape(canon), case.values.reshape(canon)
    flags = [x.reshape(canon) for x in (case.terminated, case.mask)]
    args = (r, v, None, case.bootstrap_value.reshape(1, BATCH))
    as_bool = _tr().gae(*args, flags[0], None, flags[1], None, GAMMA, LAM)
    as_uint8 = _tr().gae(*args, flags[0].to(torch.uint8), None, flags[1].to(torch.uint8), None,
                                  GAMMA, LAM)
    for a, b in zip(as_bool, as_uint8):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", SMALL_TRITON)
def test_backend_masked_nan_does_not_leak_and_results_are_deterministic(backend):
    case = Case("batch_major", seed=5)
    rewards = case.rewards.clone()
    rewards[~case.mask] = float("nan")
    kw = {"gamma": GAMMA, "lam": LAM, "mask": case.mask, "terminated": case.terminated, "time_dim": -1,
          "backend": "triton"}
    adv, ret = rlkernels.gae(rewards, case.values, **kw)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    adv2, ret2 = rlkernels.gae(rewards, case.values, **kw)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)
    want = rlkernels.gae(rewards, case.values, **{**kw, "backend": "cpu"})
    assert_close(adv, want[0], rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name="advantages")


@pytest.mark.parametrize("backend", SMALL_TRITON)
def test_backend_empty_inputs(backend):
    empty = torch.empty(0, 3, dtype=torch.float64)
    adv, ret = rlkernels.gae(empty, empty, backend=backend)
    assert adv.shape == (0, 3) and ret.shape == (0, 3) and adv.dtype == torch.float64
    packed = torch.empty(0, dtype=torch.bfloat16)
    cu = torch.zeros(3, dtype=torch.int64)  # two empty segments
    out = rlkernels.discounted_returns(packed, cu_seqlens=cu, bootstrap_value=torch.ones(2), backend=backend)
    assert out.shape == (0,) and out.dtype == torch.float32
    boot = torch.ones(2, dtype=torch.float64, requires_grad=True)
    vs, pg = rlkernels.vtrace(packed.double(), packed.double(), packed.double(), cu_seqlens=cu,
                              bootstrap_value=boot, backend=backend)
    (grad,) = torch.autograd.grad(vs.sum() + pg.sum() + boot.sum(), [boot])
    assert torch.equal(grad, torch.ones(2, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------


def grads(op, backend, case, combo, floats, log_rhos_grad=True):
    if not log_rhos_grad:
        floats = {**floats, "log_rhos": floats["log_rhos"].detach()}
    outs = run(op, backend, case, combo, floats)
    loss = sum((o * w).sum() for o, w in zip(outs, case.weights + case.weights))
    inputs = [x for x in leaves(op, combo, floats) if x.requires_grad]
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("backend", SMALL_TRITON)
@pytest.mark.parametrize("layout", ["time_major", "batch_major", "packed"])
@pytest.mark.parametrize("op", ESTIMATORS)
def test_backend_gradients_match_cpu(op, layout, regime, backend):
    case = Case(layout, seed=13)
    floats = case.floats(torch.float64, requires_grad=True)
    for combo in ((), BOOTSTRAPPED, ALL_FLAGS, ("next_values",)):
        got = grads(op, backend, case, combo, floats)
        want = grads(op, "cpu", case, combo, floats)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name=f"{op} gradient {i} with {combo}")


@pytest.mark.parametrize("backend", SMALL_TRITON)
def test_backend_vtrace_gradients_without_log_rho_gradient(regime, backend):
    # log_rhos not requiring grad: no carries are saved, and the other gradients must not need them.
    case = Case("middle", seed=17)
    floats = case.floats(torch.float64, requires_grad=True)
    for combo in (BOOTSTRAPPED, ALL_FLAGS):
        got = grads("vtrace", backend, case, combo, floats, log_rhos_grad=False)
        want = grads("vtrace", "cpu", case, combo, floats, log_rhos_grad=False)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name=f"vtrace gradient {i} with {combo}")


@pytest.mark.parametrize("backend", SMALL_TRITON)
@pytest.mark.parametrize("layout", ["time_major", "batch_major", "middle"])
def test_backend_linear_scan_gradients_match_cpu(layout, regime, backend):
    case = Case(layout, seed=19)
    f = case.floats(torch.float64, requires_grad=True)
    for reverse, with_initial in itertools.product((True, False), (True, False)):
        res = {}
        for b in (backend, "cpu"):
            initial = f["initial"] if with_initial else None
            x = rlkernels.linear_scan(f["a"], f["rewards"], reverse=reverse, initial=initial,
                                      time_dim=case.time_dim, backend=b)
            inputs = [f["a"], f["rewards"]] + ([initial] if with_initial else [])
            res[b] = torch.autograd.grad((x * case.weights[0]).sum(), inputs)
        for i, (g, w) in enumerate(zip(res[backend], res["cpu"])):
            assert_close(g, w, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name=f"linear_scan gradient {i} reverse={reverse} initial={with_initial}")


@pytest.mark.parametrize("backend", SMALL_TRITON)
def test_triton_backward_ops_match_cpu_with_missing_gradients(backend):
    # Autograd hands over zeros for unused outputs, but the schemas take None for them, as the C++ ones do.
    case = Case("packed", seed=23)
    r = case.rewards
    flags = (case.terminated, case.truncated, case.mask, case.cu_seqlens)
    g = case.weights[0]
    for has_next in (False, True):
        got = torch.ops.rlkernels.triton_gae_backward(None, g, *flags, r, GAMMA, LAM, has_next)
        want = torch.ops.rlkernels.gae_backward(None, g, *flags, r, GAMMA, LAM, has_next)
        for a, b in zip(got, want):
            assert_close(a, b, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name=f"gae_backward has_next={has_next}")
        got = torch.ops.rlkernels.triton_discounted_returns_backward(None, *flags, r, GAMMA, has_next)
        want = torch.ops.rlkernels.discounted_returns_backward(None, *flags, r, GAMMA, has_next)
        for a, b in zip(got, want):
            assert_close(a, b, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name=f"discounted_returns_backward has_next={has_next}")
    nv = case.next_values
    args = (g, None, r, case.values, case.log_rhos, nv, None, None, *flags, GAMMA, LAM,
            *VTRACE_CLIPS.values())
    got = torch.ops.rlkernels.triton_vtrace_backward(*args)
    want = torch.ops.rlkernels.vtrace_backward(*args)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name="vtrace_backward")


@pytest.mark.parametrize("backend", SMALL_TRITON)
@pytest.mark.parametrize("op, chunked", [(op, False) for op in ESTIMATORS] + [("gae", True)])
def test_backend_gradcheck(op, chunked, monkeypatch, backend):
    if chunked:
        force_chunks_of_3(monkeypatch)
    case = Case("time_major", seed=29, steps=6, batch=2)
    floats = case.floats(torch.float64, requires_grad=True)
    combo = ("terminated", "mask", "bootstrap_value")
    names = leaf_names(op, combo)

    def fn(*xs):
        return run(op, backend, case, combo, dict(zip(names, xs)))

    inputs = [floats[n] for n in names]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


# ----------------------------------------------------------------------------------------------------
# The ops themselves
# ----------------------------------------------------------------------------------------------------


def _opcheck_samples():
    case = Case("middle", seed=31, steps=5)
    canon = (2, 5, 3)
    c = {n: getattr(case, n).reshape(canon) for n in ("rewards", "values", "next_values", "log_rhos", "a",
                                                        "terminated", "truncated", "mask")}
    boot = case.bootstrap_value.requires_grad_()
    r, v, lr, nv = (c[n].clone().requires_grad_() for n in ("rewards", "values", "log_rhos", "next_values"))
    term, trunc, mask = c["terminated"], c["truncated"], c["mask"]
    vs_saved = _tr().vtrace(c["rewards"], c["values"], c["log_rhos"], None, boot.detach(), term,
                                     None, mask, None, GAMMA, LAM, 1.0, 1.0, 1.0, True)
    g = case.weights[0].reshape(canon)
    ops = torch.ops.rlkernels
    return {
        "linear_scan": (ops.triton_linear_scan,
                        (c["a"].requires_grad_(), r, case.initial.reshape(2, 3), True)),
        "discounted_returns": (ops.triton_discounted_returns, (r, nv, None, term, trunc, mask, None, GAMMA)),
        "discounted_returns_backward": (ops.triton_discounted_returns_backward,
                                        (g, term, trunc, mask, None, c["rewards"], GAMMA, False)),
        "gae": (ops.triton_gae, (r, v, None, boot, term, None, mask, None, GAMMA, LAM)),
        "gae_backward": (ops.triton_gae_backward,
                         (g, g, term, trunc, mask, None, c["rewards"], GAMMA, LAM, True)),
        "vtrace": (ops.triton_vtrace,
                   (r, v, lr, nv, None, term, trunc, mask, None, GAMMA, LAM, 1.2, 0.9, 1.1, True)),
        "vtrace_backward": (ops.triton_vtrace_backward,
                            (g, g, c["rewards"], c["values"], c["log_rhos"], None, vs_saved[2], vs_saved[3],
                             term, None, mask, None, GAMMA, LAM, 1.0, 1.0, 1.0)),
    }


@pytest.mark.parametrize("backend", SMALL_TRITON)
@pytest.mark.parametrize("name", ["linear_scan", "discounted_returns",
                                  "discounted_returns_backward", "gae", "gae_backward", "vtrace",
                                  "vtrace_backward"])
def test_triton_opcheck(name, backend):
    # Schema, autograd registration, fake (meta) kernel and AOTDispatch (static and dynamic shapes). Under the
    # interpreter AOTDispatch keeps the ops whole, as the interpreted kernels cannot be recorded in a graph
    # (see keep_whole_under_interpreter); on a GPU it decomposes them into their kernel launches.
    op, args = _opcheck_samples()[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", SMALL_TRITON)
def test_backend_torch_compile_fullgraph(backend):
    case = Case("time_major", seed=37, steps=6, batch=2)
    r = case.rewards.clone().requires_grad_()

    def f(r, v):
        adv, ret = rlkernels.gae(r, v, gamma=GAMMA, lam=LAM, terminated=case.terminated, backend=backend)
        return adv, ret

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(r, case.values)
    want = f(r, case.values)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name="compiled gae")
    (g_got,) = torch.autograd.grad(got[0].sum(), [r])
    (g_want,) = torch.autograd.grad(want[0].sum(), [r])
    assert_close(g_got, g_want, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name="compiled gae gradient")


# ----------------------------------------------------------------------------------------------------
# The GPU compiler
# ----------------------------------------------------------------------------------------------------

# Compiles kernel variants for sm_90 with the real Triton compiler, in a process without TRITON_INTERPRET:
# the interpreter runs Python, so it accepts code the compiler rejects (an early return in a constexpr branch
# once passed here and failed there). No GPU is needed to make a cubin.
_COMPILE_SCRIPT = r"""
import sys
import torch  # noqa: F401  (loads libc10 before rlkernels._C)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rlkernels.triton import returns as tr
from rlkernels.triton._common import interpreting

assert not interpreting()
PTRS = [n for n in tr._scan_kernel.arg_names if n.endswith("_ptr")]
INTS = ["num_lanes", "num_seqs", "num_chunks", "steps", "inner", "chunk"]
FLOATS = ["gamma", "lam", "rho_clip", "c_clip", "pg_rho_clip"]


def build(kernel, types, consts):
    names = kernel.arg_names
    signature = {n: types.get(n, "constexpr") for n in names}
    constexprs = {(names.index(n),): consts.get(n) for n in names if signature[n] == "constexpr"}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def scan(step, d, acc, ptrs, **consts):
    types = {n: "i32" for n in INTS} | {n: "fp64" for n in FLOATS} | ptrs | {"OUT0_ptr": "*" + acc}
    consts = {"STEP": step, "D": d, "REVERSE": True, "HAS_NEXT": False, "MAP_ONLY": False,
              "FINAL_J": -1, "BLOCK": 128, "UNROLL": 4} | consts
    return build(tr._scan_kernel, types, consts)


u8 = "*u8"
flags = {"TERM_ptr": u8, "TRUNC_ptr": u8, "MASK_ptr": u8}
# gae forward, bf16 inputs, pass 1 of packed input; and pass 3 with next values.
scan(tr._GAE.value, 2, "fp32",
     {"R_ptr": "*bf16", "V_ptr": "*bf16", "CU_ptr": "*i32", "MAP_ptr": "*fp32"} | flags, MAP_ONLY=True)
scan(tr._GAE.value, 2, "fp32",
     {"R_ptr": "*fp16", "V_ptr": "*fp16", "NV_ptr": "*fp16", "CARRY_IN_ptr": "*fp32", "OUT1_ptr": "*fp32"}
     | flags, HAS_NEXT=True)
# vtrace backward in float64 with the saved carries, no carry in, writing the bootstrap gradient.
scan(tr._VTRACE_BACKWARD.value, 2, "fp64",
     {n: "*fp64" for n in ("R_ptr", "V_ptr", "LR_ptr", "G0_ptr", "G1_ptr", "S0_ptr", "S1_ptr", "OUT1_ptr",
                           "OUT2_ptr", "FINAL_ptr")} | flags, FINAL_J=1, REVERSE=False)
# the linear scan forward in time with bf16 coefficients, Retrace's adjoint, and discounted returns with no
# stream but rewards.
scan(tr._LINEAR_SCAN.value, 1, "fp32", {"A_ptr": "*bf16", "B_ptr": "*bf16", "CARRY_IN_ptr": "*fp32"},
     REVERSE=False)
scan(tr._RETRACE_BACKWARD.value, 1, "fp32",
     {"V_ptr": "*fp16", "LR_ptr": "*fp16", "G0_ptr": "*fp32", "S0_ptr": "*fp32", "OUT1_ptr": "*fp32",
      "OUT2_ptr": "*fp32", "OUT3_ptr": "*fp32"} | flags, REVERSE=False)
scan(tr._RETURNS.value, 1, "fp32", {"R_ptr": "*fp32"})
build(tr._compose_kernel,
      {"MAP_ptr": "*fp64", "INIT_ptr": "*fp64", "CARRY_IN_ptr": "*fp64", "num_seqs": "i32",
       "num_chunks": "i32", "num_lanes": "i32"}, {"D": 2, "REVERSE": True, "BLOCK": 16})
print("compiled")
"""


@pytest.mark.parametrize("backend", SMALL_TRITON)
def test_triton_kernels_compile_for_a_gpu(backend):
    import pathlib
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = pathlib.Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode != 0 and "CompilationError" not in proc.stderr:
        # No ptxas, or another Triton version's compile API: nothing to learn about these kernels here.
        pytest.skip(f"the Triton GPU compiler cannot run here: {proc.stderr.strip().splitlines()[-1:]}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


# ----------------------------------------------------------------------------------------------------
# GPU-sized tests: the CUDA kernels of the scan family (csrc/cuda) against the CPU kernels, for every op,
# flag combination, dtype, layout and regime of the CUDA engine, up to float rounding (the two engines add in
# different orders); then bit-identical repeated runs, opcheck, torch.compile, CUDA-graph capture of forward
# plus backward, 64-bit indexing. The cases are sized to reach each regime of plan_of() in
# csrc/cuda/scan_engine.cuh; its constants are quoted where a case depends on them.
# ----------------------------------------------------------------------------------------------------

DEVICE = "cuda"
GPU_OPS = ("linear_scan", "discounted_returns", "discounted_returns_backward", "gae", "gae_backward", "vtrace",
           "vtrace_backward")

def _packed_one_chunk(g):
    # At most kWarpChunk = 2048 steps: one warp walks every segment, resetting at each start; empty segments
    # at the start, in the middle and at the end.
    return [0, 5, 0, 17, 1, 0, 130, 64, 3, 0]


def _packed_global_chunks(g):
    # Few long, uneven segments: global chunks of 2048 steps that straddle segment boundaries.
    lengths = torch.randint(0, 3000, (20,), generator=g).tolist()
    lengths[0] = lengths[7] = lengths[-1] = 0
    return lengths


def _packed_warp_per_seq(g):
    # At least kWarpSeqsMin = 8192 segments averaging at least 32 steps: a warp per segment.
    lengths = torch.randint(24, 61, (8200,), generator=g).tolist()
    for i in range(0, len(lengths), 97):
        lengths[i] = 0
    return lengths


def _packed_tiny_segments(g):
    # Many segments of 0-4 steps: global chunks, many segment starts per thread.
    return torch.randint(0, 5, (10000,), generator=g).tolist()


# name -> (shape, time_dim) of a dense case, or a function of a generator giving packed segment lengths.
CASES = {
    # Time-major [T, B], B > 1: a thread per sequence, walked whole (T < kLaneChunkMinSteps = 1024).
    "time_major": ((37, 301), 0),
    "time_major_3d": ((5, 29, 3), 1),  # [O, T, I] = [5, 29, 3]: outer and inner dims around time
    # Time-major, T >= 1024 and at most 32768 sequences: chunks of kLaneChunk = 256 steps, 3 passes.
    "time_major_chunked": ((3000, 5), 0),
    "time_major_chunked_3d": ((2, 1100, 3), 1),
    # Batch-major [B, T] (time_dim=-1), T <= kShortRow = 64: a thread per row.
    "batch_major_short_rows": ((300, 50), -1),
    # Batch-major, 64 < T <= kWarpChunk = 2048: a warp per row, T not a multiple of the 128-step tile.
    "batch_major_warp_per_row": ((40, 700), -1),
    # Batch-major, T > 2048 and fewer than 8192 rows: global chunks crossing row boundaries.
    "batch_major_global_chunks": ((3, 5000), -1),
    # One 1-D sequence: global chunks.
    "single_sequence": ((9000,), 0),
    "packed_one_chunk": _packed_one_chunk,
    "packed_global_chunks": _packed_global_chunks,
    "packed_warp_per_seq": _packed_warp_per_seq,
    "packed_tiny_segments": _packed_tiny_segments,
}
DENSE_CASES = [name for name, spec in CASES.items() if not callable(spec)]

# Larger cases for the composition pass: more chunks than compose_kernel's 256 threads, so each thread
# composes a run of several chunk maps.
LONG_CASES = {
    "time_major_chunked_long": ((70000, 2), 0),  # 274 chunks per sequence
    "single_sequence_long": ((600_000,), 0),  # 293 global chunks
}

FLAGS = {
    "plain": (),
    "terminated": ("terminated",),
    "bootstrap": ("bootstrap_value",),
    "terminated_bootstrap_mask": ("terminated", "bootstrap_value", "mask"),
    "next_values": ("next_values",),
    "next_values_truncated": ("next_values", "truncated"),
    "mask_bootstrap": ("mask", "bootstrap_value"),
    "everything": ("next_values", "truncated", "terminated", "mask", "bootstrap_value"),
}
GRAD_FLAGS = ("plain", "terminated_bootstrap_mask", "next_values_truncated", "everything")

GPU_ESTIMATORS = ("discounted_returns", "gae", "vtrace")
DIFFERENTIABLE = {
    "discounted_returns": ("rewards", "next_values", "bootstrap_value"),
    "gae": ("rewards", "values", "next_values", "bootstrap_value"),
    "vtrace": ("rewards", "values", "log_rhos", "next_values", "bootstrap_value"),
}

# Both backends read the same inputs and accumulate in float32 (float64 for float64), so outputs differ only
# by the order of float32 additions; gradients cast back to a 16-bit input dtype may differ by one ulp.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# assert_close's arguments for a CUDA output against the CPU one: the same dtype, rtol = TOL and atol = TOL times
# the largest finite |expected| (at least 1), and no NaN.
MATCH = {
    dtype: {"rtol": tol, "atol": tol, "same_dtype": True, "equal_nan": False} for dtype, tol in TOL.items()
}


def _seed(*key) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate("/".join(map(str, key)))) % 100_003


def gpu_inputs(case, dtype, flags, seed=0, cases=CASES):
    """Inputs of every estimator on CPU, from conftest.make_inputs: rewards, values, log_rhos and the optional
    tensors in `flags` (5% terminated, 3% truncated, 20% masked), with the case's geometry."""
    spec = cases[case]
    if callable(spec):
        geometry = {"shape": None, "cu_seqlens": list(spec(torch.Generator().manual_seed(seed))),
                    "cu_dtype": torch.int32}
    else:
        geometry = {"shape": spec[0], "time_dim": spec[1]}
    sample = make_inputs(
        "vtrace", dtype=dtype, seed=seed, next_values="next_values" in flags,
        terminated=0.05 if "terminated" in flags else 0.0, truncated=0.03 if "truncated" in flags else 0.0,
        mask=0.2 if "mask" in flags else 0.0, bootstrap="tensor" if "bootstrap_value" in flags else "none",
        **geometry,
    )
    x = {name: sample.tensors.get(name) for name in ("rewards", "values", "log_rhos", "next_values",
                                                      "bootstrap_value", "terminated", "truncated", "mask")}
    x["cu_seqlens"] = sample.scalars.get("cu_seqlens")
    x["time_dim"] = sample.scalars.get("time_dim", 0)
    return x


def resample(x, seed):
    """New values and flags of the same shapes as x; the same segments (cu_seqlens) and layout."""
    g = torch.Generator(device=x["rewards"].device).manual_seed(seed)
    out = dict(x)
    for key, value in x.items():
        if key == "cu_seqlens" or not isinstance(value, torch.Tensor):
            continue
        if value.dtype == torch.bool:
            rate = value.float().mean().clamp(0.02, 0.98)
            out[key] = torch.rand(value.shape, generator=g, device=value.device) < rate
        else:
            out[key] = torch.randn(value.shape, generator=g, device=value.device).to(value.dtype)
    return out


def to_cuda(inputs):
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def call(op, x, backend):
    """The public function `op` on inputs `x`; always a tuple of outputs."""
    common = {"gamma": 0.99, "terminated": x["terminated"], "truncated": x["truncated"],
              "next_values": x["next_values"], "bootstrap_value": x["bootstrap_value"], "mask": x["mask"],
              "cu_seqlens": x["cu_seqlens"], "time_dim": x["time_dim"], "backend": backend}
    if op == "discounted_returns":
        return (rlkernels.discounted_returns(x["rewards"], **common),)
    if op == "gae":
        return tuple(rlkernels.gae(x["rewards"], x["values"], lam=0.95, **common))
    if op == "vtrace":
        return tuple(rlkernels.vtrace(x["rewards"], x["values"], x["log_rhos"], lam=0.9, rho_clip=1.0, c_clip=0.9,
                                      pg_rho_clip=1.2, **common))
    raise KeyError(op)


def gpu_leaves(x, names):
    """Copies of x with the float tensors named in `names` (that are present) as leaves requiring grad."""
    out = dict(x)
    for name in names:
        if out.get(name) is not None:
            out[name] = out[name].detach().clone().requires_grad_(True)
    return out


def gradients(op, x, backend, seed=0):
    """Outputs and the gradients of sum_k <out_k, w_k> (random w) with respect to each differentiable input."""
    x = gpu_leaves(x, DIFFERENTIABLE[op])
    outs = call(op, x, backend)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    names = [n for n in DIFFERENTIABLE[op] if x.get(n) is not None]
    grads = torch.autograd.grad(loss, [x[n] for n in names])
    return outs, dict(zip(names, grads))


# ----------------------------------------------------------------------------------------------------
# Forward and gradients against the CPU backend
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends("discounted_returns", "gae", "vtrace", include=("cuda",)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("op", GPU_ESTIMATORS)
def test_gpu_forward_matches_cpu(op, case, flags, dtype, backend):
    x = gpu_inputs(case, dtype, FLAGS[flags], seed=_seed(op, case, flags))
    expected = call(op, x, "cpu")
    actual = call(op, to_cuda(x), "cuda")
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(a, e, **MATCH[e.dtype], device=DEVICE)


@pytest.mark.parametrize("backend", backends("discounted_returns", "gae", "vtrace", "discounted_returns_backward", "gae_backward", "vtrace_backward", include=("cuda",)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("flags", GRAD_FLAGS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("op", GPU_ESTIMATORS)
def test_gpu_gradients_match_cpu(op, case, flags, dtype, backend):
    x = gpu_inputs(case, dtype, FLAGS[flags], seed=_seed("grad", op, case, flags))
    _, expected = gradients(op, x, "cpu")
    _, actual = gradients(op, to_cuda(x), "cuda")
    assert expected.keys() == actual.keys() and "rewards" in actual
    for name in expected:
        assert_close(actual[name], expected[name], **MATCH[expected[name].dtype], device=DEVICE)


@pytest.mark.parametrize("backend", backends("discounted_returns", "gae", "vtrace", "discounted_returns_backward", "gae_backward", "vtrace_backward", include=("cuda",)))
@pytest.mark.parametrize("flags", ("plain", "everything"))
@pytest.mark.parametrize("case", LONG_CASES)
@pytest.mark.parametrize("op", GPU_ESTIMATORS)
def test_long_sequences_match_cpu(op, case, flags, backend):
    x = gpu_inputs(case, torch.float32, FLAGS[flags], seed=_seed("long", op, case, flags), cases=LONG_CASES)
    outs_cpu, grads_cpu = gradients(op, x, "cpu")
    outs_cuda, grads_cuda = gradients(op, to_cuda(x), "cuda")
    for a, e in zip(outs_cuda, outs_cpu):
        assert_close(a, e, **MATCH[e.dtype], device=DEVICE)
    for name in grads_cpu:
        assert_close(grads_cuda[name], grads_cpu[name], **MATCH[grads_cpu[name].dtype], device=DEVICE)


@pytest.mark.parametrize("backend", backends("linear_scan", include=("cuda",)))
@pytest.mark.parametrize("with_initial", (False, True))
@pytest.mark.parametrize("reverse", (True, False))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DENSE_CASES + list(LONG_CASES))
def test_gpu_linear_scan_matches_cpu(case, dtype, reverse, with_initial, backend):
    cases = {**CASES, **LONG_CASES}
    x = gpu_inputs(case, dtype, ("bootstrap_value",), seed=_seed("linear", case), cases=cases)
    g = torch.Generator().manual_seed(_seed("a", case))
    # |a| < 1 keeps long scans bounded, so the tolerance is meaningful everywhere.
    a = (0.98 * torch.rand(x["rewards"].shape, generator=g)).to(dtype)
    b, initial, time_dim = x["rewards"], x["bootstrap_value"] if with_initial else None, cases[case][1]

    def run(device, backend):
        leaves_ = [t.detach().to(device).requires_grad_(True) if t is not None else None for t in (a, b, initial)]
        out = rlkernels.linear_scan(leaves_[0], leaves_[1], reverse=reverse, initial=leaves_[2], time_dim=time_dim,
                                    backend=backend)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype).to(device)
        wrt = [t for t in leaves_ if t is not None]
        return out, torch.autograd.grad((out * w).sum(), wrt)

    out_cpu, grads_cpu = run("cpu", "cpu")
    out_cuda, grads_cuda = run(DEVICE, "cuda")
    assert_close(out_cuda, out_cpu, **MATCH[out_cpu.dtype], device=DEVICE)
    for a_, e_ in zip(grads_cuda, grads_cpu):
        assert_close(a_, e_, **MATCH[e_.dtype], device=DEVICE)


# ----------------------------------------------------------------------------------------------------
# The ops themselves, on canonical arguments: backward ops with absent upstream gradients, uint8 flags,
# int64 offsets, saved V-trace carries or not
# ----------------------------------------------------------------------------------------------------


def canonical_inputs(case, dtype, flags, seed):
    """Arguments in the ops' canonical layout: [O, T, I] contiguous or packed 1-D; uint8 flags."""
    x = gpu_inputs(case, dtype, flags, seed)
    if x["cu_seqlens"] is None:
        shape = x["rewards"].shape
        td = x["time_dim"] % len(shape)
        outer = 1
        for d in shape[:td]:
            outer *= d
        canon = (outer, shape[td], x["rewards"].numel() // max(1, outer * shape[td]))
        for name in ("rewards", "values", "log_rhos", "next_values", "terminated", "truncated", "mask"):
            if x[name] is not None:
                x[name] = x[name].reshape(canon).contiguous()
        if x["bootstrap_value"] is not None:
            x["bootstrap_value"] = x["bootstrap_value"].reshape(canon[0], canon[2])
    else:
        x["cu_seqlens"] = x["cu_seqlens"].to(torch.int64)
    for name in ("terminated", "truncated", "mask"):
        if x[name] is not None:
            x[name] = x[name].to(torch.uint8)
    g = torch.Generator().manual_seed(seed + 1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x["grad0"] = torch.randn(x["rewards"].shape, generator=g).to(acc)
    x["grad1"] = torch.randn(x["rewards"].shape, generator=g).to(acc)
    return x


class _TritonOps:
    """torch.ops.rlkernels with the Triton ops under the C++ names (same schemas): op_calls(x, TRITON_OPS)."""

    def __getattr__(self, name):
        return getattr(torch.ops.rlkernels, f"triton_{name}")


TRITON_OPS = _TritonOps()


def op_calls(x, ops=None):
    """Every op of the family on canonical arguments x, with its variants; name -> tuple of outputs. ``ops``:
    the op namespace (default torch.ops.rlkernels, whose kernels follow the tensors' device; TRITON_OPS for
    the Triton kernels)."""
    ops = torch.ops.rlkernels if ops is None else ops
    r, v, lr, nv, boot = x["rewards"], x["values"], x["log_rhos"], x["next_values"], x["bootstrap_value"]
    term, trunc, mask, cu, g0, g1 = x["terminated"], x["truncated"], x["mask"], x["cu_seqlens"], x["grad0"], x["grad1"]
    has_next, gamma, lam = nv is not None, 0.99, 0.95
    vt_args = (gamma, 0.9, 1.0, 0.9, 1.2)
    out = {
        "discounted_returns": (ops.discounted_returns(r, nv, boot, term, trunc, mask, cu, gamma),),
        "discounted_returns_backward": ops.discounted_returns_backward(g0, term, trunc, mask, cu, r, gamma, has_next),
        "discounted_returns_backward_no_grad": ops.discounted_returns_backward(None, term, trunc, mask, cu, r, gamma,
                                                                               has_next),
        "gae": ops.gae(r, v, nv, boot, term, trunc, mask, cu, gamma, lam),
        "gae_backward": ops.gae_backward(g0, g1, term, trunc, mask, cu, r, gamma, lam, has_next),
        "gae_backward_advantages_only": ops.gae_backward(g0, None, term, trunc, mask, cu, r, gamma, lam, has_next),
        "gae_backward_returns_only": ops.gae_backward(None, g1, term, trunc, mask, cu, r, gamma, lam, has_next),
    }
    vt = ops.vtrace(r, v, lr, nv, boot, term, trunc, mask, cu, *vt_args, True)
    out["vtrace"] = vt
    out["vtrace_unsaved"] = ops.vtrace(r, v, lr, nv, boot, term, trunc, mask, cu, *vt_args, False)
    out["vtrace_backward"] = ops.vtrace_backward(g0, g1, r, v, lr, nv, vt[2], vt[3], term, trunc, mask, cu, *vt_args)
    out["vtrace_backward_unsaved"] = ops.vtrace_backward(g0, None, r, v, lr, nv, None, None, term, trunc, mask, cu,
                                                         *vt_args)
    if cu is None:
        a = (0.98 * torch.rand(r.shape, generator=torch.Generator().manual_seed(1))).to(r.dtype).to(r.device)
        out["linear_scan_reverse"] = (ops.linear_scan(a, r, boot, True),)
        out["linear_scan_forward"] = (ops.linear_scan(a, r, boot, False),)
    return out


@pytest.mark.parametrize("backend", gpu_backends(*GPU_OPS))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("flags", ("plain", "terminated_bootstrap_mask", "everything"))
@pytest.mark.parametrize("case", CASES)
def test_ops_match_cpu(case, flags, dtype, backend):
    """The CUDA ops, or the Triton ones on real hardware (CI runs those through the interpreter on CPU tensors
    only), against the CPU ops."""
    ops = None
    if backend == "triton":
        import rlkernels.triton.returns  # noqa: F401  (registers the triton_* ops)

        ops = TRITON_OPS
    x = canonical_inputs(case, dtype, FLAGS[flags], seed=_seed("ops", case, flags))
    expected = op_calls(x)
    actual = op_calls(to_cuda(x), ops)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert len(actual[name]) == len(expected[name]), name
        for a, e in zip(actual[name], expected[name]):
            assert_close(a, e, **MATCH[e.dtype], device=DEVICE)


@pytest.mark.parametrize("backend", backends(*GPU_OPS, include=("cuda",)))
@pytest.mark.parametrize("case", ["time_major", "batch_major_warp_per_row", "packed_global_chunks"])
def test_ops_accept_int32_offsets_and_bool_flags(case, backend):
    x = canonical_inputs(case, torch.float32, FLAGS["everything"], seed=5)
    y = dict(x)
    for name in ("terminated", "truncated", "mask"):
        y[name] = x[name].bool()
    if x["cu_seqlens"] is not None:
        y["cu_seqlens"] = x["cu_seqlens"].to(torch.int32)
    expected, actual = op_calls(x), op_calls(to_cuda(y))
    for name in expected:
        for a, e in zip(actual[name], expected[name]):
            assert_close(a, e, **MATCH[e.dtype], device=DEVICE)


def inject_non_finite(x, seed):
    """Inf rewards, +-Inf values, a NaN log-ratio and an Inf bootstrap value at random places."""
    g = torch.Generator().manual_seed(seed)
    n = x["rewards"].numel()
    if n == 0:
        return x
    x = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    at = torch.randint(0, n, (5,), generator=g).tolist()
    x["rewards"].view(-1)[at[0]] = float("inf")
    x["rewards"].view(-1)[at[1]] = -float("inf")
    x["values"].view(-1)[at[2]] = float("inf")
    x["values"].view(-1)[at[3]] = -float("inf")
    x["log_rhos"].view(-1)[at[4]] = float("nan")
    if x["bootstrap_value"] is not None and x["bootstrap_value"].numel() > 1:
        x["bootstrap_value"].view(-1)[1] = float("inf")
    return x


@pytest.mark.parametrize("backend", backends(*GPU_OPS, include=("cuda",)))
@pytest.mark.parametrize("flags", ("terminated_bootstrap_mask", "next_values_truncated"))
@pytest.mark.parametrize("case", CASES)
def test_non_finite_inputs_propagate_like_cpu(case, flags, backend):
    """Inf and NaN propagate as the sequential formula says, in every regime: where a non-finite carry would
    meet a chunk or tile map (0 * inf = NaN where the walk gives inf), the CUDA engine walks sequentially.
    These cases are short enough that the CPU walks them sequentially too."""
    x = canonical_inputs(case, torch.float32, FLAGS[flags], seed=_seed("inf", case, flags))
    x = inject_non_finite(x, seed=_seed("where", case, flags))
    expected, actual = op_calls(x), op_calls(to_cuda(x))
    for name in expected:
        for a, e in zip(actual[name], expected[name]):
            assert_close(a, e, **{**MATCH[e.dtype], "equal_nan": True})  # NaN where the CPU gives NaN


# ----------------------------------------------------------------------------------------------------
# Empty inputs and argument checks: the CPU ops' behaviour
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends(*GPU_OPS, include=("cuda",)))
@pytest.mark.parametrize("shape_or_lengths", [(0, 3, 4), (2, 0, 3), (2, 3, 0), [], [0, 0, 0]], ids=str)
def test_gpu_empty_inputs_match_cpu(shape_or_lengths, backend):
    if isinstance(shape_or_lengths, list):
        cu = torch.tensor([0, *itertools.accumulate(shape_or_lengths)], dtype=torch.int64)
        shape, boot_shape = (0,), (len(shape_or_lengths),)
    else:
        cu, shape = None, shape_or_lengths
        boot_shape = (shape[0], shape[2])
    x = {"rewards": torch.zeros(shape), "values": torch.zeros(shape), "log_rhos": torch.zeros(shape),
         "next_values": None, "bootstrap_value": torch.zeros(boot_shape), "terminated": None, "truncated": None,
         "mask": torch.zeros(shape, dtype=torch.uint8), "cu_seqlens": cu, "grad0": torch.zeros(shape),
         "grad1": torch.zeros(shape)}
    expected, actual = op_calls(x), op_calls(to_cuda(x))
    for name in expected:
        for a, e in zip(actual[name], expected[name]):
            assert a.shape == e.shape and a.dtype == e.dtype, name
            assert torch.equal(a.cpu(), e), name


def _bad_calls(x):
    """Calls that the CPU ops reject, each with a different bad argument."""
    ops = torch.ops.rlkernels
    r, v, cu = x["rewards"], x["values"], x["cu_seqlens"]
    flat = r.reshape(-1)
    return {
        "values shape": lambda: ops.gae(r, v[:, :-1], None, None, None, None, None, None, 0.99, 0.95),
        "values dtype": lambda: ops.gae(r, v.double(), None, None, None, None, None, None, 0.99, 0.95),
        "float flag": lambda: ops.gae(r, v, None, None, r, None, None, None, 0.99, 0.95),
        "flag shape": lambda: ops.discounted_returns(r, None, None, None, None, (r > 0)[:, 1:], None, 0.99),
        "integer rewards": lambda: ops.discounted_returns(r.long(), None, None, None, None, None, None, 0.99),
        "bootstrap shape": lambda: ops.gae(r, v, None, r[:, 0, :1], None, None, None, None, 0.99, 0.95),
        "not canonical": lambda: ops.gae(r[0], v[0], None, None, None, None, None, None, 0.99, 0.95),
        "float offsets": lambda: ops.discounted_returns(flat, None, None, None, None, None, cu.float(), 0.99),
        "2-D offsets": lambda: ops.discounted_returns(flat, None, None, None, None, None, cu[None], 0.99),
        "3-D with offsets": lambda: ops.discounted_returns(r, None, None, None, None, None, cu, 0.99),
        "initial shape": lambda: ops.linear_scan(v, r, r[:, 0, :1], True),
        "grad shape": lambda: ops.gae_backward(r[:, 1:], None, None, None, None, None, r, 0.99, 0.95, False),
    }


@pytest.mark.parametrize("backend", backends(*GPU_OPS, include=("cuda",)))
def test_bad_arguments_raise_like_cpu(backend):
    g = torch.Generator().manual_seed(0)
    x = {"rewards": torch.randn(2, 5, 3, generator=g), "values": torch.randn(2, 5, 3, generator=g),
         "cu_seqlens": torch.tensor([0, 10, 30])}
    cpu_calls, cuda_calls = _bad_calls(x), _bad_calls(to_cuda(x))
    for name in cpu_calls:
        with pytest.raises(Exception) as cpu_error:
            cpu_calls[name]()
        with pytest.raises(type(cpu_error.value)):
            cuda_calls[name]()


@pytest.mark.parametrize("backend", backends("gae", "discounted_returns", include=("cuda",)))
def test_mixed_devices_are_rejected(backend):
    r = torch.randn(30, device="cuda")
    with pytest.raises(ValueError, match="cu_seqlens"):
        torch.ops.rlkernels.discounted_returns(r, None, None, None, None, None, torch.tensor([0, 10, 30]), 0.99)
    r3 = r.reshape(1, 30, 1)
    with pytest.raises(ValueError, match="values"):
        torch.ops.rlkernels.gae(r3, r3.cpu(), None, None, None, None, None, None, 0.99, 0.95)


# ----------------------------------------------------------------------------------------------------
# Determinism, opcheck, torch.compile, CUDA graphs
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends(*GPU_OPS, include=("cuda",)))
@pytest.mark.parametrize("case", list(CASES) + list(LONG_CASES))
@pytest.mark.parametrize("op", GPU_ESTIMATORS)
def test_gpu_repeated_runs_are_bit_identical(op, case, backend):
    cases = {**CASES, **LONG_CASES}
    x = to_cuda(gpu_inputs(case, torch.float32, FLAGS["everything"], seed=_seed("det", op, case), cases=cases))
    outs1, grads1 = gradients(op, x, "cuda")
    torch.cuda.synchronize()
    outs2, grads2 = gradients(op, x, "cuda")
    for a, b in zip(outs1, outs2):
        assert torch.equal(a, b)
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), name


def _gpu_opcheck_samples(case, requires_grad):
    x = to_cuda(canonical_inputs(case, torch.float32, FLAGS["everything"], seed=11))
    r, v, lr, nv, boot = x["rewards"], x["values"], x["log_rhos"], x["next_values"], x["bootstrap_value"]
    term, trunc, mask, cu, g0, g1 = x["terminated"], x["truncated"], x["mask"], x["cu_seqlens"], x["grad0"], x["grad1"]
    if requires_grad:
        r, v, lr, nv = (t.detach().clone().requires_grad_(True) for t in (r, v, lr, nv))
    vt = (0.99, 0.9, 1.0, 0.9, 1.2)
    saved = torch.ops.rlkernels.vtrace(r.detach(), v.detach(), lr.detach(), nv.detach(), boot, term, trunc, mask, cu,
                                       *vt, True)
    samples = {
        "discounted_returns": (r, nv, boot, term, trunc, mask, cu, 0.99),
        "discounted_returns_backward": (g0, term, trunc, mask, cu, r.detach(), 0.99, True),
        "gae": (r, v, nv, boot, term, trunc, mask, cu, 0.99, 0.95),
        "gae_backward": (g0, g1, term, trunc, mask, cu, r.detach(), 0.99, 0.95, True),
        "vtrace": (r, v, lr, nv, boot, term, trunc, mask, cu, *vt, requires_grad),
        "vtrace_backward": (g0, g1, r.detach(), v.detach(), lr.detach(), nv.detach(), saved[2], saved[3], term, trunc,
                            mask, cu, *vt),
    }
    if cu is None:
        a = torch.rand_like(r.detach()).mul_(0.9).requires_grad_(requires_grad)
        samples["linear_scan"] = (a, r, boot, True)
    return samples


@pytest.mark.parametrize("backend", backends(*GPU_OPS, include=("cuda",)))
@pytest.mark.parametrize("requires_grad", (False, True))
@pytest.mark.parametrize("case", ["time_major", "time_major_chunked", "batch_major_warp_per_row", "packed_one_chunk"])
def test_gpu_opcheck(case, requires_grad, backend):
    for name, args in _gpu_opcheck_samples(case, requires_grad).items():
        torch.library.opcheck(getattr(torch.ops.rlkernels, name).default, args)


@pytest.mark.parametrize("backend", backends("discounted_returns", "gae", "vtrace", "discounted_returns_backward", "gae_backward", "vtrace_backward", include=("cuda",)))
@pytest.mark.parametrize("case", ["time_major_chunked", "batch_major_global_chunks", "packed_global_chunks"])
def test_ops_compile_fullgraph(case, backend):
    """The custom ops (fake kernels plus CUDA kernels) compile with no graph break, forward and backward."""
    torch._dynamo.reset()
    x = to_cuda(canonical_inputs(case, torch.float32, FLAGS["everything"], seed=13))
    r, v, lr, nv, boot = (x[k].detach().clone().requires_grad_(True)
                          for k in ("rewards", "values", "log_rhos", "next_values", "bootstrap_value"))
    term, trunc, mask, cu = x["terminated"], x["truncated"], x["mask"], x["cu_seqlens"]

    def f(r, v, lr, nv, boot):
        ops = torch.ops.rlkernels
        dr = ops.discounted_returns(r, nv, boot, term, trunc, mask, cu, 0.99)
        adv, ret = ops.gae(r, v, nv, boot, term, trunc, mask, cu, 0.99, 0.95)
        vs, pg, _, _ = ops.vtrace(r, v, lr, nv, boot, term, trunc, mask, cu, 0.99, 0.9, 1.0, 0.9, 1.2, True)
        return (dr * 1.5 + adv * 0.5 - ret + vs * 0.25 + pg).sum()

    eager = torch.autograd.grad(f(r, v, lr, nv, boot), (r, v, lr, nv))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(r, v, lr, nv, boot), (r, v, lr, nv))
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends("discounted_returns", "gae", "vtrace", "discounted_returns_backward", "gae_backward", "vtrace_backward", include=("cuda",)))
@pytest.mark.parametrize("case", ["time_major", "batch_major_warp_per_row", "packed_global_chunks"])
@pytest.mark.parametrize("op", GPU_ESTIMATORS)
def test_public_functions_compile_fullgraph(op, case, backend):
    """docs/design.md §2: torch.compile(fullgraph=True) of every public function, backend="cuda"."""
    torch._dynamo.reset()
    x = to_cuda(gpu_inputs(case, torch.float32, FLAGS["everything"], seed=_seed("compile", op, case)))
    _, eager = gradients(op, x, "cuda")
    compiled_call = torch.compile(lambda y: call(op, y, "cuda"), fullgraph=True)
    y = gpu_leaves(x, DIFFERENTIABLE[op])
    outs = compiled_call(y)
    w = torch.Generator().manual_seed(0)
    weights = [torch.randn(o.shape, generator=w, dtype=o.dtype).to(o.device) for o in outs]
    names = [n for n in DIFFERENTIABLE[op] if y.get(n) is not None]
    grads = torch.autograd.grad(sum((o * wt).sum() for o, wt in zip(outs, weights)), [y[n] for n in names])
    for name, grad in zip(names, grads):
        torch.testing.assert_close(grad, eager[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends("discounted_returns", "gae", "vtrace", "discounted_returns_backward", "gae_backward", "vtrace_backward", include=("cuda",)))
@pytest.mark.parametrize("case", ["time_major_chunked", "batch_major_warp_per_row", "single_sequence",
                                  "packed_global_chunks"])
@pytest.mark.parametrize("op", GPU_ESTIMATORS)
def test_cuda_graph_captures_forward_and_backward(op, case, backend):
    """Forward plus backward replay from a CUDA graph: no host synchronization inside, and replays with new
    inputs give the eager results bit for bit (the same kernels run)."""
    first = to_cuda(gpu_inputs(case, torch.float32, FLAGS["everything"], seed=_seed("graph", op, case)))
    second = resample(first, seed=_seed("graph2", op, case))
    static = gpu_leaves(first, DIFFERENTIABLE[op])
    names = [n for n in DIFFERENTIABLE[op] if static.get(n) is not None]
    weights = [torch.randn_like(first["rewards"], dtype=torch.float32) for _ in range(2)]

    def step(x):
        outs = call(op, x, "cuda")
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        return outs, torch.autograd.grad(loss, [x[n] for n in names])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outs, static_grads = step(static)

    with torch.no_grad():
        for key, value in second.items():
            if isinstance(value, torch.Tensor) and key != "cu_seqlens":
                static[key].copy_(value)
    graph.replay()
    torch.cuda.synchronize()
    expected_outs, expected_grads = step(gpu_leaves(second, DIFFERENTIABLE[op]))
    for a, e in zip(static_outs, expected_outs):
        assert torch.equal(a, e)
    for a, e in zip(static_grads, expected_grads):
        assert torch.equal(a, e)


# ----------------------------------------------------------------------------------------------------
# 64-bit indexing
# ----------------------------------------------------------------------------------------------------


def _free_gib():
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


@pytest.mark.slow
@pytest.mark.parametrize("backend", backends("linear_scan", include=("cuda",)))
@pytest.mark.parametrize("layout", ["time_major", "single_sequence"])
def test_more_than_2_to_31_elements(layout, backend):
    """x_t = 1 + x_{t+1} / 2 over tensors of more than 2^31 elements: the exact values 2 - 2^-(k) near each
    sequence's end (k = steps to the end) catch any 32-bit index wrap."""
    n = 2**31 + 4099
    if _free_gib() < 2 * n * 2 / 2**30 + n * 4 / 2**30 + 4:
        pytest.skip("not enough GPU memory")
    if layout == "time_major":
        steps = 3
        inner = -(-n // steps)
        shape, time_dim = (steps, inner), 0
    else:
        shape, time_dim = (n,), 0
    a = torch.full(shape, 0.5, dtype=torch.bfloat16, device="cuda")
    b = torch.ones(shape, dtype=torch.bfloat16, device="cuda")
    x = rlkernels.linear_scan(a, b, time_dim=time_dim, backend="cuda")
    del a, b
    assert x.dtype == torch.float32 and x.shape == shape
    if layout == "time_major":
        expected = torch.tensor([1.75, 1.5, 1.0], device="cuda")[:, None]
        for cols in (slice(0, 1000), slice(inner - 1000, inner), slice(2**30, 2**30 + 1000)):
            assert torch.equal(x[:, cols], expected.expand(3, 1000))
    else:
        k = torch.arange(1000, device="cuda", dtype=torch.float64)  # steps to the end
        tail = (2 - torch.pow(2.0, -k)).float().flip(0)
        assert torch.equal(x[n - 1000 :], tail)
        assert torch.equal(x[2**31 - 1000 : 2**31 + 1000], torch.full((2000,), 2.0, device="cuda"))


@pytest.mark.parametrize("backend", backends("discounted_returns", "gae", include=("cuda",)))
@pytest.mark.parametrize("layout", ["1-d", "batch-major"])
def test_non_finite_before_the_last_global_chunk(layout, backend):
    """An Inf in a chunk feeding the *last* chunk in scan order: the composed carry entering that chunk may hold
    0 * inf = NaN (a truncation cuts the dependence), so it must be checked too (found in review: only the
    carries of earlier chunks were). 4096 steps are two global chunks; the reverse scan ends in [0, 2048)."""
    n = 4096
    g = torch.Generator().manual_seed(0)
    r, v, nv = (torch.randn(n, generator=g) for _ in range(3))
    r[3000] = float("inf")
    tr = torch.zeros(n, dtype=torch.bool)
    tr[2500] = True
    shape = (n,) if layout == "1-d" else (2, n)
    td = 0 if layout == "1-d" else -1
    r, v, nv, tr = (x.expand(shape).contiguous() if layout != "1-d" else x for x in (r, v, nv, tr))
    expected = rlkernels.discounted_returns(r, next_values=nv, truncated=tr, time_dim=td, backend="cpu")
    assert torch.isfinite(expected[..., :2501]).all()
    actual = rlkernels.discounted_returns(r.cuda(), next_values=nv.cuda(), truncated=tr.cuda(), time_dim=td,
                                          backend="cuda")
    assert_close(actual, expected, **MATCH[expected.dtype])
    for a, e in zip(rlkernels.gae(r.cuda(), v.cuda(), time_dim=td, backend="cuda"),
                    rlkernels.gae(r, v, time_dim=td, backend="cpu")):
        assert_close(a, e, **MATCH[e.dtype])


# ----------------------------------------------------------------------------------------------------
# Retrace(lambda) (docs/design.md §4.6): rlax's definition, the reference, gradients, layouts
# ----------------------------------------------------------------------------------------------------

from conftest import device_for  # noqa: E402
from hypothesis import settings  # noqa: E402

RETRACE_BACKENDS = backends("retrace", "retrace_backward")


def rlax_general_off_policy_returns_from_q_and_v(q_t, v_t, r_t, discount_t, c_t):
    """rlax.multistep.general_off_policy_returns_from_q_and_v (rlax 0.1.x), transcribed to NumPy: one
    trajectory, K rewards; q_t, c_t at times [1, K - 1], v_t, r_t, discount_t at times [1, K]."""
    g = r_t[-1] + discount_t[-1] * v_t[-1]
    returns = [g]
    for i in range(q_t.shape[0] - 1, -1, -1):
        g = r_t[i] + discount_t[i] * (v_t[i] - c_t[i] * q_t[i] + c_t[i] * g)
        returns.insert(0, g)
    return np.array(returns)


def rlax_retrace_targets(q_t, a_t, r_t, discount_t, pi_t, mu_t, lambda_):
    """The target of rlax.retrace (value_learning.retrace before it subtracts q_tm1[a_tm1]), transcribed:
    c_t = lambda min(1, pi(a_t) / mu(a_t)), then general_off_policy_returns_from_action_values (the expected
    value under pi, the taken action's value, and c without the final step)."""
    pi_a_t = pi_t[np.arange(len(a_t)), a_t]
    c_t = np.minimum(1.0, pi_a_t / mu_t) * lambda_
    exp_q_t = (pi_t * q_t).sum(axis=-1)
    q_a_t = q_t[np.arange(len(a_t)), a_t][:-1]
    return rlax_general_off_policy_returns_from_q_and_v(q_a_t, exp_q_t, r_t, discount_t, c_t[:-1])


def _retrace_trajectories(T, B, A, *, seed, terminal_p=0.1):
    """B trajectories of T transitions with A actions, time-first, as rlax's inputs and ours.

    Transition t goes from x_t to x_{t+1}; q_next[t] = Q(x_{t+1}, .) and pi_next[t] = pi(. | x_{t+1}),
    a_next[t] the behaviour action taken at x_{t+1} with probability mu_next[t]."""
    rng = np.random.default_rng(seed)
    q_next = rng.normal(size=(T, B, A))
    logits = rng.normal(size=(T, B, A))
    pi_next = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    a_next = rng.integers(0, A, size=(T, B))
    mu_next = rng.uniform(0.05, 1.0, size=(T, B))
    rewards = rng.normal(size=(T, B))
    terminated = rng.random((T, B)) < terminal_p
    return q_next, pi_next, a_next, mu_next, rewards, terminated


@pytest.mark.parametrize("backend", [*RETRACE_BACKENDS, pytest.param("reference", id="reference")])
@pytest.mark.parametrize("terminal_p", [0.0, 0.15])
def test_matches_rlax_retrace(backend, terminal_p):
    T, B, A, gamma, lam = 13, 4, 3, 0.97, 0.9
    q_next, pi_next, a_next, mu_next, rewards, terminated = _retrace_trajectories(T, B, A, seed=1, terminal_p=terminal_p)
    expected = np.stack([
        rlax_retrace_targets(q_next[:, b], a_next[:, b], rewards[:, b], gamma * (1.0 - terminated[:, b]),
                             pi_next[:, b], mu_next[:, b], lam) for b in range(B)], axis=1)
    # Our inputs: q_taken[t] = Q(x_t, a_t), next_v[t] = E_pi Q(x_{t+1}, .), log_rhos[t] at (x_t, a_t). rlax's
    # trajectory starts at x_0 whose action value it does not use; q_taken[0] and log_rhos[0] are arbitrary.
    q_a = np.take_along_axis(q_next, a_next[..., None], -1)[..., 0]
    pi_a = np.take_along_axis(pi_next, a_next[..., None], -1)[..., 0]
    q_taken = np.concatenate([np.full((1, B), 7.0), q_a[:-1]])
    log_rhos = np.concatenate([np.full((1, B), 3.0), np.log(pi_a[:-1] / mu_next[:-1])])
    next_v = (pi_next * q_next).sum(-1)
    dev = device_for(backend)
    t = lambda x: torch.tensor(x, dtype=torch.float64, device=dev)  # noqa: E731
    got = rlkernels.retrace(t(rewards), t(q_taken), t(next_v), t(log_rhos), gamma=gamma, lam=lam,
                            terminated=t(terminated).bool(), backend=backend)
    assert_close(got, expected, torch.float64, name="retrace vs rlax")


def _retrace_inputs(shape, dtype, seed, *, terminal_p=0.1, trunc_p=0.0, mask_p=0.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def randn(scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    def bern(p):
        return None if p == 0 else (torch.rand(shape, generator=g, dtype=torch.float64) < p).to(device)

    tensors = {"rewards": randn(), "q_taken": randn(), "next_v": randn(), "log_rhos": randn(0.5)}
    flags = {"terminated": bern(terminal_p), "truncated": bern(trunc_p)}
    mask = bern(mask_p)
    flags["mask"] = None if mask is None else ~mask
    return tensors, {k: v for k, v in flags.items() if v is not None}


def _retrace_call(tensors, flags, backend, **kw):
    return rlkernels.retrace(tensors["rewards"], tensors["q_taken"], tensors["next_v"], tensors["log_rhos"],
                             backend=backend, **flags, **kw)


def _retrace_ref(tensors, flags, **kw):
    return reference.retrace(tensors["rewards"], tensors["q_taken"], tensors["next_v"], tensors["log_rhos"],
                             **flags, **kw)


@pytest.mark.parametrize("backend", RETRACE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 40), B=st.integers(1, 5), seed=st.integers(0, 2**16), terminal_p=st.sampled_from([0, 0.2]),
       trunc_p=st.sampled_from([0, 0.2]), mask_p=st.sampled_from([0, 0.3]), c_clip=st.sampled_from([1.0, 0.5, 2.0]),
       time_dim=st.sampled_from([0, -1]))
def test_retrace_matches_reference(backend, dtype, T, B, seed, terminal_p, trunc_p, mask_p, c_clip, time_dim):
    shape = (T, B) if time_dim == 0 else (B, T)
    tensors, flags = _retrace_inputs(shape, dtype, seed, terminal_p=terminal_p, trunc_p=trunc_p, mask_p=mask_p,
                             device=device_for(backend))
    kw = {"gamma": 0.95, "lam": 0.9, "c_clip": c_clip, "time_dim": time_dim}
    got = _retrace_call(tensors, flags, backend, **kw)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == shape
    assert_close(got, _retrace_ref(tensors, flags, **kw), dtype, name="retrace")


@pytest.mark.parametrize("backend", RETRACE_BACKENDS)
def test_retrace_leading_dims_and_non_contiguous(backend):
    dev = device_for(backend)
    tensors, flags = _retrace_inputs((2, 9, 3), torch.float32, 3, terminal_p=0.2, mask_p=0.2, device=dev)
    tensors = {k: v.transpose(0, 2).contiguous().transpose(0, 2) for k, v in tensors.items()}  # permuted storage
    assert not tensors["rewards"].is_contiguous()
    kw = {"gamma": 0.9, "lam": 0.7, "time_dim": 1}
    assert_close(_retrace_call(tensors, flags, backend, **kw), _retrace_ref(tensors, flags, **kw), torch.float32)


@pytest.mark.parametrize("backend", RETRACE_BACKENDS)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_retrace_packed_sequences(backend, cu_dtype):
    dev = device_for(backend)
    lengths = [3, 1, 0, 7, 2]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=cu_dtype, device=dev)
    tensors, flags = _retrace_inputs((sum(lengths),), torch.float64, 4, terminal_p=0.1, trunc_p=0.1, mask_p=0.2,
                             device=dev)
    kw = {"gamma": 0.9, "lam": 0.8, "cu_seqlens": cu}
    got = _retrace_call(tensors, flags, backend, **kw)
    assert_close(got, _retrace_ref(tensors, flags, **kw), torch.float64)
    # Each segment alone, unpacked, gives the same targets: segments never leak into each other.
    start = 0
    for n in lengths:
        if n:
            part = {k: v[start:start + n] for k, v in tensors.items()}
            pflags = {k: v[start:start + n] for k, v in flags.items()}
            assert_close(got[start:start + n], _retrace_call(part, pflags, backend, gamma=0.9, lam=0.8), torch.float64)
        start += n


@pytest.mark.parametrize("backend", RETRACE_BACKENDS)
def test_retrace_cut_rules(backend):
    """G = r at a terminal step, r + gamma next_v at a truncation and at the end of the data."""
    dev = device_for(backend)
    r = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64, device=dev)
    q = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64, device=dev)
    nv = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=torch.float64, device=dev)
    lr = torch.zeros(4, dtype=torch.float64, device=dev)  # rho = 1, so c = lam
    term = torch.tensor([False, True, False, False], device=dev)
    trunc = torch.tensor([False, False, True, False], device=dev)
    G = rlkernels.retrace(r, q, nv, lr, gamma=0.5, lam=0.5, terminated=term, truncated=trunc, backend=backend)
    g3 = 4.0 + 0.5 * 40.0
    g2 = 3.0 + 0.5 * 30.0
    g1 = 2.0
    g0 = 1.0 + 0.5 * 10.0 + 0.5 * 0.5 * (g1 - (-1.0))
    assert G.tolist() == [g0, g1, g2, g3]


@pytest.mark.parametrize("backend", RETRACE_BACKENDS)
def test_retrace_long_sequences_chunked(backend):
    """Few long sequences take the chunked scan (chunk maps combined across chunks) on every backend."""
    T = 70_000 if backend != "triton" else 1_500
    dev = device_for(backend)
    tensors, flags = _retrace_inputs((T, 2), torch.float64, 5, terminal_p=0.002, trunc_p=0.001, mask_p=0.1, device=dev)
    kw = {"gamma": 0.999, "lam": 0.95, "c_clip": 1.0}
    assert_close(_retrace_call(tensors, flags, backend, **kw), _retrace_ref(tensors, flags, **kw), torch.float64)


@pytest.mark.parametrize("backend", RETRACE_BACKENDS)
@pytest.mark.parametrize("layout", ["time-first", "packed"])
def test_retrace_gradcheck(backend, layout):
    dev = device_for(backend)
    if layout == "packed":
        cu = torch.tensor([0, 3, 4, 9], device=dev)
        tensors, flags = _retrace_inputs((9,), torch.float64, 6, terminal_p=0.2, trunc_p=0.2, mask_p=0.2, device=dev)
        kw = {"cu_seqlens": cu}
    else:
        tensors, flags = _retrace_inputs((6, 3), torch.float64, 7, terminal_p=0.2, trunc_p=0.2, mask_p=0.2, device=dev)
        kw = {}
    # log_rhos away from log(c_clip) = 0, where c's derivative jumps.
    lr = tensors["log_rhos"]
    tensors["log_rhos"] = torch.where(lr.abs() < 0.05, lr + 0.2, lr)
    names = ("rewards", "q_taken", "next_v", "log_rhos")

    def fn(*xs):
        return _retrace_call(dict(zip(names, xs)), flags, backend, gamma=0.9, lam=0.8, **kw)

    inputs = tuple(tensors[n].detach().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(fn, inputs)


def _retrace_autograd_grads(tensors, flags, w, gamma, lam, c_clip):
    """Gradients of sum(G * w) by torch autograd through the recursion written out in float64, time-first."""
    ys = {k: v.detach().double().requires_grad_(True) for k, v in tensors.items()}
    T = ys["rewards"].shape[0]
    term = flags["terminated"].double() if "terminated" in flags else torch.zeros_like(ys["rewards"])
    trunc = flags["truncated"].double() if "truncated" in flags else torch.zeros_like(ys["rewards"])
    c = lam * torch.clamp(ys["log_rhos"].exp(), max=c_clip)
    out, x_next = [], torch.zeros_like(ys["rewards"][0])
    for t in range(T - 1, -1, -1):
        disc = gamma * (1 - term[t])
        g = ys["rewards"][t] + disc * ys["next_v"][t] + disc * (1 - trunc[t]) * x_next
        out.append(g)
        x_next = c[t] * (g - ys["q_taken"][t])
    (torch.stack(out[::-1]) * w.double()).sum().backward()
    return {k: y.grad for k, y in ys.items()}


@pytest.mark.parametrize("backend", RETRACE_BACKENDS)
def test_retrace_gradient_against_autograd_of_the_reference_formula(backend):
    """float32 and bfloat16 gradients against torch autograd through the recursion written out (float64)."""
    dev = device_for(backend)
    for dtype in (torch.float32, torch.bfloat16):
        tensors, flags = _retrace_inputs((7, 2), dtype, 8, terminal_p=0.2, trunc_p=0.2, device=dev)
        xs = {k: v.detach().requires_grad_(True) for k, v in tensors.items()}
        G = _retrace_call(xs, flags, backend, gamma=0.9, lam=0.8, c_clip=1.2)
        w = torch.linspace(-1, 1, G.numel(), device=dev).reshape(G.shape)
        (G * w).sum().backward()
        expected = _retrace_autograd_grads(tensors, flags, w, 0.9, 0.8, 1.2)
        for k, x in xs.items():
            assert x.grad.dtype == dtype
            assert_close(x.grad, expected[k], dtype, name=f"grad {k} ({dtype})")


@pytest.mark.parametrize("backend", RETRACE_BACKENDS)
def test_retrace_gradient_long_sequences_chunked(backend):
    """Few long sequences: the backward takes the chunked scan too (chunk maps of the adjoint combined across
    chunks); gradients against autograd through the recursion."""
    T = 20_000 if backend != "triton" else 1_200
    dev = device_for(backend)
    tensors, flags = _retrace_inputs((T, 2), torch.float64, 12, terminal_p=0.001, trunc_p=0.001, device=dev)
    xs = {k: v.detach().requires_grad_(True) for k, v in tensors.items()}
    G = _retrace_call(xs, flags, backend, gamma=0.999, lam=0.95, c_clip=1.0)
    w = torch.randn(G.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dev)
    (G * w).sum().backward()
    expected = _retrace_autograd_grads(tensors, flags, w, 0.999, 0.95, 1.0)
    for k, x in xs.items():
        assert_close(x.grad, expected[k], torch.float64, name=f"grad {k}")


@pytest.mark.parametrize("backend", RETRACE_BACKENDS)
def test_retrace_nan_propagates_as_the_formula_says(backend):
    dev = device_for(backend)
    tensors, flags = _retrace_inputs((6, 2), torch.float64, 9, terminal_p=0.0, device=dev)
    tensors["q_taken"][3, 0] = float("nan")
    tensors["rewards"][1, 1] = float("inf")
    got = _retrace_call(tensors, flags, backend, gamma=0.9, lam=0.9)
    assert_close(got, _retrace_ref(tensors, flags, gamma=0.9, lam=0.9), torch.float64)
    assert torch.isnan(got[:3, 0]).all() and not torch.isnan(got[3:, 0]).any()


@pytest.mark.parametrize("backend", RETRACE_BACKENDS)
def test_retrace_empty(backend):
    dev = device_for(backend)
    for shape in [(0, 3), (4, 0)]:
        tensors, _ = _retrace_inputs(shape, torch.float32, 0, terminal_p=0, device=dev)
        out = _retrace_call(tensors, {}, backend, gamma=0.9, lam=0.9)
        assert out.shape == shape and out.dtype == torch.float32


def test_retrace_errors_name_the_argument():
    tensors, _ = _retrace_inputs((5, 2), torch.float32, 0)
    r, q, nv, lr = (tensors[k] for k in ("rewards", "q_taken", "next_v", "log_rhos"))
    with pytest.raises(ValueError, match="gamma"):
        rlkernels.retrace(r, q, nv, lr, gamma=1.5, lam=0.9)
    with pytest.raises(ValueError, match="lam"):
        rlkernels.retrace(r, q, nv, lr, gamma=0.9, lam=-0.1)
    with pytest.raises(ValueError, match="c_clip"):
        rlkernels.retrace(r, q, nv, lr, gamma=0.9, lam=0.9, c_clip=0.0)
    with pytest.raises(ValueError, match="q_taken"):
        rlkernels.retrace(r, q[:4], nv, lr, gamma=0.9, lam=0.9)
    with pytest.raises(TypeError, match="log_rhos"):
        rlkernels.retrace(r, q, nv, lr.long(), gamma=0.9, lam=0.9)
    with pytest.raises(TypeError, match="next_v"):
        rlkernels.retrace(r, q, None, lr, gamma=0.9, lam=0.9)
    with pytest.raises(TypeError, match="gamma"):
        rlkernels.retrace(r, q, nv, lr, lam=0.9)  # gamma and lam have no default (docs/design.md §4.6)


@pytest.mark.parametrize("backend", RETRACE_BACKENDS)
def test_retrace_opcheck(backend):
    dev = device_for(backend)
    tensors, flags = _retrace_inputs((5, 3, 2), torch.float32, 10, terminal_p=0.2, trunc_p=0.2, mask_p=0.2, device=dev)
    prefix = "triton_" if backend == "triton" else ""
    op = getattr(torch.ops.rlkernels, prefix + "retrace")
    args = (tensors["rewards"].requires_grad_(True), tensors["q_taken"].requires_grad_(True), tensors["next_v"],
            tensors["log_rhos"].requires_grad_(True), flags["terminated"], flags["truncated"], flags["mask"], None,
            0.9, 0.8, 1.0)
    torch.library.opcheck(op, args)
    G = op(*args).detach()
    bwd = getattr(torch.ops.rlkernels, prefix + "retrace_backward")
    torch.library.opcheck(bwd, (torch.randn_like(G), G, *(a.detach() for a in (args[1], args[3])), *args[4:]))


@pytest.mark.parametrize("backend", RETRACE_BACKENDS)
def test_retrace_compiles_without_graph_breaks(backend):
    dev = device_for(backend)
    tensors, flags = _retrace_inputs((8, 4), torch.float32, 11, terminal_p=0.2, device=dev)

    def fn(r, q, nv, lr, term):
        return rlkernels.retrace(r, q, nv, lr, gamma=0.99, lam=0.95, terminated=term, backend=backend).sum()

    args = (tensors["rewards"], tensors["q_taken"], tensors["next_v"], tensors["log_rhos"], flags["terminated"])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_close(compiled(*args), fn(*args), torch.float32)
