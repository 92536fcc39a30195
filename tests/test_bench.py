"""The benchmark command (rlkernels-bench / python -m rlkernels.bench) in its --quick form: every op family must
write a CSV with the expected columns and rows, the markdown table and a PNG plot. Timing values are not checked
(timing belongs in benchmarks): only that every row is there and carries a finite positive time or says why not."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rich")
pytest.importorskip("matplotlib")

from rlkernels.bench import cases, common
from rlkernels.bench.__main__ import CSV_FIELDS

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TRITON_INTERPRET": "0"}  # interpreted triton is not a CPU backend to time
PNG = b"\x89PNG\r\n\x1a\n"


def _bench(tmp_path, *args, timeout=600):
    out = tmp_path / "bench.csv"
    cmd = [sys.executable, "-m", "rlkernels.bench", "--device", "cpu", "--quick", *args, "--csv", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, check=False, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with out.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_FIELDS
        rows = list(reader)
    assert out.with_suffix(".md").read_text().count("\n") >= len(rows)
    assert rows[0]["op"] == "copy" and float(rows[0]["gbps"]) > 0
    assert rows[1]["op"] == "read" and float(rows[1]["gbps"]) > 0 and float(rows[1]["pct_read_bw"]) == pytest.approx(100)
    return out, rows[2:], proc.stdout


def _timed(row) -> bool:
    return row["median_s"] != "" and math.isfinite(float(row["median_s"])) and float(row["median_s"]) > 0


def _groups(rows):
    groups: dict[tuple[str, str, str], dict[str, dict]] = {}
    for r in rows:
        group = groups.setdefault((r["op"], r["shape"], r["cache"]), {})
        assert r["provider"] not in group, f"{r['provider']} twice in {r['op']} {r['shape']} {r['cache']}"
        group[r["provider"]] = r
    return groups


EXPECTED_PROVIDERS = {  # every provider of each op in a --quick CPU run (torchrl left out)
    "gae": {"cleanrl loop", "sb3 numpy loop", "scipy lfilter", "torchrl vec_gae", "torch.compile(cleanrl loop)"},
    "discounted_returns": {"cleanrl loop", "scipy lfilter", "torchrl vec_td1", "torch.compile(cleanrl loop)"},
    "vtrace": {"torchbeast loop", "torchrl vtrace"},
    "retrace": {"rlax loop"},
    "gather_logprobs": {"torch log_softmax+gather", "torch.compile(torch log_softmax+gather)",
                        "trl selective_log_softmax"},
    "gather_logprobs+entropy": {"verl log_softmax+gather, entropy_from_logits",
                                "torch.compile(verl log_softmax+gather, entropy_from_logits)"},
    "gather_logprobs bf16": {"torch log_softmax+gather", "torch.compile(torch log_softmax+gather)",
                             "trl selective_log_softmax"},
    "gather_logprobs+entropy bf16": {"verl log_softmax+gather, entropy_from_logits",
                                     "torch.compile(verl log_softmax+gather, entropy_from_logits)"},
    "gather_logprobs fwd+bwd": {"torch log_softmax+gather", "torch.compile(torch log_softmax+gather)",
                                "trl selective_log_softmax"},
    **{f"linear_logprobs+entropy{bwd} {dt}": {"torch matmul+log_softmax+gather+entropy",
                                              "torch.compile(torch matmul+log_softmax+gather+entropy)",
                                              "trl ChunkedLogProbFunction",
                                              "3 matmuls alone (forward, d hidden, d weight)" if bwd
                                              else "matmul alone (hidden @ weight.T)"}
       for bwd in ("", " fwd+bwd") for dt in ("fp32", "bf16")},
    "ppo_policy_loss": {"verl eager", "torch.compile(verl eager)"},
    "ppo_policy_loss fwd+bwd": {"verl eager", "torch.compile(verl eager)"},
    "ppo_policy_loss bf16": {"verl eager", "torch.compile(verl eager)"},
    "ppo_policy_loss fwd+bwd bf16": {"verl eager", "torch.compile(verl eager)"},
    "value_loss fwd+bwd": {"verl eager", "torch.compile(verl eager)"},
    **{f"q_targets[{k}]": {"eager torch", "torch.compile(eager torch)"} for k in cases.Q_KINDS},
    "td_loss fwd+bwd": {"eager torch", "torch.compile(eager torch)"},
    "bellman_backup": {"eager torch", "torch.compile(eager torch)"},
    "value_iteration": {"eager torch", "torch.compile(backup) loop"},
}


REFERENCE = {  # the baseline each op's rlkernels output is checked against
    "gae": "cleanrl loop",
    "discounted_returns": "cleanrl loop",
    "vtrace": "torchbeast loop",
    "retrace": "rlax loop",
    "gather_logprobs": "torch log_softmax+gather",
    "gather_logprobs+entropy": "verl log_softmax+gather, entropy_from_logits",
    "gather_logprobs bf16": "torch log_softmax+gather",
    "gather_logprobs+entropy bf16": "verl log_softmax+gather, entropy_from_logits",
    "gather_logprobs fwd+bwd": "torch log_softmax+gather",
    **{f"linear_logprobs+entropy{bwd} {dt}": "torch matmul+log_softmax+gather+entropy"
       for bwd in ("", " fwd+bwd") for dt in ("fp32", "bf16")},
    "ppo_policy_loss": "verl eager",
    "ppo_policy_loss fwd+bwd": "verl eager",
    "ppo_policy_loss bf16": "verl eager",
    "ppo_policy_loss fwd+bwd bf16": "verl eager",
    "value_loss fwd+bwd": "verl eager",
}


def test_quick_run_covers_every_family(tmp_path):
    out, rows, stdout = _bench(tmp_path, "--skip-baselines", "torchrl")
    assert out.with_suffix(".png").read_bytes()[:8] == PNG
    assert "check failed" not in stdout
    groups = _groups(rows)
    assert {op for op, _, _ in groups} == set(EXPECTED_PROVIDERS)
    for (op, shape, cache), providers in groups.items():
        where = f"{op} {shape} [{cache}]"
        expected = {"verl loop"} if shape.endswith("masked") and op == "gae" else EXPECTED_PROVIDERS[op]
        assert set(providers) == expected | {"rlkernels[cpu]"}, where
        for name, r in providers.items():
            if _timed(r):
                assert float(r["gbps"]) > 0 and float(r["pct_copy_bw"]) > 0 and float(r["speedup_vs"]) > 0, where
                assert float(r["pct_read_bw"]) > 0, where
                assert float(r["q20_s"]) <= float(r["median_s"]) <= float(r["q80_s"]), where
            else:  # a provider that was not timed says why: a missing package, or no torch.compile in --quick
                assert r["note"].startswith(("skipped", "not run")), (where, name, r["note"])
        assert _timed(providers["rlkernels[cpu]"]), where
        assert float(providers["rlkernels[cpu]"]["speedup_vs"]) == pytest.approx(1.0)
        reference = "verl loop" if "verl loop" in expected else REFERENCE.get(op, "eager torch")
        assert _timed(providers[reference]), where  # what rlkernels' output was checked against
    assert "torch.compile(cleanrl loop)" in groups[("gae", "[T=256, B=16]", "data")]
    # the sample-based Bellman ops: cold data and warm at a large batch, warm only at a replay batch's size
    states = {(shape, cache) for op, shape, cache in groups if op == "td_loss fwd+bwd"}
    assert states == {("[B=4096, A=18]", "data"), ("[B=4096, A=18]", "warm"), ("[B=128, A=18]", "warm")}
    assert {cache for op, _, cache in groups if op in ("bellman_backup", "value_iteration", "gae")} == {"data"}
    assert "iterations" in groups[("value_iteration", "[B=8, S=64, A=4]", "data")]["eager torch"]["note"]


def test_quick_sizes_sweep_writes_csv_and_plot(tmp_path):
    out, body, _ = _bench(tmp_path, "--sizes", "--ops", "discounted_returns", "--warm-cache",
                          "--skip-baselines", "torchrl", timeout=120)
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000

    sizes = [dims for kind, dims in cases.SIZES["quick"] if kind == "discounted_returns"]
    assert {r["op"] for r in body} == {"discounted_returns"}
    assert {r["cache"] for r in body} == {"warm"}
    assert sorted({int(r["numel"]) for r in body}) == sorted(t * b for t, b in sizes)
    assert {r["series"] for r in body} == {"discounted_returns [T=64, B=*]"}
    for numel in {r["numel"] for r in body}:
        providers = {r["provider"]: r for r in body if r["numel"] == numel}
        # rlkernels and the reference loop are timed and agree (a wrong output would have failed the run)
        for name in ("rlkernels[cpu]", "cleanrl loop"):
            assert float(providers[name]["median_s"]) > 0 and float(providers[name]["gbps"]) > 0
        assert float(providers["rlkernels[cpu]"]["speedup_vs"]) == pytest.approx(1.0)
        # a left-out third-party baseline is a row that says so, with no timing
        skipped = providers["torchrl vec_td1"]
        assert skipped["median_s"] == "" and "skipped" in skipped["note"]
        assert "torch.compile(cleanrl loop)" not in providers  # not part of a size sweep


def test_isa_rows_one_per_level_this_cpu_runs(tmp_path):
    """--isa times the cpu backend once per listed level the CPU runs, each row checked against the reference
    (a failed check fails the run); a level the CPU lacks is named and left out. The device name carries the
    CPU's widest level."""
    _, rows, stdout = _bench(tmp_path, "--ops", "ppo_policy_loss", "--isa", "default,avx2,avx512", timeout=300)
    runs_here = common.cpu_isa_levels()
    for (op, shape, cache), providers in _groups(rows).items():
        levels = [p for p in providers if p.startswith("rlkernels[")]
        assert levels == [f"rlkernels[cpu:{level}]" for level in runs_here], (op, shape)
        assert all(_timed(providers[p]) for p in levels)
        assert len({providers[p]["runs"] for p in levels}) == 1, (op, shape)  # timed in turns: as many runs each
    assert {r["device"].rsplit(" ", 1)[-1] for r in rows} == {runs_here[-1]}
    if len(runs_here) < 3:
        assert "this CPU does not run" in stdout


