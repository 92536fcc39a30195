"""Retrace(lambda) (docs/design.md §4.6) on every backend: rlax's definition, the reference, gradients, layouts."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlkernels
from conftest import DTYPES, assert_close
from rlkernels import reference

BACKENDS = [b for b in ("cpu", "triton", "cuda") if b in rlkernels.available_backends()]


def device_of(backend):
    return "cuda" if backend == "cuda" else "cpu"


def rlax_general_off_policy_returns_from_q_and_v(q_t, v_t, r_t, discount_t, c_t):
    """rlax.multistep.general_off_policy_returns_from_q_and_v (rlax 0.1.x), transcribed to NumPy: one
    trajectory, K rewards; q_t, c_t at times [1, K - 1], v_t, r_t, discount_t at times [1, K]."""
    g = r_t[-1] + discount_t[-1] * v_t[-1]
    returns = [g]
    for i in range(q_t.shape[0] - 1, -1, -1):
        g = r_t[i] + discount_t[i] * (v_t[i] - c_t[i] * q_t[i] + c_t[i] * g)
        returns.insert(0, g)
    return np.array(returns)


def rlax_retrace_targets(q_t, a_t, r_t, discount_t, pi_t, mu_t, lambda_):
    """The target of rlax.retrace (value_learning.retrace before it subtracts q_tm1[a_tm1]), transcribed:
    c_t = lambda min(1, pi(a_t) / mu(a_t)), then general_off_policy_returns_from_action_values (the expected
    value under pi, the taken action's value, and c without the final step)."""
    pi_a_t = pi_t[np.arange(len(a_t)), a_t]
    c_t = np.minimum(1.0, pi_a_t / mu_t) * lambda_
    exp_q_t = (pi_t * q_t).sum(axis=-1)
    q_a_t = q_t[np.arange(len(a_t)), a_t][:-1]
    return rlax_general_off_policy_returns_from_q_and_v(q_a_t, exp_q_t, r_t, discount_t, c_t[:-1])


def trajectories(T, B, A, *, seed, terminal_p=0.1):
    """B trajectories of T transitions with A actions, time-first, as rlax's inputs and ours.

    Transition t goes from x_t to x_{t+1}; q_next[t] = Q(x_{t+1}, .) and pi_next[t] = pi(. | x_{t+1}),
    a_next[t] the behaviour action taken at x_{t+1} with probability mu_next[t]."""
    rng = np.random.default_rng(seed)
    q_next = rng.normal(size=(T, B, A))
    logits = rng.normal(size=(T, B, A))
    pi_next = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    a_next = rng.integers(0, A, size=(T, B))
    mu_next = rng.uniform(0.05, 1.0, size=(T, B))
    rewards = rng.normal(size=(T, B))
    terminated = rng.random((T, B)) < terminal_p
    return q_next, pi_next, a_next, mu_next, rewards, terminated


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("terminal_p", [0.0, 0.15])
def test_matches_rlax_retrace(backend, terminal_p):
    T, B, A, gamma, lam = 13, 4, 3, 0.97, 0.9
    q_next, pi_next, a_next, mu_next, rewards, terminated = trajectories(T, B, A, seed=1, terminal_p=terminal_p)
    expected = np.stack([
        rlax_retrace_targets(q_next[:, b], a_next[:, b], rewards[:, b], gamma * (1.0 - terminated[:, b]),
                             pi_next[:, b], mu_next[:, b], lam) for b in range(B)], axis=1)
    # Our inputs: q_taken[t] = Q(x_t, a_t), next_v[t] = E_pi Q(x_{t+1}, .), log_rhos[t] at (x_t, a_t). rlax's
    # trajectory starts at x_0 whose action value it does not use; q_taken[0] and log_rhos[0] are arbitrary.
    q_a = np.take_along_axis(q_next, a_next[..., None], -1)[..., 0]
    pi_a = np.take_along_axis(pi_next, a_next[..., None], -1)[..., 0]
    q_taken = np.concatenate([np.full((1, B), 7.0), q_a[:-1]])
    log_rhos = np.concatenate([np.full((1, B), 3.0), np.log(pi_a[:-1] / mu_next[:-1])])
    next_v = (pi_next * q_next).sum(-1)
    dev = device_of(backend)
    t = lambda x: torch.tensor(x, dtype=torch.float64, device=dev)  # noqa: E731
    got = rlkernels.retrace(t(rewards), t(q_taken), t(next_v), t(log_rhos), gamma=gamma, lam=lam,
                            terminated=t(terminated).bool(), backend=backend)
    assert_close(got, expected, torch.float64, name="retrace vs rlax")


def _inputs(shape, dtype, seed, *, terminal_p=0.1, trunc_p=0.0, mask_p=0.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def randn(scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    def bern(p):
        return None if p == 0 else (torch.rand(shape, generator=g, dtype=torch.float64) < p).to(device)

    tensors = {"rewards": randn(), "q_taken": randn(), "next_v": randn(), "log_rhos": randn(0.5)}
    flags = {"terminated": bern(terminal_p), "truncated": bern(trunc_p)}
    mask = bern(mask_p)
    flags["mask"] = None if mask is None else ~mask
    return tensors, {k: v for k, v in flags.items() if v is not None}


def _call(tensors, flags, backend, **kw):
    return rlkernels.retrace(tensors["rewards"], tensors["q_taken"], tensors["next_v"], tensors["log_rhos"],
                             backend=backend, **flags, **kw)


def _ref(tensors, flags, **kw):
    return reference.retrace(tensors["rewards"], tensors["q_taken"], tensors["next_v"], tensors["log_rhos"],
                             **flags, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 40), B=st.integers(1, 5), seed=st.integers(0, 2**16), terminal_p=st.sampled_from([0, 0.2]),
       trunc_p=st.sampled_from([0, 0.2]), mask_p=st.sampled_from([0, 0.3]), c_clip=st.sampled_from([1.0, 0.5, 2.0]),
       time_dim=st.sampled_from([0, -1]))
def test_matches_reference(backend, dtype, T, B, seed, terminal_p, trunc_p, mask_p, c_clip, time_dim):
    shape = (T, B) if time_dim == 0 else (B, T)
    tensors, flags = _inputs(shape, dtype, seed, terminal_p=terminal_p, trunc_p=trunc_p, mask_p=mask_p,
                             device=device_of(backend))
    kw = dict(gamma=0.95, lam=0.9, c_clip=c_clip, time_dim=time_dim)
    got = _call(tensors, flags, backend, **kw)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == shape
    assert_close(got, _ref(tensors, flags, **kw), dtype, name="retrace")


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_non_contiguous(backend):
    dev = device_of(backend)
    tensors, flags = _inputs((2, 9, 3), torch.float32, 3, terminal_p=0.2, mask_p=0.2, device=dev)
    tensors = {k: v.transpose(0, 2).contiguous().transpose(0, 2) for k, v in tensors.items()}  # permuted storage
    assert not tensors["rewards"].is_contiguous()
    kw = dict(gamma=0.9, lam=0.7, time_dim=1)
    assert_close(_call(tensors, flags, backend, **kw), _ref(tensors, flags, **kw), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_packed_sequences(backend, cu_dtype):
    dev = device_of(backend)
    lengths = [3, 1, 0, 7, 2]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=cu_dtype, device=dev)
    tensors, flags = _inputs((sum(lengths),), torch.float64, 4, terminal_p=0.1, trunc_p=0.1, mask_p=0.2,
                             device=dev)
    kw = dict(gamma=0.9, lam=0.8, cu_seqlens=cu)
    got = _call(tensors, flags, backend, **kw)
    assert_close(got, _ref(tensors, flags, **kw), torch.float64)
    # Each segment alone, unpacked, gives the same targets: segments never leak into each other.
    start = 0
    for n in lengths:
        if n:
            part = {k: v[start:start + n] for k, v in tensors.items()}
            pflags = {k: v[start:start + n] for k, v in flags.items()}
            assert_close(got[start:start + n], _call(part, pflags, backend, gamma=0.9, lam=0.8), torch.float64)
        start += n


@pytest.mark.parametrize("backend", BACKENDS)
def test_cut_rules(backend):
    """G = r at a terminal step, r + gamma next_v at a truncation and at the end of the data."""
    dev = device_of(backend)
    r = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64, device=dev)
    q = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64, device=dev)
    nv = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=torch.float64, device=dev)
    lr = torch.zeros(4, dtype=torch.float64, device=dev)  # rho = 1, so c = lam
    term = torch.tensor([False, True, False, False], device=dev)
    trunc = torch.tensor([False, False, True, False], device=dev)
    G = rlkernels.retrace(r, q, nv, lr, gamma=0.5, lam=0.5, terminated=term, truncated=trunc, backend=backend)
    g3 = 4.0 + 0.5 * 40.0
    g2 = 3.0 + 0.5 * 30.0
    g1 = 2.0
    g0 = 1.0 + 0.5 * 10.0 + 0.5 * 0.5 * (g1 - (-1.0))
    assert G.tolist() == [g0, g1, g2, g3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequences_chunked(backend):
    """Few long sequences take the chunked scan (chunk maps combined across chunks) on every backend."""
    T = 70_000 if backend != "triton" else 1_500
    dev = device_of(backend)
    tensors, flags = _inputs((T, 2), torch.float64, 5, terminal_p=0.002, trunc_p=0.001, mask_p=0.1, device=dev)
    kw = dict(gamma=0.999, lam=0.95, c_clip=1.0)
    assert_close(_call(tensors, flags, backend, **kw), _ref(tensors, flags, **kw), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["time-first", "packed"])
def test_gradcheck(backend, layout):
    dev = device_of(backend)
    if layout == "packed":
        cu = torch.tensor([0, 3, 4, 9], device=dev)
        tensors, flags = _inputs((9,), torch.float64, 6, terminal_p=0.2, trunc_p=0.2, mask_p=0.2, device=dev)
        kw = dict(cu_seqlens=cu)
    else:
        tensors, flags = _inputs((6, 3), torch.float64, 7, terminal_p=0.2, trunc_p=0.2, mask_p=0.2, device=dev)
        kw = {}
    # log_rhos away from log(c_clip) = 0, where c's derivative jumps.
    lr = tensors["log_rhos"]
    tensors["log_rhos"] = torch.where(lr.abs() < 0.05, lr + 0.2, lr)
    names = ("rewards", "q_taken", "next_v", "log_rhos")

    def fn(*xs):
        return _call(dict(zip(names, xs)), flags, backend, gamma=0.9, lam=0.8, **kw)

    inputs = tuple(tensors[n].detach().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_against_autograd_of_the_reference_formula(backend):
    """float32 and bfloat16 gradients against torch autograd through the recursion written out (float64)."""
    dev = device_of(backend)
    for dtype in (torch.float32, torch.bfloat16):
        tensors, flags = _inputs((7, 2), dtype, 8, terminal_p=0.2, trunc_p=0.2, device=dev)
        xs = {k: v.detach().requires_grad_(True) for k, v in tensors.items()}
        G = _call(xs, flags, backend, gamma=0.9, lam=0.8, c_clip=1.2)
        w = torch.linspace(-1, 1, G.numel(), device=dev).reshape(G.shape)
        (G * w).sum().backward()

        ys = {k: v.detach().double().requires_grad_(True) for k, v in tensors.items()}
        term = flags["terminated"].double()
        trunc = flags["truncated"].double()
        c = 0.8 * torch.clamp(ys["log_rhos"].exp(), max=1.2)
        out, x_next = [], torch.zeros(2, dtype=torch.float64, device=dev)
        for t in range(6, -1, -1):
            g = ys["rewards"][t] + 0.9 * (1 - term[t]) * ys["next_v"][t] + 0.9 * (1 - term[t]) * (1 - trunc[t]) * x_next
            out.insert(0, g)
            x_next = c[t] * (g - ys["q_taken"][t])
        (torch.stack(out) * w.double()).sum().backward()
        for k in xs:
            assert xs[k].grad.dtype == dtype
            assert_close(xs[k].grad, ys[k].grad, dtype, name=f"grad {k} ({dtype})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_as_the_formula_says(backend):
    dev = device_of(backend)
    tensors, flags = _inputs((6, 2), torch.float64, 9, terminal_p=0.0, device=dev)
    tensors["q_taken"][3, 0] = float("nan")
    tensors["rewards"][1, 1] = float("inf")
    got = _call(tensors, flags, backend, gamma=0.9, lam=0.9)
    assert_close(got, _ref(tensors, flags, gamma=0.9, lam=0.9), torch.float64)
    assert torch.isnan(got[:3, 0]).all() and not torch.isnan(got[3:, 0]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    dev = device_of(backend)
    for shape in [(0, 3), (4, 0)]:
        tensors, _ = _inputs(shape, torch.float32, 0, terminal_p=0, device=dev)
        out = _call(tensors, {}, backend, gamma=0.9, lam=0.9)
        assert out.shape == shape and out.dtype == torch.float32


def test_errors_name_the_argument():
    tensors, _ = _inputs((5, 2), torch.float32, 0)
    r, q, nv, lr = (tensors[k] for k in ("rewards", "q_taken", "next_v", "log_rhos"))
    with pytest.raises(ValueError, match="gamma"):
        rlkernels.retrace(r, q, nv, lr, gamma=1.5, lam=0.9)
    with pytest.raises(ValueError, match="lam"):
        rlkernels.retrace(r, q, nv, lr, gamma=0.9, lam=-0.1)
    with pytest.raises(ValueError, match="c_clip"):
        rlkernels.retrace(r, q, nv, lr, gamma=0.9, lam=0.9, c_clip=0.0)
    with pytest.raises(ValueError, match="q_taken"):
        rlkernels.retrace(r, q[:4], nv, lr, gamma=0.9, lam=0.9)
    with pytest.raises(TypeError, match="log_rhos"):
        rlkernels.retrace(r, q, nv, lr.long(), gamma=0.9, lam=0.9)
    with pytest.raises(TypeError, match="next_v"):
        rlkernels.retrace(r, q, None, lr, gamma=0.9, lam=0.9)
    with pytest.raises(TypeError, match="gamma"):
        rlkernels.retrace(r, q, nv, lr, lam=0.9)  # gamma and lam have no default (docs/design.md §4.6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    dev = device_of(backend)
    tensors, flags = _inputs((5, 3, 2), torch.float32, 10, terminal_p=0.2, trunc_p=0.2, mask_p=0.2, device=dev)
    prefix = "triton_" if backend == "triton" else ""
    op = getattr(torch.ops.rlkernels, prefix + "retrace")
    args = (tensors["rewards"].requires_grad_(True), tensors["q_taken"].requires_grad_(True), tensors["next_v"],
            tensors["log_rhos"].requires_grad_(True), flags["terminated"], flags["truncated"], flags["mask"], None,
            0.9, 0.8, 1.0)
    torch.library.opcheck(op, args)
    G = op(*args).detach()
    bwd = getattr(torch.ops.rlkernels, prefix + "retrace_backward")
    torch.library.opcheck(bwd, (torch.randn_like(G), G, *(a.detach() for a in (args[1], args[3])), *args[4:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_without_graph_breaks(backend):
    dev = device_of(backend)
    tensors, flags = _inputs((8, 4), torch.float32, 11, terminal_p=0.2, device=dev)

    def fn(r, q, nv, lr, term):
        return rlkernels.retrace(r, q, nv, lr, gamma=0.99, lam=0.95, terminated=term, backend=backend).sum()

    args = (tensors["rewards"], tensors["q_taken"], tensors["next_v"], tensors["log_rhos"], flags["terminated"])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_close(compiled(*args), fn(*args), torch.float32)
