"""PPO on the tiny LLM-style policy with 2 data-parallel x 2 vocab-parallel processes (gloo, CPU), against the
same training on one process: the losses are the same.

    python examples/llm_ppo_distributed.py            # spawns 4 processes on this machine, then runs 1 process
    torchrun --nproc-per-node 4 examples/llm_ppo_distributed.py --no-single   # the distributed run alone

What it shows (docs/design.md §4.8):
- the LM head sharded over the vocabulary across a tensor-parallel group of 2: each rank holds lm_head rows
  [start_r, start_r + V_r); ``rlkernels.linear_logprobs(hidden, lm_head_shard.weight, tokens,
  return_entropy=True, process_group=tp_group)`` (``--head logits``: ``gather_logprobs`` on the rank's slice
  of the logits) gives the whole vocabulary's log-probs and entropy on both ranks. The hidden states enter the head through an identity whose backward all-reduces over the
  tensor-parallel group (Megatron's column-parallel input), so the trunk gets the gradient of every shard;
- the batch split over a data-parallel group of 2 (DistributedDataParallel over the ranks that hold the same
  shard), each rank's rows in 2 micro-batches with gradient accumulation;
- ``n = rlkernels.loss_count(micro_batch_masks, agg, process_group=dp_group)`` once per step, then
  ``ppo_policy_loss(..., global_count=n)`` and ``value_loss(..., global_count=n)`` per micro-batch: the losses
  of all micro-batches on all ranks add up to the loss of the whole batch on one process; the loss is
  multiplied by the data-parallel size because DDP averages gradients over ranks.
One rollout is sampled on one process first (prompts, responses cut at EOS, rewards, GAE advantages); both
runs then take the same optimizer steps on it from the same initial weights, and the per-step losses are
printed side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib
import os
import pathlib
import pickle
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

import rlkernels

HERE = pathlib.Path(__file__).resolve().parent
AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--vocab", type=int, default=4001, help="odd: the two vocabulary shards differ in size")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--batch", type=int, default=8, help="sequences in the global batch")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--response-len", type=int, default=12)
    p.add_argument("--eos-prob", type=float, default=0.08)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps on the rollout")
    p.add_argument("--micro-batches", type=int, default=2, help="per data-parallel rank")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--agg", default="token-mean", choices=AGGS)
    p.add_argument("--head", default="fused", choices=("fused", "logits"),
                   help="log-probs through linear_logprobs on the head's shard, or gather_logprobs on its logits")
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--ent-coef", type=float, default=0.01)
    p.add_argument("--vf-coef", type=float, default=0.5)
    p.add_argument("--dp", type=int, default=2, help="data-parallel size")
    p.add_argument("--tp", type=int, default=2, help="vocab-parallel (tensor-parallel) size")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--no-single", action="store_true", help="skip the single-process run")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck run is stopped")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def _llm_example():
    """The tiny policy, sampler and reward model of examples/llm_ppo_step.py."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module("llm_ppo_step")


class CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; the backward sums the input gradient over the tensor-parallel group, since each rank's
    head shard gives only its vocabulary's part of it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class Policy(nn.Module):
    """TinyLM with its LM head restricted to the vocabulary rows [start, start + size) (all rows on one process)."""

    def __init__(self, lm, start, size, tp_group=None):
        super().__init__()
        self.lm = lm
        weight = lm.lm_head.weight.detach()[start:start + size].clone()
        lm.lm_head = nn.Linear(weight.shape[1], size, bias=False, dtype=weight.dtype)
        lm.lm_head.weight.data.copy_(weight)
        self.tp_group = tp_group

    def forward(self, ids, n_prompt, responses, head):
        """Log-probs of the responses and the entropies (the whole vocabulary's) and the values, [B, R]."""
        lm = self.lm
        T = ids.shape[1]
        h = lm.tok(ids) + lm.pos(torch.arange(T, device=ids.device))
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=ids.device, dtype=h.dtype)
        h = lm.norm(lm.body(h, mask=causal, is_causal=True))[:, n_prompt - 1 : -1]  # the positions predicting responses
        head_in = h if self.tp_group is None else CopyToTensorParallel.apply(h, self.tp_group)
        values = lm.value_head(h).squeeze(-1)
        if head == "fused":  # the head's rows of this rank, never a [B, R, V_r] logits tensor
            logp, entropy = rlkernels.linear_logprobs(head_in, lm.lm_head.weight, responses, return_entropy=True,
                                                      process_group=self.tp_group)
        else:
            logp, entropy = rlkernels.gather_logprobs(lm.lm_head(head_in), responses, return_entropy=True,
                                                      process_group=self.tp_group)
        return logp, entropy, values


