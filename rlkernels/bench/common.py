"""Shared pieces of the benchmarks: inputs, timing, the byte model, and what machine this is.

Timing is cold-data by default: before every timed call the provider's inputs are evicted from the
caches (CPU: clflush of their storage; GPU: a buffer larger than L2 rewritten, as triton.testing.do_bench
does), so a small input cannot be served from cache and GB/s stays comparable with the measured copy
bandwidth, the speed of light for these ops. See CACHE_MODES for the others.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import platform
import re
import signal
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import baselines

PACKAGE_PARENT = Path(__file__).resolve().parent.parent.parent  # the checkout, when run from one
GAMMA, LAM = 0.99, 0.95
LONG_T = 4_000_000  # the one-long-sequence shape


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


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

# (kind, shape) per benchmark size; kind is one of: time-major GAE with 1% terminated flags,
# token-level GAE on [B, T] with a mask, discounted returns (time-major).
SHAPES = {
    "full": [
        ("gae", (2048, 64)),
        ("gae", (128, 4096)),
        ("gae-masked", (64, 4096)),
        ("gae", (LONG_T, 1)),
        ("discounted_returns", (2048, 64)),
        ("gather_logprobs", (1024, 32000)),
        ("ppo_policy_loss", (256, 4096)),
    ],
    # GPU shapes of issues 3-5. The one long sequence is 1M steps, not 16M: the CleanRL loop, the reference
    # every output is checked against, makes ~3 launches per step and would need minutes per call at 16M.
    "cuda": [
        ("gae", (128, 4096)),
        ("gae", (2048, 64)),
        ("gae-masked", (256, 8192)),
        ("gae", (1_000_000, 1)),
        ("discounted_returns", (2048, 64)),
        ("gather_logprobs", (16384, 32000)),
        ("ppo_policy_loss", (512, 8192)),
    ],
    "small": [
        ("gae", (2048, 64)),
        ("gae", (128, 4096)),
        ("gae-masked", (64, 4096)),
        ("gae", (100_000, 1)),
        ("discounted_returns", (2048, 64)),
    ],
    "quick": [
        ("gae", (256, 16)),
        ("gae", (32, 512)),
        ("gae-masked", (8, 512)),
        ("gae", (10_000, 1)),
        ("discounted_returns", (256, 16)),
        ("gather_logprobs", (64, 1000)),
        ("ppo_policy_loss", (16, 256)),
    ],
}

# --sizes: a few sizes per series (one op and layout with one dimension swept) for the GB/s-vs-size plot.
# The loop baselines cost about T Python steps per call, so T stays modest where B is swept.
SIZES = {
    "full": [
        *[("gae", (512, b)) for b in (4, 32, 256, 2048)],
        *[("gae-masked", (b, 1024)) for b in (2, 16, 128)],
        *[("gae", (t, 1)) for t in (4096, 32768, 262144)],
        *[("discounted_returns", (512, b)) for b in (4, 32, 256, 2048)],
        *[("gather_logprobs", (n, 32000)) for n in (16, 128, 1024)],
        *[("ppo_policy_loss", (b, 1024)) for b in (4, 32, 256)],
    ],
    "quick": [
        *[("gae", (64, b)) for b in (4, 64, 1024)],
        *[("gae-masked", (b, 256)) for b in (2, 16)],
        *[("discounted_returns", (64, b)) for b in (4, 64, 1024)],
        *[("gather_logprobs", (n, 1000)) for n in (8, 64)],
        *[("ppo_policy_loss", (b, 256)) for b in (2, 16)],
    ],
}


def series_label(kind: str, shape: tuple[int, ...], swept: bool) -> str:
    """The curve a (kind, shape) belongs to in a --sizes sweep: the op and layout, the swept dimension as *."""
    if not swept:
        return ""
    a, b = shape
    if kind == "gather_logprobs":
        return f"gather_logprobs [N=*, V={b}]"
    if kind == "ppo_policy_loss":
        return f"ppo_policy_loss [B=*, T={b}] masked"
    if kind == "gae-masked":
        return f"gae masked [B=*, T={b}]"
    if b == 1:
        return f"{kind} [T=*, B=1]"
    return f"{kind} [T={a}, B=*]"


def time_major_inputs(T: int, B: int, device: str, seed: int = 0, p_terminated: float = 0.01):
    """CleanRL/SB3 rollout layout [T, B]: rewards, values, terminated (bool), bootstrap_value [B]."""
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(T, B, generator=g), torch.randn(T, B, generator=g)
    terminated = torch.rand(T, B, generator=g) < p_terminated
    bootstrap_value = torch.randn(B, generator=g)
    return [x.to(device) for x in (rewards, values, terminated, bootstrap_value)]


def masked_inputs(B: int, T: int, device: str, seed: int = 0):
    """LLM layout [B, T]: each row is a prompt of random length (masked out), a response, then
    padding (masked out). Returns rewards, values, mask (bool)."""
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    prompt = torch.randint(T // 8, T // 2, (B, 1), generator=g)
    response = (torch.rand(B, 1, generator=g) * 0.75 + 0.25) * (T - prompt)  # 25% to 100% of what is left
    t = torch.arange(T)
    mask = (t >= prompt) & (t < prompt + response.long())
    return [x.to(device) for x in (rewards, values, mask)]


def shape_label(kind: str, shape: tuple[int, ...]) -> str:
    if kind == "gae-masked":
        return f"[B={shape[0]}, T={shape[1]}] masked"
    return f"[T={shape[0]}, B={shape[1]}]"


# ----------------------------------------------------------------------------------------------
# Cases: one op on one input, with its providers
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One op on one input: the rlkernels call per backend, the baselines (the first is the
    reference the others are checked against), and the byte model: ``reads`` are the inputs,
    ``writes`` tensors shaped like the outputs (fp32, the rewards' shape)."""

    kind: str  # the kind of a SHAPES entry: "gae", "gae-masked" or "discounted_returns"
    dims: tuple[int, int]
    op: str
    shape: str
    rlkernels: Callable[[str], object] | None
    baselines: list[baselines.Provider]
    reads: list[torch.Tensor]
    writes: list[torch.Tensor]
    steps: int  # length of the time axis


