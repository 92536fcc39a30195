"""CUDA kernels of the PPO loss family (csrc/cuda/ppo.cu; gather_logprobs's are in test_logprobs.py).

Oracles: the CPU backend (the verified kernels, same semantics rule for rule), the NumPy reference and a
float64 torch re-implementation. ``backend=BACKEND`` on CUDA tensors must give the CPU backend's outputs and
gradients up to float rounding (different summation orders), for every dtype and option. Then the CUDA-only
properties: bit-identical repeated runs, opcheck, torch.compile(fullgraph=True), and that the log-prob
forward allocates nothing of the logits' size.

Every test is skipped without a GPU or without the ops' CUDA kernels (an rlkernels built without nvcc).
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import assert_close

import rlkernels
from rlkernels import reference
from rlkernels.ppo import AGGS, KL_KINDS, POLICY_STATS

LOGPROB_OPS = ("gather_logprobs", "gather_logprobs_backward", "gather_logprobs_backward_inplace")
PPO_OPS = ("ppo_policy_loss", "ppo_policy_loss_backward", "value_loss", "value_loss_backward", "kl_penalty",
           "kl_penalty_backward")


def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rlkernels::{op}", "CUDA")


_MISSING = [op for op in LOGPROB_OPS + PPO_OPS if not _has_cuda_kernel(op)]
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(bool(_MISSING), reason=f"no CUDA kernel for {', '.join(_MISSING)}"),
]
DEVICE = "cuda"
# The GPU backend under test: scripts/gpu.sh runs this file once per backend (cuda, then triton).
BACKEND = os.environ.get("RLKERNELS_GPU_TEST_BACKEND", "cuda")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
VOCABS = (1, 7, 1000, 32000, 151936)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# Kernel against kernel (CPU vs CUDA) on the same input values: accumulation order only.
# Absolute tolerances (scale=1.0) for logp / entropy / losses.
TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10, "scale": 1.0},
    torch.float32: {"atol": 5e-5, "rtol": 2e-5, "scale": 1.0},
    torch.bfloat16: {"atol": 5e-5, "rtol": 2e-5, "scale": 1.0},
    torch.float16: {"atol": 5e-5, "rtol": 2e-5, "scale": 1.0},
}
# Gradients are stored in the input dtype: one ulp of it apart at most (different exp and summation).
GRAD_TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10, "scale": 1.0},
    torch.float32: {"atol": 1e-6, "rtol": 2e-5, "scale": 1.0},
    torch.bfloat16: {"atol": 2e-3, "rtol": 2e-2, "scale": 1.0},
    torch.float16: {"atol": 2e-4, "rtol": 2e-3, "scale": 1.0},
}


# ----------------------------------------------------------------------------------------------------
# gather_logprobs
# ----------------------------------------------------------------------------------------------------


def make_logits(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def make_tokens(shape, V, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, shape, generator=g)


# ----------------------------------------------------------------------------------------------------
# PPO loss family
# ----------------------------------------------------------------------------------------------------


def policy_inputs(shape, seed=0, dtype=torch.float32, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    old = logp + torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    return logp.to(dtype), old.to(dtype), adv.to(dtype)


def value_inputs(shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    old = v + torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3
    ret = v + torch.randn(shape, generator=gen, dtype=torch.float64)
    return v.to(dtype), old.to(dtype), ret.to(dtype)


def make_mask(shape, kind, seed=0):
    if kind is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=gen, dtype=torch.float64) > 0.3
    if len(shape) == 2 and shape[0] > 1:
        m[1] = False  # a row with no token
    if kind == "all-masked":
        m[:] = False
    return m.to(torch.uint8) if kind == "uint8" else m


# (B, T): one token; small; rows over several units (kUnitTokens = 1024) with a ragged last one; a long row.
SHAPES = ((1, 1), (5, 37), (3, 2500), (1, 5000), (300, 3))


def to_dev(*xs):
    return tuple(None if x is None else x.to(DEVICE) for x in xs)


def policy_both(logp, old, adv, mask, **kw):
    """(loss, stats, grad) of the CUDA and the CPU backend."""
    out = []
    for dev, backend in ((DEVICE, "cuda"), ("cpu", "cpu")):
        lp = logp.to(dev).clone().requires_grad_(True)
        loss, stats = rlkernels.ppo_policy_loss(lp, *to_dev(old, adv, mask) if dev == DEVICE else (old, adv, mask),
                                                backend=backend, **kw)
        (loss * 1.7).backward()
        out.append((loss, stats, lp.grad))
    return out


@pytest.mark.parametrize("mask_kind", [None, "bool", "uint8", "all-masked"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_policy_loss_matches_cpu_and_reference(shape, agg, dual_clip, mask_kind):
    logp, old, adv = policy_inputs(shape, seed=sum(shape))
    mask = make_mask(shape, mask_kind, seed=shape[1])
    kw = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": dual_clip, "agg": agg}
    (loss, stats, grad), (c_loss, c_stats, c_grad) = policy_both(logp, old, adv, mask, **kw)
    assert loss.device.type == "cuda" and loss.shape == () and loss.dtype == torch.float32
    assert_close(loss, c_loss, **TOL[torch.float32], name="loss")
    for name in POLICY_STATS:
        assert stats[name].shape == () and stats[name].device.type == "cuda"
        assert_close(stats[name], c_stats[name], **TOL[torch.float32], name=name)
    assert_close(grad, c_grad, **GRAD_TOL[torch.float32], name="grad")
    exp_loss, exp_stats = reference.ppo_policy_loss(logp, old, adv, mask, **kw)
    assert_close(loss, torch.tensor(exp_loss), atol=1e-5, rtol=1e-5, scale=1.0, name="loss vs reference")
    for name in POLICY_STATS:
        assert_close(stats[name], torch.tensor(exp_stats[name]), atol=1e-5, rtol=1e-5, scale=1.0, name=f"{name} vs reference")
    if mask_kind == "all-masked":
        assert float(loss) == 0 and all(float(s) == 0 for s in stats.values())
        assert torch.all(grad == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_loss_dtypes_and_norm_length(dtype):
    logp, old, adv = policy_inputs((6, 1500), seed=2, dtype=dtype)
    mask = make_mask((6, 1500), "bool", seed=3)
    for agg in AGGS:
        kw = {"dual_clip": 2.5, "agg": agg, "norm_length": 4096.0 if agg == "seq-mean-token-sum-norm" else None}
        (loss, stats, grad), (c_loss, c_stats, c_grad) = policy_both(logp, old, adv, mask, **kw)
        assert loss.dtype == acc_dtype(dtype) and grad.dtype == dtype
        assert_close(loss, c_loss, **TOL[dtype], name=agg)
        for name in POLICY_STATS:
            assert_close(stats[name], c_stats[name], **TOL[dtype], name=name)
        assert_close(grad, c_grad, **GRAD_TOL[dtype], name="grad")


def test_policy_loss_edges():
    # Huge log-ratios (clamped), zero advantages, ratio exactly 1, NaN at masked tokens only. (No ratio that
    # only nearly hits a clip bound: CPU and GPU exp may differ by an ulp there and take different tie shares.)
    logp, old, adv = policy_inputs((4, 300), seed=4, dtype=torch.float64)
    old[0, :50] = logp[0, :50] + 40.0
    old[0, 50:100] = logp[0, 50:100] - 40.0
    adv[1, :30] = 0.0
    old[2, :20] = logp[2, :20]
    mask = make_mask((4, 300), "bool", seed=5)
    logp[~mask] = float("nan")
    for agg in AGGS:
        (loss, stats, grad), (c_loss, c_stats, c_grad) = policy_both(logp, old, adv, mask, dual_clip=3.0, agg=agg)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert_close(loss, c_loss, **TOL[torch.float64], name=agg)
        for name in POLICY_STATS:
            assert_close(stats[name], c_stats[name], **TOL[torch.float64], name=name)
        assert_close(grad, c_grad, **GRAD_TOL[torch.float64], name="grad")
    # Empty inputs: 0 loss and stats, empty gradient.
    for shape in ((0, 5), (3, 0)):
        lp = torch.zeros(shape, device=DEVICE, requires_grad=True)
        loss, stats = rlkernels.ppo_policy_loss(lp, lp.detach(), lp.detach(), agg="seq-mean-token-mean",
                                                backend=BACKEND)
        assert float(loss) == 0 and all(float(s) == 0 for s in stats.values())
        loss.backward()
        assert lp.grad.shape == shape


@pytest.mark.parametrize("mask_kind", [None, "bool", "all-masked"])
@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_value_loss_matches_cpu_and_reference(dtype, agg, clip, mask_kind):
    for shape in ((5, 37), (3, 2500)):
        v, old, ret = value_inputs(shape, seed=shape[1], dtype=dtype)
        mask = make_mask(shape, mask_kind, seed=7)
        res = []
        for dev, backend in ((DEVICE, "cuda"), ("cpu", "cpu")):
            x = v.to(dev).clone().requires_grad_(True)
            args = to_dev(old, ret, mask) if dev == DEVICE else (old, ret, mask)
            loss, stats = rlkernels.value_loss(x, *args, clip=clip, agg=agg, backend=backend)
            (loss * 0.3).backward()
            res.append((loss, stats["vf_clipfrac"], x.grad))
        (loss, frac, grad), (c_loss, c_frac, c_grad) = res
        assert loss.dtype == acc_dtype(dtype) and loss.device.type == "cuda"
        assert_close(loss, c_loss, **TOL[dtype], name="loss")
        assert_close(frac, c_frac, **TOL[dtype], name="vf_clipfrac")
        assert_close(grad, c_grad, **GRAD_TOL[dtype], name="grad")
        exp_loss, exp_stats = reference.value_loss(v, old, ret, mask, clip=clip, agg=agg)
        assert_close(loss, torch.tensor(exp_loss), atol=1e-5, rtol=1e-5, scale=1.0, name="loss vs reference")
        assert_close(frac, torch.tensor(exp_stats["vf_clipfrac"]), atol=1e-5, rtol=1e-5, scale=1.0, name="vf_clipfrac vs reference")
        if mask_kind == "all-masked":
            assert float(loss) == 0 and float(frac) == 0 and torch.all(grad == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_penalty_matches_cpu_and_reference(kind, dtype):
    logp, ref, _ = policy_inputs((3, 7, 129), seed=8, dtype=dtype, scale=3.0)
    ref[0, 0, :5] = logp[0, 0, :5]  # k1 = 0: abs's derivative is 0 there
    ref[0, 1, :5] = logp[0, 1, :5] + 30.0  # k3 clamps
    res = []
    for dev, backend in ((DEVICE, "cuda"), ("cpu", "cpu")):
        x = logp.to(dev).clone().requires_grad_(True)
        out = rlkernels.kl_penalty(x, ref.to(dev), kind, backend=backend)
        g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape).to(dev)
        out.backward(g)
        res.append((out, x.grad))
    (out, grad), (c_out, c_grad) = res
    assert out.dtype == acc_dtype(dtype) and out.shape == logp.shape
    assert_close(out, c_out, **TOL[dtype], name=kind)
    assert_close(grad, c_grad, **GRAD_TOL[dtype], name=f"grad {kind}")
    assert_close(out, torch.as_tensor(reference.kl_penalty(logp, ref, kind)), **TOL[dtype], name=f"{kind} vs reference")
    # empty and non-contiguous
    empty = torch.zeros(0, 4, device=DEVICE, dtype=dtype)
    assert rlkernels.kl_penalty(empty, empty, kind, backend=BACKEND).shape == (0, 4)
    t = logp.to(DEVICE).transpose(0, 2)
    assert_close(rlkernels.kl_penalty(t, ref.to(DEVICE).transpose(0, 2), kind, backend=BACKEND), rlkernels.kl_penalty(logp.transpose(0, 2), ref.transpose(0, 2), kind, backend="cpu"), **TOL[dtype])


def test_ppo_repeated_runs_are_bit_identical():
    logp, old, adv = (x.to(DEVICE) for x in policy_inputs((64, 4099), seed=9))
    mask = make_mask((64, 4099), "bool", seed=10).to(DEVICE)
    v, vold, ret = (x.to(DEVICE) for x in value_inputs((64, 4099), seed=11))

    def run():
        outs = []
        for agg in AGGS:
            lp = logp.clone().requires_grad_(True)
            loss, stats = rlkernels.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0, agg=agg, backend=BACKEND)
            loss.backward()
            x = v.clone().requires_grad_(True)
            vl, vs = rlkernels.value_loss(x, vold, ret, mask, clip=0.2, agg=agg, backend=BACKEND)
            vl.backward()
            outs += [loss, *stats.values(), lp.grad, vl, vs["vf_clipfrac"], x.grad]
        return outs

    first = run()
    for _ in range(3):
        for a, b in zip(first, run()):
            assert torch.equal(a, b)


def test_ppo_opcheck():
    logp, old, adv = (x.to(DEVICE) for x in policy_inputs((3, 1100), seed=12))
    mask = make_mask((3, 1100), "bool", seed=13).to(DEVICE)
    lp = logp.clone().requires_grad_(True)
    g = torch.tensor(1.5, device=DEVICE)
    ops = torch.ops.rlkernels
    samples = [
        (ops.ppo_policy_loss.default, (lp, old, adv, mask, 0.2, 0.28, 3.0, "seq-mean-token-mean", 1100.0)),
        (ops.ppo_policy_loss.default, (lp, old, adv, None, 0.2, 0.2, None, "token-mean", 1100.0)),
        (ops.ppo_policy_loss_backward.default, (g, logp, old, adv, mask, 0.2, 0.2, 2.0, "token-mean", 1100.0)),
        (ops.ppo_policy_loss_backward.default,
         (g, logp, old, adv, mask, 0.2, 0.2, None, "seq-mean-token-sum-norm", 2000.0)),
    ]
    v, vold, ret = (x.to(DEVICE) for x in value_inputs((3, 1100), seed=14))
    samples += [
        (ops.value_loss.default, (v.clone().requires_grad_(True), vold, ret, mask, 0.2, "token-mean")),
        (ops.value_loss_backward.default, (g, v, vold, ret, None, None, "seq-mean-token-sum")),
        (ops.value_loss_backward.default, (g, v, vold, ret, mask, 0.1, "seq-mean-token-mean")),
        (ops.kl_penalty.default, (lp, old, "k3")),
        (ops.kl_penalty_backward.default, (torch.randn(3, 1100, device=DEVICE), logp, old, "abs")),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_ppo_compile_fullgraph():
    torch._dynamo.reset()
    logp, old, adv = (x.to(DEVICE) for x in policy_inputs((4, 1030), seed=15))
    v, vold, ret = (x.to(DEVICE) for x in value_inputs((4, 1030), seed=16))
    mask = make_mask((4, 1030), "bool", seed=17).to(DEVICE)

    def step(lp, vals):
        pl, stats = rlkernels.ppo_policy_loss(lp, old, adv, mask, clip_high=0.28, dual_clip=3.0,
                                              agg="seq-mean-token-mean", backend=BACKEND)
        vl, vstats = rlkernels.value_loss(vals, vold, ret, mask, clip=0.2, backend=BACKEND)
        kl = rlkernels.kl_penalty(lp, old, "k3", backend=BACKEND)
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


def test_default_backend_routes_to_cuda_kernels():
    """With the CUDA kernels built, CUDA tensors go to them (not Triton) when no backend is named."""
    from rlkernels._backend import resolve

    for op in ("gather_logprobs", "ppo_policy_loss", "value_loss", "kl_penalty"):
        assert resolve(None, torch.device(DEVICE), op) == "cuda"


# ----------------------------------------------------------------------------------------------------
# CUDA graphs and 64-bit indexing
# ----------------------------------------------------------------------------------------------------


def test_cuda_graph_captures_forward_and_backward():
    """docs/design.md §2: no host sync, so forward plus backward of both families capture in one CUDA graph, and
    replaying it gives the eager results bit for bit."""
    N, V = 12, 32000
    logits = make_logits((N, V), torch.bfloat16, seed=30).to(DEVICE)
    tokens = make_tokens((N,), V, seed=31).to(DEVICE)
    logp_in, old, adv = (x.to(DEVICE) for x in policy_inputs((4, 1500), seed=32))
    mask = make_mask((4, 1500), "bool", seed=33).to(DEVICE)

    def step(x, lp):
        logp, ent = rlkernels.gather_logprobs(x, tokens, return_entropy=True, backend=BACKEND)
        loss, stats = rlkernels.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-mean",
                                                backend=BACKEND)
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


def test_more_than_2_to_31_tokens():
    """PPO losses over more than 2^31 tokens with known answers: ratio 1 and A = 1 give l = -1 everywhere."""
    B, T = 2, (1 << 30) + 7
    try:
        zeros = torch.zeros((B, T), dtype=torch.bfloat16, device=DEVICE)
        adv = torch.ones((B, T), dtype=torch.bfloat16, device=DEVICE)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    lp = zeros.clone().requires_grad_(True)
    for agg, expected in (("token-mean", -1.0), ("seq-mean-token-sum", -float(T)), ("seq-mean-token-mean", -1.0)):
        lp.grad = None
        loss, stats = rlkernels.ppo_policy_loss(lp, zeros, adv, agg=agg, backend=BACKEND)
        assert float(loss) == pytest.approx(expected, rel=1e-6)  # a float32 output
        assert float(stats["ratio_mean"]) == 1.0 and float(stats["clipfrac"]) == 0.0
        loss.backward()
        # d l / d logp = -A * ratio = -1, times the row weight
        w = {"token-mean": 1 / (B * T), "seq-mean-token-sum": 1 / B, "seq-mean-token-mean": 1 / (B * T)}[agg]
        last = lp.grad[-1, -5:].float().cpu()
        torch.testing.assert_close(last, torch.full((5,), -w).to(torch.bfloat16).float())
