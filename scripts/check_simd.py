#!/usr/bin/env python3
"""Checks that every per-ISA build of the CPU SIMD kernels is vectorized, from the built library's disassembly.

    python scripts/check_simd.py [LIBRARY]        (default: rlkernels/_C.abi3.so next to this tree)

The kernels of csrc/cpu/simd_kernels.h are compiled once per instruction set, in the namespaces
rlkernels::cpu::simd::isa_default / isa_avx2 / isa_avx512 (csrc/cpu/simd_<level>.cpp), and so are the scan
engine's walks of every step (csrc/cpu/scan_block.h, in rlkernels::isa_<level>, scan_block_<level>.cpp). For
each kernel listed in KERNELS and each level, the script disassembles the kernel's functions (objdump -d -C),
finds their loops (a natural loop of its control-flow graph: a jump back to a block that dominates it), and
takes the block loops: the innermost loops that do packed floating-point arithmetic. It asserts that there is
at least one, and that every block loop

  - does packed arithmetic on registers of its level's width (xmm for default, ymm for avx2, zmm for avx512,
    or the width the kernel is written for, listed in KERNELS), and
  - does no scalar ss/sd arithmetic (add, mul, fma, compare, min/max, conversions of a single float),
    builds no mask lane by lane (setcc: a vector compare or flag lowered to one boolean per lane), and calls
    no function (a library function per lane, such as expf; LIBM_EXP_ALLOWED lists the one exception).

It reads the compiled code only, so it needs no AVX-512 hardware. Exit status 0 when every check passes, 1
otherwise (each failure printed), 2 when the library or objdump is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

LEVELS = {"default": "xmm", "avx2": "ymm", "avx512": "zmm"}
WIDTH_ORDER = {"xmm": 0, "ymm": 1, "zmm": 2}

# kernel -> (function name patterns inside the level's namespace, the register width per level checked: the
# level's, or for q_targets' rows, written for 8 floats per vector (4 under SSE2), one ymm at AVX-512).
EIGHT_WIDE = {"default": "xmm", "avx2": "ymm", "avx512": "ymm"}
KERNELS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "ppo_policy_forward": (("ppo_policy_forward(",), LEVELS),
    "ppo_policy_backward": (("ppo_policy_backward(",), LEVELS),
    "ppo_value_forward": (("ppo_value_forward(",), LEVELS),
    "ppo_value_backward": (("ppo_value_backward(",), LEVELS),
    "ppo_kl_forward": (("ppo_kl_forward(", "kl_run<"), LEVELS),
    "ppo_kl_backward": (("ppo_kl_backward(", "kl_run<"), LEVELS),
    "logprob_rows_f32": (("logprob_rows_f32(",), LEVELS),
    "logprob_rows_bf16": (("logprob_rows_bf16(",), LEVELS),
    "logprob_grad_row_f32": (("logprob_grad_row_f32(",), LEVELS),
    "logprob_grad_row_bf16": (("logprob_grad_row_bf16(",), LEVELS),
    "gae_walk_chunk": (("gae_walk_chunk(", "gae::walk_chunk<"), LEVELS),
    "q_rows_f32_wide": (("q_rows_f32_wide(",), EIGHT_WIDE),
    "td_losses_f32": (("td_losses_f32(",), LEVELS),
    "td_grads_f32": (("td_grads_f32(",), LEVELS),
    "dot_f32": (("dot_f32(", "bellman_rows::dot<float>("), LEVELS),
    "widen_f16": (("widen_f16(",), LEVELS),
}
SIMD_NAMESPACE = "rlkernels::cpu::simd::isa_{level}::"
# The scan engine's float32 and float64 walks of each step (direct, transposed, buffered), in
# rlkernels::isa_<level>; {ns} is that namespace.
SCAN_NAMESPACE = "rlkernels::isa_{level}::"
SCAN_STEPS = {
    "scan_linear_scan": "LinearScanStep",
    "scan_discounted_returns": "DiscountedReturnsStep",
    "scan_discounted_returns_backward": "DiscountedReturnsBackwardStep",
    "scan_gae": "GaeStep",
    "scan_gae_backward": "GaeBackwardStep",
    "scan_vtrace": "VtraceStepT<{ns}VecExp>",
    "scan_vtrace_backward": "VtraceBackwardStepT<{ns}VecExp>",
    "scan_retrace": "RetraceStepT<{ns}VecExp>",
    "scan_retrace_backward": "RetraceBackwardStepT<{ns}VecExp>",
}
SCAN_WALKS = ("run_direct", "run_transposed", "run_block")
# kernel -> the levels at which its block loops may call libm's exp: the float64 walks of V-trace's and
# Retrace's steps under SSE2, which take libm's exp per lane (simd.h VecExp: there it is faster than the
# polynomial).
LIBM_EXP_ALLOWED = {f"scan_{step}_f64": ("default",)
                    for step in ("vtrace", "vtrace_backward", "retrace", "retrace_backward")}
for _name, _step in SCAN_STEPS.items():
    for _suffix, _type in (("", "float"), ("_f64", "double")):
        KERNELS[_name + _suffix] = (tuple(f"{walk}<{{ns}}{_step}, {_type}," for walk in SCAN_WALKS), LEVELS)

SCALAR_ARITH = re.compile(
    r"^v?(add|sub|mul|div|sqrt|max|min|u?comi|cmp\w*|rcp\w*|rsqrt\w*|round|f?n?m(add|sub)\w*|cvt\w*)(ss|sd)$"
)
PACKED_ARITH = re.compile(
    r"^v?((add|sub|mul|div|sqrt|max|min|cmp\w*|f?n?m(add|sub)\w*|blendv?|blendm|and|andn|or|xor|cvt\w*)(ps|pd)"
    r"|cvtps2ph)$"  # (float to float16: packed, named for its destination)
)
LANE_MASK = re.compile(r"^set[a-z]+$")
FUNC = re.compile(r"^([0-9a-f]+) <(.*)>:$")
INSN = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")


def disassemble(lib: Path) -> dict[str, list[tuple[int, str, str]]]:
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    funcs: dict[str, list[tuple[int, str, str]]] = {}
    current = None
    for line in out.splitlines():
        m = FUNC.match(line)
        if m:
            current = funcs.setdefault(m.group(2), [])
            continue
        m = INSN.match(line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return funcs


def basic_blocks(insns):
    """The function's control-flow graph: {leader address: (instructions, successor leaders)}."""
    addrs = [a for a, _, _ in insns]
    inside = set(addrs)
    leaders = {addrs[0]}
    targets = {}
    for k, (addr, op, args) in enumerate(insns):
        if op.startswith("j") or op.startswith("ret") or op == "ud2":
            m = re.match(r"([0-9a-f]+) <", args)
            if m and int(m.group(1), 16) in inside:
                targets[addr] = int(m.group(1), 16)
                leaders.add(targets[addr])
            if k + 1 < len(insns):
                leaders.add(insns[k + 1][0])
    blocks, order, current = {}, [], None
    for addr, op, args in insns:
        if addr in leaders:
            current = addr
            order.append(addr)
            blocks[addr] = ([], [])
        blocks[current][0].append((addr, op, args))
    for k, leader in enumerate(order):
        body, succ = blocks[leader]
        addr, op, _ = body[-1]
        if addr in targets:
            succ.append(targets[addr])
        falls = not (op.startswith("jmp") or op.startswith("ret") or op == "ud2")
        if falls and k + 1 < len(order):
            succ.append(order[k + 1])
    return blocks, order[0]


