"""Tests of the Triton backend of the PPO loss family (rlkernels/triton/ppo.py) under TRITON_INTERPRET=1.

The oracle is the CPU backend (checked against rlkernels.reference and torch autograd in test_ppo.py) and the
NumPy reference. tests/conftest.py sets TRITON_INTERPRET=1 for the session, so the kernels are interpreted
and accept CPU tensors; shapes stay small because the interpreter is slow.
"""

import itertools

import pytest

pytest.importorskip("triton")

import torch
from conftest import assert_close

import rlkernels
from rlkernels import reference
from rlkernels.ppo import AGGS, KL_KINDS, POLICY_STATS
from rlkernels.triton import ppo as triton_ppo

pytestmark = pytest.mark.triton

if not triton_ppo._interpreting():
    pytest.skip("rlkernels.triton.ppo was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)


def _inputs(shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = -torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    b = a + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    c = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = torch.rand(shape, generator=gen) > 0.3
    if shape[0] > 1:
        mask[1] = False
    return a.to(dtype), b.to(dtype), c.to(dtype), mask


def _run(fn, x, *args, **kw):
    x = x.clone().requires_grad_(True)
    loss, stats = fn(x, *args, **kw)
    loss.backward()
    return loss, stats, x.grad


# T = 1100 crosses the kernel's 1024-token chunk.
@pytest.mark.parametrize("agg, dual_clip, masked", list(itertools.product(AGGS, [None, 2.0], [False, True])))
def test_policy_matches_cpu(agg, dual_clip, masked):
    logp, old, adv, mask = _inputs((3, 1100))
    mask = mask if masked else None
    kw = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": dual_clip, "agg": agg}
    t_loss, t_stats, t_grad = _run(rlkernels.ppo_policy_loss, logp, old, adv, mask, backend="triton", **kw)
    c_loss, _, c_grad = _run(rlkernels.ppo_policy_loss, logp, old, adv, mask, backend="cpu", **kw)
    _, r_stats = reference.ppo_policy_loss(logp, old, adv, mask, **kw)
    assert_close(t_loss, c_loss.detach().numpy(), name="loss")
    for k in POLICY_STATS:
        assert_close(t_stats[k], r_stats[k], name=k)
    assert_close(t_grad, c_grad.numpy(), name="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_dtypes_and_edges(dtype):
    logp, old, adv, mask = _inputs((2, 40), dtype=dtype)
    old[0, :3] = logp[0, :3] - 1e4  # clamped log-ratios
    t = _run(rlkernels.ppo_policy_loss, logp, old, adv, mask, backend="triton", dual_clip=3.0)
    c = _run(rlkernels.ppo_policy_loss, logp, old, adv, mask, backend="cpu", dual_clip=3.0)
    assert t[0].dtype == torch.float32 and t[2].dtype == dtype
    assert_close(t[0], c[0].detach().numpy(), dtype)
    assert_close(t[2], c[2].float().numpy(), dtype)
    empty = torch.zeros_like(mask)
    loss, stats, grad = _run(rlkernels.ppo_policy_loss, logp, old, adv, empty, backend="triton")
    assert float(loss.detach()) == 0.0 and all(float(v) == 0.0 for v in stats.values())
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("agg, clip", list(itertools.product(AGGS, [None, 0.2])))
def test_value_matches_cpu(agg, clip):
    v, old, ret, mask = _inputs((3, 50), seed=1)
    t_loss, t_stats, t_grad = _run(rlkernels.value_loss, v, old, ret, mask, clip=clip, agg=agg, backend="triton")
    c_loss, c_stats, c_grad = _run(rlkernels.value_loss, v, old, ret, mask, clip=clip, agg=agg, backend="cpu")
    assert_close(t_loss, c_loss.detach().numpy())
    assert_close(t_stats["vf_clipfrac"], c_stats["vf_clipfrac"].numpy())
    assert_close(t_grad, c_grad.numpy())


@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_matches_cpu(kind):
    logp, ref, g, _ = _inputs((4, 33), seed=2)
    ref[0, :2] = logp[0, :2] + torch.tensor([30.0, -30.0], dtype=torch.float64)
    outs = []
    for backend in ("triton", "cpu"):
        x = logp.clone().requires_grad_(True)
        out = rlkernels.kl_penalty(x, ref, kind, backend=backend)
        out.backward(g)
        outs.append((out.detach(), x.grad))
    assert_close(outs[0][0], outs[1][0].numpy())
    assert_close(outs[0][1], outs[1][1].numpy())


def test_opcheck_and_compile():
    logp, old, adv, mask = _inputs((2, 20))
    lp = logp.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.rlkernels.triton_ppo_policy_loss,
                          (lp, old, adv, mask, 0.2, 0.2, 2.0, "seq-mean-token-mean", 20.0))
    torch.library.opcheck(torch.ops.rlkernels.triton_value_loss, (lp, old, adv, None, 0.2, "token-mean"))
    torch.library.opcheck(torch.ops.rlkernels.triton_kl_penalty, (lp, old, "k3"))

    def f(x):
        loss, stats = rlkernels.ppo_policy_loss(x, old, adv, mask, dual_clip=2.0, backend="triton")
        return loss + rlkernels.kl_penalty(x, old, "k2", backend="triton").sum(), stats["clipfrac"]

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1, x2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    e, c = f(x1), compiled(x2)
    e[0].backward()
    c[0].backward()
    assert torch.equal(e[0], c[0]) and torch.equal(x1.grad, x2.grad)