def make_case(kind: str, shape: tuple[int, int], device: str, rlk, *, numpy: bool) -> Case:
    """The inputs of one (kind, shape) of SHAPES with their providers; ``rlk`` is the rlkernels
    module, or None to time the baselines alone; ``numpy`` adds the NumPy/SciPy baselines."""
    if kind in ("gather_logprobs", "ppo_policy_loss"):
        return _llm_case(kind, shape, device, rlk)
    if kind == "gae-masked":
        rewards, values, mask = masked_inputs(*shape, device)
        op, args, steps = "gae", (rewards, values), shape[1]
        kwargs = {"lam": LAM, "mask": mask, "time_dim": -1}
        providers = baselines.masked_gae_providers(rewards, values, mask, GAMMA, LAM)
        reads, writes = [rewards, values, mask], [rewards, rewards]
    else:
        rewards, values, terminated, bootstrap = time_major_inputs(*shape, device)
        kwargs, steps = {"terminated": terminated, "bootstrap_value": bootstrap}, shape[0]
        if kind == "discounted_returns":
            op, args = kind, (rewards,)
            providers = baselines.returns_providers(rewards, terminated, bootstrap, GAMMA, numpy=numpy)
            reads, writes = [rewards, terminated, bootstrap], [rewards]
        else:
            op, args, kwargs["lam"] = "gae", (rewards, values), LAM
            providers = baselines.gae_providers(
                rewards, values, terminated, bootstrap, GAMMA, LAM, numpy=numpy
            )
            reads, writes = [rewards, values, terminated, bootstrap], [rewards, rewards]
    run = None
    if rlk is not None:  # looked up at call time: an op not written yet fails as one row
        run = lambda backend: getattr(rlk, op)(*args, gamma=GAMMA, **kwargs, backend=backend)
    return Case(kind, shape, op, shape_label(kind, shape), run, providers, reads, writes, steps)


def _llm_case(kind: str, shape: tuple[int, int], device: str, rlk) -> Case:
    """gather_logprobs on logits [N, V] and the PPO policy loss (forward) on [B, T]."""
    g = torch.Generator().manual_seed(0)
    if kind == "gather_logprobs":
        n, vocab = shape
        logits = (torch.randn(n, vocab, generator=g) * 3).to(device)
        tokens = torch.randint(0, vocab, (n,), generator=g).to(device)
        providers = baselines.logprobs_providers(logits, tokens)
        run = None if rlk is None else lambda backend: rlk.gather_logprobs(logits, tokens, backend=backend)
        label, reads, writes = f"[N={n}, V={vocab}]", [logits, tokens], [tokens.float()]
    else:
        b, t = shape
        logp = -torch.rand(b, t, generator=g) * 3
        old = logp + 0.2 * torch.randn(b, t, generator=g)
        advantages = torch.randn(b, t, generator=g)
        lengths = torch.randint(t // 4, t + 1, (b,), generator=g)
        mask = torch.arange(t)[None, :] < lengths[:, None]  # right-padded responses
        logp, old, advantages, mask = (x.to(device) for x in (logp, old, advantages, mask))
        providers = baselines.ppo_providers(logp, old, advantages, mask, **PPO_CLIP)
        run = None
        if rlk is not None:
            run = lambda backend: rlk.ppo_policy_loss(logp, old, advantages, mask, **PPO_CLIP, backend=backend)[0]
        label, reads, writes = f"[B={b}, T={t}] masked", [logp, old, advantages, mask], []
    return Case(kind, shape, kind, label, run, providers, reads, writes, shape[-1])


PPO_CLIP = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0}


