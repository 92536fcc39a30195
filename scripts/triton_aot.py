"""Compiles every Triton kernel launch of the test suite for a GPU architecture, on a machine without a GPU.

CI runs the Triton kernels through the interpreter (TRITON_INTERPRET=1), which is more permissive than the
compiler: a kernel can pass every interpreted test and still fail to compile for a GPU (a type the code
generator rejects, a constexpr misuse). This script closes that gap without a GPU:

  1. capture: runs the given tests under the interpreter and records each launch of an rlkernels Triton kernel
     (the kernel, its arguments' types, its constexpr values and launch options), deduplicated; or takes the
     record the test suite wrote (tests/conftest.py records when RLKERNELS_TRITON_LAUNCHES names a file:
     scripts/test.sh does, then runs this with --records);
  2. compile: compiles each recorded specialization ahead of time for the target (Triton's own compiler down
     to a cubin with the ptxas it ships; no driver or device needed), and reports the ones that fail.

    python scripts/triton_aot.py [--arch 90,80] [--records FILE] [-- PYTEST ARGS]   # default: the Triton tests of every family

The capture runs in a child process with TRITON_INTERPRET=1, the compile in this one without it (there the
kernels are real JITFunctions). Exit status: 0 when every specialization compiled, 1 otherwise, 2 when the
capture recorded nothing. The Triton installed is the one used (scripts/gpu.sh's machine may have another:
run this with that version to check it, e.g. PYTHONPATH pointing at a `pip install --target` of it).
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's rlkernels (built in place), as the tests use it
MODULES = ("returns", "logprobs", "ppo", "bellman")
_POINTER_TYPES = {
    "torch.float32": "fp32",
    "torch.float64": "fp64",
    "torch.float16": "fp16",
    "torch.bfloat16": "bf16",
    "torch.int64": "i64",
    "torch.int32": "i32",
    "torch.int16": "i16",
    "torch.int8": "i8",
    "torch.uint8": "u8",
    "torch.bool": "i1",
}


# ---- capture (child process, TRITON_INTERPRET=1) ----------------------------------------------------------


def _describe(value):
    """A picklable description of one launch argument: ("ptr", dtype) / ("int", v) / ("float",) / ("none",) / ..."""
    import torch

    if isinstance(value, torch.Tensor):
        return ("ptr", str(value.dtype))
    if value is None:
        return ("none",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", value)
    import triton.language as tl

    if isinstance(value, tl.dtype):  # a constexpr dtype (the accumulation type)
        return ("dtype", value.name)
    return ("other", repr(value))


_RECORDS: dict[tuple, dict] = {}


def install_recorder() -> None:
    """Records every launch of an rlkernels Triton kernel from now on (in _RECORDS): each module's wrap_triton
    is replaced by one whose launcher notes the kernel, its arguments' types and values of constexprs, and the
    launch options, then launches as before."""
    import importlib

    import rlkernels.triton._common as launch

    original = launch.wrap_triton

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launcher = self.kernel[grid]

            def run(*args, **kwargs):
                rec = _record(getattr(self.kernel, "fn", self.kernel), args, kwargs)
                key = (rec["module"], rec["name"], rec["args"], tuple(sorted(rec["options"].items())))
                _RECORDS.setdefault(key, rec)["count"] += 1
                return launcher(*args, **kwargs)

            return run

    def recording_wrap_triton(kernel):
        return Recorder(original(kernel))

    for name in MODULES:
        importlib.import_module(f"rlkernels.triton.{name}").wrap_triton = recording_wrap_triton


def write_records(path: str) -> None:
    with open(path, "wb") as f:
        pickle.dump(list(_RECORDS.values()), f)
    print(f"\nrecorded {len(_RECORDS)} distinct Triton launches ({sum(r['count'] for r in _RECORDS.values())} "
          f"in all) to {path}")


def _capture(out_path: str, pytest_args: list[str]) -> int:
    import pytest

    install_recorder()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *pytest_args])
    write_records(out_path)
    print(f"pytest exit {int(code)}")
    return 0


# ---- compile (this process, no interpreter) ---------------------------------------------------------------


def _record(fn, args, kwargs) -> dict:
    """The record of one launch of the kernel function `fn` (as install_recorder notes it)."""
    names = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k not in options})
    desc = tuple((name, _describe(bound[name])) for name in names if name in bound)
    return {"module": fn.__module__, "name": fn.__name__, "args": desc, "options": options, "count": 0}


def _gpu_only_records(names: set[str]) -> list[dict]:
    """The launches a module declares the interpreter cannot make (its gpu_only_launches()), for the kernels
    among `names` (those the capture saw)."""
    import importlib

    out = []
    for module in MODULES:
        declared = getattr(importlib.import_module(f"rlkernels.triton.{module}"), "gpu_only_launches", None)
        for kernel, args, kwargs in declared() if declared else ():
            fn = getattr(kernel, "fn", kernel)
            if fn.__name__ in names:
                out.append(_record(fn, args, kwargs))
    return out


def _signature(kernel, args):
    """(signature, constexprs) for triton.compiler.ASTSource from a recorded launch."""
    import triton.language as tl

    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    signature, constexprs = {}, {}
    for name, desc in args:
        kind = desc[0]
        if name in constexpr_names:
            signature[name] = "constexpr"
            constexprs[name] = tl.dtype(desc[1]) if kind == "dtype" else (desc[1] if len(desc) > 1 else None)
        elif kind == "ptr":
            signature[name] = "*" + _POINTER_TYPES[desc[1]]
        elif kind == "none":
            signature[name] = "constexpr"
            constexprs[name] = None
        elif kind == "bool":
            signature[name] = "i1"
        elif kind == "int":
            signature[name] = "i32" if -(2**31) <= desc[1] < 2**31 else "i64"
        elif kind == "float":
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {name} of an unsupported kind {desc}")
    return signature, constexprs


def _compile_one(job):
    """(what, failure or None) for one recorded launch compiled for one target."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rec, arch, warp_size = job
    kernel = getattr(importlib.import_module(rec["module"]), rec["name"])
    what = f"sm_{arch} {rec['module'].rsplit('.', 1)[-1]}.{rec['name']}"
    constexprs = {}
    try:
        signature, constexprs = _signature(kernel, rec["args"])
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, warp_size), options=rec["options"] or None)
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
    except Exception as exc:  # noqa: BLE001  (every failure is reported, then the next one compiled)
        first = str(exc).strip().splitlines()
        return what, f"{constexprs}: {type(exc).__name__}: {first[0][:300] if first else ''}"
    return what, None


