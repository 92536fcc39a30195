"""Shared test machinery: the Triton interpreter switch, the backends to test, the one closeness check
(`assert_close`, per-dtype TOLERANCES), the input factories, hypothesis profiles and the `cuda` marker.

`sample_inputs(op, shape, dtype=, device=, seed=, ...)` is the one sample-input factory per family behind the
correctness, gradient and opcheck tests (in the spirit of pytorch/extension-cpp's `sample_inputs`); for the
scan family it is `make_inputs`, which builds the arguments of a public function for any shape / layout /
flag combination, and `Sample` turns them into a kernel call, a reference call or the canonical arguments of
the raw custom op. `backends(op, ...)` parameterizes a test over cpu, triton and cuda (`device_for(backend)`
says where its inputs live).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# ----------------------------------------------------------------------------------------------------
# The Triton interpreter, once for the session. `@triton.jit` decides when a kernel is decorated (at the
# import of rlkernels.triton.*) whether it is compiled for a GPU or run by the interpreter, and only
# interpreted kernels take CPU tensors. Without a CUDA device the Triton tests need the interpreter, so it
# is switched on here, before any test module imports triton or rlkernels; an explicit TRITON_INTERPRET
# (scripts/test.sh exports 1) is left as it is.
# ----------------------------------------------------------------------------------------------------

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before tests/conftest.py set TRITON_INTERPRET"
    os.environ["TRITON_INTERPRET"] = "1"

# ----------------------------------------------------------------------------------------------------
# Hypothesis profiles: "ci" (default) keeps the whole suite within minutes on 2 cores; "dev" digs deeper.
# ----------------------------------------------------------------------------------------------------

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=40,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=300,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ----------------------------------------------------------------------------------------------------
# Recording the Triton launches (RLKERNELS_TRITON_LAUNCHES=FILE, set by scripts/test.sh): every interpreted
# launch of an rlkernels Triton kernel is noted, and scripts/triton_aot.py compiles each specialization for
# the GPUs afterwards, so a kernel that interprets but would not compile fails CI.
# ----------------------------------------------------------------------------------------------------

_TRITON_LAUNCHES = os.environ.get("RLKERNELS_TRITON_LAUNCHES")


def _triton_aot():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "triton_aot.py"
    spec = importlib.util.spec_from_file_location("rlkernels_triton_aot", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if _TRITON_LAUNCHES:
    _AOT = _triton_aot()

    def pytest_sessionstart(session):
        _AOT.install_recorder()

    def pytest_sessionfinish(session, exitstatus):
        _AOT.write_records(_TRITON_LAUNCHES)


# ----------------------------------------------------------------------------------------------------
# Backends. A test of a kernel is parameterized over `backend` with `backends(op, ...)`: "cpu" always;
# "triton" (marked `triton`) when triton is importable, on CPU tensors under the interpreter and on CUDA
# tensors otherwise (then also marked `cuda`); "cuda" (marked `cuda`) on a CUDA device with the ops' CUDA
# kernels registered. Tests sized for a GPU take `gpu_backends(op, ...)`: "cuda" and "triton" on CUDA
# tensors. A backend that cannot run here is a skipped case, so `-m cuda`, `-m triton` or `-m "cuda and not
# triton"` select subsets; `device_for(backend)` says where a backend's inputs live.
# ----------------------------------------------------------------------------------------------------


def triton_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_cuda_kernel(op: str) -> bool:
    """Whether rlkernels::<op> has a CUDA kernel registered (an rlkernels built with nvcc)."""
    import rlkernels  # noqa: F401  (registers the ops)

    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rlkernels::{op}", "CUDA")


def device_for(backend: str) -> str:
    """The device type of the tensors a backend is tested on."""
    if backend == "cuda":
        return "cuda"
    if backend == "triton":
        return "cpu" if triton_interpreting() else "cuda"
    return "cpu"


def _cuda_skip(ops):
    if not torch.cuda.is_available():
        return pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    missing = [op for op in ops if not has_cuda_kernel(op)]
    return pytest.mark.skipif(bool(missing), reason=f"no CUDA kernel for {', '.join(missing)}")


def _triton_param(gpu_sized=False, cuda_ops=(), cpu_tensors=False):
    marks = [
        pytest.mark.triton,
        pytest.mark.skipif(not triton_importable(), reason="needs the triton package"),
    ]
    if cpu_tensors:
        reason = "runs Triton on CPU tensors: needs TRITON_INTERPRET=1"
        marks.append(pytest.mark.skipif(not triton_interpreting(), reason=reason))
    elif gpu_sized or not triton_interpreting():
        marks += [pytest.mark.cuda, _cuda_skip(cuda_ops)]
    return pytest.param("triton", marks=marks, id="triton")


def backends(*ops, include=("cpu", "triton", "cuda"), cpu_tensors=False):
    """pytest params of the backends that `ops` (rlkernels op names) are tested on (see the section
    comment). cpu_tensors: the test keeps its inputs on the CPU (it patches Triton's tile sizes, say), so
    its Triton case runs only under the interpreter."""
    params = []
    if "cpu" in include:
        params.append(pytest.param("cpu", id="cpu"))
    if "triton" in include:
        params.append(_triton_param(cpu_tensors=cpu_tensors))
    if "cuda" in include:
        params.append(pytest.param("cuda", marks=[pytest.mark.cuda, _cuda_skip(ops)], id="cuda"))
    return params


def gpu_backends(*ops):
    """The GPU backends for tests sized for a GPU: "cuda", and "triton" on CUDA tensors. Both need a CUDA
    device and the CUDA kernels of `ops` (these tests also run the CUDA kernels, as a second oracle)."""
    return [
        pytest.param("cuda", marks=[pytest.mark.cuda, _cuda_skip(ops)], id="cuda"),
        _triton_param(gpu_sized=True, cuda_ops=ops),
    ]


# The `cuda` marker: skipped where no CUDA device exists.
def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # the marker, not a keyword match on names
            item.add_marker(skip)


# ----------------------------------------------------------------------------------------------------
# Tolerances
# ----------------------------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)

# dtype -> (rtol, atol relative to the largest |expected|). Returns grow like 1 / (1 - gamma), so an
# absolute tolerance must scale with the magnitude of the result. 16-bit inputs are compared with the
# reference run on the *rounded* 16-bit values, so the tolerance only covers the kernel's arithmetic.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-2, 2e-2),
}
# A GPU kernel against the CPU kernel on the same input values (the GPU-sized log-prob and PPO tests):
# accumulation order only. Absolute tolerances (scale=1.0) for the outputs and stats.
GPU_TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10, "scale": 1.0},
    torch.float32: {"atol": 5e-5, "rtol": 2e-5, "scale": 1.0},
    torch.bfloat16: {"atol": 5e-5, "rtol": 2e-5, "scale": 1.0},
    torch.float16: {"atol": 5e-5, "rtol": 2e-5, "scale": 1.0},
}
# Their gradients, stored in the input dtype: one ulp of it apart at most (different exp and summation).
GPU_GRAD_TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10, "scale": 1.0},
    torch.float32: {"atol": 1e-6, "rtol": 2e-5, "scale": 1.0},
    torch.bfloat16: {"atol": 2e-3, "rtol": 2e-2, "scale": 1.0},
    torch.float16: {"atol": 2e-4, "rtol": 2e-3, "scale": 1.0},
}


def clamp_open(x: torch.Tensor, min=None, max=None) -> torch.Tensor:
    """torch.clamp to scalar bounds, with no gradient where x equals a bound: torch 2.14's derivative and the
    kernels' (a clipped PPO ratio, the KL clamps, V-trace's truncated importance weights). torch 2.11's clamp to
    scalar bounds passes the gradient at them (a closed interval), so the torch oracles spell the convention
    out, to expect the same gradients on either release. (A clamp to tensor bounds, as of the clipped value
    loss, passes it at the bounds on both releases, and so do the kernels there.)"""
    y = torch.clamp(x, min, max)
    inside = torch.ones_like(x, dtype=torch.bool)
    if min is not None:
        inside = inside & (x > min)
    if max is not None:
        inside = inside & (x < max)
    return torch.where(inside, x, y.detach())


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        return x.numpy()
    return np.asarray(x, dtype=np.float64)


def finite_scale(values, at_least=1.0) -> float:
    """The largest finite |value| (at least `at_least`): the scale of absolute tolerances. NaN and Inf are
    skipped."""
    values = to_numpy(values)
    finite = values[np.isfinite(values)]
    return max(at_least, float(np.abs(finite).max())) if finite.size else at_least


def assert_close(
    actual,
    expected,
    dtype=torch.float64,
    *,
    name="output",
    scale=None,
    rtol=None,
    atol=None,
    same_dtype=False,
    device=None,
    equal_nan=True,
):
    """`actual` (tensor) against `expected` (tensor, array or number) with the tolerance of `dtype`: the
    one closeness check of the suite, |actual - expected| <= atol * scale + rtol * |expected|, in float64.

    NaN must sit where the expected NaN sits, infinities must match exactly, and the absolute tolerance is
    relative to `scale`, by default the largest finite |expected| (at least 1); scale=1.0 makes atol absolute.
    rtol / atol override the per-dtype TOLERANCES. same_dtype: both are tensors of one dtype. device: the
    device type `actual` must be on ("cuda", "cpu"). equal_nan=False: any NaN fails.
    """
    if device is not None:
        assert actual.device.type == device, f"{name}: on {actual.device}, expected {device}"
    if same_dtype:
        assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != expected {expected.dtype}"
    exp = to_numpy(expected)
    act = to_numpy(actual)
    assert act.shape == exp.shape, f"{name}: shape {act.shape} != expected {exp.shape}"
    d_rtol, d_atol = TOLERANCES[dtype]
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    if scale is None:
        scale = finite_scale(exp)
    # A NaN scale would make atol NaN, which numpy reads as "bit-identical": a test that then fails on a CPU
    # whose rounding differs (AVX2 vs AVX-512), not a looser one.
    assert np.isfinite(scale), f"{name}: the tolerance scale must be finite, got {scale}"
    np.testing.assert_allclose(act, exp, rtol=rtol, atol=atol * scale, equal_nan=equal_nan, err_msg=name)


def assert_outputs_close(actual, expected, dtype, names=None):
    """Tuple-aware assert_close (gae and vtrace return two outputs)."""
    if isinstance(actual, torch.Tensor):
        actual, expected = (actual,), (expected,)
    assert len(actual) == len(expected)
    names = names or [f"output {i}" for i in range(len(actual))]
    for a, e, n in zip(actual, expected, names):
        assert_close(a, e, dtype, name=n)


def output_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# The sample-input factory
# ----------------------------------------------------------------------------------------------------

OPS = ("linear_scan", "discounted_returns", "gae", "vtrace")

# Differentiable inputs of each public function (docs/design.md §4).
DIFF_INPUTS = {
    "linear_scan": ("a", "b", "initial"),
    "discounted_returns": ("rewards", "next_values", "bootstrap_value"),
    "gae": ("rewards", "values", "next_values", "bootstrap_value"),
    "vtrace": ("rewards", "values", "log_rhos", "next_values", "bootstrap_value"),
}
# Positional tensor arguments of each public function, in order.
POSITIONAL = {
    "linear_scan": ("a", "b"),
    "discounted_returns": ("rewards",),
    "gae": ("rewards", "values"),
    "vtrace": ("rewards", "values", "log_rhos"),
}
NUM_OUTPUTS = {"linear_scan": 1, "discounted_returns": 1, "gae": 2, "vtrace": 2}
OUTPUT_NAMES = {
    "linear_scan": ("x",),
    "discounted_returns": ("returns",),
    "gae": ("advantages", "returns"),
    "vtrace": ("vs", "pg_advantages"),
}


@dataclasses.dataclass
class Sample:
    """The arguments of one call of a public function."""

    op: str
    tensors: dict  # name -> tensor (positional, float keyword, and flag tensors); None entries omitted
    scalars: dict  # gamma, lam, clips, time_dim, reverse, cu_seqlens ...
    dtype: torch.dtype

    @property
    def args(self):
        return tuple(self.tensors[n] for n in POSITIONAL[self.op])

    @property
    def kwargs(self):
        kw = {k: v for k, v in self.tensors.items() if k not in POSITIONAL[self.op]}
        kw.update(self.scalars)
        return kw

    def call(self, backend="cpu", **overrides):
        import rlkernels

        kw = self.kwargs
        kw.update(overrides)
        return getattr(rlkernels, self.op)(*self.args, backend=backend, **kw)

    def reference(self):
        from rlkernels import reference

        return getattr(reference, self.op)(*self.args, **self.kwargs)

    def diff_names(self):
        """The differentiable inputs present in this sample (tensors only)."""
        return [n for n in DIFF_INPUTS[self.op] if isinstance(self.tensors.get(n), torch.Tensor)]

    def with_tensors(self, **tensors):
        new = dict(self.tensors)
        new.update(tensors)
        return dataclasses.replace(self, tensors={k: v for k, v in new.items() if v is not None})

    def requiring_grad(self, names=None):
        names = self.diff_names() if names is None else names
        new = {
            k: (v.detach().clone().requires_grad_(True) if k in names else v) for k, v in self.tensors.items()
        }
        return dataclasses.replace(self, tensors=new)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `x`, in a contiguous, transposed (permuted storage) or strided view."""
    if layout == "contiguous" or x.dim() == 0:
        return x.contiguous()
    if layout == "transposed":
        perm = list(reversed(range(x.dim())))
        y = x.permute(perm).contiguous().permute(perm)  # the same values, storage in reversed dim order
        assert torch.equal(y, x)
        return y
    if layout == "strided":
        big = torch.zeros(x.shape[:-1] + (2 * x.shape[-1] + 1,), dtype=x.dtype)
        big[..., 1::2] = x
        y = big[..., 1::2]
        assert torch.equal(y, x)
        return y
    raise ValueError(layout)


