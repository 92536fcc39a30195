"""rlkernels-bench: times rlkernels' kernels against the code trainers run today, on this machine.

    rlkernels-bench [--device cpu|cuda] [--quick] [--sizes] [--csv PATH] [--skip-baselines scipy,torchrl]
    python -m rlkernels.bench ...        (the same; python -m benchmarks.run in a checkout)

Ops: GAE ([T, B] with terminations, one long sequence, and token-level [B, T] with a mask), discounted
returns, gather_logprobs (forward, logits [N, V]) and the PPO policy loss (forward with its statistics).
For each op and shape: every rlkernels backend built for the device and the baselines users run
today (rlkernels/bench/baselines.py), each timed with cold data (its inputs evicted from the caches) in this one run; GB/s from the bytes the op
must move (the same for every provider of a row), its percent of the measured copy bandwidth,
and the speedup of the fastest rlkernels backend over each provider (ratio of medians). rlkernels'
output is checked against the first baseline (the CleanRL or verl loop, torch's log_softmax + gather, verl's
eager loss) on the same input before it is timed.

Prints a table, and writes a CSV with a markdown table and a plot (PNG) next to it. ``--sizes`` sweeps a
few sizes per op and layout instead of the fixed shapes and plots GB/s against size, one line per
provider. Baselines from packages that are not installed (scipy, torchrl) are listed as skipped.
"""

from __future__ import annotations

import argparse
import csv
import functools
import sys
from pathlib import Path

import torch

from rlkernels.bench import baselines, common
from rlkernels.bench.common import Case, check, make_case

try:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress
    from rich.table import Table
except ImportError:  # pragma: no cover  (rich comes with the bench extra)
    Console = None

CSV_FIELDS = ["device", "commit", "date", "op", "shape", "series", "numel", "dtype", "provider", "median_s"]
CSV_FIELDS += ["q20_s", "q80_s", "runs", "gbps", "pct_copy_bw", "speedup_vs", "note"]
OPS = ["gae", "gae-masked", "discounted_returns", "gather_logprobs", "ppo_policy_loss"]
MAX_COMPILED_STEPS = 10_000  # torch.compile unrolls the Python loop over T: past this it cannot finish


def run_case(case: Case, device: str, args, status) -> tuple[list[dict], list[str]]:
    """Times every provider of one case; returns its rows and the failed checks."""
    rows, failures = [], []

    def add(provider, timing=None, note=""):
        rows.append(
            {"op": case.op, "shape": case.shape, "provider": provider, "timing": timing, "note": note}
        )

    def measure(fn):
        flush = common.flusher_for(args.cache, device, fn, case.reads)
        return common.measure(fn, device, flush=flush, **args.runs)

    reference, *others = case.baselines
    timing, out = measure(reference.call)
    ref = reference.to_torch(out)
    add(reference.name, timing, reference.note)

    if case.rlkernels is not None:
        for backend in args.backends:
            status(f"{case.op} {case.shape}: rlkernels[{backend}]")
            try:
                failure = check(case.rlkernels(backend), ref, f"rlkernels[{backend}] vs {reference.name}")
            except Exception as exc:  # noqa: BLE001  (an op not written yet is a row, not a crash)
                add(f"rlkernels[{backend}]", note=f"not run: {type(exc).__name__}: {exc}"[:160])
                continue
            if failure:
                failures.append(f"{case.op} {case.shape}: {failure}")
                add(f"rlkernels[{backend}]", note="WRONG OUTPUT, not timed")
                continue
            add(f"rlkernels[{backend}]", measure(functools.partial(case.rlkernels, backend))[0])

    for provider in others:
        if provider.call is None:  # a baseline whose package is missing
            add(provider.name, note=provider.note)
            continue
        status(f"{case.op} {case.shape}: {provider.name}")
        timing, out = measure(provider.call)
        if provider.comparable:
            failure = check(provider.to_torch(out), ref, f"baseline {provider.name} vs {reference.name}")
            if failure:  # a baseline that disagrees is a bug in baselines.py: say so loudly
                failures.append(f"{case.op} {case.shape}: {failure}")
        add(provider.name, timing, provider.note)
    if reference.name == "cleanrl loop" and not args.sizes:  # the time-major loop torch.compile may take
        status(f"{case.op} {case.shape}: torch.compile(cleanrl loop) (compile <= 120 s)")
        timing, out, note = time_compiled(case, device, args)
        failure = check(out, ref, "torch.compile(cleanrl loop)") if timing else ""
        if failure:
            failures.append(f"{case.op} {case.shape}: {failure}")
        add("torch.compile(cleanrl loop)", timing, note)
    return rows, failures