def natural_loops(blocks, entry):
    """[set of leaders] of every natural loop (the back edges u -> h with h dominating u), one per header."""
    preds = {b: [] for b in blocks}
    for b, (_, succ) in blocks.items():
        for s in succ:
            preds[s].append(b)
    reach, stack = {entry}, [entry]  # blocks reachable from the entry
    while stack:
        for s in blocks[stack.pop()][1]:
            if s not in reach:
                reach.add(s)
                stack.append(s)
    dom = {b: set(reach) for b in reach}
    dom[entry] = {entry}
    changed = True
    while changed:
        changed = False
        for b in reach:
            if b == entry:
                continue
            ps = [dom[p] for p in preds[b] if p in reach]
            new = set.intersection(*ps) | {b} if ps else {b}
            if new != dom[b]:
                dom[b], changed = new, True
    loops: dict[int, set[int]] = {}
    for u in reach:
        for h in blocks[u][1]:
            if h in dom[u]:  # a back edge
                body, stack = {h, u}, ([u] if u != h else [])
                while stack:
                    for p in preds[stack.pop()]:
                        if p in reach and p not in body:
                            body.add(p)
                            stack.append(p)
                loops.setdefault(h, set()).update(body)
    return list(loops.values())


def block_loops(insns):
    """[(first address, last address, instructions)] of the innermost loops of one function that do packed
    floating-point arithmetic."""
    if not insns:
        return []
    blocks, entry = basic_blocks(insns)
    loops = natural_loops(blocks, entry)
    innermost = [a for a in loops if not any(b < a for b in loops)]
    result = []
    for loop in innermost:
        body = [(op, args) for b in sorted(loop) for _, op, args in blocks[b][0]]
        if any(PACKED_ARITH.match(op) for op, _ in body):
            result.append((min(loop), max(blocks[b][0][-1][0] for b in loop), body))
    return result


