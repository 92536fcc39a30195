"""The benchmark command (rlkernels-bench / python -m rlkernels.bench) on a tiny quick sweep: it must write a
CSV with the expected columns and rows, the markdown table and a PNG plot. Timing values are not checked
(timing belongs in benchmarks): only that every row is there and carries a result or says why not."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rich")
pytest.importorskip("matplotlib")

from rlkernels.bench import common
from rlkernels.bench.__main__ import CSV_FIELDS

ROOT = Path(__file__).resolve().parent.parent


def test_quick_sizes_sweep_writes_csv_and_plot(tmp_path):
    out = tmp_path / "sweep.csv"
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # interpreted triton is not a CPU backend to time
    cmd = [sys.executable, "-m", "rlkernels.bench", "--quick", "--sizes", "--ops", "discounted_returns"]
    cmd += ["--warm-cache", "--skip-baselines", "torchrl", "--csv", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    with out.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_FIELDS
        rows = list(reader)
    assert out.with_suffix(".md").read_text().count("\n") >= len(rows)
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    assert rows[0]["op"] == "copy" and float(rows[0]["gbps"]) > 0
    sizes = [shape for kind, shape in common.SIZES["quick"] if kind == "discounted_returns"]
    body = rows[1:]
    assert {r["op"] for r in body} == {"discounted_returns"}
    assert sorted({int(r["numel"]) for r in body}) == sorted(t * b for t, b in sizes)
    assert {r["series"] for r in body} == {common.series_label("discounted_returns", sizes[0], True)}
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


def test_missing_baseline_package_is_skipped_with_a_note(monkeypatch):
    from rlkernels.bench import baselines

    monkeypatch.setattr(baselines.importlib.util, "find_spec", lambda name: None)
    assert "pip install scipy" in baselines.missing("scipy")
    rewards, values, terminated, bootstrap = common.time_major_inputs(8, 2, "cpu")
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
    inner = lambda: (x + 1, z.sum())  # noqa: E731
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


def test_bellman_bench_quick_times_each_cache_state_in_one_run(tmp_path):
    # benchmarks/bench_bellman.py: every sample-based case once per requested cache state (and once more at a
    # replay batch's size, warm), the model-based ones once; the rlkernels row of each case is its own baseline (speedup 1) and every row has a time.
    out = tmp_path / "bellman.csv"
    cmd = [sys.executable, "-m", "benchmarks.bench_bellman", "--device", "cpu", "--quick", "--csv", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with out.open() as f:
        rows = list(csv.DictReader(f))
    cases = [(r["op"], r["shape"], r["cache"]) for r in rows if r["provider"] == "rlkernels"]
    sample_ops = {"q_targets[max]", "q_targets[double]", "q_targets[expected]", "q_targets[soft]", "td_loss fwd+bwd"}
    big, small = "[B=4096, A=18]", "[B=128, A=18]"  # the small batch: warm only
    assert sorted(cases) == sorted(
        [(op, big, c) for op in sample_ops for c in ("data", "warm")] + [(op, small, "warm") for op in sample_ops]
        + [("bellman_backup", "[B=8, S=64, A=4]", "data"), ("value_iteration", "[B=8, S=64, A=4]", "data")])
    for case in cases:
        providers = {r["provider"]: r for r in rows if (r["op"], r["shape"], r["cache"]) == case}
        assert len(providers) == len([r for r in rows if (r["op"], r["shape"], r["cache"]) == case])
        assert set(providers) == {"rlkernels", "eager torch"}, (case, set(providers))
        assert float(providers["rlkernels"]["speedup_vs"]) == 1.0
        for r in providers.values():
            assert float(r["median_s"]) > 0 and float(r["gbps"]) > 0
    bad = subprocess.run([*cmd[:-2], "--cache", "data,hot"], cwd=ROOT, check=False, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "cache states must be among" in bad.stderr
