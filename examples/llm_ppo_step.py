"""A few LLM-style PPO steps (RLHF layout) on a tiny transformer, with every RL op from rlkernels.

    python examples/llm_ppo_step.py                      # 3 rollouts x 2 PPO epochs, prints loss and stats
    python examples/llm_ppo_step.py --head logits        # the same through the full [B, T, V] logits

What it shows, in the ``[B, T]`` layout of LLM trainers (verl, OpenRLHF):
- a 2-layer causal transformer (d=64) over a 32000-token vocabulary with a value head; random prompts;
  responses sampled token by token and cut at an EOS token, so ``response_mask`` marks the real tokens;
- ``rlkernels.linear_logprobs(hidden, lm_head.weight, tokens, return_entropy=True)`` (the default ``--head
  fused``): log-probs of the sampled tokens and the entropy from the last hidden states, without the
  [B, T, 32000] logits; with ``--head logits``, ``rlkernels.gather_logprobs(logits, tokens,
  return_entropy=True)``, one pass over the logits. At the end the peak memory of one PPO update (forward and
  backward) is printed for both heads;
- ``rlkernels.kl_penalty(logp, ref_logp, kind)`` against a frozen reference copy of the initial policy,
  turned into a per-token reward of ``-kl_coef * kl``; the score of a toy reward model (the fraction of
  response tokens with an even id) is added at the last response token;
- ``rlkernels.gae(rewards, values, gamma=1, lam=0.95, mask=response_mask, time_dim=-1)``: padding after
  EOS is skipped (advantages and returns 0 there);
- ``rlkernels.ppo_policy_loss(..., response_mask, agg=...)`` and ``rlkernels.value_loss`` (clipped), with
  their statistics (clipfrac, approx_kl, ratio_max, vf_clipfrac) returned as tensors.
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
    p.add_argument("--head", default="fused", choices=("fused", "logits"),
                   help="log-probs from hidden states (linear_logprobs) or from the full logits (gather_logprobs)")
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

    def forward(self, ids):
        h = self.hidden(ids)
        return self.lm_head(h), self.value_head(h).squeeze(-1)


@torch.no_grad()
def sample(model, prompts, n_new, eos_prob, gen):
    """Sampled responses [B, n_new] and their mask (1 up to and including EOS, 0 after)."""
    seq = prompts
    done = torch.zeros(prompts.shape[0], dtype=torch.bool)
    tokens, mask = [], []
    for _ in range(n_new):
        logits, _ = model(seq)
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


def response_logprobs(model, prompts, responses, head):
    """Log-probs of the response tokens and the entropies [B, R], and the values [B, R]: from the hidden states
    through the fused head (no [B, R, V] logits), or from the logits."""
    if head == "logits":
        logits, values = response_outputs(model, prompts, responses)
        return (*rlkernels.gather_logprobs(logits, responses, return_entropy=True), values)
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


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    log = (lambda *a: None) if args.quiet else print

    policy = TinyLM(args.vocab, args.d_model, args.layers)
    ref = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    history = []
    start = time.perf_counter()
    for it in range(args.iterations):
        # ---- rollout: sample, score, old log-probs / values, reference log-probs --------------------
        prompts = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=gen)
        responses, mask = sample(policy, prompts, args.response_len, args.eos_prob, gen)
        with torch.no_grad():
            logits, old_values = response_outputs(policy, prompts, responses)
            old_logp = rlkernels.gather_logprobs(logits, responses)
            ref_logits, _ = response_outputs(ref, prompts, responses)
            ref_logp = rlkernels.gather_logprobs(ref_logits, responses)
            score = reward_model(responses, mask)
            kl = rlkernels.kl_penalty(old_logp, ref_logp, args.kl_kind) * mask
            rewards = -args.kl_coef * kl
            last = mask.sum(1) - 1  # index of the last response token (every response has at least one)
            rewards[torch.arange(args.batch), last] += score
            advantages, returns = rlkernels.gae(rewards, old_values, gamma=1.0, lam=0.95, mask=mask,
                                                time_dim=-1)
            advantages = masked_whiten(advantages, mask)

        # ---- PPO epochs (one full-batch optimizer step each) ----------------------------------------
        def ppo_loss(head):
            logp, entropy, values = response_logprobs(policy, prompts, responses, head)
            pg_loss, pstats = rlkernels.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=args.clip,
                                                        agg=args.agg)
            vf_loss, vstats = rlkernels.value_loss(values, old_values, returns, mask, clip=args.clip,
                                                   agg=args.agg)
            ent = (entropy * mask).sum() / mask.sum()
            return pg_loss + args.vf_coef * vf_loss - args.ent_coef * ent, pg_loss, vf_loss, ent, pstats, vstats

        for epoch in range(args.ppo_epochs):
            loss, pg_loss, vf_loss, ent, pstats, vstats = ppo_loss(args.head)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
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
    log(f"{len(history)} optimizer steps in {wall:.1f}s")
    peaks = update_peak_memory(ppo_loss, policy) if not args.quiet else {}
    for head, peak in peaks.items():
        log(f"peak memory of one PPO update (forward + backward), {head} head: {peak / 2**20:.1f} MiB")
    return {"history": history, "wall_time": wall, "peak_bytes": peaks, **history[-1]}


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