def test_measure_in_turns_alternates_the_calls():
    """Each round times every callable once, round k starting at callable k mod n, each timed call right after
    its own ``before`` and flush; every callable gets the same number of runs and its first output back."""
    log = []
    fns = [lambda i=i: log.append(("call", i)) or i for i in range(3)]
    befores = [lambda i=i: log.append(("before", i)) for i in range(3)]
    flushes = [lambda i=i: log.append(("flush", i)) for i in range(3)]
    results = common.measure_in_turns(fns, "cpu", befores=befores, flushes=flushes, min_runs=4, max_runs=4)
    assert [out for _, out in results] == [0, 1, 2]
    assert all(timing.runs == 4 and timing.median_s >= 0 for timing, _ in results)
    warmups = [step for i in (0, 1, 2) for step in (("before", i), ("call", i))]
    assert log[:12] == warmups + warmups  # two warmup calls each, untimed
    timed = [entry[1] for entry in log[12:] if entry[0] == "call"]
    assert timed == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]
    for k in range(12):  # before, flush, call: the same callable
        assert log[12 + 3 * k : 15 + 3 * k] == [("before", timed[k]), ("flush", timed[k]), ("call", timed[k])]
    # A first call over single_run_over_s: each callable's first call is its one sample, as in measure().
    log.clear()
    slow = common.measure_in_turns(fns, "cpu", befores=befores, single_run_over_s=0.0)
    assert [(timing.runs, out) for timing, out in slow] == [(1, 0), (1, 1), (1, 2)]
    assert all(timing.median_s > 0 for timing, _ in slow)


