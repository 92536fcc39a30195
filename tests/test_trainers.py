"""The KERNELS (cpu backend, not the reference) against the estimators of trainers people trust.

TorchRL (objectives.value.functional), Stable-Baselines3 (RolloutBuffer) and the CleanRL ppo.py loop
(transcribed). Each comparison maps the trainer's conventions onto ours (docs/design.md §4.2); where they differ,
the comment says how and only the overlap is tested. The trainers are installed in CI
(`pip install -e .[test]`); importorskip keeps this file clean where one is missing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close

import rlkernels
from rlkernels.bench.trainers import cleanrl_gae as _cleanrl_gae

F64 = torch.float64
# TorchRL forms its discount factors as `gamma * (~done).int()`, an int tensor times a Python float, which
# is float32 whatever the inputs' dtype: against it, float64 results agree to float32 precision only.
TORCHRL_TOL = {"dtype": torch.float32}
CONFIGS = [  # (gamma, lam, seed)
    (0.99, 0.95, 0),
    (0.9, 1.0, 1),
    (1.0, 0.5, 2),
    (0.5, 0.0, 3),
]


def _episodes(shape, p_term, p_trunc, seed, dtype=F64):
    """Random rollouts: rewards, values, next values, terminated, truncated (disjoint flags)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    v = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    nv = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    term = torch.rand(shape, generator=g) < p_term
    trunc = (torch.rand(shape, generator=g) < p_trunc) & ~term
    return r, v, nv, term, trunc


# ====================================================================================================
# TorchRL
# ====================================================================================================


@pytest.fixture(scope="module")
def torchrl_functional():
    pytest.importorskip("torchrl")
    from torchrl.objectives.value import functional

    return functional


@pytest.mark.parametrize("gamma,lam,seed", CONFIGS)
@pytest.mark.parametrize("vectorized", [False, True], ids=["loop", "vec"])
def test_gae_vs_torchrl(torchrl_functional, gamma, lam, seed, vectorized):
    # TorchRL: [*B, T, 1] tensors (time_dim=-2), next_state_value for every step, done = end of trajectory
    # (terminated or truncated), terminated = no bootstrap. Ours: the same with next_values, and
    # done = terminated | truncated. TorchRL's vectorized version drops geometric terms below 1e-7 (an
    # approximation at the 1e-7 level).
    B, T = 3, 61
    r, v, nv, term, trunc = _episodes((B, T, 1), 0.05, 0.05, seed)
    if vectorized and gamma * lam == 0:
        pytest.skip("TorchRL's vectorized estimators raise IndexError when gamma * lambda == 0")
    fn = (
        torchrl_functional.vec_generalized_advantage_estimate
        if vectorized
        else torchrl_functional.generalized_advantage_estimate
    )
    exp_adv, exp_ret = fn(gamma, lam, v, nv, r, term | trunc, term)
    adv, ret = rlkernels.gae(
        r,
        v,
        gamma=gamma,
        lam=lam,
        next_values=nv,
        terminated=term,
        truncated=trunc,
        time_dim=-2,
        backend="cpu",
    )
    assert_close(adv, exp_adv, **TORCHRL_TOL)
    assert_close(ret, exp_ret, **TORCHRL_TOL)


def test_gae_vs_torchrl_float32_leading_dims(torchrl_functional):
    # [B1, B2, T, 1] in float32: the kernel accumulates in float32 like TorchRL's loop
    r, v, nv, term, trunc = _episodes((2, 3, 129, 1), 0.03, 0.03, 7, dtype=torch.float32)
    exp_adv, exp_ret = torchrl_functional.generalized_advantage_estimate(
        0.99, 0.95, v, nv, r, term | trunc, term
    )
    adv, ret = rlkernels.gae(
        r,
        v,
        gamma=0.99,
        lam=0.95,
        next_values=nv,
        terminated=term,
        truncated=trunc,
        time_dim=-2,
        backend="cpu",
    )
    assert adv.dtype == torch.float32
    assert_close(adv, exp_adv, torch.float32)
    assert_close(ret, exp_ret, torch.float32)


