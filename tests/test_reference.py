"""Tests of the NumPy oracle rlkernels/reference.py.

Two kinds of checks: small fixed cases computed by hand (the arithmetic is in the comments), and
cross-checks against implementations people already trust (TorchRL, Stable-Baselines3, scipy,
verl's GAE loop, torch float64 formulas). The module is loaded by file path so these tests run
whether or not the compiled package imports.
"""

import importlib.util
import math
import pathlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

_PATH = pathlib.Path(__file__).resolve().parents[1] / "rlkernels" / "reference.py"
_spec = importlib.util.spec_from_file_location("rlkernels_reference_under_test", _PATH)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

close = np.testing.assert_allclose
LN2 = math.log(2.0)


def _rng(seed):
    return np.random.default_rng(seed)


def _flags(rng, shape, p):
    return rng.random(shape) < p


# ============================================================================================
# linear_scan
# ============================================================================================


def test_linear_scan_reverse_by_hand():
    # x2 = 3 + .5*4 = 5; x1 = 2 + .5*5 = 4.5; x0 = 1 + .5*4.5 = 3.25
    x = ref.linear_scan([0.5, 0.5, 0.5], [1.0, 2.0, 3.0], initial=4.0)
    close(x, [3.25, 4.5, 5.0])


def test_linear_scan_forward_by_hand():
    # x0 = 1 + .5*4 = 3; x1 = 2 + .5*3 = 3.5; x2 = 3 + .5*3.5 = 4.75
    x = ref.linear_scan([0.5, 0.5, 0.5], [1.0, 2.0, 3.0], initial=4.0, reverse=False)
    close(x, [3.0, 3.5, 4.75])


def test_linear_scan_time_dim_and_initial_per_sequence():
    rng = _rng(0)
    a, b = rng.random((4, 7, 3)), rng.standard_normal((4, 7, 3))
    init = rng.standard_normal((4, 3))
    x = ref.linear_scan(a, b, initial=init, time_dim=1)
    for i in range(4):
        for j in range(3):
            carry = init[i, j]
            for t in reversed(range(7)):
                carry = b[i, t, j] + a[i, t, j] * carry
                close(x[i, t, j], carry, rtol=1e-12)
    # time_dim=-1 on the transposed layout gives the transposed result
    xt = ref.linear_scan(np.moveaxis(a, 1, -1), np.moveaxis(b, 1, -1), initial=init, time_dim=-1)
    close(np.moveaxis(xt, -1, 1), x, rtol=1e-12)


def test_linear_scan_accepts_torch_and_empty():
    a = torch.full((3, 2), 0.5, dtype=torch.bfloat16)
    b = torch.ones(3, 2)
    close(ref.linear_scan(a, b), np.array([[1.75] * 2, [1.5] * 2, [1.0] * 2]))
    assert ref.linear_scan(np.zeros((0, 3)), np.zeros((0, 3))).shape == (0, 3)


# ============================================================================================
# discounted_returns
# ============================================================================================


def test_discounted_returns_terminated_and_bootstrap():
    # gamma .5, bootstrap 8: G3 = 4 + .5*8 = 8; G2 = 3 + .5*8 = 7;
    # G1 = 2 (terminated: no future); G0 = 1 + .5*2 = 2
    G = ref.discounted_returns([1.0, 2.0, 3.0, 4.0], gamma=0.5, terminated=[0, 1, 0, 0], bootstrap_value=8.0)
    close(G, [2.0, 2.0, 7.0, 8.0])


def test_discounted_returns_truncated_uses_next_values():
    # next_values given: G2 = 1 + .5*30 = 16; G1 = 1 + .5*16 = 9; G0 truncated: 1 + .5*10 = 6
    G = ref.discounted_returns(
        [1.0, 1.0, 1.0], gamma=0.5, truncated=np.array([True, False, False]), next_values=[10.0, 20.0, 30.0]
    )
    close(G, [6.0, 9.0, 16.0])


def test_truncated_without_next_values_is_an_error():
    for fn, args in (
        (ref.discounted_returns, ([1.0, 2.0],)),
        (ref.gae, ([1.0, 2.0], [0.0, 0.0])),
        (ref.vtrace, ([1.0, 2.0], [0.0, 0.0], [0.0, 0.0])),
        (ref.n_step_returns, ([1.0, 2.0], [0.0, 0.0])),
    ):
        kwargs = {"n": 2} if fn is ref.n_step_returns else {}
        with pytest.raises(ValueError, match=r"truncated.*next_values"):
            fn(*args, truncated=[1, 0], **kwargs)


def test_discounted_returns_mask_skips_positions():
    # valid steps 0, 2, 4: G4 = 3; G2 = 2 + .5*3 = 3.5; G0 = 1 + .5*3.5 = 2.75; masked -> 0
    G = ref.discounted_returns([1.0, 9.0, 2.0, 9.0, 3.0], gamma=0.5, mask=[1.0, 0.0, 1.0, 0.0, 1.0])
    close(G, [2.75, 0.0, 3.5, 0.0, 3.0])


def test_discounted_returns_cu_seqlens():
    # seg [0,2) boot 2: G1 = 1 + .5*2 = 2, G0 = 1 + .5*2 = 2
    # seg [2,5) boot 4: G4 = 1 + 2 = 3, G3 = 1 + 1.5 = 2.5, G2 = 1 + 1.25 = 2.25
    G = ref.discounted_returns(
        np.ones(5),
        gamma=0.5,
        cu_seqlens=np.array([0, 2, 5], np.int32),
        bootstrap_value=[2.0, 4.0],
        time_dim=-1,  # packed inputs are 1-D: 0 or -1 (anything else is refused, test_errors.py)
    )
    close(G, [2.0, 2.0, 2.25, 2.5, 3.0])


