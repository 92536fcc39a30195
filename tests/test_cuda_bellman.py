"""CUDA kernels of the Bellman family (csrc/cuda/bellman_*.cu) against the CPU kernels and the reference.

For every op, option and dtype, ``backend="cuda"`` on CUDA tensors must give the CPU backend's outputs and
gradients up to float rounding (the CUDA kernels add in other orders) and the NumPy reference's up to the
dtype's tolerance; value_iteration must make the reference's number of backups. Then the CUDA-only
properties: bit-identical repeated runs, no host synchronization, opcheck, torch.compile(fullgraph=True) and
CUDA-graph capture.

Every test is marked ``cuda`` and skipped unless a GPU is present and the ops have CUDA kernels. The module
globals DEVICE and BACKEND let the test logic itself be checked on a machine without a GPU (DEVICE="cpu",
BACKEND="cpu" compares the CPU backend with itself and the reference).
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from conftest import assert_close

import rlkernels
from rlkernels import reference

OPS = ("q_targets", "td_loss", "td_loss_backward", "n_step_returns", "n_step_returns_backward", "bellman_backup",
       "value_iteration")


def _has_cuda_kernels() -> bool:
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"rlkernels::{op}", "CUDA") for op in OPS)


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or not _has_cuda_kernels(),
                       reason="no CUDA device" if not torch.cuda.is_available() else "no CUDA Bellman kernels"),
]

DEVICE = "cuda"
# The GPU backend under test: scripts/gpu.sh runs this file once per backend (cuda, then triton).
BACKEND = os.environ.get("RLKERNELS_GPU_TEST_BACKEND", "cuda")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def tol(dtype):
    """assert_close's tolerances of a kernel's output against the CPU kernel's (same input values, other
    summation order): absolute atol (scale=1.0)."""
    rtol, atol = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 1e-4),
                  torch.float16: (1e-4, 1e-4)}[dtype]
    return {"rtol": rtol, "atol": atol, "scale": 1.0}


def ref_tol(dtype):
    """The tolerances against the float64 reference of the same (rounded) inputs."""
    rtol, atol = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-3, 2e-3),
                  torch.float16: (2e-3, 2e-3)}[dtype]
    return {"rtol": rtol, "atol": atol, "scale": 1.0}


def grad_tol(dtype):
    """Gradients are returned in the input dtype: a 16-bit gradient may round one unit apart where the float32
    values of the two backends differ in the last bit (FMA contraction, matmul order)."""
    if dtype in (torch.bfloat16, torch.float16):
        rtol, atol = {torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}[dtype]
        return {"rtol": rtol, "atol": atol, "scale": 1.0}
    return tol(dtype)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def dev(x):
    return None if x is None else x.to(DEVICE)


def cpu(x):
    return None if x is None else x.detach().cpu()


# ----------------------------------------------------------------------------------------------------
# q_targets
# ----------------------------------------------------------------------------------------------------


def q_inputs(B, A, dtype, seed, nonfinite=False):
    g = gen(seed)
    r = torch.randn(B, generator=g).to(dtype)
    q = (torch.randn(B, A, generator=g) * 3).to(dtype)
    online = torch.randn(B, A, generator=g).to(dtype)
    probs = torch.softmax(torch.randn(B, A, generator=g), -1).to(dtype)
    term = torch.rand(B, generator=g) < 0.3
    if A > 1:
        online[::7, A // 2] = online[::7, 0]  # ties: the first index wins
    if nonfinite and B >= 8:
        q[1, 0] = float("nan")              # NaN propagates (max, expected, soft) ...
        q[2, :] = float("-inf")             # ... a row of -inf gives -inf
        q[3, -1] = float("inf")
        q[4, :] = float("inf")
        term[4] = True                      # terminated: the reward alone, whatever next_q holds
        online[5, A - 1] = float("nan")     # double: NaN counts as the maximum
    return r, q, online, probs, term


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("A", (1, 3, 4, 18, 33, 100))
@pytest.mark.parametrize("kind", ("max", "double", "expected", "soft"))
@pytest.mark.parametrize("with_term", (False, True))
def test_q_targets_match_cpu_and_reference(kind, A, dtype, with_term):
    B = 777  # several blocks, a partial last group of rows
    r, q, online, probs, term = q_inputs(B, A, dtype, seed=A * 10 + len(kind), nonfinite=True)
    term = term if with_term else None
    kw = dict(terminated=term, gamma=0.9, kind=kind, next_q_online=online, next_probs=probs,
              temperature=0.7 if kind == "soft" else None, n=3)
    y_cpu = rlkernels.q_targets(r, q, backend="cpu", **kw)
    y = rlkernels.q_targets(dev(r), dev(q), **{k: dev(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()},
                            backend=BACKEND)
    assert y.dtype == y_cpu.dtype and y.device.type == DEVICE and y.shape == (B,)
    assert_close(y, y_cpu, **tol(dtype))
    expected = reference.q_targets(r.double().numpy(), q.double().numpy(),
                                   terminated=None if term is None else term.numpy(), gamma=0.9, kind=kind,
                                   next_q_online=online.double().numpy(), next_probs=probs.double().numpy(),
                                   temperature=0.7 if kind == "soft" else None, n=3)
    with np.errstate(all="ignore"):
        assert_close(y, torch.from_numpy(np.asarray(expected)), **ref_tol(dtype))


@pytest.mark.parametrize("kind", ("max", "double", "expected", "soft"))
def test_q_targets_leading_dims_uint8_flags_and_empty(kind):
    r, q, online, probs, term = q_inputs(60, 5, torch.float32, seed=3)
    kw = dict(gamma=0.99, kind=kind, next_q_online=online, next_probs=probs,
              temperature=2.0 if kind == "soft" else None)
    shaped = {k: v.reshape(3, 4, 5, 5) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    y_cpu = rlkernels.q_targets(r.reshape(3, 4, 5), q.reshape(3, 4, 5, 5), terminated=term.reshape(3, 4, 5),
                                backend="cpu", **shaped)
    y = rlkernels.q_targets(dev(r.reshape(3, 4, 5)), dev(q.reshape(3, 4, 5, 5)),
                            terminated=dev(term.to(torch.uint8).reshape(3, 4, 5)), backend=BACKEND,
                            **{k: dev(v) if isinstance(v, torch.Tensor) else v for k, v in shaped.items()})
    assert_close(y, y_cpu, **tol(torch.float32))
    empty = rlkernels.q_targets(dev(torch.zeros(0)), dev(torch.zeros(0, 5)), backend=BACKEND, kind="max")
    assert empty.shape == (0,)


# ----------------------------------------------------------------------------------------------------
# td_loss
# ----------------------------------------------------------------------------------------------------


def td_inputs(B, A, dtype, seed):
    g = gen(seed)
    q = (torch.randn(B, A, generator=g) * 2).to(dtype)
    actions = torch.randint(0, A, (B,), generator=g)
    targets = (torch.randn(B, generator=g) * 2).to(dtype)
    weights = torch.rand(B, generator=g).to(dtype)
    return q, actions, targets, weights


def td_run(q, actions, targets, weights, backend, grad_seed=0, **kw):
    q = q.detach().clone().requires_grad_(True)
    targets = targets.detach().clone().requires_grad_(True)
    loss, e = rlkernels.td_loss(q, actions, targets, weights=weights, backend=backend, **kw)
    g = gen(grad_seed)
    gl = torch.randn(loss.shape, generator=g, dtype=loss.dtype).to(loss.device)
    ge = torch.randn(e.shape, generator=g, dtype=e.dtype).to(e.device)
    gq, gy = torch.autograd.grad((loss * gl).sum() + (e * ge).sum(), (q, targets))
    return loss, e, gq, gy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("loss", ("huber", "squared"))
@pytest.mark.parametrize("weighted", (False, True))
@pytest.mark.parametrize("B,A", ((1, 1), (300, 18), (5000, 4), (1_200_000, 3)))
def test_td_loss_forward_and_gradients_match_cpu(B, A, weighted, loss, reduction, dtype):
    # B = 1.2M: more rows than kMaxPartials * kThreads * kRowsPerThread, so the reducing grid strides.
    q, actions, targets, weights = td_inputs(B, A, dtype, seed=B + A)
    w = weights if weighted else None
    kw = {"loss": loss, "delta": 0.8, "reduction": reduction}
    expected = td_run(q, actions, targets, w, "cpu", **kw)
    got = td_run(dev(q), dev(actions), dev(targets), dev(w), BACKEND, **kw)
    for k, (a, e) in enumerate(zip(got, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close(a, e, **(grad_tol(dtype) if k >= 2 else tol(dtype)))
    if B <= 5000:
        lo, e = reference.td_loss(q.double().numpy(), actions.numpy(), targets.double().numpy(),
                                  weights=None if w is None else w.double().numpy(), **kw)
        assert_close(got[0], torch.as_tensor(np.asarray(lo)), **ref_tol(dtype))
        assert_close(got[1], torch.as_tensor(np.asarray(e)), **ref_tol(dtype))


def test_td_loss_backward_op_directly():
    """Each of grad_loss / grad_td_errors may be None; grad_q is dense with one non-zero per row."""
    q, actions, targets, weights = td_inputs(257, 7, torch.float32, seed=5)
    for reduction, (with_gl, with_gt) in itertools.product(("mean", "sum", "none"),
                                                           ((True, False), (False, True), (False, False))):
        B = q.shape[0]
        gl = torch.randn(B if reduction == "none" else ()) if with_gl else None
        gt = torch.randn(B) if with_gt else None
        args = ("huber", 1.0, reduction)
        ref = torch.ops.rlkernels.td_loss_backward(gl, gt, q, actions, targets, weights, *args)
        got = torch.ops.rlkernels.td_loss_backward(dev(gl), dev(gt), dev(q), dev(actions), dev(targets),
                                                  dev(weights), *args)
        for a, e in zip(got, ref):
            assert_close(a, e, **tol(torch.float32))
        assert int((cpu(got[0]) != 0).sum(1).max()) <= 1


def test_td_loss_empty_batch():
    q, actions, targets, _ = td_inputs(0, 4, torch.float32, seed=0)
    for reduction in ("mean", "sum", "none"):
        loss, e = rlkernels.td_loss(dev(q), dev(actions), dev(targets), reduction=reduction, backend=BACKEND)
        assert e.shape == (0,)
        if reduction != "none":
            assert float(loss) == 0.0


# ----------------------------------------------------------------------------------------------------
# n_step_returns
# ----------------------------------------------------------------------------------------------------


def nstep_inputs(shape, dtype, seed, flags):
    g = gen(seed)
    x = {
        "rewards": torch.randn(shape, generator=g).to(dtype),
        "values": torch.randn(shape, generator=g).to(dtype),
        "next_values": torch.randn(shape, generator=g).to(dtype) if "next" in flags else None,
        "terminated": (torch.rand(shape, generator=g) < 0.1) if "term" in flags else None,
        "truncated": (torch.rand(shape, generator=g) < 0.1) if "trunc" in flags else None,
    }
    per_seq = shape[1:] if len(shape) > 1 else ()
    x["bootstrap_value"] = torch.randn(per_seq, generator=g).to(dtype) if "boot" in flags else None
    return x


NSTEP_FLAGS = {
    "plain": (),
    "term_boot": ("term", "boot"),
    "everything": ("term", "trunc", "next", "boot"),
}
DIFF_NSTEP = ("rewards", "values", "next_values", "bootstrap_value")


def nstep_run(x, n, backend, time_dim=0, grad_seed=0):
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in DIFF_NSTEP and v is not None else v)
              for k, v in x.items()}
    out = rlkernels.n_step_returns(leaves["rewards"], leaves["values"], n=n, gamma=0.9,
                                   terminated=leaves["terminated"], truncated=leaves["truncated"],
                                   next_values=leaves["next_values"], bootstrap_value=leaves["bootstrap_value"],
                                   time_dim=time_dim, backend=backend)
    w = torch.randn(out.shape, generator=gen(grad_seed), dtype=out.dtype).to(out.device)
    names = [k for k in DIFF_NSTEP if leaves[k] is not None]
    grads = torch.autograd.grad((out * w).sum(), [leaves[k] for k in names])
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flags", list(NSTEP_FLAGS))
@pytest.mark.parametrize("n", (1, 3, 8))
@pytest.mark.parametrize("shape,time_dim", (((37, 70), 0), ((5, 29, 3), 1), ((64, 50), -1), ((1, 1), 0)))
def test_n_step_returns_forward_and_gradients_match_cpu(shape, time_dim, n, flags, dtype):
    x = nstep_inputs(shape, dtype, seed=n * 100 + len(flags), flags=NSTEP_FLAGS[flags])
    if x["bootstrap_value"] is not None:  # one value per sequence: the shape without the time axis
        per_seq = tuple(s for d, s in enumerate(shape) if d != time_dim % len(shape))
        x["bootstrap_value"] = torch.randn(per_seq, generator=gen(7)).to(dtype)
    out_cpu, g_cpu = nstep_run(x, n, "cpu", time_dim)
    out, g = nstep_run({k: dev(v) for k, v in x.items()}, n, BACKEND, time_dim)
    assert out.dtype == out_cpu.dtype and out.shape == out_cpu.shape
    assert_close(out, out_cpu, **tol(dtype))
    assert g.keys() == g_cpu.keys()
    for k in g:
        assert g[k].dtype == g_cpu[k].dtype, k
        assert_close(g[k], g_cpu[k], **grad_tol(dtype))
    expected = reference.n_step_returns(
        x["rewards"].double().numpy(), x["values"].double().numpy(), n=n, gamma=0.9,
        terminated=None if x["terminated"] is None else x["terminated"].numpy(),
        truncated=None if x["truncated"] is None else x["truncated"].numpy(),
        next_values=None if x["next_values"] is None else x["next_values"].double().numpy(),
        bootstrap_value=None if x["bootstrap_value"] is None else x["bootstrap_value"].double().numpy(),
        time_dim=time_dim)
    assert_close(out, torch.as_tensor(np.asarray(expected)), **ref_tol(dtype))


def test_n_step_returns_empty_and_nonfinite():
    x = nstep_inputs((0, 4), torch.float32, seed=1, flags=("boot",))
    out, g = nstep_run({k: dev(v) for k, v in x.items()}, 3, BACKEND)
    assert out.shape == (0, 4) and torch.equal(cpu(g["bootstrap_value"]), torch.zeros(4))
    x = nstep_inputs((20, 6), torch.float32, seed=2, flags=("term", "next"))
    x["next_values"][3, 1] = float("inf")
    x["terminated"][3, 1] = True  # (1 - term) * inf: NaN on both backends
    x["rewards"][10, 2] = float("nan")
    out_cpu, _ = nstep_run(x, 4, "cpu")
    out, _ = nstep_run({k: dev(v) for k, v in x.items()}, 4, BACKEND)
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
MDP_SHAPES = ((3, 16, 4), (2, 7, 3), (1, 130, 5), (4, 1, 2), (2, 64, 1), (1, 8, 700), (50, 24, 6), (2, 1000, 3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MDP_SHAPES)
def test_bellman_backup_matches_cpu_and_gradients(shape, dtype):
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
    (Q, Vn, pol), g = run(dev(P), dev(R), dev(V), BACKEND)
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


def test_bellman_backup_nan_and_empty():
    P, R, V = mdp(2, 8, 4, torch.float32, seed=3)
    R[0, 1, 2] = float("nan")  # V_new NaN and policy = the NaN action, as on the CPU
    V[1, 5] = float("inf")
    Qc, Vc, pc = rlkernels.bellman_backup(P, R, V, gamma=0.9, backend="cpu")
    Q, Vn, pol = rlkernels.bellman_backup(dev(P), dev(R), dev(V), gamma=0.9, backend=BACKEND)
    assert_close(Q, Qc, **tol(torch.float32))
    assert_close(Vn, Vc, **tol(torch.float32))
    assert torch.equal(cpu(pol), pc)
    for B, S, A in ((0, 4, 2), (2, 0, 3), (2, 3, 0)):
        P, R, V = mdp(B, S, A, torch.float32, seed=0)
        Qc, Vc, pc = rlkernels.bellman_backup(P, R, V, backend="cpu")
        Q, Vn, pol = rlkernels.bellman_backup(dev(P), dev(R), dev(V), backend=BACKEND)
        assert Q.shape == Qc.shape and Vn.shape == Vc.shape and pol.shape == pc.shape
        assert_close(Vn, Vc, **tol(torch.float32))
        assert torch.equal(cpu(pol), pc)


@pytest.mark.parametrize("shape", ((4, 16, 3), (1, 50, 4), (7, 5, 2), (3, 33, 9)))
@pytest.mark.parametrize("with_v0", (False, True))
def test_value_iteration_matches_reference_float64(shape, with_v0):
    """float64: the same number of backups as the reference, residuals and values to 1e-9."""
    P, R, V0 = mdp(*shape, torch.float64, seed=sum(shape) + 1)
    V0 = V0 if with_v0 else None
    out = rlkernels.value_iteration(dev(P), dev(R), gamma=0.9, tol=1e-8, max_iters=500, V0=dev(V0), backend=BACKEND)
    V, Q, pol, iters, res = out
    Vr, Qr, pr, ir, rr = reference.value_iteration(P.numpy(), R.numpy(), 0.9, tol=1e-8, max_iters=500,
                                                   V0=None if V0 is None else V0.numpy())
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_iteration_other_dtypes_match_cpu(dtype):
    P, R, V0 = mdp(5, 12, 3, dtype, seed=9)
    kw = {"gamma": 0.8, "tol": 1e-3, "max_iters": 300}
    V, Q, pol, iters, res = rlkernels.value_iteration(dev(P), dev(R), backend=BACKEND, **kw)
    Vc, Qc, pc, ic, rc = rlkernels.value_iteration(P, R, backend="cpu", **kw)
    assert V.dtype == Vc.dtype and Q.dtype == Qc.dtype and res.dtype == rc.dtype
    # Rounding differences of the summation order can move the stopping iteration by one.
    assert abs(int(iters) - int(ic)) <= 1
    rtol = 1e-4 if dtype == torch.float64 else 5e-3
    torch.testing.assert_close(cpu(V).double(), Vc.double(), rtol=rtol, atol=rtol * 10)
    assert bool((cpu(res) < 1e-3).all())


def test_value_iteration_stops_at_max_iters_and_edge_cases():
    P, R, _ = mdp(3, 10, 4, torch.float64, seed=4)
    for max_iters in (1, 2, 7):
        V, Q, pol, iters, res = rlkernels.value_iteration(dev(P), dev(R), gamma=0.99, tol=0.0, max_iters=max_iters,
                                                          backend=BACKEND)
        Vr, Qr, pr, ir, rr = reference.value_iteration(P.numpy(), R.numpy(), 0.99, tol=0.0, max_iters=max_iters)
        assert int(iters) == ir == max_iters
        assert_close(V, torch.as_tensor(Vr), **ref_tol(torch.float64))  # the buffer of the last backup (iters % 2)
        assert_close(res, torch.as_tensor(np.asarray(rr)), **ref_tol(torch.float64))
    # A NaN reward never converges: max_iters backups, NaN residual for that MDP only.
    R_nan = R.clone()
    R_nan[1, 2, 3] = float("nan")
    _, _, _, iters, res = rlkernels.value_iteration(dev(P), dev(R_nan), gamma=0.9, tol=1e-6, max_iters=40,
                                                    backend=BACKEND)
    assert int(iters) == 40 and bool(torch.isnan(cpu(res)[1])) and not bool(torch.isnan(cpu(res)[0]))
    # Empty batches and empty MDPs: the reference makes one (empty) backup.
    for B, S, A in ((0, 4, 2), (2, 0, 3)):
        P0, R0, _ = mdp(B, S, A, torch.float32, seed=0)
        out = rlkernels.value_iteration(dev(P0), dev(R0), backend=BACKEND)
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
    x = {k: dev(v) for k, v in nstep_inputs((3, 40, 33), torch.float32, 23, ("term", "trunc", "next", "boot")).items()}
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
            "td_loss_backward", (gl, dev(torch.randn(5000)), qq.detach(), act, tgt.detach(), w, "squared", 1.0,
                                 reduction))
    samples["n_step_returns"] = ("n_step_returns", (x["rewards"], x["values"], x["next_values"],
                                                    x["bootstrap_value"], x["terminated"], x["truncated"], 0.9, 3))
    samples["n_step_returns_nonext"] = ("n_step_returns", (x["rewards"], x["values"], None, x["bootstrap_value"],
                                                           x["terminated"], None, 0.9, 5))
    samples["n_step_returns_backward"] = ("n_step_returns_backward",
                                          (g, x["terminated"], x["truncated"], x["rewards"].detach(), 0.9, 3, True))
    samples["n_step_returns_backward_nonext"] = ("n_step_returns_backward",
                                                 (g, x["terminated"], None, x["rewards"].detach(), 0.9, 5, False))
    samples["bellman_backup"] = ("bellman_backup", (P, R, V, 0.9))
    samples["value_iteration"] = ("value_iteration", (P.detach(), R.detach(), V.detach(), 0.9, 1e-5, 200))
    return samples


def test_repeated_runs_are_bit_identical():
    for name, (op, args) in raw_samples().items():
        first = getattr(torch.ops.rlkernels, op)(*args)
        second = getattr(torch.ops.rlkernels, op)(*args)
        first = first if isinstance(first, (tuple, list)) else (first,)
        second = second if isinstance(second, (tuple, list)) else (second,)
        for a, b in zip(first, second):
            assert torch.equal(a, b), name


def test_no_host_synchronization():
    """docs/design.md §2: no op synchronizes (torch's sync debug mode raises on a synchronizing call)."""
    samples = raw_samples()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name, (op, args) in samples.items():
            getattr(torch.ops.rlkernels, op)(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("requires_grad", (False, True))
def test_opcheck(requires_grad):
    for name, (op, args) in raw_samples(requires_grad).items():
        torch.library.opcheck(getattr(torch.ops.rlkernels, op).default, args)


def test_public_functions_compile_fullgraph():
    torch._dynamo.reset()
    r, q, online, probs, term = (dev(t) for t in q_inputs(300, 18, torch.float32, seed=31))
    qq, act, tgt, w = (dev(t) for t in td_inputs(500, 6, torch.float32, seed=32))
    x = {k: dev(v) for k, v in nstep_inputs((40, 33), torch.float32, 33, ("term", "next", "boot")).items()}
    P, R, V = (dev(t) for t in mdp(3, 20, 4, torch.float32, seed=34))
    qq, tgt, P, R, V = (t.detach().clone().requires_grad_(True) for t in (qq, tgt, P, R, V))
    rw, vals = (x[k].detach().clone().requires_grad_(True) for k in ("rewards", "values"))

    def f(qq, tgt, rw, vals, P, R, V):
        y = rlkernels.q_targets(r, q, terminated=term, kind="double", next_q_online=online, backend=BACKEND)
        y2 = rlkernels.q_targets(r, q, kind="soft", temperature=0.5, backend=BACKEND)
        loss, e = rlkernels.td_loss(qq, act, tgt, weights=w, backend=BACKEND)
        G = rlkernels.n_step_returns(rw, vals, n=3, gamma=0.9, terminated=x["terminated"],
                                     next_values=x["next_values"], backend=BACKEND)
        Q, Vn, _ = rlkernels.bellman_backup(P, R, V, gamma=0.9, backend=BACKEND)
        Vi, _, _, iters, res = rlkernels.value_iteration(P.detach(), R.detach(), gamma=0.9, tol=1e-4,
                                                         max_iters=50, backend=BACKEND)
        return (y.sum() + y2.sum() + loss + e.sum() + G.sum() + Q.sum() + Vn.sum() + Vi.sum() + iters + res.sum())

    leaves = (qq, tgt, rw, vals, P, R, V)
    eager_out = f(*leaves)
    eager = torch.autograd.grad(eager_out, leaves)
    compiled_out = torch.compile(f, fullgraph=True)(*leaves)
    compiled = torch.autograd.grad(compiled_out, leaves)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-4)
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_value_iteration_and_backups_capture_in_a_cuda_graph():
    """The value_iteration loop (max_iters launch pairs reading a device-side done flag) and td_loss's forward
    plus backward replay from a CUDA graph with the eager results."""
    P, R, _ = (dev(t) for t in mdp(4, 16, 3, torch.float32, seed=41))
    qq, act, tgt, w = (dev(t) for t in td_inputs(3000, 5, torch.float32, seed=42))
    qq = qq.requires_grad_(True)

    def step():
        vi = torch.ops.rlkernels.value_iteration(P, R, None, 0.9, 1e-4, 300)  # float32: tol well above ulps
        loss, _ = rlkernels.td_loss(qq, act, tgt, weights=w, backend=BACKEND)
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