@pytest.mark.parametrize("gamma,lam,seed", CONFIGS)
@pytest.mark.parametrize("vectorized", [False, True], ids=["loop", "vec"])
def test_td_lambda_return_vs_torchrl(torchrl_functional, gamma, lam, seed, vectorized):
    # TorchRL's TD(lambda) return: G_t = r_t + gamma ((1 - lam) V'_t + lam g), g = G_{t+1} or, where done_t
    # (and after the last step), V'_t; V' is zeroed where terminated. Our GAE returns A_t + V_t equal it
    # exactly when V'_t = V_{t+1} inside an episode (the returns telescope through V_{t+1}); so values are
    # built that way and next_values differ from them only where done or at the last step.
    B, T = 4, 53
    r, v, nv, term, trunc = _episodes((B, T, 1), 0.05, 0.05, seed)
    done = term | trunc
    nv = torch.where(done, nv, torch.cat([v[:, 1:], nv[:, -1:]], 1))
    if vectorized and gamma * lam == 0:
        pytest.skip("TorchRL's vectorized estimators raise IndexError when gamma * lambda == 0")
    fn = (
        torchrl_functional.vec_td_lambda_return_estimate
        if vectorized
        else torchrl_functional.td_lambda_return_estimate
    )
    expected = fn(gamma, lam, nv, r, done, term)
    _, ret = rlkernels.gae(
        r,
        v,
        gamma=gamma,
        lam=lam,
        next_values=nv,
        terminated=term,
        truncated=trunc,
        time_dim=-2,
        backend="cpu",
    )
    assert_close(ret, expected, **TORCHRL_TOL)
    # and without next_values: V' = values[t+1], bootstrap after the last step, only terminations
    boot = torch.randn(B, 1, dtype=F64)
    nv2 = torch.cat([v[:, 1:], boot[:, None]], 1)
    expected = fn(gamma, lam, nv2, r, term, term)
    _, ret = rlkernels.gae(
        r, v, gamma=gamma, lam=lam, terminated=term, bootstrap_value=boot, time_dim=-2, backend="cpu"
    )
    assert_close(ret, expected, **TORCHRL_TOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rho_clip,c_clip", [(1.0, 1.0), (2.0, 0.5), (0.8, 1.5)])
def test_vtrace_vs_torchrl(torchrl_functional, seed, rho_clip, c_clip):
    # TorchRL vtrace_advantage_estimate(gamma, log_pi, log_mu, V, V', r, done, terminated, rho_thresh,
    # c_thresh) returns (pg advantages, vs) with rho = exp(log_pi - log_mu): so log_pi is the *target*
    # policy in its code (its docstring names them the other way round) and log_rhos = log_pi - log_mu.
    # Overlap with ours: TorchRL has no lambda (lam = 1) and clips the pg weight with rho_thresh
    # (pg_rho_clip = rho_clip); the trace is cut at done and delta's bootstrap at terminated, and at a done
    # step the pg target is V'_t, as in docs/design.md §4.2. (TorchRL releases before that fix used vs_{t+1} from
    # the next episode there; this installed version has it.)
    B, T, gamma = 3, 47, 0.97
    r, v, nv, term, trunc = _episodes((B, T, 1), 0.05, 0.05, seed)
    g = torch.Generator().manual_seed(100 + seed)
    log_mu = torch.randn(B, T, 1, generator=g, dtype=F64)
    log_pi = log_mu + 0.6 * torch.randn(B, T, 1, generator=g, dtype=F64)
    exp_pg, exp_vs = torchrl_functional.vtrace_advantage_estimate(
        gamma, log_pi, log_mu, v, nv, r, term | trunc, term, rho_thresh=rho_clip, c_thresh=c_clip
    )
    vs, pg = rlkernels.vtrace(
        r,
        v,
        log_pi - log_mu,
        gamma=gamma,
        lam=1.0,
        rho_clip=rho_clip,
        c_clip=c_clip,
        pg_rho_clip=rho_clip,
        next_values=nv,
        terminated=term,
        truncated=trunc,
        time_dim=-2,
        backend="cpu",
    )
    assert_close(vs, exp_vs, **TORCHRL_TOL)
    assert_close(pg, exp_pg, **TORCHRL_TOL)


@pytest.mark.parametrize("gamma", [0.99, 0.9, 0.5])
def test_discounted_returns_vs_torchrl_reward2go(torchrl_functional, gamma):
    # reward2go: the discounted sum of rewards up to the end of each trajectory (done), no bootstrap.
    # It drops geometric terms below 1e-7 (an approximation at the 1e-7 level, inside float32 tolerance).
    B, T = 3, 200
    g = torch.Generator().manual_seed(5)
    r = torch.randn(B, T, 1, generator=g, dtype=F64)
    done = torch.rand(B, T, 1, generator=g) < 0.03
    expected = torchrl_functional.reward2go(r, done, gamma, time_dim=-2)
    G = rlkernels.discounted_returns(r, gamma=gamma, terminated=done, time_dim=-2, backend="cpu")
    assert_close(G, expected, **TORCHRL_TOL)


# ====================================================================================================
# Stable-Baselines3
# ====================================================================================================


@pytest.mark.parametrize("gamma,lam,seed", CONFIGS)
def test_gae_vs_stable_baselines3(gamma, lam, seed):
    # SB3 RolloutBuffer: [T, n_envs] float32 arrays; episode_starts[t] = obs t begins an episode (so step
    # t-1 ended one: terminated[t-1]); after the last step it bootstraps from last_values unless `dones`.
    # SB3 treats every end as a termination (time limits are folded into the reward by the caller).
    pytest.importorskip("stable_baselines3")
    spaces = pytest.importorskip("gymnasium.spaces")
    from stable_baselines3.common.buffers import RolloutBuffer

    T, n_envs = 64, 5
    rng = np.random.default_rng(seed)
    buf = RolloutBuffer(
        T,
        spaces.Box(-1, 1, (3,)),
        spaces.Box(-1, 1, (1,)),
        device="cpu",
        gae_lambda=lam,
        gamma=gamma,
        n_envs=n_envs,
    )
    buf.rewards[:] = rng.standard_normal((T, n_envs)).astype(np.float32)
    buf.values[:] = rng.standard_normal((T, n_envs)).astype(np.float32)
    buf.episode_starts[:] = (rng.random((T, n_envs)) < 0.08).astype(np.float32)
    last_values = torch.as_tensor(rng.standard_normal(n_envs).astype(np.float32))
    dones = rng.random(n_envs) < 0.5
    rewards, values = torch.from_numpy(buf.rewards.copy()), torch.from_numpy(buf.values.copy())
    buf.compute_returns_and_advantage(last_values=last_values.clone(), dones=dones)

    terminated = torch.zeros(T, n_envs, dtype=torch.bool)
    terminated[:-1] = torch.from_numpy(buf.episode_starts[1:] > 0)
    terminated[-1] = torch.from_numpy(dones)
    adv, ret = rlkernels.gae(
        rewards,
        values,
        gamma=gamma,
        lam=lam,
        terminated=terminated,
        bootstrap_value=last_values,
        backend="cpu",
    )
    assert adv.dtype == torch.float32
    assert_close(adv, buf.advantages, torch.float32)
    assert_close(ret, buf.returns, torch.float32)


# ====================================================================================================
# CleanRL ppo.py
# ====================================================================================================


@pytest.mark.parametrize("gamma,lam,seed", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_gae_vs_cleanrl(gamma, lam, seed, dtype):
    # CleanRL: dones[t] = obs t starts a new episode (like SB3's episode_starts); next_value / next_done for
    # the observation after the rollout. Flags as float 0/1 tensors, exactly as CleanRL stores them.
    T, N = 128, 4
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, N, generator=g, dtype=F64).to(dtype)
    values = torch.randn(T, N, generator=g, dtype=F64).to(dtype)
    dones = (torch.rand(T, N, generator=g) < 0.05).to(dtype)
    next_value = torch.randn(1, N, generator=g, dtype=F64).to(dtype)
    next_done = (torch.rand(N, generator=g) < 0.5).to(dtype)
    exp_adv, exp_ret = _cleanrl_gae(rewards, values, dones, next_value, next_done, gamma, lam)

    terminated = torch.cat([dones[1:], next_done[None]])  # float 0/1 flags are accepted
    adv, ret = rlkernels.gae(
        rewards,
        values,
        gamma=gamma,
        lam=lam,
        terminated=terminated,
        bootstrap_value=next_value.reshape(N),
        backend="cpu",
    )
    assert_close(adv, exp_adv, dtype)
    assert_close(ret, exp_ret, dtype)


def test_cleanrl_gae_gradients_match_autograd_through_the_loop():
    # Autograd through CleanRL's loop is the gradient a trainer would otherwise get: ours must equal it.
    T, N, gamma, lam = 33, 3, 0.99, 0.95
    g = torch.Generator().manual_seed(9)
    rewards = torch.randn(T, N, generator=g, dtype=F64, requires_grad=True)
    values = torch.randn(T, N, generator=g, dtype=F64, requires_grad=True)
    next_value = torch.randn(1, N, generator=g, dtype=F64, requires_grad=True)
    dones = (torch.rand(T, N, generator=g) < 0.1).to(F64)
    next_done = torch.zeros(N, dtype=F64)
    w1, w2 = torch.randn(T, N, generator=g, dtype=F64), torch.randn(T, N, generator=g, dtype=F64)
    exp_adv, exp_ret = _cleanrl_gae(rewards, values, dones, next_value, next_done, gamma, lam)
    expected = torch.autograd.grad((exp_adv * w1 + exp_ret * w2).sum(), (rewards, values, next_value))
    terminated = torch.cat([dones[1:], next_done[None]])
    adv, ret = rlkernels.gae(
        rewards,
        values,
        gamma=gamma,
        lam=lam,
        terminated=terminated,
        bootstrap_value=next_value.reshape(N),
        backend="cpu",
    )
    got = torch.autograd.grad((adv * w1 + ret * w2).sum(), (rewards, values, next_value))
    for name, e, o in zip(("rewards", "values", "next_value"), expected, got):
        assert_close(o, e, F64, name=f"grad {name}")