def test_discounted_returns_vs_scipy_lfilter():
    from scipy.signal import lfilter

    rng = _rng(1)
    r = rng.standard_normal((97, 5))
    boot = rng.standard_normal(5)
    gamma = 0.97
    G = ref.discounted_returns(r, gamma=gamma, bootstrap_value=boot)
    for j in range(5):
        # the classic discount_cumsum, with the bootstrap appended as one more "reward"
        x = np.append(r[:, j], boot[j])
        expected = lfilter([1.0], [1.0, -gamma], x[::-1])[::-1][:-1]
        close(G[:, j], expected, rtol=1e-10, atol=1e-12)


def test_discounted_returns_rejects_bad_inputs():
    with pytest.raises(ValueError, match="gamma"):
        ref.discounted_returns([1.0], gamma=1.5)
    with pytest.raises(TypeError, match="rewards"):
        ref.discounted_returns(np.array([1, 2]))
    with pytest.raises(ValueError, match="terminated"):
        ref.discounted_returns([1.0, 2.0], terminated=[0, 0, 1])
    with pytest.raises(ValueError, match="cu_seqlens"):
        ref.discounted_returns(np.ones(5), cu_seqlens=[0, 2, 4])


# ============================================================================================
# gae
# ============================================================================================


def test_gae_by_hand():
    # gamma = lam = .5, V = [1,2,3], bootstrap 4 -> V' = [2,3,4]
    # delta = [1 + 1 - 1, 1 + 1.5 - 2, 1 + 2 - 3] = [1, .5, 0]
    # A2 = 0; A1 = .5 + .25*0 = .5; A0 = 1 + .25*.5 = 1.125; returns = A + V
    A, R = ref.gae([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], gamma=0.5, lam=0.5, bootstrap_value=4.0)
    close(A, [1.125, 0.5, 0.0])
    close(R, [2.125, 2.5, 3.0])


def test_gae_terminated_by_hand():
    # term at 1: delta1 = 1 + 0 - 2 = -1 and the recursion is cut: A1 = -1; A2 = 0;
    # A0 = delta0 + .25*A1 = 1 - .25 = .75
    A, R = ref.gae(
        [1.0, 1.0, 1.0],
        [1.0, 2.0, 3.0],
        gamma=0.5,
        lam=0.5,
        bootstrap_value=4.0,
        terminated=[False, True, False],
    )
    close(A, [0.75, -1.0, 0.0])
    close(R, [1.75, 1.0, 3.0])


def test_gae_truncated_by_hand():
    # trunc at 1, next_values [2,5,4]: delta1 = 1 + .5*5 - 2 = 1.5, cut: A1 = 1.5;
    # delta2 = 1 + 2 - 3 = 0 -> A2 = 0; A0 = (1 + 1 - 1) + .25*1.5 = 1.375
    A, _ = ref.gae(
        [1.0, 1.0, 1.0],
        [1.0, 2.0, 3.0],
        gamma=0.5,
        lam=0.5,
        truncated=np.array([0, 1, 0], np.uint8),
        next_values=[2.0, 5.0, 4.0],
    )
    close(A, [1.375, 1.5, 0.0])


def test_gae_mask_by_hand():
    # valid 0 and 2: V'_0 = V[2] = 3, V'_2 = bootstrap 0
    # delta2 = 1 - 3 = -2 -> A2 = -2; delta0 = 1 + 1.5 - 1 = 1.5 -> A0 = 1.5 + .25*(-2) = 1
    A, R = ref.gae(
        [[1.0, 5.0, 1.0]], [[1.0, 7.0, 3.0]], gamma=0.5, lam=0.5, mask=[[True, False, True]], time_dim=-1
    )
    close(A, [[1.0, 0.0, -2.0]])
    close(R, [[2.0, 0.0, 1.0]])


def test_gae_fully_masked_sequence_is_zero():
    A, R = ref.gae(np.ones((2, 4)), np.ones((2, 4)), mask=np.zeros((2, 4)), time_dim=-1)
    assert np.all(A == 0) and np.all(R == 0)


def _torchrl_inputs(rng, B, T, *, p_term=0.15, p_trunc=0.1):
    r = rng.standard_normal((B, T))
    v = rng.standard_normal((B, T))
    nv = rng.standard_normal((B, T))
    term = _flags(rng, (B, T), p_term)
    trunc = _flags(rng, (B, T), p_trunc) & ~term
    return r, v, nv, term, trunc


def _t(x):
    return torch.as_tensor(x)[..., None]  # TorchRL wants [*B, T, 1]


@pytest.mark.parametrize("vectorized", [False, True])
def test_gae_vs_torchrl(vectorized):
    from torchrl.objectives.value import functional as F

    fn = F.vec_generalized_advantage_estimate if vectorized else F.generalized_advantage_estimate
    rng = _rng(2)
    # TorchRL multiplies gamma by an int tensor, which rounds it to float32: pick gamma and lam
    # that float32 holds exactly, so the comparison can be tight
    B, T, gamma, lam = 6, 41, 0.96875, 0.875
    r, v, nv, term, trunc = _torchrl_inputs(rng, B, T)
    adv_t, ret_t = fn(gamma, lam, _t(v), _t(nv), _t(r), _t(term | trunc), _t(term))
    A, R = ref.gae(r, v, gamma=gamma, lam=lam, terminated=term, truncated=trunc, next_values=nv, time_dim=-1)
    tol = 1e-6 if vectorized else 1e-12  # the vectorized version is exact only to ~1e-7
    close(A, adv_t[..., 0].numpy(), rtol=tol, atol=tol)
    close(R, ret_t[..., 0].numpy(), rtol=tol, atol=tol)
    # the same data time-major ([T, B], time_dim=0) gives the transposed answer
    A0, _ = ref.gae(r.T, v.T, gamma=gamma, lam=lam, terminated=term.T, truncated=trunc.T, next_values=nv.T)
    close(A0.T, A, rtol=1e-12)


