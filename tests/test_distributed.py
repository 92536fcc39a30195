"""process_group (docs/design.md §4.8) on real process groups: vocab-parallel gather_logprobs and the global
loss counts of the PPO family, against the single-process ops on the same data.

Each world size is one spawn of gloo processes on localhost (a free port, a timeout on the process group and
on the whole run, so a hang fails instead of blocking); every rank runs every scenario of its world size and
writes the failures it saw, and each test below reads its scenario's verdict. Scenarios make their collectives
first and compare last, so a failing comparison on one rank cannot leave the others waiting. The NCCL case
runs with one process on a GPU machine (the shard math is the same at any world size).
"""

from __future__ import annotations

import datetime
import math
import os
import pathlib
import pickle
import socket
import time
import traceback

import pytest
import torch
from conftest import assert_close

import rlkernels

SPAWN_TIMEOUT_S = 240  # a whole world's run, spawn included; a hang fails here
GROUP_TIMEOUT_S = 60  # a collective that waits longer raises on its rank
SCENARIOS = {}  # name -> (function(rank, world, group), world sizes)


def scenario(*worlds):
    def register(fn):
        SCENARIOS[fn.__name__] = (fn, worlds)
        return fn

    return register


# ----------------------------------------------------------------------------------------------------
# Running a world
# ----------------------------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, names, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    results = {"rlkernels": rlkernels.__file__}
    try:
        for name in names:
            try:
                SCENARIOS[name][0](rank, world, dist.group.WORLD)
                results[name] = None
            except Exception:  # noqa: BLE001  (every failure is reported to the parent, by rank)
                results[name] = traceback.format_exc()
    finally:
        with open(pathlib.Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(results, f)
        dist.destroy_process_group()


def run_world(world, names, out_dir, backend="gloo"):
    """Spawns ``world`` processes running the scenarios ``names``; returns {name: [traceback or None per rank]}."""
    import torch.multiprocessing as mp

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_worker, args=(world, _free_port(), backend, list(names), str(out_dir)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} processes did not finish within {SPAWN_TIMEOUT_S}s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    root = pathlib.Path(__file__).resolve().parent.parent
    verdicts = {name: [] for name in names}
    for rank in range(world):
        with open(out_dir / f"rank{rank}.pkl", "rb") as f:
            results = pickle.load(f)
        # The children must import this checkout's package, as the parent does.
        assert pathlib.Path(results["rlkernels"]).resolve().is_relative_to(root), results["rlkernels"]
        for name in names:
            verdicts[name].append(results[name])
    return verdicts


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    cache = {}

    def get(world):
        if world not in cache:
            names = [name for name, (_, sizes) in SCENARIOS.items() if world in sizes]
            cache[world] = run_world(world, names, tmp_path_factory.mktemp(f"world{world}"))
        return cache[world]

    return get


def check_verdict(verdicts, name):
    failures = [f"rank {rank}:\n{tb}" for rank, tb in enumerate(verdicts[name]) if tb is not None]
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------------------------
# Vocab-parallel gather_logprobs
# ----------------------------------------------------------------------------------------------------

SHARDS = {2: [(7, 6), (0, 13), (12, 1)], 4: [(5, 1, 4, 3), (4, 0, 6, 3), (3, 3, 3, 3)]}
IGNORE = -100


def logprob_case(seed, sizes, dtype, *, ignore=False, neg_inf=False, lead=(3, 5)):
    """Full logits [*lead, V], tokens (global ids) and output-gradient weights, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    V = sum(sizes)
    logits = (torch.randn(*lead, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    tokens = torch.randint(0, V, lead, generator=g)
    if tokens.numel() >= 2:
        tokens.view(-1)[0] = 0
        tokens.view(-1)[1] = V - 1  # the first and last entries of the vocabulary
    if ignore:
        tokens.view(-1)[2::4] = IGNORE
    if neg_inf:
        flat = logits.view(-1, V)
        flat[:, 1] = -math.inf  # one -inf entry in every row
        start = sizes[0]
        flat[3, start:start + sizes[1]] = -math.inf  # one whole shard -inf in row 3
        flat[4, :] = -math.inf  # a row with no distribution: NaN
    w_logp = torch.randn(lead, generator=g, dtype=torch.float64)
    w_ent = torch.randn(lead, generator=g, dtype=torch.float64)
    return logits, tokens, w_logp, w_ent


def _shard(full, sizes, rank):
    start = sum(sizes[:rank])
    return full[..., start:start + sizes[rank]]


def _objective(logp, entropy, w_logp, w_ent):
    # NaN rows (all -inf logits) are left out of the objective, so the gradient stays comparable.
    keep = torch.isfinite(logp)
    loss = torch.where(keep, logp * w_logp.to(logp.dtype), 0).sum()
    if entropy is not None:
        loss = loss + torch.where(keep & torch.isfinite(entropy), entropy * w_ent.to(entropy.dtype), 0).sum()
    return loss


def compare_vocab_parallel(rank, group, sizes, dtype, *, backend="cpu", return_entropy=True, ignore=False,
                           temperature=1.0, neg_inf=False, inplace=False, view=False, seed=0, lead=(3, 5)):
    """Returns a closure that compares, so that every collective of the case happens before any assertion.
    view: the shard is a strided view into the full logits rather than a tensor of its own."""
    logits, tokens, w_logp, w_ent = logprob_case(seed, sizes, dtype, ignore=ignore, neg_inf=neg_inf, lead=lead)
    kw = {"temperature": temperature, "return_entropy": return_entropy,
          "ignore_index": IGNORE if ignore else None, "backend": backend}
    leaf = logits.clone().requires_grad_(True) if view else _shard(logits, sizes, rank).clone().requires_grad_(True)
    shard = _shard(leaf, sizes, rank) if view else leaf
    out = rlkernels.gather_logprobs(shard, tokens, process_group=group, inplace_backward=inplace, **kw)
    logp, entropy = out if return_entropy else (out, None)
    _objective(logp, entropy, w_logp, w_ent).backward()
    grad = _shard(leaf.grad, sizes, rank) if view else leaf.grad  # in place: written over the shard itself

    full = logits.clone().requires_grad_(True)
    ref = rlkernels.gather_logprobs(full, tokens, **kw)
    ref_logp, ref_entropy = ref if return_entropy else (ref, None)
    _objective(ref_logp, ref_entropy, w_logp, w_ent).backward()
    ref_grad = _shard(full.grad, sizes, rank)

    def check():
        what = f"sizes={sizes} dtype={dtype} backend={backend} entropy={return_entropy} ignore={ignore} T={temperature}"
        tol = torch.float64 if dtype == torch.float64 else torch.float32
        assert_close(logp.detach(), ref_logp.detach(), tol, name=f"logp {what}")
        if return_entropy:
            assert_close(entropy.detach(), ref_entropy.detach(), tol, name=f"entropy {what}")
        assert grad.dtype == ref_grad.dtype and grad.shape == ref_grad.shape
        gtol = {"rtol": 2e-2, "atol": 2e-2} if dtype in (torch.bfloat16, torch.float16) else {}
        assert_close(grad.double(), ref_grad.double(), tol, name=f"grad {what}", **gtol)
        if ignore:
            ignored = tokens == IGNORE
            rows = grad.reshape(tokens.numel(), grad.shape[-1])
            assert bool((logp.detach()[ignored] == 0).all()) and bool((rows[ignored.reshape(-1)] == 0).all()), \
                "ignored rows give 0 and no gradient"

    return check


@scenario(2, 4)
def logprobs_match_single_process(rank, world, group):
    checks = []
    for i, sizes in enumerate(SHARDS[world]):
        for dtype in (torch.float64, torch.float32):
            checks.append(compare_vocab_parallel(rank, group, sizes, dtype, seed=i))
        checks.append(compare_vocab_parallel(rank, group, sizes, torch.float32, return_entropy=False, seed=10 + i))
        checks.append(compare_vocab_parallel(rank, group, sizes, torch.float64, ignore=True, temperature=0.7,
                                             seed=20 + i))
    sizes = SHARDS[world][0]
    checks.append(compare_vocab_parallel(rank, group, sizes, torch.float64, neg_inf=True, seed=30))
    checks.append(compare_vocab_parallel(rank, group, sizes, torch.float32, inplace=True, ignore=True, seed=31))
    checks.append(compare_vocab_parallel(rank, group, sizes, torch.bfloat16, seed=32))
    checks.append(compare_vocab_parallel(rank, group, sizes, torch.float32, lead=(0,), seed=33))  # no rows
    checks.append(compare_vocab_parallel(rank, group, sizes, torch.float64, view=True, ignore=True, seed=34))
    for check in checks:
        check()


@scenario(2)
def logprobs_triton_match_single_process(rank, world, group):
    checks = [compare_vocab_parallel(rank, group, (9, 4), torch.float32, backend="triton", ignore=True,
                                     temperature=1.3, lead=(4,)),
              compare_vocab_parallel(rank, group, (0, 13), torch.float32, backend="triton", lead=(3,), seed=1),
              compare_linear(rank, group, (9, 4), torch.float32, backend="triton", bias=True, softcap=3.0, ignore=True,
                             n=6, seed=2)]
    for check in checks:
        check()


def _expect_error(kind, fragment, fn):
    try:
        fn()
    except kind as error:
        assert fragment in str(error), f"{kind.__name__} without {fragment!r}: {error}"
        return
    raise AssertionError(f"expected {kind.__name__} ({fragment!r})")


@scenario(2, 4)
def logprobs_bad_input_raises_on_every_rank(rank, world, group):
    import torch.distributed as dist

    sizes = SHARDS[world][0]
    V = sum(sizes)
    logits, tokens, _, _ = logprob_case(0, sizes, torch.float32)
    shard = _shard(logits, sizes, rank).contiguous()

    def call(x=shard, t=tokens, **kw):
        return rlkernels.gather_logprobs(x, t, process_group=group, **kw)

    def in_step():  # the group still works: no rank was left inside a collective
        ones = torch.ones(1)
        dist.all_reduce(ones, group=group)
        assert ones.item() == world

    bad = tokens.clone()
    bad[0, 0] = V  # past the last shard
    _expect_error(ValueError, f"global ids in [0, {V})", lambda: call(t=bad))
    in_step()
    bad[0, 0] = -1
    _expect_error(ValueError, "global ids", lambda: call(t=bad))
    in_step()
    # Rows that differ across ranks (one rank passes one row less).
    rows = shard[:, :4] if rank == 0 else shard
    _expect_error(ValueError, "number of rows", lambda: call(x=rows, t=tokens[:, :4] if rank == 0 else tokens))
    in_step()
    # Tokens that differ across ranks.
    other = tokens.clone()
    other[1, 1] = (other[1, 1] + rank) % V
    if world > 1:
        _expect_error(ValueError, "tokens (global ids", lambda: call(t=other))
    in_step()
    _expect_error(ValueError, "temperature", lambda: call(temperature=1.0 + rank))
    in_step()
    _expect_error(ValueError, "return_entropy", lambda: call(return_entropy=rank == 0))
    in_step()
    # One rank refuses its own arguments: it raises its error, every other rank hears of it.
    if rank == world - 1:
        _expect_error(TypeError, "integer tensor", lambda: call(t=tokens.float()))
    else:
        _expect_error(RuntimeError, f"rank(s) [{world - 1}]", lambda: call())
    in_step()
    _expect_error(ValueError, "reference backend", lambda: call(backend="reference"))
    in_step()
    _expect_error(TypeError, "ProcessGroup", lambda: rlkernels.gather_logprobs(shard, tokens, process_group="tp"))
    in_step()


@scenario(2)
def logprobs_under_torch_compile(rank, world, group):
    """docs/design.md §4.8: the vocab-parallel call is a graph break (it runs eagerly inside a compiled function,
    with its gradient), and fullgraph=True refuses it."""
    import torch._dynamo

    sizes = SHARDS[world][0]
    logits, tokens, w_logp, _ = logprob_case(3, sizes, torch.float32)
    shard = _shard(logits, sizes, rank).clone().requires_grad_(True)
    eager_shard = shard.detach().clone().requires_grad_(True)

    def f(x):
        return (rlkernels.gather_logprobs(x, tokens, process_group=group) * w_logp.float()).sum()

    compiled = torch.compile(f, backend="eager")(shard)
    compiled.backward()
    eager = f(eager_shard)
    eager.backward()
    torch._dynamo.reset()
    refused = None
    try:
        torch.compile(f, backend="eager", fullgraph=True)(shard.detach())
    except Exception as error:  # noqa: BLE001  (Dynamo's error type moves between torch releases)
        refused = error
    assert_close(compiled.detach(), eager.detach(), torch.float32, name="loss")
    assert_close(shard.grad, eager_shard.grad, torch.float32, name="grad")
    assert refused is not None and "disable" in str(refused), refused


# ----------------------------------------------------------------------------------------------------
# Vocab-parallel linear_logprobs (the fused LM head over shards of its rows)
# ----------------------------------------------------------------------------------------------------


def compare_linear(rank, group, sizes, dtype, *, bias=False, softcap=None, logit_scale=1.0, temperature=1.0,
                   ignore=False, return_entropy=True, chunk_size=None, backend="cpu", seed=0, n=12):
    """As compare_vocab_parallel, for linear_logprobs with this rank's rows of the head's weight (and bias).
    grad_hidden is summed over the group first, as the trainer's column-parallel input does."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(seed)
    V, H = sum(sizes), 8
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype)
    full_bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
    tokens = torch.randint(0, V, (n,), generator=g)
    if n >= 2:
        tokens[0], tokens[1] = 0, V - 1
    if ignore:
        tokens[2::4] = IGNORE
    w_logp = torch.randn(n, generator=g, dtype=torch.float64)
    w_ent = torch.randn(n, generator=g, dtype=torch.float64)
    kw = {"temperature": temperature, "return_entropy": return_entropy, "ignore_index": IGNORE if ignore else None,
          "logit_scale": logit_scale, "softcap": softcap, "chunk_size": chunk_size, "backend": backend}
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    h = hidden.clone().requires_grad_(True)
    w = weight[rows].clone().requires_grad_(True)
    b = full_bias[rows].clone().requires_grad_(True) if bias else None
    out = rlkernels.linear_logprobs(h, w, tokens, bias=b, process_group=group, **kw)
    logp, entropy = out if return_entropy else (out, None)
    _objective(logp, entropy, w_logp, w_ent).backward()
    grad_hidden = h.grad.clone()
    dist.all_reduce(grad_hidden, group=group)

    h1 = hidden.clone().requires_grad_(True)
    w1 = weight.clone().requires_grad_(True)
    b1 = full_bias.clone().requires_grad_(True) if bias else None
    ref = rlkernels.linear_logprobs(h1, w1, tokens, bias=b1, **kw)
    ref_logp, ref_entropy = ref if return_entropy else (ref, None)
    _objective(ref_logp, ref_entropy, w_logp, w_ent).backward()

    def check():
        what = f"linear sizes={sizes} dtype={dtype} bias={bias} softcap={softcap} scale={logit_scale} T={temperature}"
        tol = torch.float64 if dtype == torch.float64 else torch.float32
        loose = {"rtol": 3e-2, "atol": 3e-2} if dtype in (torch.bfloat16, torch.float16) else {}
        assert_close(logp.detach(), ref_logp.detach(), tol, name=f"logp {what}", **loose)
        if return_entropy:
            assert_close(entropy.detach(), ref_entropy.detach(), tol, name=f"entropy {what}", **loose)
        assert_close(grad_hidden.double(), h1.grad.double(), tol, name=f"grad_hidden {what}", **loose)
        assert_close(w.grad.double(), w1.grad[rows].double(), tol, name=f"grad_weight {what}", **loose)
        if bias:
            assert_close(b.grad.double(), b1.grad[rows].double(), tol, name=f"grad_bias {what}", **loose)

    return check