def test_ops_select_families_and_kinds_in_order():
    bellman = cases.entries(cases.SHAPES, "quick", ["bellman"])
    assert {kind for kind, _, _ in bellman} == set(cases.FAMILIES["bellman"])
    mixed = cases.entries(cases.SHAPES, "quick", ["ppo", "vtrace"])
    assert [kind for kind, _, _ in mixed] == ["ppo_policy_loss", "ppo_policy_loss", "value_loss", "vtrace"]
    assert len(cases.entries(cases.SHAPES, "quick")) == len(cases.SHAPES["quick"])
    bad = subprocess.run([sys.executable, "-m", "rlkernels.bench", "--ops", "gae,nope"], cwd=ROOT, env=ENV,
                         check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown ['nope']" in bad.stderr


def test_missing_baseline_package_is_skipped_with_a_note(monkeypatch):
    from rlkernels.bench import baselines

    monkeypatch.setattr(baselines.importlib.util, "find_spec", lambda name: None)
    assert "pip install scipy" in baselines.missing("scipy")
    rewards, values, terminated, bootstrap = cases.time_major_inputs(8, 2, "cpu")
    providers = baselines.gae_providers(rewards, values, terminated, bootstrap, 0.99, 0.95)
    by_name = {p.name: p for p in providers}
    assert by_name["cleanrl loop"].call is not None and by_name["sb3 numpy loop"].call is not None
    for name in ("scipy lfilter", "torchrl vec_gae"):
        assert by_name[name].call is None and "not installed" in by_name[name].note


def test_cache_modes_find_and_evict_the_inputs_of_a_call():
    import functools

    import numpy as np
    import torch

    x, y, z = torch.randn(1000), torch.randn(10, 10), np.arange(64, dtype=np.float32)
    unused = torch.randn(3)
    inner = lambda: (x + 1, z.sum())
    fn = functools.partial(lambda scale, f: (f(), y * scale), 2.0, inner)
    found = common.data_of(fn)
    assert {id(t) for t in found} == {id(x), id(y), id(z)}
    assert all(t is not unused for t in found)

    before = [x.clone(), y.clone()]
    flush = common.flusher_for("data", "cpu", fn, [unused])
    assert isinstance(flush, common.DataEvictor)
    assert len(flush.tensors) == 4  # the explicit input and the three the call reads
    flush()  # clflush writes lines back and drops them: the values stay
    assert torch.equal(x, before[0]) and torch.equal(y, before[1])
    assert np.array_equal(z, np.arange(64, dtype=np.float32))
    assert isinstance(common.flusher_for("llc", "cpu", fn), common.CacheFlusher)
    assert common.flusher_for("warm", "cpu", fn) is None


def test_yardsticks_evict_their_buffers_on_the_cpu():
    # a last-level cache as large as the 256 MiB buffers would serve a repeated sum from cache: the copy and read
    # yardsticks evict their buffers before each call, as the ops' inputs are evicted in the default cache mode
    import torch

    src, dst = torch.rand(64), torch.empty(64)
    flush = common._yardstick_flush("cpu", src, dst)
    if common._evict_op() is None:  # no clflush: the shared 256 MiB rewrite
        assert isinstance(flush, common.CacheFlusher)
    else:
        assert isinstance(flush, common.DataEvictor)
        assert [t.data_ptr() for t in flush.tensors] == [src.data_ptr(), dst.data_ptr()]
    assert common._yardstick_flush("cuda", src) is None