def test_gae_vs_stable_baselines3():
    import gymnasium as gym
    from stable_baselines3.common.buffers import RolloutBuffer

    rng = _rng(3)
    T, N, gamma, lam = 33, 4, 0.95, 0.9
    buf = RolloutBuffer(
        T,
        gym.spaces.Box(-1.0, 1.0, (2,)),
        gym.spaces.Discrete(3),
        device="cpu",
        gae_lambda=lam,
        gamma=gamma,
        n_envs=N,
    )
    buf.reset()
    buf.rewards[:] = rng.standard_normal((T, N))
    buf.values[:] = rng.standard_normal((T, N))
    done = _flags(rng, (T, N), 0.1)
    # SB3: episode_starts[t+1] marks "done after t"; `dones` marks done after the last step
    buf.episode_starts[:] = 0.0
    buf.episode_starts[1:] = done[:-1]
    last_values = rng.standard_normal(N).astype(np.float32)
    rewards, values = buf.rewards.copy(), buf.values.copy()
    buf.compute_returns_and_advantage(torch.as_tensor(last_values), done[-1])
    # SB3 zeroes the next value and cuts the recursion at a done: our `terminated`
    A, R = ref.gae(rewards, values, gamma=gamma, lam=lam, terminated=done, bootstrap_value=last_values)
    close(A, buf.advantages, rtol=1e-5, atol=1e-5)  # SB3 computes in float32
    close(R, buf.returns, rtol=1e-5, atol=1e-5)


# verl's compute_gae_advantage_return without its whitening, from the trainers' transcriptions (by path too)
_TRAINERS = _PATH.parent / "bench" / "trainers.py"
_spec = importlib.util.spec_from_file_location("rlkernels_trainers_under_test", _TRAINERS)
_trainers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_trainers)
_verl_gae = _trainers.verl_gae


def test_gae_mask_vs_verl_loop():
    rng = _rng(4)
    B, T, gamma, lam = 5, 29, 0.99, 0.95
    r = rng.standard_normal((B, T))
    v = rng.standard_normal((B, T))
    mask = _flags(rng, (B, T), 0.6)
    mask[0] = False  # a row with no response token
    mask[1] = True  # a row with no hole
    adv_v, ret_v = _verl_gae(
        torch.as_tensor(r), torch.as_tensor(v), torch.as_tensor(mask, dtype=torch.float64), gamma, lam
    )
    A, R = ref.gae(r, v, gamma=gamma, lam=lam, mask=mask.astype(np.float32), time_dim=-1)
    close(A[mask], adv_v.numpy()[mask], rtol=1e-12, atol=1e-12)
    close(R[mask], ret_v.numpy()[mask], rtol=1e-12, atol=1e-12)
    assert np.all(A[~mask] == 0) and np.all(R[~mask] == 0)


_seq_len = st.integers(min_value=1, max_value=12)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_mask_equals_compressed_sequence(data):
    """Mask-0 garbage inserted between the steps of a sequence changes nothing at the real steps."""
    T = data.draw(_seq_len)
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = _rng(seed)
    r, v, lr = rng.standard_normal(T), rng.standard_normal(T), rng.standard_normal(T) * 0.5
    term = _flags(rng, T, 0.2)
    boot = rng.standard_normal()
    holes = data.draw(st.lists(st.integers(0, 3), min_size=T + 1, max_size=T + 1))
    L = T + sum(holes)
    pos = np.cumsum(np.array(holes[:-1]) + 1) - 1  # where the real steps land in the long array
    big = {name: rng.standard_normal(L) * 100 for name in ("r", "v", "lr")}
    big_term = _flags(rng, L, 0.5)
    for name, x in (("r", r), ("v", v), ("lr", lr)):
        big[name][pos] = x
    big_term[pos] = term
    mask = np.zeros(L, bool)
    mask[pos] = True
    kw = {"gamma": 0.9, "terminated": term, "bootstrap_value": boot}
    kw_big = {"gamma": 0.9, "terminated": big_term, "bootstrap_value": boot, "mask": mask}

    def check(small, large):
        for s, b in zip(small, large, strict=True):
            close(b[pos], s, rtol=1e-12, atol=1e-12)
            assert np.all(b[~mask] == 0)

    check([ref.discounted_returns(r, **kw)], [ref.discounted_returns(big["r"], **kw_big)])
    check(ref.gae(r, v, lam=0.8, **kw), ref.gae(big["r"], big["v"], lam=0.8, **kw_big))
    check(ref.vtrace(r, v, lr, lam=0.8, **kw), ref.vtrace(big["r"], big["v"], big["lr"], lam=0.8, **kw_big))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=5), st.integers(0, 2**31 - 1))
def test_cu_seqlens_equals_separate_calls(lengths, seed):
    rng = _rng(seed)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    L = int(cu[-1])
    r, v, nv, lr = (rng.standard_normal(L) for _ in range(4))
    term, trunc = _flags(rng, L, 0.2), _flags(rng, L, 0.2)
    mask = _flags(rng, L, 0.8)
    boot = rng.standard_normal(len(lengths))
    kw = {"gamma": 0.9, "terminated": term, "truncated": trunc, "next_values": nv, "mask": mask}
    packed = [
        ref.discounted_returns(r, cu_seqlens=cu, bootstrap_value=boot, **kw),
        *ref.gae(r, v, lam=0.7, cu_seqlens=cu, bootstrap_value=boot, **kw),
        *ref.vtrace(r, v, lr, cu_seqlens=cu, bootstrap_value=boot, **kw),
    ]
    for i in range(len(lengths)):
        s = slice(cu[i], cu[i + 1])
        one = {k: (x[s] if isinstance(x, np.ndarray) else x) for k, x in kw.items()}
        single = [
            ref.discounted_returns(r[s], bootstrap_value=boot[i], **one),
            *ref.gae(r[s], v[s], lam=0.7, bootstrap_value=boot[i], **one),
            *ref.vtrace(r[s], v[s], lr[s], bootstrap_value=boot[i], **one),
        ]
        for p, q in zip(packed, single, strict=True):
            close(p[s], q, rtol=1e-12, atol=1e-12)


