"""A few LLM-style PPO steps (RLHF layout) on a tiny transformer, with every RL op from rlkernels.

    python examples/llm_ppo_step.py                      # 3 rollouts x 2 PPO epochs, prints loss and stats
    python examples/llm_ppo_step.py --head logits        # the same through the full [B, T, V] logits

What it shows, in the ``[B, T]`` layout of LLM trainers (verl, OpenRLHF):
- a 2-layer causal transformer (d=64) over a 32000-token vocabulary with a value head; random prompts;
  responses sampled token by token and cut at an EOS token, so ``response_mask`` marks the real tokens;
- ``rlkernels.linear_logprobs(hidden, lm_head.weight, tokens, return_entropy=True)`` in the PPO update (the
  default ``--head fused`` of ``--impl rlkernels``): log-probs of the sampled tokens and the entropy from the
  last hidden states, without the [B, T, 32000] logits; with ``--head logits``,
  ``rlkernels.gather_logprobs(logits, tokens, return_entropy=True)``, one pass over the logits (as for the old
  and reference log-probs). At the end the peak memory of one PPO update (forward and backward) is printed for
  both heads;
- ``rlkernels.kl_penalty(logp, ref_logp, kind)`` against a frozen reference copy of the initial policy,
  turned into a per-token reward of ``-kl_coef * kl``; the score of a toy reward model (the fraction of
  response tokens with an even id) is added at the last response token;
- ``rlkernels.gae(rewards, values, gamma=1, lam=0.95, mask=response_mask, time_dim=-1)``: padding after
  EOS is skipped (advantages and returns 0 there);
- ``rlkernels.ppo_policy_loss(..., response_mask, agg=...)`` and ``rlkernels.value_loss`` (clipped), with
  their statistics (clipfrac, approx_kl, ratio_max, vf_clipfrac) returned as tensors.

``--impl torch`` runs the same steps on the eager torch code these ops replace (log_softmax + gather and a
softmax entropy over the logits, verl's masked GAE loop, the PPO and value losses and the KL estimator as
verl writes them), with the same random numbers, so the two runs give the same losses to float rounding and
the time per phase (sampling; scoring: old/reference forward, log-probs, KL, GAE; update: forward, log-probs,
losses, backward, optimizer) shows where the fused ops change the step time. The gain is in the log-prob
passes over the [B, T, V] logits, so it shows with long responses and a large vocabulary:

    python examples/llm_ppo_step.py --batch 8 --response-len 224 --iterations 2 --impl torch
    python examples/llm_ppo_step.py --batch 8 --response-len 224 --iterations 2 --impl rlkernels

Recorded runs are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import numpy as np
import torch
from torch import nn

import rlkernels

EOS = 2
PAD = 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="prompts per rollout")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--response-len", type=int, default=32, help="max response tokens")
    p.add_argument("--eos-prob", type=float, default=0.03,
                   help="extra sampling probability of EOS per step (so responses have varied lengths)")
    p.add_argument("--iterations", type=int, default=3, help="rollouts")
    p.add_argument("--ppo-epochs", type=int, default=2, help="optimizer steps per rollout")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--kl-kind", default="k3", choices=("k1", "abs", "k2", "k3"))
    p.add_argument("--agg", default="token-mean",
                   choices=("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"))
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--ent-coef", type=float, default=0.0)
    p.add_argument("--vf-coef", type=float, default=0.5)
    p.add_argument("--impl", default="rlkernels", choices=("rlkernels", "torch"),
                   help="rlkernels' fused ops, or the eager torch code they replace")
    p.add_argument("--head", default="fused", choices=("fused", "logits"),
                   help="with --impl rlkernels, the update's log-probs from hidden states (linear_logprobs) or from "
                        "the full logits (gather_logprobs)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


class TinyLM(nn.Module):
    """Token + position embeddings, causal transformer encoder layers, tied-free lm_head and a value head."""

    def __init__(self, vocab, d, layers, max_len=256):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.value_head = nn.Linear(d, 1)

    def hidden(self, ids):
        T = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=ids.device)
        return self.norm(self.body(h, mask=causal, is_causal=True))

    def forward(self, ids, last_only=False):
        h = self.hidden(ids)
        if last_only:  # sampling needs the next token's logits only
            h = h[:, -1:]
        return self.lm_head(h), self.value_head(h).squeeze(-1)


@torch.no_grad()
def sample(model, prompts, n_new, eos_prob, gen):
    """Sampled responses [B, n_new] and their mask (1 up to and including EOS, 0 after)."""
    seq = prompts
    done = torch.zeros(prompts.shape[0], dtype=torch.bool)
    tokens, mask = [], []
    for _ in range(n_new):
        logits, _ = model(seq, last_only=True)
        probs = torch.softmax(logits[:, -1].float(), -1)
        probs = (1 - eos_prob) * probs + eos_prob * nn.functional.one_hot(torch.tensor(EOS), probs.shape[-1])
        tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        tok = torch.where(done, torch.full_like(tok, PAD), tok)
        mask.append(~done)
        tokens.append(tok)
        done = done | (tok == EOS)
        seq = torch.cat([seq, tok[:, None]], 1)
    return torch.stack(tokens, 1), torch.stack(mask, 1)


def response_outputs(model, prompts, responses):
    """Logits predicting each response token [B, R, V] and the values at those positions [B, R]."""
    P = prompts.shape[1]
    logits, values = model(torch.cat([prompts, responses], 1))
    return logits[:, P - 1 : -1], values[:, P - 1 : -1]


def response_logprobs(model, prompts, responses, head, ops):
    """Log-probs of the response tokens and the entropies [B, R], and the values [B, R]: from the hidden states
    through the fused head (no [B, R, V] logits), or from the logits (``ops.gather_logprobs``)."""
    if head == "logits":
        logits, values = response_outputs(model, prompts, responses)
        return (*ops.gather_logprobs(logits, responses, return_entropy=True), values)
    P = prompts.shape[1]
    h = model.hidden(torch.cat([prompts, responses], 1))[:, P - 1 : -1]
    logp, entropy = rlkernels.linear_logprobs(h, model.lm_head.weight, responses, return_entropy=True)
    return logp, entropy, model.value_head(h).squeeze(-1)


def reward_model(responses, mask):
    """Toy score per sequence: the fraction of response tokens with an even id."""
    even = ((responses % 2) == 0) & mask
    return even.sum(1) / mask.sum(1).clamp(min=1)


def masked_whiten(x, m):
    m = m.to(x.dtype)
    mean = (x * m).sum() / m.sum()
    var = (((x - mean) ** 2) * m).sum() / m.sum()
    return (x - mean) * torch.rsqrt(var + 1e-8) * m


# ----------------------------------------------------------------------------------------------------
# The eager torch code the rlkernels ops replace (--impl torch), written as verl writes it
# ----------------------------------------------------------------------------------------------------


class Eager:
    @staticmethod
    def gather_logprobs(logits, tokens, return_entropy=False):
        logp_all = torch.log_softmax(logits.float(), -1)
        logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        if not return_entropy:
            return logp
        return logp, torch.logsumexp(logits.float(), -1) - (torch.softmax(logits.float(), -1) * logits).sum(-1)

    @staticmethod
    def kl_penalty(logp, ref_logp, kind):
        if kind == "k1":
            return logp - ref_logp
        if kind == "abs":
            return (logp - ref_logp).abs()
        if kind == "k2":
            return 0.5 * (logp - ref_logp).square()
        d = torch.clamp(ref_logp - logp, -20, 20)
        return torch.clamp(torch.exp(d) - d - 1, -10, 10)

    @staticmethod
    def gae(rewards, values, gamma, lam, mask, time_dim):
        """verl's compute_gae_advantage_return loop (masked tokens carry the values through), 0 where masked."""
        m = mask.to(values.dtype)
        nextvalues = torch.zeros_like(values[:, 0])
        lastgaelam = torch.zeros_like(values[:, 0])
        out = []
        for t in reversed(range(values.shape[1])):
            delta = rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            nextvalues = values[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * m[:, t] + (1 - m[:, t]) * lastgaelam
            out.append(lastgaelam)
        advantages = torch.stack(out[::-1], 1)
        return advantages * m, (advantages + values) * m

    @staticmethod
    def _agg(loss, m, agg):
        if agg == "token-mean":
            return (loss * m).sum() / m.sum().clamp(min=1)
        if agg == "seq-mean-token-sum":
            return (loss * m).sum(1).mean()
        if agg == "seq-mean-token-mean":
            rows = m.sum(1) > 0
            return ((loss * m).sum(1) / m.sum(1).clamp(min=1))[rows].mean()
        return (loss * m).sum() / loss.numel()

    @staticmethod
    def _mean(x, m):
        return (x * m).sum() / m.sum().clamp(min=1)

    @classmethod
    def ppo_policy_loss(cls, logp, old_logp, advantages, mask, *, clip_low, agg):
        m = mask.to(logp.dtype)
        ratio = torch.exp(torch.clamp(logp - old_logp, -20, 20))
        loss1 = -advantages * ratio
        loss2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_low)
        loss = torch.maximum(loss1, loss2)
        with torch.no_grad():
            stats = {"clipfrac": cls._mean((loss2 > loss1).to(m.dtype), m),
                     "approx_kl": cls._mean(old_logp - logp, m), "ratio_mean": cls._mean(ratio, m),
                     "ratio_max": ratio[mask].max()}
        return cls._agg(loss, m, agg), stats

    @classmethod
    def value_loss(cls, values, old_values, returns, mask, *, clip, agg):
        m = mask.to(values.dtype)
        clipped = torch.clamp(values, old_values - clip, old_values + clip)
        l1, l2 = (values - returns).square(), (clipped - returns).square()
        with torch.no_grad():
            stats = {"vf_clipfrac": cls._mean((l2 > l1).to(m.dtype), m)}
        return 0.5 * cls._agg(torch.maximum(l1, l2), m, agg), stats


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    log = (lambda *a: None) if args.quiet else print

    ops = rlkernels if args.impl == "rlkernels" else Eager
    phases = {"sample": 0.0, "score": 0.0, "update": 0.0}
    policy = TinyLM(args.vocab, args.d_model, args.layers)
    ref = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    history = []
    start = time.perf_counter()
    for it in range(args.iterations):
        # ---- rollout: sample, score, old log-probs / values, reference log-probs --------------------
        t0 = time.perf_counter()
        prompts = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=gen)
        responses, mask = sample(policy, prompts, args.response_len, args.eos_prob, gen)
        t1 = time.perf_counter()
        phases["sample"] += t1 - t0
        with torch.no_grad():
            logits, old_values = response_outputs(policy, prompts, responses)
            old_logp = ops.gather_logprobs(logits, responses)
            del logits
            ref_logits, _ = response_outputs(ref, prompts, responses)
            ref_logp = ops.gather_logprobs(ref_logits, responses)
            del ref_logits
            score = reward_model(responses, mask)
            kl = ops.kl_penalty(old_logp, ref_logp, args.kl_kind) * mask
            rewards = -args.kl_coef * kl
            last = mask.sum(1) - 1  # index of the last response token (every response has at least one)
            rewards[torch.arange(args.batch), last] += score
            advantages, returns = ops.gae(rewards, old_values, gamma=1.0, lam=0.95, mask=mask, time_dim=-1)
            advantages = masked_whiten(advantages, mask)
        t2 = time.perf_counter()
        phases["score"] += t2 - t1

        # ---- PPO epochs (one full-batch optimizer step each) ----------------------------------------
        def ppo_loss(head, prompts=prompts, responses=responses, old_logp=old_logp, advantages=advantages,
                     mask=mask, old_values=old_values, returns=returns):
            logp, entropy, values = response_logprobs(policy, prompts, responses, head, ops)
            pg_loss, pstats = ops.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=args.clip, agg=args.agg)
            vf_loss, vstats = ops.value_loss(values, old_values, returns, mask, clip=args.clip, agg=args.agg)
            ent = (entropy * mask).sum() / mask.sum()
            return pg_loss + args.vf_coef * vf_loss - args.ent_coef * ent, pg_loss, vf_loss, ent, pstats, vstats

        head = args.head if args.impl == "rlkernels" else "logits"
        for epoch in range(args.ppo_epochs):
            t3 = time.perf_counter()
            loss, pg_loss, vf_loss, ent, pstats, vstats = ppo_loss(head)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            phases["update"] += time.perf_counter() - t3
            row = {
                "iteration": it, "epoch": epoch, "loss": loss.item(), "pg_loss": pg_loss.item(),
                "vf_loss": vf_loss.item(), "entropy": ent.item(), "score": float(score.mean()),
                "kl_ref": float(kl.sum() / mask.sum()), "response_len": float(mask.sum(1).float().mean()),
                "grad_norm": float(grad_norm),
                **{k: float(v) for k, v in pstats.items()}, **{k: float(v) for k, v in vstats.items()},
            }
            history.append(row)
            log(f"iter {it} epoch {epoch}  loss {row['loss']:+.4f}  pg {row['pg_loss']:+.4f}  "
                f"vf {row['vf_loss']:.4f}  entropy {row['entropy']:.3f}  score {row['score']:.3f}  "
                f"kl_ref {row['kl_ref']:.2e}  len {row['response_len']:.1f}  clipfrac {row['clipfrac']:.3f}  "
                f"approx_kl {row['approx_kl']:+.2e}  ratio_max {row['ratio_max']:.3f}  "
                f"vf_clipfrac {row['vf_clipfrac']:.3f}")
    wall = time.perf_counter() - start
    log(f"{len(history)} optimizer steps in {wall:.1f}s ({args.impl}); time per phase:")
    for k, label in (("sample", "sampling"), ("score", "old/ref log-probs, KL, GAE"),
                     ("update", "log-probs, losses, backward, step")):
        log(f"  {label:34s} {phases[k]:7.2f}s  ({100 * phases[k] / wall:4.1f}%)")
    peaks = update_peak_memory(ppo_loss, policy) if not args.quiet and args.impl == "rlkernels" else {}
    for head, peak in peaks.items():
        log(f"peak memory of one PPO update (forward + backward), {head} head: {peak / 2**20:.1f} MiB")
    return {"history": history, "wall_time": wall, "phases": phases, "peak_bytes": peaks, **history[-1]}


def update_peak_memory(ppo_loss, policy):
    """The peak memory of one loss forward and backward through each head (gradients discarded)."""
    from rlkernels.bench.common import peak_bytes

    def update(head):
        policy.zero_grad(set_to_none=True)
        ppo_loss(head)[0].backward()
        policy.zero_grad(set_to_none=True)

    return {head: peak_bytes(lambda h=head: update(h), "cpu") for head in ("fused", "logits")}


if __name__ == "__main__":
    main()