def check(out, ref, what: str) -> str:
    """'' when ``out`` matches ``ref`` (rtol 1e-4), else the mismatch."""
    out = out if isinstance(out, (tuple, list)) else (out,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    try:
        for o, r in zip(out, ref, strict=True):
            torch.testing.assert_close(o.float().cpu(), r.float().cpu(), rtol=1e-4, atol=1e-4)
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
# dispatcher and the code of every provider (each torch call then pays ~100 us here: fixed call costs,
# not memory traffic). "warm": nothing is flushed.
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
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, np.ndarray) and x.dtype != object:
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
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    first = time.perf_counter() - start
    if first > single_run_over_s:
        return Timing(first, first, first, 1), out
    fn()  # a second warmup: allocator and caches of the steady state
    runs = int(min(max_runs, max(min_runs, budget_s / max(first, 1e-6))))
    times = []
    for _ in range(runs):
        if flush is not None:
            flush()
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    median, q20, q80 = np.quantile(times, [0.5, 0.2, 0.8])
    return Timing(float(median), float(q20), float(q80), runs), out


def _compiled_worker(conn, kind: str, shape: tuple[int, int], device: str, cache: str, measure_kwargs: dict):
    os.setpgrp()  # its own process group, so an overrunning compile can be killed with its g++ jobs
    try:
        case = make_case(kind, shape, device, None, numpy=False)
        reference = case.baselines[0]
        compiled = torch.compile(reference.call)
        conn.send(("ready",))
        start = time.perf_counter()
        compiled()
        conn.send(("compiled", time.perf_counter() - start))
        flusher = flusher_for(cache, device, reference.call, case.reads)
        timing, out = measure(compiled, device, flush=flusher, **measure_kwargs)
        out = reference.to_torch(out)
        # NumPy arrays travel by value; tensors would travel as shared-memory handles that the parent fetches
        # from this process, which may have exited by then.
        conn.send(("timed", timing, [t.cpu().numpy() for t in out] if isinstance(out, tuple) else out.cpu().numpy()))
    except Exception as exc:  # noqa: BLE001  (a compiler failure is a result to report)
        conn.send(("failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"))


def measure_compiled(
    kind: str,
    shape: tuple[int, int],
    device: str,
    *,
    timeout_s: float = 120.0,
    cache: str = "data",
    **measure_kwargs,
):
    """``torch.compile`` of the reference loop of ``make_case(kind, shape)`` (CleanRL's), compiled
    once and then timed like any provider, in a child process: the loop unrolls over T, so a compile
    can run for an hour, and past ``timeout_s`` the child and its compiler jobs are killed.

    Returns (timing, output, note) or (None, None, why it was not run)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    worker = context.Process(
        target=_compiled_worker, args=(sender, kind, shape, device, cache, measure_kwargs)
    )
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
        out = [torch.from_numpy(a) for a in out] if isinstance(out, list) else torch.from_numpy(out)
        return message[1], out, note
    finally:
        if worker.is_alive():
            try:
                os.killpg(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                worker.kill()
        worker.join()


def copy_bandwidth(device: str, mib: int = 256, runs: int = 20) -> tuple[float, Timing]:
    """Measured ``dst.copy_(src)`` bandwidth in GB/s (1e9 B/s) on a ``mib`` MiB fp32 buffer, with
    its timing; bytes counted = read + write."""
    src = torch.rand(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    timing, _ = measure(lambda: dst.copy_(src), device, min_runs=runs, max_runs=runs)
    return 2 * src.nbytes / timing.median_s / 1e9, timing


def bytes_moved(reads: list[torch.Tensor], writes: list[torch.Tensor]) -> int:
    """The bytes an op must move: each input read once and each output written once."""
    return sum(t.numel() * t.element_size() for t in [*reads, *writes])


# ----------------------------------------------------------------------------------------------
# Where and when
# ----------------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
