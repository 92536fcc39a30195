"""CUDA kernels of the reverse-scan family (csrc/cuda) against the CPU kernels.

The CPU backend is the verified oracle here: for every op, flag combination, dtype, layout and regime of
the CUDA engine, ``backend="cuda"`` on CUDA tensors must give the CPU backend's outputs and gradients, up to
float rounding (the two engines add in different orders). Then the CUDA-only properties: bit-identical
repeated runs, opcheck, torch.compile, CUDA-graph capture of forward plus backward, 64-bit indexing.

Every test is marked ``cuda`` and skipped unless a GPU is present and the op has a CUDA kernel (an
rlkernels built with nvcc). The cases below are sized to reach each regime of plan_of() in
csrc/cuda/scan_engine.cuh; its constants are quoted where a case depends on them.
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

from conftest import assert_close

import rlkernels

pytestmark = pytest.mark.cuda
DEVICE = "cuda"

OPS = ("linear_scan", "discounted_returns", "discounted_returns_backward", "gae", "gae_backward", "vtrace",
       "vtrace_backward")


def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rlkernels::{op}", "CUDA")


def needs_cuda(*ops):
    """Skip unless a GPU is present and every op named has a CUDA kernel."""
    ops = ops or OPS
    missing = [op for op in ops if not _has_cuda_kernel(op)]
    reason = "no CUDA device" if not torch.cuda.is_available() else f"no CUDA kernel for {', '.join(missing)}"
    return pytest.mark.skipif(not torch.cuda.is_available() or bool(missing), reason=reason)


# ----------------------------------------------------------------------------------------------------
# Cases: one per regime of the CUDA engine (csrc/cuda/scan_engine.cuh, plan_of)
# ----------------------------------------------------------------------------------------------------


def _packed_one_chunk(g):
    # At most kWarpChunk = 2048 steps: one warp walks every segment, resetting at each start; empty segments
    # at the start, in the middle and at the end.
    return [0, 5, 0, 17, 1, 0, 130, 64, 3, 0]


def _packed_global_chunks(g):
    # Few long, uneven segments: global chunks of 2048 steps that straddle segment boundaries.
    lengths = torch.randint(0, 3000, (20,), generator=g).tolist()
    lengths[0] = lengths[7] = lengths[-1] = 0
    return lengths


def _packed_warp_per_seq(g):
    # At least kWarpSeqsMin = 8192 segments averaging at least 32 steps: a warp per segment.
    lengths = torch.randint(24, 61, (8200,), generator=g).tolist()
    for i in range(0, len(lengths), 97):
        lengths[i] = 0
    return lengths


def _packed_tiny_segments(g):
    # Many segments of 0-4 steps: global chunks, many segment starts per thread.
    return torch.randint(0, 5, (10000,), generator=g).tolist()


# name -> (shape, time_dim) of a dense case, or a function of a generator giving packed segment lengths.
CASES = {
    # Time-major [T, B], B > 1: a thread per sequence, walked whole (T < kLaneChunkMinSteps = 1024).
    "time_major": ((37, 301), 0),
    "time_major_3d": ((5, 29, 3), 1),  # [O, T, I] = [5, 29, 3]: outer and inner dims around time
    # Time-major, T >= 1024 and at most 32768 sequences: chunks of kLaneChunk = 256 steps, 3 passes.
    "time_major_chunked": ((3000, 5), 0),
    "time_major_chunked_3d": ((2, 1100, 3), 1),
    # Batch-major [B, T] (time_dim=-1), T <= kShortRow = 64: a thread per row.
    "batch_major_short_rows": ((300, 50), -1),
    # Batch-major, 64 < T <= kWarpChunk = 2048: a warp per row, T not a multiple of the 128-step tile.
    "batch_major_warp_per_row": ((40, 700), -1),
    # Batch-major, T > 2048 and fewer than 8192 rows: global chunks crossing row boundaries.
    "batch_major_global_chunks": ((3, 5000), -1),
    # One 1-D sequence: global chunks.
    "single_sequence": ((9000,), 0),
    "packed_one_chunk": _packed_one_chunk,
    "packed_global_chunks": _packed_global_chunks,
    "packed_warp_per_seq": _packed_warp_per_seq,
    "packed_tiny_segments": _packed_tiny_segments,
}
DENSE_CASES = [name for name, spec in CASES.items() if not callable(spec)]

# Larger cases for the composition pass: more chunks than compose_kernel's 256 threads, so each thread
# composes a run of several chunk maps.
LONG_CASES = {
    "time_major_chunked_long": ((70000, 2), 0),  # 274 chunks per sequence
    "single_sequence_long": ((600_000,), 0),  # 293 global chunks
}

FLAGS = {
    "plain": (),
    "terminated": ("terminated",),
    "bootstrap": ("bootstrap_value",),
    "terminated_bootstrap_mask": ("terminated", "bootstrap_value", "mask"),
    "next_values": ("next_values",),
    "next_values_truncated": ("next_values", "truncated"),
    "mask_bootstrap": ("mask", "bootstrap_value"),
    "everything": ("next_values", "truncated", "terminated", "mask", "bootstrap_value"),
}
GRAD_FLAGS = ("plain", "terminated_bootstrap_mask", "next_values_truncated", "everything")

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ESTIMATORS = ("discounted_returns", "gae", "vtrace")
DIFFERENTIABLE = {
    "discounted_returns": ("rewards", "next_values", "bootstrap_value"),
    "gae": ("rewards", "values", "next_values", "bootstrap_value"),
    "vtrace": ("rewards", "values", "log_rhos", "next_values", "bootstrap_value"),
}

# Both backends read the same inputs and accumulate in float32 (float64 for float64), so outputs differ only
# by the order of float32 additions; gradients cast back to a 16-bit input dtype may differ by one ulp.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# assert_close's arguments for a CUDA output against the CPU one: the same dtype, rtol = TOL and atol = TOL times
# the largest finite |expected| (at least 1).
MATCH = {dtype: {"rtol": tol, "atol": tol, "same_dtype": True} for dtype, tol in TOL.items()}


def _seed(*key) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate("/".join(map(str, key)))) % 100_003


def make_inputs(case, dtype, flags, seed=0, cases=CASES):
    """Inputs of every estimator on CPU: rewards, values, log_rhos and the optional tensors in `flags`."""
    g = torch.Generator().manual_seed(seed)
    spec = cases[case]
    if callable(spec):
        lengths = spec(g)
        shape, time_dim = (sum(lengths),), 0
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        seq_shape = (len(lengths),)
    else:
        shape, time_dim = spec
        cu = None
        td = time_dim % len(shape)
        seq_shape = shape[:td] + shape[td + 1 :]

    def floats(scale=1.0):
        return (scale * torch.randn(shape, generator=g)).to(dtype)

    def flag(p):
        return torch.rand(shape, generator=g) < p

    return {
        "rewards": floats(),
        "values": floats(),
        "log_rhos": floats(0.5),
        "next_values": floats() if "next_values" in flags else None,
        "bootstrap_value": torch.randn(seq_shape, generator=g).to(dtype) if "bootstrap_value" in flags else None,
        "terminated": flag(0.05) if "terminated" in flags else None,
        "truncated": flag(0.03) if "truncated" in flags else None,
        "mask": flag(0.8) if "mask" in flags else None,
        "cu_seqlens": cu,
        "time_dim": time_dim,
    }


def resample(x, seed):
    """New values and flags of the same shapes as x; the same segments (cu_seqlens) and layout."""
    g = torch.Generator(device=x["rewards"].device).manual_seed(seed)
    out = dict(x)
    for key, value in x.items():
        if key == "cu_seqlens" or not isinstance(value, torch.Tensor):
            continue
        if value.dtype == torch.bool:
            rate = value.float().mean().clamp(0.02, 0.98)
            out[key] = torch.rand(value.shape, generator=g, device=value.device) < rate
        else:
            out[key] = torch.randn(value.shape, generator=g, device=value.device).to(value.dtype)
    return out


def to_cuda(inputs):
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def call(op, x, backend):
    """The public function `op` on inputs `x`; always a tuple of outputs."""
    common = {"gamma": 0.99, "terminated": x["terminated"], "truncated": x["truncated"],
              "next_values": x["next_values"], "bootstrap_value": x["bootstrap_value"], "mask": x["mask"],
              "cu_seqlens": x["cu_seqlens"], "time_dim": x["time_dim"], "backend": backend}
    if op == "discounted_returns":
        return (rlkernels.discounted_returns(x["rewards"], **common),)
    if op == "gae":
        return tuple(rlkernels.gae(x["rewards"], x["values"], lam=0.95, **common))
    if op == "vtrace":
        return tuple(rlkernels.vtrace(x["rewards"], x["values"], x["log_rhos"], lam=0.9, rho_clip=1.0, c_clip=0.9,
                                      pg_rho_clip=1.2, **common))
    raise KeyError(op)


def leaves(x, names):
    """Copies of x with the float tensors named in `names` (that are present) as leaves requiring grad."""
    out = dict(x)
    for name in names:
        if out.get(name) is not None:
            out[name] = out[name].detach().clone().requires_grad_(True)
    return out


def gradients(op, x, backend, seed=0):
    """Outputs and the gradients of sum_k <out_k, w_k> (random w) with respect to each differentiable input."""
    x = leaves(x, DIFFERENTIABLE[op])
    outs = call(op, x, backend)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    names = [n for n in DIFFERENTIABLE[op] if x.get(n) is not None]
    grads = torch.autograd.grad(loss, [x[n] for n in names])
    return outs, dict(zip(names, grads))


# ----------------------------------------------------------------------------------------------------
# Forward and gradients against the CPU backend
# ----------------------------------------------------------------------------------------------------


@needs_cuda("discounted_returns", "gae", "vtrace")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("op", ESTIMATORS)
def test_forward_matches_cpu(op, case, flags, dtype):
    x = make_inputs(case, dtype, FLAGS[flags], seed=_seed(op, case, flags))
    expected = call(op, x, "cpu")
    actual = call(op, to_cuda(x), "cuda")
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(a, e, **MATCH[e.dtype], device=DEVICE)


@needs_cuda("discounted_returns", "gae", "vtrace", "discounted_returns_backward", "gae_backward", "vtrace_backward")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("flags", GRAD_FLAGS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("op", ESTIMATORS)
def test_gradients_match_cpu(op, case, flags, dtype):
    x = make_inputs(case, dtype, FLAGS[flags], seed=_seed("grad", op, case, flags))
    _, expected = gradients(op, x, "cpu")
    _, actual = gradients(op, to_cuda(x), "cuda")
    assert expected.keys() == actual.keys() and "rewards" in actual
    for name in expected:
        assert_close(actual[name], expected[name], **MATCH[expected[name].dtype], device=DEVICE)


@needs_cuda("discounted_returns", "gae", "vtrace", "discounted_returns_backward", "gae_backward", "vtrace_backward")
@pytest.mark.parametrize("flags", ("plain", "everything"))
@pytest.mark.parametrize("case", LONG_CASES)
@pytest.mark.parametrize("op", ESTIMATORS)
def test_long_sequences_match_cpu(op, case, flags):
    x = make_inputs(case, torch.float32, FLAGS[flags], seed=_seed("long", op, case, flags), cases=LONG_CASES)
    outs_cpu, grads_cpu = gradients(op, x, "cpu")
    outs_cuda, grads_cuda = gradients(op, to_cuda(x), "cuda")
    for a, e in zip(outs_cuda, outs_cpu):
        assert_close(a, e, **MATCH[e.dtype], device=DEVICE)
    for name in grads_cpu:
        assert_close(grads_cuda[name], grads_cpu[name], **MATCH[grads_cpu[name].dtype], device=DEVICE)


@needs_cuda("linear_scan")
@pytest.mark.parametrize("with_initial", (False, True))
@pytest.mark.parametrize("reverse", (True, False))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DENSE_CASES + list(LONG_CASES))
def test_linear_scan_matches_cpu(case, dtype, reverse, with_initial):
    cases = {**CASES, **LONG_CASES}
    x = make_inputs(case, dtype, ("bootstrap_value",), seed=_seed("linear", case), cases=cases)
    g = torch.Generator().manual_seed(_seed("a", case))
    # |a| < 1 keeps long scans bounded, so the tolerance is meaningful everywhere.
    a = (0.98 * torch.rand(x["rewards"].shape, generator=g)).to(dtype)
    b, initial, time_dim = x["rewards"], x["bootstrap_value"] if with_initial else None, cases[case][1]

    def run(device, backend):
        leaves_ = [t.detach().to(device).requires_grad_(True) if t is not None else None for t in (a, b, initial)]
        out = rlkernels.linear_scan(leaves_[0], leaves_[1], reverse=reverse, initial=leaves_[2], time_dim=time_dim,
                                    backend=backend)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype).to(device)
        wrt = [t for t in leaves_ if t is not None]
        return out, torch.autograd.grad((out * w).sum(), wrt)

    out_cpu, grads_cpu = run("cpu", "cpu")
    out_cuda, grads_cuda = run(DEVICE, "cuda")
    assert_close(out_cuda, out_cpu, **MATCH[out_cpu.dtype], device=DEVICE)
    for a_, e_ in zip(grads_cuda, grads_cpu):
        assert_close(a_, e_, **MATCH[e_.dtype], device=DEVICE)


# ----------------------------------------------------------------------------------------------------
# The ops themselves, on canonical arguments: backward ops with absent upstream gradients, uint8 flags,
# int64 offsets, saved V-trace carries or not
# ----------------------------------------------------------------------------------------------------


def canonical_inputs(case, dtype, flags, seed):
    """Arguments in the ops' canonical layout: [O, T, I] contiguous or packed 1-D; uint8 flags."""
    x = make_inputs(case, dtype, flags, seed)
    if x["cu_seqlens"] is None:
        shape = x["rewards"].shape
        td = x["time_dim"] % len(shape)
        outer = 1
        for d in shape[:td]:
            outer *= d
        canon = (outer, shape[td], x["rewards"].numel() // max(1, outer * shape[td]))
        for name in ("rewards", "values", "log_rhos", "next_values", "terminated", "truncated", "mask"):
            if x[name] is not None:
                x[name] = x[name].reshape(canon).contiguous()
        if x["bootstrap_value"] is not None:
            x["bootstrap_value"] = x["bootstrap_value"].reshape(canon[0], canon[2])
    else:
        x["cu_seqlens"] = x["cu_seqlens"].to(torch.int64)
    for name in ("terminated", "truncated", "mask"):
        if x[name] is not None:
            x[name] = x[name].to(torch.uint8)
    g = torch.Generator().manual_seed(seed + 1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x["grad0"] = torch.randn(x["rewards"].shape, generator=g).to(acc)
    x["grad1"] = torch.randn(x["rewards"].shape, generator=g).to(acc)
    return x


class _TritonOps:
    """torch.ops.rlkernels with the Triton ops under the C++ names (same schemas): op_calls(x, TRITON_OPS)."""

    def __getattr__(self, name):
        return getattr(torch.ops.rlkernels, f"triton_{name}")


TRITON_OPS = _TritonOps()


def op_calls(x, ops=None):
    """Every op of the family on canonical arguments x, with its variants; name -> tuple of outputs. ``ops``:
    the op namespace (default torch.ops.rlkernels, whose kernels follow the tensors' device; TRITON_OPS for
    the Triton kernels)."""
    ops = torch.ops.rlkernels if ops is None else ops
    r, v, lr, nv, boot = x["rewards"], x["values"], x["log_rhos"], x["next_values"], x["bootstrap_value"]
    term, trunc, mask, cu, g0, g1 = x["terminated"], x["truncated"], x["mask"], x["cu_seqlens"], x["grad0"], x["grad1"]
    has_next, gamma, lam = nv is not None, 0.99, 0.95
    vt_args = (gamma, 0.9, 1.0, 0.9, 1.2)
    out = {
        "discounted_returns": (ops.discounted_returns(r, nv, boot, term, trunc, mask, cu, gamma),),
        "discounted_returns_backward": ops.discounted_returns_backward(g0, term, trunc, mask, cu, r, gamma, has_next),
        "discounted_returns_backward_no_grad": ops.discounted_returns_backward(None, term, trunc, mask, cu, r, gamma,
                                                                               has_next),
        "gae": ops.gae(r, v, nv, boot, term, trunc, mask, cu, gamma, lam),
        "gae_backward": ops.gae_backward(g0, g1, term, trunc, mask, cu, r, gamma, lam, has_next),
        "gae_backward_advantages_only": ops.gae_backward(g0, None, term, trunc, mask, cu, r, gamma, lam, has_next),
        "gae_backward_returns_only": ops.gae_backward(None, g1, term, trunc, mask, cu, r, gamma, lam, has_next),
    }
    vt = ops.vtrace(r, v, lr, nv, boot, term, trunc, mask, cu, *vt_args, True)
    out["vtrace"] = vt
    out["vtrace_unsaved"] = ops.vtrace(r, v, lr, nv, boot, term, trunc, mask, cu, *vt_args, False)
    out["vtrace_backward"] = ops.vtrace_backward(g0, g1, r, v, lr, nv, vt[2], vt[3], term, trunc, mask, cu, *vt_args)
    out["vtrace_backward_unsaved"] = ops.vtrace_backward(g0, None, r, v, lr, nv, None, None, term, trunc, mask, cu,
                                                         *vt_args)
    if cu is None:
        a = (0.98 * torch.rand(r.shape, generator=torch.Generator().manual_seed(1))).to(r.dtype).to(r.device)
        out["linear_scan_reverse"] = (ops.linear_scan(a, r, boot, True),)
        out["linear_scan_forward"] = (ops.linear_scan(a, r, boot, False),)
    return out


@needs_cuda()
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("flags", ("plain", "terminated_bootstrap_mask", "everything"))
@pytest.mark.parametrize("case", CASES)
def test_ops_match_cpu(case, flags, dtype):
    x = canonical_inputs(case, dtype, FLAGS[flags], seed=_seed("ops", case, flags))
    expected = op_calls(x)
    actual = op_calls(to_cuda(x))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert len(actual[name]) == len(expected[name]), name
        for a, e in zip(actual[name], expected[name]):
            assert_close(a, e, **MATCH[e.dtype], device=DEVICE)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs a CUDA device and triton")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("flags", ("plain", "terminated_bootstrap_mask", "everything"))
@pytest.mark.parametrize("case", CASES)
def test_triton_ops_match_cpu(case, flags, dtype):
    """The Triton backend on real hardware (CI runs it through the interpreter on CPU tensors only)."""
    import rlkernels.triton.returns  # noqa: F401  (registers the triton_* ops)

    x = canonical_inputs(case, dtype, FLAGS[flags], seed=_seed("ops", case, flags))
    expected = op_calls(x)
    actual = op_calls(to_cuda(x), TRITON_OPS)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert len(actual[name]) == len(expected[name]), name
        for a, e in zip(actual[name], expected[name]):
            assert_close(a, e, **MATCH[e.dtype], device=DEVICE)


@needs_cuda()
@pytest.mark.parametrize("case", ["time_major", "batch_major_warp_per_row", "packed_global_chunks"])
def test_ops_accept_int32_offsets_and_bool_flags(case):
    x = canonical_inputs(case, torch.float32, FLAGS["everything"], seed=5)
    y = dict(x)
    for name in ("terminated", "truncated", "mask"):
        y[name] = x[name].bool()
    if x["cu_seqlens"] is not None:
        y["cu_seqlens"] = x["cu_seqlens"].to(torch.int32)
    expected, actual = op_calls(x), op_calls(to_cuda(y))
    for name in expected:
        for a, e in zip(actual[name], expected[name]):
            assert_close(a, e, **MATCH[e.dtype], device=DEVICE)


def inject_non_finite(x, seed):
    """Inf rewards, +-Inf values, a NaN log-ratio and an Inf bootstrap value at random places."""
    g = torch.Generator().manual_seed(seed)
    n = x["rewards"].numel()
    if n == 0:
        return x
    x = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    at = torch.randint(0, n, (5,), generator=g).tolist()
    x["rewards"].view(-1)[at[0]] = float("inf")
    x["rewards"].view(-1)[at[1]] = -float("inf")
    x["values"].view(-1)[at[2]] = float("inf")
    x["values"].view(-1)[at[3]] = -float("inf")
    x["log_rhos"].view(-1)[at[4]] = float("nan")
    if x["bootstrap_value"] is not None and x["bootstrap_value"].numel() > 1:
        x["bootstrap_value"].view(-1)[1] = float("inf")
    return x


@needs_cuda()
@pytest.mark.parametrize("flags", ("terminated_bootstrap_mask", "next_values_truncated"))
@pytest.mark.parametrize("case", CASES)
def test_non_finite_inputs_propagate_like_cpu(case, flags):
    """Inf and NaN propagate as the sequential formula says, in every regime: where a non-finite carry would
    meet a chunk or tile map (0 * inf = NaN where the walk gives inf), the CUDA engine walks sequentially.
    These cases are short enough that the CPU walks them sequentially too."""
    x = canonical_inputs(case, torch.float32, FLAGS[flags], seed=_seed("inf", case, flags))
    x = inject_non_finite(x, seed=_seed("where", case, flags))
    expected, actual = op_calls(x), op_calls(to_cuda(x))
    for name in expected:
        for a, e in zip(actual[name], expected[name]):
            assert_close(a, e, **MATCH[e.dtype])


# ----------------------------------------------------------------------------------------------------
# Empty inputs and argument checks: the CPU ops' behaviour
# ----------------------------------------------------------------------------------------------------


@needs_cuda()
@pytest.mark.parametrize("shape_or_lengths", [(0, 3, 4), (2, 0, 3), (2, 3, 0), [], [0, 0, 0]], ids=str)
def test_empty_inputs_match_cpu(shape_or_lengths):
    if isinstance(shape_or_lengths, list):
        cu = torch.tensor([0, *itertools.accumulate(shape_or_lengths)], dtype=torch.int64)
        shape, boot_shape = (0,), (len(shape_or_lengths),)
    else:
        cu, shape = None, shape_or_lengths
        boot_shape = (shape[0], shape[2])
    x = {"rewards": torch.zeros(shape), "values": torch.zeros(shape), "log_rhos": torch.zeros(shape),
         "next_values": None, "bootstrap_value": torch.zeros(boot_shape), "terminated": None, "truncated": None,
         "mask": torch.zeros(shape, dtype=torch.uint8), "cu_seqlens": cu, "grad0": torch.zeros(shape),
         "grad1": torch.zeros(shape)}
    expected, actual = op_calls(x), op_calls(to_cuda(x))
    for name in expected:
        for a, e in zip(actual[name], expected[name]):
            assert a.shape == e.shape and a.dtype == e.dtype, name
            assert torch.equal(a.cpu(), e), name


def _bad_calls(x):
    """Calls that the CPU ops reject, each with a different bad argument."""
    ops = torch.ops.rlkernels
    r, v, cu = x["rewards"], x["values"], x["cu_seqlens"]
    flat = r.reshape(-1)
    return {
        "values shape": lambda: ops.gae(r, v[:, :-1], None, None, None, None, None, None, 0.99, 0.95),
        "values dtype": lambda: ops.gae(r, v.double(), None, None, None, None, None, None, 0.99, 0.95),
        "float flag": lambda: ops.gae(r, v, None, None, r, None, None, None, 0.99, 0.95),
        "flag shape": lambda: ops.discounted_returns(r, None, None, None, None, (r > 0)[:, 1:], None, 0.99),
        "integer rewards": lambda: ops.discounted_returns(r.long(), None, None, None, None, None, None, 0.99),
        "bootstrap shape": lambda: ops.gae(r, v, None, r[:, 0, :1], None, None, None, None, 0.99, 0.95),
        "not canonical": lambda: ops.gae(r[0], v[0], None, None, None, None, None, None, 0.99, 0.95),
        "float offsets": lambda: ops.discounted_returns(flat, None, None, None, None, None, cu.float(), 0.99),
        "2-D offsets": lambda: ops.discounted_returns(flat, None, None, None, None, None, cu[None], 0.99),
        "3-D with offsets": lambda: ops.discounted_returns(r, None, None, None, None, None, cu, 0.99),
        "initial shape": lambda: ops.linear_scan(v, r, r[:, 0, :1], True),
        "grad shape": lambda: ops.gae_backward(r[:, 1:], None, None, None, None, None, r, 0.99, 0.95, False),
    }


@needs_cuda()
def test_bad_arguments_raise_like_cpu():
    g = torch.Generator().manual_seed(0)
    x = {"rewards": torch.randn(2, 5, 3, generator=g), "values": torch.randn(2, 5, 3, generator=g),
         "cu_seqlens": torch.tensor([0, 10, 30])}
    cpu_calls, cuda_calls = _bad_calls(x), _bad_calls(to_cuda(x))
    for name in cpu_calls:
        with pytest.raises(Exception) as cpu_error:
            cpu_calls[name]()
        with pytest.raises(type(cpu_error.value)):
            cuda_calls[name]()


@needs_cuda("gae", "discounted_returns")
def test_mixed_devices_are_rejected():
    r = torch.randn(30, device="cuda")
    with pytest.raises(ValueError, match="cu_seqlens"):
        torch.ops.rlkernels.discounted_returns(r, None, None, None, None, None, torch.tensor([0, 10, 30]), 0.99)
    r3 = r.reshape(1, 30, 1)
    with pytest.raises(ValueError, match="values"):
        torch.ops.rlkernels.gae(r3, r3.cpu(), None, None, None, None, None, None, 0.99, 0.95)


# ----------------------------------------------------------------------------------------------------
# Determinism, opcheck, torch.compile, CUDA graphs
# ----------------------------------------------------------------------------------------------------


@needs_cuda()
@pytest.mark.parametrize("case", list(CASES) + list(LONG_CASES))
@pytest.mark.parametrize("op", ESTIMATORS)
def test_repeated_runs_are_bit_identical(op, case):
    cases = {**CASES, **LONG_CASES}
    x = to_cuda(make_inputs(case, torch.float32, FLAGS["everything"], seed=_seed("det", op, case), cases=cases))
    outs1, grads1 = gradients(op, x, "cuda")
    torch.cuda.synchronize()
    outs2, grads2 = gradients(op, x, "cuda")
    for a, b in zip(outs1, outs2):
        assert torch.equal(a, b)
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), name


def _opcheck_samples(case, requires_grad):
    x = to_cuda(canonical_inputs(case, torch.float32, FLAGS["everything"], seed=11))
    r, v, lr, nv, boot = x["rewards"], x["values"], x["log_rhos"], x["next_values"], x["bootstrap_value"]
    term, trunc, mask, cu, g0, g1 = x["terminated"], x["truncated"], x["mask"], x["cu_seqlens"], x["grad0"], x["grad1"]
    if requires_grad:
        r, v, lr, nv = (t.detach().clone().requires_grad_(True) for t in (r, v, lr, nv))
    vt = (0.99, 0.9, 1.0, 0.9, 1.2)
    saved = torch.ops.rlkernels.vtrace(r.detach(), v.detach(), lr.detach(), nv.detach(), boot, term, trunc, mask, cu,
                                       *vt, True)
    samples = {
        "discounted_returns": (r, nv, boot, term, trunc, mask, cu, 0.99),
        "discounted_returns_backward": (g0, term, trunc, mask, cu, r.detach(), 0.99, True),
        "gae": (r, v, nv, boot, term, trunc, mask, cu, 0.99, 0.95),
        "gae_backward": (g0, g1, term, trunc, mask, cu, r.detach(), 0.99, 0.95, True),
        "vtrace": (r, v, lr, nv, boot, term, trunc, mask, cu, *vt, requires_grad),
        "vtrace_backward": (g0, g1, r.detach(), v.detach(), lr.detach(), nv.detach(), saved[2], saved[3], term, trunc,
                            mask, cu, *vt),
    }
    if cu is None:
        a = torch.rand_like(r.detach()).mul_(0.9).requires_grad_(requires_grad)
        samples["linear_scan"] = (a, r, boot, True)
    return samples


@needs_cuda()
@pytest.mark.parametrize("requires_grad", (False, True))
@pytest.mark.parametrize("case", ["time_major", "time_major_chunked", "batch_major_warp_per_row", "packed_one_chunk"])
def test_opcheck(case, requires_grad):
    for name, args in _opcheck_samples(case, requires_grad).items():
        torch.library.opcheck(getattr(torch.ops.rlkernels, name).default, args)


@needs_cuda("discounted_returns", "gae", "vtrace", "discounted_returns_backward", "gae_backward", "vtrace_backward")
@pytest.mark.parametrize("case", ["time_major_chunked", "batch_major_global_chunks", "packed_global_chunks"])
def test_ops_compile_fullgraph(case):
    """The custom ops (fake kernels plus CUDA kernels) compile with no graph break, forward and backward."""
    torch._dynamo.reset()
    x = to_cuda(canonical_inputs(case, torch.float32, FLAGS["everything"], seed=13))
    r, v, lr, nv, boot = (x[k].detach().clone().requires_grad_(True)
                          for k in ("rewards", "values", "log_rhos", "next_values", "bootstrap_value"))
    term, trunc, mask, cu = x["terminated"], x["truncated"], x["mask"], x["cu_seqlens"]

    def f(r, v, lr, nv, boot):
        ops = torch.ops.rlkernels
        dr = ops.discounted_returns(r, nv, boot, term, trunc, mask, cu, 0.99)
        adv, ret = ops.gae(r, v, nv, boot, term, trunc, mask, cu, 0.99, 0.95)
        vs, pg, _, _ = ops.vtrace(r, v, lr, nv, boot, term, trunc, mask, cu, 0.99, 0.9, 1.0, 0.9, 1.2, True)
        return (dr * 1.5 + adv * 0.5 - ret + vs * 0.25 + pg).sum()

    eager = torch.autograd.grad(f(r, v, lr, nv, boot), (r, v, lr, nv))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(r, v, lr, nv, boot), (r, v, lr, nv))
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@needs_cuda("discounted_returns", "gae", "vtrace", "discounted_returns_backward", "gae_backward", "vtrace_backward")
@pytest.mark.parametrize("case", ["time_major", "batch_major_warp_per_row", "packed_global_chunks"])
@pytest.mark.parametrize("op", ESTIMATORS)
def test_public_functions_compile_fullgraph(op, case):
    """docs/design.md §2: torch.compile(fullgraph=True) of every public function, backend="cuda"."""
    torch._dynamo.reset()
    x = to_cuda(make_inputs(case, torch.float32, FLAGS["everything"], seed=_seed("compile", op, case)))
    _, eager = gradients(op, x, "cuda")
    compiled_call = torch.compile(lambda y: call(op, y, "cuda"), fullgraph=True)
    y = leaves(x, DIFFERENTIABLE[op])
    outs = compiled_call(y)
    w = torch.Generator().manual_seed(0)
    weights = [torch.randn(o.shape, generator=w, dtype=o.dtype).to(o.device) for o in outs]
    names = [n for n in DIFFERENTIABLE[op] if y.get(n) is not None]
    grads = torch.autograd.grad(sum((o * wt).sum() for o, wt in zip(outs, weights)), [y[n] for n in names])
    for name, grad in zip(names, grads):
        torch.testing.assert_close(grad, eager[name], rtol=1e-5, atol=1e-5)


