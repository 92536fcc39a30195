"""The baselines of every benchmark case: the code trainers run today, adapted to one benchmark input.

The trainers' functions themselves are in trainers.py (one transcription each, shared with the tests). The
``*_providers`` functions below map one input to a trainer's conventions *outside* the timed region and return
zero-argument callables: only the call is timed, as a user would pay for it inside their trainer. The first
provider of a list is the reference every rlkernels backend and every comparable baseline is checked against.

Conventions, mapped to rlkernels (docs/design.md §4.2, ``terminated[t]``: s_{t+1} is terminal):
- SB3 ``episode_starts[t]`` and CleanRL ``dones[t]`` mark obs t as the first of a new episode, so
  ``dones[t + 1] == terminated[t]``; ``next_done`` / ``dones`` of the final step is ``terminated[T - 1]``.
- TorchRL wants ``[*B, T, 1]`` tensors (time on dim -2) with ``next_state_value`` spelled out.
- verl works on ``[B, T]`` with a 0/1 ``response_mask`` and no bootstrap (the value after the end is 0).
- TorchBeast's V-trace takes per-step discounts (gamma, 0 after a terminal step) and has no lambda.
- SpinningUp's lfilter discount_cumsum has no episode boundaries (one path at a time).

Baselines that call a third-party package (scipy's lfilter, TorchRL's vectorized estimators) are optional:
when the package is missing the provider is still listed, with ``call=None`` and a note saying what to install.
A provider with ````compile`` set is also timed as ``torch.compile`` of its call, or is itself compiled code (see
Provider and engine.py).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import trainers


@dataclass
class Provider:
    """One baseline on one input: ``call()`` is timed; ``to_torch(out)`` maps its result to the outputs
    compared (untimed). ``note`` says where its semantics differ. ``compile``: "" (no compiled variant),
    "inline" (also timed as torch.compile of ``call``, compiled in this process), "child" (the same for a
    Python loop over T, which torch.compile unrolls: compiled in a child process killed past a timeout), or
    "self" (``call`` is compiled code that compiles on its first call: run once untimed first, and not run
    when compiling is off)."""

    name: str
    call: Callable[[], object] | None  # None: skipped, ``note`` says why
    to_torch: Callable[[object], object] = lambda out: out
    note: str = ""
    comparable: bool = True  # same semantics as rlkernels on this input
    compile: str = ""


TORCHRL_NOTE = "inputs made [B, T, 1] before timing"

DISABLED: set[str] = set()  # packages whose baselines are left out as if missing (--skip-baselines)


def missing(package: str) -> str | None:
    """None when ``package`` imports, else the note of a skipped provider."""
    if package in DISABLED:
        return f"skipped: {package} baselines left out (--skip-baselines)"
    if importlib.util.find_spec(package) is None:
        return f"skipped: {package} is not installed (pip install {package})"
    return None


def _skipped(name: str, package: str) -> Provider:
    return Provider(name, None, note=missing(package), comparable=False)


def _torchrl_functional():
    from torchrl.objectives.value import functional  # imported late: torchrl is slow to import

    return functional


def _torchrl_layout(x: torch.Tensor) -> torch.Tensor:
    """[T, B] -> TorchRL's [B, T, 1] (time on dim -2), contiguous as a TensorDict would hold it."""
    return x.transpose(0, 1).unsqueeze(-1).contiguous()


def _cleanrl_flags(terminated: torch.Tensor, dtype):
    """rlkernels' terminated[t] -> CleanRL's (dones, next_done): dones[t + 1] = terminated[t]."""
    dones = torch.zeros(terminated.shape, dtype=dtype, device=terminated.device)
    dones[1:] = terminated[:-1].to(dtype)
    return dones, terminated[-1].to(dtype)


def _numpy_pair(out, device):
    return tuple(
        torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=torch.float32) for x in out
    )


def retrace_providers(rewards, q_taken, next_v, log_rhos, terminated, gamma, lam) -> list[Provider]:
    """Baselines for time-major Retrace on ``[T, B]`` (c_clip 1): rlax's recursion as a torch loop, with
    rlax's inputs made from ours (q and c of times 1..T-1, discount gamma (1 - terminated))."""
    discounts = gamma * (~terminated).to(rewards.dtype)
    c = lam * torch.clamp(torch.exp(log_rhos), max=1.0)
    return [
        Provider(
            "rlax loop",
            lambda: trainers.rlax_general_off_policy_returns_from_q_and_v(q_taken[1:], next_v, rewards, discounts,
                                                                         c[1:]),
        )
    ]


