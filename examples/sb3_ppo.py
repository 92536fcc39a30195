"""Stable-Baselines3 PPO on CartPole-v1 with its GAE computed by rlkernels.

    python examples/sb3_ppo.py                           # trains until the last 20 episodes average >= 475

What it shows: SB3 takes ``rollout_buffer_class``; ``rlkernels.integrations.sb3.RolloutBuffer``, whose
``compute_returns_and_advantage`` calls ``rlkernels.gae``, replaces SB3's per-step NumPy loop and leaves
the rest of SB3 untouched. SB3's conventions map onto rlkernels' like this: SB3 folds time-limit
truncation into the reward (it adds gamma * V(terminal_obs) in ``collect_rollouts``), so every episode end
left in the buffer is a terminal state: ``terminated[t] = episode_starts[t + 1]`` (``dones`` for the last
step) and ``bootstrap_value = last_values``. The first rollout is also run through SB3's own loop and the largest
difference printed (float32 rounding only).

Hyperparameters: the rl-zoo CartPole setting (8 envs x 32 steps, batch 256, 20 epochs, lr and clip range
decayed linearly from 1e-3 and 0.2, gamma 0.98, lambda 0.8). Recorded runs are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer as SB3RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

from rlkernels.integrations.sb3 import RolloutBuffer as RLKRolloutBuffer


def sb3_gae(buffer: SB3RolloutBuffer, last_values: torch.Tensor, dones: np.ndarray):
    """SB3's own loop on a copy of the buffer's arrays (for the printed cross-check)."""
    ref = SB3RolloutBuffer.__new__(SB3RolloutBuffer)
    ref.buffer_size, ref.gamma, ref.gae_lambda = buffer.buffer_size, buffer.gamma, buffer.gae_lambda
    ref.rewards, ref.values = buffer.rewards.copy(), buffer.values.copy()
    ref.episode_starts = buffer.episode_starts.copy()
    ref.advantages = np.zeros_like(buffer.advantages)
    SB3RolloutBuffer.compute_returns_and_advantage(ref, last_values, dones)
    return ref.advantages, ref.returns


class CheckedBuffer(RLKRolloutBuffer):
    """Compares the first computation with SB3's loop, then behaves exactly like the rlkernels buffer."""

    max_diff = None
    gae_time = 0.0

    def compute_returns_and_advantage(self, last_values, dones):
        t0 = time.perf_counter()
        super().compute_returns_and_advantage(last_values, dones)
        type(self).gae_time += time.perf_counter() - t0
        if type(self).max_diff is None:
            adv, ret = sb3_gae(self, last_values, dones)
            type(self).max_diff = float(max(np.abs(adv - self.advantages).max(), np.abs(ret - self.returns).max()))


class Progress(BaseCallback):
    """Prints progress each few rollouts and stops once the recent episodes average the target."""

    def __init__(self, target, window, log):
        super().__init__()
        self.target, self.window, self.log = target, window, log
        self.reached = False
        self.rollouts = 0

    def recent(self):
        rets = [ep["r"] for ep in list(self.model.ep_info_buffer)[-self.window :]]
        return float(np.mean(rets)) if rets else float("nan"), len(rets)

    def _on_rollout_end(self):
        self.rollouts += 1
        avg, n = self.recent()
        if self.rollouts % 20 == 0:
            self.log(f"step {self.num_timesteps:7d}  avg_return(last {n}) {avg:6.1f}")
        self.reached = n >= self.window and avg >= self.target

    def _on_step(self):
        return not self.reached


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--total-timesteps", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--target-return", type=float, default=475.0)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def linear(start):
    return lambda progress_remaining: progress_remaining * start


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    log = (lambda *a: None) if args.quiet else print
    CheckedBuffer.max_diff, CheckedBuffer.gae_time = None, 0.0

    env = make_vec_env("CartPole-v1", n_envs=args.num_envs, seed=args.seed)
    model = PPO(
        "MlpPolicy", env, n_steps=32, batch_size=256, n_epochs=20, gamma=0.98, gae_lambda=0.8,
        learning_rate=linear(1e-3), clip_range=linear(0.2), ent_coef=0.0,
        rollout_buffer_class=CheckedBuffer, seed=args.seed, device="cpu", verbose=0,
    )
    progress = Progress(args.target_return, args.window, log)
    start = time.perf_counter()
    # log_interval=None: SB3 never dumps its logger, so the last train/* values stay readable below.
    model.learn(total_timesteps=args.total_timesteps, callback=progress, log_interval=None)
    wall = time.perf_counter() - start
    env.close()

    avg, n = progress.recent()
    values = model.logger.name_to_value
    stats = {k.split("/", 1)[1]: float(v) for k, v in values.items() if k.startswith("train/")}
    log(f"{'reached' if progress.reached else 'did not reach'} avg return {avg:.1f} (target "
        f"{args.target_return}, last {n} episodes) after {model.num_timesteps} steps, {wall:.1f}s")
    log(f"rlkernels.gae in the buffer: {CheckedBuffer.gae_time:.3f}s in all; first rollout vs SB3's loop: "
        f"max |diff| {CheckedBuffer.max_diff:.2e}  (buffer class {RLKRolloutBuffer.__module__}.{RLKRolloutBuffer.__qualname__})")
    log("last update: " + "  ".join(f"{k} {v:.4g}" for k, v in stats.items()))
    return dict(reached=progress.reached, avg_return=avg, global_step=model.num_timesteps, wall_time=wall,
                gae_max_diff_vs_sb3=CheckedBuffer.max_diff, gae_time=CheckedBuffer.gae_time, **stats)


if __name__ == "__main__":
    main()
