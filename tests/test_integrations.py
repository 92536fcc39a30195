"""rlkernels.integrations against the trainers' own functions, on the same inputs.

Real trainer functions: TorchRL (objectives.value.functional), Stable-Baselines3 (RolloutBuffer,
DictRolloutBuffer and a short PPO run; DQN trained side by side) and TRL (trl.trainer.utils.selective_log_softmax);
importorskip skips them where the trainer is missing (scripts/setup.sh installs all three). Transcribed formulas:
CleanRL's ppo.py GAE loop and dqn.py update (CleanRL is scripts, not a package) and verl 0.9.1's core_algos /
torch_functional (verl needs ray and its configs to import), each transcribed in rlkernels/bench/trainers.py
with the source named.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from conftest import assert_close

from rlkernels.bench.trainers import cleanrl_dqn_update as _cleanrl_dqn
from rlkernels.bench.trainers import cleanrl_gae as _cleanrl_gae
from rlkernels.bench.trainers import cleanrl_ppo_losses as _cleanrl_ppo_losses
from rlkernels.bench.trainers import sb3_dqn_targets as _sb3_dqn_targets
from rlkernels.bench.trainers import verl_compute_gae_advantage_return as _verl_gae
from rlkernels.bench.trainers import verl_compute_policy_loss as _verl_policy_loss
from rlkernels.bench.trainers import verl_compute_value_loss as _verl_value_loss
from rlkernels.bench.trainers import verl_entropy_from_logits as _verl_entropy_from_logits
from rlkernels.bench.trainers import verl_kl_penalty as _verl_kl_penalty
from rlkernels.bench.trainers import verl_logprobs_from_logits_v2 as _verl_logprobs_from_logits_v2

F32, F64 = torch.float32, torch.float64
CONFIGS = [(0.99, 0.95, 0), (0.9, 1.0, 1), (1.0, 0.5, 2), (0.5, 0.0, 3)]  # (gamma, lam, seed)


def _randn(shape, g, dtype=F64, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)


TRAINERS = ("torchrl", "stable_baselines3", "trl", "verl", "transformers", "gymnasium")


class _BlockTrainers:
    """A meta-path finder that fails any import of a trainer package."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in TRAINERS:
            raise ImportError(f"{name} imported while importing rlkernels.integrations")


def test_importing_integrations_imports_no_trainer():
    # In process (a subprocess would pay for a second torch import): the trainers are hidden from
    # sys.modules and blocked, the adapters are imported afresh, and everything is restored after.
    hidden = {k: sys.modules.pop(k) for k in list(sys.modules)
              if k.split(".")[0] in TRAINERS or k.startswith("rlkernels.integrations")}
    import rlkernels

    # The package attribute too: `from rlkernels import integrations` would return a module imported by an
    # earlier test (with its adapters already loaded) instead of importing afresh.
    old_attr = rlkernels.__dict__.pop("integrations", None)
    blocker = _BlockTrainers()
    sys.meta_path.insert(0, blocker)
    try:
        from rlkernels import integrations

        for name in ("torchrl", "cleanrl", "verl", "trl"):
            assert getattr(integrations, name).__name__ == f"rlkernels.integrations.{name}"
        with pytest.raises(ImportError, match="stable_baselines3"):
            integrations.sb3  # noqa: B018  (the one adapter that subclasses its trainer's class)
    finally:
        sys.meta_path.remove(blocker)
        for k in [k for k in sys.modules if k.startswith("rlkernels.integrations")]:
            del sys.modules[k]
        sys.modules.update(hidden)
        rlkernels.__dict__.pop("integrations", None)
        if old_attr is not None:
            rlkernels.integrations = old_attr


def test_unknown_attribute_of_integrations_is_an_attribute_error():
    from rlkernels import integrations

    with pytest.raises(AttributeError, match="nope"):
        integrations.nope  # noqa: B018


# ====================================================================================================
# TorchRL: the adapters against torchrl.objectives.value.functional
# ====================================================================================================


@pytest.fixture(scope="module")
def trl_fn():
    pytest.importorskip("torchrl")
    from torchrl.objectives.value import functional

    return functional


@pytest.fixture(scope="module")
def ours_torchrl():
    from rlkernels.integrations import torchrl

    return torchrl


def _torchrl_inputs(shape, seed, dtype=F64, p_done=0.08, p_term=0.5):
    """reward, state_value, next_state_value, done, terminated (terminated implies done, as in TorchRL)."""
    g = torch.Generator().manual_seed(seed)
    r, v, nv = _randn(shape, g, dtype), _randn(shape, g, dtype), _randn(shape, g, dtype)
    done = torch.rand(shape, generator=g) < p_done
    term = done & (torch.rand(shape, generator=g) < p_term)
    return r, v, nv, done, term


# TorchRL forms its discounts as gamma * (~done).int(), float32 whatever the inputs: float32 tolerance.
@pytest.mark.parametrize("gamma,lam,seed", CONFIGS)
@pytest.mark.parametrize("name", ["generalized_advantage_estimate", "vec_generalized_advantage_estimate"])
def test_torchrl_gae(trl_fn, ours_torchrl, name, gamma, lam, seed):
    if name.startswith("vec") and gamma * lam == 0:
        pytest.skip("TorchRL's vectorized GAE raises IndexError when gamma * lmbda == 0")
    r, v, nv, done, term = _torchrl_inputs((3, 57, 1), seed)
    exp = getattr(trl_fn, name)(gamma, lam, v, nv, r, done, term)
    got = getattr(ours_torchrl, name)(gamma, lam, v, nv, r, done, term)
    for o, e, n in zip(got, exp, ("advantage", "value_target")):
        assert_close(o, e, F32, name=n)
    # terminated defaults to done
    exp = getattr(trl_fn, name)(gamma, lam, v, nv, r, done)
    got = getattr(ours_torchrl, name)(gamma, lam, v, nv, r, done)
    assert_close(got[0], exp[0], F32, name="advantage (terminated=None)")


@pytest.mark.parametrize("time_dim,shape", [(0, (41, 3, 2)), (1, (2, 33, 3)), (-1, (4, 29))])
def test_torchrl_gae_time_dim_and_features(trl_fn, ours_torchrl, time_dim, shape):
    r, v, nv, done, term = _torchrl_inputs(shape, 11, dtype=F32)
    exp = trl_fn.generalized_advantage_estimate(0.97, 0.9, v, nv, r, done, term, time_dim=time_dim)
    got = ours_torchrl.generalized_advantage_estimate(0.97, 0.9, v, nv, r, done, term, time_dim=time_dim)
    assert got[0].dtype == F32
    assert_close(got[0], exp[0], F32, name="advantage")
    assert_close(got[1], exp[1], F32, name="value_target")