def test_leading_dims_and_time_dim():
    rng = _rng(5)
    r, v = rng.standard_normal((3, 11, 4)), rng.standard_normal((3, 11, 4))
    term = _flags(rng, (3, 11, 4), 0.2)
    boot = rng.standard_normal((3, 4))
    A, R = ref.gae(r, v, gamma=0.9, lam=0.8, terminated=term, bootstrap_value=boot, time_dim=1)
    for i in range(3):
        for j in range(4):
            a, rr = ref.gae(
                r[i, :, j],
                v[i, :, j],
                gamma=0.9,
                lam=0.8,
                terminated=term[i, :, j],
                bootstrap_value=boot[i, j],
            )
            close(A[i, :, j], a, rtol=1e-12)
            close(R[i, :, j], rr, rtol=1e-12)


# ============================================================================================
# vtrace
# ============================================================================================


def test_vtrace_by_hand():
    # gamma .5, lam 1, V = 0, bootstrap 2, ratios [2, .5] -> rho = c = [1, .5]
    # delta1 = 1 + .5*2 = 2, x1 = .5*2 = 1, vs1 = 1; delta0 = 1, x0 = 1 + .5*1*1 = 1.5
    # pg1 = .5*(1 + .5*2) = 1 (last step bootstraps V'); pg0 = 1*(1 + .5*vs1) = 1.5
    vs, pg = ref.vtrace([1.0, 1.0], [0.0, 0.0], [LN2, -LN2], gamma=0.5, bootstrap_value=2.0)
    close(vs, [1.5, 1.0])
    close(pg, [1.5, 1.0])


def test_vtrace_done_uses_next_value():
    # trunc at 0 with next_values [4, 6]: delta0 = 1 + .5*4 = 3, cut -> vs0 = 3;
    # pg0 = 1 + .5*V'_0 = 3 (not vs1 = 1 + 3 = 4)
    vs, pg = ref.vtrace(
        [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], gamma=0.5, truncated=[1, 0], next_values=[4.0, 6.0]
    )
    close(vs, [3.0, 4.0])
    close(pg, [3.0, 4.0])


def test_vtrace_vs_torchrl():
    from torchrl.objectives.value.functional import vtrace_advantage_estimate

    rng = _rng(6)
    B, T, gamma, rho_clip, c_clip = 5, 37, 0.96875, 1.25, 0.875  # exact in float32, as above
    r, v, nv, term, trunc = _torchrl_inputs(rng, B, T)
    log_rhos = rng.standard_normal((B, T)) * 0.7
    # TorchRL: rho = exp(log_pi - log_mu); its pg advantage uses the rho clip; lam = 1
    adv_t, vs_t = vtrace_advantage_estimate(
        gamma,
        _t(log_rhos),
        _t(np.zeros((B, T))),
        _t(v),
        _t(nv),
        _t(r),
        _t(term | trunc),
        _t(term),
        rho_thresh=rho_clip,
        c_thresh=c_clip,
    )
    vs, pg = ref.vtrace(
        r,
        v,
        log_rhos,
        gamma=gamma,
        lam=1.0,
        rho_clip=rho_clip,
        c_clip=c_clip,
        pg_rho_clip=rho_clip,
        terminated=term,
        truncated=trunc,
        next_values=nv,
        time_dim=-1,
    )
    close(vs, vs_t[..., 0].numpy(), rtol=1e-12, atol=1e-12)
    close(pg, adv_t[..., 0].numpy(), rtol=1e-12, atol=1e-12)


def test_vtrace_on_policy_equals_gae():
    """With log_rhos = 0 and clips >= 1, vs - V is the GAE(lam) advantage."""
    rng = _rng(7)
    r, v, nv, term, trunc = _torchrl_inputs(rng, 4, 23)
    mask = _flags(rng, (4, 23), 0.8)
    kw = {
        "gamma": 0.9,
        "lam": 0.7,
        "terminated": term,
        "truncated": trunc,
        "next_values": nv,
        "mask": mask,
        "time_dim": -1,
    }
    vs, _ = ref.vtrace(r, v, np.zeros_like(r), **kw)
    _, R = ref.gae(r, v, **kw)
    close(vs, R, rtol=1e-12, atol=1e-12)


# ============================================================================================
# n_step_returns
# ============================================================================================


def test_n_step_returns_by_hand():
    # gamma .5, n 2, V' = [20, 30, 40, 50 (bootstrap)]
    # G0 = 1 + .5*2 + .25*30 = 9.5; G1 = 2 + .5*3 + .25*40 = 13.5
    # G2 = 3 + .5*4 + .25*50 = 17.5; G3 = 4 + .5*50 = 29 (data ends: one reward, gamma^1)
    r, v = [1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]
    G = ref.n_step_returns(r, v, n=2, gamma=0.5, bootstrap_value=50.0)
    close(G, [9.5, 13.5, 17.5, 29.0])
    # terminated at 1: G0 = 1 + .5*2 = 2 and G1 = 2 (no bootstrap)
    G = ref.n_step_returns(r, v, n=2, gamma=0.5, bootstrap_value=50.0, terminated=[0, 1, 0, 0])
    close(G, [2.0, 2.0, 17.5, 29.0])
    # truncated at 0 with next_values [7, ...]: G0 = 1 + .5*7 = 4.5
    G = ref.n_step_returns(r, v, n=2, gamma=0.5, truncated=[1, 0, 0, 0], next_values=[7.0, 30.0, 40.0, 50.0])
    close(G, [4.5, 13.5, 17.5, 29.0])


