"""The CPU kernels built for each instruction set, not only the widest this machine runs.

The scan engine and the PPO lanes are compiled for SSE2, AVX2 and AVX-512 and pick one when first used;
RLKERNELS_CPU_ISA caps the choice. A subprocess per level runs the in-place and buffered scan walks (GAE and
Retrace) and the PPO lanes against the NumPy reference, so the SSE2 build (what a CPU without AVX2 runs) executes in CI too.
(Levels this CPU lacks are capped to the widest it has, so they re-run that build.)
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, numpy as np, torch, rlkernels
from rlkernels import reference
g = torch.Generator().manual_seed(0)
worst = 0.0
for shape, td in (((64, 48), 0), ((16, 103), -1), ((2, 20000), -1), ((37, 5), 0)):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        term = torch.rand(shape, generator=g) < 0.02
        mask = torch.rand(shape, generator=g) < 0.9
        adv, ret = rlkernels.gae(r, v, gamma=0.99, lam=0.95, terminated=term, mask=mask, time_dim=td)
        e_adv, e_ret = reference.gae(r.double(), v.double(), gamma=0.99, lam=0.95, terminated=term, mask=mask,
                                     time_dim=td)
        scale = max(1.0, float(np.abs(e_adv).max()))
        worst = max(worst, float(np.abs(adv.double().numpy() - e_adv).max()) / scale)
        # Retrace: the V-trace-like exp of its trace coefficients, one carry, through the same walks
        q, nv = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
        lr = (0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
        G = rlkernels.retrace(r, q, nv, lr, gamma=0.99, lam=0.95, terminated=term, mask=mask, time_dim=td)
        e_G = reference.retrace(r.double(), q.double(), nv.double(), lr.double(), gamma=0.99, lam=0.95,
                                terminated=term, mask=mask, time_dim=td)
        scale = max(1.0, float(np.abs(e_G).max()))
        worst = max(worst, float(np.abs(G.double().numpy() - e_G).max()) / scale)
lp = -torch.rand(8, 300, generator=g)
old = lp + 0.3 * torch.randn(8, 300, generator=g)
adv = torch.randn(8, 300, generator=g)
mask = torch.rand(8, 300, generator=g) < 0.8
loss, _ = rlkernels.ppo_policy_loss(lp, old, adv, mask, clip_low=0.2, dual_clip=3.0)
e_loss, _ = reference.ppo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
print(json.dumps({"scan": worst, "ppo": abs(float(loss) - e_loss) / max(1.0, abs(e_loss))}))
"""


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_each_instruction_set_matches_reference(isa):
    env = {**os.environ, "RLKERNELS_CPU_ISA": isa}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    err = json.loads(out.stdout.strip().splitlines()[-1])
    # bf16 inputs are compared on their rounded values, so the error is float32 accumulation only
    assert err["scan"] < 1e-4, err
    assert err["ppo"] < 1e-5, err
