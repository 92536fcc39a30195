"""Builds rlkernels._C.

CPU kernels are always compiled. CUDA kernels (csrc/cuda/*.cu) are compiled when torch was built with
CUDA and nvcc is found, unless RLKERNELS_SKIP_CUDA_BUILD=1; RLKERNELS_FORCE_CUDA_BUILD=1 makes a missing
toolkit an error instead of a silent CPU-only build. TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX") picks the
GPU architectures, MAX_JOBS the number of parallel compile jobs.
"""

import glob
import os
import shutil
import site
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """CUDA_HOME as set, else the toolkit that owns nvcc (torch guesses /usr/local for /usr/local/bin/nvcc)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        return os.path.dirname(os.path.dirname(real))
    return None


cuda_home = _find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import time.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _pip_cuda_include_dirs():
    """Headers such as cusparse.h that ATen/cuda pulls in ship only with the pip CUDA wheels."""
    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages(), sysconfig.get_paths()["purelib"]]:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include", "nvidia/cusparse/include"):
            path = os.path.join(base, sub)
            if os.path.isdir(path) and path not in dirs:
                dirs.append(path)
    return dirs


def _want_cuda(cu_sources):
    if _truthy("RLKERNELS_SKIP_CUDA_BUILD"):
        return False
    force = _truthy("RLKERNELS_FORCE_CUDA_BUILD")
    reasons = []
    if not cu_sources:
        reasons.append("no csrc/cuda/*.cu sources")
    if torch.version.cuda is None:
        reasons.append("torch was built without CUDA")
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        reasons.append("nvcc not found (set CUDA_HOME)")
    if reasons and force:
        sys.exit("RLKERNELS_FORCE_CUDA_BUILD=1 but CUDA kernels cannot be built: " + "; ".join(reasons))
    if reasons:
        print("rlkernels: building CPU kernels only: " + "; ".join(reasons))
    return not reasons


def extensions():
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # -O3 for the auto-vectorized lane loops. No -march: the instruction set is chosen at run time
    # (csrc/cpu/isa_*.cpp), so the wheel also runs on CPUs without AVX-512.
    cxx_flags = ["-O3", "-std=c++20", "-fno-math-errno", "-Wno-psabi", "-DPy_LIMITED_API=0x030A0000"]
    define_macros = []
    if _want_cuda(cu_sources):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        return [
            CUDAExtension(
                "rlkernels._C",
                cpp_sources + cu_sources,
                include_dirs=include_dirs + _pip_cuda_include_dirs(),
                define_macros=define_macros + [("RLKERNELS_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                py_limited_api=True,
            )
        ]
    return [
        CppExtension(
            "rlkernels._C",
            cpp_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            py_limited_api=True,
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
