"""Bellman backups: rlkernels against the eager torch code DQN trainers and planners run, and its torch.compile.

    python -m benchmarks.bench_bellman [--device cpu|cuda] [--quick] [--csv out.csv | --results-dir DIR]
                                       [--cache data,warm] [--no-compile]

Cases (float32, issue 6's shapes), every provider on the same inputs in the same run, outputs checked
against each other before timing:
  q_targets[kind]     B=65536 transitions, A=18 actions; eager = gather/max/logsumexp + arithmetic
  td_loss fwd+bwd     B=65536, A=18, Huber, mean; eager = gather + F.huber_loss + backward (the scatter)
  (both again at B=128, a DQN trainer's replay batch, warm: the fixed cost of the calls)
  bellman_backup      B=64 MDPs, S=256, A=8 (P = 128 MiB); eager = einsum + max
  value_iteration     the same MDPs, gamma=0.9, tol=1e-4; eager = the einsum loop with a convergence test
                      per iteration (.item(), as a Python loop must); compiled = torch.compile of the backup
Reported: median, GB/s over the bytes that must move (each input read once, each output written once; for
value iteration P once per iteration, which the CPU kernel beats by keeping each MDP's P in cache), percent
of measured copy bandwidth, and the rlkernels speedup (provider median / rlkernels median).
Cache states (--cache, a comma-separated list; default "data,warm"): data = cold data (each provider's inputs
evicted from the caches before each timed call), llc = 256 MiB rewritten instead (which also evicts the
interpreter), warm = nothing flushed. The sample-based ops are timed in every listed state in the same run:
a replay batch's next_q / q is usually the output of the network forward just before (cache-resident, the
warm rows) but may come from DRAM (the cold rows). The model-based ops (P = 128 MiB, larger than any cache)
are timed in the first state only.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import rlkernels
from rlkernels.bench import common

GAMMA = 0.99


# ----------------------------------------------------------------------------------------------------
# Eager baselines (what users write)
# ----------------------------------------------------------------------------------------------------


def eager_q_targets(kind, r, next_q, term, online, probs, temperature=0.5):
    if kind == "max":
        v = next_q.max(1).values
    elif kind == "double":
        v = next_q.gather(1, online.argmax(1, keepdim=True)).squeeze(1)
    elif kind == "expected":
        v = (probs * next_q).sum(1)
    else:
        v = temperature * torch.logsumexp(next_q / temperature, 1)
    return r + GAMMA * (1.0 - term.float()) * v


def eager_td_step(q, actions, targets):
    q.grad = None
    qsa = q.gather(1, actions.unsqueeze(1)).squeeze(1)
    loss = F.huber_loss(qsa, targets)
    loss.backward()
    return loss.detach(), (targets - qsa).detach()


def rlk_td_step(q, actions, targets):
    q.grad = None
    loss, td = rlkernels.td_loss(q, actions, targets)
    loss.backward()
    return loss.detach(), td


def eager_backup(P, R, V, gamma):
    Q = R + gamma * torch.einsum("bsat,bt->bsa", P, V)
    V_new, policy = Q.max(-1)
    return Q, V_new, policy


def eager_value_iteration(P, R, gamma, tol, max_iters, backup=eager_backup):
    V = torch.zeros(P.shape[:2], dtype=P.dtype, device=P.device)
    for k in range(1, max_iters + 1):
        Q, V_new, policy = backup(P, R, V, gamma)
        residual = (V_new - V).abs().amax(-1)
        V = V_new
        if residual.max().item() < tol:  # the host sync every Python loop pays
            break
    return V, Q, policy, k, residual


# ----------------------------------------------------------------------------------------------------


SMALL_B = 128


def _cache_modes(text):
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in common.CACHE_MODES]
    if not modes or bad:
        raise argparse.ArgumentTypeError(f"cache states must be among {common.CACHE_MODES}, got {text!r}")
    return list(dict.fromkeys(modes))


def _same(a, b, what, rtol=1e-4, atol=1e-4):
    try:
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)
    except AssertionError as exc:
        raise SystemExit(f"check failed, {what}: {exc}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes, few runs, no torch.compile")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--cache", type=_cache_modes, default="data,warm",
                        help="comma-separated cache states to time in (data, llc, warm: see "
                        "rlkernels.bench.common.CACHE_MODES); the model-based ops use the first")
    parser.add_argument("--warm-cache", action="store_true", help="the same as --cache warm")
    parser.add_argument("--csv", default=None, help="write the rows to this CSV file")
    parser.add_argument("--results-dir", default=None,
                        help="write the rows to <dir>/<device>-<date>-bellman.csv (scripts/bench.sh: benchmarks/results)")
    args = parser.parse_args(argv)
    dev = args.device
    quick = args.quick
    runs = {"budget_s": 0.1, "min_runs": 3, "max_runs": 5} if quick else {"budget_s": 1.0, "min_runs": 5}
    if args.warm_cache:
        args.cache = ["warm"]
    use_compile = not (quick or args.no_compile)
    if use_compile:
        # Compile in this process: inductor's pool of compile workers otherwise keeps working after a compile
        # returns and slowed the next timed call on 2 cores (B=128 q_targets[max]: 35-53 us right after the
        # compile, 20 us without it).
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    copy_gbps, _ = common.copy_bandwidth(dev)
    meta = {"device": common.device_name(dev), "commit": common.git_commit(), "date": common.today()}
    rows = []

    def record(op, shape, results, nbytes, note="", cache=None):
        base = results["rlkernels"][0].median_s
        for provider, (timing, extra) in results.items():
            gbps = nbytes / timing.median_s / 1e9
            rows.append({**meta, "op": op, "shape": shape, "cache": cache or args.cache[0], "provider": provider,
                         "median_s": timing.median_s,
                         "q20_s": timing.q20_s, "q80_s": timing.q80_s, "runs": timing.runs, "gbps": gbps,
                         "pct_copy_bw": 100 * gbps / copy_gbps, "speedup_vs": timing.median_s / base,
                         "note": " ".join(filter(None, [note, extra]))})

    def timed(fn, reads=(), cache=None):
        return common.measure(fn, dev, flush=common.flusher_for(cache or args.cache[0], dev, fn, reads), **runs)

    def compiled_or_none(fn):
        if not use_compile:
            return None
        try:
            c = torch.compile(fn)
            c()  # compile outside the timing
            return c
        except Exception as exc:  # noqa: BLE001  (a baseline that cannot compile is a note, not a crash)
            print(f"torch.compile failed: {type(exc).__name__}: {exc}"[:200], file=sys.stderr)
            return None

    # ---- sample-based: q_targets and td_loss ------------------------------------------------------------
    def sample_based(B, A, caches):
        g = torch.Generator().manual_seed(0)
        r = torch.randn(B, generator=g).to(dev)
        next_q = torch.randn(B, A, generator=g).to(dev)
        online = torch.randn(B, A, generator=g).to(dev)
        probs = torch.softmax(torch.randn(B, A, generator=g), -1).to(dev)
        term = (torch.rand(B, generator=g) < 0.05).to(dev)
        shape = f"[B={B}, A={A}]"
        for kind in ("max", "double", "expected", "soft"):
            ours = lambda: rlkernels.q_targets(r, next_q, terminated=term, gamma=GAMMA, kind=kind,  # noqa: E731
                                               next_q_online=online, next_probs=probs, temperature=0.5)
            eager = lambda: eager_q_targets(kind, r, next_q, term, online, probs)  # noqa: E731
            _same(ours(), eager(), f"q_targets[{kind}]")
            extra = {"double": [online], "expected": [probs]}.get(kind, [])
            reads = [r, next_q, term, *extra]
            comp = compiled_or_none(eager)
            for cache in caches:
                results = {"rlkernels": (timed(ours, reads, cache)[0], ""),
                           "eager torch": (timed(eager, reads, cache)[0], "")}
                if comp is not None:
                    results["torch.compile(eager)"] = (timed(comp, reads, cache)[0], "")
                record(f"q_targets[{kind}]", shape, results, common.bytes_moved([r, next_q, term, *extra], [r]),
                       cache=cache)

        q = torch.randn(B, A, generator=g).to(dev).requires_grad_()
        actions = torch.randint(0, A, (B,), generator=g).to(dev)
        targets = (torch.randn(B, generator=g) * 2).to(dev)
        ours = lambda: rlk_td_step(q, actions, targets)  # noqa: E731
        eager = lambda: eager_td_step(q, actions, targets)  # noqa: E731
        (l1, e1), g1 = ours(), q.grad.clone()
        (l2, e2), g2 = eager(), q.grad.clone()
        _same(l1, l2, "td_loss")
        _same(e1, e2, "td_errors")
        _same(g1, g2, "td_loss grad")
        reads = [q, actions, targets]
        comp = compiled_or_none(lambda: eager_td_step(q, actions, targets)) if use_compile else None
        for cache in caches:
            results = {"rlkernels": (timed(ours, reads, cache)[0], ""),
                       "eager torch": (timed(eager, reads, cache)[0], "")}
            if comp is not None:
                results["torch.compile(eager)"] = (timed(comp, reads, cache)[0], "")
            # forward: actions, targets, one Q per row (counted as the whole row: its cache lines); td_errors
            # written; backward: grad_q written.
            nbytes = common.bytes_moved([actions, targets, q], [targets, q])
            record("td_loss fwd+bwd", shape, results, nbytes, "huber, mean", cache=cache)

    sample_based(*((4096, 18) if quick else (65536, 18)), args.cache)
    # A DQN replay batch as trainers sample it (CleanRL's default batch is 128, SB3's 32): cache-resident, and
    # the time is the fixed cost of the calls (dispatch, autograd), not memory traffic.
    sample_based(SMALL_B, 18, ["warm"])

    g = torch.Generator().manual_seed(1)
    # ---- model-based: bellman_backup and value_iteration ---------------------------------------------------
    Bm, S, Am = (8, 64, 4) if quick else (64, 256, 8)
    P = torch.rand(Bm, S, Am, S, generator=g)
    P = (P / P.sum(-1, keepdim=True)).to(dev)
    R = torch.randn(Bm, S, Am, generator=g).to(dev)
    V = torch.randn(Bm, S, generator=g).to(dev)
    shape = f"[B={Bm}, S={S}, A={Am}]"
    ours = lambda: rlkernels.bellman_backup(P, R, V, 0.9)  # noqa: E731
    eager = lambda: eager_backup(P, R, V, 0.9)  # noqa: E731
    for a, b, what in zip(ours(), eager(), ("Q", "V", "policy")):
        _same(a, b, f"bellman_backup {what}")
    reads = [P, R, V]
    results = {"rlkernels": (timed(ours, reads)[0], ""), "eager torch": (timed(eager, reads)[0], "einsum + max")}
    comp = compiled_or_none(eager)
    if comp is not None:
        results["torch.compile(eager)"] = (timed(comp, reads)[0], "")
    nbytes = common.bytes_moved([P, R, V], [R, V, V.long()])
    record("bellman_backup", shape, results, nbytes)

    tol, max_iters = 1e-4, 1000  # float32: a tol near V's rounding (1e-6 of |V| ~ 10) would time noise
    ours = lambda: rlkernels.value_iteration(P, R, 0.9, tol=tol, max_iters=max_iters)  # noqa: E731
    eager = lambda: eager_value_iteration(P, R, 0.9, tol, max_iters)  # noqa: E731
    mine, theirs = ours(), eager()
    iters = int(mine[3])
    if abs(iters - theirs[3]) > 2:  # float32 sums in another order may stop one backup apart
        raise SystemExit(f"check failed, value_iteration: {iters} iterations vs the eager loop's {theirs[3]}")
    _same(mine[0], theirs[0], "value_iteration V")
    vi_runs = {"budget_s": 0.1, "min_runs": 3, "max_runs": 5} if quick else {"budget_s": 3.0, "min_runs": 3,
                                                                             "max_runs": 7}
    vi_timed = lambda fn: common.measure(fn, dev, flush=common.flusher_for(args.cache[0], dev, fn, [P, R]),  # noqa: E731
                                         single_run_over_s=30.0, **vi_runs)[0]
    results = {"rlkernels": (vi_timed(ours), ""), "eager torch": (vi_timed(eager), "einsum loop, .item() per iteration")}
    if use_compile:
        comp_backup = torch.compile(eager_backup)
        comp = lambda: eager_value_iteration(P, R, 0.9, tol, max_iters, backup=comp_backup)  # noqa: E731
        comp()
        results["torch.compile(backup) loop"] = (vi_timed(comp), "")
    nbytes = iters * common.bytes_moved([P], []) + common.bytes_moved([R], [R, V, V.long()])
    record("value_iteration", shape, results, nbytes, f"{iters} iterations; bytes = P read once per iteration")

    # ---- print and write ---------------------------------------------------------------------------------
    print(f"Bellman backups on {meta['device']} ({dev}), commit {meta['commit']}, {meta['date']}; copy bandwidth "
          f"{copy_gbps:.1f} GB/s; float32")
    for cache in args.cache:
        print(f"  {cache}: {common.CACHE_TEXT[cache]}")
    header = f"{'op':<20} {'shape':<22} {'cache':<5} {'provider':<28} {'median':>10} {'GB/s':>7} {'% copy':>7} {'rlk speedup':>11}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['op']:<20} {row['shape']:<22} {row['cache']:<5} {row['provider']:<28} {row['median_s'] * 1e3:>8.3f}ms "
              f"{row['gbps']:>7.2f} {row['pct_copy_bw']:>6.1f}% {row['speedup_vs']:>10.2f}x  {row['note']}")
    if args.csv is None and args.results_dir is not None:
        args.csv = str(Path(args.results_dir) / f"{common.slug(meta['device'])}-{meta['date']}-bellman.csv")
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
