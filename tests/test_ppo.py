"""Tests of the PPO loss family (rlkernels/ppo.py, csrc/cpu/ppo.cpp; docs/design.md §4.4).

Two oracles: `rlkernels.reference` (NumPy, float64) for values and stats, and a plain torch float64
re-implementation of the same formulas (below) whose autograd gives the expected gradients. The kernels
follow torch 2.14's derivative conventions (max/min split ties; a clamp to scalar bounds, as of the policy
ratio, passes no gradient where its input equals a bound, and one to tensor bounds, as of the clipped value,
passes it there), which the oracle spells out (conftest.clamp_open: torch 2.11's scalar clamp passes the
gradient at its bounds), so gradients agree even at the clip boundaries, on either release.

The other backends are checked against the CPU backend and the reference: tests parameterized over `backend`
(tests/conftest.py: backends) on small shapes, Triton under the interpreter without a GPU; the GPU-sized
tests (gpu_backends) are skipped without a CUDA device or without the ops' CUDA kernels.
"""

import itertools
import math
import zlib

import numpy as np
import pytest
import torch
from conftest import (
    GPU_GRAD_TOL,
    GPU_TOL,
    TOLERANCES,
    assert_close,
    backends,
    clamp_open,
    device_for,
    gpu_backends,
    randn,
    random_tokens,
    record_triton_grids,
    sample_inputs,
    sample_mask,
)
from hypothesis import given
from hypothesis import strategies as st

import rlkernels
from rlkernels import reference
from rlkernels.ppo import AGGS, KL_KINDS, POLICY_STATS

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
OPS = (
    "ppo_policy_loss",
    "ppo_policy_loss_backward",
    "value_loss",
    "value_loss_backward",
    "kl_penalty",
    "kl_penalty_backward",
)
DEVICE = "cuda"  # of the GPU-sized tests


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def torch_policy_loss(
    logp, old, adv, mask, clip_low=0.2, clip_high=None, dual_clip=None, agg="token-mean", norm_length=None
):
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
    logp, old, adv = sample_inputs(
        "ppo_policy_loss",
        (5, 37),
        seed=zlib.crc32(repr((agg, clip_high, dual_clip, mask_kind)).encode()) % 1000,
    )
    mask = sample_mask(logp.shape, mask_kind, 1)
    _, stats = check_policy(
        logp, old, adv, mask, clip_low=0.2, clip_high=clip_high, dual_clip=dual_clip, agg=agg
    )
    assert 0 < float(stats["clipfrac"]) < 1  # the cases exercise both branches
    if dual_clip is not None:
        # Ratios near e^2 with A < 0: the dual clip binds.
        _, stats = check_policy(logp, old - 2.0, adv, mask, clip_high=clip_high, dual_clip=1.5, agg=agg)
        assert float(stats["clipfrac_lower"]) > 0


def test_policy_norm_length_and_3d_and_1d():
    logp, old, adv = sample_inputs("ppo_policy_loss", (2, 3, 11))
    mask = sample_mask((2, 3, 11), "bool", 2, empty_row=False)
    check_policy(logp, old, adv, mask, agg="seq-mean-token-sum-norm", norm_length=64)
    check_policy(logp, old, adv, mask, agg="seq-mean-token-mean")
    flat = [x.reshape(-1) for x in (logp, old, adv)]
    check_policy(*flat, mask.reshape(-1), agg="token-mean")


def test_policy_noncontiguous_and_long_rows():
    logp, old, adv = sample_inputs("ppo_policy_loss", (40, 6))
    check_policy(logp.t(), old.t(), adv.t(), None, agg="seq-mean-token-mean")
    # Rows longer than one kernel chunk (4096 tokens) and a 1-D sequence spread over chunks.
    logp, old, adv = sample_inputs("ppo_policy_loss", (3, 9001), seed=3)
    mask = sample_mask(logp.shape, "bool", 3)
    for agg in AGGS:
        check_policy(logp, old, adv, mask, agg=agg, dual_clip=2.0)
    check_policy(logp[0], old[0], adv[0], mask[0])


def test_policy_clip_boundary_and_zero_advantage():
    # clip 0: every ratio of exactly 1 sits on both clip bounds (max ties: half the gradient to the unclipped
    # branch; none through the clamp, whose input is on its bounds).
    logp, old, adv = sample_inputs("ppo_policy_loss", (4, 9))
    old = torch.where(torch.arange(9) % 2 == 0, logp, old)
    check_policy(logp, old, adv, None, clip_low=0.0, clip_high=0.0)
    check_policy(logp, old, adv, None, clip_low=0.0, clip_high=0.0, dual_clip=2.0)
    loss, stats = check_policy(logp, old, torch.zeros_like(adv), None, dual_clip=2.0)
    assert (
        float(loss.detach()) == 0.0
        and float(stats["clipfrac"]) == 0.0
        and float(stats["clipfrac_lower"]) == 0.0
    )


