"""Tests of the Triton backend of the scan family (rlkernels/triton/returns.py).

The oracle is the CPU backend (itself checked against the NumPy reference in test_reference.py) and, for the
flag combinations, `rlkernels.reference` directly. Both regimes of the Triton engine are run: one lane per
sequence, and the chunked three-pass scan, forced on small shapes by lowering the module's thresholds.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set once for the session by tests/conftest.py). The
interpreter is slow (NumPy, one program after another), so shapes stay small.
"""

import itertools
import os

import pytest

pytest.importorskip("triton")

import torch
import triton

from conftest import assert_close

import rlkernels
from rlkernels.triton import returns as triton_returns

pytestmark = pytest.mark.triton

if not triton_returns._interpreting():
    pytest.skip("rlkernels.triton.returns was imported before TRITON_INTERPRET=1 was set; its kernels are "
                "compiled for a GPU and cannot run on CPU tensors", allow_module_level=True)

ESTIMATORS = ("discounted_returns", "gae", "vtrace")
GAMMA, LAM = 0.9, 0.8
VTRACE_CLIPS = {"rho_clip": 1.2, "c_clip": 0.9, "pg_rho_clip": 1.1}
PACKED_LENGTHS = (5, 0, 8, 1, 3)  # an empty segment, a single step, ragged ends
STEPS, BATCH = 8, 5  # chunked: chunks of 3, 3 and 2 steps


# ----------------------------------------------------------------------------------------------------
# Regimes
# ----------------------------------------------------------------------------------------------------


def force_chunks_of_3(monkeypatch):
    # Every sequence of 6 steps or more is cut into chunks of 3: several chunks and a ragged last one.
    monkeypatch.setattr(triton_returns, "MANY_SEQUENCES", 10**9)
    monkeypatch.setattr(triton_returns, "TARGET_LANES", 10**9)
    monkeypatch.setattr(triton_returns, "MIN_CHUNK_STEPS", 3)


@pytest.fixture(params=["lanes", "chunked"])
def regime(request, monkeypatch):
    """Runs a test in one regime of the engine, and checks afterwards that it was the one used."""
    chunked = request.param == "chunked"
    if chunked:
        force_chunks_of_3(monkeypatch)
    used = []
    choose = triton_returns._chunk_steps

    def spy(num_seqs, steps):
        chunk = choose(num_seqs, steps)
        used.append(chunk < steps)
        return chunk

    monkeypatch.setattr(triton_returns, "_chunk_steps", spy)
    yield request.param
    assert used, "the Triton engine never ran"
    assert any(used) if chunked else not any(used), f"expected the {request.param} regime, got {used}"


def test_regime_heuristic():
    choose = triton_returns._chunk_steps
    # Many sequences, or short ones: one lane per sequence walks the whole sequence.
    assert choose(100_000, 1_000_000) == 1_000_000
    assert choose(8, 100) == 100
    assert choose(3, 0) == 1
    # Few long sequences: chunks, at least MIN_CHUNK_STEPS long, sized for about TARGET_LANES lanes.
    chunk = choose(8, 1 << 20)
    assert triton_returns.MIN_CHUNK_STEPS <= chunk < 1 << 20
    assert 8 * triton.cdiv(1 << 20, chunk) <= 2 * triton_returns.TARGET_LANES
    assert choose(1, 1 << 24) < choose(1, 1 << 26)


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