@needs_cuda("discounted_returns", "gae", "vtrace", "discounted_returns_backward", "gae_backward", "vtrace_backward")
@pytest.mark.parametrize("case", ["time_major_chunked", "batch_major_warp_per_row", "single_sequence",
                                  "packed_global_chunks"])
@pytest.mark.parametrize("op", ESTIMATORS)
def test_cuda_graph_captures_forward_and_backward(op, case):
    """Forward plus backward replay from a CUDA graph: no host synchronization inside, and replays with new
    inputs give the eager results bit for bit (the same kernels run)."""
    first = to_cuda(make_inputs(case, torch.float32, FLAGS["everything"], seed=_seed("graph", op, case)))
    second = resample(first, seed=_seed("graph2", op, case))
    static = leaves(first, DIFFERENTIABLE[op])
    names = [n for n in DIFFERENTIABLE[op] if static.get(n) is not None]
    weights = [torch.randn_like(first["rewards"], dtype=torch.float32) for _ in range(2)]

    def step(x):
        outs = call(op, x, "cuda")
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        return outs, torch.autograd.grad(loss, [x[n] for n in names])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outs, static_grads = step(static)

    with torch.no_grad():
        for key, value in second.items():
            if isinstance(value, torch.Tensor) and key != "cu_seqlens":
                static[key].copy_(value)
    graph.replay()
    torch.cuda.synchronize()
    expected_outs, expected_grads = step(leaves(second, DIFFERENTIABLE[op]))
    for a, e in zip(static_outs, expected_outs):
        assert torch.equal(a, e)
    for a, e in zip(static_grads, expected_grads):
        assert torch.equal(a, e)


