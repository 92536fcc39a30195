"""Smoke test of an installed rlkernels wheel, run by scripts/wheel.sh inside a fresh virtual environment.

    python scripts/wheel_smoke.py dist/rlkernels-*.whl

Checks the wheel file (only the package and its metadata; the torch pin; the extras) and the installed
package: it imports from site-packages (not a checkout), lists its backends, and gae, gather_logprobs and
ppo_policy_loss run and agree with rlkernels.reference (gae) or plain torch. Exits non-zero on any failure.
"""

from __future__ import annotations

import os
import re
import sys
import zipfile

# Run from outside the checkout: "import rlkernels" must find the installed wheel, not the source tree.
sys.path = [p for p in sys.path if p not in ("", os.getcwd(), os.path.dirname(os.path.abspath(__file__)))]


def check_wheel(path: str) -> None:
    name = os.path.basename(path)
    assert re.fullmatch(r"rlkernels-[\w.]+-cp310-abi3-linux_x86_64\.whl", name), f"unexpected wheel tag: {name}"
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = wheel.read(f"{dist_info}/METADATA").decode()
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    stray = [n for n in names if not n.startswith(("rlkernels/", dist_info + "/"))]
    assert not stray, f"files outside the package: {stray}"
    bad = [n for n in names if n.startswith("rlkernels/") and not n.endswith((".py", "_C.abi3.so"))]
    assert not bad, f"files other than Python modules and the library: {bad}"
    for module in ("rlkernels/_C.abi3.so", "rlkernels/_build_info.py", "rlkernels/bench/__main__.py"):
        assert module in names, f"{module} is missing"
    requires = re.findall(r"^Requires-Dist: (.*)$", metadata, re.MULTILINE)
    assert any(re.fullmatch(r"torch==\d+\.\d+\.\*", r) for r in requires), f"torch is not pinned: {requires}"
    assert "numpy" in requires, requires
    extras = set(re.findall(r"^Provides-Extra: (.*)$", metadata, re.MULTILINE))
    assert {"triton", "test", "bench"} <= extras, extras
    assert "rlkernels-bench = rlkernels.bench.__main__:main" in entry_points, entry_points
    size = os.path.getsize(path)
    print(f"wheel ok: {name}, {size / 1e6:.2f} MB, {len(names)} files, requires {requires[:2]}")


def check_package() -> None:
    import numpy as np
    import torch

    import rlkernels
    from rlkernels import _build_info, reference

    where = os.path.dirname(rlkernels.__file__)
    assert "site-packages" in where, f"rlkernels imported from {where}, not from the installed wheel"
    assert torch.__version__.startswith(_build_info.TORCH_RELEASE + "."), (torch.__version__, _build_info)
    backends = rlkernels.available_backends()
    assert backends[0] == "cpu" and "reference" in backends, backends
    print(f"rlkernels {rlkernels.__version__} from {where}; torch {torch.__version__}; backends {backends}; "
          f"CUDA kernels built: {_build_info.WITH_CUDA} {_build_info.CUDA_ARCH_LIST}")

    g = torch.Generator().manual_seed(0)
    T, B = 257, 5
    rewards, values = torch.randn(T, B, generator=g), torch.randn(T, B, generator=g)
    terminated = torch.rand(T, B, generator=g) < 0.05
    bootstrap = torch.randn(B, generator=g)
    adv, ret = rlkernels.gae(rewards, values, gamma=0.99, lam=0.95, terminated=terminated, bootstrap_value=bootstrap)
    ref_adv, ref_ret = reference.gae(
        rewards.numpy(), values.numpy(), gamma=0.99, lam=0.95, terminated=terminated.numpy(),
        bootstrap_value=bootstrap.numpy(),
    )
    np.testing.assert_allclose(adv.numpy(), ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret.numpy(), ref_ret, rtol=1e-5, atol=1e-5)

    logits = torch.randn(6, 33, generator=g, requires_grad=True)
    tokens = torch.randint(0, 33, (6,), generator=g)
    logp, entropy = rlkernels.gather_logprobs(logits, tokens, return_entropy=True)
    log_softmax = torch.log_softmax(logits.detach(), -1)
    torch.testing.assert_close(logp.detach(), log_softmax.gather(-1, tokens[:, None])[:, 0])
    torch.testing.assert_close(entropy.detach(), -(log_softmax.exp() * log_softmax).sum(-1))
    logp.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()

    new_logp = (-torch.rand(4, 9, generator=g) * 3).requires_grad_()
    old_logp = new_logp.detach() + 0.1 * torch.randn(4, 9, generator=g)
    advantages, mask = torch.randn(4, 9, generator=g), torch.rand(4, 9, generator=g) > 0.2
    loss, stats = rlkernels.ppo_policy_loss(new_logp, old_logp, advantages, mask, clip_low=0.2)
    ratio = (new_logp.detach() - old_logp).exp()
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
    torch.testing.assert_close(loss.detach(), (per_token * mask).sum() / mask.sum())
    loss.backward()
    assert new_logp.grad is not None and set(stats) >= {"clipfrac", "approx_kl", "ratio_mean", "ratio_max"}
    print("smoke ok: gae matches rlkernels.reference; gather_logprobs and ppo_policy_loss match torch, backward runs")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        check_wheel(sys.argv[1])
    check_package()
