"""Tests of the Triton backend of the Bellman family (rlkernels/triton/bellman.py) under TRITON_INTERPRET=1.

The oracles are the NumPy reference (rlkernels.reference) and the CPU backend (gradients). tests/conftest.py
sets TRITON_INTERPRET=1 for the session, so the kernels are interpreted and accept CPU tensors; shapes
stay tiny because the interpreter is slow, and the `small_tiles` fixture shrinks the kernels' tiles so that
those tiny shapes still cross every tile boundary (several row / action / state / next-state chunks).
"""

import itertools
import math

import numpy as np
import pytest

pytest.importorskip("triton")

import torch
from conftest import DTYPES, assert_close, finite_scale

import rlkernels
from rlkernels import reference
from rlkernels.triton import bellman as tb

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

if not tb._interpreting():
    pytest.skip("rlkernels.triton.bellman was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

KINDS = ("max", "double", "expected", "soft")
INF, NAN = math.inf, math.nan


def _out_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 2 actions, 16 rows, 2 lanes, [2 states, 2 actions, 4 next states], [2 MDPs, 2 state blocks]."""
    for name, value in {"MAX_BLOCK_A": 2, "ROW_TILE": 32, "MAX_BLOCK_ROWS": 16, "LANE_BLOCK": 2,
                        "BACKUP_MAX_K": 4, "BACKUP_MAX_A": 2, "BACKUP_TILE": 16, "RESIDUAL_BLOCK_B": 2,
                        "RESIDUAL_BLOCK_N": 2}.items():
        monkeypatch.setattr(tb, name, value)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# q_targets
# ----------------------------------------------------------------------------------------------------


def _q_inputs(shape, A, dtype, seed=0):
    g = _gen(seed)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    q = (2 * torch.randn((*shape, A), generator=g, dtype=torch.float64)).to(dtype)
    online = torch.randn((*shape, A), generator=g, dtype=torch.float64).to(dtype)
    probs = torch.softmax(torch.randn((*shape, A), generator=g, dtype=torch.float64), -1).to(dtype)
    term = torch.rand(shape, generator=g) < 0.3
    return r, q, online, probs, term


def _q_kwargs(kind, term, online, probs):
    return {"terminated": term, "gamma": 0.9, "n": 2, "kind": kind, "next_q_online": online,
            "next_probs": probs, "temperature": 0.7 if kind == "soft" else None}


@pytest.mark.parametrize("kind, dtype", list(itertools.product(KINDS, DTYPES)))
def test_q_targets_matches_reference_and_cpu(kind, dtype, small_tiles):
    r, q, online, probs, term = _q_inputs((3, 11), 7, dtype)  # 33 rows: 3 row blocks, 4 action tiles
    kw = _q_kwargs(kind, term, online, probs)
    y = rlkernels.q_targets(r, q, backend="triton", **kw)
    assert y.dtype == _out_dtype(dtype) and y.shape == (3, 11)
    assert_close(y, reference.q_targets(r, q, **kw), dtype)
    assert_close(y, rlkernels.q_targets(r, q, backend="cpu", **kw).numpy(), dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_q_targets_without_terminated(kind):
    r, q, online, probs, _ = _q_inputs((5,), 3, torch.float64, seed=2)
    kw = _q_kwargs(kind, None, online, probs) | {"gamma": 1.0, "n": 1}
    y = rlkernels.q_targets(r, q, backend="triton", **kw)
    assert_close(y, reference.q_targets(r, q, **kw))
    assert_close(y, rlkernels.q_targets(r, q, backend="cpu", **kw).numpy())


def _edge_rows():
    return torch.tensor([
        [1.0, 3.0, 3.0, 2.0, 0.0],  # tie: first index
        [NAN, 1.0, 2.0, 3.0, 4.0],  # NaN first
        [1.0, 2.0, NAN, 5.0, NAN],  # NaN after the max, in another tile
        [-INF, -INF, -INF, -INF, -INF],
        [-INF, 2.0, -INF, INF, 1.0],
        [INF, INF, INF, INF, INF],  # terminated below: the target is the reward
        [NAN, NAN, NAN, NAN, NAN],  # terminated below
        [1e30, -1e30, 0.0, 0.0, -INF],
        [0.0, 0.0, 7.0, 7.0, 7.0],  # tie across tiles
    ], dtype=torch.float64)


@pytest.mark.parametrize("kind, dtype", list(itertools.product(KINDS, (torch.float64, torch.float32))))
def test_q_targets_nan_inf_and_ties(kind, dtype, small_tiles):
    q = _edge_rows().to(dtype)
    B, A = q.shape
    g = _gen(1)
    r = torch.randn(B, generator=g, dtype=torch.float64).to(dtype)
    probs = torch.softmax(torch.randn(B, A, generator=g, dtype=torch.float64), -1)
    probs[0, 1] = 0.0
    term = torch.zeros(B, dtype=torch.bool)
    term[5] = term[6] = True
    # double: the online network holds the edge rows, the target network finite values
    target = q if kind != "double" else torch.randn(B, A, generator=g, dtype=torch.float64).to(dtype)
    kw = _q_kwargs(kind, term, q, probs.to(dtype))
    y = rlkernels.q_targets(r, target, backend="triton", **kw)
    assert_close(y, reference.q_targets(r, target, **kw), dtype)
    assert_close(y, rlkernels.q_targets(r, target, backend="cpu", **kw).numpy(), dtype)
    assert torch.equal(y[5:7], r[5:7].to(y.dtype))


# ----------------------------------------------------------------------------------------------------
# td_loss
# ----------------------------------------------------------------------------------------------------


def _td_inputs(B, A, dtype, seed=0):
    g = _gen(seed)
    q = torch.randn(B, A, generator=g, dtype=torch.float64).to(dtype)
    actions = torch.randint(0, A, (B,), generator=g)
    targets = (q.double()[torch.arange(B), actions] + 1.5 * torch.randn(B, generator=g, dtype=torch.float64)).to(dtype)
    weights = torch.rand(B, generator=g, dtype=torch.float64).to(dtype)
    return q, actions, targets, weights


def _td_run(backend, q, actions, targets, weights, **kw):
    q = q.clone().requires_grad_(True)
    y = targets.clone().requires_grad_(True)
    loss, e = rlkernels.td_loss(q, actions, y, weights=weights, backend=backend, **kw)
    g = _gen(7)
    gl = torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype)
    ge = torch.randn(e.shape, generator=g, dtype=torch.float64).to(e.dtype)
    ((loss * gl).sum() + (e * ge).sum()).backward()
    return loss.detach(), e.detach(), q.grad, y.grad


@pytest.mark.parametrize("loss, reduction, weighted",
                         list(itertools.product(("huber", "squared"), ("mean", "sum", "none"), (False, True))))
def test_td_loss_matches_reference_and_cpu(loss, reduction, weighted, small_tiles):
    q, actions, targets, weights = _td_inputs(33, 5, torch.float64)  # 3 row blocks, 3 action tiles
    w = weights if weighted else None
    kw = {"loss": loss, "delta": 0.7, "reduction": reduction}
    t = _td_run("triton", q, actions, targets, w, **kw)
    c = _td_run("cpu", q, actions, targets, w, **kw)
    r_loss, r_e = reference.td_loss(q, actions, targets, weights=w, **kw)
    assert_close(t[0], r_loss, name="loss")
    assert_close(t[1], r_e, name="td_errors")
    for name, a, b in zip(("loss", "td_errors", "grad_q", "grad_targets"), t, c):
        assert_close(a, b.numpy(), name=name)
    assert ((t[2] != 0).sum(-1) <= 1).all()  # one non-zero per row


@pytest.mark.parametrize("dtype", DTYPES)
def test_td_loss_dtypes(dtype):
    q, actions, targets, weights = _td_inputs(21, 6, dtype, seed=3)
    t = _td_run("triton", q, actions, targets, weights)
    c = _td_run("cpu", q, actions, targets, weights)
    assert t[0].dtype == _out_dtype(dtype) and t[2].dtype == dtype and t[3].dtype == dtype
    r_loss, r_e = reference.td_loss(q, actions, targets, weights=weights)
    assert_close(t[0], r_loss, dtype)
    assert_close(t[1], r_e, dtype)
    for a, b in zip(t, c):
        assert_close(a, b.double().numpy(), dtype)


def test_td_loss_empty_and_bad_action():
    q = torch.zeros(0, 4)
    loss, e = rlkernels.td_loss(q, torch.zeros(0, dtype=torch.int64), torch.zeros(0), backend="triton")
    assert float(loss) == 0.0 and e.shape == (0,)
    # An action outside [0, A) cannot raise without a host sync: its row reads Q(s, a) as NaN (the CPU
    # backend raises a ValueError instead).
    q, actions, targets, _ = _td_inputs(4, 3, torch.float64)
    actions[2] = 3
    t = _td_run("triton", q, actions, targets, None, reduction="none")
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


def _n_step_inputs(case, dtype, seed=0):
    g = _gen(seed)
    time_dim = case.get("time_dim", 0)
    shape = (11, 3) if time_dim == 0 else (2, 11)
    seq = shape[1:] if time_dim == 0 else shape[:-1]

    def randn(sh):
        return torch.randn(sh, generator=g, dtype=torch.float64).to(dtype)

    tensors = {"rewards": randn(shape), "values": randn(shape)}
    kw = {"n": case["n"], "gamma": 0.9, "time_dim": time_dim}
    if case.get("terminated"):
        kw["terminated"] = torch.rand(shape, generator=g) < case["terminated"]
    if case.get("truncated"):
        kw["truncated"] = torch.rand(shape, generator=g) < case["truncated"]
        tensors["next_values"] = randn(shape)
    if case.get("bootstrap"):
        tensors["bootstrap_value"] = randn(seq)
    return tensors, kw


def _n_step_run(backend, tensors, kw):
    leaves = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
    out = rlkernels.n_step_returns(leaves["rewards"], leaves["values"], backend=backend,
                                   **{k: v for k, v in leaves.items() if k not in ("rewards", "values")}, **kw)
    up = torch.randn(out.shape, generator=_gen(5), dtype=torch.float64).to(out.dtype)
    (out * up).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("case", list(N_STEP_CASES))
def test_n_step_returns_matches_reference_and_cpu(case, small_tiles):
    tensors, kw = _n_step_inputs(N_STEP_CASES[case], torch.float64)
    out, grads = _n_step_run("triton", tensors, kw)
    c_out, c_grads = _n_step_run("cpu", tensors, kw)
    rest = {k: v for k, v in tensors.items() if k not in ("rewards", "values")}
    assert_close(out, reference.n_step_returns(tensors["rewards"], tensors["values"], **rest, **kw))
    assert_close(out, c_out.numpy())
    assert grads.keys() == c_grads.keys()
    for k in grads:
        assert_close(grads[k], c_grads[k].numpy(), name=f"grad {k}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_n_step_returns_dtypes(dtype):
    tensors, kw = _n_step_inputs({"n": 3, "terminated": 0.2, "truncated": 0.2}, dtype, seed=2)
    out, grads = _n_step_run("triton", tensors, kw)
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
    g = _gen(seed)
    P = torch.softmax(3 * torch.randn((*batch, S, A, S), generator=g, dtype=torch.float64), -1).to(dtype)
    R = torch.randn((*batch, S, A), generator=g, dtype=torch.float64).to(dtype)
    V = (3 * torch.randn((*batch, S), generator=g, dtype=torch.float64)).to(dtype)
    return P, R, V


def _backup_run(backend, P, R, V):
    P, R, V = (x.clone().requires_grad_(True) for x in (P, R, V))
    Q, V_new, policy = rlkernels.bellman_backup(P, R, V, 0.9, backend=backend)
    g = _gen(9)
    gq = torch.randn(Q.shape, generator=g, dtype=torch.float64).to(Q.dtype)
    gv = torch.randn(V_new.shape, generator=g, dtype=torch.float64).to(V_new.dtype)
    ((Q * gq).sum() + (V_new * gv).sum()).backward()
    return Q.detach(), V_new.detach(), policy, P.grad, R.grad, V.grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_bellman_backup_matches_reference_and_cpu(dtype, small_tiles):
    P, R, V = _mdp((2, 1), 9, 5, dtype)  # 5 state blocks, 3 action tiles, 3 next-state chunks
    t = _backup_run("triton", P, R, V)
    c = _backup_run("cpu", P, R, V)
    rQ, rV, rpol = reference.bellman_backup(P, R, V, 0.9)
    assert t[0].dtype == _out_dtype(dtype) and t[2].dtype == torch.int64
    assert t[0].shape == (2, 1, 9, 5) and t[1].shape == (2, 1, 9) and t[2].shape == (2, 1, 9)
    assert_close(t[0], rQ, dtype, name="Q")
    assert_close(t[1], rV, dtype, name="V_new")
    assert torch.equal(t[2], torch.as_tensor(rpol)) and torch.equal(t[2], c[2])
    for name, a, b in zip(("Q", "V_new", "policy", "grad P", "grad R", "grad V"), t, c):
        assert_close(a, b.double().numpy(), dtype, name=name)


def test_bellman_backup_nan_inf_and_ties(small_tiles):
    S, A = 5, 5
    P = torch.full((2, S, A, S), 1.0 / S, dtype=torch.float64)
    R = torch.zeros(2, S, A, dtype=torch.float64)  # all actions tie: policy 0
    V = torch.arange(2 * S, dtype=torch.float64).reshape(2, S)
    R[0, 1, 3] = NAN  # NaN after the tie: V_new NaN, policy 3
    R[0, 2] = torch.tensor([-INF, -INF, -INF, -INF, -INF])
    R[0, 3] = torch.tensor([1.0, NAN, 2.0, NAN, 5.0])
    R[1, 0, 4] = INF
    R[1, 2, 2:] = 1.0  # tie across action tiles: policy 2
    t = rlkernels.bellman_backup(P, R, V, 0.9, backend="triton")
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


def _vi_check(P, R, dtype, **kw):
    t = rlkernels.value_iteration(P, R, 0.5, backend="triton", **kw)
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_iteration_matches_reference_and_cpu(dtype):
    P, R, _ = _mdp((2,), 6, 3, dtype, seed=4)
    tol = 1e-6 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 1e-3
    t = _vi_check(P, R, dtype, tol=tol, max_iters=100)
    assert 1 < int(t[3]) < 100 and t[0].dtype == _out_dtype(dtype) and t[4].shape == (2,)


def test_value_iteration_cap_and_V0(small_tiles):
    P, R, V0 = _mdp((3,), 5, 3, torch.float64, seed=5)
    t = _vi_check(P, R, torch.float64, tol=1e-8, max_iters=4, V0=V0)
    assert int(t[3]) == 4 and (t[4] >= 1e-8).any()
    _vi_check(P, R, torch.float64, tol=10.0, max_iters=50, V0=V0)  # converged after the first backup


def test_value_iteration_gated_launches_are_no_ops(monkeypatch):
    # On a GPU the host enqueues all max_iters iterations; the ones after convergence must change nothing.
    P, R, _ = _mdp((2,), 4, 2, torch.float64, seed=6)
    early = rlkernels.value_iteration(P, R, 0.5, tol=1e-3, max_iters=30, backend="triton")
    monkeypatch.setattr(tb, "_STOP_EARLY_ON_CPU", False)
    n = int(early[3])
    full = rlkernels.value_iteration(P, R, 0.5, tol=1e-3, max_iters=n + 3, backend="triton")
    for a, b in zip(early, full):
        assert torch.equal(a, b)
    odd = rlkernels.value_iteration(P, R, 0.5, tol=1e-3, max_iters=n + 1, backend="triton")  # other V buffer
    assert torch.equal(odd[0], early[0]) and int(odd[3]) == n


def test_value_iteration_nan_and_empty():
    P, R, _ = _mdp((2,), 4, 2, torch.float64, seed=7)
    R[1, 2, 1] = NAN  # MDP 1 never converges: the batch runs to max_iters
    t = _vi_check(P, R, torch.float64, tol=1e-3, max_iters=6)
    assert int(t[3]) == 6 and torch.isnan(t[4][1])
    for shape in ((0, 3, 2, 3), (2, 0, 2, 0)):
        P = torch.zeros(shape, dtype=torch.float64)
        R = torch.zeros(shape[:-1], dtype=torch.float64)
        t = rlkernels.value_iteration(P, R, 0.5, backend="triton")
        c = rlkernels.value_iteration(P, R, 0.5, backend="cpu")
        for a, b in zip(t, c):
            assert a.shape == b.shape and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ----------------------------------------------------------------------------------------------------


def test_opcheck():
    ops = torch.ops.rlkernels
    r, q, online, probs, term = _q_inputs((6,), 4, torch.float64)
    for kind in KINDS:
        torch.library.opcheck(ops.triton_q_targets, (r, q, term, online, probs, 0.81, kind, 0.5))
    qq, actions, targets, weights = _td_inputs(6, 4, torch.float64)
    qg, yg = qq.clone().requires_grad_(True), targets.clone().requires_grad_(True)
    torch.library.opcheck(ops.triton_td_loss, (qg, actions, yg, weights, "huber", 0.5, "mean"))
    torch.library.opcheck(ops.triton_td_loss, (qg, actions, yg, None, "squared", 1.0, "none"))
    gl, ge = torch.tensor(0.3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    torch.library.opcheck(ops.triton_td_loss_backward,
                          (gl, ge, qq, actions, targets, weights, "huber", 0.5, "sum"))
    g = _gen(3)
    rw, v, nv = (torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    boot = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    tm, tr = (torch.rand(2, 5, 3, generator=g) < 0.3 for _ in range(2))
    torch.library.opcheck(ops.triton_n_step_returns, (rw, v, None, boot, tm, None, 0.9, 2))
    torch.library.opcheck(ops.triton_n_step_returns, (rw, v, nv, None, tm, tr, 0.9, 3))
    torch.library.opcheck(ops.triton_n_step_returns_backward, (rw.detach(), tm, tr, rw.detach(), 0.9, 3, True))
    P, R, V = (x.requires_grad_(True) for x in _mdp((2,), 4, 3, torch.float64))
    torch.library.opcheck(ops.triton_bellman_backup, (P, R, V, 0.9))
    torch.library.opcheck(ops.triton_value_iteration, (P.detach(), R.detach(), None, 0.5, 1e-3, 5))


def test_compile_fullgraph():
    r, q, online, _, term = _q_inputs((8,), 4, torch.float64)
    qq, actions, _, weights = _td_inputs(8, 4, torch.float64)
    P, R, V = _mdp((2,), 3, 2, torch.float64)
    rw = torch.randn(6, 2, dtype=torch.float64)

    def f(qv, vals, V):
        y = rlkernels.q_targets(r, q, terminated=term, kind="double", next_q_online=online, backend="triton")
        loss, e = rlkernels.td_loss(qv, actions, y, weights=weights, backend="triton")
        G = rlkernels.n_step_returns(rw, vals, n=2, gamma=0.9, backend="triton")
        _, V_new, _ = rlkernels.bellman_backup(P, R, V, 0.9, backend="triton")
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
