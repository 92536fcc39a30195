"""Prints the returns/GAE comparison table for this machine and writes it to CSV and markdown.

    python -m benchmarks.run [--device cpu|cuda] [--quick] [--csv PATH]

For each op and shape: every rlkernels backend built for the device and the baselines users run
today (benchmarks/baselines.py), each timed cold-cache in this one run; GB/s from the bytes the op
must move (the same for every provider of a row), its percent of the measured copy bandwidth,
and the speedup of the fastest rlkernels backend over each provider (ratio of medians). rlkernels'
output is checked against the CleanRL (or verl) loop on the same input before it is timed.
"""

from __future__ import annotations

import argparse
import csv
import functools
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from benchmarks import common
from benchmarks.common import Case, check, make_case
from benchmarks.plot import plot

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CSV_FIELDS = ["device", "commit", "date", "op", "shape", "dtype", "provider", "median_s", "q20_s", "q80_s"]
CSV_FIELDS += ["runs", "gbps", "pct_copy_bw", "speedup_vs", "note"]
MAX_COMPILED_STEPS = 10_000  # torch.compile unrolls the Python loop over T: past this it cannot finish


def run_case(case: Case, device: str, args, flush, status) -> tuple[list[dict], list[str]]:
    """Times every provider of one case; returns its rows and the failed checks."""
    rows, failures = [], []

    def add(provider, timing=None, note=""):
        rows.append(
            {"op": case.op, "shape": case.shape, "provider": provider, "timing": timing, "note": note}
        )

    measure = lambda fn: common.measure(fn, device, flush=flush, **args.runs)
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
        status(f"{case.op} {case.shape}: {provider.name}")
        timing, out = measure(provider.call)
        if provider.comparable:
            failure = check(provider.to_torch(out), ref, f"baseline {provider.name} vs {reference.name}")
            if failure:  # a baseline that disagrees is a bug in baselines.py: say so loudly
                failures.append(f"{case.op} {case.shape}: {failure}")
        add(provider.name, timing, provider.note)
    if reference.name == "cleanrl loop":  # the time-major loop, which torch.compile may take
        status(f"{case.op} {case.shape}: torch.compile(cleanrl loop) (compile <= 120 s)")
        timing, out, note = time_compiled(case, device, args, flush is not None)
        failure = check(out, ref, "torch.compile(cleanrl loop)") if timing else ""
        if failure:
            failures.append(f"{case.op} {case.shape}: {failure}")
        add("torch.compile(cleanrl loop)", timing, note)
    return rows, failures


def time_compiled(case: Case, device: str, args, flush: bool):
    """(timing, output, note) of torch.compile of the CleanRL loop, or (None, None, why not)."""
    if not args.compile:
        return None, None, "not run (--quick)"
    if case.steps > MAX_COMPILED_STEPS:
        return None, None, f"not run: the loop would unroll over T={case.steps:,}"
    return common.measure_compiled(case.kind, case.dims, device, timeout_s=120.0, flush=flush, **args.runs)


def finish_rows(rows: list[dict], nbytes: int, copy_gbps: float, meta: dict, dtype: str) -> list[dict]:
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


def write_markdown(path: Path, title: str, results: list[dict]) -> None:
    lines = [f"# {title}", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in display_rows(results)]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small shapes, few runs, no torch.compile (CI smoke test)"
    )
    parser.add_argument(
        "--csv",
        type=Path,
        help="CSV path (default benchmarks/results/<device>-<date>.csv; "
        "--quick writes none unless given); the markdown table goes next to it",
    )
    parser.add_argument(
        "--warm-cache", action="store_true", help="do not flush the caches between timed calls"
    )
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    args.runs = {"budget_s": 0.1, "min_runs": 3, "max_runs": 10} if args.quick else {"budget_s": 1.0}
    args.compile = not args.quick
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
    flush = None if args.warm_cache else common.CacheFlusher(device)
    copy_gbps, copy_timing = common.copy_bandwidth(device)
    copy_row = {"op": "copy", "shape": "[67108864]", "provider": "tensor.copy_", "timing": copy_timing}
    results = finish_rows(
        [{**copy_row, "note": "256 MiB, read + write"}], 2 * 2**28, copy_gbps, meta, "float32"
    )
    failures = []
    shapes = common.SHAPES["quick" if args.quick else "full"]
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
            rows, bad = run_case(case, device, args, flush, status)
            failures += bad
            results += finish_rows(
                rows, common.bytes_moved(case.reads, case.writes), copy_gbps, meta, "float32"
            )
            progress.advance(task)

    title = f"rlkernels returns/GAE on {name} ({device}), commit {meta['commit']}, {meta['date']}"
    table = Table(*HEADERS, title=title)
    for cells in display_rows(results):
        table.add_row(*map(escape, cells))  # "rlkernels[cpu]" is not rich markup
    console.print(table)
    console.print(
        f"copy bandwidth {copy_gbps:.1f} GB/s; fp32; gamma={common.GAMMA}, lambda={common.LAM}; "
        "speedup = provider median / fastest rlkernels median, same run; "
        + ("warm cache." if args.warm_cache else "cold cache (256 MiB rewritten before each call).")
    )

    csv_path = args.csv or (None if args.quick else RESULTS_DIR / f"{common.slug(name)}-{meta['date']}.csv")
    if csv_path:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS)
            writer.writeheader()
            writer.writerows({k: ("" if r[k] is None else r[k]) for k in CSV_FIELDS} for r in results)
        write_markdown(csv_path.with_suffix(".md"), title, results)
        console.print(f"wrote {csv_path}, {csv_path.with_suffix('.md')} and {plot(csv_path)}")
    for failure in failures:
        console.print(f"[bold red]check failed: {failure}[/]")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