@scenario(2, 4)
def linear_logprobs_match_single_process(rank, world, group):
    checks = []
    for i, sizes in enumerate(SHARDS[world]):
        checks.append(compare_linear(rank, group, sizes, torch.float64, seed=i))
        checks.append(compare_linear(rank, group, sizes, torch.float64, bias=True, softcap=2.0, logit_scale=0.7,
                                     temperature=1.3, ignore=True, chunk_size=5, seed=10 + i))
    sizes = SHARDS[world][0]
    checks.append(compare_linear(rank, group, sizes, torch.float32, bias=True, return_entropy=False, seed=20))
    checks.append(compare_linear(rank, group, sizes, torch.bfloat16, ignore=True, seed=21))
    checks.append(compare_linear(rank, group, sizes, torch.float32, n=0, seed=22))
    for check in checks:
        check()


# ----------------------------------------------------------------------------------------------------
# Global token-mean of the PPO family
# ----------------------------------------------------------------------------------------------------

ROWS = {2: [5, 3], 4: [3, 2, 4, 1]}  # rows of the global batch per rank; the last rank's rows have no token


def ppo_batch(world, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = sum(ROWS[world]), 9
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[1] = False  # a row with no loss token
    mask[-ROWS[world][-1]:] = False  # the last rank has no loss token at all
    mask[:, -2:] = False  # padding: micro-batches may leave those columns out
    data = {name: torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
            for name in ("logp", "old_logp", "advantages", "values", "old_values", "returns")}
    data["old_logp"] = data["logp"] + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    data["old_values"] = data["values"] + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    return data, mask


def _policy(d, mask, agg, **kw):
    return rlkernels.ppo_policy_loss(d["logp"], d["old_logp"], d["advantages"], mask, clip_low=0.2,
                                     clip_high=0.28, dual_clip=3.0, agg=agg, **kw)[0]


def _value(d, mask, agg, **kw):
    return rlkernels.value_loss(d["values"], d["old_values"], d["returns"], mask, clip=0.2, agg=agg, **kw)[0]


LOSSES = {"policy": ("logp", _policy), "value": ("values", _value)}


def compare_global_loss(rank, world, group, loss_name, agg, dtype, micro_batches):
    """Every rank's micro-batches with global_count from loss_count (micro_batches > 1), or one call per rank
    with process_group; the losses summed over micro-batches and ranks and the gradients of every row against
    the single-process loss of the whole batch."""
    import torch.distributed as dist

    key, fn = LOSSES[loss_name]
    data, mask = ppo_batch(world, dtype)
    T = mask.shape[1]
    extra = {"norm_length": float(T)} if loss_name == "policy" and agg == "seq-mean-token-sum-norm" else {}
    start = sum(ROWS[world][:rank])
    rows = slice(start, start + ROWS[world][rank])
    mine = {k: v[rows].clone() for k, v in data.items()}
    mine[key].requires_grad_(True)
    my_mask = mask[rows]
    if micro_batches == 1:
        total = fn(mine, my_mask, agg, process_group=group, **extra)
        parts = [(mine, my_mask)]
    else:
        # Micro-batches of rows; the first one trimmed to the columns that hold a token (padding removed),
        # except where the mode divides by T.
        n = my_mask.shape[0]
        cut = max(1, n // 2)
        trim = T if (agg == "seq-mean-token-sum-norm" and loss_name == "value") else T - 2
        parts = [({k: v[:cut, :trim] for k, v in mine.items()}, my_mask[:cut, :trim]),
                 ({k: v[cut:] for k, v in mine.items()}, my_mask[cut:])]
        parts = [p for p in parts if p[1].shape[0] > 0]
        count = rlkernels.loss_count([m for _, m in parts], agg, process_group=group)
        total = sum(fn(d, m, agg, global_count=count, **extra) for d, m in parts)
    total.backward()
    summed = total.detach().clone()
    dist.all_reduce(summed, group=group)

    full = {k: v.clone() for k, v in data.items()}
    full[key].requires_grad_(True)
    ref = fn(full, mask, agg, **extra)
    ref.backward()

    def check():
        what = f"{loss_name} agg={agg} dtype={dtype} micro_batches={micro_batches} rank={rank}"
        tol = torch.float64 if dtype == torch.float64 else torch.float32
        assert_close(summed, ref.detach(), tol, name=f"loss {what}")
        assert_close(mine[key].grad, full[key].grad[rows], tol, name=f"grad {what}")

    return check


@scenario(2, 4)
def ppo_global_token_mean_matches_single_process(rank, world, group):
    checks = []
    for loss_name in LOSSES:
        for agg in rlkernels.ppo.AGGS:
            for micro_batches in (1, 2):
                checks.append(compare_global_loss(rank, world, group, loss_name, agg, torch.float64, micro_batches))
        checks.append(compare_global_loss(rank, world, group, loss_name, "token-mean", torch.float32, 2))
    for check in checks:
        check()


@scenario(4)
def dp_by_tp_subgroups_match_single_process(rank, world, group):
    """2 data-parallel x 2 vocab-parallel subgroups: log-probs of the vocabulary shards feed the global
    token-mean policy loss; the loss and every shard's gradient against one process on the whole batch.
    Data-parallel rank 0 has ignored tokens (and a row without loss tokens), rank 1 has no loss token at all."""
    import torch.distributed as dist

    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    dp_rank, tp_rank = divmod(rank, 2)
    tp_group, dp_group = tp_groups[dp_rank], dp_groups[tp_rank]
    sizes = (9, 14)
    V, B, T = sum(sizes), 3, 5
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (2 * B, T), generator=g)
    mask = torch.rand(2 * B, T, generator=g) < 0.8
    mask[1] = False
    mask[B:] = False  # data-parallel rank 1: no loss token
    tokens[:B][~mask[:B]] = IGNORE  # its ignored tokens are the positions without loss
    tokens[B:][~mask[B:]] = IGNORE
    old_logp = -torch.rand(2 * B, T, generator=g, dtype=torch.float64) * 3
    advantages = torch.randn(2 * B, T, generator=g, dtype=torch.float64)

    def loss_of(lp, rows, **kw):
        loss, _ = rlkernels.ppo_policy_loss(lp, old_logp[rows], advantages[rows], mask[rows], clip_low=0.2, **kw)
        return loss

    rows = slice(dp_rank * B, (dp_rank + 1) * B)
    shard = _shard(logits[rows], sizes, tp_rank).clone().requires_grad_(True)
    logp = rlkernels.gather_logprobs(shard, tokens[rows], ignore_index=IGNORE, process_group=tp_group)
    count = rlkernels.loss_count(mask[rows], process_group=dp_group)
    loss = loss_of(logp, rows, global_count=count)
    loss.backward()
    summed = loss.detach().clone()
    dist.all_reduce(summed, group=dp_group)

    full = logits.clone().requires_grad_(True)
    ref = loss_of(rlkernels.gather_logprobs(full, tokens, ignore_index=IGNORE), slice(None))
    ref.backward()
    assert int(count) == int(mask.sum())
    assert_close(summed, ref.detach(), torch.float64, name="loss")
    assert_close(shard.grad, _shard(full.grad[rows], sizes, tp_rank), torch.float64, name="grad of the shard")
    if dp_rank == 1:
        assert bool((shard.grad == 0).all()), "no loss token: no gradient"
    else:
        assert bool(shard.grad.ne(0).any())


# ----------------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["logprobs_match_single_process", "logprobs_bad_input_raises_on_every_rank",
                                  "linear_logprobs_match_single_process",
                                  "ppo_global_token_mean_matches_single_process"])
