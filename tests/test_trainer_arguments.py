"""Arguments as trainers pass them: replay-buffer columns [B, 1] (CleanRL, SB3) in q_targets and td_loss, and
gamma/lam as 0-d tensors (TorchRL) in every op that takes them (docs/design.md §3, §4.5)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import rlkernels
from rlkernels import bellman as _bellman
from rlkernels import reference
from rlkernels import returns as _returns

F32, F64 = torch.float32, torch.float64


def _batch(B=37, A=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, A, generator=g, dtype=F64)
    next_q = torch.randn(B, A, generator=g, dtype=F64)
    actions = torch.randint(0, A, (B,), generator=g)
    rewards = torch.randn(B, generator=g, dtype=F64)
    dones = (torch.rand(B, generator=g) < 0.3).to(F64)
    return q, next_q, actions, rewards, dones


# ----------------------------------------------------------------------------------------------------
# [B, 1] columns
# ----------------------------------------------------------------------------------------------------


def test_q_targets_takes_replay_buffer_columns():
    _, next_q, _, rewards, dones = _batch()
    exp = reference.q_targets(rewards.numpy(), next_q.numpy(), terminated=dones.numpy(), gamma=0.9)
    for r, d in ((rewards[:, None], dones[:, None]), (rewards[:, None], dones), (rewards, dones[:, None])):
        y = rlkernels.q_targets(r, next_q, terminated=d, gamma=0.9)
        assert y.shape == r.shape  # SB3 adds the [B, 1] targets to [B, 1] columns
        assert_close(y.reshape(-1), torch.from_numpy(exp), F64)
    y = rlkernels.q_targets(rewards[:, None], next_q, terminated=dones[:, None], gamma=0.9, backend="reference")
    assert y.shape == (37, 1)
    assert_close(y.reshape(-1), torch.from_numpy(exp), F64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_td_loss_takes_replay_buffer_columns(reduction):
    q, _, actions, targets, weights = _batch(seed=1)
    weights = weights + 0.5
    exp_loss, exp_err = reference.td_loss(q.numpy(), actions.numpy(), targets.numpy(), loss="huber", delta=1.0,
                                          weights=weights.numpy(), reduction=reduction)
    for a, y, w in ((actions[:, None], targets, weights), (actions[:, None], targets[:, None], weights[:, None]),
                    (actions, targets[:, None], weights)):
        qq = q.clone().requires_grad_(True)
        loss, err = rlkernels.td_loss(qq, a, y, weights=w, reduction=reduction)
        assert err.shape == y.shape  # td_errors shaped like the targets, as the trainer stores them
        assert_close(err.reshape(-1), torch.from_numpy(exp_err), F64)
        assert_close(loss.reshape(-1), torch.as_tensor(exp_loss).reshape(-1), F32)
        (grad,) = torch.autograd.grad(loss.sum(), qq)
        assert (grad != 0).sum(-1).le(1).all() and grad.abs().sum() > 0


def test_cleanrl_dqn_update_as_written():
    # CleanRL dqn.py: actions, rewards and dones are [B, 1]; td_target = rewards.flatten() + ... is [B]
    q, next_q, actions, rewards, dones = _batch(B=128, A=2, seed=2)
    td_target = rlkernels.q_targets(rewards[:, None], next_q, terminated=dones[:, None], gamma=0.99).flatten()
    loss, _ = rlkernels.td_loss(q, actions[:, None], td_target, loss="squared")
    old_val = q.gather(1, actions[:, None]).squeeze()
    exp = torch.nn.functional.mse_loss(td_target, old_val)
    assert_close(loss, exp, F64)


def test_wrong_shapes_name_the_wrong_argument():
    q, next_q, actions, rewards, dones = _batch(B=8, A=3)
    cases = [
        ("actions", lambda: rlkernels.td_loss(q, actions[:4], rewards)),
        ("actions", lambda: rlkernels.td_loss(q, actions[:, None].expand(8, 2), rewards)),
        ("targets", lambda: rlkernels.td_loss(q, actions[:, None], rewards[:5])),
        ("targets", lambda: rlkernels.td_loss(q, actions, rewards[:, None].expand(8, 3))),
        ("weights", lambda: rlkernels.td_loss(q, actions, rewards, weights=rewards[:6])),
        ("rewards", lambda: rlkernels.q_targets(rewards[:, None].expand(8, 2), next_q)),
        ("rewards", lambda: rlkernels.q_targets(rewards[:7], next_q)),
        ("terminated", lambda: rlkernels.q_targets(rewards, next_q, terminated=dones[:3])),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=rf"rlkernels\.\w+: {name} must hold one entry per transition"):
            call()


# ----------------------------------------------------------------------------------------------------
# gamma and lam as tensors
# ----------------------------------------------------------------------------------------------------


def _scan_inputs(shape=(23, 4), seed=3, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    r, v, nv = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
    term = torch.rand(shape, generator=g) < 0.1
    trunc = (torch.rand(shape, generator=g) < 0.1) & ~term
    boot = torch.randn(shape[1:], generator=g, dtype=dtype)
    return r, v, nv, term, trunc, boot


def test_cpu_tensor_scalars_equal_floats():
    r, v, nv, term, _, boot = _scan_inputs()
    P = torch.rand(2, 3, 2, 3, dtype=F64).softmax(-1)
    R, V = torch.randn(2, 3, 2, dtype=F64), torch.randn(2, 3, dtype=F64)
    _, next_q, _, rewards, dones = _batch()
    t = torch.tensor
    calls = [
        lambda g, l: rlkernels.gae(r, v, gamma=g, lam=l, terminated=term, bootstrap_value=boot),
        lambda g, l: rlkernels.discounted_returns(r, gamma=g, terminated=term),
        lambda g, l: rlkernels.vtrace(r, v, nv, gamma=g, lam=l),
        lambda g, l: rlkernels.retrace(r, v, nv, nv * 0.1, gamma=g, lam=l),
        lambda g, l: rlkernels.n_step_returns(r, v, n=3, gamma=g),
        lambda g, l: rlkernels.q_targets(rewards, next_q, terminated=dones, gamma=g),
        lambda g, l: rlkernels.bellman_backup(P, R, V, g),
        lambda g, l: rlkernels.value_iteration(P, R, g, max_iters=5)[0],
    ]
    for i, call in enumerate(calls):
        exp = call(0.9, 0.8)
        for g, l in ((t(0.9, dtype=F64), t(0.8, dtype=F64)), (t([0.9]), t(0.8, dtype=torch.float32))):
            got = call(g, l)
            for o, e in zip(got if isinstance(got, tuple) else (got,), exp if isinstance(exp, tuple) else (exp,)):
                assert_close(o, e, F32, name=f"call {i}")


def test_bad_tensor_scalars_name_the_argument():
    r, v, *_ = _scan_inputs()
    with pytest.raises(ValueError, match="gamma must be a number or a one-element tensor"):
        rlkernels.gae(r, v, gamma=torch.full((2,), 0.9))
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
        rlkernels.gae(r, v, lam=torch.tensor(1.5))
    with pytest.raises(TypeError, match="gamma must be a real number or a real tensor"):
        rlkernels.gae(r, v, gamma=torch.tensor(True))


def _flag_kwargs(shape, time_dim, flags, term, trunc, nv):
    """time_dim and the flags of one case: "none", "terminated", or "truncated" (with next_values); a random
    bootstrap value per sequence where next_values are not given."""
    kw = {"time_dim": time_dim}
    if flags != "none":
        kw["terminated"] = term
    if flags == "truncated":
        kw.update(truncated=trunc, next_values=nv)
    else:
        seq_shape = tuple(s for i, s in enumerate(shape) if i != time_dim % len(shape))
        kw["bootstrap_value"] = torch.randn(seq_shape, dtype=F64)
    return kw


@pytest.fixture
def as_if_on_gpu(monkeypatch):
    """Routes CPU tensor scalars through the path of GPU tensor scalars (composed on the device, never read)."""
    def on_device(*scalars):
        return any(isinstance(x, torch.Tensor) for x in scalars)

    monkeypatch.setattr(_returns, "_on_device", on_device)
    monkeypatch.setattr(_bellman, "_on_device", on_device)


@pytest.mark.parametrize("flags", ["none", "terminated", "truncated"])
@pytest.mark.parametrize("shape,time_dim", [((23, 4), 0), ((3, 31), -1), ((17,), 0), ((0, 3), 0)])
def test_device_gamma_gae_and_returns_match_the_reference(as_if_on_gpu, flags, shape, time_dim):
    r, v, nv, term, trunc, _ = _scan_inputs(shape)
    kw = _flag_kwargs(shape, time_dim, flags, term, trunc, nv)
    gamma, lam = torch.tensor(0.93, dtype=F64), torch.tensor(0.85, dtype=F64)
    ref_kw = {k: (x.numpy() if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
    exp_adv, exp_ret = reference.gae(r.numpy(), v.numpy(), gamma=0.93, lam=0.85, **ref_kw)
    rr, vv = r.clone().requires_grad_(True), v.clone().requires_grad_(True)
    adv, ret = rlkernels.gae(rr, vv, gamma=gamma, lam=lam, **kw)
    assert_close(adv, torch.from_numpy(exp_adv), F64, name="advantages")
    assert_close(ret, torch.from_numpy(exp_ret), F64, name="returns")
    exp_g = reference.discounted_returns(r.numpy(), gamma=0.93, **ref_kw)
    assert_close(rlkernels.discounted_returns(r, gamma=gamma, **kw), torch.from_numpy(exp_g), F64, name="G")
    if r.numel():  # gradients equal those of the fused op with float gamma and lam
        w = torch.randn(shape, dtype=F64)
        got = torch.autograd.grad((adv * w).sum(), (rr, vv))
        rr2, vv2 = r.clone().requires_grad_(True), v.clone().requires_grad_(True)
        a2, _ = rlkernels.gae(rr2, vv2, gamma=0.93, lam=0.85, **kw)
        exp = torch.autograd.grad((a2 * w).sum(), (rr2, vv2))
        for o, e in zip(got, exp):
            assert_close(o, e, F64)


@pytest.mark.parametrize("flags", ["none", "terminated", "truncated"])
@pytest.mark.parametrize("shape,time_dim", [((23, 4), 0), ((3, 31), -1), ((17,), 0), ((0, 3), 0)])
@pytest.mark.parametrize("tensor_clips", [False, True])
def test_device_gamma_vtrace_matches_the_reference(as_if_on_gpu, flags, shape, time_dim, tensor_clips):
    r, v, nv, term, trunc, _ = _scan_inputs(shape, seed=5)
    log_rhos = 0.8 * torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    if r.numel():
        log_rhos.view(-1)[::5] = 0.0  # on-policy steps: e^0 equals clip 1, no log_rho gradient there
    kw = _flag_kwargs(shape, time_dim, flags, term, trunc, nv)
    clips = {"rho_clip": 1.0, "c_clip": 0.9, "pg_rho_clip": 1.3}
    t_clips = {k: torch.tensor(c, dtype=F64) for k, c in clips.items()} if tensor_clips else clips
    ref_kw = {k: (x.numpy() if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
    exp = reference.vtrace(r.numpy(), v.numpy(), log_rhos.numpy(), gamma=0.93, lam=0.85, **clips, **ref_kw)
    leaves = [x.clone().requires_grad_(True) for x in (r, v, log_rhos)]
    got = rlkernels.vtrace(*leaves, gamma=torch.tensor(0.93, dtype=F64), lam=torch.tensor(0.85, dtype=F64),
                           **t_clips, **kw)
    for name, o, e in zip(("vs", "pg_advantages"), got, exp):
        assert_close(o, torch.from_numpy(e), F64, name=name)
    if r.numel():  # gradients equal those of the fused op with float scalars
        w = [torch.randn(shape, dtype=F64) for _ in got]
        grads = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(got, w)), leaves)
        leaves2 = [x.clone().requires_grad_(True) for x in (r, v, log_rhos)]
        fused = rlkernels.vtrace(*leaves2, gamma=0.93, lam=0.85, **clips, **kw)
        exp_grads = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(fused, w)), leaves2)
        for name, a, b in zip(("rewards", "values", "log_rhos"), grads, exp_grads):
            assert_close(a, b, F64, name=f"d {name}")


def test_device_gamma_16bit_inputs_give_float32(as_if_on_gpu):
    r, v, *_ = _scan_inputs(dtype=torch.bfloat16)
    adv, ret = rlkernels.gae(r, v, gamma=torch.tensor(0.9), lam=torch.tensor(0.9))
    assert adv.dtype == ret.dtype == F32
    assert_close(adv, rlkernels.gae(r, v, gamma=0.9, lam=0.9)[0], F32)


@pytest.mark.parametrize("kind", ["max", "double", "expected", "soft"])
def test_device_gamma_q_targets(as_if_on_gpu, kind):
    _, next_q, _, rewards, dones = _batch(seed=4)
    next_q[dones.bool(), 0] = float("inf")  # terminal rows are not read
    extra = {"double": {"next_q_online": next_q.flip(-1)}, "expected": {"next_probs": next_q.softmax(-1)},
             "soft": {"temperature": 0.5}}.get(kind, {})
    got = rlkernels.q_targets(rewards[:, None], next_q, terminated=dones, gamma=torch.tensor(0.9, dtype=F64), n=3,
                              kind=kind, **extra)
    exp = rlkernels.q_targets(rewards[:, None], next_q, terminated=dones, gamma=0.9, n=3, kind=kind, **extra)
    assert got.shape == (37, 1)
    assert_close(got, exp, F64)


def test_device_gamma_is_refused_where_it_would_be_read(as_if_on_gpu):
    r, v, *_ = _scan_inputs((3, 31))
    with pytest.raises(TypeError, match="without mask and cu_seqlens"):
        rlkernels.gae(r, v, gamma=torch.tensor(0.9), mask=r > 0, time_dim=-1)


def test_gpu_tensor_scalar_in_an_op_that_reads_it_is_a_clear_error():
    # No GPU needed: the check looks at the device only (a meta tensor stands in for a GPU tensor).
    r, v, nv, *_ = _scan_inputs()
    with pytest.raises(TypeError, match="gamma is a tensor on meta.*synchronize"):
        rlkernels.retrace(r, v, nv, nv, gamma=torch.tensor(0.9, device="meta"), lam=0.9)


@pytest.mark.cuda
def test_cuda_tensor_gamma_does_not_synchronize():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    r, v, nv, term, trunc, _ = (x.cuda() for x in _scan_inputs(dtype=F32))
    gamma, lam = torch.tensor(0.93, device="cuda"), torch.tensor(0.85, device="cuda")
    exp = rlkernels.gae(r, v, gamma=0.93, lam=0.85, terminated=term, truncated=trunc, next_values=nv)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = rlkernels.gae(r, v, gamma=gamma, lam=lam, terminated=term, truncated=trunc, next_values=nv)
        y = rlkernels.q_targets(r[0], torch.randn(4, 3, device="cuda"), gamma=gamma)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.shape == (4,)
    for o, e in zip(got, exp):
        assert_close(o, e, F32)