def check_kernel(funcs, level, name, patterns, width) -> list[str]:
    namespace = (SCAN_NAMESPACE if name.startswith("scan_") else SIMD_NAMESPACE).format(level=level)
    patterns = [p.format(ns=namespace) for p in patterns]
    # (templates' names begin with their return type; a PLT stub holds no code of the kernel)
    matched = [f for f in funcs if f.removeprefix("void ").startswith(namespace) and not f.endswith("@plt")
               and any(p in f for p in patterns)]
    if not matched:
        return [f"{level}/{name}: no function {namespace}{patterns[0]}...) in the library"]
    failures, loops = [], 0
    for fname in matched:
        for start, end, body in block_loops(funcs[fname]):
            loops += 1
            where = f"{level}/{name}: the loop at {start:#x}-{end:#x}"
            scalar = sorted({op for op, _ in body if SCALAR_ARITH.match(op)})
            if scalar:
                failures.append(f"{where} does scalar arithmetic: {', '.join(scalar)}")
            lane_masks = sum(1 for op, _ in body if LANE_MASK.match(op))
            if lane_masks:
                failures.append(f"{where} builds masks lane by lane ({lane_masks} setcc)")
            calls = sorted({args.split(" ", 1)[-1] for op, args in body if op.startswith("call")})
            if level in LIBM_EXP_ALLOWED.get(name, ()):
                calls = [c for c in calls if c != "<exp@plt>"]
            if calls:
                failures.append(f"{where} calls {', '.join(calls)}")
            widest = max((WIDTH_ORDER[r] for op, args in body if PACKED_ARITH.match(op)
                          for r in re.findall(r"%(xmm|ymm|zmm)", args)), default=-1)
            if widest != WIDTH_ORDER[width]:
                got = [k for k, v in WIDTH_ORDER.items() if v == widest]
                failures.append(f"{where} computes on {got[0] if got else 'no vector register'}, not {width}")
    if loops == 0:
        failures.append(f"{level}/{name}: no loop with packed arithmetic (not vectorized)")
    return failures


def main(argv: list[str]) -> int:
    lib = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "rlkernels" / "_C.abi3.so"
    if not lib.exists():
        print(f"check_simd: no library at {lib}", file=sys.stderr)
        return 2
    if shutil.which("objdump") is None:
        print("check_simd: objdump not found (binutils)", file=sys.stderr)
        return 2
    funcs = disassemble(lib)
    failures = []
    for name, (patterns, widths) in KERNELS.items():
        for level in widths:
            failures += check_kernel(funcs, level, name, patterns, widths[level])
    for failure in failures:
        print(failure)
    checked = sum(len(widths) for _, widths in KERNELS.values())
    print(f"check_simd: {checked - len({f.split(':')[0] for f in failures})} of {checked} kernel builds vectorized")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