# ----------------------------------------------------------------------------------------------------
# 64-bit indexing
# ----------------------------------------------------------------------------------------------------


def _free_gib():
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


@pytest.mark.slow
@needs_cuda("linear_scan")
@pytest.mark.parametrize("layout", ["time_major", "single_sequence"])
def test_more_than_2_to_31_elements(layout):
    """x_t = 1 + x_{t+1} / 2 over tensors of more than 2^31 elements: the exact values 2 - 2^-(k) near each
    sequence's end (k = steps to the end) catch any 32-bit index wrap."""
    n = 2**31 + 4099
    if _free_gib() < 2 * n * 2 / 2**30 + n * 4 / 2**30 + 4:
        pytest.skip("not enough GPU memory")
    if layout == "time_major":
        steps = 3
        inner = -(-n // steps)
        shape, time_dim = (steps, inner), 0
    else:
        shape, time_dim = (n,), 0
    a = torch.full(shape, 0.5, dtype=torch.bfloat16, device="cuda")
    b = torch.ones(shape, dtype=torch.bfloat16, device="cuda")
    x = rlkernels.linear_scan(a, b, time_dim=time_dim, backend="cuda")
    del a, b
    assert x.dtype == torch.float32 and x.shape == shape
    if layout == "time_major":
        expected = torch.tensor([1.75, 1.5, 1.0], device="cuda")[:, None]
        for cols in (slice(0, 1000), slice(inner - 1000, inner), slice(2**30, 2**30 + 1000)):
            assert torch.equal(x[:, cols], expected.expand(3, 1000))
    else:
        k = torch.arange(1000, device="cuda", dtype=torch.float64)  # steps to the end
        tail = (2 - torch.pow(2.0, -k)).float().flip(0)
        assert torch.equal(x[n - 1000 :], tail)
        assert torch.equal(x[2**31 - 1000 : 2**31 + 1000], torch.full((2000,), 2.0, device="cuda"))


@needs_cuda("discounted_returns", "gae")
@pytest.mark.parametrize("layout", ["1-d", "batch-major"])
def test_non_finite_before_the_last_global_chunk(layout):
    """An Inf in a chunk feeding the *last* chunk in scan order: the composed carry entering that chunk may hold
    0 * inf = NaN (a truncation cuts the dependence), so it must be checked too (found in review: only the
    carries of earlier chunks were). 4096 steps are two global chunks; the reverse scan ends in [0, 2048)."""
    n = 4096
    g = torch.Generator().manual_seed(0)
    r, v, nv = (torch.randn(n, generator=g) for _ in range(3))
    r[3000] = float("inf")
    tr = torch.zeros(n, dtype=torch.bool)
    tr[2500] = True
    shape = (n,) if layout == "1-d" else (2, n)
    td = 0 if layout == "1-d" else -1
    r, v, nv, tr = (x.expand(shape).contiguous() if layout != "1-d" else x for x in (r, v, nv, tr))
    expected = rlkernels.discounted_returns(r, next_values=nv, truncated=tr, time_dim=td, backend="cpu")
    assert torch.isfinite(expected[..., :2501]).all()
    actual = rlkernels.discounted_returns(r.cuda(), next_values=nv.cuda(), truncated=tr.cuda(), time_dim=td,
                                          backend="cuda")
    assert_close(actual, expected, **MATCH[expected.dtype])
    for a, e in zip(rlkernels.gae(r.cuda(), v.cuda(), time_dim=td, backend="cuda"),
                    rlkernels.gae(r, v, time_dim=td, backend="cpu")):
        assert_close(a, e, **MATCH[e.dtype])
