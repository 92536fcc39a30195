"""Bad inputs (docs/design.md §3): every public function of the scan family rejects them with a ValueError,
TypeError or RuntimeError whose message names the offending argument.

Each case builds a valid call of one public function and spoils one argument. The cases run on the
cpu backend; the checks that live in the kernels or the reference (cu_seqlens values) run on both.
"""

from __future__ import annotations

import re

import pytest
import torch

import rlkernels

T, B = 5, 2
SCAN_OPS = ("discounted_returns", "gae", "vtrace")
FLOAT_INPUTS = {  # float tensor inputs (positional and keyword) of each function, besides bootstrap_value
    "linear_scan": ("a", "b"),
    "discounted_returns": ("rewards", "next_values"),
    "gae": ("rewards", "values", "next_values"),
    "vtrace": ("rewards", "values", "log_rhos", "next_values"),
}
POSITIONAL = {
    "linear_scan": ("a", "b"),
    "discounted_returns": ("rewards",),
    "gae": ("rewards", "values"),
    "vtrace": ("rewards", "values", "log_rhos"),
}
FLAGS = ("terminated", "truncated", "mask")


def _valid(op, shape=(T, B), packed=False):
    """A valid call of `op`: (tensors by name, other keyword arguments)."""
    g = torch.Generator().manual_seed(0)

    def randn(sh=shape):
        return torch.randn(sh, generator=g)

    if op == "linear_scan":
        return {"a": randn(), "b": randn()}, {}
    tensors = {"rewards": randn()}
    if op in ("gae", "vtrace"):
        tensors["values"] = randn()
    if op == "vtrace":
        tensors["log_rhos"] = randn()
    return tensors, {"gamma": 0.9}


def _call(op, tensors, kwargs, backend="cpu"):
    fn = getattr(rlkernels, op)
    args = [tensors[n] for n in POSITIONAL[op]]
    kw = {k: v for k, v in tensors.items() if k not in POSITIONAL[op]}
    kw.update(kwargs)
    return fn(*args, backend=backend, **kw)


def _raises(op, tensors, kwargs, exc, name, backend="cpu"):
    # The message must name the argument as a word (so "a" does not match inside "values").
    with pytest.raises(exc, match=rf"\b{re.escape(name)}\b") as info:
        _call(op, tensors, kwargs, backend)
    return info


ALL_OPS = ("linear_scan",) + SCAN_OPS


def test_valid_calls_run():
    # the baselines the cases below spoil are valid
    for op in ALL_OPS:
        tensors, kwargs = _valid(op)
        out = _call(op, tensors, kwargs)
        out = out if isinstance(out, tuple) else (out,)
        assert all(torch.isfinite(o).all() and o.abs().sum() > 0 for o in out)


# ----------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------


def _shape_cases():
    for op in ALL_OPS:
        for name in FLOAT_INPUTS[op][1:] if op != "linear_scan" else ("a",):
            yield pytest.param(op, name, id=f"{op}-{name}")
        if op != "linear_scan":
            for name in FLAGS:
                yield pytest.param(op, name, id=f"{op}-{name}")


@pytest.mark.parametrize("op,name", list(_shape_cases()))
@pytest.mark.parametrize("bad_shape", [(T, B + 1), (T + 1, B), (T, B, 1)], ids=["B+1", "T+1", "extra_dim"])
def test_shape_mismatch(op, name, bad_shape):
    tensors, kwargs = _valid(op)
    bad = torch.ones(bad_shape, dtype=torch.bool) if name in FLAGS else torch.randn(bad_shape)
    tensors[name] = bad
    if name == "truncated":
        tensors["next_values"] = torch.randn(T, B)
    info = _raises(op, tensors, kwargs, ValueError, name)
    assert str(tuple(bad_shape)) in str(info.value)  # says what it got


@pytest.mark.parametrize("op", ALL_OPS)
def test_bootstrap_or_initial_shape(op):
    name = "initial" if op == "linear_scan" else "bootstrap_value"
    for bad in (torch.randn(T), torch.randn(B, 1), torch.randn(T, B), torch.randn(B + 1)):
        tensors, kwargs = _valid(op)
        tensors[name] = bad
        info = _raises(op, tensors, kwargs, ValueError, name)
        assert f"({B},)" in str(info.value)  # names the expected shape