def test_gloo(worlds, world, name):
    check_verdict(worlds(world), name)


def test_gloo_subgroups(worlds):
    check_verdict(worlds(4), "dp_by_tp_subgroups_match_single_process")


def test_gloo_torch_compile(worlds):
    check_verdict(worlds(2), "logprobs_under_torch_compile")


def test_gloo_triton(worlds):
    pytest.importorskip("triton")
    check_verdict(worlds(2), "logprobs_triton_match_single_process")


def _nccl_scenario(rank, world, group):
    checks = []
    for backend in rlkernels.available_backends():
        if backend in ("cuda", "triton"):
            dev = torch.device("cuda", rank)
            logits, tokens, w_logp, w_ent = logprob_case(0, (1000,), torch.float32, ignore=True, lead=(64,))
            logits, tokens = logits.to(dev), tokens.to(dev)
            shard = logits.clone().requires_grad_(True)
            logp, ent = rlkernels.gather_logprobs(shard, tokens, return_entropy=True, ignore_index=IGNORE,
                                                  process_group=group, backend=backend)
            _objective(logp, ent, w_logp.to(dev), w_ent.to(dev)).backward()
            full = logits.clone().requires_grad_(True)
            ref_logp, ref_ent = rlkernels.gather_logprobs(full, tokens, return_entropy=True, ignore_index=IGNORE,
                                                          backend=backend)
            _objective(ref_logp, ref_ent, w_logp.to(dev), w_ent.to(dev)).backward()
            checks.append((logp, ref_logp, ent, ref_ent, shard.grad, full.grad))
    data, mask = ppo_batch(2, torch.float32)
    data = {k: v.cuda() for k, v in data.items()}
    loss = _policy(data, mask.cuda(), "token-mean", process_group=group)
    ref = _policy(data, mask.cuda(), "token-mean")
    assert_close(loss, ref, torch.float32, name="policy loss")
    for logp, ref_logp, ent, ref_ent, grad, ref_grad in checks:
        assert_close(logp.detach(), ref_logp.detach(), torch.float32, name="logp")
        assert_close(ent.detach(), ref_ent.detach(), torch.float32, name="entropy")
        assert_close(grad, ref_grad, torch.float32, name="grad")


