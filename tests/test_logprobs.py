"""Tests of gather_logprobs (docs/design.md §4.3) on every backend: kernels, autograd, custom-op plumbing.

Oracles: `rlkernels.reference.gather_logprobs` (NumPy) and torch float64 log_softmax / gather / entropy on
the same (upcast) logits, so 16-bit inputs are compared without their input rounding and the tolerances
measure the kernel's accumulation alone; the GPU backends are also checked against the CPU backend. Tests
parameterized over `backend` (tests/conftest.py: backends) run Triton under the interpreter on CPU tensors
without a GPU, with small shapes because the interpreter is slow; the GPU-sized tests (gpu_backends) are
skipped without a CUDA device or without the ops' CUDA kernels (an rlkernels built without nvcc).
"""

import numpy as np
import pytest
import torch
from conftest import (
    DTYPES,
    GPU_GRAD_TOL,
    GPU_TOL,
    assert_close,
    backends,
    device_for,
    gpu_backends,
    randn,
    random_tokens,
    record_triton_grids,
    sample_inputs,
)
from hypothesis import given
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

import rlkernels
from rlkernels import reference

OPS = ("gather_logprobs", "gather_logprobs_backward", "gather_logprobs_backward_inplace")
# Tolerances (absolute atol: scale=1.0) of logp / entropy against float64 on the same logits: accumulation
# error only.
TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10, "scale": 1.0},
    torch.float32: {"atol": 5e-5, "rtol": 1e-5, "scale": 1.0},
    torch.bfloat16: {"atol": 5e-5, "rtol": 1e-5, "scale": 1.0},
    torch.float16: {"atol": 5e-5, "rtol": 1e-5, "scale": 1.0},
}
# Gradients are stored in the logits' dtype, so they carry its rounding.
GRAD_TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10, "scale": 1.0},
    torch.float32: {"atol": 1e-6, "rtol": 1e-5, "scale": 1.0},
    torch.bfloat16: {"atol": 2e-3, "rtol": 2e-2, "scale": 1.0},
    torch.float16: {"atol": 2e-4, "rtol": 2e-3, "scale": 1.0},
}
VOCABS = (1, 7, 1000, 32000, 151936)
DEVICE = "cuda"  # of the GPU-sized tests


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def torch_oracle(logits, tokens, temperature=1.0, ignore_index=None):
    """float64 log_softmax + gather and softmax-weighted entropy, with ignored rows set to 0."""
    z = logits.double() / temperature
    logsm = torch.log_softmax(z, -1)
    ignored = torch.zeros_like(tokens, dtype=torch.bool) if ignore_index is None else tokens == ignore_index
    safe = torch.where(ignored, 0, tokens)
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = logsm.exp()
    # log p zeroed where p = 0 before the product: where(p > 0, p * logsm, 0) would back-propagate 0 * -inf = NaN
    entropy = -(p * torch.where(p > 0, logsm, torch.zeros_like(logsm))).sum(-1)
    return torch.where(ignored, 0.0, logp), torch.where(ignored, 0.0, entropy)