def _flag(mask: torch.Tensor, flag_dtype) -> torch.Tensor:
    if flag_dtype == torch.bool:
        return mask
    return mask.to(flag_dtype)


def make_inputs(
    op: str,
    shape=(5, 3),
    *,
    dtype=torch.float64,
    time_dim=0,
    cu_seqlens=None,
    cu_dtype=torch.int64,
    terminated=0.0,
    truncated=0.0,
    next_values=False,
    bootstrap="none",
    mask=0.0,
    flag_dtype=torch.bool,
    layout="contiguous",
    gamma=0.9,
    lam=0.8,
    rho_clip=1.0,
    c_clip=1.0,
    pg_rho_clip=1.0,
    reverse=True,
    initial="none",
    requires_grad=False,
    seed=0,
) -> Sample:
    """One set of inputs for `op`.

    shape: the shape of rewards (1-D when `cu_seqlens`, a list of segment lengths, is given; the offsets are
    made with `cu_dtype`).
    terminated / truncated / mask: the probability of a set flag (0 leaves the flag out; for `mask`, the
    probability of a *masked* position). truncated > 0 implies next_values. bootstrap / initial:
    "none", "scalar" (a Python float) or "tensor" (one value per sequence).
    layout: "contiguous", "transposed" or "strided" (applied to every tensor input).
    """
    g = torch.Generator().manual_seed(seed)
    if cu_seqlens is not None:
        lengths = list(cu_seqlens)
        cu = torch.tensor([0] + list(np.cumsum(lengths, dtype=np.int64)), dtype=cu_dtype)
        shape = (int(cu[-1]),)
        seq_shape = (len(lengths),)
    else:
        cu = None
        shape = tuple(shape)
        td = time_dim % len(shape)
        seq_shape = shape[:td] + shape[td + 1 :]

    def randn(sh=shape, scale=1.0):
        return (torch.randn(sh, generator=g, dtype=torch.float64) * scale).to(dtype)

    def bern(p):
        return torch.rand(shape, generator=g, dtype=torch.float64) < p

    tensors = {}
    scalars = {}
    if op == "linear_scan":
        tensors["a"] = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
        tensors["b"] = randn()
        if initial == "tensor":
            tensors["initial"] = randn(seq_shape)
        elif initial == "scalar":
            scalars["initial"] = 0.75
        scalars["reverse"] = reverse
        scalars["time_dim"] = time_dim
    else:
        tensors["rewards"] = randn()
        if op in ("gae", "vtrace"):
            tensors["values"] = randn()
        if op == "vtrace":
            tensors["log_rhos"] = randn(scale=0.7)
        if next_values or truncated:
            tensors["next_values"] = randn()
        if terminated:
            tensors["terminated"] = _flag(bern(terminated), flag_dtype if flag_dtype != "float" else dtype)
        if truncated:
            tensors["truncated"] = _flag(bern(truncated), flag_dtype if flag_dtype != "float" else dtype)
        if mask:
            tensors["mask"] = _flag(~bern(mask), flag_dtype if flag_dtype != "float" else dtype)
        if bootstrap == "tensor":
            tensors["bootstrap_value"] = randn(seq_shape)
        elif bootstrap == "scalar":
            scalars["bootstrap_value"] = -0.5
        scalars["gamma"] = gamma
        if op in ("gae", "vtrace"):
            scalars["lam"] = lam
        if op == "vtrace":
            scalars.update(rho_clip=rho_clip, c_clip=c_clip, pg_rho_clip=pg_rho_clip)
        if cu is not None:
            scalars["cu_seqlens"] = cu
        else:
            scalars["time_dim"] = time_dim

    for name, x in list(tensors.items()):
        if x.shape == shape and x.dim() >= 1:
            x = _layout(x, layout)
        if requires_grad and name in DIFF_INPUTS[op] and x.is_floating_point():
            x = x.detach().requires_grad_(True)
        tensors[name] = x
    return Sample(op, tensors, scalars, dtype)


