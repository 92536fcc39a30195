"""The benchmark table, run from a checkout: ``python -m benchmarks.run [args]``.

A shim for ``rlkernels-bench`` / ``python -m rlkernels.bench`` (the code lives in rlkernels/bench/) that
keeps writing the results of a full run to benchmarks/results/, where the recorded tables live.
"""

import sys
from pathlib import Path

from rlkernels.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(results_dir=Path(__file__).resolve().parent / "results", prog="python -m benchmarks.run"))
