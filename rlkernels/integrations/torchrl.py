"""TorchRL's value estimators with TorchRL's signatures: the modules and the functionals.

The modules ``GAE``, ``TDLambdaEstimator`` and ``VTrace`` are TorchRL's classes (torchrl 0.14) computing on
rlkernels, with TorchRL's constructor and call: where a trainer builds ``torchrl.objectives.value.GAE(gamma=...,
lmbda=..., value_network=...)``, build ``rlkernels.integrations.torchrl.GAE`` with the same arguments, and put it in
a loss with ``loss_module.make_value_estimator(estimator)`` (module docstring of
``rlkernels/integrations/_torchrl_modules.py``: how; they import torchrl, on first access).

The functionals are drop-ins for ``generalized_advantage_estimate``, ``vec_generalized_advantage_estimate``,
``td_lambda_return_estimate``, ``vec_td_lambda_return_estimate`` and ``vtrace_advantage_estimate`` of
``torchrl.objectives.value.functional``. Conventions, as in TorchRL: tensors of shape ``[*B, T, *F]`` with the
time axis at ``time_dim`` (default -2, so ``[*B, T, 1]``); ``next_state_value[t]`` is V(s_{t+1}) for every step (the true next
state, also after a reset); ``done`` ends a trajectory (cuts the recursion), ``terminated`` (defaults to
``done``) means s_{t+1} is terminal (its value counts as 0). In rlkernels terms: ``terminated=terminated``,
``truncated=done & ~terminated``, ``next_values=next_state_value`` (docs/design.md §4.2).

Differences from TorchRL, all outside what TorchRL's own callers produce:

- ``gamma``, ``lmbda``, ``rho_thresh``, ``c_thresh`` are scalars: Python numbers or one-element tensors (TorchRL's
  modules pass 0-d tensors). A CPU tensor is read as a number. A GPU tensor is not read on the host by the GAE
  and TD(lambda) functionals (it stays a tensor on the device, docs/design.md §3); the V-trace functional reads
  it (one device synchronization; the ``VTrace`` module passes host values and does not). TorchRL's per-step
  gamma/lambda tensors raise a ValueError here.
- ``terminated`` is taken to imply ``done`` (as TorchRL's environments guarantee): a terminated step always
  cuts the recursion.
- The ``vec_`` variants are the same exact scan (TorchRL's vectorized versions drop geometric terms below
  1e-7), and every function is computed in the inputs' dtype (TorchRL forms its discounts in float32).
- Flags may be bool, integer or float 0/1 tensors. Outputs are float32 for 16-bit inputs.

The functionals do not import torchrl; the module classes do, when first accessed.
"""

from __future__ import annotations

import torch

import rlkernels

from .. import _checks as checks
from ._util import same_shape, scalar

__all__ = [
    "GAE",  # noqa: F822  (GAE, TDLambdaEstimator, VTrace: loaded by __getattr__, which imports torchrl)
    "TDLambdaEstimator",  # noqa: F822
    "VTrace",  # noqa: F822
    "generalized_advantage_estimate",
    "td_lambda_return_estimate",
    "vec_generalized_advantage_estimate",
    "vec_td_lambda_return_estimate",
    "vtrace_advantage_estimate",
]


_MODULES = ("GAE", "TDLambdaEstimator", "VTrace")