# --------------------------------------------------------------------------------------------------------
# returns: GAE, discounted returns, V-trace
# --------------------------------------------------------------------------------------------------------


def gae_providers(rewards, values, terminated, bootstrap_value, gamma, lam, *, numpy=True) -> list[Provider]:
    """Baselines for time-major GAE on ``[T, B]`` with per-step ``terminated`` flags."""
    device = rewards.device
    dones, next_done = _cleanrl_flags(terminated, rewards.dtype)
    providers = [
        Provider(
            "cleanrl loop",
            lambda: trainers.cleanrl_gae(rewards, values, dones, bootstrap_value, next_done, gamma, lam),
            compile="child",
        )
    ]
    if numpy:
        r, v = rewards.cpu().numpy(), values.cpu().numpy()
        starts, last_v = dones.cpu().numpy(), bootstrap_value.cpu().numpy()
        last_done = next_done.cpu().numpy()
        providers += [
            Provider(
                "sb3 numpy loop",
                lambda: trainers.sb3_compute_returns_and_advantage(r, v, starts, last_v, last_done, gamma, lam),
                lambda out: _numpy_pair(out, device),
            ),
            Provider(
                "scipy lfilter",
                lambda: trainers.spinningup_gae(r, v, last_v, gamma, lam),
                lambda out: _numpy_pair(out, device),
                note="ignores terminated (spinningup: one episode per path)",
                comparable=False,
            )
            if not missing("scipy")
            else _skipped("scipy lfilter", "scipy"),
        ]
    if missing("torchrl"):
        return [*providers, _skipped("torchrl vec_gae", "torchrl")]
    fn = _torchrl_functional()
    next_values = torch.cat([values[1:], bootstrap_value[None]])
    tv, tnv, tr, tterm = map(_torchrl_layout, (values, next_values, rewards, terminated))
    providers.append(
        Provider(
            "torchrl vec_gae",
            lambda: fn.vec_generalized_advantage_estimate(gamma, lam, tv, tnv, tr, tterm, tterm),
            lambda out: tuple(x.squeeze(-1).transpose(0, 1) for x in out),
            note=TORCHRL_NOTE,
        )
    )
    return providers


def returns_providers(rewards, terminated, bootstrap_value, gamma, *, numpy=True) -> list[Provider]:
    """Baselines for time-major discounted returns on ``[T, B]``."""
    device = rewards.device
    dones, next_done = _cleanrl_flags(terminated, rewards.dtype)
    providers = [
        Provider(
            "cleanrl loop",
            lambda: trainers.cleanrl_returns(rewards, dones, bootstrap_value, next_done, gamma),
            compile="child",
        )
    ]
    if numpy and missing("scipy"):
        providers.append(_skipped("scipy lfilter", "scipy"))
    elif numpy:
        r = rewards.cpu().numpy()
        providers.append(
            Provider(
                "scipy lfilter",
                lambda: trainers.spinningup_discount_cumsum(r, gamma),
                lambda out: torch.from_numpy(out.copy()).to(device=device, dtype=torch.float32),
                note="ignores terminated and bootstrap",
                comparable=False,
            )
        )
    if missing("torchrl"):
        return [*providers, _skipped("torchrl vec_td1", "torchrl")]
    fn = _torchrl_functional()
    next_values = torch.cat([torch.zeros_like(rewards[1:]), bootstrap_value[None]])  # read at done/end only
    tr, tterm, tnv = map(_torchrl_layout, (rewards, terminated, next_values))
    providers.append(
        Provider(
            "torchrl vec_td1",
            lambda: fn.vec_td1_return_estimate(gamma, tnv, tr, tterm, tterm),
            lambda out: out.squeeze(-1).transpose(0, 1),
            note=TORCHRL_NOTE,
        )
    )
    return providers


def masked_gae_providers(rewards, values, mask, gamma, lam) -> list[Provider]:
    """Baselines for token-level GAE on ``[B, T]`` with a 0/1 mask (verl). verl leaves carries at
    masked positions where rlkernels writes 0, so outputs are compared times the mask."""
    fmask = mask.to(rewards.dtype)  # verl multiplies by the mask, so it holds it as a number
    return [
        Provider(
            "verl loop",
            lambda: trainers.verl_gae(rewards, values, fmask, gamma, lam),
            lambda out: tuple(x * fmask for x in out),
        )
    ]


