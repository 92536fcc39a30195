"""Tests of gather_logprobs (docs/design.md §4.3): CPU kernel, autograd, custom-op plumbing and the Triton backend.

Oracles: `rlkernels.reference.gather_logprobs` (NumPy) and torch float64 log_softmax / gather / entropy on
the same (upcast) logits, so 16-bit inputs are compared without their input rounding and the tolerances
measure the kernel's accumulation alone. TRITON_INTERPRET=1 is set before triton or rlkernels is imported
(see tests/test_triton_returns.py); the Triton cases use small shapes because the interpreter is slow.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib.util

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import rlkernels
from rlkernels import reference

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# (atol, rtol) of logp / entropy against float64 on the same logits: accumulation error only.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (5e-5, 1e-5), torch.bfloat16: (5e-5, 1e-5),
       torch.float16: (5e-5, 1e-5)}
# Gradients are stored in the logits' dtype, so they carry its rounding.
GRAD_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-6, 1e-5), torch.bfloat16: (2e-3, 2e-2),
            torch.float16: (2e-4, 2e-3)}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_logits(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def make_tokens(shape, V, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, shape, generator=g)


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


def assert_close(actual, expected, tol):
    atol, rtol = tol
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True)


# ----------------------------------------------------------------------------------------------------
# Forward against the oracles
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("V", [1, 7, 1000, 32000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_forward_matches_oracles(V, dtype, temperature):
    logits = make_logits((2, 3, V), dtype)
    tokens = make_tokens((2, 3), V)
    logp, entropy = rlkernels.gather_logprobs(logits, tokens, temperature=temperature, return_entropy=True)
    assert logp.dtype == entropy.dtype == acc_dtype(dtype)
    assert logp.shape == entropy.shape == tokens.shape
    want_logp, want_entropy = torch_oracle(logits, tokens, temperature)
    assert_close(logp, want_logp, TOL[dtype])
    assert_close(entropy, want_entropy, TOL[dtype])
    ref_logp, ref_entropy = reference.gather_logprobs(logits.double().numpy(), tokens.numpy(),
                                                      temperature=temperature, return_entropy=True)
    assert_close(logp, torch.from_numpy(ref_logp), TOL[dtype])
    assert_close(entropy, torch.from_numpy(ref_entropy), TOL[dtype])
    only_logp = rlkernels.gather_logprobs(logits, tokens, temperature=temperature)
    assert torch.equal(only_logp, logp)  # the entropy term does not change the logp path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_qwen_vocabulary(dtype):
    V = 151936
    logits = make_logits((3, V), dtype, scale=5.0)
    tokens = torch.tensor([0, V - 1, 12345])
    logp, entropy = rlkernels.gather_logprobs(logits, tokens, return_entropy=True)
    want_logp, want_entropy = torch_oracle(logits, tokens)
    assert_close(logp, want_logp, (2e-4, 1e-5))
    assert_close(entropy, want_entropy, (2e-4, 1e-5))


def test_extreme_logits():
    V = 300
    inf = float("inf")
    logits = make_logits((6, V), torch.float64)
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
        ref_logp, ref_entropy = reference.gather_logprobs(x.double().numpy(), tokens.numpy(), return_entropy=True)
        assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
        assert (logp <= 0).all()
        assert_close(logp, torch.from_numpy(ref_logp), (1e-4, 1e-6))
        assert_close(entropy, torch.from_numpy(ref_entropy), (1e-4, 1e-6))
        assert logp[3] == 0 and entropy[3] == 0 and logp[5] == 0
        assert abs(float(logp[4]) + np.log(V)) < 1e-4


def test_all_minus_inf_row_is_nan():
    logits = torch.full((2, 10), float("-inf"))
    logits[1, 3] = 0.0
    logp, entropy = rlkernels.gather_logprobs(logits, torch.tensor([2, 3]), return_entropy=True)
    assert torch.isnan(logp[0]) and torch.isnan(entropy[0])
    assert logp[1] == 0 and entropy[1] == 0


def test_nan_logit_propagates():
    logits = make_logits((2, 50), torch.float32)
    logits[0, 10] = float("nan")
    logp = rlkernels.gather_logprobs(logits, torch.tensor([1, 1]))
    assert torch.isnan(logp[0]) and torch.isfinite(logp[1])


@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_ignore_index(ignore_index):
    V = 40
    logits = make_logits((4, 5, V), torch.float32)
    tokens = make_tokens((4, 5), V)
    tokens[0, 1] = ignore_index
    tokens[2, :] = ignore_index
    logp, entropy = rlkernels.gather_logprobs(logits, tokens, return_entropy=True, ignore_index=ignore_index)
    want_logp, want_entropy = torch_oracle(logits, tokens, ignore_index=ignore_index)
    assert_close(logp, want_logp, TOL[torch.float32])
    assert_close(entropy, want_entropy, TOL[torch.float32])
    ignored = tokens == ignore_index
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all()
    x = logits.clone().requires_grad_()
    lp, h = rlkernels.gather_logprobs(x, tokens, return_entropy=True, ignore_index=ignore_index)
    (lp.sum() + h.sum()).backward()
    assert (x.grad[ignored] == 0).all()
    assert (x.grad[~ignored].abs().sum(-1) > 0).all()


def test_leading_dims_and_token_dtypes():
    V = 33
    logits = make_logits((2, 3, 4, V), torch.float32)
    tokens = make_tokens((2, 3, 4), V)
    want = rlkernels.gather_logprobs(logits.reshape(-1, V), tokens.reshape(-1)).reshape(2, 3, 4)
    for tok in (tokens, tokens.to(torch.int32), tokens.to(torch.uint8)):
        assert torch.equal(rlkernels.gather_logprobs(logits, tok), want)
    one = rlkernels.gather_logprobs(logits[0, 0, 0], tokens[0, 0, 0])  # logits [V], tokens 0-d
    assert one.shape == () and one == want[0, 0, 0]


def test_non_contiguous_logits():
    V = 1000
    base = make_logits((6, 2 * V + 3), torch.float32)
    tokens = make_tokens((6,), V)
    sliced = base[:, 3 : V + 3]  # row stride 2V + 3: read in place
    strided = base[:, 1 : 2 * V + 1 : 2]  # stride 2 along V
    transposed = make_logits((V, 6), torch.float32).t()
    for logits in (sliced, strided, transposed):
        assert not logits.is_contiguous()
        logp, entropy = rlkernels.gather_logprobs(logits, tokens, return_entropy=True)
        want_logp, want_entropy = torch_oracle(logits, tokens)
        assert_close(logp, want_logp, TOL[torch.float32])
        assert_close(entropy, want_entropy, TOL[torch.float32])
        x = logits.detach().clone().requires_grad_()
        rlkernels.gather_logprobs(x, tokens).sum().backward()
        y = logits.detach().double().requires_grad_()
        torch_oracle(y, tokens)[0].sum().backward()
        assert_close(x.grad, y.grad, GRAD_TOL[torch.float32])


def test_empty_inputs():
    logp, entropy = rlkernels.gather_logprobs(torch.zeros(0, 7), torch.zeros(0, dtype=torch.long),
                                              return_entropy=True)
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
    logits = make_logits((16, 5000), torch.float32)
    tokens = make_tokens((16,), 5000)
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
    logits = make_logits((2, 3, V), torch.float64, scale=1.5).requires_grad_()
    tokens = make_tokens((2, 3), V)
    tokens[1, 2] = -1

    def f(x):
        logp, entropy = rlkernels.gather_logprobs(x, tokens, temperature=temperature, return_entropy=True,
                                                  ignore_index=-1)
        return {"logp": (logp,), "entropy": (entropy,), "both": (logp, entropy)}[which]

    assert torch.autograd.gradcheck(f, (logits,))


def test_gradcheck_with_minus_inf_entries():
    logits = make_logits((3, 9), torch.float64)
    logits[:, ::2] = float("-inf")
    logits = logits.requires_grad_()
    tokens = torch.tensor([1, 3, 5])
    assert torch.autograd.gradcheck(lambda x: rlkernels.gather_logprobs(x, tokens, return_entropy=True), (logits,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [7, 1000])
def test_backward_matches_torch(dtype, V):
    logits = make_logits((5, V), dtype)
    tokens = make_tokens((5,), V)
    g_logp, g_entropy = make_logits((5,), torch.float64, seed=3), make_logits((5,), torch.float64, seed=4)
    x = logits.clone().requires_grad_()
    logp, entropy = rlkernels.gather_logprobs(x, tokens, temperature=0.8, return_entropy=True)
    (logp * g_logp.to(logp.dtype) + entropy * g_entropy.to(logp.dtype)).sum().backward()
    assert x.grad.dtype == dtype
    y = logits.double().requires_grad_()
    want_logp, want_entropy = torch_oracle(y, tokens, 0.8)
    (want_logp * g_logp + want_entropy * g_entropy).sum().backward()
    assert_close(x.grad, y.grad, GRAD_TOL[dtype])


@pytest.mark.parametrize("return_entropy", [False, True])
def test_inplace_backward(return_entropy):
    logits = make_logits((4, 300), torch.float32)
    tokens = make_tokens((4,), 300)

    def grad(inplace):
        x = logits.clone().requires_grad_()
        h = x * 1.0  # the op's input, a non-leaf whose storage the inplace backward reuses
        out = rlkernels.gather_logprobs(h, tokens, return_entropy=return_entropy, inplace_backward=inplace)
        loss = (out[0] - 0.5 * out[1]).sum() if return_entropy else out.sum()
        loss.backward()
        return x.grad, h

    want, h_kept = grad(False)
    got, h_destroyed = grad(True)
    assert_close(got, want, GRAD_TOL[torch.float32])
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
    logits = make_logits((64, 4000), dtype)
    tokens = make_tokens((64,), 4000)
    # The probe sees the allocations of the eager baseline, so it can fail.
    assert _largest_allocation(lambda: torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None])) >= \
        logits.numel() * 4
    largest = _largest_allocation(lambda: rlkernels.gather_logprobs(logits, tokens, return_entropy=True))
    assert 0 < largest <= 64 * 8 * 4  # the per-row outputs only


# ----------------------------------------------------------------------------------------------------
# Custom-op plumbing: opcheck, torch.compile
# ----------------------------------------------------------------------------------------------------


def _op_args(dtype=torch.float32, requires_grad=False, return_entropy=True, ignore_index=-1):
    logits = make_logits((6, 37), dtype).requires_grad_(requires_grad)
    tokens = make_tokens((6,), 37)
    tokens[2] = -1
    return logits, tokens, 0.9, return_entropy, ignore_index, False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("return_entropy", [False, True])
def test_opcheck_forward(dtype, requires_grad, return_entropy):
    torch.library.opcheck(torch.ops.rlkernels.gather_logprobs.default,
                          _op_args(dtype, requires_grad, return_entropy))


def test_opcheck_backward():
    logits, tokens, temperature, _, ignore_index, _ = _op_args()
    logp, entropy, lse = torch.ops.rlkernels.gather_logprobs(logits, tokens, temperature, True, ignore_index, False)
    g = torch.randn(6)
    torch.library.opcheck(torch.ops.rlkernels.gather_logprobs_backward.default,
                          (g, g.flip(0), logits, tokens, lse, entropy, temperature, ignore_index))
    torch.library.opcheck(torch.ops.rlkernels.gather_logprobs_backward.default,
                          (g, None, logits, tokens, lse, entropy, temperature, None))
    torch.library.opcheck(torch.ops.rlkernels.gather_logprobs_backward_inplace.default,
                          (g, g, logits.clone(), tokens, lse, entropy, temperature, ignore_index))


def test_torch_compile_fullgraph():
    logits = make_logits((2, 5, 50), torch.float32)
    tokens = make_tokens((2, 5), 50)

    def loss_fn(x, t):
        logp, entropy = rlkernels.gather_logprobs(x, t, temperature=0.7, return_entropy=True, ignore_index=0)
        return (logp - 0.1 * entropy).sum()

    x_eager = logits.clone().requires_grad_()
    want = loss_fn(x_eager, tokens)
    want.backward()
    x = logits.clone().requires_grad_()
    got = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x, tokens)
    got.backward()
    assert_close(got, want, (1e-6, 1e-6))
    assert_close(x.grad, x_eager.grad, (1e-7, 1e-6))


# ----------------------------------------------------------------------------------------------------
# Bad inputs: the error names the argument
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,match", [
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
])
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
    logits = make_logits((3, 20), torch.float32)
    tokens = make_tokens((3,), 20)
    got = rlkernels.gather_logprobs(logits, tokens, return_entropy=True, backend="reference")
    want = rlkernels.gather_logprobs(logits, tokens, return_entropy=True)
    assert_close(got[0], want[0], TOL[torch.float32])
    assert_close(got[1], want[1], TOL[torch.float32])


# ----------------------------------------------------------------------------------------------------
# Triton backend (interpreter)
# ----------------------------------------------------------------------------------------------------

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")


def _triton_module():
    from rlkernels.triton import logprobs as triton_logprobs

    if not triton_logprobs._interpreting():
        pytest.skip("rlkernels.triton was imported before TRITON_INTERPRET=1 was set")
    return triton_logprobs


@needs_triton
@pytest.mark.triton
@pytest.mark.parametrize("V", [1, 7, 100, 1500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_triton_matches_cpu(V, dtype, monkeypatch):
    tl_mod = _triton_module()
    monkeypatch.setattr(tl_mod, "BLOCK_V", 64)  # several blocks per row, and a ragged last one
    logits = make_logits((2, 3, V), dtype)
    logits[0, 0, ::5] = float("-inf")
    tokens = make_tokens((2, 3), V)
    tokens[1, 1] = -100
    kw = {"temperature": 0.7, "return_entropy": True, "ignore_index": -100}
    x_t = logits.clone().requires_grad_()
    x_c = logits.clone().requires_grad_()
    got = rlkernels.gather_logprobs(x_t, tokens, backend="triton", **kw)
    want = rlkernels.gather_logprobs(x_c, tokens, backend="cpu", **kw)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert_close(g, w, TOL[dtype])
    (got[0] + 0.3 * got[1]).sum().backward()
    (want[0] + 0.3 * want[1]).sum().backward()
    assert x_t.grad.dtype == dtype
    assert_close(x_t.grad, x_c.grad, GRAD_TOL[dtype])


@needs_triton
@pytest.mark.triton
def test_triton_extremes_and_inplace():
    _triton_module()
    logits = make_logits((4, 40), torch.float32)
    logits[0] *= 1e4 / 3
    logits[1] = float("-inf")
    logits[1, 7] = 1.0
    logits[2] = float("-inf")
    tokens = torch.tensor([3, 7, 0, 39])
    logp, entropy = rlkernels.gather_logprobs(logits, tokens, return_entropy=True, backend="triton")
    ref_logp, ref_entropy = reference.gather_logprobs(logits.double().numpy(), tokens.numpy(), return_entropy=True)
    assert_close(logp, torch.from_numpy(ref_logp), (1e-4, 1e-6))
    assert_close(entropy, torch.from_numpy(ref_entropy), (1e-4, 1e-6))
    live = logits[[0, 1, 3]]
    t = tokens[[0, 1, 3]]
    grads = []
    for inplace in (False, True):
        x = live.clone().requires_grad_()
        h = x * 1.0
        rlkernels.gather_logprobs(h, t, backend="triton", inplace_backward=inplace).sum().backward()
        grads.append(x.grad)
    assert_close(grads[1], grads[0], (1e-7, 1e-6))


@needs_triton
@pytest.mark.triton
def test_triton_bad_tokens_give_nan_or_raise():
    _triton_module()
    logits = make_logits((3, 10), torch.float32)
    tokens = torch.tensor([1, 10, -3])
    logp = rlkernels.gather_logprobs(logits, tokens, backend="triton")
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1:]).all()
    with pytest.raises(ValueError, match="tokens"):
        rlkernels.gather_logprobs(logits, tokens, backend="triton", check_tokens=True)


@needs_triton
@pytest.mark.triton
def test_triton_gradcheck_and_compile():
    _triton_module()
    logits = make_logits((3, 9), torch.float64).requires_grad_()
    tokens = torch.tensor([1, -1, 8])
    f = lambda x: rlkernels.gather_logprobs(x, tokens, temperature=0.5, return_entropy=True, ignore_index=-1,  # noqa: E731
                                            backend="triton")
    assert torch.autograd.gradcheck(f, (logits,))
    x = logits.detach().float()
    got = torch.compile(lambda x: f(x)[0], fullgraph=True, backend="aot_eager")(x)
    assert_close(got, f(x)[0], (1e-6, 1e-6))


# ----------------------------------------------------------------------------------------------------
# Property-based: random shapes, scales, temperatures, -inf entries, ignored rows, all dtypes
# ----------------------------------------------------------------------------------------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(N=st.integers(0, 9), V=st.integers(1, 3000), dtype=st.sampled_from(DTYPES),
       temperature=st.sampled_from([1.0, 0.3, 1.7, 50.0]), scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
       p_neg_inf=st.sampled_from([0.0, 0.3]), ignore=st.booleans(), seed=st.integers(0, 2**16))
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
    logp, entropy = rlkernels.gather_logprobs(x, tokens, temperature=temperature, return_entropy=True,
                                              ignore_index=ignore_index)
    assert logp.dtype == acc_dtype(dtype) and entropy.dtype == acc_dtype(dtype)
    want_logp, want_entropy = torch_oracle(logits, tokens, temperature, ignore_index)
    # |logp| and the entropy grow with the logits' spread: the tolerance is relative to their size
    atol, rtol = TOL[dtype]
    size = max(1.0, float(want_logp.abs().max()) if N else 1.0)
    assert_close(logp, want_logp, (atol * size, rtol))
    assert_close(entropy, want_entropy, (atol * size, rtol))
    ref = reference.gather_logprobs(logits, tokens, temperature=temperature, return_entropy=True,
                                    ignore_index=ignore_index)
    assert_close(logp, torch.as_tensor(ref[0]), (atol * size, rtol))
    # backward of both outputs against torch float64 autograd on the same logits
    g_logp = torch.randn(N, generator=g, dtype=torch.float64)
    g_ent = torch.randn(N, generator=g, dtype=torch.float64)
    (logp * g_logp.to(logp.dtype) + entropy * g_ent.to(logp.dtype)).sum().backward()
    y = logits.double().requires_grad_()
    wl, we = torch_oracle(y, tokens, temperature, ignore_index)
    (wl * g_logp + we * g_ent).sum().backward()
    assert x.grad.dtype == dtype
    gatol, grtol = GRAD_TOL[dtype]
    gsize = max(1.0, float(y.grad.abs().max()) if N else 1.0)
    # In float32 the logsumexp carries an absolute error of about eps |z|, which p = exp(z - lse) turns into a
    # relative one: the tolerance grows with the largest |z| (FMA or not changes which rounding one sees).
    finite = (logits.double() / temperature)[torch.isfinite(logits)]
    zscale = 1.0 if dtype == torch.float64 or finite.numel() == 0 else max(1.0, float(finite.abs().max()) / 10)
    assert_close(x.grad, y.grad, (gatol * gsize * zscale, grtol * zscale))
