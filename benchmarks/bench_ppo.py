"""Forward + backward of the PPO policy loss at LLM scale on CPU: rlkernels against the eager verl-style code.

    python -m benchmarks.bench_ppo [--batch 256] [--steps 4096] [--repeats 15] [--csv out.csv]

Providers, all on the same inputs in the same run (float32 [B, T], bool mask, asymmetric + dual clip,
token-mean, every statistic computed):
  rlkernels            the fused custom op, stats as 0-d tensors
  verl eager           verl's compute_policy_loss written out in torch ops, stats as 0-d tensors
  verl eager + .item() the same with the stats turned into Python floats, as verl's actor logs them
  verl compiled        torch.compile of the eager code (compile time excluded; warmed up first)
Reported: median and 20/80 quantiles, effective GB/s over the bytes that must move (inputs read once by the
forward and once by the backward, the gradient written once), and speedups against each baseline.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import subprocess
import time

import torch

import rlkernels


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def verl_policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0):
    """verl's compute_policy_loss (token-mean, dual clip), as eager torch code."""
    m = mask.to(logp.dtype)
    log_ratio = torch.clamp(logp - old_logp, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    approx_kl = masked_mean(-log_ratio, m)
    losses1 = -advantages * ratio
    losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped = torch.maximum(losses1, losses2)
    clipfrac = masked_mean(torch.gt(losses2, losses1).float(), m)
    losses3 = -advantages * dual_clip
    lower = torch.minimum(losses3, clipped)
    clipfrac_lower = masked_mean(torch.gt(clipped, losses3).float() * (advantages < 0).float(), m)
    losses = torch.where(advantages < 0, lower, clipped)
    loss = masked_mean(losses, m)
    stats = {
        "clipfrac": clipfrac.detach(),
        "clipfrac_lower": clipfrac_lower.detach(),
        "approx_kl": approx_kl.detach(),
        "ratio_mean": masked_mean(ratio.detach(), m),
        "ratio_max": torch.where(mask, ratio.detach(), torch.zeros_like(ratio)).max(),
    }
    return loss, stats


def rlkernels_policy_loss(logp, old_logp, advantages, mask):
    return rlkernels.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)


def step(fn, logp, old, adv, mask, item=False):
    logp.grad = None
    loss, stats = fn(logp, old, adv, mask)
    loss.backward()
    if item:
        return {k: v.item() for k, v in stats.items()}
    return stats


def measure(fn, inputs, repeats, item=False, warmup=3):
    for _ in range(warmup):
        step(fn, *inputs, item=item)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(fn, *inputs, item=item)
        times.append(time.perf_counter() - start)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001  (not a git checkout)
        return "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--csv", default=None, help="append the rows to this CSV file")
    args = parser.parse_args()

    B, T = args.batch, args.steps
    gen = torch.Generator().manual_seed(0)
    logp = (-torch.rand(B, T, generator=gen) * 3).requires_grad_(True)
    old = logp.detach() + 0.2 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, T, generator=gen)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # right-padded responses
    inputs = (logp, old, adv, mask)

    # Same answer first: a benchmark of different math is meaningless.
    ours, ours_stats = rlkernels_policy_loss(*inputs)
    theirs, their_stats = verl_policy_loss(*inputs)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    for k in ours_stats:
        torch.testing.assert_close(ours_stats[k], their_stats[k], rtol=1e-4, atol=1e-6)

    providers = {
        "rlkernels": (rlkernels_policy_loss, False),
        "verl eager": (verl_policy_loss, False),
        "verl eager + .item()": (verl_policy_loss, True),
    }
    compile_s = None
    if not args.no_compile:
        compiled = torch.compile(verl_policy_loss)
        start = time.perf_counter()
        step(compiled, *inputs)
        compile_s = time.perf_counter() - start
        providers["verl compiled"] = (compiled, False)

    results = {name: measure(fn, inputs, args.repeats, item=item) for name, (fn, item) in providers.items()}

    # fp32 logp, old_logp, advantages and a bool mask read by the forward and the backward; the gradient written.
    n = B * T
    bytes_moved = 2 * n * (4 + 4 + 4 + 1) + n * 4
    device = f"CPU, {torch.get_num_threads()} threads"
    print(f"PPO policy loss forward + backward, [B={B}, T={T}] = {n / 1e6:.2f}M tokens, float32, {device}")
    if compile_s is not None:
        print(f"(torch.compile warm-up, excluded: {compile_s:.1f} s)")
    base = results["rlkernels"][0]
    header = f"{'provider':<22} {'median ms':>10} {'p20 ms':>8} {'p80 ms':>8} {'GB/s':>7} {'rlkernels speedup':>18}"
    print(header)
    print("-" * len(header))
    rows = []
    for name, (med, p20, p80) in results.items():
        speedup = med / base
        print(f"{name:<22} {med * 1e3:>10.2f} {p20 * 1e3:>8.2f} {p80 * 1e3:>8.2f} {bytes_moved / med / 1e9:>7.2f} "
              f"{speedup:>17.2f}x")
        rows.append({"kernel": "ppo_policy_loss_fwd_bwd", "provider": name, "B": B, "T": T, "device": device,
                     "median_ms": med * 1e3, "p20_ms": p20 * 1e3, "p80_ms": p80 * 1e3,
                     "gb_per_s": bytes_moved / med / 1e9, "rlkernels_speedup": speedup, "commit": commit(),
                     "date": datetime.date.today().isoformat()})
    if args.csv:
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if f.tell() == 0:
                writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