class Case:
    """Random inputs of one layout, kept in float64 and cast per test."""

    def __init__(self, layout, seed, steps=STEPS, batch=BATCH):
        g = torch.Generator().manual_seed(seed)
        self.layout = layout
        self.cu_seqlens = None
        self.time_dim = 0
        if layout == "time_major":
            shape, seq_shape = (steps, batch), (batch,)
        elif layout == "batch_major":
            shape, seq_shape = (batch, steps), (batch,)
            self.time_dim = -1
        elif layout == "middle":  # [O, T, I] with O and I both > 1
            shape, seq_shape = (2, steps, 3), (2, 3)
            self.time_dim = 1
        elif layout == "packed":
            cu = torch.tensor((0,) + tuple(itertools.accumulate(PACKED_LENGTHS)), dtype=torch.int32)
            shape, seq_shape = (int(cu[-1]),), (len(PACKED_LENGTHS),)
            self.cu_seqlens = cu
        else:
            raise ValueError(layout)

        def randn(*s):
            return torch.randn(*s, generator=g, dtype=torch.float64)

        def flags(p):
            return torch.rand(shape, generator=g) < p

        self.rewards, self.values, self.next_values = randn(*shape), randn(*shape), randn(*shape)
        self.log_rhos = 0.7 * randn(*shape)  # both sides of every clip
        self.a = torch.rand(shape, generator=g, dtype=torch.float64)
        self.bootstrap_value = randn(*seq_shape)
        self.initial = randn(*seq_shape)
        self.terminated, self.truncated, self.mask = flags(0.15), flags(0.15), flags(0.75)
        self.weights = (randn(*shape), randn(*shape))  # a loss mixing every output, for gradients

    def floats(self, dtype, requires_grad=False):
        names = ("rewards", "values", "next_values", "log_rhos", "a", "bootstrap_value", "initial")
        return {n: getattr(self, n).to(dtype).requires_grad_(requires_grad) for n in names}


# Flag combinations: terminated x mask x {nothing, bootstrap_value, next_values, truncated + next_values}
# (bootstrap_value is not used when next_values are given).
COMBOS = [
    tuple(name for name, on in zip(("terminated", "mask"), (term, mask)) if on) + nxt
    for term, mask, nxt in itertools.product(
        (False, True), (False, True),
        ((), ("bootstrap_value",), ("next_values",), ("truncated", "next_values")))
]
ALL_FLAGS = ("terminated", "truncated", "next_values", "mask")
BOOTSTRAPPED = ("terminated", "mask", "bootstrap_value")


def run(op, backend, case, combo, floats):
    """Calls the public function `op` with the options in `combo`; returns its outputs as a tuple."""
    kw = {"gamma": GAMMA, "cu_seqlens": case.cu_seqlens, "time_dim": case.time_dim, "backend": backend}
    for name in combo:
        kw[name] = floats[name] if name in floats else getattr(case, name)
    args = [floats["rewards"]]
    if op in ("gae", "vtrace"):
        args.append(floats["values"])
        kw["lam"] = LAM
    if op == "vtrace":
        args.append(floats["log_rhos"])
        kw.update(VTRACE_CLIPS)
    out = getattr(rlkernels, op)(*args, **kw)
    return out if isinstance(out, tuple) else (out,)


def leaf_names(op, combo):
    names = ["rewards"] + (["values"] if op != "discounted_returns" else [])
    names += ["log_rhos"] if op == "vtrace" else []
    return names + [n for n in ("next_values", "bootstrap_value") if n in combo]


def leaves(op, combo, floats):
    return [floats[n] for n in leaf_names(op, combo)]


def accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["time_major", "batch_major", "packed"])
@pytest.mark.parametrize("op", ESTIMATORS)
def test_every_flag_combination_matches_cpu_and_reference(op, layout, regime):
    case = Case(layout, seed=10 * ESTIMATORS.index(op) + len(layout))
    floats = case.floats(torch.float64)
    for combo in COMBOS:
        got = run(op, "triton", case, combo, floats)
        want = run(op, "cpu", case, combo, floats)
        ref = run(op, "reference", case, combo, floats)
        for i, (g, w, r) in enumerate(zip(got, want, ref)):
            assert g.dtype == torch.float64 and g.shape == case.rewards.shape
            assert_close(g, w, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name=f"{op} output {i} with {combo} vs cpu")
            assert_close(g, r, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name=f"{op} output {i} with {combo} vs reference")
        if "mask" in combo:
            assert all((g[~case.mask] == 0).all() for g in got), f"{op} with {combo}: masked outputs not 0"


TOLERANCES = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-5, torch.float16: 1e-5}
DTYPE_LAYOUTS = [(dtype, layout) for dtype in TOLERANCES for layout in ("time_major", "batch_major")]
DTYPE_LAYOUTS.append((torch.float64, "middle"))


