"""CPU benchmark of rlkernels.gather_logprobs against what a trainer would otherwise run.

    python -m benchmarks.bench_logprobs [--rows 4096] [--vocab 32000] [--reps 5] [--dtype float32]

Baselines, all measured in the same run on the same tensors:
  * torch eager log_softmax + gather (verl/OpenRLHF style);
  * TRL's selective_log_softmax for fp32: gather, then logsumexp one row at a time in a Python loop, which
    TRL uses to avoid materializing the full log_softmax;
  * naive entropy: sum softmax(z) * log_softmax(z) next to log_softmax + gather;
  * forward + backward of log_softmax + gather through torch autograd.
Each row: median wall time over --reps runs (after one warm-up), the speedup of rlkernels against the
baseline of its group, and the peak extra memory the call allocated (the profiler's running sum of CPU
allocations and frees, inputs excluded).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import rlkernels


def median_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def peak_extra_mib(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations are charged to the op that made them (self_cpu_memory_usage: an op's total also holds the
    # memory of the ops inside it); frees are separate "[memory]" records with a negative size.
    changes = sorted(((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                      for e in prof.events()), key=lambda c: c[0])
    live = peak = 0
    for _, size in changes:
        live += size
        peak = max(peak, live)
    return peak / 2**20


def torch_logp(x, t):
    return torch.log_softmax(x.float(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


def trl_selective_log_softmax(x, t):
    selected = torch.gather(x, -1, t.unsqueeze(-1)).squeeze(-1)
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in x])
    return selected - lse


def naive_logp_entropy(x, t):
    logsm = torch.log_softmax(x.float(), -1)
    entropy = -(torch.softmax(x.float(), -1) * logsm).sum(-1)
    return logsm.gather(-1, t.unsqueeze(-1)).squeeze(-1), entropy


def forward_backward(fn, x, t):
    def run():
        xg = x.detach().requires_grad_()
        fn(xg, t).sum().backward()

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = (torch.randn(args.rows, args.vocab) * 3).to(dtype)
    t = torch.randint(0, args.vocab, (args.rows,))
    gib = x.numel() * x.element_size() / 2**30

    groups = [
        ("logp", [
            ("rlkernels.gather_logprobs", lambda: rlkernels.gather_logprobs(x, t)),
            ("torch log_softmax+gather", lambda: torch_logp(x, t)),
            ("TRL selective_log_softmax", lambda: trl_selective_log_softmax(x, t)),
        ]),
        ("logp+entropy", [
            ("rlkernels.gather_logprobs(entropy)", lambda: rlkernels.gather_logprobs(x, t, return_entropy=True)),
            ("naive softmax*log_softmax", lambda: naive_logp_entropy(x, t)),
        ]),
        ("logp fwd+bwd", [
            ("rlkernels fwd+bwd", forward_backward(rlkernels.gather_logprobs, x, t)),
            ("rlkernels fwd+bwd inplace", forward_backward(
                lambda a, b: rlkernels.gather_logprobs(a * 1.0, b, inplace_backward=True), x, t)),
            ("torch log_softmax+gather fwd+bwd", forward_backward(torch_logp, x, t)),
        ]),
    ]
    print(f"gather_logprobs on CPU: logits [{args.rows}, {args.vocab}] {args.dtype} ({gib:.2f} GiB), "
          f"{torch.get_num_threads()} threads, median of {args.reps}")
    header = f"{'group':<14}{'implementation':<36}{'median ms':>11}{'GB/s':>8}{'speedup':>9}{'peak MiB':>10}"
    print(header)
    print("-" * len(header))
    for group, impls in groups:
        times = {name: median_ms(fn, args.reps) for name, fn in impls}
        ours = times[impls[0][0]]
        for name, fn in impls:
            ms = times[name]
            # bytes that must move: the logits read once (twice plus a gradient write for fwd+bwd)
            moved = gib * 2**30 * (3 if "bwd" in group else 1)
            speedup = ms / ours
            print(f"{group:<14}{name:<36}{ms:>11.1f}{moved / ms / 1e6:>8.1f}{speedup:>8.2f}x{peak_extra_mib(fn):>10.1f}")
    print("speedup = baseline time / rlkernels time within each group (the first row of a group is rlkernels; "
          "for fwd+bwd the inplace row includes an extra copy of the logits made to have a non-leaf to destroy)")


if __name__ == "__main__":
    main()