def make_rollout(args):
    """One sampled batch on one process: the initial weights, the tokens and every per-token quantity."""
    llm = _llm_example()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    lm = llm.TinyLM(args.vocab, args.d_model, args.layers).to(dtype)
    prompts = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=gen)
    responses, mask = llm.sample(lm, prompts, args.response_len, args.eos_prob, gen)
    with torch.no_grad():
        logits, old_values = llm.response_outputs(lm, prompts, responses)
        old_logp = rlkernels.gather_logprobs(logits, responses)
        rewards = torch.zeros_like(old_values)
        last = mask.sum(1) - 1
        rewards[torch.arange(args.batch), last] = llm.reward_model(responses, mask).to(dtype)
        advantages, returns = rlkernels.gae(rewards, old_values, gamma=1.0, lam=0.95, mask=mask, time_dim=-1)
        advantages = llm.masked_whiten(advantages, mask)
    return {"state": lm.state_dict(), "ids": torch.cat([prompts, responses], 1), "responses": responses,
            "mask": mask, "old_logp": old_logp, "old_values": old_values, "advantages": advantages,
            "returns": returns}


def build_policy(args, rollout, start, size, tp_group=None):
    llm = _llm_example()
    lm = llm.TinyLM(args.vocab, args.d_model, args.layers).to(getattr(torch, args.dtype))
    lm.load_state_dict(rollout["state"])
    return Policy(lm, start, size, tp_group)


def micro_step_loss(policy, mb, args, *, global_count=None):
    """The PPO loss of one micro-batch: its share of the global batch's loss when global_count is given."""
    logp, entropy, values = policy(mb["ids"], args.prompt_len, mb["responses"], args.head)
    mask = mb["mask"]
    extra = {"norm_length": float(args.response_len)} if args.agg == "seq-mean-token-sum-norm" else {}
    pg_loss, stats = rlkernels.ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], mask, clip_low=args.clip,
                                               agg=args.agg, global_count=global_count, **extra)
    vf_loss, _ = rlkernels.value_loss(values, mb["old_values"], mb["returns"], mask, clip=args.clip, agg=args.agg,
                                      global_count=global_count)
    # The mean entropy over the global batch's tokens: summed here, divided by the global token count.
    tokens = rlkernels.loss_count(mask) if global_count is None else mb["token_count"]
    ent = (entropy * mask).sum() / tokens.clamp(min=1)
    return pg_loss + args.vf_coef * vf_loss - args.ent_coef * ent, pg_loss, vf_loss, stats


def train_single(args, rollout):
    """The whole batch on one process: one optimizer step per step."""
    policy = build_policy(args, rollout, 0, args.vocab)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    history = []
    for _ in range(args.steps):
        loss, pg, vf, _ = micro_step_loss(policy, rollout, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"loss": loss.item(), "pg_loss": pg.item(), "vf_loss": vf.item()})
    return history