@pytest.mark.parametrize("dtype, layout", DTYPE_LAYOUTS)
@pytest.mark.parametrize("op", ESTIMATORS)
def test_dtypes_match_cpu(op, dtype, layout, regime):
    # 16-bit inputs are read as they are and accumulated in float32 by both backends: the results agree to
    # float32 rounding (the chunked regime only reorders operations).
    tol = TOLERANCES[dtype]
    case = Case(layout, seed=7)
    floats = case.floats(dtype)
    for combo in (ALL_FLAGS, BOOTSTRAPPED):
        got = run(op, "triton", case, combo, floats)
        want = run(op, "cpu", case, combo, floats)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == accumulate_dtype(dtype)
            assert_close(g, w, rtol=tol, atol=tol, scale=1.0, same_dtype=True, name=f"{op} output {i} {dtype} {combo}")


@pytest.mark.parametrize("dtype, layout", DTYPE_LAYOUTS)
def test_linear_scan_matches_cpu(dtype, layout, regime):
    tol = TOLERANCES[dtype]
    case = Case(layout, seed=11)
    f = case.floats(dtype)
    for reverse, initial in itertools.product((True, False), (None, f["initial"])):
        kw = {"reverse": reverse, "initial": initial, "time_dim": case.time_dim}
        got = rlkernels.linear_scan(f["a"], f["rewards"], backend="triton", **kw)
        want = rlkernels.linear_scan(f["a"], f["rewards"], backend="cpu", **kw)
        assert got.dtype == accumulate_dtype(dtype)
        assert_close(got, want, rtol=tol, atol=tol, scale=1.0, same_dtype=True, name=f"linear_scan reverse={reverse} initial={initial is not None}")


def test_flags_as_uint8_and_bool_agree():
    # The wrappers hand bool flags over; the ops read uint8 ones the same way.
    case = Case("time_major", seed=3)
    canon = (1, STEPS, BATCH)
    r, v = case.rewards.reshape(canon), case.values.reshape(canon)
    flags = [x.reshape(canon) for x in (case.terminated, case.mask)]
    args = (r, v, None, case.bootstrap_value.reshape(1, BATCH))
    as_bool = triton_returns.gae(*args, flags[0], None, flags[1], None, GAMMA, LAM)
    as_uint8 = triton_returns.gae(*args, flags[0].to(torch.uint8), None, flags[1].to(torch.uint8), None,
                                  GAMMA, LAM)
    for a, b in zip(as_bool, as_uint8):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_masked_nan_does_not_leak_and_results_are_deterministic():
    case = Case("batch_major", seed=5)
    rewards = case.rewards.clone()
    rewards[~case.mask] = float("nan")
    kw = {"gamma": GAMMA, "lam": LAM, "mask": case.mask, "terminated": case.terminated, "time_dim": -1,
          "backend": "triton"}
    adv, ret = rlkernels.gae(rewards, case.values, **kw)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    adv2, ret2 = rlkernels.gae(rewards, case.values, **kw)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)
    want = rlkernels.gae(rewards, case.values, **{**kw, "backend": "cpu"})
    assert_close(adv, want[0], rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name="advantages")