# ----------------------------------------------------------------------------------------------------
# Forward against the oracles
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("V", [1, 7, 1000, 32000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_forward_matches_oracles(V, dtype, temperature):
    logits = randn((2, 3, V), dtype, scale=3.0)
    tokens = random_tokens((2, 3), V)
    logp, entropy = rlkernels.gather_logprobs(logits, tokens, temperature=temperature, return_entropy=True)
    assert logp.dtype == entropy.dtype == acc_dtype(dtype)
    assert logp.shape == entropy.shape == tokens.shape
    want_logp, want_entropy = torch_oracle(logits, tokens, temperature)
    assert_close(logp, want_logp, **TOL[dtype])
    assert_close(entropy, want_entropy, **TOL[dtype])
    ref_logp, ref_entropy = reference.gather_logprobs(
        logits.double().numpy(), tokens.numpy(), temperature=temperature, return_entropy=True
    )
    assert_close(logp, torch.from_numpy(ref_logp), **TOL[dtype])
    assert_close(entropy, torch.from_numpy(ref_entropy), **TOL[dtype])
    only_logp = rlkernels.gather_logprobs(logits, tokens, temperature=temperature)
    assert torch.equal(only_logp, logp)  # the entropy term does not change the logp path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_qwen_vocabulary(dtype):
    V = 151936
    logits = randn((3, V), dtype, scale=5.0)
    tokens = torch.tensor([0, V - 1, 12345])
    logp, entropy = rlkernels.gather_logprobs(logits, tokens, return_entropy=True)
    want_logp, want_entropy = torch_oracle(logits, tokens)
    assert_close(logp, want_logp, atol=2e-4, rtol=1e-5, scale=1.0)
    assert_close(entropy, want_entropy, atol=2e-4, rtol=1e-5, scale=1.0)


def test_extreme_logits():
    V = 300
    inf = float("inf")
    logits = randn((6, V), torch.float64, scale=3.0)
    logits[0] *= 1e4 / 3  # +-1e4: no overflow in exp(z - max)
    logits[1] = -1e4
    logits[1, 17] = 1e4
    logits[2, ::3] = -inf  # -inf entries weigh nothing, entropy stays finite
    logits[3] = -inf
    logits[3, 5] = 2.0  # all -inf except the target: logp = 0, entropy = 0
    logits[4] = -5.0  # all negative: logp must stay <= 0 (a running max started at 0 would break this)
    logits[5, :-1] = -inf  # only the last entry is live, and it sits in the last, ragged chunk
    tokens = torch.tensor([3, 17, 4, 5, 9, V - 1])
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        logp, entropy = rlkernels.gather_logprobs(x, tokens, return_entropy=True)
        ref_logp, ref_entropy = reference.gather_logprobs(
            x.double().numpy(), tokens.numpy(), return_entropy=True
        )
        assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
        assert (logp <= 0).all()
        assert_close(logp, torch.from_numpy(ref_logp), atol=1e-4, rtol=1e-6, scale=1.0)
        assert_close(entropy, torch.from_numpy(ref_entropy), atol=1e-4, rtol=1e-6, scale=1.0)
        assert logp[3] == 0 and entropy[3] == 0 and logp[5] == 0
        assert abs(float(logp[4]) + np.log(V)) < 1e-4


def test_all_minus_inf_row_is_nan():
    logits = torch.full((2, 10), float("-inf"))
    logits[1, 3] = 0.0
    logp, entropy = rlkernels.gather_logprobs(logits, torch.tensor([2, 3]), return_entropy=True)
    assert torch.isnan(logp[0]) and torch.isnan(entropy[0])
    assert logp[1] == 0 and entropy[1] == 0


def test_nan_logit_propagates():
    logits = randn((2, 50), torch.float32, scale=3.0)
    logits[0, 10] = float("nan")
    logp = rlkernels.gather_logprobs(logits, torch.tensor([1, 1]))
    assert torch.isnan(logp[0]) and torch.isfinite(logp[1])


def chunked_rows(dtype):
    """Rows of 5000 logits that take each way through the CPU kernels' chunked fold (2048-logit chunks in the
    SIMD kernels, csrc/cpu/logprobs_simd.h): the first chunk in two passes, later ones in one against the running
    max; a later max within the fold's slack (32) of it, beyond it (that chunk folded again), a max rising by more
    than the slack in every chunk; +inf; NaN and -inf filling whole chunks (and whole blocks or vectors of the
    other kernels); after a positive running max, later chunks with no logit >= +0, with a NaN of either sign and
    with +inf inside, and a chunk whose max is +0."""
    V = 5000
    inf, nan = float("inf"), float("nan")
    x = randn((14, V), torch.float64, scale=2.0, seed=11)
    x[1, 4500] = 25.0  # the max arrives in the third chunk, within the slack
    x[2, 3000] = 90.0  # ... beyond it
    x[3] = torch.linspace(-300.0, 30.0, V, dtype=torch.float64)  # every chunk passes the last by > 32
    x[4, :2048] = -inf  # a first chunk that weighs nothing: the second starts the running max
    x[5, 2048:4096] = nan  # a whole chunk of NaN after a finite one: NaN
    x[6, :2048] = nan  # ... before one
    x[7, 4999] = inf  # +inf in the ragged end: lse = +inf
    x[8, :] = -inf
    x[8, 4096:4100] = 1.0  # only the last chunk is live
    x[9, :2048] = -80.0  # a low first chunk, then the rest 80 above it (folded again, then one pass)
    x[10, 2048:] = -x[10, 2048:].abs() - 0.5  # a positive running max, then chunks of negative logits only
    x[11, 3000:3002] = nan  # NaNs in a later chunk, the first with its sign bit set (x86's default NaN): NaN
    x[12, 2048:] = -x[12, 2048:].abs()
    x[12, 3000] = 0.0  # a later chunk's max is +0
    x[12, 4500] = inf  # +inf inside a later chunk: lse = +inf
    x[13, 2048:4096] = nan  # a chunk of sign-bit NaNs after a finite one
    tokens = torch.tensor([7, 4500, 3000, V - 1, 2500, 1, 3000, 10, 4097, 4000, 2100, 3002, 3000, 10])
    y = x.to(dtype)
    # the sign bit set on the bits (converting or negating a NaN need not keep its sign)
    bits = y.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[y.element_size()])
    sign = torch.tensor(1, dtype=bits.dtype) << (8 * y.element_size() - 1)
    bits[11, 3000] |= sign
    bits[13, 2048:4096] |= sign
    assert torch.signbit(y[11, 3000]) and torch.isnan(y[11, 3000]) and torch.signbit(y[13, 2048:4096]).all()
    return y, tokens


def check_chunked_rows(dtype, temperature, backend="cpu"):
    device = device_for(backend)
    x, tokens = chunked_rows(dtype)
    logp, entropy = rlkernels.gather_logprobs(
        x.to(device), tokens.to(device), temperature=temperature, return_entropy=True, backend=backend
    )
    logp, entropy = logp.cpu(), entropy.cpu()
    want_logp, want_entropy = reference.gather_logprobs(
        x.double().numpy(), tokens.numpy(), temperature=temperature, return_entropy=True
    )
    want_logp, want_entropy = torch.from_numpy(want_logp).to(logp.dtype), torch.from_numpy(want_entropy).to(logp.dtype)
    # NaN, -inf and +inf where the reference has them, the finite values to the rounding of the rows' sums
    assert torch.equal(torch.isnan(logp), torch.isnan(want_logp)), (logp, want_logp)
    assert torch.equal(torch.isnan(entropy), torch.isnan(want_entropy)), (entropy, want_entropy)
    assert torch.isnan(logp[5]) and torch.isnan(logp[6])
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 2e-5}
    assert_close(logp, want_logp, name="logp", **tol)
    assert_close(entropy, want_entropy, name="entropy", **tol)
    # the same rows without entropy take the kernels' other loops
    alone = rlkernels.gather_logprobs(x.to(device), tokens.to(device), temperature=temperature, backend=backend)
    assert_close(alone.cpu(), logp, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", backends(*OPS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_rows(dtype, backend):
    check_chunked_rows(dtype, 0.8 if dtype == torch.float16 else 1.0, backend)


@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_ignore_index(ignore_index):
    V = 40
    logits = randn((4, 5, V), torch.float32, scale=3.0)
    tokens = random_tokens((4, 5), V)
    tokens[0, 1] = ignore_index
    tokens[2, :] = ignore_index
    logp, entropy = rlkernels.gather_logprobs(logits, tokens, return_entropy=True, ignore_index=ignore_index)
    want_logp, want_entropy = torch_oracle(logits, tokens, ignore_index=ignore_index)
    assert_close(logp, want_logp, **TOL[torch.float32])
    assert_close(entropy, want_entropy, **TOL[torch.float32])
    ignored = tokens == ignore_index
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all()
    x = logits.clone().requires_grad_()
    lp, h = rlkernels.gather_logprobs(x, tokens, return_entropy=True, ignore_index=ignore_index)
    (lp.sum() + h.sum()).backward()
    assert (x.grad[ignored] == 0).all()
    assert (x.grad[~ignored].abs().sum(-1) > 0).all()


def test_leading_dims_and_token_dtypes():
    V = 33
    logits = randn((2, 3, 4, V), torch.float32, scale=3.0)
    tokens = random_tokens((2, 3, 4), V)
    want = rlkernels.gather_logprobs(logits.reshape(-1, V), tokens.reshape(-1)).reshape(2, 3, 4)
    for tok in (tokens, tokens.to(torch.int32), tokens.to(torch.uint8)):
        assert torch.equal(rlkernels.gather_logprobs(logits, tok), want)
    one = rlkernels.gather_logprobs(logits[0, 0, 0], tokens[0, 0, 0])  # logits [V], tokens 0-d
    assert one.shape == () and one == want[0, 0, 0]


def test_non_contiguous_logits():
    V = 1000
    base = randn((6, 2 * V + 3), torch.float32, scale=3.0)
    tokens = random_tokens((6,), V)
    sliced = base[:, 3 : V + 3]  # row stride 2V + 3: read in place
    strided = base[:, 1 : 2 * V + 1 : 2]  # stride 2 along V
    transposed = randn((V, 6), torch.float32, scale=3.0).t()
    for logits in (sliced, strided, transposed):
        assert not logits.is_contiguous()
        logp, entropy = rlkernels.gather_logprobs(logits, tokens, return_entropy=True)
        want_logp, want_entropy = torch_oracle(logits, tokens)
        assert_close(logp, want_logp, **TOL[torch.float32])
        assert_close(entropy, want_entropy, **TOL[torch.float32])
        x = logits.detach().clone().requires_grad_()
        rlkernels.gather_logprobs(x, tokens).sum().backward()
        y = logits.detach().double().requires_grad_()
        torch_oracle(y, tokens)[0].sum().backward()
        assert_close(x.grad, y.grad, **GRAD_TOL[torch.float32])


def test_empty_inputs():
    logp, entropy = rlkernels.gather_logprobs(
        torch.zeros(0, 7), torch.zeros(0, dtype=torch.long), return_entropy=True
    )
    assert logp.shape == entropy.shape == (0,)
    x = torch.zeros(2, 0, 5, requires_grad=True)
    out = rlkernels.gather_logprobs(x, torch.zeros(2, 0, dtype=torch.long))
    out.sum().backward()
    assert out.shape == (2, 0) and x.grad.shape == x.shape
    # V = 0: only ignored rows are valid.
    empty_vocab = torch.zeros(2, 3, 0)
    ignored = torch.full((2, 3), -100)
    assert (rlkernels.gather_logprobs(empty_vocab, ignored, ignore_index=-100) == 0).all()
    with pytest.raises(ValueError, match="tokens"):
        rlkernels.gather_logprobs(empty_vocab, torch.zeros(2, 3, dtype=torch.long))


def test_deterministic():
    logits = randn((16, 5000), torch.float32, scale=3.0)
    tokens = random_tokens((16,), 5000)
    a = rlkernels.gather_logprobs(logits, tokens, return_entropy=True)
    b = rlkernels.gather_logprobs(logits, tokens, return_entropy=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["logp", "entropy", "both"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_gradcheck(which, temperature):
    V = 11
    logits = randn((2, 3, V), torch.float64, scale=1.5).requires_grad_()
    tokens = random_tokens((2, 3), V)
    tokens[1, 2] = -1

    def f(x):
        logp, entropy = rlkernels.gather_logprobs(
            x, tokens, temperature=temperature, return_entropy=True, ignore_index=-1
        )
        return {"logp": (logp,), "entropy": (entropy,), "both": (logp, entropy)}[which]

    assert torch.autograd.gradcheck(f, (logits,))


def test_gradcheck_with_minus_inf_entries():
    logits = randn((3, 9), torch.float64, scale=3.0)
    logits[:, ::2] = float("-inf")
    logits = logits.requires_grad_()
    tokens = torch.tensor([1, 3, 5])
    assert torch.autograd.gradcheck(
        lambda x: rlkernels.gather_logprobs(x, tokens, return_entropy=True), (logits,)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [7, 1000])
def test_backward_matches_torch(dtype, V):
    logits = randn((5, V), dtype, scale=3.0)
    tokens = random_tokens((5,), V)
    g_logp, g_entropy = (
        randn((5,), torch.float64, seed=3, scale=3.0),
        randn((5,), torch.float64, seed=4, scale=3.0),
    )
    x = logits.clone().requires_grad_()
    logp, entropy = rlkernels.gather_logprobs(x, tokens, temperature=0.8, return_entropy=True)
    (logp * g_logp.to(logp.dtype) + entropy * g_entropy.to(logp.dtype)).sum().backward()
    assert x.grad.dtype == dtype
    y = logits.double().requires_grad_()
    want_logp, want_entropy = torch_oracle(y, tokens, 0.8)
    (want_logp * g_logp + want_entropy * g_entropy).sum().backward()
    assert_close(x.grad, y.grad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("return_entropy", [False, True])
def test_inplace_backward(return_entropy):
    logits = randn((4, 300), torch.float32, scale=3.0)
    tokens = random_tokens((4,), 300)

    def grad(inplace):
        x = logits.clone().requires_grad_()
        h = x * 1.0  # the op's input, a non-leaf whose storage the inplace backward reuses
        out = rlkernels.gather_logprobs(h, tokens, return_entropy=return_entropy, inplace_backward=inplace)
        loss = (out[0] - 0.5 * out[1]).sum() if return_entropy else out.sum()
        loss.backward()
        return x.grad, h

    want, h_kept = grad(False)
    got, h_destroyed = grad(True)
    assert_close(got, want, **GRAD_TOL[torch.float32])
    assert torch.equal(h_kept, logits)
    assert torch.equal(h_destroyed, got)  # documented: the logits' storage now holds the gradient


# ----------------------------------------------------------------------------------------------------
# Memory: the forward allocates nothing of the logits' size
# ----------------------------------------------------------------------------------------------------


def _largest_allocation(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_allocates_no_logits_sized_tensor(dtype):
    logits = randn((64, 4000), dtype, scale=3.0)
    tokens = random_tokens((64,), 4000)
    # The probe sees the allocations of the eager baseline, so it can fail.
    assert (
        _largest_allocation(lambda: torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None]))
        >= logits.numel() * 4
    )
    largest = _largest_allocation(lambda: rlkernels.gather_logprobs(logits, tokens, return_entropy=True))
    assert 0 < largest <= 64 * 8 * 4  # the per-row outputs only


# ----------------------------------------------------------------------------------------------------
# Custom-op plumbing: opcheck, torch.compile
# ----------------------------------------------------------------------------------------------------


def _op_args(dtype=torch.float32, requires_grad=False, return_entropy=True, ignore_index=-1):
    logits = randn((6, 37), dtype, scale=3.0).requires_grad_(requires_grad)
    tokens = random_tokens((6,), 37)
    tokens[2] = -1
    return logits, tokens, 0.9, return_entropy, ignore_index, False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("return_entropy", [False, True])
def test_opcheck_forward(dtype, requires_grad, return_entropy):
    torch.library.opcheck(
        torch.ops.rlkernels.gather_logprobs.default, _op_args(dtype, requires_grad, return_entropy)
    )


def test_opcheck_backward():
    logits, tokens, temperature, _, ignore_index, _ = _op_args()
    logp, entropy, lse = torch.ops.rlkernels.gather_logprobs(
        logits, tokens, temperature, True, ignore_index, False
    )
    g = torch.randn(6)
    torch.library.opcheck(
        torch.ops.rlkernels.gather_logprobs_backward.default,
        (g, g.flip(0), logits, tokens, lse, entropy, temperature, ignore_index),
    )
    torch.library.opcheck(
        torch.ops.rlkernels.gather_logprobs_backward.default,
        (g, None, logits, tokens.clamp(min=0), lse, entropy, temperature, None),  # (no ignored row: in range)
    )
    torch.library.opcheck(
        torch.ops.rlkernels.gather_logprobs_backward_inplace.default,
        (g, g, logits.clone(), tokens, lse, entropy, temperature, ignore_index),
    )


def test_torch_compile_fullgraph():
    logits = randn((2, 5, 50), torch.float32, scale=3.0)
    tokens = random_tokens((2, 5), 50)

    def loss_fn(x, t):
        logp, entropy = rlkernels.gather_logprobs(x, t, temperature=0.7, return_entropy=True, ignore_index=0)
        return (logp - 0.1 * entropy).sum()

    x_eager = logits.clone().requires_grad_()
    want = loss_fn(x_eager, tokens)
    want.backward()
    x = logits.clone().requires_grad_()
    got = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x, tokens)
    got.backward()
    assert_close(got, want, atol=1e-6, rtol=1e-6, scale=1.0)
    assert_close(x.grad, x_eager.grad, atol=1e-7, rtol=1e-6, scale=1.0)


# ----------------------------------------------------------------------------------------------------
# Bad inputs: the error names the argument
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"tokens": torch.tensor([0, 10])}, ValueError, "tokens"),
        ({"tokens": torch.tensor([0, -1])}, ValueError, "tokens"),
        ({"tokens": torch.tensor([0, -100]), "ignore_index": -99}, ValueError, "tokens"),
        ({"tokens": torch.tensor([0.0, 1.0])}, TypeError, "tokens"),
        ({"tokens": torch.tensor([0, 1, 2])}, ValueError, "tokens"),
        ({"tokens": [0, 1]}, TypeError, "tokens"),
        ({"logits": torch.zeros(2, 10, dtype=torch.long)}, TypeError, "logits"),
        ({"logits": torch.tensor(1.0)}, ValueError, "logits"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": float("inf")}, ValueError, "temperature"),
        ({"temperature": True}, TypeError, "temperature"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index"),
        ({"backend": "cuda"}, RuntimeError, "cuda"),
        ({"backend": "nope"}, RuntimeError, "unknown backend"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    args = {"logits": torch.zeros(2, 10), "tokens": torch.tensor([0, 1])}
    args.update(kwargs)
    logits, tokens = args.pop("logits"), args.pop("tokens")
    with pytest.raises(error, match=match):
        rlkernels.gather_logprobs(logits, tokens, **args)


def test_out_of_range_token_error_is_exact():
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 10\).*got 10"):
        rlkernels.gather_logprobs(torch.zeros(3, 10), torch.tensor([1, 10, 2]))


def test_reference_backend():
    logits = randn((3, 20), torch.float32, scale=3.0)
    tokens = random_tokens((3,), 20)
    got = rlkernels.gather_logprobs(logits, tokens, return_entropy=True, backend="reference")
    want = rlkernels.gather_logprobs(logits, tokens, return_entropy=True)
    assert_close(got[0], want[0], **TOL[torch.float32])
    assert_close(got[1], want[1], **TOL[torch.float32])


# ----------------------------------------------------------------------------------------------------
# Property-based: random shapes, scales, temperatures, -inf entries, ignored rows, all dtypes
# ----------------------------------------------------------------------------------------------------


@given(
    N=st.integers(0, 9),
    V=st.integers(1, 3000),
    dtype=st.sampled_from(DTYPES),
    temperature=st.sampled_from([1.0, 0.3, 1.7, 50.0]),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    p_neg_inf=st.sampled_from([0.0, 0.3]),
    ignore=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_forward_backward(N, V, dtype, temperature, scale, p_neg_inf, ignore, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    tokens = torch.randint(0, V, (N,), generator=g)
    # -inf entries anywhere but at the target (a -inf target gives logp = -inf, tested elsewhere)
    neg = torch.rand(N, V, generator=g) < p_neg_inf
    neg[torch.arange(N), tokens] = False
    logits = logits.masked_fill(neg, -torch.inf).to(dtype)
    ignore_index = -100 if ignore else None
    if ignore and N:
        tokens[torch.rand(N, generator=g) < 0.3] = -100
    x = logits.clone().requires_grad_()
    logp, entropy = rlkernels.gather_logprobs(
        x, tokens, temperature=temperature, return_entropy=True, ignore_index=ignore_index
    )
    assert logp.dtype == acc_dtype(dtype) and entropy.dtype == acc_dtype(dtype)
    want_logp, want_entropy = torch_oracle(logits, tokens, temperature, ignore_index)
    # |logp| and the entropy grow with the logits' spread: the tolerance is relative to their size
    atol, rtol = TOL[dtype]["atol"], TOL[dtype]["rtol"]
    size = max(1.0, float(want_logp.abs().max()) if N else 1.0)
    assert_close(logp, want_logp, atol=atol * size, rtol=rtol, scale=1.0)
    assert_close(entropy, want_entropy, atol=atol * size, rtol=rtol, scale=1.0)
    ref = reference.gather_logprobs(
        logits, tokens, temperature=temperature, return_entropy=True, ignore_index=ignore_index
    )
    assert_close(logp, torch.as_tensor(ref[0]), atol=atol * size, rtol=rtol, scale=1.0)
    # backward of both outputs against torch float64 autograd on the same logits
    g_logp = torch.randn(N, generator=g, dtype=torch.float64)
    g_ent = torch.randn(N, generator=g, dtype=torch.float64)
    (logp * g_logp.to(logp.dtype) + entropy * g_ent.to(logp.dtype)).sum().backward()
    y = logits.double().requires_grad_()
    wl, we = torch_oracle(y, tokens, temperature, ignore_index)
    (wl * g_logp + we * g_ent).sum().backward()
    assert x.grad.dtype == dtype
    gatol, grtol = GRAD_TOL[dtype]["atol"], GRAD_TOL[dtype]["rtol"]
    gsize = max(1.0, float(y.grad.abs().max()) if N else 1.0)
    # In float32 the logsumexp carries an absolute error of about eps |z|, which p = exp(z - lse) turns into a
    # relative one: the tolerance grows with the largest |z| (FMA or not changes which rounding one sees).
    finite = (logits.double() / temperature)[torch.isfinite(logits)]
    zscale = (
        1.0 if dtype == torch.float64 or finite.numel() == 0 else max(1.0, float(finite.abs().max()) / 10)
    )
    assert_close(x.grad, y.grad, atol=gatol * gsize * zscale, rtol=grtol * zscale, scale=1.0)


# ----------------------------------------------------------------------------------------------------
# The other backends against the CPU backend and the oracles, on small shapes (Triton under the interpreter)
# ----------------------------------------------------------------------------------------------------

GPU_OR_TRITON = backends(*OPS, include=("triton", "cuda"))


def _small_blocks(backend, monkeypatch):
    """The Triton kernel with 64-entry blocks: several blocks per row, and a ragged last one."""
    if backend == "triton":
        from rlkernels.triton import logprobs as triton_logprobs

        monkeypatch.setattr(triton_logprobs, "BLOCK_V", 64)


@pytest.mark.parametrize("backend", GPU_OR_TRITON)
@pytest.mark.parametrize("V", [1, 7, 100, 1500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_backend_matches_cpu(V, dtype, backend, monkeypatch):
    _small_blocks(backend, monkeypatch)
    device = device_for(backend)
    logits, tokens = sample_inputs("gather_logprobs", (2, 3, V), dtype=dtype)
    logits[0, 0, ::5] = float("-inf")
    tokens[1, 1] = -100
    kw = {"temperature": 0.7, "return_entropy": True, "ignore_index": -100}
    x_t = logits.clone().to(device).requires_grad_()
    x_c = logits.clone().requires_grad_()
    got = rlkernels.gather_logprobs(x_t, tokens.to(device), backend=backend, **kw)
    want = rlkernels.gather_logprobs(x_c, tokens, backend="cpu", **kw)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert_close(g, w, **TOL[dtype], device=device)
    (got[0] + 0.3 * got[1]).sum().backward()
    (want[0] + 0.3 * want[1]).sum().backward()
    assert x_t.grad.dtype == dtype
    assert_close(x_t.grad, x_c.grad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", GPU_OR_TRITON)
def test_backend_extremes_and_inplace(backend):
    device = device_for(backend)
    logits = randn((4, 40), torch.float32, scale=3.0)
    logits[0] *= 1e4 / 3
    logits[1] = float("-inf")
    logits[1, 7] = 1.0
    logits[2] = float("-inf")
    tokens = torch.tensor([3, 7, 0, 39])
    logp, entropy = rlkernels.gather_logprobs(
        logits.to(device), tokens.to(device), return_entropy=True, backend=backend
    )
    ref_logp, ref_entropy = reference.gather_logprobs(
        logits.double().numpy(), tokens.numpy(), return_entropy=True
    )
    assert_close(logp, torch.from_numpy(ref_logp), atol=1e-4, rtol=1e-6, scale=1.0)
    assert_close(entropy, torch.from_numpy(ref_entropy), atol=1e-4, rtol=1e-6, scale=1.0)
    live = logits[[0, 1, 3]].to(device)
    t = tokens[[0, 1, 3]].to(device)
    grads = []
    for inplace in (False, True):
        x = live.clone().requires_grad_()
        h = x * 1.0
        rlkernels.gather_logprobs(h, t, backend=backend, inplace_backward=inplace).sum().backward()
        grads.append(x.grad)
    assert_close(grads[1], grads[0], atol=1e-7, rtol=1e-6, scale=1.0)


@pytest.mark.parametrize("backend", GPU_OR_TRITON)
def test_backend_bad_tokens_give_nan_or_raise(backend):
    device = device_for(backend)
    logits = randn((3, 10), torch.float32, scale=3.0, device=device)
    tokens = torch.tensor([1, 10, -3], device=device)
    logp = rlkernels.gather_logprobs(logits, tokens, backend=backend).cpu()
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1:]).all()
    with pytest.raises(ValueError, match="tokens"):
        rlkernels.gather_logprobs(logits, tokens, backend=backend, check_tokens=True)


@pytest.mark.parametrize("backend", GPU_OR_TRITON)
def test_backend_gradcheck_and_compile(backend):
    device = device_for(backend)
    logits = randn((3, 9), torch.float64, scale=3.0, device=device).requires_grad_()
    tokens = torch.tensor([1, -1, 8], device=device)
    f = lambda x: rlkernels.gather_logprobs(
        x, tokens, temperature=0.5, return_entropy=True, ignore_index=-1, backend=backend
    )
    assert torch.autograd.gradcheck(f, (logits,))
    x = logits.detach().float()
    got = torch.compile(lambda x: f(x)[0], fullgraph=True, backend="aot_eager")(x)
    assert_close(got, f(x)[0], atol=1e-6, rtol=1e-6, scale=1.0)


# ----------------------------------------------------------------------------------------------------
# GPU-sized tests: each GPU backend against the CPU backend and the oracles
# ----------------------------------------------------------------------------------------------------


def rows_for(V):
    return 3 if V >= 32000 else 37  # 37 rows: several warp-per-row blocks, one partly filled


def run_logprobs(logits, tokens, backend, grads=None, **kw):
    """(logp, entropy, d logits) of one backend; grads = (g_logp, g_entropy) or None for no backward."""
    x = logits.detach().clone().requires_grad_(grads is not None)
    logp, ent = rlkernels.gather_logprobs(x, tokens, return_entropy=True, backend=backend, **kw)
    grad = None
    if grads is not None:
        torch.autograd.backward((logp, ent), grads)
        grad = x.grad
    return logp, ent, grad


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", VOCABS)
def test_logprobs_forward_matches_cpu_and_oracle(V, dtype, temperature, ignore, backend):
    N = rows_for(V)
    logits = randn((N, V), dtype, seed=V, scale=3.0)
    tokens = random_tokens((N,), V, seed=V + 1)
    ignore_index = None
    if ignore:
        ignore_index = -100
        tokens[::4] = -100
    kw = {"temperature": temperature, "ignore_index": ignore_index}
    for return_entropy in (False, True):
        out = rlkernels.gather_logprobs(
            logits.to(DEVICE), tokens.to(DEVICE), return_entropy=return_entropy, backend=backend, **kw
        )
        ref = rlkernels.gather_logprobs(logits, tokens, return_entropy=return_entropy, backend="cpu", **kw)
        if not return_entropy:
            out, ref = (out,), (ref,)
        for a, e, name in zip(out, ref, ("logp", "entropy")):
            assert a.device.type == "cuda" and a.dtype == acc_dtype(dtype) and a.shape == tokens.shape
            assert_close(a, e, **GPU_TOL[dtype], name=name)
    logp, ent = rlkernels.gather_logprobs(
        logits.to(DEVICE), tokens.to(DEVICE), return_entropy=True, backend=backend, **kw
    )
    exp_logp, exp_ent = torch_oracle(logits, tokens, **kw)
    assert_close(logp, exp_logp, **GPU_TOL[dtype], name="logp vs float64 torch")
    assert_close(ent, exp_ent, **GPU_TOL[dtype], name="entropy vs float64 torch")
    if ignore:
        assert torch.all(logp.cpu()[::4] == 0) and torch.all(ent.cpu()[::4] == 0)
    if V <= 1000:
        np_logp, np_ent = reference.gather_logprobs(
            logits, tokens, temperature=temperature, return_entropy=True, ignore_index=ignore_index
        )
        assert_close(logp, torch.as_tensor(np_logp), **GPU_TOL[dtype], name="logp vs reference")
        assert_close(ent, torch.as_tensor(np_ent), **GPU_TOL[dtype], name="entropy vs reference")


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_logprobs_leading_dims_and_strided_rows(dtype, backend):
    """[B, T, V] input, and row views whose starts are not 16-byte aligned (the scalar head/tail paths)."""
    base = randn((4, 5, 1003), dtype, seed=3, scale=3.0)
    for logits in (base, base[..., 3:], base[:, 1:, 1:-1], base[::2, :, 5:900]):
        tokens = random_tokens(logits.shape[:-1], logits.shape[-1], seed=4)
        a = rlkernels.gather_logprobs(
            logits.to(DEVICE), tokens.to(DEVICE), return_entropy=True, backend=backend
        )
        e = rlkernels.gather_logprobs(logits, tokens, return_entropy=True, backend="cpu")
        for x, y in zip(a, e):
            assert_close(x, y, **GPU_TOL[dtype])


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
@pytest.mark.parametrize("V", [7, 1000, 32000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logprobs_extreme_logits(V, dtype, backend):
    inf = float("inf")
    logits = randn((7, V), dtype, seed=5, scale=3.0)
    logits[0] *= 1e4 / 3  # +-1e4: no overflow in exp(z - max)
    logits[1] = -1e4
    logits[1, V // 2] = 1e4
    logits[2, ::3] = -inf  # -inf entries weigh nothing, entropy stays finite
    logits[3] = -inf
    logits[3, 5 % V] = 2.0  # all -inf except one entry
    logits[4] = -inf  # all -inf: NaN, as on CPU
    logits[5, : V - 1] = -inf  # only the last entry is live, in the ragged tail
    logits[6] = -50.0  # all negative: the running max must start at -inf, not 0
    tokens = torch.tensor([0, V // 2, 1, 5 % V, 0, V - 1, 3 % V])
    a = rlkernels.gather_logprobs(logits.to(DEVICE), tokens.to(DEVICE), return_entropy=True, backend=backend)
    e = rlkernels.gather_logprobs(logits, tokens, return_entropy=True, backend="cpu")
    for x, y, name in zip(a, e, ("logp", "entropy")):
        assert_close(x, y, **GPU_TOL[dtype], name=name)
    logp = a[0].cpu()
    assert torch.isnan(logp[4])
    assert logp[3] == 0 and logp[5] == 0
    assert abs(float(logp[6]) + torch.log(torch.tensor(float(V), dtype=torch.float64))) < 1e-4
    assert torch.all(logp[~torch.isnan(logp)] <= 0)


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
def test_logprobs_nan_and_out_of_range_tokens(backend):
    logits = randn((4, 1000), torch.float32, seed=6, scale=3.0)
    logits[1, 10] = float("nan")
    tokens = torch.tensor([3, 4, 1000, -5])
    logp, ent = rlkernels.gather_logprobs(
        logits.to(DEVICE), tokens.to(DEVICE), return_entropy=True, backend=backend
    )
    logp = logp.cpu()
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1]) and torch.isnan(ent.cpu()[1])
    assert torch.isnan(logp[2]) and torch.isnan(logp[3])  # docs/design.md §4.3: NaN on GPU, no crash
    with pytest.raises(ValueError, match="tokens"):
        rlkernels.gather_logprobs(logits.to(DEVICE), tokens.to(DEVICE), check_tokens=True, backend=backend)


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", VOCABS)
def test_logprobs_gradients_match_cpu(V, dtype, ignore, backend):
    N = rows_for(V)
    logits = randn((N, V), dtype, seed=V + 7, scale=3.0)
    tokens = random_tokens((N,), V, seed=V + 8)
    ignore_index = -1 if ignore else None
    if ignore:
        tokens[1::3] = -1
    g = torch.Generator().manual_seed(9)
    g_logp = torch.randn(N, generator=g, dtype=acc_dtype(dtype))
    g_ent = torch.randn(N, generator=g, dtype=acc_dtype(dtype))
    for temperature in (1.0, 1.3):
        kw = {"temperature": temperature, "ignore_index": ignore_index}
        for grads in ((g_logp, g_ent), (g_logp, torch.zeros_like(g_ent))):
            _, _, got = run_logprobs(
                logits.to(DEVICE), tokens.to(DEVICE), "cuda", tuple(x.to(DEVICE) for x in grads), **kw
            )
            _, _, exp = run_logprobs(logits, tokens, "cpu", grads, **kw)
            assert got.dtype == dtype and got.device.type == "cuda"
            assert_close(got, exp, **GPU_GRAD_TOL[dtype], name=f"d logits T={temperature}")
            if ignore:
                assert torch.all(got.cpu()[1::3] == 0)
    # logp alone (no entropy output: the backward gets no entropy gradient)
    x = logits.to(DEVICE).detach().clone().requires_grad_(True)
    rlkernels.gather_logprobs(
        x, tokens.to(DEVICE), ignore_index=ignore_index, backend=backend
    ).sum().backward()
    y = logits.detach().clone().requires_grad_(True)
    rlkernels.gather_logprobs(y, tokens, ignore_index=ignore_index, backend="cpu").sum().backward()
    assert_close(x.grad, y.grad, **GPU_GRAD_TOL[dtype], name="d logits of logp.sum()")


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [7, 1000, 32000])
def test_logprobs_inplace_backward(V, dtype, backend):
    N = rows_for(V)
    logits = randn((N, V), dtype, seed=11, scale=3.0).to(DEVICE)
    tokens = random_tokens((N,), V, seed=12).to(DEVICE)
    tokens[0] = -100
    g = torch.Generator().manual_seed(13)
    grads = (
        torch.randn(N, generator=g).to(DEVICE, acc_dtype(dtype)),
        torch.randn(N, generator=g).to(DEVICE, acc_dtype(dtype)),
    )
    _, _, expected = run_logprobs(logits, tokens, "cuda", grads, ignore_index=-100, temperature=0.9)
    leaf = logits.clone().requires_grad_(True)
    work = leaf * 1  # the in-place backward destroys this non-leaf activation, as in a trainer
    ptr = work.data_ptr()
    logp, ent = rlkernels.gather_logprobs(
        work,
        tokens,
        return_entropy=True,
        ignore_index=-100,
        temperature=0.9,
        inplace_backward=True,
        backend=backend,
    )
    torch.autograd.backward((logp, ent), grads)
    assert torch.equal(leaf.grad, expected)  # the same kernel, written over the logits
    assert torch.equal(work.detach(), expected) and work.data_ptr() == ptr
    assert torch.all(leaf.grad[0] == 0)


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
def test_logprobs_forward_allocates_nothing_of_logits_size(backend):
    N, V = 64, 151936
    logits = randn((N, V), torch.float32, seed=14, scale=3.0).to(DEVICE)
    tokens = random_tokens((N,), V, seed=15).to(DEVICE)
    logits_bytes = logits.numel() * logits.element_size()
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = rlkernels.gather_logprobs(x, tokens, return_entropy=True, backend=backend)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        assert peak < (x.numel() * x.element_size()) // 16, f"{dtype}: forward allocated {peak} bytes"
        assert peak < logits_bytes // 16
        del out


@pytest.mark.parametrize("backend", backends(*OPS, include=("cuda",)))
@pytest.mark.parametrize("V", [1000, 151936])
def test_logprobs_repeated_runs_are_bit_identical(V, backend):
    N = 16
    logits = randn((N, V), torch.bfloat16, seed=16, scale=3.0).to(DEVICE)
    tokens = random_tokens((N,), V, seed=17).to(DEVICE)
    g = (torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE))
    first = run_logprobs(logits, tokens, "cuda", g, temperature=0.8)
    for _ in range(3):
        again = run_logprobs(logits, tokens, "cuda", g, temperature=0.8)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backends(*OPS, include=("cuda",)))
def test_logprobs_opcheck(backend):
    for V in (7, 5000):
        logits = randn((6, V), torch.float32, seed=18, scale=3.0).to(DEVICE)
        tokens = random_tokens((6,), V, seed=19).to(DEVICE)
        tokens[2] = -100
        x = logits.clone().requires_grad_(True)
        torch.library.opcheck(
            torch.ops.rlkernels.gather_logprobs.default, (x, tokens, 0.9, True, -100, False)
        )
        torch.library.opcheck(
            torch.ops.rlkernels.gather_logprobs.default, (x, tokens.clamp(min=0), 1.0, False, None, False)
        )
        _, ent, lse = torch.ops.rlkernels.gather_logprobs(logits, tokens, 0.9, True, -100, False)
        gl, gh = torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)
        torch.library.opcheck(
            torch.ops.rlkernels.gather_logprobs_backward.default,
            (gl, gh, logits, tokens, lse, ent, 0.9, -100),
        )
        torch.library.opcheck(
            torch.ops.rlkernels.gather_logprobs_backward.default,
            (gl, None, logits, tokens, lse, ent, 0.9, -100),
        )
        torch.library.opcheck(
            torch.ops.rlkernels.gather_logprobs_backward_inplace.default,
            (gl, gh, logits.clone(), tokens, lse, ent, 0.9, -100),
        )


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
def test_logprobs_compile_fullgraph(backend):
    torch._dynamo.reset()
    logits = randn((2, 9, 1000), torch.bfloat16, seed=20, scale=3.0).to(DEVICE)
    tokens = random_tokens((2, 9), 1000, seed=21).to(DEVICE)

    def f(x):
        logp, ent = rlkernels.gather_logprobs(
            x, tokens, return_entropy=True, temperature=0.7, ignore_index=-100, backend=backend
        )
        return logp.sum() + 0.01 * ent.sum()

    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    eager = f(x1)
    compiled = torch.compile(f, fullgraph=True)(x2)
    eager.backward()
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    assert_close(x2.grad, x1.grad, **GPU_GRAD_TOL[torch.bfloat16], name="d logits")


# ----------------------------------------------------------------------------------------------------
# 64-bit indexing
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", gpu_backends(*OPS))
def test_more_than_2_to_31_logits(backend):
    """Row offsets r * V past 2^31 elements: the last rows must match the CPU kernel on the same values."""
    V = 151936
    N = (1 << 31) // V + 2
    try:
        logits = torch.empty((N, V), dtype=torch.bfloat16, device=DEVICE)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 4.3 GB logits tensor")
    logits.normal_(0, 3, generator=torch.Generator(DEVICE).manual_seed(34))
    tokens = torch.randint(0, V, (N,), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(35))
    x = logits.requires_grad_(True)
    logp, ent = rlkernels.gather_logprobs(x, tokens, return_entropy=True, backend=backend)
    tail = slice(N - 3, N)
    exp_logp, exp_ent = rlkernels.gather_logprobs(
        logits.detach()[tail].cpu(), tokens[tail].cpu(), return_entropy=True, backend="cpu"
    )
    assert_close(logp[tail], exp_logp, **GPU_TOL[torch.bfloat16], name="logp of the last rows")
    assert_close(ent[tail], exp_ent, **GPU_TOL[torch.bfloat16], name="entropy of the last rows")
    y = logits.detach()[tail].cpu().requires_grad_(True)
    rlkernels.gather_logprobs(y, tokens[tail].cpu(), backend="cpu").sum().backward()
    logp.sum().backward()
    assert_close(x.grad[tail], y.grad, **GPU_GRAD_TOL[torch.bfloat16], name="d logits of the last rows")
    del logits, x


# ----------------------------------------------------------------------------------------------------
# linear_logprobs (docs/design.md §4.7): log-probs from hidden states through a linear head, chunked
# ----------------------------------------------------------------------------------------------------

LINEAR_OPS = ("linear_logprobs", "gather_logprobs")
# Head configurations: (bias, logit_scale, softcap, temperature)
HEADS = {
    "plain": (False, 1.0, None, 1.0),
    "bias": (True, 1.0, None, 0.7),
    "gemma": (True, 0.5, 4.0, 1.3),
}


def linear_inputs(lead, H, V, dtype, *, bias=False, seed=0, device="cpu"):
    hidden = randn((*lead, H), dtype, seed=seed, device=device)
    weight = randn((V, H), dtype, seed=seed + 1, scale=2.0 / H**0.5, device=device)
    b = randn((V,), dtype, seed=seed + 2, device=device) if bias else None
    tokens = random_tokens(lead, V, seed=seed + 3, device=device)
    return hidden, weight, b, tokens


def linear_oracle(hidden, weight, tokens, bias=None, temperature=1.0, ignore_index=None, logit_scale=1.0,
                  softcap=None):
    """The unfused head in float64 torch: logits, then torch_oracle (differentiable)."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = logit_scale * z
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch_oracle(z, tokens, temperature, ignore_index)


def linear_tol(dtype, H):
    """16-bit logits carry the rounding of a 16-bit matmul output and of its inputs' products (no input rounding:
    the oracle reads the same 16-bit values)."""
    if dtype == torch.float64:
        return {"atol": 1e-10, "rtol": 1e-10, "scale": 1.0}
    if dtype == torch.float32:
        return {"atol": 2e-5, "rtol": 1e-5, "scale": 1.0}
    return {"atol": 6e-2, "rtol": 2e-2, "scale": 1.0}


@pytest.mark.parametrize("backend", backends(*LINEAR_OPS))
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_linear_forward_matches_oracles(chunk_size, dtype, head, backend):
    bias, logit_scale, softcap, temperature = HEADS[head]
    hidden, weight, b, tokens = linear_inputs((2, 7), 16, 97, dtype, bias=bias, device=device_for(backend))
    tokens[1, 2] = -100
    kw = {"bias": b, "temperature": temperature, "ignore_index": -100, "logit_scale": logit_scale, "softcap": softcap}
    logp, ent = rlkernels.linear_logprobs(hidden, weight, tokens, return_entropy=True, chunk_size=chunk_size,
                                          backend=backend, **kw)
    assert logp.shape == tokens.shape and ent.shape == tokens.shape
    assert logp.dtype == acc_dtype(dtype) and ent.dtype == acc_dtype(dtype)
    want_logp, want_ent = linear_oracle(hidden, weight, tokens, **kw)
    tol = linear_tol(dtype, 16)
    assert_close(logp, want_logp, **tol, name="logp")
    assert_close(ent, want_ent, **tol, name="entropy")
    assert logp[1, 2] == 0 and ent[1, 2] == 0
    ref_logp, ref_ent = reference.linear_logprobs(hidden, weight, tokens, return_entropy=True, **kw)
    assert_close(logp, ref_logp, **tol, name="logp against the NumPy reference")
    assert_close(ent, ref_ent, **tol, name="entropy against the NumPy reference")
    only = rlkernels.linear_logprobs(hidden, weight, tokens, chunk_size=chunk_size, backend=backend, **kw)
    assert torch.equal(only, logp)


@pytest.mark.parametrize("backend", backends(*LINEAR_OPS))
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("which", ["logp", "entropy", "both"])
def test_linear_gradcheck(which, head, backend):
    bias, logit_scale, softcap, temperature = HEADS[head]
    hidden, weight, b, tokens = linear_inputs((5,), 6, 11, torch.float64, bias=bias, device=device_for(backend))
    tokens[1] = -100
    inputs = (hidden.requires_grad_(), weight.requires_grad_()) + ((b.requires_grad_(),) if bias else ())

    def f(h, w, bb=None):
        logp, ent = rlkernels.linear_logprobs(h, w, tokens, bias=bb, temperature=temperature, return_entropy=True,
                                              ignore_index=-100, logit_scale=logit_scale, softcap=softcap,
                                              chunk_size=2, backend=backend)
        return {"logp": (logp,), "entropy": (ent,), "both": (logp, ent)}[which]

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("backend", backends(*LINEAR_OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head", list(HEADS))
def test_linear_backward_matches_torch(head, dtype, backend):
    bias, logit_scale, softcap, temperature = HEADS[head]
    H, V = 24, 131
    hidden, weight, b, tokens = linear_inputs((3, 6), H, V, dtype, bias=bias, seed=5, device=device_for(backend))
    tokens[0, 0] = -100
    kw = {"temperature": temperature, "ignore_index": -100, "logit_scale": logit_scale, "softcap": softcap}
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    if bias:
        leaves.append(b.clone().requires_grad_())
    g = torch.Generator().manual_seed(9)
    g_logp = torch.randn(tokens.shape, generator=g, dtype=torch.float64)
    g_ent = torch.randn(tokens.shape, generator=g, dtype=torch.float64)
    logp, ent = rlkernels.linear_logprobs(*leaves[:2], tokens, bias=leaves[2] if bias else None, return_entropy=True,
                                          chunk_size=4, backend=backend, **kw)
    (logp * g_logp.to(logp) + ent * g_ent.to(ent)).sum().backward()
    ref = [x.detach().double().cpu().requires_grad_() for x in leaves]
    wl, we = linear_oracle(ref[0], ref[1], tokens.cpu(), bias=ref[2] if bias else None, **kw)
    (wl * g_logp + we * g_ent).sum().backward()
    for name, got, want in zip(("hidden", "weight", "bias"), leaves, ref):
        assert got.grad.dtype == dtype
        size = float(want.grad.abs().max())
        tol = {"atol": 1e-10 * size, "rtol": 1e-10} if dtype == torch.float64 else (
            {"atol": 2e-5 * size, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2 * size, "rtol": 3e-2})
        assert_close(got.grad, want.grad, **tol, scale=1.0, name=f"d {name}")
    assert torch.all(leaves[0].grad[0, 0] == 0)  # the ignored row


@pytest.mark.parametrize("gemm16", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_16bit_gemm_paths_untiled(dtype, chunk_size, gemm16, monkeypatch):
    """One tile over the whole vocabulary, in one row chunk (chunk_size None: d weight is one GEMM) and in several:
    torch's 16-bit GEMMs (gemm16) and, as on a CPU without them, float32 GEMMs on widened blocks of 7 vocabulary
    entries, each against the float64 oracle, forward and backward with the Gemma head (bias, scale, softcap)."""
    from rlkernels._ops import logprobs as ops

    monkeypatch.setattr(ops, "_cpu_has_16bit_gemm", lambda dtype: gemm16)
    monkeypatch.setattr(ops, "_WIDE_BYTES", 4 * 24 * 7)
    assert ops._wide_gemm(torch.ones(1, dtype=dtype)) == (not gemm16)
    bias, logit_scale, softcap, temperature = HEADS["gemma"]
    hidden, weight, b, tokens = linear_inputs((3, 6), 24, 131, dtype, bias=bias, seed=11)
    kw = {"temperature": temperature, "logit_scale": logit_scale, "softcap": softcap}
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, b)]
    g = torch.Generator().manual_seed(4)
    g_logp, g_ent = (torch.randn(tokens.shape, generator=g, dtype=torch.float64) for _ in range(2))
    logp, ent = rlkernels.linear_logprobs(leaves[0], leaves[1], tokens, bias=leaves[2], return_entropy=True,
                                          chunk_size=chunk_size, **kw)
    (logp * g_logp.to(logp) + ent * g_ent.to(ent)).sum().backward()
    ref = [x.detach().double().requires_grad_() for x in leaves]
    wl, we = linear_oracle(ref[0], ref[1], tokens, bias=ref[2], **kw)
    (wl * g_logp + we * g_ent).sum().backward()
    tol = linear_tol(dtype, 24)
    assert_close(logp, wl.detach(), **tol, name="logp")
    assert_close(ent, we.detach(), **tol, name="entropy")
    for name, got, want in zip(("hidden", "weight", "bias"), leaves, ref):
        size = float(want.grad.abs().max())
        assert_close(got.grad, want.grad, atol=3e-2 * size, rtol=3e-2, scale=1.0, name=f"d {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_grad_weight_accumulates_in_float32(dtype):
    """Many small chunks of one sign: a 16-bit running sum would stall (each chunk's product falls below half an
    ulp of the sum), a float32 one stays within the final rounding."""
    N, H, V = 512, 4, 3
    hidden = torch.full((N, H), 0.25, dtype=dtype) + randn((N, H), dtype, scale=0.01, seed=2)
    weight = randn((V, H), dtype, scale=0.1, seed=3)
    tokens = torch.zeros(N, dtype=torch.long)
    w = weight.clone().requires_grad_()
    rlkernels.linear_logprobs(hidden, w, tokens, chunk_size=1).sum().backward()
    ref = weight.double().requires_grad_()
    linear_oracle(hidden, ref, tokens)[0].sum().backward()
    # one 16-bit rounding of the result, plus the per-chunk roundings of the products' float32 sum
    assert_close(w.grad, ref.grad, atol=0.0, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -9)
    # The probe: the same products summed in the 16-bit dtype miss by far more.
    p = torch.softmax((hidden.double() @ weight.double().t()), -1)
    contrib = ((torch.nn.functional.one_hot(tokens, V) - p)[:, :, None] * hidden.double()[:, None, :]).to(dtype)
    running = torch.zeros((V, H), dtype=dtype)
    for row in contrib:
        running += row
    assert not torch.allclose(running.double(), ref.grad, atol=0.0, rtol=2 ** -7 if dtype == torch.bfloat16
                              else 2 ** -9)


@pytest.mark.parametrize("backend", backends(*LINEAR_OPS))
def test_linear_chunking_and_ignored_rows(backend):
    device = device_for(backend)
    hidden, weight, b, tokens = linear_inputs((20,), 8, 50, torch.float64, bias=True, seed=11, device=device)
    tokens[::3] = -1
    outs = []
    for chunk in (1, 7, 20, 1000):
        h, w, bb = (x.clone().requires_grad_() for x in (hidden, weight, b))
        logp, ent = rlkernels.linear_logprobs(h, w, tokens, bias=bb, return_entropy=True, ignore_index=-1,
                                              chunk_size=chunk, backend=backend)
        (logp.sum() + ent.sum()).backward()
        outs.append((logp, ent, h.grad, w.grad, bb.grad))
        assert torch.all(logp[::3] == 0) and torch.all(ent[::3] == 0) and torch.all(h.grad[::3] == 0)
    for other in outs[1:]:
        for a, c in zip(outs[0], other):
            assert_close(a, c, atol=1e-12, rtol=1e-12, scale=1.0)
    # every row ignored: zeros, and zero gradients
    h = hidden.clone().requires_grad_()
    logp = rlkernels.linear_logprobs(h, weight, torch.full_like(tokens, -1), ignore_index=-1, backend=backend)
    logp.sum().backward()
    assert torch.all(logp == 0) and torch.all(h.grad == 0)


def test_linear_leading_dims_strides_token_dtypes_and_promotion():
    hidden, weight, b, tokens = linear_inputs((3, 4), 10, 33, torch.float32, bias=True, seed=21)
    want = rlkernels.linear_logprobs(hidden, weight, tokens, bias=b)
    # a transposed hidden, a transposed (non-contiguous) weight, int32 tokens
    got = rlkernels.linear_logprobs(hidden.transpose(0, 1).contiguous().transpose(0, 1), weight.t().contiguous().t(),
                                    tokens.to(torch.int32), bias=b)
    assert_close(got, want, atol=1e-6, rtol=1e-6, scale=1.0)
    # bf16 hidden with a float32 head is computed in float32, gradients in each input's dtype
    h16 = hidden.to(torch.bfloat16).requires_grad_()
    w = weight.clone().requires_grad_()
    out = rlkernels.linear_logprobs(h16, w, tokens, bias=b)
    assert out.dtype == torch.float32
    assert_close(out, rlkernels.linear_logprobs(h16.detach().float(), weight, tokens, bias=b), atol=0, rtol=0)
    out.sum().backward()
    assert h16.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_linear_empty_and_meta():
    hidden, weight, _, tokens = linear_inputs((0, 3), 5, 9, torch.float32)
    h = hidden.clone().requires_grad_()
    logp, ent = rlkernels.linear_logprobs(h, weight, tokens, return_entropy=True)
    assert logp.shape == (0, 3) and ent.shape == (0, 3)
    logp.sum().backward()
    assert h.grad.shape == hidden.shape
    meta = rlkernels.linear_logprobs(torch.empty(4, 6, 5, device="meta"), torch.empty(9, 5, device="meta"),
                                     torch.empty(4, 6, dtype=torch.long, device="meta"), return_entropy=True)
    assert meta[0].shape == (4, 6) and meta[0].device.type == "meta"


def test_linear_forward_allocates_no_logits_sized_tensor():
    N, H, V = 256, 32, 4000
    hidden, weight, _, tokens = linear_inputs((N,), H, V, torch.float32, seed=31)
    logits_bytes = N * V * 4
    # The probe sees the eager baseline's logits, so it can fail.
    assert _largest_allocation(lambda: torch.log_softmax(hidden @ weight.t(), -1)) >= logits_bytes
    largest = _largest_allocation(lambda: rlkernels.linear_logprobs(hidden, weight, tokens, chunk_size=16,
                                                                    return_entropy=True))
    assert 0 < largest <= 16 * V * 4  # one chunk of logits


@pytest.mark.parametrize("backend", backends(*LINEAR_OPS, cpu_tensors=True, include=("triton",)))
def test_linear_fused_forward_allocates_row_states_only(backend):
    """The Triton forward (a GEMM with the log-sum-exp epilogue) holds no tile of logits: what it allocates is
    the rows' states per vocabulary slice."""
    N, H, V = 64, 16, 1000
    hidden, weight, _, tokens = linear_inputs((N,), H, V, torch.float32, seed=32)
    largest = _largest_allocation(lambda: rlkernels.linear_logprobs(hidden, weight, tokens, return_entropy=True,
                                                                    backend=backend))
    # (max, sum-exp, entropy term, target logit, NaN seen) x two slices, and logp, entropy, lse: 4 bytes x N each
    assert 0 < largest <= (5 * 2 + 3) * N * 4 < N * V * 4


def test_linear_default_tiles_are_flat_in_n():
    from rlkernels._ops.logprobs import default_tiles

    for device in ("cpu", "cuda"):
        for V in (1000, 32000, 151936):
            for dtype in (torch.float32, torch.bfloat16):
                tiles = [default_tiles(n, V, dtype, device) for n in (16384, 1 << 16, 1 << 20)]
                assert tiles[0] == tiles[1] == tiles[2], tiles
                rows, cols = tiles[0]
                assert 1 <= cols <= V and rows * cols * dtype.itemsize <= (512 << 20)
    assert default_tiles(3, 32000, torch.float32, "cpu") == (3, 32000)
    assert default_tiles(2048, 32000, torch.float32, "cpu") == (2048, 4096)


def test_linear_opcheck():
    hidden, weight, b, tokens = linear_inputs((6,), 8, 37, torch.float32, bias=True, seed=41)
    tokens[2] = -1
    for bias in (None, b):
        for softcap in (None, 3.0):
            for tile in (37, 16):
                args = (hidden.requires_grad_(), weight.requires_grad_(), tokens, bias, 0.9, True, -1, 0.7, softcap,
                        4, tile)
                torch.library.opcheck(torch.ops.rlkernels.linear_logprobs.default, args)
    hidden, weight = hidden.detach(), weight.detach()
    _, ent, lse = torch.ops.rlkernels.linear_logprobs(hidden, weight, tokens, b, 0.9, True, -1, 0.7, 3.0, 4, 37)
    g = torch.randn(6)
    for grads in ((g, g.flip(0)), (g, None), (None, g)):
        for tile in (37, 16):
            torch.library.opcheck(torch.ops.rlkernels.linear_logprobs_backward.default,
                                  (*grads, hidden, weight, tokens, b, lse, ent, 0.9, -1, 0.7, 3.0, 4, tile,
                                   True, True, True))


def test_linear_torch_compile_fullgraph():
    hidden, weight, b, tokens = linear_inputs((2, 5), 8, 50, torch.float32, bias=True, seed=51)

    def loss_fn(h, w, bb):
        logp, ent = rlkernels.linear_logprobs(h, w, tokens, bias=bb, temperature=0.7, return_entropy=True,
                                              ignore_index=0, softcap=5.0)
        return (logp - 0.1 * ent).sum()

    eager = [x.clone().requires_grad_() for x in (hidden, weight, b)]
    want = loss_fn(*eager)
    want.backward()
    comp = [x.clone().requires_grad_() for x in (hidden, weight, b)]
    got = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*comp)
    got.backward()
    assert_close(got, want, atol=1e-6, rtol=1e-6, scale=1.0)
    for a, c in zip(comp, eager):
        assert_close(a.grad, c.grad, atol=1e-6, rtol=1e-6, scale=1.0)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"weight": torch.zeros(10, 5)}, ValueError, "weight must have shape"),
        ({"weight": torch.zeros(10)}, ValueError, "weight"),
        ({"hidden": torch.tensor(1.0)}, ValueError, "hidden"),
        ({"hidden": torch.zeros(2, 4, dtype=torch.long)}, TypeError, "hidden"),
        ({"weight": torch.zeros(10, 4, dtype=torch.int32)}, TypeError, "weight"),
        ({"bias": torch.zeros(9)}, ValueError, "bias"),
        ({"bias": torch.zeros(10, dtype=torch.long)}, TypeError, "bias"),
        ({"tokens": torch.tensor([0, 10])}, ValueError, r"tokens must be in \[0, 10\).*got 10"),
        ({"tokens": torch.tensor([0, -100]), "ignore_index": -99}, ValueError, "tokens"),
        ({"tokens": torch.tensor([0.0, 1.0])}, TypeError, "tokens"),
        ({"tokens": torch.tensor([0, 1, 2])}, ValueError, "tokens must have shape"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"logit_scale": float("inf")}, ValueError, "logit_scale"),
        ({"logit_scale": "2"}, TypeError, "logit_scale"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"softcap": float("inf")}, ValueError, "softcap"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": 2.0}, TypeError, "chunk_size"),
        ({"chunk_size": True}, TypeError, "chunk_size"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index"),
        ({"backend": "cuda"}, RuntimeError, "cuda"),
    ],
)
def test_linear_bad_inputs(kwargs, error, match):
    args = {"hidden": torch.zeros(2, 4), "weight": torch.zeros(10, 4), "tokens": torch.tensor([0, 1])}
    args.update(kwargs)
    hidden, weight, tokens = args.pop("hidden"), args.pop("weight"), args.pop("tokens")
    with pytest.raises(error, match=match):
        rlkernels.linear_logprobs(hidden, weight, tokens, **args)


