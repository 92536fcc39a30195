"""The timer, the cold-data method, the byte model and what machine this is: shared by every benchmark case.

Timing is cold-data by default: before every timed call the provider's inputs are evicted from the
caches (CPU: clflush of their storage; GPU: a buffer larger than L2 rewritten, as triton.testing.do_bench
does), so a small input cannot be served from cache and GB/s stays comparable with the measured copy
bandwidth, the speed of light for these ops. See CACHE_MODES for the others.
"""

from __future__ import annotations

import datetime
import functools
import platform
import re
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PACKAGE_PARENT = Path(__file__).resolve().parent.parent.parent  # the checkout, when run from one


def import_rlkernels():
    """(module, None) or (None, why): the package is built concurrently and may not import yet."""
    try:
        import rlkernels

        rlkernels.available_backends()
    except Exception as exc:  # noqa: BLE001  (ImportError, or a half-built package)
        return None, f"{type(exc).__name__}: {exc}"
    return rlkernels, None


def rlkernels_backends(rlkernels, device: str) -> list[str]:
    """The built backends that run natively on ``device`` (triton on CPU only runs interpreted)."""
    native = {"cpu": ["cpu"], "cuda": ["cuda", "triton"]}[device]
    available = rlkernels.available_backends()
    return [b for b in native if b in available]


CPU_ISA_LEVELS = ("default", "avx2", "avx512")


def cpu_isa_levels() -> list[str]:
    """The instruction-set levels of rlkernels' CPU kernels this CPU runs (csrc/cpu/isa.h), narrowest first."""
    widest = torch.ops.rlkernels._cpu_isa("").split("|")[1]
    return list(CPU_ISA_LEVELS[: CPU_ISA_LEVELS.index(widest) + 1])


def backend_and_isa(backend: str) -> tuple[str, str]:
    """("cpu", "avx2") for the benchmark's pseudo-backend "cpu:avx2" (--isa); (backend, "") otherwise."""
    base, _, level = backend.partition(":")
    return base, level


def set_cpu_isa(level: str) -> None:
    """Caps rlkernels' CPU kernels to one instruction-set level (csrc/cpu/isa.h)."""
    torch.ops.rlkernels._cpu_isa(level)


class cpu_isa:
    """Caps rlkernels' CPU kernels to one instruction-set level inside the block (nothing for level "")."""

    def __init__(self, level: str):
        self.level, self.before = level, None

    def __enter__(self):
        if self.level:
            self.before = torch.ops.rlkernels._cpu_isa("").split("|")[0]
            torch.ops.rlkernels._cpu_isa(self.level)
        return self

    def __exit__(self, *exc):
        if self.before:
            torch.ops.rlkernels._cpu_isa(self.before)