@pytest.mark.parametrize("op", SCAN_OPS)
def test_bootstrap_shape_with_leading_dims_and_time_dim(op):
    # [B1, T, B2] with time_dim=1: one value per sequence is [B1, B2]
    tensors, kwargs = _valid(op, shape=(3, T, 4))
    kwargs["time_dim"] = 1
    tensors["bootstrap_value"] = torch.randn(3, 4)
    _call(op, tensors, kwargs)  # valid
    tensors["bootstrap_value"] = torch.randn(4, 3)
    _raises(op, tensors, kwargs, ValueError, "bootstrap_value")
    tensors["bootstrap_value"] = torch.randn(12)
    _raises(op, tensors, kwargs, ValueError, "bootstrap_value")


@pytest.mark.parametrize("op", ALL_OPS)
def test_zero_dim_input(op):
    tensors, kwargs = _valid(op, shape=())
    _raises(op, tensors, kwargs, ValueError, POSITIONAL[op][-1] if op == "linear_scan" else "rewards")


# ----------------------------------------------------------------------------------------------------
# Dtypes: integer or bool tensors where float values are required
# ----------------------------------------------------------------------------------------------------


def _dtype_cases():
    for op in ALL_OPS:
        names = FLOAT_INPUTS[op] + (("initial",) if op == "linear_scan" else ("bootstrap_value",))
        for name in names:
            for dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
                yield pytest.param(op, name, dtype, id=f"{op}-{name}-{dtype}")


@pytest.mark.parametrize("op,name,dtype", list(_dtype_cases()))
def test_non_float_values_rejected(op, name, dtype):
    tensors, kwargs = _valid(op)
    shape = (B,) if name in ("initial", "bootstrap_value") else (T, B)
    tensors[name] = torch.ones(shape, dtype=dtype)
    _raises(op, tensors, kwargs, TypeError, name)


@pytest.mark.parametrize("op", ALL_OPS)
def test_non_tensor_inputs_rejected(op):
    for name in POSITIONAL[op]:
        for bad in (None, [[1.0, 2.0]] * T, 1.0):
            tensors, kwargs = _valid(op)
            tensors[name] = bad
            _raises(op, tensors, kwargs, TypeError, name)
    if op != "linear_scan":
        tensors, kwargs = _valid(op)
        tensors["bootstrap_value"] = "zero"
        _raises(op, tensors, kwargs, TypeError, "bootstrap_value")
        for name in ("terminated", "mask"):
            tensors, kwargs = _valid(op)
            tensors[name] = [[0, 1]] * T
            _raises(op, tensors, kwargs, TypeError, name)
    else:
        tensors, kwargs = _valid(op)
        tensors["initial"] = "zero"
        _raises(op, tensors, kwargs, TypeError, "initial")


@pytest.mark.parametrize("op", SCAN_OPS)
@pytest.mark.parametrize("name", FLAGS)
def test_complex_flags_rejected(op, name):
    tensors, kwargs = _valid(op)
    tensors[name] = torch.ones(T, B, dtype=torch.complex64)
    if name == "truncated":
        tensors["next_values"] = torch.randn(T, B)
    _raises(op, tensors, kwargs, TypeError, name)


@pytest.mark.parametrize("op", SCAN_OPS)
@pytest.mark.parametrize("name", FLAGS)
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.float32, torch.float64])
def test_flag_dtypes_accepted(op, name, dtype):
    # bool, uint8 and float 0/1 flags (docs/design.md §3) give identical results
    tensors, kwargs = _valid(op)
    flag = torch.tensor([[0, 1], [1, 0], [0, 0], [1, 1], [0, 1]]).bool()
    if name == "truncated":
        tensors["next_values"] = torch.randn(T, B)
    expected = _call(op, {**tensors, name: flag}, kwargs)
    got = _call(op, {**tensors, name: flag.to(dtype)}, kwargs)
    for e, g in zip(
        expected if isinstance(expected, tuple) else (expected,), got if isinstance(got, tuple) else (got,)
    ):
        assert torch.equal(e, g)
    unflagged = _call(op, tensors, kwargs)
    assert not torch.equal(
        unflagged[0] if isinstance(unflagged, tuple) else unflagged,
        expected[0] if isinstance(expected, tuple) else expected,
    )


# ----------------------------------------------------------------------------------------------------
# Devices: "meta" stands in for a second device where no GPU exists
# ----------------------------------------------------------------------------------------------------


def _second_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("meta")


def _device_cases():
    for op in ALL_OPS:
        names = FLOAT_INPUTS[op] + (
            ("initial",) if op == "linear_scan" else ("bootstrap_value", "cu_seqlens") + FLAGS
        )
        for name in names:
            yield pytest.param(op, name, id=f"{op}-{name}")