@pytest.mark.parametrize("gamma,lam,seed", CONFIGS)
@pytest.mark.parametrize("name", ["td_lambda_return_estimate", "vec_td_lambda_return_estimate"])
def test_torchrl_td_lambda(trl_fn, ours_torchrl, name, gamma, lam, seed):
    if name.startswith("vec") and gamma * lam == 0:
        pytest.skip("TorchRL's vectorized TD(lambda) raises IndexError when gamma * lmbda == 0")
    r, _, nv, done, term = _torchrl_inputs((4, 53, 1), seed)
    exp = getattr(trl_fn, name)(gamma, lam, nv, r, done, term)
    got = getattr(ours_torchrl, name)(gamma, lam, nv, r, done, term)
    assert_close(got, exp, F32, name="returns")


def test_torchrl_td_lambda_time_dim_and_gradients(trl_fn, ours_torchrl):
    # time first, two features; the gradient must equal autograd through TorchRL's loop
    r, _, nv, done, term = _torchrl_inputs((37, 3, 2), 5)
    r.requires_grad_(True)
    nv.requires_grad_(True)
    w = torch.randn(r.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    exp = trl_fn.td_lambda_return_estimate(0.95, 0.8, nv, r, done, term, time_dim=0)
    got = ours_torchrl.td_lambda_return_estimate(0.95, 0.8, nv, r, done, term, time_dim=0)
    assert_close(got, exp, F32)
    eg = torch.autograd.grad((exp * w).sum(), (r, nv))
    og = torch.autograd.grad((got * w).sum(), (r, nv))
    for o, e, n in zip(og, eg, ("reward", "next_state_value")):
        assert_close(o, e, F32, name=f"grad {n}")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("rho_thresh,c_thresh", [(1.0, 1.0), (2.0, 0.5), (0.8, 1.5)])
def test_torchrl_vtrace(trl_fn, ours_torchrl, seed, rho_thresh, c_thresh):
    r, v, nv, done, term = _torchrl_inputs((3, 47, 1), seed)
    g = torch.Generator().manual_seed(100 + seed)
    log_mu = _randn((3, 47, 1), g)
    log_pi = log_mu + 0.6 * _randn((3, 47, 1), g)
    exp = trl_fn.vtrace_advantage_estimate(0.97, log_pi, log_mu, v, nv, r, done, term, rho_thresh, c_thresh)
    got = ours_torchrl.vtrace_advantage_estimate(0.97, log_pi, log_mu, v, nv, r, done, term, rho_thresh, c_thresh)
    assert_close(got[0], exp[0], F32, name="advantage")
    assert_close(got[1], exp[1], F32, name="vs")


def test_torchrl_scalar_tensors_and_flag_dtypes(trl_fn, ours_torchrl):
    # gamma/lmbda as 0-d tensors (TorchRL accepts them) and uint8 / float flags
    r, v, nv, done, term = _torchrl_inputs((2, 40, 1), 3)
    exp = trl_fn.generalized_advantage_estimate(0.9, 0.8, v, nv, r, done, term)
    got = ours_torchrl.generalized_advantage_estimate(torch.tensor(0.9), torch.tensor(0.8), v, nv, r,
                                                      done.to(torch.uint8), term.to(F64))
    assert_close(got[0], exp[0], F32)


def test_torchrl_errors_name_the_argument(ours_torchrl):
    r, v, nv, done, term = _torchrl_inputs((2, 10, 1), 0)
    with pytest.raises(ValueError, match="next_state_value"):
        ours_torchrl.generalized_advantage_estimate(0.9, 0.9, v, nv[:, :5], r, done)
    with pytest.raises(ValueError, match="terminated"):
        ours_torchrl.generalized_advantage_estimate(0.9, 0.9, v, nv, r, done, term[:1])
    with pytest.raises(ValueError, match="lmbda"):
        ours_torchrl.generalized_advantage_estimate(0.9, 1.5, v, nv, r, done)
    with pytest.raises(ValueError, match="gamma .*per-step"):
        ours_torchrl.generalized_advantage_estimate(torch.full(r.shape, 0.9), 0.9, v, nv, r, done)
    with pytest.raises(TypeError, match="reward"):
        ours_torchrl.generalized_advantage_estimate(0.9, 0.9, v, nv, r.long(), done)
    with pytest.raises(TypeError, match="done"):
        ours_torchrl.td_lambda_return_estimate(0.9, 0.9, nv, r, None)
    with pytest.raises(ValueError, match="rolling_gamma"):
        ours_torchrl.td_lambda_return_estimate(0.9, 0.9, nv, r, done, rolling_gamma=False)
    with pytest.raises(ValueError, match="rho_thresh"):
        ours_torchrl.vtrace_advantage_estimate(0.9, r, r, v, nv, r, done, rho_thresh=0.0)
    with pytest.raises(ValueError, match="log_mu"):
        ours_torchrl.vtrace_advantage_estimate(0.9, r, r[:1], v, nv, r, done)


# ====================================================================================================
# TorchRL's modules: ValueEstimator classes on a real rollout (SerialEnv, StepCounter time limit)
# ====================================================================================================


@pytest.fixture(scope="module")
def torchrl_rollout():
    """Two CartPole envs in a SerialEnv with a 30-step time limit, 100 steps of a stochastic linear policy:
    episodes end both by termination (the pole falls) and by truncation (StepCounter), mid-rollout."""
    pytest.importorskip("torchrl")
    pytest.importorskip("gymnasium")
    from tensordict.nn import InteractionType, TensorDictModule
    from torchrl.envs import GymEnv, SerialEnv, StepCounter, TransformedEnv
    from torchrl.modules import OneHotCategorical, ProbabilisticActor

    torch.manual_seed(0)
    env = SerialEnv(2, lambda: TransformedEnv(GymEnv("CartPole-v1"), StepCounter(max_steps=30)))
    env.set_seed(0)
    actor = ProbabilisticActor(TensorDictModule(torch.nn.Linear(4, 2), in_keys=["observation"], out_keys=["logits"]),
                               in_keys=["logits"], distribution_class=OneHotCategorical, return_log_prob=True,
                               spec=env.action_spec, default_interaction_type=InteractionType.RANDOM)
    value_net = TensorDictModule(torch.nn.Linear(4, 1), in_keys=["observation"], out_keys=["state_value"])
    with torch.no_grad():
        data = env.rollout(100, actor, break_when_any_done=False)
    env.close()
    nxt = data["next"]
    assert nxt["terminated"].any() and (nxt["truncated"] & ~nxt["terminated"]).any()
    return data, actor, value_net


@pytest.mark.parametrize("name,kwargs", [
    ("GAE", {"gamma": 0.99, "lmbda": 0.95}),
    ("GAE", {"gamma": 0.9, "lmbda": 0.8, "vectorized": False, "average_gae": True}),
    ("GAE", {"gamma": 0.97, "lmbda": 0.9, "shifted": True}),
    ("TDLambdaEstimator", {"gamma": 0.99, "lmbda": 0.95}),
    ("TDLambdaEstimator", {"gamma": 0.9, "lmbda": 0.7, "vectorized": False}),
    ("VTrace", {"gamma": 0.99}),
    ("VTrace", {"gamma": 0.95, "rho_thresh": 2.0, "c_thresh": 0.5}),
])
def test_torchrl_modules_equal_torchrl_on_a_rollout(torchrl_rollout, ours_torchrl, monkeypatch, name, kwargs):
    from torchrl.objectives import value as trl_value

    data, actor, value_net = torchrl_rollout
    if name == "VTrace":  # off-policy: the learner's policy moved away from the one that collected the data
        actor = copy.deepcopy(actor)
        with torch.no_grad():
            actor.module[0].module.weight.add_(0.5)
        kwargs = {**kwargs, "actor_network": actor}
    theirs = getattr(trl_value, name)(value_network=value_net, **kwargs)
    ours = getattr(ours_torchrl, name)(value_network=value_net, **kwargs)
    assert isinstance(ours, getattr(trl_value, name))
    calls = []
    for fn in ("vec_generalized_advantage_estimate", "generalized_advantage_estimate", "vec_td_lambda_return_estimate",
               "td_lambda_return_estimate", "vtrace_advantage_estimate"):
        original = getattr(ours_torchrl, fn)
        monkeypatch.setattr(ours_torchrl, fn, lambda *a, _f=original, **k: calls.append(a[0]) or _f(*a, **k))
    torch.manual_seed(1)  # VTrace's actor samples: the same seed for both
    exp = theirs(data.clone())
    torch.manual_seed(1)
    got = ours(data.clone())
    assert calls and all(type(g) is float for g in calls), "the estimator must get the module's host gamma"
    for key in ("advantage", "value_target"):
        assert_close(got[key], exp[key], F32, name=key)


def test_torchrl_gae_in_a_ppo_loss(torchrl_rollout, ours_torchrl, monkeypatch):
    from torchrl.objectives import ClipPPOLoss
    from torchrl.objectives.value import GAE as TorchRLGAE

    import rlkernels

    data, actor, value_net = torchrl_rollout
    spy = []
    monkeypatch.setattr(rlkernels, "gae", lambda *a, _f=rlkernels.gae, **k: spy.append(1) or _f(*a, **k))
    results = []
    # (Assigning loss.value_estimator = module does not reach TorchRL's property setter: nn.Module registers the
    # module as a child named value_estimator instead, for TorchRL's estimators as for these.)
    for how in ("torchrl", "instance", "class"):
        loss = ClipPPOLoss(actor, value_net)
        if how == "torchrl":
            loss.make_value_estimator(TorchRLGAE(gamma=0.9, lmbda=0.9, value_network=value_net))
        elif how == "instance":
            loss.make_value_estimator(ours_torchrl.GAE(gamma=0.9, lmbda=0.9, value_network=value_net))
        else:
            loss.make_value_estimator(ours_torchrl.GAE, gamma=0.9, lmbda=0.9, value_network=value_net)
        assert isinstance(loss.value_estimator, ours_torchrl.GAE) == (how != "torchrl")
        out = loss(data.clone())  # without an "advantage" entry, the loss calls its value estimator
        adv = loss.value_estimator(data.clone())["advantage"]
        results.append((adv, out["loss_objective"].detach(), out["loss_critic"].detach()))
    assert len(spy) == 2 * 2
    for got in results[1:]:
        for o, e, n in zip(got, results[0], ("advantage", "loss_objective", "loss_critic")):
            assert_close(o, e, F32, name=n)


def test_torchrl_module_rereads_gamma_written_in_place(torchrl_rollout, ours_torchrl):
    from torchrl.objectives.value import GAE as TorchRLGAE

    data, _, value_net = torchrl_rollout
    ours = ours_torchrl.GAE(gamma=0.99, lmbda=0.95, value_network=value_net)
    first = ours(data.clone())["advantage"]
    with torch.no_grad():
        ours.gamma.fill_(0.5)  # also what load_state_dict does
    got = ours(data.clone())["advantage"]
    exp = TorchRLGAE(gamma=0.5, lmbda=0.95, value_network=value_net)(data.clone())["advantage"]
    assert not torch.allclose(first, exp)
    assert_close(got, exp, F32)
    ours.load_state_dict({"gamma": torch.tensor(0.99), "lmbda": torch.tensor(0.95)}, strict=False)
    assert_close(ours(data.clone())["advantage"], first, F32)


# ====================================================================================================
# Stable-Baselines3: the RolloutBuffer subclass against SB3's own buffer
# ====================================================================================================


@pytest.fixture(scope="module")
def sb3():
    pytest.importorskip("stable_baselines3")
    pytest.importorskip("gymnasium")
    import stable_baselines3

    return stable_baselines3


def _fill(buf, rng, p_start=0.08):
    """Random contents of a rollout buffer's GAE inputs (the observations do not enter the GAE)."""
    T, n = buf.buffer_size, buf.n_envs
    buf.rewards[:] = rng.standard_normal((T, n)).astype(np.float32)
    buf.values[:] = rng.standard_normal((T, n)).astype(np.float32)
    buf.episode_starts[:] = (rng.random((T, n)) < p_start).astype(np.float32)
    buf.full = True


@pytest.mark.parametrize("gamma,lam,seed", CONFIGS)
def test_sb3_rollout_buffer_equals_sb3(sb3, gamma, lam, seed):
    from gymnasium import spaces
    from stable_baselines3.common.buffers import RolloutBuffer as SB3Buffer

    from rlkernels.integrations.sb3 import RolloutBuffer

    T, n = 64, 5
    rng = np.random.default_rng(seed)
    ours = RolloutBuffer(T, spaces.Box(-1, 1, (3,)), spaces.Discrete(2), device="cpu", gae_lambda=lam,
                         gamma=gamma, n_envs=n)
    assert isinstance(ours, SB3Buffer)
    _fill(ours, rng)
    theirs = SB3Buffer(T, spaces.Box(-1, 1, (3,)), spaces.Discrete(2), device="cpu", gae_lambda=lam,
                       gamma=gamma, n_envs=n)
    for name in ("rewards", "values", "episode_starts"):
        getattr(theirs, name)[:] = getattr(ours, name)
    last_values = torch.as_tensor(rng.standard_normal((n, 1)).astype(np.float32))  # SB3 passes [n_envs, 1]
    dones = rng.random(n) < 0.5
    theirs.compute_returns_and_advantage(last_values=last_values.clone(), dones=dones.copy())
    ours.compute_returns_and_advantage(last_values=last_values.clone(), dones=dones.copy())
    assert ours.advantages.dtype == np.float32 and ours.returns.dtype == np.float32
    assert_close(ours.advantages, theirs.advantages, F32, name="advantages")
    assert_close(ours.returns, theirs.returns, F32, name="returns")


def test_sb3_dict_rollout_buffer_equals_sb3(sb3):
    from gymnasium import spaces
    from stable_baselines3.common.buffers import DictRolloutBuffer as SB3Dict

    from rlkernels.integrations.sb3 import DictRolloutBuffer

    obs = spaces.Dict({"a": spaces.Box(-1, 1, (2,)), "b": spaces.Discrete(3)})
    rng = np.random.default_rng(4)
    ours = DictRolloutBuffer(32, obs, spaces.Discrete(2), device="cpu", gae_lambda=0.9, gamma=0.98, n_envs=3)
    theirs = SB3Dict(32, obs, spaces.Discrete(2), device="cpu", gae_lambda=0.9, gamma=0.98, n_envs=3)
    _fill(ours, rng)
    for name in ("rewards", "values", "episode_starts"):
        getattr(theirs, name)[:] = getattr(ours, name)
    lv, dones = torch.randn(3, 1), np.array([True, False, False])
    theirs.compute_returns_and_advantage(lv.clone(), dones)
    ours.compute_returns_and_advantage(lv.clone(), dones)
    assert_close(ours.advantages, theirs.advantages, F32, name="advantages")
    assert_close(ours.returns, theirs.returns, F32, name="returns")


def test_sb3_ppo_learns_with_the_buffer(sb3):
    # A short PPO run on CartPole with our buffer: every GAE call of the run is also done by SB3's own
    # method on a copy of the same filled buffer, and the two must agree.
    from stable_baselines3 import PPO
    from stable_baselines3.common.buffers import RolloutBuffer as SB3Buffer

    from rlkernels.integrations.sb3 import RolloutBuffer

    calls = []

    class Checked(RolloutBuffer):
        def compute_returns_and_advantage(self, last_values, dones):
            ref = copy.deepcopy(self)
            SB3Buffer.compute_returns_and_advantage(ref, last_values.clone(), np.array(dones))
            super().compute_returns_and_advantage(last_values, dones)
            calls.append((self.advantages.copy(), ref.advantages, self.returns.copy(), ref.returns))

    model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, n_epochs=1, seed=0, device="cpu",
                rollout_buffer_class=Checked)
    assert isinstance(model.rollout_buffer, RolloutBuffer)
    model.learn(128)
    assert len(calls) == 2
    for adv, ref_adv, ret, ref_ret in calls:
        assert np.abs(adv).max() > 0
        assert_close(adv, ref_adv, F32, name="advantages")
        assert_close(ret, ref_ret, F32, name="returns")


