"""Tests of the PPO loss family (rlkernels/ppo.py, csrc/cpu/ppo.cpp; docs/design.md §4.4).

Two oracles: `rlkernels.reference` (NumPy, float64) for values and stats, and a plain torch float64
re-implementation of the same formulas (below) whose autograd gives the expected gradients. The kernels
follow torch 2.14's derivative conventions (max/min split ties; a clamp to scalar bounds, as of the policy
ratio, passes no gradient where its input equals a bound, and one to tensor bounds, as of the clipped value,
passes it there), which the oracle spells out (conftest.clamp_open: torch 2.11's scalar clamp passes the
gradient at its bounds), so gradients agree even at the clip boundaries, on either release.
"""

import math
import zlib

import numpy as np
import pytest
import torch
from conftest import TOLERANCES, assert_close, clamp_open
from hypothesis import given
from hypothesis import strategies as st

import rlkernels
from rlkernels import reference
from rlkernels.ppo import AGGS, KL_KINDS, POLICY_STATS

# ----------------------------------------------------------------------------------------------------
# The torch float64 oracle (verl-style code, masked reads avoided so that inf/NaN at masked tokens stay out)
# ----------------------------------------------------------------------------------------------------


def _torch_aggregate(loss, mask, agg, norm_length=None):
    m = torch.ones_like(loss, dtype=torch.bool) if mask is None else mask != 0
    lm = torch.where(m, loss, torch.zeros_like(loss))
    if agg == "token-mean":
        return lm.sum() / m.sum().clamp(min=1)
    lm = lm.reshape(-1, loss.shape[-1])
    m = m.reshape(lm.shape)
    B, T = lm.shape
    rows = lm.sum(-1)
    if agg == "seq-mean-token-sum":
        return rows.sum() / max(B, 1)
    if agg == "seq-mean-token-mean":
        counts = m.sum(-1)
        has = counts > 0
        per = torch.where(has, rows / counts.clamp(min=1), torch.zeros_like(rows))
        return per.sum() / has.sum().clamp(min=1)
    return rows.sum() / max(B * (T if norm_length is None else norm_length), 1)