SCENARIOS["nccl"] = (_nccl_scenario, ())


@pytest.mark.cuda
def test_nccl_world_of_one(tmp_path):
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("torch was built without NCCL")
    check_verdict(run_world(1, ["nccl"], tmp_path, backend="nccl"), "nccl")


# ----------------------------------------------------------------------------------------------------
# Without processes: the global count on one process, and the arguments
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", rlkernels.ppo.AGGS)
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_micro_batches_with_global_count_sum_to_the_whole_batch(loss_name, agg):
    key, fn = LOSSES[loss_name]
    data, mask = ppo_batch(2, torch.float64, seed=3)
    extra = {"norm_length": 9.0} if loss_name == "policy" and agg == "seq-mean-token-sum-norm" else {}
    full = {k: v.clone() for k, v in data.items()}
    full[key].requires_grad_(True)
    ref = fn(full, mask, agg, **extra)
    ref.backward()
    mine = {k: v.clone() for k, v in data.items()}
    mine[key].requires_grad_(True)
    splits = [slice(0, 3), slice(3, 4), slice(4, 8)]  # the middle micro-batch holds one row with no token
    count = rlkernels.loss_count([mask[s] for s in splits], agg)
    assert count.dtype == torch.int64 and count.dim() == 0
    as_number = int(count)
    total = sum(fn({k: v[s] for k, v in mine.items()}, mask[s], agg, global_count=count, **extra) for s in splits)
    again = sum(fn({k: v[s] for k, v in data.items()}, mask[s], agg, global_count=as_number, **extra)
                for s in splits)
    total.backward()
    assert_close(total.detach(), ref.detach(), torch.float64, name="loss")
    assert_close(again, ref.detach(), torch.float64, name="loss (global_count a number)")
    assert_close(mine[key].grad, full[key].grad, torch.float64, name="grad")