def test_n_step_returns_limits():
    rng = _rng(8)
    r, v, nv, term, trunc = _torchrl_inputs(rng, 3, 19)
    boot = rng.standard_normal(3)
    kw = {"gamma": 0.9, "terminated": term, "time_dim": -1, "bootstrap_value": boot}
    # n = 1 is the one-step target: the GAE(lambda=0) return
    _, R = ref.gae(r, v, lam=0.0, **kw)
    close(ref.n_step_returns(r, v, n=1, **kw), R, rtol=1e-12)
    # n >= T is the full discounted return, also with truncations
    kw_tr = dict(kw, truncated=trunc, next_values=nv)
    close(ref.n_step_returns(r, v, n=19, **kw_tr), ref.discounted_returns(r, **kw_tr), rtol=1e-12)
    close(ref.n_step_returns(r, v, n=50, **kw), ref.discounted_returns(r, **kw), rtol=1e-12)
    with pytest.raises(ValueError, match="n"):
        ref.n_step_returns(r, v, n=0)


# ============================================================================================
# gather_logprobs
# ============================================================================================


def test_gather_logprobs_by_hand():
    # p = [.5, .25, .25]: logp(1) = -2 ln 2; entropy = .5 ln 2 + 2 * .25 * 2 ln 2 = 1.5 ln 2
    logits = np.log([[0.5, 0.25, 0.25]]) + 3.0  # a shift changes nothing
    logp, ent = ref.gather_logprobs(logits, [1], return_entropy=True)
    close(logp, [-2 * LN2], rtol=1e-12)
    close(ent, [1.5 * LN2], rtol=1e-12)
    # temperature 2: z = [0, ln 2] -> p = [1/3, 2/3]
    logp = ref.gather_logprobs([[0.0, 2 * LN2]], [1], temperature=2.0)
    close(logp, [math.log(2 / 3)], rtol=1e-12)


def test_gather_logprobs_neg_inf_and_ignore_index():
    logits = np.array([[0.0, -np.inf, 0.0], [0.0, -np.inf, 0.0], [5.0, 1.0, 2.0]])
    logp, ent = ref.gather_logprobs(logits, [0, 1, -100], return_entropy=True, ignore_index=-100)
    close(logp, [-LN2, -np.inf, 0.0])  # row 2 ignored
    close(ent, [LN2, LN2, 0.0])
    assert not np.any(np.isnan(ent))


def test_gather_logprobs_all_negative_logits():
    # a running max initialized at 0 would give a positive log-prob here (docs/design.md §8)
    logp = ref.gather_logprobs([[-1000.0, -1001.0]], [0])
    close(logp, [-math.log1p(math.exp(-1.0))], rtol=1e-12)


def test_gather_logprobs_rejects_bad_tokens():
    with pytest.raises(ValueError, match="tokens"):
        ref.gather_logprobs(np.zeros((2, 4)), [0, 4])
    with pytest.raises(ValueError, match="tokens"):
        ref.gather_logprobs(np.zeros((2, 4)), [-1, 0])
    with pytest.raises(TypeError, match="tokens"):
        ref.gather_logprobs(np.zeros((2, 4)), np.array([0.0, 1.0]))


def test_gather_logprobs_vs_torch():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 7, 50, generator=g, dtype=torch.float64) * 4
    tokens = torch.randint(0, 50, (3, 7), generator=g)
    temperature = 0.7
    logp, ent = ref.gather_logprobs(logits, tokens, temperature=temperature, return_entropy=True)
    z = logits / temperature
    lsm = torch.log_softmax(z, dim=-1)
    close(logp, lsm.gather(-1, tokens[..., None])[..., 0].numpy(), rtol=1e-12, atol=1e-12)
    close(ent, torch.distributions.Categorical(logits=z).entropy().numpy(), rtol=1e-10, atol=1e-12)
    # bf16 logits are read as they are: same answer as their float64 values
    lb = logits.to(torch.bfloat16)
    close(
        ref.gather_logprobs(lb, tokens),
        torch.log_softmax(lb.double(), -1).gather(-1, tokens[..., None])[..., 0].numpy(),
        rtol=1e-12,
        atol=1e-12,
    )


# ============================================================================================
# ppo_policy_loss, value_loss, kl_penalty
# ============================================================================================


def test_ppo_policy_loss_by_hand():
    # ratio = [1.5, .5, 1, 1], A = [1, -1, 2, -2], clip .2:
    # t0: max(-1.5, -1.2) = -1.2 (clipped); t1: max(.5, .8) = .8 (clipped); t2: -2; t3: 2
    # token-mean = (-1.2 + .8 - 2 + 2) / 4 = -.1; clipfrac = 2/4
    logp = np.log([1.5, 0.5, 1.0, 1.0])
    loss, stats = ref.ppo_policy_loss(logp, np.zeros(4), [1.0, -1.0, 2.0, -2.0])
    close(loss, -0.1, rtol=1e-12)
    close(stats["clipfrac"], 0.5)
    close(stats["clipfrac_lower"], 0.0)
    close(stats["approx_kl"], -(math.log(1.5) + math.log(0.5)) / 4, rtol=1e-12)
    close(stats["ratio_mean"], 1.0, rtol=1e-12)
    close(stats["ratio_max"], 1.5, rtol=1e-12)