def test_policy_huge_log_ratios_are_clamped():
    logp, old, adv = sample_inputs("ppo_policy_loss", (3, 8))
    old = old.clone()
    old[0] = logp[0] - 1e4  # ratio would overflow: clamped to e^20
    old[1] = logp[1] + 50.0  # ratio would underflow toward 0: clamped to e^-20
    loss, stats = check_policy(logp, old, adv, None)
    assert torch.isfinite(loss) and math.isclose(float(stats["ratio_max"]), math.exp(20.0), rel_tol=1e-12)
    check_policy(logp, old, adv, None, dual_clip=3.0, agg="seq-mean-token-mean")


@pytest.mark.parametrize("agg", AGGS)
def test_policy_all_masked_and_empty(agg):
    logp, old, adv = sample_inputs("ppo_policy_loss", (3, 5))
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
    logp, old, adv = sample_inputs("ppo_policy_loss", (6, 50), dtype=dtype)
    mask = sample_mask(logp.shape, "bool", 4)
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
    logp, old, adv = sample_inputs("ppo_policy_loss", (B, T), seed=seed, scale=scale)
    mask = sample_mask((B, T), "bool" if masked else None, seed)
    check_policy(logp, old, adv, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg)


def test_policy_deterministic_across_threads():
    logp, old, adv = sample_inputs("ppo_policy_loss", (64, 3000), dtype=torch.float32, seed=7)
    mask = sample_mask(logp.shape, "bool", 7)
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
    logp, old, adv = sample_inputs("ppo_policy_loss", (5, 37))
    loss, stats = rlkernels.ppo_policy_loss(logp, old, adv, backend="reference", dual_clip=2.0)
    cpu_loss, cpu_stats = rlkernels.ppo_policy_loss(logp, old, adv, backend="cpu", dual_clip=2.0)
    assert_close(cpu_loss, loss.numpy())
    for k in POLICY_STATS:
        assert_close(cpu_stats[k], stats[k].numpy(), name=k)


# ----------------------------------------------------------------------------------------------------
# value_loss
# ----------------------------------------------------------------------------------------------------


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
    v, old, ret = sample_inputs("value_loss", (5, 37), seed=3)
    mask = sample_mask(v.shape, mask_kind, 5)
    _, stats = check_value(v, old, ret, mask, clip=clip, agg=agg)
    if clip is not None:
        assert 0 < float(stats["vf_clipfrac"]) < 1


