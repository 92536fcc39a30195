"""Tests of the Bellman family (rlkernels/bellman.py, csrc/cpu/bellman.cpp; docs/design.md §4.5).

Oracles: `rlkernels.reference` (NumPy, float64) on random and property-based cases; hand-computed double-Q
and expected-SARSA targets; value iteration against MDPs with known solutions (a chain with a closed form,
a gridworld of shortest paths) and a NumPy value-iteration loop; torch autograd of the plain formulas for
gradients (gradcheck in float64).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, LOW_PRECISION, assert_close
from hypothesis import given
from hypothesis import strategies as st

import rlkernels
from rlkernels import reference

KINDS = ("max", "double", "expected", "soft")


def _rounded(x, dtype):
    """x as the kernel sees it: rounded to dtype (16-bit inputs are compared on their rounded values)."""
    return x.to(dtype).double() if x.is_floating_point() else x


def _q_inputs(B, A, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    r = (torch.randn(B, generator=g, dtype=torch.float64) * scale).to(dtype)
    q = (torch.randn(B, A, generator=g, dtype=torch.float64) * scale).to(dtype)
    online = (torch.randn(B, A, generator=g, dtype=torch.float64) * scale).to(dtype)
    probs = torch.softmax(torch.randn(B, A, generator=g, dtype=torch.float64), -1).to(dtype)
    term = torch.rand(B, generator=g) < 0.3
    return r, q, online, probs, term


# ----------------------------------------------------------------------------------------------------
# q_targets
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,A", [(1, 1), (7, 3), (97, 18), (1025, 5)])
def test_q_targets_matches_reference(kind, B, A, dtype):
    r, q, online, probs, term = _q_inputs(B, A, dtype, seed=B * 31 + A)
    kw = dict(terminated=term, gamma=0.97, kind=kind, next_q_online=online, next_probs=probs, n=2)
    y = rlkernels.q_targets(r, q, temperature=0.7 if kind == "soft" else None, **kw)
    assert y.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not y.requires_grad
    expected = reference.q_targets(_rounded(r, dtype), _rounded(q, dtype), terminated=term, gamma=0.97, kind=kind,
                                   next_q_online=_rounded(online, dtype), next_probs=_rounded(probs, dtype),
                                   temperature=0.7 if kind == "soft" else None, n=2)
    assert_close(y, expected, dtype, name=kind)


def test_q_targets_hand_computed():
    r = torch.tensor([1.0, 0.5, -1.0])
    next_q = torch.tensor([[1.0, 4.0, 2.0], [3.0, -1.0, 0.0], [9.0, 9.0, 9.0]])
    online = torch.tensor([[5.0, 0.0, 5.0], [0.0, 2.0, 1.0], [0.0, 0.0, 0.0]])  # ties: first index
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    term = torch.tensor([False, False, True])
    g = 0.9
    torch.testing.assert_close(rlkernels.q_targets(r, next_q, terminated=term, gamma=g),
                               torch.tensor([1 + g * 4.0, 0.5 + g * 3.0, -1.0]))
    # Double DQN: the online net picks action 0 (tie with 2) and action 1; the target net evaluates them.
    torch.testing.assert_close(rlkernels.q_targets(r, next_q, terminated=term, gamma=g, kind="double",
                                                   next_q_online=online),
                               torch.tensor([1 + g * 1.0, 0.5 + g * -1.0, -1.0]))
    # Expected SARSA: 0.5*1 + 0.25*4 + 0.25*2 = 2; the second row's policy is deterministic on action 1.
    torch.testing.assert_close(rlkernels.q_targets(r, next_q, terminated=term, gamma=g, kind="expected",
                                                   next_probs=probs),
                               torch.tensor([1 + g * 2.0, 0.5 + g * -1.0, -1.0]))
    # n-step: gamma^n.
    torch.testing.assert_close(rlkernels.q_targets(r, next_q, gamma=g, n=3),
                               torch.tensor([1 + g**3 * 4.0, 0.5 + g**3 * 3.0, -1.0 + g**3 * 9.0]))


def test_q_targets_soft_limits():
    q = torch.tensor([[0.0, 1.0, 2.0], [-math.inf, -math.inf, -math.inf], [-math.inf, 3.0, -math.inf]])
    r = torch.zeros(3)
    y = rlkernels.q_targets(r, q, gamma=1.0, kind="soft", temperature=0.5)
    expected = torch.stack([0.5 * torch.logsumexp(q[0] / 0.5, 0), torch.tensor(-math.inf), torch.tensor(3.0)])
    torch.testing.assert_close(y, expected)
    # Huge logits: (x - max) / T, never x / T - max / T, whose FMA residual would overflow exp (a past bug).
    for dtype in (torch.float32, torch.float64):
        big = torch.tensor([[1e30, -1e30, 0.0, 0.0, -math.inf] + [0.0] * 11 + [1e20, 1e30 * 0.999]], dtype=dtype)
        y_big = rlkernels.q_targets(torch.zeros(1, dtype=dtype), big, gamma=1.0, kind="soft", temperature=0.7)
        expected = 0.7 * torch.logsumexp(big.double() / 0.7, -1)
        torch.testing.assert_close(y_big.double(), expected, rtol=1e-5, atol=0)
    # A small temperature approaches the hard max.
    y_cold = rlkernels.q_targets(r[:1], q[:1], gamma=1.0, kind="soft", temperature=1e-3)
    assert abs(y_cold.item() - 2.0) < 1e-2


def test_q_targets_terminated_ignores_garbage_next_q():
    r = torch.tensor([1.0, 2.0, 3.0])
    q = torch.tensor([[math.nan, 0.0], [math.inf, 1.0], [-math.inf, -math.inf]])
    term = torch.tensor([True, True, True])
    for kind in KINDS:
        y = rlkernels.q_targets(r, q, terminated=term, kind=kind, next_q_online=q.nan_to_num(),
                                next_probs=torch.full_like(q, 0.5), temperature=1.0)
        torch.testing.assert_close(y, r)
    # Not terminated: NaN propagates like numpy's max (the target is garbage in, garbage out, not hidden).
    y = rlkernels.q_targets(r, q)
    assert math.isnan(y[0]) and y[1] == math.inf and y[2] == -math.inf


def test_q_targets_leading_dims_and_mixed_dtypes():
    r, q, online, probs, term = _q_inputs(24, 4, torch.float64, seed=5)
    y = rlkernels.q_targets(r.reshape(2, 3, 4).float(), q.reshape(2, 3, 4, 4), terminated=term.reshape(2, 3, 4),
                            kind="double", next_q_online=online.reshape(2, 3, 4, 4).half(), gamma=0.5)
    assert y.shape == (2, 3, 4) and y.dtype == torch.float64
    expected = reference.q_targets(r.float().double(), q, terminated=term, kind="double",
                                   next_q_online=online.half().double(), gamma=0.5)
    assert_close(y.reshape(-1), expected, torch.float64)


def test_q_targets_uint8_and_float_terminated():
    r, q, _, _, term = _q_inputs(33, 3, torch.float32, seed=2)
    base = rlkernels.q_targets(r, q, terminated=term)
    torch.testing.assert_close(rlkernels.q_targets(r, q, terminated=term.to(torch.uint8)), base)
    torch.testing.assert_close(rlkernels.q_targets(r, q, terminated=term.float()), base)


@given(B=st.integers(1, 300), A=st.integers(1, 40), kind=st.sampled_from(KINDS), n=st.integers(1, 5),
       gamma=st.floats(0.0, 1.0), temperature=st.floats(0.05, 5.0), seed=st.integers(0, 2**16),
       with_term=st.booleans())
def test_q_targets_property(B, A, kind, n, gamma, temperature, seed, with_term):
    r, q, online, probs, term = _q_inputs(B, A, torch.float64, seed)
    term = term if with_term else None
    y = rlkernels.q_targets(r, q, terminated=term, gamma=gamma, kind=kind, next_q_online=online, next_probs=probs,
                            temperature=temperature, n=n)
    expected = reference.q_targets(r, q, terminated=term, gamma=gamma, kind=kind, next_q_online=online,
                                   next_probs=probs, temperature=temperature if kind == "soft" else None, n=n)
    assert_close(y, expected, torch.float64)


@pytest.mark.parametrize("A", [8, 9, 15, 16, 17, 18, 25, 40])
@pytest.mark.parametrize("kind", KINDS)
def test_q_targets_float32_rows_ties_nan_inf(kind, A):
    # float32 rows of 8 or more actions run whole vectors plus one overlapping the last: a value the two
    # share must count once in sums, and ties must still pick the first index (values from a small integer
    # set: ties everywhere, in the overlap too). Rows with NaN and +-inf follow the reference's rules.
    B = 203
    g = torch.Generator().manual_seed(A * 7 + len(kind))
    q = torch.randint(-3, 4, (B, A), generator=g).float()
    online = torch.randint(-2, 3, (B, A), generator=g).float()
    probs = torch.softmax(torch.randn(B, A, generator=g), -1)
    r = torch.randn(B, generator=g)
    for row, col in ((3, A - 1), (10, 0), (11, A - 8), (12, A // 2)):
        q[row, col] = math.nan
        online[row + 40, col] = math.nan
    q[20, A - 1], q[21, 0] = math.inf, -math.inf
    q[22] = -math.inf
    q[23, A - 3:] = math.inf
    online[60, A - 1] = math.inf  # the argmax in the last lane of the overlapping vector
    online[61, A - 8] = 9.0       # ... in its first lane (also the last lane of a whole vector or earlier)
    y = rlkernels.q_targets(r, q, gamma=0.9, kind=kind, next_q_online=online, next_probs=probs,
                            temperature=0.6 if kind == "soft" else None)
    expected = reference.q_targets(r.double(), q.double(), gamma=0.9, kind=kind, next_q_online=online.double(),
                                   next_probs=probs.double(), temperature=0.6 if kind == "soft" else None)
    assert_close(y, expected, torch.float32, name=kind)
    if kind == "double":  # the pick itself, exactly: the first maximizing index of each row
        picked = q.double()[torch.arange(B), torch.from_numpy(np.argmax(online.numpy(), axis=1))]
        nan_rows = torch.isnan(online).any(1)
        torch.testing.assert_close(y[~nan_rows], (r + 0.9 * picked.float())[~nan_rows], equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("A", [3, 18, 300])
def test_q_targets_16bit_equals_float32_of_the_same_values(kind, A, dtype):
    # 16-bit batches are widened block by block (blocks of 4096 // A rows) and run through the float32 rows:
    # the targets must be exactly those of the float32 op on the widened inputs, NaN/inf rows and
    # terminated rows included, across blocks and threads.
    B = 1500
    g = torch.Generator().manual_seed(A + len(kind))
    q = (torch.randn(B, A, generator=g) * 3).to(dtype)
    online = torch.randn(B, A, generator=g).to(dtype)
    probs = torch.softmax(torch.randn(B, A, generator=g), -1).to(dtype)
    r = torch.randn(B, generator=g).to(dtype)
    term = torch.rand(B, generator=g) < 0.2
    q[5, A - 1], q[700, 0], q[701, :] = math.nan, math.inf, -math.inf
    online[900, A // 2] = math.nan
    kw = dict(gamma=0.9, kind=kind, temperature=0.6 if kind == "soft" else None)
    y = rlkernels.q_targets(r, q, terminated=term, next_q_online=online, next_probs=probs, **kw)
    y32 = rlkernels.q_targets(r.float(), q.float(), terminated=term, next_q_online=online.float(),
                              next_probs=probs.float(), **kw)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y32, rtol=0, atol=0, equal_nan=True)
    expected = reference.q_targets(r.double(), q.double(), terminated=term, next_q_online=online.double(),
                                   next_probs=probs.double(), **kw)
    assert_close(y, expected, torch.float32, name=kind)


def test_q_targets_non_contiguous():
    r, q, online, probs, term = _q_inputs(40, 6, torch.float32, seed=9)
    q_t = q.t().contiguous().t()  # same values, column-major
    assert not q_t.is_contiguous()
    torch.testing.assert_close(rlkernels.q_targets(r[::2], q_t[::2], terminated=term[::2]),
                               rlkernels.q_targets(r[::2].contiguous(), q[::2].contiguous(),
                                                   terminated=term[::2].contiguous()))


# ----------------------------------------------------------------------------------------------------
# td_loss
# ----------------------------------------------------------------------------------------------------


def torch_td_loss(q, actions, targets, loss="huber", delta=1.0, weights=None, reduction="mean"):
    """The eager torch code a DQN trainer runs (float64 oracle for values and gradients)."""
    qsa = q.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    e = targets - qsa
    if loss == "huber":
        per = F.huber_loss(qsa, targets, reduction="none", delta=delta)
    else:
        per = e**2
    if weights is not None:
        per = per * weights
    if reduction == "none":
        return per, e
    if reduction == "sum":
        return per.sum(), e
    return (per.sum() / per.numel() if per.numel() else per.sum()), e


def _td_inputs(B, A, dtype, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, A, generator=g, dtype=torch.float64) * scale).to(dtype)
    actions = torch.randint(0, A, (B,), generator=g)
    targets = (torch.randn(B, generator=g, dtype=torch.float64) * scale).to(dtype)
    weights = torch.rand(B, generator=g, dtype=torch.float64).to(dtype)
    return q, actions, targets, weights


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", ["huber", "squared"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_td_loss_matches_reference_and_torch(dtype, loss, reduction, weighted):
    B, A = 1029, 18
    q, actions, targets, weights = _td_inputs(B, A, dtype, seed=B)
    w = weights if weighted else None
    q_req = q.clone().requires_grad_()
    y_req = targets.clone().requires_grad_()
    out, e = rlkernels.td_loss(q_req, actions, y_req, loss=loss, delta=1.5, weights=w, reduction=reduction)
    exp_loss, exp_e = reference.td_loss(_rounded(q, dtype), actions, _rounded(targets, dtype), loss=loss, delta=1.5,
                                        weights=None if w is None else _rounded(w, dtype), reduction=reduction)
    assert_close(out.detach(), exp_loss, dtype, name="loss")
    assert_close(e, exp_e, dtype, name="td_errors")
    # Gradients against torch autograd of the eager code (float64 on the rounded inputs).
    q64 = _rounded(q, dtype).requires_grad_()
    y64 = _rounded(targets, dtype).requires_grad_()
    ref_out, _ = torch_td_loss(q64, actions, y64, loss, 1.5, None if w is None else _rounded(w, dtype), reduction)
    g_out = torch.randn_like(ref_out)
    ref_out.backward(g_out)
    out.backward(g_out.to(out.dtype))
    assert q_req.grad.dtype == dtype and y_req.grad.dtype == dtype
    assert_close(q_req.grad, q64.grad, dtype, name="grad q")
    assert_close(y_req.grad, y64.grad, dtype, name="grad targets")
    # One non-zero per row: the gradient is exactly zero off the taken action.
    off = torch.ones_like(q_req.grad, dtype=torch.bool).scatter_(1, actions.unsqueeze(1), False)
    assert torch.count_nonzero(q_req.grad[off]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_td_loss_backward_from_saved_errors(dtype, reduction):
    # The backward op given the forward's td_errors (as the autograd kernel passes them) must equal the one that
    # gathers them from q again, bit for bit, with every upstream gradient present or absent.
    B, A = 1000, 7  # not a multiple of the kernel's row blocks nor of the vector width
    q, actions, targets, weights = _td_inputs(B, A, dtype, seed=5, scale=1.5)
    ops = torch.ops.rlkernels
    for loss in ("huber", "squared"):
        for w in (None, weights):
            _, e = ops.td_loss(q, actions, targets, w, loss, 0.7, reduction)
            gl = torch.randn(B if reduction == "none" else (), dtype=e.dtype)
            gt = torch.randn(B, dtype=e.dtype)
            for grads in ((gl, None), (None, gt), (gl, gt)):
                fresh = ops.td_loss_backward(*grads, q, actions, targets, w, loss, 0.7, reduction)
                saved = ops.td_loss_backward(*grads, q, actions, targets, w, loss, 0.7, reduction, e)
                for a, b in zip(fresh, saved):
                    assert torch.equal(a, b), (loss, w is None, [g is None for g in grads])
            assert torch.count_nonzero(fresh[0]) <= B


def test_td_loss_backward_after_td_errors_modified_in_place():
    # Priority updates may modify td_errors in place before the backward; the gradient must not change.
    q, actions, targets, _ = _td_inputs(300, 6, torch.float32, seed=8)
    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    loss1, e1 = rlkernels.td_loss(q1, actions, targets)
    loss2, e2 = rlkernels.td_loss(q2, actions, targets)
    e2.mul_(100.0).abs_()  # e.g. priorities = |td| computed in place
    loss1.backward()
    loss2.backward()
    assert torch.equal(q1.grad, q2.grad)
    q64 = q.double().requires_grad_()
    torch_td_loss(q64, actions, targets.double())[0].backward()
    assert_close(q2.grad, q64.grad, torch.float32, name="grad q")


def test_td_loss_backward_bad_actions():
    q, actions, targets, _ = _td_inputs(40, 5, torch.float32, seed=9)
    _, e = torch.ops.rlkernels.td_loss(q, actions, targets, None, "huber", 1.0, "mean")
    bad = actions.clone()
    bad[17] = 5
    for td in (None, e):
        with pytest.raises(ValueError, match=r"actions\[17\] = 5"):
            torch.ops.rlkernels.td_loss_backward(torch.ones(()), None, q, bad, targets, None, "huber", 1.0, "mean",
                                                 td)
    with pytest.raises(ValueError, match="td_errors must have 40 elements"):
        torch.ops.rlkernels.td_loss_backward(torch.ones(()), None, q, actions, targets, None, "huber", 1.0, "mean",
                                             e[:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_td_loss_forward_reports_the_first_bad_action(dtype):
    # The float32 forward gathers 8 rows per step: a bad action inside such a group (and after the groups, in
    # the tail rows), the first of several reported, negative ones too, for every row chunk.
    q, actions, targets, _ = _td_inputs(5003, 5, dtype, seed=10)  # the last chunk ends in 3 rows after its groups
    for rows, value in (([37, 61], 5), ([4099, 4100], -1), ([4999, 5001], 7), ([5001], 5), ([8, 4097], 1 << 40)):
        bad = actions.clone()
        bad[rows] = value
        with pytest.raises(ValueError, match=rf"actions\[{rows[0]}\] = {value}\b"):
            rlkernels.td_loss(q, bad, targets)
    loss, e = rlkernels.td_loss(q, actions, targets, reduction="none")  # in-range actions still work
    assert torch.equal(e, targets - q.gather(1, actions[:, None]).squeeze(1))


def test_td_loss_gradcheck():
    q, actions, targets, weights = _td_inputs(13, 4, torch.float64, seed=3)
    targets = targets * 2  # both Huber branches
    for loss in ("huber", "squared"):
        for reduction in ("mean", "sum", "none"):
            def f(q, y):
                out, e = rlkernels.td_loss(q, actions, y, loss=loss, weights=weights, reduction=reduction, delta=0.8)
                return out, e  # td_errors is differentiable too

            assert torch.autograd.gradcheck(f, (q.clone().requires_grad_(), targets.clone().requires_grad_()))


def test_td_loss_huber_boundary_and_empty():
    # |e| == delta sits on the quadratic side, as in torch's huber_loss.
    q = torch.tensor([[0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    out, e = rlkernels.td_loss(q, torch.tensor([0]), torch.tensor([1.0], dtype=torch.float64), delta=1.0)
    assert out.item() == 0.5 and e.item() == 1.0
    out.backward()
    assert q.grad.tolist() == [[-1.0, 0.0]]
    empty_q = torch.zeros(0, 5, requires_grad=True)
    out, e = rlkernels.td_loss(empty_q, torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    assert out.item() == 0.0 and e.shape == (0,)
    out.backward()
    assert empty_q.grad.shape == (0, 5)


def test_td_loss_leading_dims_int32_actions():
    q, actions, targets, weights = _td_inputs(24, 5, torch.float32, seed=11)
    out, e = rlkernels.td_loss(q.reshape(4, 6, 5), actions.reshape(4, 6).int(), targets.reshape(4, 6),
                               reduction="none")
    assert out.shape == (4, 6) and e.shape == (4, 6)
    exp_out, exp_e = reference.td_loss(q, actions, targets, reduction="none")
    assert_close(out.reshape(-1), exp_out, torch.float32)
    assert_close(e.reshape(-1), exp_e, torch.float32)


@given(B=st.integers(0, 200), A=st.integers(1, 30), loss=st.sampled_from(["huber", "squared"]),
       reduction=st.sampled_from(["mean", "sum", "none"]), delta=st.floats(0.05, 10.0), seed=st.integers(0, 2**16),
       weighted=st.booleans())
def test_td_loss_property(B, A, loss, reduction, delta, seed, weighted):
    q, actions, targets, weights = _td_inputs(B, A, torch.float64, seed, scale=4.0)
    w = weights if weighted else None
    out, e = rlkernels.td_loss(q, actions, targets, loss=loss, delta=delta, weights=w, reduction=reduction)
    exp_out, exp_e = reference.td_loss(q, actions, targets, loss=loss, delta=delta, weights=w, reduction=reduction)
    assert_close(out, exp_out, torch.float64)
    assert_close(e, exp_e, torch.float64)


def test_td_loss_deterministic_across_threads():
    q, actions, targets, _ = _td_inputs(50_000, 7, torch.float32, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rlkernels.td_loss(q, actions, targets)[0]
        torch.set_num_threads(max(2, threads))
        many = rlkernels.td_loss(q, actions, targets)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ----------------------------------------------------------------------------------------------------
# n_step_returns
# ----------------------------------------------------------------------------------------------------


def _n_step_inputs(T, N, dtype, seed, p_term=0.1, p_trunc=0.1):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(T, N, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(T, N, generator=g, dtype=torch.float64).to(dtype)
    nv = torch.randn(T, N, generator=g, dtype=torch.float64).to(dtype)
    boot = torch.randn(N, generator=g, dtype=torch.float64).to(dtype)
    term = torch.rand(T, N, generator=g) < p_term
    trunc = torch.rand(T, N, generator=g) < p_trunc
    return r, v, nv, boot, term, trunc


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("with_next", [False, True])
@pytest.mark.parametrize("T,N", [(1, 1), (17, 5), (129, 70)])
def test_n_step_matches_reference(dtype, n, with_next, T, N):
    r, v, nv, boot, term, trunc = _n_step_inputs(T, N, dtype, seed=T * N + n)
    kw = dict(n=n, gamma=0.95, terminated=term)
    if with_next:
        kw.update(truncated=trunc, next_values=nv)
    else:
        kw.update(bootstrap_value=boot)
    out = rlkernels.n_step_returns(r, v, **kw)
    kw_ref = {k: (_rounded(x, dtype) if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
    expected = reference.n_step_returns(_rounded(r, dtype), _rounded(v, dtype), **kw_ref)
    assert_close(out, expected, dtype)


def test_n_step_hand_computed():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    v = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])
    term = torch.tensor([False, False, True, False, False])
    g = 0.5
    out = rlkernels.n_step_returns(r, v, n=2, gamma=g, terminated=term, bootstrap_value=torch.tensor(60.0))
    expected = [
        1 + g * 2 + g**2 * 30,  # window of 2, bootstraps from V(s_2)
        2 + g * 3,  # stops at the terminated step 2: its reward counts, no bootstrap
        3.0,  # terminated at once
        4 + g * 5 + g**2 * 60,  # the last step bootstraps from bootstrap_value
        5 + g * 60,
    ]
    torch.testing.assert_close(out, torch.tensor(expected))


@given(T=st.integers(1, 60), N=st.integers(1, 6), n=st.integers(1, 12), gamma=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16), with_next=st.booleans(), time_dim=st.sampled_from([0, 1, -1]))
def test_n_step_property(T, N, n, gamma, seed, with_next, time_dim):
    r, v, nv, boot, term, trunc = _n_step_inputs(T, N, torch.float64, seed, p_term=0.15, p_trunc=0.15)
    if time_dim != 0:  # batch-major [N, T]
        r, v, nv, term, trunc = (x.t() for x in (r, v, nv, term, trunc))
    kw = dict(n=n, gamma=gamma, terminated=term, time_dim=time_dim)
    kw.update(dict(truncated=trunc, next_values=nv) if with_next else dict(bootstrap_value=boot))
    assert_close(rlkernels.n_step_returns(r, v, **kw), reference.n_step_returns(r, v, **kw), torch.float64)


def test_n_step_gradcheck():
    r, v, nv, boot, term, trunc = _n_step_inputs(19, 3, torch.float64, seed=4, p_term=0.2, p_trunc=0.2)
    req = [x.clone().requires_grad_() for x in (r, v, nv, boot)]
    for n in (1, 2, 5):
        assert torch.autograd.gradcheck(
            lambda r, v, nv: rlkernels.n_step_returns(r, v, n=n, gamma=0.9, terminated=term, truncated=trunc,
                                                      next_values=nv), req[:3])
        assert torch.autograd.gradcheck(
            lambda r, v, b: rlkernels.n_step_returns(r, v, n=n, gamma=0.9, terminated=term, bootstrap_value=b),
            (req[0], req[1], req[3]))


def test_n_step_n1_is_one_step_td_target():
    r, v, nv, boot, term, trunc = _n_step_inputs(50, 4, torch.float64, seed=8)
    out = rlkernels.n_step_returns(r, v, n=1, gamma=0.9, terminated=term, truncated=trunc, next_values=nv)
    torch.testing.assert_close(out, r + 0.9 * (~term) * nv)


def test_n_step_large_n_equals_discounted_returns():
    r, v, nv, boot, term, trunc = _n_step_inputs(40, 3, torch.float64, seed=6)
    out = rlkernels.n_step_returns(r, v, n=40, gamma=0.9, terminated=term, truncated=trunc, next_values=nv)
    full = rlkernels.discounted_returns(r, gamma=0.9, terminated=term, truncated=trunc, next_values=nv)
    torch.testing.assert_close(out, full)


# ----------------------------------------------------------------------------------------------------
# bellman_backup and value_iteration
# ----------------------------------------------------------------------------------------------------


def _mdps(B, S, A, dtype, seed, sparse=False):
    g = torch.Generator().manual_seed(seed)
    P = torch.rand(B, S, A, S, generator=g, dtype=torch.float64)
    if sparse:
        P = P * (torch.rand(B, S, A, S, generator=g) < 0.3) + 1e-3
    P = P / P.sum(-1, keepdim=True)
    R = torch.randn(B, S, A, generator=g, dtype=torch.float64)
    V = torch.randn(B, S, generator=g, dtype=torch.float64)
    return P.to(dtype), R.to(dtype), V.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,A", [(1, 1, 1), (3, 7, 4), (2, 33, 5), (1, 130, 2)])
def test_bellman_backup_matches_reference(dtype, B, S, A):
    P, R, V = _mdps(B, S, A, dtype, seed=B * S * A)
    Q, Vn, pol = rlkernels.bellman_backup(P, R, V, 0.9)
    eQ, eV, ep = reference.bellman_backup(_rounded(P, dtype), _rounded(R, dtype), _rounded(V, dtype), 0.9)
    assert_close(Q, eQ, dtype, name="Q")
    assert_close(Vn, eV, dtype, name="V_new")
    assert pol.dtype == torch.int64
    if dtype not in LOW_PRECISION:  # near-ties may flip under 16-bit rounding of Q's accumulation order
        np.testing.assert_array_equal(pol.numpy(), ep)
    else:
        picked = torch.gather(torch.as_tensor(eQ), -1, pol.unsqueeze(-1)).squeeze(-1)
        assert_close(picked, eV, dtype, name="Q at the chosen action")


def test_bellman_backup_leading_dims_and_ties():
    P, R, V = _mdps(6, 5, 3, torch.float32, seed=1)
    R[..., 1] = R[..., 0]
    P[..., 1, :] = P[..., 0, :]  # actions 0 and 1 identical: argmax must be 0
    Q, Vn, pol = rlkernels.bellman_backup(P.reshape(2, 3, 5, 3, 5), R.reshape(2, 3, 5, 3), V.reshape(2, 3, 5), 0.8)
    assert Q.shape == (2, 3, 5, 3) and Vn.shape == (2, 3, 5) and pol.shape == (2, 3, 5)
    eQ, eV, ep = reference.bellman_backup(P, R, V, 0.8)
    assert_close(Q.reshape(6, 5, 3), eQ, torch.float32)
    assert (pol.reshape(6, 5).numpy() == ep).all()
    assert not (pol == 1).any()


def test_bellman_backup_gradcheck():
    P, R, V = _mdps(2, 4, 3, torch.float64, seed=2)
    args = tuple(x.clone().requires_grad_() for x in (P, R, V))
    assert torch.autograd.gradcheck(lambda P, R, V: rlkernels.bellman_backup(P, R, V, 0.9)[:2], args)


def _chain_mdp(S, gamma):
    """Chain: action 1 moves right, action 0 left; the last state is absorbing with reward 1 per step.
    V*(s) = gamma^(S-1-s) / (1 - gamma), optimal action 1 everywhere (closed form)."""
    P = torch.zeros(S, 2, S, dtype=torch.float64)
    R = torch.zeros(S, 2, dtype=torch.float64)
    for s in range(S):
        P[s, 0, max(s - 1, 0)] = 1.0
        P[s, 1, min(s + 1, S - 1)] = 1.0
    P[S - 1, :, :] = 0.0
    P[S - 1, :, S - 1] = 1.0
    R[S - 1, :] = 1.0
    V_star = torch.tensor([gamma ** (S - 1 - s) / (1 - gamma) for s in range(S)], dtype=torch.float64)
    return P, R, V_star


def _grid_mdp(n, gamma):
    """n x n gridworld, 4 moves (walls keep you in place), goal at (n-1, n-1) absorbing with reward 0, every
    other step costs 1: V*(s) = -(1 - gamma^d) / (1 - gamma), d the Manhattan distance to the goal."""
    S = n * n
    P = torch.zeros(S, 4, S, dtype=torch.float64)
    R = -torch.ones(S, 4, dtype=torch.float64)
    moves = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    for i in range(n):
        for j in range(n):
            s = i * n + j
            for a, (di, dj) in enumerate(moves):
                ni, nj = min(max(i + di, 0), n - 1), min(max(j + dj, 0), n - 1)
                P[s, a, ni * n + nj] = 1.0
    goal = S - 1
    P[goal] = 0.0
    P[goal, :, goal] = 1.0
    R[goal] = 0.0
    d = torch.tensor([(n - 1 - s // n) + (n - 1 - s % n) for s in range(S)], dtype=torch.float64)
    return P, R, -(1 - gamma**d) / (1 - gamma)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_value_iteration_known_solutions(dtype):
    gamma = 0.9
    Pc, Rc, Vc = _chain_mdp(10, gamma)
    Pg, Rg, Vg = _grid_mdp(5, gamma)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for P, R, V_star in ((Pc, Rc, Vc), (Pg, Rg, Vg)):
        V, Q, pol, iters, res = rlkernels.value_iteration(P.to(dtype), R.to(dtype), gamma, tol=tol, max_iters=5000)
        assert iters.dtype == torch.int64 and iters.dim() == 0 and 1 < iters.item() < 5000
        assert res.item() < tol
        # |V_k - V*| <= gamma / (1 - gamma) * residual
        torch.testing.assert_close(V.double(), V_star, rtol=0, atol=20 * tol / (1 - gamma) + 1e-5 * (dtype != torch.float64))
        # the greedy policy is optimal: its Q equals V*
        q_pol = torch.gather(Q.double(), -1, pol.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(q_pol, V.double())
    _, _, pol, _, _ = rlkernels.value_iteration(Pc, Rc, gamma, tol=1e-10)
    assert (pol[:-1] == 1).all()


def _numpy_value_iteration(P, R, gamma, tol, max_iters):
    """A vectorised NumPy loop (the batched einsum users write), independent of reference.py."""
    V = np.zeros(P.shape[:-2])
    for k in range(1, max_iters + 1):
        Q = R + gamma * np.einsum("bsat,bt->bsa", P, V)
        V_new = Q.max(-1)
        res = np.abs(V_new - V).max(-1)
        V = V_new
        if (res < tol).all():
            break
    return V, Q, Q.argmax(-1), k, res


@pytest.mark.parametrize("B,S,A", [(1, 9, 3), (5, 16, 4), (3, 40, 2)])
@pytest.mark.parametrize("max_iters", [3, 1000])
def test_value_iteration_matches_numpy_and_reference(B, S, A, max_iters):
    P, R, _ = _mdps(B, S, A, torch.float64, seed=B + S + A, sparse=True)
    # Different rewards scales give different convergence speeds: the batch must still stop together.
    R = R * torch.logspace(-2, 1, B, dtype=torch.float64)[:, None, None]
    out = rlkernels.value_iteration(P, R, 0.95, tol=1e-7, max_iters=max_iters)
    for expected in (_numpy_value_iteration(P.numpy(), R.numpy(), 0.95, 1e-7, max_iters),
                     reference.value_iteration(P, R, 0.95, tol=1e-7, max_iters=max_iters)):
        V, Q, pol, iters, res = expected
        assert out[3].item() == iters
        assert_close(out[0], V, torch.float64, name="V")
        assert_close(out[1], Q, torch.float64, name="Q")
        np.testing.assert_array_equal(out[2].numpy(), pol)
        assert_close(out[4], res, torch.float64, name="residual")


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_iteration_dtypes_and_V0(dtype):
    P, R, V0 = _mdps(4, 12, 3, dtype, seed=7)
    out = rlkernels.value_iteration(P, R, 0.8, tol=1e-4, V0=V0, max_iters=200)
    exp = reference.value_iteration(_rounded(P, dtype), _rounded(R, dtype), 0.8, tol=1e-4, max_iters=200,
                                    V0=_rounded(V0, dtype))
    assert_close(out[0], exp[0], dtype, name="V")
    if dtype not in LOW_PRECISION:
        assert out[3].item() == exp[3]
    else:  # rounding may move the stopping iteration by one
        assert abs(out[3].item() - exp[3]) <= 1


def test_value_iteration_few_mdps_split_states():
    """One MDP on several threads (states split) must equal the single-thread result exactly."""
    P, R, _ = _mdps(1, 300, 4, torch.float32, seed=12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rlkernels.value_iteration(P, R, 0.9, tol=1e-5)
        torch.set_num_threads(max(2, threads))
        many = rlkernels.value_iteration(P, R, 0.9, tol=1e-5)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_value_iteration_max_iters_and_nan():
    P, R, _ = _mdps(2, 5, 2, torch.float64, seed=3)
    V, Q, pol, iters, res = rlkernels.value_iteration(P, R, 0.99, tol=0.0, max_iters=7)
    assert iters.item() == 7 and (res > 0).all()
    R_nan = R.clone()
    R_nan[1, 0, 0] = math.nan
    V, Q, pol, iters, res = rlkernels.value_iteration(P, R_nan, 0.9, max_iters=11)
    assert iters.item() == 11 and math.isnan(res[1].item())


@given(B=st.integers(1, 4), S=st.integers(1, 12), A=st.integers(1, 4), gamma=st.floats(0.0, 0.97),
       seed=st.integers(0, 2**16), max_iters=st.integers(1, 60))
def test_value_iteration_property(B, S, A, gamma, seed, max_iters):
    P, R, _ = _mdps(B, S, A, torch.float64, seed)
    out = rlkernels.value_iteration(P, R, gamma, tol=1e-6, max_iters=max_iters)
    V, Q, pol, iters, res = reference.value_iteration(P, R, gamma, tol=1e-6, max_iters=max_iters)
    assert out[3].item() == iters
    assert_close(out[0], V, torch.float64)
    assert_close(out[4], res, torch.float64)


# ----------------------------------------------------------------------------------------------------
# opcheck, torch.compile, backends
# ----------------------------------------------------------------------------------------------------


def _op_samples():
    r, q, online, probs, term = _q_inputs(9, 4, torch.float32, seed=1)
    qd, actions, targets, weights = _td_inputs(9, 4, torch.float64, seed=2)
    rn, vn, nvn, bn, tn, trn = _n_step_inputs(7, 3, torch.float64, seed=3)
    P, R, V = _mdps(2, 5, 3, torch.float64, seed=4)
    canon = lambda x: x.reshape(1, 7, 3).contiguous()  # noqa: E731
    qg = qd.clone().requires_grad_()
    yg = targets.clone().requires_grad_()
    ops = torch.ops.rlkernels
    return [
        (ops.q_targets.default, (r, q, term, online, probs, 0.9, "double", 1.0)),
        (ops.q_targets.default, (r, q, None, None, None, 0.9, "soft", 0.5)),
        (ops.td_loss.default, (qg, actions, yg, weights, "huber", 1.0, "mean")),
        (ops.td_loss.default, (qg, actions, yg, None, "squared", 1.0, "none")),
        (ops.td_loss_backward.default, (torch.ones(()), None, qd, actions, targets, weights, "huber", 1.0, "mean",
                                        targets - qd.gather(1, actions.unsqueeze(1)).squeeze(1))),
        (ops.n_step_returns.default, (canon(rn).requires_grad_(), canon(vn).requires_grad_(), canon(nvn), None,
                                      canon(tn), canon(trn), 0.9, 3)),
        (ops.n_step_returns.default, (canon(rn).requires_grad_(), canon(vn), None, bn.reshape(1, 3), canon(tn), None,
                                      0.9, 2)),
        (ops.bellman_backup.default, (P.requires_grad_(), R, V, 0.9)),
        (ops.value_iteration.default, (P.detach(), R, None, 0.9, 1e-6, 50)),
    ]


def test_opcheck():
    for op, args in _op_samples():
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    r, q, online, probs, term = _q_inputs(16, 4, torch.float32, seed=1)
    qd, actions, targets, weights = _td_inputs(16, 4, torch.float32, seed=2)
    rn, vn, nvn, bn, tn, trn = _n_step_inputs(9, 16, torch.float32, seed=3)
    P, R, V = _mdps(2, 5, 3, torch.float32, seed=4)

    def step(q_online):
        y = rlkernels.q_targets(r, q, terminated=term, kind="double", next_q_online=online)
        loss, td = rlkernels.td_loss(q_online, actions, y)
        g = rlkernels.n_step_returns(rn, vn, n=3, gamma=0.9, terminated=tn)
        Qb, Vb, _ = rlkernels.bellman_backup(P, R, V, 0.9)
        Vi = rlkernels.value_iteration(P, R, 0.9, max_iters=20)[0]
        return loss + g.sum() + Qb.sum() + Vb.sum() + Vi.sum(), td

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    q1 = qd.clone().requires_grad_()
    q2 = qd.clone().requires_grad_()
    out_c, td_c = compiled(q1)
    out_e, td_e = step(q2)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(td_c, td_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(q1.grad, q2.grad)


def test_reference_backend_agrees():
    r, q, online, probs, term = _q_inputs(20, 3, torch.float64, seed=1)
    for kind in KINDS:
        kw = dict(terminated=term, kind=kind, next_q_online=online, next_probs=probs, temperature=0.3)
        torch.testing.assert_close(rlkernels.q_targets(r, q, backend="reference", **kw), rlkernels.q_targets(r, q, **kw))
    P, R, V = _mdps(2, 6, 3, torch.float64, seed=2)
    for a, b in zip(rlkernels.value_iteration(P, R, 0.9, backend="reference"), rlkernels.value_iteration(P, R, 0.9)):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------
# Bad input: the error names the argument
# ----------------------------------------------------------------------------------------------------

_r, _q, _on, _pr, _term = _q_inputs(6, 3, torch.float32, seed=0)
_qd, _act, _y, _w = _td_inputs(6, 3, torch.float32, seed=0)
_P, _R, _V = _mdps(2, 4, 3, torch.float32, seed=0)

BAD = [
    (lambda: rlkernels.q_targets(_r, _q[:5]), ValueError, "next_q"),
    (lambda: rlkernels.q_targets(_r, _q[:, :0]), ValueError, "at least one action"),
    (lambda: rlkernels.q_targets(_r.long(), _q), TypeError, "rewards"),
    (lambda: rlkernels.q_targets(_r, _q, kind="nope"), ValueError, "kind"),
    (lambda: rlkernels.q_targets(_r, _q, kind="double"), ValueError, "next_q_online"),
    (lambda: rlkernels.q_targets(_r, _q, kind="expected"), ValueError, "next_probs"),
    (lambda: rlkernels.q_targets(_r, _q, kind="soft"), ValueError, "temperature"),
    (lambda: rlkernels.q_targets(_r, _q, kind="soft", temperature=0.0), ValueError, "temperature"),
    (lambda: rlkernels.q_targets(_r, _q, kind="double", next_q_online=_on[:, :2]), ValueError, "next_q_online"),
    (lambda: rlkernels.q_targets(_r, _q, terminated=_term[:3]), ValueError, "terminated"),
    (lambda: rlkernels.q_targets(_r, _q, gamma=1.5), ValueError, "gamma"),
    (lambda: rlkernels.q_targets(_r, _q, n=0), ValueError, "n"),
    (lambda: rlkernels.q_targets(_r, _q, backend="nope"), RuntimeError, "unknown backend"),
    (lambda: rlkernels.td_loss(_qd, _act.float(), _y), TypeError, "actions"),
    (lambda: rlkernels.td_loss(_qd, _act, _y[:4]), ValueError, "targets"),
    (lambda: rlkernels.td_loss(_qd[:4], _act, _y), ValueError, "q"),
    (lambda: rlkernels.td_loss(_qd, _act, _y, weights=_w[:2]), ValueError, "weights"),
    (lambda: rlkernels.td_loss(_qd, _act + 3, _y), ValueError, "actions"),
    (lambda: rlkernels.td_loss(_qd, _act - 1 - _act, _y), ValueError, "actions"),
    (lambda: rlkernels.td_loss(_qd, _act, _y, loss="l1"), ValueError, "loss"),
    (lambda: rlkernels.td_loss(_qd, _act, _y, delta=0.0), ValueError, "delta"),
    (lambda: rlkernels.td_loss(_qd, _act, _y, reduction="max"), ValueError, "reduction"),
    (lambda: rlkernels.n_step_returns(_y, _y, n=0), ValueError, "n"),
    (lambda: rlkernels.n_step_returns(_y, _y[:3], n=2), ValueError, "values"),
    (lambda: rlkernels.n_step_returns(_y, _y, n=2, truncated=_term), ValueError, "next_values"),
    (lambda: rlkernels.n_step_returns(_y, _y, n=2, time_dim=3), ValueError, "time_dim"),
    (lambda: rlkernels.bellman_backup(_P[..., :3], _R, _V), ValueError, "P"),
    (lambda: rlkernels.bellman_backup(_P, _R[..., :2], _V), ValueError, "R"),
    (lambda: rlkernels.bellman_backup(_P, _R, _V[:, :2]), ValueError, "V"),
    (lambda: rlkernels.bellman_backup(_P, _R, None), TypeError, "V"),
    (lambda: rlkernels.value_iteration(_P, _R, 0.9, max_iters=0), ValueError, "max_iters"),
    (lambda: rlkernels.value_iteration(_P, _R, 0.9, tol=-1.0), ValueError, "tol"),
    (lambda: rlkernels.value_iteration(_P, _R, 0.9, V0=_V[:1]), ValueError, "V0"),
    (lambda: rlkernels.value_iteration(_P, _R, 2.0), ValueError, "gamma"),
]


@pytest.mark.parametrize("call,exc,word", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input(call, exc, word):
    with pytest.raises(exc, match=word):
        call()