# ----------------------------------------------------------------------------------------------------
# sample_inputs: one factory per family (the scan family's is make_inputs above)
# ----------------------------------------------------------------------------------------------------


def randn(shape, dtype=torch.float64, *, scale=1.0, seed=0, device="cpu"):
    """Standard normal values times `scale`, drawn in float64 from a generator seeded with `seed`, then
    cast."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def random_tokens(shape, V, *, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, shape, generator=g).to(device)


def sample_mask(shape, kind, seed=0, *, empty_row=True, device="cpu"):
    """A token mask (True: used) with about 30% masked: kind None (no mask), "bool", "uint8", "float" or
    "all-masked" (bool, nothing used). With empty_row, row 1 of a 2-D mask has no token."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g, dtype=torch.float64) > 0.3
    if empty_row and len(shape) == 2 and shape[0] > 1:
        m[1] = False
    if kind == "all-masked":
        m[:] = False
    m = {"bool": m, "all-masked": m, "uint8": m.to(torch.uint8), "float": m.to(torch.float32)}[kind]
    return m.to(device)


def sample_inputs(op, shape, *, dtype=torch.float64, device="cpu", seed=0, **options):
    """One set of inputs of `op`, the one factory per family behind the reference, gradient and opcheck tests.

    - scan family (linear_scan, discounted_returns, gae, vtrace): a `Sample`, see make_inputs (its options);
    - gather_logprobs: (logits [..., V], tokens [...]) for shape [..., V]; options scale (3.0) and
      token_seed (seed + 1);
    - ppo_policy_loss: (logp, old_logp, advantages), log-ratios of spread `scale` (0.3);
      value_loss: (values, old_values, returns); kl_penalty: (logp, ref_logp) of spread `scale` (1.0).
      Masks come from sample_mask.
    - Bellman family: q_targets, shape [...] (leading dims), options A (actions), scale (3.0), ties and
      nonfinite; td_loss, shape (B, A), scale (2.0) and target_noise; n_step_returns, shape with time along
      time_dim (0), p_term and p_trunc (0.1); bellman_backup and
      value_iteration, shape (B, S, A), sparse (False). The tuples are listed by their factories below.
    """
    if op in OPS:
        sample = make_inputs(op, shape, dtype=dtype, seed=seed, **options)
        if device != "cpu":
            sample = dataclasses.replace(
                sample,
                tensors={k: v.to(device) for k, v in sample.tensors.items()},
                scalars={
                    k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in sample.scalars.items()
                },
            )
        return sample
    if op == "gather_logprobs":
        token_seed = options.pop("token_seed", seed + 1)
        logits = randn(shape, dtype, scale=options.pop("scale", 3.0), seed=seed, device=device)
        assert not options, options
        return logits, random_tokens(tuple(shape[:-1]), shape[-1], seed=token_seed, device=device)
    if op in ("ppo_policy_loss", "kl_penalty"):
        scale = options.pop("scale", 0.3 if op == "ppo_policy_loss" else 1.0)
        assert not options, options
        g = torch.Generator().manual_seed(seed)
        logp = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
        old = logp + torch.randn(shape, generator=g, dtype=torch.float64) * scale
        adv = torch.randn(shape, generator=g, dtype=torch.float64)
        out = (logp, old, adv) if op == "ppo_policy_loss" else (logp, old)
        return tuple(x.to(device=device, dtype=dtype) for x in out)
    if op == "value_loss":
        assert not options, options
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(shape, generator=g, dtype=torch.float64)
        old = v + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
        ret = v + torch.randn(shape, generator=g, dtype=torch.float64)
        return tuple(x.to(device=device, dtype=dtype) for x in (v, old, ret))
    if op in BELLMAN_SAMPLES:
        out = BELLMAN_SAMPLES[op](shape, dtype, torch.Generator().manual_seed(seed), **options)
        return tuple(x.to(device) for x in out)
    raise ValueError(f"no sample_inputs for {op!r}")