def test_ppo_policy_loss_asymmetric_and_dual_clip():
    # clip_high .5: ratio 1.5, A = 1 -> max(-1.5, -1.5) = -1.5, not clipped
    loss, stats = ref.ppo_policy_loss([math.log(1.5)], [0.0], [1.0], clip_high=0.5)
    close(loss, -1.5, rtol=1e-12)
    assert stats["clipfrac"] == 0.0
    # A = -2, ratio e^2: max(2 e^2, 2*1.2) = 14.78 > -A*c = 6 -> dual clip binds: 6
    # A = -2, ratio 2: max(4, 2.4) = 4 < 6 -> 4.  token-mean = 5, clipfrac_lower = 1/2
    loss, stats = ref.ppo_policy_loss([2.0, LN2], [0.0, 0.0], [-2.0, -2.0], dual_clip=3.0)
    close(loss, 5.0, rtol=1e-12)
    close(stats["clipfrac_lower"], 0.5)
    close(stats["clipfrac"], 0.0)
    with pytest.raises(ValueError, match="dual_clip"):
        ref.ppo_policy_loss([0.0], [0.0], [1.0], dual_clip=0.5)


def test_ppo_policy_loss_aggregations_by_hand():
    # ratio 1 -> l = -A. Unmasked: row0 {-1, -2}, row1 {-4}
    A = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = np.array([[1, 1, 0], [1, 0, 0]])
    z = np.zeros((2, 3))
    cases = {
        "token-mean": -7 / 3,  # (-1 - 2 - 4) / 3
        "seq-mean-token-sum": -3.5,  # (-3 + -4) / 2
        "seq-mean-token-mean": -2.75,  # (-1.5 + -4) / 2
        "seq-mean-token-sum-norm": -7 / 6,  # -7 / (2 * 3)
    }
    for agg, expected in cases.items():
        close(ref.ppo_policy_loss(z, z, A, m, agg=agg)[0], expected, rtol=1e-12)
    close(ref.ppo_policy_loss(z, z, A, m, agg="seq-mean-token-sum-norm", norm_length=7)[0], -0.5)
    # a fully masked row is left out of seq-mean-token-mean and counts 0 in seq-mean-token-sum
    m2 = np.array([[1, 1, 0], [0, 0, 0]])
    close(ref.ppo_policy_loss(z, z, A, m2, agg="seq-mean-token-mean")[0], -1.5)
    close(ref.ppo_policy_loss(z, z, A, m2, agg="seq-mean-token-sum")[0], -1.5)


def test_ppo_all_masked_is_zero_not_nan():
    nan = np.full((2, 3), np.nan)  # masked positions are never read
    for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        loss, stats = ref.ppo_policy_loss(nan, nan, nan, np.zeros((2, 3)), agg=agg)
        assert loss == 0.0
        assert all(val == 0.0 for val in stats.values()), stats
    loss, stats = ref.ppo_policy_loss(
        np.zeros((0, 4)), np.zeros((0, 4)), np.zeros((0, 4)), agg="seq-mean-token-mean"
    )
    assert loss == 0.0 and stats["ratio_max"] == 0.0


def _torch_ppo(logp, old, A, m, clip_low, clip_high, dual_clip, agg):
    """verl-style compute_policy_loss + agg_loss, in torch float64."""
    neg_kl = torch.clamp(logp - old, -20.0, 20.0)
    ratio = torch.exp(neg_kl)
    l1 = -A * ratio
    l2 = -A * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip1 = torch.maximum(l1, l2)
    clipfrac = ((l2 > l1).double() * m).sum() / m.sum()
    l3 = -A * dual_clip
    clip2 = torch.min(l3, clip1)
    lower = ((clip1 > l3) & (A < 0)).double()
    loss = torch.where(A < 0, clip2, clip1)
    if agg == "token-mean":
        out = (loss * m).sum() / m.sum()
    elif agg == "seq-mean-token-sum":
        out = (loss * m).sum(-1).mean()
    elif agg == "seq-mean-token-mean":
        out = ((loss * m).sum(-1) / m.sum(-1)).mean()  # every row has a token in this test
    else:
        out = (loss * m).sum() / (m.shape[0] * m.shape[1])
    stats = {
        "clipfrac": clipfrac,
        "clipfrac_lower": (lower * m).sum() / m.sum(),
        "approx_kl": ((old - logp) * m).sum() / m.sum(),
        "ratio_mean": (ratio * m).sum() / m.sum(),
        "ratio_max": ratio[m.bool()].max(),
    }
    return out, stats


@pytest.mark.parametrize(
    "agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
def test_ppo_policy_loss_vs_torch(agg):
    g = torch.Generator().manual_seed(10)
    B, T = 6, 17
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64)
    A = torch.randn(B, T, generator=g, dtype=torch.float64)
    m = (torch.rand(B, T, generator=g) < 0.7).double()
    m[:, 0] = 1.0
    expected, exp_stats = _torch_ppo(logp, old, A, m, 0.2, 0.28, 3.0, agg)
    loss, stats = ref.ppo_policy_loss(logp, old, A, m, clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg=agg)
    close(loss, expected.item(), rtol=1e-12)
    for k, val in exp_stats.items():
        close(stats[k], val.item(), rtol=1e-12, atol=1e-15, err_msg=k)
    assert exp_stats["clipfrac"] > 0 and exp_stats["clipfrac_lower"] > 0  # the data exercises both