def time_compiled(case: Case, device: str, args):
    """(timing, output, note) of torch.compile of the CleanRL loop, or (None, None, why not)."""
    if not args.compile:
        return None, None, f"not run ({args.no_compile_why})"
    if case.steps > MAX_COMPILED_STEPS:
        return None, None, f"not run: the loop would unroll over T={case.steps:,}"
    return common.measure_compiled(case.kind, case.dims, device, timeout_s=120.0, cache=args.cache, **args.runs)


def finish_rows(
    rows: list[dict], nbytes: int, copy_gbps: float, meta: dict, dtype: str, series: str = "", numel=None
) -> list[dict]:
    """Adds GB/s, % of copy bandwidth and speedups (the fastest rlkernels backend over each provider)."""
    rlk = [r["timing"].median_s for r in rows if r["provider"].startswith("rlkernels") and r["timing"]]
    best = min(rlk) if rlk else None
    out = []
    for r in rows:
        t = r["timing"]
        gbps = nbytes / t.median_s / 1e9 if t else None
        out.append(
            {
                **meta,
                "op": r["op"],
                "shape": r["shape"],
                "series": series,
                "numel": numel,
                "dtype": dtype,
                "provider": r["provider"],
                "median_s": t and t.median_s,
                "q20_s": t and t.q20_s,
                "q80_s": t and t.q80_s,
                "runs": t and t.runs,
                "gbps": gbps,
                "pct_copy_bw": gbps and 100 * gbps / copy_gbps,
                "speedup_vs": t and best and t.median_s / best,
                "note": " ".join(filter(None, [r["note"], "(1 run)" if t and t.runs == 1 else ""])),
            }
        )
    return out


def fmt_time(s: float) -> str:
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def display_rows(results: list[dict]) -> list[list[str]]:
    dash = "—"
    return [
        [
            r["op"],
            r["shape"],
            r["provider"],
            fmt_time(r["median_s"]) if r["median_s"] else dash,
            f"{r['gbps']:.3g}" if r["gbps"] else dash,
            (f"{r['pct_copy_bw']:.1f}%" if r["pct_copy_bw"] >= 1 else f"{r['pct_copy_bw']:.2g}%")
            if r["pct_copy_bw"]
            else dash,
            f"{r['speedup_vs']:.2f}×" if r["speedup_vs"] else dash,
            r["note"],
        ]
        for r in results
    ]


HEADERS = ["op", "shape", "provider", "median", "GB/s", "% copy BW", "rlkernels speedup", "note"]


def write_markdown(path: Path, title: str, results: list[dict], conditions: str = "") -> None:
    lines = [f"# {title}", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in display_rows(results)]
    if conditions:
        lines += ["", conditions]
    path.write_text("\n".join(lines) + "\n")


def default_csv(device_name: str, date: str, sizes: bool, results_dir: Path | None) -> Path:
    directory = results_dir or Path.cwd() / "rlkernels-bench-results"
    return directory / f"{common.slug(device_name)}-{date}{'-sizes' if sizes else ''}.csv"


