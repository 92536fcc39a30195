"""Runs the cases: times every provider of a case in each of its cache states, checks outputs, makes the rows.

rlkernels' output is checked against the case's first baseline (the reference) before it is timed, comparable
baselines after; a wrong output is a failed check, not a timing. torch.compile baselines are compiled before
they are timed (the compile time goes into the row's note). Compiles run in this process with one compile
thread: inductor's pool of compile workers otherwise keeps working after a compile returns and competes for the
cores with the timed calls that follow. The one exception is a Python loop over T (the CleanRL loops), which
torch.compile unrolls: its compile can run for an hour, so it runs in a child process killed past a timeout.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass

import torch

from . import common
from .cases import Case, make_cases

MAX_COMPILED_STEPS = 10_000  # torch.compile unrolls a Python loop over T: past this it cannot finish
CHILD_COMPILE_TIMEOUT_S = 120.0


@dataclass
class Settings:
    """What a run times: the backends, the cache state (--cache), the timer's settings, whether to compile."""

    device: str
    backends: list[str]  # "cpu:avx2" and the like: the cpu backend capped to one instruction set (--isa)
    cache: str = "data"
    runs: dict | None = None
    quick: bool = False
    compile: bool = False
    no_compile_why: str = ""
    sizes: bool = False  # a size sweep: no torch.compile rows at all


def one_compile_thread() -> None:
    """Compile in this process, one thread (why: this module's docstring)."""
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1


def run_entry(kind, dims, caches, rlk, settings: Settings, status) -> tuple[list[tuple[Case, str, list]], list]:
    """Every case of one SHAPES entry: ([(case, cache state, rows)], failed checks)."""
    groups, failures = [], []
    for case in make_cases(kind, dims, settings.device, rlk, numpy=settings.device == "cpu", caches=caches):
        case_groups, bad = run_case(case, settings, status)
        groups += case_groups
        failures += bad
    return groups, failures


def cache_states(case: Case, run_cache: str) -> list[str]:
    return list(dict.fromkeys(run_cache if c == "run" else c for c in case.caches))


def run_case(case: Case, settings: Settings, status) -> tuple[list[tuple[Case, str, list]], list[str]]:
    """Times every provider of ``case`` in each of its cache states; returns [(case, state, rows)] and the
    failed checks."""
    device = settings.device
    failures = []
    label = f"{case.op} {case.shape}"
    runs = {**(settings.runs or {}), **({} if settings.quick else case.runs)}

    def measure(fn, cache):
        flush = common.flusher_for(cache, device, fn, case.reads)
        return common.measure(fn, device, flush=flush, **runs)

    def failed(failure):
        if failure:
            failures.append(f"{label}: {failure}")
        return bool(failure)

    states = cache_states(case, settings.cache)
    reference, *others = case.baselines
    compiled: dict[str, tuple] = {}  # provider name -> (compiled callable or None, note)
    checked: dict[str, str] = {}  # rlkernels backend -> note when it is not timed
    groups = []
    for cache in states:
        rows = []

        def add(provider, timing=None, note="", rows=rows, fn=None):
            # the peak memory of one more call, untimed, where the case asks for it
            peak = common.peak_bytes(fn, device) / 2**20 if (case.memory and timing and fn is not None) else None
            rows.append({"op": case.op, "shape": case.shape, "provider": provider, "timing": timing, "note": note,
                         "peak_mib": peak})

        status(f"{label} [{cache}]: {reference.name}")
        timing, out = measure(reference.call, cache)
        ref = reference.to_torch(out)
        note = reference.note
        if case.traffic is not None:
            case.nbytes, extra = case.traffic(out)
            note = " ".join(filter(None, [note, extra]))
        add(reference.name, timing, note, fn=reference.call)

        if case.rlkernels is not None:
            levels = []  # the --isa rows that pass their check: timed in turns below
            for backend in settings.backends:
                name = f"rlkernels[{backend}]"
                status(f"{label} [{cache}]: {name}")
                base, level = common.backend_and_isa(backend)  # "cpu:avx2": the CPU kernels at one level
                with common.cpu_isa(level):
                    if backend not in checked:
                        checked[backend] = _check_rlkernels(case, base, ref, reference.name, failed)
                    if checked[backend]:
                        add(name, note=checked[backend])
                        continue
                    call = functools.partial(case.rlkernels, base)
                    if level:
                        levels.append((len(rows), name, level, call))
                        rows.append(None)  # its place in the table
                        continue
                    add(name, measure(call, cache)[0], fn=call)
            if levels:
                # The levels are compared with each other: their calls alternate, so the machine's other load
                # reaches each alike (common.measure_in_turns).
                status(f"{label} [{cache}]: rlkernels[cpu:{'|'.join(lv for _, _, lv, _ in levels)}]")
                calls = [call for *_, call in levels]
                with common.cpu_isa(levels[0][2]):  # the cap each call sets is put back afterwards
                    timed = common.measure_in_turns(
                        calls, device, befores=[functools.partial(common.set_cpu_isa, lv) for _, _, lv, _ in levels],
                        flushes=[common.flusher_for(cache, device, call, case.reads) for call in calls], **runs)
                for (at, name, level, call), (timing, _) in zip(levels, timed):
                    with common.cpu_isa(level):
                        add(name, timing, fn=call)
                    rows[at] = rows.pop()

        for provider in [reference, *others]:
            if provider is not reference:
                if provider.call is None:  # a baseline whose package is missing
                    add(provider.name, note=provider.note)
                    continue
                if provider.compile == "self":
                    _compiled_row(provider, provider.name, case, cache, settings, compiled, measure, ref, failed,
                                  add, status)
                    continue
                status(f"{label} [{cache}]: {provider.name}")
                timing, out = measure(provider.call, cache)
                if provider.comparable:  # a baseline that disagrees is a bug in baselines.py: say so loudly
                    failed(common.check(provider.to_torch(out), ref, f"baseline {provider.name} vs {reference.name}",
                                        tol=case.tol))
                add(provider.name, timing, provider.note, fn=provider.call)
            if provider.compile in ("inline", "child") and provider.call is not None:
                _compiled_row(provider, f"torch.compile({provider.name})", case, cache, settings, compiled, measure,
                              ref, failed, add, status)
        groups.append((case, cache, rows))
    return groups, failures