def vtrace_providers(rewards, values, log_rhos, terminated, bootstrap_value, gamma) -> list[Provider]:
    """Baselines for time-major V-trace on ``[T, B]`` (lambda = 1, every clip 1)."""
    discounts = gamma * (~terminated).to(rewards.dtype)
    providers = [
        Provider(
            "torchbeast loop",
            lambda: trainers.torchbeast_vtrace(log_rhos, discounts, rewards, values, bootstrap_value),
        )
    ]
    if missing("torchrl"):
        return [*providers, _skipped("torchrl vtrace", "torchrl")]
    fn = _torchrl_functional()
    next_values = torch.cat([values[1:], bootstrap_value[None]])
    tv, tnv, tr, tterm, tlr = map(_torchrl_layout, (values, next_values, rewards, terminated, log_rhos))
    zeros = torch.zeros_like(tlr)  # log_mu: TorchRL forms rho = exp(log_pi - log_mu)
    providers.append(
        Provider(
            "torchrl vtrace",
            lambda: fn.vtrace_advantage_estimate(gamma, tlr, zeros, tv, tnv, tr, tterm, tterm),
            lambda out: (out[1].squeeze(-1).transpose(0, 1), out[0].squeeze(-1).transpose(0, 1)),
            note=TORCHRL_NOTE,
        )
    )
    return providers


# --------------------------------------------------------------------------------------------------------
# logprobs: log-probabilities of the sampled tokens
# --------------------------------------------------------------------------------------------------------


