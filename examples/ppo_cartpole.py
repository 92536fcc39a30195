"""CleanRL-style PPO on CartPole-v1 with rlkernels computing GAE and the PPO losses.

    python examples/ppo_cartpole.py                      # trains until the last 20 episodes average >= 475

What it shows: a gymnasium ``SyncVectorEnv`` rollout in the CleanRL/SB3 layout ``[T, B]``, with
terminated and truncated episodes kept apart. A truncated episode (CartPole's 500-step time limit) is
not a terminal state: its advantage bootstraps from the value of the *final* observation, which the
vector env hands over in ``info["final_obs"]`` (``autoreset_mode=SAME_STEP``). Every step gets
``next_values[t] = V(s_{t+1})`` with the true next state, and ``rlkernels.gae(..., terminated=,
truncated=, next_values=)`` does the rest (docs/design.md §4.2). The loss is ``rlkernels.ppo_policy_loss`` +
``rlkernels.value_loss`` (clipped), minus ``--ent-coef`` times the entropy, with log-probs and
entropy from ``rlkernels.gather_logprobs``. At the end it prints the time spent per
phase (env stepping with action sampling, next values, GAE, loss/backward/optimizer).

Defaults: 8 envs x 32 steps per rollout, one 256-sample minibatch, 20 epochs, lr 1e-3 annealed over
the budget, gamma 0.98, lambda 0.8, no entropy bonus (the rl-zoo CartPole setting, CleanRL's loop).
With these defaults the target is reached in about 40k environment steps; most of the time is the update
(20 epochs), and GAE is under 1% of it. ``--impl torch`` runs the same steps on the eager code rlkernels
replaces (the CleanRL-style GAE loop over time, log_softmax + gather, the eager losses), with the same random
numbers: at CartPole scale the run is bound by env stepping either way. Many envs and long rollouts make the
GAE loop's cost visible in its own phase (``--num-envs 64 --num-steps 2048``); the step where the fused ops
change the total is the LLM-style one (examples/llm_ppo_step.py). Recorded runs are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import collections
import random
import time

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import rlkernels


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--total-timesteps", type=int, default=200_000, help="budget of environment steps")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--target-return", type=float, default=475.0,
                   help="stop once the mean return of the last --window finished episodes reaches this")
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--num-steps", type=int, default=32, help="steps per env per rollout")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--anneal-lr", type=int, default=1, help="1: decay the lr linearly to 0 over the budget")
    p.add_argument("--gamma", type=float, default=0.98)
    p.add_argument("--gae-lambda", type=float, default=0.8)
    p.add_argument("--num-minibatches", type=int, default=1)
    p.add_argument("--update-epochs", type=int, default=20)
    p.add_argument("--clip-coef", type=float, default=0.2)
    p.add_argument("--clip-vloss", type=int, default=1)
    p.add_argument("--ent-coef", type=float, default=0.0)
    p.add_argument("--vf-coef", type=float, default=0.5)
    p.add_argument("--max-grad-norm", type=float, default=0.5)
    p.add_argument("--norm-adv", type=int, default=1)
    p.add_argument("--impl", default="rlkernels", choices=("rlkernels", "torch"),
                   help="rlkernels' fused ops, or the eager torch code they replace")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def layer_init(layer, std=2**0.5, bias_const=0.0):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self, obs_dim, n_actions):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, n_actions), std=0.01),
        )

    def value(self, x):
        return self.critic(x).squeeze(-1)

    def logits(self, x):
        return self.actor(x)


class Eager:
    """The eager torch code the rlkernels calls replace (--impl torch): CleanRL's loops and losses."""

    @staticmethod
    def gather_logprobs(logits, actions, return_entropy=False):
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        if not return_entropy:
            return logp
        return logp, -(logp_all.exp() * logp_all).sum(-1)

    @staticmethod
    def gae(rewards, values, *, gamma, lam, terminated, truncated, next_values):
        """CleanRL's reverse loop over time, with the next value of every step given (time limits bootstrap)."""
        advantages = torch.zeros_like(rewards)
        lastgaelam = torch.zeros_like(rewards[0])
        for t in reversed(range(rewards.shape[0])):
            nonterminal = 1.0 - terminated[t].float()
            cont = 1.0 - (terminated[t] | truncated[t]).float()
            delta = rewards[t] + gamma * next_values[t] * nonterminal - values[t]
            lastgaelam = delta + gamma * lam * cont * lastgaelam
            advantages[t] = lastgaelam
        return advantages, advantages + values

    @staticmethod
    def ppo_policy_loss(logp, old_logp, advantages, *, clip_low):
        ratio = (logp - old_logp).exp()
        loss1 = -advantages * ratio
        loss2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_low)
        with torch.no_grad():
            stats = {"clipfrac": (loss2 > loss1).float().mean(), "approx_kl": (old_logp - logp).mean()}
        return torch.max(loss1, loss2).mean(), stats

    @staticmethod
    def value_loss(v, old_v, returns, *, clip):
        if clip is None:
            return 0.5 * ((v - returns) ** 2).mean(), {}
        v_clipped = old_v + torch.clamp(v - old_v, -clip, clip)
        return 0.5 * torch.max((v - returns) ** 2, (v_clipped - returns) ** 2).mean(), {}


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    log = (lambda *a: None) if args.quiet else print
    ops = rlkernels if args.impl == "rlkernels" else Eager

    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make("CartPole-v1") for _ in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    envs.action_space.seed(args.seed)
    obs_dim = envs.single_observation_space.shape[0]
    agent = Agent(obs_dim, envs.single_action_space.n)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    T, B = args.num_steps, args.num_envs
    batch_size = T * B
    minibatch_size = batch_size // args.num_minibatches
    num_updates = max(1, args.total_timesteps // batch_size)

    # Rollout storage, time-major [T, B] (CleanRL / SB3 layout, rlkernels' default time_dim=0).
    obs = torch.zeros(T, B, obs_dim)
    next_obs_buf = torch.zeros(T, B, obs_dim)  # s_{t+1}: the final observation where the episode ended
    actions = torch.zeros(T, B, dtype=torch.long)
    logprobs = torch.zeros(T, B)
    rewards = torch.zeros(T, B)
    terminated = torch.zeros(T, B, dtype=torch.bool)
    truncated = torch.zeros(T, B, dtype=torch.bool)
    values = torch.zeros(T, B)

    phases = collections.OrderedDict(env=0.0, next_values=0.0, gae=0.0, update=0.0)
    recent = collections.deque(maxlen=args.window)
    ep_return = np.zeros(B)
    ep_len = np.zeros(B, dtype=np.int64)
    n_episodes = 0
    global_step = 0
    reached = False
    stats = {}
    start = time.perf_counter()

    o, _ = envs.reset(seed=args.seed)
    next_obs = torch.as_tensor(o, dtype=torch.float32)
    for update in range(1, num_updates + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (update - 1.0) / num_updates)

        # ---- rollout ------------------------------------------------------------------------------
        t0 = time.perf_counter()
        for t in range(T):
            global_step += B
            obs[t] = next_obs
            with torch.no_grad():
                logits = agent.logits(next_obs)
                a = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(-1)
                logprobs[t] = ops.gather_logprobs(logits, a)
                values[t] = agent.value(next_obs)
            actions[t] = a
            o, r, term, trunc, info = envs.step(a.numpy())
            rewards[t] = torch.as_tensor(r, dtype=torch.float32)
            terminated[t] = torch.as_tensor(term)
            truncated[t] = torch.as_tensor(trunc)
            next_obs = torch.as_tensor(o, dtype=torch.float32)
            true_next = o.copy()
            done = np.logical_or(term, trunc)
            if done.any():
                for i in np.flatnonzero(done):
                    true_next[i] = info["final_obs"][i]  # SAME_STEP autoreset: o[i] is already the reset
            next_obs_buf[t] = torch.as_tensor(true_next, dtype=torch.float32)
            ep_return += r
            ep_len += 1
            for i in np.flatnonzero(done):
                recent.append(ep_return[i])
                n_episodes += 1
                ep_return[i] = 0.0
                ep_len[i] = 0
        phases["env"] += time.perf_counter() - t0

        # ---- advantages ---------------------------------------------------------------------------
        t0 = time.perf_counter()
        with torch.no_grad():
            next_values = agent.value(next_obs_buf)  # V(s_{t+1}) for every step, one batched forward
        t1 = time.perf_counter()
        phases["next_values"] += t1 - t0
        t0 = t1
        with torch.no_grad():
            advantages, returns = ops.gae(
                rewards, values, gamma=args.gamma, lam=args.gae_lambda,
                terminated=terminated, truncated=truncated, next_values=next_values,
            )
        phases["gae"] += time.perf_counter() - t0

        # ---- PPO update ---------------------------------------------------------------------------
        t0 = time.perf_counter()
        b_obs = obs.reshape(-1, obs_dim)
        b_actions = actions.reshape(-1)
        b_logprobs = logprobs.reshape(-1)
        b_adv = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)
        clipfracs = []
        for _ in range(args.update_epochs):
            perm = torch.randperm(batch_size)
            for s in range(0, batch_size, minibatch_size):
                mb = perm[s : s + minibatch_size]
                new_logp, entropy = ops.gather_logprobs(
                    agent.logits(b_obs[mb]), b_actions[mb], return_entropy=True
                )
                entropy = entropy.mean()
                new_v = agent.value(b_obs[mb])
                mb_adv = b_adv[mb]
                if args.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss, pstats = ops.ppo_policy_loss(
                    new_logp, b_logprobs[mb], mb_adv, clip_low=args.clip_coef
                )
                v_loss, _ = ops.value_loss(
                    new_v, b_values[mb], b_returns[mb], clip=args.clip_coef if args.clip_vloss else None
                )
                loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                clipfracs.append(pstats["clipfrac"])
        phases["update"] += time.perf_counter() - t0

        avg = float(np.mean(recent)) if recent else float("nan")
        stats = {
            "pg_loss": pg_loss.item(), "v_loss": v_loss.item(), "entropy": entropy.item(),
            "approx_kl": float(pstats["approx_kl"]), "clipfrac": float(torch.stack(clipfracs).mean()),
        }
        if update % 10 == 0 or update == num_updates:
            log(f"step {global_step:7d}  episodes {n_episodes:5d}  avg_return(last {len(recent)}) {avg:6.1f}  "
                f"pg {stats['pg_loss']:+.4f}  v {stats['v_loss']:.3f}  ent {stats['entropy']:.3f}  "
                f"kl {stats['approx_kl']:.4f}  clipfrac {stats['clipfrac']:.3f}  "
                f"{time.perf_counter() - start:.1f}s")
        if len(recent) >= args.window and avg >= args.target_return:
            reached = True
            break
    envs.close()

    wall = time.perf_counter() - start
    avg = float(np.mean(recent)) if recent else float("nan")
    log(f"{'reached' if reached else 'did not reach'} avg return {avg:.1f} (target {args.target_return}, "
        f"last {len(recent)} episodes) after {global_step} steps, {n_episodes} episodes, {wall:.1f}s")
    log("time per phase:")
    for k, label in (("env", "env stepping + action sampling"), ("next_values", "V(s_{t+1}) forward"),
                     ("gae", f"GAE ({args.impl})"),
                     ("update", "loss/backward/optimizer")):
        log(f"  {label:32s} {phases[k]:7.2f}s  ({100 * phases[k] / wall:4.1f}%)  "
            f"{1e3 * phases[k] / update:9.2f} ms/update")
    return dict(reached=reached, avg_return=avg, global_step=global_step, episodes=n_episodes,
                wall_time=wall, phases=dict(phases), **stats)


if __name__ == "__main__":
    main()