def test_sb3_errors_name_the_argument(sb3):
    from gymnasium import spaces

    from rlkernels.integrations.sb3 import RolloutBuffer

    buf = RolloutBuffer(8, spaces.Box(-1, 1, (1,)), spaces.Discrete(2), device="cpu", n_envs=2)
    with pytest.raises(ValueError, match="last_values"):
        buf.compute_returns_and_advantage(torch.zeros(3), np.zeros(2, dtype=bool))
    with pytest.raises(ValueError, match="dones"):
        buf.compute_returns_and_advantage(torch.zeros(2), np.zeros(3, dtype=bool))
    with pytest.raises(TypeError, match="last_values"):
        buf.compute_returns_and_advantage(np.zeros(2), np.zeros(2, dtype=bool))


@pytest.mark.parametrize("per_sample", [False, True], ids=["gamma", "n-step discounts"])
def test_sb3_dqn_targets_equal_sb3(sb3, per_sample):
    from rlkernels.integrations.sb3 import dqn_targets

    g = torch.Generator().manual_seed(3)
    B, A = 77, 5
    rewards, next_q = torch.randn(B, 1, generator=g), torch.randn(B, A, generator=g) * 3
    dones = (torch.rand(B, 1, generator=g) < 0.3).float()
    discounts = 0.97 ** torch.randint(1, 4, (B, 1), generator=g).float() if per_sample else 0.97
    got = dqn_targets(rewards, next_q, dones, discounts)
    exp = _sb3_dqn_targets(rewards, next_q, dones, discounts)
    assert got.shape == (B, 1) and dones.sum() > 0
    assert_close(got, exp, F32, name="targets")
    done = dones.reshape(-1) != 0
    assert torch.equal(got.reshape(-1)[done], rewards.reshape(-1)[done])
    with pytest.raises(ValueError, match="dones"):
        dqn_targets(rewards, next_q, dones[:5], discounts)
    with pytest.raises(ValueError, match="discounts"):
        dqn_targets(rewards, next_q, dones, torch.ones(3, 1))


