"""pytest-benchmark suite: rlkernels' returns/GAE against the baselines, one group per shape.

    pytest benchmarks/bench_returns.py --benchmark-only
    RLKERNELS_BENCH_SIZE=full pytest benchmarks/bench_returns.py --benchmark-only   # the issue's shapes

Same inputs, baselines and cold-data timing as ``rlkernels-bench`` (``python -m benchmarks.run``) (which also tries
torch.compile; here it is left out, as compiling the unrolled loops takes minutes). rlkernels is
checked against the CleanRL/verl loop before it is timed, comparable baselines after.
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch

from rlkernels.bench import common

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZE = os.environ.get("RLKERNELS_BENCH_SIZE", "small")
RLKERNELS, WHY_NOT = common.import_rlkernels()
BACKENDS = common.rlkernels_backends(RLKERNELS, DEVICE) if RLKERNELS else []
CASES = [
    common.make_case(kind, shape, DEVICE, RLKERNELS if BACKENDS else None, numpy=DEVICE == "cpu")
    for kind, shape in common.SHAPES[SIZE]
]


def _params():
    for i, case in enumerate(CASES):
        label = f"{case.op}-{common.slug(case.shape)}"
        for backend in BACKENDS:
            yield pytest.param(i, f"rlkernels[{backend}]", id=f"{label}-rlkernels-{backend}")
        if not BACKENDS:
            reason = f"rlkernels has no {DEVICE} backend: {WHY_NOT or RLKERNELS.available_backends()}"
            yield pytest.param(i, "rlkernels", id=f"{label}-rlkernels", marks=pytest.mark.skip(reason=reason))
        for provider in case.baselines:
            yield pytest.param(i, provider.name, id=f"{label}-{common.slug(provider.name)}")


@functools.cache
def reference_output(i: int):
    reference = CASES[i].baselines[0]
    return reference.to_torch(reference.call())



def _rounds(fn, budget_s: float = 1.0) -> int:
    common.synchronize(DEVICE)
    start = time.perf_counter()
    fn()
    common.synchronize(DEVICE)
    return int(min(50, max(3, budget_s / (time.perf_counter() - start))))


@pytest.mark.parametrize(("case_index", "provider"), list(_params()))
def test_returns(benchmark, case_index, provider):
    case = CASES[case_index]
    benchmark.group = f"{case.op} {case.shape}"
    nbytes = common.bytes_moved(case.reads, case.writes)
    if provider.startswith("rlkernels"):
        backend = provider[len("rlkernels[") : -1]
        fn = functools.partial(case.rlkernels, backend)
        failure = common.check(fn(), reference_output(case_index), provider)
        assert not failure, failure
        convert, comparable = (lambda out: out), True
    else:
        baseline = next(p for p in case.baselines if p.name == provider)
        fn, convert, comparable = baseline.call, baseline.to_torch, baseline.comparable

    # Cold data, as rlkernels-bench times by default: the inputs are evicted from the caches before each round.
    flush = common.flusher_for("data", DEVICE, fn, case.reads)
    out = benchmark.pedantic(fn, setup=flush, rounds=_rounds(fn), warmup_rounds=1)
    if comparable:
        failure = common.check(convert(out), reference_output(case_index), provider)
        assert not failure, failure
    benchmark.extra_info.update(
        device=common.device_name(DEVICE), bytes=nbytes, gbps=nbytes / benchmark.stats.stats.median / 1e9
    )
