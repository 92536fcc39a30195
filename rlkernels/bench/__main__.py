"""rlkernels-bench: times rlkernels' kernels against the code trainers run today, on this machine.

    rlkernels-bench [--device cpu|cuda] [--ops OP|FAMILY,...] [--quick] [--sizes] [--cache data|llc|warm]
                    [--csv PATH | --results-dir DIR] [--skip-baselines scipy,torchrl] [--no-compile]
                    [--isa default,avx2,avx512]
    python -m rlkernels.bench ...        (the same)

Every op family (rlkernels/bench/cases.py):
  returns   GAE ([T, B] with terminations, one long sequence, token-level [B, T] with a mask), discounted
            returns, V-trace; against the CleanRL, SB3, verl and TorchBeast loops, SpinningUp's lfilter,
            TorchRL's vectorized estimators, and torch.compile of the CleanRL loop
  logprobs  gather_logprobs (forward, with entropy, forward + backward) on logits [N, V]; against
            log_softmax + gather (and its torch.compile), TRL's selective_log_softmax, verl's entropy
  ppo       ppo_policy_loss (forward with its statistics, forward + backward) and value_loss (forward +
            backward) on [B, T] with a mask; against verl's eager losses and their torch.compile
  bellman   q_targets (max, double, expected, soft) and td_loss (forward + backward) on a batch of
            transitions, bellman_backup and value_iteration on a batch of MDPs; against the eager torch code
            and its torch.compile. The sample-based ops are timed in the run's cache state and warm (a replay
            batch is often the output of the network just before), and again at B=128 (a replay batch as
            trainers sample it) warm only.
For each case: every rlkernels backend built for the device and every baseline, timed by one timer in this
one run with cold data by default (--cache: each provider's inputs evicted from the caches before each call);
GB/s from the bytes the op must move (the same for every provider of a case), its percent of the measured
copy bandwidth, and the speedup of the fastest rlkernels backend over each provider (ratio of medians).
rlkernels' output is checked against the case's first baseline on the same input before it is timed.

--isa times the cpu backend once per listed instruction-set level this CPU runs (rows rlkernels[cpu:avx2] and
so on; csrc/cpu/isa.h), to compare the per-ISA builds of the same kernels; the levels it lacks are named and
skipped. The levels' calls are timed in turns (one call of each level per round), so a change of the machine's
other load during the run reaches every level alike. The CPU model and its widest level are in the device name
of every row and in the file name.

Prints a table, and writes a CSV with a markdown table and a plot (PNG) next to it. ``--sizes`` sweeps a
few sizes per op and layout instead of the fixed shapes and plots GB/s against size, one line per
provider. Baselines from packages that are not installed (scipy, torchrl) are listed as skipped.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from rlkernels.bench import baselines, cases, common, engine

try:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress
    from rich.table import Table
except ImportError:  # pragma: no cover  (rich comes with the bench extra)
    Console = None

CSV_FIELDS = ["device", "commit", "date", "op", "shape", "series", "numel", "dtype", "cache", "provider"]
CSV_FIELDS += ["median_s", "q20_s", "q80_s", "runs", "gbps", "pct_copy_bw", "pct_read_bw", "speedup_vs", "peak_mib", "note"]
DEFAULT_RESULTS = Path("rlkernels-bench-results")


def fmt_time(s: float) -> str:
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_pct(p) -> str:
    if not p:
        return "—"
    return f"{p:.1f}%" if p >= 1 else f"{p:.2g}%"


def display_rows(results: list[dict]) -> list[list[str]]:
    dash = "—"
    return [
        [
            r["op"],
            r["shape"],
            r["cache"],
            r["provider"],
            fmt_time(r["median_s"]) if r["median_s"] else dash,
            f"{r['gbps']:.3g}" if r["gbps"] else dash,
            fmt_pct(r["pct_copy_bw"]),
            fmt_pct(r.get("pct_read_bw")),
            f"{r['speedup_vs']:.2f}×" if r["speedup_vs"] else dash,
            " ".join(filter(None, [f"peak {r['peak_mib']:.4g} MiB" if r.get("peak_mib") is not None else "", r["note"]])),
        ]
        for r in results
    ]


HEADERS = ["op", "shape", "cache", "provider", "median", "GB/s", "% copy BW", "% read BW", "rlkernels speedup", "note"]


def write_csv(path: Path, results: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: ("" if r[k] is None else r[k]) for k in CSV_FIELDS} for r in results)


def write_markdown(path: Path, title: str, results: list[dict], conditions: str = "") -> None:
    lines = [f"# {title}", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in display_rows(results)]
    if conditions:
        lines += ["", conditions]
    path.write_text("\n".join(lines) + "\n")


def default_csv(device_name: str, date: str, sizes: bool, results_dir: Path) -> Path:
    return results_dir / f"{common.slug(device_name)}-{date}{'-sizes' if sizes else ''}.csv"


def main(argv=None, *, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small shapes, few runs, no torch.compile (CI smoke test)"
    )
    parser.add_argument(
        "--sizes",
        action="store_true",
        help="sweep a few sizes per op and layout (no torch.compile) and plot GB/s against size",
    )
    parser.add_argument(
        "--csv",
        type=Path,
        help="CSV path (default <results-dir>/<device>-<date>[-sizes].csv; --quick writes none unless given); "
        "the markdown table and the PNG plot go next to it",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_RESULTS,
        help=f"where the default-named CSV goes (default ./{DEFAULT_RESULTS}; scripts/bench.sh: benchmarks/results)",
    )
    parser.add_argument(
        "--ops",
        default="",
        metavar="OP,...",
        help=f"only these ops or families, in this order: {', '.join(cases.FAMILIES)} or "
        f"{', '.join(cases.KINDS)} (gae-masked: token-level GAE on [B, T])",
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--no-compile", action="store_true", help="do not time the torch.compile baselines")
    parser.add_argument(
        "--skip-baselines",
        default="",
        metavar="PKG,...",
        help="leave out the baselines of these packages (scipy, torchrl) as if not installed",
    )
    parser.add_argument(
        "--cache",
        choices=common.CACHE_MODES,
        default="data",
        help="before each timed call: evict the provider's inputs from the caches (data, the default), "
        "rewrite 256 MiB so data, code and interpreter are all evicted (llc), or nothing (warm)",
    )
    parser.add_argument("--warm-cache", action="store_true", help="the same as --cache warm")
    parser.add_argument(
        "--isa",
        default="",
        metavar="LEVEL,...",
        help="time the cpu backend once per instruction-set level (default, avx2, avx512; those this CPU runs)",
    )
    args = parser.parse_args(argv)
    if args.warm_cache:
        args.cache = "warm"
    if Console is None:
        parser.error("the benchmark needs rich: pip install 'rlkernels[bench]' (or pip install rich matplotlib)")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    baselines.DISABLED.update(p.strip() for p in args.skip_baselines.split(",") if p.strip())
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = set(ops) - set(cases.FAMILIES) - set(cases.KINDS)
    if unknown:
        parser.error(f"--ops: unknown {sorted(unknown)}; choose from {', '.join([*cases.FAMILIES, *cases.KINDS])}")
    table_of = cases.SIZES if args.sizes else cases.SHAPES
    full = "cuda" if device == "cuda" and not args.sizes else "full"
    todo = cases.entries(table_of, "quick" if args.quick else full, ops)
    if not todo:
        parser.error(f"--ops {args.ops}: no {'size sweep' if args.sizes else 'shape'} of these ops")

    console = Console()
    if not console.is_terminal:  # logs and CI: do not wrap the table at 80 columns
        console = Console(width=180)
    rlk, why = common.import_rlkernels()
    backends = common.rlkernels_backends(rlk, device) if rlk else []
    isa_levels = [level.strip() for level in args.isa.split(",") if level.strip()]
    unknown = set(isa_levels) - set(common.CPU_ISA_LEVELS)
    if unknown:
        parser.error(f"--isa: unknown {sorted(unknown)}; choose from {', '.join(common.CPU_ISA_LEVELS)}")
    if isa_levels and "cpu" in backends:
        runs_here = common.cpu_isa_levels()
        lacking = [level for level in isa_levels if level not in runs_here]
        if lacking:
            console.print(f"--isa: this CPU does not run {', '.join(lacking)}; skipped", markup=False)
        at = backends.index("cpu")
        backends[at : at + 1] = [f"cpu:{level}" for level in common.CPU_ISA_LEVELS if level in isa_levels
                                 and level in runs_here]
    if rlk is None:
        console.print(f"[bold yellow]rlkernels does not import ({why}); timing the baselines alone.[/]")
    elif not backends:
        console.print(
            f"[bold yellow]rlkernels has no {device} backend built "
            f"(available: {rlk.available_backends()}); timing the baselines alone.[/]"
        )
    settings = engine.Settings(
        device=device,
        backends=backends,
        cache=args.cache,
        runs={"budget_s": 0.1, "min_runs": 3, "max_runs": 10} if args.quick else {"budget_s": 1.0},
        quick=args.quick,
        compile=not (args.quick or args.sizes or args.no_compile),
        no_compile_why="--quick" if args.quick else "--no-compile",
        sizes=args.sizes,
    )
    if settings.compile:
        engine.one_compile_thread()

    name = common.device_name(device)
    meta = {"device": name, "commit": common.git_commit(), "date": common.today()}
    copy_gbps, copy_timing = common.copy_bandwidth(device, runs=5 if args.quick else 20)
    copy_row = {"op": "copy", "shape": "[67108864]", "provider": "tensor.copy_", "timing": copy_timing,
                "note": "256 MiB, read + write"}
    read_gbps, read_timing = common.read_bandwidth(device, runs=5 if args.quick else 20)
    read_row = {"op": "read", "shape": "[67108864]", "provider": "tensor.sum", "timing": read_timing,
                "note": "256 MiB, read only"}
    yardstick_cache = "data" if device == "cpu" else "warm"  # common.copy_bandwidth: evicted on the CPU
    results = engine.finish_rows([copy_row], 2 * 2**28, copy_gbps, meta, cache=yardstick_cache, read_gbps=read_gbps)
    results += engine.finish_rows([read_row], 2**28, copy_gbps, meta, cache=yardstick_cache, read_gbps=read_gbps)
    csv_path = args.csv or (None if args.quick else default_csv(name, meta["date"], args.sizes, args.results_dir))
    failures = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("", total=len(todo))

        def status(description: str) -> None:
            progress.update(task, description=description)
            if not console.is_terminal:  # rich draws no progress bar into a log: say it in lines
                console.print(
                    f"{progress.tasks[0].completed}/{len(todo)} {description}", markup=False, highlight=False
                )

        for kind, dims, caches in todo:
            status(f"{kind} {list(dims)}: inputs")
            groups, bad = engine.run_entry(kind, dims, caches, rlk if backends else None, settings, status)
            failures += bad
            for case, cache, rows in groups:
                series = case.series if args.sizes else ""
                results += engine.finish_rows(rows, engine.case_bytes(case), copy_gbps, meta, cache=cache,
                                              series=series, numel=case.numel, dtype=case.dtype,
                                              read_gbps=read_gbps)
            if csv_path:  # rewritten after each shape: a run stopped early keeps what it measured
                write_csv(csv_path, results)
            progress.advance(task)

    what = "size sweep" if args.sizes else "benchmarks"
    title = f"rlkernels {what} on {name} ({device}), commit {meta['commit']}, {meta['date']}"
    table = Table(*HEADERS, title=title)
    for cells in display_rows(results):
        table.add_row(*map(escape, cells))  # "rlkernels[cpu]" is not rich markup
    console.print(table)
    states = dict.fromkeys(r["cache"] for r in results[2:])
    conditions = (
        f"copy bandwidth {copy_gbps:.1f} GB/s, read bandwidth {read_gbps:.1f} GB/s; fp32; gamma={cases.GAMMA}, lambda={cases.LAM}; "
        "speedup = provider median / fastest rlkernels median, same run and cache state; cache: "
        + "; ".join(f"{state} = {common.CACHE_TEXT[state]}" for state in states)
        + "."
    )
    console.print(conditions, markup=False, highlight=False)

    if csv_path:
        write_csv(csv_path, results)
        write_markdown(csv_path.with_suffix(".md"), title, results, conditions)
        written = [csv_path, csv_path.with_suffix(".md")]
        if not args.no_plot:
            try:
                from rlkernels.bench.plot import plot
            except ImportError:
                console.print("no plot: matplotlib is not installed (pip install matplotlib)")
            else:
                written.append(plot(csv_path))
        console.print("wrote " + ", ".join(map(str, written)), markup=False, highlight=False)
    for failure in failures:
        console.print(f"[bold red]check failed: {escape(failure)}[/]")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m rlkernels.bench"))