def test_empty_inputs():
    empty = torch.empty(0, 3, dtype=torch.float64)
    adv, ret = rlkernels.gae(empty, empty, backend="triton")
    assert adv.shape == (0, 3) and ret.shape == (0, 3) and adv.dtype == torch.float64
    packed = torch.empty(0, dtype=torch.bfloat16)
    cu = torch.zeros(3, dtype=torch.int64)  # two empty segments
    out = rlkernels.discounted_returns(packed, cu_seqlens=cu, bootstrap_value=torch.ones(2), backend="triton")
    assert out.shape == (0,) and out.dtype == torch.float32
    boot = torch.ones(2, dtype=torch.float64, requires_grad=True)
    vs, pg = rlkernels.vtrace(packed.double(), packed.double(), packed.double(), cu_seqlens=cu,
                              bootstrap_value=boot, backend="triton")
    (grad,) = torch.autograd.grad(vs.sum() + pg.sum() + boot.sum(), [boot])
    assert torch.equal(grad, torch.ones(2, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------


def grads(op, backend, case, combo, floats, log_rhos_grad=True):
    if not log_rhos_grad:
        floats = {**floats, "log_rhos": floats["log_rhos"].detach()}
    outs = run(op, backend, case, combo, floats)
    loss = sum((o * w).sum() for o, w in zip(outs, case.weights + case.weights))
    inputs = [x for x in leaves(op, combo, floats) if x.requires_grad]
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("layout", ["time_major", "batch_major", "packed"])
@pytest.mark.parametrize("op", ESTIMATORS)
def test_gradients_match_cpu(op, layout, regime):
    case = Case(layout, seed=13)
    floats = case.floats(torch.float64, requires_grad=True)
    for combo in ((), BOOTSTRAPPED, ALL_FLAGS, ("next_values",)):
        got = grads(op, "triton", case, combo, floats)
        want = grads(op, "cpu", case, combo, floats)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name=f"{op} gradient {i} with {combo}")


def test_vtrace_gradients_without_log_rho_gradient(regime):
    # log_rhos not requiring grad: no carries are saved, and the other gradients must not need them.
    case = Case("middle", seed=17)
    floats = case.floats(torch.float64, requires_grad=True)
    for combo in (BOOTSTRAPPED, ALL_FLAGS):
        got = grads("vtrace", "triton", case, combo, floats, log_rhos_grad=False)
        want = grads("vtrace", "cpu", case, combo, floats, log_rhos_grad=False)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name=f"vtrace gradient {i} with {combo}")


@pytest.mark.parametrize("layout", ["time_major", "batch_major", "middle"])
def test_linear_scan_gradients_match_cpu(layout, regime):
    case = Case(layout, seed=19)
    f = case.floats(torch.float64, requires_grad=True)
    for reverse, with_initial in itertools.product((True, False), (True, False)):
        res = {}
        for backend in ("triton", "cpu"):
            initial = f["initial"] if with_initial else None
            x = rlkernels.linear_scan(f["a"], f["rewards"], reverse=reverse, initial=initial,
                                      time_dim=case.time_dim, backend=backend)
            inputs = [f["a"], f["rewards"]] + ([initial] if with_initial else [])
            res[backend] = torch.autograd.grad((x * case.weights[0]).sum(), inputs)
        for i, (g, w) in enumerate(zip(res["triton"], res["cpu"])):
            assert_close(g, w, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name=f"linear_scan gradient {i} reverse={reverse} initial={with_initial}")


def test_backward_ops_match_cpu_with_missing_gradients():
    # Autograd hands over zeros for unused outputs, but the schemas take None for them, as the C++ ones do.
    case = Case("packed", seed=23)
    r = case.rewards
    flags = (case.terminated, case.truncated, case.mask, case.cu_seqlens)
    g = case.weights[0]
    for has_next in (False, True):
        got = torch.ops.rlkernels.triton_gae_backward(None, g, *flags, r, GAMMA, LAM, has_next)
        want = torch.ops.rlkernels.gae_backward(None, g, *flags, r, GAMMA, LAM, has_next)
        for a, b in zip(got, want):
            assert_close(a, b, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name=f"gae_backward has_next={has_next}")
        got = torch.ops.rlkernels.triton_discounted_returns_backward(None, *flags, r, GAMMA, has_next)
        want = torch.ops.rlkernels.discounted_returns_backward(None, *flags, r, GAMMA, has_next)
        for a, b in zip(got, want):
            assert_close(a, b, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name=f"discounted_returns_backward has_next={has_next}")
    nv = case.next_values
    args = (g, None, r, case.values, case.log_rhos, nv, None, None, *flags, GAMMA, LAM,
            *VTRACE_CLIPS.values())
    got = torch.ops.rlkernels.triton_vtrace_backward(*args)
    want = torch.ops.rlkernels.vtrace_backward(*args)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name="vtrace_backward")


