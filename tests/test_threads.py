"""CPU results do not depend on threads (docs/design.md §3): bit-identical for 1, 2 and 4 ATen threads, and when
four Python threads call the ops at once.

Each call is large enough to take the kernels' parallel paths (the chunked scans of long sequences, rows split
across threads, the PPO chunk grid); forward and backward are both compared.
"""

from __future__ import annotations

import threading

import pytest
import torch

import rlkernels


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _flags(*shape, p=0.02, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


def _with_grad(fn, inputs):
    """fn's outputs and the gradients of their weighted sum w.r.t. inputs (fresh leaves each call)."""
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    flat = [o for o in outs if isinstance(o, torch.Tensor)]
    total = sum((o.double() * torch.linspace(0.5, 1.5, o.numel(), dtype=torch.float64).reshape(o.shape)).sum()
                for o in flat if o.requires_grad)
    grads = torch.autograd.grad(total, leaves, allow_unused=True) if isinstance(total, torch.Tensor) else ()
    return [o.detach() for o in flat] + [g for g in grads if g is not None]


T_LONG = 40_000
_PACKED_LENGTHS = torch.randint(0, 1500, (70,), generator=torch.Generator().manual_seed(29))
CU_PACKED = torch.cat([torch.zeros(1, dtype=torch.int64), _PACKED_LENGTHS.cumsum(0)])
N_PACKED = int(CU_PACKED[-1])
CASES = {
    "gae_long": (lambda r, v: rlkernels.gae(r, v, terminated=TERM_LONG, gamma=0.99, lam=0.95),
                 (_randn(T_LONG), _randn(T_LONG, seed=2))),
    "gae_batch": (lambda r, v: rlkernels.gae(r, v, terminated=TERM_BATCH, gamma=0.99, lam=0.95),
                  (_randn(256, 160).double(), _randn(256, 160, seed=2).double())),
    # time-major rows narrower than 1 KiB (csrc/cpu/scan_engine.h): on a CPU whose prefetcher completes line
    # pairs, [4200, 64] is split between threads in tiles of whole line pairs and [3300, 40] in time (chunks
    # of 2^15 elements, the last lane group of each padded), elsewhere both in tiles; 24 sequences of 16400
    # steps are long sequences in chunks of 4096 steps
    "gae_narrow_rows": (lambda r, v: rlkernels.gae(r, v, terminated=TERM_NARROW, gamma=0.99, lam=0.95),
                        (_randn(4200, 64, seed=19), _randn(4200, 64, seed=20))),
    "gae_narrow_padded": (lambda r, v: rlkernels.gae(r, v, terminated=TERM_NARROW[:3300, :40], gamma=0.99,
                                                     lam=0.95),
                          (_randn(3300, 40, seed=22), _randn(3300, 40, seed=23))),
    "discounted_returns_long_rows": (lambda r: rlkernels.discounted_returns(r, gamma=0.999),
                                     (_randn(16400, 24, seed=24),)),
    "discounted_returns_long": (lambda r: rlkernels.discounted_returns(r[:, None], gamma=0.999),
                                (_randn(T_LONG, seed=3),)),
    # 70 packed sequences of 0-1500 steps: laid in lanes by length, groups alternating long and short between
    # the threads' tiles, the partial group last; bfloat16 inputs widened as they load
    "gae_packed": (lambda r, v: rlkernels.gae(r, v, terminated=TERM_PACKED, cu_seqlens=CU_PACKED, gamma=0.99,
                                              lam=0.95),
                   (_randn(N_PACKED, seed=25), _randn(N_PACKED, seed=26))),
    "gae_packed_bf16": (lambda r, v: rlkernels.gae(r.bfloat16(), v.bfloat16(), terminated=TERM_PACKED,
                                                   cu_seqlens=CU_PACKED, gamma=0.99, lam=0.95),
                        (_randn(N_PACKED, seed=27), _randn(N_PACKED, seed=28))),
    "vtrace": (lambda r, v, lr: rlkernels.vtrace(r, v, lr, gamma=0.99), (_randn(300, 128), _randn(300, 128, seed=2),
                                                                      _randn(300, 128, seed=4) * 0.3)),
    "gather_logprobs": (lambda x: rlkernels.gather_logprobs(x, TOKENS, return_entropy=True),
                        (_randn(96, 1500, seed=5),)),
    "ppo_policy_loss": (lambda lp, old, adv: rlkernels.ppo_policy_loss(lp, old, adv, MASK, dual_clip=3.0)[0],
                        (_randn(48, 1024, seed=6) * 0.1, _randn(48, 1024, seed=7) * 0.1, _randn(48, 1024, seed=8))),
    "value_loss": (lambda v, old, ret: rlkernels.value_loss(v, old, ret, MASK, clip=0.2,
                                                            agg="seq-mean-token-mean")[0],
                   (_randn(48, 1024, seed=6), _randn(48, 1024, seed=7), _randn(48, 1024, seed=8))),
    "td_loss": (lambda q, y: rlkernels.td_loss(q, ACTIONS, y), (_randn(40_000, 6, seed=9), _randn(40_000, seed=10))),
    "q_targets": (lambda r, q: rlkernels.q_targets(r, q, kind="soft", temperature=0.5),
                  (_randn(40_000, seed=11), _randn(40_000, 6, seed=12))),
    "n_step_returns": (lambda r, v: rlkernels.n_step_returns(r, v, n=5, gamma=0.99),
                       (_randn(400, 96, seed=13), _randn(400, 96, seed=14))),
    "value_iteration": (lambda R: rlkernels.value_iteration(P_MDP, R, gamma=0.9, tol=1e-5)[:2],
                        (_randn(64, 12, 4, seed=15),)),
}
TERM_LONG = _flags(T_LONG, p=1e-4)
TERM_BATCH = _flags(256, 160)
TERM_NARROW = _flags(4200, 64, seed=21)
TERM_PACKED = _flags(N_PACKED, seed=30)
TOKENS = torch.randint(0, 1500, (96,), generator=torch.Generator().manual_seed(16))
MASK = _flags(48, 1024, p=0.8)
ACTIONS = torch.randint(0, 6, (40_000,), generator=torch.Generator().manual_seed(17))
P_MDP = torch.softmax(_randn(64, 12, 4, 12, seed=18), -1)


def _run(name):
    fn, inputs = CASES[name]
    return _with_grad(fn, inputs)


def _assert_identical(a, b, what):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.view(-1).view(torch.uint8) if x.dtype.is_floating_point else x,
                           y.view(-1).view(torch.uint8) if y.dtype.is_floating_point else y), what


