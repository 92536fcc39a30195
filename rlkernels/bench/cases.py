"""The benchmark cases of every op family: shapes, inputs, the rlkernels call and the baselines of each.

A SHAPES entry is ``(kind, dims)`` or ``(kind, dims, caches)``; ``make_cases`` turns it into one or more Cases
(q_targets: one per target kind; gather_logprobs: forward, forward with entropy, forward + backward; ...).
``caches`` are the cache states the case is timed in, "run" standing for the run's ``--cache``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import baselines
from .baselines import Provider, forward_backward

GAMMA, LAM = 0.99, 0.95
LONG_T = 4_000_000  # the one-long-sequence shape
PPO_CLIP = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0}
VALUE_CLIP = 0.2
Q_KINDS = ("max", "double", "expected", "soft")
TEMPERATURE = 0.5  # soft Q-learning
MDP_GAMMA = 0.9
VI_TOL, VI_MAX_ITERS = 1e-4, 1000  # float32: a tol near V's rounding (1e-6 of |V| ~ 10) would time noise

FAMILIES = {
    "returns": ("gae", "gae-masked", "discounted_returns", "vtrace", "retrace"),
    "logprobs": ("gather_logprobs", "linear_logprobs"),
    "ppo": ("ppo_policy_loss", "value_loss"),
    "bellman": ("q_targets", "td_loss", "bellman_backup", "value_iteration"),
}
KINDS = tuple(kind for kinds in FAMILIES.values() for kind in kinds)
FAMILY_OF = {kind: family for family, kinds in FAMILIES.items() for kind in kinds}

# A replay batch's next_q / q is usually the output of the network forward just before (cache-resident: the
# warm rows) but may come from DRAM (the cold rows): the sample-based Bellman ops are timed in both states.
BOTH = ("run", "warm")
# A DQN replay batch as trainers sample it (CleanRL's default batch is 128, SB3's 32) is cache-resident, and its
# time is the fixed cost of the calls (dispatch, autograd), not memory traffic: timed warm only.
WARM = ("warm",)

SHAPES = {
    "full": [
        ("gae", (2048, 64)),
        ("gae", (2048, 8)),  # a few environments: fewer sequences than the CPU scan engine's 16 lanes
        ("gae", (128, 4096)),
        ("gae-masked", (64, 4096)),
        ("gae", (LONG_T, 1)),
        ("discounted_returns", (2048, 64)),
        ("vtrace", (2048, 64)),
        ("retrace", (2048, 64)),
        ("gather_logprobs", (1024, 32000)),
        ("linear_logprobs", (2048, 512, 32000)),
        ("ppo_policy_loss", (256, 4096)),
        ("ppo_policy_loss", (1 << 20,)),
        ("value_loss", (256, 4096)),
        ("q_targets", (65536, 18), BOTH),
        ("td_loss", (65536, 18), BOTH),
        ("q_targets", (128, 18), WARM),
        ("td_loss", (128, 18), WARM),
        ("bellman_backup", (64, 256, 8)),
        ("value_iteration", (64, 256, 8)),
    ],
    # The one long sequence is 1M steps: the CleanRL loop, the reference every output is checked against,
    # makes ~3 launches per step and would need minutes per call at 16M.
    "cuda": [
        ("gae", (128, 4096)),
        ("gae", (2048, 64)),
        ("gae-masked", (256, 8192)),
        ("gae", (1_000_000, 1)),
        ("discounted_returns", (2048, 64)),
        ("vtrace", (2048, 64)),
        ("retrace", (2048, 64)),
        ("gather_logprobs", (16384, 32000)),
        ("linear_logprobs", (8192, 4096, 151936)),
        ("linear_logprobs", (32768, 4096, 151936)),
        ("ppo_policy_loss", (512, 8192)),
        ("ppo_policy_loss", (1 << 22,)),
        ("value_loss", (512, 8192)),
        ("q_targets", (65536, 18), BOTH),
        ("td_loss", (65536, 18), BOTH),
        ("q_targets", (128, 18), WARM),
        ("td_loss", (128, 18), WARM),
        ("bellman_backup", (64, 256, 8)),
        ("value_iteration", (64, 256, 8)),
    ],
    "quick": [
        ("gae", (256, 16)),
        ("gae", (32, 512)),
        ("gae-masked", (8, 512)),
        ("gae", (10_000, 1)),
        ("discounted_returns", (256, 16)),
        ("vtrace", (256, 16)),
        ("retrace", (256, 16)),
        ("gather_logprobs", (64, 1000)),
        ("linear_logprobs", (64, 32, 1000)),
        ("ppo_policy_loss", (16, 256)),
        ("ppo_policy_loss", (4096,)),
        ("value_loss", (16, 256)),
        ("q_targets", (4096, 18), BOTH),
        ("td_loss", (4096, 18), BOTH),
        ("q_targets", (128, 18), WARM),
        ("td_loss", (128, 18), WARM),
        ("bellman_backup", (8, 64, 4)),
        ("value_iteration", (8, 64, 4)),
    ],
}

# --sizes: a few sizes per series (one op and layout with one dimension swept) for the GB/s-vs-size plot.
# The loop baselines cost about T Python steps per call, so T stays modest where B is swept.
SIZES = {
    "full": [
        *[("gae", (512, b)) for b in (4, 32, 256, 2048)],
        *[("gae-masked", (b, 1024)) for b in (2, 16, 128)],
        *[("gae", (t, 1)) for t in (4096, 32768, 262144)],
        *[("discounted_returns", (512, b)) for b in (4, 32, 256, 2048)],
        *[("vtrace", (512, b)) for b in (4, 32, 256, 2048)],
        *[("gather_logprobs", (n, 32000)) for n in (16, 128, 1024)],
        *[("ppo_policy_loss", (b, 1024)) for b in (4, 32, 256)],
        *[("value_loss", (b, 1024)) for b in (4, 32, 256)],
        *[("q_targets", (b, 18)) for b in (128, 4096, 65536, 1048576)],
        *[("td_loss", (b, 18)) for b in (128, 4096, 65536, 1048576)],
        *[("bellman_backup", (b, 256, 8)) for b in (1, 8, 64)],
    ],
    "quick": [
        *[("gae", (64, b)) for b in (4, 64, 1024)],
        *[("gae-masked", (b, 256)) for b in (2, 16)],
        *[("discounted_returns", (64, b)) for b in (4, 64, 1024)],
        *[("vtrace", (64, b)) for b in (4, 64)],
        *[("gather_logprobs", (n, 1000)) for n in (8, 64)],
        *[("ppo_policy_loss", (b, 256)) for b in (2, 16)],
        *[("value_loss", (b, 256)) for b in (2, 16)],
        *[("q_targets", (b, 18)) for b in (128, 4096)],
        *[("td_loss", (b, 18)) for b in (128, 4096)],
        *[("bellman_backup", (b, 64, 4)) for b in (1, 8)],
    ],
}


def entries(table: dict, size: str, ops=()) -> list[tuple[str, tuple, tuple]]:
    """(kind, dims, caches) of ``table[size]``; with ``ops`` (kinds or family names), only theirs, in that order."""
    order = {}
    for op in ops:
        for kind in FAMILIES.get(op, (op,)):
            order.setdefault(kind, len(order))
    out = [(*entry, ("run",))[:3] for entry in table[size]]
    if not ops:
        return out
    return sorted((e for e in out if e[0] in order), key=lambda e: order[e[0]])  # stable: table order within a kind


@dataclass
class Case:
    """One op on one input: the rlkernels call per backend, the baselines (the first is the reference the
    others are checked against), and the byte model: ``reads`` are the inputs, ``writes`` tensors shaped like
    the outputs; each is counted once (a tensor listed twice is moved twice)."""

    family: str
    kind: str  # the kind of its SHAPES entry
    dims: tuple[int, ...]
    op: str  # the row's op: "gae", "q_targets[max]", "td_loss fwd+bwd", ...
    shape: str
    series: str  # the curve of a --sizes sweep: the shape with the swept dimension as *
    rlkernels: Callable[[str], object] | None
    baselines: list[Provider]
    reads: list[torch.Tensor]
    writes: list[torch.Tensor]
    steps: int = 0  # length of a Python loop baseline's time axis (0: none)
    caches: tuple[str, ...] = ("run",)
    runs: dict = field(default_factory=dict)  # timer settings of a full (not --quick) run
    # (bytes, note) from the reference's output, where the bytes depend on it (value iteration's iterations)
    traffic: Callable[[object], tuple[int, str]] | None = None
    nbytes: int | None = None  # set by ``traffic`` when the case runs
    dtype: str = "float32"  # of the inputs
    memory: bool = False  # also report each provider's peak memory (one more, untimed call)
    tol: tuple[float, float] = (1e-4, 1e-4)  # (rtol, atol) of the output checks

    @property
    def numel(self) -> int:
        return math.prod(self.dims)


def make_cases(kind: str, dims: tuple[int, ...], device: str, rlk, *, numpy: bool, caches=("run",)) -> list[Case]:
    """The cases of one SHAPES entry; ``rlk`` is the rlkernels module, or None to time the baselines alone;
    ``numpy`` adds the NumPy/SciPy baselines."""
    if kind not in FAMILY_OF:
        raise ValueError(f"unknown benchmark kind {kind!r}; choose from {', '.join(KINDS)}")
    cases = _MAKERS[FAMILY_OF[kind]](kind, tuple(dims), device, rlk, numpy)
    for case in cases:
        case.caches = tuple(caches)
    return cases


def _case(kind, dims, op, shape, series, run, providers, reads, writes, **kw) -> Case:
    return Case(FAMILY_OF[kind], kind, dims, op, shape, series, run, providers, reads, writes, **kw)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------
# returns
# --------------------------------------------------------------------------------------------------------


def time_major_inputs(T: int, B: int, device: str, seed: int = 0, p_terminated: float = 0.01):
    """CleanRL/SB3 rollout layout [T, B]: rewards, values, terminated (bool), bootstrap_value [B]."""
    g = _generator(seed)
    rewards, values = torch.randn(T, B, generator=g), torch.randn(T, B, generator=g)
    terminated = torch.rand(T, B, generator=g) < p_terminated
    bootstrap_value = torch.randn(B, generator=g)
    return [x.to(device) for x in (rewards, values, terminated, bootstrap_value)]


def masked_inputs(B: int, T: int, device: str, seed: int = 0):
    """LLM layout [B, T]: each row is a prompt of random length (masked out), a response, then
    padding (masked out). Returns rewards, values, mask (bool)."""
    g = _generator(seed)
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    prompt = torch.randint(T // 8, T // 2, (B, 1), generator=g)
    response = (torch.rand(B, 1, generator=g) * 0.75 + 0.25) * (T - prompt)  # 25% to 100% of what is left
    t = torch.arange(T)
    mask = (t >= prompt) & (t < prompt + response.long())
    return [x.to(device) for x in (rewards, values, mask)]


def _returns_cases(kind, dims, device, rlk, numpy) -> list[Case]:
    a, b = dims
    if kind == "gae-masked":
        rewards, values, mask = masked_inputs(a, b, device)
        providers = baselines.masked_gae_providers(rewards, values, mask, GAMMA, LAM)
        run = None
        if rlk is not None:  # looked up at call time: an op not written yet fails as one row
            run = lambda backend: rlk.gae(
                rewards, values, gamma=GAMMA, lam=LAM, mask=mask, time_dim=-1, backend=backend
            )
        return [
            _case(kind, dims, "gae", f"[B={a}, T={b}] masked", f"gae masked [B=*, T={b}]", run, providers,
                  [rewards, values, mask], [rewards, rewards], steps=b)
        ]
    rewards, values, terminated, bootstrap = time_major_inputs(a, b, device)
    boot = {"terminated": terminated, "bootstrap_value": bootstrap}
    shape = f"[T={a}, B={b}]"
    series = f"{kind} [T=*, B=1]" if b == 1 else f"{kind} [T={a}, B=*]"
    run = None
    if kind == "discounted_returns":
        providers = baselines.returns_providers(rewards, terminated, bootstrap, GAMMA, numpy=numpy)
        if rlk is not None:
            run = lambda backend: rlk.discounted_returns(rewards, gamma=GAMMA, **boot, backend=backend)
        reads, writes = [rewards, terminated, bootstrap], [rewards]
    elif kind == "vtrace":
        log_rhos = 0.5 * torch.randn(a, b, generator=_generator(1)).to(device)
        providers = baselines.vtrace_providers(rewards, values, log_rhos, terminated, bootstrap, GAMMA)
        if rlk is not None:
            run = lambda backend: rlk.vtrace(rewards, values, log_rhos, gamma=GAMMA, **boot, backend=backend)
        reads, writes = [rewards, values, log_rhos, terminated, bootstrap], [rewards, rewards]
    elif kind == "retrace":
        gen = _generator(1)
        next_v = torch.randn(a, b, generator=gen).to(device)
        log_rhos = (0.5 * torch.randn(a, b, generator=gen)).to(device)
        q_taken = values
        providers = baselines.retrace_providers(rewards, q_taken, next_v, log_rhos, terminated, GAMMA, LAM)
        if rlk is not None:
            run = lambda backend: rlk.retrace(rewards, q_taken, next_v, log_rhos, gamma=GAMMA, lam=LAM,
                                              terminated=terminated, backend=backend)
        reads, writes = [rewards, q_taken, next_v, log_rhos, terminated], [rewards]
    else:
        providers = baselines.gae_providers(rewards, values, terminated, bootstrap, GAMMA, LAM, numpy=numpy)
        if rlk is not None:
            run = lambda backend: rlk.gae(rewards, values, gamma=GAMMA, lam=LAM, **boot, backend=backend)
        reads, writes = [rewards, values, terminated, bootstrap], [rewards, rewards]
    return [_case(kind, dims, kind, shape, series, run, providers, reads, writes, steps=a)]


# --------------------------------------------------------------------------------------------------------
# logprobs
# --------------------------------------------------------------------------------------------------------


def _logprobs_cases(kind, dims, device, rlk, numpy) -> list[Case]:
    if kind == "linear_logprobs":
        return _linear_cases(kind, dims, device, rlk, numpy)
    n, vocab = dims
    g = _generator()
    logits = (torch.randn(n, vocab, generator=g) * 3).to(device)
    tokens = torch.randint(0, vocab, (n,), generator=g).to(device)
    leaf = logits.clone().requires_grad_()
    shape, series = f"[N={n}, V={vocab}]", f"[N=*, V={vocab}]"
    fwd = ent = bwd = None
    if rlk is not None:
        fwd = lambda backend: rlk.gather_logprobs(logits, tokens, backend=backend)
        ent = lambda backend: rlk.gather_logprobs(logits, tokens, return_entropy=True, backend=backend)
        bwd = lambda backend: forward_backward(
            lambda x, t: rlk.gather_logprobs(x, t, backend=backend), leaf, tokens
        )()
    out = tokens.float()  # one fp32 per row
    # bfloat16 logits (an LLM policy's): the forward with and without entropy, half the bytes for the same exps
    low = logits.to(torch.bfloat16)
    # the baselines compute in bfloat16: their log-sum-exp keeps 8 bits at its magnitude (~10 here: 0.03)
    bf16 = {"dtype": "bfloat16", "tol": (5e-2, 1e-1)}
    low_fwd = low_ent = None
    if rlk is not None:
        low_fwd = lambda backend: rlk.gather_logprobs(low, tokens, backend=backend)
        low_ent = lambda backend: rlk.gather_logprobs(low, tokens, return_entropy=True, backend=backend)
    return [
        _case(kind, dims, "gather_logprobs", shape, f"gather_logprobs {series}", fwd,
              baselines.logprobs_providers(logits, tokens), [logits, tokens], [out]),
        _case(kind, dims, "gather_logprobs bf16", shape, f"gather_logprobs bf16 {series}", low_fwd,
              baselines.logprobs_providers(low, tokens), [low, tokens], [out], **bf16),
        _case(kind, dims, "gather_logprobs+entropy bf16", shape, f"gather_logprobs+entropy bf16 {series}", low_ent,
              baselines.logprobs_entropy_providers(low, tokens), [low, tokens], [out, out], **bf16),
        _case(kind, dims, "gather_logprobs+entropy", shape, f"gather_logprobs+entropy {series}", ent,
              baselines.logprobs_entropy_providers(logits, tokens), [logits, tokens], [out, out]),
        # the backward reads the logits again and writes their gradient
        _case(kind, dims, "gather_logprobs fwd+bwd", shape, f"gather_logprobs fwd+bwd {series}", bwd,
              baselines.logprobs_backward_providers(leaf, tokens), [logits, tokens, logits], [out, logits]),
    ]


def _linear_cases(kind, dims, device, rlk, numpy) -> list[Case]:
    """linear_logprobs with entropy, forward and forward + backward (in hidden and weight), per dtype: float32 and
    bfloat16 on CPU, bfloat16 on GPUs. Peak memory is reported; the byte model counts the inputs and outputs only
    (these rows are compute-bound: GB/s is not their measure)."""
    n, hidden_size, vocab = dims
    g = _generator()
    dtypes = (torch.float32, torch.bfloat16) if device == "cpu" else (torch.bfloat16,)
    shape, series = f"[N={n}, H={hidden_size}, V={vocab}]", f"[N=*, H={hidden_size}, V={vocab}]"
    tokens = torch.randint(0, vocab, (n,), generator=g).to(device)
    out = []
    for dtype in dtypes:
        name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
        hidden = torch.randn(n, hidden_size, generator=g).to(device, dtype)
        weight = (torch.randn(vocab, hidden_size, generator=g) * 2 / hidden_size**0.5).to(device, dtype)
        leaves = (hidden.clone().requires_grad_(), weight.clone().requires_grad_())
        fwd = fb = None
        if rlk is not None:
            fwd = lambda backend, h=hidden, w=weight: rlk.linear_logprobs(h, w, tokens, return_entropy=True,
                                                                          backend=backend)
            fb = lambda backend, lv=leaves: baselines.head_forward_backward(
                lambda h, w: rlk.linear_logprobs(h, w, tokens, return_entropy=True, backend=backend), *lv)()
        per_row = tokens.float()
        tol = (1e-4, 1e-3) if dtype == torch.float32 else (5e-2, 5e-2)
        kw = {"dtype": str(dtype).removeprefix("torch."), "memory": True, "tol": tol}
        out += [
            _case(kind, dims, f"linear_logprobs+entropy {name}", shape, f"linear_logprobs {name} {series}", fwd,
                  baselines.linear_logprobs_providers(hidden, weight, tokens, device), [hidden, weight, tokens],
                  [per_row, per_row], **kw),
            _case(kind, dims, f"linear_logprobs+entropy fwd+bwd {name}", shape,
                  f"linear_logprobs fwd+bwd {name} {series}", fb,
                  baselines.linear_logprobs_backward_providers(*leaves, tokens, device),
                  [hidden, weight, tokens], [per_row, per_row, hidden, weight], **kw),
        ]
    return out


# --------------------------------------------------------------------------------------------------------
# ppo
# --------------------------------------------------------------------------------------------------------


def _ppo_inputs(dims, device):
    """logp, old logp, advantages and mask for [B, T] (right-padded responses) or one flat row of N tokens (a
    trainer that flattens its batch before the loss; 90% kept, which the CPU kernels split across threads as a
    batch of rows), with the row's shape label and its series' one."""
    g = _generator()
    logp = -torch.rand(dims, generator=g) * 3
    old = logp + 0.2 * torch.randn(dims, generator=g)
    advantages = torch.randn(dims, generator=g)
    if len(dims) == 1:
        mask = torch.rand(dims, generator=g) < 0.9
        shape, series = f"[N={dims[0]}] flat, 90% kept", "[N=*] flat"
    else:
        b, t = dims
        lengths = torch.randint(t // 4, t + 1, (b,), generator=g)
        mask = torch.arange(t)[None, :] < lengths[:, None]
        shape, series = f"[B={b}, T={t}] masked", f"[B=*, T={t}] masked"
    return [x.to(device) for x in (logp, old, advantages, mask)], shape, series


def _ppo_cases(kind, dims, device, rlk, numpy) -> list[Case]:
    inputs, shape, series = _ppo_inputs(dims, device)
    logp, old, advantages, mask = inputs
    leaf = logp.clone().requires_grad_()
    if kind == "value_loss":  # values, old values, returns: the same tensors serve
        run = None
        if rlk is not None:
            run = lambda backend: forward_backward(
                lambda v: rlk.value_loss(v, old, advantages, mask, clip=VALUE_CLIP, backend=backend), leaf
            )()
        providers = baselines.value_loss_providers(leaf, old, advantages, mask, clip=VALUE_CLIP)
        return [_case(kind, dims, "value_loss fwd+bwd", shape, f"value_loss fwd+bwd {series}", run,
                      providers, inputs + inputs, [logp])]
    fwd = bwd = None
    if rlk is not None:
        fwd = lambda backend: rlk.ppo_policy_loss(logp, old, advantages, mask, **PPO_CLIP, backend=backend)[0]
        bwd = lambda backend: forward_backward(
            lambda lp: rlk.ppo_policy_loss(lp, old, advantages, mask, **PPO_CLIP, backend=backend), leaf
        )()
    cases = [
        _case(kind, dims, "ppo_policy_loss", shape, f"ppo_policy_loss {series}", fwd,
              baselines.ppo_providers(logp, old, advantages, mask, **PPO_CLIP), inputs, []),
        # the backward reads the inputs again and writes logp's gradient
        _case(kind, dims, "ppo_policy_loss fwd+bwd", shape, f"ppo_policy_loss fwd+bwd {series}", bwd,
              baselines.ppo_providers(logp, old, advantages, mask, **PPO_CLIP, leaf=leaf), inputs + inputs,
              [logp]),
    ]
    if len(dims) == 1:
        return cases
    # bfloat16 log-probs and advantages (a trainer that keeps its policy's outputs in bf16): the baselines compute
    # in bf16, rlkernels in float32 from the bf16 values
    low = [x.to(torch.bfloat16) for x in (logp, old, advantages)]
    low_leaf = low[0].clone().requires_grad_()
    bf16 = {"dtype": "bfloat16", "tol": (5e-2, 1e-1)}
    low_fwd = low_bwd = None
    if rlk is not None:
        low_fwd = lambda backend: rlk.ppo_policy_loss(*low, mask, **PPO_CLIP, backend=backend)[0]
        low_bwd = lambda backend: forward_backward(
            lambda lp: rlk.ppo_policy_loss(lp, *low[1:], mask, **PPO_CLIP, backend=backend), low_leaf
        )()
    return cases + [
        _case(kind, dims, "ppo_policy_loss bf16", shape, f"ppo_policy_loss bf16 {series}", low_fwd,
              baselines.ppo_providers(*low, mask, **PPO_CLIP), low + [mask], [], **bf16),
        _case(kind, dims, "ppo_policy_loss fwd+bwd bf16", shape, f"ppo_policy_loss fwd+bwd bf16 {series}", low_bwd,
              baselines.ppo_providers(*low, mask, **PPO_CLIP, leaf=low_leaf), (low + [mask]) * 2, [low[0]], **bf16),
    ]


# --------------------------------------------------------------------------------------------------------
# bellman
# --------------------------------------------------------------------------------------------------------


def _bellman_cases(kind, dims, device, rlk, numpy) -> list[Case]:
    if kind in ("q_targets", "td_loss"):
        return _sample_based(kind, dims, device, rlk)
    b, s, a = dims
    g = _generator(1)
    P = torch.rand(b, s, a, s, generator=g)
    P = (P / P.sum(-1, keepdim=True)).to(device)
    R = torch.randn(b, s, a, generator=g).to(device)
    V = torch.randn(b, s, generator=g).to(device)
    shape, series = f"[B={b}, S={s}, A={a}]", f"{kind} [B=*, S={s}, A={a}]"
    outputs = [R, V, V.long()]  # Q, V, policy
    if kind == "bellman_backup":
        run = None if rlk is None else lambda backend: rlk.bellman_backup(P, R, V, MDP_GAMMA, backend=backend)
        return [_case(kind, dims, kind, shape, series, run, baselines.backup_providers(P, R, V, MDP_GAMMA),
                      [P, R, V], outputs)]
    run = None
    if rlk is not None:
        run = lambda backend: rlk.value_iteration(
            P, R, MDP_GAMMA, tol=VI_TOL, max_iters=VI_MAX_ITERS, backend=backend
        )[0]

    def traffic(reference_out):
        # P is read once per iteration (the CPU kernel beats that by keeping each MDP's P in cache)
        iters = int(reference_out[3])
        nbytes = iters * P.numel() * P.element_size() + sum(x.numel() * x.element_size() for x in [R, *outputs])
        return nbytes, f"{iters} iterations; bytes = P read once per iteration"

    providers = baselines.value_iteration_providers(P, R, MDP_GAMMA, VI_TOL, VI_MAX_ITERS)
    return [_case(kind, dims, kind, shape, series, run, providers, [P, R], outputs, traffic=traffic,
                  runs={"budget_s": 3.0, "min_runs": 3, "max_runs": 7, "single_run_over_s": 30.0})]


def _sample_based(kind, dims, device, rlk) -> list[Case]:
    B, A = dims
    g = _generator()
    r = torch.randn(B, generator=g).to(device)
    next_q = torch.randn(B, A, generator=g).to(device)
    online = torch.randn(B, A, generator=g).to(device)
    probs = torch.softmax(torch.randn(B, A, generator=g), -1).to(device)
    term = (torch.rand(B, generator=g) < 0.05).to(device)
    shape = f"[B={B}, A={A}]"
    if kind == "td_loss":
        q = torch.randn(B, A, generator=g).to(device).requires_grad_()
        actions = torch.randint(0, A, (B,), generator=g).to(device)
        targets = (torch.randn(B, generator=g) * 2).to(device)
        run = None
        if rlk is not None:

            def run(backend):
                q.grad = None
                loss, td = rlk.td_loss(q, actions, targets, backend=backend)
                loss.backward()
                return loss.detach(), td, q.grad

        # forward: actions, targets, one Q per row (counted as the whole row: its cache lines), td_errors
        # written; backward: grad_q written
        return [_case(kind, dims, "td_loss fwd+bwd", shape, f"td_loss fwd+bwd [B=*, A={A}]", run,
                      baselines.td_loss_providers(q, actions, targets), [actions, targets, q], [targets, q])]
    cases = []
    for target in Q_KINDS:
        run = None
        if rlk is not None:
            run = lambda backend, target=target: rlk.q_targets(
                r, next_q, terminated=term, gamma=GAMMA, kind=target, next_q_online=online, next_probs=probs,
                temperature=TEMPERATURE, backend=backend,
            )
        extra = {"double": [online], "expected": [probs]}.get(target, [])
        op = f"q_targets[{target}]"
        providers = baselines.q_targets_providers(target, r, next_q, term, online, probs, GAMMA, TEMPERATURE)
        cases.append(_case(kind, dims, op, shape, f"{op} [B=*, A={A}]", run, providers,
                           [r, next_q, term, *extra], [r]))
    return cases


_MAKERS = {"returns": _returns_cases, "logprobs": _logprobs_cases, "ppo": _ppo_cases, "bellman": _bellman_cases}
