"""Tests of the Bellman family (rlkernels/bellman.py, csrc/cpu/bellman_*.cpp; docs/design.md §4.5) on every backend.

Oracles: `rlkernels.reference` (NumPy, float64) on random and property-based cases; hand-computed double-Q
and expected-SARSA targets; value iteration against MDPs with known solutions (a chain with a closed form,
a gridworld of shortest paths) and a NumPy value-iteration loop; torch autograd of the plain formulas for
gradients (gradcheck in float64).

The other backends are checked against the reference and the CPU backend. Triton runs on tiny shapes under
the interpreter, with the `small_tiles` fixture shrinking the kernels' tiles so that those shapes still cross
every tile boundary (several row / action / state / next-state chunks). The GPU-sized tests (gpu_backends:
cuda, and triton on CUDA tensors) also check bit-identical repeated runs, no host synchronization, opcheck,
torch.compile(fullgraph=True) and CUDA-graph capture; they are skipped without a GPU or without the ops'
CUDA kernels.
"""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (DTYPES, LOW_PRECISION, assert_close, backends, finite_scale, gpu_backends, record_triton_grids,
                      sample_inputs)
from hypothesis import given
from hypothesis import strategies as st

import rlkernels
from rlkernels import reference

KINDS = ("max", "double", "expected", "soft")
OPS = (
    "q_targets",
    "td_loss",
    "td_loss_backward",
    "n_step_returns",
    "n_step_returns_backward",
    "bellman_backup",
    "value_iteration",
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _rounded(x, dtype):
    """x as the kernel sees it: rounded to dtype (16-bit inputs are compared on their rounded values)."""
    return x.to(dtype).double() if x.is_floating_point() else x


# ----------------------------------------------------------------------------------------------------
# q_targets
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,A", [(1, 1), (7, 3), (97, 18), (1025, 5)])
def test_q_targets_matches_reference(kind, B, A, dtype):
    r, q, online, probs, term = sample_inputs("q_targets", (B,), A=A, seed=B * 31 + A, dtype=dtype)
    kw = dict(terminated=term, gamma=0.97, kind=kind, next_q_online=online, next_probs=probs, n=2)
    y = rlkernels.q_targets(r, q, temperature=0.7 if kind == "soft" else None, **kw)
    assert y.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not y.requires_grad
    expected = reference.q_targets(
        _rounded(r, dtype),
        _rounded(q, dtype),
        terminated=term,
        gamma=0.97,
        kind=kind,
        next_q_online=_rounded(online, dtype),
        next_probs=_rounded(probs, dtype),
        temperature=0.7 if kind == "soft" else None,
        n=2,
    )
    assert_close(y, expected, dtype, name=kind)


def test_q_targets_hand_computed():
    r = torch.tensor([1.0, 0.5, -1.0])
    next_q = torch.tensor([[1.0, 4.0, 2.0], [3.0, -1.0, 0.0], [9.0, 9.0, 9.0]])
    online = torch.tensor([[5.0, 0.0, 5.0], [0.0, 2.0, 1.0], [0.0, 0.0, 0.0]])  # ties: first index
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    term = torch.tensor([False, False, True])
    g = 0.9
    torch.testing.assert_close(
        rlkernels.q_targets(r, next_q, terminated=term, gamma=g),
        torch.tensor([1 + g * 4.0, 0.5 + g * 3.0, -1.0]),
    )
    # Double DQN: the online net picks action 0 (tie with 2) and action 1; the target net evaluates them.
    torch.testing.assert_close(
        rlkernels.q_targets(r, next_q, terminated=term, gamma=g, kind="double", next_q_online=online),
        torch.tensor([1 + g * 1.0, 0.5 + g * -1.0, -1.0]),
    )
    # Expected SARSA: 0.5*1 + 0.25*4 + 0.25*2 = 2; the second row's policy is deterministic on action 1.
    torch.testing.assert_close(
        rlkernels.q_targets(r, next_q, terminated=term, gamma=g, kind="expected", next_probs=probs),
        torch.tensor([1 + g * 2.0, 0.5 + g * -1.0, -1.0]),
    )
    # n-step: gamma^n.
    torch.testing.assert_close(
        rlkernels.q_targets(r, next_q, gamma=g, n=3),
        torch.tensor([1 + g**3 * 4.0, 0.5 + g**3 * 3.0, -1.0 + g**3 * 9.0]),
    )


def test_q_targets_soft_limits():
    q = torch.tensor([[0.0, 1.0, 2.0], [-math.inf, -math.inf, -math.inf], [-math.inf, 3.0, -math.inf]])
    r = torch.zeros(3)
    y = rlkernels.q_targets(r, q, gamma=1.0, kind="soft", temperature=0.5)
    expected = torch.stack([0.5 * torch.logsumexp(q[0] / 0.5, 0), torch.tensor(-math.inf), torch.tensor(3.0)])
    torch.testing.assert_close(y, expected)
    # Huge logits: (x - max) / T, never x / T - max / T, whose FMA residual would overflow exp (a past bug).
    for dtype in (torch.float32, torch.float64):
        big = torch.tensor(
            [[1e30, -1e30, 0.0, 0.0, -math.inf] + [0.0] * 11 + [1e20, 1e30 * 0.999]], dtype=dtype
        )
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
        y = rlkernels.q_targets(
            r,
            q,
            terminated=term,
            kind=kind,
            next_q_online=q.nan_to_num(),
            next_probs=torch.full_like(q, 0.5),
            temperature=1.0,
        )
        torch.testing.assert_close(y, r)
    # Not terminated: NaN propagates like numpy's max (the target is garbage in, garbage out, not hidden).
    y = rlkernels.q_targets(r, q)
    assert math.isnan(y[0]) and y[1] == math.inf and y[2] == -math.inf


def test_q_targets_leading_dims_and_mixed_dtypes():
    r, q, online, probs, term = sample_inputs("q_targets", (24,), A=4, seed=5, dtype=torch.float64)
    y = rlkernels.q_targets(
        r.reshape(2, 3, 4).float(),
        q.reshape(2, 3, 4, 4),
        terminated=term.reshape(2, 3, 4),
        kind="double",
        next_q_online=online.reshape(2, 3, 4, 4).half(),
        gamma=0.5,
    )
    assert y.shape == (2, 3, 4) and y.dtype == torch.float64
    expected = reference.q_targets(
        r.float().double(), q, terminated=term, kind="double", next_q_online=online.half().double(), gamma=0.5
    )
    assert_close(y.reshape(-1), expected, torch.float64)


def test_q_targets_uint8_and_float_terminated():
    r, q, _, _, term = sample_inputs("q_targets", (33,), A=3, seed=2, dtype=torch.float32)
    base = rlkernels.q_targets(r, q, terminated=term)
    torch.testing.assert_close(rlkernels.q_targets(r, q, terminated=term.to(torch.uint8)), base)
    torch.testing.assert_close(rlkernels.q_targets(r, q, terminated=term.float()), base)


@given(
    B=st.integers(1, 300),
    A=st.integers(1, 40),
    kind=st.sampled_from(KINDS),
    n=st.integers(1, 5),
    gamma=st.floats(0.0, 1.0),
    temperature=st.floats(0.05, 5.0),
    seed=st.integers(0, 2**16),
    with_term=st.booleans(),
)
def test_q_targets_property(B, A, kind, n, gamma, temperature, seed, with_term):
    r, q, online, probs, term = sample_inputs("q_targets", (B,), A=A, dtype=torch.float64, seed=seed)
    term = term if with_term else None
    y = rlkernels.q_targets(
        r,
        q,
        terminated=term,
        gamma=gamma,
        kind=kind,
        next_q_online=online,
        next_probs=probs,
        temperature=temperature,
        n=n,
    )
    expected = reference.q_targets(
        r,
        q,
        terminated=term,
        gamma=gamma,
        kind=kind,
        next_q_online=online,
        next_probs=probs,
        temperature=temperature if kind == "soft" else None,
        n=n,
    )
    assert_close(y, expected, torch.float64)


@pytest.mark.parametrize("A", [8, 9, 15, 16, 17, 18, 25, 40])
@pytest.mark.parametrize("kind", KINDS)
def test_q_targets_float32_rows_ties_nan_inf(kind, A):
    check_q_rows_ties_nan_inf(kind, A)


def check_q_rows_ties_nan_inf(kind, A):
    """float32 rows of 8 or more actions run whole vectors plus one overlapping the last: a value the two
    share must count once in sums, and ties must still pick the first index (values from a small integer
    set: ties everywhere, in the overlap too). Rows with NaN and +-inf follow the reference's rules."""
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
    q[23, A - 3 :] = math.inf
    online[60, A - 1] = math.inf  # the argmax in the last lane of the overlapping vector
    online[61, A - 8] = 9.0  # ... in its first lane (also the last lane of a whole vector or earlier)
    y = rlkernels.q_targets(
        r,
        q,
        gamma=0.9,
        kind=kind,
        next_q_online=online,
        next_probs=probs,
        temperature=0.6 if kind == "soft" else None,
    )
    expected = reference.q_targets(
        r.double(),
        q.double(),
        gamma=0.9,
        kind=kind,
        next_q_online=online.double(),
        next_probs=probs.double(),
        temperature=0.6 if kind == "soft" else None,
    )
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
    y32 = rlkernels.q_targets(
        r.float(), q.float(), terminated=term, next_q_online=online.float(), next_probs=probs.float(), **kw
    )
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y32, rtol=0, atol=0, equal_nan=True)
    expected = reference.q_targets(
        r.double(),
        q.double(),
        terminated=term,
        next_q_online=online.double(),
        next_probs=probs.double(),
        **kw,
    )
    assert_close(y, expected, torch.float32, name=kind)


