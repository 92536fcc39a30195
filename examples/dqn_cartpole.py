"""Double DQN on CartPole-v1 with rlkernels computing the targets and the TD loss.

    python examples/dqn_cartpole.py                      # 50k steps, or until the last 20 episodes average >= 475

What it shows: a replay buffer that keeps ``terminated`` apart from ``truncated``. Only a terminal
transition drops the bootstrap; a time-limit truncation keeps V(s') (the buffer stores the true final
observation as s'). The targets are ``rlkernels.q_targets(rewards, next_q, terminated=, gamma=,
kind="double", next_q_online=)``: the online network picks the action, the target network values it
(docs/design.md §4.5), with no gradient. The loss is ``rlkernels.td_loss(q, actions, targets, loss="huber")``,
which also returns the TD errors a prioritized buffer would use as priorities (printed as mean |TD|).

Hyperparameters: the rl-zoo DQN CartPole setting (256x256 MLP, lr 2.3e-3, batch 64, 128 gradient steps
every 256 env steps, target network copied every 10 env steps, epsilon 1 -> 0.04 over the first 16%
of the budget, 1000 random steps first). The target network is copied every 10 env steps as in SB3, so
it stays fixed through each block of 128 gradient steps; copied every 10 *gradient* steps at this
learning rate, it diverges (the loss grows to about 1e9).

DQN on CartPole is less steady than PPO: within the 50k-step budget the average return can level off
below 475. Recorded runs are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import collections
import copy
import random
import time

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import rlkernels


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--total-timesteps", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--target-return", type=float, default=475.0)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--learning-rate", type=float, default=2.3e-3)
    p.add_argument("--buffer-size", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--learning-starts", type=int, default=1000)
    p.add_argument("--train-freq", type=int, default=256, help="env steps between training phases")
    p.add_argument("--gradient-steps", type=int, default=128, help="gradient steps per training phase")
    p.add_argument("--target-update", type=int, default=10,
                   help="env steps between target-network copies (SB3's convention: with --train-freq 256 the "
                        "target is the online net as it was when the training phase started)")
    p.add_argument("--exploration-fraction", type=float, default=0.16)
    p.add_argument("--start-e", type=float, default=1.0)
    p.add_argument("--end-e", type=float, default=0.04)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


class ReplayBuffer:
    def __init__(self, size, obs_dim):
        self.obs = np.zeros((size, obs_dim), np.float32)
        self.next_obs = np.zeros((size, obs_dim), np.float32)
        self.actions = np.zeros(size, np.int64)
        self.rewards = np.zeros(size, np.float32)
        self.terminated = np.zeros(size, np.bool_)
        self.size, self.pos, self.full = size, 0, False

    def add(self, o, a, r, o2, term):
        i = self.pos
        self.obs[i], self.actions[i], self.rewards[i], self.next_obs[i], self.terminated[i] = o, a, r, o2, term
        self.pos = (i + 1) % self.size
        self.full = self.full or self.pos == 0

    def sample(self, n, rng):
        idx = rng.integers(0, self.size if self.full else self.pos, n)
        return (torch.from_numpy(self.obs[idx]), torch.from_numpy(self.actions[idx]),
                torch.from_numpy(self.rewards[idx]), torch.from_numpy(self.next_obs[idx]),
                torch.from_numpy(self.terminated[idx]))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    log = (lambda *a: None) if args.quiet else print

    env = gym.make("CartPole-v1")
    env.action_space.seed(args.seed)
    obs_dim, n_actions = env.observation_space.shape[0], env.action_space.n
    q_net = nn.Sequential(nn.Linear(obs_dim, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.hidden),
                          nn.ReLU(), nn.Linear(args.hidden, n_actions))
    target_net = copy.deepcopy(q_net)
    optimizer = torch.optim.Adam(q_net.parameters(), lr=args.learning_rate)
    buffer = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim)

    phases = collections.OrderedDict(env=0.0, targets=0.0, update=0.0)
    recent = collections.deque(maxlen=args.window)
    n_episodes, ep_return, grad_steps = 0, 0.0, 0
    reached = False
    stats = {}
    start = time.perf_counter()
    o, _ = env.reset(seed=args.seed)
    for step in range(1, args.total_timesteps + 1):
        t0 = time.perf_counter()
        frac = min(1.0, step / (args.exploration_fraction * args.total_timesteps))
        eps = args.start_e + frac * (args.end_e - args.start_e)
        if step <= args.learning_starts or rng.random() < eps:
            a = int(env.action_space.sample())
        else:
            with torch.no_grad():
                a = int(q_net(torch.from_numpy(o)).argmax())
        o2, r, term, trunc, _ = env.step(a)
        buffer.add(o, a, r, o2, term)  # o2 is the true next state, also on truncation
        ep_return += r
        o = o2
        if term or trunc:
            recent.append(ep_return)
            n_episodes += 1
            ep_return = 0.0
            o, _ = env.reset()
        if step % args.target_update == 0:
            target_net.load_state_dict(q_net.state_dict())
        phases["env"] += time.perf_counter() - t0

        if step > args.learning_starts and step % args.train_freq == 0:
            losses, tds = [], []
            for _ in range(args.gradient_steps):
                t0 = time.perf_counter()
                b_obs, b_act, b_rew, b_next, b_term = buffer.sample(args.batch_size, rng)
                with torch.no_grad():
                    targets = rlkernels.q_targets(
                        b_rew, target_net(b_next), terminated=b_term, gamma=args.gamma,
                        kind="double", next_q_online=q_net(b_next),
                    )
                t1 = time.perf_counter()
                phases["targets"] += t1 - t0
                loss, td_errors = rlkernels.td_loss(q_net(b_obs), b_act, targets, loss="huber",
                                                    reduction="mean")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(q_net.parameters(), 10.0)
                optimizer.step()
                grad_steps += 1
                losses.append(loss.detach())
                tds.append(td_errors.detach().abs().mean())
                phases["update"] += time.perf_counter() - t1
            stats = {"loss": float(torch.stack(losses).mean()), "mean_abs_td": float(torch.stack(tds).mean()),
                     "epsilon": eps}
            avg = float(np.mean(recent)) if recent else float("nan")
            if (step // args.train_freq) % 10 == 0:
                log(f"step {step:7d}  episodes {n_episodes:4d}  avg_return(last {len(recent)}) {avg:6.1f}  "
                    f"loss {stats['loss']:.4f}  |td| {stats['mean_abs_td']:.3f}  eps {eps:.3f}  "
                    f"{time.perf_counter() - start:.1f}s")
            if len(recent) >= args.window and avg >= args.target_return:
                reached = True
                break
    env.close()

    wall = time.perf_counter() - start
    avg = float(np.mean(recent)) if recent else float("nan")
    log(f"{'reached' if reached else 'did not reach'} avg return {avg:.1f} (target {args.target_return}, "
        f"last {len(recent)} episodes) after {step} steps, {n_episodes} episodes, {grad_steps} gradient "
        f"steps, {wall:.1f}s")
    log("time per phase:")
    for k, label in (("env", "env stepping + acting"), ("targets", "sampling + rlkernels.q_targets"),
                     ("update", "td_loss/backward/optimizer")):
        log(f"  {label:32s} {phases[k]:7.2f}s  ({100 * phases[k] / wall:4.1f}%)")
    return dict(reached=reached, avg_return=avg, global_step=step, episodes=n_episodes,
                gradient_steps=grad_steps, wall_time=wall, phases=dict(phases), **stats)


if __name__ == "__main__":
    main()
