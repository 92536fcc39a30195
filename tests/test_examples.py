"""Smoke tests of examples/: each example's main(argv) runs on a short budget and reports finite losses.

They run in CI (a few seconds each on 2 cores); the full training runs are the examples' default commands.
gymnasium and stable-baselines3 are installed by scripts/setup.sh; importorskip keeps this file clean where
one is missing.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"rlkernels_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # the examples call torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_finite(stats, keys):
    for k in keys:
        assert math.isfinite(stats[k]), f"{k} = {stats[k]}"


def test_ppo_cartpole_runs():
    pytest.importorskip("gymnasium")
    ppo = load("ppo_cartpole")
    stats = ppo.main(["--total-timesteps", "2048", "--update-epochs", "4", "--seed", "0", "--quiet"])
    assert stats["global_step"] == 2048
    assert stats["episodes"] > 0 and math.isfinite(stats["avg_return"])
    assert_finite(stats, ["pg_loss", "v_loss", "entropy", "approx_kl", "clipfrac"])
    assert set(stats["phases"]) == {"env", "next_values", "gae", "update"}
    assert all(t > 0 for t in stats["phases"].values())


def test_ppo_cartpole_stops_at_target_and_is_deterministic():
    pytest.importorskip("gymnasium")
    ppo = load("ppo_cartpole")
    argv = ["--total-timesteps", "4096", "--num-envs", "4", "--seed", "3", "--quiet",
            "--target-return", "1", "--window", "3"]
    a, b = ppo.main(argv), ppo.main(argv)
    assert a["reached"] and a["global_step"] < 4096  # stops early once the target is met
    for k in ("global_step", "episodes", "avg_return", "pg_loss", "v_loss"):
        assert a[k] == b[k], k


def test_sb3_ppo_runs_and_matches_sb3_gae():
    pytest.importorskip("stable_baselines3")
    sb3 = load("sb3_ppo")
    stats = sb3.main(["--total-timesteps", "2048", "--seed", "0", "--quiet"])
    assert stats["global_step"] >= 2048
    assert stats["gae_max_diff_vs_sb3"] < 1e-4  # the rlkernels buffer gives SB3's advantages and returns
    assert_finite(stats, ["loss", "policy_gradient_loss", "value_loss", "approx_kl"])


def test_dqn_cartpole_runs():
    pytest.importorskip("gymnasium")
    dqn = load("dqn_cartpole")
    stats = dqn.main(["--total-timesteps", "1500", "--learning-starts", "500", "--train-freq", "250",
                      "--gradient-steps", "8", "--seed", "0", "--quiet"])
    assert stats["gradient_steps"] == 4 * 8
    assert_finite(stats, ["loss", "mean_abs_td"])


def test_llm_ppo_step_runs_and_is_deterministic():
    llm = load("llm_ppo_step")
    argv = ["--iterations", "2", "--ppo-epochs", "2", "--batch", "4", "--response-len", "8", "--seed", "0",
            "--quiet"]
    stats = llm.main(argv)
    assert len(stats["history"]) == 4
    for row in stats["history"]:
        assert_finite(row, ["loss", "pg_loss", "vf_loss", "entropy", "approx_kl", "clipfrac", "kl_ref"])
        assert 0 < row["response_len"] <= 8
    # The first epoch of a rollout is on-policy: ratio 1 everywhere, nothing clipped.
    assert stats["history"][0]["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert stats["history"][0]["clipfrac"] == 0.0
    assert llm.main(argv)["loss"] == stats["loss"]


def test_llm_ppo_distributed_matches_one_process():
    """2 data-parallel x 2 vocab-parallel gloo processes give the single-process losses at every step."""
    example = load("llm_ppo_distributed")
    stats = example.main(["--steps", "2", "--vocab", "257", "--batch", "4", "--response-len", "6",
                          "--prompt-len", "4", "--timeout", "240", "--quiet"])
    assert len(stats["distributed"]) == len(stats["single"]) == 2
    for dist_row, one_row in zip(stats["distributed"], stats["single"]):
        for k in ("loss", "pg_loss", "vf_loss"):
            assert math.isfinite(one_row[k])
            assert dist_row[k] == pytest.approx(one_row[k], rel=1e-5, abs=1e-6), k
    assert stats["single"][1]["loss"] != stats["single"][0]["loss"]  # the policy was trained between steps


def test_llm_ppo_step_fused_head_matches_logits_head():
    llm = load("llm_ppo_step")
    argv = ["--iterations", "1", "--ppo-epochs", "2", "--batch", "4", "--response-len", "8", "--seed", "2",
            "--quiet"]
    fused = llm.main([*argv, "--head", "fused"])["history"]
    logits = llm.main([*argv, "--head", "logits"])["history"]
    for a, b in zip(fused, logits, strict=True):
        for key in ("loss", "pg_loss", "vf_loss", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def _readme_example():
    text = (EXAMPLES.parent / "README.md").read_text()
    section = text[text.index("## Example\n"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]


def test_readme_example_gives_cleanrls_advantages():
    """The README's CleanRL call and its core-op equivalent both give the advantages of CleanRL's own loop, and
    the flags taken as stored (off by one step) would not."""
    from conftest import assert_close

    import rlkernels
    from rlkernels.bench.trainers import cleanrl_gae

    torch.manual_seed(0)
    ns = {}
    exec(compile(_readme_example(), "README.md", "exec"), ns)  # noqa: S102  (the README's own code)
    exp_adv, exp_ret = cleanrl_gae(ns["rewards"], ns["values"], ns["dones"], ns["next_value"], ns["next_done"],
                                   0.99, 0.95)
    for adv, ret in ((ns["advantages"], ns["returns"]), (ns["core_adv"], ns["core_ret"])):
        assert_close(adv, exp_adv, torch.float32)
        assert_close(ret, exp_ret, torch.float32)
    wrong, _ = rlkernels.gae(ns["rewards"], ns["values"], gamma=0.99, lam=0.95, terminated=ns["dones"],
                             bootstrap_value=ns["next_value"])
    assert (wrong - exp_adv).abs().max() > 0.5
    assert ns["adv"].shape == (2048, 64) and ns["tok_adv"].shape == (8, 512)


def test_llm_ppo_step_eager_baseline_is_the_same_computation():
    """--impl torch (the eager code the ops replace) gives the same losses and stats: the timings it prints
    compare two implementations of one step."""
    llm = load("llm_ppo_step")
    argv = ["--iterations", "2", "--ppo-epochs", "2", "--batch", "4", "--response-len", "8", "--seed", "1",
            "--quiet"]
    ours, eager = llm.main(argv), llm.main(argv + ["--impl", "torch"])
    assert set(ours["phases"]) == {"sample", "score", "update"} and all(t > 0 for t in eager["phases"].values())
    for a, b in zip(ours["history"], eager["history"]):
        for k in ("loss", "pg_loss", "vf_loss", "entropy", "approx_kl", "clipfrac", "ratio_max", "vf_clipfrac",
                  "kl_ref", "score"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k


def test_ppo_cartpole_eager_baseline_is_the_same_computation():
    pytest.importorskip("gymnasium")
    ppo = load("ppo_cartpole")
    argv = ["--total-timesteps", "1024", "--num-envs", "4", "--num-steps", "128", "--update-epochs", "2",
            "--seed", "2", "--quiet"]
    ours, eager = ppo.main(argv), ppo.main(argv + ["--impl", "torch"])
    assert ours["global_step"] == eager["global_step"] == 1024
    for k in ("avg_return", "pg_loss", "v_loss", "entropy", "approx_kl", "clipfrac"):
        assert ours[k] == pytest.approx(eager[k], rel=1e-4, abs=1e-5), k