@pytest.mark.parametrize("op,name", list(_device_cases()))
def test_mixed_devices(op, name):
    dev = _second_device()
    if name == "cu_seqlens":
        tensors, kwargs = _valid(op, shape=(T * B,))
        kwargs["cu_seqlens"] = torch.tensor([0, 4, T * B], device=dev)
    else:
        tensors, kwargs = _valid(op)
        if name in ("initial", "bootstrap_value"):
            tensors[name] = torch.randn(B, device=dev)
        elif name in FLAGS:
            tensors[name] = torch.ones(T, B, dtype=torch.bool, device=dev)
        else:
            tensors[name] = torch.randn(T, B, device=dev)
        if name == "truncated":
            tensors["next_values"] = torch.randn(T, B)
        if name == "rewards" and op == "discounted_returns":
            tensors["mask"] = torch.ones(T, B, dtype=torch.bool)  # another tensor, left on the CPU
    info = _raises(op, tensors, kwargs, ValueError, name)
    assert dev.type in str(info.value) and "cpu" in str(info.value)


# ----------------------------------------------------------------------------------------------------
# Scalars: gamma, lam, clips
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", SCAN_OPS)
@pytest.mark.parametrize("name", ["gamma", "lam"])
@pytest.mark.parametrize("value", [-0.1, 1.0001, 2.0, float("nan"), float("inf"), -1e-12])
def test_discount_outside_unit_interval(op, name, value):
    if name == "lam" and op == "discounted_returns":
        pytest.skip("discounted_returns has no lam")
    tensors, kwargs = _valid(op)
    kwargs[name] = value
    info = _raises(op, tensors, kwargs, ValueError, name)
    assert "[0, 1]" in str(info.value)


@pytest.mark.parametrize("op", SCAN_OPS)
@pytest.mark.parametrize("name", ["gamma", "lam"])
@pytest.mark.parametrize(
    "value", ["0.9", None, True, torch.tensor(True)], ids=["str", "None", "bool", "bool-tensor"]
)
def test_discount_wrong_type(op, name, value):
    if name == "lam" and op == "discounted_returns":
        pytest.skip("discounted_returns has no lam")
    tensors, kwargs = _valid(op)
    kwargs[name] = value
    _raises(op, tensors, kwargs, TypeError, name)


@pytest.mark.parametrize("op", SCAN_OPS)
@pytest.mark.parametrize("name", ["gamma", "lam"])
def test_discount_bounds_are_valid(op, name):
    if name == "lam" and op == "discounted_returns":
        pytest.skip("discounted_returns has no lam")
    tensors, kwargs = _valid(op)
    results = []
    for value in (0.0, 1.0, 1):
        out = _call(op, tensors, {**kwargs, name: value})
        results.append(out[0] if isinstance(out, tuple) else out)
    assert torch.equal(results[1], results[2]) and not torch.equal(results[0], results[1])