def _check_rlkernels(case, backend, ref, reference_name, failed) -> str:
    """'' when rlkernels[backend] matches the reference, else the note of its row (not timed)."""
    try:
        out = case.rlkernels(backend)
    except Exception as exc:  # noqa: BLE001  (an op a backend lacks is a row, not a crash)
        return f"not run: {type(exc).__name__}: {exc}"[:160]
    if failed(common.check(out, ref, f"rlkernels[{backend}] vs {reference_name}", tol=case.tol)):
        return "WRONG OUTPUT, not timed"
    return ""


def _compiled_row(provider, name, case, cache, settings, compiled, measure, ref, failed, add, status) -> None:
    """Compiles ``provider`` once per case (see the module's docstring) and times it in ``cache``."""
    if settings.sizes:
        return
    if not settings.compile:
        add(name, note=f"not run ({settings.no_compile_why})")
        return
    status(f"{case.op} {case.shape} [{cache}]: {name}")
    if provider.compile == "child":
        if name not in compiled:
            compiled[name] = (None, "")
            if case.steps > MAX_COMPILED_STEPS:
                add(name, note=f"not run: the loop would unroll over T={case.steps:,}")
                return
            timing, out, note = measure_in_child(case, provider.name, settings.device, cache, settings.runs or {})
            if timing is not None and failed(common.check(out, ref, name)):
                timing, note = None, "WRONG OUTPUT"
            add(name, timing, note)
        return  # timed in the first cache state only: the child holds its own inputs
    if name not in compiled:
        fn = provider.call if provider.compile == "self" else torch.compile(provider.call)
        start = time.perf_counter()
        try:
            out = fn()
            common.synchronize(settings.device)
        except Exception as exc:  # noqa: BLE001  (a baseline that cannot compile is a row's note, not a crash)
            compiled[name] = (None, f"not run: compile failed: {type(exc).__name__}: {str(exc)[:80]}")
        else:
            note = f"compiled in {time.perf_counter() - start:.1f} s"
            if provider.comparable and failed(common.check(provider.to_torch(out), ref, name, tol=case.tol)):
                note = "WRONG OUTPUT"
            compiled[name] = (fn, note)
    fn, note = compiled[name]
    if fn is None or note == "WRONG OUTPUT":
        add(name, note=note)
        return
    add(name, measure(fn, cache)[0], note, fn=fn)