@pytest.mark.parametrize("op, chunked", [(op, False) for op in ESTIMATORS] + [("gae", True)])
def test_gradcheck(op, chunked, monkeypatch):
    if chunked:
        force_chunks_of_3(monkeypatch)
    case = Case("time_major", seed=29, steps=6, batch=2)
    floats = case.floats(torch.float64, requires_grad=True)
    combo = ("terminated", "mask", "bootstrap_value")
    names = leaf_names(op, combo)

    def fn(*xs):
        return run(op, "triton", case, combo, dict(zip(names, xs)))

    inputs = [floats[n] for n in names]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


# ----------------------------------------------------------------------------------------------------
# The ops themselves
# ----------------------------------------------------------------------------------------------------


def _opcheck_samples():
    case = Case("middle", seed=31, steps=5)
    canon = (2, 5, 3)
    c = {n: getattr(case, n).reshape(canon) for n in ("rewards", "values", "next_values", "log_rhos", "a",
                                                        "terminated", "truncated", "mask")}
    boot = case.bootstrap_value.requires_grad_()
    r, v, lr, nv = (c[n].clone().requires_grad_() for n in ("rewards", "values", "log_rhos", "next_values"))
    term, trunc, mask = c["terminated"], c["truncated"], c["mask"]
    x = triton_returns.linear_scan(c["a"], c["rewards"], None, True)
    vs_saved = triton_returns.vtrace(c["rewards"], c["values"], c["log_rhos"], None, boot.detach(), term,
                                     None, mask, None, GAMMA, LAM, 1.0, 1.0, 1.0, True)
    g = case.weights[0].reshape(canon)
    ops = torch.ops.rlkernels
    return {
        "linear_scan": (ops.triton_linear_scan,
                        (c["a"].requires_grad_(), r, case.initial.reshape(2, 3), True)),
        "linear_scan_backward": (ops.triton_linear_scan_backward, (g, c["a"].detach(), x, None, True)),
        "discounted_returns": (ops.triton_discounted_returns, (r, nv, None, term, trunc, mask, None, GAMMA)),
        "discounted_returns_backward": (ops.triton_discounted_returns_backward,
                                        (g, term, trunc, mask, None, c["rewards"], GAMMA, False)),
        "gae": (ops.triton_gae, (r, v, None, boot, term, None, mask, None, GAMMA, LAM)),
        "gae_backward": (ops.triton_gae_backward,
                         (g, g, term, trunc, mask, None, c["rewards"], GAMMA, LAM, True)),
        "vtrace": (ops.triton_vtrace,
                   (r, v, lr, nv, None, term, trunc, mask, None, GAMMA, LAM, 1.2, 0.9, 1.1, True)),
        "vtrace_backward": (ops.triton_vtrace_backward,
                            (g, g, c["rewards"], c["values"], c["log_rhos"], None, vs_saved[2], vs_saved[3],
                             term, None, mask, None, GAMMA, LAM, 1.0, 1.0, 1.0)),
    }


@pytest.mark.parametrize("name", ["linear_scan", "linear_scan_backward", "discounted_returns",
                                  "discounted_returns_backward", "gae", "gae_backward", "vtrace",
                                  "vtrace_backward"])
def test_opcheck(name):
    # Schema, autograd registration, fake (meta) kernel and AOTDispatch (static and dynamic shapes). Under the
    # interpreter AOTDispatch keeps the ops whole, as the interpreted kernels cannot be recorded in a graph
    # (see _keep_whole_under_interpreter); on a GPU it decomposes them into their kernel launches.
    op, args = _opcheck_samples()[name]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    case = Case("time_major", seed=37, steps=6, batch=2)
    r = case.rewards.clone().requires_grad_()

    def f(r, v):
        adv, ret = rlkernels.gae(r, v, gamma=GAMMA, lam=LAM, terminated=case.terminated, backend="triton")
        return adv, ret

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(r, case.values)
    want = f(r, case.values)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name="compiled gae")
    (g_got,) = torch.autograd.grad(got[0].sum(), [r])
    (g_want,) = torch.autograd.grad(want[0].sum(), [r])
    assert_close(g_got, g_want, rtol=1e-12, atol=1e-12, scale=1.0, same_dtype=True, name="compiled gae gradient")