def main(argv=None, *, results_dir: Path | None = None, prog: str | None = None) -> int:
    """The command line; ``results_dir`` is where the CSV goes by default (./rlkernels-bench-results)."""
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
        help=f"CSV path (default {results_dir or './rlkernels-bench-results'}/<device>-<date>[-sizes].csv; "
        "--quick writes none unless given); the markdown table and the PNG plot go next to it",
    )
    parser.add_argument(
        "--ops",
        default="",
        metavar="OP,...",
        help=f"only these ops: {', '.join(OPS)} (gae-masked: token-level GAE on [B, T])",
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--no-compile", action="store_true", help="do not time torch.compile of the loops")
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
    args = parser.parse_args(argv)
    if args.warm_cache:
        args.cache = "warm"
    if Console is None:
        parser.error("the benchmark needs rich: pip install 'rlkernels[bench]' (or pip install rich matplotlib)")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    baselines.DISABLED.update(p.strip() for p in args.skip_baselines.split(",") if p.strip())
    args.runs = {"budget_s": 0.1, "min_runs": 3, "max_runs": 10} if args.quick else {"budget_s": 1.0}
    args.compile = not (args.quick or args.sizes or args.no_compile)
    args.no_compile_why = "--quick" if args.quick else "--sizes" if args.sizes else "--no-compile"
    table_of = common.SIZES if args.sizes else common.SHAPES
    full = "cuda" if device == "cuda" and not args.sizes else "full"
    shapes = table_of["quick" if args.quick else full]
    if args.ops:
        ops = {op.strip() for op in args.ops.split(",") if op.strip()}
        unknown = ops - {kind for kind, _ in shapes}
        if unknown:
            parser.error(f"--ops: unknown {sorted(unknown)}; choose from {', '.join(OPS)}")
        shapes = [(kind, shape) for kind, shape in shapes if kind in ops]
    console = Console()
    if not console.is_terminal:  # logs and CI: do not wrap the table at 80 columns
        console = Console(width=160)

    rlk, why = common.import_rlkernels()
    args.backends = common.rlkernels_backends(rlk, device) if rlk else []
    if rlk is None:
        console.print(f"[bold yellow]rlkernels does not import ({why}); timing the baselines alone.[/]")
    elif not args.backends:
        console.print(
            f"[bold yellow]rlkernels has no {device} backend built "
            f"(available: {rlk.available_backends()}); timing the baselines alone.[/]"
        )

    name = common.device_name(device)
    meta = {"device": name, "commit": common.git_commit(), "date": common.today()}
    copy_gbps, copy_timing = common.copy_bandwidth(device, runs=5 if args.quick else 20)
    copy_row = {"op": "copy", "shape": "[67108864]", "provider": "tensor.copy_", "timing": copy_timing}
    results = finish_rows(
        [{**copy_row, "note": "256 MiB, read + write"}], 2 * 2**28, copy_gbps, meta, "float32"
    )
    failures = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("", total=len(shapes))

        def status(description: str) -> None:
            progress.update(task, description=description)
            if not console.is_terminal:  # rich draws no progress bar into a log: say it in lines
                console.print(
                    f"{progress.tasks[0].completed}/{len(shapes)} {description}",
                    markup=False,
                    highlight=False,
                )

        for kind, shape in shapes:
            status(f"{kind} {shape}: inputs")
            case = make_case(kind, shape, device, rlk if args.backends else None, numpy=device == "cpu")
            rows, bad = run_case(case, device, args, status)
            failures += bad
            series = common.series_label(kind, shape, args.sizes)
            nbytes = common.bytes_moved(case.reads, case.writes)
            results += finish_rows(rows, nbytes, copy_gbps, meta, "float32", series, shape[0] * shape[1])
            progress.advance(task)

    what = "size sweep" if args.sizes else "benchmarks"
    title = f"rlkernels {what} on {name} ({device}), commit {meta['commit']}, {meta['date']}"
    table = Table(*HEADERS, title=title)
    for cells in display_rows(results):
        table.add_row(*map(escape, cells))  # "rlkernels[cpu]" is not rich markup
    console.print(table)
    conditions = (
        f"copy bandwidth {copy_gbps:.1f} GB/s; fp32; gamma={common.GAMMA}, lambda={common.LAM}; "
        "speedup = provider median / fastest rlkernels median, same run; "
        + common.CACHE_TEXT[args.cache]
        + "."
    )
    console.print(conditions, markup=False, highlight=False)

    csv_path = args.csv or (None if args.quick else default_csv(name, meta["date"], args.sizes, results_dir))
    if csv_path:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS)
            writer.writeheader()
            writer.writerows({k: ("" if r[k] is None else r[k]) for k in CSV_FIELDS} for r in results)
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
