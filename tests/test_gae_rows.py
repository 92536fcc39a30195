"""GAE on float32 sequences contiguous in time (csrc/cpu/gae_rows.h): vectorized along time, each thread one
chunk of a sequence, later chunks' carries added by a fix-up that stops where the carry's weight is 0.

Oracles: `rlkernels.reference` (NumPy, float64) for sizes its loops handle, and the engine's float64 walk
(the rows path is float32 only) for multi-chunk sequences; the float32 engine (RLKERNELS_GAE_ROWS=0) for where
NaN and inf must spread.
"""

import math

import numpy as np
import pytest
import torch
from conftest import assert_close
from hypothesis import given
from hypothesis import strategies as st

import rlkernels
from rlkernels import reference


def _inputs(B, T, seed, p_term, has_next):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g)
    v = torch.randn(B, T, generator=g)
    kw = {"terminated": torch.rand(B, T, generator=g) < p_term}
    if has_next:
        kw["next_values"] = torch.randn(B, T, generator=g)
        kw["truncated"] = torch.rand(B, T, generator=g) < p_term
    else:
        kw["bootstrap_value"] = torch.randn(B, generator=g)
    return r, v, kw


def _layout(x, layout):
    """[B, T] batch-major data as the caller passes it: ("batch_major", time_dim=1), ("time_major" [T, B],
    time_dim=0), or ("1d" [T], B = 1)."""
    if x is None or x.dim() == 1 and layout != "1d":
        return x
    if layout == "time_major":
        return x.t().contiguous() if x.dim() == 2 else x
    if layout == "1d":
        return x.reshape(-1) if x.dim() == 2 else x.reshape(())
    return x


def _call(r, v, kw, layout, gamma, lam):
    time_dim = 1 if layout == "batch_major" else 0
    args = {k: _layout(x, layout) for k, x in kw.items()}
    adv, ret = rlkernels.gae(_layout(r, layout), _layout(v, layout), gamma=gamma, lam=lam, time_dim=time_dim, **args)
    back = (lambda x: x.t()) if layout == "time_major" else (lambda x: x.reshape(r.shape))
    return back(adv), back(ret)


def _engine64(r, v, kw, gamma, lam):
    """The engine's float64 walk: the oracle for sequences too long for the NumPy loops."""
    args = {k: (x.double() if x.is_floating_point() else x) for k, x in kw.items()}
    return rlkernels.gae(r.double(), v.double(), gamma=gamma, lam=lam, time_dim=1, **args)


@pytest.mark.parametrize("B,T,layout", [(1, 1024, "1d"), (1, 1031, "time_major"), (3, 4099, "batch_major"),
                                        (64, 256, "batch_major"), (2, 257, "batch_major"), (1, 8200, "1d")])
@pytest.mark.parametrize("has_next", [False, True])
@pytest.mark.parametrize("p_term", [0.0, 0.02, 0.5])
def test_rows_match_reference(B, T, layout, has_next, p_term):
    r, v, kw = _inputs(B, T, seed=B * T + int(has_next), p_term=p_term, has_next=has_next)
    adv, ret = _call(r, v, kw, layout, 0.99, 0.95)
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
    r, v, kw = _inputs(1, 300_007, seed=7, p_term=p_term, has_next=has_next)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        adv, ret = _call(r, v, kw, "batch_major", gamma, lam)
        torch.set_num_threads(1)
        one = _call(r, v, kw, "batch_major", gamma, lam)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(adv, one[0]) and torch.equal(ret, one[1])
    exp_adv, exp_ret = _engine64(r, v, kw, gamma, lam)
    # float32 sums over up to 300K steps at gamma lam = 1: rounding grows with the length (both paths).
    tol = 2e-5 if gamma * lam < 1 else 2e-4
    torch.testing.assert_close(adv.double(), exp_adv, rtol=0, atol=tol * max(1.0, exp_adv.abs().max().item()))
    torch.testing.assert_close(ret.double(), exp_ret, rtol=0, atol=tol * max(1.0, exp_ret.abs().max().item()))


def test_rows_nan_and_inf_spread_like_the_engine(monkeypatch):
    # A NaN reward in the last chunk and an inf value in an earlier one: through the chunk carries and the
    # fix-ups (which must not stop at a zero weight when the carry is not finite), NaN lands where the
    # step-by-step recurrence puts it (0 * NaN is NaN, so it crosses terminated steps).
    T = 200_003
    r, v, kw = _inputs(1, T, seed=5, p_term=0.01, has_next=False)
    r[0, 180_000] = math.nan
    v[0, 70_000] = math.inf
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        rows = _call(r, v, kw, "batch_major", 0.99, 0.95)
        monkeypatch.setenv("RLKERNELS_GAE_ROWS", "0")
        engine = _call(r, v, kw, "batch_major", 0.99, 0.95)
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
    r, v, kw = _inputs(3, T, seed=T, p_term=0.01, has_next=False)
    adv, ret = _call(r, v, kw, "batch_major", 0.99, 0.95)
    exp_adv, exp_ret = _engine64(r, v, kw, 0.99, 0.95)
    assert_close(adv, exp_adv, torch.float32, name="advantages")
    assert_close(ret, exp_ret, torch.float32, name="returns")


def test_rows_and_engine_agree(monkeypatch):
    r, v, kw = _inputs(4, 5000, seed=3, p_term=0.05, has_next=True)
    rows = _call(r, v, kw, "batch_major", 0.97, 0.9)
    monkeypatch.setenv("RLKERNELS_GAE_ROWS", "0")
    engine = _call(r, v, kw, "batch_major", 0.97, 0.9)
    for a, b in zip(rows, engine):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@given(B=st.integers(1, 3), T=st.integers(256, 2500), has_next=st.booleans(),
       p_term=st.sampled_from([0.0, 0.01, 0.2, 1.0]), gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16), layout=st.sampled_from(["batch_major", "time_major"]))
def test_rows_property(B, T, has_next, p_term, gamma, lam, seed, layout):
    r, v, kw = _inputs(B, T, seed, p_term, has_next)
    adv, ret = _call(r, v, kw, layout, gamma, lam)
    exp_adv, exp_ret = reference.gae(r.double(), v.double(), gamma=gamma, lam=lam, time_dim=1,
                                     **{k: (x.double() if x.is_floating_point() else x) for k, x in kw.items()})
    assert_close(adv, exp_adv, torch.float32, name="advantages")
    assert_close(ret, exp_ret, torch.float32, name="returns")
    assert np.isfinite(adv.numpy()).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_of_long_rows(dtype):
    # The rows path reads float32 only: other dtypes of the same long shapes must not be read as float32 (a
    # past bug read float16 data through it) and still match the reference.
    r, v, kw = _inputs(2, 3000, seed=11, p_term=0.02, has_next=False)
    r, v = r.to(dtype), v.to(dtype)
    kw["bootstrap_value"] = kw["bootstrap_value"].to(dtype)
    adv, ret = _call(r, v, kw, "batch_major", 0.99, 0.95)
    exp_adv, exp_ret = reference.gae(r.double(), v.double(), gamma=0.99, lam=0.95, time_dim=1,
                                     **{k: (x.double() if x.is_floating_point() else x) for k, x in kw.items()})
    assert_close(adv, exp_adv, dtype, name="advantages")
    assert_close(ret, exp_ret, dtype, name="returns")