def check(out, ref, what: str, tol: tuple[float, float] = (1e-4, 1e-4)) -> str:
    """'' when ``out`` matches ``ref`` (rtol, atol = ``tol``), else the mismatch."""
    out = out if isinstance(out, (tuple, list)) else (out,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    try:
        for o, r in zip(out, ref, strict=True):
            torch.testing.assert_close(o.float().cpu(), r.float().cpu(), rtol=tol[0], atol=tol[1])
    except (AssertionError, ValueError) as exc:
        return f"{what}: {str(exc).splitlines()[0] if str(exc) else 'mismatch'}"
    return ""


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_s: float
    q20_s: float
    q80_s: float
    runs: int


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """The most memory ``fn()`` holds at once beyond what was allocated before it (its outputs included).

    CUDA: the caching allocator's peak. CPU: the allocations and frees torch's profiler records (memory profiling
    on), replayed in time order; frees of blocks allocated before the call are left out."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            events.append((node.start_time_ns, node.typed[1].ptr, node.typed[1].alloc_size))
    live, current, peak = {}, 0, 0
    for _, ptr, size in sorted(events):
        if size > 0:
            live[ptr] = size
            current += size
            peak = max(peak, current)
        elif ptr in live:
            current -= live.pop(ptr)
    return peak


class CacheFlusher:
    """Rewrites a buffer bigger than the last-level cache (CPU L3 or GPU L2) before each timed call."""

    def __init__(self, device: str, mib: int = 256):
        self.buffer = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


# Cache modes of the benchmark. "data": before each timed call the provider's inputs are evicted from
# every CPU cache level (clflush), so they come from DRAM as the byte model assumes, while code and
# interpreter state stay cached as in a training loop; on a GPU this is the L2 flush. "llc": a buffer
# larger than the last-level cache is rewritten, which also evicts the Python interpreter, the
# dispatcher and the code of every provider (each torch call then pays its fixed costs from DRAM, which
# are not memory traffic of the op). "warm": nothing is flushed.
CACHE_MODES = ("data", "llc", "warm")
CACHE_TEXT = {
    "data": "cold data (each provider's inputs evicted from the CPU caches before each call; on a GPU, "
    "256 MiB rewritten)",
    "llc": "cold cache (256 MiB rewritten before each call: data, code and interpreter evicted)",
    "warm": "warm cache",
}


def _evict_op():
    try:
        import rlkernels  # noqa: F401  (registers the op)

        evict = torch.ops.rlkernels._evict_from_cache
    except (ImportError, AttributeError, RuntimeError):
        return None
    return evict if evict([]) else None  # False where the CPU has no clflush: rewrite a buffer instead


def data_of(fn, depth: int = 4) -> list:
    """The tensors and NumPy arrays a provider's call reads: what its closure (and those of the functions
    and partials it holds) refers to."""
    found, seen = [], set()

    def visit(x, d):
        if id(x) in seen or d < 0:
            return
        seen.add(id(x))
        if isinstance(x, torch.Tensor) or isinstance(x, np.ndarray) and x.dtype != object:
            found.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y, d - 1)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y, d - 1)
        elif hasattr(x, "func") and hasattr(x, "args"):  # functools.partial
            visit(x.func, d - 1)
            for y in (*x.args, *x.keywords.values()):
                visit(y, d - 1)
        elif callable(x) and getattr(x, "__closure__", None):
            for cell in x.__closure__:
                try:
                    visit(cell.cell_contents, d - 1)
                except ValueError:  # an empty cell
                    pass

    visit(fn, depth)
    return found


class DataEvictor:
    """Evicts the given CPU tensors and arrays (their whole storage) from every cache level."""

    def __init__(self, arrays, evict):
        tensors = []
        for a in arrays:
            if isinstance(a, np.ndarray):
                try:
                    with warnings.catch_warnings():  # a read-only array: eviction reads nothing and writes nothing
                        warnings.simplefilter("ignore", UserWarning)
                        a = torch.from_numpy(a)
                except TypeError:  # a dtype torch has no counterpart for: not ours to evict
                    continue
            if a.device.type == "cpu":
                tensors.append(a)
        self.tensors = tensors
        self.evict = evict

    def __call__(self) -> None:
        self.evict(self.tensors)


def flusher_for(mode: str, device: str, fn=None, reads=()):
    """The callable run before each timed call of ``fn`` in cache ``mode`` (None: nothing)."""
    if mode == "warm":
        return None
    evict = _evict_op() if mode == "data" and device == "cpu" else None
    if evict is None:
        return _shared_flusher(device)
    return DataEvictor([*reads, *data_of(fn)], evict)


_FLUSHERS: dict[str, CacheFlusher] = {}


def _shared_flusher(device: str) -> CacheFlusher:
    if device not in _FLUSHERS:
        _FLUSHERS[device] = CacheFlusher(device)
    return _FLUSHERS[device]


def measure(
    fn: Callable[[], object],
    device: str,
    *,
    flush: CacheFlusher | None = None,
    budget_s: float = 1.0,
    min_runs: int = 5,
    max_runs: int = 50,
    single_run_over_s: float = 2.0,
) -> tuple[Timing, object]:
    """Median and 20/80% quantiles of ``fn()``; returns (timing, output of the first call).

    The first call is a warmup (it also pays one-time costs) and sizes the number of runs to
    ``budget_s``. A first call slower than ``single_run_over_s`` is the only sample (runs=1).
    """
    return measure_in_turns([fn], device, flushes=[flush], budget_s=budget_s, min_runs=min_runs,
                            max_runs=max_runs, single_run_over_s=single_run_over_s)[0]


def _timed_call(fn: Callable[[], object], device: str) -> float:
    """Seconds of one call of ``fn``: CUDA events on a GPU, the wall clock on the CPU."""
    if device == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_in_turns(
    fns: list[Callable[[], object]],
    device: str,
    *,
    befores: list[Callable[[], object] | None] | None = None,
    flushes: list[CacheFlusher | None] | None = None,
    budget_s: float = 1.0,
    min_runs: int = 5,
    max_runs: int = 50,
    single_run_over_s: float = 2.0,
) -> list[tuple[Timing, object]]:
    """measure() for callables to be compared with each other: their timed calls alternate (round k starts
    at callable k mod n), so a change of the machine's other load during the run reaches each of them alike,
    where back-to-back blocks of calls would give it to one. ``befores[i]``, untimed, runs before every call
    of ``fns[i]`` (the --isa rows set their instruction-set cap there). Each gets the runs measure() would give
    the slowest of them; one whose first call is over ``single_run_over_s`` makes each a measure() of its own."""
    n = len(fns)
    befores = befores or [None] * n
    flushes = flushes or [None] * n

    def call(i):
        if befores[i] is not None:
            befores[i]()
        return fns[i]()

    firsts, outs = [], []
    for i in range(n):
        synchronize(device)
        start = time.perf_counter()
        outs.append(call(i))
        synchronize(device)
        firsts.append(time.perf_counter() - start)
    if max(firsts) > single_run_over_s:
        if n == 1:
            return [(Timing(firsts[0], firsts[0], firsts[0], 1), outs[0])]
        return [measure(functools.partial(call, i), device, flush=flushes[i], budget_s=budget_s, min_runs=min_runs,
                        max_runs=max_runs, single_run_over_s=single_run_over_s) for i in range(n)]
    for i in range(n):
        call(i)  # a second warmup: allocator and caches of the steady state
    runs = int(min(max_runs, max(min_runs, budget_s / max(max(firsts), 1e-6))))
    times: list[list[float]] = [[] for _ in range(n)]
    for k in range(runs):
        for j in range(n):
            i = (k + j) % n
            if befores[i] is not None:
                befores[i]()
            if flushes[i] is not None:
                flushes[i]()
            times[i].append(_timed_call(fns[i], device))
    results = []
    for i in range(n):
        median, q20, q80 = np.quantile(times[i], [0.5, 0.2, 0.8])
        results.append((Timing(float(median), float(q20), float(q80), runs), outs[i]))
    return results


def copy_bandwidth(device: str, mib: int = 256, runs: int = 20) -> tuple[float, Timing]:
    """Measured ``dst.copy_(src)`` bandwidth in GB/s (1e9 B/s) on a ``mib`` MiB fp32 buffer, with
    its timing; bytes counted = read + write."""
    src = torch.rand(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    timing, _ = measure(lambda: dst.copy_(src), device, flush=_yardstick_flush(device, src, dst), min_runs=runs,
                        max_runs=runs)
    return 2 * src.nbytes / timing.median_s / 1e9, timing


def read_bandwidth(device: str, mib: int = 256, runs: int = 20) -> tuple[float, Timing]:
    """Measured ``src.sum()`` bandwidth in GB/s on a ``mib`` MiB fp32 buffer (reads only), with its timing:
    the denominator of ops that read far more than they write, such as gather_logprobs."""
    src = torch.rand(mib * 2**20 // 4, device=device)
    timing, _ = measure(lambda: src.sum(), device, flush=_yardstick_flush(device, src), min_runs=runs,
                        max_runs=runs)
    return src.nbytes / timing.median_s / 1e9, timing


def _yardstick_flush(device: str, *buffers: torch.Tensor):
    """On the CPU the yardsticks' buffers are evicted before each call, as the ops' inputs are in the default
    cache mode: a last-level cache as large as the buffer (260 MB L3 on some Xeons) would otherwise serve a
    repeated 256 MiB sum from cache rather than DRAM. On a GPU 256 MiB is several times L2: nothing to do."""
    return flusher_for("data", device, reads=buffers) if device == "cpu" else None


def bytes_moved(reads: list[torch.Tensor], writes: list[torch.Tensor]) -> int:
    """The bytes an op must move: each input read once and each output written once."""
    return sum(t.numel() * t.element_size() for t in [*reads, *writes])


# ----------------------------------------------------------------------------------------------
# Where and when
# ----------------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    """The GPU's name; for the CPU its model and the widest instruction set of rlkernels' CPU kernels it runs
    ("AMD EPYC avx512"), which names the result files."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags:
        return f"{model} avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return f"{model} avx2"
    return f"{model} default" if flags else model


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_commit() -> str:
    """Short hash of HEAD, with "-dirty" when tracked files differ from it, when rlkernels runs from a git
    checkout; else the installed version ("v0.1.0"), or "unknown"."""
    if not (PACKAGE_PARENT / ".git").exists():
        return _installed_version()
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7", "--exclude=*"],
            cwd=PACKAGE_PARENT,
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else _installed_version()


def _installed_version() -> str:
    try:
        from importlib.metadata import version

        return "v" + version("rlkernels")
    except Exception:  # noqa: BLE001  (not installed: run from a source tree without git)
        return "unknown"


def today() -> str:
    return datetime.date.today().isoformat()