def test_linear_reference_backend():
    hidden, weight, b, tokens = linear_inputs((3, 4), 8, 40, torch.float32, bias=True, seed=61)
    kw = {"bias": b, "return_entropy": True, "logit_scale": 1.5, "softcap": 6.0, "temperature": 0.9}
    got = rlkernels.linear_logprobs(hidden, weight, tokens, backend="reference", **kw)
    want = rlkernels.linear_logprobs(hidden, weight, tokens, **kw)
    for a, c in zip(got, want):
        assert a.dtype == torch.float32
        assert_close(a, c, atol=2e-5, rtol=1e-5, scale=1.0)


@given(
    N=st.integers(0, 12),
    H=st.integers(1, 40),
    V=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    temperature=st.sampled_from([1.0, 0.4, 3.0]),
    scale=st.sampled_from([0.1, 1.0, 8.0]),
    head=st.sampled_from(list(HEADS)),
    chunk=st.sampled_from([None, 1, 5]),
    ignore=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_property_forward_backward(N, H, V, dtype, temperature, scale, head, chunk, ignore, seed):
    bias, logit_scale, softcap, _ = HEADS[head]
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g, dtype=torch.float64) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / max(1, H) ** 0.5).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
    tokens = torch.randint(0, V, (N,), generator=g)
    if ignore and N:
        tokens[torch.rand(N, generator=g) < 0.3] = -100
    kw = {"bias": b, "temperature": temperature, "ignore_index": -100 if ignore else None, "logit_scale": logit_scale,
              "softcap": softcap}
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    logp, ent = rlkernels.linear_logprobs(*leaves, tokens, return_entropy=True, chunk_size=chunk, **kw)
    want_logp, want_ent = linear_oracle(hidden, weight, tokens, **kw)
    # the logits' size sets the absolute error of 16-bit logits (rounded like the matmul output)
    zsize = 1.0
    if N and V:
        zsize = max(1.0, float((hidden.double() @ weight.double().t()).abs().max()) * abs(logit_scale) / temperature)
    tol = linear_tol(dtype, H)
    assert_close(logp, want_logp, atol=tol["atol"] * zsize, rtol=tol["rtol"], scale=1.0)
    assert_close(ent, want_ent, atol=tol["atol"] * zsize, rtol=tol["rtol"], scale=1.0)
    g_logp = torch.randn(N, generator=g, dtype=torch.float64)
    g_ent = torch.randn(N, generator=g, dtype=torch.float64)
    (logp * g_logp.to(logp) + ent * g_ent.to(ent)).sum().backward()
    ref = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    wl, we = linear_oracle(*ref, tokens, **kw)
    (wl * g_logp + we * g_ent).sum().backward()
    for name, got, want in zip(("hidden", "weight"), leaves, ref):
        assert got.grad.dtype == dtype
        size = max(1e-3, float(want.grad.abs().max()) if want.grad.numel() else 1.0)
        rel = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 6e-2) * zsize
        assert_close(got.grad, want.grad, atol=rel * size, rtol=rel, scale=1.0, name=f"d {name}")


