"""Autograd and memory contracts that no input may break (docs/design.md §2, §3, §4.3).

- ``inplace_backward=True`` bumps the logits' version counter: another node that saved them, or a second
  backward, raises instead of computing with overwritten values; logits whose rows share memory are never
  written over.
- Double backward: gather_logprobs' second-order gradients are those of the formula (gradgradcheck); every
  other op's backward is differentiable once and raises when differentiated again, never gives zeros.
- A large CPU output (from the output cache) can be resized like any tensor.
- +inf logits: logp = -inf for the other tokens, as the reference computes it, on every backend.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import backends

import rlkernels
from rlkernels import reference

BACKENDS = backends(include=("cpu", "triton"), cpu_tensors=True)  # CPU tensors (Triton under the interpreter)


def _randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# inplace_backward
# ----------------------------------------------------------------------------------------------------


def _shared_logits_grad(inplace, backend):
    leaf = _randn(4, 6).requires_grad_(True)
    lg = leaf * 2
    b = (lg**3).sum()  # saves lg
    a = rlkernels.gather_logprobs(lg, torch.tensor([0, 1, 2, 3]), inplace_backward=inplace, backend=backend).sum()
    (a + b).backward()
    return leaf.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_never_feeds_overwritten_logits_to_another_node(backend):
    expected = _shared_logits_grad(False, backend)
    try:
        got = _shared_logits_grad(True, backend)
    except RuntimeError as e:  # the version check caught the overwrite: the documented outcome
        assert "modified by an inplace operation" in str(e)
    else:  # the other node ran first: then its gradient is right
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_second_backward_raises(backend):
    lg = (_randn(3, 5) * 1.0).requires_grad_(True).clone()
    out = rlkernels.gather_logprobs(lg, torch.tensor([0, 4, 2]), inplace_backward=True, backend=backend)
    version = lg._version
    out.sum().backward(retain_graph=True)
    assert lg._version > version  # the overwrite is recorded
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_over_the_logits(backend):
    # the memory saving is kept where it is safe: the logits' storage holds their gradient after backward()
    x = _randn(3, 5, seed=1)
    tokens = torch.tensor([1, 0, 4])
    leaf = x.clone().requires_grad_(True)
    rlkernels.gather_logprobs(leaf, tokens, backend=backend).sum().backward()
    lg = x.clone().requires_grad_(True)
    z = lg * 1.0
    rlkernels.gather_logprobs(z, tokens, inplace_backward=True, backend=backend).sum().backward()
    torch.testing.assert_close(lg.grad, leaf.grad)
    torch.testing.assert_close(z.detach(), leaf.grad)  # written over


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_never_writes_over_rows_that_share_memory(backend):
    row = _randn(1, 6, seed=2)
    tokens = torch.tensor([0, 5, 2, 3])
    leaf = row.clone().requires_grad_(True)
    rlkernels.gather_logprobs(leaf.expand(4, 6), tokens, backend=backend).sum().backward()
    expected = leaf.grad
    leaf = row.clone().requires_grad_(True)
    rlkernels.gather_logprobs(leaf.expand(4, 6), tokens, inplace_backward=True, backend=backend).sum().backward()
    torch.testing.assert_close(leaf.grad, expected)
    assert torch.equal(leaf.detach(), row)


def test_inplace_backward_op_bumps_the_version():
    logits, tokens = _randn(4, 6), torch.tensor([0, 5, 2, 3])
    _, entropy, lse = torch.ops.rlkernels.gather_logprobs(logits, tokens, 1.0, True, None, True)
    version = logits._version
    torch.ops.rlkernels.gather_logprobs_backward_inplace(torch.ones(4, dtype=torch.float64), None, logits, tokens,
                                                         lse, entropy, 1.0, None)
    assert logits._version == version + 1


# ----------------------------------------------------------------------------------------------------
# Double backward
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"return_entropy": True, "temperature": 0.7},
                                    {"return_entropy": True, "ignore_index": 2}])
def test_gather_logprobs_gradgradcheck(backend, inplace, kwargs):
    x = _randn(4, 5, seed=3).requires_grad_(True)
    tokens = torch.tensor([0, 2, 4, 1])

    def fn(logits):
        return rlkernels.gather_logprobs(logits * 1.0, tokens, inplace_backward=inplace, backend=backend, **kwargs)

    assert torch.autograd.gradgradcheck(fn, (x,))


def test_gather_logprobs_second_order_matches_torch():
    x = _randn(5, 3, seed=4).requires_grad_(True)
    t = torch.tensor([0, 1, 2, 0, 1])
    g, = torch.autograd.grad(rlkernels.gather_logprobs(x, t).sum(), x, create_graph=True)
    gg, = torch.autograd.grad((g**2).sum(), x)
    y = x.detach().clone().requires_grad_(True)
    h, = torch.autograd.grad(torch.log_softmax(y, -1).gather(-1, t[:, None]).sum(), y, create_graph=True)
    hh, = torch.autograd.grad((h**2).sum(), y)
    assert hh.abs().max() > 0.01  # the second-order term is not trivially 0 here
    torch.testing.assert_close(gg, hh)


def test_linear_scan_and_bellman_backup_gradgradcheck():
    # their backwards are made of differentiable ops (design.md §2)
    a = (torch.rand(5, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.9).requires_grad_(True)
    b = _randn(5, 2, seed=6).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda a, b: rlkernels.linear_scan(a, b), (a, b))
    P = torch.softmax(_randn(2, 3, 2, 3, seed=7), -1).requires_grad_(True)
    R, V = _randn(2, 3, 2, seed=8).requires_grad_(True), _randn(2, 3, seed=9).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda P, R, V: rlkernels.bellman_backup(P, R, V, gamma=0.9)[:2], (P, R, V))


def _first_order_calls():
    r, v = _randn(6, 2, seed=5), _randn(6, 2, seed=6)
    lp, old, adv = _randn(2, 5, seed=7), _randn(2, 5, seed=8), _randn(2, 5, seed=9)
    q, actions, y = _randn(4, 3, seed=10), torch.tensor([0, 2, 1, 0]), _randn(4, seed=11)
    return {
        "discounted_returns": (lambda r: rlkernels.discounted_returns(r, gamma=0.9), (r,)),
        "gae": (lambda r, v: rlkernels.gae(r, v, gamma=0.9, lam=0.8)[0], (r, v)),
        "vtrace": (lambda r, v, lr: rlkernels.vtrace(r, v, lr, gamma=0.9)[0], (r, v, _randn(6, 2, seed=12) * 0.1)),
        "retrace": (lambda r, q, nv, lr: rlkernels.retrace(r, q, nv, lr, gamma=0.9, lam=0.8),
                    (r, v, _randn(6, 2, seed=13), _randn(6, 2, seed=14) * 0.1)),
        "n_step_returns": (lambda r, v: rlkernels.n_step_returns(r, v, n=2, gamma=0.9), (r, v)),
        "ppo_policy_loss": (lambda lp: rlkernels.ppo_policy_loss(lp, old, adv)[0], (lp,)),
        "value_loss": (lambda v: rlkernels.value_loss(v, old, adv, clip=0.2)[0], (lp,)),
        "kl_penalty": (lambda lp: rlkernels.kl_penalty(lp, old, "k3"), (lp,)),
        "td_loss": (lambda q, y: rlkernels.td_loss(q, actions, y)[0], (q, y)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(_first_order_calls()))
def test_second_order_through_a_backward_op_raises(name, backend):
    fn, inputs = _first_order_calls()[name]
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves, create_graph=True)  # the first order works as ever
    fresh = [x.clone().requires_grad_(True) for x in inputs]
    plain = torch.autograd.grad(fn(*fresh).sum(), fresh)
    for g, p in zip(grads, plain):
        torch.testing.assert_close(g.detach(), p)
    total = sum((g**2).sum() for g in grads if g.requires_grad)
    assert isinstance(total, torch.Tensor), "create_graph=True gave gradients without a graph"
    with pytest.raises(RuntimeError, match="second-order gradients are not implemented"):
        torch.autograd.grad(total, leaves, allow_unused=True)


# ----------------------------------------------------------------------------------------------------
# Large outputs from the output cache
# ----------------------------------------------------------------------------------------------------


def test_cached_output_resizes_like_any_tensor():
    n = 1 << 20  # 8 MiB float32 outputs: from the output cache
    r, v = _randn(n, 2, dtype=torch.float32), _randn(n, 2, dtype=torch.float32, seed=1)
    adv, ret = rlkernels.gae(r, v, gamma=0.99, lam=0.95)
    head = adv[:1000].clone()
    adv.resize_(2 << 20, 2)  # past its buffer: the data moves to a new one
    assert adv.shape == (2 << 20, 2)
    torch.testing.assert_close(adv[:1000], head)
    adv[n:] = 0
    assert torch.isfinite(adv.sum())
    ret.resize_(3)
    ret.untyped_storage().resize_(0)
    assert ret.untyped_storage().nbytes() == 0
    del adv, ret
    adv, _ = rlkernels.gae(r, v, gamma=0.99, lam=0.95)  # the cache still serves
    torch.testing.assert_close(adv[:1000], head)


# ----------------------------------------------------------------------------------------------------
# +inf logits
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_inf_logits_give_the_reference_answer(backend, dtype):
    V = 3000 if backend == "cpu" else 1500
    x = _randn(6, V, seed=15).to(dtype)
    x[0, 1] = float("inf")  # another token's logit
    x[1, V - 7] = float("inf")  # late in a long row
    x[2, 0] = float("inf")  # the token's own: NaN
    x[3, 5], x[3, 9] = float("inf"), float("nan")  # with a NaN: NaN
    x[4] = torch.finfo(dtype).max  # every logit at the dtype's maximum (finite)
    x[5, 3] = -float("inf")
    tokens = torch.tensor([0, 2, 0, 0, 1, 1])
    logp, ent = rlkernels.gather_logprobs(x, tokens, return_entropy=True, temperature=0.5, backend=backend)
    e_logp, e_ent = reference.gather_logprobs(x, tokens, return_entropy=True, temperature=0.5)
    assert logp[0] == -float("inf") and logp[1] == -float("inf")
    # (row 4: logits of 1e5 and more leave float32 a few ulp of 1e5 for logp = -log V: compared more loosely)
    np.testing.assert_allclose(logp.numpy()[[0, 1, 2, 3, 5]], e_logp[[0, 1, 2, 3, 5]], rtol=1e-4, atol=1e-4,
                               equal_nan=True)
    np.testing.assert_allclose(logp.numpy()[4], e_logp[4], rtol=1e-4, atol=0.02, equal_nan=True)
    np.testing.assert_allclose(ent.numpy(), e_ent, rtol=1e-4, atol=1e-4, equal_nan=True)
    np.testing.assert_array_equal(np.isnan(logp.numpy()), np.isnan(e_logp))