# ----------------------------------------------------------------------------------------------------
# The GPU compiler
# ----------------------------------------------------------------------------------------------------

# Compiles kernel variants for sm_90 with the real Triton compiler, in a process without TRITON_INTERPRET:
# the interpreter runs Python, so it accepts code the compiler rejects (an early return in a constexpr branch
# once passed here and failed there). No GPU is needed to make a cubin.
_COMPILE_SCRIPT = r"""
import sys
import torch  # noqa: F401  (loads libc10 before rlkernels._C)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rlkernels.triton import returns as tr

assert not tr._interpreting()
PTRS = [n for n in tr._scan_kernel.arg_names if n.endswith("_ptr")]
INTS = ["num_lanes", "num_seqs", "num_chunks", "steps", "inner", "chunk"]
FLOATS = ["gamma", "lam", "rho_clip", "c_clip", "pg_rho_clip"]


def build(kernel, types, consts):
    names = kernel.arg_names
    signature = {n: types.get(n, "constexpr") for n in names}
    constexprs = {(names.index(n),): consts.get(n) for n in names if signature[n] == "constexpr"}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def scan(step, d, acc, ptrs, **consts):
    types = {n: "i32" for n in INTS} | {n: "fp64" for n in FLOATS} | ptrs | {"OUT0_ptr": "*" + acc}
    consts = {"STEP": step, "D": d, "REVERSE": step % 2 == 0, "HAS_NEXT": False, "MAP_ONLY": False,
              "FINAL_J": -1, "BLOCK": 128, "UNROLL": 4} | consts
    return build(tr._scan_kernel, types, consts)


u8 = "*u8"
flags = {"TERM_ptr": u8, "TRUNC_ptr": u8, "MASK_ptr": u8}
# gae forward, bf16 inputs, pass 1 of packed input; and pass 3 with next values.
scan(tr._GAE.value, 2, "fp32",
     {"R_ptr": "*bf16", "V_ptr": "*bf16", "CU_ptr": "*i32", "MAP_ptr": "*fp32"} | flags, MAP_ONLY=True)
scan(tr._GAE.value, 2, "fp32",
     {"R_ptr": "*fp16", "V_ptr": "*fp16", "NV_ptr": "*fp16", "CARRY_IN_ptr": "*fp32", "OUT1_ptr": "*fp32"}
     | flags, HAS_NEXT=True)
# vtrace backward in float64 with the saved carries, no carry in, writing the bootstrap gradient.
scan(tr._VTRACE_BACKWARD.value, 2, "fp64",
     {n: "*fp64" for n in ("R_ptr", "V_ptr", "LR_ptr", "G0_ptr", "G1_ptr", "S0_ptr", "S1_ptr", "OUT1_ptr",
                           "OUT2_ptr", "FINAL_ptr")} | flags, FINAL_J=1)
# the linear scan's adjoint, and discounted returns with no stream but rewards.
scan(tr._LINEAR_SCAN_BACKWARD.value, 1, "fp32",
     {"A_ptr": "*bf16", "G0_ptr": "*fp32", "X_ptr": "*fp32", "X_INIT_ptr": "*fp32", "OUT1_ptr": "*fp32",
      "FINAL_ptr": "*fp32"}, FINAL_J=0)
scan(tr._RETURNS.value, 1, "fp32", {"R_ptr": "*fp32"})
build(tr._compose_kernel,
      {"MAP_ptr": "*fp64", "INIT_ptr": "*fp64", "CARRY_IN_ptr": "*fp64", "num_seqs": "i32",
       "num_chunks": "i32", "num_lanes": "i32"}, {"D": 2, "REVERSE": True, "BLOCK": 16})
print("compiled")
"""


def test_kernels_compile_for_a_gpu():
    import pathlib
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = pathlib.Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode != 0 and "CompilationError" not in proc.stderr:
        # No ptxas, or another Triton version's compile API: nothing to learn about these kernels here.
        pytest.skip(f"the Triton GPU compiler cannot run here: {proc.stderr.strip().splitlines()[-1:]}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