def _compile_all(records, archs: list[int], warp_size: int, jobs: int) -> int:
    """Compiles every record for every target on `jobs` processes (each compile is single-threaded)."""
    import concurrent.futures
    import multiprocessing

    import triton

    work = [(rec, arch, warp_size) for arch in archs
            for rec in sorted(records, key=lambda r: (r["module"], r["name"], repr(r["args"])))]
    start = time.perf_counter()
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile_one, work, chunksize=8))
    else:
        results = [_compile_one(job) for job in work]
    failures = [f"{what} {why}" for what, why in results if why is not None]
    print(f"triton {triton.__version__}, targets {', '.join(f'sm_{a}' for a in archs)}: compiled "
          f"{len(work) - len(failures)} of {len(work)} ({len(records)} specializations per target) in "
          f"{time.perf_counter() - start:.0f} s on {jobs} processes")
    for line in failures:
        print("  FAILED", line)
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90,80",
                        help="comma-separated compute capabilities x 10 (90: H100/H200, 80: A100); the wheel's")
    parser.add_argument("--warp-size", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes")
    parser.add_argument("--records", default=None, help="use (or, with --capture-only, write) this capture file")
    parser.add_argument("--capture-only", action="store_true")
    parser.add_argument("--allow-empty", action="store_true",
                        help="exit 0 when no launch was recorded (a test selection without Triton tests)")
    parser.add_argument("--_child-capture", dest="child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("pytest_args", nargs="*", help="tests to capture from (after --)")
    args = parser.parse_args(argv)
    pytest_args = args.pytest_args or ["-m", "triton", *(str(ROOT / "tests" / f"test_{family}.py")
                                                        for family in ("returns", "logprobs", "ppo", "bellman"))]
    if args.child:
        return _capture(args.child, pytest_args)
    records_path = args.records
    if records_path is None or args.capture_only or not Path(records_path).exists():
        records_path = records_path or os.path.join(tempfile.mkdtemp(prefix="rlk-aot-"), "launches.pkl")
        # (Not RLKERNELS_TRITON_LAUNCHES: under scripts/test.sh the child's conftest would record too, into the
        # suite's file.)
        env = {k: v for k, v in os.environ.items() if k != "RLKERNELS_TRITON_LAUNCHES"}
        env.update(TRITON_INTERPRET="1", HYPOTHESIS_PROFILE=os.environ.get("HYPOTHESIS_PROFILE", "ci"))
        subprocess.run([sys.executable, __file__, "--_child-capture", records_path, "--", *pytest_args], cwd=ROOT,
                       env=env, check=False)
        if args.capture_only:
            return 0
    if not Path(records_path).exists():
        print("the capture wrote nothing", file=sys.stderr)
        return 2
    with open(records_path, "rb") as f:
        records = pickle.load(f)
    if not records:
        print("the capture recorded no Triton launch", file=sys.stderr)
        return 0 if args.allow_empty else 2
    os.environ.pop("TRITON_INTERPRET", None)
    records = records + _gpu_only_records({r["name"] for r in records})
    return _compile_all(records, [int(a) for a in args.arch.split(",")], args.warp_size, args.jobs)


if __name__ == "__main__":
    sys.exit(main())