def test_value_edges():
    v, old, ret = sample_inputs("value_loss", (4, 9))
    check_value(v, v.clone(), ret, None, clip=0.0)  # v on both clip bounds
    check_value(v, old, v.clone(), None, clip=0.2)  # v == R: zero error
    mask = torch.zeros(4, 9, dtype=torch.bool)
    for agg in AGGS:
        loss, stats = check_value(v, old, ret, mask, clip=0.2, agg=agg)
        assert float(loss) == 0.0 and float(stats["vf_clipfrac"]) == 0.0
    check_value(v[0], old[0], ret[0], None, clip=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_value_dtypes(dtype):
    v, old, ret = sample_inputs("value_loss", (6, 50), dtype=dtype)
    loss, _ = rlkernels.value_loss(v, old, ret, clip=0.2, agg="seq-mean-token-mean")
    exp_loss, _ = reference.value_loss(v, old, ret, clip=0.2, agg="seq-mean-token-mean")
    assert loss.dtype == torch.float32
    assert_close(loss, exp_loss, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_nan_old_value_propagates(dtype):
    """A NaN old value gives a NaN clamp (torch.clamp to tensor bounds) and so a NaN clipped loss, as the
    reference; without a clip old values are not read."""
    v, old, ret = sample_inputs("value_loss", (2, 21), dtype=dtype)
    old[1, 20] = float("nan")  # the ragged end of the float32 vectors
    old[0, 3] = float("nan")
    loss, _ = rlkernels.value_loss(v, old, ret, clip=0.2)
    assert np.isnan(reference.value_loss(v, old, ret, clip=0.2)[0]) and torch.isnan(loss)
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[1, 20] = mask[0, 3] = False  # masked tokens are never read
    assert torch.isfinite(rlkernels.value_loss(v, old, ret, mask, clip=0.2)[0])
    assert torch.isfinite(rlkernels.value_loss(v, old, ret)[0])


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
    assert out.shape == logp.shape and out.dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32
    )
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
    logp, old, adv = sample_inputs("ppo_policy_loss", (3, 6), scale=0.05)
    mask = sample_mask((3, 6), "bool", 0)
    for agg in AGGS:
        for dual in (None, 1.5):

            def policy(x, agg=agg, dual=dual):
                return rlkernels.ppo_policy_loss(x, old, adv, mask, agg=agg, dual_clip=dual)[0]

            assert torch.autograd.gradcheck(policy, (logp.clone().requires_grad_(True),))
    v, vold, ret = sample_inputs("value_loss", (3, 6))
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
    logp, old, adv = sample_inputs("ppo_policy_loss", (3, 6))
    mask = sample_mask((3, 6), "bool", 0)
    lp = logp.clone().requires_grad_(True)
    yield (
        torch.ops.rlkernels.ppo_policy_loss,
        (lp, old, adv, mask, 0.2, 0.28, 3.0, "seq-mean-token-mean", 6.0),
    )
    yield torch.ops.rlkernels.ppo_policy_loss, (lp, old, adv, None, 0.2, 0.2, None, "token-mean", 6.0)
    g = torch.tensor(1.5, dtype=torch.float64)
    yield (
        torch.ops.rlkernels.ppo_policy_loss_backward,
        (g, logp, old, adv, mask, 0.2, 0.2, 2.0, "token-mean", 6.0),
    )
    v, vold, ret = sample_inputs("value_loss", (3, 6))
    yield torch.ops.rlkernels.value_loss, (v.clone().requires_grad_(True), vold, ret, mask, 0.2, "token-mean")
    yield torch.ops.rlkernels.value_loss_backward, (g, v, vold, ret, None, None, "seq-mean-token-sum")
    yield torch.ops.rlkernels.kl_penalty, (lp, old, "k3")
    yield torch.ops.rlkernels.kl_penalty_backward, (torch.randn(3, 6, dtype=torch.float64), logp, old, "abs")


def test_opcheck():
    for op, args in _op_samples():
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    logp, old, adv = sample_inputs("ppo_policy_loss", (4, 10))
    v, vold, ret = sample_inputs("value_loss", (4, 10))
    mask = sample_mask((4, 10), "bool", 0)

    def step(lp, vals):
        pl, stats = rlkernels.ppo_policy_loss(
            lp, old, adv, mask, clip_high=0.28, dual_clip=3.0, agg="seq-mean-token-mean"
        )
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
    logp, old, adv = sample_inputs("ppo_policy_loss", (3, 4))
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
    logp, old, adv = sample_inputs("ppo_policy_loss", (2, 5))
    adv[0, 1] = float("nan")
    loss, _ = rlkernels.ppo_policy_loss(logp, old, adv)
    assert torch.isnan(loss)
    assert np.isnan(reference.ppo_policy_loss(logp, old, adv)[0])


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_float32_lanes(agg, dual_clip, masked):
    """The vectorized float32 path (blocks of 16 tokens plus a scalar tail), with clamped and boundary ratios."""
    logp, old, adv = sample_inputs("ppo_policy_loss", (3, 37), dtype=torch.float32, seed=11)
    old = old.clone()
    old[0, :5] = logp[0, :5] - 1e4  # log-ratio clamped at 20
    old[1, :5] = logp[1, :5] + 50.0  # log-ratio clamped at -20
    old[2, :20:2] = logp[2, :20:2]  # ratio exactly 1
    mask = sample_mask(logp.shape, "bool", 11, empty_row=False) if masked else None
    check_policy(logp, old, adv, mask, dtype=torch.float32, dual_clip=dual_clip, agg=agg)
    check_policy(
        logp, old, adv, mask, dtype=torch.float32, clip_low=0.0, clip_high=0.0, dual_clip=dual_clip, agg=agg
    )


# ----------------------------------------------------------------------------------------------------
# The other backends against the CPU backend and the reference, on small shapes (Triton under the
# interpreter)
# ----------------------------------------------------------------------------------------------------

GPU_OR_TRITON = backends(*OPS, include=("triton", "cuda"))


def _run(fn, x, *args, backend, **kw):
    """(loss, stats, d x) of fn(x, *args) on `backend`; the inputs are moved to its device."""
    device = device_for(backend)
    x = x.to(device).clone().requires_grad_(True)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    loss, stats = fn(x, *args, backend=backend, **kw)
    loss.backward()
    return loss, stats, x.grad


# T = 1100 crosses the kernel's 1024-token chunk.
@pytest.mark.parametrize("backend", GPU_OR_TRITON)
@pytest.mark.parametrize("agg, dual_clip, masked", list(itertools.product(AGGS, [None, 2.0], [False, True])))
def test_backend_policy_matches_cpu(agg, dual_clip, masked, backend):
    logp, old, adv = sample_inputs("ppo_policy_loss", (3, 1100))
    mask = sample_mask((3, 1100), "bool" if masked else None, 1)
    kw = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": dual_clip, "agg": agg}
    t_loss, t_stats, t_grad = _run(rlkernels.ppo_policy_loss, logp, old, adv, mask, backend=backend, **kw)
    c_loss, _, c_grad = _run(rlkernels.ppo_policy_loss, logp, old, adv, mask, backend="cpu", **kw)
    _, r_stats = reference.ppo_policy_loss(logp, old, adv, mask, **kw)
    assert_close(t_loss, c_loss.detach().numpy(), name="loss", device=device_for(backend))
    for k in POLICY_STATS:
        assert_close(t_stats[k], r_stats[k], name=k)
    assert_close(t_grad, c_grad.numpy(), name="grad")


@pytest.mark.parametrize("backend", GPU_OR_TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_policy_dtypes_and_edges(dtype, backend):
    logp, old, adv = sample_inputs("ppo_policy_loss", (2, 40), dtype=dtype)
    mask = sample_mask((2, 40), "bool", 1)
    old[0, :3] = logp[0, :3] - 1e4  # clamped log-ratios
    t = _run(rlkernels.ppo_policy_loss, logp, old, adv, mask, backend=backend, dual_clip=3.0)
    c = _run(rlkernels.ppo_policy_loss, logp, old, adv, mask, backend="cpu", dual_clip=3.0)
    assert t[0].dtype == torch.float32 and t[2].dtype == dtype
    assert_close(t[0], c[0].detach().numpy(), dtype)
    assert_close(t[2], c[2].float().numpy(), dtype)
    empty = torch.zeros_like(mask)
    loss, stats, grad = _run(rlkernels.ppo_policy_loss, logp, old, adv, empty, backend=backend)
    assert float(loss.detach()) == 0.0 and all(float(v) == 0.0 for v in stats.values())
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", GPU_OR_TRITON)
@pytest.mark.parametrize("agg, clip", list(itertools.product(AGGS, [None, 0.2])))
def test_backend_value_matches_cpu(agg, clip, backend):
    v, old, ret = sample_inputs("value_loss", (3, 50), seed=1)
    mask = sample_mask((3, 50), "bool", 1)
    t_loss, t_stats, t_grad = _run(
        rlkernels.value_loss, v, old, ret, mask, clip=clip, agg=agg, backend=backend
    )
    c_loss, c_stats, c_grad = _run(rlkernels.value_loss, v, old, ret, mask, clip=clip, agg=agg, backend="cpu")
    assert_close(t_loss, c_loss.detach().numpy())
    assert_close(t_stats["vf_clipfrac"], c_stats["vf_clipfrac"].numpy())
    assert_close(t_grad, c_grad.numpy())


@pytest.mark.parametrize("backend", GPU_OR_TRITON)
@pytest.mark.parametrize("kind", KL_KINDS)
def test_backend_kl_matches_cpu(kind, backend):
    logp, ref, g = sample_inputs("ppo_policy_loss", (4, 33), seed=2)
    ref[0, :2] = logp[0, :2] + torch.tensor([30.0, -30.0], dtype=torch.float64)
    outs = []
    for b in (backend, "cpu"):
        device = device_for(b)
        x = logp.to(device).clone().requires_grad_(True)
        out = rlkernels.kl_penalty(x, ref.to(device), kind, backend=b)
        out.backward(g.to(device))
        outs.append((out.detach(), x.grad))
    assert_close(outs[0][0], outs[1][0].numpy())
    assert_close(outs[0][1], outs[1][1].numpy())


@pytest.mark.parametrize("backend", GPU_OR_TRITON)
def test_backend_opcheck_and_compile(backend):
    device = device_for(backend)
    logp, old, adv = sample_inputs("ppo_policy_loss", (2, 20), device=device)
    mask = sample_mask((2, 20), "bool", 1, device=device)
    lp = logp.clone().requires_grad_(True)
    if backend == "triton":
        import rlkernels.triton.ppo  # noqa: F401  (registers the triton_* ops, also when this test runs alone)

        ops = torch.ops.rlkernels
        torch.library.opcheck(
            ops.triton_ppo_policy_loss, (lp, old, adv, mask, 0.2, 0.2, 2.0, "seq-mean-token-mean", 20.0)
        )
        torch.library.opcheck(ops.triton_value_loss, (lp, old, adv, None, 0.2, "token-mean"))
        torch.library.opcheck(ops.triton_kl_penalty, (lp, old, "k3"))

    def f(x):
        loss, stats = rlkernels.ppo_policy_loss(x, old, adv, mask, dual_clip=2.0, backend=backend)
        return loss + rlkernels.kl_penalty(x, old, "k2", backend=backend).sum(), stats["clipfrac"]

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1, x2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    e, c = f(x1), compiled(x2)
    e[0].backward()
    c[0].backward()
    assert torch.equal(e[0], c[0]) and torch.equal(x1.grad, x2.grad)


# ----------------------------------------------------------------------------------------------------
# GPU-sized tests: each GPU backend against the CPU backend and the reference
# ----------------------------------------------------------------------------------------------------


# (B, T): one token; small; rows over several units (kUnitTokens = 1024) with a ragged last one; a long row.
SHAPES = ((1, 1), (5, 37), (3, 2500), (1, 5000), (300, 3))


def to_dev(*xs):
    return tuple(None if x is None else x.to(DEVICE) for x in xs)


def policy_both(logp, old, adv, mask, **kw):
    """(loss, stats, grad) of the CUDA and the CPU backend."""
    out = []
    for dev, backend in ((DEVICE, "cuda"), ("cpu", "cpu")):
        lp = logp.to(dev).clone().requires_grad_(True)
        loss, stats = rlkernels.ppo_policy_loss(
            lp, *to_dev(old, adv, mask) if dev == DEVICE else (old, adv, mask), backend=backend, **kw
        )
        (loss * 1.7).backward()
        out.append((loss, stats, lp.grad))
    return out


@pytest.mark.parametrize("backend", backends(*OPS, include=("cuda",)))
@pytest.mark.parametrize("mask_kind", [None, "bool", "uint8", "all-masked"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_policy_loss_matches_cpu_and_reference(shape, agg, dual_clip, mask_kind, backend):
    logp, old, adv = sample_inputs("ppo_policy_loss", shape, seed=sum(shape), dtype=torch.float32)
    mask = sample_mask(shape, mask_kind, shape[1])
    kw = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": dual_clip, "agg": agg}
    (loss, stats, grad), (c_loss, c_stats, c_grad) = policy_both(logp, old, adv, mask, **kw)
    assert loss.device.type == "cuda" and loss.shape == () and loss.dtype == torch.float32
    assert_close(loss, c_loss, **GPU_TOL[torch.float32], name="loss")
    for name in POLICY_STATS:
        assert stats[name].shape == () and stats[name].device.type == "cuda"
        assert_close(stats[name], c_stats[name], **GPU_TOL[torch.float32], name=name)
    assert_close(grad, c_grad, **GPU_GRAD_TOL[torch.float32], name="grad")
    exp_loss, exp_stats = reference.ppo_policy_loss(logp, old, adv, mask, **kw)
    assert_close(loss, torch.tensor(exp_loss), atol=1e-5, rtol=1e-5, scale=1.0, name="loss vs reference")
    for name in POLICY_STATS:
        assert_close(
            stats[name],
            torch.tensor(exp_stats[name]),
            atol=1e-5,
            rtol=1e-5,
            scale=1.0,
            name=f"{name} vs reference",
        )
    if mask_kind == "all-masked":
        assert float(loss) == 0 and all(float(s) == 0 for s in stats.values())
        assert torch.all(grad == 0)


@pytest.mark.parametrize("backend", backends(*OPS, include=("cuda",)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_loss_dtypes_and_norm_length(dtype, backend):
    logp, old, adv = sample_inputs("ppo_policy_loss", (6, 1500), seed=2, dtype=dtype)
    mask = sample_mask((6, 1500), "bool", 3)
    for agg in AGGS:
        kw = {
            "dual_clip": 2.5,
            "agg": agg,
            "norm_length": 4096.0 if agg == "seq-mean-token-sum-norm" else None,
        }
        (loss, stats, grad), (c_loss, c_stats, c_grad) = policy_both(logp, old, adv, mask, **kw)
        assert loss.dtype == acc_dtype(dtype) and grad.dtype == dtype
        assert_close(loss, c_loss, **GPU_TOL[dtype], name=agg)
        for name in POLICY_STATS:
            assert_close(stats[name], c_stats[name], **GPU_TOL[dtype], name=name)
        assert_close(grad, c_grad, **GPU_GRAD_TOL[dtype], name="grad")


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
def test_policy_loss_edges(backend):
    # Huge log-ratios (clamped), zero advantages, ratio exactly 1, NaN at masked tokens only. (No ratio that
    # only nearly hits a clip bound: CPU and GPU exp may differ by an ulp there and take different tie shares.)
    logp, old, adv = sample_inputs("ppo_policy_loss", (4, 300), seed=4, dtype=torch.float64)
    old[0, :50] = logp[0, :50] + 40.0
    old[0, 50:100] = logp[0, 50:100] - 40.0
    adv[1, :30] = 0.0
    old[2, :20] = logp[2, :20]
    mask = sample_mask((4, 300), "bool", 5)
    logp[~mask] = float("nan")
    for agg in AGGS:
        (loss, stats, grad), (c_loss, c_stats, c_grad) = policy_both(
            logp, old, adv, mask, dual_clip=3.0, agg=agg
        )
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert_close(loss, c_loss, **GPU_TOL[torch.float64], name=agg)
        for name in POLICY_STATS:
            assert_close(stats[name], c_stats[name], **GPU_TOL[torch.float64], name=name)
        assert_close(grad, c_grad, **GPU_GRAD_TOL[torch.float64], name="grad")
    # Empty inputs: 0 loss and stats, empty gradient.
    for shape in ((0, 5), (3, 0)):
        lp = torch.zeros(shape, device=DEVICE, requires_grad=True)
        loss, stats = rlkernels.ppo_policy_loss(
            lp, lp.detach(), lp.detach(), agg="seq-mean-token-mean", backend=backend
        )
        assert float(loss) == 0 and all(float(s) == 0 for s in stats.values())
        loss.backward()
        assert lp.grad.shape == shape


@pytest.mark.parametrize("backend", backends(*OPS, include=("cuda",)))
@pytest.mark.parametrize("mask_kind", [None, "bool", "all-masked"])
@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_value_loss_matches_cpu_and_reference(dtype, agg, clip, mask_kind, backend):
    for shape in ((5, 37), (3, 2500)):
        v, old, ret = sample_inputs("value_loss", shape, seed=shape[1], dtype=dtype)
        mask = sample_mask(shape, mask_kind, 7)
        res = []
        for dev, b in ((DEVICE, "cuda"), ("cpu", "cpu")):
            x = v.to(dev).clone().requires_grad_(True)
            args = to_dev(old, ret, mask) if dev == DEVICE else (old, ret, mask)
            loss, stats = rlkernels.value_loss(x, *args, clip=clip, agg=agg, backend=b)
            (loss * 0.3).backward()
            res.append((loss, stats["vf_clipfrac"], x.grad))
        (loss, frac, grad), (c_loss, c_frac, c_grad) = res
        assert loss.dtype == acc_dtype(dtype) and loss.device.type == "cuda"
        assert_close(loss, c_loss, **GPU_TOL[dtype], name="loss")
        assert_close(frac, c_frac, **GPU_TOL[dtype], name="vf_clipfrac")
        assert_close(grad, c_grad, **GPU_GRAD_TOL[dtype], name="grad")
        exp_loss, exp_stats = reference.value_loss(v, old, ret, mask, clip=clip, agg=agg)
        assert_close(loss, torch.tensor(exp_loss), atol=1e-5, rtol=1e-5, scale=1.0, name="loss vs reference")
        assert_close(
            frac,
            torch.tensor(exp_stats["vf_clipfrac"]),
            atol=1e-5,
            rtol=1e-5,
            scale=1.0,
            name="vf_clipfrac vs reference",
        )
        if mask_kind == "all-masked":
            assert float(loss) == 0 and float(frac) == 0 and torch.all(grad == 0)


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_penalty_matches_cpu_and_reference(kind, dtype, backend):
    logp, ref, _ = sample_inputs("ppo_policy_loss", (3, 7, 129), seed=8, dtype=dtype, scale=3.0)
    ref[0, 0, :5] = logp[0, 0, :5]  # k1 = 0: abs's derivative is 0 there
    ref[0, 1, :5] = logp[0, 1, :5] + 30.0  # k3 clamps
    res = []
    for dev, b in ((DEVICE, "cuda"), ("cpu", "cpu")):
        x = logp.to(dev).clone().requires_grad_(True)
        out = rlkernels.kl_penalty(x, ref.to(dev), kind, backend=b)
        g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape).to(dev)
        out.backward(g)
        res.append((out, x.grad))
    (out, grad), (c_out, c_grad) = res
    assert out.dtype == acc_dtype(dtype) and out.shape == logp.shape
    assert_close(out, c_out, **GPU_TOL[dtype], name=kind)
    assert_close(grad, c_grad, **GPU_GRAD_TOL[dtype], name=f"grad {kind}")
    assert_close(
        out,
        torch.as_tensor(reference.kl_penalty(logp, ref, kind)),
        **GPU_TOL[dtype],
        name=f"{kind} vs reference",
    )
    # empty and non-contiguous
    empty = torch.zeros(0, 4, device=DEVICE, dtype=dtype)
    assert rlkernels.kl_penalty(empty, empty, kind, backend=backend).shape == (0, 4)
    t = logp.to(DEVICE).transpose(0, 2)
    assert_close(
        rlkernels.kl_penalty(t, ref.to(DEVICE).transpose(0, 2), kind, backend=backend),
        rlkernels.kl_penalty(logp.transpose(0, 2), ref.transpose(0, 2), kind, backend="cpu"),
        **GPU_TOL[dtype],
    )


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
def test_ppo_repeated_runs_are_bit_identical(backend):
    logp, old, adv = sample_inputs("ppo_policy_loss", (64, 4099), seed=9, dtype=torch.float32, device=DEVICE)
    mask = sample_mask((64, 4099), "bool", 10, device=DEVICE)
    v, vold, ret = sample_inputs("value_loss", (64, 4099), seed=11, dtype=torch.float32, device=DEVICE)

    def run():
        outs = []
        for agg in AGGS:
            lp = logp.clone().requires_grad_(True)
            loss, stats = rlkernels.ppo_policy_loss(
                lp, old, adv, mask, dual_clip=3.0, agg=agg, backend=backend
            )
            loss.backward()
            x = v.clone().requires_grad_(True)
            vl, vs = rlkernels.value_loss(x, vold, ret, mask, clip=0.2, agg=agg, backend=backend)
            vl.backward()
            outs += [loss, *stats.values(), lp.grad, vl, vs["vf_clipfrac"], x.grad]
        return outs

    first = run()
    for _ in range(3):
        for a, b in zip(first, run()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backends(*OPS, include=("cuda",)))
def test_ppo_opcheck(backend):
    logp, old, adv = sample_inputs("ppo_policy_loss", (3, 1100), seed=12, dtype=torch.float32, device=DEVICE)
    mask = sample_mask((3, 1100), "bool", 13, device=DEVICE)
    lp = logp.clone().requires_grad_(True)
    g = torch.tensor(1.5, device=DEVICE)
    ops = torch.ops.rlkernels
    samples = [
        (ops.ppo_policy_loss.default, (lp, old, adv, mask, 0.2, 0.28, 3.0, "seq-mean-token-mean", 1100.0)),
        (ops.ppo_policy_loss.default, (lp, old, adv, None, 0.2, 0.2, None, "token-mean", 1100.0)),
        (
            ops.ppo_policy_loss_backward.default,
            (g, logp, old, adv, mask, 0.2, 0.2, 2.0, "token-mean", 1100.0),
        ),
        (
            ops.ppo_policy_loss_backward.default,
            (g, logp, old, adv, mask, 0.2, 0.2, None, "seq-mean-token-sum-norm", 2000.0),
        ),
    ]
    v, vold, ret = sample_inputs("value_loss", (3, 1100), seed=14, dtype=torch.float32, device=DEVICE)
    samples += [
        (ops.value_loss.default, (v.clone().requires_grad_(True), vold, ret, mask, 0.2, "token-mean")),
        (ops.value_loss_backward.default, (g, v, vold, ret, None, None, "seq-mean-token-sum")),
        (ops.value_loss_backward.default, (g, v, vold, ret, mask, 0.1, "seq-mean-token-mean")),
        (ops.kl_penalty.default, (lp, old, "k3")),
        (ops.kl_penalty_backward.default, (torch.randn(3, 1100, device=DEVICE), logp, old, "abs")),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
def test_ppo_compile_fullgraph(backend):
    torch._dynamo.reset()
    logp, old, adv = sample_inputs("ppo_policy_loss", (4, 1030), seed=15, dtype=torch.float32, device=DEVICE)
    v, vold, ret = sample_inputs("value_loss", (4, 1030), seed=16, dtype=torch.float32, device=DEVICE)
    mask = sample_mask((4, 1030), "bool", 17, device=DEVICE)

    def step(lp, vals):
        pl, stats = rlkernels.ppo_policy_loss(
            lp, old, adv, mask, clip_high=0.28, dual_clip=3.0, agg="seq-mean-token-mean", backend=backend
        )
        vl, vstats = rlkernels.value_loss(vals, vold, ret, mask, clip=0.2, backend=backend)
        kl = rlkernels.kl_penalty(lp, old, "k3", backend=backend)
        total = pl + 0.5 * vl + 0.1 * (kl * mask).sum()
        return total, stats["clipfrac"], vstats["vf_clipfrac"]

    x1, v1 = logp.clone().requires_grad_(True), v.clone().requires_grad_(True)
    x2, v2 = logp.clone().requires_grad_(True), v.clone().requires_grad_(True)
    eager = step(x1, v1)
    out = torch.compile(step, fullgraph=True)(x2, v2)
    eager[0].backward()
    out[0].backward()
    for a, b in zip(eager, out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(v1.grad, v2.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", backends(*OPS, include=("cuda",)))
def test_default_backend_routes_to_cuda_kernels(backend):
    """With the CUDA kernels built, CUDA tensors go to them (not Triton) when no backend is named."""
    from rlkernels._backend import resolve

    for op in ("gather_logprobs", "ppo_policy_loss", "value_loss", "kl_penalty"):
        assert resolve(None, torch.device(DEVICE), op) == "cuda"


# ----------------------------------------------------------------------------------------------------
# CUDA graphs and 64-bit indexing
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", gpu_backends(*OPS, "gather_logprobs", "gather_logprobs_backward"))
def test_cuda_graph_captures_forward_and_backward(backend):
    """docs/design.md §2: no host sync, so forward plus backward of both families capture in one CUDA graph, and
    replaying it gives the eager results bit for bit."""
    N, V = 12, 32000
    logits = randn((N, V), torch.bfloat16, seed=30, scale=3.0).to(DEVICE)
    tokens = random_tokens((N,), V, seed=31).to(DEVICE)
    logp_in, old, adv = sample_inputs(
        "ppo_policy_loss", (4, 1500), seed=32, dtype=torch.float32, device=DEVICE
    )
    mask = sample_mask((4, 1500), "bool", 33, device=DEVICE)

    def step(x, lp):
        logp, ent = rlkernels.gather_logprobs(x, tokens, return_entropy=True, backend=backend)
        loss, stats = rlkernels.ppo_policy_loss(
            lp, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-mean", backend=backend
        )
        total = logp.sum() + 0.01 * ent.sum() + loss
        gx, glp = torch.autograd.grad(total, (x, lp))
        return logp, ent, loss, stats["clipfrac"], gx, glp

    x = logits.clone().requires_grad_(True)
    lp = logp_in.clone().requires_grad_(True)
    eager = step(x, lp)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step(x, lp)  # warm-up on a side stream, as torch.cuda.graphs recommends
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(x, lp)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
def test_more_than_2_to_31_tokens(backend):
    """PPO losses over more than 2^31 tokens with known answers: ratio 1 and A = 1 give l = -1 everywhere."""
    B, T = 2, (1 << 30) + 7
    try:
        zeros = torch.zeros((B, T), dtype=torch.bfloat16, device=DEVICE)
        adv = torch.ones((B, T), dtype=torch.bfloat16, device=DEVICE)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    lp = zeros.clone().requires_grad_(True)
    for agg, expected in (
        ("token-mean", -1.0),
        ("seq-mean-token-sum", -float(T)),
        ("seq-mean-token-mean", -1.0),
    ):
        lp.grad = None
        loss, stats = rlkernels.ppo_policy_loss(lp, zeros, adv, agg=agg, backend=backend)
        assert float(loss) == pytest.approx(expected, rel=1e-6)  # a float32 output
        assert float(stats["ratio_mean"]) == 1.0 and float(stats["clipfrac"]) == 0.0
        loss.backward()
        # d l / d logp = -A * ratio = -1, times the row weight
        w = {"token-mean": 1 / (B * T), "seq-mean-token-sum": 1 / B, "seq-mean-token-mean": 1 / (B * T)}[agg]
        last = lp.grad[-1, -5:].float().cpu()
        torch.testing.assert_close(last, torch.full((5,), -w).to(torch.bfloat16).float())


@pytest.mark.parametrize("backend", backends(*OPS, include=("triton",), cpu_tensors=True))
def test_triton_launches_use_one_grid_axis(backend, monkeypatch):
    # A GPU grid's axes 1 and 2 stop at 65535 blocks: rows times chunks go on axis 0 (docs/design.md §8), so a
    # row of more than 65535 chunks, or a batch of more than 65535 rows, launches.
    import rlkernels.triton.ppo as tp

    grids = record_triton_grids(tp, monkeypatch)
    lp, old, adv = (x.float() for x in sample_inputs("ppo_policy_loss", (3, 40), seed=4))
    x = lp.clone().requires_grad_(True)
    loss, _ = rlkernels.ppo_policy_loss(x, old, adv, backend=backend)
    loss.backward()
    v = lp.clone().requires_grad_(True)
    vl, _ = rlkernels.value_loss(v, old, adv, clip=0.2, backend=backend)
    vl.backward()
    assert len(grids) >= 4
    for name, grid in grids:
        assert len(grid) == 1, f"{name} launched on grid {grid}"