@pytest.mark.parametrize("name", sorted(CASES))
def test_bit_identical_for_any_thread_count(name):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = _run(name)
        for n in (2, 4):
            torch.set_num_threads(n)
            _assert_identical(_run(name), expected, f"{name}: {n} threads differ from 1")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("pairs", ["on", "off"], ids=["line_pairs", "single_lines"])
@pytest.mark.parametrize("name", ["gae_narrow_rows", "gae_narrow_padded", "discounted_returns_long_rows"])
def test_scan_walks_of_either_cpu_bit_identical_for_any_thread_count(name, pairs):
    # The engine walks as on a CPU that prefetches line pairs or not, whatever this one does.
    try:
        torch.ops.rlkernels._cpu_line_pairs(pairs)
        test_bit_identical_for_any_thread_count(name)
    finally:
        torch.ops.rlkernels._cpu_line_pairs("auto")


def test_bit_identical_from_concurrent_python_threads():
    expected = {name: _run(name) for name in CASES}
    results, errors = {}, []

    def worker(k):
        try:
            names = sorted(CASES)
            for name in names[k:] + names[:k]:  # each thread in its own order
                results[(k, name)] = _run(name)
        except Exception as e:  # noqa: BLE001  (reported below: a thread's exception would be lost)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 4 * len(CASES)
    for (k, name), got in results.items():
        _assert_identical(got, expected[name], f"{name} in Python thread {k}")