def test_value_loss_by_hand():
    # v = [1, 3, 2], old = 0, R = [0, 0, 3], clip .5 -> clamped v = [.5, .5, .5]
    # (v-R)^2 = [1, 9, 1]; (clamped-R)^2 = [.25, .25, 6.25]; 0.5*max = [.5, 4.5, 3.125]
    loss, stats = ref.value_loss([1.0, 3.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0], clip=0.5)
    close(loss, 8.125 / 3, rtol=1e-12)
    close(stats["vf_clipfrac"], 1 / 3, rtol=1e-12)
    loss, stats = ref.value_loss([1.0, 3.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0], [1, 0, 1])
    close(loss, (0.5 + 0.5) / 2, rtol=1e-12)  # no clip: 0.5 (v - R)^2 over t = 0, 2
    assert stats["vf_clipfrac"] == 0.0
    loss, stats = ref.value_loss(
        np.ones((2, 2)),
        np.ones((2, 2)),
        np.zeros((2, 2)),
        np.zeros((2, 2)),
        clip=0.1,
        agg="seq-mean-token-mean",
    )
    assert loss == 0.0 and stats["vf_clipfrac"] == 0.0


def test_value_loss_vs_torch():
    g = torch.Generator().manual_seed(11)
    v, old, R = (torch.randn(4, 9, generator=g, dtype=torch.float64) for _ in range(3))
    m = (torch.rand(4, 9, generator=g) < 0.7).double()
    clip = 0.3
    vc = old + torch.clamp(v - old, -clip, clip)  # verl's clipped value
    l1, l2 = (v - R) ** 2, (vc - R) ** 2
    expected = 0.5 * (torch.max(l1, l2) * m).sum() / m.sum()
    loss, stats = ref.value_loss(v, old, R, m, clip=clip)
    close(loss, expected.item(), rtol=1e-12)
    close(stats["vf_clipfrac"], (((l2 > l1).double() * m).sum() / m.sum()).item(), rtol=1e-12)


def test_kl_penalty_by_hand():
    logp, ref_logp = np.array([0.0, LN2]), np.array([LN2, 0.0])
    close(ref.kl_penalty(logp, ref_logp, "k1"), [-LN2, LN2])
    close(ref.kl_penalty(logp, ref_logp, "abs"), [LN2, LN2])
    close(ref.kl_penalty(logp, ref_logp, "k2"), [0.5 * LN2**2] * 2)
    # k3, d = ref - logp = [ln 2, -ln 2]: e^d - d - 1 = [1 - ln 2, ln 2 - .5]
    close(ref.kl_penalty(logp, ref_logp, "k3"), [1 - LN2, LN2 - 0.5], rtol=1e-12)
    # clamps: d = 30 -> 20 -> e^20 - 21 -> 10; d = -30 -> -20 -> e^-20 + 19 -> 10; d = 2 -> e^2 - 3
    close(ref.kl_penalty([0.0, 0.0, 0.0], [30.0, -30.0, 2.0], "k3"), [10.0, 10.0, math.exp(2) - 3])
    with pytest.raises(ValueError, match="kind"):
        ref.kl_penalty([0.0], [0.0], "k4")