def test_loss_count_counts_what_each_mode_divides_by():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert int(rlkernels.loss_count(mask)) == 3
    assert int(rlkernels.loss_count([mask, mask.bool()], "token-mean")) == 6
    assert int(rlkernels.loss_count(mask, "seq-mean-token-sum")) == 3
    assert int(rlkernels.loss_count(mask, "seq-mean-token-sum-norm")) == 3
    assert int(rlkernels.loss_count(mask.float(), "seq-mean-token-mean")) == 2
    assert int(rlkernels.loss_count(torch.ones(5))) == 5


def test_global_count_without_tokens_gives_zero():
    data, mask = ppo_batch(2, torch.float32)
    d = {k: v[:2].clone() for k, v in data.items()}
    d["logp"].requires_grad_(True)
    loss = _policy(d, torch.zeros_like(mask[:2]), "token-mean", global_count=0)
    loss.backward()
    assert loss.item() == 0.0 and bool((d["logp"].grad == 0).all())


@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"global_count": -1}, ValueError, "global_count must be >= 0"),
    ({"global_count": "3"}, TypeError, "global_count must be a real number"),
    ({"global_count": torch.ones(2)}, TypeError, "0-d"),
    ({"global_count": True}, TypeError, "global_count"),
    ({"process_group": "dp"}, TypeError, "ProcessGroup"),
    ({"global_count": 3, "process_group": "dp"}, ValueError, "not both"),
])
def test_loss_argument_errors(kwargs, error, fragment):
    data, mask = ppo_batch(2, torch.float32)
    for fn in (_policy, _value):
        with pytest.raises(error, match=fragment):
            fn(data, mask, "token-mean", **kwargs)