def torch_logprobs(logits, tokens):
    """verl/OpenRLHF's plain form: log_softmax over the vocabulary, then gather the tokens' entries."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def logprobs_providers(logits, tokens) -> list[Provider]:
    return [
        Provider("torch log_softmax+gather", lambda: torch_logprobs(logits, tokens), compile="inline"),
        Provider("trl selective_log_softmax", lambda: trainers.trl_selective_log_softmax(logits, tokens)),
    ]


def logprobs_entropy_providers(logits, tokens) -> list[Provider]:
    def verl():
        return torch_logprobs(logits, tokens), trainers.verl_entropy_from_logits(logits)

    return [Provider("verl log_softmax+gather, entropy_from_logits", verl, compile="inline")]


def forward_backward(fn, leaf, *inputs):
    """A call that runs ``fn``'s forward and backward of its first output (summed); returns (out, grad)."""

    def call():
        leaf.grad = None
        out = fn(leaf, *inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
        return out.detach(), leaf.grad

    return call


def logprobs_backward_providers(leaf, tokens) -> list[Provider]:
    return [
        Provider(
            "torch log_softmax+gather",
            forward_backward(torch_logprobs, leaf, tokens),
            compile="inline",
        ),
        Provider("trl selective_log_softmax", forward_backward(trainers.trl_selective_log_softmax, leaf, tokens)),
    ]


def torch_head_logprobs(hidden, weight, tokens):
    """The unfused LM head: logits, log_softmax in float32, gather, and the entropy (verl's entropy_from_logits
    form on the log-softmax)."""
    logp_all = torch.log_softmax((hidden @ weight.t()).float(), -1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def head_forward_backward(fn, hidden, weight):
    """A call that runs ``fn(hidden, weight)`` -> (logp, entropy) and the backward of logp.sum() + entropy.sum();
    returns (logp, entropy, d hidden, d weight)."""

    def call():
        hidden.grad = weight.grad = None
        logp, entropy = fn(hidden, weight)[:2]
        (logp.sum() + entropy.sum()).backward()
        return logp.detach(), entropy.detach(), hidden.grad, weight.grad

    return call


def _eager_fits(n, vocab, dtype, device, tensors_of_logits) -> str:
    """'' when the unfused head's logits-sized tensors (the logits, then ``tensors_of_logits`` float32 ones, counted
    with a margin) fit on the GPU, else the note of its skipped row."""
    if device != "cuda":
        return ""
    need = n * vocab * (dtype.itemsize + 4 * tensors_of_logits)
    free, _ = torch.cuda.mem_get_info()
    if need < 0.9 * free:
        return ""
    return f"out of memory: needs about {need / 2**30:.0f} GiB of logits-sized tensors, {free / 2**30:.0f} GiB free"


def torch_head_logprobs_checkpointed(hidden, weight, tokens, rows=4096):
    """The unfused head over row chunks, each under torch.utils.checkpoint (recomputed in the backward): what a
    user does when the whole logits do not fit."""
    from torch.utils.checkpoint import checkpoint

    outs = [checkpoint(torch_head_logprobs, hidden[i:i + rows], weight, tokens[i:i + rows], use_reentrant=False)
            for i in range(0, hidden.shape[0], rows)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


CHECKPOINTED = "torch matmul+log_softmax+gather+entropy, 4096-row chunks, checkpointed"


def _trl_chunked(hidden, weight, tokens):
    from trl.kernels import ChunkedLogProbFunction

    # TRL's add_fused_lm_head passes a vocabulary tile of 32768 (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    return ChunkedLogProbFunction.apply(hidden, weight, None, tokens, 1.0, 32768, None, 1.0, ("entropy",))[:2]


def linear_logprobs_providers(hidden, weight, tokens, device) -> list[Provider]:
    """The unfused head (eager and compiled), TRL's chunked head, and the forward's one matmul alone (the floor,
    not comparable). The first that runs is the reference."""
    n, vocab = hidden.shape[0], weight.shape[0]
    oom = _eager_fits(n, vocab, hidden.dtype, device, 6)
    eager = Provider("torch matmul+log_softmax+gather+entropy", None if oom else
                     (lambda: torch_head_logprobs(hidden, weight, tokens)), note=oom, comparable=not oom,
                     compile="" if oom else "inline")
    trl_note = missing("trl")
    trl = Provider("trl ChunkedLogProbFunction", None if trl_note else (lambda: _trl_chunked(hidden, weight, tokens)),
                   note=trl_note or "", comparable=not trl_note)
    matmul = Provider("matmul alone (hidden @ weight.T)", lambda: hidden @ weight.t(), comparable=False,
                      note="the forward's one matmul: the floor, not the same output")
    chunked = [Provider(CHECKPOINTED, lambda: torch_head_logprobs_checkpointed(hidden, weight, tokens))] if oom else []
    return chunked + [p for p in (eager, trl) if p.call is not None] + [p for p in (eager, trl) if p.call is None] + [
        matmul]


def linear_logprobs_backward_providers(hidden, weight, tokens, device) -> list[Provider]:
    """As linear_logprobs_providers, forward and backward (logp.sum() + entropy.sum()); the floor is the unfused
    path's three matmuls."""
    n, vocab = hidden.shape[0], weight.shape[0]
    oom = _eager_fits(n, vocab, hidden.dtype, device, 10)
    eager = Provider("torch matmul+log_softmax+gather+entropy",
                     None if oom else head_forward_backward(lambda h, w: torch_head_logprobs(h, w, tokens), hidden,
                                                            weight),
                     note=oom, comparable=not oom, compile="" if oom else "inline")
    trl_note = missing("trl")
    trl = Provider("trl ChunkedLogProbFunction",
                   None if trl_note else head_forward_backward(lambda h, w: _trl_chunked(h, w, tokens), hidden,
                                                               weight),
                   note=trl_note or "", comparable=not trl_note)
    h, w = hidden.detach(), weight.detach()
    grad_logits = torch.randn((n, vocab), dtype=h.dtype, device=h.device) if not oom else None

    def three_matmuls():
        return h @ w.t(), grad_logits @ w, grad_logits.t() @ h

    matmul = Provider("3 matmuls alone (forward, d hidden, d weight)", None if oom else three_matmuls,
                      comparable=False, note=oom or "the unfused path's matmuls: the floor, not the same output")
    chunked = [Provider(CHECKPOINTED, head_forward_backward(
        lambda h, w: torch_head_logprobs_checkpointed(h, w, tokens), hidden, weight))] if oom else []
    return chunked + [p for p in (eager, trl) if p.call is not None] + [p for p in (eager, trl) if p.call is None] + [
        matmul]


# --------------------------------------------------------------------------------------------------------
# ppo: the policy and value losses
# --------------------------------------------------------------------------------------------------------


def ppo_providers(logp, old_logp, advantages, mask, *, clip_low, clip_high, dual_clip, leaf=None) -> list[Provider]:
    """verl's compute_policy_loss (token-mean) on the same inputs: the forward, or with ``leaf`` (a copy of
    logp that requires grad) the forward and backward. Outputs compared on the loss (and logp's gradient)."""
    fmask = mask.to(logp.dtype)  # verl's response_mask is the attention mask, a number

    def verl(lp):
        return trainers.verl_compute_policy_loss(
            old_logp, lp, advantages, fmask, cliprange_low=clip_low, cliprange_high=clip_high, clip_ratio_c=dual_clip
        )

    if leaf is None:
        return [Provider("verl eager", lambda: verl(logp), lambda out: out[0], compile="inline")]
    return [Provider("verl eager", forward_backward(verl, leaf), compile="inline")]


def value_loss_providers(leaf, old_values, returns, mask, *, clip) -> list[Provider]:
    """verl's compute_value_loss (token-mean), forward and backward."""
    fmask = mask.to(leaf.dtype)

    def verl(v):
        return trainers.verl_compute_value_loss(v, returns, old_values, fmask, clip)

    return [Provider("verl eager", forward_backward(verl, leaf), compile="inline")]


# --------------------------------------------------------------------------------------------------------
# bellman: Q-learning targets, the TD loss, model-based backups
# --------------------------------------------------------------------------------------------------------


def eager_q_targets(kind, r, next_q, term, online, probs, gamma, temperature):
    """The eager torch code of a DQN-family trainer's targets (max: DQN, double: Double DQN, expected: expected
    SARSA, soft: soft Q-learning)."""
    if kind == "max":
        v = next_q.max(1).values
    elif kind == "double":
        v = next_q.gather(1, online.argmax(1, keepdim=True)).squeeze(1)
    elif kind == "expected":
        v = (probs * next_q).sum(1)
    else:
        v = temperature * torch.logsumexp(next_q / temperature, 1)
    return r + gamma * (1.0 - term.float()) * v


def q_targets_providers(kind, r, next_q, term, online, probs, gamma, temperature) -> list[Provider]:
    call = lambda: eager_q_targets(kind, r, next_q, term, online, probs, gamma, temperature)
    return [Provider("eager torch", call, compile="inline")]


def eager_td_step(q, actions, targets):
    """SB3's DQN loss step (smooth_l1 = Huber, delta 1, mean) as eager torch: gather, loss, backward."""
    q.grad = None
    qsa = q.gather(1, actions.unsqueeze(1)).squeeze(1)
    loss = F.huber_loss(qsa, targets)
    loss.backward()
    return loss.detach(), (targets - qsa).detach(), q.grad


def td_loss_providers(q, actions, targets) -> list[Provider]:
    return [Provider("eager torch", lambda: eager_td_step(q, actions, targets), compile="inline")]


def eager_backup(P, R, V, gamma):
    """One Bellman optimality backup as planners write it: einsum, then max over actions."""
    Q = R + gamma * torch.einsum("bsat,bt->bsa", P, V)
    V_new, policy = Q.max(-1)
    return Q, V_new, policy


def eager_value_iteration(P, R, gamma, tol, max_iters, backup=eager_backup):
    """Value iteration as a Python loop: a backup, then a convergence test that syncs with the host."""
    V = torch.zeros(P.shape[:2], dtype=P.dtype, device=P.device)
    for k in range(1, max_iters + 1):
        Q, V_new, policy = backup(P, R, V, gamma)
        residual = (V_new - V).abs().amax(-1)
        V = V_new
        if residual.max().item() < tol:  # the host sync every Python loop pays
            break
    return V, Q, policy, k, residual


def backup_providers(P, R, V, gamma) -> list[Provider]:
    return [Provider("eager torch", lambda: eager_backup(P, R, V, gamma), note="einsum + max", compile="inline")]


def value_iteration_providers(P, R, gamma, tol, max_iters) -> list[Provider]:
    """The eager loop, and the same loop around torch.compile of the backup (the loop itself stays Python:
    its convergence test needs the host)."""
    compiled = []

    def compiled_loop():
        if not compiled:
            compiled.append(torch.compile(eager_backup))
        return eager_value_iteration(P, R, gamma, tol, max_iters, backup=compiled[0])

    return [
        Provider(
            "eager torch",
            lambda: eager_value_iteration(P, R, gamma, tol, max_iters),
            lambda out: out[0],
            note="einsum loop, .item() per iteration",
        ),
        Provider("torch.compile(backup) loop", compiled_loop, lambda out: out[0], compile="self"),
    ]
