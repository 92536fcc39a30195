"""What a wheel user sees when the compiled library does not match their torch (rlkernels/_load.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_BUILD = """
import sys, types, warnings
sys.modules["rlkernels._build_info"] = types.SimpleNamespace(
    TORCH_VERSION="1.13.1+cu117", TORCH_RELEASE="1.13", TORCH_CUDA="11.7", WITH_CUDA=True, CUDA_ARCH_LIST="8.0")
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FAKE_BUILD + code], cwd=ROOT, check=False, capture_output=True, text=True,
                          timeout=120)


def test_library_that_fails_to_load_names_the_torch_it_needs():
    proc = run('sys.modules["rlkernels._C"] = None  # what a failed dlopen looks like to Python\n'
               "import rlkernels\n")
    assert proc.returncode != 0
    message = proc.stderr.splitlines()[-2:]
    assert any("ImportError: rlkernels' compiled library failed to load" in line for line in message), proc.stderr
    assert "torch 1.13.x (built with 1.13.1+cu117, CUDA 11.7)" in proc.stderr
    assert "install torch==1.13.*" in proc.stderr


def test_torch_release_mismatch_warns_when_the_library_loads():
    proc = run("warnings.simplefilter('always')\nimport rlkernels\nprint(rlkernels.available_backends())\n")
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning: rlkernels was built against torch 1.13.1+cu117" in proc.stderr
    assert "install torch==1.13.*" in proc.stderr


def test_build_records_the_torch_it_compiled_against():
    from rlkernels import _load

    info = _load.build_info()
    if info is None:
        pytest.skip("library copied in without setup.py: no build info recorded")
    import torch

    assert torch.__version__.startswith(info.TORCH_RELEASE + ".")