def test_loss_count_errors():
    with pytest.raises(TypeError, match="non-empty list"):
        rlkernels.loss_count([])
    with pytest.raises(ValueError, match="agg must be one of"):
        rlkernels.loss_count(torch.ones(2, 3), "mean")
    with pytest.raises(ValueError, match=r"needs \[B, T\] masks"):
        rlkernels.loss_count(torch.ones(3), "seq-mean-token-mean")
    with pytest.raises(TypeError, match=r"masks\[1\] must be a torch.Tensor"):
        rlkernels.loss_count([torch.ones(2, 3), [1, 0]])
    with pytest.raises(TypeError, match="ProcessGroup"):
        rlkernels.loss_count(torch.ones(2, 3), process_group=1)


def test_global_count_compiles_fullgraph():
    """docs/design.md §4.8: with global_count (a tensor from loss_count) the losses still trace whole."""
    data, mask = ppo_batch(2, torch.float32, seed=5)
    n = rlkernels.loss_count(mask[:3]) + rlkernels.loss_count(mask[3:])

    def step(lp, v):
        pg, _ = rlkernels.ppo_policy_loss(lp[:3], data["old_logp"][:3], data["advantages"][:3], mask[:3],
                                          global_count=n)
        vf, _ = rlkernels.value_loss(v[:3], data["old_values"][:3], data["returns"][:3], mask[:3], global_count=n)
        return pg + vf

    lp1, v1 = data["logp"].clone().requires_grad_(True), data["values"].clone().requires_grad_(True)
    lp2, v2 = data["logp"].clone().requires_grad_(True), data["values"].clone().requires_grad_(True)
    eager = step(lp1, v1)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(lp2, v2)
    eager.backward()
    compiled.backward()
    assert_close(compiled.detach(), eager.detach(), torch.float32, name="loss")
    assert_close(lp2.grad, lp1.grad, torch.float32, name="grad logp")
    assert_close(v2.grad, v1.grad, torch.float32, name="grad values")
    assert bool(lp1.grad[:3].ne(0).any()), "the share has a gradient"