def __getattr__(name):
    if name in _MODULES:  # the classes subclass TorchRL's: torchrl is imported here, on first access
        from . import _torchrl_modules

        value = getattr(_torchrl_modules, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _op(fn):
    return f"integrations.torchrl.{fn}"


def _flags(op, done, terminated):
    """(terminated, truncated) as bool tensors from TorchRL's (done, terminated)."""
    done = checks.flag_tensor(op, "done", checks.tensor(op, "done", done))
    terminated = done if terminated is None else checks.flag_tensor(op, "terminated", terminated)
    same_shape(f"rlkernels.{op}", "done", done, terminated=terminated)
    return terminated, done & ~terminated


def _floats(op, **tensors):
    for name, x in tensors.items():
        checks.float_tensor(op, name, x)


def _unit(op, name, value, *, on_device=False):
    """A scalar in [0, 1]; with ``on_device``, a one-element GPU tensor is returned unread as a 0-d tensor."""
    if on_device and isinstance(value, torch.Tensor) and value.device.type != "cpu":
        return checks.scalar_tensor(op, name, value)
    value = scalar(f"rlkernels.{op}", name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"rlkernels.{op}: {name} must be in [0, 1], got {value}")
    return value


def _positive(op, name, value):
    value = scalar(f"rlkernels.{op}", name, value)
    if not value > 0.0:
        raise ValueError(f"rlkernels.{op}: {name} must be > 0, got {value}")
    return value


def generalized_advantage_estimate(gamma, lmbda, state_value, next_state_value, reward, done, terminated=None, *,
                                   time_dim=-2, backend=None):
    """GAE as TorchRL's: returns (advantage, value_target), value_target = advantage + state_value.

    delta_t = reward_t + gamma (1 - terminated_t) next_state_value_t - state_value_t;
    advantage_t = delta_t + gamma lmbda (1 - done_t) advantage_{t+1}.
    """
    op = _op("generalized_advantage_estimate")
    gamma, lmbda = _unit(op, "gamma", gamma, on_device=True), _unit(op, "lmbda", lmbda, on_device=True)
    _floats(op, state_value=state_value, next_state_value=next_state_value, reward=reward)
    term, trunc = _flags(op, done, terminated)
    same_shape(f"rlkernels.{op}", "state_value", state_value, next_state_value=next_state_value, reward=reward,
               done=done, terminated=terminated)
    return rlkernels.gae(reward, state_value, gamma=gamma, lam=lmbda, terminated=term, truncated=trunc,
                         next_values=next_state_value, time_dim=time_dim, backend=backend)


def vec_generalized_advantage_estimate(gamma, lmbda, state_value, next_state_value, reward, done, terminated=None,
                                       *, time_dim=-2, backend=None):
    """TorchRL's vectorized GAE: the same exact fused scan as :func:`generalized_advantage_estimate`."""
    return generalized_advantage_estimate(gamma, lmbda, state_value, next_state_value, reward, done, terminated,
                                          time_dim=time_dim, backend=backend)


def td_lambda_return_estimate(gamma, lmbda, next_state_value, reward, done, terminated=None, rolling_gamma=None, *,
                              time_dim=-2, backend=None):
    """TD(lambda) return as TorchRL's: G_t = r_t + gamma ((1 - lmbda) V''_t + lmbda g_t), with V'' the next state
    value zeroed where terminated and g_t = V''_t where done or at the last step, else G_{t+1}.

    One reverse linear scan (:func:`rlkernels.linear_scan`): G_t = b_t + a_t G_{t+1} with
    a_t = gamma lmbda (1 - done_t), b_t = r_t + gamma V''_t (1 - lmbda (1 - done_t)), G after the end = V''_{T-1}.
    ``rolling_gamma`` only matters for per-step gamma tensors (not supported): None and True are accepted.
    """
    op = _op("td_lambda_return_estimate")
    gamma, lmbda = _unit(op, "gamma", gamma, on_device=True), _unit(op, "lmbda", lmbda, on_device=True)
    if rolling_gamma is not None and not rolling_gamma:
        raise ValueError(f"rlkernels.{op}: rolling_gamma=False is expected only with time-sensitive gamma or "
                         "lambda values, and this adapter takes scalar gamma and lmbda")
    _floats(op, next_state_value=next_state_value, reward=reward)
    term, trunc = _flags(op, done, terminated)
    same_shape(f"rlkernels.{op}", "next_state_value", next_state_value, reward=reward, done=done,
               terminated=terminated)
    if reward.dim() == 0:
        raise ValueError(f"rlkernels.{op}: reward must have a time dimension, got a 0-d tensor")
    td = checks.dim_index(f"{op}", "time_dim", time_dim, reward.dim())
    dtype = checks.accumulate_dtype(checks.common_float_dtype(reward, next_state_value))
    done_b = term | trunc
    if isinstance(gamma, torch.Tensor):  # on the device, unread
        checks.same_device(op, "reward", reward, gamma=gamma)
        gamma = gamma.to(dtype)
    if isinstance(lmbda, torch.Tensor):
        checks.same_device(op, "reward", reward, lmbda=lmbda)
        lmbda = lmbda.to(dtype)
    nv = torch.where(term, torch.zeros((), dtype=dtype, device=reward.device), next_state_value.to(dtype))
    cont = (~done_b).to(dtype)
    a = (gamma * lmbda) * cont
    b = reward.to(dtype) + gamma * nv * (1.0 - lmbda * cont)
    initial = nv.select(td, -1) if reward.shape[td] > 0 else None
    return rlkernels.linear_scan(a, b, reverse=True, initial=initial, time_dim=td, backend=backend)


def vec_td_lambda_return_estimate(gamma, lmbda, next_state_value, reward, done, terminated=None, rolling_gamma=None,
                                  *, time_dim=-2, backend=None):
    """TorchRL's vectorized TD(lambda) return: the same exact scan as :func:`td_lambda_return_estimate`."""
    return td_lambda_return_estimate(gamma, lmbda, next_state_value, reward, done, terminated, rolling_gamma,
                                     time_dim=time_dim, backend=backend)


def vtrace_advantage_estimate(gamma, log_pi, log_mu, state_value, next_state_value, reward, done, terminated=None,
                              rho_thresh=1.0, c_thresh=1.0, time_dim=-2, *, backend=None):
    """V-trace as TorchRL's: returns (advantage, vs) (pg advantages first, as TorchRL does).

    rho = exp(log_pi - log_mu) (so ``log_pi`` is the learner's policy, ``log_mu`` the behaviour policy, whatever
    TorchRL's docstring says); rho_t clipped at ``rho_thresh`` for both the value target and the pg advantage,
    c_t at ``c_thresh``; no lambda (lam = 1). :func:`rlkernels.vtrace` with log_rhos = log_pi - log_mu.
    """
    op = _op("vtrace_advantage_estimate")
    gamma = _unit(op, "gamma", gamma)
    rho_thresh, c_thresh = _positive(op, "rho_thresh", rho_thresh), _positive(op, "c_thresh", c_thresh)
    _floats(op, log_pi=log_pi, log_mu=log_mu, state_value=state_value, next_state_value=next_state_value,
            reward=reward)
    term, trunc = _flags(op, done, terminated)
    same_shape(f"rlkernels.{op}", "state_value", state_value, log_pi=log_pi, log_mu=log_mu,
               next_state_value=next_state_value, reward=reward, done=done, terminated=terminated)
    vs, pg = rlkernels.vtrace(reward, state_value, log_pi - log_mu, gamma=gamma, lam=1.0, rho_clip=rho_thresh,
                              c_clip=c_thresh, pg_rho_clip=rho_thresh, terminated=term, truncated=trunc,
                              next_values=next_state_value, time_dim=time_dim, backend=backend)
    return pg, vs