def test_q_targets_non_contiguous():
    r, q, online, probs, term = sample_inputs("q_targets", (40,), A=6, seed=9, dtype=torch.float32)
    q_t = q.t().contiguous().t()  # same values, column-major
    assert not q_t.is_contiguous()
    torch.testing.assert_close(
        rlkernels.q_targets(r[::2], q_t[::2], terminated=term[::2]),
        rlkernels.q_targets(r[::2].contiguous(), q[::2].contiguous(), terminated=term[::2].contiguous()),
    )


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", ["huber", "squared"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_td_loss_matches_reference_and_torch(dtype, loss, reduction, weighted):
    B, A = 1029, 18
    q, actions, targets, weights = sample_inputs("td_loss", (B, A), seed=B, dtype=dtype)
    w = weights if weighted else None
    q_req = q.clone().requires_grad_()
    y_req = targets.clone().requires_grad_()
    out, e = rlkernels.td_loss(q_req, actions, y_req, loss=loss, delta=1.5, weights=w, reduction=reduction)
    exp_loss, exp_e = reference.td_loss(
        _rounded(q, dtype),
        actions,
        _rounded(targets, dtype),
        loss=loss,
        delta=1.5,
        weights=None if w is None else _rounded(w, dtype),
        reduction=reduction,
    )
    assert_close(out.detach(), exp_loss, dtype, name="loss")
    assert_close(e, exp_e, dtype, name="td_errors")
    # Gradients against torch autograd of the eager code (float64 on the rounded inputs).
    q64 = _rounded(q, dtype).requires_grad_()
    y64 = _rounded(targets, dtype).requires_grad_()
    ref_out, _ = torch_td_loss(
        q64, actions, y64, loss, 1.5, None if w is None else _rounded(w, dtype), reduction
    )
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
    q, actions, targets, weights = sample_inputs("td_loss", (B, A), seed=5, scale=1.5, dtype=dtype)
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
    q, actions, targets, _ = sample_inputs("td_loss", (300, 6), seed=8, dtype=torch.float32)
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
    q, actions, targets, _ = sample_inputs("td_loss", (40, 5), seed=9, dtype=torch.float32)
    _, e = torch.ops.rlkernels.td_loss(q, actions, targets, None, "huber", 1.0, "mean")
    bad = actions.clone()
    bad[17] = 5
    for td in (None, e):
        with pytest.raises(ValueError, match=r"actions\[17\] = 5"):
            torch.ops.rlkernels.td_loss_backward(
                torch.ones(()), None, q, bad, targets, None, "huber", 1.0, "mean", td
            )
    with pytest.raises(ValueError, match="td_errors must have 40 elements"):
        torch.ops.rlkernels.td_loss_backward(
            torch.ones(()), None, q, actions, targets, None, "huber", 1.0, "mean", e[:3]
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_td_loss_forward_reports_the_first_bad_action(dtype):
    # The float32 forward gathers 8 rows per step: a bad action inside such a group (and after the groups, in
    # the tail rows), the first of several reported, negative ones too, for every row chunk.
    q, actions, targets, _ = sample_inputs(
        "td_loss", (5003, 5), seed=10, dtype=dtype
    )  # the last chunk ends in 3 rows after its groups
    for rows, value in (
        ([37, 61], 5),
        ([4099, 4100], -1),
        ([4999, 5001], 7),
        ([5001], 5),
        ([8, 4097], 1 << 40),
    ):
        bad = actions.clone()
        bad[rows] = value
        with pytest.raises(ValueError, match=rf"actions\[{rows[0]}\] = {value}\b"):
            rlkernels.td_loss(q, bad, targets)
    loss, e = rlkernels.td_loss(q, actions, targets, reduction="none")  # in-range actions still work
    assert torch.equal(e, targets - q.gather(1, actions[:, None]).squeeze(1))


def test_td_loss_gradcheck():
    q, actions, targets, weights = sample_inputs("td_loss", (13, 4), seed=3, dtype=torch.float64)
    targets = targets * 2  # both Huber branches
    for loss in ("huber", "squared"):
        for reduction in ("mean", "sum", "none"):

            def f(q, y):
                out, e = rlkernels.td_loss(
                    q, actions, y, loss=loss, weights=weights, reduction=reduction, delta=0.8
                )
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
    q, actions, targets, weights = sample_inputs("td_loss", (24, 5), seed=11, dtype=torch.float32)
    out, e = rlkernels.td_loss(
        q.reshape(4, 6, 5), actions.reshape(4, 6).int(), targets.reshape(4, 6), reduction="none"
    )
    assert out.shape == (4, 6) and e.shape == (4, 6)
    exp_out, exp_e = reference.td_loss(q, actions, targets, reduction="none")
    assert_close(out.reshape(-1), exp_out, torch.float32)
    assert_close(e.reshape(-1), exp_e, torch.float32)


@given(
    B=st.integers(0, 200),
    A=st.integers(1, 30),
    loss=st.sampled_from(["huber", "squared"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    delta=st.floats(0.05, 10.0),
    seed=st.integers(0, 2**16),
    weighted=st.booleans(),
)
def test_td_loss_property(B, A, loss, reduction, delta, seed, weighted):
    q, actions, targets, weights = sample_inputs("td_loss", (B, A), scale=4.0, dtype=torch.float64, seed=seed)
    w = weights if weighted else None
    out, e = rlkernels.td_loss(q, actions, targets, loss=loss, delta=delta, weights=w, reduction=reduction)
    exp_out, exp_e = reference.td_loss(
        q, actions, targets, loss=loss, delta=delta, weights=w, reduction=reduction
    )
    assert_close(out, exp_out, torch.float64)
    assert_close(e, exp_e, torch.float64)


def test_td_loss_deterministic_across_threads():
    q, actions, targets, _ = sample_inputs("td_loss", (50_000, 7), seed=1, dtype=torch.float32)
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("with_next", [False, True])
@pytest.mark.parametrize("T,N", [(1, 1), (17, 5), (129, 70)])
def test_n_step_matches_reference(dtype, n, with_next, T, N):
    r, v, nv, boot, term, trunc = sample_inputs("n_step_returns", (T, N), seed=T * N + n, dtype=dtype)
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


@given(
    T=st.integers(1, 60),
    N=st.integers(1, 6),
    n=st.integers(1, 12),
    gamma=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    with_next=st.booleans(),
    time_dim=st.sampled_from([0, 1, -1]),
)
def test_n_step_property(T, N, n, gamma, seed, with_next, time_dim):
    r, v, nv, boot, term, trunc = sample_inputs(
        "n_step_returns", (T, N), p_term=0.15, p_trunc=0.15, dtype=torch.float64, seed=seed
    )
    if time_dim != 0:  # batch-major [N, T]
        r, v, nv, term, trunc = (x.t() for x in (r, v, nv, term, trunc))
    kw = dict(n=n, gamma=gamma, terminated=term, time_dim=time_dim)
    kw.update(dict(truncated=trunc, next_values=nv) if with_next else dict(bootstrap_value=boot))
    assert_close(rlkernels.n_step_returns(r, v, **kw), reference.n_step_returns(r, v, **kw), torch.float64)


def test_n_step_gradcheck():
    r, v, nv, boot, term, trunc = sample_inputs(
        "n_step_returns", (19, 3), seed=4, p_term=0.2, p_trunc=0.2, dtype=torch.float64
    )
    req = [x.clone().requires_grad_() for x in (r, v, nv, boot)]
    for n in (1, 2, 5):
        assert torch.autograd.gradcheck(
            lambda r, v, nv: rlkernels.n_step_returns(
                r, v, n=n, gamma=0.9, terminated=term, truncated=trunc, next_values=nv
            ),
            req[:3],
        )
        assert torch.autograd.gradcheck(
            lambda r, v, b: rlkernels.n_step_returns(
                r, v, n=n, gamma=0.9, terminated=term, bootstrap_value=b
            ),
            (req[0], req[1], req[3]),
        )


def test_n_step_n1_is_one_step_td_target():
    r, v, nv, boot, term, trunc = sample_inputs("n_step_returns", (50, 4), seed=8, dtype=torch.float64)
    out = rlkernels.n_step_returns(r, v, n=1, gamma=0.9, terminated=term, truncated=trunc, next_values=nv)
    torch.testing.assert_close(out, r + 0.9 * (~term) * nv)


def test_n_step_large_n_equals_discounted_returns():
    r, v, nv, boot, term, trunc = sample_inputs("n_step_returns", (40, 3), seed=6, dtype=torch.float64)
    out = rlkernels.n_step_returns(r, v, n=40, gamma=0.9, terminated=term, truncated=trunc, next_values=nv)
    full = rlkernels.discounted_returns(r, gamma=0.9, terminated=term, truncated=trunc, next_values=nv)
    torch.testing.assert_close(out, full)


# ----------------------------------------------------------------------------------------------------
# bellman_backup and value_iteration
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,A", [(1, 1, 1), (3, 7, 4), (2, 33, 5), (1, 130, 2)])
def test_bellman_backup_matches_reference(dtype, B, S, A):
    P, R, V = sample_inputs("bellman_backup", (B, S, A), seed=B * S * A, dtype=dtype)
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
    P, R, V = sample_inputs("bellman_backup", (6, 5, 3), seed=1, dtype=torch.float32)
    R[..., 1] = R[..., 0]
    P[..., 1, :] = P[..., 0, :]  # actions 0 and 1 identical: argmax must be 0
    Q, Vn, pol = rlkernels.bellman_backup(
        P.reshape(2, 3, 5, 3, 5), R.reshape(2, 3, 5, 3), V.reshape(2, 3, 5), 0.8
    )
    assert Q.shape == (2, 3, 5, 3) and Vn.shape == (2, 3, 5) and pol.shape == (2, 3, 5)
    eQ, eV, ep = reference.bellman_backup(P, R, V, 0.8)
    assert_close(Q.reshape(6, 5, 3), eQ, torch.float32)
    assert (pol.reshape(6, 5).numpy() == ep).all()
    assert not (pol == 1).any()


def test_bellman_backup_gradcheck():
    P, R, V = sample_inputs("bellman_backup", (2, 4, 3), seed=2, dtype=torch.float64)
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
        V, Q, pol, iters, res = rlkernels.value_iteration(
            P.to(dtype), R.to(dtype), gamma, tol=tol, max_iters=5000
        )
        assert iters.dtype == torch.int64 and iters.dim() == 0 and 1 < iters.item() < 5000
        assert res.item() < tol
        # |V_k - V*| <= gamma / (1 - gamma) * residual
        torch.testing.assert_close(
            V.double(), V_star, rtol=0, atol=20 * tol / (1 - gamma) + 1e-5 * (dtype != torch.float64)
        )
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
    P, R, _ = sample_inputs("bellman_backup", (B, S, A), seed=B + S + A, sparse=True, dtype=torch.float64)
    # Different rewards scales give different convergence speeds: the batch must still stop together.
    R = R * torch.logspace(-2, 1, B, dtype=torch.float64)[:, None, None]
    out = rlkernels.value_iteration(P, R, 0.95, tol=1e-7, max_iters=max_iters)
    for expected in (
        _numpy_value_iteration(P.numpy(), R.numpy(), 0.95, 1e-7, max_iters),
        reference.value_iteration(P, R, 0.95, tol=1e-7, max_iters=max_iters),
    ):
        V, Q, pol, iters, res = expected
        assert out[3].item() == iters
        assert_close(out[0], V, torch.float64, name="V")
        assert_close(out[1], Q, torch.float64, name="Q")
        np.testing.assert_array_equal(out[2].numpy(), pol)
        assert_close(out[4], res, torch.float64, name="residual")


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_iteration_dtypes_and_V0(dtype):
    P, R, V0 = sample_inputs("bellman_backup", (4, 12, 3), seed=7, dtype=dtype)
    out = rlkernels.value_iteration(P, R, 0.8, tol=1e-4, V0=V0, max_iters=200)
    exp = reference.value_iteration(
        _rounded(P, dtype), _rounded(R, dtype), 0.8, tol=1e-4, max_iters=200, V0=_rounded(V0, dtype)
    )
    assert_close(out[0], exp[0], dtype, name="V")
    if dtype not in LOW_PRECISION:
        assert out[3].item() == exp[3]
    else:  # rounding may move the stopping iteration by one
        assert abs(out[3].item() - exp[3]) <= 1


def test_value_iteration_few_mdps_split_states():
    """One MDP on several threads (states split) must equal the single-thread result exactly."""
    P, R, _ = sample_inputs("bellman_backup", (1, 300, 4), seed=12, dtype=torch.float32)
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
    P, R, _ = sample_inputs("bellman_backup", (2, 5, 2), seed=3, dtype=torch.float64)
    V, Q, pol, iters, res = rlkernels.value_iteration(P, R, 0.99, tol=0.0, max_iters=7)
    assert iters.item() == 7 and (res > 0).all()
    R_nan = R.clone()
    R_nan[1, 0, 0] = math.nan
    V, Q, pol, iters, res = rlkernels.value_iteration(P, R_nan, 0.9, max_iters=11)
    assert iters.item() == 11 and math.isnan(res[1].item())


@given(
    B=st.integers(1, 4),
    S=st.integers(1, 12),
    A=st.integers(1, 4),
    gamma=st.floats(0.0, 0.97),
    seed=st.integers(0, 2**16),
    max_iters=st.integers(1, 60),
)
def test_value_iteration_property(B, S, A, gamma, seed, max_iters):
    P, R, _ = sample_inputs("bellman_backup", (B, S, A), dtype=torch.float64, seed=seed)
    out = rlkernels.value_iteration(P, R, gamma, tol=1e-6, max_iters=max_iters)
    V, Q, pol, iters, res = reference.value_iteration(P, R, gamma, tol=1e-6, max_iters=max_iters)
    assert out[3].item() == iters
    assert_close(out[0], V, torch.float64)
    assert_close(out[4], res, torch.float64)


# ----------------------------------------------------------------------------------------------------
# opcheck, torch.compile, backends
# ----------------------------------------------------------------------------------------------------


def _op_samples():
    r, q, online, probs, term = sample_inputs("q_targets", (9,), A=4, seed=1, dtype=torch.float32)
    qd, actions, targets, weights = sample_inputs("td_loss", (9, 4), seed=2, dtype=torch.float64)
    rn, vn, nvn, bn, tn, trn = sample_inputs("n_step_returns", (7, 3), seed=3, dtype=torch.float64)
    P, R, V = sample_inputs("bellman_backup", (2, 5, 3), seed=4, dtype=torch.float64)
    canon = lambda x: x.reshape(1, 7, 3).contiguous()  # noqa: E731
    qg = qd.clone().requires_grad_()
    yg = targets.clone().requires_grad_()
    ops = torch.ops.rlkernels
    return [
        (ops.q_targets.default, (r, q, term, online, probs, 0.9, "double", 1.0)),
        (ops.q_targets.default, (r, q, None, None, None, 0.9, "soft", 0.5)),
        (ops.td_loss.default, (qg, actions, yg, weights, "huber", 1.0, "mean")),
        (ops.td_loss.default, (qg, actions, yg, None, "squared", 1.0, "none")),
        (
            ops.td_loss_backward.default,
            (
                torch.ones(()),
                None,
                qd,
                actions,
                targets,
                weights,
                "huber",
                1.0,
                "mean",
                targets - qd.gather(1, actions.unsqueeze(1)).squeeze(1),
            ),
        ),
        (
            ops.n_step_returns.default,
            (
                canon(rn).requires_grad_(),
                canon(vn).requires_grad_(),
                canon(nvn),
                None,
                canon(tn),
                canon(trn),
                0.9,
                3,
            ),
        ),
        (
            ops.n_step_returns.default,
            (canon(rn).requires_grad_(), canon(vn), None, bn.reshape(1, 3), canon(tn), None, 0.9, 2),
        ),
        (ops.bellman_backup.default, (P.requires_grad_(), R, V, 0.9)),
        (ops.value_iteration.default, (P.detach(), R, None, 0.9, 1e-6, 50)),
    ]


def test_opcheck():
    for op, args in _op_samples():
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    r, q, online, probs, term = sample_inputs("q_targets", (16,), A=4, seed=1, dtype=torch.float32)
    qd, actions, targets, weights = sample_inputs("td_loss", (16, 4), seed=2, dtype=torch.float32)
    rn, vn, nvn, bn, tn, trn = sample_inputs("n_step_returns", (9, 16), seed=3, dtype=torch.float32)
    P, R, V = sample_inputs("bellman_backup", (2, 5, 3), seed=4, dtype=torch.float32)

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
    r, q, online, probs, term = sample_inputs("q_targets", (20,), A=3, seed=1, dtype=torch.float64)
    for kind in KINDS:
        kw = dict(terminated=term, kind=kind, next_q_online=online, next_probs=probs, temperature=0.3)
        torch.testing.assert_close(
            rlkernels.q_targets(r, q, backend="reference", **kw), rlkernels.q_targets(r, q, **kw)
        )
    P, R, V = sample_inputs("bellman_backup", (2, 6, 3), seed=2, dtype=torch.float64)
    for a, b in zip(
        rlkernels.value_iteration(P, R, 0.9, backend="reference"), rlkernels.value_iteration(P, R, 0.9)
    ):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------
# Bad input: the error names the argument
# ----------------------------------------------------------------------------------------------------

_r, _q, _on, _pr, _term = sample_inputs("q_targets", (6,), A=3, seed=0, dtype=torch.float32)
_qd, _act, _y, _w = sample_inputs("td_loss", (6, 3), seed=0, dtype=torch.float32)
_P, _R, _V = sample_inputs("bellman_backup", (2, 4, 3), seed=0, dtype=torch.float32)

BAD = [
    (lambda: rlkernels.q_targets(_r, _q[:5]), ValueError, "next_q"),
    (lambda: rlkernels.q_targets(_r, _q[:, :0]), ValueError, "at least one action"),
    (lambda: rlkernels.q_targets(_r.long(), _q), TypeError, "rewards"),
    (lambda: rlkernels.q_targets(_r, _q, kind="nope"), ValueError, "kind"),
    (lambda: rlkernels.q_targets(_r, _q, kind="double"), ValueError, "next_q_online"),
    (lambda: rlkernels.q_targets(_r, _q, kind="expected"), ValueError, "next_probs"),
    (lambda: rlkernels.q_targets(_r, _q, kind="soft"), ValueError, "temperature"),
    (lambda: rlkernels.q_targets(_r, _q, kind="soft", temperature=0.0), ValueError, "temperature"),
    (
        lambda: rlkernels.q_targets(_r, _q, kind="double", next_q_online=_on[:, :2]),
        ValueError,
        "next_q_online",
    ),
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


# ----------------------------------------------------------------------------------------------------
# Triton against the reference and the CPU backend, on tiny shapes with small tiles (CPU tensors: the
# interpreter)
# ----------------------------------------------------------------------------------------------------

SMALL_TRITON = backends(*OPS, include=("triton",), cpu_tensors=True)


def _triton_bellman():
    from rlkernels.triton import bellman

    return bellman


INF, NAN = math.inf, math.nan


def _out_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 2 actions, 16 rows, 2 lanes, [2 states, 2 actions, 4 next states], [2 MDPs, 2 state blocks]."""
    tb = _triton_bellman()
    for name, value in {
        "MAX_BLOCK_A": 2,
        "ROW_TILE": 32,
        "MAX_BLOCK_ROWS": 16,
        "LANE_BLOCK": 2,
        "BACKUP_MAX_K": 4,
        "BACKUP_MAX_A": 2,
        "BACKUP_TILE": 16,
        "RESIDUAL_BLOCK_B": 2,
        "RESIDUAL_BLOCK_N": 2,
    }.items():
        monkeypatch.setattr(tb, name, value)


# ----------------------------------------------------------------------------------------------------
# q_targets
# ----------------------------------------------------------------------------------------------------


def _small_q_inputs(shape, A, dtype, seed=0):
    return sample_inputs("q_targets", shape, A=A, scale=2.0, dtype=dtype, seed=seed)


def _q_kwargs(kind, term, online, probs):
    return {
        "terminated": term,
        "gamma": 0.9,
        "n": 2,
        "kind": kind,
        "next_q_online": online,
        "next_probs": probs,
        "temperature": 0.7 if kind == "soft" else None,
    }


@pytest.mark.parametrize("backend", SMALL_TRITON)
@pytest.mark.parametrize("kind, dtype", list(itertools.product(KINDS, DTYPES)))
def test_q_targets_matches_reference_and_cpu(kind, dtype, small_tiles, backend):
    r, q, online, probs, term = _small_q_inputs((3, 11), 7, dtype)  # 33 rows: 3 row blocks, 4 action tiles
    kw = _q_kwargs(kind, term, online, probs)
    y = rlkernels.q_targets(r, q, backend=backend, **kw)
    assert y.dtype == _out_dtype(dtype) and y.shape == (3, 11)
    assert_close(y, reference.q_targets(r, q, **kw), dtype)
    assert_close(y, rlkernels.q_targets(r, q, backend="cpu", **kw).numpy(), dtype)


@pytest.mark.parametrize("backend", SMALL_TRITON)
@pytest.mark.parametrize("kind", KINDS)
def test_q_targets_without_terminated(kind, backend):
    r, q, online, probs, _ = _small_q_inputs((5,), 3, torch.float64, seed=2)
    kw = _q_kwargs(kind, None, online, probs) | {"gamma": 1.0, "n": 1}
    y = rlkernels.q_targets(r, q, backend=backend, **kw)
    assert_close(y, reference.q_targets(r, q, **kw))
    assert_close(y, rlkernels.q_targets(r, q, backend="cpu", **kw).numpy())


def _edge_rows():
    return torch.tensor(
        [
            [1.0, 3.0, 3.0, 2.0, 0.0],  # tie: first index
            [NAN, 1.0, 2.0, 3.0, 4.0],  # NaN first
            [1.0, 2.0, NAN, 5.0, NAN],  # NaN after the max, in another tile
            [-INF, -INF, -INF, -INF, -INF],
            [-INF, 2.0, -INF, INF, 1.0],
            [INF, INF, INF, INF, INF],  # terminated below: the target is the reward
            [NAN, NAN, NAN, NAN, NAN],  # terminated below
            [1e30, -1e30, 0.0, 0.0, -INF],
            [0.0, 0.0, 7.0, 7.0, 7.0],  # tie across tiles
        ],
        dtype=torch.float64,
    )


@pytest.mark.parametrize("backend", SMALL_TRITON)
@pytest.mark.parametrize("kind, dtype", list(itertools.product(KINDS, (torch.float64, torch.float32))))
def test_q_targets_nan_inf_and_ties(kind, dtype, small_tiles, backend):
    q = _edge_rows().to(dtype)
    B, A = q.shape
    g = gen(1)
    r = torch.randn(B, generator=g, dtype=torch.float64).to(dtype)
    probs = torch.softmax(torch.randn(B, A, generator=g, dtype=torch.float64), -1)
    probs[0, 1] = 0.0
    term = torch.zeros(B, dtype=torch.bool)
    term[5] = term[6] = True
    # double: the online network holds the edge rows, the target network finite values
    target = q if kind != "double" else torch.randn(B, A, generator=g, dtype=torch.float64).to(dtype)
    kw = _q_kwargs(kind, term, q, probs.to(dtype))
    y = rlkernels.q_targets(r, target, backend=backend, **kw)
    assert_close(y, reference.q_targets(r, target, **kw), dtype)
    assert_close(y, rlkernels.q_targets(r, target, backend="cpu", **kw).numpy(), dtype)
    assert torch.equal(y[5:7], r[5:7].to(y.dtype))


# ----------------------------------------------------------------------------------------------------
# td_loss
# ----------------------------------------------------------------------------------------------------


def _small_td_inputs(B, A, dtype, seed=0):
    # TD errors of spread 1.5: both sides of the Huber delta (0.7) of the tests below.
    return sample_inputs("td_loss", (B, A), scale=1.0, target_noise=1.5, dtype=dtype, seed=seed)


def _td_run(backend, q, actions, targets, weights, **kw):
    q = q.clone().requires_grad_(True)
    y = targets.clone().requires_grad_(True)
    loss, e = rlkernels.td_loss(q, actions, y, weights=weights, backend=backend, **kw)
    g = gen(7)
    gl = torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype)
    ge = torch.randn(e.shape, generator=g, dtype=torch.float64).to(e.dtype)
    ((loss * gl).sum() + (e * ge).sum()).backward()
    return loss.detach(), e.detach(), q.grad, y.grad


@pytest.mark.parametrize("backend", SMALL_TRITON)
@pytest.mark.parametrize(
    "loss, reduction, weighted",
    list(itertools.product(("huber", "squared"), ("mean", "sum", "none"), (False, True))),
)
def test_td_loss_matches_reference_and_cpu(loss, reduction, weighted, small_tiles, backend):
    q, actions, targets, weights = _small_td_inputs(33, 5, torch.float64)  # 3 row blocks, 3 action tiles
    w = weights if weighted else None
    kw = {"loss": loss, "delta": 0.7, "reduction": reduction}
    t = _td_run(backend, q, actions, targets, w, **kw)
    c = _td_run("cpu", q, actions, targets, w, **kw)
    r_loss, r_e = reference.td_loss(q, actions, targets, weights=w, **kw)
    assert_close(t[0], r_loss, name="loss")
    assert_close(t[1], r_e, name="td_errors")
    for name, a, b in zip(("loss", "td_errors", "grad_q", "grad_targets"), t, c):
        assert_close(a, b.numpy(), name=name)
    assert ((t[2] != 0).sum(-1) <= 1).all()  # one non-zero per row


@pytest.mark.parametrize("backend", SMALL_TRITON)
@pytest.mark.parametrize("dtype", DTYPES)
def test_td_loss_dtypes(dtype, backend):
    q, actions, targets, weights = _small_td_inputs(21, 6, dtype, seed=3)
    t = _td_run(backend, q, actions, targets, weights)
    c = _td_run("cpu", q, actions, targets, weights)
    assert t[0].dtype == _out_dtype(dtype) and t[2].dtype == dtype and t[3].dtype == dtype
    r_loss, r_e = reference.td_loss(q, actions, targets, weights=weights)
    assert_close(t[0], r_loss, dtype)
    assert_close(t[1], r_e, dtype)
    for a, b in zip(t, c):
        assert_close(a, b.double().numpy(), dtype)


@pytest.mark.parametrize("backend", SMALL_TRITON)
def test_td_loss_empty_and_bad_action(backend):
    q = torch.zeros(0, 4)
    loss, e = rlkernels.td_loss(q, torch.zeros(0, dtype=torch.int64), torch.zeros(0), backend=backend)
    assert float(loss) == 0.0 and e.shape == (0,)
    # An action outside [0, A) cannot raise without a host sync: its row reads Q(s, a) as NaN (the CPU
    # backend raises a ValueError instead).
    q, actions, targets, _ = _small_td_inputs(4, 3, torch.float64)
    actions[2] = 3
    t = _td_run(backend, q, actions, targets, None, reduction="none")
    assert torch.isnan(t[1][2]) and torch.isnan(t[0][2]) and torch.isnan(t[3][2])
    assert torch.equal(t[2][2], torch.zeros(3, dtype=torch.float64))
    assert not torch.isnan(t[1][[0, 1, 3]]).any()
    with pytest.raises(ValueError, match="actions"):
        rlkernels.td_loss(q, actions, targets, backend="cpu")


# ----------------------------------------------------------------------------------------------------
# n_step_returns
# ----------------------------------------------------------------------------------------------------

N_STEP_CASES = {
    "n1": {"n": 1},
    "terminated-bootstrap": {"n": 3, "terminated": 0.2, "bootstrap": True},
    "truncated-next": {"n": 4, "terminated": 0.2, "truncated": 0.2},
    "n-over-T": {"n": 12, "terminated": 0.1, "bootstrap": True},
    "batch-major": {"n": 5, "terminated": 0.2, "truncated": 0.2, "time_dim": -1},
}


def _small_n_step_inputs(case, dtype, seed=0):
    time_dim = case.get("time_dim", 0)
    shape = (11, 3) if time_dim == 0 else (2, 11)
    r, v, nv, boot, term, trunc = sample_inputs(
        "n_step_returns", shape, p_term=case.get("terminated", 0.0), p_trunc=case.get("truncated", 0.0),
        time_dim=time_dim, dtype=dtype, seed=seed,
    )
    tensors = {"rewards": r, "values": v}
    kw = {"n": case["n"], "gamma": 0.9, "time_dim": time_dim}
    if case.get("terminated"):
        kw["terminated"] = term
    if case.get("truncated"):
        kw["truncated"] = trunc
        tensors["next_values"] = nv
    if case.get("bootstrap"):
        tensors["bootstrap_value"] = boot
    return tensors, kw


def _n_step_run(backend, tensors, kw):
    leaves = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
    out = rlkernels.n_step_returns(
        leaves["rewards"],
        leaves["values"],
        backend=backend,
        **{k: v for k, v in leaves.items() if k not in ("rewards", "values")},
        **kw,
    )
    up = torch.randn(out.shape, generator=gen(5), dtype=torch.float64).to(out.dtype)
    (out * up).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("backend", SMALL_TRITON)
@pytest.mark.parametrize("case", list(N_STEP_CASES))
def test_n_step_returns_matches_reference_and_cpu(case, small_tiles, backend):
    tensors, kw = _small_n_step_inputs(N_STEP_CASES[case], torch.float64)
    out, grads = _n_step_run(backend, tensors, kw)
    c_out, c_grads = _n_step_run("cpu", tensors, kw)
    rest = {k: v for k, v in tensors.items() if k not in ("rewards", "values")}
    assert_close(out, reference.n_step_returns(tensors["rewards"], tensors["values"], **rest, **kw))
    assert_close(out, c_out.numpy())
    assert grads.keys() == c_grads.keys()
    for k in grads:
        assert_close(grads[k], c_grads[k].numpy(), name=f"grad {k}")


@pytest.mark.parametrize("backend", SMALL_TRITON)
@pytest.mark.parametrize("dtype", DTYPES)
def test_n_step_returns_dtypes(dtype, backend):
    tensors, kw = _small_n_step_inputs({"n": 3, "terminated": 0.2, "truncated": 0.2}, dtype, seed=2)
    out, grads = _n_step_run(backend, tensors, kw)
    c_out, c_grads = _n_step_run("cpu", tensors, kw)
    assert out.dtype == _out_dtype(dtype)
    rest = {k: v for k, v in tensors.items() if k not in ("rewards", "values")}
    assert_close(out, reference.n_step_returns(tensors["rewards"], tensors["values"], **rest, **kw), dtype)
    assert_close(out, c_out.double().numpy(), dtype)
    for k in grads:
        assert grads[k].dtype == dtype
        assert_close(grads[k], c_grads[k].double().numpy(), dtype, name=f"grad {k}")


# ----------------------------------------------------------------------------------------------------
# bellman_backup
# ----------------------------------------------------------------------------------------------------


def _mdp(batch, S, A, dtype, seed=0):
    g = gen(seed)
    P = torch.softmax(3 * torch.randn((*batch, S, A, S), generator=g, dtype=torch.float64), -1).to(dtype)
    R = torch.randn((*batch, S, A), generator=g, dtype=torch.float64).to(dtype)
    V = (3 * torch.randn((*batch, S), generator=g, dtype=torch.float64)).to(dtype)
    return P, R, V


def _backup_run(backend, P, R, V):
    P, R, V = (x.clone().requires_grad_(True) for x in (P, R, V))
    Q, V_new, policy = rlkernels.bellman_backup(P, R, V, 0.9, backend=backend)
    g = gen(9)
    gq = torch.randn(Q.shape, generator=g, dtype=torch.float64).to(Q.dtype)
    gv = torch.randn(V_new.shape, generator=g, dtype=torch.float64).to(V_new.dtype)
    ((Q * gq).sum() + (V_new * gv).sum()).backward()
    return Q.detach(), V_new.detach(), policy, P.grad, R.grad, V.grad


@pytest.mark.parametrize("backend", SMALL_TRITON)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bellman_backup_matches_reference_and_cpu(dtype, small_tiles, backend):
    P, R, V = _mdp((2, 1), 9, 5, dtype)  # 5 state blocks, 3 action tiles, 3 next-state chunks
    t = _backup_run(backend, P, R, V)
    c = _backup_run("cpu", P, R, V)
    rQ, rV, rpol = reference.bellman_backup(P, R, V, 0.9)
    assert t[0].dtype == _out_dtype(dtype) and t[2].dtype == torch.int64
    assert t[0].shape == (2, 1, 9, 5) and t[1].shape == (2, 1, 9) and t[2].shape == (2, 1, 9)
    assert_close(t[0], rQ, dtype, name="Q")
    assert_close(t[1], rV, dtype, name="V_new")
    assert torch.equal(t[2], torch.as_tensor(rpol)) and torch.equal(t[2], c[2])
    for name, a, b in zip(("Q", "V_new", "policy", "grad P", "grad R", "grad V"), t, c):
        assert_close(a, b.double().numpy(), dtype, name=name)


@pytest.mark.parametrize("backend", SMALL_TRITON)
def test_bellman_backup_nan_inf_and_ties(small_tiles, backend):
    S, A = 5, 5
    P = torch.full((2, S, A, S), 1.0 / S, dtype=torch.float64)
    R = torch.zeros(2, S, A, dtype=torch.float64)  # all actions tie: policy 0
    V = torch.arange(2 * S, dtype=torch.float64).reshape(2, S)
    R[0, 1, 3] = NAN  # NaN after the tie: V_new NaN, policy 3
    R[0, 2] = torch.tensor([-INF, -INF, -INF, -INF, -INF])
    R[0, 3] = torch.tensor([1.0, NAN, 2.0, NAN, 5.0])
    R[1, 0, 4] = INF
    R[1, 2, 2:] = 1.0  # tie across action tiles: policy 2
    t = rlkernels.bellman_backup(P, R, V, 0.9, backend=backend)
    r = reference.bellman_backup(P, R, V, 0.9)
    c = rlkernels.bellman_backup(P, R, V, 0.9, backend="cpu")
    for a, b, cc in zip(t[:2], r[:2], c[:2]):
        assert_close(a, b)
        assert_close(a, cc.numpy())
    assert torch.equal(t[2], torch.as_tensor(r[2])) and torch.equal(t[2], c[2])
    assert t[2][0, :4].tolist() == [0, 3, 0, 1] and t[2][1, 2] == 2


# ----------------------------------------------------------------------------------------------------
# value_iteration
# ----------------------------------------------------------------------------------------------------


def _vi_check(backend, P, R, dtype, **kw):
    t = rlkernels.value_iteration(P, R, 0.5, backend=backend, **kw)
    c = rlkernels.value_iteration(P, R, 0.5, backend="cpu", **kw)
    r = reference.value_iteration(P, R, 0.5, **kw)
    assert t[3].dtype == torch.int64 and t[3].shape == ()
    assert int(t[3]) == r[3] == int(c[3]), (int(t[3]), r[3], int(c[3]))
    for name, a, b, cc in zip(("V", "Q", "policy", "iters", "residual"), t, r, c):
        if name == "residual":  # differences of near-equal values: relative to the values' scale
            assert_close(a, b, dtype, name=name, scale=finite_scale(r[0], at_least=0.0))
        elif name != "iters":
            assert_close(a, b, dtype, name=name)
            assert_close(a, cc.double().numpy(), dtype, name=name)
    return t


@pytest.mark.parametrize("backend", SMALL_TRITON)
@pytest.mark.parametrize("dtype", DTYPES)
def test_value_iteration_matches_reference_and_cpu(dtype, backend):
    P, R, _ = _mdp((2,), 6, 3, dtype, seed=4)
    tol = 1e-6 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 1e-3
    t = _vi_check(backend, P, R, dtype, tol=tol, max_iters=100)
    assert 1 < int(t[3]) < 100 and t[0].dtype == _out_dtype(dtype) and t[4].shape == (2,)


@pytest.mark.parametrize("backend", SMALL_TRITON)
def test_value_iteration_cap_and_V0(small_tiles, backend):
    P, R, V0 = _mdp((3,), 5, 3, torch.float64, seed=5)
    t = _vi_check(backend, P, R, torch.float64, tol=1e-8, max_iters=4, V0=V0)
    assert int(t[3]) == 4 and (t[4] >= 1e-8).any()
    _vi_check(backend, P, R, torch.float64, tol=10.0, max_iters=50, V0=V0)  # converged after the first backup


@pytest.mark.parametrize("backend", SMALL_TRITON)
def test_value_iteration_gated_launches_are_no_ops(monkeypatch, backend):
    # On a GPU the host enqueues all max_iters iterations; the ones after convergence must change nothing.
    P, R, _ = _mdp((2,), 4, 2, torch.float64, seed=6)
    early = rlkernels.value_iteration(P, R, 0.5, tol=1e-3, max_iters=30, backend=backend)
    monkeypatch.setattr(_triton_bellman(), "_STOP_EARLY_ON_CPU", False)
    n = int(early[3])
    full = rlkernels.value_iteration(P, R, 0.5, tol=1e-3, max_iters=n + 3, backend=backend)
    for a, b in zip(early, full):
        assert torch.equal(a, b)
    odd = rlkernels.value_iteration(P, R, 0.5, tol=1e-3, max_iters=n + 1, backend=backend)  # other V buffer
    assert torch.equal(odd[0], early[0]) and int(odd[3]) == n


@pytest.mark.parametrize("backend", SMALL_TRITON)
def test_value_iteration_nan_and_empty(backend):
    P, R, _ = _mdp((2,), 4, 2, torch.float64, seed=7)
    R[1, 2, 1] = NAN  # MDP 1 never converges: the batch runs to max_iters
    t = _vi_check(backend, P, R, torch.float64, tol=1e-3, max_iters=6)
    assert int(t[3]) == 6 and torch.isnan(t[4][1])
    for shape in ((0, 3, 2, 3), (2, 0, 2, 0)):
        P = torch.zeros(shape, dtype=torch.float64)
        R = torch.zeros(shape[:-1], dtype=torch.float64)
        t = rlkernels.value_iteration(P, R, 0.5, backend=backend)
        c = rlkernels.value_iteration(P, R, 0.5, backend="cpu")
        for a, b in zip(t, c):
            assert a.shape == b.shape and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", SMALL_TRITON)
def test_triton_opcheck(backend):
    import rlkernels.triton.bellman  # noqa: F401  (registers the triton_* ops, also when this test runs alone)

    ops = torch.ops.rlkernels
    r, q, online, probs, term = _small_q_inputs((6,), 4, torch.float64)
    for kind in KINDS:
        torch.library.opcheck(ops.triton_q_targets, (r, q, term, online, probs, 0.81, kind, 0.5))
    qq, actions, targets, weights = _small_td_inputs(6, 4, torch.float64)
    qg, yg = qq.clone().requires_grad_(True), targets.clone().requires_grad_(True)
    torch.library.opcheck(ops.triton_td_loss, (qg, actions, yg, weights, "huber", 0.5, "mean"))
    torch.library.opcheck(ops.triton_td_loss, (qg, actions, yg, None, "squared", 1.0, "none"))
    gl, ge = torch.tensor(0.3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    torch.library.opcheck(
        ops.triton_td_loss_backward, (gl, ge, qq, actions, targets, weights, "huber", 0.5, "sum")
    )
    g = gen(3)
    rw, v, nv = (torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    boot = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    tm, tr = (torch.rand(2, 5, 3, generator=g) < 0.3 for _ in range(2))
    torch.library.opcheck(ops.triton_n_step_returns, (rw, v, None, boot, tm, None, 0.9, 2))
    torch.library.opcheck(ops.triton_n_step_returns, (rw, v, nv, None, tm, tr, 0.9, 3))
    torch.library.opcheck(
        ops.triton_n_step_returns_backward, (rw.detach(), tm, tr, rw.detach(), 0.9, 3, True)
    )
    P, R, V = (x.requires_grad_(True) for x in _mdp((2,), 4, 3, torch.float64))
    torch.library.opcheck(ops.triton_bellman_backup, (P, R, V, 0.9))
    torch.library.opcheck(ops.triton_value_iteration, (P.detach(), R.detach(), None, 0.5, 1e-3, 5))


@pytest.mark.parametrize("backend", SMALL_TRITON)
def test_triton_compile_fullgraph(backend):
    r, q, online, _, term = _small_q_inputs((8,), 4, torch.float64)
    qq, actions, _, weights = _small_td_inputs(8, 4, torch.float64)
    P, R, V = _mdp((2,), 3, 2, torch.float64)
    rw = torch.randn(6, 2, dtype=torch.float64)

    def f(qv, vals, V):
        y = rlkernels.q_targets(r, q, terminated=term, kind="double", next_q_online=online, backend=backend)
        loss, e = rlkernels.td_loss(qv, actions, y, weights=weights, backend=backend)
        G = rlkernels.n_step_returns(rw, vals, n=2, gamma=0.9, backend=backend)
        _, V_new, _ = rlkernels.bellman_backup(P, R, V, 0.9, backend=backend)
        return loss + G.sum() + V_new.sum(), e

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    vals = torch.randn(6, 2, dtype=torch.float64)
    ins1 = [x.clone().requires_grad_(True) for x in (qq, vals, V)]
    ins2 = [x.clone().requires_grad_(True) for x in (qq, vals, V)]
    e, c = f(*ins1), compiled(*ins2)
    e[0].backward()
    c[0].backward()
    assert torch.equal(e[0], c[0]) and torch.equal(e[1], c[1])
    for a, b in zip(ins1, ins2):
        assert torch.equal(a.grad, b.grad)


# ----------------------------------------------------------------------------------------------------
# GPU-sized tests: each GPU backend against the CPU backend and the reference
# ----------------------------------------------------------------------------------------------------

DEVICE = "cuda"


def tol(dtype):
    """assert_close's tolerances of a kernel's output against the CPU kernel's (same input values, other
    summation order): absolute atol (scale=1.0)."""
    rtol, atol = {
        torch.float64: (1e-10, 1e-10),
        torch.float32: (1e-5, 1e-5),
        torch.bfloat16: (1e-4, 1e-4),
        torch.float16: (1e-4, 1e-4),
    }[dtype]
    return {"rtol": rtol, "atol": atol, "scale": 1.0}


def ref_tol(dtype):
    """The tolerances against the float64 reference of the same (rounded) inputs."""
    rtol, atol = {
        torch.float64: (1e-9, 1e-9),
        torch.float32: (1e-4, 1e-4),
        torch.bfloat16: (2e-3, 2e-3),
        torch.float16: (2e-3, 2e-3),
    }[dtype]
    return {"rtol": rtol, "atol": atol, "scale": 1.0}


def grad_tol(dtype):
    """Gradients are returned in the input dtype: a 16-bit gradient may round one unit apart where the float32
    values of the two backends differ in the last bit (FMA contraction, matmul order)."""
    if dtype in (torch.bfloat16, torch.float16):
        rtol, atol = {torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}[dtype]
        return {"rtol": rtol, "atol": atol, "scale": 1.0}
    return tol(dtype)


def dev(x):
    return None if x is None else x.to(DEVICE)


def cpu(x):
    return None if x is None else x.detach().cpu()


# ----------------------------------------------------------------------------------------------------
# q_targets
# ----------------------------------------------------------------------------------------------------


def q_inputs(B, A, dtype, seed, nonfinite=False):
    return sample_inputs("q_targets", (B,), A=A, ties=True, nonfinite=nonfinite, dtype=dtype, seed=seed)


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("A", (1, 3, 4, 18, 33, 100))
@pytest.mark.parametrize("kind", ("max", "double", "expected", "soft"))
@pytest.mark.parametrize("with_term", (False, True))
def test_q_targets_match_cpu_and_reference(kind, A, dtype, with_term, backend):
    B = 777  # several blocks, a partial last group of rows
    r, q, online, probs, term = q_inputs(B, A, dtype, seed=A * 10 + len(kind), nonfinite=True)
    term = term if with_term else None
    kw = dict(
        terminated=term,
        gamma=0.9,
        kind=kind,
        next_q_online=online,
        next_probs=probs,
        temperature=0.7 if kind == "soft" else None,
        n=3,
    )
    y_cpu = rlkernels.q_targets(r, q, backend="cpu", **kw)
    y = rlkernels.q_targets(
        dev(r),
        dev(q),
        **{k: dev(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()},
        backend=backend,
    )
    assert y.dtype == y_cpu.dtype and y.device.type == DEVICE and y.shape == (B,)
    assert_close(y, y_cpu, **tol(dtype))
    expected = reference.q_targets(
        r.double().numpy(),
        q.double().numpy(),
        terminated=None if term is None else term.numpy(),
        gamma=0.9,
        kind=kind,
        next_q_online=online.double().numpy(),
        next_probs=probs.double().numpy(),
        temperature=0.7 if kind == "soft" else None,
        n=3,
    )
    with np.errstate(all="ignore"):
        assert_close(y, torch.from_numpy(np.asarray(expected)), **ref_tol(dtype))


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
@pytest.mark.parametrize("kind", ("max", "double", "expected", "soft"))
def test_q_targets_leading_dims_uint8_flags_and_empty(kind, backend):
    r, q, online, probs, term = q_inputs(60, 5, torch.float32, seed=3)
    kw = dict(
        gamma=0.99,
        kind=kind,
        next_q_online=online,
        next_probs=probs,
        temperature=2.0 if kind == "soft" else None,
    )
    shaped = {k: v.reshape(3, 4, 5, 5) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    y_cpu = rlkernels.q_targets(
        r.reshape(3, 4, 5), q.reshape(3, 4, 5, 5), terminated=term.reshape(3, 4, 5), backend="cpu", **shaped
    )
    y = rlkernels.q_targets(
        dev(r.reshape(3, 4, 5)),
        dev(q.reshape(3, 4, 5, 5)),
        terminated=dev(term.to(torch.uint8).reshape(3, 4, 5)),
        backend=backend,
        **{k: dev(v) if isinstance(v, torch.Tensor) else v for k, v in shaped.items()},
    )
    assert_close(y, y_cpu, **tol(torch.float32))
    empty = rlkernels.q_targets(dev(torch.zeros(0)), dev(torch.zeros(0, 5)), backend=backend, kind="max")
    assert empty.shape == (0,)


# ----------------------------------------------------------------------------------------------------
# td_loss
# ----------------------------------------------------------------------------------------------------


def td_inputs(B, A, dtype, seed):
    return sample_inputs("td_loss", (B, A), dtype=dtype, seed=seed)


def td_run(q, actions, targets, weights, backend, grad_seed=0, **kw):
    q = q.detach().clone().requires_grad_(True)
    targets = targets.detach().clone().requires_grad_(True)
    loss, e = rlkernels.td_loss(q, actions, targets, weights=weights, backend=backend, **kw)
    g = gen(grad_seed)
    gl = torch.randn(loss.shape, generator=g, dtype=loss.dtype).to(loss.device)
    ge = torch.randn(e.shape, generator=g, dtype=e.dtype).to(e.device)
    gq, gy = torch.autograd.grad((loss * gl).sum() + (e * ge).sum(), (q, targets))
    return loss, e, gq, gy


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("loss", ("huber", "squared"))
@pytest.mark.parametrize("weighted", (False, True))
@pytest.mark.parametrize("B,A", ((1, 1), (300, 18), (5000, 4), (1_200_000, 3)))
def test_td_loss_forward_and_gradients_match_cpu(B, A, weighted, loss, reduction, dtype, backend):
    # B = 1.2M: more rows than kMaxPartials * kThreads * kRowsPerThread, so the reducing grid strides.
    q, actions, targets, weights = td_inputs(B, A, dtype, seed=B + A)
    w = weights if weighted else None
    kw = {"loss": loss, "delta": 0.8, "reduction": reduction}
    expected = td_run(q, actions, targets, w, "cpu", **kw)
    got = td_run(dev(q), dev(actions), dev(targets), dev(w), backend, **kw)
    for k, (a, e) in enumerate(zip(got, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close(a, e, **(grad_tol(dtype) if k >= 2 else tol(dtype)))
    if B <= 5000:
        lo, e = reference.td_loss(
            q.double().numpy(),
            actions.numpy(),
            targets.double().numpy(),
            weights=None if w is None else w.double().numpy(),
            **kw,
        )
        assert_close(got[0], torch.as_tensor(np.asarray(lo)), **ref_tol(dtype))
        assert_close(got[1], torch.as_tensor(np.asarray(e)), **ref_tol(dtype))


@pytest.mark.parametrize("backend", backends(*OPS, include=("cuda",)))
def test_td_loss_backward_op_directly(backend):
    """Each of grad_loss / grad_td_errors may be None; grad_q is dense with one non-zero per row."""
    q, actions, targets, weights = td_inputs(257, 7, torch.float32, seed=5)
    for reduction, (with_gl, with_gt) in itertools.product(
        ("mean", "sum", "none"), ((True, False), (False, True), (False, False))
    ):
        B = q.shape[0]
        gl = torch.randn(B if reduction == "none" else ()) if with_gl else None
        gt = torch.randn(B) if with_gt else None
        args = ("huber", 1.0, reduction)
        ref = torch.ops.rlkernels.td_loss_backward(gl, gt, q, actions, targets, weights, *args)
        got = torch.ops.rlkernels.td_loss_backward(
            dev(gl), dev(gt), dev(q), dev(actions), dev(targets), dev(weights), *args
        )
        for a, e in zip(got, ref):
            assert_close(a, e, **tol(torch.float32))
        assert int((cpu(got[0]) != 0).sum(1).max()) <= 1


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
def test_td_loss_empty_batch(backend):
    q, actions, targets, _ = td_inputs(0, 4, torch.float32, seed=0)
    for reduction in ("mean", "sum", "none"):
        loss, e = rlkernels.td_loss(dev(q), dev(actions), dev(targets), reduction=reduction, backend=backend)
        assert e.shape == (0,)
        if reduction != "none":
            assert float(loss) == 0.0


# ----------------------------------------------------------------------------------------------------
# n_step_returns
# ----------------------------------------------------------------------------------------------------


def nstep_inputs(shape, dtype, seed, flags):
    r, v, nv, boot, term, trunc = sample_inputs("n_step_returns", shape, dtype=dtype, seed=seed)
    return {
        "rewards": r,
        "values": v,
        "next_values": nv if "next" in flags else None,
        "terminated": term if "term" in flags else None,
        "truncated": trunc if "trunc" in flags else None,
        "bootstrap_value": boot if "boot" in flags else None,
    }


NSTEP_FLAGS = {
    "plain": (),
    "term_boot": ("term", "boot"),
    "everything": ("term", "trunc", "next", "boot"),
}
DIFF_NSTEP = ("rewards", "values", "next_values", "bootstrap_value")


def nstep_run(x, n, backend, time_dim=0, grad_seed=0):
    leaves = {
        k: (v.detach().clone().requires_grad_(True) if k in DIFF_NSTEP and v is not None else v)
        for k, v in x.items()
    }
    out = rlkernels.n_step_returns(
        leaves["rewards"],
        leaves["values"],
        n=n,
        gamma=0.9,
        terminated=leaves["terminated"],
        truncated=leaves["truncated"],
        next_values=leaves["next_values"],
        bootstrap_value=leaves["bootstrap_value"],
        time_dim=time_dim,
        backend=backend,
    )
    w = torch.randn(out.shape, generator=gen(grad_seed), dtype=out.dtype).to(out.device)
    names = [k for k in DIFF_NSTEP if leaves[k] is not None]
    grads = torch.autograd.grad((out * w).sum(), [leaves[k] for k in names])
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flags", list(NSTEP_FLAGS))
@pytest.mark.parametrize("n", (1, 3, 8))
@pytest.mark.parametrize("shape,time_dim", (((37, 70), 0), ((5, 29, 3), 1), ((64, 50), -1), ((1, 1), 0)))
def test_n_step_returns_forward_and_gradients_match_cpu(shape, time_dim, n, flags, dtype, backend):
    x = nstep_inputs(shape, dtype, seed=n * 100 + len(flags), flags=NSTEP_FLAGS[flags])
    if x["bootstrap_value"] is not None:  # one value per sequence: the shape without the time axis
        per_seq = tuple(s for d, s in enumerate(shape) if d != time_dim % len(shape))
        x["bootstrap_value"] = torch.randn(per_seq, generator=gen(7)).to(dtype)
    out_cpu, g_cpu = nstep_run(x, n, "cpu", time_dim)
    out, g = nstep_run({k: dev(v) for k, v in x.items()}, n, backend, time_dim)
    assert out.dtype == out_cpu.dtype and out.shape == out_cpu.shape
    assert_close(out, out_cpu, **tol(dtype))
    assert g.keys() == g_cpu.keys()
    for k in g:
        assert g[k].dtype == g_cpu[k].dtype, k
        assert_close(g[k], g_cpu[k], **grad_tol(dtype))
    expected = reference.n_step_returns(
        x["rewards"].double().numpy(),
        x["values"].double().numpy(),
        n=n,
        gamma=0.9,
        terminated=None if x["terminated"] is None else x["terminated"].numpy(),
        truncated=None if x["truncated"] is None else x["truncated"].numpy(),
        next_values=None if x["next_values"] is None else x["next_values"].double().numpy(),
        bootstrap_value=None if x["bootstrap_value"] is None else x["bootstrap_value"].double().numpy(),
        time_dim=time_dim,
    )
    assert_close(out, torch.as_tensor(np.asarray(expected)), **ref_tol(dtype))


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
def test_n_step_returns_empty_and_nonfinite(backend):
    x = nstep_inputs((0, 4), torch.float32, seed=1, flags=("boot",))
    out, g = nstep_run({k: dev(v) for k, v in x.items()}, 3, backend)
    assert out.shape == (0, 4) and torch.equal(cpu(g["bootstrap_value"]), torch.zeros(4))
    x = nstep_inputs((20, 6), torch.float32, seed=2, flags=("term", "next"))
    x["next_values"][3, 1] = float("inf")
    x["terminated"][3, 1] = True  # (1 - term) * inf: NaN on both backends
    x["rewards"][10, 2] = float("nan")
    out_cpu, _ = nstep_run(x, 4, "cpu")
    out, _ = nstep_run({k: dev(v) for k, v in x.items()}, 4, backend)
    assert_close(out, out_cpu, **tol(torch.float32))


# ----------------------------------------------------------------------------------------------------
# bellman_backup and value_iteration
# ----------------------------------------------------------------------------------------------------


def mdp(B, S, A, dtype, seed):
    g = gen(seed)
    P = torch.softmax(torch.randn(B, S, A, S, generator=g) * 2, -1).to(dtype)
    R = torch.randn(B, S, A, generator=g).to(dtype)
    V = torch.randn(B, S, generator=g).to(dtype)
    return P, R, V


# (B, S, A): vector loads (S a multiple of 16 bytes / element size) or not, a lane group per row from 1 to 32
# lanes, chunks of one state (A large) or many (A small), one MDP or many per chunk.
MDP_SHAPES = (
    (3, 16, 4),
    (2, 7, 3),
    (1, 130, 5),
    (4, 1, 2),
    (2, 64, 1),
    (1, 8, 700),
    (50, 24, 6),
    (2, 1000, 3),
)


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MDP_SHAPES)
def test_bellman_backup_matches_cpu_and_gradients(shape, dtype, backend):
    P, R, V = mdp(*shape, dtype, seed=sum(shape))
    B, S, A = shape
    R[0, 0, :] = R[0, 0, 0]  # ties in the argmax: the first action

    def run(P, R, V, backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in (P, R, V)]
        Q, Vn, pol = rlkernels.bellman_backup(*leaves, gamma=0.95, backend=backend)
        g = gen(1)
        wq = torch.randn(Q.shape, generator=g, dtype=Q.dtype).to(Q.device)
        wv = torch.randn(Vn.shape, generator=g, dtype=Vn.dtype).to(Vn.device)
        grads = torch.autograd.grad((Q * wq).sum() + (Vn * wv).sum(), leaves)
        return (Q, Vn, pol), grads

    (Qc, Vc, pc), gc = run(P, R, V, "cpu")
    (Q, Vn, pol), g = run(dev(P), dev(R), dev(V), backend)
    assert_close(Q, Qc, **tol(dtype))
    assert_close(Vn, Vc, **tol(dtype))
    assert pol.dtype == torch.int64
    same_policy = torch.equal(cpu(pol), pc)
    if dtype in (torch.float32, torch.float64):  # 16-bit inputs can make near-ties that rounding decides
        assert same_policy
    if same_policy:  # V_new's gradient goes to the argmax action
        for a, e in zip(g, gc):
            assert_close(a, e, **grad_tol(dtype))
    Qr, Vr, pr = reference.bellman_backup(P.double().numpy(), R.double().numpy(), V.double().numpy(), 0.95)
    assert_close(Q, torch.as_tensor(Qr), **ref_tol(dtype))
    assert_close(Vn, torch.as_tensor(Vr), **ref_tol(dtype))


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
def test_bellman_backup_nan_and_empty(backend):
    P, R, V = mdp(2, 8, 4, torch.float32, seed=3)
    R[0, 1, 2] = float("nan")  # V_new NaN and policy = the NaN action, as on the CPU
    V[1, 5] = float("inf")
    Qc, Vc, pc = rlkernels.bellman_backup(P, R, V, gamma=0.9, backend="cpu")
    Q, Vn, pol = rlkernels.bellman_backup(dev(P), dev(R), dev(V), gamma=0.9, backend=backend)
    assert_close(Q, Qc, **tol(torch.float32))
    assert_close(Vn, Vc, **tol(torch.float32))
    assert torch.equal(cpu(pol), pc)
    for B, S, A in ((0, 4, 2), (2, 0, 3), (2, 3, 0)):
        P, R, V = mdp(B, S, A, torch.float32, seed=0)
        Qc, Vc, pc = rlkernels.bellman_backup(P, R, V, backend="cpu")
        Q, Vn, pol = rlkernels.bellman_backup(dev(P), dev(R), dev(V), backend=backend)
        assert Q.shape == Qc.shape and Vn.shape == Vc.shape and pol.shape == pc.shape
        assert_close(Vn, Vc, **tol(torch.float32))
        assert torch.equal(cpu(pol), pc)


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
@pytest.mark.parametrize("shape", ((4, 16, 3), (1, 50, 4), (7, 5, 2), (3, 33, 9)))
@pytest.mark.parametrize("with_v0", (False, True))
def test_value_iteration_matches_reference_float64(shape, with_v0, backend):
    """float64: the same number of backups as the reference, residuals and values to 1e-9."""
    P, R, V0 = mdp(*shape, torch.float64, seed=sum(shape) + 1)
    V0 = V0 if with_v0 else None
    out = rlkernels.value_iteration(
        dev(P), dev(R), gamma=0.9, tol=1e-8, max_iters=500, V0=dev(V0), backend=backend
    )
    V, Q, pol, iters, res = out
    Vr, Qr, pr, ir, rr = reference.value_iteration(
        P.numpy(), R.numpy(), 0.9, tol=1e-8, max_iters=500, V0=None if V0 is None else V0.numpy()
    )
    assert iters.dtype == torch.int64 and iters.shape == () and iters.device.type == DEVICE
    assert int(iters) == ir
    assert 1 < ir < 500
    assert_close(res, torch.as_tensor(np.asarray(rr)), **ref_tol(torch.float64))
    assert_close(V, torch.as_tensor(Vr), **ref_tol(torch.float64))
    assert_close(Q, torch.as_tensor(Qr), **ref_tol(torch.float64))
    assert torch.equal(cpu(pol), torch.as_tensor(pr))
    cpu_out = rlkernels.value_iteration(P, R, gamma=0.9, tol=1e-8, max_iters=500, V0=V0, backend="cpu")
    assert int(cpu_out[3]) == int(iters)
    for a, e in zip(out, cpu_out):
        assert_close(a, e, **tol(torch.float64))


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_value_iteration_other_dtypes_match_cpu(dtype, backend):
    P, R, V0 = mdp(5, 12, 3, dtype, seed=9)
    kw = {"gamma": 0.8, "tol": 1e-3, "max_iters": 300}
    V, Q, pol, iters, res = rlkernels.value_iteration(dev(P), dev(R), backend=backend, **kw)
    Vc, Qc, pc, ic, rc = rlkernels.value_iteration(P, R, backend="cpu", **kw)
    assert V.dtype == Vc.dtype and Q.dtype == Qc.dtype and res.dtype == rc.dtype
    # Rounding differences of the summation order can move the stopping iteration by one.
    assert abs(int(iters) - int(ic)) <= 1
    rtol = 1e-4 if dtype == torch.float64 else 5e-3
    torch.testing.assert_close(cpu(V).double(), Vc.double(), rtol=rtol, atol=rtol * 10)
    assert bool((cpu(res) < 1e-3).all())


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
def test_value_iteration_stops_at_max_iters_and_edge_cases(backend):
    P, R, _ = mdp(3, 10, 4, torch.float64, seed=4)
    for max_iters in (1, 2, 7):
        V, Q, pol, iters, res = rlkernels.value_iteration(
            dev(P), dev(R), gamma=0.99, tol=0.0, max_iters=max_iters, backend=backend
        )
        Vr, Qr, pr, ir, rr = reference.value_iteration(
            P.numpy(), R.numpy(), 0.99, tol=0.0, max_iters=max_iters
        )
        assert int(iters) == ir == max_iters
        assert_close(
            V, torch.as_tensor(Vr), **ref_tol(torch.float64)
        )  # the buffer of the last backup (iters % 2)
        assert_close(res, torch.as_tensor(np.asarray(rr)), **ref_tol(torch.float64))
    # A NaN reward never converges: max_iters backups, NaN residual for that MDP only.
    R_nan = R.clone()
    R_nan[1, 2, 3] = float("nan")
    _, _, _, iters, res = rlkernels.value_iteration(
        dev(P), dev(R_nan), gamma=0.9, tol=1e-6, max_iters=40, backend=backend
    )
    assert int(iters) == 40 and bool(torch.isnan(cpu(res)[1])) and not bool(torch.isnan(cpu(res)[0]))
    # Empty batches and empty MDPs: the reference makes one (empty) backup.
    for B, S, A in ((0, 4, 2), (2, 0, 3)):
        P0, R0, _ = mdp(B, S, A, torch.float32, seed=0)
        out = rlkernels.value_iteration(dev(P0), dev(R0), backend=backend)
        cpu_out = rlkernels.value_iteration(P0, R0, backend="cpu")
        assert int(out[3]) == int(cpu_out[3]) == 1
        for a, e in zip(out, cpu_out):
            assert a.shape == e.shape and a.dtype == e.dtype
        assert_close(out[4], cpu_out[4], **tol(torch.float32))


# ----------------------------------------------------------------------------------------------------
# Determinism, no host synchronization, opcheck, torch.compile, CUDA graphs
# ----------------------------------------------------------------------------------------------------


def raw_samples(requires_grad=False):
    """Arguments of every raw op, on DEVICE, float32."""
    r, q, online, probs, term = (dev(t) for t in q_inputs(300, 18, torch.float32, seed=21))
    qq, act, tgt, w = (dev(t) for t in td_inputs(5000, 6, torch.float32, seed=22))
    x = {
        k: dev(v)
        for k, v in nstep_inputs((3, 40, 33), torch.float32, 23, ("term", "trunc", "next", "boot")).items()
    }
    x["bootstrap_value"] = dev(torch.randn(3, 33, generator=gen(1)))
    P, R, V = (dev(t) for t in mdp(3, 20, 4, torch.float32, seed=24))
    if requires_grad:
        qq, tgt = (t.detach().clone().requires_grad_(True) for t in (qq, tgt))
        for k in DIFF_NSTEP:
            x[k] = x[k].detach().clone().requires_grad_(True)
        P, R, V = (t.detach().clone().requires_grad_(True) for t in (P, R, V))
    g = dev(torch.randn(3, 40, 33, generator=gen(2)))
    samples = {}
    for kind in ("max", "double", "expected", "soft"):
        samples[f"q_targets_{kind}"] = ("q_targets", (r, q, term, online, probs, 0.9, kind, 0.5))
    for reduction in ("mean", "sum", "none"):
        samples[f"td_loss_{reduction}"] = ("td_loss", (qq, act, tgt, w, "huber", 1.0, reduction))
        gl = dev(torch.randn(5000 if reduction == "none" else ()))
        samples[f"td_loss_backward_{reduction}"] = (
            "td_loss_backward",
            (gl, dev(torch.randn(5000)), qq.detach(), act, tgt.detach(), w, "squared", 1.0, reduction),
        )
    samples["n_step_returns"] = (
        "n_step_returns",
        (
            x["rewards"],
            x["values"],
            x["next_values"],
            x["bootstrap_value"],
            x["terminated"],
            x["truncated"],
            0.9,
            3,
        ),
    )
    samples["n_step_returns_nonext"] = (
        "n_step_returns",
        (x["rewards"], x["values"], None, x["bootstrap_value"], x["terminated"], None, 0.9, 5),
    )
    samples["n_step_returns_backward"] = (
        "n_step_returns_backward",
        (g, x["terminated"], x["truncated"], x["rewards"].detach(), 0.9, 3, True),
    )
    samples["n_step_returns_backward_nonext"] = (
        "n_step_returns_backward",
        (g, x["terminated"], None, x["rewards"].detach(), 0.9, 5, False),
    )
    samples["bellman_backup"] = ("bellman_backup", (P, R, V, 0.9))
    samples["value_iteration"] = ("value_iteration", (P.detach(), R.detach(), V.detach(), 0.9, 1e-5, 200))
    return samples


@pytest.mark.parametrize("backend", backends(*OPS, include=("cuda",)))
def test_repeated_runs_are_bit_identical(backend):
    for name, (op, args) in raw_samples().items():
        first = getattr(torch.ops.rlkernels, op)(*args)
        second = getattr(torch.ops.rlkernels, op)(*args)
        first = first if isinstance(first, (tuple, list)) else (first,)
        second = second if isinstance(second, (tuple, list)) else (second,)
        for a, b in zip(first, second):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", backends(*OPS, include=("cuda",)))
def test_no_host_synchronization(backend):
    """docs/design.md §2: no op synchronizes (torch's sync debug mode raises on a synchronizing call)."""
    samples = raw_samples()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name, (op, args) in samples.items():
            getattr(torch.ops.rlkernels, op)(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", backends(*OPS, include=("cuda",)))
@pytest.mark.parametrize("requires_grad", (False, True))
def test_gpu_opcheck(requires_grad, backend):
    for name, (op, args) in raw_samples(requires_grad).items():
        torch.library.opcheck(getattr(torch.ops.rlkernels, op).default, args)


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
def test_public_functions_compile_fullgraph(backend):
    torch._dynamo.reset()
    r, q, online, probs, term = (dev(t) for t in q_inputs(300, 18, torch.float32, seed=31))
    qq, act, tgt, w = (dev(t) for t in td_inputs(500, 6, torch.float32, seed=32))
    x = {k: dev(v) for k, v in nstep_inputs((40, 33), torch.float32, 33, ("term", "next", "boot")).items()}
    P, R, V = (dev(t) for t in mdp(3, 20, 4, torch.float32, seed=34))
    qq, tgt, P, R, V = (t.detach().clone().requires_grad_(True) for t in (qq, tgt, P, R, V))
    rw, vals = (x[k].detach().clone().requires_grad_(True) for k in ("rewards", "values"))

    def f(qq, tgt, rw, vals, P, R, V):
        y = rlkernels.q_targets(r, q, terminated=term, kind="double", next_q_online=online, backend=backend)
        y2 = rlkernels.q_targets(r, q, kind="soft", temperature=0.5, backend=backend)
        loss, e = rlkernels.td_loss(qq, act, tgt, weights=w, backend=backend)
        G = rlkernels.n_step_returns(
            rw,
            vals,
            n=3,
            gamma=0.9,
            terminated=x["terminated"],
            next_values=x["next_values"],
            backend=backend,
        )
        Q, Vn, _ = rlkernels.bellman_backup(P, R, V, gamma=0.9, backend=backend)
        Vi, _, _, iters, res = rlkernels.value_iteration(
            P.detach(), R.detach(), gamma=0.9, tol=1e-4, max_iters=50, backend=backend
        )
        return (
            y.sum() + y2.sum() + loss + e.sum() + G.sum() + Q.sum() + Vn.sum() + Vi.sum() + iters + res.sum()
        )

    leaves = (qq, tgt, rw, vals, P, R, V)
    eager_out = f(*leaves)
    eager = torch.autograd.grad(eager_out, leaves)
    compiled_out = torch.compile(f, fullgraph=True)(*leaves)
    compiled = torch.autograd.grad(compiled_out, leaves)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-4)
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
def test_value_iteration_and_backups_capture_in_a_cuda_graph(backend):
    """The value_iteration loop (max_iters launch pairs reading a device-side done flag) and td_loss's forward
    plus backward replay from a CUDA graph with the eager results."""
    P, R, _ = (dev(t) for t in mdp(4, 16, 3, torch.float32, seed=41))
    qq, act, tgt, w = (dev(t) for t in td_inputs(3000, 5, torch.float32, seed=42))
    qq = qq.requires_grad_(True)

    def step():
        vi = torch.ops.rlkernels.value_iteration(P, R, None, 0.9, 1e-4, 300)  # float32: tol well above ulps
        loss, _ = rlkernels.td_loss(qq, act, tgt, weights=w, backend=backend)
        return vi, loss, torch.autograd.grad(loss, qq)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_vi, static_loss, static_grad = step()
    eager_vi, eager_loss, eager_grad = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static_vi, eager_vi):
        assert torch.equal(a, b)
    assert torch.equal(static_loss, eager_loss) and torch.equal(static_grad, eager_grad)
    assert 1 < int(static_vi[3]) < 300


@pytest.mark.parametrize("backend", backends("n_step_returns", include=("triton",), cpu_tensors=True))
def test_triton_launches_use_one_grid_axis(backend, monkeypatch):
    # A GPU grid's axes 1 and 2 stop at 65535 blocks: outer index times lane (or state) blocks go on axis 0.
    import rlkernels.triton.bellman as tb

    grids = record_triton_grids(tb, monkeypatch)
    r, v, nv, boot, term, trunc = sample_inputs("n_step_returns", (6, 2, 40), time_dim=1, dtype=torch.float32,
                                                  seed=3)
    x = r.clone().requires_grad_(True)
    rlkernels.n_step_returns(x, v, n=3, gamma=0.9, terminated=term, bootstrap_value=boot, time_dim=1,
                             backend=backend).sum().backward()
    P, R, V = sample_inputs("bellman_backup", (2, 5, 3), dtype=torch.float32, seed=4)
    rlkernels.bellman_backup(P, R, V, gamma=0.9, backend=backend)
    assert {name for name, _ in grids} >= {"_n_step_kernel", "_n_step_backward_kernel", "_backup_kernel"}
    for name, grid in grids:
        assert len(grid) == 1, f"{name} launched on grid {grid}"
