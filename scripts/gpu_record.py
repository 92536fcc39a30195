"""Records which GPU backend passed its GPU tests, per op family, in rlkernels/_gpu_validated.py.

    python scripts/gpu_record.py OUT/tests-cuda.xml OUT/tests-triton.xml   (run by scripts/gpu.sh)

Each JUnit file holds one backend's run (its name says which). A family passes on a backend when at least one
of its tests ran and none failed or errored; skipped tests count for nothing.
"""

from __future__ import annotations

import datetime
import pprint
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "rlkernels" / "_gpu_validated.py"


def family_of(classname: str, name: str) -> str | None:
    """The op family of a test, from its module (tests/test_<family>.py)."""
    match = re.search(r"\btest_(returns|bellman|logprobs|ppo)\b", classname)
    return match.group(1) if match else None


def main(paths: list[str]) -> int:
    from rlkernels._gpu_validated import VALIDATED

    record = {family: dict(backends) for family, backends in VALIDATED.items()}
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip() or "unknown"
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "commit": commit,
            "torch": torch.__version__}
    for path in paths:
        backend = "triton" if "triton" in Path(path).name else "cuda"
        if not Path(path).exists():
            print(f"{path}: missing (the test step did not run)")
            continue
        counts: dict[str, dict[str, int]] = {}
        for case in ET.parse(path).getroot().iter("testcase"):
            family = family_of(case.get("classname", ""), case.get("name", ""))
            if family is None:
                continue
            c = counts.setdefault(family, {"tests": 0, "failed": 0})
            if case.find("skipped") is not None:
                continue
            c["tests"] += 1
            if case.find("failure") is not None or case.find("error") is not None:
                c["failed"] += 1
        for family, c in counts.items():
            if c["tests"] == 0:  # every case skipped (say, no CUDA kernels built): no verdict either way
                print(f"{family:10s} {backend:7s} nothing run: record unchanged")
                continue
            record.setdefault(family, {})[backend] = {**meta, **c, "passed": c["failed"] == 0}
            print(f"{family:10s} {backend:7s} {c['tests']} run, {c['failed']} failed")
    head = RECORD.read_text().split("VALIDATED", 1)[0]
    RECORD.write_text(head + "VALIDATED: dict[str, dict[str, dict]] = " + pprint.pformat(record, width=110) + "\n")
    print(f"wrote {RECORD}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