def torch_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=None, dual_clip=None, agg="token-mean",
                      norm_length=None):
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(clamp_open(logp - old, -20.0, 20.0))
    loss = torch.maximum(-adv * ratio, -adv * clamp_open(ratio, 1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return _torch_aggregate(loss, mask, agg, norm_length)


def torch_value_loss(v, old, ret, mask, clip=None, agg="token-mean"):
    err = (v - ret) ** 2
    if clip is not None:
        err = torch.maximum(err, (torch.clamp(v, old - clip, old + clip) - ret) ** 2)  # tensor bounds: closed
    return _torch_aggregate(0.5 * err, mask, agg)


def torch_kl(logp, ref, kind):
    k1 = logp - ref
    if kind == "k1":
        return k1
    if kind == "abs":
        return k1.abs()
    if kind == "k2":
        return 0.5 * k1**2
    d = clamp_open(ref - logp, -20.0, 20.0)
    return clamp_open(torch.exp(d) - d - 1, -10.0, 10.0)


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


def make_mask(shape, kind, gen, empty_row=True):
    if kind is None:
        return None
    m = torch.rand(shape, generator=gen, dtype=torch.float64) > 0.3
    if empty_row and len(shape) == 2 and shape[0] > 1:
        m[1] = False  # a row with no token
    if kind == "bool":
        return m
    if kind == "uint8":
        return m.to(torch.uint8)
    return m.to(torch.float32)


def policy_inputs(shape=(5, 37), seed=0, dtype=torch.float64, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    old = logp + torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    return logp.to(dtype), old.to(dtype), adv.to(dtype)


def check_policy(logp, old, adv, mask, dtype=torch.float64, grad=True, **kw):
    """Values and stats against the NumPy reference, the gradient against autograd of the torch oracle."""
    lp = logp.detach().clone().requires_grad_(grad)
    loss, stats = rlkernels.ppo_policy_loss(lp, old, adv, mask, **kw)
    exp_loss, exp_stats = reference.ppo_policy_loss(logp, old, adv, mask, **kw)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == () and loss.dtype == out_dtype
    assert_close(loss, exp_loss, dtype, name="loss")
    assert set(stats) == set(POLICY_STATS)
    for name in POLICY_STATS:
        assert stats[name].shape == () and stats[name].dtype == out_dtype
        assert_close(stats[name], exp_stats[name], dtype, name=name)
    if grad:
        loss.backward()
        x = logp.detach().double().clone().requires_grad_(True)
        expected = torch_policy_loss(x, old.double(), adv.double(), mask, **kw)
        assert_close(expected, exp_loss, torch.float64, name="torch oracle loss")
        expected.backward()
        assert_close(lp.grad, x.grad, dtype, name="grad logp")
    return loss, stats


# ----------------------------------------------------------------------------------------------------
# ppo_policy_loss
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", [None, "bool", "uint8", "float"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("clip_high", [None, 0.28])
@pytest.mark.parametrize("agg", AGGS)
def test_policy_every_option(agg, clip_high, dual_clip, mask_kind):
    logp, old, adv = policy_inputs(seed=zlib.crc32(repr((agg, clip_high, dual_clip, mask_kind)).encode()) % 1000)
    mask = make_mask(logp.shape, mask_kind, torch.Generator().manual_seed(1))
    _, stats = check_policy(logp, old, adv, mask, clip_low=0.2, clip_high=clip_high, dual_clip=dual_clip, agg=agg)
    assert 0 < float(stats["clipfrac"]) < 1  # the cases exercise both branches
    if dual_clip is not None:
        # Ratios near e^2 with A < 0: the dual clip binds.
        _, stats = check_policy(logp, old - 2.0, adv, mask, clip_high=clip_high, dual_clip=1.5, agg=agg)
        assert float(stats["clipfrac_lower"]) > 0


def test_policy_norm_length_and_3d_and_1d():
    logp, old, adv = policy_inputs((2, 3, 11))
    mask = make_mask((2, 3, 11), "bool", torch.Generator().manual_seed(2), empty_row=False)
    check_policy(logp, old, adv, mask, agg="seq-mean-token-sum-norm", norm_length=64)
    check_policy(logp, old, adv, mask, agg="seq-mean-token-mean")
    flat = [x.reshape(-1) for x in (logp, old, adv)]
    check_policy(*flat, mask.reshape(-1), agg="token-mean")


def test_policy_noncontiguous_and_long_rows():
    logp, old, adv = policy_inputs((40, 6))
    check_policy(logp.t(), old.t(), adv.t(), None, agg="seq-mean-token-mean")
    # Rows longer than one kernel chunk (4096 tokens) and a 1-D sequence spread over chunks.
    logp, old, adv = policy_inputs((3, 9001), seed=3)
    mask = make_mask(logp.shape, "bool", torch.Generator().manual_seed(3))
    for agg in AGGS:
        check_policy(logp, old, adv, mask, agg=agg, dual_clip=2.0)
    check_policy(logp[0], old[0], adv[0], mask[0])


def test_policy_clip_boundary_and_zero_advantage():
    # clip 0: every ratio of exactly 1 sits on both clip bounds (max ties: half the gradient to the unclipped
    # branch; none through the clamp, whose input is on its bounds).
    logp, old, adv = policy_inputs((4, 9))
    old = torch.where(torch.arange(9) % 2 == 0, logp, old)
    check_policy(logp, old, adv, None, clip_low=0.0, clip_high=0.0)
    check_policy(logp, old, adv, None, clip_low=0.0, clip_high=0.0, dual_clip=2.0)
    loss, stats = check_policy(logp, old, torch.zeros_like(adv), None, dual_clip=2.0)
    assert float(loss.detach()) == 0.0 and float(stats["clipfrac"]) == 0.0 and float(stats["clipfrac_lower"]) == 0.0


def test_policy_huge_log_ratios_are_clamped():
    logp, old, adv = policy_inputs((3, 8))
    old = old.clone()
    old[0] = logp[0] - 1e4  # ratio would overflow: clamped to e^20
    old[1] = logp[1] + 50.0  # ratio would underflow toward 0: clamped to e^-20
    loss, stats = check_policy(logp, old, adv, None)
    assert torch.isfinite(loss) and math.isclose(float(stats["ratio_max"]), math.exp(20.0), rel_tol=1e-12)
    check_policy(logp, old, adv, None, dual_clip=3.0, agg="seq-mean-token-mean")


@pytest.mark.parametrize("agg", AGGS)
def test_policy_all_masked_and_empty(agg):
    logp, old, adv = policy_inputs((3, 5))
    adv[0, 0] = float("inf")  # masked values are never read
    mask = torch.zeros(3, 5, dtype=torch.bool)
    lp = logp.clone().requires_grad_(True)
    loss, stats = rlkernels.ppo_policy_loss(lp, old, adv, mask, agg=agg, dual_clip=2.0)
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in stats.values())
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros_like(logp))
    for shape in ((0, 5), (4, 0)):
        e = torch.empty(shape, dtype=torch.float64, requires_grad=True)
        loss, stats = rlkernels.ppo_policy_loss(e, e.detach(), e.detach(), agg=agg)
        assert float(loss) == 0.0 and all(float(v) == 0.0 for v in stats.values())
        loss.backward()
        assert e.grad.shape == shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_policy_dtypes(dtype):
    logp, old, adv = policy_inputs((6, 50), dtype=dtype)
    mask = make_mask(logp.shape, "bool", torch.Generator().manual_seed(4))
    rtol, _ = TOLERANCES[dtype]
    for agg in AGGS:
        lp = logp.clone().requires_grad_(True)
        loss, stats = rlkernels.ppo_policy_loss(lp, old, adv, mask, agg=agg, dual_clip=3.0)
        exp_loss, exp_stats = reference.ppo_policy_loss(logp, old, adv, mask, agg=agg, dual_clip=3.0)
        assert loss.dtype == torch.float32
        assert_close(loss, exp_loss, dtype, name="loss")
        for name in ("approx_kl", "ratio_mean", "ratio_max"):
            assert_close(stats[name], exp_stats[name], dtype, name=name)
        loss.backward()
        assert lp.grad.dtype == dtype
        x = logp.double().requires_grad_(True)
        torch_policy_loss(x, old.double(), adv.double(), mask, dual_clip=3.0, agg=agg).backward()
        assert_close(lp.grad, x.grad, dtype, name="grad", atol=rtol)


@given(
    B=st.integers(1, 6),
    T=st.sampled_from([1, 2, 7, 97, 1025]),
    agg=st.sampled_from(AGGS),
    clip_low=st.floats(0.0, 0.5),
    clip_high=st.one_of(st.none(), st.floats(0.0, 0.5)),
    dual_clip=st.one_of(st.none(), st.floats(1.1, 5.0)),
    scale=st.sampled_from([0.01, 0.3, 3.0]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_policy_property(B, T, agg, clip_low, clip_high, dual_clip, scale, masked, seed):
    logp, old, adv = policy_inputs((B, T), seed=seed, scale=scale)
    mask = make_mask((B, T), "bool" if masked else None, torch.Generator().manual_seed(seed))
    check_policy(logp, old, adv, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg)


def test_policy_deterministic_across_threads():
    logp, old, adv = policy_inputs((64, 3000), dtype=torch.float32, seed=7)
    mask = make_mask(logp.shape, "bool", torch.Generator().manual_seed(7))
    threads = torch.get_num_threads()

    def run():
        lp = logp.clone().requires_grad_(True)
        loss, stats = rlkernels.ppo_policy_loss(lp, old, adv, mask, agg="seq-mean-token-mean", dual_clip=3.0)
        loss.backward()
        return [loss, *stats.values(), lp.grad]

    first = run()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, single):
        assert torch.equal(a, b)
    for a, b in zip(first, run()):
        assert torch.equal(a, b)


def test_policy_reference_backend():
    logp, old, adv = policy_inputs()
    loss, stats = rlkernels.ppo_policy_loss(logp, old, adv, backend="reference", dual_clip=2.0)
    cpu_loss, cpu_stats = rlkernels.ppo_policy_loss(logp, old, adv, backend="cpu", dual_clip=2.0)
    assert_close(cpu_loss, loss.numpy())
    for k in POLICY_STATS:
        assert_close(cpu_stats[k], stats[k].numpy(), name=k)


# ----------------------------------------------------------------------------------------------------
# value_loss
# ----------------------------------------------------------------------------------------------------


def value_inputs(shape=(5, 37), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    old = v + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    ret = v + torch.randn(shape, generator=gen, dtype=torch.float64)
    return v.to(dtype), old.to(dtype), ret.to(dtype)


def check_value(v, old, ret, mask, dtype=torch.float64, **kw):
    x = v.detach().clone().requires_grad_(True)
    loss, stats = rlkernels.value_loss(x, old, ret, mask, **kw)
    exp_loss, exp_stats = reference.value_loss(v, old, ret, mask, **kw)
    assert_close(loss, exp_loss, dtype, name="loss")
    assert set(stats) == {"vf_clipfrac"}
    assert_close(stats["vf_clipfrac"], exp_stats["vf_clipfrac"], dtype, name="vf_clipfrac")
    loss.backward()
    y = v.detach().double().clone().requires_grad_(True)
    torch_value_loss(y, old.double(), ret.double(), mask, **kw).backward()
    assert_close(x.grad, y.grad, dtype, name="grad values")
    return loss, stats


@pytest.mark.parametrize("mask_kind", [None, "bool", "uint8", "float"])
@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("agg", AGGS)
def test_value_every_option(agg, clip, mask_kind):
    v, old, ret = value_inputs(seed=3)
    mask = make_mask(v.shape, mask_kind, torch.Generator().manual_seed(5))
    _, stats = check_value(v, old, ret, mask, clip=clip, agg=agg)
    if clip is not None:
        assert 0 < float(stats["vf_clipfrac"]) < 1


def test_value_edges():
    v, old, ret = value_inputs((4, 9))
    check_value(v, v.clone(), ret, None, clip=0.0)  # v on both clip bounds
    check_value(v, old, v.clone(), None, clip=0.2)  # v == R: zero error
    mask = torch.zeros(4, 9, dtype=torch.bool)
    for agg in AGGS:
        loss, stats = check_value(v, old, ret, mask, clip=0.2, agg=agg)
        assert float(loss) == 0.0 and float(stats["vf_clipfrac"]) == 0.0
    check_value(v[0], old[0], ret[0], None, clip=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_value_dtypes(dtype):
    v, old, ret = value_inputs((6, 50), dtype=dtype)
    loss, _ = rlkernels.value_loss(v, old, ret, clip=0.2, agg="seq-mean-token-mean")
    exp_loss, _ = reference.value_loss(v, old, ret, clip=0.2, agg="seq-mean-token-mean")
    assert loss.dtype == torch.float32
    assert_close(loss, exp_loss, dtype)


# ----------------------------------------------------------------------------------------------------
# kl_penalty
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_penalty(kind, dtype):
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 4, 33, generator=gen, dtype=torch.float64) * 3
    ref = logp + torch.randn(3, 4, 33, generator=gen, dtype=torch.float64)
    ref[0, 0, :4] = logp[0, 0, :4] + torch.tensor([30.0, -30.0, 0.0, 3.0], dtype=torch.float64)  # both clamps
    logp, ref = logp.to(dtype), ref.to(dtype)
    x = logp.clone().requires_grad_(True)
    out = rlkernels.kl_penalty(x, ref, kind)
    assert out.shape == logp.shape and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, reference.kl_penalty(logp, ref, kind), dtype, name=kind)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(g.to(out.dtype))
    y = logp.double().requires_grad_(True)
    torch_kl(y, ref.double(), kind).backward(g)
    assert_close(x.grad, y.grad, dtype, name=f"grad {kind}")


def test_kl_penalty_empty_and_noncontiguous():
    e = torch.empty(0, 3, dtype=torch.float32)
    assert rlkernels.kl_penalty(e, e, "k3").shape == (0, 3)
    a, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    assert_close(rlkernels.kl_penalty(a.t(), b.t(), "k2"), reference.kl_penalty(a.t(), b.t(), "k2"))


# ----------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ----------------------------------------------------------------------------------------------------


def test_gradcheck():
    logp, old, adv = policy_inputs((3, 6), scale=0.05)
    mask = make_mask((3, 6), "bool", torch.Generator().manual_seed(0))
    for agg in AGGS:
        for dual in (None, 1.5):
            def policy(x, agg=agg, dual=dual):
                return rlkernels.ppo_policy_loss(x, old, adv, mask, agg=agg, dual_clip=dual)[0]

            assert torch.autograd.gradcheck(policy, (logp.clone().requires_grad_(True),))
    v, vold, ret = value_inputs((3, 6))
    for agg in AGGS:
        def value(x, agg=agg):
            return rlkernels.value_loss(x, vold, ret, mask, clip=0.2, agg=agg)[0]

        assert torch.autograd.gradcheck(value, (v.clone().requires_grad_(True),))
    ref = logp + 0.5
    for kind in KL_KINDS:
        def kl(x, kind=kind):
            return rlkernels.kl_penalty(x, ref, kind)

        assert torch.autograd.gradcheck(kl, (logp.clone().requires_grad_(True),))


def _op_samples():
    logp, old, adv = policy_inputs((3, 6))
    mask = make_mask((3, 6), "bool", torch.Generator().manual_seed(0))
    lp = logp.clone().requires_grad_(True)
    yield torch.ops.rlkernels.ppo_policy_loss, (lp, old, adv, mask, 0.2, 0.28, 3.0, "seq-mean-token-mean", 6.0)
    yield torch.ops.rlkernels.ppo_policy_loss, (lp, old, adv, None, 0.2, 0.2, None, "token-mean", 6.0)
    g = torch.tensor(1.5, dtype=torch.float64)
    yield torch.ops.rlkernels.ppo_policy_loss_backward, (g, logp, old, adv, mask, 0.2, 0.2, 2.0, "token-mean", 6.0)
    v, vold, ret = value_inputs((3, 6))
    yield torch.ops.rlkernels.value_loss, (v.clone().requires_grad_(True), vold, ret, mask, 0.2, "token-mean")
    yield torch.ops.rlkernels.value_loss_backward, (g, v, vold, ret, None, None, "seq-mean-token-sum")
    yield torch.ops.rlkernels.kl_penalty, (lp, old, "k3")
    yield torch.ops.rlkernels.kl_penalty_backward, (torch.randn(3, 6, dtype=torch.float64), logp, old, "abs")


def test_opcheck():
    for op, args in _op_samples():
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    logp, old, adv = policy_inputs((4, 10))
    v, vold, ret = value_inputs((4, 10))
    mask = make_mask((4, 10), "bool", torch.Generator().manual_seed(0))

    def step(lp, vals):
        pl, stats = rlkernels.ppo_policy_loss(lp, old, adv, mask, clip_high=0.28, dual_clip=3.0,
                                              agg="seq-mean-token-mean")
        vl, vstats = rlkernels.value_loss(vals, vold, ret, mask, clip=0.2)
        kl = rlkernels.kl_penalty(lp, old, "k3")
        total = pl + 0.5 * vl + 0.1 * (kl * mask).sum()
        return total, stats["clipfrac"], vstats["vf_clipfrac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, v1 = logp.clone().requires_grad_(True), v.clone().requires_grad_(True)
    x2, v2 = logp.clone().requires_grad_(True), v.clone().requires_grad_(True)
    eager = step(x1, v1)
    out = compiled(x2, v2)
    eager[0].backward()
    out[0].backward()  # the compiled graph's backward runs the fused backward ops
    for a, b in zip(eager, out):
        assert torch.equal(a, b)
    assert torch.equal(x1.grad, x2.grad) and torch.equal(v1.grad, v2.grad)


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


def test_bad_inputs():
    logp, old, adv = policy_inputs((3, 4))
    f = rlkernels.ppo_policy_loss
    with pytest.raises(TypeError, match="logp"):
        f(logp.long(), old, adv)
    with pytest.raises(TypeError, match="advantages"):
        f(logp, old, [1.0])
    with pytest.raises(ValueError, match="old_logp"):
        f(logp, old[:, :3], adv)
    with pytest.raises(ValueError, match="mask"):
        f(logp, old, adv, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="agg"):
        f(logp, old, adv, agg="mean")
    with pytest.raises(ValueError, match="dual_clip"):
        f(logp, old, adv, dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_low"):
        f(logp, old, adv, clip_low=-0.1)
    with pytest.raises(ValueError, match="norm_length"):
        f(logp, old, adv, agg="seq-mean-token-sum-norm", norm_length=0)
    with pytest.raises(ValueError, match="needs \\[B, T\\]"):
        f(logp[0], old[0], adv[0], agg="seq-mean-token-sum")
    with pytest.raises(RuntimeError, match="backend"):
        f(logp, old, adv, backend="cuda")
    with pytest.raises(ValueError, match="returns"):
        rlkernels.value_loss(logp, old, adv[:2])
    with pytest.raises(ValueError, match="clip"):
        rlkernels.value_loss(logp, old, adv, clip=-1.0)
    with pytest.raises(ValueError, match="kind"):
        rlkernels.kl_penalty(logp, old, "k4")
    with pytest.raises(TypeError, match="ref_logp"):
        rlkernels.kl_penalty(logp, old.int(), "k1")
    # The kernels check on their own too, naming the argument.
    with pytest.raises(ValueError, match="advantages"):
        torch.ops.rlkernels.ppo_policy_loss(logp, old, adv[:2], None, 0.2, 0.2, None, "token-mean", 4.0)
    with pytest.raises(TypeError, match="old_logp"):
        torch.ops.rlkernels.ppo_policy_loss(logp, old.float(), adv, None, 0.2, 0.2, None, "token-mean", 4.0)
    with pytest.raises(ValueError, match="agg"):
        torch.ops.rlkernels.value_loss(logp, old, adv, None, None, "sum")
    with pytest.raises(TypeError, match="mask"):
        torch.ops.rlkernels.value_loss(logp, old, adv, logp, None, "token-mean")


def test_nan_propagates():
    logp, old, adv = policy_inputs((2, 5))
    adv[0, 1] = float("nan")
    loss, _ = rlkernels.ppo_policy_loss(logp, old, adv)
    assert torch.isnan(loss)
    assert np.isnan(reference.ppo_policy_loss(logp, old, adv)[0])


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_float32_lanes(agg, dual_clip, masked):
    """The vectorized float32 path (blocks of 16 tokens plus a scalar tail), with clamped and boundary ratios."""
    logp, old, adv = policy_inputs((3, 37), dtype=torch.float32, seed=11)
    old = old.clone()
    old[0, :5] = logp[0, :5] - 1e4  # log-ratio clamped at 20
    old[1, :5] = logp[1, :5] + 50.0  # log-ratio clamped at -20
    old[2, :20:2] = logp[2, :20:2]  # ratio exactly 1
    mask = make_mask(logp.shape, "bool", torch.Generator().manual_seed(11), empty_row=False) if masked else None
    check_policy(logp, old, adv, mask, dtype=torch.float32, dual_clip=dual_clip, agg=agg)
    check_policy(logp, old, adv, mask, dtype=torch.float32, clip_low=0.0, clip_high=0.0, dual_clip=dual_clip,
                 agg=agg)