# --------------------------------------------------------------------------------------------------------
# torch.compile of a loop over T, in a child process
# --------------------------------------------------------------------------------------------------------


def _child(conn, kind, dims, op, provider_name, device, cache, runs):
    os.setpgrp()  # its own process group, so an overrunning compile can be killed with its compiler jobs
    try:
        one_compile_thread()
        case = next(c for c in make_cases(kind, dims, device, None, numpy=False) if c.op == op)
        provider = next(p for p in case.baselines if p.name == provider_name)
        fn = torch.compile(provider.call)
        conn.send(("ready",))
        start = time.perf_counter()
        fn()
        conn.send(("compiled", time.perf_counter() - start))
        timing, out = common.measure(fn, device, flush=common.flusher_for(cache, device, provider.call, case.reads),
                                     **runs)
        out = provider.to_torch(out)
        # NumPy arrays travel by value; tensors would travel as shared-memory handles that the parent fetches
        # from this process, which may have exited by then.
        arrays = [t.cpu().numpy() for t in out] if isinstance(out, tuple) else out.cpu().numpy()
        conn.send(("timed", timing, arrays))
    except Exception as exc:  # noqa: BLE001  (a compiler failure is a result to report)
        conn.send(("failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"))


def measure_in_child(case: Case, provider_name: str, device: str, cache: str, runs: dict,
                     timeout_s: float = CHILD_COMPILE_TIMEOUT_S):
    """(timing, output, note) of torch.compile of a baseline of ``case``, compiled and timed in a child process
    killed when the compile takes longer than ``timeout_s``; or (None, None, why it was not run)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    args = (sender, case.kind, case.dims, case.op, provider_name, device, cache, runs)
    worker = context.Process(target=_child, args=args)
    worker.start()
    sender.close()

    def receive(timeout):
        try:
            return receiver.recv() if receiver.poll(timeout) else ("timeout",)
        except EOFError:
            return ("failed", f"worker exited with code {worker.exitcode}")

    try:
        message = receive(600)  # imports and inputs
        if message[0] == "ready":
            message = receive(timeout_s)
        if message[0] == "timeout":
            return None, None, f"not run: compile took > {timeout_s:.0f} s"
        if message[0] == "failed":
            return None, None, f"not run: compile failed: {message[1]}"
        note = f"compiled in {message[1]:.0f} s"
        message = receive(None)
        if message[0] == "failed":
            return None, None, f"not run: {message[1]}"
        out = message[2]
        out = tuple(torch.from_numpy(a) for a in out) if isinstance(out, list) else torch.from_numpy(out)
        return message[1], out, note
    finally:
        if worker.is_alive():
            try:
                os.killpg(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                worker.kill()
        worker.join()


# --------------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------------


def finish_rows(rows: list[dict], nbytes: int, copy_gbps: float, meta: dict, *, cache: str, series: str = "",
                numel=None, dtype: str = "float32", read_gbps: float | None = None) -> list[dict]:
    """Adds GB/s, % of copy and of read bandwidth and speedups (the fastest rlkernels backend over each
    provider)."""
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
                "cache": cache,
                "provider": r["provider"],
                "median_s": t and t.median_s,
                "q20_s": t and t.q20_s,
                "q80_s": t and t.q80_s,
                "runs": t and t.runs,
                "gbps": gbps,
                "pct_copy_bw": gbps and 100 * gbps / copy_gbps,
                "pct_read_bw": gbps and read_gbps and 100 * gbps / read_gbps,
                "speedup_vs": t and best and t.median_s / best,
                "peak_mib": r.get("peak_mib"),
                "note": " ".join(filter(None, [r["note"], "(1 run)" if t and t.runs == 1 else ""])),
            }
        )
    return out


def case_bytes(case: Case) -> int:
    """The bytes ``case`` must move: set from the reference's output where it depends on it, else each read
    and write counted once."""
    return case.nbytes or common.bytes_moved(case.reads, case.writes)