def test_kl_penalty_vs_torch():
    g = torch.Generator().manual_seed(12)
    logp, rlp = (torch.randn(5, 8, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    kl = logp - rlp
    expected = {
        "k1": kl,
        "abs": kl.abs(),
        "k2": 0.5 * kl.square(),
        "k3": torch.clamp(torch.exp(-kl) + kl - 1, -10, 10),
    }
    for kind, val in expected.items():
        close(ref.kl_penalty(logp, rlp, kind), val.numpy(), rtol=1e-12, atol=1e-15, err_msg=kind)


# ============================================================================================
# q_targets, td_loss
# ============================================================================================


def test_q_targets_by_hand():
    r, q = [1.0, 2.0], [[1.0, 3.0], [5.0, 4.0]]
    term = [False, True]  # row 1 terminal: y = r = 2
    close(ref.q_targets(r, q, terminated=term, gamma=0.5), [1 + 0.5 * 3, 2.0])
    close(ref.q_targets(r, q, gamma=0.5), [2.5, 4.5])
    # double: online argmax = [0, 1] -> Q' = [1, 4]
    close(ref.q_targets(r, q, gamma=0.5, kind="double", next_q_online=[[5.0, 0.0], [0.0, 5.0]]), [1.5, 4.0])
    # expected: [.5*1 + .5*3, 1*5] = [2, 5]
    close(ref.q_targets(r, q, gamma=0.5, kind="expected", next_probs=[[0.5, 0.5], [1.0, 0.0]]), [2.0, 4.5])
    # soft, temperature 2: 2 * log(e^.5 + e^1.5) for row 0
    close(
        ref.q_targets(r, q, gamma=0.5, kind="soft", temperature=2.0)[0],
        1 + 0.5 * 2 * math.log(math.exp(0.5) + math.exp(1.5)),
        rtol=1e-12,
    )
    # n = 3: gamma^3 = .125
    close(ref.q_targets(r, q, gamma=0.5, n=3), [1 + 0.375, 2 + 0.625])
    with pytest.raises(ValueError, match="next_q_online"):
        ref.q_targets(r, q, kind="double")
    with pytest.raises(ValueError, match="temperature"):
        ref.q_targets(r, q, kind="soft")


def test_q_targets_vs_torch():
    g = torch.Generator().manual_seed(13)
    B, A, gamma, tau = 16, 6, 0.97, 0.3
    r = torch.randn(B, generator=g, dtype=torch.float64)
    nq, online = (torch.randn(B, A, generator=g, dtype=torch.float64) for _ in range(2))
    probs = torch.softmax(torch.randn(B, A, generator=g, dtype=torch.float64), -1)
    term = torch.rand(B, generator=g) < 0.3
    nt = (~term).double()
    expected = {
        "max": r + gamma * nt * nq.max(-1).values,
        "double": r + gamma * nt * nq.gather(-1, online.argmax(-1, keepdim=True))[:, 0],
        "expected": r + gamma * nt * (probs * nq).sum(-1),
        "soft": r + gamma * nt * tau * torch.logsumexp(nq / tau, -1),
    }
    for kind, val in expected.items():
        got = ref.q_targets(
            r,
            nq,
            terminated=term,
            gamma=gamma,
            kind=kind,
            next_q_online=online,
            next_probs=probs,
            temperature=tau,
        )
        close(got, val.numpy(), rtol=1e-12, err_msg=kind)


def test_td_loss_by_hand():
    # Q(s,a) = [2, 3, 0], e = [.5, -3, .5]; huber(1) = [.125, 3 - .5, .125]; squared = [.25, 9, .25]
    q = [[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]
    a, y = [1, 0, 1], [2.5, 0.0, 0.5]
    loss, e = ref.td_loss(q, a, y)
    close(e, [0.5, -3.0, 0.5])
    close(loss, 2.75 / 3, rtol=1e-12)
    close(ref.td_loss(q, a, y, loss="squared", reduction="sum")[0], 9.5)
    close(ref.td_loss(q, a, y, weights=[1.0, 2.0, 0.0], reduction="sum")[0], 5.125)
    close(ref.td_loss(q, a, y, delta=2.0, reduction="none")[0], [0.125, 2 * (3 - 1), 0.125])
    with pytest.raises(ValueError, match="actions"):
        ref.td_loss(q, [0, 2, 0], y)


def test_td_loss_vs_torch():
    g = torch.Generator().manual_seed(14)
    B, A, delta = 32, 5, 0.7
    q = torch.randn(B, A, generator=g, dtype=torch.float64)
    actions = torch.randint(0, A, (B,), generator=g)
    y = torch.randn(B, generator=g, dtype=torch.float64) * 2
    w = torch.rand(B, generator=g, dtype=torch.float64)
    qa = q.gather(1, actions[:, None])[:, 0]
    per = torch.nn.functional.huber_loss(qa, y, reduction="none", delta=delta) * w
    loss, e = ref.td_loss(q, actions, y, delta=delta, weights=w)
    close(loss, per.mean().item(), rtol=1e-12)
    close(e, (y - qa).numpy(), rtol=1e-12)
    sq = torch.nn.functional.mse_loss(qa, y, reduction="sum")
    close(ref.td_loss(q, actions, y, loss="squared", reduction="sum")[0], sq.item(), rtol=1e-12)


# ============================================================================================
# bellman_backup, value_iteration
# ============================================================================================


def _two_state_mdp():
    # s0: a0 -> s1 (r 0), a1 -> s0 (r .5); s1: a0 -> s1 (r 1), a1 -> s0 (r 0)
    P = np.zeros((2, 2, 2))
    P[0, 0, 1] = P[0, 1, 0] = P[1, 0, 1] = P[1, 1, 0] = 1.0
    R = np.array([[0.0, 0.5], [1.0, 0.0]])
    return P, R


def test_bellman_backup_by_hand():
    P, R = _two_state_mdp()
    # V = [1, 2], gamma .9: Q = [[.9*2, .5 + .9*1], [1 + .9*2, .9*1]] = [[1.8, 1.4], [2.8, .9]]
    Q, V_new, pol = ref.bellman_backup(P[None], R[None], np.array([[1.0, 2.0]]), 0.9)
    close(Q, [[[1.8, 1.4], [2.8, 0.9]]], rtol=1e-12)
    close(V_new, [[1.8, 2.8]], rtol=1e-12)
    np.testing.assert_array_equal(pol, [[0, 0]])
    assert pol.dtype == np.int64


def test_value_iteration_by_hand():
    P, R = _two_state_mdp()
    # optimal: stay in s1 forever, V(s1) = 1/(1 - .9) = 10; s0 goes there: V(s0) = .9*10 = 9
    # (staying in s0 is worth only .5/(1 - .9) = 5). Q = [[9, .5 + 8.1], [10, 8.1]]
    V, Q, pol, iters, res = ref.value_iteration(P[None], R[None], 0.9, tol=1e-10, max_iters=10_000)
    close(V, [[9.0, 10.0]], rtol=1e-8)
    close(Q, [[[9.0, 8.6], [10.0, 8.1]]], rtol=1e-8)
    np.testing.assert_array_equal(pol, [[0, 0]])
    assert isinstance(iters, int) and 1 < iters < 10_000
    assert res.shape == (1,) and res[0] < 1e-10
    # max_iters caps the loop; the residual then is the last change, still above tol
    _, _, _, iters, res = ref.value_iteration(P[None], R[None], 0.9, tol=1e-10, max_iters=3)
    assert iters == 3 and res[0] > 1e-10


def test_value_iteration_batch_vs_policy_evaluation():
    rng = _rng(15)
    B, S, A, gamma = 3, 6, 4, 0.8
    P = rng.random((B, S, A, S)) ** 3
    P /= P.sum(-1, keepdims=True)
    R = rng.standard_normal((B, S, A))
    V, Q, pol, _iters, res = ref.value_iteration(P, R, gamma, tol=1e-12)
    assert np.all(res < 1e-12)
    for b in range(B):
        # the greedy policy's value, solved exactly, equals V: (I - gamma P_pi) V = R_pi
        P_pi = P[b, np.arange(S), pol[b]]
        R_pi = R[b, np.arange(S), pol[b]]
        close(np.linalg.solve(np.eye(S) - gamma * P_pi, R_pi), V[b], rtol=1e-9, atol=1e-9)
        close(Q[b], R[b] + gamma * np.einsum("sat,t->sa", P[b], V[b]), rtol=1e-9, atol=1e-9)
    # unbatched input works too and V0 is used as the start
    V1, _, _, it1, _ = ref.value_iteration(P[0], R[0], gamma, tol=1e-12, V0=V[0])
    close(V1, V[0], rtol=1e-9)
    assert it1 <= 2
