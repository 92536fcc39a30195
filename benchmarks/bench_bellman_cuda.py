"""Timings of the CUDA Bellman kernels (csrc/cuda/bellman_*.cu) against the bytes they must move.

    python -m benchmarks.bench_bellman_cuda            # on a GPU machine, after building the extension
    python -m benchmarks.bench_bellman_cuda --device cpu --backend cpu --small   # checks the script itself

Each line: the op, its shape, the median time, and the effective bandwidth (bytes each input read once plus
each output written once, over the time) next to a torch copy of the same number of bytes, the practical
ceiling (DESIGN.md §8). value_iteration is reported per backup and, separately, the cost of a launch pair
after convergence (max_iters far above the iterations needed).
"""

from __future__ import annotations

import argparse
import time

import torch

import rlkernels


def median_s(fn, device, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def copy_gbs(nbytes, device):
    src = torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = median_s(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / t / 1e9  # read + write


def report(name, shape, t, nbytes, device):
    gbs = nbytes / t / 1e9
    print(f"{name:<28} {str(shape):<22} {t * 1e6:10.1f} us {gbs:8.1f} GB/s (copy {copy_gbs(nbytes, device):7.1f} GB/s)")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (to check the script on a CPU)")
    args = ap.parse_args(argv)
    dev, be = args.device, args.backend
    k = 64 if args.small else 1
    g = torch.Generator().manual_seed(0)

    B, A = 1_048_576 // k, 18
    r = torch.randn(B, generator=g).to(dev)
    q = torch.randn(B, A, generator=g).to(dev)
    term = (torch.rand(B, generator=g) < 0.1).to(dev)
    for kind in ("max", "soft"):
        t = median_s(lambda: rlkernels.q_targets(r, q, terminated=term, kind=kind, temperature=0.5, backend=be), dev)
        report(f"q_targets {kind}", (B, A), t, q.numel() * 4 + B * (4 + 1 + 4), dev)

    act = torch.randint(0, A, (B,), generator=g).to(dev)
    qq = q.clone().requires_grad_(True)

    def td():
        loss, _ = rlkernels.td_loss(qq, act, r, backend=be)
        loss.backward()

    t = median_s(td, dev)
    # forward reads a row element, action, target; writes td_errors; backward writes the dense grad_q.
    report("td_loss fwd+bwd (mean)", (B, A), t, B * (4 + 8 + 4 + 4) * 2 + B * A * 4, dev)

    T, N = 256, 4096 // k
    rw = torch.randn(T, N, generator=g).to(dev)
    vals = torch.randn(T, N, generator=g).to(dev)
    done = (torch.rand(T, N, generator=g) < 0.02).to(dev)
    t = median_s(lambda: rlkernels.n_step_returns(rw, vals, n=5, gamma=0.99, terminated=done, backend=be), dev)
    report("n_step_returns n=5", (T, N), t, rw.numel() * (4 + 4 + 1 + 4), dev)

    for Bm, S, Am in ((64 // k or 1, 512, 8), (4096 // k, 64, 4), (1, 4096 // k, 16)):
        P = torch.softmax(torch.randn(Bm, S, Am, S, generator=g), -1).to(dev)
        R = torch.randn(Bm, S, Am, generator=g).to(dev)
        V = torch.randn(Bm, S, generator=g).to(dev)
        t = median_s(lambda: rlkernels.bellman_backup(P, R, V, gamma=0.99, backend=be), dev)
        report("bellman_backup", (Bm, S, Am), t, P.numel() * 4 + R.numel() * 4 * 2 + V.numel() * 4 * 3, dev)
        iters = 50
        t = median_s(lambda: rlkernels.value_iteration(P, R, gamma=0.99, tol=0.0, max_iters=iters, backend=be), dev,
                     reps=5)
        report(f"value_iteration /backup", (Bm, S, Am), t / iters, P.numel() * 4, dev)
        # Converges at once (tol huge): the remaining max_iters - 1 launch pairs exit immediately.
        t_skip = median_s(lambda: rlkernels.value_iteration(P, R, gamma=0.99, tol=1e30, max_iters=1000, backend=be),
                          dev, reps=5)
        print(f"{'  after convergence':<28} {str((Bm, S, Am)):<22} {t_skip / 1000 * 1e6:10.2f} us per skipped pair")


if __name__ == "__main__":
    main()
