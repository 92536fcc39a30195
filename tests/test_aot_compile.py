"""scripts/triton_aot.py: the interpreted Triton launches of the tests, compiled for a GPU without one."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "triton_aot.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, check=False, capture_output=True,
                          text=True, timeout=600)


def test_recorded_launches_compile_and_a_broken_one_is_reported(tmp_path):
    records = tmp_path / "launches.pkl"
    capture = _run("--records", str(records), "--capture-only", "--", "tests/test_ppo.py", "-k",
                   "test_backend_kl_matches_cpu and triton")
    assert capture.returncode == 0, capture.stdout[-2000:] + capture.stderr[-2000:]
    with records.open("rb") as f:
        launches = pickle.load(f)
    kl = [r for r in launches if r["name"] == "_kl_kernel"]
    assert kl and all(r["count"] >= 1 for r in kl)
    ok = _run("--records", str(records), "--arch", "90")
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert f"compiled {len(launches)} of {len(launches)} ({len(launches)} specializations per target)" in ok.stdout
    # The same launch with a block that is not a power of 2: tl.arange cannot compile it, which the
    # interpreter would not notice; the script must name it and fail.
    bad = dict(kl[0], args=tuple((n, ("int", 1000)) if n == "BLOCK" else (n, d) for n, d in kl[0]["args"]))
    with (tmp_path / "bad.pkl").open("wb") as f:
        pickle.dump([bad], f)
    broken = _run("--records", str(tmp_path / "bad.pkl"), "--arch", "90")
    assert broken.returncode == 1
    assert "compiled 0 of 1" in broken.stdout and "FAILED sm_90 ppo._kl_kernel" in broken.stdout


def test_no_launch_recorded_is_an_error_unless_allowed(tmp_path):
    empty = tmp_path / "none.pkl"
    with empty.open("wb") as f:
        pickle.dump([], f)
    assert _run("--records", str(empty)).returncode == 2
    assert _run("--records", str(empty), "--allow-empty").returncode == 0