def _q_targets_sample(shape, dtype, g, A, scale=3.0, ties=False, nonfinite=False):
    """(rewards [...], next_q [..., A], next_q_online [..., A], next_probs [..., A], terminated [...]) for
    shape [...]. ties: every 7th online row repeats its first action's value in the middle (the first index
    wins); nonfinite (1-D, B >= 8): NaN, -inf and +inf rows in next_q, one terminated, a NaN online value."""
    shape = tuple(shape)
    r = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    q = (torch.randn((*shape, A), generator=g, dtype=torch.float64) * scale).to(dtype)
    online = (torch.randn((*shape, A), generator=g, dtype=torch.float64) * scale).to(dtype)
    probs = torch.softmax(torch.randn((*shape, A), generator=g, dtype=torch.float64), -1).to(dtype)
    term = torch.rand(shape, generator=g) < 0.3
    if ties and A > 1:
        online.view(-1, A)[::7, A // 2] = online.view(-1, A)[::7, 0]
    if nonfinite and len(shape) == 1 and shape[0] >= 8:
        q[1, 0] = float("nan")  # NaN propagates (max, expected, soft) ...
        q[2, :] = float("-inf")  # ... a row of -inf gives -inf
        q[3, -1] = float("inf")
        q[4, :] = float("inf")
        term[4] = True  # terminated: the reward alone, whatever next_q holds
        online[5, A - 1] = float("nan")  # double: NaN counts as the maximum
    return r, q, online, probs, term


def _td_loss_sample(shape, dtype, g, scale=2.0, target_noise=None):
    """(q [B, A], actions [B], targets [B], weights [B]) for shape (B, A). With target_noise, targets are
    Q(s, a) plus noise of that spread (TD errors on both sides of a Huber delta near it)."""
    B, A = shape
    q = (torch.randn(B, A, generator=g, dtype=torch.float64) * scale).to(dtype)
    actions = torch.randint(0, A, (B,), generator=g)
    if target_noise is None:
        targets = (torch.randn(B, generator=g, dtype=torch.float64) * scale).to(dtype)
    else:
        noise = target_noise * torch.randn(B, generator=g, dtype=torch.float64)
        targets = (q.double()[torch.arange(B), actions] + noise).to(dtype)
    weights = torch.rand(B, generator=g, dtype=torch.float64).to(dtype)
    return q, actions, targets, weights


def _n_step_sample(shape, dtype, g, p_term=0.1, p_trunc=0.1, time_dim=0):
    """(rewards, values, next_values, bootstrap_value, terminated, truncated) for shape [..., T, ...] with
    time along `time_dim`; bootstrap_value has the shape without the time dimension."""
    shape = tuple(shape)
    td = time_dim % len(shape)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    nv = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    boot = torch.randn(shape[:td] + shape[td + 1:], generator=g, dtype=torch.float64).to(dtype)
    term = torch.rand(shape, generator=g) < p_term
    trunc = torch.rand(shape, generator=g) < p_trunc
    return r, v, nv, boot, term, trunc


def _mdp_sample(shape, dtype, g, sparse=False):
    """(P [B, S, A, S], R [B, S, A], V [B, S]) for shape (B, S, A); sparse: about 70% of P near 0."""
    B, S, A = shape
    P = torch.rand(B, S, A, S, generator=g, dtype=torch.float64)
    if sparse:
        P = P * (torch.rand(B, S, A, S, generator=g) < 0.3) + 1e-3
    P = P / P.sum(-1, keepdim=True)
    R = torch.randn(B, S, A, generator=g, dtype=torch.float64)
    V = torch.randn(B, S, generator=g, dtype=torch.float64)
    return P.to(dtype), R.to(dtype), V.to(dtype)


BELLMAN_SAMPLES = {
    "q_targets": _q_targets_sample,
    "td_loss": _td_loss_sample,
    "n_step_returns": _n_step_sample,
    "bellman_backup": _mdp_sample,
    "value_iteration": _mdp_sample,
}


# ----------------------------------------------------------------------------------------------------
# Canonical arguments of the raw custom ops (for opcheck)
# ----------------------------------------------------------------------------------------------------


def op_args(sample: Sample, *, save_carries=None):
    """The arguments of torch.ops.rlkernels.<op> for a sample whose tensors are already canonical:
    [O, T, I] contiguous with time_dim=1, or 1-D with cu_seqlens. Flags become bool."""
    t, s = sample.tensors, sample.scalars
    if "cu_seqlens" not in s:
        assert s.get("time_dim", 1) == 1 and next(iter(t.values())).dim() == 3, (
            "op_args needs [O, T, I] inputs"
        )

    def flag(name):
        x = t.get(name)
        return None if x is None else (x if x.dtype == torch.bool else x != 0)

    def boot():
        x = t.get("bootstrap_value")
        return x if isinstance(x, torch.Tensor) else None

    cu = s.get("cu_seqlens")
    if sample.op == "linear_scan":
        return (t["a"], t["b"], t.get("initial"), bool(s.get("reverse", True)))
    common = (flag("terminated"), flag("truncated"), flag("mask"), cu)
    if sample.op == "discounted_returns":
        return (t["rewards"], t.get("next_values"), boot(), *common, float(s["gamma"]))
    if sample.op == "gae":
        return (
            t["rewards"],
            t["values"],
            t.get("next_values"),
            boot(),
            *common,
            float(s["gamma"]),
            float(s["lam"]),
        )
    if sample.op == "vtrace":
        if save_carries is None:
            save_carries = t["log_rhos"].requires_grad
        return (
            t["rewards"],
            t["values"],
            t["log_rhos"],
            t.get("next_values"),
            boot(),
            *common,
            float(s["gamma"]),
            float(s["lam"]),
            float(s["rho_clip"]),
            float(s["c_clip"]),
            float(s["pg_rho_clip"]),
            bool(save_carries),
        )
    raise ValueError(sample.op)


def backward_op_args(sample: Sample, seed=1):
    """Arguments of the backward op of `sample.op` (not linear_scan, whose backward is itself): upstream
    gradients in the accumulation dtype, the flags and the geometry of the forward."""
    t, s = sample.tensors, sample.scalars
    g = torch.Generator().manual_seed(seed)
    rewards = t["rewards"].detach()
    acc = output_dtype(rewards.dtype)

    def grad():
        return torch.randn(rewards.shape, generator=g, dtype=torch.float64).to(acc)

    def flag(name):
        x = t.get(name)
        return None if x is None else (x if x.dtype == torch.bool else x != 0)

    cu = s.get("cu_seqlens")
    flags = (flag("terminated"), flag("truncated"), flag("mask"), cu)
    has_next = t.get("next_values") is not None
    if sample.op == "discounted_returns":
        return (grad(), *flags, rewards, float(s["gamma"]), has_next)
    if sample.op == "gae":
        return (grad(), grad(), *flags, rewards, float(s["gamma"]), float(s["lam"]), has_next)
    if sample.op == "vtrace":
        fwd = torch.ops.rlkernels.vtrace(*op_args(sample, save_carries=True))
        nv = t.get("next_values")
        return (
            grad(),
            grad(),
            rewards,
            t["values"].detach(),
            t["log_rhos"].detach(),
            None if nv is None else nv.detach(),
            fwd[2],
            fwd[3],
            *flags,
            float(s["gamma"]),
            float(s["lam"]),
            float(s["rho_clip"]),
            float(s["c_clip"]),
            float(s["pg_rho_clip"]),
        )
    raise ValueError(sample.op)


def canonical_samples(op, dtype=torch.float64, requires_grad=False):
    """A small spread of canonical samples for the raw ops: plain, all flags with next_values, mask with
    bootstrap values, and packed varlen with an empty segment."""
    out = [
        make_inputs(op, (2, 6, 3), time_dim=1, dtype=dtype, requires_grad=requires_grad, seed=11),
    ]
    if op == "linear_scan":
        out.append(
            make_inputs(
                op,
                (1, 9, 2),
                time_dim=1,
                dtype=dtype,
                initial="tensor",
                reverse=False,
                requires_grad=requires_grad,
                seed=12,
            )
        )
        return out
    out.append(
        make_inputs(
            op,
            (2, 7, 2),
            time_dim=1,
            dtype=dtype,
            terminated=0.2,
            truncated=0.2,
            mask=0.3,
            requires_grad=requires_grad,
            seed=13,
        )
    )
    out.append(
        make_inputs(
            op,
            (1, 8, 3),
            time_dim=1,
            dtype=dtype,
            terminated=0.2,
            mask=0.3,
            bootstrap="tensor",
            requires_grad=requires_grad,
            seed=14,
        )
    )
    out.append(
        make_inputs(
            op,
            dtype=dtype,
            cu_seqlens=[3, 0, 5, 1],
            terminated=0.2,
            bootstrap="tensor",
            requires_grad=requires_grad,
            seed=15,
        )
    )
    return out


# Re-exported for the test modules.
__all__ = [
    "DIFF_INPUTS",
    "DTYPES",
    "LOW_PRECISION",
    "NUM_OUTPUTS",
    "OPS",
    "OUTPUT_NAMES",
    "TOLERANCES",
    "Sample",
    "assert_close",
    "assert_outputs_close",
    "backends",
    "backward_op_args",
    "canonical_samples",
    "device_for",
    "gpu_backends",
    "has_cuda_kernel",
    "make_inputs",
    "op_args",
    "output_dtype",
    "randn",
    "random_tokens",
    "sample_inputs",
    "sample_mask",
    "to_numpy",
]


def record_triton_grids(module, monkeypatch):
    """A list that receives (kernel name, grid) for every launch through ``module.wrap_triton`` (a Triton
    module of rlkernels) while the test runs."""
    grids = []
    wrap = module.wrap_triton

    def recording(kernel):
        launcher = wrap(kernel)
        name = getattr(getattr(kernel, "fn", None), "__name__", str(kernel))

        class Recorder:
            def __getitem__(self, grid):
                grids.append((name, grid))
                return launcher[grid]

        return Recorder()

    monkeypatch.setattr(module, "wrap_triton", recording)
    return grids
