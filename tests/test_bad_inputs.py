"""Every registered op against bad arguments, and the public functions against NaN and Inf (docs/design.md §3).

The registered ops are public (``torch.ops.rlkernels.*``, what ``torch.compile`` calls), backward ops included,
so each checks in C++ what it indexes with. Each case builds a valid call of one op on CPU tensors and spoils
one argument: a wrong number of elements (one, none), an extra dimension, a wrong dtype, an index out of
range, a loop bound of 2^40. The call must raise a ValueError, TypeError or RuntimeError naming the argument,
or, where the argument is valid (a huge loop bound), give the answer of the same call with a sane one.

The public functions then take one NaN, +inf or -inf in each float input, and must give the reference's
answer, NaN for NaN (§3: NaN and Inf propagate as IEEE arithmetic evaluates the formulas).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rlkernels

ops = torch.ops.rlkernels
O, T, I = 2, 5, 3  # canonical scan layout [O, T, I]
B, L = 3, 7  # PPO [B, L]
N, V = 4, 6  # logits [N, V]
A, S = 4, 3  # actions, states


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + len(shape)), dtype=torch.float64).to(
        dtype)


def _flags(*shape, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.3


def _valid_calls():
    """Op name -> (argument names, a valid argument tuple) for every op of csrc/ops.cpp."""
    r = _randn(O, T, I)
    flag = _flags(O, T, I)
    boot = _randn(O, I, seed=2)
    g = _randn(O, T, I, seed=3)
    scan_flags = (flag, _flags(O, T, I, seed=4), None, None)
    vt = ops.vtrace(r, _randn(O, T, I, seed=5), _randn(O, T, I, seed=6) * 0.1, None, boot, *scan_flags, 0.9, 0.95,
                    1.0, 1.0, 1.0, True)
    lp, old, adv = _randn(B, L), _randn(B, L, seed=7), _randn(B, L, seed=8)
    mask = _flags(B, L, seed=9)
    logits, tokens = _randn(N, V), torch.tensor([0, 5, 2, 3])
    _, entropy, lse = ops.gather_logprobs(logits, tokens, 1.0, True, None, False)
    hidden, weight, bias = _randn(N, 3, seed=17), _randn(V, 3, seed=18), _randn(V, seed=19)
    _, h_entropy, h_lse = ops.linear_logprobs(hidden, weight, tokens, bias, 1.0, True, None, 1.0, None, 2, V)
    q, actions, y = _randn(N, A), torch.tensor([0, 3, 1, 2]), _randn(N, seed=10)
    P = torch.softmax(_randn(2, S, A, S), -1)
    R, V0 = _randn(2, S, A, seed=11), _randn(2, S, seed=12)
    return {
        "linear_scan": (("a", "b", "initial", "reverse"), (r * 0.5, g, boot, True)),
        "discounted_returns": (
            ("rewards", "next_values", "bootstrap_value", "terminated", "truncated", "mask", "cu_seqlens", "gamma"),
            (r, g, None, *scan_flags, 0.9)),
        "discounted_returns_backward": (
            ("grad", "terminated", "truncated", "mask", "cu_seqlens", "rewards_like", "gamma", "has_next_values"),
            (g, *scan_flags, r, 0.9, True)),
        "gae": (("rewards", "values", "next_values", "bootstrap_value", "terminated", "truncated", "mask",
                 "cu_seqlens", "gamma", "lam"), (r, g, None, boot, *scan_flags, 0.9, 0.95)),
        "gae_backward": (("grad_advantages", "grad_returns", "terminated", "truncated", "mask", "cu_seqlens",
                          "rewards_like", "gamma", "lam", "has_next_values"), (g, r, *scan_flags, r, 0.9, 0.95, False)),
        "vtrace": (("rewards", "values", "log_rhos", "next_values", "bootstrap_value", "terminated", "truncated",
                    "mask", "cu_seqlens", "gamma", "lam", "rho_clip", "c_clip", "pg_rho_clip", "save_carries"),
                   (r, g, g * 0.1, None, boot, *scan_flags, 0.9, 0.95, 1.0, 1.0, 1.0, True)),
        "vtrace_backward": (("grad_vs", "grad_pg_advantages", "rewards", "values", "log_rhos", "next_values",
                             "saved_next_x", "saved_next_v", "terminated", "truncated", "mask", "cu_seqlens", "gamma",
                             "lam", "rho_clip", "c_clip", "pg_rho_clip"),
                            (g, g, r, _randn(O, T, I, seed=5), _randn(O, T, I, seed=6) * 0.1, None, vt[2], vt[3],
                             *scan_flags, 0.9, 0.95, 1.0, 1.0, 1.0)),
        "retrace": (("rewards", "q_taken", "next_v", "log_rhos", "terminated", "truncated", "mask", "cu_seqlens",
                     "gamma", "lam", "c_clip"), (r, g, boot.unsqueeze(1).expand(O, T, I).contiguous(), g * 0.1,
                                                 *scan_flags, 0.9, 0.95, 1.0)),
        "retrace_backward": (("grad", "targets", "q_taken", "log_rhos", "terminated", "truncated", "mask",
                              "cu_seqlens", "gamma", "lam", "c_clip"), (g, r, g, g * 0.1, *scan_flags, 0.9, 0.95, 1.0)),
        "ppo_policy_loss": (("logp", "old_logp", "advantages", "mask", "clip_low", "clip_high", "dual_clip", "agg",
                             "norm_length"), (lp, old, adv, mask, 0.2, 0.2, 3.0, "token-mean", float(L))),
        "ppo_policy_loss_backward": (("grad_loss", "logp", "old_logp", "advantages", "mask", "clip_low", "clip_high",
                                      "dual_clip", "agg", "norm_length"),
                                     (torch.tensor(1.0), lp, old, adv, mask, 0.2, 0.2, 3.0, "token-mean", float(L))),
        "value_loss": (("values", "old_values", "returns", "mask", "clip", "agg"),
                       (lp, old, adv, mask, 0.2, "token-mean")),
        "value_loss_backward": (("grad_loss", "values", "old_values", "returns", "mask", "clip", "agg"),
                                (torch.tensor(1.0), lp, old, adv, mask, 0.2, "token-mean")),
        "kl_penalty": (("logp", "ref_logp", "kind"), (lp, old, "k3")),
        "kl_penalty_backward": (("grad", "logp", "ref_logp", "kind"), (adv, lp, old, "k3")),
        "gather_logprobs": (("logits", "tokens", "temperature", "return_entropy", "ignore_index", "inplace_backward"),
                            (logits, tokens, 1.0, True, None, False)),
        "gather_logprobs_backward": (("grad_logp", "grad_entropy", "logits", "tokens", "lse", "entropy",
                                      "temperature", "ignore_index"),
                                     (_randn(N, seed=13), _randn(N, seed=14), logits, tokens, lse, entropy, 1.0, None)),
        "gather_logprobs_backward_inplace": (("grad_logp", "grad_entropy", "logits", "tokens", "lse", "entropy",
                                              "temperature", "ignore_index"),
                                             (_randn(N, seed=13), _randn(N, seed=14), logits.clone(), tokens, lse,
                                              entropy, 1.0, None)),
        "linear_logprobs": (("hidden", "weight", "tokens", "bias", "temperature", "return_entropy", "ignore_index",
                             "logit_scale", "softcap", "chunk_size", "vocab_tile"),
                            (hidden, weight, tokens, bias, 1.0, True, None, 1.0, None, 2, V)),
        "linear_logprobs_backward": (("grad_logp", "grad_entropy", "hidden", "weight", "tokens", "bias", "lse",
                                      "entropy", "temperature", "ignore_index", "logit_scale", "softcap", "chunk_size",
                                      "vocab_tile", "need_hidden", "need_weight", "need_bias"),
                                     (_randn(N, seed=13), _randn(N, seed=14), hidden, weight, tokens, bias, h_lse,
                                      h_entropy, 1.0, None, 1.0, None, 2, V, True, True, True)),
        "q_targets": (("rewards", "next_q", "terminated", "next_q_online", "next_probs", "discount", "kind",
                       "temperature"), (y, q, _flags(N), None, torch.softmax(q, -1), 0.9, "expected", 1.0)),
        "td_loss": (("q", "actions", "targets", "weights", "loss", "delta", "reduction"),
                    (q, actions, y, _randn(N, seed=15).abs(), "huber", 1.0, "mean")),
        "td_loss_backward": (("grad_loss", "grad_td_errors", "q", "actions", "targets", "weights", "loss", "delta",
                              "reduction", "td_errors"),
                             (torch.tensor(1.0), _randn(N, seed=16), q, actions, y, None, "huber", 1.0, "mean",
                              None)),
        "n_step_returns": (("rewards", "values", "next_values", "bootstrap_value", "terminated", "truncated", "gamma",
                            "n"), (r, g, None, boot, flag, None, 0.9, 3)),
        "n_step_returns_backward": (("grad", "terminated", "truncated", "rewards_like", "gamma", "n",
                                     "has_next_values"), (g, flag, None, r, 0.9, 3, False)),
        "bellman_backup": (("P", "R", "V", "gamma"), (P, R, V0, 0.9)),
        "value_iteration": (("P", "R", "V0", "gamma", "tol", "max_iters"), (P, R, V0, 0.9, 1e-6, 50)),
    }


VALID = _valid_calls()
# Every op of the library's schema (csrc/ops.cpp); the Triton ops (triton_*) are registered from Python and the
# underscored ones are the benchmark's helpers.
REGISTERED = sorted({name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                     if name.startswith("rlkernels::") and not name.split("::")[1].startswith(("_", "triton_"))})

# Arguments that are read only for their shape or dtype, or may take any shape (a 0-d upstream gradient is read as
# one value): spoiling their element count is not an error.
SHAPE_FREE = {("ppo_policy_loss_backward", "grad_loss"), ("value_loss_backward", "grad_loss"),
              ("td_loss_backward", "grad_loss")}
# Float arguments that the op converts from any dtype (the upstream gradients, read in the accumulation dtype).
ANY_DTYPE = {"grad", "grad_advantages", "grad_returns", "grad_vs", "grad_pg_advantages", "grad_loss",
             "grad_td_errors", "grad_logp", "grad_entropy", "rewards_like", "saved_next_x", "saved_next_v", "lse",
             "entropy", "targets", "td_errors", "weights"}
FLAG_ARGS = {"terminated", "truncated", "mask"}
INDEX_ARGS = {"tokens", "actions"}


def _spoiled(t, how):
    if how == "one element":
        return t.reshape(-1)[:1].clone()
    if how == "empty":
        return t.new_empty((0,))
    if how == "extra dim":
        return t.unsqueeze(0)
    if how == "int dtype":
        return t.to(torch.int32)
    if how == "float dtype":
        return t.to(torch.float32)
    raise ValueError(how)


def _cases():
    for op, (names, args) in VALID.items():
        for i, (name, value) in enumerate(zip(names, args, strict=True)):
            if not isinstance(value, torch.Tensor):
                continue
            hows = ["one element", "empty", "extra dim"]
            if (op, name) in SHAPE_FREE:
                hows = []
            if name == "entropy":  # none (the forward without entropy) is valid: test_entropy_without_rows
                hows.remove("empty")
            if name in INDEX_ARGS or name in FLAG_ARGS:
                hows.append("float dtype")
            elif name not in ANY_DTYPE:
                hows.append("int dtype")
            for how in hows:
                yield pytest.param(op, i, name, how, id=f"{op}-{name}-{how}")


def _expect_error(op, args, name):
    with pytest.raises((ValueError, TypeError, RuntimeError, IndexError)) as info:
        getattr(ops, op)(*args)
    assert name in str(info.value), f"the error of {op} does not name {name}: {info.value}"


def test_every_registered_op_has_a_valid_call():
    assert sorted(VALID) == REGISTERED
    for op, (names, args) in VALID.items():
        schema = getattr(ops, op).default._schema
        assert [a.name for a in schema.arguments] == list(names), op
        getattr(ops, op)(*args)  # valid: no error


@pytest.mark.parametrize("op, i, name, how", list(_cases()))
def test_spoiled_tensor_argument_is_an_error_naming_it(op, i, name, how):
    args = list(VALID[op][1])
    args[i] = _spoiled(args[i], how)
    _expect_error(op, args, name)


@pytest.mark.parametrize("bad", [-7, 6, 10**6, -(2**62)])
@pytest.mark.parametrize("op", ["gather_logprobs", "gather_logprobs_backward", "gather_logprobs_backward_inplace"])
def test_token_out_of_range_is_an_error(op, bad):
    names, args = VALID[op]
    args = list(args)
    i = names.index("tokens")
    args[i] = args[i].clone()
    args[i][1] = bad
    _expect_error(op, args, "tokens")


@pytest.mark.parametrize("bad", [-7, 4, 10**6])
@pytest.mark.parametrize("op", ["td_loss", "td_loss_backward"])
def test_action_out_of_range_is_an_error(op, bad):
    names, args = VALID[op]
    args = list(args)
    i = names.index("actions")
    args[i] = args[i].clone()
    args[i][2] = bad
    _expect_error(op, args, "actions")


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf, 1e-39])
@pytest.mark.parametrize("op", ["gather_logprobs", "gather_logprobs_backward", "q_targets"])
def test_temperature_out_of_range_is_an_error(op, temperature):
    names, args = VALID[op]
    args = list(args)
    args[names.index("temperature")] = temperature
    if op == "q_targets":
        args[names.index("kind")] = "soft"
    _expect_error(op, args, "temperature")


@pytest.mark.parametrize("op", ["gather_logprobs_backward", "gather_logprobs_backward_inplace"])
def test_entropy_without_rows(op):
    # grad_entropy is read only with N entropy values: one entropy value for N rows is an error, none is valid
    names, args = VALID[op]
    bad = list(args)
    bad[names.index("entropy")] = args[names.index("entropy")][:1].clone()
    _expect_error(op, bad, "entropy")
    ok = list(args)
    ok[names.index("entropy")] = args[names.index("entropy")][:0]
    ok[names.index("grad_entropy")] = None
    getattr(ops, op)(*ok)


def test_inplace_backward_refuses_overlapping_rows():
    names, args = VALID["gather_logprobs_backward_inplace"]
    args = list(args)
    row = _randn(1, V)
    args[names.index("logits")] = row.expand(N, V)
    _expect_error("gather_logprobs_backward_inplace", args, "logits")
    assert torch.equal(row, _randn(1, V))  # not written


@pytest.mark.parametrize("n", [10**9, 2**40, 2**62])
def test_n_step_returns_huge_n_is_the_whole_tail(n):
    # a window longer than the data is the whole tail: n = T gives the same, forward and backward, at once
    for op in ("n_step_returns", "n_step_returns_backward"):
        names, args = VALID[op]
        args = list(args)
        args[names.index("n")] = T
        expected = getattr(ops, op)(*args)
        args[names.index("n")] = n
        got = getattr(ops, op)(*args)
        for e, g in zip(expected if isinstance(expected, tuple) else (expected,),
                        got if isinstance(got, tuple) else (got,)):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [[1, 5, 30], [0, 20, 10, 30], [0, 10, 31], [-1, 10, 30]])
@pytest.mark.parametrize("op", ["discounted_returns", "discounted_returns_backward", "gae", "gae_backward",
                                "vtrace", "vtrace_backward", "retrace", "retrace_backward"])
def test_bad_cu_seqlens_values_are_an_error(op, bad):
    # the call made packed: [O, T, I] tensors flattened to 30 steps, no per-sequence bootstrap values
    names, args = VALID[op]
    args = [a.reshape(-1) if isinstance(a, torch.Tensor) and a.shape == (O, T, I) else a for a in args]
    args = [None if n == "bootstrap_value" else a for n, a in zip(names, args, strict=True)]
    args[names.index("cu_seqlens")] = torch.tensor([0, 10, 10, 30])
    getattr(ops, op)(*args)  # valid offsets: no error
    args[names.index("cu_seqlens")] = torch.tensor(bad)
    _expect_error(op, args, "cu_seqlens")


# ----------------------------------------------------------------------------------------------------
# NaN and Inf in the public functions: the reference's answer
# ----------------------------------------------------------------------------------------------------


def _public_calls():
    """Public function name -> (float inputs by name, other keyword arguments)."""
    r, v = _randn(T, I), _randn(T, I, seed=3)
    lp, old, adv = _randn(B, L), _randn(B, L, seed=7), _randn(B, L, seed=8)
    q = _randn(N, A)
    return {
        "discounted_returns": ({"rewards": r}, {"gamma": 0.9}),
        "gae": ({"rewards": r, "values": v}, {"gamma": 0.9, "lam": 0.95}),
        "vtrace": ({"rewards": r, "values": v, "log_rhos": _randn(T, I, seed=5) * 0.1}, {"gamma": 0.9}),
        "retrace": ({"rewards": r, "q_taken": v, "next_v": _randn(T, I, seed=6), "log_rhos": _randn(T, I, seed=5)},
                    {"gamma": 0.9, "lam": 0.95}),
        "n_step_returns": ({"rewards": r, "values": v}, {"gamma": 0.9, "n": 3}),
        "ppo_policy_loss": ({"logp": lp, "old_logp": old, "advantages": adv}, {"dual_clip": 3.0}),
        "value_loss": ({"values": lp, "old_values": old, "returns": adv}, {"clip": 0.2}),
        "kl_penalty": ({"logp": lp, "ref_logp": old}, {"kind": "k2"}),
        "gather_logprobs": ({"logits": _randn(N, V)}, {"tokens": torch.tensor([0, 5, 2, 3]),
                                                        "return_entropy": True}),
        "q_targets": ({"rewards": _randn(N), "next_q": q}, {"kind": "max"}),
        "td_loss": ({"q": q, "targets": _randn(N, seed=10)}, {"actions": torch.tensor([0, 3, 1, 2])}),
        "bellman_backup": ({"R": _randn(2, S, A, seed=11), "V": _randn(2, S, seed=12)},
                           {"P": torch.softmax(_randn(2, S, A, S), -1)}),
    }


def _flat(out):
    if isinstance(out, dict):
        return [x for k in sorted(out) for x in _flat(out[k])]
    if isinstance(out, (tuple, list)):
        return [x for o in out for x in _flat(o)]
    return [np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out, dtype=np.float64)]


def _nan_cases():
    for fn, (floats, _) in _public_calls().items():
        for name in floats:
            for value in ("nan", "inf", "-inf"):
                yield pytest.param(fn, name, value, id=f"{fn}-{name}-{value}")


@pytest.mark.parametrize("fn, name, value", list(_nan_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_and_inf_give_the_reference_answer(fn, name, value, dtype):
    floats, kwargs = _public_calls()[fn]
    floats = {k: t.to(dtype) for k, t in floats.items()}
    spoiled = floats[name].clone()
    spoiled.view(-1)[spoiled.numel() // 2] = float(value)
    floats[name] = spoiled
    call = {**kwargs, **floats}
    if "P" in call:
        call["P"] = call["P"].to(dtype)
    got = getattr(rlkernels, fn)(**call, backend="cpu")
    expected = getattr(rlkernels, fn)(**call, backend="reference")
    got, expected = _flat(got), _flat(expected)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(e), err_msg=f"{fn}: NaN where the reference has none "
                                                                        "(or the reverse)")
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_reference_and_kernel_agree_on_zero_size_inputs():
    # empty batches, vocabularies, time axes and state sets: one behaviour for the kernels and the reference
    cases = [
        lambda b: rlkernels.gae(torch.zeros(0, 3), torch.zeros(0, 3), backend=b),
        lambda b: rlkernels.gather_logprobs(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), backend=b),
        lambda b: rlkernels.value_iteration(torch.zeros(2, 0, 3, 0), torch.zeros(2, 0, 3), backend=b),
        lambda b: rlkernels.bellman_backup(torch.zeros(2, 0, 3, 0), torch.zeros(2, 0, 3), torch.zeros(2, 0),
                                           backend=b),
        lambda b: rlkernels.q_targets(torch.zeros(0), torch.zeros(0, 3), backend=b),
        lambda b: rlkernels.n_step_returns(torch.zeros(0, 3), torch.zeros(0, 3), n=3, backend=b),
        lambda b: rlkernels.ppo_policy_loss(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3), backend=b),
    ]
    for case in cases:
        got, expected = _flat(case("cpu")), _flat(case("reference"))
        assert [g.shape for g in got] == [e.shape for e in expected]
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e)