@pytest.mark.parametrize("backend", gpu_backends(*LINEAR_OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_gpu_matches_cpu(dtype, backend):
    N, H, V = 1100, 256, 32000
    hidden, weight, b, tokens = linear_inputs((N,), H, V, dtype, bias=True, seed=71)
    tokens[::5] = -100
    kw = {"bias": b, "temperature": 0.8, "ignore_index": -100, "logit_scale": 0.9, "softcap": 20.0,
          "return_entropy": True}
    leaves = [x.to(DEVICE).requires_grad_() for x in (hidden, weight)]
    logp, ent = rlkernels.linear_logprobs(*leaves, tokens.to(DEVICE), backend=backend, chunk_size=512,
                                          **{**kw, "bias": b.to(DEVICE)})
    (logp.sum() + 0.1 * ent.sum()).backward()
    cpu = [x.clone().requires_grad_() for x in (hidden, weight)]
    want_logp, want_ent = rlkernels.linear_logprobs(*cpu, tokens, **kw)
    (want_logp.sum() + 0.1 * want_ent.sum()).backward()
    tol = {"atol": 1e-3, "rtol": 1e-4, "scale": 1.0} if dtype == torch.float32 else {"atol": 0.1, "rtol": 3e-2,
                                                                                     "scale": 1.0}
    assert_close(logp, want_logp, **tol, device="cuda", name="logp")
    assert_close(ent, want_ent, **tol, device="cuda", name="entropy")
    for name, got, want in zip(("hidden", "weight"), leaves, cpu):
        size = float(want.grad.abs().max())
        assert_close(got.grad, want.grad, atol=3e-2 * size, rtol=3e-2, scale=1.0, name=f"d {name}")


@pytest.mark.parametrize("backend", gpu_backends(*LINEAR_OPS))
def test_linear_gpu_memory_is_flat_in_n(backend):
    H, V = 1024, 151936
    weight = randn((V, H), torch.bfloat16, seed=81, scale=0.03).to(DEVICE)
    peaks = []
    for N in (4096, 16384):
        hidden = randn((N, H), torch.bfloat16, seed=82).to(DEVICE).requires_grad_()
        tokens = random_tokens((N,), V, seed=83).to(DEVICE)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        logp = rlkernels.linear_logprobs(hidden, weight, tokens, chunk_size=1024, backend=backend)
        logp.sum().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
        del hidden, logp
    chunk = 1024 * V * 2
    # one chunk of logits, the float32 grad_weight and its 16-bit copy, grad_hidden: far below [N, V]
    assert peaks[1] - peaks[0] < 16384 * H * 8
    assert peaks[1] < 2 * chunk + V * H * 8 + 16384 * H * 4


@pytest.mark.parametrize("backend", backends(*LINEAR_OPS, cpu_tensors=True, include=("cpu", "triton")))
@pytest.mark.parametrize("keep_ignored_rows", [False, True])
@pytest.mark.parametrize("dtype,gemm16", [(torch.float64, None), (torch.float32, None), (torch.bfloat16, True),
                                          (torch.bfloat16, False), (torch.float16, False)])
def test_linear_vocabulary_tiles(dtype, gemm16, keep_ignored_rows, backend, monkeypatch):
    """The default tiles over part of the vocabulary (several tiles and row chunks, a ragged last tile), merged as
    shards in the forward and summed in the backward; with keep_ignored_rows, ignored rows go through the tiles
    as on a GPU. 16-bit inputs take torch's 16-bit GEMM (gemm16) or, as on a CPU without one, float32 GEMMs on
    widened blocks of a few vocabulary entries (several blocks a tile)."""
    from rlkernels._ops import logprobs as ops

    monkeypatch.setattr(ops, "_CHUNK_BYTES", {"cpu": 4 * 40 * dtype.itemsize, "cuda": 1 << 20})
    monkeypatch.setattr(ops, "_TILE_ROWS", {"cpu": 4, "cuda": 4})
    monkeypatch.setattr(ops, "_MIN_VOCAB_TILE", 1)
    monkeypatch.setattr(ops, "_VOCAB_ALIGN", 1)
    if gemm16 is not None:
        monkeypatch.setattr(ops, "_cpu_has_16bit_gemm", lambda dtype: gemm16)
        monkeypatch.setattr(ops, "_WIDE_BYTES", 4 * 12 * 7)  # 7 vocabulary entries a block
        assert ops._wide_block(4, 12) == 7 and ops._wide_gemm(torch.ones(1, dtype=dtype)) == (not gemm16)
    if keep_ignored_rows:
        monkeypatch.setattr(ops, "_kept_rows", lambda tokens, ignore_index: None)
    rows, cols = ops.default_tiles(10, 97, dtype, "cpu")
    assert (rows, cols) == (4, 40)  # three row chunks of three tiles, the last ones ragged
    hidden, weight, b, tokens = linear_inputs((10,), 12, 97, dtype, bias=True, seed=91)
    tokens[[1, 6]] = -100
    tokens[2], tokens[3] = 0, 96  # the first and the last column
    kw = {"bias": b, "temperature": 0.9, "ignore_index": -100, "logit_scale": 0.8, "softcap": 5.0}
    ops_tiles = []
    real_fold = ops._fold_tiles

    def counting_fold(*args):
        ops_tiles.append(1)
        return real_fold(*args)

    monkeypatch.setattr(ops, "_fold_tiles", counting_fold)
    fused = backend == "triton" and dtype != torch.float64  # the GEMM with the log-sum-exp epilogue
    if fused:
        from rlkernels.triton import logprobs as triton_logprobs

        grids = record_triton_grids(triton_logprobs, monkeypatch)
    h, w, bb = hidden.clone().requires_grad_(), weight.clone().requires_grad_(), b.clone().requires_grad_()
    logp, ent = rlkernels.linear_logprobs(h, w, tokens, return_entropy=True, backend=backend,
                                          **{**kw, "bias": bb})
    if fused:
        assert not ops_tiles and [name for name, _ in grids] == ["_linear_logprobs_forward_kernel"]
    else:
        assert ops_tiles, f"the forward took one tile per row ({rows} x {cols})"
    want_logp, want_ent = linear_oracle(hidden, weight, tokens, **kw)
    tol = linear_tol(dtype, 12)
    assert_close(logp, want_logp, **tol, name="logp")
    assert_close(ent, want_ent, **tol, name="entropy")
    assert logp[1] == 0 and ent[6] == 0
    g = torch.Generator().manual_seed(92)
    g_logp, g_ent = torch.randn(10, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    (logp * g_logp.to(logp) + ent * g_ent.to(ent)).sum().backward()
    ref = [x.double().requires_grad_() for x in (hidden, weight, b)]
    wl, we = linear_oracle(ref[0], ref[1], tokens, **{**kw, "bias": ref[2]})
    (wl * g_logp + we * g_ent).sum().backward()
    rel = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 6e-2)
    for name, got, want in zip(("hidden", "weight", "bias"), (h, w, bb), ref):
        size = float(want.grad.abs().max())
        assert_close(got.grad, want.grad, atol=rel * size, rtol=rel, scale=1.0, name=f"d {name}")


@pytest.mark.parametrize("backend", backends(*LINEAR_OPS, cpu_tensors=True, include=("triton",)))
def test_linear_out_of_range_tokens_give_nan_in_vocabulary_tiles(backend, monkeypatch):
    """Off the CPU backend a token id outside [0, V) gives NaN for its row (no host check), whether one tile
    spans V (the gather_logprobs kernel's NaN) or several do (no tile holds it)."""
    from rlkernels._ops import logprobs as ops

    hidden, weight, _, tokens = linear_inputs((6,), 8, 50, torch.float32, seed=95)
    tokens[1], tokens[4] = 50, -3
    for tiles in (False, True):
        if tiles:
            monkeypatch.setattr(ops, "_CHUNK_BYTES", {"cpu": 6 * 16 * 4, "cuda": 1 << 20})
            monkeypatch.setattr(ops, "_MIN_VOCAB_TILE", 1)
            monkeypatch.setattr(ops, "_VOCAB_ALIGN", 1)
            assert ops.default_tiles(6, 50, torch.float32, "cpu") == (6, 16)
        logp, ent = rlkernels.linear_logprobs(hidden, weight, tokens, return_entropy=True, backend=backend)
        bad = torch.zeros(6, dtype=torch.bool)
        bad[[1, 4]] = True
        assert torch.isnan(logp[bad]).all() and torch.isfinite(logp[~bad]).all(), tiles
        assert torch.isnan(ent[1]) and torch.isfinite(ent[~bad]).all(), tiles