@pytest.mark.parametrize("name", ["rho_clip", "c_clip", "pg_rho_clip"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_vtrace_clips_must_be_positive(name, value):
    tensors, kwargs = _valid("vtrace")
    kwargs[name] = value
    _raises("vtrace", tensors, kwargs, ValueError, name)


@pytest.mark.parametrize("name", ["rho_clip", "c_clip", "pg_rho_clip"])
def test_vtrace_clips_wrong_type(name):
    tensors, kwargs = _valid("vtrace")
    kwargs[name] = "1.0"
    _raises("vtrace", tensors, kwargs, TypeError, name)


# ----------------------------------------------------------------------------------------------------
# truncated without next_values
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", SCAN_OPS)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_truncated_requires_next_values(op, backend):
    tensors, kwargs = _valid(op)
    tensors["truncated"] = torch.zeros(T, B, dtype=torch.bool)
    info = _raises(op, tensors, kwargs, ValueError, "truncated", backend=backend)
    assert "next_values" in str(info.value)


# ----------------------------------------------------------------------------------------------------
# cu_seqlens
# ----------------------------------------------------------------------------------------------------

N = 10


def _packed(op, next_values=False):
    tensors, kwargs = _valid(op, shape=(N,))
    if next_values:
        tensors["next_values"] = torch.randn(N)
    return tensors, kwargs


@pytest.mark.parametrize("op", SCAN_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.uint8, torch.bool])
def test_cu_seqlens_wrong_dtype(op, dtype):
    tensors, kwargs = _packed(op)
    kwargs["cu_seqlens"] = torch.tensor([0, 4, N]).to(dtype)
    _raises(op, tensors, kwargs, TypeError, "cu_seqlens")


@pytest.mark.parametrize("op", SCAN_OPS)
@pytest.mark.parametrize("bad", [[[0, 4, N]], [], 3], ids=["2d", "empty", "0d"])
def test_cu_seqlens_wrong_rank(op, bad):
    tensors, kwargs = _packed(op)
    kwargs["cu_seqlens"] = torch.tensor(bad, dtype=torch.int64)
    _raises(op, tensors, kwargs, TypeError, "cu_seqlens")


@pytest.mark.parametrize("op", SCAN_OPS)
def test_cu_seqlens_not_a_tensor(op):
    tensors, kwargs = _packed(op)
    kwargs["cu_seqlens"] = [0, 4, N]
    _raises(op, tensors, kwargs, TypeError, "cu_seqlens")


@pytest.mark.parametrize("op", SCAN_OPS)
@pytest.mark.parametrize("shape", [(N, 1), (2, N // 2)])
def test_cu_seqlens_needs_1d_inputs(op, shape):
    tensors, kwargs = _valid(op, shape=shape)
    kwargs["cu_seqlens"] = torch.tensor([0, 4, N])
    _raises(op, tensors, kwargs, ValueError, "rewards")


_BAD_OFFSETS = {
    "non_monotonic": [0, 6, 4, N],
    "last_short": [0, 4, N - 1],
    "last_long": [0, 4, N + 3],
    "first_not_zero": [1, 4, N],
    "negative": [0, -2, N],
}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("next_values", [False, True], ids=["bootstrap", "next_values"])
@pytest.mark.parametrize("case", list(_BAD_OFFSETS))
@pytest.mark.parametrize("op", SCAN_OPS)
def test_cu_seqlens_bad_offsets(op, case, next_values, backend):
    tensors, kwargs = _packed(op, next_values=next_values)
    for dtype in (torch.int32, torch.int64):
        kwargs["cu_seqlens"] = torch.tensor(_BAD_OFFSETS[case], dtype=dtype)
        _raises(op, tensors, kwargs, ValueError, "cu_seqlens", backend=backend)


@pytest.mark.parametrize("op", SCAN_OPS)
def test_cu_seqlens_bootstrap_shape(op):
    tensors, kwargs = _packed(op)
    kwargs["cu_seqlens"] = torch.tensor([0, 4, 4, N])
    tensors["bootstrap_value"] = torch.randn(3)
    _call(op, tensors, kwargs)  # valid: one per segment, empty ones included
    tensors["bootstrap_value"] = torch.randn(2)
    info = _raises(op, tensors, kwargs, ValueError, "bootstrap_value")
    assert "(3,)" in str(info.value)


# ----------------------------------------------------------------------------------------------------
# time_dim and backend
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("time_dim", [2, -3, 100])
def test_time_dim_out_of_range(op, time_dim):
    tensors, kwargs = _valid(op)
    kwargs["time_dim"] = time_dim
    info = _raises(op, tensors, kwargs, ValueError, "time_dim")
    assert str(time_dim) in str(info.value)


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("time_dim", [1.0, "0", None, True])
def test_time_dim_wrong_type(op, time_dim):
    tensors, kwargs = _valid(op)
    kwargs["time_dim"] = time_dim
    _raises(op, tensors, kwargs, TypeError, "time_dim")


@pytest.mark.parametrize("op", ALL_OPS)
def test_unknown_backend(op):
    tensors, kwargs = _valid(op)
    info = _raises(op, tensors, kwargs, RuntimeError, "backend", backend="numpy")
    assert "numpy" in str(info.value) and "reference" in str(info.value)  # lists the valid ones
    _raises(op, tensors, kwargs, TypeError, "backend", backend=1)


@pytest.mark.parametrize("op", ALL_OPS)
def test_unknown_backend_from_environment(op, monkeypatch):
    monkeypatch.setenv("RLKERNELS_BACKEND", "numpy")
    tensors, kwargs = _valid(op)
    _raises(op, tensors, kwargs, RuntimeError, "backend", backend=None)


# ----------------------------------------------------------------------------------------------------
# Arguments taken as given or refused, never replaced (no silent change of meaning)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_norm_length_below_one_is_used_as_given(backend):
    g = torch.Generator().manual_seed(0)
    logp, old, adv = (torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(3))
    loss, _ = rlkernels.ppo_policy_loss(logp, old, adv, agg="seq-mean-token-sum-norm", norm_length=0.5,
                                        backend=backend)
    one, _ = rlkernels.ppo_policy_loss(logp, old, adv, agg="seq-mean-token-sum-norm", norm_length=1.0,
                                       backend=backend)
    torch.testing.assert_close(loss, 2 * one, rtol=1e-12, atol=0)  # sum(l m) / (B * norm_length)


@pytest.mark.parametrize("op", ["bellman_backup", "value_iteration"])
def test_mdp_without_actions_is_an_error(op):
    P, R, V = torch.zeros(2, 3, 0, 3), torch.zeros(2, 3, 0), torch.zeros(2, 3)
    args = (P, R, V) if op == "bellman_backup" else (P, R)
    with pytest.raises(ValueError, match=r"P must have at least one action"):
        getattr(rlkernels, op)(*args, 0.9)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("time_dim", [1, -2, 5])
def test_time_dim_out_of_range_with_cu_seqlens(backend, time_dim):
    r, cu = torch.randn(5), torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match="time_dim"):
        rlkernels.discounted_returns(r, cu_seqlens=cu, time_dim=time_dim, backend=backend)
    # 0 and -1 both name the one axis of packed inputs
    a = rlkernels.discounted_returns(r, cu_seqlens=cu, time_dim=0, backend=backend)
    b = rlkernels.discounted_returns(r, cu_seqlens=cu, time_dim=-1, backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["gae", "discounted_returns", "vtrace", "n_step_returns"])
def test_bool_bootstrap_value_is_refused(op):
    r = torch.randn(4, 2)
    args = {"gae": (r, r), "discounted_returns": (r,), "vtrace": (r, r, r), "n_step_returns": (r, r)}[op]
    kw = {"n": 2} if op == "n_step_returns" else {}
    with pytest.raises(TypeError, match="bootstrap_value"):
        getattr(rlkernels, op)(*args, bootstrap_value=True, **kw)


# ----------------------------------------------------------------------------------------------------
# Meta tensors (shape inference): the C++ ops' fake kernels, not the NumPy reference
# ----------------------------------------------------------------------------------------------------


def _every_op_call(dev):
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(dev)

    def b(*shape):
        return (torch.rand(*shape, generator=g) < 0.2).to(dev)

    def i(high, *shape):
        return torch.randint(0, high, shape, generator=g).to(dev)

    r, v = t(6, 3), t(6, 3)
    P = t(2, 3, 2, 3).softmax(-1)
    return {
        "linear_scan": rlkernels.linear_scan(t(6, 3), t(6, 3)),
        "discounted_returns": rlkernels.discounted_returns(r, terminated=b(6, 3)),
        "gae": rlkernels.gae(r, v, terminated=b(6, 3)),
        "gae masked": rlkernels.gae(t(3, 6), t(3, 6), mask=b(3, 6), time_dim=-1),
        "vtrace": rlkernels.vtrace(r, v, t(6, 3)),
        "retrace": rlkernels.retrace(r, v, t(6, 3), t(6, 3), gamma=0.9, lam=0.9),
        "gather_logprobs": rlkernels.gather_logprobs(t(4, 10), i(10, 4), return_entropy=True),
        "linear_logprobs": rlkernels.linear_logprobs(t(2, 3, 5), t(10, 5), i(10, 2, 3), bias=t(10),
                                                     return_entropy=True, softcap=3.0),
        "ppo_policy_loss": rlkernels.ppo_policy_loss(t(2, 5), t(2, 5), t(2, 5)),
        "value_loss": rlkernels.value_loss(t(2, 5), t(2, 5), t(2, 5), clip=0.2),
        "kl_penalty": rlkernels.kl_penalty(t(2, 5), t(2, 5), "k3"),
        "q_targets": rlkernels.q_targets(t(4), t(4, 3)),
        "td_loss": rlkernels.td_loss(t(4, 3), i(3, 4), t(4)),
        "n_step_returns": rlkernels.n_step_returns(r, v, n=2),
        "bellman_backup": rlkernels.bellman_backup(P, t(2, 3, 2), t(2, 3)),
        "value_iteration": rlkernels.value_iteration(P, t(2, 3, 2), max_iters=3),
    }


def _shapes(x):
    if isinstance(x, torch.Tensor):
        return [(tuple(x.shape), x.dtype, x.device.type)]
    values = x.values() if isinstance(x, dict) else x
    return [s for v in values for s in _shapes(v)]


def test_meta_tensors_give_the_shapes_and_dtypes_of_cpu_outputs():
    cpu, meta = _every_op_call("cpu"), _every_op_call("meta")
    for name in cpu:
        want = [(shape, dtype, "meta") for shape, dtype, _ in _shapes(cpu[name])]
        assert _shapes(meta[name]) == want, name
