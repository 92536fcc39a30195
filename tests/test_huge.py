"""Past 2^31 elements (docs/design.md §3: indexing is 64-bit), and batches past 65,535 rows (a GPU grid's y/z
limit), on the CPU kernels, checked on sampled rows against the reference.

Each test needs a few GiB of memory and is skipped, saying so, where less is available (MemAvailable).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rlkernels
from rlkernels import reference

GiB = 1 << 30


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def needs_memory(gib: float):
    have = _available_bytes()
    return pytest.mark.skipif(have < gib * GiB, reason=f"needs {gib} GiB of available memory, "
                                                       f"{have / GiB:.1f} GiB available")


def _sample_rows(n):
    return sorted({0, 1, n // 2, n - 2, n - 1})


@needs_memory(6)
def test_gather_logprobs_past_2_31_logits():
    # bf16 logits [65537, 32769]: 2^31 + 2^17 + 1 elements (4 GiB), rows past 65,535
    N, V = (1 << 16) + 1, (1 << 15) + 1
    assert N * V > 2**31
    logits = torch.empty(N, V, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for start in range(0, N, 4096):  # filled in slices: no float32 copy of the whole
        logits[start:start + 4096] = torch.randn(min(4096, N - start), V, generator=g).to(torch.bfloat16)
    rows = _sample_rows(N)
    logits[N - 1, V - 1] = 40.0  # the very last element matters: it is the last row's maximum
    tokens = torch.randint(0, V, (N,), generator=g)
    tokens[N - 1] = V - 1
    logp, ent = rlkernels.gather_logprobs(logits, tokens, return_entropy=True)
    e_logp, e_ent = reference.gather_logprobs(logits[rows], tokens[rows], return_entropy=True)
    np.testing.assert_allclose(logp[rows].numpy(), e_logp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ent[rows].numpy(), e_ent, rtol=1e-4, atol=1e-4)
    assert abs(float(logp[N - 1])) < 1e-3  # the last logit dominates its row


@needs_memory(8)
def test_q_targets_past_2_31_q_values():
    # bf16 next_q [2^28 + 1, 8]: 2^31 + 8 elements (4 GiB)
    B, A = (1 << 28) + 1, 8
    next_q = torch.zeros(B, A, dtype=torch.bfloat16)
    rewards = torch.zeros(B, dtype=torch.bfloat16)
    rows = _sample_rows(B)
    g = torch.Generator().manual_seed(1)
    values = torch.randn(len(rows), A, generator=g).to(torch.bfloat16)
    next_q[rows] = values
    rewards[rows] = torch.randn(len(rows), generator=g).to(torch.bfloat16)
    for kind, kwargs in (("max", {}), ("soft", {"temperature": 0.5})):
        y = rlkernels.q_targets(rewards, next_q, gamma=0.9, kind=kind, **kwargs)
        expected = reference.q_targets(rewards[rows], next_q[rows], gamma=0.9, kind=kind, **kwargs)
        np.testing.assert_allclose(y[rows].numpy(), expected, rtol=1e-5, atol=1e-5)
        del y


@needs_memory(16)
def test_discounted_returns_past_2_31_steps():
    # bf16 rewards [T=32769, B=65537] time-major: 2^31 + 2^16 + 2^15 + 1 elements (4 GiB), a batch past 65,535,
    # bool terminated flags of the same size, float32 returns (8 GiB); random where sampled, zero elsewhere
    T, B = (1 << 15) + 1, (1 << 16) + 1
    assert T * B > 2**31
    rewards = torch.zeros(T, B, dtype=torch.bfloat16)
    terminated = torch.zeros(T, B, dtype=torch.bool)
    cols = _sample_rows(B)
    g = torch.Generator().manual_seed(2)
    rewards[:, cols] = torch.randn(T, len(cols), generator=g).to(torch.bfloat16)
    terminated[:, cols] = torch.rand(T, len(cols), generator=g) < 0.001
    out = rlkernels.discounted_returns(rewards, gamma=0.999, terminated=terminated)
    assert out.shape == (T, B) and out.dtype == torch.float32
    expected = reference.discounted_returns(rewards[:, cols], gamma=0.999, terminated=terminated[:, cols])
    # float32 sums over a horizon of 1 / (1 - gamma) = 1000 steps: absolute error relative to the largest return
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(out[:, cols].numpy(), expected, rtol=1e-4, atol=2e-5 * scale)
    # a column between the sampled ones holds zero rewards: its returns are zero
    assert float(out[:, B // 2 + 1].abs().max()) == 0.0


@needs_memory(16)
def test_ppo_policy_loss_past_2_31_tokens():
    # one flat row of 2^31 + 16 bf16 tokens (4 GiB per input), masked out but for sampled ones, the last among
    # them: the loss and every statistic are theirs, so each must have been read where it lies
    N = (1 << 31) + 16
    logp, old, adv = (torch.zeros(N, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.zeros(N, dtype=torch.bool)
    idx = torch.tensor(_sample_rows(N))
    g = torch.Generator().manual_seed(3)
    logp[idx] = (-torch.rand(len(idx), generator=g) * 2).to(torch.bfloat16)
    old[idx] = (logp[idx].float() + 0.3 * torch.randn(len(idx), generator=g)).to(torch.bfloat16)
    adv[idx] = torch.randn(len(idx), generator=g).to(torch.bfloat16)
    old[N - 1] = logp[N - 1].float() - 1.0  # the largest ratio, e^1, at the very last token
    mask[idx] = True
    loss, stats = rlkernels.ppo_policy_loss(logp, old, adv, mask, clip_low=0.2)
    e_loss, e_stats = reference.ppo_policy_loss(logp[idx], old[idx], adv[idx], mask[idx], clip_low=0.2)
    np.testing.assert_allclose(float(loss), e_loss, rtol=1e-5, atol=1e-6)
    for name, value in e_stats.items():
        np.testing.assert_allclose(float(stats[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert float(stats["ratio_max"]) == pytest.approx(np.exp(1.0), rel=1e-2)