@pytest.mark.parametrize("n_steps", [1, 3])
def test_sb3_dqn_trains_as_sb3(sb3, monkeypatch, n_steps):
    # SB3's DQN and ours from one seed on CartPole: the same transitions, samples and exploration, so every
    # gradient step sees the same batch; the networks must stay equal to float32 rounding through 250 updates.
    from stable_baselines3 import DQN as SB3DQN
    from stable_baselines3.common.buffers import NStepReplayBuffer

    import rlkernels
    from rlkernels.integrations.sb3 import DQN

    calls = []
    td_loss = rlkernels.td_loss
    monkeypatch.setattr(rlkernels, "td_loss", lambda *a, **k: calls.append(1) or td_loss(*a, **k))
    kw = {"learning_starts": 100, "train_freq": 4, "gradient_steps": 2, "batch_size": 32, "seed": 0, "device": "cpu",
          "target_update_interval": 50}
    if n_steps > 1:
        kw.update(replay_buffer_class=NStepReplayBuffer, replay_buffer_kwargs={"n_steps": n_steps})
    theirs = SB3DQN("MlpPolicy", "CartPole-v1", **kw).learn(600)
    ours = DQN("MlpPolicy", "CartPole-v1", **kw)
    initial = {name: p.detach().clone() for name, p in ours.q_net.named_parameters()}
    ours.learn(600)
    assert isinstance(ours, SB3DQN)
    assert ours._n_updates == theirs._n_updates == len(calls) == 250
    for (name, p), q in zip(theirs.q_net.named_parameters(), ours.q_net.parameters()):
        assert_close(q, p, F32, name=name)
    # (the runs trained: equal networks are not the untouched initial ones)
    assert all(not torch.equal(p, initial[name]) for name, p in ours.q_net.named_parameters())
    assert ours.logger.name_to_value["train/loss"] == pytest.approx(theirs.logger.name_to_value["train/loss"],
                                                                    rel=1e-5)


# ====================================================================================================
# CleanRL: compute_gae against the loop of ppo.py
# ====================================================================================================