def _split(n, parts):
    """Row ranges of ``parts`` contiguous, nearly equal pieces of ``n`` rows."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def train_distributed(args, rollout):
    """This process's part of the dp x tp run; returns the per-step losses of the whole batch (every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == args.dp * args.tp, f"the run needs dp * tp = {args.dp * args.tp} processes, got {world}"
    dp_rank, tp_rank = divmod(rank, args.tp)
    # Every rank creates every group, in the same order.
    tp_groups = [dist.new_group([d * args.tp + t for t in range(args.tp)]) for d in range(args.dp)]
    dp_groups = [dist.new_group([d * args.tp + t for d in range(args.dp)]) for t in range(args.tp)]
    tp_group, dp_group = tp_groups[dp_rank], dp_groups[tp_rank]
    shard = _split(args.vocab, args.tp)[tp_rank]  # contiguous vocabulary shards in tensor-parallel rank order
    policy = build_policy(args, rollout, shard.start, shard.stop - shard.start, tp_group)
    ddp = nn.parallel.DistributedDataParallel(policy, process_group=dp_group)
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    rows = _split(args.batch, args.dp)[dp_rank]
    keys = ("ids", "responses", "mask", "old_logp", "old_values", "advantages", "returns")
    micro_batches = []
    for part in _split(rows.stop - rows.start, args.micro_batches):
        part = slice(rows.start + part.start, rows.start + part.stop)
        micro_batches.append({k: rollout[k][part] for k in keys})
    masks = [mb["mask"] for mb in micro_batches]
    count = rlkernels.loss_count(masks, args.agg, process_group=dp_group)  # the global batch's count, every rank
    token_count = count if args.agg == "token-mean" else rlkernels.loss_count(masks, process_group=dp_group)
    history = []
    for _ in range(args.steps):
        opt.zero_grad(set_to_none=True)
        totals = torch.zeros(3, dtype=getattr(torch, args.dtype))
        for i, mb in enumerate(micro_batches):
            mb["token_count"] = token_count
            last = i == len(micro_batches) - 1
            ctx = ddp.no_sync() if not last else contextlib.nullcontext()
            with ctx:  # gradients are averaged over the data-parallel ranks once, after the last micro-batch
                loss, pg, vf, _ = micro_step_loss(ddp, mb, args, global_count=count)
                (loss * args.dp).backward()  # DDP averages over dp ranks; the shares add up to the whole loss
            totals += torch.stack([loss.detach(), pg.detach(), vf.detach()])
        opt.step()
        dist.all_reduce(totals, group=dp_group)  # the micro-batch shares of every data-parallel rank
        history.append(dict(zip(("loss", "pg_loss", "vf_loss"), totals.tolist())))
    return history


def _worker(rank, world, port, args, rollout, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.timeout))
    try:
        history = train_distributed(args, rollout)
        if rank == 0 and out is not None:
            with open(out, "wb") as f:
                pickle.dump(history, f)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(args, rollout):
    """Spawns dp * tp processes on this machine (gloo on localhost) and returns rank 0's history."""
    import torch.multiprocessing as mp

    # Spawned processes import the worker by module name: this file, importable from its own directory.
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    worker = importlib.import_module(pathlib.Path(__file__).stem)._worker
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "history.pkl")
        world = args.dp * args.tp
        ctx = mp.start_processes(worker, args=(world, _free_port(), args, rollout, out), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + args.timeout
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {world} processes did not finish within {args.timeout}s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        with open(out, "rb") as f:
            return pickle.load(f)


def main(argv=None):
    args = parse_args(argv)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # this process is one rank of the run
    quiet = args.quiet or (under_torchrun and os.environ["RANK"] != "0")
    log = (lambda *a: None) if quiet else print
    torch.set_num_threads(1)
    rollout = make_rollout(args)
    start = time.perf_counter()
    if under_torchrun:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
        try:
            distributed = train_distributed(args, rollout)
        finally:
            dist.destroy_process_group()
    else:
        distributed = run_distributed(args, rollout)
    wall_distributed = time.perf_counter() - start
    single = None if args.no_single else train_single(args, copy.deepcopy(rollout))
    max_diff = 0.0
    log(f"agg={args.agg}, {args.dp} data-parallel x {args.tp} vocab-parallel processes ({wall_distributed:.1f}s)"
        + ("" if single is None else "; each step's value / the single-process run's"))
    for step, row in enumerate(distributed):
        if single is None:
            log(f"step {step}  loss {row['loss']:+.6f}  pg {row['pg_loss']:+.6f}  vf {row['vf_loss']:.6f}")
            continue
        ref = single[step]
        diff = max(abs(row[k] - ref[k]) for k in row)
        max_diff = max(max_diff, diff)
        log(f"step {step}  loss {row['loss']:+.6f} / {ref['loss']:+.6f}  pg {row['pg_loss']:+.6f} / "
            f"{ref['pg_loss']:+.6f}  vf {row['vf_loss']:.6f} / {ref['vf_loss']:.6f}  |diff| {diff:.1e}")
    return {"distributed": distributed, "single": single, "max_abs_diff": max_diff}


if __name__ == "__main__":
    main()
