"""The CPU kernels built for each instruction set, not only the widest this machine runs.

Every SIMD kernel is compiled for SSE2, AVX2 and AVX-512 (csrc/cpu/simd_<level>.cpp, scan_block_<level>.cpp)
and the level is chosen per call by one dispatcher (csrc/cpu/isa.h). torch.ops.rlkernels._cpu_isa caps the
level in this process, so every kernel runs here at every level this CPU has, against the NumPy reference and
the torch oracles of the family tests (levels the CPU lacks are skipped: an AVX2-only machine runs default and
avx2). A subprocess per level checks that RLKERNELS_CPU_ISA caps the level as _cpu_isa does. The levels are
never expected to agree bit for bit (FMA contraction and lane counts differ): each is held to the tolerances.
scripts/check_simd.py (test_every_build_is_vectorized) checks from the library's disassembly that each level's
build of these kernels runs on vectors of its width.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close, randn, random_tokens, sample_inputs, sample_mask
from test_bellman import check_q_rows_ties_nan_inf
from test_logprobs import GRAD_TOL, check_chunked_rows, torch_oracle
from test_ppo import check_policy, check_value, torch_kl

import rlkernels
from rlkernels import reference

LEVELS = ("default", "avx2", "avx512")
ROOT = Path(__file__).resolve().parent.parent


def _isa(level=""):
    """(level in effect, widest level of this CPU), capping first when `level` is given."""
    current, widest = torch.ops.rlkernels._cpu_isa(level).split("|")
    return current, widest


def machine_levels():
    widest = _isa()[1]
    return LEVELS[: LEVELS.index(widest) + 1]


@pytest.fixture(params=LEVELS)
def isa(request):
    """Runs the test with the CPU kernels capped to one level, restored afterwards."""
    if request.param not in machine_levels():
        pytest.skip(f"this CPU does not run {request.param}")
    before = _isa()[0]
    assert _isa(request.param)[0] == request.param
    yield request.param
    _isa(before)


def test_cap_is_read_and_set():
    before, widest = _isa()
    try:
        assert widest in LEVELS
        assert _isa("default")[0] == "default"
        assert _isa("avx512")[0] == widest  # capped to what the CPU runs
    finally:
        _isa(before)
    with pytest.raises(ValueError, match="unknown CPU instruction set"):
        torch.ops.rlkernels._cpu_isa("sse9")


@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 4099), (9001,)])
@pytest.mark.parametrize("masked", [False, True])
def test_ppo_policy_loss(isa, shape, masked):
    logp, old, adv = (x.float() for x in sample_inputs("ppo_policy_loss", shape, seed=len(shape) + shape[-1]))
    mask = sample_mask(shape, "bool", 2) if masked else None
    other = "token-mean" if len(shape) == 1 else "seq-mean-token-mean"  # (1-D inputs: token-mean only)
    for kw in ({"agg": "token-mean"}, {"agg": other, "dual_clip": 3.0, "clip_high": 0.28}):
        check_policy(logp, old, adv, mask, dtype=torch.float32, **kw)
    # Ratios near e^2 with A < 0: the dual clip binds.
    _, stats = check_policy(logp, old - 2.0, adv, mask, dtype=torch.float32, dual_clip=1.5)
    assert float(stats["clipfrac_lower"]) > 0 or shape == (1, 1)


def test_ppo_nan_reaches_loss_and_ratio_max(isa):
    logp, old, adv = (x.float() for x in sample_inputs("ppo_policy_loss", (2, 45)))
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[0, 3] = False
    masked_nan = logp.clone()
    masked_nan[0, 3] = float("nan")  # a masked token is never read into a sum
    loss, stats = rlkernels.ppo_policy_loss(masked_nan, old, adv, mask)
    assert torch.isfinite(loss) and torch.isfinite(stats["ratio_max"])
    for where in ((1, 44), (0, 17)):  # in the ragged end and in a full vector
        for tensor in ("logp", "old"):
            lp, o = logp.clone(), old.clone()
            (lp if tensor == "logp" else o)[where] = float("nan")
            loss, stats = rlkernels.ppo_policy_loss(lp, o, adv, mask)
            exp_loss, exp_stats = reference.ppo_policy_loss(lp, o, adv, mask)
            assert np.isnan(exp_loss) and np.isnan(exp_stats["ratio_max"])
            assert torch.isnan(loss) and torch.isnan(stats["ratio_max"]), (where, tensor)


def test_ppo_infinite_log_ratios_and_advantages(isa):
    logp, old, adv = (x.float() for x in sample_inputs("ppo_policy_loss", (2, 45)))
    # log-ratios of +inf and -inf: approx_kl is NaN (inf - inf) while every ratio is finite (clamped)
    lp, o = logp.clone(), old.clone()
    lp[0, 5], o[1, 30] = float("inf"), float("inf")
    loss, stats = rlkernels.ppo_policy_loss(lp, o, adv)
    exp_loss, exp_stats = reference.ppo_policy_loss(lp, o, adv)
    assert np.isnan(exp_stats["approx_kl"]) and torch.isnan(stats["approx_kl"])
    assert math.isclose(float(stats["ratio_max"]), exp_stats["ratio_max"], rel_tol=1e-6)
    assert math.isclose(float(loss), exp_loss, rel_tol=1e-5)
    # an infinite advantage: both loss terms infinite, the loss -inf (+inf where the advantage is -inf)
    for sign in (1.0, -1.0):
        a = adv.clone()
        a[1, 20] = sign * float("inf")
        for dual_clip in (None, 3.0):
            loss, _ = rlkernels.ppo_policy_loss(logp, old, a, dual_clip=dual_clip)
            exp_loss = reference.ppo_policy_loss(logp, old, a, dual_clip=dual_clip)[0]
            assert float(loss) == exp_loss == -sign * math.inf, (sign, dual_clip)


@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 4099), (9001,)])
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss(isa, shape, clip):
    v, old, ret = (x.float() for x in sample_inputs("value_loss", shape, seed=shape[-1]))
    mask = sample_mask(shape, "bool", 4) if len(shape) == 2 else None
    check_value(v, old, ret, mask, dtype=torch.float32, clip=clip)
    check_value(v, v.clone(), ret, mask, dtype=torch.float32, clip=0.0)  # v on both clip bounds
    if clip is not None:  # a NaN old value makes the clipped loss NaN, as torch.clamp and the reference do
        old[..., -1] = float("nan")
        loss, _ = rlkernels.value_loss(v, old, ret, clip=clip)
        assert np.isnan(reference.value_loss(v, old, ret, clip=clip)[0]) and torch.isnan(loss)


@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "k3"])
def test_kl_penalty(isa, kind):
    g = torch.Generator().manual_seed(5)
    logp = -torch.rand(3, 1037, generator=g, dtype=torch.float64) * 3
    ref = logp + torch.randn(3, 1037, generator=g, dtype=torch.float64)
    ref[0, :4] = logp[0, :4] + torch.tensor([30.0, -30.0, 0.0, 3.0], dtype=torch.float64)  # both clamps
    logp, ref = logp.float(), ref.float()
    x = logp.clone().requires_grad_()
    out = rlkernels.kl_penalty(x, ref, kind)
    assert_close(out, reference.kl_penalty(logp, ref, kind), torch.float32, name=kind)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(w.float())
    y = logp.double().requires_grad_()
    torch_kl(y, ref.double(), kind).backward(w)
    assert_close(x.grad, y.grad, torch.float32, name=f"grad {kind}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(3, 37), (2, 4099), (9001,)])
def test_ppo_family_16bit(isa, dtype, shape):
    """16-bit inputs run the float32 kernels on widened copies of each chunk of 4096 tokens (csrc/cpu/ppo.cpp), and
    their gradients come back rounded to the 16-bit type: policy loss, value loss and KL penalty, forward and
    backward, against the reference and the torch oracles on the rounded inputs."""
    logp, old, adv = (x.to(dtype) for x in sample_inputs("ppo_policy_loss", shape, seed=shape[-1]))
    mask = sample_mask(shape, "bool", 2) if len(shape) == 2 else None
    agg = "seq-mean-token-mean" if len(shape) == 2 else "token-mean"
    check_policy(logp, old, adv, mask, dtype=dtype, agg=agg, dual_clip=3.0, clip_high=0.28)
    v, old_v, ret = (x.to(dtype) for x in sample_inputs("value_loss", shape, seed=shape[-1] + 1))
    check_value(v, old_v, ret, mask, dtype=dtype, clip=0.2)
    ref = (logp.double() + 0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    ref = ref.to(dtype)
    for kind in ("k1", "k3"):
        x = logp.clone().requires_grad_()
        out = rlkernels.kl_penalty(x, ref, kind)
        assert out.dtype == torch.float32
        assert_close(out, reference.kl_penalty(logp, ref, kind), dtype, name=kind)
        out.backward(torch.ones_like(out))
        assert x.grad.dtype == dtype
        y = logp.double().requires_grad_()
        torch_kl(y, ref.double(), kind).sum().backward()
        assert_close(x.grad, y.grad, dtype, name=f"grad {kind}")
    # The same float32 kernels on the widened inputs: the same sums in the same order, and gradients that round
    # to the same bits as a cast of the float32 gradients (nearest even).
    calls = (
        lambda a, b, c: rlkernels.ppo_policy_loss(a, b, c, mask, agg=agg, dual_clip=3.0)[0],
        lambda a, b, c: rlkernels.value_loss(a, b, c, mask, clip=0.2)[0],
        lambda a, b, c: (rlkernels.kl_penalty(a, b, "k3") * c.float()).sum(),
    )
    for call, inputs in zip(calls, ((logp, old, adv), (v, old_v, ret), (logp, ref, adv))):
        x16 = inputs[0].clone().requires_grad_()
        x32 = inputs[0].float().requires_grad_()
        out16, out32 = call(x16, *inputs[1:]), call(x32, *(t.float() for t in inputs[1:]))
        assert torch.equal(out16, out32)
        out16.backward()
        out32.backward()
        assert torch.equal(x16.grad, x32.grad.to(dtype))


def _same_bits(got, want):
    """got and want equal bit for bit where want is a number; NaN where it is NaN (payloads aside)."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    bits = torch.int32 if got.dtype == torch.float32 else torch.int16
    assert torch.equal(got[~nan].view(bits), want[~nan].view(bits))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_conversions_are_exact(isa, dtype):
    """The widening of 16-bit inputs and the rounding of 16-bit gradients (csrc/cpu/simd.h load_f16 / store_f16,
    load_bf16 / store_bf16, as the PPO family's kernels load and store them) give the bits of torch's casts: every 16-bit value widened (k1 of logp against 0 is
    logp), and float32 gradients of every exponent, at and beside each rounding midpoint, rounded (k1's
    gradient is the incoming one)."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    x = every.clone().requires_grad_()
    out = rlkernels.kl_penalty(x, torch.zeros_like(every), "k1")
    _same_bits(out, every.float())
    dropped = 13 if dtype == torch.float16 else 16  # float32 mantissa bits a cast to dtype rounds away
    half = 1 << (dropped - 1)
    widened = every.float().view(torch.int32)
    g = torch.cat([widened + k for k in (half - 1, half, half + 1, 3 * half)]
                  + [torch.randint(-(1 << 31), 1 << 31, (65536,), generator=torch.Generator().manual_seed(5))
                     .to(torch.int32)]).view(torch.float32)
    x = torch.cat([every] * 5).requires_grad_()
    rlkernels.kl_penalty(x, torch.zeros_like(x), "k1").backward(g)
    _same_bits(x.grad, g.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 7, 2053, 4099])
def test_gather_logprobs(isa, dtype, V):
    logits = randn((5, V), dtype, scale=3.0, seed=V)
    logits[2, : V // 2] = float("-inf")  # entries that weigh nothing
    tokens = random_tokens((5,), V, seed=V + 1)
    tokens[2] = V - 1
    tokens[4] = -100
    x = logits.clone().requires_grad_()
    logp, entropy = rlkernels.gather_logprobs(x, tokens, temperature=0.8, return_entropy=True, ignore_index=-100)
    want_logp, want_entropy = reference.gather_logprobs(
        logits.double(), tokens, temperature=0.8, return_entropy=True, ignore_index=-100
    )
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-5, "atol": 5e-5}
    assert_close(logp, want_logp, name="logp", **tol)
    assert_close(entropy, want_entropy, name="entropy", **tol)
    g_logp, g_entropy = randn((5,), seed=3, scale=3.0), randn((5,), seed=4, scale=3.0)
    (logp * g_logp.float() + entropy * g_entropy.float()).sum().backward()
    y = logits.double().requires_grad_()
    o_logp, o_entropy = torch_oracle(y, tokens, 0.8, ignore_index=-100)
    (o_logp * g_logp + o_entropy * g_entropy).sum().backward()
    assert_close(x.grad, y.grad, **GRAD_TOL[dtype])
    # Without entropy the backward takes the other vector loop.
    x.grad = None
    rlkernels.gather_logprobs(x, tokens, temperature=0.8, ignore_index=-100).sum().backward()
    y.grad = None
    torch_oracle(y, tokens, 0.8, ignore_index=-100)[0].sum().backward()
    assert_close(x.grad, y.grad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_gather_logprobs_chunks(isa, dtype, temperature):
    """Rows that take each way through the SIMD kernel's chunked fold (test_logprobs.chunked_rows)."""
    check_chunked_rows(dtype, temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_logprobs_nan_payloads_and_exact_zeros(isa, dtype):
    """The SSE2 fold's exp adds 2^k into the exponent bits of 2^f (csrc/cpu/simd.h exp2_clamped_v), the others
    clamp and scale: at every level a NaN logit whatever its payload, quiet or signaling, either sign, gives NaN
    in the first chunk and in a later one; a row of -inf but one logit gives logp 0 and entropy 0 exactly, with a
    temperature too (z - m is exactly 0 at the max); logits 86 to 90 nats below the max (2^k leaving the normal
    range) weigh nothing."""
    V = 2048 + 300  # a first chunk and a later one (csrc/cpu/logprobs_simd.h kLogitChunk)
    payloads = {torch.float32: [0x7FC00000, 0x7FC001FF, 0xFFC0017F, 0x7F800001, 0xFF80FFFF, 0x7FFFFFFF],
                torch.bfloat16: [0x7FC0, 0x7FC1, 0xFFC0, 0x7F81, 0xFF81, 0x7FFF]}[dtype]
    bits_dtype = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
    rows = []
    for at in (5, 2100):
        for p in payloads:
            row = randn((V,), torch.float32, scale=2.0, seed=p % 1000 + at).to(dtype)
            row.view(bits_dtype)[at] = torch.tensor(p, dtype=torch.int64).to(bits_dtype)  # the bits, wrapped
            assert row[at].isnan()
            rows.append(row)
    x = torch.stack(rows)
    tokens = torch.zeros(len(rows), dtype=torch.long)
    logp, entropy = rlkernels.gather_logprobs(x, tokens, return_entropy=True)
    assert logp.isnan().all() and entropy.isnan().all()
    assert rlkernels.gather_logprobs(x, tokens).isnan().all()

    one_hot = torch.full((3, V), float("-inf"), dtype=dtype)
    one_hot[0, 7], one_hot[1, 2200], one_hot[2, V - 1] = 3.0, -50.0, 1e4
    tokens = torch.tensor([7, 2200, V - 1])
    for temperature in (1.0, 0.7):
        logp, entropy = rlkernels.gather_logprobs(one_hot, tokens, temperature=temperature, return_entropy=True)
        assert torch.equal(logp, torch.zeros(3)) and torch.equal(entropy, torch.zeros(3)), (logp, entropy)

    near = torch.full((2, V), -88.0, dtype=torch.float32)
    near[:, 100:400] = torch.linspace(-90.0, -86.0, 300)
    near[0, 3], near[1, 2300] = 0.0, 0.0  # the max: every other term is below 2^-124
    near = near.to(dtype)
    tokens = torch.tensor([3, 200])
    logp, entropy = rlkernels.gather_logprobs(near, tokens, return_entropy=True)
    want_logp, want_entropy = reference.gather_logprobs(near.double().numpy(), tokens.numpy(), return_entropy=True)
    assert_close(logp, torch.from_numpy(want_logp), name="logp", rtol=1e-6, atol=1e-6)
    assert_close(entropy, torch.from_numpy(want_entropy), name="entropy", rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_logprobs_offsets_and_ties(isa, dtype):
    """At AVX2 the one-pass fold takes its exps against R = j ln 2 next to the running max while |max| <= 65536,
    and against the max beyond (csrc/cpu/logprobs_simd.h kAbsoluteFold): rows whose max lies on either side of
    that bound, with and without a temperature, and rows of tied logits match the reference at every level, and
    logp is the same bits with and without the entropy."""
    V = 3 * 2048 + 77  # a first chunk and later ones, folded in one pass
    offsets = [0.0, 25.0, -300.0, 6.5e4, -6.5e4, 6.6e4, -6.6e4, 2e5]
    rows = [randn((V,), torch.float32, scale=3.0, seed=i) + off for i, off in enumerate(offsets)]
    rising = torch.linspace(-40.0, 40.0, V)  # each later chunk's max passes the running one
    rows += [torch.zeros(V), torch.full((V,), 6.5e4), rising, rising.flip(0)]
    x = torch.stack(rows).to(dtype)
    tokens = random_tokens((len(rows),), V)
    for temperature in (1.0, 0.6, 1.5):
        logp, entropy = rlkernels.gather_logprobs(x, tokens, temperature=temperature, return_entropy=True)
        assert torch.equal(rlkernels.gather_logprobs(x, tokens, temperature=temperature), logp)
        want_logp, want_entropy = reference.gather_logprobs(x.double().numpy(), tokens.numpy(),
                                                            temperature=temperature, return_entropy=True)
        # z = x / T is rounded to float32 (its ulp is 2^-6 at 1e5) before anything else: the tolerance is its size
        z_max = x.double().abs().amax(1) / temperature
        atol = 5e-5 + 8 * 2.0 ** -24 * z_max
        for got, want, name in ((logp, want_logp, "logp"), (entropy, want_entropy, "entropy")):
            err = (got.double() - torch.from_numpy(want)).abs()
            assert (err <= atol + 1e-5 * torch.from_numpy(want).abs()).all(), (name, temperature, err, atol)
    # a uniform row: log V within a few 1e-6 (its terms are not 1 against R)
    uniform = torch.zeros(2, V, dtype=dtype)
    _, entropy = rlkernels.gather_logprobs(uniform, tokens[:2], return_entropy=True)
    assert_close(entropy, torch.full((2,), math.log(V)), name="entropy of a uniform row", rtol=0.0, atol=2e-5)


# GAE along time (csrc/cpu/gae_rows.h) for rows without mask: float32 and 16-bit inputs (widened as they load),
# one chunk and, at 70,001 steps, two (the second chunk's carry added back by the fix-up walk).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(5003,), (3, 1030), (70001,)])
def test_gae_rows(isa, shape, dtype):
    g = torch.Generator().manual_seed(shape[-1])
    r, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    term = torch.rand(shape, generator=g) < 0.01
    time_dim = 0 if len(shape) == 1 else -1
    adv, ret = rlkernels.gae(r, v, gamma=0.99, lam=0.95, terminated=term, bootstrap_value=0.5 if len(shape) == 1
                             else torch.full(shape[:1], 0.5), time_dim=time_dim)
    e_adv, e_ret = reference.gae(r.double(), v.double(), gamma=0.99, lam=0.95, terminated=term,
                                 bootstrap_value=0.5 if len(shape) == 1 else np.full(shape[:1], 0.5),
                                 time_dim=time_dim)
    assert adv.dtype == ret.dtype == torch.float32
    assert_close(adv, e_adv, torch.float32, name="advantages")  # the 16-bit values exactly, float32 sums
    assert_close(ret, e_ret, torch.float32, name="returns")


# Time-major groups of fewer sequences than the engine's 16 lanes walk in place: each step reads a whole row
# of 16 values (lanes past the sequences read the next step's, computed and never stored), the outputs are
# stored for the sequences' lanes only (a masked store of the last vector; its width differs per level), and
# the last rows, where 16 values would pass the inputs' end, go through the buffers. Widths with every
# remainder against the lane vectors of each level (4/8/16 float32, 2/4/8 float64); 20 and 33 leave a partial
# group after full ones. Outputs against the reference; gradients (GAE is linear in rewards, values and next
# values for fixed flags) by one directional difference of the reference per sequence:
# sum_t ga * (ref(x + d) - ref(x)) must equal sum_t grad * d, column by column.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [2, 3, 5, 8, 11, 12, 15, 20, 33])
def test_time_major_groups_of_fewer_sequences(isa, dtype, B):
    T = 77
    g = torch.Generator().manual_seed(B)
    r, v, nv = (torch.randn(T, B, generator=g, dtype=dtype) for _ in range(3))
    flags = {"terminated": torch.rand(T, B, generator=g) < 0.05,
             "truncated": torch.rand(T, B, generator=g) < 0.05, "mask": torch.rand(T, B, generator=g) < 0.9}
    kw = {"gamma": 0.99, "lam": 0.9, **flags}
    x = [t.clone().requires_grad_() for t in (r, v, nv)]
    adv, ret = rlkernels.gae(x[0], x[1], next_values=x[2], **kw)
    e_adv, e_ret = reference.gae(r.double(), v.double(), next_values=nv.double(), **kw)
    assert_close(adv, e_adv, dtype, name="advantages")
    assert_close(ret, e_ret, dtype, name="returns")
    ga = torch.randn(T, B, generator=g, dtype=torch.float64)
    (adv.double() * ga).sum().backward()
    for i, name in enumerate(("rewards", "values", "next_values")):
        d = torch.randn(T, B, generator=g, dtype=torch.float64)
        moved = [t.double() + d if j == i else t.double() for j, t in enumerate((r, v, nv))]
        e_moved, _ = reference.gae(moved[0], moved[1], next_values=moved[2], **kw)
        expected = (ga.numpy() * (np.asarray(e_moved) - np.asarray(e_adv))).sum(0)
        actual = (x[i].grad.double() * d).sum(0)
        assert_close(actual, expected, dtype, name=f"grad {name} along a direction, per sequence")
    d = rlkernels.discounted_returns(r, gamma=0.97, bootstrap_value=nv[-1], terminated=flags["terminated"])
    e_d = reference.discounted_returns(r.double(), gamma=0.97, bootstrap_value=nv[-1].double(),
                                       terminated=flags["terminated"])
    assert_close(d, e_d, dtype, name="discounted returns")


# 16-bit scans read their inputs in place: each walk widens bfloat16 / float16 values to float32 in registers as
# it loads them (time-major rows of 16 sequences and of fewer, lanes contiguous in time for batch-major rows, long
# sequences' chunks and packed sequences), and the buffered walk converts the ragged rest. The layouts below take
# each of those walks, with a time length off the 32-step blocks; the long time-major one is chunked (its
# chunks' maps walked in place on affine carries, then the chunks again).
SCAN_LAYOUTS_16BIT = {
    "time-major [T, 32]": ((2001, 32), 0, None),
    "time-major [T, 5]": ((2001, 5), 0, None),
    "time-major [T, 8], chunked": ((16411, 8), 0, None),
    "batch-major [48, T]": ((48, 1337), 1, None),
    "one long sequence": ((40003,), 0, None),
    "packed": ((40000,), 0, "cu"),
}


def _layout(name, n_values=None):
    shape, time_dim, packed = SCAN_LAYOUTS_16BIT[name]
    cu = None
    if packed:
        g = torch.Generator().manual_seed(7)
        lengths = torch.randint(0, 1500, (50,), generator=g)
        lengths[-1] = shape[0] - int(lengths[:-1].sum())
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return shape, time_dim, cu


def _finite_values(dtype, n, seed, below=None):
    """n values cycling through every finite bit pattern of dtype (|x| < below when given), shuffled."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    keep = torch.isfinite(every.float())
    if below is not None:
        keep &= every.float().abs() < below
    x = every[keep]
    g = torch.Generator().manual_seed(seed)
    x = x[torch.randperm(x.numel(), generator=g)]
    return x.repeat((n + x.numel() - 1) // x.numel())[:n]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", list(SCAN_LAYOUTS_16BIT))
@pytest.mark.parametrize("inputs", ["terminated", "mask", "next_values"])
def test_16bit_scans_widen_every_value_exactly(isa, dtype, layout, inputs):
    """With gamma = 0 a discounted return is its reward and an advantage its reward less its value, one float32
    rounding: every finite bit pattern of the type (subnormals, the largest, signed zeros by value) must come out as
    torch's float32 arithmetic on the widened values gives it, through each walk (the input sets pick walks
    specialized for them)."""
    shape, time_dim, cu = _layout(layout)
    n = math.prod(shape)
    below = 2.0**126  # a difference of two stays finite in float32
    r = _finite_values(dtype, n, seed=1, below=below).reshape(shape)
    v = _finite_values(dtype, n, seed=2, below=below).reshape(shape)
    g = torch.Generator().manual_seed(3)
    kw = {"time_dim": time_dim, "cu_seqlens": cu}
    if inputs == "terminated":
        kw["terminated"] = torch.rand(shape, generator=g) < 0.05
    elif inputs == "mask":
        kw["mask"] = torch.rand(shape, generator=g) < 0.9
    else:
        kw["next_values"] = _finite_values(dtype, n, seed=4).reshape(shape)
        kw["terminated"] = torch.rand(shape, generator=g) < 0.05
        kw["truncated"] = torch.rand(shape, generator=g) < 0.05
    keep = kw.get("mask", torch.ones(shape, dtype=torch.bool))
    ret = rlkernels.discounted_returns(r, gamma=0.0, **kw)
    assert ret.dtype == torch.float32
    assert torch.equal(ret, torch.where(keep, r.float(), 0.0)), "returns: the rewards widened"
    adv, _ = rlkernels.gae(r, v, gamma=0.0, lam=0.9, **kw)
    assert torch.equal(adv, torch.where(keep, r.float() - v.float(), 0.0)), "advantages: rewards less values"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", list(SCAN_LAYOUTS_16BIT))
def test_16bit_scans_against_float32(isa, dtype, layout):
    """GAE and V-trace on 16-bit inputs, forward and backward, against the same op on the values widened to
    float32: the float32 tolerance (only the accumulation is float32 in both). V-trace's backward reads its 16-bit
    inputs beside float32 gradients and saved values, through the walks that take any inputs."""
    shape, time_dim, cu = _layout(layout)
    g = torch.Generator().manual_seed(11)
    r, v, nv = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    lr = (0.5 * torch.randn(shape, generator=g)).to(dtype)
    flags = {"terminated": torch.rand(shape, generator=g) < 0.02, "truncated": torch.rand(shape, generator=g) < 0.02,
             "mask": torch.rand(shape, generator=g) < 0.9}
    kw = {"time_dim": time_dim, "cu_seqlens": cu, **flags}
    for op, args, extra in (
        (rlkernels.gae, (r, v), {"gamma": 0.99, "lam": 0.95, "next_values": nv}),
        (rlkernels.vtrace, (r, v, lr), {"gamma": 0.99, "next_values": nv}),
    ):
        x16 = [a.clone().requires_grad_() for a in args]
        x32 = [a.float().requires_grad_() for a in args]
        out16, out32 = op(*x16, **extra, **kw), op(*x32, **extra, **kw)
        w = [torch.randn(o.shape, generator=g) for o in out32]
        sum(((o * wi).sum() for o, wi in zip(out16, w)), torch.zeros(())).backward()
        sum(((o * wi).sum() for o, wi in zip(out32, w)), torch.zeros(())).backward()
        for i, (o16, o32) in enumerate(zip(out16, out32)):
            assert o16.dtype == torch.float32
            assert_close(o16, o32, torch.float32, name=f"{op.__name__} output {i}")
        for i, (a16, a32) in enumerate(zip(x16, x32)):
            assert a16.grad.dtype == dtype
            # the float32 gradient rounded to dtype once: at most one rounding apart
            assert_close(a16.grad.float(), a32.grad.to(dtype).float(), name=f"{op.__name__} grad {i}",
                         rtol=2.0 ** -(7 if dtype == torch.bfloat16 else 10), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("A", [3, 18])
@pytest.mark.parametrize("kind", ["max", "double", "expected", "soft"])
def test_q_targets(isa, dtype, A, kind):
    r, q, online, probs, term = sample_inputs("q_targets", (37,), dtype=dtype, A=A)
    extra = {"double": {"next_q_online": online}, "expected": {"next_probs": probs},
             "soft": {"temperature": 0.7}}.get(kind, {})
    y = rlkernels.q_targets(r, q, terminated=term, gamma=0.9, kind=kind, **extra)
    want = reference.q_targets(r.double(), q.double(), terminated=term, gamma=0.9, kind=kind,
                               **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in extra.items()})
    assert_close(y, want, torch.float32)


@pytest.mark.parametrize("A", [5, 9, 12, 18])
@pytest.mark.parametrize("kind", ["max", "double", "expected", "soft"])
def test_q_targets_ties_nan_inf(isa, kind, A):
    # Each level's row vectors (4 floats under SSE2, 8 above): ties, the overlapping last vector, NaN, +-inf.
    check_q_rows_ties_nan_inf(kind, A)


@pytest.mark.parametrize("loss", ["huber", "squared"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_td_loss(isa, loss, reduction):
    q, actions, targets, weights = sample_inputs("td_loss", (1037, 6), dtype=torch.float32)
    qg = q.clone().requires_grad_()
    out, td = rlkernels.td_loss(qg, actions, targets, loss=loss, weights=weights, reduction=reduction)
    want, want_td = reference.td_loss(q.double(), actions, targets.double(), loss=loss, weights=weights.double(),
                                      reduction=reduction)
    assert_close(out, want, torch.float32, name="loss")
    assert_close(td, want_td, torch.float32, name="td_errors")
    out.sum().backward()
    x = q.double().requires_grad_()
    e = targets.double() - x.gather(1, actions[:, None])[:, 0]
    per = torch.nn.functional.huber_loss(e, torch.zeros_like(e), reduction="none") if loss == "huber" else e * e
    per = per * weights.double()
    (per.mean() if reduction == "mean" else per.sum()).backward()
    assert_close(qg.grad, x.grad, torch.float32, name="grad q")


def _log_rhos_over_the_float_range(shape, seed):
    """log-rhos from below exp's underflow to above its overflow, the edges of float32's exp and +-inf, shuffled."""
    g = torch.Generator().manual_seed(seed)
    edges = [-math.inf, -200.0, -104.0, -103.97, -103.0, -95.0, -87.34, -87.33, -87.0, -1e-30, 0.0, 1e-30, 1.0,
             80.0, 88.0, 88.72, 88.73, 89.0, 95.0, 1000.0, math.inf]
    n = math.prod(shape)
    grid = torch.linspace(-110.0, 95.0, n - len(edges), dtype=torch.float64)
    values = torch.cat([torch.tensor(edges, dtype=torch.float64), grid]).float()
    return values[torch.randperm(n, generator=g)].reshape(shape)


@pytest.mark.parametrize("shape", [(64, 48), (33, 5)])
def test_vtrace_retrace_exp_over_the_float_range(isa, shape):
    """The scan steps' vector exp (V-trace's and Retrace's e^{log_rho}) against float32's exp, over the whole range.

    With gamma = 0, V = 0 and pg_rho_clip = inf, pg_advantages_t = e^{log_rho_t} r_t: one exp per element. Its
    gradient in log_rho_t is e^{log_rho_t} r_t, taken where e is finite (an infinite weight times gamma = 0 makes the
    adjoint of vs NaN, as the formula's autograd does).
    """
    lr = _log_rhos_over_the_float_range(shape, seed=shape[1])
    g = torch.Generator().manual_seed(1)
    r = torch.randn(shape, generator=g) + 0.5
    v, boot = torch.zeros(shape), torch.zeros(shape[1])
    tiny = 2.0**-147 * float(r.abs().max())  # a few subnormal steps of e, times r

    def e32(x):  # exp rounded to float32: inf above its range, subnormals, then 0
        return torch.exp(x.double()).float().double()

    _vs, pg = rlkernels.vtrace(r, v, lr, gamma=0.0, pg_rho_clip=math.inf, bootstrap_value=boot)
    want = (e32(lr) * r.double()).float()  # the product rounded to float32 too: inf where it overflows
    assert_close(pg, want, torch.float32, name="pg_advantages", rtol=1e-6, atol=tiny, scale=1.0)
    assert torch.isinf(pg[lr > 88.73]).all() and (pg[lr < -104.0] == 0).all()
    lr_leaf = lr.clamp(max=88.0).requires_grad_()
    _vs, pg = rlkernels.vtrace(r, v, lr_leaf, gamma=0.0, pg_rho_clip=math.inf, bootstrap_value=boot)
    (grad,) = torch.autograd.grad(pg, lr_leaf, torch.ones_like(pg))
    want_grad = (e32(lr_leaf.detach()) * r.double()).float()
    assert_close(grad, want_grad, torch.float32, name="grad log_rhos", rtol=1e-6, atol=tiny, scale=1.0)
    # Retrace's trace coefficients c = lam min(1, e^{log_rho}) through a whole recursion, against the reference
    q, nv = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    term = torch.rand(shape, generator=g) < 0.05
    G = rlkernels.retrace(r, q, nv, lr, gamma=0.99, lam=0.95, terminated=term)
    with np.errstate(over="ignore"):  # e^1000 and e^inf: inf in float64 too, then clipped to 1
        e_G = reference.retrace(r.double(), q.double(), nv.double(), lr.double(), gamma=0.99, lam=0.95,
                                terminated=term)
    assert_close(G, e_G, torch.float32, name="retrace")


@pytest.mark.parametrize("shape", [(64, 48), (33, 5)])
def test_vtrace_retrace_exp_over_the_double_range(isa, shape):
    """The scan steps' float64 vector exp (simd.h exp_any_vd) against float64's exp, over the whole range.

    As the float32 test above: pg_advantages_t = e^{log_rho_t} r_t with gamma = 0, V = 0 and
    pg_rho_clip = inf, from below exp's underflow (about -745.13) to above its overflow (about 709.78), the
    gradient where e is finite, and Retrace's recursion against the reference.
    """
    g = torch.Generator().manual_seed(shape[1])
    edges = [-math.inf, -1000.0, -746.0, -745.2, -745.13, -745.1, -740.0, -708.4, -708.39, -1e-300, 0.0,
             1e-300, 1.0, 700.0, 709.78, 709.783, 709.79, 710.0, 1000.0, math.inf]
    n = math.prod(shape)
    grid = torch.linspace(-750.0, 715.0, n - len(edges) - n // 2, dtype=torch.float64)
    near = torch.rand(n // 2, generator=g, dtype=torch.float64) * 4 - 2  # |r| up to ln 2 / 2 at many k
    lr = torch.cat([torch.tensor(edges, dtype=torch.float64), grid, near])[torch.randperm(n, generator=g)]
    lr = lr.reshape(shape)
    r = torch.randn(shape, generator=g, dtype=torch.float64) + 0.5
    v, boot = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape[1], dtype=torch.float64)
    tiny = 2.0**-1072 * float(r.abs().max())  # a few subnormal steps of e, times r
    _vs, pg = rlkernels.vtrace(r, v, lr, gamma=0.0, pg_rho_clip=math.inf, bootstrap_value=boot)
    want = torch.exp(lr) * r
    assert_close(pg, want, torch.float64, name="pg_advantages", rtol=1e-15, atol=tiny, scale=1.0)
    assert torch.isinf(pg[lr > 709.79]).all() and (pg[lr < -745.2] == 0).all()
    lr_leaf = lr.clamp(max=700.0).requires_grad_()
    _vs, pg = rlkernels.vtrace(r, v, lr_leaf, gamma=0.0, pg_rho_clip=math.inf, bootstrap_value=boot)
    (grad,) = torch.autograd.grad(pg, lr_leaf, torch.ones_like(pg))
    assert_close(grad, torch.exp(lr_leaf.detach()) * r, torch.float64, name="grad log_rhos", rtol=1e-15,
                 atol=tiny, scale=1.0)
    q = torch.randn(shape, generator=g, dtype=torch.float64)
    nv = torch.randn(shape, generator=g, dtype=torch.float64)
    term = torch.rand(shape, generator=g) < 0.05
    G = rlkernels.retrace(r, q, nv, lr, gamma=0.99, lam=0.95, terminated=term)
    with np.errstate(over="ignore"):  # e^1000 and e^inf: inf, then clipped to 1
        e_G = reference.retrace(r, q, nv, lr, gamma=0.99, lam=0.95, terminated=term)
    assert_close(G, e_G, torch.float64, name="retrace")


def test_bellman_backup(isa):
    P, R, V = sample_inputs("bellman_backup", (2, 37, 3), dtype=torch.float32)
    Q, V_new, policy = rlkernels.bellman_backup(P, R, V, gamma=0.9)
    e_Q, e_V, e_policy = reference.bellman_backup(P.double(), R.double(), V.double(), 0.9)
    assert_close(Q, e_Q, torch.float32)
    assert_close(V_new, e_V, torch.float32)


SCRIPT = r"""
import json, numpy as np, torch, rlkernels
from rlkernels import reference
level = torch.ops.rlkernels._cpu_isa("").split("|")[0]
g = torch.Generator().manual_seed(0)
worst = 0.0
for shape, td in (((64, 48), 0), ((16, 103), -1), ((2, 20000), -1), ((37, 5), 0)):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        term = torch.rand(shape, generator=g) < 0.02
        mask = torch.rand(shape, generator=g) < 0.9
        adv, ret = rlkernels.gae(r, v, gamma=0.99, lam=0.95, terminated=term, mask=mask, time_dim=td)
        e_adv, e_ret = reference.gae(r.double(), v.double(), gamma=0.99, lam=0.95, terminated=term, mask=mask,
                                     time_dim=td)
        scale = max(1.0, float(np.abs(e_adv).max()))
        worst = max(worst, float(np.abs(adv.double().numpy() - e_adv).max()) / scale)
        # Retrace: the V-trace-like exp of its trace coefficients, one carry, through the same walks
        q, nv = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
        lr = (0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
        G = rlkernels.retrace(r, q, nv, lr, gamma=0.99, lam=0.95, terminated=term, mask=mask, time_dim=td)
        e_G = reference.retrace(r.double(), q.double(), nv.double(), lr.double(), gamma=0.99, lam=0.95,
                                terminated=term, mask=mask, time_dim=td)
        scale = max(1.0, float(np.abs(e_G).max()))
        worst = max(worst, float(np.abs(G.double().numpy() - e_G).max()) / scale)
print(json.dumps({"level": level, "scan": worst}))
"""


@pytest.mark.parametrize("level", LEVELS)
def test_environment_caps_the_level(level):
    """RLKERNELS_CPU_ISA caps the level at first use, for the scan engine as for every other kernel."""
    env = {**os.environ, "RLKERNELS_CPU_ISA": level}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    levels = machine_levels()
    assert result["level"] == (level if level in levels else levels[-1])
    # bf16 inputs are compared on their rounded values, so the error is float32 accumulation only
    assert result["scan"] < 1e-4, result


def test_every_build_is_vectorized():
    """scripts/check_simd.py on the loaded library: needs objdump, not the instruction sets themselves."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    library = Path(rlkernels._C.__file__)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_simd.py"), str(library)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def _listing(body, name="rlkernels::cpu::simd::isa_avx2::ppo_policy_forward(float const*)"):
    """A function named like an avx2 kernel (or `name`) whose block loop is `body` (mnemonic, operands), as
    disassemble() returns it."""
    insns = [(0x100, "xor", "%eax,%eax")]
    addr = 0x104
    for op, args in body:
        insns.append((addr, op, args))
        addr += 4
    insns.append((addr, "jne", "104 <f+0x4>"))
    insns.append((addr + 4, "ret", ""))
    return {name: insns}


def test_check_simd_flags_scalar_and_narrow_loops():
    """The disassembly check fails on what it is meant to catch: a loop of scalar ss arithmetic, one on
    registers narrower than its level's, one that builds a mask lane by lane, one that calls a function."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import check_simd
    finally:
        sys.path.pop(0)
    check = lambda body: check_simd.check_kernel(_listing(body), "avx2", "ppo_policy_forward",  # noqa: E731
                                                 ("ppo_policy_forward(",), "ymm")
    assert check([("vmulps", "%ymm1,%ymm2,%ymm3"), ("vaddps", "%ymm3,%ymm4,%ymm4")]) == []
    assert "scalar arithmetic: vaddss" in check([("vmulps", "%ymm1,%ymm2,%ymm3"), ("vaddss", "%xmm3,%xmm4,%xmm4")])[0]
    assert "computes on xmm, not ymm" in check([("vmulps", "%xmm1,%xmm2,%xmm3")])[0]
    assert "not vectorized" in check([("vaddss", "%xmm3,%xmm4,%xmm4")])[0]
    assert "masks lane by lane" in check([("vaddps", "%ymm3,%ymm4,%ymm4"), ("setne", "%al")])[0]
    assert "calls <expf@plt>" in check([("vaddps", "%ymm3,%ymm4,%ymm4"), ("call", "1040 <expf@plt>")])[0]
    assert "no function" in check_simd.check_kernel({}, "avx2", "ppo_policy_forward", ("ppo_policy_forward(",),
                                                    "ymm")[0]
    # libm's exp is allowed in the float64 V-trace walk under SSE2 only
    patterns = check_simd.KERNELS["scan_vtrace_f64"][0]
    for level, width, allowed in (("default", "xmm", True), ("avx2", "ymm", False)):
        ns = f"rlkernels::isa_{level}::"
        name = f"void {ns}run_direct<{ns}VtraceStepT<{ns}VecExp>, double, false>(double const*)"
        body = [("mulpd", f"%{width}1,%{width}2"), ("call", "1040 <exp@plt>")]
        failures = check_simd.check_kernel(_listing(body, name), level, "scan_vtrace_f64", patterns, width)
        assert failures == [] if allowed else "calls <exp@plt>" in failures[0]