def _cleanrl_inputs(T, N, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    rewards, values = _randn((T, N), g, dtype), _randn((T, N), g, dtype)
    dones = (torch.rand(T, N, generator=g) < 0.05).to(dtype)
    next_value = _randn((1, N), g, dtype)  # agent.get_value(next_obs).reshape(1, -1)
    next_done = (torch.rand(N, generator=g) < 0.5).to(dtype)
    return rewards, values, dones, next_value, next_done


@pytest.mark.parametrize("gamma,lam,seed", CONFIGS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_cleanrl_compute_gae(gamma, lam, seed, dtype):
    from rlkernels.integrations.cleanrl import compute_gae

    args = _cleanrl_inputs(128, 4, seed, dtype)
    exp_adv, exp_ret = _cleanrl_gae(*args, gamma, lam)
    adv, ret = compute_gae(*args, gamma, lam)
    assert adv.dtype == dtype
    assert_close(adv, exp_adv, dtype, name="advantages")
    assert_close(ret, exp_ret, dtype, name="returns")
    # next_value as [N] and bool flags give the same
    rewards, values, dones, next_value, next_done = args
    adv2, _ = compute_gae(rewards, values, dones.bool(), next_value.reshape(-1), next_done.bool(), gamma, lam)
    assert torch.equal(adv2, adv)


def test_cleanrl_compute_gae_single_env_and_empty_rollout():
    from rlkernels.integrations.cleanrl import compute_gae

    rewards, values, dones, next_value, next_done = _cleanrl_inputs(50, 1, 5, F64)
    rewards, values, dones = rewards[:, 0], values[:, 0], dones[:, 0]  # [num_steps]: one environment
    exp_adv, _ = _cleanrl_gae(rewards, values, dones, next_value.reshape(()), next_done.reshape(()), 0.95, 0.9)
    adv, _ = compute_gae(rewards, values, dones, next_value.reshape(1), next_done.reshape(()), 0.95, 0.9)
    assert_close(adv, exp_adv, F64)
    adv, ret = compute_gae(rewards[:0], values[:0], dones[:0], next_value.reshape(1), next_done.reshape(1), 0.95, 0.9)
    assert adv.shape == ret.shape == (0,)


def test_cleanrl_compute_gae_gradients():
    from rlkernels.integrations.cleanrl import compute_gae

    rewards, values, dones, next_value, next_done = _cleanrl_inputs(33, 3, 9, F64)
    for x in (rewards, values, next_value):
        x.requires_grad_(True)
    g = torch.Generator().manual_seed(2)
    w1, w2 = _randn((33, 3), g), _randn((33, 3), g)
    exp = _cleanrl_gae(rewards, values, dones, next_value, next_done, 0.99, 0.95)
    got = compute_gae(rewards, values, dones, next_value, next_done, 0.99, 0.95)
    eg = torch.autograd.grad((exp[0] * w1 + exp[1] * w2).sum(), (rewards, values, next_value))
    og = torch.autograd.grad((got[0] * w1 + got[1] * w2).sum(), (rewards, values, next_value))
    for o, e, n in zip(og, eg, ("rewards", "values", "next_value")):
        assert_close(o, e, F64, name=f"grad {n}")


def test_cleanrl_errors_name_the_argument():
    from rlkernels.integrations.cleanrl import compute_gae

    rewards, values, dones, next_value, next_done = _cleanrl_inputs(8, 3, 0, F32)
    with pytest.raises(ValueError, match="next_value"):
        compute_gae(rewards, values, dones, next_value[:, :2], next_done, 0.99, 0.95)
    with pytest.raises(ValueError, match="next_done"):
        compute_gae(rewards, values, dones, next_value, next_done[:2], 0.99, 0.95)
    with pytest.raises(ValueError, match="dones"):
        compute_gae(rewards, values, dones[:4], next_value, next_done, 0.99, 0.95)
    with pytest.raises(ValueError, match="gae_lambda"):
        compute_gae(rewards, values, dones, next_value, next_done, 0.99, 1.5)
    with pytest.raises(TypeError, match="rewards"):
        compute_gae(rewards.long(), values, dones, next_value, next_done, 0.99, 0.95)


def _cleanrl_minibatch(n, seed, dtype=F32):
    g = torch.Generator().manual_seed(seed)
    logprobs = _randn((n,), g, dtype, 0.5) - 1.0
    newlogprob = logprobs + _randn((n,), g, dtype, 0.3)  # |ratio - 1| > 0.2 for many samples
    advantages, newvalue, values = (_randn((n,), g, dtype) for _ in range(3))
    returns = values + _randn((n,), g, dtype)
    return newlogprob, logprobs, advantages, newvalue[:, None], values, returns  # newvalue [n, 1] as the critic's


@pytest.mark.parametrize("norm_adv,clip_vloss", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_cleanrl_ppo_loss(dtype, norm_adv, clip_vloss):
    from rlkernels.integrations import cleanrl

    newlogprob, logprobs, adv, newvalue, values, returns = _cleanrl_minibatch(256, 3, dtype)
    ins = [newlogprob.clone().requires_grad_(True), newvalue.clone().requires_grad_(True)]
    exp = _cleanrl_ppo_losses(ins[0], logprobs, adv, ins[1], values, returns, 0.2, norm_adv, clip_vloss)
    eg = torch.autograd.grad(exp[0] + exp[1], ins)
    got_ins = [newlogprob.clone().requires_grad_(True), newvalue.clone().requires_grad_(True)]
    pg, v, stats = cleanrl.ppo_loss(got_ins[0], logprobs, adv, got_ins[1], values, returns, 0.2, norm_adv=norm_adv,
                                    clip_vloss=clip_vloss)
    og = torch.autograd.grad(pg + v, got_ins)
    assert_close(pg, exp[0], dtype, name="pg_loss")
    assert_close(v, exp[1], dtype, name="v_loss")
    for name, e in zip(("old_approx_kl", "approx_kl", "clipfrac"), exp[2:]):
        assert_close(stats[name], e, dtype, name=name)
    for o, e, n in zip(og, eg, ("newlogprob", "newvalue")):
        assert_close(o, e, dtype, name=f"grad {n}")


def test_cleanrl_ppo_stats_are_cleanrls_not_the_core_ops():
    # Same batch, same names, other definitions: the core op counts a clipped sample only where clipping changes
    # the loss, and its approx_kl is k1; CleanRL's --target-kl early stop compares k3.
    import rlkernels
    from rlkernels.integrations import cleanrl

    newlogprob, logprobs, adv, newvalue, values, returns = _cleanrl_minibatch(512, 4)
    _, _, old_kl, k3, clipfrac = _cleanrl_ppo_losses(newlogprob, logprobs, adv, newvalue, values, returns, 0.2,
                                                     False, True)
    _, core = rlkernels.ppo_policy_loss(newlogprob, logprobs, adv, clip_low=0.2)
    _, _, stats = cleanrl.ppo_loss(newlogprob, logprobs, adv, newvalue, values, returns, 0.2, norm_adv=False)
    assert abs(float(core["clipfrac"]) - float(clipfrac)) > 0.1
    assert abs(float(core["approx_kl"]) - float(k3)) > 1e-3
    assert_close(core["approx_kl"], old_kl, F32)
    assert_close(stats["clipfrac"], clipfrac, F32)
    assert_close(stats["approx_kl"], k3, F32)


def test_cleanrl_ppo_loss_errors_name_the_argument():
    from rlkernels.integrations import cleanrl

    newlogprob, logprobs, adv, newvalue, values, returns = _cleanrl_minibatch(16, 0)
    cases = [
        ("logprobs", {"logprobs": logprobs[:8]}),
        ("newvalue", {"newvalue": newvalue[:8]}),
        ("advantages", {"advantages": adv.long()}),
        ("clip_coef", {"clip_coef": -0.1}),
        ("newlogprob", {"newlogprob": newlogprob[None]}),
    ]
    for name, change in cases:
        args = {"newlogprob": newlogprob, "logprobs": logprobs, "advantages": adv, "newvalue": newvalue,
                "values": values, "returns": returns, "clip_coef": 0.2}
        args.update(change)
        with pytest.raises((TypeError, ValueError), match=name):
            cleanrl.ppo_loss(**args)


@pytest.mark.filterwarnings("ignore:Using a target size")  # B = 1: CleanRL's squeeze() leaves a 0-d old_val
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("B,A,seed", [(128, 2, 0), (37, 18, 1), (1, 4, 2)])
def test_cleanrl_dqn_loss(dtype, B, A, seed):
    from rlkernels.integrations.cleanrl import dqn_loss

    g = torch.Generator().manual_seed(seed)
    q = _randn((B, A), g, dtype).requires_grad_(True)
    next_q = _randn((B, A), g, dtype, scale=3.0)
    actions = torch.randint(0, A, (B, 1), generator=g)  # CleanRL's replay buffer: [B, 1] columns
    rewards, dones = _randn((B, 1), g, dtype), (torch.rand(B, 1, generator=g) < 0.3).to(dtype)
    exp_loss, exp_old = _cleanrl_dqn(q, actions, next_q, rewards, dones, 0.99)
    (exp_grad,) = torch.autograd.grad(exp_loss, q)
    loss, old_val = dqn_loss(q, actions, next_q, rewards, dones, 0.99)
    (grad,) = torch.autograd.grad(loss, q)
    assert loss.dtype == dtype and old_val.shape == (B,) and not old_val.requires_grad
    assert_close(loss, exp_loss, dtype, name="loss")
    assert_close(grad, exp_grad, dtype, name="grad q_values")
    assert torch.equal(old_val, exp_old.detach().reshape(B))
    # [B] columns, bool dones and int32 actions give the same
    loss2, _ = dqn_loss(q, actions.reshape(B).int(), next_q, rewards.reshape(B), dones.reshape(B).bool(), 0.99)
    assert torch.equal(loss2, loss)


def test_cleanrl_dqn_loss_errors_name_the_argument():
    from rlkernels.integrations.cleanrl import dqn_loss

    q, actions, r, d = torch.randn(8, 3), torch.zeros(8, 1, dtype=torch.long), torch.zeros(8, 1), torch.zeros(8, 1)
    with pytest.raises(ValueError, match="next_q_values"):
        dqn_loss(q, actions, torch.randn(8, 4), r, d, 0.99)
    with pytest.raises(ValueError, match="dones"):
        dqn_loss(q, actions, q, r, d[:4], 0.99)
    with pytest.raises(ValueError, match="actions"):
        dqn_loss(q, actions.reshape(1, 8), q, r, d, 0.99)
    with pytest.raises(ValueError, match="gamma"):
        dqn_loss(q, actions, q, r, d, 1.5)
    with pytest.raises(TypeError, match="actions"):
        dqn_loss(q, actions.float(), q, r, d, 0.99)
    with pytest.raises(ValueError, match="actions"):
        dqn_loss(q, actions + 3, q, r, d, 0.99)


# ====================================================================================================
# verl 0.9.1: core_algos.py and torch_functional.py, as transcribed in rlkernels/bench/trainers.py
# ====================================================================================================


@pytest.fixture(scope="module")
def verl():
    from rlkernels.integrations import verl

    return verl


def _response_mask(B, T, g, empty_row=True):
    """verl's masks: each row a run of response tokens after a prompt, then padding; optionally a row with none."""
    mask = torch.zeros(B, T)
    for b in range(B):
        start = int(torch.randint(0, T // 3, (1,), generator=g))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        mask[b, start:end] = 1
    if empty_row:
        mask[B // 2] = 0
    return mask


@pytest.mark.parametrize("gamma,lam,seed", CONFIGS)
def test_verl_gae(verl, gamma, lam, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 40
    rewards, values = _randn((B, T), g, F32), _randn((B, T), g, F32)
    mask = _response_mask(B, T, g, empty_row=False)
    # observation tokens inside the response (multi-turn): skipped, as verl does
    mask[0, 5:8] = 0
    exp_adv, exp_ret = _verl_gae(rewards, values, mask, gamma, lam)
    adv, ret = verl.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    m = mask.bool()
    assert_close(adv[m], exp_adv[m], F32, name="advantages (response tokens)")
    assert_close(ret[m], exp_ret[m], F32, name="returns (response tokens)")
    assert torch.equal(ret[~m], values[~m])  # documented: no carries where masked


def test_verl_gae_needs_two_tokens(verl):
    r = torch.randn(2, 5)
    mask = torch.zeros(2, 5)
    mask[1, 3] = 1
    with pytest.raises(ValueError, match="response_mask"):
        verl.compute_gae_advantage_return(r, r, mask, 1.0, 0.95)


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("clips", [{"cliprange": 0.2}, {"cliprange": 0.2, "cliprange_low": 0.1, "cliprange_high": 0.28,
                                                             "clip_ratio_c": 2.0}], ids=["sym", "asym"])
def test_verl_policy_loss(verl, mode, clips):
    g = torch.Generator().manual_seed(7)
    B, T = 6, 24
    old = _randn((B, T), g, F64, 0.5)
    logp = (old + _randn((B, T), g, F64, 0.4)).requires_grad_(True)
    adv = _randn((B, T), g, F64, 2.0)
    mask = _response_mask(B, T, g)  # one row without response tokens
    exp = _verl_policy_loss(old, logp, adv, mask, loss_agg_mode=mode, **clips)
    got = verl.compute_policy_loss(old, logp, adv, mask, loss_agg_mode=mode, **clips)
    assert float(got[3]) > 0 and float(got[1]) > 0  # both clips bind somewhere: the stats are exercised
    for o, e, n in zip(got, exp, ("pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower")):
        assert_close(o, e, F32, name=n)  # verl's masked_mean adds 1e-8 to the count
    (eg,) = torch.autograd.grad(exp[0], logp)
    (og,) = torch.autograd.grad(got[0], logp)
    assert_close(og, eg, F32, name="grad log_prob")


@pytest.mark.parametrize("mode,agg", [
    ("token-mean", {}), ("token-sum", {}), ("seq-mean-token-sum", {}), ("seq-mean-token-mean", {}),
    ("seq-mean-token-sum-norm", {}), ("seq-mean-token-sum-norm", {"loss_scale_factor": 64}),
    ("token-mean", {"dp_size": 2, "batch_num_tokens": 300}), ("seq-mean-token-mean", {"dp_size": 4, "global_batch_size": 20}),
    ("seq-mean-token-sum", {"global_batch_size": 10}),
])
def test_verl_value_loss(verl, mode, agg):
    g = torch.Generator().manual_seed(8)
    B, T = 6, 24
    old_values, returns = _randn((B, T), g), _randn((B, T), g)
    vpreds = (old_values + _randn((B, T), g, scale=0.5)).requires_grad_(True)
    mask = _response_mask(B, T, g)
    exp = _verl_value_loss(vpreds, returns, old_values, mask, 0.2, mode, **agg)
    got = verl.compute_value_loss(vpreds, returns, old_values, mask, 0.2, mode, **agg)
    assert float(got[1]) > 0
    assert_close(got[0], exp[0], F32, name="vf_loss")
    assert_close(got[1], exp[1], F32, name="vf_clipfrac")
    (eg,) = torch.autograd.grad(exp[0], vpreds)
    (og,) = torch.autograd.grad(got[0], vpreds)
    assert_close(og, eg, F32, name="grad vpreds")


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "abs+", "k2+"])
def test_verl_kl_penalty(verl, name):
    g = torch.Generator().manual_seed(3)
    ref = _randn((4, 16), g)
    logp = (ref + _randn((4, 16), g, scale=3.0)).requires_grad_(True)
    exp = _verl_kl_penalty(logp, ref, name)
    got = verl.kl_penalty(logp, ref, name)
    assert_close(got, exp, F64)
    (eg,) = torch.autograd.grad(exp.sum(), logp)
    (og,) = torch.autograd.grad(got.sum(), logp)
    assert_close(og, eg, F64, name="grad logprob")


def test_verl_logprobs_and_entropy(verl):
    g = torch.Generator().manual_seed(4)
    B, T, V = 3, 7, 50
    logits = _randn((B, T, V), g, F32, 3.0).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    w1, w2 = _randn((B, T), g, F32), _randn((B, T), g, F32)
    exp_lp, exp_ent = _verl_logprobs_from_logits_v2(logits, labels), _verl_entropy_from_logits(logits)
    lp = verl.logprobs_from_logits(logits, labels, inplace_backward=False)
    ent = verl.entropy_from_logits(logits)
    assert_close(lp, exp_lp, F32, name="log_probs")
    assert_close(ent, exp_ent, F32, name="entropy")
    (eg,) = torch.autograd.grad((exp_lp * w1 + exp_ent * w2).sum(), logits)
    (og,) = torch.autograd.grad((lp * w1 + ent * w2).sum(), logits)
    assert_close(og, eg, F32, name="grad logits")
    # verl's default inplace_backward=True: the gradient is written over (non-leaf) logits, and is the same
    h = logits.detach() * 1.0
    h.requires_grad_(True)
    z = h * 1.0
    (gi,) = torch.autograd.grad((verl.logprobs_from_logits(z, labels) * w1).sum(), h)
    (ge,) = torch.autograd.grad((_verl_logprobs_from_logits_v2(logits, labels) * w1).sum(), logits)
    assert_close(gi, ge, F32, name="grad logits (inplace_backward)")


def test_verl_errors_name_the_argument(verl):
    x = torch.randn(2, 5)
    mask = torch.ones(2, 5)
    with pytest.raises(ValueError, match="cliprange"):
        verl.compute_policy_loss(x, x, x, mask)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        verl.compute_policy_loss(x, x, x, mask, cliprange=0.2, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        verl.compute_policy_loss(x, x, x, mask, cliprange=0.2, loss_agg_mode="mean")
    with pytest.raises(ValueError, match="response_mask"):
        verl.compute_policy_loss(x, x, x, mask[:, :3], cliprange=0.2)
    with pytest.raises(ValueError, match="advantages"):
        verl.compute_policy_loss(x, x, x[:1], mask, cliprange=0.2)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        verl.compute_value_loss(x, x, x, mask, 0.2, dp_size=2)
    with pytest.raises(ValueError, match="loss_scale_factor"):
        verl.compute_value_loss(x, x, x, mask, 0.2, "seq-mean-token-sum-norm", loss_scale_factor=0)
    with pytest.raises(ValueError, match="kl_penalty"):
        verl.kl_penalty(x, x, "k4")
    with pytest.raises(NotImplementedError):
        verl.kl_penalty(x, x, "full")
    with pytest.raises(TypeError, match="values"):
        verl.compute_gae_advantage_return(x, x.long(), mask, 1.0, 1.0)


# ====================================================================================================
# TRL: selective_log_softmax against trl.trainer.utils.selective_log_softmax
# ====================================================================================================


def _naive_selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
    """The reference in TRL's docstring: log_softmax then gather (index [...] or [..., K])."""
    logps = (logits / temperature).log_softmax(-1)
    if index.ndim == logits.ndim - 1:
        out = torch.gather(logps, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
    else:
        out = torch.gather(logps, dim=-1, index=index)
    return out if row_mask is None else out.masked_fill(row_mask == 0, 0.0)


@pytest.fixture(scope="module")
def trl_selective_log_softmax():
    pytest.importorskip("trl")
    from trl.trainer.utils import selective_log_softmax

    return selective_log_softmax


@pytest.mark.parametrize("case", ["plain", "temperature", "topk", "row_mask", "f64"])
def test_trl_selective_log_softmax(trl_selective_log_softmax, case):
    from rlkernels.integrations.trl import selective_log_softmax

    g = torch.Generator().manual_seed(6)
    B, T, V = 3, 9, 64
    dtype = F64 if case == "f64" else F32
    logits = _randn((B, T, V), g, dtype, 4.0).requires_grad_(True)
    shape = (B, T, 4) if case == "topk" else (B, T)
    index = torch.randint(0, V, shape, generator=g)
    kw = {}
    if case == "temperature":
        kw["temperature"] = 0.7
    if case == "row_mask":
        kw["row_mask"] = torch.rand(shape, generator=g) < 0.6
    exp = trl_selective_log_softmax(logits, index, **kw)
    got = selective_log_softmax(logits, index, **kw)
    assert got.shape == index.shape
    assert_close(got, exp, dtype)
    assert_close(got, _naive_selective_log_softmax(logits, index, **kw), dtype, name="docstring formula")
    w = _randn(shape, g, dtype)
    (eg,) = torch.autograd.grad((exp * w).sum(), logits)
    (og,) = torch.autograd.grad((got * w).sum(), logits)
    assert_close(og, eg, dtype, name="grad logits")


def test_trl_errors_name_the_argument():
    from rlkernels.integrations.trl import selective_log_softmax

    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="index"):
        selective_log_softmax(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="index"):
        selective_log_softmax(logits, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="row_mask"):
        selective_log_softmax(logits, torch.zeros(2, 3, dtype=torch.long), row_mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="temperature"):
        selective_log_softmax(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)


# ====================================================================================================
# The fused LM head: TRL's add_fused_lm_head, transformers' per-token log-probs, verl's linear_cross_entropy
# ====================================================================================================


def _tiny_causal_lm(kind, seed=0):
    """A randomly initialized 2-layer causal LM built here (no downloads): Llama, or Gemma 2 (final logit
    softcapping) or Cohere (logit_scale), so the head transforms are exercised."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    common = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2}
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "gemma2":
        config = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0)
        model = transformers.Gemma2ForCausalLM(config)
    else:
        model = transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=0.5))
    # larger head weights than the default init, so the softcap and the scale matter
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "gemma2", "cohere"])
@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy")])
def test_trl_add_fused_lm_head_matches_trl(kind, outputs):
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head

    from rlkernels.integrations.trl import add_fused_lm_head

    theirs = _tiny_causal_lm(kind)
    ours = copy.deepcopy(theirs)
    trl_add_fused_lm_head(theirs, temperature=0.7, outputs=outputs)
    add_fused_lm_head(ours, temperature=0.7, outputs=outputs)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 7] = -100
    exp = theirs(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert type(got) is type(exp)
    assert got.log_probs.shape == exp.log_probs.shape == (3, 10)
    assert_close(got.log_probs, exp.log_probs, F32, name="log_probs")
    assert torch.equal(got.label_mask, exp.label_mask)
    assert_close(got.loss, exp.loss, F32, name="loss")
    if "entropy" in outputs:
        assert_close(got.entropy, exp.entropy, F32, name="entropy")
        loss_e, loss_o = exp.loss - 0.1 * exp.entropy.sum(), got.loss - 0.1 * got.entropy.sum()
    else:
        assert got.entropy is None and exp.entropy is None
        loss_e, loss_o = exp.loss, got.loss
    loss_e.backward()
    loss_o.backward()
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
        assert_close(q.grad, p.grad, F32, name=f"grad {name}")
    # shift_labels (pre-shifted, as under context parallelism), num_items_in_batch
    kw = {"input_ids": ids, "shift_labels": labels, "num_items_in_batch": 7, "fused_lm_head": True}
    assert_close(ours(**kw).log_probs, theirs(**kw).log_probs, F32, name="shift_labels log_probs")
    assert_close(ours(**kw).loss, theirs(**kw).loss, F32, name="num_items_in_batch loss")
    # without fused_lm_head the model's own forward runs
    assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, F32, name="logits")


def test_trl_add_fused_lm_head_fp32_head_and_errors():
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head

    from rlkernels.integrations.trl import add_fused_lm_head

    theirs = _tiny_causal_lm("llama").to(torch.bfloat16)
    ours = copy.deepcopy(theirs)
    trl_add_fused_lm_head(theirs, cast_lm_head_to_fp32=True)
    add_fused_lm_head(ours, cast_lm_head_to_fp32=True)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(4))
    exp = theirs(input_ids=ids, labels=ids, fused_lm_head=True)
    got = ours(input_ids=ids, labels=ids, fused_lm_head=True)
    assert got.log_probs.dtype == torch.float32
    assert_close(got.log_probs, exp.log_probs, F32, name="log_probs with an fp32 head")
    with pytest.raises(ValueError, match="is_top1"):
        add_fused_lm_head(copy.deepcopy(ours), outputs=("log_probs", "is_top1"))
    with pytest.raises(ValueError, match="temperature"):
        add_fused_lm_head(copy.deepcopy(ours), temperature=0.0)


def _logits_path(model, ids, mask, logits_to_keep, temperature):
    """What TRL's GRPO trainer does (_get_per_token_logps_and_entropies): full logits of the kept positions."""
    K = ids.shape[1] - 1 if logits_to_keep is None else logits_to_keep
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=K + 1).logits[:, :-1, :]
    logits = logits[:, -K:] / temperature if K else logits[:, :0]
    logps = torch.log_softmax(logits.double(), -1)
    logp = logps.gather(-1, ids[:, ids.shape[1] - K:, None]).squeeze(-1)
    entropy = -(logps.exp() * logps).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("kind", ["llama", "gemma2", "cohere"])
@pytest.mark.parametrize("logits_to_keep", [None, 5, 0])
def test_transformers_token_logprobs_matches_logits_path(kind, logits_to_keep):
    from rlkernels.integrations.transformers import token_logprobs

    model = _tiny_causal_lm(kind, seed=1)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    logp, entropy = token_logprobs(model, ids, mask, logits_to_keep=logits_to_keep, temperature=0.8,
                                   return_entropy=True)
    want_logp, want_entropy = _logits_path(model, ids, mask, logits_to_keep, 0.8)
    assert logp.shape == want_logp.shape and logp.dtype == F32
    assert_close(logp, want_logp, F32, name="log-probs")
    assert_close(entropy, want_entropy, F32, name="entropy")
    if logits_to_keep == 0:
        return
    w = torch.randn(logp.shape, generator=g)
    (logp * w).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (want_logp.float() * w).sum().backward()
    for n, p in model.named_parameters():
        assert_close(ours[n], p.grad, F32, name=f"grad {n}")
    only = token_logprobs(model, ids, mask, logits_to_keep=logits_to_keep, temperature=0.8)
    assert torch.equal(only.detach(), logp.detach())


def test_transformers_token_logprobs_errors():
    from rlkernels.integrations.transformers import token_logprobs

    model = _tiny_causal_lm("llama")
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="logits_to_keep"):
        token_logprobs(model, ids, logits_to_keep=5)
    with pytest.raises(TypeError, match="logits_to_keep"):
        token_logprobs(model, ids, logits_to_keep=2.0)
    with pytest.raises(ValueError, match="input_ids"):
        token_logprobs(model, ids[0])


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
def test_verl_linear_cross_entropy_matches_formula(reduction, dtype):
    from rlkernels.bench.trainers import verl_linear_cross_entropy as _verl_lce
    from rlkernels.integrations.verl import linear_cross_entropy

    g = torch.Generator().manual_seed(8)
    hidden = _randn((2, 13, 32), g, dtype)
    # logits of order 1 for bf16: rlkernels rounds 16-bit logits to the inputs' dtype (as hidden @ weight.T does),
    # verl's formula keeps them in float32, and the difference grows with |logits|
    weight = _randn((151, 32), g, dtype, 0.5 if dtype == F32 else 0.1)
    labels = torch.randint(0, 151, (2, 13), generator=g)
    labels[0, :3] = -100
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = linear_cross_entropy(h1, w1, labels, 0.6, reduction)
    want_logp, want_ent = _verl_lce(h2, w2, labels, 0.6, reduction)
    assert logp.shape == want_logp.shape and ent.shape == want_ent.shape == (26,)
    tol = F32 if dtype == F32 else torch.bfloat16
    assert_close(logp, want_logp, tol, name="logprobs")
    assert_close(ent, want_ent, tol, name="entropy")
    w = _randn(ent.shape, g)
    (logp.sum() + (ent * w).sum()).backward()
    (want_logp.sum() + (want_ent * w).sum()).backward()
    assert_close(h1.grad, h2.grad, tol, name="grad hidden")
    assert_close(w1.grad, w2.grad, tol, name="grad weight")


def test_verl_linear_cross_entropy_errors():
    from rlkernels.integrations.verl import linear_cross_entropy

    hidden, weight, labels = torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="dist_process_group"):
        linear_cross_entropy(hidden, weight, labels, dist_process_group=object())
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, torch.zeros(10, 7), labels)
